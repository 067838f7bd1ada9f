//! The durable record. Every change to a sale is written here before it is
//! acknowledged to a device or made visible to polls; the in-memory order
//! book is rebuilt from it at start. One trait, two engines: SQLite (WAL,
//! fsync per commit) is the embedded default; PostgreSQL (`[store] url`) is
//! the shared one.

pub mod backup;
pub mod fence;
mod legacy;
mod lock;
pub mod postgres;
mod sqlite;

use async_trait::async_trait;

use crate::orders::{ExternalReference, MpId, Sale, SaleEvent};

pub use lock::{lock_path, DbLock, Holder, LockError};
pub use postgres::{PgLock, PgStore};
pub use sqlite::SqliteStore;

/// What keeps this process its database's only qrgate until it exits: the
/// SQLite file's flock, or PostgreSQL's advisory lock.
#[derive(Debug)]
pub enum InstanceLock {
    File(DbLock),
    Postgres(PgLock),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sale is already closed by a payment: the unique key that makes
    /// `paid` happen once.
    #[error("sale {0} is already closed")]
    AlreadyClosed(String),
    /// The payment is already recorded in another sale's ledger.
    #[error("payment {payment} is already recorded for sale {owner}")]
    ForeignPayment { payment: String, owner: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt record for {reference}: {reason}")]
    Corrupt { reference: String, reason: String },
    /// The POS changed since the change was decided (another instance, or
    /// a view read before the last write): nothing was written. The caller
    /// decides again on the stored state ([`Store::pos_head`]).
    #[error("POS {pos} moved on to version {version}: decided on an older state")]
    Stale { pos: String, version: u64 },
    /// The singletons' write of leadership term `term`, made after another
    /// instance began to lead: nothing was written ([`fence`]).
    #[error("this instance no longer leads (term {term} is over): write refused")]
    Fenced { term: u64 },
}

/// Held while a turn spans every instance sharing the store
/// ([`Store::exclusive`]); dropping it ends the turn.
pub struct Exclusive(pub Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Exclusive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exclusive")
    }
}

/// What an instance hears of changes other instances stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The POS's sales changed: its version is now `version`.
    Change { pos: String, version: u64 },
    /// Changes may have gone unheard (the feed was down): catch up.
    Gap,
    /// A notification another instance wrote to the inbox, for the leader.
    Inbox(InboxEntry),
}

/// A POS's place in the record: how many changes to its sales were stored
/// (its version), and its latest sale.
#[derive(Debug, Clone, Default)]
pub struct PosHead {
    pub version: u64,
    pub latest: Option<Sale>,
}

/// A merchant order as fetched, kept for the operator and for audits.
#[derive(Debug, Clone)]
pub struct MerchantOrderRecord {
    pub id: MpId,
    pub external_reference: Option<String>,
    pub status: String,
    pub body: String,
    pub seen_at: i64,
    pub payments: Vec<PaymentRecord>,
}

/// A device message refused, kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionRecord {
    pub pos: String,
    pub sale_id: Option<String>,
    pub code: String,
    pub message: String,
    pub at: i64,
}

/// A payment as the merchant order that carries it says.
#[derive(Debug, Clone)]
pub struct PaymentRecord {
    pub id: MpId,
    pub status: String,
    pub amount: String,
    pub currency: Option<String>,
}

/// Which sales the operator asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaleFilter {
    pub pos: Option<String>,
    /// A state's name (`pending`, `paid`...).
    pub state: Option<String>,
    /// Only sales that owe money back.
    pub owing: bool,
    /// Accepted at or after (unix millis).
    pub since: Option<i64>,
    pub limit: usize,
}

/// One event of a sale: (unix millis, event name, JSON detail).
pub type TimelineEntry = (i64, String, String);

/// A notification written to the inbox: the resource it names, kept until
/// it was fetched and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// `merchant_order`, `payment` or `order`.
    pub topic: String,
    pub id: String,
    /// When the first notification of this round arrived (unix millis).
    pub received_at: i64,
    /// Grows with every notification, so a fetch that started before the
    /// latest one does not mark it done.
    pub generation: i64,
    pub attempts: u32,
    pub next_at: i64,
}

/// An operator's refund request, kept by its key: the calls it makes and,
/// once known, the answer it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub key: String,
    pub external_reference: String,
    /// The refund calls, as JSON.
    pub plan: String,
    /// The HTTP status and JSON body answered, once final.
    pub answer: Option<(u16, String)>,
    pub at: i64,
}

/// A paid sale to search again for payments nobody notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recheck {
    pub external_reference: ExternalReference,
    pub paid_at: i64,
    /// How many searches were made since it was paid.
    pub done: u32,
}

/// Where a page of retention candidates starts and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPage {
    /// Only sales whose last change is older (unix millis).
    pub ended_before: i64,
    /// The last candidate of the previous page: (its last change, its row).
    pub after: (i64, i64),
    pub limit: usize,
    /// How many searches after payment are configured: a sale searched
    /// fewer times still has one due.
    pub rechecks: u32,
    /// Read each candidate's whole record, for the archive.
    pub with_records: bool,
}

/// A sale that may leave the live database, and what decides it.
#[derive(Debug, Clone)]
pub struct RetentionCandidate {
    pub sale: Sale,
    /// Where the next page starts: (its last change, its row).
    pub position: (i64, i64),
    /// A newer sale of its POS exists (the latest one is the device's
    /// retained state and stays).
    pub superseded: bool,
    /// A search of it after it was paid is still due.
    pub rechecking: bool,
    /// An operator's refund of it went out and has no final answer yet.
    pub refunding: bool,
    /// Its timeline, ledger rows and merchant orders, when asked for.
    pub record: Option<serde_json::Value>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably writes the sale's new state and the event that produced it,
    /// decided on version `seen` of its POS, and answers the POS's new
    /// version. Every change to a POS's sales moves its version on by one,
    /// under the POS's lock in the database, so a change decided on any
    /// older state is refused with [`StoreError::Stale`] and writes nothing.
    /// A `Paid` event whose sale is already closed is refused with
    /// [`StoreError::AlreadyClosed`], whatever the caller believed.
    async fn record(&self, sale: &Sale, event: &SaleEvent, seen: u64) -> Result<u64, StoreError>;

    /// [`Store::record`], for a change its device must be told: a store
    /// several instances share also keeps, in the same transaction, an
    /// outbox row for it, which this instance marks once it published the
    /// change ([`Store::outbox_told`]) and which any instance's sweep
    /// publishes if it did not ([`Store::outbox_due`]). A store one process
    /// writes needs none: that process republishes every POS's state at
    /// each connection to the broker, a restart included.
    async fn record_to_tell(
        &self,
        sale: &Sale,
        event: &SaleEvent,
        seen: u64,
    ) -> Result<u64, StoreError> {
        self.record(sale, event, seen).await
    }

    /// A turn named `key` that no other instance sharing the store holds
    /// until the answer is dropped: `None` for a store one process writes,
    /// whose turns are its own. It ends with the process, crash included.
    async fn exclusive(&self, key: &str) -> Result<Option<Exclusive>, StoreError> {
        let _ = key;
        Ok(None)
    }

    /// Marks the outbox rows of each POS up to its version published.
    async fn outbox_told(&self, told: &[(String, u64)]) -> Result<(), StoreError> {
        let _ = told;
        Ok(())
    }

    /// POS with outbox rows left unpublished past their lease, each with
    /// its latest such version: at most `limit`.
    async fn outbox_due(&self, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// The POS's version and latest sale, read together.
    async fn pos_head(&self, pos: &str) -> Result<PosHead, StoreError>;

    /// Every POS's version (a POS never written has none: version 0).
    async fn pos_versions(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// The changes other writers store, as they commit, until `shutdown`;
    /// `None` for an engine only one process writes (SQLite).
    fn changes(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<Heard>> {
        let _ = shutdown;
        None
    }

    /// Whether this instance, named `name`, leads the singletons: the
    /// leadership term while it does, `None` while another instance does,
    /// until `shutdown`. A store only one process writes (SQLite) is led by
    /// it alone, at term 0, unfenced.
    fn leadership(
        &self,
        name: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::sync::watch::Receiver<Option<u64>> {
        let _ = (name, shutdown);
        tokio::sync::watch::channel(Some(0)).1
    }

    async fn record_merchant_order(&self, mo: MerchantOrderRecord) -> Result<(), StoreError>;

    async fn record_rejection(&self, r: RejectionRecord) -> Result<(), StoreError>;

    /// A POS's refused device messages, newest first.
    async fn rejections(&self, pos: &str, limit: usize)
        -> Result<Vec<RejectionRecord>, StoreError>;

    /// Each POS's latest refused device message (POS that have none are
    /// absent).
    async fn latest_rejections(&self) -> Result<Vec<RejectionRecord>, StoreError>;

    /// Each POS's latest sale, to rebuild the order book at start.
    async fn latest_sales(&self) -> Result<Vec<Sale>, StoreError>;

    async fn sale(&self, reference: &ExternalReference) -> Result<Option<Sale>, StoreError>;

    /// A POS's latest sale with the device's `sale_id`.
    async fn sale_by_device_id(&self, pos: &str, sale_id: &str)
        -> Result<Option<Sale>, StoreError>;

    /// The events of a sale, oldest first: (unix millis, event name, detail).
    async fn timeline(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<TimelineEntry>, StoreError>;

    /// Sales served to Mercado Pago since `since` (unix millis) that no
    /// payment has settled yet: what reconciliation searches for.
    async fn unsettled_served(&self, since: i64) -> Result<Vec<Sale>, StoreError>;

    /// Sales with a refund qrgate must make itself and has not made yet.
    async fn pending_auto_refunds(&self) -> Result<Vec<Sale>, StoreError>;

    /// How many sales owe money back.
    async fn count_owing(&self) -> Result<u64, StoreError>;

    // ---- The notification inbox ----

    /// Durably notes a notification for `(topic, id)`: a new entry, or one
    /// more notification folded into a pending one (its generation grows and
    /// it is due now), or a done one opened again.
    async fn inbox_add(&self, topic: &str, id: &str, now: i64) -> Result<InboxEntry, StoreError>;

    /// Entries not done yet, oldest first.
    async fn inbox_pending(&self) -> Result<Vec<InboxEntry>, StoreError>;

    /// Marks an entry done, unless a notification came after `generation`:
    /// then the newer generation, which must be fetched again. `None` when
    /// the entry is done (now, or already).
    async fn inbox_done(
        &self,
        topic: &str,
        id: &str,
        generation: i64,
        now: i64,
        outcome: &str,
    ) -> Result<Option<i64>, StoreError>;

    /// Notes a failed fetch of `generation` and when to try again (nothing
    /// when a newer notification came meanwhile: it is due now).
    async fn inbox_retry(
        &self,
        topic: &str,
        id: &str,
        generation: i64,
        attempts: u32,
        next_at: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    // ---- Operator refund requests ----

    async fn refund_request(&self, key: &str) -> Result<Option<RefundRequest>, StoreError>;

    /// Requests whose calls went out without a final answer (cut by a
    /// failure or a crash), oldest first.
    async fn unanswered_refund_requests(&self) -> Result<Vec<RefundRequest>, StoreError>;

    /// Writes a request (its plan, and its answer once final).
    async fn put_refund_request(&self, r: RefundRequest) -> Result<(), StoreError>;

    // ---- Searching paid sales again ----

    /// Paid sales searched `done` times since they were paid, paid at or
    /// before `paid_before`, oldest first.
    async fn due_rechecks(
        &self,
        done: u32,
        paid_before: i64,
        limit: usize,
    ) -> Result<Vec<Recheck>, StoreError>;

    /// Notes one more search of a paid sale; the `last` one forgets it.
    async fn recheck_done(
        &self,
        reference: &ExternalReference,
        done: u32,
        last: bool,
    ) -> Result<(), StoreError>;

    /// Forgets done inbox entries, answered refund requests and searches of
    /// paid sales older than `before` (unix millis).
    async fn prune(&self, before: i64) -> Result<(), StoreError>;

    async fn merchant_order(&self, id: &MpId) -> Result<Option<MerchantOrderRecord>, StoreError>;

    // ---- Retention ----

    /// Sales last changed before `page.ended_before`, in the order they last
    /// changed, from just after `page.after`: at most `page.limit`, each with
    /// what retention must know beyond its body.
    async fn retention_candidates(
        &self,
        page: RetentionPage,
    ) -> Result<Vec<RetentionCandidate>, StoreError>;

    /// Removes each sale with its timeline, ledger, closing and merchant
    /// orders, if it has not changed since `updated_at` and no operator's
    /// refund of it is under way; how many were removed.
    async fn forget_sales(&self, sales: Vec<(ExternalReference, i64)>)
        -> Result<usize, StoreError>;

    /// Removes up to `limit` of the oldest refused device messages kept from
    /// before `before`; how many were removed.
    async fn forget_rejections(&self, before: i64, limit: usize) -> Result<usize, StoreError>;

    /// Sales for the operator, newest first.
    async fn sales(&self, filter: SaleFilter) -> Result<Vec<Sale>, StoreError>;

    /// The merchant orders (or Orders API orders) seen for a reference, in
    /// the order they were first seen, each with its payments.
    async fn merchant_orders_of(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<MerchantOrderRecord>, StoreError>;

    /// A real write, for readiness.
    async fn check_writable(&self) -> Result<(), StoreError>;

    // ---- POS registration at Mercado Pago (`qrgate pos register`) ----

    /// Keeps what Mercado Pago answered for one POS, replacing the POS's
    /// previous record.
    async fn record_registration(&self, r: RegistrationRecord) -> Result<(), StoreError>;

    /// Every POS's latest registration, by POS id.
    async fn registrations(&self) -> Result<Vec<RegistrationRecord>, StoreError>;
}

/// What `qrgate pos register` last did for one POS and what Mercado Pago
/// answered, for the console. The url is kept with its poll key masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationRecord {
    pub pos: String,
    pub mp_external_id: String,
    /// The store's external id.
    pub store: String,
    pub mp_pos_id: u64,
    pub url: Option<String>,
    pub qr_image: Option<String>,
    pub qr_template_document: Option<String>,
    pub qr_template_image: Option<String>,
    /// `created`, `updated` or `unchanged`.
    pub action: String,
    /// Unix millis.
    pub at: i64,
}
