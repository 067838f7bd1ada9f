//! Every answer to Mercado Pago's poll, rendered in one place (docs/mercadopago.md,
//! "What the poll answers"), in the protocol each POS's account speaks. A POS's answer is
//! rendered once per change of its state and kept as bytes, so every poll of
//! the same sale returns the same body and a poll costs a map read.

use bytes::Bytes;
use serde::Serialize;

use super::order_body;
pub use super::order_body::MpAccount;
use crate::orders::{PollProtocol, PosConfig, PosKind, PosMode, PosState, SaleState};

/// What a poll answers, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollAnswer {
    pub status: u16,
    /// Why: `ok`, or the v1 error type (`unavailable`, `in_process`,
    /// `invalid`, `timeout`), or `nothing_to_pay`; for logs and metrics,
    /// whatever the protocol.
    pub kind: &'static str,
    /// A v2 order answer, sent with `order-version: 2`.
    pub v2: bool,
    pub body: Bytes,
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
        v2: false,
        body: Bytes::from(body),
    }
}

#[derive(Serialize)]
struct V2Waiting<'a> {
    status: V2Status<'a>,
}

#[derive(Serialize)]
struct V2Status<'a> {
    status_detail: &'a str,
    message: &'a str,
}

/// A v2 "nothing to pay yet" answer (HTTP 202), in MP's own spellings.
/// `kind` keeps the v1 reason, since v2 has no code for an unknown POS or
/// an offline device: both wait, logged (docs/decisions.md, "Presence and polls").
fn waiting_v2(kind: &'static str, message: &str) -> PollAnswer {
    let detail = match kind {
        "in_process" => "in_process",
        "nothing_to_pay" => "notihing_to_pay",
        _ => "Waiting_for_order",
    };
    let body = serde_json::to_vec(&V2Waiting {
        status: V2Status {
            status_detail: detail,
            message,
        },
    })
    .unwrap_or_default();
    PollAnswer {
        status: 202,
        kind,
        v2: false,
        body: Bytes::from(body),
    }
}

fn waiting(protocol: PollProtocol, kind: &'static str, message: &str) -> PollAnswer {
    match protocol {
        PollProtocol::V1 => error(kind, message),
        PollProtocol::V2 => waiting_v2(kind, message),
    }
}

/// The answer for a POS id we do not know, in the account's default protocol.
pub fn invalid(protocol: PollProtocol) -> PollAnswer {
    waiting(protocol, "invalid", "unknown point of sale")
}

/// The answer for the URL of an attended POS: Mercado Pago never polls it,
/// so whoever does has the wrong URL (v2: `Waiting_for_order`, logged).
fn attended(protocol: PollProtocol) -> PollAnswer {
    waiting(
        protocol,
        "invalid",
        "this point of sale is attended: its orders are placed through the API",
    )
}

/// The answer for a known POS in `state` (docs/decisions.md, "Presence and polls").
pub fn render(pos: &PosConfig, state: &PosState, ctx: &MpAccount) -> PollAnswer {
    let protocol = match pos.mode {
        PosMode::Unattended(p) => p,
        PosMode::Attended => return attended(ctx.poll_protocol),
    };
    let what = match pos.kind {
        PosKind::Fuel => "pump",
        PosKind::Vending => "machine",
    };
    let busy = state.busy_sale();
    let offline = state.presence.is_offline();
    let wait = |kind, message: &str| waiting(protocol, kind, message);
    match busy {
        // Vending is pre-pay: no money for goods the machine cannot hand out.
        _ if offline && pos.kind == PosKind::Vending => wait("timeout", "the machine is offline"),
        // A fuel sale stays payable offline: the fuel is already in the tank.
        Some(s) if s.state == SaleState::Pending => match protocol {
            PollProtocol::V1 => PollAnswer {
                status: 200,
                kind: "ok",
                v2: false,
                body: Bytes::from(order_body::v1(s, ctx)),
            },
            PollProtocol::V2 => PollAnswer {
                status: 200,
                kind: "ok",
                v2: true,
                body: Bytes::from(order_body::v2(s, pos.kind, ctx)),
            },
        },
        Some(_) => wait("in_process", "fuelling in progress: pay when it ends"),
        None if offline => wait("timeout", &format!("the {what} is offline")),
        // v2 tells a paid sale apart until the POS's next sale, refunded
        // or not (docs/decisions.md, "Presence and polls").
        None if protocol == PollProtocol::V2
            && state.current.as_ref().is_some_and(|s| {
                matches!(
                    s.state,
                    SaleState::Paid | SaleState::Refunded | SaleState::PartiallyRefunded
                )
            }) =>
        {
            waiting_v2("nothing_to_pay", "this sale is paid")
        }
        None => wait("unavailable", &format!("no pending sale on this {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::rules::{apply, Command, Given, LineRequest, Outcome, SaleRequest};
    use crate::orders::{PosId, Presence, SaleId};
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn ctx() -> MpAccount {
        MpAccount {
            poll_protocol: PollProtocol::V1,
            collector_id: 178106235,
            sponsor_id: Some(334249281),
            notification_url: "https://station.example.com/mp/notifications".into(),
        }
    }

    fn pos(kind: PosKind) -> PosConfig {
        PosConfig {
            ttl_secs: None,
            max_amount: Decimal::from(1_000_000),
            ..PosConfig::new(PosId::parse("pump-3").unwrap(), kind, Currency::Ars)
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
                    taxes: Vec::new(),
                })
                .collect(),
            amount: None,
        };
        let Outcome::Changed { sale, .. } = apply(
            p,
            &PosState::idle(),
            Command::Sale(req),
            Given {
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

    fn v2(kind: PosKind) -> PosConfig {
        PosConfig {
            mode: PosMode::Unattended(PollProtocol::V2),
            ..pos(kind)
        }
    }

    fn json(a: &PollAnswer) -> serde_json::Value {
        serde_json::from_slice(&a.body).unwrap()
    }

    #[test]
    fn a_v2_order_is_the_v2_body_with_line_totals_that_add_up() {
        let p = v2(PosKind::Fuel);
        let mut st = pending(
            &p,
            &[("Super 95", "32.10", "798.00"), ("Wash", "2", "1000")],
        );
        if let Some(s) = st.current.as_mut() {
            s.lines[1].sku = Some("WASH".into());
            s.lines[1].category = Some("services".into());
            s.lines[1].unit_measure = None;
            s.lines[1].taxes = vec![crate::orders::sale::Tax {
                kind: "IVA".into(),
                value: Decimal::from(19),
            }];
        }
        let a = render(&p, &st, &ctx());
        assert_eq!((a.status, a.kind, a.v2), (200, "ok", true));
        let text = std::str::from_utf8(&a.body).unwrap();
        // Exact decimals, never through f64.
        assert!(text.contains(r#""total_amount":27615.80"#), "{text}");
        assert!(text.contains(r#""quantity":32.1,"#), "{text}");
        let v = json(&a);
        assert!(v.get("collector_id").is_none() && v.get("currency_id").is_none());
        assert_eq!(v["sponsor"]["id"], 334249281);
        assert_eq!(v["notification_url"], ctx().notification_url);
        let items = v["items"].as_array().unwrap();
        assert_eq!(items[0]["sku_number"], "1");
        assert_eq!(items[0]["category"], "fuel");
        assert_eq!(items[0]["unit_measure"], "litre");
        assert!(text.contains(r#""total_amount":25615.80"#), "{text}");
        assert_eq!(items[1]["sku_number"], "WASH");
        assert_eq!(items[1]["category"], "services");
        assert_eq!(items[1]["unit_measure"], "unit");
        assert_eq!(items[1]["taxes"][0]["type"], "IVA");
        assert_eq!(items[1]["taxes"][0]["value"], 19);
        assert!(items[0].get("taxes").is_none());
        // The same sale renders the same bytes every time.
        assert_eq!(render(&p, &st, &ctx()).body, a.body);
    }

    #[test]
    fn v2_waits_with_202_in_mps_spellings() {
        let p = v2(PosKind::Fuel);
        let detail = |a: &PollAnswer| {
            assert_eq!(a.status, 202);
            assert!(!a.v2);
            json(a)["status"]["status_detail"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            detail(&render(&p, &PosState::idle(), &ctx())),
            "Waiting_for_order"
        );
        let mut st = pending(&p, &[("Super", "1", "10")]);
        let sale = st.current.as_mut().unwrap();
        sale.state = SaleState::InProcess;
        assert_eq!(detail(&render(&p, &st, &ctx())), "in_process");
        st.current.as_mut().unwrap().state = SaleState::Paid;
        assert_eq!(detail(&render(&p, &st, &ctx())), "notihing_to_pay");
        st.current.as_mut().unwrap().state = SaleState::Cancelled;
        assert_eq!(detail(&render(&p, &st, &ctx())), "Waiting_for_order");
        st.current.as_mut().unwrap().state = SaleState::Expired;
        assert_eq!(detail(&render(&p, &st, &ctx())), "Waiting_for_order");
        // No v2 code for an offline device or an unknown POS: wait, and keep why.
        let offline = PosState {
            presence: Presence::Offline { since: 1 },
            current: None,
        };
        let a = render(&v2(PosKind::Vending), &offline, &ctx());
        assert_eq!(
            (detail(&a).as_str(), a.kind),
            ("Waiting_for_order", "timeout")
        );
        let a = invalid(PollProtocol::V2);
        assert_eq!(
            (detail(&a).as_str(), a.kind),
            ("Waiting_for_order", "invalid")
        );
        assert_eq!(invalid(PollProtocol::V1).status, 400);
    }

    #[test]
    fn an_attended_pos_url_answers_invalid_whatever_its_sale() {
        let p = PosConfig {
            mode: PosMode::Attended,
            store: Some("st01".into()),
            ..pos(PosKind::Vending)
        };
        let st = pending(&p, &[("Cola", "1", "10")]);
        let a = render(&p, &st, &ctx());
        assert_eq!((a.status, a.kind), (400, "invalid"));
        assert_eq!(json(&a)["error"]["type"], "invalid");
        // On a v2 account: v2 has no code for it.
        let v2_ctx = MpAccount {
            poll_protocol: PollProtocol::V2,
            ..ctx()
        };
        let a = render(&p, &st, &v2_ctx);
        assert_eq!((a.status, a.kind), (202, "invalid"));
        assert_eq!(json(&a)["status"]["status_detail"], "Waiting_for_order");
    }
}
