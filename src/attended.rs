//! The attended model's order desk (MP-API.md section 3): places the order
//! of each pending sale on its POS at Mercado Pago before the device hears
//! `pending`, takes it off when the sale is cancelled or expires, and puts
//! it back if Mercado Pago dropped it while a customer retries a rejected
//! payment. Every call runs off the POS's lock, one task per job; timeouts,
//! 5xx and 429 are retried with backoff until the sale's own expiry, and a
//! 4xx is final: the sale is `rejected` with Mercado Pago's message.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AttendedApi;
use crate::gateway::{now_millis, AttendedJob, Gateway};
use crate::mercadopago::client::{MpClient, MpError};
use crate::mercadopago::order_body::{self, OrderContext};
use crate::orders::{Command, ExternalReference, MpId, Outcome, PosConfig, PosId, Sale};

/// How long a removal is retried when Mercado Pago is down: its own expiry
/// takes the order off later anyway.
const REMOVE_FOR: Duration = Duration::from_secs(15 * 60);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An Orders API order for a sale that never expires: MP's own default.
const DEFAULT_ORDER_TTL_SECS: u64 = 600;

pub struct Desk {
    /// One job at a time per POS: the instore and legacy APIs put and take
    /// "the order on this POS", whichever it is, so a late call for one sale
    /// must never land between the calls for the next.
    lanes: dashmap::DashMap<PosId, Arc<tokio::sync::Mutex<()>>>,
    /// Rejected payments already checked for (one check each).
    checked: std::sync::Mutex<std::collections::HashSet<MpId>>,
    /// Sales whose order the desk placed again after a rejected payment:
    /// that order may land after the customer paid, so it is taken off
    /// once the sale is paid.
    replaced: std::sync::Mutex<std::collections::HashSet<ExternalReference>>,
    client: MpClient,
    gateway: Arc<Gateway>,
    api: AttendedApi,
    collector_id: u64,
    ctx: OrderContext,
}

pub fn spawn(
    desk: Desk,
    mut jobs: mpsc::UnboundedReceiver<AttendedJob>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let desk = Arc::new(desk);
    // Orders a stop left unplaced are placed again; the order of a sale
    // that ended is taken off again (a removal may have been cut short).
    for sale in desk.gateway.unplaced() {
        tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
            "attended order not known to be placed: placing it again");
        tracker.spawn(Arc::clone(&desk).run(AttendedJob::Place(sale), shutdown.clone()));
    }
    for sale in desk.gateway.ended_placed() {
        tracker.spawn(Arc::clone(&desk).run(AttendedJob::Remove(sale), shutdown.clone()));
    }
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let job = tokio::select! {
                j = jobs.recv() => match j { Some(j) => j, None => break },
                _ = shutdown.cancelled() => break,
            };
            inner.spawn(Arc::clone(&desk).run(job, shutdown.clone()));
        }
    });
}

impl Desk {
    pub fn new(
        client: MpClient,
        gateway: Arc<Gateway>,
        api: AttendedApi,
        collector_id: u64,
        ctx: OrderContext,
    ) -> Desk {
        Desk {
            lanes: Default::default(),
            checked: Default::default(),
            replaced: Default::default(),
            client,
            gateway,
            api,
            collector_id,
            ctx,
        }
    }

    async fn run(self: Arc<Self>, job: AttendedJob, shutdown: CancellationToken) {
        let pos = match &job {
            AttendedJob::Place(s)
            | AttendedJob::Remove(s)
            | AttendedJob::Check(s, _)
            | AttendedJob::Paid(s) => s.pos.clone(),
        };
        let lane = Arc::clone(self.lanes.entry(pos).or_default().value());
        tokio::select! {
            _ = async {
                let _turn = lane.lock().await;
                self.work(job).await
            } => {}
            // A placement cut short is placed again at the next start, and
            // the current sale's order is taken off if it ended.
            _ = shutdown.cancelled() => {}
        }
    }

    async fn work(&self, job: AttendedJob) {
        match job {
            AttendedJob::Place(sale) => self.place(sale).await,
            AttendedJob::Remove(sale) => self.remove(&sale, None).await,
            AttendedJob::Check(sale, rejected) => {
                let first = self
                    .checked
                    .lock()
                    .map(|mut c| {
                        // Every id is noted, not only up to the first new one.
                        let fresh: Vec<bool> = rejected.into_iter().map(|p| c.insert(p)).collect();
                        fresh.contains(&true)
                    })
                    .unwrap_or(true);
                if first {
                    self.check(sale).await;
                }
            }
            AttendedJob::Paid(sale) => {
                let replaced = self
                    .replaced
                    .lock()
                    .map(|mut r| r.remove(&sale.external_reference))
                    .unwrap_or(false);
                if replaced {
                    self.remove(&sale, None).await;
                }
            }
        }
    }

    fn pos(&self, sale: &Sale) -> Option<&PosConfig> {
        self.gateway.pos_config(sale.pos.as_str())
    }

    /// Places the order; the Orders API's id for it, when that API is used.
    async fn place_once(&self, cfg: &PosConfig, sale: &Sale) -> Result<Option<String>, MpError> {
        let pos = &cfg.mp_external_id;
        match self.api {
            AttendedApi::Instore => {
                let store = cfg.store.as_deref().unwrap_or_default();
                let body = order_body::instore(sale, cfg.kind, &self.ctx, expiration(sale));
                self.client
                    .place_instore_order(self.collector_id, store, pos, &body)
                    .await
                    .map(|()| None)
            }
            AttendedApi::Legacy => {
                let body = order_body::legacy(sale, &self.ctx);
                self.client
                    .place_legacy_order(self.collector_id, pos, &body)
                    .await
                    .map(|()| None)
            }
            AttendedApi::Orders => {
                let ttl = sale
                    .expires_at
                    .map(|at| ((at - now_millis()).max(0) / 1000) as u64)
                    .unwrap_or(DEFAULT_ORDER_TTL_SECS);
                let body = order_body::orders_api(sale, pos, ttl);
                let order = self.client.create_order(&body, &create_key(sale)).await?;
                Ok(Some(order.id))
            }
        }
    }

    /// Takes the order off; `false` when it was not there any more.
    async fn remove_once(
        &self,
        cfg: &PosConfig,
        sale: &Sale,
        order: Option<&str>,
    ) -> Result<bool, MpError> {
        let pos = &cfg.mp_external_id;
        match self.api {
            AttendedApi::Instore => {
                self.client
                    .remove_instore_order(self.collector_id, pos)
                    .await
            }
            AttendedApi::Legacy => {
                self.client
                    .remove_legacy_order(self.collector_id, pos)
                    .await
            }
            AttendedApi::Orders => {
                let Some(id) = order.or(sale.mp_order.as_deref()) else {
                    return Ok(false);
                };
                let key = format!("qrgate-cancel-{}", sale.external_reference);
                match self.client.cancel_order(id, &key).await {
                    Ok(()) => Ok(true),
                    // Already paid, expired or cancelled: nothing to take off.
                    Err(MpError::Status {
                        status: 404 | 409, ..
                    }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn place(&self, sale: Sale) {
        let Some(cfg) = self.pos(&sale) else { return };
        let mut attempt = 0u32;
        let order = loop {
            if !self.gateway.is_pending(&sale.pos, &sale.external_reference) {
                // Cancelled or expired before the order was placed: whatever
                // an earlier attempt may have left is taken off.
                return self.remove(&sale, None).await;
            }
            match self.place_once(cfg, &sale).await {
                Ok(order) => break order,
                Err(e) if e.is_transient() => {
                    let wait = backoff(attempt);
                    tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        error = %e, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                        "cannot place the attended order yet; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    let reason = match &e {
                        MpError::Status { message, .. } => message.clone(),
                        other => other.to_string(),
                    };
                    let cmd = Command::Refused {
                        reference: sale.external_reference.clone(),
                        reason,
                    };
                    if let Err(e) = self.gateway.execute(&sale.pos, cmd).await {
                        tracing::error!(pos = %sale.pos, external_reference = %sale.external_reference,
                            error = %e, "cannot record that Mercado Pago refused the order");
                    }
                    // An earlier attempt whose answer was lost may have
                    // placed it after all.
                    if attempt > 0 {
                        self.remove(&sale, None).await;
                    }
                    return;
                }
            }
        };
        let placed = Command::Placed {
            reference: sale.external_reference.clone(),
            order: order.clone(),
        };
        match self.gateway.execute(&sale.pos, placed).await {
            Ok(Outcome::Changed { .. }) => {}
            Ok(_) => {
                // Placed for a sale that ended meanwhile (or was placed
                // already, after a restart): an order nobody can pay for
                // must not stay on the POS.
                if !self.gateway.is_pending(&sale.pos, &sale.external_reference) {
                    self.remove(&sale, order.as_deref()).await;
                }
            }
            Err(e) => {
                tracing::error!(pos = %sale.pos, external_reference = %sale.external_reference, error = %e,
                    "attended order placed but not recorded; placed again at the next start");
            }
        }
    }

    async fn remove(&self, sale: &Sale, order: Option<&str>) {
        let Some(cfg) = self.pos(sale) else { return };
        let until = tokio::time::Instant::now() + REMOVE_FOR;
        let mut attempt = 0u32;
        loop {
            // A newer sale on the same POS has its own order there now:
            // removing would take the wrong one (the Orders API removes by
            // order, not by POS).
            if self.api != AttendedApi::Orders
                && self
                    .gateway
                    .has_newer_sale(&sale.pos, &sale.external_reference)
            {
                tracing::info!(pos = %sale.pos, external_reference = %sale.external_reference,
                    "a newer sale is on the POS: its order stays");
                return;
            }
            match self.remove_once(cfg, sale, order).await {
                Ok(found) => {
                    tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        found, "attended order removed from the POS");
                    return;
                }
                Err(e) if e.is_transient() && tokio::time::Instant::now() < until => {
                    let wait = backoff(attempt);
                    tracing::warn!(pos = %sale.pos, external_reference = %sale.external_reference, error = %e,
                        attempt = attempt + 1, "cannot remove the attended order yet; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        error = %e, "cannot remove the attended order: it stays on the POS until it expires; \
                        a payment for it will be refund_due");
                    return;
                }
            }
        }
    }

    /// After a rejected payment: the order should still be on the POS for
    /// the customer's retry; if Mercado Pago dropped it, place it again.
    async fn check(&self, sale: Sale) {
        let Some(cfg) = self.pos(&sale) else { return };
        match self.api {
            AttendedApi::Instore => {}
            // The legacy API has no way to ask: place it again (it replaces).
            AttendedApi::Legacy => return self.place_again(sale).await,
            // An Orders API order stays `created` through a rejected payment
            // and is never dropped before its expiry.
            AttendedApi::Orders => return,
        }
        match self
            .client
            .instore_order_present(self.collector_id, &cfg.mp_external_id)
            .await
        {
            Ok(true) => {
                tracing::info!(pos = %sale.pos, external_reference = %sale.external_reference,
                    "payment rejected: the attended order is still on the POS for a retry");
            }
            Ok(false) => self.place_again(sale).await,
            Err(e) => {
                tracing::warn!(pos = %sale.pos, external_reference = %sale.external_reference, error = %e,
                    "cannot check the attended order after a rejected payment");
            }
        }
    }

    async fn place_again(&self, sale: Sale) {
        if !self.gateway.is_pending(&sale.pos, &sale.external_reference) {
            return;
        }
        tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
            "the attended order is gone from the POS while the sale is pending: placing it again");
        let Some(cfg) = self.pos(&sale) else { return };
        // Noted first: from here on the order may land after the payment.
        if let Ok(mut r) = self.replaced.lock() {
            r.insert(sale.external_reference.clone());
        }
        match self.place_once(cfg, &sale).await {
            // Paid, cancelled or expired while the call ran: the order just
            // placed must not outlive the sale.
            Ok(order) if !self.gateway.is_pending(&sale.pos, &sale.external_reference) => {
                self.remove(&sale, order.as_deref()).await;
            }
            Ok(_) => {
                tracing::info!(pos = %sale.pos, external_reference = %sale.external_reference,
                    "attended order placed again");
            }
            Err(e) => {
                tracing::error!(pos = %sale.pos, external_reference = %sale.external_reference,
                    error = %e, "cannot place the attended order again");
            }
        }
    }
}

/// The Orders API's idempotency key for a sale's order: a retry, or a
/// restart, finds the order already created instead of creating another.
fn create_key(sale: &Sale) -> String {
    format!("qrgate-order-{}", sale.external_reference)
}

/// The order expires with the sale (CONTRACT-NOTES); a sale that never
/// expires leaves Mercado Pago's own default (10 minutes).
fn expiration(sale: &Sale) -> Option<DateTime<FixedOffset>> {
    let at = sale.expires_at?;
    Utc.timestamp_millis_opt(at)
        .single()
        .map(|t| t.fixed_offset())
}

fn backoff(attempt: u32) -> Duration {
    let exp = Duration::from_millis(500).saturating_mul(1u32 << attempt.min(8));
    let capped = exp.min(BACKOFF_MAX);
    Duration::from_millis(rand::random::<u64>() % (capped.as_millis() as u64 + 1))
        .max(Duration::from_millis(100))
}
