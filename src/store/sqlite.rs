//! SQLite behind one writer thread. Writes queue up while a commit runs and
//! go into the next transaction together (group commit), so durability costs
//! one fsync per batch rather than per sale. Each write runs in a savepoint,
//! so one refused write (a duplicate close) never undoes its neighbours.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::{MerchantOrderRecord, Store, StoreError, TimelineEntry};
use crate::orders::{ExternalReference, Sale, SaleEvent};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sales (
    external_reference TEXT PRIMARY KEY,
    pos                TEXT NOT NULL,
    sale_id            TEXT NOT NULL,
    state              TEXT NOT NULL,
    accepted_at        INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    body               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sales_by_pos ON sales (pos, accepted_at);
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
    payment_id         INTEGER NOT NULL,
    merchant_order     INTEGER NOT NULL,
    at                 INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds_due (
    payment_id         INTEGER PRIMARY KEY,
    external_reference TEXT NOT NULL,
    merchant_order     INTEGER NOT NULL,
    amount             TEXT NOT NULL,
    at                 INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS merchant_orders (
    id                 INTEGER PRIMARY KEY,
    external_reference TEXT,
    status             TEXT NOT NULL,
    body               TEXT NOT NULL,
    seen_at            INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
"#;

enum Op {
    Record {
        sale: Box<Sale>,
        event: SaleEvent,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    MerchantOrder {
        mo: MerchantOrderRecord,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Health {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Latest {
        reply: oneshot::Sender<Result<Vec<Sale>, StoreError>>,
    },
    Find {
        reference: String,
        reply: oneshot::Sender<Result<Option<Sale>, StoreError>>,
    },
    MerchantOrderGet {
        id: u64,
        reply: oneshot::Sender<Result<Option<MerchantOrderRecord>, StoreError>>,
    },
    Timeline {
        reference: String,
        reply: oneshot::Sender<Result<Vec<TimelineEntry>, StoreError>>,
    },
}

pub struct SqliteStore {
    tx: std_mpsc::Sender<Op>,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and starts its writer.
    pub fn open(path: &Path, fsync: bool) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "OFF" })
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let (tx, rx) = std_mpsc::channel();
        thread::Builder::new()
            .name("qrgate-store".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        Ok(SqliteStore { tx })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?
    }
}

fn event_detail(sale: &Sale, event: &SaleEvent) -> String {
    let v = match event {
        SaleEvent::Accepted | SaleEvent::Priced => serde_json::json!({
            "state": sale.state.as_str(),
            "amount": sale.amount.map(|a| a.to_string()),
        }),
        SaleEvent::Paid { overpaid } => serde_json::json!({
            "payment_id": sale.settled.as_ref().map(|s| s.payment_id),
            "merchant_order": sale.settled.as_ref().map(|s| s.merchant_order),
            "paid": sale.settled.as_ref().map(|s| s.paid.to_string()),
            "overpaid": overpaid,
        }),
        SaleEvent::Delivered { ok, reason } => serde_json::json!({ "ok": ok, "reason": reason }),
        SaleEvent::RefundDue => serde_json::json!({
            "payment_id": sale.refund_due.as_ref().map(|r| r.payment_id),
            "merchant_order": sale.refund_due.as_ref().map(|r| r.merchant_order),
            "amount": sale.refund_due.as_ref().map(|r| r.amount.to_string()),
        }),
        SaleEvent::Served | SaleEvent::Cancelled | SaleEvent::Expired => serde_json::json!({}),
    };
    v.to_string()
}

fn write_sale(conn: &Connection, sale: &Sale, event: &SaleEvent) -> Result<(), StoreError> {
    let reference = sale.external_reference.as_str();
    match event {
        SaleEvent::Paid { .. } => {
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
                        s.payment_id as i64,
                        s.merchant_order as i64,
                        s.at
                    ],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::AlreadyClosed(reference.to_owned()));
            }
        }
        SaleEvent::RefundDue => {
            let r = sale
                .refund_due
                .as_ref()
                .ok_or_else(|| StoreError::Database("refund due without payment".into()))?;
            let inserted = conn
                .execute(
                    "INSERT INTO refunds_due (payment_id, external_reference, merchant_order, amount, at)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                    params![
                        r.payment_id as i64,
                        reference,
                        r.merchant_order as i64,
                        r.amount.to_string(),
                        r.at
                    ],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::AlreadyDue(r.payment_id));
            }
        }
        _ => {}
    }
    let body = serde_json::to_string(sale).map_err(|e| StoreError::Database(e.to_string()))?;
    conn.execute(
        "INSERT INTO sales (external_reference, pos, sale_id, state, accepted_at, updated_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (external_reference) DO UPDATE SET
           state = excluded.state, updated_at = excluded.updated_at, body = excluded.body",
        params![
            reference,
            sale.pos.as_str(),
            sale.sale_id.as_str(),
            sale.state.as_str(),
            sale.accepted_at,
            sale.updated_at,
            body
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

fn parse_sale(reference: &str, body: &str) -> Result<Sale, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })
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

fn writer(conn: Connection, rx: std_mpsc::Receiver<Op>) {
    const MAX_BATCH: usize = 512;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch);
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

fn run_batch(conn: &Connection, batch: Vec<Op>) {
    // Reads answer at once; writes answer only after the commit.
    let mut pending: Vec<(Reply, Result<(), StoreError>)> = Vec::new();
    let began = conn.execute_batch("BEGIN IMMEDIATE").map_err(db);
    for op in batch {
        match op {
            Op::Record { sale, event, reply } => {
                let r = began
                    .as_ref()
                    .map_err(|e| StoreError::Database(e.to_string()))
                    .and_then(|_| in_savepoint(conn, |c| write_sale(c, &sale, &event)));
                pending.push((Box::new(move |r| drop(reply.send(r))), r));
            }
            Op::MerchantOrder { mo, reply } => {
                let r = began
                    .as_ref()
                    .map_err(|e| StoreError::Database(e.to_string()))
                    .and_then(|_| {
                        in_savepoint(conn, |c| {
                            c.execute(
                                "INSERT INTO merchant_orders (id, external_reference, status, body, seen_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5)
                                 ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                                   body = excluded.body, seen_at = excluded.seen_at",
                                params![mo.id as i64, mo.external_reference, mo.status, mo.body, mo.seen_at],
                            )
                            .map(|_| ())
                            .map_err(db)
                        })
                    });
                pending.push((Box::new(move |r| drop(reply.send(r))), r));
            }
            Op::Health { reply } => {
                let r = began
                    .as_ref()
                    .map_err(|e| StoreError::Database(e.to_string()))
                    .and_then(|_| {
                        in_savepoint(conn, |c| {
                            c.execute(
                                "INSERT INTO health (id, at) VALUES (1, strftime('%s','now'))
                                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                                [],
                            )
                            .map(|_| ())
                            .map_err(db)
                        })
                    });
                pending.push((Box::new(move |r| drop(reply.send(r))), r));
            }
            Op::Latest { reply } => {
                let _ = reply.send(latest(conn));
            }
            Op::Find { reference, reply } => {
                let r = conn
                    .query_row(
                        "SELECT body FROM sales WHERE external_reference = ?1",
                        [&reference],
                        |row| row.get::<_, String>(0),
                    )
                    .optional()
                    .map_err(db)
                    .and_then(|b| b.map(|b| parse_sale(&reference, &b)).transpose());
                let _ = reply.send(r);
            }
            Op::MerchantOrderGet { id, reply } => {
                let r = conn
                    .query_row(
                        "SELECT external_reference, status, body, seen_at FROM merchant_orders WHERE id = ?1",
                        [id as i64],
                        |row| {
                            Ok(MerchantOrderRecord {
                                id,
                                external_reference: row.get(0)?,
                                status: row.get(1)?,
                                body: row.get(2)?,
                                seen_at: row.get(3)?,
                            })
                        },
                    )
                    .optional()
                    .map_err(db);
                let _ = reply.send(r);
            }
            Op::Timeline { reference, reply } => {
                let r = (|| {
                    let mut st = conn
                        .prepare(
                            "SELECT at, event, detail FROM sale_events
                             WHERE external_reference = ?1 ORDER BY seq",
                        )
                        .map_err(db)?;
                    let rows = st
                        .query_map([&reference], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .map_err(db)?;
                    rows.collect::<Result<Vec<_>, _>>().map_err(db)
                })();
                let _ = reply.send(r);
            }
        }
    }
    let committed = match began {
        Ok(()) => conn.execute_batch("COMMIT").map_err(db),
        Err(e) => Err(e),
    };
    for (reply, r) in pending {
        // A failed commit fails every write in it, whatever its own result.
        let r = match &committed {
            Ok(()) => r,
            Err(e) => Err(StoreError::Database(format!("commit failed: {e}"))),
        };
        reply(r);
    }
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

fn latest(conn: &Connection) -> Result<Vec<Sale>, StoreError> {
    // rowid grows with each new sale, and an update keeps it: the highest
    // rowid of a POS is its latest sale.
    let mut st = conn
        .prepare(
            "SELECT external_reference, body FROM sales
             WHERE rowid IN (SELECT max(rowid) FROM sales GROUP BY pos)",
        )
        .map_err(db)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
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
    async fn record(&self, sale: &Sale, event: &SaleEvent) -> Result<(), StoreError> {
        let sale = Box::new(sale.clone());
        let event = event.clone();
        self.call(|reply| Op::Record { sale, event, reply }).await
    }

    async fn record_merchant_order(&self, mo: MerchantOrderRecord) -> Result<(), StoreError> {
        self.call(|reply| Op::MerchantOrder { mo, reply }).await
    }

    async fn latest_sales(&self) -> Result<Vec<Sale>, StoreError> {
        self.call(|reply| Op::Latest { reply }).await
    }

    async fn sale(&self, reference: &ExternalReference) -> Result<Option<Sale>, StoreError> {
        let reference = reference.as_str().to_owned();
        self.call(|reply| Op::Find { reference, reply }).await
    }

    async fn timeline(
        &self,
        reference: &ExternalReference,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let reference = reference.as_str().to_owned();
        self.call(|reply| Op::Timeline { reference, reply }).await
    }

    async fn merchant_order(&self, id: u64) -> Result<Option<MerchantOrderRecord>, StoreError> {
        self.call(|reply| Op::MerchantOrderGet { id, reply }).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Health { reply }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::sale::*;
    use rust_decimal::Decimal;

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
            refund_due: None,
            updated_at: 1,
        }
    }

    #[tokio::test]
    async fn a_sale_survives_reopening_the_file_and_is_closed_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let store = SqliteStore::open(&path, true).unwrap();
        let mut s = sale("pump-1", "pump-1-a", SaleState::Pending);
        store.record(&s, &SaleEvent::Accepted).await.unwrap();
        store
            .record(
                &sale("pump-1", "pump-1-b", SaleState::Pending),
                &SaleEvent::Accepted,
            )
            .await
            .unwrap();
        store
            .record(
                &sale("pump-2", "pump-2-a", SaleState::Pending),
                &SaleEvent::Accepted,
            )
            .await
            .unwrap();
        s.state = SaleState::Paid;
        s.settled = Some(Settled {
            payment_id: 9,
            merchant_order: 8,
            paid: Decimal::from(10),
            at: 2,
        });
        let paid = SaleEvent::Paid { overpaid: false };
        store.record(&s, &paid).await.unwrap();
        assert!(matches!(
            store.record(&s, &paid).await,
            Err(StoreError::AlreadyClosed(_))
        ));
        drop(store);

        let store = SqliteStore::open(&path, true).unwrap();
        let mut latest: Vec<_> = store
            .latest_sales()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.external_reference.as_str().to_owned())
            .collect();
        latest.sort();
        assert_eq!(latest, ["pump-1-b", "pump-2-a"]);
        let found = store.sale(&s.external_reference).await.unwrap().unwrap();
        assert_eq!(found.state, SaleState::Paid);
        let events: Vec<_> = store
            .timeline(&s.external_reference)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(events, ["accepted", "paid"]);
        store.check_writable().await.unwrap();
    }
}
