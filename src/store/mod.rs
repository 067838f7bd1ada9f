//! The durable record. Every change to a sale is written here before it is
//! acknowledged to a device or made visible to polls; the in-memory order
//! book is rebuilt from it at start. Behind a trait because a second engine
//! is planned; SQLite (WAL, fsync per commit) is the embedded default.

mod sqlite;

use async_trait::async_trait;

use crate::orders::{ExternalReference, MpId, Sale, SaleEvent};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sale is already closed by a payment: the unique key that makes
    /// `paid` happen once.
    #[error("sale {0} is already closed")]
    AlreadyClosed(String),
    /// This payment is already recorded as due for refund.
    #[error("payment {0} is already recorded as refund due")]
    AlreadyDue(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt record for {reference}: {reason}")]
    Corrupt { reference: String, reason: String },
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
    /// Accepted at or after (unix millis).
    pub since: Option<i64>,
    pub limit: usize,
}

/// One event of a sale: (unix millis, event name, JSON detail).
pub type TimelineEntry = (i64, String, String);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably writes the sale's new state and the event that produced it.
    /// A `Paid` event whose sale is already closed is refused with
    /// [`StoreError::AlreadyClosed`], whatever the caller believed.
    async fn record(&self, sale: &Sale, event: &SaleEvent) -> Result<(), StoreError>;

    async fn record_merchant_order(&self, mo: MerchantOrderRecord) -> Result<(), StoreError>;

    async fn record_rejection(&self, r: RejectionRecord) -> Result<(), StoreError>;

    /// A POS's refused device messages, newest first.
    async fn rejections(&self, pos: &str, limit: usize)
        -> Result<Vec<RejectionRecord>, StoreError>;

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

    async fn merchant_order(&self, id: &MpId) -> Result<Option<MerchantOrderRecord>, StoreError>;

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
