//! jsonPTS, the PTS-2 controller's protocol, as its specification (R129)
//! describes it: the message envelope, the packets this crate speaks, and the
//! error table. Wire types only, no I/O: the simulator and the bridge both
//! read and write through here.
//!
//! Numbers are floats on the wire with up to 3 decimals ("25.00", "1.34");
//! they are read from their own JSON text into [`Num`], never through `f64`.
//! Fields that came and went between firmware releases are `Option`s, and
//! unknown fields are ignored: a controller newer or older than the
//! specification still parses.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The value of every envelope's `Protocol`.
pub const PROTOCOL: &str = "jsonPTS";
/// The path the controller serves jsonPTS on ("register dependent").
pub const PATH: &str = "/jsonPTS";
/// The path the controller opens its WebSocket on at the remote server.
pub const WEBSOCKET_PATH: &str = "/ptsWebSocket";
/// The controller's input buffer: a longer request is refused.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Why a jsonPTS text could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("not a jsonPTS message: {0}")]
    Json(String),
    #[error("the message's Protocol is {0:?}, not \"jsonPTS\"")]
    Protocol(String),
    #[error("packet {id} ({kind}): {message}")]
    Data {
        id: u32,
        kind: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Numbers

/// A jsonPTS float, exact: the decimal its JSON text says.
///
/// Read from a JSON number's own text or from a string holding one (some
/// firmwares quote values); only plain decimals (`-?digits(.digits)?`) are
/// taken, so `1e3` or `NaN` is an error rather than a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Num(pub Decimal);

impl Num {
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Num {
    type Err = String;
    fn from_str(text: &str) -> Result<Num, String> {
        let digits = text.strip_prefix('-').unwrap_or(text);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let plain = !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
        if !plain {
            return Err(format!("{text:?} is not a plain decimal number"));
        }
        Decimal::from_str(text)
            .map(Num)
            .map_err(|e| format!("{text:?}: {e}"))
    }
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(d)?;
        let text = raw.get().trim();
        let text = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(quoted) => quoted,
            None => text,
        };
        text.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A JSON number with the decimal's own digits: "12.50", not 12.5.
        let raw = RawValue::from_string(self.0.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// A packet's `Id`: an integer from 1 to 2147483647, which one of the
/// specification's own examples quotes (`"Id":"1"`), so both are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PacketId(pub u32);

impl<'de> Deserialize<'de> for PacketId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PacketId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u32),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(PacketId(n)),
            Either::Text(t) => t
                .trim()
                .parse()
                .map(PacketId)
                .map_err(|_| de::Error::custom(format!("packet Id {t:?} is not a number"))),
        }
    }
}

// ---------------------------------------------------------------------------
// The envelope

/// One jsonPTS message: requests from a client, responses from the
/// controller, or the controller's uploads to a remote server (which carry
/// `PtsId`). An error with the whole message is in `Error`/`Code`/`Message`.
#[derive(Debug, Deserialize)]
pub struct Message {
    #[serde(rename = "Protocol")]
    pub protocol: String,
    #[serde(rename = "PtsId", default)]
    pub pts_id: Option<String>,
    #[serde(rename = "Packets", default)]
    pub packets: Vec<Packet>,
    #[serde(rename = "Error", default)]
    pub error: Option<bool>,
    #[serde(rename = "Code", default)]
    pub code: Option<u32>,
    #[serde(rename = "Message", default)]
    pub message: Option<String>,
}

/// One packet, request or response: the fields of both, the `Data` kept raw
/// until its `Type` says what it holds.
#[derive(Debug, Deserialize)]
pub struct Packet {
    #[serde(rename = "Id")]
    pub id: PacketId,
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Error", default)]
    pub error: Option<bool>,
    #[serde(rename = "Code", default)]
    pub code: Option<u32>,
    #[serde(rename = "Message", default)]
    pub message: Option<String>,
    #[serde(rename = "Data", default)]
    pub data: Option<Box<RawValue>>,
}

impl Message {
    /// Reads a jsonPTS text.
    pub fn parse(text: &str) -> Result<Message, WireError> {
        let m: Message = serde_json::from_str(text).map_err(|e| WireError::Json(e.to_string()))?;
        if m.protocol != PROTOCOL {
            return Err(WireError::Protocol(m.protocol));
        }
        Ok(m)
    }

    /// The error of the whole message, if it is one.
    pub fn error(&self) -> Option<PtsError> {
        (self.error == Some(true))
            .then(|| PtsError::new(self.code.unwrap_or(0), self.message.clone()))
    }
}

impl Packet {
    /// The packet's error, if it is one: `Error: true`, or a `Code` with a
    /// message that is not "OK" (a firmware that leaves `Error` out).
    pub fn error(&self) -> Option<PtsError> {
        let flagged = self.error == Some(true)
            || (self.error.is_none()
                && self.code.is_some_and(|c| c != 0)
                && self.message.as_deref() != Some("OK"));
        flagged.then(|| {
            let mut e = PtsError::new(self.code.unwrap_or(0), self.message.clone());
            e.data = self.data.as_ref().map(|d| d.get().to_owned());
            e
        })
    }

    /// A confirmation: no error, `Message: "OK"`.
    pub fn is_ok(&self) -> bool {
        self.error().is_none() && self.message.as_deref() == Some("OK")
    }

    /// `Data` read as `T`.
    pub fn data<T: for<'de> Deserialize<'de>>(&self) -> Result<T, WireError> {
        let text = self.data.as_ref().map_or("null", |d| d.get());
        serde_json::from_str(text).map_err(|e| WireError::Data {
            id: self.id.0,
            kind: self.kind.clone(),
            message: e.to_string(),
        })
    }
}

/// One packet to send.
#[derive(Debug, Clone, Serialize)]
pub struct Outgoing {
    #[serde(rename = "Id")]
    pub id: u32,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Data", skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

impl Outgoing {
    /// A packet whose `Data` is `data` written as JSON (numbers as [`Num`]
    /// writes them: their own digits).
    pub fn new(id: u32, kind: impl Into<String>, data: Option<&impl Serialize>) -> Outgoing {
        Outgoing {
            id,
            kind: kind.into(),
            data: data.and_then(|d| serde_json::value::to_raw_value(d).ok()),
        }
    }
}

/// Writes an envelope of `packets` (`pts_id` on the controller's uploads).
pub fn envelope(pts_id: Option<&str>, packets: &[Outgoing]) -> String {
    #[derive(Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "Protocol")]
        protocol: &'a str,
        #[serde(rename = "PtsId", skip_serializing_if = "Option::is_none")]
        pts_id: Option<&'a str>,
        #[serde(rename = "Packets")]
        packets: &'a [Outgoing],
    }
    serde_json::to_string(&Envelope {
        protocol: PROTOCOL,
        pts_id,
        packets,
    })
    .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Requests a client sends

/// The requests the bridge sends, each one packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    GetUniqueIdentifier,
    PumpGetStatus { pump: u16 },
    PumpGetTransactionInformation { pump: u16, transaction: u32 },
    PumpCloseTransaction { pump: u16, transaction: u32 },
    PumpLock { pump: u16 },
    PumpUnlock { pump: u16 },
    PaymentCreateTransaction(PaymentForTransaction),
}

/// One pump transaction's payment (`PaymentCreateTransaction`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PaymentForTransaction {
    pub pump: u16,
    pub transaction: u32,
    /// The transaction's end, `YYYY-MM-DDThh:mm:ss`.
    pub date_time: String,
    pub payments: Vec<PaymentPart>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PaymentPart {
    pub amount: Num,
    pub payment_form_id: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PumpTransactionRef {
    pub pump: u16,
    pub transaction: Option<u32>,
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::GetUniqueIdentifier => "GetUniqueIdentifier",
            Request::PumpGetStatus { .. } => "PumpGetStatus",
            Request::PumpGetTransactionInformation { .. } => "PumpGetTransactionInformation",
            Request::PumpCloseTransaction { .. } => "PumpCloseTransaction",
            Request::PumpLock { .. } => "PumpLock",
            Request::PumpUnlock { .. } => "PumpUnlock",
            Request::PaymentCreateTransaction(_) => "PaymentCreateTransaction",
        }
    }

    /// The packet, with its `Id`.
    pub fn packet(&self, id: u32) -> Outgoing {
        use serde_json::json;
        let kind = self.kind();
        match self {
            Request::GetUniqueIdentifier => Outgoing::new(id, kind, None::<&()>),
            Request::PumpGetStatus { pump }
            | Request::PumpLock { pump }
            | Request::PumpUnlock { pump } => {
                Outgoing::new(id, kind, Some(&json!({ "Pump": pump })))
            }
            Request::PumpGetTransactionInformation { pump, transaction }
            | Request::PumpCloseTransaction { pump, transaction } => Outgoing::new(
                id,
                kind,
                Some(&json!({ "Pump": pump, "Transaction": transaction })),
            ),
            Request::PaymentCreateTransaction(p) => Outgoing::new(
                id,
                kind,
                Some(&PaymentData {
                    pump_transactions: std::slice::from_ref(p),
                }),
            ),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PaymentData<'a> {
    pump_transactions: &'a [PaymentForTransaction],
}

/// `PaymentCreateTransaction`'s data, as the controller reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PaymentRequest {
    pub pump_transactions: Vec<PaymentForTransaction>,
}

// ---------------------------------------------------------------------------
// Pump statuses: the answers to PumpGetStatus

/// `PumpIdleStatus`: no filling. `Transaction` is there only while the pump
/// is authorized and not filling yet; the `Last…` fields describe the last
/// transaction.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct IdleStatus {
    pub pump: u16,
    /// Before R68 the only nozzle field; kept beside `Nozzle` since.
    pub nozzle_up: Option<u8>,
    pub nozzle: Option<u8>,
    pub transaction: Option<u32>,
    pub request: Option<String>,
    pub user: Option<String>,
    pub last_transaction: Option<u32>,
    pub last_date_time_start: Option<String>,
    pub last_date_time: Option<String>,
    pub last_nozzle: Option<u8>,
    pub last_fuel_grade_name: Option<String>,
    pub last_volume: Option<Num>,
    pub last_price: Option<Num>,
    pub last_amount: Option<Num>,
    pub last_user: Option<String>,
}

impl IdleStatus {
    /// The nozzle taken up, 0 when all are down, whichever field the
    /// firmware sends.
    pub fn nozzle_up(&self) -> u8 {
        self.nozzle.or(self.nozzle_up).unwrap_or(0)
    }
}

/// What `PumpFillingStatus` and `PumpEndOfTransactionStatus` share: the open
/// transaction.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct TransactionStatus {
    pub pump: u16,
    pub nozzle: Option<u8>,
    /// Since R67, and only with nozzles linked to fuel grades.
    pub fuel_grade_id: Option<u16>,
    pub fuel_grade_name: Option<String>,
    pub transaction: u32,
    pub volume: Option<Num>,
    /// Since R18.
    #[serde(rename = "TCVolume", default)]
    pub tc_volume: Option<Num>,
    pub price: Option<Num>,
    pub amount: Option<Num>,
    /// Since R68; absent when the controller has no value for it.
    pub date_time_start: Option<String>,
    /// End of filling (end of transaction only), since R68.
    pub date_time: Option<String>,
    pub total_volume: Option<Num>,
    pub total_amount: Option<Num>,
    /// Since P113.
    pub flow_rate: Option<u32>,
    /// Since P114 (filling).
    pub is_suspended: Option<bool>,
    /// End of transaction only, since P90: the nozzle up now, not the
    /// transaction's.
    pub nozzle_up: Option<u8>,
    /// P98 to P112 only.
    pub payment_form_id: Option<u8>,
    pub tag: Option<String>,
    pub user: Option<String>,
}

/// `PumpOfflineStatus`: the pump does not answer. Since R69 it also says
/// what the pump was doing (`State`) and its open transaction, if any.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct OfflineStatus {
    pub pump: u16,
    pub state: Option<String>,
    pub transaction: Option<u32>,
    pub volume: Option<Num>,
    pub price: Option<Num>,
    pub amount: Option<Num>,
    pub date_time_start: Option<String>,
    pub last_transaction: Option<u32>,
}

/// One pump's answer to `PumpGetStatus`.
#[derive(Debug, Clone, PartialEq)]
pub enum PumpStatus {
    Idle(IdleStatus),
    Filling(TransactionStatus),
    EndOfTransaction(TransactionStatus),
    Offline(OfflineStatus),
    /// A status this crate does not act on (`PumpTotals`, `PumpPrices`,
    /// `PumpTag`, `PumpDisplayData`, or a newer one): the pump's state is
    /// unchanged as far as a sale goes.
    Other {
        pump: Option<u16>,
        kind: String,
    },
}

impl PumpStatus {
    /// The status in `packet`, or the controller's error for it.
    pub fn from_packet(packet: &Packet) -> Result<Result<PumpStatus, PtsError>, WireError> {
        if let Some(e) = packet.error() {
            return Ok(Err(e));
        }
        Ok(Ok(match packet.kind.as_str() {
            "PumpIdleStatus" => PumpStatus::Idle(packet.data()?),
            "PumpFillingStatus" => PumpStatus::Filling(packet.data()?),
            "PumpEndOfTransactionStatus" => PumpStatus::EndOfTransaction(packet.data()?),
            "PumpOfflineStatus" => PumpStatus::Offline(packet.data()?),
            other => {
                #[derive(Deserialize)]
                struct JustPump {
                    #[serde(rename = "Pump")]
                    pump: Option<u16>,
                }
                let pump = packet.data::<JustPump>().ok().and_then(|p| p.pump);
                PumpStatus::Other {
                    pump,
                    kind: other.to_owned(),
                }
            }
        }))
    }

    pub fn pump(&self) -> Option<u16> {
        match self {
            PumpStatus::Idle(s) => Some(s.pump),
            PumpStatus::Filling(s) | PumpStatus::EndOfTransaction(s) => Some(s.pump),
            PumpStatus::Offline(s) => Some(s.pump),
            PumpStatus::Other { pump, .. } => *pump,
        }
    }
}

/// `PumpTransactionInformation`: one transaction by its number.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct TransactionInformation {
    pub pump: u16,
    pub transaction: u32,
    /// `WaitingNozzleUpForAuthorization`, `Authorized`, `Filling`,
    /// `EndOfTransaction` (since R68), `Finished`, `Not found`.
    pub state: String,
    pub date_time_start: Option<String>,
    pub date_time: Option<String>,
    pub volume: Option<Num>,
    pub amount: Option<Num>,
    /// Since P113, where the controller has it.
    pub is_paid: Option<bool>,
    pub is_offline: Option<bool>,
    pub user_id: Option<u32>,
}

/// `UniqueIdentifier`: the controller's id, up to 24 hex digits. The
/// specification names the field `ID` in its table and `Id` in its example.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UniqueIdentifier {
    #[serde(rename = "Id", alias = "ID")]
    pub id: String,
}

/// `PaymentCreateTransactionConfirmation`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PaymentConfirmation {
    pub payment_transaction: u64,
}

// ---------------------------------------------------------------------------
// The controller's uploads to a remote server

/// `UploadPumpTransaction`: a finished transaction. The controller sends it
/// again until it is confirmed, so reading it twice must do nothing twice.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct UploadedTransaction {
    pub pump: u16,
    pub transaction: u32,
    pub date_time_start: Option<String>,
    pub date_time: Option<String>,
    pub nozzle: Option<u8>,
    pub fuel_grade_name: Option<String>,
    pub volume: Option<Num>,
    pub price: Option<Num>,
    pub amount: Option<Num>,
    pub user_id: Option<u32>,
    pub is_paid: Option<bool>,
    pub configuration_id: Option<String>,
}

/// `UploadPayment`: a payment recorded on the controller.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct UploadedPayment {
    pub payment_transaction: u64,
    pub pump: u16,
    pub pump_transaction: u32,
    pub pump_transaction_date_time: Option<String>,
    pub amount: Num,
    pub payment_form_id: Option<u8>,
    pub payment_form_name: Option<String>,
    pub is_refunded: Option<bool>,
}

/// What one uploaded packet holds, for the bridge.
#[derive(Debug, Clone, PartialEq)]
pub enum Upload {
    PumpTransaction(UploadedTransaction),
    Payment(UploadedPayment),
    /// `UploadStatus`, `UploadConfiguration`, tank, GPS, alert and shift
    /// records: confirmed, nothing to act on.
    Other(String),
}

impl Upload {
    pub fn from_packet(packet: &Packet) -> Result<Upload, WireError> {
        Ok(match packet.kind.as_str() {
            "UploadPumpTransaction" => Upload::PumpTransaction(packet.data()?),
            "UploadPayment" => Upload::Payment(packet.data()?),
            other => Upload::Other(other.to_owned()),
        })
    }

    /// Whether a packet of this type is one the controller uploads.
    pub fn is_upload(kind: &str) -> bool {
        kind.starts_with("Upload") || kind == "RequestTagsInformation"
    }
}

/// The confirmation of a received packet (`Message: "OK"`).
pub fn confirmation(id: u32, kind: &str) -> serde_json::Value {
    serde_json::json!({ "Id": id, "Type": kind, "Message": "OK" })
}

/// An error answer to a packet.
pub fn error_packet(
    id: u32,
    kind: &str,
    code: u32,
    data: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut p = serde_json::json!({
        "Id": id,
        "Type": kind,
        "Error": true,
        "Code": code,
        "Message": error_name(code).unwrap_or("JSONPTS_ERROR"),
    });
    if let (Some(data), Some(obj)) = (data, p.as_object_mut()) {
        obj.insert("Data".into(), data);
    }
    p
}

/// Writes response packets (serde values) as a message.
pub fn response(packets: Vec<serde_json::Value>) -> String {
    serde_json::json!({ "Protocol": PROTOCOL, "Packets": packets }).to_string()
}

// ---------------------------------------------------------------------------
// Errors

/// An error the controller answered, with the table's name and description
/// when the code is in it.
#[derive(Debug, Clone, PartialEq)]
pub struct PtsError {
    pub code: u32,
    /// The message as sent (usually the error's name).
    pub message: Option<String>,
    /// The error's `Data`, as text, where the table gives it one.
    pub data: Option<String>,
}

impl PtsError {
    pub fn new(code: u32, message: Option<String>) -> PtsError {
        PtsError {
            code,
            message,
            data: None,
        }
    }
}

impl fmt::Display for PtsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "controller error {}", self.code)?;
        match error_entry(self.code) {
            Some((_, name, description)) => write!(f, " {name} ({description})")?,
            None => {
                if let Some(m) = &self.message {
                    write!(f, " {m}")?;
                }
            }
        }
        if let Some(d) = &self.data {
            write!(f, " {d}")?;
        }
        Ok(())
    }
}

/// Codes the bridge acts on by name.
pub mod code {
    pub const PUMP_TRANSACTION_NOT_FOUND: u32 = 22;
    pub const TRANSACTION_NUMBER_NOT_MATCH: u32 = 27;
    pub const PUMP_BUSY_OTHER_USER: u32 = 40;
    pub const PUMP_BUSY_OTHER_REQUEST_EXECUTED: u32 = 41;
    pub const PUMP_STATUS_NOT_END_OF_TRANSACTION: u32 = 69;
    pub const PUMP_IS_NOT_LOCKED_BY_USER: u32 = 91;
    pub const DATA_IS_NOT_READY: u32 = 101;
    pub const PUMP_TRANSACTION_ALREADY_PAID: u32 = 102;
    pub const PUMP_TRANSACTION_AMOUNT_NOT_MATCH_PAYMENT: u32 = 103;
    pub const NOT_FOUND: u32 = 1;
    pub const INVALID_JSON_REQUEST: u32 = 2;
    pub const JSON_REQUEST_IS_TOO_LONG: u32 = 5;
    pub const NO_PERMISSIONS: u32 = 6;
    pub const PUMP_NUMBER_OUT_OF_RANGE: u32 = 20;
    pub const PUMP_IS_NOT_CONFIGURED: u32 = 52;
    pub const PAYMENT_FORM_NUMBER_NOT_CONFIGURED: u32 = 98;
    pub const PAYMENT_ZERO_AMOUNT: u32 = 104;
    pub const COULD_NOT_GET_PUMP_NUMBER: u32 = 18;
}

/// The specification's error table (ERROR MESSAGES): code, name, description.
pub fn error_entry(code: u32) -> Option<(u32, &'static str, &'static str)> {
    ERRORS.iter().copied().find(|(c, _, _)| *c == code)
}

/// The error's name, e.g. `JSONPTS_ERROR_PUMP_TRANSACTION_ALREADY_PAID`.
pub fn error_name(code: u32) -> Option<&'static str> {
    error_entry(code).map(|(_, name, _)| name)
}

const ERRORS: &[(u32, &str, &str)] = &[
    (1, "JSONPTS_ERROR_NOT_FOUND", "Request not found"),
    (2, "INVALID_JSON_REQUEST", "Invalid JSON request"),
    (3, "NO_DATA", "No data"),
    (4, "NO_DATA_FOR_RESPONSE", "No data for response"),
    (5, "JSON_REQUEST_IS_TOO_LONG", "JSON request is too long"),
    (6, "JSONPTS_ERROR_NO_PERMISSIONS", "Access forbidden"),
    (7, "JSONPTS_ERROR_NO_SD_FOUND", "No SD found"),
    (
        8,
        "JSONPTS_ERROR_POWER_DOWN_DETECTED",
        "Power down detected",
    ),
    (9, "JSONPTS_ERROR_SD_NOT_MOUNTED", "SD is not mounted"),
    (
        10,
        "JSONPTS_ERROR_FILE_UPLOAD_PROCESS_RUNNING",
        "File upload process running",
    ),
    (11, "JSONPTS_ERROR_SD_ERROR", "SD error"),
    (
        12,
        "JSONPTS_ERROR_NO_CALIBRATION_CHART_FOUND_ERROR",
        "No calibration chart found",
    ),
    (
        13,
        "JSONPTS_ERROR_COULD_NOT_CHECK_FILE",
        "Could not check file",
    ),
    (
        14,
        "JSONPTS_ERROR_COULD_NOT_DELETE_FILE",
        "Could not delete file",
    ),
    (
        15,
        "JSONPTS_ERROR_INCORRECT_PUMPS_CONFIGURATION",
        "Incorrect pumps configuration",
    ),
    (
        16,
        "JSONPTS_ERROR_INCORRECT_PROBES_CONFIGURATION",
        "Incorrect probes configuration",
    ),
    (
        17,
        "JSONPTS_ERROR_COULD_NOT_GET_DATETIME",
        "Could not get datetime",
    ),
    (
        18,
        "JSONPTS_ERROR_COULD_NOT_GET_PUMP_NUMBER",
        "Could not get pump number",
    ),
    (
        19,
        "JSONPTS_ERROR_COULD_NOT_GET_PUMP_TRANSACTION_NUMBER",
        "Could not get pump transaction number",
    ),
    (
        20,
        "JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE",
        "Pump number is out of range",
    ),
    (
        21,
        "JSONPTS_ERROR_PUMP_TRANSACTION_NUMBER_OUT_OF_RANGE",
        "Pump transaction number is out of range",
    ),
    (
        22,
        "JSONPTS_ERROR_PUMP_TRANSACTION_NOT_FOUND",
        "Pump transaction not found",
    ),
    (
        23,
        "JSONPTS_ERROR_TANK_NUMBER_OUT_OF_RANGE",
        "Tank number is out of range",
    ),
    (
        24,
        "JSONPTS_ERROR_COULD_NOT_GET_TANK_NUMBER",
        "Could not get tank number",
    ),
    (
        25,
        "JSONPTS_ERROR_COULD_NOT_GET_TRANSACTION_NUMBER",
        "Could not get transaction number",
    ),
    (
        26,
        "JSONPTS_ERROR_TRANSACTION_NUMBER_OUT_OF_RANGE",
        "Transaction number is out of range",
    ),
    (
        27,
        "JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH",
        "Transaction number does not match",
    ),
    (
        28,
        "JSONPTS_ERROR_TRANSACTION_NUMBER_ALREADY_EXIST",
        "Transaction number already exist",
    ),
    (
        29,
        "JSONPTS_ERROR_COULD_NOT_GET_NOZZLE_NUMBER",
        "Could not get nozzle number",
    ),
    (
        30,
        "JSONPTS_ERROR_COULD_NOT_GET_FUEL_GRADE_ID",
        "Could not get fuel grade Id",
    ),
    (
        31,
        "JSONPTS_ERROR_COULD_NOT_GET_NOZZLE_NUMBER_FUEL_GRADE_ID",
        "Could not get nozzle number and fuel grade Id",
    ),
    (
        32,
        "JSONPTS_ERROR_COULD_NOT_GET_NOZZLE_NUMBER_FROM_GRADE_ID",
        "Could not get nozzle number from fuel grade Id",
    ),
    (
        33,
        "JSONPTS_ERROR_NOZZLE_NUMBER_OUT_OF_RANGE",
        "Nozzle number is out of range",
    ),
    (34, "JSONPTS_ERROR_COULD_NOT_GET_TYPE", "Could not get type"),
    (35, "JSONPTS_ERROR_COULD_NOT_GET_NAME", "Could not get name"),
    (
        36,
        "JSONPTS_ERROR_TYPE_OUT_OF_RANGE",
        "Type is out of range",
    ),
    (
        37,
        "JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE",
        "Could not get dose value",
    ),
    (
        38,
        "JSONPTS_ERROR_COULD_NOT_GET_PRICE_VALUE",
        "Could not get price value",
    ),
    (
        39,
        "JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST",
        "Duplicated authorization request",
    ),
    (
        40,
        "JSONPTS_ERROR_PUMP_BUSY_OTHER_USER",
        "Pump is busy by other user",
    ),
    (
        41,
        "JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED",
        "Pump is busy with other request being executed",
    ),
    (
        42,
        "JSONPTS_ERROR_PUMP_BUSY_FILLING",
        "Pump is busy with filling",
    ),
    (
        43,
        "JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS",
        "Pump is not in filling process",
    ),
    (
        44,
        "JSONPTS_ERROR_COULD_NOT_GET_STATE_VALUE",
        "Could not get state value",
    ),
    (
        45,
        "JSONPTS_ERROR_STATE_VALUE_OUT_OF_RANGE",
        "State value is out of range",
    ),
    (46, "JSONPTS_ERROR_USER_NOT_MATCH", "User does not match"),
    (
        47,
        "JSONPTS_ERROR_DATE_OUT_OF_RANGE",
        "Date is out of range",
    ),
    (
        48,
        "JSONPTS_ERROR_TIME_OUT_OF_RANGE",
        "Time is out of range",
    ),
    (
        49,
        "JSONPTS_ERROR_COULD_NOT_GET_HEIGHT",
        "Could not get height value",
    ),
    (
        50,
        "JSONPTS_ERROR_COULD_NOT_GET_PROBE_NUMBER",
        "Could not get probe number",
    ),
    (
        51,
        "JSONPTS_ERROR_PROBE_NUMBER_OUT_OF_RANGE",
        "Probe number is out of range",
    ),
    (
        52,
        "JSONPTS_ERROR_PUMP_IS_NOT_CONFIGURED",
        "Pump is not configured",
    ),
    (
        53,
        "JSONPTS_ERROR_RESTORE_CONFIGURATION_FAILED",
        "Restore of configuration failed",
    ),
    (
        54,
        "JSONPTS_ERROR_CONFIGURATION_FILE_NOT_FOUND",
        "Configuration file not found",
    ),
    (
        55,
        "JSONPTS_ERROR_CALIBRATION_CHART_NOT_CONFIGURED",
        "Calibration chart for tank is not configured",
    ),
    (
        56,
        "JSONPTS_ERROR_TANK_NOT_CONFIGURED",
        "Tank is not configured",
    ),
    (
        57,
        "JSONPTS_ERROR_PUMP_GRADE_NOT_CORRESPOND_TANK",
        "Pump fuel grade does not correspond to the tank fuel grade",
    ),
    (
        58,
        "JSONPTS_ERROR_INCORRECT_TANKS_CONFIGURATION",
        "Incorrect tanks configuration",
    ),
    (
        59,
        "JSONPTS_ERROR_INCORRECT_PRICE_BOARDS_CONFIGURATION",
        "Incorrect price boards configuration",
    ),
    (
        60,
        "JSONPTS_ERROR_INCORRECT_READERS_CONFIGURATION",
        "Incorrect readers configuration",
    ),
    (61, "JSONPTS_ERROR_COULD_NOT_GET_TAG", "Could not get tag"),
    (
        62,
        "JSONPTS_ERROR_COULD_NOT_GET_READER_NUMBER",
        "Could not get reader number",
    ),
    (
        63,
        "JSONPTS_ERROR_READER_NUMBER_OUT_OF_RANGE",
        "Reader number is out of range",
    ),
    (
        64,
        "JSONPTS_ERROR_READER_NOT_CONFIGURED",
        "Reader is not configured",
    ),
    (
        65,
        "JSONPTS_ERROR_TANK_PRODUCT_HEIGHT_IS_CRITICAL_LOW",
        "Product height in tank is critical low",
    ),
    (
        66,
        "JSONPTS_ERROR_COULD_NOT_GET_PRICE_BOARD_NUMBER",
        "Could not get price board number",
    ),
    (
        67,
        "JSONPTS_ERROR_PRICE_BOARD_NUMBER_OUT_OF_RANGE",
        "Price board number is out of range",
    ),
    (
        68,
        "JSONPTS_ERROR_PRICE_BOARD_NOT_CONFIGURED",
        "Price board is not configured",
    ),
    (
        69,
        "JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION",
        "Pump is not in the end of transaction status",
    ),
    (70, "JSONPTS_ERROR_TAG_IS_NOT_VALID", "Tag is not valid"),
    (
        71,
        "JSONPTS_ERROR_DATETIME_INCORRECT_FORMAT",
        "DateTime has incorrect format",
    ),
    (
        72,
        "JSONPTS_ERROR_NO_FREE_USERS_TO_ADD",
        "No free non-configured users to add",
    ),
    (
        73,
        "JSONPTS_ERROR_USER_LOGIN_USED",
        "User login is already used",
    ),
    (
        74,
        "JSONPTS_ERROR_USER_ID_OUT_OF_RANGE",
        "User ID is out of range",
    ),
    (
        75,
        "JSONPTS_ERROR_CAN_NOT_DELETE_LAST_USER",
        "Can not delete last user from user's configuration",
    ),
    (
        76,
        "JSONPTS_ERROR_TAG_ALREADY_EXIST",
        "Specified tag already exists",
    ),
    (
        77,
        "JSONPTS_ERROR_TAG_NOT_EXIST",
        "Specified tag does not exist",
    ),
    (
        78,
        "JSONPTS_ERROR_REPEATED_AUTHORIZE_PUMP_PRICE_DIFFERENT",
        "Different price sent in repeated authorization request",
    ),
    (
        79,
        "JSONPTS_ERROR_CAN_NOT_USE_DATA_UPLOAD_WEBSOCKETS_SAME_TIME",
        "Can not use upload data and WebSocket same time",
    ),
    (
        80,
        "JSONPTS_ERROR_NO_USER_WITH_CONFIG_PERMISSION_CONFIGURED",
        "No user with configuration permission is configured",
    ),
    (
        81,
        "JSONPTS_ERROR_TOO_BIG_TAGS_TOTAL_NUMBER_REQUESTED",
        "Too big tags total number requested",
    ),
    (
        82,
        "JSONPTS_ERROR_COULD_NOT_DELETE_EXISTING_TAG",
        "Could not delete existing tag",
    ),
    (
        83,
        "JSONPTS_ERROR_NOT_ENOUGH_DATA_IN_REQUEST_FOR_EXECUTION",
        "Not enough data in request for execution",
    ),
    (
        84,
        "JSONPTS_ERROR_NOT_ENOUGH_DATA_FOR_TANK_AUTO_CALIB_CHART",
        "Not enough data for creation of tank automatic calibration chart",
    ),
    (
        85,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_PROBE_NOT_CONFIG",
        "Probe is not configured for the tank",
    ),
    (
        86,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_TANK_NOT_CONFIG",
        "Tank is not configured",
    ),
    (
        87,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_PROBE_NO_TEMPERATURE",
        "Probe of the tank does not measure temperature",
    ),
    (
        88,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_GRADE_NOT_CONFIG",
        "Fuel grade is not configured for the tank",
    ),
    (
        89,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_TEMP_COEF_NOT_CONFIG",
        "Temperature-expansion coefficient is not configured for fuel grade used in tank",
    ),
    (
        90,
        "JSONPTS_ERROR_TANK_AUTO_CALIB_NOZZLES_NOT_CONFIG",
        "No pump nozzles are configured for tank",
    ),
    (
        91,
        "JSONPTS_ERROR_PUMP_IS_NOT_LOCKED_BY_USER",
        "Pump is not locked by the user",
    ),
    (
        92,
        "JSONPTS_ERROR_INVALID_IP_ADDRESS_VALUE",
        "Invalid IP-address value",
    ),
    (93, "JSONPTS_ERROR_INVALID_PORT_VALUE", "Invalid port value"),
    (
        94,
        "JSONPTS_ERROR_RECORD_WITH_HEIGHT_ALREADY_EXIST",
        "Record with specified height already exists",
    ),
    (
        95,
        "JSONPTS_ERROR_RECORD_WITH_HEIGHT_NOT_EXIST",
        "Record with specified height does not exist",
    ),
    (96, "JSONPTS_ERROR_OPERATION_ERROR", "Operation error"),
    (
        97,
        "JSONPTS_ERROR_PAYMENT_FORM_NUMBER_OUT_OF_RANGE",
        "Payment form number is out of range",
    ),
    (
        98,
        "JSONPTS_ERROR_PAYMENT_FORM_NUMBER_NOT_CONFIGURED",
        "Payment form number is not configured",
    ),
    (
        99,
        "JSONPTS_ERROR_AUTOREAD_PUMPS_TOTALS_NOT_CONFIGURED",
        "Automatic readout of totals is not configured for pump",
    ),
    (
        100,
        "JSONPTS_ERROR_INCORRECT_FUEL_GRADES_PRICES_CONFIGURATION",
        "Incorrect fuel grades prices configuration",
    ),
    (
        101,
        "JSONPTS_ERROR_DATA_IS_NOT_READY",
        "Data is not ready, try again later",
    ),
    (
        102,
        "JSONPTS_ERROR_PUMP_TRANSACTION_ALREADY_PAID",
        "Pump transaction is already paid",
    ),
    (
        103,
        "JSONPTS_ERROR_PUMP_TRANSACTION_AMOUNT_NOT_MATCH_PAYMENT",
        "Payment amount does not match the pump transaction amount",
    ),
    (
        104,
        "JSONPTS_ERROR_PAYMENT_ZERO_AMOUNT",
        "Payment is for zero amount",
    ),
    (
        105,
        "JSONPTS_ERROR_COULD_NOT_GET_PAYMENT_TRANSACTION_NUMBER",
        "Could not get payment transaction number",
    ),
    (
        106,
        "JSONPTS_ERROR_PAYMENT_TRANSACTION_NUMBER_OUT_OF_RANGE",
        "Payment transaction number is out of range",
    ),
    (
        107,
        "JSONPTS_ERROR_PAYMENT_TRANSACTION_NOT_FOUND",
        "Payment transaction is not found",
    ),
    (
        108,
        "JSONPTS_ERROR_COULD_NOT_REFUND_PAYMENT",
        "Could not refund payment",
    ),
    (
        109,
        "JSONPTS_ERROR_PAYMENT_ALREADY_REFUNDED",
        "Payment transaction is already refunded",
    ),
    (
        110,
        "JSONPTS_ERROR_SHIFT_IS_ALREADY_OPENED",
        "Working shift is already opened",
    ),
    (
        111,
        "JSONPTS_ERROR_SHIFT_IS_NOT_OPENED",
        "Working shift is not opened",
    ),
    (
        112,
        "JSONPTS_ERROR_SHIFT_IS_OPENED_BY_ANOTHER_USER",
        "Working shift is opened by another user",
    ),
    (
        113,
        "JSONPTS_ERROR_LEADING_OF_WORKING_SHIFTS_DISABLED",
        "Leading of working shifts is not enabled",
    ),
    (
        114,
        "JSONPTS_ERROR_COULD_NOT_GET_SHIFT_INFORMATION",
        "Could not get working shift information",
    ),
    (
        115,
        "JSONPTS_ERROR_DATETIME_NOT_CONFIGURED",
        "Date/time are not configured",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's example packets, as it prints them.
    fn fixture(name: &str) -> Message {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Message::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn num(text: &str) -> Option<Num> {
        Some(text.parse().unwrap())
    }

    fn status(name: &str) -> PumpStatus {
        let m = fixture(name);
        PumpStatus::from_packet(&m.packets[0]).unwrap().unwrap()
    }

    #[test]
    fn the_specifications_envelopes_read_with_each_packets_id_type_and_outcome() {
        let request = fixture("envelope_request.json");
        let kinds: Vec<_> = request.packets.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["GetDateTime", "SetDateTime", "MakeNonExistingRequest"]
        );
        assert_eq!(request.packets[1].id, PacketId(2));

        let response = fixture("envelope_response.json");
        assert!(response.packets[0].error().is_none());
        assert!(response.packets[1].is_ok());
        let e = response.packets[2].error().unwrap();
        assert_eq!(e.code, 1);
        assert_eq!(
            e.to_string(),
            "controller error 1 JSONPTS_ERROR_NOT_FOUND (Request not found)"
        );
        assert!(fixture("confirmation.json").packets[0].is_ok());
        assert_eq!(fixture("error.json").packets[0].error().unwrap().code, 1);
    }

    #[test]
    fn an_error_with_data_keeps_its_data_and_is_named_by_its_code_not_its_text() {
        // The specification's example pairs code 57 with another error's
        // name: the code is what the table is read by.
        let e = fixture("error_with_data.json").packets[0].error().unwrap();
        assert_eq!(e.code, 57);
        assert_eq!(e.message.as_deref(), Some("JSONPTS_ERROR_BUSY_OTHER_USER"));
        assert_eq!(
            error_name(57),
            Some("JSONPTS_ERROR_PUMP_GRADE_NOT_CORRESPOND_TANK")
        );
        assert!(e.data.as_deref().unwrap().contains("\"admin\""));
    }

    #[test]
    fn the_error_table_has_every_code_of_the_specification_once() {
        assert_eq!(ERRORS.len(), 115);
        for (i, (c, name, description)) in ERRORS.iter().enumerate() {
            assert_eq!(*c as usize, i + 1, "{name}");
            assert!(!description.is_empty());
        }
        assert_eq!(
            error_name(code::PUMP_TRANSACTION_ALREADY_PAID),
            Some("JSONPTS_ERROR_PUMP_TRANSACTION_ALREADY_PAID")
        );
        assert_eq!(
            error_name(code::PUMP_STATUS_NOT_END_OF_TRANSACTION),
            Some("JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION")
        );
        assert_eq!(error_name(116), None);
    }

    #[test]
    fn an_idle_pump_reads_its_last_transaction_exactly() {
        let PumpStatus::Idle(s) = status("pump_idle_status.json") else {
            panic!("not idle")
        };
        assert_eq!((s.pump, s.nozzle_up(), s.transaction), (1, 2, Some(135)));
        assert_eq!(s.last_transaction, Some(3));
        assert_eq!(s.last_volume, num("5.00"));
        assert_eq!(s.last_price, num("2.50"));
        assert_eq!(s.last_amount.unwrap().to_string(), "12.50");
        assert_eq!(
            s.last_date_time_start.as_deref(),
            Some("2019-05-19T12:44:01")
        );
    }

    #[test]
    fn a_filling_pump_with_a_quoted_packet_id_reads() {
        let m = fixture("pump_filling_status.json");
        assert_eq!(m.packets[0].id, PacketId(1));
        let PumpStatus::Filling(s) = status("pump_filling_status.json") else {
            panic!("not filling")
        };
        assert_eq!((s.pump, s.nozzle, s.transaction), (1, Some(2), 37));
        assert_eq!(s.volume, num("1.34"));
        assert_eq!(s.tc_volume, num("1.33"));
        assert_eq!(s.amount.unwrap().to_string(), "12.50");
        assert_eq!(s.is_suspended, Some(false));
        assert_eq!(s.flow_rate, Some(27));
    }

    #[test]
    fn an_end_of_transaction_reads_its_start_end_and_totals() {
        let PumpStatus::EndOfTransaction(s) = status("pump_end_of_transaction_status.json") else {
            panic!("not end of transaction")
        };
        assert_eq!(
            (s.transaction, s.nozzle, s.nozzle_up),
            (3, Some(2), Some(0))
        );
        assert_eq!(s.volume.unwrap().to_string(), "5.00");
        assert_eq!(s.price.unwrap().to_string(), "2.50");
        assert_eq!(s.amount.unwrap().to_string(), "12.50");
        assert_eq!(s.total_volume, num("15.99"));
        assert_eq!(s.date_time_start.as_deref(), Some("2019-05-19T12:44:01"));
        assert_eq!(s.date_time.as_deref(), Some("2019-05-19T12:47:11"));
        assert_eq!(s.fuel_grade_name, None);
    }

    #[test]
    fn an_offline_pump_says_what_it_was_doing() {
        let PumpStatus::Offline(s) = status("pump_offline_status.json") else {
            panic!("not offline")
        };
        assert_eq!((s.pump, s.state.as_deref()), (1, Some("Authorized")));
        assert_eq!(s.last_transaction, Some(55));
    }

    #[test]
    fn statuses_of_older_firmwares_read_without_the_fields_they_lack() {
        let PumpStatus::Idle(s) = status("drift/idle_before_r68.json") else {
            panic!()
        };
        assert_eq!((s.nozzle, s.nozzle_up()), (None, 1));
        assert_eq!(s.last_transaction, Some(65535));
        assert_eq!(s.last_price, num("1.239"));

        let PumpStatus::EndOfTransaction(s) = status("drift/end_of_transaction_before_r68.json")
        else {
            panic!()
        };
        assert_eq!(
            (s.date_time_start, s.date_time, s.fuel_grade_name),
            (None, None, None)
        );
        assert_eq!(s.volume.unwrap().to_string(), "20.500");
        assert_eq!(s.amount.unwrap().to_string(), "25.400");

        let PumpStatus::Offline(s) = status("drift/offline_before_r69.json") else {
            panic!()
        };
        assert_eq!((s.pump, s.state, s.transaction), (4, None, None));

        // P98 to P112 sent payment forms; values quoted by some firmwares.
        let PumpStatus::Filling(s) = status("drift/filling_p98.json") else {
            panic!()
        };
        assert_eq!(s.payment_form_id, Some(2));
        assert_eq!(s.volume.unwrap().to_string(), "3.210");
        assert_eq!(s.price.unwrap().to_string(), "798");
        assert_eq!(s.fuel_grade_name.as_deref(), Some("Diesel"));
    }

    #[test]
    fn one_answer_for_all_pumps_gives_each_pump_its_status_or_its_error() {
        let m = fixture("drift/all_pumps.json");
        let read: Vec<_> = m
            .packets
            .iter()
            .map(|p| PumpStatus::from_packet(p).unwrap())
            .collect();
        assert!(matches!(&read[0], Ok(PumpStatus::Idle(s)) if s.pump == 1));
        assert!(
            matches!(&read[1], Ok(PumpStatus::Filling(s)) if s.volume == num("0.001") && s.price == num("999.999"))
        );
        assert!(matches!(&read[2], Ok(PumpStatus::EndOfTransaction(s)) if s.transaction == 65535));
        assert!(
            matches!(&read[3], Ok(PumpStatus::Offline(s)) if s.state.as_deref() == Some("EndOfTransaction"))
        );
        assert!(matches!(&read[4], Err(e) if e.code == code::PUMP_NUMBER_OUT_OF_RANGE));
        assert_eq!(
            read[5],
            Ok(PumpStatus::Other {
                pump: Some(6),
                kind: "PumpTotals".into()
            })
        );
    }

    #[test]
    fn the_requests_the_bridge_sends_read_as_the_specification_prints_them() {
        for (name, request) in [
            ("pump_get_status.json", Request::PumpGetStatus { pump: 1 }),
            ("pump_lock.json", Request::PumpLock { pump: 1 }),
            ("pump_unlock.json", Request::PumpUnlock { pump: 1 }),
            (
                "pump_close_transaction.json",
                Request::PumpCloseTransaction {
                    pump: 1,
                    transaction: 15,
                },
            ),
            (
                "pump_get_transaction_information.json",
                Request::PumpGetTransactionInformation {
                    pump: 1,
                    transaction: 15,
                },
            ),
            ("get_unique_identifier.json", Request::GetUniqueIdentifier),
        ] {
            let ours = Message::parse(&envelope(None, &[request.packet(1)])).unwrap();
            let spec = fixture(name);
            assert_eq!(ours.packets[0].kind, spec.packets[0].kind, "{name}");
            let data = |m: &Message| {
                m.packets[0]
                    .data
                    .as_ref()
                    .map(|d| serde_json::from_str::<serde_json::Value>(d.get()).unwrap())
            };
            assert_eq!(data(&ours), data(&spec), "{name}");
        }
    }

    #[test]
    fn a_payment_is_written_with_the_amounts_exact_digits_and_read_back() {
        let spec = fixture("payment_create_transaction.json");
        let read: PaymentRequest = spec.packets[0].data().unwrap();
        assert_eq!(read.pump_transactions.len(), 2);
        assert_eq!(read.pump_transactions[0].transaction, 1234);
        assert_eq!(
            read.pump_transactions[0].payments[1].amount,
            num("56.78").unwrap()
        );

        let ours = Request::PaymentCreateTransaction(PaymentForTransaction {
            pump: 3,
            transaction: 65535,
            date_time: "2025-11-04T10:01:30".into(),
            payments: vec![PaymentPart {
                amount: num("25615.80").unwrap(),
                payment_form_id: 4,
            }],
        });
        let text = envelope(None, &[ours.packet(9)]);
        assert!(text.contains(r#""Amount":25615.80"#), "{text}");
        let back: PaymentRequest = Message::parse(&text).unwrap().packets[0].data().unwrap();
        assert_eq!(
            back.pump_transactions[0].payments[0].amount.to_string(),
            "25615.80"
        );

        let confirmed = fixture("payment_create_transaction_confirmation.json");
        let c: PaymentConfirmation = confirmed.packets[0].data().unwrap();
        assert_eq!(c.payment_transaction, 31);
    }

    #[test]
    fn transaction_information_and_the_unique_identifier_read() {
        let t: TransactionInformation = fixture("pump_transaction_information.json").packets[0]
            .data()
            .unwrap();
        assert_eq!(
            (t.transaction, t.state.as_str(), t.is_paid),
            (15, "Finished", None)
        );
        assert_eq!(t.amount, num("11.50"));
        let id: UniqueIdentifier = fixture("unique_identifier.json").packets[0].data().unwrap();
        assert_eq!(id.id, "003A003A3435510938393730");
        let upper: UniqueIdentifier = serde_json::from_str(r#"{"ID":"00AB"}"#).unwrap();
        assert_eq!(upper.id, "00AB");
    }

    #[test]
    fn uploads_read_and_their_confirmations_are_confirmations() {
        let m = fixture("upload_pump_transaction.json");
        assert_eq!(m.pts_id.as_deref(), Some("003A003A3435510938393730"));
        let Upload::PumpTransaction(t) = Upload::from_packet(&m.packets[0]).unwrap() else {
            panic!()
        };
        assert_eq!((t.pump, t.transaction, t.is_paid), (1, 15, None));
        assert_eq!(t.amount, num("11.50"));
        assert_eq!(t.fuel_grade_name.as_deref(), Some("Petrol"));

        let m = fixture("upload_payment.json");
        let Upload::Payment(p) = Upload::from_packet(&m.packets[0]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (p.pump, p.pump_transaction, p.amount),
            (1, 155, num("1.14").unwrap())
        );

        let m = fixture("upload_status.json");
        assert_eq!(m.packets[0].id, PacketId(21444));
        assert_eq!(
            Upload::from_packet(&m.packets[0]).unwrap(),
            Upload::Other("UploadStatus".into())
        );
        for name in [
            "upload_pump_transaction_confirmation.json",
            "upload_payment_confirmation.json",
            "upload_status_confirmation.json",
            "upload_status_get_status_confirmation.json",
            "confirmation_with_setting_request.json",
        ] {
            assert!(fixture(name).packets[0].is_ok(), "{name}");
        }
    }

    #[test]
    fn numbers_are_plain_decimals_or_an_error_never_a_float() {
        let read = |t: &str| serde_json::from_str::<Num>(t).map(|n| n.to_string());
        assert_eq!(read("0.1").unwrap(), "0.1");
        assert_eq!(read("25615.80").unwrap(), "25615.80");
        assert_eq!(read("\"1.239\"").unwrap(), "1.239");
        assert_eq!(read("-2.5").unwrap(), "-2.5");
        for bad in [
            "1e3", "1.5E2", "\"1,5\"", "\".5\"", "\"1.\"", "null", "true", "\"\"",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "",
            "{",
            "[]",
            r#"{"Protocol":"other","Packets":[]}"#,
            r#"{"Protocol":"jsonPTS","Packets":[{"Type":"X"}]}"#,
        ] {
            assert!(Message::parse(text).is_err(), "{text}");
        }
        let m = Message::parse(r#"{"Protocol":"jsonPTS","Packets":[{"Id":1,"Type":"PumpIdleStatus","Data":{"Pump":"x"}}]}"#).unwrap();
        assert!(PumpStatus::from_packet(&m.packets[0]).is_err());
        let m = Message::parse(
            r#"{"Protocol":"jsonPTS","Error":true,"Code":2,"Message":"INVALID_JSON_REQUEST"}"#,
        )
        .unwrap();
        assert_eq!(m.error().unwrap().code, code::INVALID_JSON_REQUEST);
    }
}
