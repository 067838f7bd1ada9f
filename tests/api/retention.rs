//! Retention: ended sales leave the live database `retain_days` after they
//! ended, archived first when asked; a sale that still owes money, a recent
//! one and each POS's latest stay. The pass takes its clock, so the test
//! stands 90 days ahead instead of waiting.

use mpsim::{NotifyMode, PaymentOutcome};
use qrgate::orders::{ExternalReference, MpId};
use qrgate::retention::Retention;

use crate::helpers::*;
use crate::wait::wait_for;

/// Rows left in each table that names the sale.
fn rows_naming(db: &std::path::Path, reference: &str) -> Vec<(&'static str, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    [
        "sales",
        "sale_events",
        "closings",
        "ledger_payments",
        "ledger_refunds",
        "payments",
        "merchant_orders",
        "rechecks",
    ]
    .into_iter()
    .map(|t| {
        let n = c
            .query_row(
                &format!("SELECT count(*) FROM {t} WHERE external_reference = ?1"),
                [reference],
                |r| r.get(0),
            )
            .unwrap();
        (t, n)
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_ended_sale_leaves_with_its_rows_into_the_archive_and_one_owing_a_refund_or_recent_stays(
) {
    let app = TestApp::spawn_with(|c| {
        c.store.archive = true;
        c.orders.recheck_after_secs = vec![];
    })
    .await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    let pump = app.device("pump-1").await;
    let vending = app.device("vending-1").await;

    // Old and ended: paid, delivered, and the pump sold again since.
    let (paid_ref, order, payment) = app.paid_sale(&pump, "1", &fuel("10", "100.00")).await;
    pump.delivered("1", true, None).await.unwrap();
    app.wait_event(&paid_ref, "delivered").await;

    // Old, but owing: paid after it was cancelled, nobody refunded it yet.
    vending
        .publish_sale("1", &snack("50.00"), None)
        .await
        .unwrap();
    let owing_ref = state_of(&vending, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let late = app.scan("vending-1").await;
    vending.cancel("1").await.unwrap();
    state_of(&vending, "1", "cancelled").await;
    app.mp
        .pay(late.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.wait_event(&owing_ref, "refund_due").await;
    vending
        .publish_sale("2", &snack("50.00"), None)
        .await
        .unwrap();
    state_of(&vending, "2", "pending").await;
    vending.cancel("2").await.unwrap();
    state_of(&vending, "2", "cancelled").await;

    // Everything above ended before `horizon`; everything below after it.
    let horizon = app.clock.now_millis() + 1;
    wait_for("the clock past the horizon", || async {
        app.clock.now_millis() > horizon
    })
    .await;
    pump.publish_sale("2", &fuel("1", "100.00"), None)
        .await
        .unwrap();
    let recent_ref = state_of(&pump, "2", "pending")
        .await
        .external_reference
        .unwrap();
    pump.cancel("2").await.unwrap();
    state_of(&pump, "2", "cancelled").await;
    pump.publish_sale("3", &fuel("1", "100.00"), None)
        .await
        .unwrap();
    state_of(&pump, "3", "pending").await;

    let retention = Retention::new(&app.config.store, &app.config.orders);
    let ninety_days_later = horizon + 90 * 86_400_000;
    let store = app.app_book.store();
    let swept = retention
        .pass(store.as_ref(), ninety_days_later)
        .await
        .unwrap();
    assert_eq!(swept.sales, 1, "{swept:?}");

    let db = app.config.store.path.clone();
    let gone = ExternalReference::parse(&paid_ref).unwrap();
    assert!(store.sale(&gone).await.unwrap().is_none());
    assert!(
        rows_naming(&db, &paid_ref).iter().all(|(_, n)| *n == 0),
        "{:?}",
        rows_naming(&db, &paid_ref)
    );
    assert!(store
        .merchant_order(&MpId::Num(order.merchant_order_id))
        .await
        .unwrap()
        .is_none());
    for kept in [&owing_ref, &recent_ref] {
        let r = ExternalReference::parse(kept).unwrap();
        assert!(
            store.sale(&r).await.unwrap().is_some(),
            "{kept} was removed"
        );
        assert!(!app.timeline(kept).await.is_empty());
    }
    assert_eq!(
        store
            .sale(&ExternalReference::parse(&owing_ref).unwrap())
            .await
            .unwrap()
            .unwrap()
            .ledger
            .owed()
            .to_string(),
        "50.00"
    );

    // The archive has the removed sale, whole, and nothing else.
    let file = swept.archive.expect("an archive file");
    assert_eq!(file.parent().unwrap(), db.parent().unwrap().join("archive"));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = &lines[0];
    assert_eq!(line["sale"]["external_reference"], paid_ref.as_str());
    assert_eq!(line["sale"]["state"], "paid");
    let events: Vec<&str> = line["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"paid") && events.contains(&"delivered"),
        "{events:?}"
    );
    assert_eq!(line["ledger_payments"][0]["payment_id"], payment);
    assert_eq!(line["merchant_orders"][0]["id"], order.merchant_order_id);
    assert_eq!(
        line["merchant_orders"][0]["payments"][0]["id"], payment,
        "{line}"
    );
    assert_eq!(line["closing"]["payment_id"], payment);

    // A second pass finds nothing more to do.
    let again = retention
        .pass(store.as_ref(), ninety_days_later)
        .await
        .unwrap();
    assert_eq!(again.sales, 0, "{again:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().lines().count(),
        1,
        "nothing archived twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_sale_stays_while_undelivered_and_while_a_search_after_payment_is_due() {
    let app = TestApp::spawn().await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    let pump = app.device("pump-1").await;
    let (reference, _, _) = app.paid_sale(&pump, "1", &fuel("10", "100.00")).await;
    // A newer sale exists; the paid one is not delivered yet.
    pump.publish_sale("2", &fuel("1", "100.00"), None)
        .await
        .unwrap();
    state_of(&pump, "2", "pending").await;

    // An hour's retention, three hours later: past it, but within the two
    // hours after payment of the last search (and the 48 hours searches are
    // kept).
    let mut kept = app.config.store.clone();
    kept.retain = std::time::Duration::from_secs(3600);
    let later = app.clock.now_millis() + 3 * 3_600_000;
    let store = app.app_book.store();
    let pass = |rechecks: Vec<u64>| {
        let mut orders = app.config.orders.clone();
        orders.recheck_after_secs = rechecks;
        let retention = Retention::new(&kept, &orders);
        async move { retention.pass(store.as_ref(), later).await.unwrap() }
    };
    assert_eq!(pass(vec![]).await.sales, 0, "undelivered");

    pump.delivered("1", true, None).await.unwrap();
    app.wait_event(&reference, "delivered").await;
    assert_eq!(pass(vec![600, 7200]).await.sales, 0, "searches due");
    assert_eq!(pass(vec![]).await.sales, 1, "ended");
    assert!(store
        .sale(&ExternalReference::parse(&reference).unwrap())
        .await
        .unwrap()
        .is_none());
}
