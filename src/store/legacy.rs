//! Bringing a version 1 database to the payment ledger. Version 1 kept the
//! money of a sale as a closing (one payment id, the sum of the closing
//! merchant order's payments), a list of refunds due (one per payment, but
//! the amount of a whole merchant order) and the operator's refunds. Each
//! sale's ledger is rebuilt from those and from the payments the merchant
//! orders carried, as the ledger's own rules would have recorded them. An
//! upgrade refunds nothing by itself: what the rules find owed that version
//! 1 never knew of (a second payment on the merchant order that paid, an
//! overpayment, an operator's refund that returned less than it said) is
//! owed for the operator, who may have settled it by hand meanwhile. Refunds
//! version 1 itself had due keep its `auto`.

use rusqlite::{params, Connection};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::sqlite::{db, sale_columns, sql_id, value_id, write_ledger};
use super::StoreError;
use crate::money::parse_decimal;
use crate::orders::ledger::{Approved, Refund, RefundOf};
use crate::orders::sale::RefundReason;
use crate::orders::{MpId, Sale};

/// The money fields of a version 1 sale body.
#[derive(Deserialize, Default)]
struct LegacyMoney {
    #[serde(default)]
    refunds: Vec<LegacyDue>,
    #[serde(default)]
    operator_refunds: Vec<LegacyOperatorRefund>,
}

#[derive(Deserialize)]
struct LegacyDue {
    payment_id: MpId,
    merchant_order: MpId,
    amount: Decimal,
    at: i64,
    reason: RefundReason,
    auto: bool,
    #[serde(default)]
    refunded: Option<LegacyRefunded>,
}

#[derive(Deserialize)]
struct LegacyRefunded {
    refund_id: MpId,
    at: i64,
}

#[derive(Deserialize)]
struct LegacyOperatorRefund {
    refund_id: MpId,
    payment_id: MpId,
    amount: Decimal,
    at: i64,
    by: String,
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(db)
}

/// Runs inside the caller's transaction.
pub(super) fn upgrade(conn: &Connection) -> Result<(), StoreError> {
    if table_exists(conn, "sales")? {
        let has_owes: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('sales') WHERE name = 'owes'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(db)?
            > 0;
        if !has_owes {
            conn.execute_batch("ALTER TABLE sales ADD COLUMN owes INTEGER NOT NULL DEFAULT 0")
                .map_err(db)?;
        }
    }
    conn.execute_batch(super::sqlite::SCHEMA).map_err(db)?;
    if table_exists(conn, "sales")? {
        convert_sales(conn)?;
    }
    if table_exists(conn, "refunds_due")? {
        conn.execute_batch("ALTER TABLE refunds_due RENAME TO refunds_due_v1")
            .map_err(db)?;
    }
    Ok(())
}

fn convert_sales(conn: &Connection) -> Result<(), StoreError> {
    let rows: Vec<(String, String)> = {
        let mut st = conn
            .prepare("SELECT external_reference, body FROM sales")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        rows
    };
    let mut converted = 0usize;
    for (reference, body) in rows {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            reference: reference.clone(),
            reason: e.to_string(),
        };
        let mut sale: Sale = serde_json::from_str(&body).map_err(corrupt)?;
        let old: LegacyMoney = serde_json::from_str(&body).map_err(corrupt)?;
        if !sale.ledger.is_empty()
            || (sale.settled.is_none() && old.refunds.is_empty() && old.operator_refunds.is_empty())
        {
            continue;
        }
        rebuild(conn, &mut sale, old)?;
        let (unsettled, owes) = sale_columns(&sale);
        let body = serde_json::to_string(&sale).map_err(|e| StoreError::Database(e.to_string()))?;
        conn.execute(
            "UPDATE sales SET body = ?2, unsettled = ?3, owes = ?4 WHERE external_reference = ?1",
            params![reference, body, unsettled, owes],
        )
        .map_err(db)?;
        write_ledger(conn, &sale)?;
        converted += 1;
    }
    if converted > 0 {
        tracing::info!(sales = converted, "sales given their payment ledger");
    }
    Ok(())
}

/// The approved (or since refunded) payments a merchant order carried, as
/// version 1 recorded them.
fn payments_of(conn: &Connection, merchant_order: &MpId) -> Result<Vec<Approved>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT id, amount FROM payments WHERE merchant_order = ?1
             AND status IN ('approved', 'refunded') ORDER BY id",
        )
        .map_err(db)?;
    let rows = st
        .query_map([sql_id(merchant_order)], |r| {
            Ok((
                r.get::<_, rusqlite::types::Value>(0)?,
                r.get::<_, String>(1)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, amount)| {
            Some(Approved {
                id: value_id(id)?,
                merchant_order: merchant_order.clone(),
                amount: parse_decimal(&amount).ok()?,
                approved_at: None,
            })
        })
        .collect())
}

fn rebuild(conn: &Connection, sale: &mut Sale, old: LegacyMoney) -> Result<(), StoreError> {
    if let Some(settled) = sale.settled.clone() {
        let mut found = payments_of(conn, &settled.merchant_order)?;
        if found.iter().map(|p| p.amount).sum::<Decimal>() < settled.paid {
            // What the payments table lacks, the closing itself says.
            found = vec![Approved {
                id: settled.payment_id.clone(),
                merchant_order: settled.merchant_order.clone(),
                amount: settled.paid,
                approved_at: None,
            }];
        }
        for p in &found {
            sale.ledger.record(p, settled.at);
        }
        let ids: Vec<MpId> = found.iter().map(|p| p.id.clone()).collect();
        let total = sale.amount.unwrap_or(settled.paid);
        if sale
            .ledger
            .close(&settled.merchant_order, &ids, total, settled.at, false)
            .is_none()
        {
            // Cannot happen for a sale version 1 closed: the operator looks.
            sale.ledger
                .release_held(RefundReason::DoublePayment, settled.at, false);
        }
    }
    for due in &old.refunds {
        match due.reason {
            RefundReason::DeliveryFailed => {
                sale.ledger.owe_kept(due.reason, due.at, due.auto);
            }
            reason => {
                let mut found = payments_of(conn, &due.merchant_order)?;
                if found.iter().map(|p| p.amount).sum::<Decimal>() < due.amount {
                    found = vec![Approved {
                        id: due.payment_id.clone(),
                        merchant_order: due.merchant_order.clone(),
                        amount: due.amount,
                        approved_at: None,
                    }];
                }
                for p in &found {
                    sale.ledger.record_owed(p, reason, due.at, due.auto);
                }
            }
        }
        if let Some(r) = &due.refunded {
            // Version 1 refunded the named payment in full (an empty body).
            let amount = sale
                .ledger
                .get(&due.payment_id)
                .map_or(due.amount, |p| p.amount);
            sale.ledger.record_refund(
                &due.payment_id,
                Refund {
                    id: r.refund_id.clone(),
                    amount,
                    at: r.at,
                    by: "qrgate".into(),
                    of: RefundOf::Owed(due.reason),
                    request: None,
                },
            );
        }
    }
    for r in &old.operator_refunds {
        let payment = if sale.ledger.get(&r.payment_id).is_some() {
            r.payment_id.clone()
        } else {
            match &sale.settled {
                Some(s) => s.payment_id.clone(),
                None => continue,
            }
        };
        // Version 1 refunded one payment "in full" for the whole sale: Mercado
        // Pago returned at most what was left of that payment.
        let left = sale
            .ledger
            .get(&payment)
            .map_or(r.amount, |p| p.amount - p.refunded());
        let returned = r.amount.min(left);
        sale.ledger.record_refund(
            &payment,
            Refund {
                id: r.refund_id.clone(),
                amount: returned,
                at: r.at,
                by: r.by.clone(),
                of: RefundOf::Kept,
                request: None,
            },
        );
        if r.amount > returned {
            tracing::warn!(external_reference = %sale.external_reference, payment = %payment,
                refund = %r.refund_id, asked = %r.amount, returned = %returned,
                "an operator's refund returned less than it recorded: the rest is owed back");
            sale.ledger.owe_from_kept(
                r.amount - returned,
                RefundReason::OperatorRefund,
                r.at,
                false,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::sqlite::SqliteStore;
    use super::super::Store;
    use crate::orders::ledger::RefundOf;
    use crate::orders::sale::{RefundReason, SaleState};
    use crate::orders::{ExternalReference, MpId};
    use rusqlite::Connection;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    /// The schema as version 1 of qrgate wrote it.
    const V1_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sales (
    external_reference TEXT PRIMARY KEY,
    pos                TEXT NOT NULL,
    sale_id            TEXT NOT NULL,
    state              TEXT NOT NULL,
    accepted_at        INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    served_at          INTEGER,
    -- 1 while the sale was served to MP and no payment is accounted for.
    unsettled          INTEGER NOT NULL DEFAULT 0,
    body               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sales_by_pos ON sales (pos, accepted_at);
CREATE INDEX IF NOT EXISTS sales_unsettled ON sales (unsettled, served_at);
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
CREATE INDEX IF NOT EXISTS refunds_pending ON refunds_due (auto, refund_id);
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

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// A sale body as version 1 wrote it.
    fn body(reference: &str, state: &str, settled: &str, refunds: &str, operator: &str) -> String {
        format!(
            r#"{{"external_reference":"{reference}","pos":"pump-1","sale_id":"7","currency":"ARS",
            "state":"{state}","lines":[{{"title":"Super","quantity":"1","unit_price":"100.00","total":"100.00"}}],
            "amount":"100.00","accepted_at":1000,"expires_at":null,"served_at":1100,"settled":{settled},
            "delivered_at":null,"refunds":{refunds},"operator_refunds":{operator},"updated_at":2000}}"#
        )
    }

    #[tokio::test]
    async fn a_version_1_file_gets_every_sales_ledger_from_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(V1_SCHEMA).unwrap();
            c.execute_batch("PRAGMA user_version = 1").unwrap();
            let sale = |reference: &str, state: &str, body: String| {
                c.execute(
                    "INSERT INTO sales (external_reference, pos, sale_id, state, accepted_at, updated_at,
                       served_at, unsettled, body) VALUES (?1, 'pump-1', '7', ?2, 1000, 2000, 1100, 0, ?3)",
                    rusqlite::params![reference, state, body],
                )
                .unwrap();
            };
            // A: paid 60 + 40 on one merchant order, not delivered; version 1
            // refunded payment 902 "in full" for 100 (it could only be 40).
            sale(
                "pump-1-a",
                "paid",
                body(
                    "pump-1-a",
                    "paid",
                    r#"{"payment_id":902,"merchant_order":301,"paid":"100.00","at":1500}"#,
                    r#"[{"payment_id":902,"merchant_order":301,"amount":"100.00","at":1600,
                        "reason":"delivery_failed","auto":true,"refunded":{"refund_id":701,"at":1700}}]"#,
                    "[]",
                ),
            );
            // B: cancelled, then paid late; left for the operator.
            sale(
                "pump-1-b",
                "cancelled",
                body(
                    "pump-1-b",
                    "cancelled",
                    "null",
                    r#"[{"payment_id":903,"merchant_order":302,"amount":"100.00","at":1600,
                        "reason":"late_payment","auto":false}]"#,
                    "[]",
                ),
            );
            // C: paid, then 30 refunded by the operator.
            sale(
                "pump-1-c",
                "partially_refunded",
                body(
                    "pump-1-c",
                    "partially_refunded",
                    r#"{"payment_id":904,"merchant_order":303,"paid":"100.00","at":1500}"#,
                    "[]",
                    r#"[{"refund_id":702,"payment_id":904,"amount":"30.00","at":1800,"by":"token"}]"#,
                ),
            );
            // D: pending, no money.
            sale(
                "pump-1-d",
                "pending",
                body("pump-1-d", "pending", "null", "[]", "[]"),
            );
            // E: paid 60 + 40; version 1's "full" refund of 100 went to 907
            // alone, which could return only its 40.
            sale(
                "pump-1-e",
                "refunded",
                body(
                    "pump-1-e",
                    "refunded",
                    r#"{"payment_id":907,"merchant_order":305,"paid":"100.00","at":1500}"#,
                    "[]",
                    r#"[{"refund_id":703,"payment_id":907,"amount":"100.00","at":1800,"by":"console"}]"#,
                ),
            );
            // F: charged twice on the merchant order that paid it; version 1
            // took it for an overpayment.
            sale(
                "pump-1-f",
                "paid",
                body(
                    "pump-1-f",
                    "paid",
                    r#"{"payment_id":909,"merchant_order":306,"paid":"200.00","at":1500}"#,
                    "[]",
                    "[]",
                ),
            );
            c.execute_batch(
                "INSERT INTO closings VALUES ('pump-1-a', 902, 301, 1500), ('pump-1-c', 904, 303, 1500);
                 INSERT INTO refunds_due VALUES (902, 'pump-1-a', 301, '100.00', 1600, 'delivery_failed', 1, 701, 1700),
                   (903, 'pump-1-b', 302, '100.00', 1600, 'late_payment', 0, NULL, NULL);
                 INSERT INTO payments VALUES (901, 301, 'pump-1-a', 'approved', '60.00', 'ARS', 1400),
                   (902, 301, 'pump-1-a', 'refunded', '40.00', 'ARS', 1400),
                   (903, 302, 'pump-1-b', 'approved', '100.00', 'ARS', 1550),
                   (904, 303, 'pump-1-c', 'approved', '100.00', 'ARS', 1450),
                   (905, 304, 'pump-1-c', 'rejected', '100.00', 'ARS', 1440),
                   (906, 305, 'pump-1-e', 'approved', '60.00', 'ARS', 1400),
                   (907, 305, 'pump-1-e', 'refunded', '40.00', 'ARS', 1400),
                   (908, 306, 'pump-1-f', 'approved', '100.00', 'ARS', 1400),
                   (909, 306, 'pump-1-f', 'approved', '100.00', 'ARS', 1401);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, true).unwrap();
        let get = |r: &str| ExternalReference::parse(r).unwrap();

        let a = store.sale(&get("pump-1-a")).await.unwrap().unwrap();
        let ids: Vec<_> = a.ledger.payments().iter().map(|p| p.id.clone()).collect();
        assert_eq!(ids, [MpId::Num(901), MpId::Num(902)]);
        assert_eq!(a.ledger.kept(), Decimal::ZERO);
        assert_eq!(a.ledger.refunded(), d("40.00"), "902 was refunded: its 40");
        assert_eq!(a.ledger.owed(), d("60.00"), "901 was never refunded");
        let calls = a.ledger.plan_owed(a.currency, true);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].key, "qrgate-refund-901");

        let b = store.sale(&get("pump-1-b")).await.unwrap().unwrap();
        assert_eq!(b.state, SaleState::Cancelled);
        assert_eq!(b.ledger.owed(), d("100.00"));
        let (_, owed) = b.ledger.open_owed().next().unwrap();
        assert_eq!((owed.reason, owed.auto), (RefundReason::LatePayment, false));

        let c = store.sale(&get("pump-1-c")).await.unwrap().unwrap();
        assert_eq!(c.ledger.kept(), d("70.00"));
        assert_eq!(c.refunded_total(), d("30.00"));
        assert_eq!(c.ledger.refunds().next().unwrap().1.of, RefundOf::Kept);
        assert_eq!(
            c.ledger.approved(),
            d("100.00"),
            "the rejected payment is not in it"
        );

        let d_sale = store.sale(&get("pump-1-d")).await.unwrap().unwrap();
        assert!(d_sale.ledger.is_empty());

        let e = store.sale(&get("pump-1-e")).await.unwrap().unwrap();
        assert_eq!(
            e.ledger.refunded(),
            d("40.00"),
            "907 could only return its 40"
        );
        assert_eq!(e.ledger.kept(), Decimal::ZERO);
        let (p, owed) = e.ledger.open_owed().next().unwrap();
        assert_eq!(p.id, MpId::Num(906));
        assert_eq!(
            (owed.amount, owed.reason, owed.auto),
            (d("60.00"), RefundReason::OperatorRefund, false),
            "the rest of the operator's refund, for the operator"
        );

        let f = store.sale(&get("pump-1-f")).await.unwrap().unwrap();
        assert_eq!(f.ledger.kept(), d("100.00"));
        let (p, owed) = f.ledger.open_owed().next().unwrap();
        assert_eq!(p.id, MpId::Num(909));
        assert_eq!(
            (owed.amount, owed.reason, owed.auto),
            (d("100.00"), RefundReason::DoublePayment, false),
            "a double charge version 1 missed is the operator's to refund"
        );

        // The queues read the new columns: A refunds itself, B is the
        // operator's, both owe.
        let auto: Vec<_> = store
            .pending_auto_refunds()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.external_reference.to_string())
            .collect();
        assert_eq!(auto, ["pump-1-a"]);
        assert_eq!(store.count_owing().await.unwrap(), 4);
        drop(store);

        let c = Connection::open(&path).unwrap();
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
        let kept_v1: i64 = c
            .query_row("SELECT count(*) FROM refunds_due_v1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept_v1, 2, "version 1's refunds due are kept for audits");
        let recorded: i64 = c
            .query_row("SELECT count(*) FROM ledger_payments", [], |r| r.get(0))
            .unwrap();
        assert_eq!(recorded, 8);
        drop(c);
        // Opening again changes nothing.
        let again = SqliteStore::open(&path, true).unwrap();
        let a2 = again.sale(&get("pump-1-a")).await.unwrap().unwrap();
        assert_eq!(a2, a);
    }
}
