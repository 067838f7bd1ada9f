//! The attended model's order desk (docs/mercadopago.md, "The attended model"): places the order
//! of each pending sale on its POS at Mercado Pago before the device hears
//! `pending`, takes it off when the sale is cancelled or expires, and puts
//! it back if Mercado Pago dropped it while a customer retries a rejected
//! payment. Every call runs off the POS's lock, one task per job; timeouts,
//! 5xx and 429 are retried with backoff until the sale's own expiry, and a
//! 4xx is final: the sale is `rejected` with Mercado Pago's message.
//!
//! Mercado Pago expires an attended order on its own clock (10 minutes by
//! default), while a sale may stay pending for hours (`ttl_secs = 0`). An
//! order that would die before its sale is placed again `renew_lead_secs`
//! before it expires, as often as needed; when that cannot be done in time
//! the sale ends `rejected` (`mp_order_expired`) instead of staying pending
//! with nothing to pay (docs/decisions.md, "Attended orders at Mercado Pago").

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::book::{AttendedJob, Book, Verdict};
use crate::config::{AttendedApi, AttendedOrderLife};
use crate::mercadopago::client::{MpClient, MpError};
use crate::mercadopago::order_body::{self, MpAccount};
use crate::orders::{
    Command, ExternalReference, MpId, Outcome, PosConfig, PosId, PosMode, Sale, SaleState,
    UnixMillis,
};

/// How long a removal is retried when Mercado Pago is down: its own expiry
/// takes the order off later anyway.
const REMOVE_FOR: Duration = Duration::from_secs(15 * 60);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an old Orders API order with a payment in process is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// The stable word that starts the reason of a sale ended because its order
/// could not be placed again before Mercado Pago expired it (devices/README).
pub use crate::orders::sale::ORDER_EXPIRED;

pub struct Placer {
    /// One job at a time per POS: the instore and legacy APIs put and take
    /// "the order on this POS", whichever it is, so a late call for one sale
    /// must never land between the calls for the next.
    lanes: dashmap::DashMap<PosId, Arc<tokio::sync::Mutex<()>>>,
    /// Rejected payments already checked for (one check each).
    checked: std::sync::Mutex<HashSet<MpId>>,
    /// Sales whose order the desk placed again (after a rejected payment,
    /// or before Mercado Pago expired it): that order may land after the
    /// customer paid, so it is taken off once the sale is paid.
    replaced: std::sync::Mutex<HashSet<ExternalReference>>,
    /// Sales whose order is kept alive: one renewal loop each.
    renewing: std::sync::Mutex<HashSet<ExternalReference>>,
    client: MpClient,
    book: Arc<Book>,
    api: AttendedApi,
    collector_id: u64,
    ctx: MpAccount,
    life: AttendedOrderLife,
    /// Where renewal loops and watches run, set by [`spawn`].
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

pub fn spawn(
    mut desk: Placer,
    mut jobs: mpsc::UnboundedReceiver<AttendedJob>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    desk.tasks = tracker.clone();
    desk.shutdown = shutdown.clone();
    let desk = Arc::new(desk);
    // Orders a stop left unplaced are placed again; the order of a sale
    // that ended is taken off again (a removal may have been cut short).
    for sale in desk.book.unplaced() {
        tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
            "attended order not known to be placed: placing it again");
        tracker.spawn(Arc::clone(&desk).run(AttendedJob::Place(sale), shutdown.clone()));
    }
    for sale in desk.book.ended_placed() {
        tracker.spawn(Arc::clone(&desk).run(AttendedJob::Remove(sale), shutdown.clone()));
    }
    // Renewals a stop interrupted: when the order was last placed is not
    // stored, so it is counted from the first placement, which can only
    // place it again earlier than needed (harmless), never later.
    for sale in desk.placed_pending() {
        if let Some(placed_at) = sale.placed_at {
            let expires = desk.order_expiry(placed_at, sale.expires_at);
            desk.keep_alive(&sale, expires);
        }
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

/// What a placement left at Mercado Pago.
struct Placement {
    /// The Orders API's id for it, when that API is used.
    order: Option<String>,
    /// When Mercado Pago stops taking payments for it.
    expires: UnixMillis,
}

/// What became of an Orders API order qrgate tried to cancel.
enum Retired {
    /// Cancelled, or not there any more: nobody can pay it.
    Gone,
    /// A customer paid it: the sale is settled from it.
    Paid,
    /// It may still take (or be taking) a payment: watched until it is final.
    Watched,
}

impl Placer {
    pub fn new(
        client: MpClient,
        book: Arc<Book>,
        api: AttendedApi,
        collector_id: u64,
        ctx: MpAccount,
    ) -> Placer {
        Placer {
            lanes: Default::default(),
            checked: Default::default(),
            replaced: Default::default(),
            renewing: Default::default(),
            client,
            book,
            api,
            collector_id,
            ctx,
            life: AttendedOrderLife::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// How long orders live at Mercado Pago and when they are placed again
    /// (`[mercadopago] attended_order_lifetime_secs`, `attended_renew_lead_secs`).
    pub fn with_order_life(mut self, life: AttendedOrderLife) -> Placer {
        self.life = life;
        self
    }

    async fn run(self: Arc<Self>, job: AttendedJob, shutdown: CancellationToken) {
        let pos = match &job {
            AttendedJob::Place(s)
            | AttendedJob::Remove(s)
            | AttendedJob::Check(s, _)
            | AttendedJob::Paid(s) => s.pos.clone(),
        };
        let lane = self.lane(&pos);
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

    fn lane(&self, pos: &PosId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.lanes.entry(pos.clone()).or_default().value())
    }

    async fn work(self: &Arc<Self>, job: AttendedJob) {
        match job {
            AttendedJob::Place(sale) => self.place(sale).await,
            AttendedJob::Remove(sale) => {
                self.forget_replaced(&sale.external_reference);
                self.remove(&sale, None).await
            }
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
                if self.forget_replaced(&sale.external_reference) {
                    self.remove(&sale, None).await;
                }
            }
        }
    }

    /// Whether the sale's order was placed again; forgets it.
    fn forget_replaced(&self, reference: &ExternalReference) -> bool {
        self.replaced
            .lock()
            .map(|mut r| r.remove(reference))
            .unwrap_or(false)
    }

    fn note_replaced(&self, reference: &ExternalReference) {
        if let Ok(mut r) = self.replaced.lock() {
            r.insert(reference.clone());
        }
    }

    fn pos(&self, sale: &Sale) -> Option<&PosConfig> {
        self.book.pos_config(sale.pos.as_str())
    }

    /// When an order placed at `now` stops being payable at Mercado Pago.
    fn order_expiry(&self, now: UnixMillis, sale_expires: Option<UnixMillis>) -> UnixMillis {
        order_expiry(self.api, self.life, now, sale_expires)
    }

    /// Places the order; `key` is the Orders API's idempotency key for it.
    async fn place_once(
        &self,
        cfg: &PosConfig,
        sale: &Sale,
        key: &str,
    ) -> Result<Placement, MpError> {
        let pos = &cfg.mp_external_id;
        let now = self.book.clock().now_millis();
        let expires = self.order_expiry(now, sale.expires_at);
        match self.api {
            AttendedApi::Instore => {
                let store = cfg.store.as_deref().unwrap_or_default();
                let body = order_body::instore(sale, cfg.kind, &self.ctx, expiration(expires));
                self.client
                    .place_instore_order(self.collector_id, store, pos, &body)
                    .await?;
                Ok(Placement {
                    order: None,
                    expires,
                })
            }
            AttendedApi::Legacy => {
                let body = order_body::legacy(sale, &self.ctx);
                self.client
                    .place_legacy_order(self.collector_id, pos, &body)
                    .await?;
                Ok(Placement {
                    order: None,
                    expires,
                })
            }
            AttendedApi::Orders => {
                let body = order_body::orders_api(sale, pos, ttl_secs(now, expires));
                let order = self.client.create_order(&body, key).await?;
                Ok(Placement {
                    order: Some(order.id),
                    expires,
                })
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
                match self.client.cancel_order(id, &cancel_key(id)).await {
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

    async fn place(self: &Arc<Self>, sale: Sale) {
        let Some(cfg) = self.pos(&sale) else { return };
        let mut attempt = 0u32;
        let placed = loop {
            if !self.book.is_pending(&sale.pos, &sale.external_reference) {
                // Cancelled or expired before the order was placed: whatever
                // an earlier attempt may have left is taken off.
                return self.remove(&sale, None).await;
            }
            match self.place_once(cfg, &sale, &create_key(&sale)).await {
                Ok(placed) => break placed,
                Err(e) if e.is_transient() => {
                    let wait = backoff(attempt);
                    tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        error = %e, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                        "cannot place the attended order yet; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    let cmd = Command::Refused {
                        reference: sale.external_reference.clone(),
                        reason: mp_message(&e),
                    };
                    if let Err(e) = self.book.execute(&sale.pos, cmd).await {
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
        let cmd = Command::Placed {
            reference: sale.external_reference.clone(),
            order: placed.order.clone(),
        };
        match self.book.execute(&sale.pos, cmd).await {
            Ok(Outcome::Changed {
                sale: placed_sale, ..
            }) => {
                self.keep_alive(&placed_sale, placed.expires);
            }
            Ok(_) => {
                // Placed for a sale that ended meanwhile (or was placed
                // already, after a restart): an order nobody can pay for
                // must not stay on the POS.
                if !self.book.is_pending(&sale.pos, &sale.external_reference) {
                    self.remove(&sale, placed.order.as_deref()).await;
                } else {
                    self.keep_alive(&sale, placed.expires);
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
                    .book
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
        if !self.book.is_pending(&sale.pos, &sale.external_reference) {
            return;
        }
        tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
            "the attended order is gone from the POS while the sale is pending: placing it again");
        let Some(cfg) = self.pos(&sale) else { return };
        // Noted first: from here on the order may land after the payment.
        self.note_replaced(&sale.external_reference);
        match self.place_once(cfg, &sale, &create_key(&sale)).await {
            // Paid, cancelled or expired while the call ran: the order just
            // placed must not outlive the sale.
            Ok(placed) if !self.book.is_pending(&sale.pos, &sale.external_reference) => {
                self.remove(&sale, placed.order.as_deref()).await;
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

    // ---- keeping an order alive while its sale is pending --------------

    /// Pending attended sales whose order is placed.
    fn placed_pending(&self) -> Vec<Sale> {
        self.book
            .pos_configs()
            .filter(|c| c.mode == PosMode::Attended)
            .filter_map(|c| self.book.view(&c.id))
            .filter_map(|v| v.state.current.clone())
            .filter(|s| s.state == SaleState::Pending && s.placed_at.is_some())
            .collect()
    }

    /// The sale as its POS has it now, if it is still pending.
    fn pending_sale(&self, pos: &PosId, reference: &ExternalReference) -> Option<Sale> {
        self.book
            .view(pos)?
            .state
            .current
            .clone()
            .filter(|s| &s.external_reference == reference && s.state == SaleState::Pending)
    }

    /// Starts placing the sale's order again before each of its orders
    /// expires at Mercado Pago (`expires`: the current one's), while the
    /// sale is pending. One loop per sale.
    fn keep_alive(self: &Arc<Self>, sale: &Sale, expires: UnixMillis) {
        if renew_at(expires, sale.expires_at, self.life.renew_lead_secs).is_none() {
            return;
        }
        let fresh = self
            .renewing
            .lock()
            .map(|mut r| r.insert(sale.external_reference.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let desk = Arc::clone(self);
        let (pos, reference) = (sale.pos.clone(), sale.external_reference.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = desk.renew_loop(&pos, &reference, expires) => {}
                // Started again at the next start, counted from the first
                // placement.
                _ = desk.shutdown.cancelled() => {}
            }
            if let Ok(mut r) = desk.renewing.lock() {
                r.remove(&reference);
            }
        });
    }

    async fn renew_loop(
        self: &Arc<Self>,
        pos: &PosId,
        reference: &ExternalReference,
        mut expires: UnixMillis,
    ) {
        loop {
            let Some(sale) = self.pending_sale(pos, reference) else {
                return;
            };
            let Some(at) = renew_at(expires, sale.expires_at, self.life.renew_lead_secs) else {
                return;
            };
            self.book.clock().sleep_until(at).await;
            let lane = self.lane(pos);
            let _turn = lane.lock().await;
            // Read again under the lane: a payment, a cancel or a new order
            // id may have come meanwhile.
            let Some(sale) = self.pending_sale(pos, reference) else {
                return;
            };
            match self.renew(&sale, expires).await {
                Some(next) => expires = next,
                None => return,
            }
        }
    }

    /// Places the pending sale's order again before the current one stops
    /// being payable at `expires`. The new expiry, or `None` when the sale
    /// is over (paid or ended meanwhile, or ended here because Mercado Pago
    /// would not take the order again in time).
    async fn renew(self: &Arc<Self>, sale: &Sale, expires: UnixMillis) -> Option<UnixMillis> {
        let cfg = self.pos(sale)?;
        // An order already past its expiry (qrgate was stopped) still gets
        // the lead time to be placed again.
        let lead_ms = secs_ms(self.life.renew_lead_secs);
        let give_up_at = expires.max(self.book.clock().now_millis().saturating_add(lead_ms));
        let old = sale.mp_order.clone();
        let key = old.as_deref().map_or_else(|| create_key(sale), renew_key);
        // Noted first: from here on the order may land after the payment.
        self.note_replaced(&sale.external_reference);
        let mut attempt = 0u32;
        let placed = loop {
            match self.place_once(cfg, sale, &key).await {
                Ok(placed) => break placed,
                Err(e) if e.is_transient() => {
                    let wait = backoff(attempt);
                    let late = self
                        .book
                        .clock()
                        .now_millis()
                        .saturating_add(wait.as_millis() as i64)
                        >= give_up_at;
                    if !self.book.is_pending(&sale.pos, &sale.external_reference) {
                        // Ended meanwhile; an attempt whose answer was lost
                        // may have placed it.
                        self.remove(sale, None).await;
                        return None;
                    }
                    if late {
                        let why = format!(
                            "{ORDER_EXPIRED}: Mercado Pago could not be reached to place the order \
                             again before it expired ({e})"
                        );
                        self.give_up(sale, old.as_deref(), why).await;
                        return None;
                    }
                    tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        error = %e, attempt = attempt + 1, wait_ms = wait.as_millis() as u64,
                        "cannot place the attended order again yet; retrying before it expires");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    let why = format!(
                        "{ORDER_EXPIRED}: Mercado Pago refused to place the order again before it \
                         expired: {}",
                        mp_message(&e)
                    );
                    self.give_up(sale, old.as_deref(), why).await;
                    return None;
                }
            }
        };
        match placed.order {
            // Instore and legacy: the new order replaced the old one on the
            // POS, same reference; nothing else is live.
            None => {
                if !self.book.is_pending(&sale.pos, &sale.external_reference) {
                    // Paid or ended while the call ran: the order just placed
                    // must not outlive the sale.
                    self.remove(sale, None).await;
                    return None;
                }
                tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    expires_at = %millis_text(placed.expires),
                    "attended order placed again before Mercado Pago expires it");
                Some(placed.expires)
            }
            Some(new) => {
                self.replace(sale, old.as_deref(), new, placed.expires)
                    .await
            }
        }
    }

    /// The Orders API made `new` for the sale: it becomes the sale's order,
    /// then the old one is cancelled, so one order at a time can be paid.
    async fn replace(
        self: &Arc<Self>,
        sale: &Sale,
        old: Option<&str>,
        new: String,
        expires: UnixMillis,
    ) -> Option<UnixMillis> {
        let cmd = Command::Replaced {
            reference: sale.external_reference.clone(),
            order: new.clone(),
        };
        match self.book.execute(&sale.pos, cmd).await {
            Ok(Outcome::Changed { .. }) => {}
            Ok(_) => {
                // Paid (perhaps through the old order) or ended while the
                // new one was created: nobody may pay the new one. The old
                // one is the sale's recorded order, which the follow-up of
                // whatever ended the sale takes off.
                self.remove(sale, Some(&new)).await;
                return None;
            }
            Err(e) => {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    order = %new, error = %e,
                    "new Orders API order not recorded: cancelled; the old one stays until it expires");
                self.remove(sale, Some(&new)).await;
                return None;
            }
        }
        tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
            order = %new, replaced = old, expires_at = %millis_text(expires),
            "attended order placed again before Mercado Pago expires it");
        if let Some(old) = old.filter(|o| *o != new) {
            self.retire(sale, old).await;
        }
        Some(expires)
    }

    /// Cancels an Orders API order the sale no longer uses. One a customer
    /// paid (or is paying) while the next was being created cannot be
    /// cancelled: it is looked at and settled instead, since its
    /// notification may be lost and reconciliation only looks at the sale's
    /// current order.
    async fn retire(self: &Arc<Self>, sale: &Sale, id: &str) -> Retired {
        match self.client.cancel_order(id, &cancel_key(id)).await {
            Ok(()) => {
                tracing::info!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    order = id, "old Orders API order cancelled");
                Retired::Gone
            }
            Err(e) if e.is_not_found() => Retired::Gone,
            Err(e) => {
                if e.status() == Some(409) {
                    tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        order = id, "old Orders API order cannot be cancelled: a customer may have paid it; looking at it");
                } else {
                    tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                        order = id, error = %e,
                        "cannot cancel the old Orders API order: it stays payable until it expires, and is watched");
                }
                match self.look_at(sale, id).await {
                    Some(true) => Retired::Paid,
                    Some(false) => Retired::Gone,
                    None => {
                        self.watch(sale.clone(), id.to_owned());
                        Retired::Watched
                    }
                }
            }
        }
    }

    /// Fetches an Orders API order and settles the sale from it. `Some(paid)`
    /// once the order is final; `None` while it may still take a payment (or
    /// cannot be fetched).
    async fn look_at(&self, sale: &Sale, id: &str) -> Option<bool> {
        let (order, raw) = match self.client.order(id).await {
            Ok(found) => found,
            Err(e) if e.is_not_found() => return Some(false),
            Err(e) => {
                tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference, order = id,
                    error = %e, "cannot look at the old Orders API order");
                return None;
            }
        };
        let status = order.status.clone().unwrap_or_default();
        let open = matches!(status.as_str(), "created" | "action_required");
        let Some(facts) = order.facts(self.collector_id, sale.currency.code()) else {
            return Some(false);
        };
        match self.book.settle(&facts, Some(raw), &status).await {
            Ok(Verdict::Paid { .. }) => {
                tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    order = id, "the old Orders API order was paid while its sale's order was placed again: sale paid");
                Some(true)
            }
            Ok(_) => (!open).then_some(false),
            Err(e) => {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference, order = id,
                    error = %e, "cannot settle the old Orders API order");
                None
            }
        }
    }

    /// Looks at an old Orders API order until it is final, so a payment in
    /// process on it is settled even if its notification is lost.
    fn watch(self: &Arc<Self>, sale: Sale, id: String) {
        let desk = Arc::clone(self);
        self.tasks.spawn(async move {
            let until = tokio::time::Instant::now() + REMOVE_FOR;
            let mut wait = WATCH_EVERY;
            while tokio::time::Instant::now() < until {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = desk.shutdown.cancelled() => return,
                }
                if desk.look_at(&sale, &id).await.is_some() {
                    return;
                }
                wait = (wait * 2).min(BACKOFF_MAX);
            }
            tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                order = %id, "stopped watching the old Orders API order: a payment on it is settled by its notification");
        });
    }

    /// Mercado Pago will not take the sale's order again in time: the sale
    /// ends with `why`, told to the device and the operator, and its old
    /// order is taken off, unless a customer just paid it.
    async fn give_up(self: &Arc<Self>, sale: &Sale, old: Option<&str>, why: String) {
        if self.api == AttendedApi::Orders {
            if let Some(old) = old {
                // Cancelled first: a payment that beat the cancel pays the
                // sale instead of being owed back.
                if let Retired::Paid = self.retire(sale, old).await {
                    return;
                }
            }
        }
        self.forget_replaced(&sale.external_reference);
        let cmd = Command::Refused {
            reference: sale.external_reference.clone(),
            reason: why.clone(),
        };
        match self.book.execute(&sale.pos, cmd).await {
            Ok(Outcome::Changed { .. }) => {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    reason = %why, "attended order could not be placed again before it expired: sale rejected");
            }
            Ok(_) => return,
            Err(e) => {
                tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                    error = %e, reason = %why, "cannot record that the attended order expired");
            }
        }
        if self.api != AttendedApi::Orders {
            self.remove(sale, None).await;
        }
    }
}

/// The Orders API's idempotency key for a sale's first order: a retry, or a
/// restart, finds the order already created instead of creating another.
fn create_key(sale: &Sale) -> String {
    format!("qrgate-order-{}", sale.external_reference)
}

/// The key of the order that replaces order `old`: one replacement per
/// order, whatever retries and restarts happen on the way, and a new key
/// for each replacement (Mercado Pago answers a key it knows with the
/// order it made for it).
fn renew_key(old: &str) -> String {
    format!("qrgate-renew-{old}")
}

/// Cancels are keyed by order: a sale may have had several.
fn cancel_key(order: &str) -> String {
    format!("qrgate-cancel-{order}")
}

/// Mercado Pago's own words for a refusal.
fn mp_message(e: &MpError) -> String {
    match e {
        MpError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)
}

/// When an order qrgate places at `now` stops being payable at Mercado
/// Pago. The instore and Orders APIs are told: with the sale when it has an
/// expiry, else after the configured lifetime. The legacy API is told
/// nothing and keeps its own 10 minutes.
pub fn order_expiry(
    api: AttendedApi,
    life: AttendedOrderLife,
    now: UnixMillis,
    sale_expires: Option<UnixMillis>,
) -> UnixMillis {
    let own = now.saturating_add(secs_ms(life.lifetime_secs_for(api)));
    match (api, sale_expires) {
        (AttendedApi::Instore | AttendedApi::Orders, Some(at)) => at,
        (AttendedApi::Legacy, _) | (_, None) => own,
    }
}

/// When an order that stops being payable at `order_expires` must be placed
/// again: `lead_secs` before, unless the sale itself expires first.
pub fn renew_at(
    order_expires: UnixMillis,
    sale_expires: Option<UnixMillis>,
    lead_secs: u64,
) -> Option<UnixMillis> {
    if sale_expires.is_some_and(|at| at <= order_expires) {
        return None;
    }
    Some(order_expires.saturating_sub(secs_ms(lead_secs)))
}

/// The Orders API's `expiration_time` for an order placed at `now`, whole
/// seconds rounded up so it never dies before we count it dead.
fn ttl_secs(now: UnixMillis, expires: UnixMillis) -> u64 {
    let ms = u64::try_from(expires.saturating_sub(now)).unwrap_or(0);
    ms.div_ceil(1000).max(1)
}

fn expiration(at: UnixMillis) -> Option<DateTime<FixedOffset>> {
    Utc.timestamp_millis_opt(at)
        .single()
        .map(|t| t.fixed_offset())
}

fn millis_text(at: UnixMillis) -> String {
    expiration(at).map_or_else(|| at.to_string(), |t| t.to_rfc3339())
}

fn backoff(attempt: u32) -> Duration {
    let exp = Duration::from_millis(500).saturating_mul(1u32 << attempt.min(8));
    let capped = exp.min(BACKOFF_MAX);
    Duration::from_millis(rand::random::<u64>() % (capped.as_millis() as u64 + 1))
        .max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn life(lifetime_secs: u64, renew_lead_secs: u64) -> AttendedOrderLife {
        AttendedOrderLife {
            lifetime_secs,
            renew_lead_secs,
        }
    }

    #[test]
    fn an_order_of_a_sale_that_never_expires_lives_the_configured_lifetime_and_is_renewed_ahead() {
        let l = life(600, 60);
        for api in [
            AttendedApi::Instore,
            AttendedApi::Orders,
            AttendedApi::Legacy,
        ] {
            let expires = order_expiry(api, l, 1_000, None);
            assert_eq!(expires, 1_000 + 10 * MIN, "{api:?}");
            assert_eq!(renew_at(expires, None, 60), Some(1_000 + 9 * MIN));
        }
    }

    #[test]
    fn an_order_that_expires_with_its_sale_is_never_renewed() {
        let l = life(600, 60);
        let sale_expires = Some(5 * MIN);
        for api in [AttendedApi::Instore, AttendedApi::Orders] {
            let expires = order_expiry(api, l, 0, sale_expires);
            assert_eq!(expires, 5 * MIN, "{api:?}");
            assert_eq!(renew_at(expires, sale_expires, 60), None);
        }
        // A sale that outlives the lifetime keeps its own expiry there too.
        let long = Some(60 * MIN);
        assert_eq!(order_expiry(AttendedApi::Instore, l, 0, long), 60 * MIN);
        assert_eq!(renew_at(60 * MIN, long, 60), None);
    }

    #[test]
    fn a_legacy_order_lives_mercado_pagos_ten_minutes_whatever_the_sale() {
        // The legacy body carries no expiry.
        let l = life(3_600, 60);
        assert_eq!(order_expiry(AttendedApi::Legacy, l, 0, None), 10 * MIN);
        // The sale ends first: nothing to renew.
        let short = Some(5 * MIN);
        let expires = order_expiry(AttendedApi::Legacy, l, 0, short);
        assert_eq!(renew_at(expires, short, 60), None);
        // The sale outlives it: renewed a minute ahead.
        let long = Some(30 * MIN);
        let expires = order_expiry(AttendedApi::Legacy, l, 0, long);
        assert_eq!(renew_at(expires, long, 60), Some(9 * MIN));
    }

    #[test]
    fn the_orders_api_ttl_rounds_up_and_is_never_zero() {
        assert_eq!(ttl_secs(0, 600_000), 600);
        assert_eq!(ttl_secs(0, 4_001), 5);
        assert_eq!(ttl_secs(0, 1), 1);
        assert_eq!(ttl_secs(10, 0), 1);
    }

    #[test]
    fn huge_lifetimes_saturate_instead_of_overflowing() {
        let l = life(u64::MAX, 1);
        assert_eq!(
            order_expiry(AttendedApi::Instore, l, i64::MAX - 5, None),
            i64::MAX
        );
        assert_eq!(renew_at(i64::MIN, None, u64::MAX), Some(i64::MIN));
    }

    #[test]
    fn keys_name_what_they_create_or_cancel() {
        assert_eq!(renew_key("ORD01A"), "qrgate-renew-ORD01A");
        assert_eq!(cancel_key("ORD01A"), "qrgate-cancel-ORD01A");
        assert_ne!(renew_key("ORD01A"), renew_key("ORD01B"));
    }
}
