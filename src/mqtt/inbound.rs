//! Device messages into order-book commands (devices/README.md). Everything a
//! device sends is checked here for shape and size; the money rules are the
//! order book's. Nothing here panics on input, and a refusal echoes little of
//! what was sent: a hostile payload must not flood the log or the state topic.

use serde::de::Deserializer;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::topics::DeviceTopic;
use crate::money::parse_plain_decimal;
use crate::orders::rules::{LineRequest, SaleRequest};
use crate::orders::sale::Tax;
use crate::orders::{Command, SaleId};
use rust_decimal::Decimal;

pub const MAX_ITEMS: usize = 100;
pub const MAX_TITLE: usize = 120;
pub const MAX_DESCRIPTION: usize = 256;
pub const MAX_SHORT: usize = 64;
pub const MAX_TAXES: usize = 4;
/// Most characters of a refusal's reason (what a device sent may be in it).
pub const MAX_REASON: usize = 200;

/// Why a device message was refused before reaching the order book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub code: &'static str,
    pub message: String,
    /// The sale the message named, when it could be read.
    pub sale_id: Option<SaleId>,
}

fn rejected(code: &'static str, message: impl Into<String>, sale_id: Option<SaleId>) -> Rejected {
    Rejected {
        code,
        message: message.into(),
        sale_id,
    }
}

/// A number as a device wrote it: a JSON number or a string, read without
/// `f64`. Whether it is a plain decimal is decided when the whole message has
/// been read, so that a loose number is refused as `bad_amount`, naming its
/// field, rather than failing the message as broken JSON.
struct DeviceNumber(Result<Decimal, String>);

impl DeviceNumber {
    fn value(&self) -> Option<Decimal> {
        self.0.as_ref().ok().copied()
    }
}

impl<'de> Deserialize<'de> for DeviceNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(deserializer)?;
        let text = raw.get();
        let read = match text.as_bytes().first() {
            // A string's value (escapes read) is what must be plain.
            Some(b'"') => serde_json::from_str::<String>(text)
                .map_err(|e| e.to_string())
                .and_then(|s| parse_plain_decimal(&s).map_err(|e| e.to_string())),
            // A JSON number's own text: valid JSON, but `1e3` or `-0.5E1`
            // are not plain decimals.
            Some(b'-' | b'0'..=b'9') => parse_plain_decimal(text).map_err(|e| e.to_string()),
            _ => Err(format!(
                "a number or a decimal string, not {}",
                text.chars().take(24).collect::<String>()
            )),
        };
        Ok(DeviceNumber(read))
    }
}

#[derive(Deserialize)]
struct ItemJson {
    title: Option<String>,
    description: Option<String>,
    quantity: Option<DeviceNumber>,
    unit_price: Option<DeviceNumber>,
    unit_measure: Option<String>,
    sku: Option<String>,
    category: Option<String>,
    taxes: Option<Vec<TaxJson>>,
}

#[derive(Deserialize)]
struct TaxJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<DeviceNumber>,
}

#[derive(Deserialize)]
struct SaleJson {
    sale_id: Option<String>,
    items: Option<Vec<ItemJson>>,
    amount: Option<DeviceNumber>,
    pos_id: Option<String>,
    pos: Option<String>,
}

#[derive(Deserialize)]
struct SaleRefJson {
    sale_id: Option<String>,
}

#[derive(Deserialize)]
struct DeliveredJson {
    sale_id: Option<String>,
    ok: Option<bool>,
    reason: Option<String>,
}

/// Reads only `sale_id`, to name the sale in a refusal of a broken message.
pub fn sniff_sale_id(payload: &[u8]) -> Option<SaleId> {
    let v: SaleRefJson = serde_json::from_slice(payload).ok()?;
    SaleId::parse(v.sale_id.as_deref()?).ok()
}

fn sale_id(raw: Option<String>) -> Result<SaleId, Rejected> {
    let raw = raw.ok_or_else(|| rejected("bad_message", "sale_id is missing", None))?;
    SaleId::parse(&raw).map_err(|e| rejected("bad_message", e.to_string(), None))
}

/// An item's taxes (Colombia's IVA): a few, each a short name and a
/// percentage between 0 and 100.
fn taxes(n: usize, raw: Option<Vec<TaxJson>>, id: &SaleId) -> Result<Vec<Tax>, Rejected> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_TAXES {
        return Err(rejected(
            "bad_message",
            format!("item {n} has more than {MAX_TAXES} taxes"),
            Some(id.clone()),
        ));
    }
    raw.into_iter()
        .map(|t| {
            let kind = t
                .kind
                .filter(|k| !k.trim().is_empty() && k.len() <= MAX_SHORT);
            let value = t
                .value
                .and_then(|v| v.value())
                .filter(|v| *v >= Decimal::ZERO && *v <= Decimal::ONE_HUNDRED);
            match (kind, value) {
                (Some(kind), Some(value)) => Ok(Tax { kind, value }),
                _ => Err(rejected(
                    "bad_message",
                    format!("item {n} has a tax without a short type or a value from 0 to 100"),
                    Some(id.clone()),
                )),
            }
        })
        .collect()
}

/// The contract's number form (devices/README.md: plain decimals) is checked
/// before any other rule, so a loose number is always `bad_amount`.
fn plain_numbers(v: &SaleJson) -> Result<(), String> {
    let check = |what: &dyn Fn() -> String, n: &Option<DeviceNumber>| match n {
        Some(DeviceNumber(Err(e))) => Err(format!("{}: {e}", what())),
        _ => Ok(()),
    };
    check(&|| "amount".into(), &v.amount)?;
    for (i, it) in v.items.iter().flatten().enumerate() {
        let n = i + 1;
        check(&|| format!("item {n} quantity"), &it.quantity)?;
        check(&|| format!("item {n} unit_price"), &it.unit_price)?;
        for (j, t) in it.taxes.iter().flatten().enumerate() {
            check(&|| format!("item {n} tax {} value", j + 1), &t.value)?;
        }
    }
    Ok(())
}

fn bounded(
    what: &str,
    s: Option<String>,
    max: usize,
    sale: &SaleId,
) -> Result<Option<String>, Rejected> {
    match s {
        Some(s) if s.chars().count() > max => Err(rejected(
            "bad_message",
            format!("{what} is longer than {max} characters"),
            Some(sale.clone()),
        )),
        Some(s) if s.chars().any(char::is_control) => Err(rejected(
            "bad_message",
            format!("{what} has control characters"),
            Some(sale.clone()),
        )),
        Some(s) if s.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn bad_json(e: serde_json::Error, payload: &[u8]) -> Rejected {
    rejected(
        "bad_json",
        format!("not a valid message: {e}"),
        sniff_sale_id(payload),
    )
}

/// Parses one device message. `pos` is the POS its topic names.
pub fn parse(
    kind: DeviceTopic,
    pos: &str,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Command, Rejected> {
    if payload.len() > max_bytes {
        return Err(rejected(
            "payload_too_large",
            format!(
                "message of {} bytes is over the {max_bytes}-byte cap",
                payload.len()
            ),
            None,
        ));
    }
    match kind {
        DeviceTopic::Status => {
            let text = std::str::from_utf8(payload).unwrap_or("").trim();
            match text.trim_matches('"') {
                "online" => Ok(Command::Presence { online: true }),
                "offline" => Ok(Command::Presence { online: false }),
                _ => Err(rejected(
                    "bad_message",
                    "status must be \"online\" or \"offline\"",
                    None,
                )),
            }
        }
        DeviceTopic::Progress | DeviceTopic::Cancel => {
            let v: SaleRefJson =
                serde_json::from_slice(payload).map_err(|e| bad_json(e, payload))?;
            let id = sale_id(v.sale_id)?;
            Ok(if kind == DeviceTopic::Progress {
                Command::Progress(id)
            } else {
                Command::Cancel(id)
            })
        }
        DeviceTopic::Delivered => {
            let v: DeliveredJson =
                serde_json::from_slice(payload).map_err(|e| bad_json(e, payload))?;
            let id = sale_id(v.sale_id)?;
            let ok = v.ok.ok_or_else(|| {
                rejected(
                    "bad_message",
                    "delivered needs \"ok\": true or false",
                    Some(id.clone()),
                )
            })?;
            let reason = bounded("reason", v.reason, MAX_DESCRIPTION, &id)?;
            Ok(Command::Delivered {
                sale_id: id,
                ok,
                reason,
            })
        }
        DeviceTopic::Sale => {
            let v: SaleJson = serde_json::from_slice(payload).map_err(|e| bad_json(e, payload))?;
            if let Err(m) = plain_numbers(&v) {
                let id = v.sale_id.as_deref().and_then(|s| SaleId::parse(s).ok());
                return Err(rejected("bad_amount", m, id));
            }
            let id = sale_id(v.sale_id)?;
            if let Some(named) = v.pos_id.as_deref().or(v.pos.as_deref()) {
                if named != pos {
                    return Err(rejected(
                        "pos_mismatch",
                        format!("the sale names POS {named:?} but was published on {pos}'s topic"),
                        Some(id),
                    ));
                }
            }
            let items = v.items.unwrap_or_default();
            if items.is_empty() {
                return Err(rejected(
                    "bad_message",
                    "a sale needs at least one item",
                    Some(id),
                ));
            }
            if items.len() > MAX_ITEMS {
                return Err(rejected(
                    "bad_message",
                    format!("a sale has at most {MAX_ITEMS} items"),
                    Some(id),
                ));
            }
            let mut lines = Vec::with_capacity(items.len());
            for (n, it) in items.into_iter().enumerate() {
                let n = n + 1;
                let title = bounded("title", it.title, MAX_TITLE, &id)?.ok_or_else(|| {
                    rejected(
                        "bad_message",
                        format!("item {n} has no title"),
                        Some(id.clone()),
                    )
                })?;
                let quantity = it.quantity.and_then(|q| q.value()).ok_or_else(|| {
                    rejected(
                        "bad_message",
                        format!("item {n} has no quantity"),
                        Some(id.clone()),
                    )
                })?;
                let unit_price = it.unit_price.and_then(|p| p.value()).ok_or_else(|| {
                    rejected(
                        "bad_message",
                        format!("item {n} has no unit_price"),
                        Some(id.clone()),
                    )
                })?;
                let taxes = taxes(n, it.taxes, &id)?;
                lines.push(LineRequest {
                    title,
                    description: bounded("description", it.description, MAX_DESCRIPTION, &id)?,
                    quantity,
                    unit_price,
                    unit_measure: bounded("unit_measure", it.unit_measure, MAX_SHORT, &id)?,
                    sku: bounded("sku", it.sku, MAX_SHORT, &id)?,
                    category: bounded("category", it.category, MAX_SHORT, &id)?,
                    taxes,
                });
            }
            Ok(Command::Sale(SaleRequest {
                sale_id: id,
                lines,
                amount: v.amount.and_then(|a| a.value()),
            }))
        }
    }
}

/// A device message as it came from the broker.
#[derive(Debug, Clone, Copy)]
pub struct Arrived<'a> {
    pub kind: DeviceTopic,
    /// The POS its topic names.
    pub pos: &'a str,
    pub topic: &'a str,
    /// The broker says it delivers a retained message: one published with
    /// the retain flag, sent again because qrgate (re)subscribed.
    pub retain: bool,
    /// Its size as the device published it.
    pub size: usize,
    /// `None` when it was too large to be read at all (see `guard`).
    pub payload: Option<&'a [u8]>,
}

/// What to do with a device message: a command; nothing, for an empty one
/// (what clearing a retained message leaves, and it carries nothing); or a
/// refusal that names the topic kind and the size.
pub fn screen(m: &Arrived<'_>, max_bytes: usize) -> Result<Option<Command>, Rejected> {
    if m.size == 0 {
        return Ok(None);
    }
    // Only presence may be retained (a device's last will is). A retained
    // sale, progress, cancel or delivered would act again whenever a broker
    // delivers it to a new subscription (qrgate's restart, a new session),
    // long after it was meant: a cancelled sale payable again. The retain
    // flag shows only on those redeliveries (MQTT 3.1.1 §3.3.1.3; Mosquitto
    // and rumqttd both clear it towards established subscriptions), which is
    // exactly when they must not act.
    if m.retain && m.kind != DeviceTopic::Status {
        let sale_id = m
            .payload
            .filter(|p| p.len() <= max_bytes)
            .and_then(sniff_sale_id);
        let why = "refused because it is retained: a broker delivers a retained message again \
                   to every new subscription (a qrgate restart), where it would act again; \
                   publish device messages without the retain flag (only status is retained)";
        return Err(described(rejected("retained", why, sale_id), m));
    }
    let payload = match m.payload {
        Some(p) if p.len() <= max_bytes => p,
        _ => {
            let why = format!("over the {max_bytes}-byte cap");
            return Err(described(rejected("payload_too_large", why, None), m));
        }
    };
    parse(m.kind, m.pos, payload, max_bytes)
        .map(Some)
        .map_err(|r| described(r, m))
}

/// The operator and the device read which message, how large, and why (cut
/// short: it may quote what was sent); a retained one, how to clear it.
fn described(mut r: Rejected, m: &Arrived<'_>) -> Rejected {
    let mut message = format!(
        "{} of {} bytes: {}",
        m.kind.as_str(),
        m.size,
        cut(&r.message, MAX_REASON)
    );
    if m.retain {
        message.push_str(&format!(
            "; clear it with an empty retained message on its topic: mosquitto_pub -r -n -t {}",
            cut(m.topic, 2 * MAX_SHORT + 64)
        ));
    }
    r.message = message;
    r
}

/// At most `max` characters, with an ellipsis when cut.
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sale(payload: &str) -> Result<Command, Rejected> {
        parse(DeviceTopic::Sale, "pump-1", payload.as_bytes(), 16 * 1024)
    }

    #[test]
    fn a_sale_reads_numbers_and_strings_alike() {
        let Command::Sale(s) = sale(
            r#"{"sale_id":"000042","items":[{"title":"Super 95","quantity":"32.10","unit_price":798.00,"unit_measure":"litre"}],"amount":"25615.80"}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s.sale_id.as_str(), "000042");
        assert_eq!(s.lines[0].quantity.to_string(), "32.10");
        assert_eq!(s.lines[0].unit_price.to_string(), "798.00");
        assert_eq!(s.amount.unwrap().to_string(), "25615.80");
    }

    #[test]
    fn items_may_carry_sku_category_and_taxes() {
        let Command::Sale(s) = sale(
            r#"{"sale_id":"9","items":[{"title":"Cola","quantity":1,"unit_price":3000,"sku":"COLA-05","category":"drinks","taxes":[{"type":"IVA","value":19}]}]}"#,
        )
        .unwrap() else {
            panic!()
        };
        let line = &s.lines[0];
        assert_eq!(line.sku.as_deref(), Some("COLA-05"));
        assert_eq!(line.category.as_deref(), Some("drinks"));
        assert_eq!(line.taxes.len(), 1);
        assert_eq!(line.taxes[0].kind, "IVA");
        assert_eq!(line.taxes[0].value, Decimal::from(19));
        for bad in [
            r#"[{"type":"IVA"}]"#,
            r#"[{"type":"","value":19}]"#,
            r#"[{"type":"IVA","value":101}]"#,
            r#"[{"type":"A","value":1},{"type":"B","value":1},{"type":"C","value":1},{"type":"D","value":1},{"type":"E","value":1}]"#,
        ] {
            let payload = format!(
                r#"{{"sale_id":"9","items":[{{"title":"x","quantity":1,"unit_price":1,"taxes":{bad}}}]}}"#
            );
            let e = sale(&payload).unwrap_err();
            assert_eq!(e.code, "bad_message", "{bad}");
        }
    }

    #[test]
    fn broken_sales_are_refused_with_a_code_and_their_sale_id_when_readable() {
        let cases = [
            ("not json", "bad_json"),
            (r#"{"items":[]}"#, "bad_message"),
            (r#"{"sale_id":"1","items":[]}"#, "bad_message"),
            (
                r#"{"sale_id":"1","items":[{"title":"x","quantity":"abc","unit_price":1}]}"#,
                "bad_amount",
            ),
            (
                r#"{"sale_id":"1","items":[{"quantity":1,"unit_price":1}]}"#,
                "bad_message",
            ),
            (
                r#"{"sale_id":"1","pos_id":"pump-2","items":[{"title":"x","quantity":1,"unit_price":1}]}"#,
                "pos_mismatch",
            ),
            (
                r#"{"sale_id":"a b","items":[{"title":"x","quantity":1,"unit_price":1}]}"#,
                "bad_message",
            ),
        ];
        for (payload, code) in cases {
            let e = sale(payload).unwrap_err();
            assert_eq!(e.code, code, "{payload}: {e:?}");
        }
        let e = sale(r#"{"sale_id":"7","items":[{"title":"x","quantity":"abc","unit_price":1}]}"#)
            .unwrap_err();
        assert_eq!(e.sale_id.unwrap().as_str(), "7");
    }

    #[test]
    fn oversize_payloads_are_refused_before_parsing() {
        let big = vec![b' '; 2000];
        let e = parse(DeviceTopic::Sale, "pump-1", &big, 1000).unwrap_err();
        assert_eq!(e.code, "payload_too_large");
    }

    #[test]
    fn status_is_plain_online_or_offline() {
        assert_eq!(
            parse(DeviceTopic::Status, "p", b"online", 100).unwrap(),
            Command::Presence { online: true }
        );
        assert_eq!(
            parse(DeviceTopic::Status, "p", b" offline\n", 100).unwrap(),
            Command::Presence { online: false }
        );
        assert!(parse(DeviceTopic::Status, "p", b"maybe", 100).is_err());
    }

    /// Every loose form, wherever a device writes a number, as a string and
    /// (where JSON allows it) as a number: `bad_amount`, naming the field.
    #[test]
    fn loose_numbers_are_bad_amount_wherever_they_are() {
        let loose_strings = [
            "1_000",
            "1.0_5",
            "1.",
            ".5",
            "+1",
            "1e3",
            " 1",
            "1 ",
            "",
            "1,5",
            "0x10",
            "NaN",
            "--1",
            "\\u0031_0",
        ];
        let loose_numbers = ["1e3", "1E3", "1.5e2", "-1e-2", "1.0E+2"];
        let not_numbers = ["true", "[1]", "{}", r#"{"v":1}"#];
        let fields = |v: &str| {
            [
                format!(
                    r#"{{"sale_id":"7","items":[{{"title":"x","quantity":{v},"unit_price":1}}]}}"#
                ),
                format!(
                    r#"{{"sale_id":"7","items":[{{"title":"x","quantity":1,"unit_price":{v}}}]}}"#
                ),
                format!(
                    r#"{{"sale_id":"7","items":[{{"title":"x","quantity":1,"unit_price":1}}],"amount":{v}}}"#
                ),
                format!(
                    r#"{{"sale_id":"7","items":[{{"title":"x","quantity":1,"unit_price":1,"taxes":[{{"type":"IVA","value":{v}}}]}}]}}"#
                ),
            ]
        };
        let written = loose_strings.iter().map(|s| format!("\"{s}\"")).chain(
            loose_numbers
                .iter()
                .chain(&not_numbers)
                .map(|s| s.to_string()),
        );
        for v in written {
            for (payload, field) in
                fields(&v)
                    .iter()
                    .zip(["quantity", "unit_price", "amount", "value"])
            {
                let e = sale(payload).unwrap_err();
                assert_eq!(e.code, "bad_amount", "{payload}: {e:?}");
                assert!(e.message.contains(field), "{payload}: {e:?}");
                assert_eq!(e.sale_id.as_ref().map(|s| s.as_str()), Some("7"));
            }
        }
        // Plain decimals pass this rule, as strings or numbers; the book
        // judges their value (zero, sign, decimals) later.
        for v in [
            "\"1000\"",
            "1000",
            "\"10.50\"",
            "10.50",
            "\"007\"",
            "\"-1\"",
            "-1",
            "0",
        ] {
            for payload in fields(v) {
                assert!(
                    !matches!(
                        sale(&payload),
                        Err(Rejected {
                            code: "bad_amount",
                            ..
                        })
                    ),
                    "{payload}"
                );
            }
        }
        // `null` is no number at all: an item without a quantity.
        let e = sale(r#"{"sale_id":"7","items":[{"title":"x","quantity":null,"unit_price":1}]}"#)
            .unwrap_err();
        assert_eq!(e.code, "bad_message");
    }

    #[test]
    fn a_loose_number_comes_before_any_other_rule() {
        // No title, an unknown POS, too many taxes: still `bad_amount`.
        for payload in [
            r#"{"sale_id":"7","items":[{"quantity":"1_000","unit_price":1}]}"#,
            r#"{"sale_id":"7","pos_id":"pump-9","items":[{"title":"x","quantity":1,"unit_price":"+1"}]}"#,
            r#"{"sale_id":"a b","items":[{"title":"x","quantity":1,"unit_price":1}],"amount":"1."}"#,
        ] {
            assert_eq!(sale(payload).unwrap_err().code, "bad_amount", "{payload}");
        }
    }

    fn arrived<'a>(
        kind: DeviceTopic,
        retain: bool,
        payload: Option<&'a [u8]>,
        size: usize,
    ) -> Arrived<'a> {
        Arrived {
            kind,
            pos: "pump-1",
            topic: "qrgate/pos/pump-1/x",
            retain,
            size,
            payload,
        }
    }

    #[test]
    fn retained_device_messages_are_refused_with_how_to_clear_them_except_status() {
        let sale = br#"{"sale_id":"41","items":[{"title":"x","quantity":1,"unit_price":1}]}"#;
        for kind in [
            DeviceTopic::Sale,
            DeviceTopic::Progress,
            DeviceTopic::Cancel,
            DeviceTopic::Delivered,
        ] {
            let e = screen(&arrived(kind, true, Some(sale), sale.len()), 1024).unwrap_err();
            assert_eq!(e.code, "retained", "{kind:?}");
            assert_eq!(e.sale_id.as_ref().map(|s| s.as_str()), Some("41"));
            assert!(e
                .message
                .starts_with(&format!("{} of {} bytes", kind.as_str(), sale.len())));
            assert!(
                e.message
                    .contains("mosquitto_pub -r -n -t qrgate/pos/pump-1/x"),
                "{}",
                e.message
            );
            // The same message, not retained, is read as usual.
            let r = screen(&arrived(kind, false, Some(sale), sale.len()), 1024);
            assert!(
                !matches!(
                    r,
                    Err(Rejected {
                        code: "retained",
                        ..
                    })
                ),
                "{kind:?}"
            );
        }
        // A device's retained presence (its last will) is how presence works.
        assert_eq!(
            screen(
                &arrived(DeviceTopic::Status, true, Some(b"offline"), 7),
                1024
            ),
            Ok(Some(Command::Presence { online: false }))
        );
    }

    #[test]
    fn oversize_and_empty_messages() {
        // Dropped before it was read (the guard): refused by its size.
        let e = screen(&arrived(DeviceTopic::Sale, false, None, 300_000), 16384).unwrap_err();
        assert_eq!(e.code, "payload_too_large");
        assert_eq!(e.message, "sale of 300000 bytes: over the 16384-byte cap");
        let big = vec![b'x'; 2000];
        let e = screen(&arrived(DeviceTopic::Cancel, false, Some(&big), 2000), 1000).unwrap_err();
        assert_eq!(e.code, "payload_too_large");
        // Retained presence over the cap: refused, with how to clear it.
        let e = screen(&arrived(DeviceTopic::Status, true, None, 1 << 20), 1000).unwrap_err();
        assert_eq!(e.code, "payload_too_large");
        assert!(e.message.contains("mosquitto_pub -r -n"));
        // Empty: what clearing a retained message leaves behind.
        for kind in DeviceTopic::ALL {
            assert_eq!(screen(&arrived(kind, false, Some(b""), 0), 1000), Ok(None));
        }
    }

    #[test]
    fn a_refusal_quotes_little_of_what_was_sent() {
        let named = "p".repeat(5000);
        let payload = format!(
            r#"{{"sale_id":"1","pos_id":"{named}","items":[{{"title":"x","quantity":1,"unit_price":1}}]}}"#
        );
        let e = screen(
            &arrived(
                DeviceTopic::Sale,
                false,
                Some(payload.as_bytes()),
                payload.len(),
            ),
            16384,
        )
        .unwrap_err();
        assert_eq!(e.code, "pos_mismatch");
        assert!(e.message.chars().count() < MAX_REASON + 40, "{}", e.message);
        let e = screen(
            &arrived(DeviceTopic::Sale, false, Some(b"{\"items\": \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}"), 200),
            16384,
        )
        .unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert!(e.message.chars().count() <= "sale of 200 bytes: ".len() + MAX_REASON + 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn no_input_panics_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for kind in DeviceTopic::ALL {
                let _ = parse(kind, "pump-1", &bytes, 16 * 1024);
            }
        }

        #[test]
        fn json_shaped_garbage_never_panics(
            id in "[a-z0-9 ]{0,70}",
            q in "[-0-9.e\"a]{0,12}",
            p in "[-0-9.e\"]{0,12}",
        ) {
            let payload = format!(r#"{{"sale_id":"{id}","items":[{{"title":"t","quantity":{q},"unit_price":{p}}}]}}"#);
            let _ = sale(&payload);
        }
    }
}
