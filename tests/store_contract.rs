//! The store's contract, through the public `qrgate::store` API, run once on
//! a SQLite file (`sqlite::…`) and once on PostgreSQL (`postgresql::…`):
//! every method of the `Store` trait, the keys that make money happen once
//! (a sale's reference, its closing, a payment in one ledger only, refund
//! ids and request keys), closes racing from two tasks, the inbox's
//! generations, and retention forgetting only what did not change since it
//! was read. "Reopening" is a new store on the same file or database, as a
//! restart of qrgate is.
//!
//! The PostgreSQL runs are skipped, said on stderr, when PostgreSQL is not
//! installed, unless QRGATE_REQUIRE_POSTGRES=1 (tests/common/postgres.rs).
//! What only one engine has is tested beside: SQLite's writer in
//! src/store/sqlite.rs, PostgreSQL's migrations, lock, TLS and outages in
//! tests/postgres.rs.

use std::sync::Arc;

use qrgate::orders::ledger::{Ledger, LedgerPayment, Owed, Refund, RefundOf};
use qrgate::orders::sale::{Closing, RefundReason};
use qrgate::orders::{ExternalReference, MpId, Sale, SaleEvent, SaleState};
use qrgate::store::{
    MerchantOrderRecord, PaymentRecord, PgStore, RefundRequest, RegistrationRecord,
    RejectionRecord, RetentionPage, SaleFilter, SqliteStore, Store, StoreError,
};
use rust_decimal::Decimal;
use sales::{put, sale};

#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/sales.rs"]
mod sales;
#[path = "common/wait.rs"]
mod wait;

/// One engine's database, opened as often as a test restarts.
enum Engine {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Engine {
    fn sqlite() -> Engine {
        Engine::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A new database on the test binary's PostgreSQL.
    fn postgres() -> Option<Engine> {
        postgres::shared().map(|pg| Engine::Postgres(pg.fresh_url()))
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Engine::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("q.db"), false).unwrap())
            }
            Engine::Postgres(url) => Arc::new(PgStore::connect(url).await.unwrap()),
        }
    }
}

/// Each contract case, as `sqlite::case` and `postgresql::case`.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Engine::sqlite()).await
                }
            )*
        }
        mod postgresql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(engine) = super::Engine::postgres() {
                        super::$case(engine).await
                    }
                }
            )*
        }
    };
}

contract!(
    a_sale_survives_reopening_and_is_closed_only_once,
    a_change_decided_on_an_older_version_of_its_pos_is_refused_stale_and_writes_nothing,
    closes_of_one_sale_racing_from_eight_tasks_give_exactly_one_ok,
    a_payment_is_recorded_in_one_sale_s_ledger_only,
    a_sale_is_one_row_by_its_reference_and_a_refund_is_recorded_once,
    merchant_orders_keep_their_payments_and_text_ids_in_the_order_they_came,
    rejections_come_newest_first_one_latest_per_pos_and_go_oldest_first,
    a_device_sale_id_finds_the_pos_s_latest_sale_with_it,
    reconciliation_and_refunds_find_the_sales_they_must_work_on,
    the_inbox_folds_duplicates_and_keeps_an_entry_until_its_latest_notification_is_applied,
    refund_requests_are_kept_by_key_until_answered_then_pruned,
    a_paid_sale_is_searched_again_until_its_last_search,
    retention_pages_through_candidates_and_forgets_only_sales_unchanged_since_read,
    the_operator_filters_sales_by_pos_state_owing_and_time_newest_first,
    a_pos_registration_replaces_the_previous_one_and_survives_reopening,
);

fn reference(r: &str) -> ExternalReference {
    ExternalReference::parse(r).unwrap()
}

/// A ledger payment of `amount`, kept whole by its sale.
fn kept(id: u64, merchant_order: u64, amount: i64, at: i64) -> LedgerPayment {
    LedgerPayment {
        id: MpId::Num(id),
        merchant_order: MpId::Num(merchant_order),
        amount: Decimal::from(amount),
        approved_at: Some(at),
        seen_at: at,
        held: false,
        kept: Decimal::from(amount),
        owed: vec![],
        refunds: vec![],
    }
}

/// `s` closed at `at` by payment `payment` of merchant order `mo`, kept whole.
fn paid(mut s: Sale, payment: u64, mo: u64, at: i64) -> Sale {
    s.state = SaleState::Paid;
    s.settled = Some(Closing {
        payment_id: MpId::Num(payment),
        merchant_order: MpId::Num(mo),
        paid: Decimal::from(10),
        at,
    });
    s.ledger = Ledger::from_payments(vec![kept(payment, mo, 10, at)]);
    s.updated_at = at;
    s
}

const PAID: SaleEvent = SaleEvent::Paid { overpaid: false };

async fn events(store: &dyn Store, r: &str) -> Vec<String> {
    store
        .timeline(&reference(r))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect()
}

fn references(sales: Vec<Sale>) -> Vec<String> {
    sales
        .into_iter()
        .map(|s| s.external_reference.as_str().to_owned())
        .collect()
}

async fn a_sale_survives_reopening_and_is_closed_only_once(engine: Engine) {
    let store = engine.open().await;
    let s = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    put(&*store, &s, &SaleEvent::Accepted).await.unwrap();
    for (pos, r) in [("pump-1", "pump-1-b"), ("pump-2", "pump-2-a")] {
        let other = sale(pos, r, "2", SaleState::Pending, 2);
        put(&*store, &other, &SaleEvent::Accepted).await.unwrap();
    }
    let s = paid(s, 9, 8, 3);
    put(&*store, &s, &PAID).await.unwrap();
    let e = put(&*store, &s, &PAID).await.unwrap_err();
    assert!(matches!(e, StoreError::AlreadyClosed(_)), "{e}");
    drop(store);

    let store = engine.open().await;
    let mut latest = references(store.latest_sales().await.unwrap());
    latest.sort();
    assert_eq!(latest, ["pump-1-b", "pump-2-a"]);
    let found = store.sale(&s.external_reference).await.unwrap().unwrap();
    assert_eq!(found.state, SaleState::Paid);
    assert_eq!(found.ledger, s.ledger);
    assert!(store.sale(&reference("pump-9-x")).await.unwrap().is_none());
    assert_eq!(
        events(store.as_ref(), "pump-1-a").await,
        ["accepted", "paid"]
    );
    // Closed across the restart too.
    let e = put(&*store, &s, &PAID).await.unwrap_err();
    assert!(matches!(e, StoreError::AlreadyClosed(_)), "{e}");
    store.check_writable().await.unwrap();
}

async fn a_change_decided_on_an_older_version_of_its_pos_is_refused_stale_and_writes_nothing(
    engine: Engine,
) {
    let store = engine.open().await;
    let head = store.pos_head("pump-1").await.unwrap();
    assert_eq!((head.version, head.latest.is_none()), (0, true));
    assert!(store.pos_versions().await.unwrap().is_empty());
    let mut a = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    assert_eq!(store.record(&a, &SaleEvent::Accepted, 0).await.unwrap(), 1);
    // Decided before a was stored: refused, and nothing of it written.
    let b = sale("pump-1", "pump-1-b", "2", SaleState::Pending, 2);
    match store.record(&b, &SaleEvent::Accepted, 0).await.unwrap_err() {
        StoreError::Stale { pos, version } => assert_eq!((pos.as_str(), version), ("pump-1", 1)),
        e => panic!("{e}"),
    }
    assert!(store.sale(&b.external_reference).await.unwrap().is_none());
    assert!(events(store.as_ref(), "pump-1-b").await.is_empty());
    // A close decided on an older version is stale before it is anything.
    let closed = paid(a.clone(), 7, 8, 3);
    let e = store.record(&closed, &PAID, 0).await.unwrap_err();
    assert!(matches!(e, StoreError::Stale { version: 1, .. }), "{e}");
    a.state = SaleState::Cancelled;
    a.updated_at = 4;
    assert_eq!(store.record(&a, &SaleEvent::Cancelled, 1).await.unwrap(), 2);
    let head = store.pos_head("pump-1").await.unwrap();
    assert_eq!(head.version, 2);
    assert_eq!(head.latest.map(|s| s.state), Some(SaleState::Cancelled));
    // Eight new sales of pump-2 decided on its first state: one is stored.
    let racing: Vec<_> = (0..8)
        .map(|n| {
            let store = Arc::clone(&store);
            let s = sale(
                "pump-2",
                &format!("pump-2-{n}"),
                &n.to_string(),
                SaleState::Pending,
                5,
            );
            tokio::spawn(async move { store.record(&s, &SaleEvent::Accepted, 0).await })
        })
        .collect();
    let mut stored = 0;
    for r in racing {
        match r.await.unwrap() {
            Ok(v) => {
                stored += 1;
                assert_eq!(v, 1);
            }
            Err(StoreError::Stale { version: 1, .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(stored, 1);
    assert_eq!(
        store
            .sales(SaleFilter {
                pos: Some("pump-2".into()),
                limit: 10,
                ..SaleFilter::default()
            })
            .await
            .unwrap()
            .len(),
        1
    );
    drop(store);
    // Versions are stored: a restart starts from them.
    let store = engine.open().await;
    let mut versions = store.pos_versions().await.unwrap();
    versions.sort();
    assert_eq!(
        versions,
        [("pump-1".to_owned(), 2), ("pump-2".to_owned(), 1)]
    );
}

async fn closes_of_one_sale_racing_from_eight_tasks_give_exactly_one_ok(engine: Engine) {
    let store = engine.open().await;
    let s = sale("pump-1", "pump-1-race", "1", SaleState::Pending, 1);
    put(&*store, &s, &SaleEvent::Accepted).await.unwrap();
    let closes: Vec<_> = (0..8)
        .map(|n| {
            let store = Arc::clone(&store);
            // Each believes its own payment closes the sale, and, refused
            // as stale, reads the POS again and tries again, as a book does.
            let s = paid(s.clone(), 900 + n, 800 + n, 2);
            tokio::spawn(async move {
                loop {
                    match put(&*store, &s, &PAID).await {
                        Err(StoreError::Stale { .. }) => continue,
                        other => return other,
                    }
                }
            })
        })
        .collect();
    let mut ok = 0;
    for close in closes {
        match close.await.unwrap() {
            Ok(version) => {
                ok += 1;
                assert_eq!(version, 2);
            }
            Err(StoreError::AlreadyClosed(r)) => assert_eq!(r, "pump-1-race"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one close");
    assert_eq!(
        events(store.as_ref(), "pump-1-race").await,
        ["accepted", "paid"]
    );
    // The closing and the ledger are the winner's alone.
    let closed = store.sale(&s.external_reference).await.unwrap().unwrap();
    let winner = closed.settled.unwrap().payment_id;
    assert_eq!(closed.ledger.payments().len(), 1);
    assert_eq!(closed.ledger.payments()[0].id, winner);
}

async fn a_payment_is_recorded_in_one_sale_s_ledger_only(engine: Engine) {
    let store = engine.open().await;
    let a = paid(
        sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1),
        77,
        70,
        2,
    );
    put(&*store, &a, &PAID).await.unwrap();
    // Another sale claiming the same payment is refused, naming the owner.
    let b = paid(
        sale("pump-2", "pump-2-b", "1", SaleState::Pending, 1),
        77,
        71,
        3,
    );
    match put(&*store, &b, &PAID).await.unwrap_err() {
        StoreError::ForeignPayment { payment, owner } => {
            assert_eq!((payment.as_str(), owner.as_str()), ("77", "pump-1-a"))
        }
        e => panic!("{e}"),
    }
    // Nothing of the refused write stayed: b is not closed, not even known.
    assert!(store.sale(&b.external_reference).await.unwrap().is_none());
    assert!(events(store.as_ref(), "pump-2-b").await.is_empty());
    // Its owner writes its ledger again freely.
    let mut again = a.clone();
    again.updated_at = 4;
    put(&*store, &again, &SaleEvent::RefundDue).await.unwrap();
}

async fn a_sale_is_one_row_by_its_reference_and_a_refund_is_recorded_once(engine: Engine) {
    let store = engine.open().await;
    let mut s = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    put(&*store, &s, &SaleEvent::Accepted).await.unwrap();
    s = paid(s, 5, 6, 2);
    put(&*store, &s, &PAID).await.unwrap();
    // The operator refunds it: refund 55 of payment 5, written at each of
    // two events (a redelivered answer writes the same ledger again).
    s.state = SaleState::Refunded;
    s.ledger = Ledger::from_payments(vec![LedgerPayment {
        kept: Decimal::ZERO,
        refunds: vec![Refund {
            id: MpId::Num(55),
            amount: Decimal::from(10),
            at: 3,
            by: "console".into(),
            of: RefundOf::Kept,
            request: Some("req-1".into()),
        }],
        ..kept(5, 6, 10, 2)
    }]);
    for at in [3, 4] {
        s.updated_at = at;
        let refunded = SaleEvent::RefundedByOperator {
            amount: Decimal::from(10),
            by: "console".into(),
        };
        put(&*store, &s, &refunded).await.unwrap();
    }
    let all = store
        .sales(SaleFilter {
            pos: Some("pump-1".into()),
            limit: 100,
            ..SaleFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "one row per reference");
    assert_eq!(all[0].state, SaleState::Refunded);
    let page = store
        .retention_candidates(RetentionPage {
            ended_before: i64::MAX,
            after: (i64::MIN, i64::MIN),
            limit: 10,
            rechecks: 0,
            with_records: true,
        })
        .await
        .unwrap();
    let record = page[0].record.as_ref().unwrap();
    assert_eq!(
        record["ledger_refunds"].as_array().unwrap().len(),
        1,
        "{record}"
    );
    assert_eq!(record["ledger_refunds"][0]["refund_id"], 55);
    assert_eq!(record["ledger_payments"][0]["amount"], "10");
    assert_eq!(record["closing"]["payment_id"], 5);
}

async fn merchant_orders_keep_their_payments_and_text_ids_in_the_order_they_came(engine: Engine) {
    let store = engine.open().await;
    let payment = |id: MpId, status: &str| PaymentRecord {
        id,
        status: status.into(),
        amount: "10.50".into(),
        currency: Some("ARS".into()),
    };
    let mo = |id: MpId, status: &str, at: i64, payments| MerchantOrderRecord {
        id,
        external_reference: Some("pump-1-a".into()),
        status: status.into(),
        body: format!("{{\"status\":\"{status}\"}}"),
        seen_at: at,
        payments,
    };
    let classic = MpId::Num(30_000_000_001);
    let text = MpId::Text("ORD01JQ4S4KY8HWQ6NA5PXB65B3D3".into());
    store
        .record_merchant_order(mo(
            classic.clone(),
            "opened",
            1,
            vec![payment(MpId::Num(91), "rejected")],
        ))
        .await
        .unwrap();
    store
        .record_merchant_order(mo(
            text.clone(),
            "processed",
            2,
            vec![payment(
                MpId::Text("PAY01JQ4S4KY8HWQ6NA5PXB65B3D3".into()),
                "processed",
            )],
        ))
        .await
        .unwrap();
    // Fetched again: its status moves on, a payment joins; it keeps its place.
    store
        .record_merchant_order(mo(
            classic.clone(),
            "closed",
            3,
            vec![
                payment(MpId::Num(91), "rejected"),
                payment(MpId::Num(92), "approved"),
            ],
        ))
        .await
        .unwrap();
    let one = store.merchant_order(&classic).await.unwrap().unwrap();
    assert_eq!((one.status.as_str(), one.seen_at), ("closed", 3));
    assert_eq!(one.external_reference.as_deref(), Some("pump-1-a"));
    assert!(store.merchant_order(&MpId::Num(1)).await.unwrap().is_none());
    let of = store
        .merchant_orders_of(&reference("pump-1-a"))
        .await
        .unwrap();
    let ids: Vec<_> = of.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, [classic, text]);
    let statuses: Vec<_> = of[0]
        .payments
        .iter()
        .map(|p| (p.id.clone(), p.status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [(MpId::Num(91), "rejected"), (MpId::Num(92), "approved")]
    );
    assert_eq!(of[0].payments[1].amount, "10.50", "money as written");
    assert_eq!(
        of[1].payments[0].id,
        MpId::Text("PAY01JQ4S4KY8HWQ6NA5PXB65B3D3".into())
    );
    assert!(store
        .merchant_orders_of(&reference("pump-1-z"))
        .await
        .unwrap()
        .is_empty());
}

fn rejection(pos: &str, n: i64) -> RejectionRecord {
    RejectionRecord {
        pos: pos.into(),
        sale_id: Some(n.to_string()),
        code: "bad".into(),
        message: "refused".into(),
        at: n,
    }
}

async fn rejections_come_newest_first_one_latest_per_pos_and_go_oldest_first(engine: Engine) {
    let store = engine.open().await;
    for (pos, n) in [
        ("pump-1", 1),
        ("pump-2", 2),
        ("pump-1", 3),
        ("pump-2", 4),
        ("pump-1", 5),
    ] {
        store.record_rejection(rejection(pos, n)).await.unwrap();
    }
    let of_pump1: Vec<_> = store
        .rejections("pump-1", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.at)
        .collect();
    assert_eq!(of_pump1, [5, 3], "newest first, at most the limit");
    assert_eq!(
        store.rejections("pump-1", 10).await.unwrap()[0],
        rejection("pump-1", 5)
    );
    let mut latest: Vec<_> = store
        .latest_rejections()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.pos, r.at))
        .collect();
    latest.sort();
    assert_eq!(latest, [("pump-1".to_owned(), 5), ("pump-2".to_owned(), 4)]);
    // Among the 3 oldest, those from before 3: the first two.
    assert_eq!(store.forget_rejections(3, 3).await.unwrap(), 2);
    assert_eq!(store.forget_rejections(3, 3).await.unwrap(), 0);
    let left: Vec<_> = store
        .rejections("pump-1", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.at)
        .collect();
    assert_eq!(left, [5, 3]);
    assert_eq!(store.rejections("pump-2", 10).await.unwrap().len(), 1);
}

async fn a_device_sale_id_finds_the_pos_s_latest_sale_with_it(engine: Engine) {
    let store = engine.open().await;
    // The device reused sale id 7 after a reset: two sales carry it.
    let mut old = sale("pump-1", "pump-1-old", "7", SaleState::Pending, 1);
    put(&*store, &old, &SaleEvent::Accepted).await.unwrap();
    old.state = SaleState::Cancelled;
    old.updated_at = 2;
    put(&*store, &old, &SaleEvent::Cancelled).await.unwrap();
    let new = sale("pump-1", "pump-1-new", "7", SaleState::Pending, 3);
    put(&*store, &new, &SaleEvent::Accepted).await.unwrap();
    put(
        &*store,
        &sale("pump-2", "pump-2-x", "7", SaleState::Pending, 4),
        &SaleEvent::Accepted,
    )
    .await
    .unwrap();
    let found = store
        .sale_by_device_id("pump-1", "7")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.external_reference.as_str(), "pump-1-new");
    assert!(store
        .sale_by_device_id("pump-1", "8")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .sale_by_device_id("pump-3", "7")
        .await
        .unwrap()
        .is_none());
}

async fn reconciliation_and_refunds_find_the_sales_they_must_work_on(engine: Engine) {
    let store = engine.open().await;
    // Served at 10 and at 20, neither closed; one never served.
    for (r, served) in [
        ("pump-1-a", Some(10)),
        ("pump-2-b", Some(20)),
        ("pump-3-c", None),
    ] {
        let mut s = sale(&r[..6], r, "1", SaleState::Pending, 1);
        s.served_at = served;
        put(&*store, &s, &SaleEvent::Served).await.unwrap();
    }
    let mut searched = references(store.unsettled_served(15).await.unwrap());
    searched.sort();
    assert_eq!(searched, ["pump-2-b"]);
    assert_eq!(store.unsettled_served(0).await.unwrap().len(), 2);
    // A closed sale is searched no more.
    let mut s = paid(
        sale("pump-2", "pump-2-b", "1", SaleState::Pending, 1),
        3,
        4,
        30,
    );
    s.served_at = Some(20);
    put(&*store, &s, &PAID).await.unwrap();
    assert_eq!(
        references(store.unsettled_served(0).await.unwrap()),
        ["pump-1-a"]
    );

    assert_eq!(store.count_owing().await.unwrap(), 0);
    assert!(store.pending_auto_refunds().await.unwrap().is_empty());
    // A second payment came: owed back, by qrgate itself (auto) or by the
    // operator.
    let owing = |r: &str, payment: u64, auto: bool| {
        let mut s = paid(
            sale(&r[..6], r, "2", SaleState::Pending, 40),
            payment,
            payment + 1,
            41,
        );
        let mut second = kept(payment + 100, payment + 1, 10, 42);
        second.kept = Decimal::ZERO;
        second.owed = vec![Owed {
            amount: Decimal::from(10),
            reason: RefundReason::DoublePayment,
            auto,
            at: 42,
            refund: None,
        }];
        s.ledger = Ledger::from_payments(vec![s.ledger.payments()[0].clone(), second]);
        s.updated_at = 42;
        s
    };
    put(&*store, &owing("pump-4-d", 500, true), &PAID)
        .await
        .unwrap();
    put(&*store, &owing("pump-5-e", 800, false), &PAID)
        .await
        .unwrap();
    assert_eq!(store.count_owing().await.unwrap(), 2);
    assert_eq!(
        references(store.pending_auto_refunds().await.unwrap()),
        ["pump-4-d"]
    );
}

async fn the_inbox_folds_duplicates_and_keeps_an_entry_until_its_latest_notification_is_applied(
    engine: Engine,
) {
    let store = engine.open().await;
    let first = store.inbox_add("merchant_order", "7", 100).await.unwrap();
    assert_eq!(
        (first.generation, first.attempts, first.next_at),
        (1, 0, 100)
    );
    store
        .inbox_retry(
            "merchant_order",
            "7",
            1,
            3,
            5_000,
            "Mercado Pago answered 500",
        )
        .await
        .unwrap();
    // A duplicate folds into the pending entry and makes it due now.
    let again = store.inbox_add("merchant_order", "7", 200).await.unwrap();
    assert_eq!((again.generation, again.attempts), (2, 3));
    assert_eq!((again.received_at, again.next_at), (100, 200));
    store.inbox_add("payment", "9", 300).await.unwrap();
    assert_eq!(store.inbox_pending().await.unwrap().len(), 2);
    // A failure noted for the older fetch does not push the newer back.
    store
        .inbox_retry("merchant_order", "7", 1, 4, 9_000, "500 again")
        .await
        .unwrap();
    let now = store.inbox_pending().await.unwrap();
    assert_eq!((now[0].attempts, now[0].next_at), (3, 200));
    // A failure of the current generation waits, never sooner than due.
    store
        .inbox_retry("merchant_order", "7", 2, 4, 9_000, "500 again")
        .await
        .unwrap();
    let now = store.inbox_pending().await.unwrap();
    assert_eq!((now[0].attempts, now[0].next_at), (4, 9_000));
    // A fetch that started before the duplicate does not finish it.
    assert_eq!(
        store
            .inbox_done("merchant_order", "7", 1, 400, "paid")
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        store
            .inbox_done("merchant_order", "7", 2, 400, "paid")
            .await
            .unwrap(),
        None
    );
    // A stale fetch of an entry done already finds nothing to do.
    assert_eq!(
        store
            .inbox_done("merchant_order", "7", 1, 450, "paid")
            .await
            .unwrap(),
        None
    );
    drop(store);
    // Across a restart only what is not applied is left.
    let store = engine.open().await;
    let pending = store.inbox_pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].topic.as_str(), pending[0].id.as_str()),
        ("payment", "9")
    );
    // News about a resource done before opens it again, afresh.
    let reopened = store.inbox_add("merchant_order", "7", 500).await.unwrap();
    assert_eq!((reopened.attempts, reopened.received_at), (0, 500));
    assert_eq!(store.inbox_pending().await.unwrap().len(), 2);
    // Done entries are forgotten after a while; pending ones never.
    store
        .inbox_done("payment", "9", 1, 600, "paid")
        .await
        .unwrap();
    store.prune(700).await.unwrap();
    assert_eq!(store.inbox_pending().await.unwrap().len(), 1);
    // Pruned, a done entry comes back as a new one.
    assert_eq!(
        store
            .inbox_add("payment", "9", 800)
            .await
            .unwrap()
            .generation,
        1
    );
}

async fn refund_requests_are_kept_by_key_until_answered_then_pruned(engine: Engine) {
    let store = engine.open().await;
    let request = |key: &str, plan: &str, answer: Option<(u16, &str)>, at| RefundRequest {
        key: key.into(),
        external_reference: "pump-1-a".into(),
        plan: plan.into(),
        answer: answer.map(|(s, a)| (s, a.to_owned())),
        at,
    };
    store
        .put_refund_request(request("k1", "[1]", None, 10))
        .await
        .unwrap();
    store
        .put_refund_request(request("k2", "[2]", None, 20))
        .await
        .unwrap();
    // The same key again: one request, its plan and answer replaced.
    store
        .put_refund_request(request("k1", "[1,1]", Some((201, "{}")), 99))
        .await
        .unwrap();
    let k1 = store.refund_request("k1").await.unwrap().unwrap();
    assert_eq!(
        k1,
        request("k1", "[1,1]", Some((201, "{}")), 10),
        "at stays the first's"
    );
    assert!(store.refund_request("k3").await.unwrap().is_none());
    let open: Vec<_> = store
        .unanswered_refund_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(open, ["k2"]);
    // Answered ones go after a while; unanswered ones never.
    store.prune(1_000).await.unwrap();
    assert!(store.refund_request("k1").await.unwrap().is_none());
    assert!(store.refund_request("k2").await.unwrap().is_some());
}

async fn a_paid_sale_is_searched_again_until_its_last_search(engine: Engine) {
    let store = engine.open().await;
    for (r, at) in [("pump-1-a", 100), ("pump-2-b", 200), ("pump-3-c", 300)] {
        let s = paid(
            sale(&r[..6], r, "1", SaleState::Pending, 1),
            at as u64,
            at as u64 + 1,
            at,
        );
        put(&*store, &s, &PAID).await.unwrap();
    }
    let due = |done, before, limit| {
        let store = Arc::clone(&store);
        async move {
            store
                .due_rechecks(done, before, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.external_reference.as_str().to_owned(), r.paid_at, r.done))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        due(0, 250, 10).await,
        [
            ("pump-1-a".to_owned(), 100, 0),
            ("pump-2-b".to_owned(), 200, 0)
        ]
    );
    assert_eq!(
        due(0, 1_000, 1).await.len(),
        1,
        "at most the limit, oldest first"
    );
    store
        .recheck_done(&reference("pump-1-a"), 1, false)
        .await
        .unwrap();
    assert_eq!(due(1, 1_000, 10).await, [("pump-1-a".to_owned(), 100, 1)]);
    store
        .recheck_done(&reference("pump-1-a"), 2, true)
        .await
        .unwrap();
    assert!(due(1, 1_000, 10).await.is_empty());
    assert!(
        due(2, 1_000, 10).await.is_empty(),
        "the last search forgets it"
    );
    // Searches of sales paid long ago are forgotten.
    store.prune(250).await.unwrap();
    assert_eq!(due(0, 1_000, 10).await, [("pump-3-c".to_owned(), 300, 0)]);
}

async fn retention_pages_through_candidates_and_forgets_only_sales_unchanged_since_read(
    engine: Engine,
) {
    let store = engine.open().await;
    // pump-1: a paid sale (a search still due), then a newer one.
    let a = paid(
        sale("pump-1", "pump-1-a", "1", SaleState::Pending, 10),
        11,
        12,
        20,
    );
    put(&*store, &a, &PAID).await.unwrap();
    store
        .record_merchant_order(MerchantOrderRecord {
            id: MpId::Num(12),
            external_reference: Some("pump-1-a".into()),
            status: "closed".into(),
            body: "{\"id\":12}".into(),
            seen_at: 20,
            payments: vec![PaymentRecord {
                id: MpId::Num(11),
                status: "approved".into(),
                amount: "10".into(),
                currency: Some("ARS".into()),
            }],
        })
        .await
        .unwrap();
    store.inbox_add("merchant_order", "12", 20).await.unwrap();
    store
        .inbox_done("merchant_order", "12", 1, 21, "paid")
        .await
        .unwrap();
    let b = sale("pump-1", "pump-1-b", "2", SaleState::Pending, 30);
    put(&*store, &b, &SaleEvent::Accepted).await.unwrap();
    // pump-2: a cancelled sale with an operator's refund under way, then a
    // newer one; pump-3: its only sale.
    let mut c = sale("pump-2", "pump-2-c", "1", SaleState::Cancelled, 40);
    c.updated_at = 41;
    put(&*store, &c, &SaleEvent::Cancelled).await.unwrap();
    store
        .put_refund_request(RefundRequest {
            key: "rq".into(),
            external_reference: "pump-2-c".into(),
            plan: "[]".into(),
            answer: None,
            at: 41,
        })
        .await
        .unwrap();
    let d = sale("pump-2", "pump-2-d", "2", SaleState::Pending, 50);
    put(&*store, &d, &SaleEvent::Accepted).await.unwrap();
    let e = sale("pump-3", "pump-3-e", "1", SaleState::Cancelled, 60);
    put(&*store, &e, &SaleEvent::Cancelled).await.unwrap();

    // Pages of two, in the order sales last changed.
    let page = |after, with_records| RetentionPage {
        ended_before: 55,
        after,
        limit: 2,
        rechecks: 1,
        with_records,
    };
    let first = store
        .retention_candidates(page((i64::MIN, i64::MIN), false))
        .await
        .unwrap();
    let seen: Vec<_> = first
        .iter()
        .map(|c| {
            (
                c.sale.external_reference.as_str().to_owned(),
                c.superseded,
                c.rechecking,
                c.refunding,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("pump-1-a".to_owned(), true, true, false),
            ("pump-1-b".to_owned(), false, false, false)
        ]
    );
    assert!(first.iter().all(|c| c.record.is_none()));
    let second = store
        .retention_candidates(page(first[1].position, true))
        .await
        .unwrap();
    let seen: Vec<_> = second
        .iter()
        .map(|c| {
            (
                c.sale.external_reference.as_str().to_owned(),
                c.superseded,
                c.refunding,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("pump-2-c".to_owned(), true, true),
            ("pump-2-d".to_owned(), false, false)
        ]
    );
    let record = second[0].record.as_ref().unwrap();
    assert_eq!(record["timeline"][0]["event"], "cancelled", "{record}");
    assert!(store
        .retention_candidates(page(second[1].position, false))
        .await
        .unwrap()
        .is_empty());
    let with_record = store
        .retention_candidates(page((i64::MIN, i64::MIN), true))
        .await
        .unwrap();
    let record = with_record[0].record.as_ref().unwrap();
    assert_eq!(record["closing"]["merchant_order"], 12, "{record}");
    assert_eq!(record["merchant_orders"][0]["body"]["id"], 12, "{record}");
    assert_eq!(
        record["merchant_orders"][0]["payments"][0]["id"], 11,
        "{record}"
    );
    assert_eq!(record["timeline"][0]["event"], "paid");

    // a changed since it was read (a delivery came): it stays. c has a
    // refund under way: it stays. The rest go, with every row of theirs.
    let mut a2 = a.clone();
    a2.delivered_at = Some(70);
    a2.updated_at = 70;
    put(
        &*store,
        &a2,
        &SaleEvent::Delivered {
            ok: true,
            reason: None,
        },
    )
    .await
    .unwrap();
    let forgotten = store
        .forget_sales(vec![
            (reference("pump-1-a"), 20),
            (reference("pump-2-c"), 41),
            (reference("pump-3-e"), 60),
        ])
        .await
        .unwrap();
    assert_eq!(forgotten, 1);
    assert!(store.sale(&reference("pump-3-e")).await.unwrap().is_none());
    assert!(store.sale(&reference("pump-2-c")).await.unwrap().is_some());
    assert_eq!(
        events(store.as_ref(), "pump-1-a").await,
        ["paid", "delivered"]
    );
    // Read again, a goes: its merchant order, payments, closing, search and
    // done notification with it.
    assert_eq!(
        store
            .forget_sales(vec![(reference("pump-1-a"), 70)])
            .await
            .unwrap(),
        1
    );
    assert!(store.sale(&reference("pump-1-a")).await.unwrap().is_none());
    assert!(events(store.as_ref(), "pump-1-a").await.is_empty());
    assert!(store
        .merchant_order(&MpId::Num(12))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .due_rechecks(0, i64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .inbox_add("merchant_order", "12", 80)
            .await
            .unwrap()
            .generation,
        1
    );
    // Its closing went too: the reference could be closed anew.
    put(&*store, &a, &PAID).await.unwrap();
}

async fn the_operator_filters_sales_by_pos_state_owing_and_time_newest_first(engine: Engine) {
    let store = engine.open().await;
    for (pos, r, state, at) in [
        ("pump-1", "pump-1-a", SaleState::Cancelled, 1),
        ("pump-1", "pump-1-b", SaleState::Pending, 2),
        ("pump-2", "pump-2-c", SaleState::Pending, 3),
    ] {
        put(&*store, &sale(pos, r, "1", state, at), &SaleEvent::Accepted)
            .await
            .unwrap();
    }
    let mut owing = sale("pump-2", "pump-2-d", "2", SaleState::Cancelled, 4);
    let mut late = kept(1, 2, 10, 4);
    late.kept = Decimal::ZERO;
    late.owed = vec![Owed {
        amount: Decimal::from(10),
        reason: RefundReason::LatePayment,
        auto: false,
        at: 4,
        refund: None,
    }];
    owing.ledger = Ledger::from_payments(vec![late]);
    put(&*store, &owing, &SaleEvent::RefundDue).await.unwrap();
    let all = SaleFilter {
        limit: 100,
        ..SaleFilter::default()
    };
    let pump1 = Some("pump-1".to_owned());
    let cases = [
        (
            all.clone(),
            vec!["pump-2-d", "pump-2-c", "pump-1-b", "pump-1-a"],
        ),
        (
            SaleFilter {
                limit: 2,
                ..all.clone()
            },
            vec!["pump-2-d", "pump-2-c"],
        ),
        (
            SaleFilter {
                pos: pump1.clone(),
                ..all.clone()
            },
            vec!["pump-1-b", "pump-1-a"],
        ),
        (
            SaleFilter {
                state: Some("pending".into()),
                ..all.clone()
            },
            vec!["pump-2-c", "pump-1-b"],
        ),
        (
            SaleFilter {
                owing: true,
                ..all.clone()
            },
            vec!["pump-2-d"],
        ),
        (
            SaleFilter {
                since: Some(3),
                ..all.clone()
            },
            vec!["pump-2-d", "pump-2-c"],
        ),
        (
            SaleFilter {
                pos: pump1,
                state: Some("paid".into()),
                ..all
            },
            vec![],
        ),
    ];
    for (filter, expected) in cases {
        let found = references(store.sales(filter.clone()).await.unwrap());
        assert_eq!(found, expected, "{filter:?}");
    }
}

async fn a_pos_registration_replaces_the_previous_one_and_survives_reopening(engine: Engine) {
    let store = engine.open().await;
    let mut r = RegistrationRecord {
        pos: "pump-1".into(),
        mp_external_id: "pump1".into(),
        store: "st01".into(),
        mp_pos_id: 3_000_001,
        url: Some("https://s.example/mp/pos/pump-1?key=***".into()),
        qr_image: Some("https://qr/1.png".into()),
        qr_template_document: None,
        qr_template_image: None,
        action: "created".into(),
        at: 1,
    };
    store.record_registration(r.clone()).await.unwrap();
    let other = RegistrationRecord {
        pos: "pump-0".into(),
        ..r.clone()
    };
    store.record_registration(other.clone()).await.unwrap();
    r.action = "unchanged".into();
    r.at = 2;
    store.record_registration(r.clone()).await.unwrap();
    drop(store);
    let store = engine.open().await;
    assert_eq!(
        store.registrations().await.unwrap(),
        vec![other, r],
        "by POS id"
    );
}
