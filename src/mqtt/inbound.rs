//! Device messages into order-book commands (devices/README.md). Everything a
//! device sends is checked here for shape and size; the money rules are the
//! order book's. Nothing here panics on input.

use serde::Deserialize;

use super::topics::DeviceTopic;
use crate::money::JsonDecimal;
use crate::orders::book::{LineRequest, SaleRequest};
use crate::orders::sale::Tax;
use crate::orders::{Command, SaleId};
use rust_decimal::Decimal;

pub const MAX_ITEMS: usize = 100;
pub const MAX_TITLE: usize = 120;
pub const MAX_DESCRIPTION: usize = 256;
pub const MAX_SHORT: usize = 64;
pub const MAX_TAXES: usize = 4;

/// Why a device message was refused before reaching the order book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
    /// The sale the message named, when it could be read.
    pub sale_id: Option<SaleId>,
}

fn refused(code: &'static str, message: impl Into<String>, sale_id: Option<SaleId>) -> Refused {
    Refused {
        code,
        message: message.into(),
        sale_id,
    }
}

#[derive(Deserialize)]
struct ItemJson {
    title: Option<String>,
    description: Option<String>,
    quantity: Option<JsonDecimal>,
    unit_price: Option<JsonDecimal>,
    unit_measure: Option<String>,
    sku: Option<String>,
    category: Option<String>,
    taxes: Option<Vec<TaxJson>>,
}

#[derive(Deserialize)]
struct TaxJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<JsonDecimal>,
}

#[derive(Deserialize)]
struct SaleJson {
    sale_id: Option<String>,
    items: Option<Vec<ItemJson>>,
    amount: Option<JsonDecimal>,
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
fn sniff_sale_id(payload: &[u8]) -> Option<SaleId> {
    let v: SaleRefJson = serde_json::from_slice(payload).ok()?;
    SaleId::parse(v.sale_id.as_deref()?).ok()
}

fn sale_id(raw: Option<String>) -> Result<SaleId, Refused> {
    let raw = raw.ok_or_else(|| refused("bad_message", "sale_id is missing", None))?;
    SaleId::parse(&raw).map_err(|e| refused("bad_message", e, None))
}

/// An item's taxes (Colombia's IVA): a few, each a short name and a
/// percentage between 0 and 100.
fn taxes(n: usize, raw: Option<Vec<TaxJson>>, id: &SaleId) -> Result<Vec<Tax>, Refused> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_TAXES {
        return Err(refused(
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
                .map(|v| v.0)
                .filter(|v| *v >= Decimal::ZERO && *v <= Decimal::ONE_HUNDRED);
            match (kind, value) {
                (Some(kind), Some(value)) => Ok(Tax { kind, value }),
                _ => Err(refused(
                    "bad_message",
                    format!("item {n} has a tax without a short type or a value from 0 to 100"),
                    Some(id.clone()),
                )),
            }
        })
        .collect()
}

fn bounded(
    what: &str,
    s: Option<String>,
    max: usize,
    sale: &SaleId,
) -> Result<Option<String>, Refused> {
    match s {
        Some(s) if s.chars().count() > max => Err(refused(
            "bad_message",
            format!("{what} is longer than {max} characters"),
            Some(sale.clone()),
        )),
        Some(s) if s.chars().any(char::is_control) => Err(refused(
            "bad_message",
            format!("{what} has control characters"),
            Some(sale.clone()),
        )),
        Some(s) if s.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn bad_json(e: serde_json::Error, payload: &[u8]) -> Refused {
    refused(
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
) -> Result<Command, Refused> {
    if payload.len() > max_bytes {
        return Err(refused(
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
                _ => Err(refused(
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
                refused(
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
            let id = sale_id(v.sale_id)?;
            if let Some(named) = v.pos_id.as_deref().or(v.pos.as_deref()) {
                if named != pos {
                    return Err(refused(
                        "pos_mismatch",
                        format!("the sale names POS {named:?} but was published on {pos}'s topic"),
                        Some(id),
                    ));
                }
            }
            let items = v.items.unwrap_or_default();
            if items.is_empty() {
                return Err(refused(
                    "bad_message",
                    "a sale needs at least one item",
                    Some(id),
                ));
            }
            if items.len() > MAX_ITEMS {
                return Err(refused(
                    "bad_message",
                    format!("a sale has at most {MAX_ITEMS} items"),
                    Some(id),
                ));
            }
            let mut lines = Vec::with_capacity(items.len());
            for (n, it) in items.into_iter().enumerate() {
                let n = n + 1;
                let title = bounded("title", it.title, MAX_TITLE, &id)?.ok_or_else(|| {
                    refused(
                        "bad_message",
                        format!("item {n} has no title"),
                        Some(id.clone()),
                    )
                })?;
                let quantity = it.quantity.ok_or_else(|| {
                    refused(
                        "bad_message",
                        format!("item {n} has no quantity"),
                        Some(id.clone()),
                    )
                })?;
                let unit_price = it.unit_price.ok_or_else(|| {
                    refused(
                        "bad_message",
                        format!("item {n} has no unit_price"),
                        Some(id.clone()),
                    )
                })?;
                let taxes = taxes(n, it.taxes, &id)?;
                lines.push(LineRequest {
                    title,
                    description: bounded("description", it.description, MAX_DESCRIPTION, &id)?,
                    quantity: quantity.0,
                    unit_price: unit_price.0,
                    unit_measure: bounded("unit_measure", it.unit_measure, MAX_SHORT, &id)?,
                    sku: bounded("sku", it.sku, MAX_SHORT, &id)?,
                    category: bounded("category", it.category, MAX_SHORT, &id)?,
                    taxes,
                });
            }
            Ok(Command::Sale(SaleRequest {
                sale_id: id,
                lines,
                amount: v.amount.map(|a| a.0),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sale(payload: &str) -> Result<Command, Refused> {
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
                "bad_json",
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
