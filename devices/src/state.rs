use std::collections::HashMap;
use std::fmt;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::DeviceError;

/// One message qrgate published on the POS's `state` topic.
///
/// Parsing is tolerant: only a payload that is not a JSON object is an error.
/// Missing or mistyped fields become `None` (or `false`, or an empty `state`),
/// because qrgate may legitimately omit fields (a rejection of a malformed
/// message has no `sale_id`) and a device must never choke on its input.
#[derive(Debug, Clone, PartialEq)]
pub struct StateMessage {
    /// The MQTT retain flag as delivered. Brokers set it only when replaying a
    /// stored retained message on subscribe, so `true` means "this was already
    /// there when I connected", not "qrgate published it retained".
    pub retained: bool,
    /// `in_process`, `pending`, `paid`, `cancelled`, `expired`, `rejected`,
    /// `refunded`, or anything newer; empty when the payload had no `state`.
    pub state: String,
    /// The device's sale id this state is about.
    pub sale_id: Option<String>,
    /// qrgate's reference of the Mercado Pago order.
    pub external_reference: Option<String>,
    /// Exact decimal text of the amount, whether it came as a JSON string or number.
    pub amount: Option<String>,
    /// Currency code, e.g. `ARS`.
    pub currency: Option<String>,
    /// Why a sale was rejected (e.g. `busy`).
    pub reason: Option<String>,
    /// Mercado Pago payment id (on `paid`).
    pub payment_id: Option<u64>,
    /// Mercado Pago merchant order id (on `paid`).
    pub merchant_order: Option<u64>,
    /// The payment id as text, whatever its form: Mercado Pago's Orders API
    /// (attended POS set up with `attended_api = "orders"`) gives text ids
    /// (`PAY01…`), which `payment_id` cannot hold.
    pub payment: Option<String>,
    /// The Orders API's order id (`ORD01…`), in place of `merchant_order`.
    pub order_id: Option<String>,
    /// `true` when a customer scanned the QR and is paying (on `pending`).
    pub served: bool,
    /// The whole payload, for fields this struct does not know yet.
    pub raw: Value,
}

impl StateMessage {
    /// Parses a `state` payload; `retained` is the MQTT retain flag it arrived with.
    pub fn parse(payload: &[u8], retained: bool) -> Result<StateMessage, DeviceError> {
        let text = std::str::from_utf8(payload)
            .map_err(|e| DeviceError::Parse(format!("payload is not UTF-8: {e}")))?;
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| DeviceError::Parse(format!("payload is not JSON: {e}")))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| DeviceError::Parse(format!("payload is not a JSON object: {text}")))?;
        // A second, raw view of the same object: a JSON number's own text
        // ("25615.80") is lost once it becomes a Value (25615.8).
        let raw_fields: HashMap<String, &RawValue> = serde_json::from_str(text).unwrap_or_default();

        let text_field = |key: &str| -> Option<String> {
            match obj.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(
                    raw_fields
                        .get(key)
                        .map(|r| r.get().trim().to_string())
                        .unwrap_or_else(|| n.to_string()),
                ),
                _ => None,
            }
        };
        let id_field = |key: &str| -> Option<u64> {
            match obj.get(key)? {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }
        };
        let served = match obj.get("served") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };

        Ok(StateMessage {
            retained,
            state: match obj.get("state") {
                Some(Value::String(s)) => s.clone(),
                _ => String::new(),
            },
            sale_id: text_field("sale_id"),
            external_reference: text_field("external_reference"),
            amount: text_field("amount"),
            currency: text_field("currency"),
            reason: text_field("reason"),
            payment_id: id_field("payment_id"),
            merchant_order: id_field("merchant_order"),
            payment: text_field("payment_id"),
            order_id: text_field("order_id"),
            served,
            raw,
        })
    }

    /// qrgate's human-readable explanation that accompanies a rejection's
    /// `reason` code, if any.
    pub fn message(&self) -> Option<&str> {
        self.raw.get("message").and_then(Value::as_str)
    }

    /// Whether this message is about `sale_id`.
    pub fn is_for(&self, sale_id: &str) -> bool {
        self.sale_id.as_deref() == Some(sale_id)
    }
}

/// The raw JSON plus the retain flag: what a test failure message needs.
impl fmt::Display for StateMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.raw)?;
        if self.retained {
            write!(f, " (retained)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_with_string_amount() {
        let m = StateMessage::parse(
            br#"{"sale_id":"000042","external_reference":"pump-1-abc","state":"pending","amount":"25615.80","currency":"ARS"}"#,
            true,
        )
        .unwrap();
        assert!(m.retained);
        assert_eq!(m.state, "pending");
        assert_eq!(m.sale_id.as_deref(), Some("000042"));
        assert_eq!(m.external_reference.as_deref(), Some("pump-1-abc"));
        assert_eq!(m.amount.as_deref(), Some("25615.80"));
        assert_eq!(m.currency.as_deref(), Some("ARS"));
        assert_eq!(m.reason, None);
        assert_eq!(m.payment_id, None);
        assert!(!m.served);
        assert!(m.is_for("000042"));
    }

    #[test]
    fn number_amount_keeps_its_exact_text() {
        let m = StateMessage::parse(
            br#"{"sale_id":"7","state":"pending","amount": 25615.80 ,"served":true}"#,
            false,
        )
        .unwrap();
        assert_eq!(m.amount.as_deref(), Some("25615.80"));
        assert!(m.served);

        let m = StateMessage::parse(br#"{"state":"pending","amount":100}"#, false).unwrap();
        assert_eq!(m.amount.as_deref(), Some("100"));
    }

    #[test]
    fn paid_ids_as_numbers_or_strings() {
        let m = StateMessage::parse(
            br#"{"sale_id":"1","state":"paid","amount":"10.00","payment_id":123456789012,"merchant_order":"987"}"#,
            false,
        )
        .unwrap();
        assert_eq!(m.state, "paid");
        assert_eq!(m.payment_id, Some(123456789012));
        assert_eq!(m.merchant_order, Some(987));

        let m = StateMessage::parse(
            br#"{"state":"paid","payment_id":-1,"merchant_order":1.5}"#,
            false,
        )
        .unwrap();
        assert_eq!(m.payment_id, None);
        assert_eq!(m.merchant_order, None);
    }

    #[test]
    fn missing_and_mistyped_fields_are_tolerated() {
        let m = StateMessage::parse(
            br#"{"state":"rejected","reason":"bad_json","message":"not a valid message"}"#,
            false,
        )
        .unwrap();
        assert_eq!(m.state, "rejected");
        assert_eq!(m.sale_id, None);
        assert_eq!(m.reason.as_deref(), Some("bad_json"));
        assert_eq!(m.message(), Some("not a valid message"));

        let m = StateMessage::parse(br#"{}"#, false).unwrap();
        assert_eq!(m.state, "");
        assert_eq!(m.amount, None);

        let m = StateMessage::parse(
            br#"{"state":42,"sale_id":42,"amount":null,"served":"yes","currency":["ARS"],"extra":{"a":1}}"#,
            false,
        )
        .unwrap();
        assert_eq!(m.state, "");
        assert_eq!(m.sale_id.as_deref(), Some("42"));
        assert_eq!(m.amount, None);
        assert_eq!(m.currency, None);
        assert!(!m.served);
        assert_eq!(m.raw["extra"]["a"], 1);
    }

    #[test]
    fn unknown_state_is_kept() {
        let m =
            StateMessage::parse(br#"{"sale_id":"9","state":"partially_refunded"}"#, false).unwrap();
        assert_eq!(m.state, "partially_refunded");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for payload in [
            &b""[..],
            b"online",
            b"{\"state\":",
            b"[1,2,3]",
            b"\"pending\"",
            b"null",
            b"\xff\xfe",
        ] {
            match StateMessage::parse(payload, false) {
                Err(DeviceError::Parse(_)) => {}
                other => panic!("{payload:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn display_shows_raw_and_retain() {
        let m = StateMessage::parse(br#"{"state":"paid"}"#, true).unwrap();
        assert_eq!(m.to_string(), r#"{"state":"paid"} (retained)"#);
    }
}
