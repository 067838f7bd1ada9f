//! Reconciliation, Mercado Pago's documented contingency for lost
//! notifications: every sale served to MP and not settled is searched by its
//! external reference (`/merchant_orders/search`), from `reconcile_after_secs`
//! after it was first served, about every 5 s for two minutes, then once a
//! minute, for `reconcile_window_secs`. What it finds is settled exactly like
//! a notification, so a paid sale reaches `paid` and a late payment for a
//! cancelled one becomes `refund_due`.
//!
//! A paid sale is searched again at `[orders] recheck_after_secs` after it
//! was paid (about 10 minutes and 2 hours): a payment Mercado Pago never
//! notified, such as a second scan paid later, is found there and owed
//! back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::book::{Book, Verdict};
use crate::config::OrdersConfig;
use crate::mercadopago::client::{MpClient, MpError};
use crate::orders::merchant_order::MerchantOrderFacts;
use crate::orders::{ExternalReference, Sale, UnixMillis};

/// How often a served sale is searched while it is fresh, and after.
const FRESH_EVERY: i64 = 5_000;
const FRESH_FOR: i64 = 120_000;
const LATER_EVERY: i64 = 60_000;
/// Pause after a 429 that named no `Retry-After`.
const RATE_LIMIT_PAUSE: i64 = 30_000;
/// Paid sales searched again per round, at most.
const RECHECKS_PER_ROUND: usize = 20;

/// What Mercado Pago has for a sale: its Orders API order, or the merchant
/// orders of its reference, each with its body and status.
async fn search(
    client: &MpClient,
    book: &Book,
    sale: &Sale,
) -> Result<Vec<(MerchantOrderFacts, String, String)>, MpError> {
    match &sale.mp_order {
        Some(id) => client.order(id).await.map(|(order, raw)| {
            let status = order.status.clone().unwrap_or_default();
            order
                .facts(book.collector_id(), sale.currency.code())
                .map(|facts| (facts, raw, status))
                .into_iter()
                .collect()
        }),
        None => client
            .search_merchant_orders(sale.external_reference.as_str())
            .await
            .map(|found| {
                found
                    .into_iter()
                    .map(|(mo, raw)| (mo.facts(), raw, mo.status.unwrap_or_default()))
                    .collect()
            }),
    }
}

/// Searches again the paid sales due: `Err` carries a rate limit's pause.
async fn recheck_paid(
    client: &MpClient,
    book: &Book,
    after_secs: &[u64],
    now: UnixMillis,
) -> Result<(), Option<std::time::Duration>> {
    let store = book.store();
    for (done, after) in after_secs.iter().enumerate() {
        let done = done as u32;
        let paid_before = now - (*after as i64).saturating_mul(1000);
        let due = match store
            .due_rechecks(done, paid_before, RECHECKS_PER_ROUND)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the paid sales to search again");
                return Ok(());
            }
        };
        for r in due {
            let last = done as usize + 1 >= after_secs.len();
            let sale = match book.find_sale(&r.external_reference).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    let _ = store
                        .recheck_done(&r.external_reference, done + 1, true)
                        .await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(external_reference = %r.external_reference, error = %e, "cannot read a paid sale");
                    continue;
                }
            };
            match search(client, book, &sale).await {
                Ok(found) => {
                    let mut owed = false;
                    for (facts, raw, status) in found {
                        match book.settle(&facts, Some(raw), &status).await {
                            Ok(Verdict::RefundDue { .. }) => owed = true,
                            Ok(_) => {}
                            Err(e) => tracing::error!(external_reference = %r.external_reference,
                                merchant_order = %facts.id, error = %e, "paid sale searched again: could not settle"),
                        }
                    }
                    if owed {
                        book.metrics().reconcile_closed.inc();
                        tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %r.external_reference,
                            "a paid sale searched again had a payment nobody notified: owed back");
                    }
                    if let Err(e) = store
                        .recheck_done(&r.external_reference, done + 1, last)
                        .await
                    {
                        tracing::warn!(external_reference = %r.external_reference, error = %e, "cannot note a search of a paid sale");
                    }
                }
                Err(MpError::RateLimited { retry_after }) => return Err(retry_after),
                Err(e) => {
                    tracing::warn!(external_reference = %r.external_reference, error = %e,
                        "paid sale not searched again yet; tried later");
                }
            }
        }
    }
    Ok(())
}

/// When a sale served at `served_at` is next due, given its last search.
pub fn due(
    served_at: UnixMillis,
    last: Option<UnixMillis>,
    now: UnixMillis,
    after_ms: i64,
) -> bool {
    let age = now - served_at;
    if age < after_ms {
        return false;
    }
    let every = if age < after_ms + FRESH_FOR {
        FRESH_EVERY
    } else {
        LATER_EVERY
    };
    last.is_none_or(|l| now - l >= every)
}

pub async fn run(
    client: MpClient,
    book: Arc<Book>,
    cfg: OrdersConfig,
    shutdown: CancellationToken,
) {
    let after_ms = (cfg.reconcile_after_secs as i64).saturating_mul(1000);
    let window_ms = (cfg.reconcile_window_secs as i64).saturating_mul(1000);
    let mut last: HashMap<ExternalReference, UnixMillis> = HashMap::new();
    let mut paused_until: UnixMillis = 0;
    let clock = book.clock().clone();
    loop {
        tokio::select! {
            _ = clock.sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = clock.now_millis();
        if now < paused_until {
            continue;
        }
        let candidates = match book.store().unsettled_served(now - window_ms).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reconciliation cannot read the store");
                continue;
            }
        };
        last.retain(|r, _| candidates.iter().any(|s| &s.external_reference == r));
        for sale in candidates {
            let Some(served_at) = sale.handed_at() else {
                continue;
            };
            let reference = sale.external_reference.clone();
            if !due(served_at, last.get(&reference).copied(), now, after_ms) {
                continue;
            }
            if shutdown.is_cancelled() {
                return;
            }
            last.insert(reference.clone(), now);
            // An Orders API sale has its own order to look at; any other,
            // the merchant orders of its reference.
            let found = search(&client, &book, &sale).await;
            book.metrics().reconcile_runs.inc();
            match found {
                Ok(found) => {
                    let count = found.len();
                    let mut outcomes = Vec::new();
                    for (facts, raw, status) in found {
                        match book.settle(&facts, Some(raw), &status).await {
                            Ok(s) => outcomes.push(s),
                            Err(e) => {
                                tracing::error!(external_reference = %reference, merchant_order = %facts.id,
                                error = %e, "reconciliation could not settle a merchant order")
                            }
                        }
                    }
                    let closed = outcomes.iter().any(|o| matches!(o, Verdict::Paid { .. }));
                    let due = outcomes
                        .iter()
                        .any(|o| matches!(o, Verdict::RefundDue { .. }));
                    if closed || due {
                        book.metrics().reconcile_closed.inc();
                        tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %reference,
                            merchant_orders = count, closed, refund_due = due,
                            "reconciliation found a payment whose notification never arrived");
                    } else {
                        tracing::debug!(external_reference = %reference, merchant_orders = count,
                            "reconciliation: nothing paid yet");
                    }
                }
                Err(MpError::RateLimited { retry_after }) => {
                    let pause = retry_after.map_or(RATE_LIMIT_PAUSE, |d| d.as_millis() as i64);
                    tracing::warn!(
                        pause_ms = pause,
                        "Mercado Pago rate limits reconciliation; pausing it"
                    );
                    paused_until = clock.now_millis() + pause;
                    break;
                }
                Err(e) => {
                    tracing::warn!(external_reference = %reference, error = %e,
                        "reconciliation search failed; tried again later");
                }
            }
        }
        if clock.now_millis() >= paused_until {
            if let Err(retry_after) =
                recheck_paid(&client, &book, &cfg.recheck_after_secs, now).await
            {
                let pause = retry_after.map_or(RATE_LIMIT_PAUSE, |d| d.as_millis() as i64);
                tracing::warn!(
                    pause_ms = pause,
                    "Mercado Pago rate limits reconciliation; pausing it"
                );
                paused_until = clock.now_millis() + pause;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_served_sale_is_searched_every_5_s_for_two_minutes_then_every_minute() {
        let after = 10_000;
        assert!(!due(0, None, 9_999, after));
        assert!(due(0, None, 10_000, after));
        assert!(!due(0, Some(10_000), 14_999, after));
        assert!(due(0, Some(10_000), 15_000, after));
        assert!(!due(0, Some(200_000), 250_000, after));
        assert!(due(0, Some(200_000), 260_000, after));
    }
}
