//! The simulated controller's state: its pumps, users and transactions, and
//! how it answers a jsonPTS message. No I/O and no clock (the time is
//! passed in), so the answers are plain functions of the state.
//!
//! A pump goes idle → nozzle up → filling → end of transaction → closed
//! (idle again). Transactions are numbered per pump from 1 to 65535 and
//! wrap to 1. The end of transaction stays until `PumpCloseTransaction`
//! with its number; the shop's system (the control API's "pay in the shop")
//! closes it as another user would.

use std::collections::{BTreeMap, VecDeque};

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

use crate::jsonpts::{self, code, error_packet, Message, Num, PaymentRequest, PumpTransactionRef};

/// The controller's own user, which owns transactions nobody else
/// authorized (auto-authorization on nozzle up).
pub const SYSTEM_USER: &str = "PTS";
/// The user the shop's cash system plays.
pub const SHOP_USER: &str = "shop";
const MAX_TRANSACTION: u32 = 65535;

/// A user's permissions (`SetUsersConfiguration`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    pub configuration: bool,
    pub control: bool,
    pub monitoring: bool,
    pub reports: bool,
    pub payments: bool,
}

impl Permissions {
    pub fn all() -> Permissions {
        Permissions {
            configuration: true,
            control: true,
            monitoring: true,
            reports: true,
            payments: true,
        }
    }
}

/// One transaction of a pump.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub number: u32,
    pub nozzle: u8,
    pub volume: Decimal,
    pub price: Decimal,
    pub start: String,
    pub end: Option<String>,
    /// Whose transaction it is: who may close it.
    pub user: String,
    pub paid: bool,
    /// Who closed it, once closed.
    pub closed_by: Option<String>,
}

impl Transaction {
    pub fn amount(&self) -> Decimal {
        let mut a = (self.volume * self.price)
            .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
        a.rescale(2);
        a
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Idle { nozzle_up: u8 },
    Filling(Transaction),
    EndOfTransaction(Transaction),
}

#[derive(Debug, Clone)]
struct Pump {
    phase: Phase,
    offline: bool,
    next_transaction: u32,
    locked_by: Option<String>,
    grade: Option<(u16, String)>,
    price: Decimal,
    last: Option<Transaction>,
}

/// Why a control action could not be done.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    #[error("pump {0} is not configured")]
    NoPump(u16),
    #[error("pump {pump}: {what}")]
    Refused { pump: u16, what: String },
}

/// The whole simulated controller.
#[derive(Debug)]
pub struct Forecourt {
    pub id: String,
    pumps: BTreeMap<u16, Pump>,
    closed: Vec<(u16, Transaction)>,
    next_payment: u64,
    /// Requests received, by type, in order: what the tests read.
    pub seen: Vec<String>,
    /// `UploadPumpTransaction` records not confirmed yet (remote mode).
    pub uploads: VecDeque<Value>,
}

impl Forecourt {
    /// `pumps` pumps numbered from 1, each with one grade at `price`.
    pub fn new(id: &str, pumps: u16, grade: &str, price: Decimal) -> Forecourt {
        let pumps = (1..=pumps)
            .map(|n| {
                (
                    n,
                    Pump {
                        phase: Phase::Idle { nozzle_up: 0 },
                        offline: false,
                        next_transaction: 1,
                        locked_by: None,
                        grade: Some((1, grade.to_owned())),
                        price,
                        last: None,
                    },
                )
            })
            .collect();
        Forecourt {
            id: id.to_owned(),
            pumps,
            closed: Vec::new(),
            next_payment: 1,
            seen: Vec::new(),
            uploads: VecDeque::new(),
        }
    }

    fn pump(&mut self, n: u16) -> Result<&mut Pump, SimError> {
        self.pumps.get_mut(&n).ok_or(SimError::NoPump(n))
    }

    /// Nozzle `nozzle` taken up.
    pub fn lift_nozzle(&mut self, pump: u16, nozzle: u8) -> Result<(), SimError> {
        let p = self.pump(pump)?;
        match &mut p.phase {
            Phase::Idle { nozzle_up } => {
                *nozzle_up = nozzle;
                Ok(())
            }
            _ => Err(refused(pump, "a transaction is open")),
        }
    }

    /// `litres` more dispensed: the first of them starts the transaction.
    pub fn fill(&mut self, pump: u16, litres: Decimal, now: &str) -> Result<u32, SimError> {
        let p = self.pump(pump)?;
        if p.offline {
            return Err(refused(pump, "offline"));
        }
        match &mut p.phase {
            Phase::Idle { nozzle_up: 0 } => Err(refused(pump, "no nozzle is up")),
            Phase::Idle { nozzle_up } => {
                let number = p.next_transaction;
                p.next_transaction = if number >= MAX_TRANSACTION {
                    1
                } else {
                    number + 1
                };
                let t = Transaction {
                    number,
                    nozzle: *nozzle_up,
                    volume: litres,
                    price: p.price,
                    start: now.to_owned(),
                    end: None,
                    user: SYSTEM_USER.to_owned(),
                    paid: false,
                    closed_by: None,
                };
                p.phase = Phase::Filling(t);
                Ok(number)
            }
            Phase::Filling(t) => {
                t.volume += litres;
                Ok(t.number)
            }
            Phase::EndOfTransaction(_) => Err(refused(pump, "the last transaction is not closed")),
        }
    }

    /// Nozzle hung up: a filling ends (its transaction stays open), a nozzle
    /// up without fuel goes back to idle.
    pub fn hang_up(&mut self, pump: u16, now: &str) -> Result<(), SimError> {
        let p = self.pump(pump)?;
        p.phase = match std::mem::replace(&mut p.phase, Phase::Idle { nozzle_up: 0 }) {
            Phase::Filling(mut t) => {
                t.end = Some(now.to_owned());
                Phase::EndOfTransaction(t)
            }
            other @ Phase::EndOfTransaction(_) => other,
            Phase::Idle { .. } => Phase::Idle { nozzle_up: 0 },
        };
        Ok(())
    }

    /// The customer pays in the shop: the shop's system records the payment
    /// and, with `close`, closes the transaction, as another user would.
    pub fn pay_in_shop(&mut self, pump: u16, close: bool) -> Result<u32, SimError> {
        let p = self.pump(pump)?;
        if let Some(owner) = p.locked_by.as_deref().filter(|u| *u != SHOP_USER) {
            return Err(refused(pump, &format!("locked by {owner}")));
        }
        let Phase::EndOfTransaction(t) = &mut p.phase else {
            return Err(refused(pump, "no transaction waits for payment"));
        };
        t.paid = true;
        let number = t.number;
        if close {
            self.close(pump, SHOP_USER)?;
        }
        Ok(number)
    }

    /// The pump stops answering (or answers again).
    pub fn set_offline(&mut self, pump: u16, offline: bool) -> Result<(), SimError> {
        self.pump(pump)?.offline = offline;
        Ok(())
    }

    /// The number the pump's next transaction takes (to reach the wrap).
    pub fn set_next_transaction(&mut self, pump: u16, number: u32) -> Result<(), SimError> {
        self.pump(pump)?.next_transaction = number.clamp(1, MAX_TRANSACTION);
        Ok(())
    }

    /// The transaction `number` of `pump`, open or closed (the latest).
    pub fn transaction(&self, pump: u16, number: u32) -> Option<Transaction> {
        let p = self.pumps.get(&pump)?;
        match &p.phase {
            Phase::Filling(t) | Phase::EndOfTransaction(t) if t.number == number => {
                return Some(t.clone())
            }
            _ => {}
        }
        self.closed
            .iter()
            .rev()
            .find(|(n, t)| *n == pump && t.number == number)
            .map(|(_, t)| t.clone())
    }

    /// Who locked the pump, if anyone.
    pub fn locked_by(&self, pump: u16) -> Option<String> {
        self.pumps.get(&pump)?.locked_by.clone()
    }

    fn close(&mut self, pump: u16, user: &str) -> Result<(), SimError> {
        let p = self.pump(pump)?;
        let Phase::EndOfTransaction(mut t) =
            std::mem::replace(&mut p.phase, Phase::Idle { nozzle_up: 0 })
        else {
            return Err(refused(pump, "not at the end of a transaction"));
        };
        t.closed_by = Some(user.to_owned());
        p.last = Some(t.clone());
        if p.locked_by.as_deref() == Some(user) {
            // The lock held the transaction; the pump is free for the next.
            p.locked_by = None;
        }
        self.uploads.push_back(upload_of(pump, &t));
        self.closed.push((pump, t));
        Ok(())
    }

    /// Answers one jsonPTS message from `user`: the response's text, or the
    /// HTTP status that refuses it (403 without the permission).
    pub fn answer(&mut self, user: &str, perms: Permissions, body: &str) -> Result<String, u16> {
        if body.len() > jsonpts::MAX_REQUEST_BYTES {
            return Ok(message_error(code::JSON_REQUEST_IS_TOO_LONG));
        }
        let message = match Message::parse(body) {
            Ok(m) => m,
            Err(_) => return Ok(message_error(code::INVALID_JSON_REQUEST)),
        };
        for p in &message.packets {
            if !allowed(&p.kind, perms) {
                return Err(403);
            }
        }
        let answers: Vec<Value> = message
            .packets
            .iter()
            .map(|p| {
                self.seen.push(p.kind.clone());
                self.packet(user, p.id.0, &p.kind, p)
            })
            .collect();
        Ok(render(
            &json!({ "Protocol": jsonpts::PROTOCOL, "Packets": answers }),
        ))
    }

    fn packet(&mut self, user: &str, id: u32, kind: &str, p: &jsonpts::Packet) -> Value {
        let target = || p.data::<PumpTransactionRef>().ok();
        match kind {
            "GetUniqueIdentifier" => {
                json!({ "Id": id, "Type": "UniqueIdentifier", "Data": { "Id": self.id } })
            }
            "PumpGetStatus" => match target() {
                Some(r) => match self.pumps.get(&r.pump) {
                    Some(pump) => status(id, r.pump, pump),
                    None => pump_error(id, kind, code::PUMP_NUMBER_OUT_OF_RANGE, r.pump),
                },
                None => error_packet(id, kind, code::COULD_NOT_GET_PUMP_NUMBER, None),
            },
            "PumpGetTransactionInformation" => match target() {
                Some(PumpTransactionRef {
                    pump,
                    transaction: Some(n),
                }) => match self.transaction(pump, n) {
                    Some(t) => transaction_information(id, pump, &t, self.is_open(pump, n)),
                    None => json!({ "Id": id, "Type": "PumpTransactionInformation",
                        "Data": { "Pump": pump, "Transaction": n, "State": "Not found" } }),
                },
                _ => error_packet(id, kind, code::COULD_NOT_GET_PUMP_NUMBER, None),
            },
            "PumpCloseTransaction" => match target() {
                Some(PumpTransactionRef {
                    pump,
                    transaction: Some(n),
                }) => self.close_request(id, user, pump, n),
                _ => error_packet(id, kind, code::COULD_NOT_GET_PUMP_NUMBER, None),
            },
            "PumpLock" | "PumpUnlock" => match target() {
                Some(r) => self.lock_request(id, kind, user, r.pump),
                None => error_packet(id, kind, code::COULD_NOT_GET_PUMP_NUMBER, None),
            },
            "PaymentCreateTransaction" => match p.data::<PaymentRequest>() {
                Ok(r) => self.payment_request(id, r),
                Err(_) => error_packet(id, kind, code::NOT_FOUND, None),
            },
            _ => error_packet(id, kind, code::NOT_FOUND, None),
        }
    }

    fn is_open(&self, pump: u16, number: u32) -> bool {
        self.pumps.get(&pump).is_some_and(|p| {
            matches!(&p.phase, Phase::Filling(t) | Phase::EndOfTransaction(t) if t.number == number)
        })
    }

    fn close_request(&mut self, id: u32, user: &str, pump: u16, number: u32) -> Value {
        let kind = "PumpCloseTransaction";
        let Some(p) = self.pumps.get(&pump) else {
            return pump_error(id, kind, code::PUMP_NUMBER_OUT_OF_RANGE, pump);
        };
        if p.offline {
            return pump_error(id, kind, code::PUMP_STATUS_NOT_END_OF_TRANSACTION, pump);
        }
        let Phase::EndOfTransaction(t) = &p.phase else {
            return pump_error(id, kind, code::PUMP_STATUS_NOT_END_OF_TRANSACTION, pump);
        };
        if t.number != number {
            return pump_error(id, kind, code::TRANSACTION_NUMBER_NOT_MATCH, pump);
        }
        let owner = p.locked_by.clone().unwrap_or_else(|| t.user.clone());
        if owner != SYSTEM_USER && owner != user {
            return error_packet(
                id,
                kind,
                code::PUMP_BUSY_OTHER_USER,
                Some(json!({ "Pump": pump, "User": owner })),
            );
        }
        match self.close(pump, user) {
            Ok(()) => jsonpts::confirmation(id, kind),
            Err(_) => pump_error(id, kind, code::PUMP_STATUS_NOT_END_OF_TRANSACTION, pump),
        }
    }

    fn lock_request(&mut self, id: u32, kind: &str, user: &str, pump: u16) -> Value {
        let Some(p) = self.pumps.get_mut(&pump) else {
            return pump_error(id, kind, code::PUMP_NUMBER_OUT_OF_RANGE, pump);
        };
        let holder = p.locked_by.clone();
        if kind == "PumpUnlock" {
            if holder.as_deref() != Some(user) {
                return pump_error(id, kind, code::PUMP_IS_NOT_LOCKED_BY_USER, pump);
            }
            p.locked_by = None;
            if let Phase::Filling(t) | Phase::EndOfTransaction(t) = &mut p.phase {
                t.user = SYSTEM_USER.to_owned();
            }
            return jsonpts::confirmation(id, kind);
        }
        let owner = match &p.phase {
            Phase::Filling(t) | Phase::EndOfTransaction(t) => Some(t.user.clone()),
            Phase::Idle { .. } => None,
        };
        // Another system's lock, or a transaction another user owns.
        let other = holder
            .filter(|h| h != user)
            .or(owner.filter(|o| o != SYSTEM_USER && o != user));
        if let Some(other) = other {
            return error_packet(
                id,
                kind,
                code::PUMP_BUSY_OTHER_USER,
                Some(json!({ "Pump": pump, "User": other })),
            );
        }
        p.locked_by = Some(user.to_owned());
        if let Phase::Filling(t) | Phase::EndOfTransaction(t) = &mut p.phase {
            t.user = user.to_owned();
        }
        jsonpts::confirmation(id, kind)
    }

    fn payment_request(&mut self, id: u32, r: PaymentRequest) -> Value {
        let kind = "PaymentCreateTransaction";
        for pt in &r.pump_transactions {
            let paid: Decimal = pt.payments.iter().map(|p| p.amount.0).sum();
            if paid.is_zero() {
                return error_packet(id, kind, code::PAYMENT_ZERO_AMOUNT, None);
            }
            if pt
                .payments
                .iter()
                .any(|p| !(1..=10).contains(&p.payment_form_id))
            {
                return error_packet(id, kind, code::PAYMENT_FORM_NUMBER_NOT_CONFIGURED, None);
            }
            let Some(t) = self.transaction(pt.pump, pt.transaction) else {
                return error_packet(
                    id,
                    kind,
                    code::PUMP_TRANSACTION_NOT_FOUND,
                    Some(json!({ "Pump": pt.pump, "Transaction": pt.transaction })),
                );
            };
            let data = Some(json!({ "Pump": pt.pump, "Transaction": pt.transaction }));
            if t.paid {
                return error_packet(id, kind, code::PUMP_TRANSACTION_ALREADY_PAID, data);
            }
            if paid != t.amount() {
                return error_packet(
                    id,
                    kind,
                    code::PUMP_TRANSACTION_AMOUNT_NOT_MATCH_PAYMENT,
                    data,
                );
            }
        }
        for pt in &r.pump_transactions {
            self.mark_paid(pt.pump, pt.transaction);
        }
        let number = self.next_payment;
        self.next_payment += 1;
        json!({ "Id": id, "Type": "PaymentCreateTransactionConfirmation",
            "Data": { "PaymentTransaction": number } })
    }

    fn mark_paid(&mut self, pump: u16, number: u32) {
        if let Some(p) = self.pumps.get_mut(&pump) {
            if let Phase::EndOfTransaction(t) = &mut p.phase {
                if t.number == number {
                    t.paid = true;
                    return;
                }
            }
        }
        if let Some((_, t)) = self
            .closed
            .iter_mut()
            .rev()
            .find(|(n, t)| *n == pump && t.number == number)
        {
            t.paid = true;
        }
    }

    /// The next upload to send, with its packet id, as a message.
    pub fn next_upload(&self, packet_id: u32) -> Option<String> {
        let data = self.uploads.front()?;
        Some(render(&json!({
            "Protocol": jsonpts::PROTOCOL,
            "PtsId": self.id,
            "Packets": [{ "Id": packet_id, "Type": "UploadPumpTransaction", "Data": data }],
        })))
    }
}

fn refused(pump: u16, what: &str) -> SimError {
    SimError::Refused {
        pump,
        what: what.to_owned(),
    }
}

fn allowed(kind: &str, p: Permissions) -> bool {
    match kind {
        "PumpGetStatus" => p.control || p.monitoring,
        "PumpCloseTransaction" | "PumpLock" | "PumpUnlock" => p.control,
        "PumpGetTransactionInformation" => p.control || p.reports,
        "PaymentCreateTransaction" => p.payments,
        _ => p.configuration || p.control || p.monitoring || p.reports || p.payments,
    }
}

fn message_error(code: u32) -> String {
    render(&json!({
        "Protocol": jsonpts::PROTOCOL,
        "Error": true,
        "Code": code,
        "Message": jsonpts::error_name(code),
    }))
}

fn pump_error(id: u32, kind: &str, code: u32, pump: u16) -> Value {
    error_packet(id, kind, code, Some(json!({ "Pump": pump })))
}

/// Marks a number in a response `Value` for [`render`]: a serde `Value`
/// holds numbers as floats, and the controller writes its own digits
/// ("12.50").
const MARK: char = '\u{1}';

fn num(d: Decimal) -> Value {
    Value::String(format!("{MARK}{}", Num(d)))
}

/// Writes `v` as JSON, the numbers marked by [`num`] as bare numbers.
pub fn render(v: &Value) -> String {
    let text = v.to_string();
    let marker = "\"\\u0001";
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find(marker) {
        out.push_str(&rest[..i]);
        let after = &rest[i + marker.len()..];
        let end = after.find('"').unwrap_or(after.len());
        out.push_str(&after[..end]);
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// A transaction's volume, amount, price and start, each key after `prefix`
/// (`Last` in idle statuses), added to the object `data`.
fn add_transaction(data: &mut Value, prefix: &str, t: &Transaction) {
    if let Some(obj) = data.as_object_mut() {
        for (key, value) in [
            ("Volume", num(t.volume)),
            ("Amount", num(t.amount())),
            ("Price", num(t.price)),
            ("DateTimeStart", json!(t.start)),
        ] {
            obj.insert(format!("{prefix}{key}"), value);
        }
    }
}

fn status(id: u32, n: u16, p: &Pump) -> Value {
    let (kind, mut data) = if p.offline {
        let mut data = json!({ "Pump": n });
        if let Phase::Filling(t) | Phase::EndOfTransaction(t) = &p.phase {
            let state = if matches!(p.phase, Phase::Filling(_)) {
                "Filling"
            } else {
                "EndOfTransaction"
            };
            data["State"] = json!(state);
            data["Transaction"] = json!(t.number);
            add_transaction(&mut data, "", t);
        }
        ("PumpOfflineStatus", data)
    } else {
        match &p.phase {
            Phase::Idle { nozzle_up } => {
                let mut data = json!({
                    "Pump": n, "NozzleUp": nozzle_up, "Nozzle": nozzle_up,
                    "Request": "", "User": p.locked_by.clone().unwrap_or_default(),
                    "LastTransaction": p.last.as_ref().map_or(0, |t| t.number),
                });
                if let Some(t) = &p.last {
                    add_transaction(&mut data, "Last", t);
                    data["LastDateTime"] = json!(t.end);
                    data["LastUser"] = json!(t.user);
                }
                ("PumpIdleStatus", data)
            }
            Phase::Filling(t) | Phase::EndOfTransaction(t) => {
                let mut data = json!({
                    "Pump": n, "Nozzle": t.nozzle, "TCVolume": num(Decimal::ZERO),
                    "Transaction": t.number, "FlowRate": 40, "User": t.user,
                });
                add_transaction(&mut data, "", t);
                if matches!(p.phase, Phase::Filling(_)) {
                    data["IsSuspended"] = json!(false);
                    ("PumpFillingStatus", data)
                } else {
                    data["DateTime"] = json!(t.end);
                    data["NozzleUp"] = json!(0);
                    ("PumpEndOfTransactionStatus", data)
                }
            }
        }
    };
    if let Some((gid, name)) = &p.grade {
        data["FuelGradeId"] = json!(gid);
        data["FuelGradeName"] = json!(name);
    }
    json!({ "Id": id, "Type": kind, "Data": data })
}

fn transaction_information(id: u32, pump: u16, t: &Transaction, open: bool) -> Value {
    let state = match (open, &t.end) {
        (true, None) => "Filling",
        (true, Some(_)) => "EndOfTransaction",
        (false, _) => "Finished",
    };
    json!({ "Id": id, "Type": "PumpTransactionInformation", "Data": {
        "Pump": pump, "Transaction": t.number, "State": state,
        "DateTimeStart": t.start, "DateTime": t.end, "Nozzle": t.nozzle,
        "Volume": num(t.volume), "Price": num(t.price), "Amount": num(t.amount()),
        "IsPaid": t.paid, "IsOffline": false, "UserId": 1,
    }})
}

fn upload_of(pump: u16, t: &Transaction) -> Value {
    json!({
        "DateTimeStart": t.start, "DateTime": t.end, "Pump": pump, "Nozzle": t.nozzle,
        "Transaction": t.number, "Volume": num(t.volume), "TCVolume": num(Decimal::ZERO),
        "Price": num(t.price), "Amount": num(t.amount()), "UserId": 1,
        "IsOffline": false, "IsPaid": t.paid, "ConfigurationId": "5171ca7e",
    })
}
