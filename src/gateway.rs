//! The live order book: one view per POS in a `DashMap`, read by polls
//! without locks, and changed only through [`Gateway::execute`] and
//! [`Gateway::settle`], which decide with the pure rules of `orders`, write
//! the change to the store, and only then make it visible and tell the
//! device.
//!
//! Each POS has its own async mutex held across decide → store → publish, so
//! a cancel and a payment for the same POS cannot interleave, while other
//! POS go on. No `DashMap` guard ever lives across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, Mutex, Notify};

use crate::events::{Events, OpEvent};
use crate::http::answer::{self, OrderContext, PollAnswer};
use crate::metrics::Metrics;
use crate::mqtt::outbound;
use crate::mqtt::topics::Topics;
use crate::orders::settle::{check_payment, MerchantOrderFacts, PaymentStatus};
use crate::orders::{
    self, Command, Ctx, ExternalReference, Outcome, PosConfig, PosId, PosState, Sale, SaleEvent,
    UnixMillis,
};
use crate::store::{MerchantOrderRecord, PaymentRecord, RejectionRecord, Store, StoreError};

/// A POS as polls see it: its state and the answer rendered from it.
#[derive(Debug)]
pub struct PosView {
    pub state: PosState,
    pub answer: PollAnswer,
    /// Set by the first poll that hands the pending sale to Mercado Pago, so
    /// only that poll asks for the sale to be marked served.
    served_asked: AtomicBool,
}

/// A message for a device, in the order it must be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("unknown POS {0:?}")]
    UnknownPos(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Work for the attended model's order desk (`attended.rs`): Mercado Pago
/// calls that must follow a stored change, made off the POS's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttendedJob {
    /// Place the order for this pending sale on its POS.
    Place(Sale),
    /// Take the order of this cancelled or expired sale off its POS.
    Remove(Sale),
    /// A payment was rejected (these payments): make sure the order is
    /// still on the POS.
    Check(Sale, Vec<orders::MpId>),
    /// The sale was paid: an order the desk placed again may have raced
    /// the payment and must not stay on the POS.
    Paid(Sale),
}

/// What became of a merchant order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Paid { reference: ExternalReference },
    Duplicate,
    RefundDue { reference: ExternalReference },
    Refused(String),
}

pub struct Gateway {
    pos: HashMap<PosId, PosConfig>,
    locks: HashMap<PosId, Mutex<()>>,
    views: DashMap<PosId, Arc<PosView>>,
    store: Arc<dyn Store>,
    ctx: OrderContext,
    /// The answer for an unknown POS, in the account's default protocol.
    invalid: PollAnswer,
    collector_id: u64,
    auto_refund: bool,
    topics: Topics,
    publish: mpsc::UnboundedSender<Publish>,
    served: mpsc::UnboundedSender<(PosId, ExternalReference)>,
    attended: Option<mpsc::UnboundedSender<AttendedJob>>,
    refunds_due: Arc<Notify>,
    events: Events,
    metrics: Arc<Metrics>,
}

/// What the book needs from the configuration besides the POS.
pub struct BookSettings {
    pub collector_id: u64,
    pub auto_refund: bool,
    pub topics: Topics,
    /// The account's default poll protocol, for POS we do not know.
    pub poll_protocol: orders::PollProtocol,
    /// Where attended POS's orders are placed and removed; `None` when no
    /// POS is attended.
    pub attended: Option<mpsc::UnboundedSender<AttendedJob>>,
}

pub fn now_millis() -> UnixMillis {
    chrono::Utc::now().timestamp_millis()
}

impl Gateway {
    /// Builds the book from the store's latest sale of each configured POS.
    pub async fn load(
        pos: Vec<PosConfig>,
        store: Arc<dyn Store>,
        ctx: OrderContext,
        settings: BookSettings,
        publish: mpsc::UnboundedSender<Publish>,
        served: mpsc::UnboundedSender<(PosId, ExternalReference)>,
    ) -> Result<Gateway, GatewayError> {
        let BookSettings {
            collector_id,
            auto_refund,
            topics,
            poll_protocol,
            attended,
        } = settings;
        let latest = store.latest_sales().await?;
        let mut by_pos: HashMap<PosId, Sale> =
            latest.into_iter().map(|s| (s.pos.clone(), s)).collect();
        let views = DashMap::with_capacity(pos.len());
        for p in &pos {
            let state = PosState {
                presence: orders::Presence::Unknown,
                current: by_pos.remove(&p.id),
            };
            views.insert(p.id.clone(), Arc::new(view(p, state, &ctx)));
        }
        for (pos, sale) in by_pos {
            tracing::warn!(pos = %pos, external_reference = %sale.external_reference, state = sale.state.as_str(),
                "stored sale belongs to a POS that is no longer configured; ignored");
        }
        Ok(Gateway {
            locks: pos.iter().map(|p| (p.id.clone(), Mutex::new(()))).collect(),
            pos: pos.into_iter().map(|p| (p.id.clone(), p)).collect(),
            views,
            store,
            ctx,
            invalid: answer::invalid(poll_protocol),
            collector_id,
            auto_refund,
            topics,
            publish,
            served,
            attended,
            refunds_due: Arc::new(Notify::new()),
            events: Events::default(),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The operator's event stream, fed where the log lines are written.
    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every configured POS.
    pub fn pos_configs(&self) -> impl Iterator<Item = &PosConfig> {
        self.pos.values()
    }

    /// A sale by reference: its POS's current one, or from the store.
    pub async fn find_sale(
        &self,
        reference: &ExternalReference,
    ) -> Result<Option<Sale>, GatewayError> {
        if let Some(s) = reference
            .pos_id()
            .and_then(|p| self.view(&p))
            .and_then(|v| v.state.current.clone())
            .filter(|s| &s.external_reference == reference)
        {
            return Ok(Some(s));
        }
        Ok(self.store.sale(reference).await?)
    }

    /// Durably writes a change, timed for the metrics.
    async fn record(&self, sale: &Sale, event: &SaleEvent) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let r = self.store.record(sale, event).await;
        self.metrics
            .store_write_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    pub fn pos_config(&self, id: &str) -> Option<&PosConfig> {
        PosId::parse(id).ok().and_then(|id| self.pos.get(&id))
    }

    /// The seller's Mercado Pago user id.
    pub fn collector_id(&self) -> u64 {
        self.collector_id
    }

    pub fn pos_ids(&self) -> Vec<PosId> {
        self.pos.keys().cloned().collect()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn view(&self, id: &PosId) -> Option<Arc<PosView>> {
        self.views.get(id).map(|v| Arc::clone(v.value()))
    }

    /// The hot path: one map read. The first poll that serves a pending sale
    /// also asks, off this path, for the sale to be marked served.
    pub fn poll(&self, id: &str) -> PollAnswer {
        let Some(view) = PosId::parse(id).ok().and_then(|id| self.view(&id)) else {
            return self.invalid.clone();
        };
        if view.answer.status == 200 && !view.served_asked.swap(true, Ordering::Relaxed) {
            if let Some(s) = view.state.busy_sale() {
                let _ = self
                    .served
                    .send((s.pos.clone(), s.external_reference.clone()));
            }
        }
        view.answer.clone()
    }

    /// Every POS's retained state, to republish after a (re)connection: the
    /// broker may have forgotten them (rumqttd keeps nothing across restarts).
    pub fn retained_states(&self) -> Vec<Publish> {
        self.views
            .iter()
            .filter_map(|v| {
                v.state
                    .current
                    .as_ref()
                    .filter(|s| self.shown_to_device(s))
                    .map(|s| Publish {
                        topic: self.topics.state(s.pos.as_str()),
                        payload: outbound::state(s),
                        retain: true,
                    })
            })
            .collect()
    }

    /// An attended sale is `pending` for its device only once its order is
    /// on the POS at Mercado Pago (CONTRACT-NOTES).
    fn shown_to_device(&self, sale: &Sale) -> bool {
        let attended = self
            .pos
            .get(&sale.pos)
            .is_some_and(|c| c.mode == orders::PosMode::Attended);
        !(attended && sale.state == orders::SaleState::Pending && sale.placed_at.is_none())
    }

    /// The attended desk's follow-up of a stored change.
    fn follow_up(&self, cfg: &PosConfig, sale: &Sale, event: &SaleEvent) {
        let Some(desk) = self.attended.as_ref() else {
            return;
        };
        if cfg.mode != orders::PosMode::Attended {
            return;
        }
        let job = match event {
            SaleEvent::Accepted | SaleEvent::Priced
                if sale.state == orders::SaleState::Pending && sale.placed_at.is_none() =>
            {
                AttendedJob::Place(sale.clone())
            }
            // Also when the order may not be there yet: a placement still
            // under way finds the sale gone and removes what it placed.
            SaleEvent::Cancelled | SaleEvent::Expired | SaleEvent::CancelledByOperator { .. }
                if !sale.lines.is_empty() =>
            {
                AttendedJob::Remove(sale.clone())
            }
            SaleEvent::Paid { .. } => AttendedJob::Paid(sale.clone()),
            _ => return,
        };
        let _ = desk.send(job);
    }

    /// Pending attended sales whose order is not known to be placed: after a
    /// restart, placed again (placing replaces, so twice is harmless).
    pub fn unplaced(&self) -> Vec<Sale> {
        self.views
            .iter()
            .filter_map(|v| v.state.current.clone())
            .filter(|s| {
                s.state == orders::SaleState::Pending
                    && s.placed_at.is_none()
                    && self
                        .pos
                        .get(&s.pos)
                        .is_some_and(|c| c.mode == orders::PosMode::Attended)
            })
            .collect()
    }

    /// Attended POS whose current sale ended (cancelled, expired, refused)
    /// after its order was placed.
    pub fn ended_placed(&self) -> Vec<Sale> {
        self.views
            .iter()
            .filter_map(|v| v.state.current.clone())
            .filter(|s| {
                matches!(
                    s.state,
                    orders::SaleState::Cancelled
                        | orders::SaleState::Expired
                        | orders::SaleState::Rejected
                ) && s.placed_at.is_some()
                    && self
                        .pos
                        .get(&s.pos)
                        .is_some_and(|c| c.mode == orders::PosMode::Attended)
            })
            .collect()
    }

    /// Whether another sale than `reference` is in flight on the POS.
    pub fn has_newer_sale(&self, pos: &PosId, reference: &ExternalReference) -> bool {
        self.view(pos).is_some_and(|v| {
            v.state
                .busy_sale()
                .is_some_and(|s| &s.external_reference != reference)
        })
    }

    /// Whether `reference` is still its POS's pending sale.
    pub fn is_pending(&self, pos: &PosId, reference: &ExternalReference) -> bool {
        self.view(pos).is_some_and(|v| {
            v.state.busy_sale().is_some_and(|s| {
                &s.external_reference == reference && s.state == orders::SaleState::Pending
            })
        })
    }

    /// POS with a busy sale past its expiry.
    pub fn expired(&self, now: UnixMillis) -> Vec<PosId> {
        self.views
            .iter()
            .filter(|v| {
                v.state
                    .busy_sale()
                    .and_then(|s| s.expires_at)
                    .is_some_and(|at| at <= now)
            })
            .map(|v| v.key().clone())
            .collect()
    }

    fn send(&self, p: Publish) {
        // The receiver lives as long as the app; after shutdown there is
        // nobody left to tell.
        let _ = self.publish.send(p);
    }

    fn publish_state(&self, sale: &Sale) {
        self.send(Publish {
            topic: self.topics.state(sale.pos.as_str()),
            payload: outbound::state(sale),
            retain: true,
        });
    }

    /// A refused device message: logged, stored for the operator, and (when
    /// `tell`) told to the device without touching its retained state.
    pub async fn reject(
        &self,
        pos: &PosId,
        sale_id: Option<&str>,
        code: &str,
        message: &str,
        tell: bool,
    ) {
        tracing::warn!(pos = %pos, sale_id, reason = code, detail = message, "device message rejected");
        self.metrics
            .device_rejections
            .with_label_values(&[code])
            .inc();
        self.events.emit(OpEvent {
            at: now_millis(),
            pos: pos.to_string(),
            sale_id: sale_id.map(str::to_owned),
            external_reference: None,
            kind: "rejected".into(),
            detail: format!("device message rejected: {code}: {message}"),
            state: None,
        });
        let record = RejectionRecord {
            pos: pos.as_str().to_owned(),
            sale_id: sale_id.map(str::to_owned),
            code: code.to_owned(),
            message: message.to_owned(),
            at: now_millis(),
        };
        if let Err(e) = self.store.record_rejection(record).await {
            tracing::error!(pos = %pos, error = %e, "cannot store a rejection");
        }
        if tell {
            self.send(Publish {
                topic: self.topics.state(pos.as_str()),
                payload: outbound::rejected(sale_id, code, message),
                retain: false,
            });
        }
    }

    /// A command the book refused: stored, logged and told to the device.
    async fn refuse(&self, pos: &PosId, sale_id: Option<&orders::SaleId>, why: &orders::Rejection) {
        self.reject(
            pos,
            sale_id.map(|s| s.as_str()),
            why.code(),
            &why.to_string(),
            true,
        )
        .await;
    }

    /// Makes a stored change visible: the view and the device's retained
    /// state.
    fn commit(&self, cfg: &PosConfig, presence: orders::Presence, sale: Sale, publish: bool) {
        let state = PosState {
            presence,
            current: Some(sale),
        };
        let v = Arc::new(view(cfg, state, &self.ctx));
        // Shown before told: a device may poll the moment it hears its state.
        self.views.insert(cfg.id.clone(), Arc::clone(&v));
        if let Some(s) = v.state.current.as_ref().filter(|_| publish) {
            self.publish_state(s);
        }
    }

    fn now(&self) -> Ctx {
        Ctx {
            now: now_millis(),
            random: rand::random(),
            auto_refund: self.auto_refund,
        }
    }

    /// Applies a command to a POS: decide, store, show, tell.
    pub async fn execute(&self, pos: &PosId, cmd: Command) -> Result<Outcome, GatewayError> {
        let (Some(cfg), Some(lock)) = (self.pos.get(pos), self.locks.get(pos)) else {
            return Err(GatewayError::UnknownPos(pos.to_string()));
        };
        let _guard = lock.lock().await;
        let current = self
            .view(pos)
            .ok_or_else(|| GatewayError::UnknownPos(pos.to_string()))?;
        // A `delivered` may arrive after the device's next sale (MQTT does
        // not order topics): it is for an older sale, found in the store.
        if let Command::Delivered {
            sale_id,
            ok,
            reason,
        } = &cmd
        {
            if current
                .state
                .current
                .as_ref()
                .is_none_or(|s| &s.sale_id != sale_id)
            {
                if let Some(older) = self
                    .store
                    .sale_by_device_id(pos.as_str(), sale_id.as_str())
                    .await?
                {
                    let outcome = orders::book::deliver(&older, *ok, reason.clone(), self.now());
                    match &outcome {
                        Outcome::Changed { sale, event } => {
                            self.record(sale, event).await?;
                            self.log_event(sale, event);
                            self.wake_refunds(sale);
                        }
                        Outcome::Rejected { sale_id, why } => {
                            self.refuse(pos, sale_id.as_ref(), why).await
                        }
                        _ => {}
                    }
                    return Ok(outcome);
                }
            }
        }
        let from_operator = matches!(cmd, Command::CancelByOperator { .. });
        let outcome = orders::apply(cfg, &current.state, cmd, self.now());
        match &outcome {
            // The operator hears why; the device has nothing to learn.
            Outcome::Rejected { .. } if from_operator => {}
            Outcome::Changed { sale, event } => {
                self.record(sale, event).await?;
                self.log_event(sale, event);
                self.wake_refunds(sale);
                // A failed delivery changes nothing the device must hear.
                let publish =
                    !matches!(event, SaleEvent::Delivered { .. }) && self.shown_to_device(sale);
                self.commit(cfg, current.state.presence, sale.clone(), publish);
                self.follow_up(cfg, sale, event);
            }
            Outcome::Republish => {
                if let Some(s) = current
                    .state
                    .current
                    .as_ref()
                    .filter(|s| self.shown_to_device(s))
                {
                    tracing::info!(pos = %pos, sale_id = %s.sale_id, external_reference = %s.external_reference,
                        state = s.state.as_str(), "same sale again: state republished");
                    self.publish_state(s);
                }
            }
            Outcome::Rejected { sale_id, why } => self.refuse(pos, sale_id.as_ref(), why).await,
            Outcome::Presence(p) => {
                let said = if p.is_offline() {
                    "device offline"
                } else {
                    "device online"
                };
                tracing::info!(pos = %pos, online = !p.is_offline(), "{said}");
                self.events.emit(OpEvent {
                    at: now_millis(),
                    pos: pos.to_string(),
                    sale_id: None,
                    external_reference: None,
                    kind: "presence".into(),
                    detail: said.into(),
                    state: None,
                });
                let state = PosState {
                    presence: *p,
                    current: current.state.current.clone(),
                };
                self.views
                    .insert(pos.clone(), Arc::new(view(cfg, state, &self.ctx)));
            }
            Outcome::Nothing => {}
        }
        Ok(outcome)
    }

    /// Settles one merchant order, fetched from Mercado Pago by the caller.
    pub async fn settle(
        &self,
        facts: &MerchantOrderFacts,
        raw: String,
        status: &str,
    ) -> Result<Settlement, GatewayError> {
        let reference_text = facts.external_reference.clone();
        self.store
            .record_merchant_order(MerchantOrderRecord {
                id: facts.id.clone(),
                external_reference: reference_text.clone(),
                status: status.to_owned(),
                body: raw,
                seen_at: now_millis(),
                payments: facts
                    .payments
                    .iter()
                    .map(|p| PaymentRecord {
                        id: p.id.clone(),
                        status: match &p.status {
                            PaymentStatus::Approved => "approved".to_owned(),
                            PaymentStatus::Other(s) => s.clone(),
                        },
                        amount: p.amount.to_string(),
                        currency: p.currency.clone(),
                    })
                    .collect(),
            })
            .await?;
        let refuse = |why: String| {
            tracing::warn!(merchant_order = %facts.id, external_reference = reference_text.as_deref(),
                reason = %why, "merchant order closes nothing");
            Ok(Settlement::Refused(why))
        };
        let Some(reference) = reference_text
            .as_deref()
            .and_then(|r| ExternalReference::parse(r).ok())
        else {
            return refuse("external_reference is not one of ours".into());
        };
        let Some(locked) = self.lock_sale(&reference).await? else {
            return refuse("external_reference is not one of ours".into());
        };
        let (pos, sale) = (locked.cfg.id.clone(), &locked.sale);
        let payment = match check_payment(sale, facts, self.collector_id) {
            Ok(p) => p,
            Err(why) => {
                tracing::info!(pos = %pos, sale_id = %sale.sale_id, external_reference = %reference,
                    merchant_order = %facts.id, reason = why.code(), detail = %why, "merchant order closes nothing");
                self.events.emit(OpEvent {
                    at: now_millis(),
                    kind: "notification".into(),
                    detail: format!("merchant order {} closes nothing: {why}", facts.id),
                    ..OpEvent::of_sale(sale, "notification", "")
                });
                // A rejected payment leaves the attended order for a retry,
                // unless Mercado Pago dropped it: check, once per payment.
                let rejected: Vec<orders::MpId> = facts
                    .payments
                    .iter()
                    .filter(|p| matches!(&p.status, PaymentStatus::Other(s) if s == "rejected" || s == "failed"))
                    .map(|p| p.id.clone())
                    .collect();
                let live = facts.payments.iter().any(|p| {
                    p.status == PaymentStatus::Approved
                        || matches!(&p.status, PaymentStatus::Other(s) if s == "in_process" || s == "pending")
                });
                if locked.is_current
                    && !rejected.is_empty()
                    && !live
                    && sale.state == orders::SaleState::Pending
                    && locked.cfg.mode == orders::PosMode::Attended
                {
                    if let Some(desk) = &self.attended {
                        let _ = desk.send(AttendedJob::Check(sale.clone(), rejected));
                    }
                }
                return Ok(Settlement::Refused(why.code().to_owned()));
            }
        };
        let outcome = orders::pay(sale, &payment, self.now());
        let Outcome::Changed {
            sale: changed,
            event,
        } = outcome
        else {
            tracing::info!(pos = %pos, sale_id = %sale.sale_id, external_reference = %reference,
                merchant_order = %facts.id, payment = %payment.payment_id, "payment already recorded");
            return Ok(Settlement::Duplicate);
        };
        match self.record(&changed, &event).await {
            Ok(()) => {}
            Err(StoreError::AlreadyClosed(_) | StoreError::AlreadyDue(_)) => {
                tracing::info!(pos = %pos, external_reference = %reference, merchant_order = %facts.id,
                    payment = %payment.payment_id, "payment already recorded (store)");
                return Ok(Settlement::Duplicate);
            }
            Err(e) => return Err(e.into()),
        }
        self.log_event(&changed, &event);
        let settlement = match event {
            SaleEvent::Paid { .. } => Settlement::Paid {
                reference: reference.clone(),
            },
            _ => {
                self.wake_refunds(&changed);
                Settlement::RefundDue {
                    reference: reference.clone(),
                }
            }
        };
        // Money for a sale that is no longer payable tells the device nothing.
        let publish = matches!(settlement, Settlement::Paid { .. });
        if publish {
            self.follow_up(locked.cfg, &changed, &event);
        }
        locked.show(self, changed, publish);
        Ok(settlement)
    }

    /// Finds a sale by reference and locks its POS: the current sale of
    /// its POS, or an older one from the store. `None` when it is not ours.
    async fn lock_sale(
        &self,
        reference: &ExternalReference,
    ) -> Result<Option<Locked<'_>>, GatewayError> {
        // Our references start with their POS id; anything else, or a POS
        // that is not configured, is not ours to settle.
        let Some(pos) = reference.pos_id() else {
            return Ok(None);
        };
        let (Some(cfg), Some(lock)) = (self.pos.get(&pos), self.locks.get(&pos)) else {
            return Ok(None);
        };
        let guard = lock.lock().await;
        let view = self
            .view(&pos)
            .ok_or_else(|| GatewayError::UnknownPos(pos.to_string()))?;
        let current = view
            .state
            .current
            .as_ref()
            .filter(|s| &s.external_reference == reference)
            .cloned();
        let is_current = current.is_some();
        let sale = match current {
            Some(s) => s,
            None => match self.store.sale(reference).await? {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        Ok(Some(Locked {
            cfg,
            _guard: guard,
            view,
            sale,
            is_current,
        }))
    }

    /// Wakes the refunder when `sale` has a refund to make itself.
    fn wake_refunds(&self, sale: &Sale) {
        if sale.refunds.iter().any(|r| r.auto && r.refunded.is_none()) {
            self.refunds_due.notify_one();
        }
    }

    /// Signalled whenever a refund qrgate must make comes due.
    pub fn refunds_due(&self) -> Arc<Notify> {
        Arc::clone(&self.refunds_due)
    }

    /// The `paid` state of every current sale whose device has not
    /// confirmed delivery: republished until it does (CONTRACT-NOTES).
    pub fn undelivered(&self) -> Vec<(Publish, ExternalReference)> {
        self.views
            .iter()
            .filter_map(|v| {
                v.state
                    .current
                    .as_ref()
                    .filter(|s| s.is_paid_undelivered())
                    .map(|s| {
                        (
                            Publish {
                                topic: self.topics.state(s.pos.as_str()),
                                payload: outbound::state(s),
                                retain: true,
                            },
                            s.external_reference.clone(),
                        )
                    })
            })
            .collect()
    }

    pub fn republish(&self, p: Publish) {
        self.send(p);
    }

    /// Records that Mercado Pago refunded `payment_id` of a sale.
    pub async fn record_refund(
        &self,
        reference: &ExternalReference,
        payment_id: &orders::MpId,
        refund_id: orders::MpId,
    ) -> Result<bool, GatewayError> {
        let Some(locked) = self.lock_sale(reference).await? else {
            return Ok(false);
        };
        let Some(Outcome::Changed { sale, event }) =
            orders::book::refunded(&locked.sale, payment_id, refund_id, now_millis())
        else {
            return Ok(false);
        };
        match self.record(&sale, &event).await {
            Ok(()) => {}
            Err(StoreError::AlreadyDue(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.log_event(&sale, &event);
        locked.show(self, sale, false);
        Ok(true)
    }
}

impl Gateway {
    /// Records a refund Mercado Pago made for the operator, and tells the
    /// device (`refunded`, retained) when the sale is its POS's latest.
    /// `Ok(Err(_))` when the rules refuse it (it raced another refund).
    pub async fn record_operator_refund(
        &self,
        reference: &ExternalReference,
        refund: orders::sale::OperatorRefund,
    ) -> Result<Result<Sale, orders::RefundRefusal>, GatewayError> {
        let Some(locked) = self.lock_sale(reference).await? else {
            return Err(GatewayError::UnknownPos(reference.to_string()));
        };
        let (sale, event) = match orders::operator_refund(&locked.sale, refund) {
            Ok(Outcome::Changed { sale, event }) => (sale, event),
            Ok(_) => {
                return Ok(Err(orders::RefundRefusal::NotPaid {
                    state: locked.sale.state,
                }))
            }
            Err(why) => return Ok(Err(why)),
        };
        self.record(&sale, &event).await?;
        self.log_event(&sale, &event);
        locked.show(self, sale.clone(), true);
        Ok(Ok(sale))
    }
}

/// A sale found by reference, with its POS locked.
struct Locked<'a> {
    cfg: &'a PosConfig,
    _guard: tokio::sync::MutexGuard<'a, ()>,
    view: Arc<PosView>,
    sale: Sale,
    is_current: bool,
}

impl Locked<'_> {
    /// Makes a stored change visible when the sale is its POS's current one.
    fn show(self, gateway: &Gateway, sale: Sale, publish: bool) {
        if self.is_current {
            gateway.commit(self.cfg, self.view.state.presence, sale, publish);
        }
    }
}

fn view(cfg: &PosConfig, state: PosState, ctx: &OrderContext) -> PosView {
    let answer = answer::render(cfg, &state, ctx);
    let served = state.busy_sale().is_some_and(|s| s.served_at.is_some());
    PosView {
        state,
        answer,
        served_asked: AtomicBool::new(served),
    }
}

/// One line per event that matters, with the fields operators search by.
fn log_line(sale: &Sale, event: &SaleEvent) {
    let msg = event_message(sale, event);
    let pos = sale.pos.as_str();
    let sale_id = sale.sale_id.as_str();
    let reference = sale.external_reference.as_str();
    let amount = sale.total().map(|a| a.to_string());
    let currency = sale.currency.code();
    match event {
        SaleEvent::Accepted => tracing::info!(
            pos,
            sale_id,
            external_reference = reference,
            state = sale.state.as_str(),
            amount,
            currency,
            "{msg}"
        ),
        SaleEvent::Priced => tracing::info!(
            pos,
            sale_id,
            external_reference = reference,
            amount,
            currency,
            "{msg}"
        ),
        SaleEvent::Served => tracing::info!(
            pos,
            sale_id,
            external_reference = reference,
            amount,
            currency,
            "{msg}"
        ),
        SaleEvent::Placed => tracing::info!(
            pos,
            sale_id,
            external_reference = reference,
            amount,
            currency,
            "{msg}"
        ),
        SaleEvent::Refused { reason } => tracing::error!(
            pos,
            sale_id,
            external_reference = reference,
            amount,
            currency,
            reason = reason.as_str(),
            "{msg}"
        ),
        SaleEvent::Paid { overpaid } => {
            let s = sale.settled.as_ref();
            let merchant_order = s.map(|s| s.merchant_order.to_string());
            let merchant_order = merchant_order.as_deref();
            let payment = s.map(|s| s.payment_id.to_string());
            let payment = payment.as_deref();
            let paid = s.map(|s| s.paid.to_string());
            if *overpaid {
                tracing::warn!(
                    pos,
                    sale_id,
                    external_reference = reference,
                    merchant_order,
                    payment,
                    amount,
                    paid,
                    currency,
                    "{msg}"
                );
            } else {
                tracing::info!(
                    pos,
                    sale_id,
                    external_reference = reference,
                    merchant_order,
                    payment,
                    amount,
                    currency,
                    "{msg}"
                );
            }
        }
        SaleEvent::Cancelled => {
            if sale.served_at.is_some() {
                tracing::warn!(pos, sale_id, external_reference = reference, "{msg}");
            } else {
                tracing::info!(pos, sale_id, external_reference = reference, "{msg}");
            }
        }
        SaleEvent::Expired => {
            tracing::info!(pos, sale_id, external_reference = reference, "{msg}")
        }
        SaleEvent::Delivered { ok, reason } => {
            if *ok {
                tracing::info!(pos, sale_id, external_reference = reference, "{msg}");
            } else {
                tracing::error!(
                    pos,
                    sale_id,
                    external_reference = reference,
                    reason = reason.as_deref(),
                    payment = sale.settled.as_ref().map(|p| p.payment_id.to_string()),
                    auto_refund = sale.refunds.last().map(|r| r.auto),
                    "{msg}"
                );
            }
        }
        SaleEvent::RefundDue => {
            let r = sale.refunds.last();
            tracing::error!(
                pos,
                sale_id,
                external_reference = reference,
                merchant_order = r.map(|r| r.merchant_order.to_string()),
                payment = r.map(|r| r.payment_id.to_string()),
                paid = r.map(|r| r.amount.to_string()),
                state = sale.state.as_str(),
                reason = r.map(|r| r.reason.as_str()),
                auto_refund = r.map(|r| r.auto),
                "{msg}"
            );
        }
        SaleEvent::Refunded { payment_id } => {
            let r = sale.refunds.iter().find(|r| &r.payment_id == payment_id);
            tracing::info!(
                pos,
                sale_id,
                external_reference = reference,
                payment = %payment_id,
                merchant_order = r.map(|r| r.merchant_order.to_string()),
                refund = r.and_then(|r| r.refunded.as_ref()).map(|d| d.refund_id.to_string()),
                amount = r.map(|r| r.amount.to_string()),
                "{msg}"
            );
        }
        SaleEvent::CancelledByOperator { by } => tracing::warn!(
            pos,
            sale_id,
            external_reference = reference,
            by = by.as_str(),
            served = sale.served_at.is_some(),
            "{msg}"
        ),
        SaleEvent::RefundedByOperator { amount, by } => tracing::warn!(
            pos,
            sale_id,
            external_reference = reference,
            by = by.as_str(),
            amount = %amount,
            refunded_total = %sale.refunded_total(),
            currency,
            payment = sale.settled.as_ref().map(|s| s.payment_id.to_string()),
            state = sale.state.as_str(),
            "{msg}"
        ),
    }
}

/// What the log line of a sale event says, and the console's feed with it.
fn event_message(sale: &Sale, event: &SaleEvent) -> &'static str {
    match event {
        SaleEvent::Accepted => "sale accepted",
        SaleEvent::Priced => "sale amount known: pending",
        SaleEvent::Served => "sale served to Mercado Pago",
        SaleEvent::Placed => "attended order placed at Mercado Pago: pending",
        SaleEvent::Refused { .. } => "Mercado Pago refused the attended order: sale rejected",
        SaleEvent::Paid { overpaid: true } => {
            "sale paid with an overpayment: refund the difference"
        }
        SaleEvent::Paid { overpaid: false } => "sale paid",
        SaleEvent::Cancelled if sale.served_at.is_some() => {
            "sale cancelled after it was served to Mercado Pago: a payment may still arrive"
        }
        SaleEvent::Cancelled => "sale cancelled",
        SaleEvent::Expired => "sale expired",
        SaleEvent::Delivered { ok: true, .. } => "device confirmed delivery",
        SaleEvent::Delivered { ok: false, .. } => {
            "device failed to deliver a paid sale: refund due"
        }
        SaleEvent::RefundDue => "payment for a sale that was no longer payable: refund due",
        SaleEvent::Refunded { .. } => "payment refunded",
        SaleEvent::CancelledByOperator { .. } => "sale cancelled by the operator",
        SaleEvent::RefundedByOperator { .. } => "sale refunded by the operator",
    }
}

impl Gateway {
    /// One log line and one console event per stored sale event, saying
    /// the same thing.
    fn log_event(&self, sale: &Sale, event: &SaleEvent) {
        log_line(sale, event);
        let name = event.name();
        self.metrics.sale_events.with_label_values(&[name]).inc();
        let outcome = match event {
            SaleEvent::Paid { .. } => Some("paid"),
            SaleEvent::Cancelled | SaleEvent::CancelledByOperator { .. } => Some("cancelled"),
            SaleEvent::Expired => Some("expired"),
            SaleEvent::Refused { .. } => Some("rejected"),
            _ => None,
        };
        if let Some(o) = outcome {
            self.metrics.sales.with_label_values(&[o]).inc();
        }
        let mut detail = event_message(sale, event).to_owned();
        match event {
            SaleEvent::Paid { .. } => {
                if let Some(s) = &sale.settled {
                    detail.push_str(&format!(
                        " (payment {}, {} {})",
                        s.payment_id,
                        s.paid,
                        sale.currency.code()
                    ));
                }
            }
            SaleEvent::Accepted | SaleEvent::Priced => {
                if let Some(a) = sale.total() {
                    detail.push_str(&format!(" ({} {})", a, sale.currency.code()));
                }
            }
            SaleEvent::Refused { reason } => detail.push_str(&format!(" ({reason})")),
            SaleEvent::Delivered {
                ok: false,
                reason: Some(r),
            } => detail.push_str(&format!(" ({r})")),
            SaleEvent::CancelledByOperator { by } => detail.push_str(&format!(" (by {by})")),
            SaleEvent::RefundedByOperator { amount, by } => detail.push_str(&format!(
                " ({amount} {}, by {by}; refunded in all {})",
                sale.currency.code(),
                sale.refunded_total()
            )),
            _ => {}
        }
        self.events.emit(OpEvent::of_sale(sale, name, &detail));
    }
}
