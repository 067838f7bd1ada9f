//! Mercado Pago's JSON, as it really arrives: ids as numbers or strings,
//! amounts as numbers read without floats, `null` wherever a value is absent,
//! and many fields we ignore. Everything becomes domain facts here, in one
//! place; an unknown status closes nothing.

use rust_decimal::Decimal;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::money::parse_decimal;
use crate::orders::merchant_order::{
    MerchantOrderFacts, MerchantOrderStatus, PaymentFacts, PaymentStatus,
};
use crate::orders::MpId;

/// An id that may come as a JSON number or a string ("captured real
/// responses carry `order.id` as a string").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub u64);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(d)?;
        let t = raw.get();
        let t = t
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(t);
        t.trim().parse::<u64>().map(Id).map_err(|_| {
            de::Error::custom(format!(
                "not an id: {}",
                t.chars().take(32).collect::<String>()
            ))
        })
    }
}

/// An amount that may be a number, a string, or `null`.
pub(super) fn opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    let raw: Option<Box<RawValue>> = Deserialize::deserialize(d)?;
    match raw {
        None => Ok(None),
        Some(r) => {
            let t = r.get();
            if t == "null" {
                return Ok(None);
            }
            let t = t
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or(t);
            parse_decimal(t).map(Some).map_err(de::Error::custom)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Collector {
    pub id: Option<Id>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MoPayment {
    pub id: Id,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub transaction_amount: Option<Decimal>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub total_paid_amount: Option<Decimal>,
    #[serde(default)]
    pub currency_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub date_approved: Option<String>,
}

/// Mercado Pago's times (`2026-11-23T10:15:02.000-03:00`) as unix millis;
/// `None` for a missing or unreadable one.
fn millis(text: Option<&str>) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text?.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

#[derive(Debug, Clone, Deserialize)]
pub struct MerchantOrder {
    pub id: Id,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub external_reference: Option<String>,
    #[serde(default)]
    pub collector: Option<Collector>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub total_amount: Option<Decimal>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub paid_amount: Option<Decimal>,
    #[serde(default)]
    pub order_status: Option<String>,
    #[serde(default)]
    pub payments: Option<Vec<MoPayment>>,
}

/// An order of Mercado Pago's Orders API (`GET /v1/orders/{id}`). Its ids
/// are text and its amounts decimal strings; fields we do not use may be
/// anything.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiOrder {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_detail: Option<String>,
    #[serde(default)]
    pub external_reference: Option<String>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub total_amount: Option<Decimal>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub total_paid_amount: Option<Decimal>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub transactions: Option<ApiTransactions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ApiTransactions {
    #[serde(default)]
    pub payments: Option<Vec<ApiPayment>>,
    #[serde(default)]
    pub refunds: Option<Vec<ApiRefund>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiPayment {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub amount: Option<Decimal>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub paid_amount: Option<Decimal>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiRefund {
    pub id: String,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub amount: Option<Decimal>,
}

impl ApiOrder {
    /// The same facts a merchant order gives, so one rule settles both:
    /// `processed` is the Orders API's `closed`, a `processed` payment its
    /// `approved`. The order was fetched with our own token, so it is the
    /// collector's; an order without a currency is in the account's
    /// (`currency`, one account, one currency).
    /// A payment counts what it says it paid (`paid_amount`), or, alone in
    /// its order, what the order says was paid (`total_paid_amount`); never
    /// the amount requested.
    /// `None` when the order's own id is not an id: nothing can be settled
    /// from it.
    pub fn facts(&self, collector_id: u64, currency: &str) -> Option<MerchantOrderFacts> {
        let status = match self.status.as_deref() {
            Some("processed") => MerchantOrderStatus::Closed,
            Some("created" | "action_required") => MerchantOrderStatus::Opened,
            Some("expired") => MerchantOrderStatus::Expired,
            other => MerchantOrderStatus::Other(other.unwrap_or("missing").to_owned()),
        };
        let currency = self.currency.clone().unwrap_or_else(|| currency.to_owned());
        let all: Vec<&ApiPayment> = self
            .transactions
            .iter()
            .flat_map(|t| t.payments.iter().flatten())
            .collect();
        let alone = all.len() == 1;
        let payments = all
            .into_iter()
            .filter_map(|p| {
                Some(PaymentFacts {
                    id: MpId::parse(&p.id)?,
                    status: match p.status.as_deref() {
                        Some("processed") => PaymentStatus::Approved,
                        other => PaymentStatus::Other(other.unwrap_or("missing").to_owned()),
                    },
                    amount: p
                        .paid_amount
                        .or(self.total_paid_amount.filter(|_| alone))
                        .unwrap_or(Decimal::ZERO),
                    currency: Some(currency.clone()),
                    approved_at: None,
                })
            })
            .collect();
        Some(MerchantOrderFacts {
            id: MpId::parse(&self.id)?,
            status,
            external_reference: self.external_reference.clone(),
            collector_id: Some(collector_id),
            payments,
        })
    }

    /// The newest refund, after `POST /v1/orders/{id}/refund`.
    pub fn last_refund(&self) -> Option<crate::mercadopago::client::RefundMade> {
        let r = self.transactions.as_ref()?.refunds.as_ref()?.last()?;
        Some(crate::mercadopago::client::RefundMade {
            id: MpId::parse(&r.id)?,
            amount: r.amount,
        })
    }
}

impl MerchantOrder {
    pub fn facts(&self) -> MerchantOrderFacts {
        let status = match self.status.as_deref() {
            Some("opened") => MerchantOrderStatus::Opened,
            Some("closed") => MerchantOrderStatus::Closed,
            Some("expired") => MerchantOrderStatus::Expired,
            other => MerchantOrderStatus::Other(other.unwrap_or("missing").to_owned()),
        };
        let payments = self
            .payments
            .iter()
            .flatten()
            .map(|p| PaymentFacts {
                id: MpId::Num(p.id.0),
                status: match p.status.as_deref() {
                    Some("approved") => PaymentStatus::Approved,
                    other => PaymentStatus::Other(other.unwrap_or("missing").to_owned()),
                },
                // What the customer paid for the order, without MP's fees
                // or interest (those are in total_paid_amount).
                amount: p
                    .transaction_amount
                    .or(p.total_paid_amount)
                    .unwrap_or(Decimal::ZERO),
                currency: p.currency_id.clone(),
                approved_at: millis(p.date_approved.as_deref()),
            })
            .collect();
        MerchantOrderFacts {
            id: MpId::Num(self.id.0),
            status,
            external_reference: self.external_reference.clone(),
            collector_id: self.collector.as_ref().and_then(|c| c.id).map(|i| i.0),
            payments,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentOrder {
    pub id: Option<Id>,
}

/// `GET /v1/payments/{id}`: what leads to the merchant order, and the
/// payment itself for the ledger.
#[derive(Debug, Clone, Deserialize)]
pub struct Payment {
    pub id: Id,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub external_reference: Option<String>,
    #[serde(default)]
    pub order: Option<PaymentOrder>,
    #[serde(default, deserialize_with = "opt_decimal")]
    pub transaction_amount: Option<Decimal>,
    #[serde(default)]
    pub currency_id: Option<String>,
    #[serde(default)]
    pub date_approved: Option<String>,
    #[serde(default)]
    pub collector_id: Option<Id>,
}

impl Payment {
    pub fn merchant_order_id(&self) -> Option<u64> {
        self.order.as_ref().and_then(|o| o.id).map(|i| i.0)
    }

    /// The payment as a report of its own: a merchant order that is not
    /// closed (a payment alone proves no sale paid) carrying only it, so an
    /// approved payment reaches the ledger even when its merchant order
    /// does not list it yet.
    pub fn facts(&self) -> MerchantOrderFacts {
        MerchantOrderFacts {
            id: MpId::Num(self.merchant_order_id().unwrap_or(self.id.0)),
            status: MerchantOrderStatus::Opened,
            external_reference: self.external_reference.clone(),
            collector_id: self.collector_id.map(|i| i.0),
            payments: vec![PaymentFacts {
                id: MpId::Num(self.id.0),
                status: match self.status.as_deref() {
                    Some("approved") => PaymentStatus::Approved,
                    other => PaymentStatus::Other(other.unwrap_or("missing").to_owned()),
                },
                amount: self.transaction_amount.unwrap_or(Decimal::ZERO),
                currency: self.currency_id.clone(),
                approved_at: millis(self.date_approved.as_deref()),
            }],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SearchPage {
    /// Kept raw so each merchant order is stored as Mercado Pago sent it.
    #[serde(default)]
    pub elements: Option<Vec<Box<serde_json::value::RawValue>>>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub next_offset: Option<u64>,
}

/// MP's error body: `{"message": "...", "error": "...", "status": 400}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merchant order shaped like one seen in the wild: noise fields,
    /// nulls, ids of both kinds.
    const REAL_LOOKING: &str = r#"{
      "id": 1234567890, "status": "closed", "external_reference": "pump-1-abc",
      "preference_id": "178106235-5f2c", "payments": [
        { "id": 987654321, "transaction_amount": 25615.80, "total_paid_amount": 25615.80,
          "shipping_cost": 0, "currency_id": "ARS", "status": "approved",
          "status_detail": "accredited", "operation_type": "regular_payment",
          "date_approved": "2026-11-23T10:15:02.000-03:00", "date_created": "2026-11-23T10:15:00.000-03:00",
          "last_modified": "2026-11-23T10:15:02.000-03:00", "amount_refunded": 0 },
        { "id": "987654300", "transaction_amount": 25615.8, "currency_id": "ARS",
          "status": "rejected", "status_detail": "cc_rejected_other_reason", "date_approved": null }
      ],
      "shipments": [], "payouts": [], "collector": { "id": 178106235, "email": "", "nickname": "TEST" },
      "marketplace": "NONE", "notification_url": "https://x/mp/notifications", "date_created": "x",
      "last_updated": "2026-11-23T10:15:03.000-03:00", "sponsor_id": null, "shipping_cost": 0,
      "total_amount": 25615.80, "site_id": "MLA", "paid_amount": 25615.80, "refunded_amount": 0,
      "payer": { "id": 1, "email": "" }, "items": [ { "id": "", "category_id": null, "currency_id": "ARS",
      "description": null, "picture_url": null, "title": "Super 95", "quantity": 1, "unit_price": 25615.80 } ],
      "cancelled": false, "additional_info": "", "application_id": null, "order_status": "paid",
      "client_id": "1234"
    }"#;

    #[test]
    fn a_real_looking_merchant_order_parses_to_exact_facts() {
        let mo: MerchantOrder = serde_json::from_str(REAL_LOOKING).unwrap();
        let f = mo.facts();
        assert_eq!(f.id, 1234567890);
        assert_eq!(f.status, MerchantOrderStatus::Closed);
        assert_eq!(f.collector_id, Some(178106235));
        assert_eq!(f.payments.len(), 2);
        assert_eq!(f.payments[0].amount.to_string(), "25615.80");
        assert_eq!(f.payments[1].id, 987654300);
        assert_eq!(f.approved().count(), 1);
    }

    #[test]
    fn a_merchant_order_before_any_payment_has_nulls_and_still_parses() {
        let mo: MerchantOrder = serde_json::from_str(
            r#"{"id":"55","status":"opened","external_reference":null,"collector":null,
                "payments":null,"total_amount":null,"payer":null}"#,
        )
        .unwrap();
        let f = mo.facts();
        assert_eq!(f.id, 55);
        assert_eq!(f.status, MerchantOrderStatus::Opened);
        assert!(f.payments.is_empty());
        assert_eq!(f.collector_id, None);
    }

    #[test]
    fn unknown_statuses_close_nothing() {
        let mo: MerchantOrder =
            serde_json::from_str(r#"{"id":1,"status":"reverted_to_sender"}"#).unwrap();
        assert!(matches!(mo.facts().status, MerchantOrderStatus::Other(_)));
    }

    #[test]
    fn a_payment_names_its_merchant_order_as_a_string() {
        let p: Payment = serde_json::from_str(
            r#"{"id":987654321,"status":"approved","transaction_amount":10.5,
                "external_reference":"pump-1-x","order":{"id":"3453449517","type":"mercadopago"}}"#,
        )
        .unwrap();
        assert_eq!(p.merchant_order_id(), Some(3453449517));
    }

    #[test]
    fn an_orders_api_payment_counts_what_it_paid_never_what_was_asked() {
        let order = |payments: &str, total_paid: &str| -> ApiOrder {
            serde_json::from_str(&format!(
                r#"{{"id":"ORD01","status":"processed","external_reference":"pump-1-x",
                    "total_amount":"100.00"{total_paid},"currency":"ARS",
                    "transactions":{{"payments":{payments}}}}}"#
            ))
            .unwrap()
        };
        let amounts = |o: &ApiOrder| -> Vec<Decimal> {
            o.facts(1, "ARS")
                .unwrap()
                .payments
                .iter()
                .map(|p| p.amount)
                .collect()
        };
        let asked_only = r#"[{"id":"PAY01","status":"processed","amount":"100.00"}]"#;
        assert_eq!(amounts(&order(asked_only, "")), [Decimal::ZERO]);
        assert_eq!(
            amounts(&order(asked_only, r#","total_paid_amount":"40.00""#)),
            [Decimal::new(4000, 2)],
            "alone in its order, a payment counts what the order says was paid"
        );
        let paid = r#"[{"id":"PAY01","status":"processed","amount":"100.00","paid_amount":"60.00"},
                       {"id":"PAY02","status":"processed","amount":"100.00"}]"#;
        assert_eq!(
            amounts(&order(paid, r#","total_paid_amount":"100.00""#)),
            [Decimal::new(6000, 2), Decimal::ZERO]
        );
    }

    #[test]
    fn a_payment_resource_reads_as_an_open_order_holding_it() {
        let p: Payment = serde_json::from_str(
            r#"{"id":987654321,"status":"approved","transaction_amount":"25615.80","currency_id":"ARS",
                "date_approved":"2026-11-23T10:15:02.000-03:00","collector_id":178106235,
                "external_reference":"pump-1-x","order":{"id":"3453449517","type":"mercadopago"}}"#,
        )
        .unwrap();
        let f = p.facts();
        assert_eq!(f.id, 3453449517);
        assert_eq!(
            f.status,
            MerchantOrderStatus::Opened,
            "a payment alone closes nothing"
        );
        assert_eq!(f.collector_id, Some(178106235));
        assert_eq!(f.payments[0].id, 987654321);
        assert_eq!(f.payments[0].amount.to_string(), "25615.80");
        assert_eq!(f.payments[0].approved_at, Some(1_795_439_702_000));
        assert_eq!(f.approved().count(), 1);
    }

    #[test]
    fn an_empty_search_has_null_elements() {
        let s: SearchPage =
            serde_json::from_str(r#"{"elements":null,"total":0,"next_offset":0}"#).unwrap();
        assert!(s.elements.is_none());
        let s: SearchPage =
            serde_json::from_str(r#"{"elements":[{"id":1,"status":"opened"}],"total":1}"#).unwrap();
        assert_eq!(s.elements.unwrap().len(), 1);
    }
}
