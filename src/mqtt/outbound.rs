//! What qrgate tells a device on `{prefix}/pos/{pos}/state`: the state of its
//! current or last sale (retained), or a refusal that leaves it unchanged
//! (not retained, so a rebooting device still reads its sale).

use serde::Serialize;

use super::topics::Topics;
use crate::book::Tell;
use crate::orders::sale::ORDER_EXPIRED;
use crate::orders::{MpId, Sale, SaleState};

#[derive(Serialize)]
struct StateJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sale_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_reference: Option<&'a str>,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    /// A number, or text for a payment of MP's Orders API.
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_id: Option<&'a MpId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    merchant_order: Option<&'a MpId>,
    /// The Orders API's order, in place of a merchant order.
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a MpId>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    served: bool,
    /// What the operator has refunded in all (`refunded` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    refunded_total: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// A message for a device, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// What the book tells a device, as the device contract writes it: a sale's
/// state is retained, a rejection is not.
pub fn render(tell: &Tell, topics: &Topics) -> Message {
    match tell {
        Tell::State(sale) | Tell::Stored { sale, .. } => Message {
            topic: topics.state(sale.pos.as_str()),
            payload: state(sale),
            retain: true,
        },
        Tell::Rejected {
            pos,
            sale_id,
            code,
            message,
        } => Message {
            topic: topics.state(pos.as_str()),
            payload: rejected(sale_id.as_deref(), code, message),
            retain: false,
        },
    }
}

/// The retained state of a sale.
fn state(sale: &Sale) -> Vec<u8> {
    let settled = sale.settled.as_ref().filter(|_| {
        matches!(
            sale.state,
            SaleState::Paid | SaleState::Refunded | SaleState::PartiallyRefunded
        )
    });
    // A partial refund is `refunded` too for the device: `amount` is this
    // refund, `refunded_total` all so far (docs/decisions.md, "The console and
    // the admin API").
    let refunded = matches!(
        sale.state,
        SaleState::Refunded | SaleState::PartiallyRefunded
    );
    let last_refund = sale.ledger.last_kept_refund().filter(|_| refunded);
    let body = StateJson {
        sale_id: Some(sale.sale_id.as_str()),
        external_reference: Some(sale.external_reference.as_str()),
        state: if refunded {
            "refunded"
        } else {
            sale.state.as_str()
        },
        amount: match last_refund {
            Some(r) => Some(crate::money::Amount::new(r, sale.currency).to_string()),
            None => sale.total().map(|a| a.to_string()),
        },
        refunded_total: last_refund
            .map(|_| crate::money::Amount::new(sale.refunded_total(), sale.currency).to_string()),
        currency: Some(sale.currency.code()),
        payment_id: settled.map(|s| &s.payment_id),
        merchant_order: settled
            .map(|s| &s.merchant_order)
            .filter(|id| matches!(id, MpId::Num(_))),
        order_id: settled
            .map(|s| &s.merchant_order)
            .filter(|id| matches!(id, MpId::Text(_))),
        served: sale.state == SaleState::Pending && sale.served_at.is_some(),
        // The only retained `rejected`: Mercado Pago refused the attended
        // order, or its order expired because it could not be placed again.
        reason: (sale.state == SaleState::Rejected).then(|| match sale.rejection.as_deref() {
            Some(r) if r.starts_with(ORDER_EXPIRED) => ORDER_EXPIRED,
            _ => "mp_refused",
        }),
        message: sale.rejection.as_deref(),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A refusal: `reason` is the stable code, `message` says what to fix.
fn rejected(sale_id: Option<&str>, reason: &str, message: &str) -> Vec<u8> {
    let body = StateJson {
        sale_id,
        external_reference: None,
        state: "rejected",
        amount: None,
        currency: None,
        payment_id: None,
        merchant_order: None,
        order_id: None,
        served: false,
        refunded_total: None,
        reason: Some(reason),
        message: Some(message),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}
