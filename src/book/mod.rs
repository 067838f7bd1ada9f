//! The live order book: one view per POS in a `DashMap`, read by polls
//! without locks, and changed only through [`Book::execute`] and
//! [`Book::settle`], which decide with the pure rules of `orders`, write
//! the change to the store, and only then make it visible and tell the
//! device.
//!
//! Each POS has its own async mutex held across decide → store → publish, so
//! a cancel and a payment for the same POS cannot interleave, while other
//! POS go on. No `DashMap` guard ever lives across an `.await`.

pub mod rejections;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, Mutex, Notify};

use crate::clock::Clock;
use crate::events::{Events, OpEvent};
use crate::mercadopago::poll_answer::{self, MpAccount, PollAnswer};
use crate::metrics::Metrics;
use crate::orders::ledger::Refund;
use crate::orders::merchant_order::{MerchantOrderFacts, PaymentStatus};
use crate::orders::sale::RefundReason;
use crate::orders::{
    self, Command, ExternalReference, Given, Outcome, PosConfig, PosId, PosState, Sale, SaleEvent,
    UnixMillis,
};
use crate::store::{Heard, MerchantOrderRecord, PaymentRecord, RejectionRecord, Store, StoreError};
use rejections::{Tally, SUMMARY_CODE};

/// A POS as polls see it: its state and the answer rendered from it.
#[derive(Debug)]
pub struct PosView {
    pub state: PosState,
    pub answer: PollAnswer,
    /// The POS's version in the store this view was read at or written as:
    /// a change is decided on it, and refused there if the POS moved on.
    pub version: u64,
    /// Set by the first poll that hands the pending sale to Mercado Pago, so
    /// only that poll asks for the sale to be marked served.
    served_asked: AtomicBool,
}

/// What the book tells a device, in the order it must be told. The MQTT
/// side (`mqtt::outbound`) turns it into a topic and a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tell {
    /// The state of its POS's current or last sale, which the broker keeps
    /// for a device that reconnects.
    State(Box<Sale>),
    /// The same, for a change this instance stored as version `version` of
    /// its POS: once published, what the store's outbox owed for it is
    /// marked told.
    Stored { sale: Box<Sale>, version: u64 },
    /// One of its messages was rejected; its sale's state stays as it was.
    Rejected {
        pos: PosId,
        sale_id: Option<String>,
        code: String,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BookError {
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
pub enum Verdict {
    Paid {
        reference: ExternalReference,
    },
    /// Approved payments the sale holds until it closes or ends.
    Held {
        reference: ExternalReference,
    },
    Duplicate,
    RefundDue {
        reference: ExternalReference,
    },
    /// The merchant order pays nothing: why.
    Unpaid(String),
}

pub struct Book {
    pos: HashMap<PosId, PosConfig>,
    locks: HashMap<PosId, Mutex<()>>,
    views: DashMap<PosId, Arc<PosView>>,
    store: Arc<dyn Store>,
    account: MpAccount,
    /// The answer for an unknown POS, in the account's default protocol.
    invalid: PollAnswer,
    collector_id: u64,
    auto_refund: bool,
    publish: mpsc::UnboundedSender<Tell>,
    served: mpsc::UnboundedSender<(PosId, ExternalReference)>,
    attended: Option<mpsc::UnboundedSender<AttendedJob>>,
    refunds_due: Arc<Notify>,
    /// One refund at a time per sale (striped by reference): qrgate's own
    /// and the operator's never plan from the same ledger at once.
    refund_turns: Vec<Mutex<()>>,
    events: Events,
    metrics: Arc<Metrics>,
    /// Which device refusals are kept one by one (`book::rejections`).
    refusals: Tally,
    clock: Clock,
    /// POS whose change stored elsewhere was heard of and not read yet: the
    /// version heard. Polls of them read the store first.
    behind: DashMap<PosId, u64>,
    /// How many POS `behind` holds, read by every poll without a lookup.
    behind_count: std::sync::atomic::AtomicUsize,
    /// Whether this instance leads the singletons (always, alone on its
    /// store): only the leader tells a device what nobody's change owes it
    /// (a repeated message's state, every state after a reconnection).
    leading: AtomicBool,
    /// Whether other instances write the store too.
    shared: AtomicBool,
    /// The version of each POS last read because another instance stored
    /// it: a device message found applied there is that change's own, heard
    /// after the change itself, and that instance told it.
    followed: DashMap<PosId, u64>,
}

/// What the book needs from the configuration besides the POS.
pub struct BookSettings {
    pub collector_id: u64,
    pub auto_refund: bool,
    /// The account's default poll protocol, for POS we do not know.
    pub poll_protocol: orders::PollProtocol,
    /// Where attended POS's orders are placed and removed; `None` when no
    /// POS is attended.
    pub attended: Option<mpsc::UnboundedSender<AttendedJob>>,
    /// The time every TTL and schedule reads (tests move it forward).
    pub clock: Clock,
}

/// Stripes of the per-sale refund turn.
const REFUND_TURNS: usize = 64;

/// POS followed at once ([`Book::follow_changes`]).
const FOLLOWING: usize = 32;

/// Times a change refused as stale is decided again on the stored state
/// before the caller hears the refusal: each retry follows another
/// instance's change to the same POS in between.
const STALE_RETRIES: u32 = 5;

impl Book {
    /// Builds the book from the store's latest sale of each configured POS.
    pub async fn load(
        pos: Vec<PosConfig>,
        store: Arc<dyn Store>,
        account: MpAccount,
        settings: BookSettings,
        publish: mpsc::UnboundedSender<Tell>,
        served: mpsc::UnboundedSender<(PosId, ExternalReference)>,
    ) -> Result<Book, BookError> {
        let BookSettings {
            collector_id,
            auto_refund,
            poll_protocol,
            attended,
            clock,
        } = settings;
        let latest = store.latest_sales().await?;
        let versions: HashMap<String, u64> = store.pos_versions().await?.into_iter().collect();
        let mut by_pos: HashMap<PosId, Sale> =
            latest.into_iter().map(|s| (s.pos.clone(), s)).collect();
        let views = DashMap::with_capacity(pos.len());
        for p in &pos {
            let state = PosState {
                presence: orders::Presence::Unknown,
                current: by_pos.remove(&p.id),
            };
            let version = versions.get(p.id.as_str()).copied().unwrap_or(0);
            views.insert(p.id.clone(), Arc::new(view(p, state, &account, version)));
        }
        for (pos, sale) in by_pos {
            tracing::warn!(pos = %pos, external_reference = %sale.external_reference, state = sale.state.as_str(),
                "stored sale belongs to a POS that is no longer configured; ignored");
        }
        Ok(Book {
            locks: pos.iter().map(|p| (p.id.clone(), Mutex::new(()))).collect(),
            pos: pos.into_iter().map(|p| (p.id.clone(), p)).collect(),
            views,
            store,
            account,
            invalid: poll_answer::invalid(poll_protocol),
            collector_id,
            auto_refund,
            publish,
            served,
            attended,
            refunds_due: Arc::new(Notify::new()),
            refund_turns: (0..REFUND_TURNS).map(|_| Mutex::new(())).collect(),
            events: Events::default(),
            metrics: Arc::new(Metrics::new()),
            // `[mqtt] stored_rejections_per_minute`'s default, until the
            // MQTT side sets the configured one.
            refusals: Tally::new(20),
            clock,
            behind: DashMap::new(),
            behind_count: std::sync::atomic::AtomicUsize::new(0),
            leading: AtomicBool::new(true),
            shared: AtomicBool::new(false),
            followed: DashMap::new(),
        })
    }

    /// Whether this instance leads the singletons ([`Book::set_leading`]).
    pub fn leads(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// Says whether this instance leads, among several sharing the store.
    pub fn set_leading(&self, yes: bool) {
        self.leading.store(yes, Ordering::Release);
    }

    /// Says that other instances write the store too.
    pub fn set_shared(&self) {
        self.shared.store(true, Ordering::Release);
    }

    /// Whether other instances write the store too.
    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Acquire)
    }

    /// Whether a device message this instance's broker session kept for it
    /// while it was away was applied already: it names a sale of its POS
    /// that is stored and is not the POS's current one. Another instance
    /// heard it then; taken again now, an old `sale` would open a sale the
    /// device left long ago.
    async fn applied_while_away(&self, pos: &PosId, cmd: &Command) -> Result<bool, BookError> {
        let Some(sale_id) = cmd.device_sale_id() else {
            return Ok(false);
        };
        let current = self
            .view(pos)
            .and_then(|v| v.state.current.as_ref().map(|s| s.sale_id.clone()));
        if current.as_ref() == Some(sale_id) {
            return Ok(false);
        }
        Ok(self
            .store
            .sale_by_device_id(pos.as_str(), sale_id.as_str())
            .await?
            .is_some())
    }

    /// The operator's event stream, fed where the log lines are written.
    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The time the book and the tasks around it read.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Every configured POS.
    pub fn pos_configs(&self) -> impl Iterator<Item = &PosConfig> {
        self.pos.values()
    }

    /// A sale by reference: its POS's current one, or from the store.
    pub async fn find_sale(
        &self,
        reference: &ExternalReference,
    ) -> Result<Option<Sale>, BookError> {
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

    /// Durably writes a change decided on `seen`, timed for the metrics;
    /// the POS's new version. `tell`: this instance will tell the device
    /// (the store keeps what it owes, [`Store::record_to_tell`]).
    async fn record(
        &self,
        seen: &PosView,
        sale: &Sale,
        event: &SaleEvent,
        tell: bool,
    ) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let r = if tell {
            self.store.record_to_tell(sale, event, seen.version).await
        } else {
            self.store.record(sale, event, seen.version).await
        };
        self.metrics
            .store_write_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(StoreError::Fenced { term }) = &r {
            self.metrics.fenced_writes.inc();
            tracing::warn!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                event = event.name(), term, "a singleton's change refused: another instance leads now");
        }
        r
    }

    /// Reads the POS again from the store after a change decided on its
    /// view was refused as stale: another instance changed it. Called with
    /// the POS's lock held.
    async fn reload(&self, cfg: &PosConfig, stale: &StoreError) -> Result<(), BookError> {
        let version = self.read_again(cfg).await?;
        self.followed.insert(cfg.id.clone(), version);
        tracing::info!(pos = %cfg.id, version, reason = %stale,
            "the POS changed in the store since this view: read again, deciding again");
        Ok(())
    }

    /// Shows the POS as the store has it (its version and latest sale),
    /// keeping the device's presence, which is not stored; its version.
    /// Called with the POS's lock held.
    async fn read_again(&self, cfg: &PosConfig) -> Result<u64, BookError> {
        let head = self.store.pos_head(cfg.id.as_str()).await?;
        let presence = self
            .view(&cfg.id)
            .map_or(orders::Presence::Unknown, |v| v.state.presence);
        let state = PosState {
            presence,
            current: head.latest,
        };
        self.views.insert(
            cfg.id.clone(),
            Arc::new(view(cfg, state, &self.account, head.version)),
        );
        Ok(head.version)
    }

    /// The POS's view at a new version, when a change stored was to an
    /// older sale than its current one.
    fn moved_to(&self, cfg: &PosConfig, seen: &PosView, version: u64) {
        self.views.insert(
            cfg.id.clone(),
            Arc::new(view(cfg, seen.state.clone(), &self.account, version)),
        );
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

    /// The version of a change to the POS stored elsewhere that was heard
    /// of and not read yet ([`Book::follow`]).
    pub fn behind(&self, id: &str) -> Option<u64> {
        // The poll's hot path: nothing to look up while no POS is behind,
        // which is always with one qrgate per database.
        if self.behind_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let id = PosId::parse(id).ok()?;
        self.behind.get(&id).map(|v| *v)
    }

    /// Follows a change another instance stored: version `version` of POS
    /// `pos`. The view is read again from the store (under the POS's lock)
    /// unless it is there already; the device was told by whoever stored
    /// it. Until then the POS is behind, and polls of it wait for this.
    pub async fn follow(&self, pos: &str, version: u64) -> Result<(), BookError> {
        let Ok(id) = PosId::parse(pos) else {
            return Ok(());
        };
        let (Some(cfg), Some(lock)) = (self.pos.get(&id), self.locks.get(&id)) else {
            return Ok(());
        };
        if self.view(&id).is_some_and(|v| v.version >= version) {
            return Ok(());
        }
        match self.behind.entry(id.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                let heard = e.get_mut();
                *heard = (*heard).max(version);
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(version);
                self.behind_count.fetch_add(1, Ordering::Release);
            }
        }
        let _guard = lock.lock().await;
        if self.view(&id).is_none_or(|v| v.version < version) {
            let now = self.read_again(cfg).await?;
            self.followed.insert(id.clone(), now);
            tracing::debug!(pos, version = now, "followed a change stored elsewhere");
        }
        let now = self.view(&id).map_or(0, |v| v.version);
        if self
            .behind
            .remove_if(&id, |_, heard| *heard <= now)
            .is_some()
        {
            self.behind_count.fetch_sub(1, Ordering::Release);
        }
        Ok(())
    }

    /// Follows every POS whose stored version is past its view's: after the
    /// feed of changes was lost for a while (a reconnection), when what
    /// changed meanwhile is not known. The number of POS read again.
    pub async fn catch_up(&self) -> Result<usize, BookError> {
        let mut read = 0;
        for (pos, version) in self.store.pos_versions().await? {
            let Ok(id) = PosId::parse(&pos) else { continue };
            if self.view(&id).is_some_and(|v| v.version < version) {
                self.follow(&pos, version).await?;
                read += 1;
            }
        }
        Ok(read)
    }

    /// Follows what is heard of changes stored elsewhere until the feed
    /// ends ([`Store::changes`]): up to [`FOLLOWING`] POS at once, each
    /// under its own lock, since every follow is a read of the store. A
    /// change that cannot be read leaves its POS behind: its polls read the
    /// store until it is read.
    pub async fn follow_changes(self: Arc<Self>, mut heard: mpsc::UnboundedReceiver<Heard>) {
        let reads = Arc::new(tokio::sync::Semaphore::new(FOLLOWING));
        while let Some(h) = heard.recv().await {
            match h {
                Heard::Change { pos, version } => {
                    let Ok(permit) = Arc::clone(&reads).acquire_owned().await else {
                        return;
                    };
                    let book = Arc::clone(&self);
                    tokio::spawn(async move {
                        if let Err(e) = book.follow(&pos, version).await {
                            tracing::warn!(pos = %pos, version, error = %e,
                                "cannot read a change stored elsewhere: polls of this POS read the store until it is read");
                        }
                        drop(permit);
                    });
                }
                // The inbox's, not the book's.
                Heard::Inbox(_) => {}
                Heard::Gap => match self.catch_up().await {
                    Ok(0) => {}
                    Ok(read) => {
                        tracing::info!(pos_read = read, "caught up on changes stored elsewhere")
                    }
                    Err(e) => tracing::warn!(error = %e,
                        "cannot catch up on changes stored elsewhere: the next gap tries again"),
                },
            }
        }
    }

    /// Every POS's retained state, to republish after a (re)connection: the
    /// broker may have forgotten them (rumqttd keeps nothing across restarts).
    pub fn retained_states(&self) -> Vec<Tell> {
        self.views
            .iter()
            .filter_map(|v| {
                v.state
                    .current
                    .as_ref()
                    .filter(|s| self.shown_to_device(s))
                    .map(|s| Tell::State(Box::new(s.clone())))
            })
            .collect()
    }

    /// An attended sale is `pending` for its device only once its order is
    /// on the POS at Mercado Pago (docs/decisions.md, "The device's state topic").
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

    fn send(&self, p: Tell) {
        // The receiver lives as long as the app; after shutdown there is
        // nobody left to tell.
        let _ = self.publish.send(p);
    }

    fn publish_state(&self, sale: &Sale) {
        self.send(Tell::State(Box::new(sale.clone())));
    }

    /// A refused device message: counted, logged and stored for the operator
    /// (the first `[mqtt] stored_rejections_per_minute` of its POS in a
    /// minute; the rest are summed, see `book::rejections`), and (when `tell`)
    /// told to the device without touching its retained state. `received`
    /// names the message's topic kind and size when it was refused before
    /// reaching the book.
    pub async fn reject(
        &self,
        pos: &PosId,
        sale_id: Option<&str>,
        code: &str,
        message: &str,
        tell: bool,
        received: Option<(&str, usize)>,
    ) {
        // Every instance hears the message: the leader alone keeps and
        // tells its refusal.
        if !self.leads() {
            return;
        }
        let (record, told) = self.note_rejection(pos, sale_id, code, message, tell, received);
        if let Some(record) = record {
            if let Err(e) = self.store.record_rejection(record).await {
                tracing::error!(pos = %pos, error = %e, "cannot store a rejection");
            }
        }
        // Told once stored: a device that hears it finds it in the store.
        if let Some(p) = told {
            self.send(p);
        }
    }

    /// [`Book::reject`] without waiting for the store, for the MQTT event
    /// loop, which must never wait: the row (when kept) is written, and the
    /// device then told, in a task of its own.
    pub fn reject_now(
        &self,
        pos: &PosId,
        sale_id: Option<&str>,
        code: &str,
        message: &str,
        tell: bool,
        received: Option<(&str, usize)>,
    ) {
        if !self.leads() {
            return;
        }
        let (record, told) = self.note_rejection(pos, sale_id, code, message, tell, received);
        match record {
            Some(record) => {
                let store = Arc::clone(&self.store);
                let publish = self.publish.clone();
                tokio::spawn(async move {
                    let pos = record.pos.clone();
                    if let Err(e) = store.record_rejection(record).await {
                        tracing::error!(pos = %pos, error = %e, "cannot store a rejection");
                    }
                    if let Some(p) = told {
                        let _ = publish.send(p);
                    }
                });
            }
            None => {
                if let Some(p) = told {
                    self.send(p);
                }
            }
        }
    }

    /// Counts a refusal; when its POS's allowance of the minute keeps it,
    /// logs it and returns its store row; returns what to tell the device.
    fn note_rejection(
        &self,
        pos: &PosId,
        sale_id: Option<&str>,
        code: &str,
        message: &str,
        tell: bool,
        received: Option<(&str, usize)>,
    ) -> (Option<RejectionRecord>, Option<Tell>) {
        self.metrics
            .device_rejections
            .with_label_values(&[code])
            .inc();
        let told = tell.then(|| Tell::Rejected {
            pos: pos.clone(),
            sale_id: sale_id.map(str::to_owned),
            code: code.to_owned(),
            message: message.to_owned(),
        });
        let at = self.clock.now_millis();
        if !self.refusals.admit(pos, code, at) {
            self.metrics.device_rejections_summed.inc();
            return (None, told);
        }
        let (topic_kind, size) = received.unzip();
        tracing::warn!(pos = %pos, sale_id, topic_kind, size, reason = code, detail = message,
            "device message rejected");
        self.events.emit(OpEvent {
            at,
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
            at,
        };
        (Some(record), told)
    }

    /// Which refusals are kept one by one; `[mqtt]` sets its allowance.
    pub fn refusals(&self) -> &Tally {
        &self.refusals
    }

    /// Writes one summary (a log line, a console event, a store row) per POS
    /// and ended minute in which refusals were summed; with `all`, the
    /// current minute's too (at shutdown).
    pub async fn flush_refusal_summaries(&self, all: bool) {
        let now = self.clock.now_millis();
        for s in self.refusals.take_ended(now, all) {
            let detail = s.message();
            let reasons: Vec<String> = s.reasons.iter().map(|(r, n)| format!("{r}:{n}")).collect();
            tracing::warn!(pos = %s.pos, refused = s.summed, reasons = %reasons.join(","),
                "device refusals summed for a minute (counted, not stored one by one)");
            self.events.emit(OpEvent {
                at: now,
                pos: s.pos.to_string(),
                sale_id: None,
                external_reference: None,
                kind: "rejected".into(),
                detail: format!("device messages rejected: {detail}"),
                state: None,
            });
            let record = RejectionRecord {
                pos: s.pos.as_str().to_owned(),
                sale_id: None,
                code: SUMMARY_CODE.to_owned(),
                message: detail,
                at: now,
            };
            if let Err(e) = self.store.record_rejection(record).await {
                tracing::error!(pos = %s.pos, error = %e, "cannot store a summary of rejections");
            }
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
            None,
        )
        .await;
    }

    /// Makes a stored change visible: the view and the device's retained
    /// state.
    fn commit(
        &self,
        cfg: &PosConfig,
        presence: orders::Presence,
        sale: Sale,
        publish: bool,
        version: u64,
    ) {
        let state = PosState {
            presence,
            current: Some(sale),
        };
        let v = Arc::new(view(cfg, state, &self.account, version));
        // Shown before told: a device may poll the moment it hears its state.
        self.views.insert(cfg.id.clone(), Arc::clone(&v));
        if let Some(s) = v.state.current.as_ref().filter(|_| publish) {
            self.send(Tell::Stored {
                sale: Box::new(s.clone()),
                version,
            });
        }
    }

    fn now(&self) -> Given {
        Given {
            now: self.clock.now_millis(),
            random: rand::random(),
            auto_refund: self.auto_refund,
        }
    }

    /// Applies a command to a POS: decide, store, show, tell. A decision
    /// the store refuses as stale is made again on the stored state.
    pub async fn execute(&self, pos: &PosId, cmd: Command) -> Result<Outcome, BookError> {
        self.execute_as(pos, cmd, false).await
    }

    /// [`Book::execute`] for a device message this instance's broker session
    /// kept for it while it was away: one that names a sale of its POS other
    /// than the current one was applied then, by another instance, and is
    /// not applied again ([`Book::applied_while_away`]), however often the
    /// decision is made again.
    pub async fn execute_replayed(&self, pos: &PosId, cmd: Command) -> Result<Outcome, BookError> {
        self.execute_as(pos, cmd, true).await
    }

    async fn execute_as(
        &self,
        pos: &PosId,
        cmd: Command,
        replayed: bool,
    ) -> Result<Outcome, BookError> {
        let (Some(cfg), Some(lock)) = (self.pos.get(pos), self.locks.get(pos)) else {
            return Err(BookError::UnknownPos(pos.to_string()));
        };
        let _guard = lock.lock().await;
        let mut attempts = 0;
        loop {
            if replayed && self.applied_while_away(pos, &cmd).await? {
                tracing::info!(pos = %pos, sale_id = cmd.device_sale_id().map(|s| s.as_str()),
                    "a message kept by this instance's session while it was away names an older sale: applied then elsewhere, not again");
                return Ok(Outcome::Nothing);
            }
            match self
                .execute_locked(cfg, pos, cmd.clone(), attempts > 0)
                .await
            {
                Err(BookError::Store(stale @ StoreError::Stale { .. }))
                    if attempts < STALE_RETRIES =>
                {
                    attempts += 1;
                    self.reload(cfg, &stale).await?;
                }
                r => return r,
            }
        }
    }

    /// [`Book::execute`] with the POS's lock held: one decision. `again`:
    /// a decision made again after a stale one, on a change stored
    /// elsewhere, whose device was told by whoever stored it.
    async fn execute_locked(
        &self,
        cfg: &PosConfig,
        pos: &PosId,
        cmd: Command,
        again: bool,
    ) -> Result<Outcome, BookError> {
        let current = self
            .view(pos)
            .ok_or_else(|| BookError::UnknownPos(pos.to_string()))?;
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
                    let outcome = orders::rules::deliver(&older, *ok, reason.clone(), self.now());
                    match &outcome {
                        Outcome::Changed { sale, event } => {
                            let version = self.record(&current, sale, event, false).await?;
                            self.moved_to(cfg, &current, version);
                            self.log_event(Some(&older), sale, event);
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
                // A failed delivery changes nothing the device must hear.
                let publish =
                    !matches!(event, SaleEvent::Delivered { .. }) && self.shown_to_device(sale);
                let version = self.record(&current, sale, event, publish).await?;
                self.log_event(current.state.current.as_ref(), sale, event);
                self.wake_refunds(sale);
                self.commit(cfg, current.state.presence, sale.clone(), publish, version);
                self.follow_up(cfg, sale, event);
            }
            // The same message, applied by another instance in between:
            // the device heard its state from there. A repeated message is
            // answered by the leader alone: every instance hears it.
            Outcome::Republish if again || !self.leads() => {}
            // Or the leader read the change before it heard the message.
            Outcome::Republish
                if self
                    .followed
                    .get(pos)
                    .is_some_and(|v| *v == current.version) => {}
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
            Outcome::Rejected { sale_id, why } => {
                // A refusal writes nothing the store could refuse as stale:
                // with several instances its view is checked against the
                // store first, and a view that moved on decides again.
                if self.shared.load(Ordering::Acquire) {
                    let stored = self.store.pos_head(pos.as_str()).await?.version;
                    if stored != current.version {
                        return Err(BookError::Store(StoreError::Stale {
                            pos: pos.to_string(),
                            version: stored,
                        }));
                    }
                }
                self.refuse(pos, sale_id.as_ref(), why).await
            }
            Outcome::Presence(p) => {
                let said = if p.is_offline() {
                    "device offline"
                } else {
                    "device online"
                };
                tracing::info!(pos = %pos, online = !p.is_offline(), "{said}");
                self.events.emit(OpEvent {
                    at: self.clock.now_millis(),
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
                self.views.insert(
                    pos.clone(),
                    Arc::new(view(cfg, state, &self.account, current.version)),
                );
            }
            Outcome::Nothing => {}
        }
        Ok(outcome)
    }

    /// Settles one merchant order (or Orders API order), fetched from
    /// Mercado Pago by the caller: its approved payments enter the sale's
    /// ledger once each, and the ledger's rules decide what they pay.
    /// `raw` is the merchant order's body as fetched, kept for audits;
    /// `None` for facts that come from a payment resource alone.
    pub async fn settle(
        &self,
        facts: &MerchantOrderFacts,
        raw: Option<String>,
        status: &str,
    ) -> Result<Verdict, BookError> {
        let reference_text = facts.external_reference.clone();
        if let Some(body) = raw {
            self.store
                .record_merchant_order(MerchantOrderRecord {
                    id: facts.id.clone(),
                    external_reference: reference_text.clone(),
                    status: status.to_owned(),
                    body,
                    seen_at: self.clock.now_millis(),
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
        }
        let foreign = || {
            tracing::warn!(merchant_order = %facts.id, external_reference = reference_text.as_deref(),
                reason = "foreign_reference", "merchant order is not for one of our sales; it pays nothing");
            Ok(Verdict::Unpaid("foreign_reference".into()))
        };
        let Some(reference) = reference_text
            .as_deref()
            .and_then(|r| ExternalReference::parse(r).ok())
        else {
            return foreign();
        };
        let mut attempts = 0;
        loop {
            let Some(locked) = self.lock_sale(&reference).await? else {
                return foreign();
            };
            let (pos, sale) = (locked.cfg.id.clone(), &locked.sale);
            let outcome = match orders::settle(sale, facts, self.collector_id, self.now()) {
                Ok(o) => o,
                Err(why) => {
                    tracing::info!(pos = %pos, sale_id = %sale.sale_id, external_reference = %reference,
                        merchant_order = %facts.id, reason = why.code(), detail = %why, "merchant order closes nothing");
                    self.events.emit(OpEvent {
                        at: self.clock.now_millis(),
                        kind: "notification".into(),
                        detail: format!("merchant order {} closes nothing: {why}", facts.id),
                        ..OpEvent::of_sale(sale, "notification", "")
                    });
                    self.check_attended_order(&locked, facts);
                    return Ok(Verdict::Unpaid(why.code().to_owned()));
                }
            };
            let Outcome::Changed {
                sale: changed,
                event,
            } = outcome
            else {
                tracing::info!(pos = %pos, sale_id = %sale.sale_id, external_reference = %reference,
                    merchant_order = %facts.id, "payments already recorded");
                return Ok(Verdict::Duplicate);
            };
            // Money for a sale that is no longer payable tells the device nothing.
            let publish = locked.is_current && matches!(event, SaleEvent::Paid { .. });
            let version = match self.record(&locked.view, &changed, &event, publish).await {
                Ok(version) => version,
                Err(stale @ StoreError::Stale { .. }) if attempts < STALE_RETRIES => {
                    attempts += 1;
                    self.reload(locked.cfg, &stale).await?;
                    continue;
                }
                Err(StoreError::AlreadyClosed(_)) => {
                    tracing::info!(pos = %pos, external_reference = %reference, merchant_order = %facts.id,
                        "sale already closed (store)");
                    return Ok(Verdict::Duplicate);
                }
                Err(e @ StoreError::ForeignPayment { .. }) => {
                    tracing::error!(pos = %pos, external_reference = %reference, merchant_order = %facts.id,
                        error = %e, "a payment reported for this sale is another sale's: nothing recorded");
                    return Ok(Verdict::Unpaid("foreign_payment".into()));
                }
                Err(e) => return Err(e.into()),
            };
            self.log_event(Some(sale), &changed, &event);
            self.wake_refunds(&changed);
            let settlement = match event {
                SaleEvent::Paid { .. } => Verdict::Paid {
                    reference: reference.clone(),
                },
                SaleEvent::PaymentHeld => Verdict::Held {
                    reference: reference.clone(),
                },
                _ => Verdict::RefundDue {
                    reference: reference.clone(),
                },
            };
            if matches!(settlement, Verdict::Paid { .. }) {
                self.follow_up(locked.cfg, &changed, &event);
            }
            locked.show(self, changed, publish, version);
            return Ok(settlement);
        }
    }

    /// A rejected payment leaves the attended order for a retry, unless
    /// Mercado Pago dropped it: the desk checks, once per payment.
    fn check_attended_order(&self, locked: &Locked<'_>, facts: &MerchantOrderFacts) {
        let sale = &locked.sale;
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
    }

    /// Finds a sale by reference and locks its POS: the current sale of
    /// its POS, or an older one from the store. `None` when it is not ours.
    async fn lock_sale(
        &self,
        reference: &ExternalReference,
    ) -> Result<Option<Locked<'_>>, BookError> {
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
            .ok_or_else(|| BookError::UnknownPos(pos.to_string()))?;
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
        if sale.ledger.owes_auto() {
            self.refunds_due.notify_one();
        }
    }

    /// The turn to refund money of `reference`: held from reading the
    /// ledger to recording what Mercado Pago made.
    /// Across every instance sharing the store, too: the ledger is then
    /// read from the store ([`Book::stored_sale`]), where the other
    /// instances' refunds are, whether or not this one has heard of them.
    pub async fn refund_turn(
        &self,
        reference: &ExternalReference,
    ) -> Result<RefundTurn<'_>, BookError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        reference.hash(&mut h);
        let here = self.refund_turns[(h.finish() % REFUND_TURNS as u64) as usize]
            .lock()
            .await;
        let everywhere = self.store.exclusive(&format!("refund {reference}")).await?;
        Ok(RefundTurn {
            _here: here,
            _everywhere: everywhere,
        })
    }

    /// A sale as the store has it: what a refund plans from.
    pub async fn stored_sale(
        &self,
        reference: &ExternalReference,
    ) -> Result<Option<Sale>, BookError> {
        Ok(self.store.sale(reference).await?)
    }

    /// Signalled whenever a refund qrgate must make comes due.
    pub fn refunds_due(&self) -> Arc<Notify> {
        Arc::clone(&self.refunds_due)
    }

    /// The `paid` state of every current sale whose device has not
    /// confirmed delivery: republished until it does, the same message each
    /// time (docs/decisions.md, "The device's state topic").
    pub fn undelivered(&self) -> Vec<Sale> {
        self.views
            .iter()
            .filter_map(|v| {
                v.state
                    .current
                    .as_ref()
                    .filter(|s| s.is_paid_undelivered())
                    .cloned()
            })
            .collect()
    }

    /// Tells a POS's device its state as the store has it now: for an
    /// outbox row its instance left unpublished past its lease (it died, or
    /// lost the broker). What the row owed is marked told once published,
    /// or at once when the device has nothing to hear.
    pub async fn retell(&self, pos: &str) -> Result<(), BookError> {
        let cfg_lock = PosId::parse(pos)
            .ok()
            .and_then(|id| Some((self.pos.get(&id)?, self.locks.get(&id)?)));
        let Some((cfg, lock)) = cfg_lock else {
            tracing::warn!(
                pos,
                "an outbox row for a POS this instance does not serve: marked told"
            );
            let version = self.store.pos_head(pos).await?.version;
            self.store.outbox_told(&[(pos.to_owned(), version)]).await?;
            return Ok(());
        };
        let _guard = lock.lock().await;
        let version = self.read_again(cfg).await?;
        let shown = self
            .view(&cfg.id)
            .and_then(|v| v.state.current.clone())
            .filter(|s| self.shown_to_device(s));
        match shown {
            Some(sale) => self.send(Tell::Stored {
                sale: Box::new(sale),
                version,
            }),
            None => self.store.outbox_told(&[(pos.to_owned(), version)]).await?,
        }
        Ok(())
    }

    /// Tells a sale's device its state again.
    pub fn republish(&self, sale: Sale) {
        self.send(Tell::State(Box::new(sale)));
    }

    /// Records refunds Mercado Pago made of a sale's payments (those not
    /// recorded yet), and tells the device (`refunded`, retained) when they
    /// returned what the sale kept and it is its POS's latest. `None` when
    /// the sale is not ours; the sale as it is after, otherwise.
    pub async fn record_refunds(
        &self,
        reference: &ExternalReference,
        made: &[(orders::MpId, Refund)],
    ) -> Result<Option<Sale>, BookError> {
        let mut attempts = 0;
        loop {
            let Some(locked) = self.lock_sale(reference).await? else {
                return Ok(None);
            };
            let Some(Outcome::Changed { sale, event }) =
                orders::record_refunds(&locked.sale, made, self.clock.now_millis())
            else {
                return Ok(Some(locked.sale.clone()));
            };
            let publish =
                locked.is_current && matches!(event, SaleEvent::RefundedByOperator { .. });
            let version = match self.record(&locked.view, &sale, &event, publish).await {
                Ok(version) => version,
                Err(stale @ StoreError::Stale { .. }) if attempts < STALE_RETRIES => {
                    attempts += 1;
                    self.reload(locked.cfg, &stale).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.log_event(Some(&locked.sale), &sale, &event);
            let after = sale.clone();
            locked.show(self, sale, publish, version);
            return Ok(Some(after));
        }
    }
}

/// The turn to refund one sale's money ([`Book::refund_turn`]).
pub struct RefundTurn<'a> {
    _here: tokio::sync::MutexGuard<'a, ()>,
    _everywhere: Option<crate::store::Exclusive>,
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
    /// Makes a stored change visible when the sale is its POS's current
    /// one; the POS's view moves to the new version either way.
    fn show(self, book: &Book, sale: Sale, publish: bool, version: u64) {
        if self.is_current {
            book.commit(self.cfg, self.view.state.presence, sale, publish, version);
        } else {
            book.moved_to(self.cfg, &self.view, version);
        }
    }
}

fn view(cfg: &PosConfig, state: PosState, account: &MpAccount, version: u64) -> PosView {
    let answer = poll_answer::render(cfg, &state, account);
    let served = state.busy_sale().is_some_and(|s| s.served_at.is_some());
    PosView {
        state,
        answer,
        version,
        served_asked: AtomicBool::new(served),
    }
}

/// One line per event that matters, with the fields operators search by.
/// The ledger's own changes (payments held, money owed, refunds made) get
/// their lines from [`ledger_lines`], one per payment.
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
        SaleEvent::Priced | SaleEvent::Served | SaleEvent::Placed => tracing::info!(
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
        SaleEvent::Delivered { ok: true, .. } => {
            tracing::info!(pos, sale_id, external_reference = reference, "{msg}")
        }
        SaleEvent::Delivered { ok: false, reason } => tracing::error!(
            pos,
            sale_id,
            external_reference = reference,
            reason = reason.as_deref(),
            "{msg}"
        ),
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
            state = sale.state.as_str(),
            "{msg}"
        ),
        // Their lines are the ledger's, one per payment.
        SaleEvent::PaymentHeld | SaleEvent::RefundDue | SaleEvent::Refunded { .. } => {}
    }
}

/// What an owed portion's log line says, by its reason.
fn owed_message(reason: RefundReason) -> &'static str {
    match reason {
        RefundReason::LatePayment => "payment for a sale that was no longer payable: refund due",
        RefundReason::DoublePayment => {
            "payment the sale did not need (it was paid by another): refund due"
        }
        RefundReason::DeliveryFailed => "device failed to deliver a paid sale: payment refund due",
        RefundReason::Overpayment => {
            "payment carried more than the sale's total: the difference is owed back"
        }
        RefundReason::OperatorRefund => {
            "an operator's refund returned less than it recorded: the rest is owed back"
        }
    }
}

/// One line per payment the change touched: held, owed back, refunded.
/// Returns the same facts as short texts, for the console's feed.
fn ledger_lines(before: Option<&Sale>, sale: &Sale) -> Vec<String> {
    let old = before.map(|s| &s.ledger);
    let (pos, sale_id) = (sale.pos.as_str(), sale.sale_id.as_str());
    let reference = sale.external_reference.as_str();
    let currency = sale.currency.code();
    let money = |v: rust_decimal::Decimal| crate::money::Amount::new(v, sale.currency).to_string();
    let mut said = Vec::new();
    for p in sale.ledger.payments() {
        let prev = old.and_then(|l| l.get(&p.id));
        let (payment, merchant_order) = (p.id.to_string(), p.merchant_order.to_string());
        if prev.is_none() && p.held {
            tracing::info!(pos, sale_id, external_reference = reference, merchant_order, payment,
                amount = %money(p.amount), currency, "approved payment held until the sale closes or ends");
            said.push(format!("payment {payment} ({}) held", money(p.amount)));
        }
        for o in p
            .owed
            .iter()
            .filter(|o| o.is_open() && o.at == sale.updated_at)
        {
            if prev.is_some_and(|q| q.owed.iter().any(|x| x.at == o.at && x.reason == o.reason)) {
                continue;
            }
            tracing::error!(pos, sale_id, external_reference = reference, merchant_order, payment,
                amount = %money(o.amount), currency, reason = o.reason.as_str(), auto_refund = o.auto,
                state = sale.state.as_str(), "{}", owed_message(o.reason));
            said.push(format!(
                "payment {payment}: {} {currency} owed back ({}{})",
                money(o.amount),
                o.reason.as_str(),
                if o.auto {
                    ", refunded by qrgate"
                } else {
                    ", for the operator"
                }
            ));
        }
        for r in &p.refunds {
            if prev.is_some_and(|q| q.refunds.iter().any(|x| x.id == r.id)) {
                continue;
            }
            let refund = r.id.to_string();
            tracing::info!(pos, sale_id, external_reference = reference, merchant_order, payment, refund,
                amount = %money(r.amount), currency, by = r.by.as_str(), "payment refunded");
            said.push(format!(
                "payment {payment}: {} {currency} refunded (refund {refund}, by {})",
                money(r.amount),
                r.by
            ));
        }
    }
    said
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
            "sale paid with an overpayment: the difference is owed back"
        }
        SaleEvent::Paid { overpaid: false } => "sale paid",
        SaleEvent::PaymentHeld => "approved payment held until the sale closes or ends",
        SaleEvent::Cancelled if sale.served_at.is_some() => {
            "sale cancelled after it was served to Mercado Pago: a payment may still arrive"
        }
        SaleEvent::Cancelled => "sale cancelled",
        SaleEvent::Expired => "sale expired",
        SaleEvent::Delivered { ok: true, .. } => "device confirmed delivery",
        SaleEvent::Delivered { ok: false, .. } => {
            "device failed to deliver a paid sale: refund due"
        }
        SaleEvent::RefundDue => "money the sale cannot keep: refund due",
        SaleEvent::Refunded { .. } => "money owed back refunded",
        SaleEvent::CancelledByOperator { .. } => "sale cancelled by the operator",
        SaleEvent::RefundedByOperator { .. } => "sale refunded by the operator",
    }
}

impl Book {
    /// The log lines and the console event of one stored sale event, saying
    /// the same thing; `before` is the sale as it was, for the ledger's news.
    fn log_event(&self, before: Option<&Sale>, sale: &Sale, event: &SaleEvent) {
        log_line(sale, event);
        let news = ledger_lines(before, sale);
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
        if !news.is_empty() {
            detail.push_str(": ");
            detail.push_str(&news.join("; "));
        }
        self.events.emit(OpEvent::of_sale(sale, name, &detail));
    }
}
