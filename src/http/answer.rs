//! Every answer to Mercado Pago's poll, rendered in one place (MP-API.md
//! section 1). A POS's answer is rendered once per change of its state and
//! kept as bytes, so every poll of the same sale returns the same body and a
//! poll costs a map read.

use bytes::Bytes;
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::money::{decimal_json_number, Amount};
use crate::orders::sale::Line;
use crate::orders::{PosConfig, PosKind, PosState, Sale, SaleState};

/// What a poll answers, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollAnswer {
    pub status: u16,
    /// `ok` or the 400 error type; for logs and metrics.
    pub kind: &'static str,
    pub body: Bytes,
}

/// What every order body carries besides the sale.
#[derive(Debug, Clone)]
pub struct OrderContext {
    pub collector_id: u64,
    pub sponsor_id: Option<u64>,
    pub notification_url: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

fn error(kind: &'static str, message: &str) -> PollAnswer {
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorInner { kind, message },
    })
    .unwrap_or_default();
    PollAnswer {
        status: 400,
        kind,
        body: Bytes::from(body),
    }
}

/// The answer for a POS id we do not know.
pub fn invalid() -> PollAnswer {
    error("invalid", "unknown point of sale")
}

#[derive(Serialize)]
struct V1Item<'a> {
    title: String,
    currency_id: &'static str,
    description: &'a str,
    quantity: u64,
    unit_price: Box<RawValue>,
}

#[derive(Serialize)]
struct V1Order<'a> {
    collector_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sponsor_id: Option<u64>,
    items: Vec<V1Item<'a>>,
    external_reference: &'a str,
    notification_url: &'a str,
}

fn measure(unit: Option<&str>) -> &str {
    match unit {
        Some("litre" | "liter" | "litres" | "liters" | "l" | "L") => "L",
        Some(other) => other,
        None => "",
    }
}

/// MP items carry whole quantities: a fractional line becomes one item whose
/// title carries the quantity and whose price is the line's total.
fn v1_item<'a>(line: &'a Line, sale: &Sale) -> V1Item<'a> {
    let whole = line.quantity.fract().is_zero();
    let description = line.description.as_deref().unwrap_or(&line.title);
    if whole {
        V1Item {
            title: line.title.clone(),
            currency_id: sale.currency.code(),
            description,
            quantity: line.quantity.trunc().to_u64().unwrap_or(1),
            unit_price: Amount::new(line.unit_price, sale.currency).json_number(),
        }
    } else {
        let unit = measure(line.unit_measure.as_deref());
        let title = if unit.is_empty() {
            format!("{} — {}", line.title, line.quantity)
        } else {
            format!("{} — {} {}", line.title, line.quantity, unit)
        };
        V1Item {
            title,
            currency_id: sale.currency.code(),
            description,
            quantity: 1,
            unit_price: decimal_json_number(Amount::new(line.total, sale.currency).value()),
        }
    }
}

fn order_v1(sale: &Sale, ctx: &OrderContext) -> PollAnswer {
    let body = V1Order {
        collector_id: ctx.collector_id,
        sponsor_id: ctx.sponsor_id,
        items: sale.lines.iter().map(|l| v1_item(l, sale)).collect(),
        external_reference: sale.external_reference.as_str(),
        notification_url: &ctx.notification_url,
    };
    PollAnswer {
        status: 200,
        kind: "ok",
        body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    }
}

/// The answer for a known POS in `state` (CONTRACT-NOTES, Presence and polls).
pub fn render(pos: &PosConfig, state: &PosState, ctx: &OrderContext) -> PollAnswer {
    let what = match pos.kind {
        PosKind::Fuel => "pump",
        PosKind::Vending => "machine",
    };
    let busy = state.busy_sale();
    let offline = state.presence.is_offline();
    match busy {
        // Vending is pre-pay: no money for goods the machine cannot hand out.
        _ if offline && pos.kind == PosKind::Vending => error("timeout", "the machine is offline"),
        // A fuel sale stays payable offline: the fuel is already in the tank.
        Some(s) if s.state == SaleState::Pending => order_v1(s, ctx),
        Some(_) => error("in_process", "fuelling in progress: pay when it ends"),
        None if offline => error("timeout", &format!("the {what} is offline")),
        None => error("unavailable", &format!("no pending sale on this {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::book::{apply, Command, Ctx, LineRequest, Outcome, SaleRequest};
    use crate::orders::{PosId, Presence, SaleId};
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn ctx() -> OrderContext {
        OrderContext {
            collector_id: 178106235,
            sponsor_id: Some(334249281),
            notification_url: "https://station.example.com/mp/notifications".into(),
        }
    }

    fn pos(kind: PosKind) -> PosConfig {
        PosConfig {
            id: PosId::parse("pump-3").unwrap(),
            kind,
            currency: Currency::Ars,
            ttl_secs: None,
            max_amount: Decimal::from(1_000_000),
        }
    }

    fn pending(p: &PosConfig, lines: &[(&str, &str, &str)]) -> PosState {
        let req = SaleRequest {
            sale_id: SaleId::parse("42").unwrap(),
            lines: lines
                .iter()
                .map(|(t, q, u)| LineRequest {
                    title: (*t).into(),
                    description: None,
                    quantity: Decimal::from_str(q).unwrap(),
                    unit_price: Decimal::from_str(u).unwrap(),
                    unit_measure: Some("litre".into()),
                    sku: None,
                    category: None,
                })
                .collect(),
            amount: None,
        };
        let Outcome::Changed { sale, .. } = apply(
            p,
            &PosState::idle(),
            Command::Sale(req),
            Ctx {
                now: 0,
                random: 1,
                auto_refund: false,
            },
        ) else {
            panic!()
        };
        PosState {
            presence: Presence::Unknown,
            current: Some(sale),
        }
    }

    #[test]
    fn a_fractional_line_is_one_item_with_the_quantity_in_its_title() {
        let p = pos(PosKind::Fuel);
        let st = pending(&p, &[("Super 95", "32.10", "798.00")]);
        let a = render(&p, &st, &ctx());
        assert_eq!(a.status, 200);
        let text = std::str::from_utf8(&a.body).unwrap();
        assert!(text.contains(r#""unit_price":25615.80"#), "{text}");
        assert!(text.contains(r#""quantity":1"#), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["items"][0]["title"], "Super 95 — 32.1 L");
        assert_eq!(v["items"][0]["currency_id"], "ARS");
        assert_eq!(v["collector_id"], 178106235);
        assert_eq!(v["sponsor_id"], 334249281);
        assert_eq!(
            v["notification_url"],
            "https://station.example.com/mp/notifications"
        );
        assert_eq!(
            v["external_reference"],
            st.current.as_ref().unwrap().external_reference.as_str()
        );
    }

    #[test]
    fn whole_quantities_stay_quantities() {
        let p = pos(PosKind::Vending);
        let st = pending(&p, &[("Cola", "2", "1500.50"), ("Chips", "1.000", "800")]);
        let v: serde_json::Value = serde_json::from_slice(&render(&p, &st, &ctx()).body).unwrap();
        assert_eq!(v["items"][0]["quantity"], 2);
        assert_eq!(v["items"][0]["title"], "Cola");
        assert_eq!(v["items"][1]["quantity"], 1);
        let text = String::from_utf8(render(&p, &st, &ctx()).body.to_vec()).unwrap();
        assert!(text.contains(r#""unit_price":1500.50"#), "{text}");
        assert!(text.contains(r#""unit_price":800.00"#), "{text}");
    }

    #[test]
    fn presence_decides_timeout_by_kind() {
        let fuel = pos(PosKind::Fuel);
        let vending = pos(PosKind::Vending);
        let off = Presence::Offline { since: 1 };
        let mut st = pending(&fuel, &[("Super", "1", "10")]);
        st.presence = off;
        assert_eq!(render(&fuel, &st, &ctx()).status, 200);
        assert_eq!(render(&vending, &st, &ctx()).kind, "timeout");
        let idle = PosState {
            presence: off,
            current: None,
        };
        assert_eq!(render(&fuel, &idle, &ctx()).kind, "timeout");
        assert_eq!(render(&fuel, &PosState::idle(), &ctx()).kind, "unavailable");
    }
}
