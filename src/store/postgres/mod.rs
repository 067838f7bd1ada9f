//! PostgreSQL, qrgate's second engine (`[store] url`), with the semantics of
//! the SQLite store method for method: the same tables, the same unique
//! keys, the same answers. Each write is one transaction, committed before
//! the call returns (PostgreSQL's commit is durable: `synchronous_commit`
//! is the server's to keep on); a refused write (a second close of a sale,
//! a change decided on a POS's older version) rolls back alone.
//!
//! A change to a POS's sales moves the POS's version on (`pos_heads`) in
//! its own transaction: the head row's lock orders changes of one POS, so
//! one decided on an older state is refused `Stale`, whoever else wrote.
//!
//! The keys that make money happen once hold in the database itself, so
//! they hold whoever writes: a sale's `external_reference`, its closing,
//! every payment id, every refund id and refund request key, and a POS's
//! open sale id. Two closes of one sale racing from two connections meet
//! on `closings`' primary key: the second waits for the first to commit,
//! then finds the row and is refused.
//!
//! Connections come from a small pool. Every call is bounded in time
//! ([`CALL_TIMEOUT`]): with PostgreSQL unreachable it fails as
//! `Unavailable`, and readiness says so, instead of hanging.

pub mod feed;
pub mod leader;
mod lock;
pub mod migrate;
mod target;

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{IsolationLevel, Row};

pub use lock::{PgLock, PgLockError, INSTANCE_LOCK};
pub use target::{PgTarget, TlsMode, STORE_PASSWORD_ENV};

use super::fence;
use super::sqlite::{event_detail, parse_sale, sale_columns};
use super::{
    Heard, InboxEntry, MerchantOrderRecord, PaymentRecord, PosHead, Recheck, RefundRequest,
    RegistrationRecord, RejectionRecord, RetentionCandidate, RetentionPage, SaleFilter, Store,
    StoreError, TimelineEntry,
};
use crate::orders::ledger::RefundOf;
use crate::orders::{ExternalReference, MpId, Sale, SaleEvent};

/// Connections kept open. Writes of different POS go in parallel, each
/// its own transaction; PostgreSQL groups their commits' WAL flushes.
const POOL_SIZE: usize = 16;

/// The longest a call may take, waiting for a connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PgStore {
    pool: Pool,
    target: PgTarget,
    /// How the change feed's and the leader's sessions connect.
    listen: (
        tokio_postgres::Config,
        tokio_postgres_rustls::MakeRustlsConnect,
    ),
    /// The instance this store writes for (its MQTT client id): named in
    /// what it notifies, so it does not act twice on its own news.
    name: String,
}

/// A PostgreSQL error as the store reports it: the server's own message
/// and code for what it refused, `Unavailable` for a connection that
/// failed or closed.
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Database(format!("{} ({})", db.message(), db.code().code())),
        None => {
            // tokio-postgres says what failed, its sources why.
            let mut why = format!("PostgreSQL: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            StoreError::Unavailable(why)
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

/// Column `i` of a row, a mismatch an error rather than a panic.
fn col<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, StoreError> {
    r.try_get(i)
        .map_err(|e| StoreError::Database(format!("column {i}: {e}")))
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

async fn rows<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.query(&st, params).await.map_err(pg)
}

async fn exec<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&st, params).await.map_err(pg)
}

/// A sale from a row selecting (external_reference, body).
fn sale_row(r: &Row) -> Result<Sale, StoreError> {
    parse_sale(&col::<String>(r, 0)?, &col::<String>(r, 1)?)
}

/// An id as the database keeps it: its text.
fn text_id(id: &MpId) -> String {
    id.to_string()
}

/// An id as JSON: a number when it is one, as Mercado Pago writes it.
fn json_id(text: &str) -> serde_json::Value {
    match MpId::parse(text) {
        Some(MpId::Num(n)) => serde_json::json!(n),
        _ => serde_json::json!(text),
    }
}

impl PgStore {
    /// Connects to `target`, brings its schema up to date, and keeps a pool
    /// of connections. Takes no single-instance lock: `qrgate pos register`
    /// opens it beside the service ([`PgLock`] is the service's).
    pub async fn open(target: &PgTarget, password: Option<&str>) -> Result<PgStore, StoreError> {
        let (config, tls) = target.connector(password)?;
        let listen = (config.clone(), tls.clone());
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A connection PostgreSQL closed (a restart) is seen closed
                // and replaced; anything subtler fails its call, once.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(target::CONNECT_TIMEOUT))
            .recycle_timeout(Some(target::CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL pool: {e}")))?;
        let store = PgStore {
            pool,
            target: target.clone(),
            listen,
            name: String::new(),
        };
        store
            .timed(async {
                let mut c = store.pool.get().await.map_err(pool_error)?;
                migrate::run(&mut c, migrate::MIGRATIONS).await
            })
            .await
            .map_err(|e| match e {
                StoreError::Unavailable(why) => {
                    StoreError::Unavailable(format!("cannot reach {target}: {why}"))
                }
                other => other,
            })?;
        Ok(store)
    }

    /// Opens the store a URL names, without a password (tests, tools on a
    /// trusted socket).
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let target = PgTarget::parse(url)
            .map_err(|e| StoreError::Unavailable(format!("[store] url {e}")))?;
        PgStore::open(&target, None).await
    }

    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The store of instance `name` (`[mqtt] client_id`).
    pub fn named(mut self, name: &str) -> PgStore {
        self.name = name.to_owned();
        self
    }

    /// `f`, failed as `Unavailable` when it takes longer than
    /// [`CALL_TIMEOUT`].
    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(CALL_TIMEOUT, f)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "PostgreSQL did not answer within {} s",
                    CALL_TIMEOUT.as_secs()
                )))
            })
    }

    async fn conn(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// One query on its own, each row read by `row`.
    async fn select<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        row: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.timed(async {
            let c = self.conn().await?;
            rows(&c, sql, params).await?.iter().map(row).collect()
        })
        .await
    }

    /// One statement on its own, committed when it returns: the rows it
    /// changed. The singletons' statement is fenced by their term.
    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            if fence::current().is_none() {
                return exec(&c, sql, params).await;
            }
            let tx = c.transaction().await.map_err(pg)?;
            fenced(&tx).await?;
            let n = exec(&tx, sql, params).await?;
            tx.commit().await.map_err(pg)?;
            Ok(n)
        })
        .await
    }
}

/// The database's clock in unix millis: leases are set and compared on one
/// clock, whichever instance's host drifts.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The class of the turns every instance takes in turn (the first half of
/// a two-part advisory key; the second is the turn's hash).
const EXCLUSIVE_LOCK: i32 = 0x7172_0004;

/// How long the instance that stored a change has to publish what it owes
/// the device before the outbox sweep publishes it instead.
pub const OUTBOX_LEASE: Duration = Duration::from_secs(3);

impl PgStore {
    /// A change, in one transaction: the POS's version moved on, the sale
    /// and its event written, the change notified to every instance, and
    /// (`tell`) the outbox row this instance owes its device.
    async fn write_change(
        &self,
        sale: &Sale,
        event: &SaleEvent,
        seen: u64,
        tell: bool,
    ) -> Result<u64, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            fenced(&tx).await?;
            let version = move_head(&tx, sale.pos.as_str(), seen).await?;
            write_sale(&tx, sale, event).await?;
            if tell {
                exec(
                    &tx,
                    &format!(
                        "INSERT INTO outbox (pos, version, owner, lease_until)
                         VALUES ($1, $2, $3, {DB_NOW} + $4)"
                    ),
                    &[
                        &sale.pos.as_str(),
                        &i64::try_from(version).unwrap_or(i64::MAX),
                        &self.name,
                        &(OUTBOX_LEASE.as_millis() as i64),
                    ],
                )
                .await?;
            }
            // Delivered at commit to every instance listening (`feed`).
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&feed::CHANNEL, &format!("{} {version}", sale.pos.as_str())],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(version)
        })
        .await
    }
}

/// Refuses the singletons' write (the current task's term, if any) once
/// another instance leads. The term's row is read `FOR SHARE`: a new
/// leader's move of the term waits for this transaction to end, so no
/// write of an older term commits after it.
async fn fenced<C: GenericClient>(tx: &C) -> Result<(), StoreError> {
    let Some(term) = fence::current() else {
        return Ok(());
    };
    let current = rows(
        tx,
        "SELECT 1 FROM leadership WHERE id = 1 AND term = $1 FOR SHARE",
        &[&i64::try_from(term).unwrap_or(i64::MAX)],
    )
    .await?;
    if current.is_empty() {
        return Err(StoreError::Fenced { term });
    }
    Ok(())
}

/// The sales row would give its POS a second open sale with this device
/// sale id.
fn open_sale_taken(e: &StoreError, sale: &Sale) -> Option<StoreError> {
    match e {
        StoreError::Database(m) if m.contains(SqlState::UNIQUE_VIOLATION.code()) && m.contains("sales_open_sale_id") => {
            Some(StoreError::Database(format!(
                "POS {} already has an open sale with sale_id {} (its open sale id is unique): {} not written",
                sale.pos, sale.sale_id, sale.external_reference
            )))
        }
        _ => None,
    }
}

async fn write_ledger<C: GenericClient>(tx: &C, sale: &Sale) -> Result<(), StoreError> {
    let reference = sale.external_reference.as_str();
    for p in sale.ledger.payments() {
        let id = text_id(&p.id);
        let inserted = exec(
            tx,
            "INSERT INTO ledger_payments (payment_id, external_reference, merchant_order, amount, seen_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&id, &reference, &text_id(&p.merchant_order), &p.amount.to_string(), &p.seen_at],
        )
        .await?;
        if inserted == 0 {
            let owner = rows(
                tx,
                "SELECT external_reference FROM ledger_payments WHERE payment_id = $1",
                &[&id],
            )
            .await?;
            let holder: String = owner
                .first()
                .map(|r| col(r, 0))
                .transpose()?
                .unwrap_or_default();
            if holder != reference {
                return Err(StoreError::ForeignPayment {
                    payment: p.id.to_string(),
                    owner: holder,
                });
            }
        }
        for r in &p.refunds {
            let of = match r.of {
                RefundOf::Kept => "kept",
                RefundOf::Owed(reason) => reason.as_str(),
            };
            exec(
                tx,
                "INSERT INTO ledger_refunds (refund_id, payment_id, external_reference, amount, \"of\", \"by\", at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[&text_id(&r.id), &id, &reference, &r.amount.to_string(), &of, &r.by, &r.at],
            )
            .await?;
        }
    }
    Ok(())
}

/// Moves the POS's version on from `seen`, or refuses a change decided on
/// an older state. The update takes the head row's lock until the
/// transaction ends: a concurrent change of the same POS waits for it, then
/// finds another version and is refused.
async fn move_head(
    tx: &deadpool_postgres::Transaction<'_>,
    pos: &str,
    seen: u64,
) -> Result<u64, StoreError> {
    let moved = if seen == 0 {
        rows(
            tx,
            "INSERT INTO pos_heads (pos, version) VALUES ($1, 1)
             ON CONFLICT (pos) DO NOTHING RETURNING version",
            &[&pos],
        )
        .await?
    } else {
        rows(
            tx,
            "UPDATE pos_heads SET version = version + 1 WHERE pos = $1 AND version = $2
             RETURNING version",
            &[&pos, &i64::try_from(seen).unwrap_or(i64::MAX)],
        )
        .await?
    };
    if let Some(r) = moved.first() {
        return Ok(version(col(r, 0)?));
    }
    let version = head_version(tx, pos).await?;
    Err(StoreError::Stale {
        pos: pos.to_owned(),
        version,
    })
}

async fn head_version<C: GenericClient>(c: &C, pos: &str) -> Result<u64, StoreError> {
    let found = rows(c, "SELECT version FROM pos_heads WHERE pos = $1", &[&pos]).await?;
    Ok(found
        .first()
        .map(|r| col(r, 0))
        .transpose()?
        .map_or(0, version))
}

fn version(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Whether an event writes ledger rows (a closing, payments, refunds).
fn writes_ledger(event: &SaleEvent) -> bool {
    matches!(
        event,
        SaleEvent::Paid { .. }
            | SaleEvent::PaymentHeld
            | SaleEvent::RefundDue
            | SaleEvent::Refunded { .. }
            | SaleEvent::RefundedByOperator { .. }
    )
}

/// Writes a sale and the event that changed it, in `tx`.
async fn write_sale(
    tx: &deadpool_postgres::Transaction<'_>,
    sale: &Sale,
    event: &SaleEvent,
) -> Result<(), StoreError> {
    let reference = sale.external_reference.as_str();
    if let SaleEvent::Paid { .. } = event {
        let s = sale
            .settled
            .as_ref()
            .ok_or_else(|| StoreError::Database("paid sale without settlement".into()))?;
        let inserted = exec(
            tx,
            "INSERT INTO closings (external_reference, payment_id, merchant_order, at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[
                &reference,
                &text_id(&s.payment_id),
                &text_id(&s.merchant_order),
                &s.at,
            ],
        )
        .await?;
        if inserted == 0 {
            return Err(StoreError::AlreadyClosed(reference.to_owned()));
        }
        exec(
            tx,
            "INSERT INTO rechecks (external_reference, paid_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&reference, &s.at],
        )
        .await?;
    }
    // Only the events that add payments or refunds touch the ledger tables.
    if writes_ledger(event) {
        write_ledger(tx, sale).await?;
    }
    let (unsettled, owes) = sale_columns(sale);
    let body = serde_json::to_string(sale).map_err(|e| StoreError::Database(e.to_string()))?;
    // The row and its event in one statement: one round trip.
    exec(
        tx,
        "WITH written AS (
           INSERT INTO sales (external_reference, pos, sale_id, state, accepted_at, updated_at, served_at,
                              unsettled, body, owes)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (external_reference) DO UPDATE SET
             state = excluded.state, updated_at = excluded.updated_at, served_at = excluded.served_at,
             unsettled = excluded.unsettled, body = excluded.body, owes = excluded.owes
           RETURNING external_reference)
         INSERT INTO sale_events (external_reference, at, event, detail)
         SELECT external_reference, $6, $11, $12 FROM written",
        &[
            &reference,
            &sale.pos.as_str(),
            &sale.sale_id.as_str(),
            &sale.state.as_str(),
            &sale.accepted_at,
            &sale.updated_at,
            &sale.handed_at(),
            &unsettled,
            &body,
            &owes,
            &event.name(),
            &event_detail(sale, event),
        ],
    )
    .await
    .map_err(|e| open_sale_taken(&e, sale).unwrap_or(e))?;
    Ok(())
}

fn rejection_row(r: &Row) -> Result<RejectionRecord, StoreError> {
    Ok(RejectionRecord {
        pos: col(r, 0)?,
        sale_id: col(r, 1)?,
        code: col(r, 2)?,
        message: col(r, 3)?,
        at: col(r, 4)?,
    })
}

fn inbox_entry(r: &Row) -> Result<InboxEntry, StoreError> {
    Ok(InboxEntry {
        topic: col(r, 0)?,
        id: col(r, 1)?,
        received_at: col(r, 2)?,
        generation: col(r, 3)?,
        attempts: u32::try_from(col::<i64>(r, 4)?.max(0)).unwrap_or(u32::MAX),
        next_at: col(r, 5)?,
    })
}

const INBOX_COLUMNS: &str = "topic, id, received_at, generation, attempts, next_at";

fn refund_request(r: &Row) -> Result<RefundRequest, StoreError> {
    let status: Option<i64> = col(r, 3)?;
    let answer: Option<String> = col(r, 4)?;
    Ok(RefundRequest {
        key: col(r, 0)?,
        external_reference: col(r, 1)?,
        plan: col(r, 2)?,
        answer: status
            .zip(answer)
            .map(|(s, a)| (u16::try_from(s).unwrap_or(500), a)),
        at: col(r, 5)?,
    })
}

/// Everything the database keeps about one sale besides its body, as one
/// JSON object: the archive's line (with the sale added by retention), in
/// the shape the SQLite store gives it.
async fn sale_record(
    tx: &deadpool_postgres::Transaction<'_>,
    reference: &str,
) -> Result<serde_json::Value, StoreError> {
    use serde_json::{json, Value};
    // Stored JSON goes out as JSON, and anything unreadable as the text it is.
    let json_text = |t: String| serde_json::from_str(&t).unwrap_or(Value::String(t));
    let mut timeline = Vec::new();
    for r in rows(
        tx,
        "SELECT at, event, detail FROM sale_events WHERE external_reference = $1 ORDER BY seq",
        &[&reference],
    )
    .await?
    {
        timeline.push(
            json!({"at": col::<i64>(&r, 0)?, "event": col::<String>(&r, 1)?,
                             "detail": json_text(col(&r, 2)?)}),
        );
    }
    let mut ledger_payments = Vec::new();
    for r in rows(
        tx,
        "SELECT payment_id, merchant_order, amount, seen_at FROM ledger_payments
         WHERE external_reference = $1 ORDER BY seq",
        &[&reference],
    )
    .await?
    {
        ledger_payments.push(json!({"payment_id": json_id(&col::<String>(&r, 0)?),
            "merchant_order": json_id(&col::<String>(&r, 1)?),
            "amount": col::<String>(&r, 2)?, "seen_at": col::<i64>(&r, 3)?}));
    }
    let mut refunds = Vec::new();
    for r in rows(
        tx,
        "SELECT refund_id, payment_id, amount, \"of\", \"by\", at FROM ledger_refunds
         WHERE external_reference = $1 ORDER BY seq",
        &[&reference],
    )
    .await?
    {
        refunds.push(json!({"refund_id": json_id(&col::<String>(&r, 0)?),
            "payment_id": json_id(&col::<String>(&r, 1)?),
            "amount": col::<String>(&r, 2)?, "of": col::<String>(&r, 3)?,
            "by": col::<String>(&r, 4)?, "at": col::<i64>(&r, 5)?}));
    }
    let mut payments = Vec::new();
    for r in rows(
        tx,
        "SELECT id, merchant_order, status, amount, currency, seen_at FROM payments
         WHERE external_reference = $1 ORDER BY seq",
        &[&reference],
    )
    .await?
    {
        payments.push(json!({"id": json_id(&col::<String>(&r, 0)?),
            "merchant_order": json_id(&col::<String>(&r, 1)?),
            "status": col::<String>(&r, 2)?, "amount": col::<String>(&r, 3)?,
            "currency": col::<Option<String>>(&r, 4)?, "seen_at": col::<i64>(&r, 5)?}));
    }
    let mut merchant_orders = Vec::new();
    for r in rows(
        tx,
        "SELECT id, status, body, seen_at FROM merchant_orders
         WHERE external_reference = $1 ORDER BY seq",
        &[&reference],
    )
    .await?
    {
        let id = json_id(&col::<String>(&r, 0)?);
        let of_it: Vec<Value> = payments
            .iter()
            .filter(|p| p["merchant_order"] == id)
            .cloned()
            .collect();
        merchant_orders.push(json!({"id": id, "status": col::<String>(&r, 1)?,
            "body": json_text(col(&r, 2)?), "seen_at": col::<i64>(&r, 3)?, "payments": of_it}));
    }
    let closing = match rows(
        tx,
        "SELECT payment_id, merchant_order, at FROM closings WHERE external_reference = $1",
        &[&reference],
    )
    .await?
    .first()
    {
        Some(r) => json!({"payment_id": json_id(&col::<String>(r, 0)?),
            "merchant_order": json_id(&col::<String>(r, 1)?), "at": col::<i64>(r, 2)?}),
        None => Value::Null,
    };
    Ok(json!({
        "timeline": timeline,
        "closing": closing,
        "ledger_payments": ledger_payments,
        "ledger_refunds": refunds,
        "merchant_orders": merchant_orders,
    }))
}

#[async_trait]
impl Store for PgStore {
    async fn record(&self, sale: &Sale, event: &SaleEvent, seen: u64) -> Result<u64, StoreError> {
        self.write_change(sale, event, seen, false).await
    }

    async fn record_to_tell(
        &self,
        sale: &Sale,
        event: &SaleEvent,
        seen: u64,
    ) -> Result<u64, StoreError> {
        self.write_change(sale, event, seen, true).await
    }

    async fn exclusive(&self, key: &str) -> Result<Option<super::Exclusive>, StoreError> {
        // A session of its own: the lock is the session's, and ends with it
        // when the guard is dropped, or the process dies.
        self.timed(async {
            let (config, tls) = &self.listen;
            let (client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
            let session = tokio::spawn(async move {
                let _ = connection.await;
            });
            let session = lock::EndOnDrop(session.abort_handle());
            client
                .execute(
                    "SELECT pg_advisory_lock($1, hashtext($2))",
                    &[&EXCLUSIVE_LOCK, &key],
                )
                .await
                .map_err(pg)?;
            Ok(Some(super::Exclusive(Box::new((client, session)))))
        })
        .await
    }

    async fn outbox_told(&self, told: &[(String, u64)]) -> Result<(), StoreError> {
        if told.is_empty() {
            return Ok(());
        }
        let (pos, versions): (Vec<&str>, Vec<i64>) = told
            .iter()
            .map(|(p, v)| (p.as_str(), i64::try_from(*v).unwrap_or(i64::MAX)))
            .unzip();
        self.execute(
            &format!(
                "UPDATE outbox o SET published_at = {DB_NOW}
                 FROM unnest($1::text[], $2::bigint[]) AS t(pos, version)
                 WHERE o.pos = t.pos AND o.version <= t.version AND o.published_at IS NULL"
            ),
            &[&pos, &versions],
        )
        .await
        .map(drop)
    }

    async fn outbox_due(&self, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        self.select(
            &format!(
                "SELECT pos, max(version) FROM outbox
                 WHERE published_at IS NULL AND lease_until < {DB_NOW}
                 GROUP BY pos LIMIT $1"
            ),
            &[&(limit as i64)],
            |r| Ok((col(r, 0)?, version(col(r, 1)?))),
        )
        .await
    }

    async fn pos_head(&self, pos: &str) -> Result<PosHead, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            // The version and the sale it counts, from one snapshot.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let version = head_version(&tx, pos).await?;
            let latest = rows(
                &tx,
                "SELECT external_reference, body FROM sales WHERE pos = $1 ORDER BY seq DESC LIMIT 1",
                &[&pos],
            )
            .await?
            .first()
            .map(sale_row)
            .transpose()?;
            tx.commit().await.map_err(pg)?;
            Ok(PosHead { version, latest })
        })
        .await
    }

    async fn pos_versions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.select("SELECT pos, version FROM pos_heads", &[], |r| {
            Ok((col(r, 0)?, version(col(r, 1)?)))
        })
        .await
    }

    fn changes(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<Heard>> {
        let (config, tls) = self.listen.clone();
        Some(feed::spawn(config, tls, self.name.clone(), shutdown))
    }

    fn leadership(
        &self,
        name: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::sync::watch::Receiver<Option<u64>> {
        let (config, tls) = self.listen.clone();
        leader::spawn(config, tls, name.to_owned(), shutdown)
    }

    async fn record_merchant_order(&self, mo: MerchantOrderRecord) -> Result<(), StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            fenced(&tx).await?;
            let id = text_id(&mo.id);
            exec(
                &tx,
                "INSERT INTO merchant_orders (id, external_reference, status, body, seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                   body = excluded.body, seen_at = excluded.seen_at",
                &[&id, &mo.external_reference, &mo.status, &mo.body, &mo.seen_at],
            )
            .await?;
            for p in &mo.payments {
                exec(
                    &tx,
                    "INSERT INTO payments (id, merchant_order, external_reference, status, amount, currency, seen_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                       amount = excluded.amount, seen_at = excluded.seen_at",
                    &[&text_id(&p.id), &id, &mo.external_reference, &p.status, &p.amount, &p.currency, &mo.seen_at],
                )
                .await?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn record_rejection(&self, r: RejectionRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO device_rejections (pos, sale_id, code, message, at) VALUES ($1, $2, $3, $4, $5)",
            &[&r.pos, &r.sale_id, &r.code, &r.message, &r.at],
        )
        .await
        .map(drop)
    }

    async fn rejections(
        &self,
        pos: &str,
        limit: usize,
    ) -> Result<Vec<RejectionRecord>, StoreError> {
        self.select(
            "SELECT pos, sale_id, code, message, at FROM device_rejections
             WHERE pos = $1 ORDER BY seq DESC LIMIT $2",
            &[&pos, &(limit as i64)],
            rejection_row,
        )
        .await
    }

    async fn latest_rejections(&self) -> Result<Vec<RejectionRecord>, StoreError> {
        // One row per POS, through the (pos, seq) index.
        self.select(
            "SELECT DISTINCT ON (pos) pos, sale_id, code, message, at FROM device_rejections
             ORDER BY pos, seq DESC",
            &[],
            rejection_row,
        )
        .await
    }

    async fn latest_sales(&self) -> Result<Vec<Sale>, StoreError> {
        // seq grows with each new sale, and an update keeps it: the highest
        // seq of a POS is its latest sale.
        self.select(
            "SELECT DISTINCT ON (pos) external_reference, body FROM sales ORDER BY pos, seq DESC",
            &[],
            sale_row,
        )
        .await
    }

    async fn sale(&self, reference: &ExternalReference) -> Result<Option<Sale>, StoreError> {
        self.select(
            "SELECT external_reference, body FROM sales WHERE external_reference = $1",
            &[&reference.as_str()],
            sale_row,
        )
        .await
        .map(|mut v| v.pop())
    }

    async fn sale_by_device_id(
        &self,
        pos: &str,
        sale_id: &str,
    ) -> Result<Option<Sale>, StoreError> {
        self.select(
            "SELECT external_reference, body FROM sales
             WHERE pos = $1 AND sale_id = $2 ORDER BY accepted_at DESC, seq DESC LIMIT 1",
            &[&pos, &sale_id],
            sale_row,
        )
        .await
        .map(|mut v| v.pop())
    }

    async fn timeline(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        self.select(
            "SELECT at, event, detail FROM sale_events WHERE external_reference = $1 ORDER BY seq",
            &[&reference.as_str()],
            |r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?)),
        )
        .await
    }

    async fn unsettled_served(&self, since: i64) -> Result<Vec<Sale>, StoreError> {
        self.select(
            "SELECT external_reference, body FROM sales WHERE unsettled AND served_at >= $1",
            &[&since],
            sale_row,
        )
        .await
    }

    async fn pending_auto_refunds(&self) -> Result<Vec<Sale>, StoreError> {
        self.select(
            "SELECT external_reference, body FROM sales WHERE owes = 2",
            &[],
            sale_row,
        )
        .await
    }

    async fn count_owing(&self) -> Result<u64, StoreError> {
        let n = self
            .select("SELECT count(*) FROM sales WHERE owes > 0", &[], |r| {
                col::<i64>(r, 0)
            })
            .await?;
        Ok(n.first().copied().unwrap_or(0).max(0) as u64)
    }

    // ---- The notification inbox ----

    async fn inbox_add(&self, topic: &str, id: &str, now: i64) -> Result<InboxEntry, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // A pending entry folds the notification in (and is due now); a
            // done one opens again: Mercado Pago has news about the resource.
            let entry = rows(
                &tx,
                &format!(
                    "INSERT INTO inbox (topic, id, received_at, generation, attempts, next_at)
                     VALUES ($1, $2, $3, 1, 0, $3)
                     ON CONFLICT (topic, id) DO UPDATE SET
                       generation = inbox.generation + 1,
                       next_at = LEAST(inbox.next_at, excluded.next_at),
                       received_at = CASE WHEN inbox.done_at IS NULL THEN inbox.received_at ELSE excluded.received_at END,
                       attempts = CASE WHEN inbox.done_at IS NULL THEN inbox.attempts ELSE 0 END,
                       done_at = NULL, outcome = NULL
                     RETURNING {INBOX_COLUMNS}"
                ),
                &[&topic, &id, &now],
            )
            .await?
            .first()
            .map(inbox_entry)
            .transpose()?
            .ok_or_else(|| StoreError::Database("the inbox returned no row".into()))?;
            // The leader works the inbox, whichever instance was notified.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&feed::INBOX_CHANNEL, &feed::inbox_payload(&self.name, &entry)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(entry)
        })
        .await
    }

    async fn inbox_pending(&self) -> Result<Vec<InboxEntry>, StoreError> {
        self.select(
            &format!(
                "SELECT {INBOX_COLUMNS} FROM inbox WHERE done_at IS NULL ORDER BY received_at"
            ),
            &[],
            inbox_entry,
        )
        .await
    }

    async fn inbox_done(
        &self,
        topic: &str,
        id: &str,
        generation: i64,
        now: i64,
        outcome: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            fenced(&tx).await?;
            let done = exec(
                &tx,
                "UPDATE inbox SET done_at = $4, outcome = $5, last_error = NULL
                 WHERE topic = $1 AND id = $2 AND generation = $3 AND done_at IS NULL",
                &[&topic, &id, &generation, &now, &outcome],
            )
            .await?;
            let newer = if done > 0 {
                None
            } else {
                // Done already, or a newer notification is pending.
                rows(
                    &tx,
                    "SELECT generation FROM inbox WHERE topic = $1 AND id = $2 AND done_at IS NULL",
                    &[&topic, &id],
                )
                .await?
                .first()
                .map(|r| col::<i64>(r, 0))
                .transpose()?
            };
            tx.commit().await.map_err(pg)?;
            Ok(newer)
        })
        .await
    }

    async fn inbox_retry(
        &self,
        topic: &str,
        id: &str,
        generation: i64,
        attempts: u32,
        next_at: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE inbox SET attempts = $3, next_at = GREATEST(next_at, $4), last_error = $5
             WHERE topic = $1 AND id = $2 AND generation = $6 AND done_at IS NULL",
            &[
                &topic,
                &id,
                &i64::from(attempts),
                &next_at,
                &error,
                &generation,
            ],
        )
        .await
        .map(drop)
    }

    // ---- Operator refund requests ----

    async fn refund_request(&self, key: &str) -> Result<Option<RefundRequest>, StoreError> {
        self.select(
            "SELECT key, external_reference, plan, status, answer, at FROM refund_requests WHERE key = $1",
            &[&key],
            refund_request,
        )
        .await
        .map(|mut v| v.pop())
    }

    async fn unanswered_refund_requests(&self) -> Result<Vec<RefundRequest>, StoreError> {
        self.select(
            "SELECT key, external_reference, plan, status, answer, at
             FROM refund_requests WHERE status IS NULL ORDER BY at",
            &[],
            refund_request,
        )
        .await
    }

    async fn put_refund_request(&self, r: RefundRequest) -> Result<(), StoreError> {
        let (status, answer) = r.answer.clone().unzip();
        self.execute(
            "INSERT INTO refund_requests (key, external_reference, plan, status, answer, at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (key) DO UPDATE SET plan = excluded.plan,
               status = excluded.status, answer = excluded.answer",
            &[
                &r.key,
                &r.external_reference,
                &r.plan,
                &status.map(i64::from),
                &answer,
                &r.at,
            ],
        )
        .await
        .map(drop)
    }

    // ---- Searching paid sales again ----

    async fn due_rechecks(
        &self,
        done: u32,
        paid_before: i64,
        limit: usize,
    ) -> Result<Vec<Recheck>, StoreError> {
        let found = self
            .select(
                "SELECT external_reference, paid_at, done FROM rechecks
                 WHERE done = $1 AND paid_at <= $2 ORDER BY paid_at LIMIT $3",
                &[&i64::from(done), &paid_before, &(limit as i64)],
                |r| Ok((col::<String>(r, 0)?, col::<i64>(r, 1)?, col::<i64>(r, 2)?)),
            )
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|(reference, paid_at, done)| {
                Some(Recheck {
                    external_reference: ExternalReference::parse(&reference).ok()?,
                    paid_at,
                    done: u32::try_from(done.max(0)).unwrap_or(u32::MAX),
                })
            })
            .collect())
    }

    async fn recheck_done(
        &self,
        reference: &ExternalReference,
        done: u32,
        last: bool,
    ) -> Result<(), StoreError> {
        let reference = reference.as_str();
        if last {
            self.execute(
                "DELETE FROM rechecks WHERE external_reference = $1",
                &[&reference],
            )
            .await
        } else {
            self.execute(
                "UPDATE rechecks SET done = $2 WHERE external_reference = $1",
                &[&reference, &i64::from(done)],
            )
            .await
        }
        .map(drop)
    }

    async fn prune(&self, before: i64) -> Result<(), StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            for sql in [
                "DELETE FROM inbox WHERE done_at IS NOT NULL AND done_at < $1",
                "DELETE FROM refund_requests WHERE status IS NOT NULL AND at < $1",
                "DELETE FROM rechecks WHERE paid_at < $1",
                "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1",
            ] {
                exec(&tx, sql, &[&before]).await?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn merchant_order(&self, id: &MpId) -> Result<Option<MerchantOrderRecord>, StoreError> {
        self.select(
            "SELECT external_reference, status, body, seen_at FROM merchant_orders WHERE id = $1",
            &[&text_id(id)],
            |r| {
                Ok(MerchantOrderRecord {
                    id: id.clone(),
                    external_reference: col(r, 0)?,
                    status: col(r, 1)?,
                    body: col(r, 2)?,
                    seen_at: col(r, 3)?,
                    payments: Vec::new(),
                })
            },
        )
        .await
        .map(|mut v| v.pop())
    }

    // ---- Retention ----

    async fn retention_candidates(
        &self,
        page: RetentionPage,
    ) -> Result<Vec<RetentionCandidate>, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            // One snapshot for the page and the records read with it.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let found = rows(
                &tx,
                "SELECT s.updated_at, s.seq, s.external_reference, s.body,
                   EXISTS (SELECT 1 FROM sales l WHERE l.pos = s.pos AND l.accepted_at >= s.accepted_at
                           AND l.seq <> s.seq AND (l.accepted_at > s.accepted_at OR l.seq > s.seq)),
                   EXISTS (SELECT 1 FROM rechecks r WHERE r.external_reference = s.external_reference
                           AND r.done < $4),
                   EXISTS (SELECT 1 FROM refund_requests q WHERE q.external_reference = s.external_reference
                           AND q.status IS NULL)
                 FROM sales s
                 WHERE s.updated_at < $1 AND (s.updated_at, s.seq) > ($2, $3)
                 ORDER BY s.updated_at, s.seq LIMIT $5",
                &[
                    &page.ended_before,
                    &page.after.0,
                    &page.after.1,
                    &i64::from(page.rechecks),
                    &(page.limit as i64),
                ],
            )
            .await?;
            let mut out = Vec::with_capacity(found.len());
            for r in &found {
                let reference: String = col(r, 2)?;
                let sale = parse_sale(&reference, &col::<String>(r, 3)?)?;
                let record = if page.with_records {
                    Some(sale_record(&tx, &reference).await?)
                } else {
                    None
                };
                out.push(RetentionCandidate {
                    sale,
                    position: (col(r, 0)?, col(r, 1)?),
                    superseded: col(r, 4)?,
                    rechecking: col(r, 5)?,
                    refunding: col(r, 6)?,
                    record,
                });
            }
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn forget_sales(
        &self,
        sales: Vec<(ExternalReference, i64)>,
    ) -> Result<usize, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let mut forgotten = 0;
            for (reference, updated_at) in &sales {
                let reference = reference.as_str();
                // A sale written since it was read has another updated_at:
                // it stays, for the next pass to judge.
                let gone = exec(
                    &tx,
                    "DELETE FROM sales WHERE external_reference = $1 AND updated_at = $2
                     AND NOT EXISTS (SELECT 1 FROM refund_requests q
                                     WHERE q.external_reference = $1 AND q.status IS NULL)",
                    &[&reference, updated_at],
                )
                .await?;
                if gone == 0 {
                    continue;
                }
                forgotten += 1;
                for sql in [
                    // Done notifications about its merchant orders (or
                    // orders) and payments, which name no sale themselves.
                    "DELETE FROM inbox WHERE done_at IS NOT NULL AND topic IN ('merchant_order', 'order')
                       AND id IN (SELECT id FROM merchant_orders WHERE external_reference = $1)",
                    "DELETE FROM inbox WHERE done_at IS NOT NULL AND topic = 'payment'
                       AND id IN (SELECT id FROM payments WHERE external_reference = $1)",
                    "DELETE FROM sale_events WHERE external_reference = $1",
                    "DELETE FROM closings WHERE external_reference = $1",
                    "DELETE FROM ledger_payments WHERE external_reference = $1",
                    "DELETE FROM ledger_refunds WHERE external_reference = $1",
                    "DELETE FROM rechecks WHERE external_reference = $1",
                    "DELETE FROM refund_requests WHERE external_reference = $1",
                    "DELETE FROM payments WHERE external_reference = $1",
                    "DELETE FROM merchant_orders WHERE external_reference = $1",
                ] {
                    exec(&tx, sql, &[&reference]).await?;
                }
            }
            tx.commit().await.map_err(pg)?;
            Ok(forgotten)
        })
        .await
    }

    async fn forget_rejections(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        // Oldest first by `seq` (the order they were kept), so the search
        // stops within the first `limit` rows.
        let n = self
            .execute(
                "DELETE FROM device_rejections WHERE seq IN
                   (SELECT seq FROM device_rejections ORDER BY seq LIMIT $2) AND at < $1",
                &[&before, &(limit as i64)],
            )
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn sales(&self, filter: SaleFilter) -> Result<Vec<Sale>, StoreError> {
        self.select(
            "SELECT external_reference, body FROM sales
             WHERE ($1::TEXT IS NULL OR pos = $1) AND ($2::TEXT IS NULL OR state = $2)
               AND ($3::BIGINT IS NULL OR accepted_at >= $3) AND (NOT $5 OR owes > 0)
             ORDER BY accepted_at DESC, seq DESC LIMIT $4",
            &[
                &filter.pos,
                &filter.state,
                &filter.since,
                &(filter.limit.min(10_000) as i64),
                &filter.owing,
            ],
            sale_row,
        )
        .await
    }

    async fn merchant_orders_of(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<MerchantOrderRecord>, StoreError> {
        self.timed(async {
            let mut c = self.conn().await?;
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let orders = rows(
                &tx,
                "SELECT id, status, body, seen_at FROM merchant_orders
                 WHERE external_reference = $1 ORDER BY seq",
                &[&reference.as_str()],
            )
            .await?;
            let ids: Vec<String> = orders.iter().map(|r| col(r, 0)).collect::<Result<_, _>>()?;
            let carried = rows(
                &tx,
                "SELECT merchant_order, id, status, amount, currency FROM payments
                 WHERE merchant_order = ANY($1) ORDER BY seq",
                &[&ids],
            )
            .await?;
            tx.commit().await.map_err(pg)?;
            let mut out = Vec::new();
            for r in &orders {
                let raw: String = col(r, 0)?;
                let Some(id) = MpId::parse(&raw) else {
                    continue;
                };
                let mut payments = Vec::new();
                for p in &carried {
                    if col::<String>(p, 0)? != raw {
                        continue;
                    }
                    if let Some(pid) = MpId::parse(&col::<String>(p, 1)?) {
                        payments.push(PaymentRecord {
                            id: pid,
                            status: col(p, 2)?,
                            amount: col(p, 3)?,
                            currency: col(p, 4)?,
                        });
                    }
                }
                out.push(MerchantOrderRecord {
                    id,
                    external_reference: Some(reference.as_str().to_owned()),
                    status: col(r, 1)?,
                    body: col(r, 2)?,
                    seen_at: col(r, 3)?,
                    payments,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO health (id, at) VALUES (1, extract(epoch FROM now())::BIGINT)
             ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            &[],
        )
        .await
        .map(drop)
    }

    // ---- POS registration at Mercado Pago ----

    async fn record_registration(&self, r: RegistrationRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO mp_registrations (pos, mp_external_id, store, mp_pos_id, url, qr_image,
               qr_template_document, qr_template_image, action, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (pos) DO UPDATE SET mp_external_id = excluded.mp_external_id,
               store = excluded.store, mp_pos_id = excluded.mp_pos_id, url = excluded.url,
               qr_image = excluded.qr_image, qr_template_document = excluded.qr_template_document,
               qr_template_image = excluded.qr_template_image, action = excluded.action,
               at = excluded.at",
            &[
                &r.pos,
                &r.mp_external_id,
                &r.store,
                &(r.mp_pos_id as i64),
                &r.url,
                &r.qr_image,
                &r.qr_template_document,
                &r.qr_template_image,
                &r.action,
                &r.at,
            ],
        )
        .await
        .map(drop)
    }

    async fn registrations(&self) -> Result<Vec<RegistrationRecord>, StoreError> {
        self.select(
            "SELECT pos, mp_external_id, store, mp_pos_id, url, qr_image, qr_template_document,
                    qr_template_image, action, at
             FROM mp_registrations ORDER BY pos",
            &[],
            |r| {
                Ok(RegistrationRecord {
                    pos: col(r, 0)?,
                    mp_external_id: col(r, 1)?,
                    store: col(r, 2)?,
                    mp_pos_id: col::<i64>(r, 3)? as u64,
                    url: col(r, 4)?,
                    qr_image: col(r, 5)?,
                    qr_template_document: col(r, 6)?,
                    qr_template_image: col(r, 7)?,
                    action: col(r, 8)?,
                    at: col(r, 9)?,
                })
            },
        )
        .await
    }
}
