//! Reconciliation, Mercado Pago's documented contingency for lost
//! notifications: every sale served to MP and not settled is searched by its
//! external reference (`/merchant_orders/search`), from `reconcile_after_secs`
//! after it was first served, about every 5 s for two minutes, then once a
//! minute, for `reconcile_window_secs`. What it finds is settled exactly like
//! a notification, so a paid sale reaches `paid` and a late payment for a
//! cancelled one becomes `refund_due`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::OrdersConfig;
use crate::gateway::{now_millis, Gateway, Settlement};
use crate::mercadopago::client::{MpClient, MpError};
use crate::orders::{ExternalReference, UnixMillis};

/// How often a served sale is searched while it is fresh, and after.
const FRESH_EVERY: i64 = 5_000;
const FRESH_FOR: i64 = 120_000;
const LATER_EVERY: i64 = 60_000;
/// Pause after a 429 that named no `Retry-After`.
const RATE_LIMIT_PAUSE: i64 = 30_000;

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
    gateway: Arc<Gateway>,
    cfg: OrdersConfig,
    shutdown: CancellationToken,
) {
    let after_ms = (cfg.reconcile_after_secs as i64).saturating_mul(1000);
    let window_ms = (cfg.reconcile_window_secs as i64).saturating_mul(1000);
    let mut last: HashMap<ExternalReference, UnixMillis> = HashMap::new();
    let mut paused_until: UnixMillis = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = now_millis();
        if now < paused_until {
            continue;
        }
        let candidates = match gateway.store().unsettled_served(now - window_ms).await {
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
            let found = match &sale.mp_order {
                Some(id) => client.order(id).await.map(|(order, raw)| {
                    let status = order.status.clone().unwrap_or_default();
                    order
                        .facts(gateway.collector_id(), sale.currency.code())
                        .map(|facts| (facts, raw, status))
                        .into_iter()
                        .collect::<Vec<_>>()
                }),
                None => client
                    .search_merchant_orders(reference.as_str())
                    .await
                    .map(|found| {
                        found
                            .into_iter()
                            .map(|(mo, raw)| (mo.facts(), raw, mo.status.unwrap_or_default()))
                            .collect()
                    }),
            };
            gateway.metrics().reconcile_runs.inc();
            match found {
                Ok(found) => {
                    let count = found.len();
                    let mut outcomes = Vec::new();
                    for (facts, raw, status) in found {
                        match gateway.settle(&facts, raw, &status).await {
                            Ok(s) => outcomes.push(s),
                            Err(e) => {
                                tracing::error!(external_reference = %reference, merchant_order = %facts.id,
                                error = %e, "reconciliation could not settle a merchant order")
                            }
                        }
                    }
                    let closed = outcomes
                        .iter()
                        .any(|o| matches!(o, Settlement::Paid { .. }));
                    let due = outcomes
                        .iter()
                        .any(|o| matches!(o, Settlement::RefundDue { .. }));
                    if closed || due {
                        gateway.metrics().reconcile_closed.inc();
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
                    paused_until = now_millis() + pause;
                    break;
                }
                Err(e) => {
                    tracing::warn!(external_reference = %reference, error = %e,
                        "reconciliation search failed; tried again later");
                }
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
