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

use crate::book::Book;
use crate::clock::Clock;
use crate::mercadopago::client::{MpClient, MpError};
use crate::money::Amount;
use crate::orders::ledger::{Refund, RefundCall};
use crate::orders::{self, CannotRefund, ExternalReference, MpId, Sale};
use crate::store::{RefundRequest, StoreError};

/// Who made a refund qrgate made by itself.
pub const BY_QRGATE: &str = "qrgate";

/// Makes one refund call, and the refund as Mercado Pago made it (its
/// amount, when the answer says it; what was asked, otherwise).
pub async fn make(
    client: &MpClient,
    sale: &Sale,
    call: &RefundCall,
    by: &str,
    request: Option<&str>,
    clock: &Clock,
) -> Result<Refund, MpError> {
    let amount = Amount::new(call.amount, sale.currency).to_string();
    let made = match (&call.merchant_order, &call.payment) {
        // An Orders API order is refunded through the order, always naming
        // the payment and the amount: the same key always sends the same
        // body, however many payments the order has by then.
        (MpId::Text(order), payment) => {
            let payment = payment.to_string();
            client
                .refund_order_amount(order, Some((&payment, &amount)), &call.key)
                .await?
        }
        (MpId::Num(_), MpId::Num(payment)) => {
            let part = (!call.whole).then_some(amount.as_str());
            client.refund_amount(*payment, part, &call.key).await?
        }
        (MpId::Num(mo), MpId::Text(p)) => {
            return Err(MpError::Decode(format!(
                "payment {p} of merchant order {mo} is not a refundable id"
            )))
        }
    };
    Ok(Refund {
        id: made.id,
        amount: made.amount.unwrap_or(call.amount),
        at: clock.now_millis(),
        by: by.to_owned(),
        of: call.of,
        request: request.map(str::to_owned),
    })
}

/// qrgate's own refunds: whenever one comes due, and now and then for
/// those whose call failed (or was cut by a crash).
pub async fn run(client: MpClient, book: Arc<Book>, shutdown: CancellationToken) {
    let wake = book.refunds_due();
    // Calls Mercado Pago refused (a final 4xx): left to the operator, not
    // repeated every round.
    let mut refused: HashSet<String> = HashSet::new();
    let clock = book.clock().clone();
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = clock.sleep(Duration::from_secs(30)) => {}
            _ = shutdown.cancelled() => return,
        }
        // Operator requests a failure or a crash cut short are finished.
        finish_unanswered(&client, &book, clock.now_millis() - STALE_REQUEST).await;
        let sales = match book.store().pending_auto_refunds().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read refunds due from the store");
                continue;
            }
        };
        for sale in sales {
            if shutdown.is_cancelled() {
                return;
            }
            refund_owed(&client, &book, &sale.external_reference, &mut refused).await;
        }
    }
}

/// Refunds what one sale owes that qrgate refunds itself.
async fn refund_owed(
    client: &MpClient,
    book: &Book,
    reference: &ExternalReference,
    refused: &mut HashSet<String>,
) {
    let sale = match book.refund_turn(reference).await {
        Ok(turn) => (turn, book.stored_sale(reference).await),
        Err(e) => {
            tracing::warn!(external_reference = %reference, error = %e,
                "cannot take a sale's refund turn; tried again later");
            return;
        }
    };
    let (_turn, sale) = sale;
    let sale = match sale {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(external_reference = %reference, error = %e, "cannot read a sale that owes money");
            return;
        }
    };
    let mut made = Vec::new();
    for call in sale.ledger.plan_owed(sale.currency, true) {
        if refused.contains(&call.key) {
            continue;
        }
        let result = make(client, &sale, &call, BY_QRGATE, None, book.clock()).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        book.metrics()
            .refunds
            .with_label_values(&["auto", label])
            .inc();
        match result {
            Ok(r) => made.push((call.payment.clone(), r)),
            Err(e) if e.is_transient() => {
                tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %reference,
                    payment = %call.payment, amount = %call.amount, error = %e, "refund failed; retried later");
            }
            Err(e) => {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %reference,
                    payment = %call.payment, amount = %call.amount, error = %e,
                    "Mercado Pago refused the refund: the operator must refund it (console or Mercado Pago's panel)");
                refused.insert(call.key.clone());
            }
        }
    }
    record(book, &sale, &made).await;
}

/// Records refunds Mercado Pago made; `false` when the store failed (each
/// call is repeated later with the same key, and Mercado Pago answers with
/// the same refund).
async fn record(book: &Book, sale: &Sale, made: &[(MpId, Refund)]) -> bool {
    if made.is_empty() {
        return true;
    }
    match book.record_refunds(&sale.external_reference, made).await {
        Ok(_) => true,
        Err(e) => {
            for (payment, r) in made {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    payment = %payment, refund = %r.id, amount = %r.amount, by = %r.by, error = %e,
                    "refund made at Mercado Pago but not recorded; asked again with the same key");
            }
            false
        }
    }
}

/// What an operator's request is stored with before its first call.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredPlan {
    /// Who asked: `token` or `console`.
    by: String,
    calls: Vec<RefundCall>,
}

/// An operator request without an answer this long is finished by the
/// refunder (the operator's own repeat finishes it sooner).
const STALE_REQUEST: i64 = 120_000;

/// Finishes operator requests left without an answer since before `before`.
async fn finish_unanswered(client: &MpClient, book: &Book, before: i64) {
    let pending = match book.store().unanswered_refund_requests().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read unfinished refund requests");
            return;
        }
    };
    for r in pending.into_iter().filter(|r| r.at < before) {
        let Ok(reference) = ExternalReference::parse(&r.external_reference) else {
            continue;
        };
        let _turn = match book.refund_turn(&reference).await {
            Ok(turn) => turn,
            Err(e) => {
                tracing::warn!(external_reference = %reference, error = %e,
                    "cannot take a sale's refund turn to finish a refund request; tried again later");
                continue;
            }
        };
        let answer = finish(client, book, &r).await;
        tracing::warn!(external_reference = %reference, status = answer.status,
            "an operator's refund request cut short was finished");
    }
}

/// Makes the calls of a stored request (those already made are answered
/// from Mercado Pago's memory of their keys), records them, and keeps and
/// returns the final answer. The caller holds the sale's refund turn.
async fn finish(client: &MpClient, book: &Book, r: &RefundRequest) -> Answer {
    let Ok(reference) = ExternalReference::parse(&r.external_reference) else {
        return fail(404, "unknown_sale", "no such sale");
    };
    let StoredPlan { by, calls: plan } = match serde_json::from_str(&r.plan) {
        Ok(p) => p,
        Err(e) => return fail(500, "internal_error", &format!("stored plan: {e}")),
    };
    let sale = match book.stored_sale(&reference).await {
        Ok(Some(s)) => s,
        Ok(None) => return fail(404, "unknown_sale", "no such sale"),
        Err(e) => return fail(500, "internal_error", &e.to_string()),
    };
    let metrics = book.metrics();
    let mut made = Vec::new();
    let mut failed = None;
    for call in &plan {
        match make(client, &sale, call, &by, Some(&r.key), book.clock()).await {
            Ok(refund) => {
                metrics.refunds.with_label_values(&["operator", "ok"]).inc();
                made.push((call.payment.clone(), refund));
            }
            Err(e) => {
                metrics
                    .refunds
                    .with_label_values(&["operator", "error"])
                    .inc();
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %reference,
                    payment = %call.payment, amount = %call.amount, by = %by, error = %e,
                    "operator refund failed at Mercado Pago");
                failed = Some(e);
                break;
            }
        }
    }
    if !record(book, &sale, &made).await {
        return fail(
            500,
            "internal_error",
            "the refund was made but could not be recorded; send the request again",
        );
    }
    let after = match book.find_sale(&reference).await {
        Ok(Some(s)) => s,
        _ => sale,
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
                "amount": money(made.iter().map(|(_, r)| r.amount).sum()),
                "refunded_total": money(after.refunded_total()),
                "owed": money(after.ledger.owed()),
                "state": after.state.as_str(),
            }),
        },
        // The request stays with its calls: a retry finishes them.
        Some(e) if e.is_transient() => {
            return fail(
                502,
                "mp_refund_failed",
                &format!("Mercado Pago did not refund: {e}; try again"),
            )
        }
        Some(e) => fail(
            409,
            "mp_refund_failed",
            &format!("Mercado Pago did not refund: {e}"),
        ),
    };
    keep(book, r, &answer).await;
    answer
}

/// Keeps a final answer with its request.
async fn keep(book: &Book, r: &RefundRequest, a: &Answer) {
    let done = RefundRequest {
        answer: Some((a.status, a.body.to_string())),
        ..r.clone()
    };
    if let Err(e) = book.store().put_refund_request(done).await {
        tracing::error!(external_reference = %r.external_reference, error = %e,
            "cannot keep a refund request's answer: a repeat will ask Mercado Pago again (same keys, no second refund)");
    }
}

/// How long a repeat without an `Idempotency-Key` is answered from the first.
const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// How long an `Idempotency-Key`'s answer is kept in memory (the store
/// keeps it for [`crate::retention::KEEP_RECORDS`]).
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
    book: Arc<Book>,
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
    pub fn new(client: MpClient, book: Arc<Book>) -> OperatorRefunds {
        OperatorRefunds {
            one_at_a_time: Mutex::new(()),
            slots: std::sync::Mutex::new(HashMap::new()),
            client,
            book,
        }
    }

    /// The slot of a request, new or remembered: (first seen, its answer).
    fn slot(&self, key: String, keep: Duration) -> (i64, Arc<OnceCell<Answer>>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let clock = self.book.clock();
        let now = clock.instant();
        slots.retain(|_, (at, _, keep, _)| now.duration_since(*at) < *keep);
        let s = slots
            .entry(key)
            .or_insert_with(|| (now, clock.now_millis(), keep, Arc::new(OnceCell::new())));
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
        let (slot_key, keep_for) = match client_key {
            Some(k) => (format!("key {reference} {k}"), KEY_WINDOW),
            None => (format!("repeat {reference} {amount}"), REPEAT_WINDOW),
        };
        let (first_seen, cell) = self.slot(slot_key.clone(), keep_for);
        let answer = cell
            .get_or_init(|| self.run(reference, asked, by, client_key, &amount, first_seen))
            .await
            .clone();
        // A failure that may pass is not kept: the operator may try again.
        if answer.status >= 500 {
            self.forget(&slot_key);
        }
        answer
    }

    /// The stored request this one repeats, if any, and the key and tag of
    /// a new one. Without a client key, a request is named by the sale, the
    /// amount and the minute it was first seen in; one stored in the minute
    /// before, less than a minute ago, is the same request.
    async fn name(
        &self,
        reference: &ExternalReference,
        client_key: Option<&str>,
        amount: &str,
        first_seen: i64,
    ) -> Result<(Option<RefundRequest>, String, String), StoreError> {
        let store = self.book.store();
        if let Some(k) = client_key {
            let key = format!("key {reference} {k}");
            return Ok((
                store.refund_request(&key).await?,
                key,
                tag(&[reference.as_str(), k]),
            ));
        }
        let minute = first_seen / 60_000;
        let key_of = |m: i64| format!("repeat {reference} {amount} {m}");
        if let Some(r) = store.refund_request(&key_of(minute - 1)).await? {
            if first_seen - r.at < REPEAT_WINDOW.as_millis() as i64 {
                let key = key_of(minute - 1);
                return Ok((Some(r), key, String::new()));
            }
        }
        let key = key_of(minute);
        Ok((
            store.refund_request(&key).await?,
            key,
            tag(&[reference.as_str(), amount, &minute.to_string()]),
        ))
    }

    async fn run(
        &self,
        reference: &ExternalReference,
        asked: Option<Decimal>,
        by: &str,
        client_key: Option<&str>,
        amount: &str,
        first_seen: i64,
    ) -> Answer {
        let _one = self.one_at_a_time.lock().await;
        let _turn = match self.book.refund_turn(reference).await {
            Ok(turn) => turn,
            Err(e) => return fail(503, "unavailable", &e.to_string()),
        };
        let (stored, key, tag) = match self.name(reference, client_key, amount, first_seen).await {
            Ok(n) => n,
            Err(e) => return fail(500, "internal_error", &e.to_string()),
        };
        if let Some(r) = stored {
            return match r.answer {
                Some((status, body)) => Answer {
                    status,
                    body: serde_json::from_str(&body).unwrap_or(Value::Null),
                },
                // Cut short before: finish the same calls.
                None => finish(&self.client, &self.book, &r).await,
            };
        }
        // Another request for this sale cut short is finished first: what
        // it refunds is no longer in the ledger to plan from twice.
        match self.book.store().unanswered_refund_requests().await {
            Ok(open) => {
                for r in open
                    .iter()
                    .filter(|r| r.external_reference == reference.as_str())
                {
                    finish(&self.client, &self.book, r).await;
                }
            }
            Err(e) => return fail(500, "internal_error", &e.to_string()),
        }
        let sale = match self.book.stored_sale(reference).await {
            Ok(Some(s)) => s,
            Ok(None) => return fail(404, "unknown_sale", "no such sale"),
            Err(e) => return fail(500, "internal_error", &e.to_string()),
        };
        let request = RefundRequest {
            key,
            external_reference: reference.to_string(),
            plan: String::new(),
            answer: None,
            at: self.book.clock().now_millis(),
        };
        let plan = match orders::refund_plan(&sale, asked, &tag) {
            Ok(p) => p,
            Err(why) => {
                let status = match why {
                    CannotRefund::ExceedsPaid { .. } => 422,
                    CannotRefund::NotRefundable { .. } => 409,
                    CannotRefund::BadAmount(_) => 400,
                };
                let a = fail(status, why.code(), &why.to_string());
                keep(&self.book, &request, &a).await;
                return a;
            }
        };
        // Written before the first call: a restart finishes the same calls,
        // with the same keys.
        let stored = StoredPlan {
            by: by.to_owned(),
            calls: plan,
        };
        let request = RefundRequest {
            plan: serde_json::to_string(&stored).unwrap_or_default(),
            ..request
        };
        if let Err(e) = self.book.store().put_refund_request(request.clone()).await {
            return fail(500, "internal_error", &e.to_string());
        }
        finish(&self.client, &self.book, &request).await
    }
}
