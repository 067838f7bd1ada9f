//! Two books on one store, as two qrgate instances will be: a change is
//! decided on the POS's version each book last saw, and the store refuses
//! one decided on a state that moved on since. The book then reads the POS
//! again and decides again, so a stale instance never acts on what it
//! believed.

use qrgate::book::{Book, Tell, Verdict};
use qrgate::mqtt::inbound::parse;
use qrgate::mqtt::topics::DeviceTopic;
use qrgate::orders::merchant_order::{
    MerchantOrderFacts, MerchantOrderStatus, PaymentFacts, PaymentStatus,
};
use qrgate::orders::{MpId, Outcome, PosConfig, PosId, PosKind, SaleState};
use qrgate::store::{SqliteStore, Store};
use rust_decimal::Decimal;
use tokio::sync::mpsc;

use crate::helpers::{bare_book, pos};

struct Instance {
    book: Book,
    told: mpsc::UnboundedReceiver<Tell>,
}

async fn instance(path: &std::path::Path, cfg: PosConfig) -> Instance {
    let (book, told) = bare_book(path, vec![cfg]).await;
    Instance { book, told }
}

fn sale(sale_id: &str, price: &str) -> qrgate::orders::Command {
    let body = format!(
        r#"{{"sale_id":"{sale_id}","items":[{{"title":"Super 95","quantity":"1","unit_price":"{price}"}}]}}"#
    );
    parse(DeviceTopic::Sale, "pump-1", body.as_bytes(), 16 * 1024).unwrap()
}

fn told_states(i: &mut Instance) -> Vec<(String, SaleState)> {
    let mut out = Vec::new();
    while let Ok(t) = i.told.try_recv() {
        if let Tell::State(s) | Tell::Stored { sale: s, .. } = t {
            out.push((s.sale_id.as_str().to_owned(), s.state));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_decided_on_a_stale_view_is_decided_again_and_refused_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let id = PosId::parse("pump-1").unwrap();
    let mut a = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    let mut b = instance(&path, pos("pump-1", PosKind::Fuel)).await;

    let first = a.book.execute(&id, sale("1", "100.00")).await.unwrap();
    assert!(matches!(first, Outcome::Changed { .. }), "{first:?}");
    assert_eq!(told_states(&mut a), [("1".to_owned(), SaleState::Pending)]);

    // B still shows the POS idle: its sale would be accepted there, but the
    // store holds A's pending sale, so B decides again on it.
    assert!(b.book.view(&id).unwrap().state.current.is_none());
    let second = b.book.execute(&id, sale("2", "250.00")).await.unwrap();
    match &second {
        Outcome::Rejected { why, .. } => assert_eq!(why.code(), "busy", "{second:?}"),
        other => panic!("B accepted a second sale on a busy POS: {other:?}"),
    }
    let seen = b.book.view(&id).unwrap();
    let current = seen.state.current.as_ref().expect("B read A's sale");
    assert_eq!(current.sale_id.as_str(), "1");
    assert_eq!(seen.version, 1);
    assert_eq!(seen.answer.status, 200, "B's polls now serve A's sale");
    // Nothing of sale 2 was stored, and B told the device no state of it.
    let store = SqliteStore::open(&path, false).unwrap();
    let head = store.pos_head("pump-1").await.unwrap();
    assert_eq!(head.version, 1);
    assert_eq!(head.latest.unwrap().sale_id.as_str(), "1");
    assert!(told_states(&mut b).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_of_a_sale_cancelled_elsewhere_settled_on_a_stale_view_is_owed_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let id = PosId::parse("pump-1").unwrap();
    let mut a = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    a.book.execute(&id, sale("1", "100.00")).await.unwrap();
    let reference = a
        .book
        .view(&id)
        .unwrap()
        .state
        .current
        .as_ref()
        .unwrap()
        .external_reference
        .clone();
    // B starts after the sale and cancels it; A's view still has it pending.
    let b = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    let cancel = parse(DeviceTopic::Cancel, "pump-1", br#"{"sale_id":"1"}"#, 1024).unwrap();
    let cancelled = b.book.execute(&id, cancel).await.unwrap();
    assert!(
        matches!(cancelled, Outcome::Changed { .. }),
        "{cancelled:?}"
    );
    told_states(&mut a);

    let paid_in_full = MerchantOrderFacts {
        id: MpId::Num(7001),
        status: MerchantOrderStatus::Closed,
        external_reference: Some(reference.as_str().to_owned()),
        collector_id: Some(1),
        payments: vec![PaymentFacts {
            id: MpId::Num(9001),
            status: PaymentStatus::Approved,
            amount: Decimal::new(10000, 2),
            currency: Some("ARS".into()),
            approved_at: Some(1),
        }],
    };
    let verdict = a.book.settle(&paid_in_full, None, "closed").await.unwrap();
    assert!(
        matches!(verdict, Verdict::RefundDue { .. }),
        "a payment of a sale cancelled on another instance must be owed back, not pay it: {verdict:?}"
    );
    assert!(
        !told_states(&mut a)
            .iter()
            .any(|(_, s)| *s == SaleState::Paid),
        "A told the device `paid` for a cancelled sale"
    );
    let stored = SqliteStore::open(&path, false)
        .unwrap()
        .sale(&reference)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, SaleState::Cancelled);
    assert!(!stored.ledger.owed().is_zero(), "the payment is owed back");
    assert_eq!(a.book.view(&id).unwrap().version, 3);
}

/// Every instance hears every device message: the second to apply it
/// finds it applied and tells the device nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_device_message_applied_by_two_books_is_stored_once_and_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let id = PosId::parse("pump-1").unwrap();
    let mut a = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    let mut b = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    a.book.execute(&id, sale("1", "100.00")).await.unwrap();
    let again = b.book.execute(&id, sale("1", "100.00")).await.unwrap();
    assert_eq!(again, Outcome::Republish);
    let cancel = || parse(DeviceTopic::Cancel, "pump-1", br#"{"sale_id":"1"}"#, 1024).unwrap();
    a.book.execute(&id, cancel()).await.unwrap();
    assert_eq!(
        b.book.execute(&id, cancel()).await.unwrap(),
        Outcome::Republish
    );

    assert_eq!(
        told_states(&mut a),
        [
            ("1".to_owned(), SaleState::Pending),
            ("1".to_owned(), SaleState::Cancelled)
        ]
    );
    assert!(told_states(&mut b).is_empty(), "B told the device again");
    let head = SqliteStore::open(&path, false)
        .unwrap()
        .pos_head("pump-1")
        .await
        .unwrap();
    assert_eq!(head.version, 2, "one change each: accepted, cancelled");
}

/// A book hears of a change stored elsewhere (PostgreSQL's notifications,
/// when instances share it) and follows it: its polls serve the sale the
/// other book accepted, and after a gap in what it heard, catching up reads
/// every POS that moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_book_follows_changes_stored_elsewhere_and_catches_up_after_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (one, two) = (
        PosId::parse("pump-1").unwrap(),
        PosId::parse("pump-2").unwrap(),
    );
    let both = || vec![pos("pump-1", PosKind::Fuel), pos("pump-2", PosKind::Fuel)];
    let (a, _) = bare_book(&path, both()).await;
    let (b, mut b_told) = bare_book(&path, both()).await;

    a.execute(&one, sale("1", "100.00")).await.unwrap();
    assert_eq!(b.poll("pump-1").status, 400, "not heard of yet");
    b.follow("pump-1", 1).await.unwrap();
    assert_eq!(b.poll("pump-1").status, 200);
    assert_eq!(
        b.poll("pump-1").body,
        a.poll("pump-1").body,
        "the same bytes"
    );
    assert_eq!(b.behind("pump-1"), None);
    assert!(
        b_told.try_recv().is_err(),
        "following tells the device nothing"
    );

    // Changes B never heard of: caught up from the store's versions.
    let cancel = parse(DeviceTopic::Cancel, "pump-1", br#"{"sale_id":"1"}"#, 1024).unwrap();
    a.execute(&one, cancel).await.unwrap();
    let on_two = parse(
        DeviceTopic::Sale,
        "pump-2",
        br#"{"sale_id":"7","items":[{"title":"Diesel","quantity":"2","unit_price":"50.00"}]}"#,
        16 * 1024,
    )
    .unwrap();
    a.execute(&two, on_two).await.unwrap();
    assert_eq!(b.catch_up().await.unwrap(), 2);
    assert_eq!(b.poll("pump-1").status, 400);
    assert_eq!(b.poll("pump-2").body, a.poll("pump-2").body);
    assert_eq!(b.catch_up().await.unwrap(), 0, "nothing left to read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_of_a_pos_heard_changed_elsewhere_reads_the_store_before_it_answers() {
    let app = crate::helpers::TestApp::spawn().await;
    let id = PosId::parse("pump-1").unwrap();
    let cfg = app.config.pos.iter().find(|p| p.id == id).cloned().unwrap();
    let other = instance(&app.config.store.path, cfg).await;
    let (status, _, _) = app.poll("pump-1").await;
    assert_eq!(status, 400, "no sale yet");

    // The app hears that the POS moved on to version 1 before that change
    // is readable (as from another instance's feed): it reads the store,
    // finds version 0, and stays behind.
    app.app_book.follow("pump-1", 1).await.unwrap();
    assert_eq!(app.app_book.behind("pump-1"), Some(1));
    let changed = other.book.execute(&id, sale("1", "100.00")).await.unwrap();
    assert!(matches!(changed, Outcome::Changed { .. }), "{changed:?}");
    // Its view still shows no sale; its poll reads the store first.
    assert!(app.app_book.view(&id).unwrap().state.current.is_none());
    let (status, body, _) = app.poll("pump-1").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("100"), "{body}");
    assert_eq!(app.app_book.behind("pump-1"), None);
    app.stop().await;
}

/// A refusal writes nothing the store could refuse as stale: among several
/// instances the view is checked against the stored version first, so a
/// book that has not heard a cancel takes the next sale instead of refusing
/// it `busy`; and only the leader keeps and tells a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_decided_on_the_stored_version_and_told_by_the_leader_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let id = PosId::parse("pump-1").unwrap();
    let mut a = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    let mut b = instance(&path, pos("pump-1", PosKind::Fuel)).await;
    for i in [&a, &b] {
        i.book.set_shared();
    }
    b.book.set_leading(false);
    a.book.execute(&id, sale("1", "100.00")).await.unwrap();
    assert_eq!(
        b.book.execute(&id, sale("1", "100.00")).await.unwrap(),
        Outcome::Republish
    );
    // A cancels sale 1; B has not heard and still shows it pending.
    let cancel = parse(DeviceTopic::Cancel, "pump-1", br#"{"sale_id":"1"}"#, 1024).unwrap();
    a.book.execute(&id, cancel).await.unwrap();
    assert!(b.book.view(&id).unwrap().state.busy_sale().is_some());
    // Sale 2 reaches B first: its view would refuse it busy; the store says
    // the POS is free, and B takes it.
    let taken = b.book.execute(&id, sale("2", "50.00")).await.unwrap();
    assert!(matches!(taken, Outcome::Changed { .. }), "{taken:?}");
    assert_eq!(
        a.book.execute(&id, sale("2", "50.00")).await.unwrap(),
        Outcome::Republish
    );
    // Sale 3 while sale 2 is pending: refused by both, told once, by the
    // leader.
    let refused = |o: &Outcome| matches!(o, Outcome::Rejected { .. });
    assert!(refused(
        &b.book.execute(&id, sale("3", "10.00")).await.unwrap()
    ));
    assert!(refused(
        &a.book.execute(&id, sale("3", "10.00")).await.unwrap()
    ));
    let rejections = |i: &mut Instance| {
        let mut n = 0;
        while let Ok(t) = i.told.try_recv() {
            n += usize::from(matches!(t, Tell::Rejected { .. }));
        }
        n
    };
    assert_eq!(rejections(&mut b), 0, "the follower told a refusal");
    assert_eq!(rejections(&mut a), 1);
    let kept = SqliteStore::open(&path, false)
        .unwrap()
        .rejections("pump-1", 10)
        .await
        .unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
}
