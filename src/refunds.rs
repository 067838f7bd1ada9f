//! Refunds, one payment at a time. Every call names its payment and amount
//! and carries an `X-Idempotency-Key` derived from what it refunds, so a
//! retry, a restart or a second process sends the same call and Mercado
//! Pago makes the refund once.
//!
//! - qrgate's own refunds (`[orders] auto_refund` when the money came due):
//!   [`run`] refunds what the ledgers owe, and records each refund.
//! - The operator's refunds ([`OperatorRefunds`], the admin API and the
//!   console): what a sale owes, or what a paid sale kept. A request is
//!   stored with its calls before the first one goes out, and with its
//!   answer once final, so the same `Idempotency-Key` gets the same answer
//!   after a restart and calls Mercado Pago for nothing new.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::gateway::{now_millis, Gateway};
use crate::mercadopago::client::{MpClient, MpError};
use crate::money::Amount;
use crate::orders::ledger::{Refund, RefundCall};
use crate::orders::{self, ExternalReference, MpId, RefundRefusal, Sale};
use crate::store::RefundRequest;

/// Who made a refund qrgate made by itself.
pub const BY_QRGATE: &str = "qrgate";

/// How long finished refund requests and done notifications are kept.
const KEEP_RECORDS: i64 = 48 * 3600 * 1000;

/// Makes one refund call; the refund's id.
pub async fn make(client: &MpClient, sale: &Sale, call: &RefundCall) -> Result<MpId, MpError> {
    let amount = Amount::new(call.amount, sale.currency).to_string();
    match (&call.merchant_order, &call.payment) {
        // An Orders API order is refunded through the order. Its empty body
        // refunds the whole order: right only when this payment is all of it.
        (MpId::Text(order), payment) => {
            let alone = sale
                .ledger
                .payments()
                .iter()
                .filter(|p| p.merchant_order == call.merchant_order)
                .count()
                == 1;
            let payment = payment.to_string();
            let part = (!(call.whole && alone)).then_some((payment.as_str(), amount.as_str()));
            client.refund_order_amount(order, part, &call.key).await
        }
        (MpId::Num(_), MpId::Num(payment)) => {
            let part = (!call.whole).then_some(amount.as_str());
            client
                .refund_amount(*payment, part, &call.key)
                .await
                .map(MpId::Num)
        }
        (MpId::Num(mo), MpId::Text(p)) => Err(MpError::Decode(format!(
            "payment {p} of merchant order {mo} is not a refundable id"
        ))),
    }
}

/// qrgate's own refunds: whenever one comes due, and now and then for
/// those whose call failed (or was cut by a crash).
pub async fn run(client: MpClient, gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let wake = gateway.refunds_due();
    // Calls Mercado Pago refused (a final 4xx): left to the operator, not
    // repeated every round.
    let mut refused: HashSet<String> = HashSet::new();
    let mut pruned_at = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = shutdown.cancelled() => return,
        }
        if pruned_at.elapsed() >= Duration::from_secs(3600) {
            pruned_at = Instant::now();
            if let Err(e) = gateway.store().prune(now_millis() - KEEP_RECORDS).await {
                tracing::warn!(error = %e, "cannot forget old inbox entries and refund requests");
            }
        }
        let sales = match gateway.store().pending_auto_refunds().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read refunds due from the store");
                continue;
            }
        };
        for sale in sales {
            let mut made = Vec::new();
            for call in sale.ledger.plan_owed(sale.currency, true) {
                if refused.contains(&call.key) || shutdown.is_cancelled() {
                    continue;
                }
                let result = make(&client, &sale, &call).await;
                let label = if result.is_ok() { "ok" } else { "error" };
                gateway
                    .metrics()
                    .refunds
                    .with_label_values(&["auto", label])
                    .inc();
                match result {
                    Ok(id) => made.push((
                        call.payment.clone(),
                        Refund {
                            id,
                            amount: call.amount,
                            at: now_millis(),
                            by: BY_QRGATE.into(),
                            of: call.of,
                            request: None,
                        },
                    )),
                    Err(e) if e.is_transient() => {
                        tracing::warn!(pos = %sale.pos, external_reference = %sale.external_reference,
                            payment = %call.payment, amount = %call.amount, error = %e, "refund failed; retried later");
                    }
                    Err(e) => {
                        tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                            payment = %call.payment, amount = %call.amount, error = %e,
                            "Mercado Pago refused the refund: the operator must refund it (console or Mercado Pago's panel)");
                        refused.insert(call.key.clone());
                    }
                }
            }
            if made.is_empty() {
                continue;
            }
            if let Err(e) = gateway
                .record_refunds(&sale.external_reference, &made)
                .await
            {
                tracing::error!(external_reference = %sale.external_reference, error = %e,
                    "refunds made but not recorded; retried (idempotent)");
            }
        }
    }
}

/// How long a repeat without an `Idempotency-Key` is answered from the first.
const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// How long an `Idempotency-Key`'s answer is kept in memory (the store
/// keeps it for [`KEEP_RECORDS`]).
const KEY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// An answer of the admin API: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn fail(status: u16, code: &str, message: &str) -> Answer {
    Answer {
        status,
        body: json!({"code": code, "message": message}),
    }
}

/// When a request was first seen, how long it is remembered, its answer.
type Slot = (Instant, i64, Duration, Arc<OnceCell<Answer>>);

/// The operator's refunds: one at a time (they are rare, and two at once
/// could together exceed what was paid), each request's answer kept for its
/// repeats.
pub struct OperatorRefunds {
    one_at_a_time: Mutex<()>,
    slots: std::sync::Mutex<HashMap<String, Slot>>,
    client: MpClient,
    gateway: Arc<Gateway>,
}

/// A short, stable name for a request, for the keys sent to Mercado Pago.
fn tag(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

impl OperatorRefunds {
    pub fn new(client: MpClient, gateway: Arc<Gateway>) -> OperatorRefunds {
        OperatorRefunds {
            one_at_a_time: Mutex::new(()),
            slots: std::sync::Mutex::new(HashMap::new()),
            client,
            gateway,
        }
    }

    /// The slot of a request, new or remembered: (first seen, its answer).
    fn slot(&self, key: String, keep: Duration) -> (i64, Arc<OnceCell<Answer>>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        slots.retain(|_, (at, _, keep, _)| now.duration_since(*at) < *keep);
        let s = slots
            .entry(key)
            .or_insert_with(|| (now, now_millis(), keep, Arc::new(OnceCell::new())));
        (s.1, Arc::clone(&s.3))
    }

    fn forget(&self, key: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(key);
    }

    /// An operator's refund of `reference`: `asked`, or (without an
    /// amount) what the sale owes, else all that it kept. `client_key` is
    /// the request's `Idempotency-Key`.
    pub async fn request(
        &self,
        reference: &ExternalReference,
        asked: Option<Decimal>,
        by: &str,
        client_key: Option<&str>,
    ) -> Answer {
        let amount = asked.map_or_else(|| "all".to_owned(), |a| a.normalize().to_string());
        let (slot_key, keep) = match client_key {
            Some(k) => (format!("key {reference} {k}"), KEY_WINDOW),
            None => (format!("repeat {reference} {amount}"), REPEAT_WINDOW),
        };
        let (first_seen, cell) = self.slot(slot_key.clone(), keep);
        // Without a key, a request is named by the sale, the amount and the
        // minute it was first seen in.
        let (key, tag) = match client_key {
            Some(k) => (
                format!("key {reference} {k}"),
                tag(&[reference.as_str(), k]),
            ),
            None => {
                let minute = (first_seen / 60_000).to_string();
                (
                    format!("repeat {reference} {amount} {minute}"),
                    tag(&[reference.as_str(), &amount, &minute]),
                )
            }
        };
        let answer = cell
            .get_or_init(|| self.run(reference, asked, by, key, tag))
            .await
            .clone();
        // A failure that may pass is not kept: the operator may try again.
        if answer.status >= 500 {
            self.forget(&slot_key);
        }
        answer
    }

    /// Keeps a final answer with its request.
    async fn keep(&self, key: &str, reference: &ExternalReference, plan: &str, a: &Answer) {
        let r = RefundRequest {
            key: key.to_owned(),
            external_reference: reference.to_string(),
            plan: plan.to_owned(),
            answer: Some((a.status, a.body.to_string())),
            at: now_millis(),
        };
        if let Err(e) = self.gateway.store().put_refund_request(r).await {
            tracing::error!(external_reference = %reference, error = %e,
                "cannot keep a refund request's answer: a repeat after a restart will ask Mercado Pago again (same keys, no second refund)");
        }
    }

    async fn run(
        &self,
        reference: &ExternalReference,
        asked: Option<Decimal>,
        by: &str,
        key: String,
        tag: String,
    ) -> Answer {
        let _one = self.one_at_a_time.lock().await;
        let store = self.gateway.store();
        let stored = match store.refund_request(&key).await {
            Ok(r) => r,
            Err(e) => return fail(500, "internal_error", &e.to_string()),
        };
        if let Some((status, body)) = stored.as_ref().and_then(|r| r.answer.clone()) {
            return Answer {
                status,
                body: serde_json::from_str(&body).unwrap_or(Value::Null),
            };
        }
        let sale = match self.gateway.find_sale(reference).await {
            Ok(Some(s)) => s,
            Ok(None) => return fail(404, "unknown_sale", "no such sale"),
            Err(e) => return fail(500, "internal_error", &e.to_string()),
        };
        // A request cut short (a failure, a restart) finishes the calls it
        // started with: the same keys, so nothing is refunded twice.
        let plan: Vec<RefundCall> = match stored {
            Some(r) => match serde_json::from_str(&r.plan) {
                Ok(p) => p,
                Err(e) => return fail(500, "internal_error", &format!("stored plan: {e}")),
            },
            None => match orders::refund_plan(&sale, asked, &tag) {
                Ok(p) => p,
                Err(why) => {
                    let status = match why {
                        RefundRefusal::ExceedsPaid { .. } => 422,
                        RefundRefusal::NotRefundable { .. } => 409,
                        RefundRefusal::BadAmount(_) => 400,
                    };
                    let a = fail(status, why.code(), &why.to_string());
                    self.keep(&key, reference, "[]", &a).await;
                    return a;
                }
            },
        };
        let plan_json = serde_json::to_string(&plan).unwrap_or_else(|_| "[]".into());
        let started = RefundRequest {
            key: key.clone(),
            external_reference: reference.to_string(),
            plan: plan_json.clone(),
            answer: None,
            at: now_millis(),
        };
        if let Err(e) = store.put_refund_request(started).await {
            return fail(500, "internal_error", &e.to_string());
        }
        let metrics = self.gateway.metrics();
        let mut made = Vec::new();
        let mut failed = None;
        for call in &plan {
            match make(&self.client, &sale, call).await {
                Ok(id) => {
                    metrics.refunds.with_label_values(&["operator", "ok"]).inc();
                    made.push((
                        call.payment.clone(),
                        Refund {
                            id,
                            amount: call.amount,
                            at: now_millis(),
                            by: by.to_owned(),
                            of: call.of,
                            request: Some(key.clone()),
                        },
                    ));
                }
                Err(e) => {
                    metrics
                        .refunds
                        .with_label_values(&["operator", "error"])
                        .inc();
                    tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %reference,
                        payment = %call.payment, amount = %call.amount, by, error = %e, "operator refund failed at Mercado Pago");
                    failed = Some(e);
                    break;
                }
            }
        }
        let after = if made.is_empty() {
            sale
        } else {
            match self.gateway.record_refunds(reference, &made).await {
                Ok(Some(s)) => s,
                Ok(None) => sale,
                Err(e) => {
                    tracing::error!(external_reference = %reference, error = %e,
                        "operator refund made at Mercado Pago but not recorded");
                    return fail(
                        500,
                        "internal_error",
                        "the refund was made but could not be recorded; see the log",
                    );
                }
            }
        };
        let money = |v: Decimal| Amount::new(v, after.currency).to_string();
        let answer = match failed {
            None => Answer {
                status: 200,
                body: json!({
                    "external_reference": reference,
                    "refund_id": made.last().map(|(_, r)| &r.id),
                    "refunds": made.iter().map(|(p, r)| json!({
                        "payment_id": p, "refund_id": r.id, "amount": money(r.amount),
                    })).collect::<Vec<_>>(),
                    "amount": money(plan.iter().map(|c| c.amount).sum()),
                    "refunded_total": money(after.refunded_total()),
                    "owed": money(after.ledger.owed()),
                    "state": after.state.as_str(),
                }),
            },
            // The request stays with its calls: a retry finishes them.
            Some(e) if e.is_transient() => fail(
                502,
                "mp_refund_failed",
                &format!("Mercado Pago did not refund: {e}; try again"),
            ),
            Some(e) => fail(
                409,
                "mp_refund_failed",
                &format!("Mercado Pago did not refund: {e}"),
            ),
        };
        if answer.status < 500 {
            self.keep(&key, reference, &plan_json, &answer).await;
        }
        answer
    }
}
