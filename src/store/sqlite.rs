//! SQLite behind one writer thread: an actor whose messages are closures.
//! Each `Store` method below is its SQL, handed as a closure to
//! `SqliteStore::write` or `SqliteStore::read` and run on the thread
//! that owns the connection; a new query is one method, nothing else.
//!
//! Group commit: calls queue up while a commit runs and go into the next
//! transaction together (up to 512), so durability costs one fsync per
//! batch rather than per sale.
//!
//! Savepoints: each write runs in a savepoint of its own, so one refused
//! write (a duplicate close) never undoes its neighbours. A write is answered
//! only once its batch is committed, and a failed commit fails every write
//! of the batch: whatever qrgate acknowledges is durable first.
//!
//! Reads take their turn in the same queue and answer at once, from inside
//! the batch's transaction: they see every write queued before them.
//!
//! A query that panics fails alone (see `guarded`). Dropping the store
//! closes the queue: the thread still runs and commits every call already
//! queued, then stops.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use rust_decimal::Decimal;

use super::{
    InboxEntry, MerchantOrderRecord, PaymentRecord, PosHead, Recheck, RefundRequest,
    RegistrationRecord, RejectionRecord, RetentionCandidate, RetentionPage, SaleFilter, Store,
    StoreError, TimelineEntry,
};
use crate::orders::ledger::RefundOf;
use crate::orders::{ExternalReference, MpId, Sale, SaleEvent};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS pos_heads (
    pos     TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sales (
    external_reference TEXT PRIMARY KEY,
    pos                TEXT NOT NULL,
    sale_id            TEXT NOT NULL,
    state              TEXT NOT NULL,
    accepted_at        INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    served_at          INTEGER,
    -- 1 while reconciliation must search for the sale's payments.
    unsettled          INTEGER NOT NULL DEFAULT 0,
    body               TEXT NOT NULL,
    -- 1 while its ledger owes money back (2: some of it qrgate refunds itself).
    owes               INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sales_by_pos ON sales (pos, accepted_at);
CREATE INDEX IF NOT EXISTS sales_unsettled ON sales (unsettled, served_at);
CREATE INDEX IF NOT EXISTS sales_owing ON sales (owes) WHERE owes > 0;
CREATE TABLE IF NOT EXISTS sale_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    external_reference TEXT NOT NULL,
    at                 INTEGER NOT NULL,
    event              TEXT NOT NULL,
    detail             TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sale_events_by_sale ON sale_events (external_reference, seq);
-- One row per closed sale: the unique key behind "paid exactly once".
CREATE TABLE IF NOT EXISTS closings (
    external_reference TEXT PRIMARY KEY,
    payment_id         NOT NULL,
    merchant_order     NOT NULL,
    at                 INTEGER NOT NULL
);
-- Mercado Pago ids are numbers, or text in its Orders API: id columns have
-- no type, so each value keeps its own (SQLite's flexible typing).
-- Every approved payment, once, with the sale whose ledger holds it.
CREATE TABLE IF NOT EXISTS ledger_payments (
    payment_id         PRIMARY KEY NOT NULL,
    external_reference TEXT NOT NULL,
    merchant_order     NOT NULL,
    amount             TEXT NOT NULL,
    seen_at            INTEGER NOT NULL
);
-- Every refund Mercado Pago made for us, once.
CREATE TABLE IF NOT EXISTS ledger_refunds (
    refund_id          PRIMARY KEY NOT NULL,
    payment_id         NOT NULL,
    external_reference TEXT NOT NULL,
    amount             TEXT NOT NULL,
    of                 TEXT NOT NULL,
    by                 TEXT NOT NULL,
    at                 INTEGER NOT NULL
);
-- Payments as the merchant orders that carry them say (an audit trail).
CREATE TABLE IF NOT EXISTS payments (
    id                 PRIMARY KEY NOT NULL,
    merchant_order     NOT NULL,
    external_reference TEXT,
    status             TEXT NOT NULL,
    amount             TEXT NOT NULL,
    currency           TEXT,
    seen_at            INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS merchant_orders (
    id                 PRIMARY KEY NOT NULL,
    external_reference TEXT,
    status             TEXT NOT NULL,
    body               TEXT NOT NULL,
    seen_at            INTEGER NOT NULL
);
-- Notifications answered 200 and not applied yet.
CREATE TABLE IF NOT EXISTS inbox (
    topic              TEXT NOT NULL,
    id                 TEXT NOT NULL,
    received_at        INTEGER NOT NULL,
    generation         INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_at            INTEGER NOT NULL,
    done_at            INTEGER,
    outcome            TEXT,
    last_error         TEXT,
    PRIMARY KEY (topic, id)
);
CREATE INDEX IF NOT EXISTS inbox_pending ON inbox (received_at) WHERE done_at IS NULL;
CREATE INDEX IF NOT EXISTS inbox_done ON inbox (done_at) WHERE done_at IS NOT NULL;
-- The operator's refund requests by Idempotency-Key, with their answers.
CREATE TABLE IF NOT EXISTS refund_requests (
    key                TEXT PRIMARY KEY,
    external_reference TEXT NOT NULL,
    plan               TEXT NOT NULL,
    status             INTEGER,
    answer             TEXT,
    at                 INTEGER NOT NULL
);
-- Paid sales to search again for payments nobody notified.
CREATE TABLE IF NOT EXISTS rechecks (
    external_reference TEXT PRIMARY KEY,
    paid_at            INTEGER NOT NULL,
    done               INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS rechecks_due ON rechecks (done, paid_at);
CREATE TABLE IF NOT EXISTS device_rejections (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    pos                TEXT NOT NULL,
    sale_id            TEXT,
    code               TEXT NOT NULL,
    message            TEXT NOT NULL,
    at                 INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS device_rejections_by_pos ON device_rejections (pos, seq);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
-- Retention walks sales by their last change and removes a sale's rows from
-- every table that names it.
CREATE INDEX IF NOT EXISTS sales_by_update ON sales (updated_at);
CREATE INDEX IF NOT EXISTS ledger_payments_by_sale ON ledger_payments (external_reference);
CREATE INDEX IF NOT EXISTS ledger_refunds_by_sale ON ledger_refunds (external_reference);
CREATE INDEX IF NOT EXISTS merchant_orders_by_sale ON merchant_orders (external_reference);
CREATE INDEX IF NOT EXISTS payments_by_sale ON payments (external_reference);
-- POS registration at Mercado Pago (`qrgate pos register`): one row per POS.
CREATE TABLE IF NOT EXISTS mp_registrations (
    pos                  TEXT PRIMARY KEY,
    mp_external_id       TEXT NOT NULL,
    store                TEXT NOT NULL,
    mp_pos_id            INTEGER NOT NULL,
    url                  TEXT,
    qr_image             TEXT,
    qr_template_document TEXT,
    qr_template_image    TEXT,
    action               TEXT NOT NULL,
    at                   INTEGER NOT NULL
);
"#;

/// The id tables as version 1 made them; version 0 files pass through it on
/// their way to the current schema.
const SCHEMA_V1_IDS: &str = r#"
CREATE TABLE IF NOT EXISTS closings (
    external_reference TEXT PRIMARY KEY,
    payment_id         NOT NULL,
    merchant_order     NOT NULL,
    at                 INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds_due (
    payment_id         PRIMARY KEY NOT NULL,
    external_reference TEXT NOT NULL,
    merchant_order     NOT NULL,
    amount             TEXT NOT NULL,
    at                 INTEGER NOT NULL,
    reason             TEXT NOT NULL,
    auto               INTEGER NOT NULL,
    refund_id,
    refunded_at        INTEGER
);
CREATE TABLE IF NOT EXISTS payments (
    id                 PRIMARY KEY NOT NULL,
    merchant_order     NOT NULL,
    external_reference TEXT,
    status             TEXT NOT NULL,
    amount             TEXT NOT NULL,
    currency           TEXT,
    seen_at            INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS merchant_orders (
    id                 PRIMARY KEY NOT NULL,
    external_reference TEXT,
    status             TEXT NOT NULL,
    body               TEXT NOT NULL,
    seen_at            INTEGER NOT NULL
);
"#;

pub struct SqliteStore {
    tx: std_mpsc::Sender<Job>,
}

pub(super) fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// The schema's version in `PRAGMA user_version`.
const VERSION: i64 = 2;

/// Creates the schema, or brings a file from an older qrgate up to it, each
/// step in one transaction:
/// - version 1: id columns lose their INTEGER type, so the Orders API's text
///   ids fit beside the classic numeric ones;
/// - version 2: the payment ledger. Each sale's body gets its ledger, built
///   from what version 1 kept (the closing, the merchant orders' payments,
///   the refunds due and the operator's refunds); `refunds_due` is kept as
///   `refunds_due_v1` for audits.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    let fresh: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'
             AND name IN ('sales', 'closings', 'refunds_due', 'payments', 'merchant_orders')",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(db)?
        == 0;
    if version >= VERSION || fresh {
        conn.execute_batch(SCHEMA).map_err(db)?;
        if version < VERSION {
            conn.pragma_update(None, "user_version", VERSION)
                .map_err(db)?;
        }
        return Ok(());
    }
    if version < 1 {
        upgrade_v1(conn)?;
    }
    in_transaction(
        conn,
        "cannot upgrade the database to the payment ledger",
        |c| {
            super::legacy::upgrade(c)?;
            c.execute_batch(SCHEMA).map_err(db)?;
            c.pragma_update(None, "user_version", VERSION).map_err(db)
        },
    )?;
    tracing::info!(version = VERSION, "database upgraded: the payment ledger");
    Ok(())
}

fn in_transaction(
    conn: &Connection,
    what: &str,
    f: impl FnOnce(&Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
    match f(conn) {
        Ok(()) => conn.execute_batch("COMMIT").map_err(db),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(StoreError::Database(format!("{what}: {e}")))
        }
    }
}

fn upgrade_v1(conn: &Connection) -> Result<(), StoreError> {
    let old: Vec<String> = {
        let mut st = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table'
                 AND name IN ('refunds_due', 'payments', 'merchant_orders', 'closings')",
            )
            .map_err(db)?;
        let names = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        names
    };
    in_transaction(conn, "cannot upgrade the database", |c| {
        let mut script = String::new();
        for t in &old {
            script.push_str(&format!("ALTER TABLE {t} RENAME TO {t}_v0;\n"));
            // Indexes move with the renamed table.
            if t == "refunds_due" {
                script.push_str("DROP INDEX IF EXISTS refunds_pending;\n");
            }
        }
        script.push_str(SCHEMA_V1_IDS);
        for t in &old {
            script.push_str(&format!(
                "INSERT INTO {t} SELECT * FROM {t}_v0;\nDROP TABLE {t}_v0;\n"
            ));
        }
        script.push_str("PRAGMA user_version = 1;\n");
        c.execute_batch(&script).map_err(db)
    })?;
    if !old.is_empty() {
        tracing::info!(tables = old.len(), version = 1, "database upgraded");
    }
    Ok(())
}

/// An id as SQLite keeps it: numbers as integers, text as text.
pub(super) fn sql_id(id: &MpId) -> rusqlite::types::Value {
    match id {
        // MP's ids fit in i63; a larger one would still be kept exactly as text.
        MpId::Num(n) => i64::try_from(*n)
            .map(rusqlite::types::Value::Integer)
            .unwrap_or_else(|_| rusqlite::types::Value::Text(n.to_string())),
        MpId::Text(t) => rusqlite::types::Value::Text(t.clone()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and starts its writer.
    pub fn open(path: &Path, fsync: bool) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, fsync, true)
    }

    /// `open`; without `checkpoints`, qrgate never checkpoints the WAL
    /// itself and leaves it to another process (Litestream).
    pub fn open_with(
        path: &Path,
        fsync: bool,
        own_checkpoints: bool,
    ) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "OFF" })
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        migrate(&conn)?;
        // Checkpoints copy the WAL into the database and fsync it: tens of
        // milliseconds. Run inside a commit, they stall whichever sale comes
        // next (measured: sale-to-servable p99 43 ms against 2 ms), so a
        // thread of their own does them (see `checkpoints`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db)?;
        // SQLite reuses the WAL rather than shrinking it, so one burst would
        // hold its size on disk for good; past this, the writer truncates it
        // when it starts the log over after a checkpoint.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(db)?;
        let checkpointer = Connection::open(path).map_err(db)?;
        checkpointer
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let (tx, rx) = std_mpsc::channel();
        // One pending wake-up is enough: the checkpointer looks at the whole
        // WAL each time. The writer drops it when it stops, which tells the
        // checkpointer to finish.
        let (wrote, writes) = std_mpsc::sync_channel(1);
        thread::Builder::new()
            .name("qrgate-store".into())
            .spawn(move || writer(conn, rx, wrote, own_checkpoints))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        if !own_checkpoints {
            return Ok(SqliteStore { tx });
        }
        thread::Builder::new()
            .name("qrgate-checkpoint".into())
            .spawn(move || checkpoints(checkpointer, writes))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(SqliteStore { tx })
    }

    /// Runs `f` as a write in the next batch, in a savepoint of its own, and
    /// answers once the batch is committed: `Ok` only if it is durable.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn: &Connection, began: &Result<(), StoreError>| {
            let r = began
                .as_ref()
                .map_err(|e| StoreError::Database(e.to_string()))
                .and_then(|_| in_savepoint(conn, |c| guarded(c, f)));
            let after_commit: Reply = Box::new(move |committed| drop(reply.send(committed.and(r))));
            Some(after_commit)
        });
        self.enqueue(job, answer).await
    }

    /// Runs `f` as a read, in its turn among the writes, and answers at once.
    /// It must not write: nothing would roll back its changes alone.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn: &Connection, _: &Result<(), StoreError>| {
            drop(reply.send(guarded(conn, f)));
            None
        });
        self.enqueue(job, answer).await
    }

    async fn enqueue<T>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.tx
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?
    }
}

// ---- The writer thread ----

/// A call on the writer thread: its query and its reply channel, given the
/// connection and whether the batch's transaction began. A read answers at
/// once and returns `None`; a write returns its answer, held until the
/// commit is known.
type Job = Box<dyn FnOnce(&Connection, &Result<(), StoreError>) -> Option<Reply> + Send>;

/// A write's answer, given the outcome of its batch's commit.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

fn rejection_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RejectionRecord> {
    Ok(RejectionRecord {
        pos: r.get(0)?,
        sale_id: r.get(1)?,
        code: r.get(2)?,
        message: r.get(3)?,
        at: r.get(4)?,
    })
}

#[cfg(test)]
thread_local! {
    /// The commits this writer thread ran: how the tests see group commit.
    static COMMITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Writes after which the writer checkpoints itself: with no other writer,
/// its checkpoint completes and the next write starts the WAL over, so the
/// WAL stays bounded however busy the store is. Most frames are already
/// copied by then, so it is short.
const WRITER_CHECKPOINT_EVERY: usize = 2000;

/// The WAL's size on disk after a checkpoint let the writer start it over
/// (`journal_size_limit`).
const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

fn writer(
    conn: Connection,
    rx: std_mpsc::Receiver<Job>,
    wrote: std_mpsc::SyncSender<()>,
    own_checkpoints: bool,
) {
    const MAX_BATCH: usize = 512;
    let mut since_checkpoint = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        since_checkpoint += batch.len();
        run_batch(&conn, batch);
        // Full means a wake-up is already waiting.
        let _ = wrote.try_send(());
        if own_checkpoints && since_checkpoint >= WRITER_CHECKPOINT_EVERY {
            since_checkpoint = 0;
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "WAL checkpoint failed; retried later");
            }
        }
    }
}

fn run_batch(conn: &Connection, batch: Vec<Job>) {
    let began = conn.execute_batch("BEGIN IMMEDIATE").map_err(db);
    let mut pending = Vec::new();
    for job in batch {
        pending.extend(job(conn, &began));
    }
    let committed = match began {
        Ok(()) => {
            #[cfg(test)]
            COMMITS.with(|n| n.set(n.get() + 1));
            conn.execute_batch("COMMIT").map_err(db)
        }
        Err(e) => Err(e),
    };
    for reply in pending {
        // A failed commit fails every write in it, whatever its own result.
        reply(match &committed {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Database(format!("commit failed: {e}"))),
        });
    }
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// Runs `f` inside a savepoint: its writes stay only if it succeeds.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT op").map_err(db)?;
    let r = f(conn);
    let end = if r.is_ok() {
        "RELEASE op"
    } else {
        "ROLLBACK TO op; RELEASE op"
    };
    conn.execute_batch(end).map_err(db)?;
    r
}

/// Runs a query so that a panic in it fails that query alone. Uncaught, it
/// would unwind the writer thread: the batch's other writes would be lost
/// uncommitted, and every call after would fail with "the store thread has
/// stopped" while the service stayed up without a store.
fn guarded<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Unwind-safe in fact: what a panicking write leaves half done is in the
    // database, and its savepoint is rolled back like any failed write's; a
    // read changes nothing; the connection's statements reset as they drop.
    panic::catch_unwind(AssertUnwindSafe(|| f(conn))).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %what, "a store query panicked; it alone fails");
        Err(StoreError::Database(format!("the query panicked: {what}")))
    })
}

/// Copies the WAL into the database beside the writer. PASSIVE never blocks
/// the writer; it is repeated at once while it makes progress, until it has
/// caught up. (Paced at one pass every 500 ms it never caught up under
/// continuous writes, and the WAL grew by gigabytes: measured.)
///
/// A checkpoint cannot copy frames a reader may still need: while another
/// connection holds a read transaction (`qrgate backup`, Litestream, an
/// operator's `sqlite3`), it stops short at the same frame however often it
/// is repeated. Repeating it at once then spun a core for as long as the
/// reader stayed (measured: a whole core). So a pass that makes no progress,
/// or finds the database busy, waits, from 50 ms doubling to 5 s; a pass
/// that caught up waits for the next commit, and 100 ms more.
fn checkpoints(conn: Connection, writes: std_mpsc::Receiver<()>) {
    use std::time::Duration;
    const FIRST_WAIT: Duration = Duration::from_millis(50);
    const LONGEST_WAIT: Duration = Duration::from_secs(5);
    const CAUGHT_UP_PAUSE: Duration = Duration::from_millis(100);
    let mut wait = FIRST_WAIT;
    let mut last: Option<(i64, i64)> = None;
    loop {
        let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        let stalled = match pass {
            // Caught up: nothing to do until the writer commits again, and
            // then not at once: a checkpoint per commit would add its two
            // fsyncs to every commit's.
            Ok((0, log, done)) if done >= log => {
                wait = FIRST_WAIT;
                last = None;
                match writes.recv() {
                    Ok(()) => {
                        thread::sleep(CAUGHT_UP_PAUSE);
                        continue;
                    }
                    // The writer stopped: its last commit is checkpointed.
                    Err(_) => return,
                }
            }
            Ok((busy, log, done)) => {
                let progressed = busy == 0 && last.is_none_or(|(l, d)| done > d || log < l);
                last = Some((log, done));
                !progressed
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; retried");
                true
            }
        };
        if !stalled {
            wait = FIRST_WAIT;
            continue;
        }
        // A commit does not release a reader: the pause is waited out whole.
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match writes.recv_timeout(left) {
                Ok(()) => continue,
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    return;
                }
            }
        }
        wait = (wait * 2).min(LONGEST_WAIT);
    }
}

/// The ledger's changes made at the sale's last update: the portions that
/// came due and the refunds recorded then.
fn ledger_news(sale: &Sale) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let at = sale.updated_at;
    let owed = sale
        .ledger
        .payments()
        .iter()
        .flat_map(|p| {
            p.owed
                .iter()
                .filter(move |o| o.at == at)
                .map(move |o| (p, o))
        })
        .map(|(p, o)| {
            serde_json::json!({
                "payment_id": p.id,
                "merchant_order": p.merchant_order,
                "amount": o.amount.to_string(),
                "reason": o.reason.as_str(),
                "auto": o.auto,
            })
        })
        .collect();
    let refunds = sale
        .ledger
        .refunds()
        .filter(|(_, r)| r.at == at)
        .map(|(p, r)| {
            serde_json::json!({
                "payment_id": p.id,
                "refund_id": r.id,
                "amount": r.amount.to_string(),
                "by": r.by,
            })
        })
        .collect();
    (owed, refunds)
}

pub(super) fn event_detail(sale: &Sale, event: &SaleEvent) -> String {
    let (owed, refunds) = ledger_news(sale);
    let mut v = match event {
        SaleEvent::Accepted | SaleEvent::Priced => serde_json::json!({
            "state": sale.state.as_str(),
            "amount": sale.amount.map(|a| a.to_string()),
        }),
        SaleEvent::Paid { overpaid } => serde_json::json!({
            "payment_id": sale.settled.as_ref().map(|s| &s.payment_id),
            "merchant_order": sale.settled.as_ref().map(|s| &s.merchant_order),
            "paid": sale.settled.as_ref().map(|s| s.paid.to_string()),
            "overpaid": overpaid,
            "payments": sale.ledger.payments().iter().filter(|p| p.kept > Decimal::ZERO)
                .map(|p| serde_json::json!({"payment_id": p.id, "kept": p.kept.to_string()}))
                .collect::<Vec<_>>(),
        }),
        SaleEvent::PaymentHeld => serde_json::json!({
            "held": sale.ledger.payments().iter().filter(|p| p.held)
                .map(|p| serde_json::json!({
                    "payment_id": p.id, "merchant_order": p.merchant_order, "amount": p.amount.to_string(),
                }))
                .collect::<Vec<_>>(),
        }),
        SaleEvent::Delivered { ok, reason } => serde_json::json!({ "ok": ok, "reason": reason }),
        SaleEvent::Refused { reason } => serde_json::json!({ "reason": reason }),
        SaleEvent::CancelledByOperator { by } => serde_json::json!({ "by": by }),
        SaleEvent::Refunded { amount, by } => serde_json::json!({
            "by": by,
            "amount": amount.to_string(),
        }),
        SaleEvent::RefundedByOperator { amount, by } => serde_json::json!({
            "by": by,
            "amount": amount.to_string(),
            "refunded_total": sale.refunded_total().to_string(),
        }),
        SaleEvent::RefundDue
        | SaleEvent::Served
        | SaleEvent::Cancelled
        | SaleEvent::Expired
        | SaleEvent::Placed => serde_json::json!({}),
    };
    if let Some(map) = v.as_object_mut() {
        if !owed.is_empty() {
            map.insert("owed".into(), owed.into());
        }
        if !refunds.is_empty() {
            map.insert("refunds".into(), refunds.into());
        }
    }
    v.to_string()
}

/// The sales row's derived columns: whether reconciliation still searches
/// for its payments (served or placed and not closed: an ended sale too,
/// for every payment that may still come), and what its ledger owes (0
/// nothing, 1 for the operator, 2 some of it for qrgate itself).
pub(super) fn sale_columns(sale: &Sale) -> (bool, i64) {
    let unsettled = sale.handed_at().is_some() && sale.settled.is_none();
    let owes = if sale.ledger.owes_auto() {
        2
    } else {
        i64::from(sale.ledger.owed() > Decimal::ZERO)
    };
    (unsettled, owes)
}

/// Every payment of the sale's ledger, once by id and for this sale only,
/// and every refund, once by id.
pub(super) fn write_ledger(conn: &Connection, sale: &Sale) -> Result<(), StoreError> {
    let reference = sale.external_reference.as_str();
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO ledger_payments (payment_id, external_reference, merchant_order, amount, seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )
        .map_err(db)?;
    let mut owner = conn
        .prepare_cached("SELECT external_reference FROM ledger_payments WHERE payment_id = ?1")
        .map_err(db)?;
    let mut refund = conn
        .prepare_cached(
            "INSERT INTO ledger_refunds (refund_id, payment_id, external_reference, amount, of, by, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        )
        .map_err(db)?;
    for p in sale.ledger.payments() {
        let id = sql_id(&p.id);
        let inserted = insert
            .execute(params![
                id,
                reference,
                sql_id(&p.merchant_order),
                p.amount.to_string(),
                p.seen_at
            ])
            .map_err(db)?;
        if inserted == 0 {
            let holder: String = owner.query_row([&id], |r| r.get(0)).map_err(db)?;
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
            refund
                .execute(params![
                    sql_id(&r.id),
                    id,
                    reference,
                    r.amount.to_string(),
                    of,
                    r.by,
                    r.at
                ])
                .map_err(db)?;
        }
    }
    Ok(())
}

fn head_version(conn: &Connection, pos: &str) -> Result<u64, StoreError> {
    conn.prepare_cached("SELECT version FROM pos_heads WHERE pos = ?1")
        .and_then(|mut st| st.query_row([pos], |r| r.get::<_, i64>(0)).optional())
        .map_err(db)
        .map(|v| v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

/// Moves the POS's version on from `seen`, or refuses a change decided on
/// an older state. The writer is the only one, so reading and writing in
/// its savepoint is the POS's lock.
fn move_head(conn: &Connection, pos: &str, seen: u64) -> Result<u64, StoreError> {
    let version = head_version(conn, pos)?;
    if version != seen {
        return Err(StoreError::Stale {
            pos: pos.to_owned(),
            version,
        });
    }
    let next = version + 1;
    conn.prepare_cached(
        "INSERT INTO pos_heads (pos, version) VALUES (?1, ?2)
         ON CONFLICT (pos) DO UPDATE SET version = excluded.version",
    )
    .and_then(|mut st| st.execute(params![pos, i64::try_from(next).unwrap_or(i64::MAX)]))
    .map_err(db)?;
    Ok(next)
}

fn write_sale(conn: &Connection, sale: &Sale, event: &SaleEvent) -> Result<(), StoreError> {
    let reference = sale.external_reference.as_str();
    if let SaleEvent::Paid { .. } = event {
        let s = sale
            .settled
            .as_ref()
            .ok_or_else(|| StoreError::Database("paid sale without settlement".into()))?;
        let inserted = conn
            .execute(
                "INSERT INTO closings (external_reference, payment_id, merchant_order, at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![
                    reference,
                    sql_id(&s.payment_id),
                    sql_id(&s.merchant_order),
                    s.at
                ],
            )
            .map_err(db)?;
        if inserted == 0 {
            return Err(StoreError::AlreadyClosed(reference.to_owned()));
        }
        conn.execute(
            "INSERT INTO rechecks (external_reference, paid_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![reference, s.at],
        )
        .map_err(db)?;
    }
    // Only the events that add payments or refunds touch the ledger tables.
    if matches!(
        event,
        SaleEvent::Paid { .. }
            | SaleEvent::PaymentHeld
            | SaleEvent::RefundDue
            | SaleEvent::Refunded { .. }
            | SaleEvent::RefundedByOperator { .. }
    ) {
        write_ledger(conn, sale)?;
    }
    let (unsettled, owes) = sale_columns(sale);
    let body = serde_json::to_string(sale).map_err(|e| StoreError::Database(e.to_string()))?;
    conn.execute(
        "INSERT INTO sales (external_reference, pos, sale_id, state, accepted_at, updated_at, served_at, unsettled, body, owes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (external_reference) DO UPDATE SET
           state = excluded.state, updated_at = excluded.updated_at, served_at = excluded.served_at,
           unsettled = excluded.unsettled, body = excluded.body, owes = excluded.owes",
        params![
            reference,
            sale.pos.as_str(),
            sale.sale_id.as_str(),
            sale.state.as_str(),
            sale.accepted_at,
            sale.updated_at,
            sale.handed_at(),
            unsettled,
            body,
            owes
        ],
    )
    .map_err(db)?;
    conn.execute(
        "INSERT INTO sale_events (external_reference, at, event, detail) VALUES (?1, ?2, ?3, ?4)",
        params![
            reference,
            sale.updated_at,
            event.name(),
            event_detail(sale, event)
        ],
    )
    .map_err(db)?;
    Ok(())
}

pub(super) fn parse_sale(reference: &str, body: &str) -> Result<Sale, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })
}

fn inbox_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<InboxEntry> {
    Ok(InboxEntry {
        topic: r.get(0)?,
        id: r.get(1)?,
        received_at: r.get(2)?,
        generation: r.get(3)?,
        attempts: r.get::<_, i64>(4)?.max(0) as u32,
        next_at: r.get(5)?,
    })
}

const INBOX_COLUMNS: &str = "topic, id, received_at, generation, attempts, next_at";

fn refund_request(r: &rusqlite::Row<'_>) -> rusqlite::Result<RefundRequest> {
    let status: Option<i64> = r.get(3)?;
    let answer: Option<String> = r.get(4)?;
    Ok(RefundRequest {
        key: r.get(0)?,
        external_reference: r.get(1)?,
        plan: r.get(2)?,
        answer: status
            .zip(answer)
            .map(|(s, a)| (u16::try_from(s).unwrap_or(500), a)),
        at: r.get(5)?,
    })
}

/// An id as SQLite gave it back.
pub(super) fn value_id(v: rusqlite::types::Value) -> Option<MpId> {
    match v {
        rusqlite::types::Value::Integer(n) => u64::try_from(n).ok().map(MpId::Num),
        rusqlite::types::Value::Text(t) => MpId::parse(&t),
        _ => None,
    }
}

/// Everything the database keeps about one sale besides its body, as one
/// JSON object: the archive's line (with the sale added by retention).
fn sale_record(c: &Connection, reference: &str) -> Result<serde_json::Value, StoreError> {
    use serde_json::{json, Value};
    fn rows(
        c: &Connection,
        sql: &str,
        reference: &str,
        row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Value>,
    ) -> Result<Vec<Value>, StoreError> {
        let mut st = c.prepare_cached(sql).map_err(db)?;
        let out = st
            .query_map([reference], row)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db);
        out
    }
    // Stored JSON goes out as JSON, and anything unreadable as the text it is.
    let json_text = |t: String| serde_json::from_str(&t).unwrap_or(Value::String(t));
    let id = |v: rusqlite::types::Value| match v {
        rusqlite::types::Value::Integer(n) => json!(n),
        rusqlite::types::Value::Text(t) => json!(t),
        _ => Value::Null,
    };
    let timeline = rows(
        c,
        "SELECT at, event, detail FROM sale_events WHERE external_reference = ?1 ORDER BY seq",
        reference,
        |r| {
            Ok(
                json!({"at": r.get::<_, i64>(0)?, "event": r.get::<_, String>(1)?,
                      "detail": json_text(r.get(2)?)}),
            )
        },
    )?;
    let ledger_payments = rows(
        c,
        "SELECT payment_id, merchant_order, amount, seen_at FROM ledger_payments
         WHERE external_reference = ?1 ORDER BY rowid",
        reference,
        |r| {
            Ok(
                json!({"payment_id": id(r.get(0)?), "merchant_order": id(r.get(1)?),
                      "amount": r.get::<_, String>(2)?, "seen_at": r.get::<_, i64>(3)?}),
            )
        },
    )?;
    let refunds = rows(
        c,
        "SELECT refund_id, payment_id, amount, of, by, at FROM ledger_refunds
         WHERE external_reference = ?1 ORDER BY rowid",
        reference,
        |r| {
            Ok(
                json!({"refund_id": id(r.get(0)?), "payment_id": id(r.get(1)?),
                      "amount": r.get::<_, String>(2)?, "of": r.get::<_, String>(3)?,
                      "by": r.get::<_, String>(4)?, "at": r.get::<_, i64>(5)?}),
            )
        },
    )?;
    let mut merchant_orders = rows(
        c,
        "SELECT id, status, body, seen_at FROM merchant_orders
         WHERE external_reference = ?1 ORDER BY rowid",
        reference,
        |r| {
            Ok(
                json!({"id": id(r.get(0)?), "status": r.get::<_, String>(1)?,
                      "body": json_text(r.get(2)?), "seen_at": r.get::<_, i64>(3)?}),
            )
        },
    )?;
    let payments = rows(
        c,
        "SELECT id, merchant_order, status, amount, currency, seen_at FROM payments
         WHERE external_reference = ?1 ORDER BY rowid",
        reference,
        |r| {
            Ok(json!({"id": id(r.get(0)?), "merchant_order": id(r.get(1)?),
                      "status": r.get::<_, String>(2)?, "amount": r.get::<_, String>(3)?,
                      "currency": r.get::<_, Option<String>>(4)?, "seen_at": r.get::<_, i64>(5)?}))
        },
    )?;
    for mo in &mut merchant_orders {
        let of_it: Vec<Value> = payments
            .iter()
            .filter(|p| p["merchant_order"] == mo["id"])
            .cloned()
            .collect();
        mo["payments"] = Value::Array(of_it);
    }
    let closing = c
        .query_row(
            "SELECT payment_id, merchant_order, at FROM closings WHERE external_reference = ?1",
            [reference],
            |r| Ok(json!({"payment_id": id(r.get(0)?), "merchant_order": id(r.get(1)?), "at": r.get::<_, i64>(2)?})),
        )
        .optional()
        .map_err(db)?;
    Ok(json!({
        "timeline": timeline,
        "closing": closing,
        "ledger_payments": ledger_payments,
        "ledger_refunds": refunds,
        "merchant_orders": merchant_orders,
    }))
}

/// Sales from a query selecting (external_reference, body).
fn bodies(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<Sale>, StoreError> {
    let mut st = conn.prepare_cached(sql).map_err(db)?;
    let rows = st
        .query_map(args, |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let (reference, body) = row.map_err(db)?;
        out.push(parse_sale(&reference, &body)?);
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    async fn record(&self, sale: &Sale, event: &SaleEvent, seen: u64) -> Result<u64, StoreError> {
        let (sale, event) = (sale.clone(), event.clone());
        self.write(move |c| {
            let version = move_head(c, sale.pos.as_str(), seen)?;
            write_sale(c, &sale, &event)?;
            Ok(version)
        })
        .await
    }

    async fn pos_head(&self, pos: &str) -> Result<PosHead, StoreError> {
        let pos = pos.to_owned();
        self.read(move |c| {
            let version = head_version(c, &pos)?;
            let latest = c
                .query_row(
                    "SELECT external_reference, body FROM sales WHERE pos = ?1
                     ORDER BY rowid DESC LIMIT 1",
                    [&pos],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
                .map_err(db)?
                .map(|(reference, body)| parse_sale(&reference, &body))
                .transpose()?;
            Ok(PosHead { version, latest })
        })
        .await
    }

    async fn pos_versions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare("SELECT pos, version FROM pos_heads")
                .map_err(db)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db)?
                .map(|r| r.map(|(p, v)| (p, u64::try_from(v).unwrap_or(0))))
                .collect::<Result<Vec<_>, _>>()
                .map_err(db);
            rows
        })
        .await
    }

    async fn record_merchant_order(&self, mo: MerchantOrderRecord) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO merchant_orders (id, external_reference, status, body, seen_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                   body = excluded.body, seen_at = excluded.seen_at",
                params![
                    sql_id(&mo.id),
                    mo.external_reference,
                    mo.status,
                    mo.body,
                    mo.seen_at
                ],
            )
            .map_err(db)?;
            for p in &mo.payments {
                c.execute(
                    "INSERT INTO payments (id, merchant_order, external_reference, status, amount, currency, seen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                       amount = excluded.amount, seen_at = excluded.seen_at",
                    params![
                        sql_id(&p.id),
                        sql_id(&mo.id),
                        mo.external_reference,
                        p.status,
                        p.amount,
                        p.currency,
                        mo.seen_at
                    ],
                )
                .map_err(db)?;
            }
            Ok(())
        })
        .await
    }

    async fn record_rejection(&self, r: RejectionRecord) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO device_rejections (pos, sale_id, code, message, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.pos, r.sale_id, r.code, r.message, r.at],
            )
            .map(|_| ())
            .map_err(db)
        })
        .await
    }

    async fn rejections(
        &self,
        pos: &str,
        limit: usize,
    ) -> Result<Vec<RejectionRecord>, StoreError> {
        let pos = pos.to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT pos, sale_id, code, message, at FROM device_rejections
                     WHERE pos = ?1 ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![pos, limit as i64], rejection_row)
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn latest_rejections(&self) -> Result<Vec<RejectionRecord>, StoreError> {
        self.read(|c| {
            // One row per POS, through the (pos, seq) index.
            let mut st = c
                .prepare_cached(
                    "SELECT pos, sale_id, code, message, at FROM device_rejections
                     WHERE seq IN (SELECT MAX(seq) FROM device_rejections GROUP BY pos)",
                )
                .map_err(db)?;
            let rows = st.query_map([], rejection_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn latest_sales(&self) -> Result<Vec<Sale>, StoreError> {
        self.read(|c| {
            // rowid grows with each new sale, and an update keeps it: the
            // highest rowid of a POS is its latest sale.
            bodies(
                c,
                "SELECT external_reference, body FROM sales
                 WHERE rowid IN (SELECT max(rowid) FROM sales GROUP BY pos)",
                [],
            )
        })
        .await
    }

    async fn sale(&self, reference: &ExternalReference) -> Result<Option<Sale>, StoreError> {
        let reference = reference.as_str().to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT body FROM sales WHERE external_reference = ?1",
                [&reference],
                |row| row.get::<_, String>(0),
            )
            .optional()
            .map_err(db)
            .and_then(|b| b.map(|b| parse_sale(&reference, &b)).transpose())
        })
        .await
    }

    async fn sale_by_device_id(
        &self,
        pos: &str,
        sale_id: &str,
    ) -> Result<Option<Sale>, StoreError> {
        let (pos, sale_id) = (pos.to_owned(), sale_id.to_owned());
        self.read(move |c| {
            bodies(
                c,
                // Newest first along sales_by_pos, so the search stops at
                // the first match (a recent sale) instead of sorting every
                // sale the POS ever had.
                "SELECT external_reference, body FROM sales
                 WHERE pos = ?1 AND sale_id = ?2 ORDER BY accepted_at DESC, rowid DESC LIMIT 1",
                params![pos, sale_id],
            )
        })
        .await
        .map(|mut v| v.pop())
    }

    async fn timeline(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let reference = reference.as_str().to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare(
                    "SELECT at, event, detail FROM sale_events
                     WHERE external_reference = ?1 ORDER BY seq",
                )
                .map_err(db)?;
            let rows = st
                .query_map([&reference], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn unsettled_served(&self, since: i64) -> Result<Vec<Sale>, StoreError> {
        self.read(move |c| {
            bodies(
                c,
                "SELECT external_reference, body FROM sales
                 WHERE unsettled = 1 AND served_at >= ?1",
                params![since],
            )
        })
        .await
    }

    async fn pending_auto_refunds(&self) -> Result<Vec<Sale>, StoreError> {
        self.read(|c| {
            bodies(
                c,
                "SELECT external_reference, body FROM sales WHERE owes = 2",
                [],
            )
        })
        .await
    }

    async fn count_owing(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row("SELECT count(*) FROM sales WHERE owes > 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(db)
        })
        .await
    }

    // ---- The notification inbox ----

    async fn inbox_add(&self, topic: &str, id: &str, now: i64) -> Result<InboxEntry, StoreError> {
        let (topic, id) = (topic.to_owned(), id.to_owned());
        self.write(move |c| {
            // A pending entry folds the notification in (and is due now); a
            // done one opens again: Mercado Pago has news about the resource.
            c.execute(
                "INSERT INTO inbox (topic, id, received_at, generation, attempts, next_at)
                 VALUES (?1, ?2, ?3, 1, 0, ?3)
                 ON CONFLICT (topic, id) DO UPDATE SET
                   generation = generation + 1,
                   next_at = min(next_at, excluded.next_at),
                   received_at = CASE WHEN done_at IS NULL THEN received_at ELSE excluded.received_at END,
                   attempts = CASE WHEN done_at IS NULL THEN attempts ELSE 0 END,
                   done_at = NULL, outcome = NULL",
                params![topic, id, now],
            )
            .map_err(db)?;
            c.query_row(
                &format!("SELECT {INBOX_COLUMNS} FROM inbox WHERE topic = ?1 AND id = ?2"),
                params![topic, id],
                inbox_entry,
            )
            .map_err(db)
        })
        .await
    }

    async fn inbox_pending(&self) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {INBOX_COLUMNS} FROM inbox WHERE done_at IS NULL ORDER BY received_at"
                ))
                .map_err(db)?;
            let rows = st.query_map([], inbox_entry).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
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
        let (topic, id, outcome) = (topic.to_owned(), id.to_owned(), outcome.to_owned());
        self.write(move |c| {
            let done = c
                .execute(
                    "UPDATE inbox SET done_at = ?4, outcome = ?5, last_error = NULL
                     WHERE topic = ?1 AND id = ?2 AND generation = ?3 AND done_at IS NULL",
                    params![topic, id, generation, now, outcome],
                )
                .map_err(db)?;
            if done > 0 {
                return Ok(None);
            }
            // Done already, or a newer notification is pending.
            c.query_row(
                "SELECT generation FROM inbox WHERE topic = ?1 AND id = ?2 AND done_at IS NULL",
                params![topic, id],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(db)
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
        let (topic, id, error) = (topic.to_owned(), id.to_owned(), error.to_owned());
        self.write(move |c| {
            c.execute(
                "UPDATE inbox SET attempts = ?3, next_at = max(next_at, ?4), last_error = ?5
                 WHERE topic = ?1 AND id = ?2 AND generation = ?6 AND done_at IS NULL",
                params![topic, id, attempts, next_at, error, generation],
            )
            .map(drop)
            .map_err(db)
        })
        .await
    }

    // ---- Operator refund requests ----

    async fn refund_request(&self, key: &str) -> Result<Option<RefundRequest>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT key, external_reference, plan, status, answer, at
                 FROM refund_requests WHERE key = ?1",
                [&key],
                refund_request,
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn unanswered_refund_requests(&self) -> Result<Vec<RefundRequest>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached(
                    "SELECT key, external_reference, plan, status, answer, at
                     FROM refund_requests WHERE status IS NULL ORDER BY at",
                )
                .map_err(db)?;
            let rows = st.query_map([], refund_request).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn put_refund_request(&self, r: RefundRequest) -> Result<(), StoreError> {
        self.write(move |c| {
            let (status, answer) = r.answer.clone().unzip();
            c.execute(
                "INSERT INTO refund_requests (key, external_reference, plan, status, answer, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET plan = excluded.plan,
                   status = excluded.status, answer = excluded.answer",
                params![r.key, r.external_reference, r.plan, status, answer, r.at],
            )
            .map(drop)
            .map_err(db)
        })
        .await
    }

    // ---- Searching paid sales again ----

    async fn due_rechecks(
        &self,
        done: u32,
        paid_before: i64,
        limit: usize,
    ) -> Result<Vec<Recheck>, StoreError> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT external_reference, paid_at, done FROM rechecks
                     WHERE done = ?1 AND paid_at <= ?2 ORDER BY paid_at LIMIT ?3",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![done, paid_before, limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows
                .into_iter()
                .filter_map(|(reference, paid_at, done)| {
                    Some(Recheck {
                        external_reference: ExternalReference::parse(&reference).ok()?,
                        paid_at,
                        done: done.max(0) as u32,
                    })
                })
                .collect())
        })
        .await
    }

    async fn recheck_done(
        &self,
        reference: &ExternalReference,
        done: u32,
        last: bool,
    ) -> Result<(), StoreError> {
        let reference = reference.as_str().to_owned();
        self.write(move |c| {
            if last {
                c.execute(
                    "DELETE FROM rechecks WHERE external_reference = ?1",
                    [&reference],
                )
            } else {
                c.execute(
                    "UPDATE rechecks SET done = ?2 WHERE external_reference = ?1",
                    params![reference, done],
                )
            }
            .map(drop)
            .map_err(db)
        })
        .await
    }

    async fn prune(&self, before: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "DELETE FROM inbox WHERE done_at IS NOT NULL AND done_at < ?1",
                [before],
            )
            .map_err(db)?;
            c.execute(
                "DELETE FROM refund_requests WHERE status IS NOT NULL AND at < ?1",
                [before],
            )
            .map_err(db)?;
            c.execute("DELETE FROM rechecks WHERE paid_at < ?1", [before])
                .map(drop)
                .map_err(db)
        })
        .await
    }

    async fn retention_candidates(
        &self,
        page: RetentionPage,
    ) -> Result<Vec<RetentionCandidate>, StoreError> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT s.updated_at, s.rowid, s.external_reference, s.body,
                       EXISTS (SELECT 1 FROM sales l WHERE l.pos = s.pos AND l.accepted_at >= s.accepted_at
                               AND l.rowid <> s.rowid AND (l.accepted_at > s.accepted_at OR l.rowid > s.rowid)),
                       EXISTS (SELECT 1 FROM rechecks r WHERE r.external_reference = s.external_reference
                               AND r.done < ?4),
                       EXISTS (SELECT 1 FROM refund_requests q WHERE q.external_reference = s.external_reference
                               AND q.status IS NULL)
                     FROM sales s
                     WHERE s.updated_at < ?1 AND (s.updated_at, s.rowid) > (?2, ?3)
                     ORDER BY s.updated_at, s.rowid LIMIT ?5",
                )
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![
                        page.ended_before,
                        page.after.0,
                        page.after.1,
                        page.rechecks,
                        page.limit as i64
                    ],
                    |r| {
                        Ok((
                            (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?),
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            [r.get::<_, bool>(4)?, r.get::<_, bool>(5)?, r.get::<_, bool>(6)?],
                        ))
                    },
                )
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for (position, reference, body, [superseded, rechecking, refunding]) in rows {
                let sale = parse_sale(&reference, &body)?;
                let record = if page.with_records {
                    Some(sale_record(c, &reference)?)
                } else {
                    None
                };
                out.push(RetentionCandidate {
                    sale,
                    position,
                    superseded,
                    rechecking,
                    refunding,
                    record,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn forget_sales(
        &self,
        sales: Vec<(ExternalReference, i64)>,
    ) -> Result<usize, StoreError> {
        self.write(move |c| {
            let mut forgotten = 0;
            for (reference, updated_at) in &sales {
                let reference = reference.as_str();
                let gone = c
                    .prepare_cached(
                        "DELETE FROM sales WHERE external_reference = ?1 AND updated_at = ?2
                         AND NOT EXISTS (SELECT 1 FROM refund_requests q
                                         WHERE q.external_reference = ?1 AND q.status IS NULL)",
                    )
                    .and_then(|mut st| st.execute(params![reference, updated_at]))
                    .map_err(db)?;
                if gone == 0 {
                    continue;
                }
                forgotten += 1;
                for sql in [
                    // Done notifications about its merchant orders (or
                    // orders) and payments, which name no sale themselves.
                    "DELETE FROM inbox WHERE done_at IS NOT NULL AND topic IN ('merchant_order', 'order')
                       AND id IN (SELECT CAST(id AS TEXT) FROM merchant_orders WHERE external_reference = ?1)",
                    "DELETE FROM inbox WHERE done_at IS NOT NULL AND topic = 'payment'
                       AND id IN (SELECT CAST(id AS TEXT) FROM payments WHERE external_reference = ?1)",
                    "DELETE FROM sale_events WHERE external_reference = ?1",
                    "DELETE FROM closings WHERE external_reference = ?1",
                    "DELETE FROM ledger_payments WHERE external_reference = ?1",
                    "DELETE FROM ledger_refunds WHERE external_reference = ?1",
                    "DELETE FROM rechecks WHERE external_reference = ?1",
                    "DELETE FROM refund_requests WHERE external_reference = ?1",
                    "DELETE FROM payments WHERE external_reference = ?1",
                    "DELETE FROM merchant_orders WHERE external_reference = ?1",
                ] {
                    c.prepare_cached(sql)
                        .and_then(|mut st| st.execute([reference]))
                        .map_err(db)?;
                }
            }
            Ok(forgotten)
        })
        .await
    }

    async fn forget_rejections(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |c| {
            // Oldest first by `seq` (the order they were kept), so the
            // search stops within the first `limit` rows.
            c.execute(
                "DELETE FROM device_rejections WHERE seq IN
                   (SELECT seq FROM device_rejections ORDER BY seq LIMIT ?2) AND at < ?1",
                params![before, limit as i64],
            )
            .map_err(db)
        })
        .await
    }

    async fn merchant_order(&self, id: &MpId) -> Result<Option<MerchantOrderRecord>, StoreError> {
        let id = id.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT external_reference, status, body, seen_at FROM merchant_orders WHERE id = ?1",
                [sql_id(&id)],
                |row| {
                    Ok(MerchantOrderRecord {
                        id: id.clone(),
                        external_reference: row.get(0)?,
                        status: row.get(1)?,
                        body: row.get(2)?,
                        seen_at: row.get(3)?,
                        payments: Vec::new(),
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn sales(&self, filter: SaleFilter) -> Result<Vec<Sale>, StoreError> {
        self.read(move |c| {
            bodies(
                c,
                "SELECT external_reference, body FROM sales
                 WHERE (?1 IS NULL OR pos = ?1) AND (?2 IS NULL OR state = ?2)
                   AND (?3 IS NULL OR accepted_at >= ?3) AND (?5 = 0 OR owes > 0)
                 ORDER BY accepted_at DESC, rowid DESC LIMIT ?4",
                params![
                    filter.pos,
                    filter.state,
                    filter.since,
                    filter.limit.min(10_000) as i64,
                    filter.owing
                ],
            )
        })
        .await
    }

    async fn merchant_orders_of(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<MerchantOrderRecord>, StoreError> {
        let reference = reference.as_str().to_owned();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT id, status, body, seen_at FROM merchant_orders
                     WHERE external_reference = ?1 ORDER BY rowid",
                )
                .map_err(db)?;
            let rows = st
                .query_map([&reference], |r| {
                    Ok((
                        r.get::<_, rusqlite::types::Value>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            let mut pay = c
                .prepare_cached(
                    "SELECT id, status, amount, currency FROM payments WHERE merchant_order = ?1 ORDER BY rowid",
                )
                .map_err(db)?;
            let mut out = Vec::new();
            for (raw_id, status, body, seen_at) in rows {
                let Some(id) = value_id(raw_id) else { continue };
                let payments = pay
                    .query_map([sql_id(&id)], |r| {
                        Ok((
                            r.get::<_, rusqlite::types::Value>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                        ))
                    })
                    .map_err(db)?
                    .filter_map(Result::ok)
                    .filter_map(|(pid, status, amount, currency)| {
                        value_id(pid).map(|id| PaymentRecord {
                            id,
                            status,
                            amount,
                            currency,
                        })
                    })
                    .collect();
                out.push(MerchantOrderRecord {
                    id,
                    external_reference: Some(reference.clone()),
                    status,
                    body,
                    seen_at,
                    payments,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.write(|c| {
            c.execute(
                "INSERT INTO health (id, at) VALUES (1, strftime('%s','now'))
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                [],
            )
            .map(|_| ())
            .map_err(db)
        })
        .await
    }

    // ---- POS registration at Mercado Pago ----

    async fn record_registration(&self, r: RegistrationRecord) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO mp_registrations (pos, mp_external_id, store, mp_pos_id, url, qr_image,
                   qr_template_document, qr_template_image, action, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (pos) DO UPDATE SET mp_external_id = excluded.mp_external_id,
                   store = excluded.store, mp_pos_id = excluded.mp_pos_id, url = excluded.url,
                   qr_image = excluded.qr_image, qr_template_document = excluded.qr_template_document,
                   qr_template_image = excluded.qr_template_image, action = excluded.action,
                   at = excluded.at",
                params![
                    r.pos,
                    r.mp_external_id,
                    r.store,
                    r.mp_pos_id as i64,
                    r.url,
                    r.qr_image,
                    r.qr_template_document,
                    r.qr_template_image,
                    r.action,
                    r.at
                ],
            )
            .map(|_| ())
            .map_err(db)
        })
        .await
    }

    async fn registrations(&self) -> Result<Vec<RegistrationRecord>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached(
                    "SELECT pos, mp_external_id, store, mp_pos_id, url, qr_image, qr_template_document,
                            qr_template_image, action, at
                     FROM mp_registrations ORDER BY pos",
                )
                .map_err(db)?;
            let rows = st
                .query_map([], |r| {
                    Ok(RegistrationRecord {
                        pos: r.get(0)?,
                        mp_external_id: r.get(1)?,
                        store: r.get(2)?,
                        mp_pos_id: r.get::<_, i64>(3)? as u64,
                        url: r.get(4)?,
                        qr_image: r.get(5)?,
                        qr_template_document: r.get(6)?,
                        qr_template_image: r.get(7)?,
                        action: r.get(8)?,
                        at: r.get(9)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::sale::*;
    use rust_decimal::Decimal;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    /// Records a change decided on the POS's stored version.
    async fn put(store: &SqliteStore, s: &Sale, e: &SaleEvent) -> Result<u64, StoreError> {
        let seen = store.pos_head(s.pos.as_str()).await?.version;
        store.record(s, e, seen).await
    }

    fn sale(pos: &str, reference: &str, state: SaleState) -> Sale {
        Sale {
            external_reference: ExternalReference::parse(reference).unwrap(),
            pos: PosId::parse(pos).unwrap(),
            sale_id: SaleId::parse("1").unwrap(),
            currency: Currency::Ars,
            state,
            lines: vec![],
            amount: Some(Decimal::from(10)),
            accepted_at: 1,
            expires_at: None,
            served_at: None,
            settled: None,
            delivered_at: None,
            placed_at: None,
            mp_order: None,
            rejection: None,
            ledger: Default::default(),
            updated_at: 1,
        }
    }

    #[tokio::test]
    async fn a_file_from_before_text_ids_is_upgraded_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The id columns as the first schema had them.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE closings (external_reference TEXT PRIMARY KEY, payment_id INTEGER NOT NULL,
                   merchant_order INTEGER NOT NULL, at INTEGER NOT NULL);
                 CREATE TABLE refunds_due (payment_id INTEGER PRIMARY KEY, external_reference TEXT NOT NULL,
                   merchant_order INTEGER NOT NULL, amount TEXT NOT NULL, at INTEGER NOT NULL,
                   reason TEXT NOT NULL, auto INTEGER NOT NULL, refund_id INTEGER, refunded_at INTEGER);
                 CREATE INDEX refunds_pending ON refunds_due (auto, refund_id);
                 CREATE TABLE payments (id INTEGER PRIMARY KEY, merchant_order INTEGER NOT NULL,
                   external_reference TEXT, status TEXT NOT NULL, amount TEXT NOT NULL, currency TEXT,
                   seen_at INTEGER NOT NULL);
                 CREATE TABLE merchant_orders (id INTEGER PRIMARY KEY, external_reference TEXT,
                   status TEXT NOT NULL, body TEXT NOT NULL, seen_at INTEGER NOT NULL);
                 INSERT INTO merchant_orders VALUES (30000000001, 'pump-1-a', 'closed', '{}', 1);
                 INSERT INTO closings VALUES ('pump-1-a', 90000000001, 30000000001, 1);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, true).unwrap();
        let old = store
            .merchant_order(&MpId::Num(30000000001))
            .await
            .unwrap()
            .expect("the old row is kept");
        assert_eq!(old.status, "closed");
        store
            .record_merchant_order(MerchantOrderRecord {
                id: MpId::Text("ORD01JQ4S4KY8HWQ6NA5PXB65B3D3".into()),
                external_reference: Some("pump-1-b".into()),
                status: "processed".into(),
                body: "{}".into(),
                seen_at: 2,
                payments: vec![super::super::PaymentRecord {
                    id: MpId::Text("PAY01JQ4S4KY8HWQ6NA5PXB65B3D3".into()),
                    status: "processed".into(),
                    amount: "10.00".into(),
                    currency: Some("ARS".into()),
                }],
            })
            .await
            .unwrap();
        let text = store
            .merchant_order(&MpId::Text("ORD01JQ4S4KY8HWQ6NA5PXB65B3D3".into()))
            .await
            .unwrap()
            .expect("a text id is stored");
        assert_eq!(text.status, "processed");
        // The old sale is still closed: a second close is refused.
        let mut s = sale("pump-1", "pump-1-a", SaleState::Paid);
        s.settled = Some(Closing {
            payment_id: MpId::Num(90000000002),
            merchant_order: MpId::Num(30000000002),
            paid: Decimal::ONE,
            at: 3,
        });
        let e = put(&store, &s, &SaleEvent::Paid { overpaid: false })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::AlreadyClosed(_)), "{e}");
        drop(store);
        // Opening again changes nothing.
        let again = SqliteStore::open(&path, true).unwrap();
        assert!(again
            .merchant_order(&MpId::Num(30000000001))
            .await
            .unwrap()
            .is_some());
    }

    // ---- The writer: group commit, savepoints, panics ----

    type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

    /// Polls a call once, which queues it, and hands it back to be awaited.
    async fn queued<T>(mut call: Call<'_, T>) -> Call<'_, T> {
        let waiting =
            std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await;
        assert!(waiting, "answered while the writer was held");
        call
    }

    /// Holds the writer thread until the sender is used: the calls queued
    /// meanwhile make its next batch, all of them.
    async fn hold(store: &SqliteStore) -> (std_mpsc::Sender<()>, Call<'_, ()>) {
        let (release, held) = std_mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let holding = queued(Box::pin(store.read(move |_| {
            let _ = started.send(());
            let _ = held.recv();
            Ok(())
        })))
        .await;
        running.await.unwrap();
        (release, holding)
    }

    /// The commits the writer ran before the batch of this call.
    async fn commits(store: &SqliteStore) -> usize {
        store.read(|_| Ok(COMMITS.with(|n| n.get()))).await.unwrap()
    }

    fn rejection(n: i64) -> RejectionRecord {
        RejectionRecord {
            pos: "pump-1".into(),
            sale_id: Some(n.to_string()),
            code: "bad".into(),
            message: "refused".into(),
            at: n,
        }
    }

    /// The `sale_id`s of pump-1's rejections, oldest first.
    async fn rejected(store: &SqliteStore) -> Vec<Option<String>> {
        let mut r: Vec<_> = store
            .rejections("pump-1", 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.sale_id)
            .collect();
        r.reverse();
        r
    }

    /// A reader holding a snapshot (a backup, an operator's sqlite3) keeps
    /// checkpoints from passing it, so the WAL grows behind it; once it has
    /// gone and the checkpoints caught up, the WAL goes back to its limit on
    /// disk rather than keeping its largest size for good.
    #[tokio::test]
    async fn the_wal_shrinks_back_to_its_limit_once_a_reader_that_held_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let wal = dir.path().join("q.db-wal");
        let store = SqliteStore::open(&path, false).unwrap();
        let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let limit = WAL_SIZE_LIMIT as u64;
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM sales", [], |r| r.get(0))
            .unwrap();
        let mut n = 0;
        let write = async |n: usize| {
            let s = sale("pump-1", &format!("pump-1-{n}"), SaleState::Pending);
            put(&store, &s, &SaleEvent::Accepted).await.unwrap();
        };
        while wal_size() <= 2 * limit {
            write(n).await;
            n += 1;
        }
        let grown = wal_size();
        reader.execute_batch("COMMIT").unwrap();
        // The reader, gone, now checkpoints until every frame is copied (the
        // store's own checkpointer may hold the checkpoint meanwhile): then
        // nothing in the WAL is needed, and the next write starts it over.
        let mut caught_up = false;
        for _ in 0..10_000 {
            let (busy, log, copied): (i64, i64, i64) = reader
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap();
            if busy == 0 && log == copied {
                caught_up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(caught_up, "checkpoints never caught up");
        drop(reader);
        write(n).await;
        assert!(
            wal_size() <= limit,
            "the WAL kept {} bytes after a write that started it over (grown to {grown}, limit {limit})",
            wal_size()
        );
    }

    #[tokio::test]
    async fn writes_queued_while_the_writer_is_busy_share_one_commit() {
        const WRITES: i64 = 100;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), true).unwrap();
        let before = commits(&store).await;
        let (release, holding) = hold(&store).await;
        let mut writes = Vec::new();
        for n in 0..WRITES {
            writes.push(queued(store.record_rejection(rejection(n))).await);
        }
        release.send(()).unwrap();
        holding.await.unwrap();
        for w in writes {
            w.await.unwrap();
        }
        // The batch that counted, the held one, then one for all the writes
        // (a transaction per write would make 102).
        assert_eq!(commits(&store).await - before, 3);
        assert_eq!(rejected(&store).await.len(), WRITES as usize);
    }

    #[tokio::test]
    async fn a_refused_write_undoes_only_itself_in_a_shared_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), true).unwrap();
        let mut s = sale("pump-1", "pump-1-a", SaleState::Pending);
        put(&store, &s, &SaleEvent::Accepted).await.unwrap();
        s.state = SaleState::Paid;
        s.settled = Some(Closing {
            payment_id: MpId::Num(9),
            merchant_order: MpId::Num(8),
            paid: Decimal::from(10),
            at: 2,
        });
        let paid = SaleEvent::Paid { overpaid: false };

        let (release, holding) = hold(&store).await;
        let first = queued(store.record_rejection(rejection(1))).await;
        let close = queued(store.record(&s, &paid, 1)).await;
        let close_again = queued(store.record(&s, &paid, 1)).await;
        let half_done = queued(Box::pin(store.write(|c| {
            c.execute(
                "INSERT INTO device_rejections (pos, sale_id, code, message, at)
                 VALUES ('pump-1', 'half', 'bad', 'undone', 0)",
                [],
            )
            .map_err(db)?;
            Err::<(), _>(StoreError::Database("refused after writing".into()))
        })))
        .await;
        let last = queued(store.record_rejection(rejection(2))).await;
        release.send(()).unwrap();
        holding.await.unwrap();

        first.await.unwrap();
        close.await.unwrap();
        // Decided on the version the first close moved on from.
        let e = close_again.await.unwrap_err();
        assert!(matches!(e, StoreError::Stale { version: 2, .. }), "{e}");
        let e = half_done.await.unwrap_err();
        assert!(e.to_string().contains("refused after writing"), "{e}");
        last.await.unwrap();
        assert_eq!(
            rejected(&store).await,
            [Some("1".to_owned()), Some("2".to_owned())]
        );
        let events: Vec<_> = store
            .timeline(&s.external_reference)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(events, ["accepted", "paid"]);
    }

    #[tokio::test]
    async fn a_query_that_panics_fails_alone_and_the_store_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), true).unwrap();
        let (release, holding) = hold(&store).await;
        let first = queued(store.record_rejection(rejection(1))).await;
        let write = queued(Box::pin(store.write(|c| -> Result<(), StoreError> {
            c.execute(
                "INSERT INTO device_rejections (pos, sale_id, code, message, at)
                 VALUES ('pump-1', 'half', 'bad', 'undone', 0)",
                [],
            )
            .map_err(db)?;
            panic!("a bug in a write")
        })))
        .await;
        let read =
            queued(Box::pin(store.read(|_| -> Result<(), StoreError> {
                panic!("a bug in a read")
            })))
            .await;
        let last = queued(store.record_rejection(rejection(2))).await;
        release.send(()).unwrap();
        holding.await.unwrap();

        first.await.unwrap();
        let e = write.await.unwrap_err();
        assert!(e.to_string().contains("a bug in a write"), "{e}");
        let e = read.await.unwrap_err();
        assert!(e.to_string().contains("a bug in a read"), "{e}");
        last.await.unwrap();
        assert_eq!(
            rejected(&store).await,
            [Some("1".to_owned()), Some("2".to_owned())]
        );
        store.record_rejection(rejection(3)).await.unwrap();
        store.check_writable().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_commit_fails_every_write_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), true).unwrap();
        let (release, holding) = hold(&store).await;
        let first = queued(store.record_rejection(rejection(1))).await;
        // Succeeds in its savepoint, but its deferred foreign key fails the
        // COMMIT.
        let breaks_commit = queued(Box::pin(store.write(|c| {
            c.execute_batch(
                "CREATE TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
                 INSERT INTO child VALUES (1);",
            )
            .map_err(db)
        })))
        .await;
        let last = queued(store.record_rejection(rejection(2))).await;
        release.send(()).unwrap();
        holding.await.unwrap();

        for w in [first, breaks_commit, last] {
            let e = w.await.unwrap_err();
            assert!(
                matches!(&e, StoreError::Database(m) if m.starts_with("commit failed")),
                "{e}"
            );
        }
        assert!(rejected(&store).await.is_empty());
        store.record_rejection(rejection(3)).await.unwrap();
        assert_eq!(rejected(&store).await, [Some("3".to_owned())]);
    }
}
