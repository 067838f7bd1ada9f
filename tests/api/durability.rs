//! Nothing lost: lost notifications, API outages, late payments, delivery
//! confirmation, broker restarts (issue 3; the kill -9 tests are in
//! tests/crash.rs).

use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome};

use crate::helpers::*;

/// Waits until `pred` holds for the simulator's recorded API calls.
async fn wait_calls(app: &TestApp, what: &str, pred: impl Fn(&[mpsim::ApiCall]) -> bool) {
    wait_for(what, || async {
        let calls = app.mp.api_calls();
        if pred(&calls) {
            Ok(())
        } else {
            Err(format!("{calls:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_paid_while_every_notification_is_lost_is_closed_by_reconciliation() {
    let app = TestApp::spawn_with(|c| c.orders.reconcile_after_secs = 0).await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("10", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    let order = app.scan("pump-1").await;
    app.mp.set_notify_mode(NotifyMode::None);
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&pump, "1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert!(
        app.mp.notifications_sent().is_empty(),
        "no notification was sent"
    );
    assert!(app.mp.api_calls().iter().any(|c| c.path
        == format!(
            "/merchant_orders/search?external_reference={}",
            order.external_reference
        )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_closes_once_mercado_pago_recovers_from_500s_and_429s() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = app.scan("vending-1").await;
    let path = format!("/merchant_orders/{}", order.merchant_order_id);
    app.mp.fail_next(&path, 500, 2);
    app.mp.fail_next(&path, 429, 1);
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
    let statuses: Vec<u16> = app
        .mp
        .api_calls()
        .into_iter()
        .filter(|c| c.path == path)
        .map(|c| c.status)
        .collect();
    assert!(
        statuses.contains(&500) && statuses.contains(&429) && statuses.last() == Some(&200),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_whose_fetches_keep_failing_is_settled_later_by_reconciliation() {
    let app = TestApp::spawn_with(|c| c.orders.reconcile_after_secs = 0).await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = app.scan("vending-1").await;
    // Every retry of the notification's own fetch fails; the search works.
    app.mp.fail_next(
        &format!("/merchant_orders/{}", order.merchant_order_id),
        503,
        1000,
    );
    app.mp.fail_next("/v1/payments/", 503, 1000);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_mercado_pago_times_out_without_blocking_polls_and_the_sale_closes_when_it_answers()
{
    let app = TestApp::spawn_with(|c| c.mercadopago.timeout_ms = 200).await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = app.scan("vending-1").await;
    let path = format!("/merchant_orders/{}", order.merchant_order_id);
    app.mp.set_latency(&path, Duration::from_secs(2));
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    wait_calls(&app, "two timed-out fetches", |c| {
        c.iter().filter(|c| c.path == path).count() >= 2
    })
    .await;
    // Polls are answered from memory meanwhile.
    assert_eq!(app.poll_kind("vending-1").await, "ok");
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    app.mp.set_latency(&path, Duration::ZERO);
    state_of(&vending, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_refund_a_late_payment_is_refunded_once_with_an_idempotency_key() {
    let app = TestApp::spawn_with(|c| c.orders.auto_refund = true).await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    let pending = state_of(&vending, "1", "pending").await;
    let reference = pending.external_reference.unwrap();
    let order = app.scan("vending-1").await;
    vending.cancel("1").await.unwrap();
    state_of(&vending, "1", "cancelled").await;
    app.mp.set_notify_mode(NotifyMode::Duplicated(3));
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.wait_event(&reference, "refunded").await;
    let refunds = app.mp.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].payment_id, payment);
    assert_eq!(refunds[0].amount, None, "a full refund has an empty body");
    assert_eq!(
        refunds[0].idempotency_key.as_deref(),
        Some(format!("qrgate-refund-{payment}").as_str()),
        "an automatic full refund keeps the key refunds already made were sent with"
    );
    let events = app.timeline(&reference).await;
    assert_eq!(
        events.iter().filter(|e| *e == "refund_due").count(),
        1,
        "{events:?}"
    );
    assert!(vending.drain().iter().all(|m| m.state != "paid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_refund_a_late_payment_stays_refund_due_for_the_operator() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    let reference = state_of(&vending, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = app.scan("vending-1").await;
    vending.cancel("1").await.unwrap();
    state_of(&vending, "1", "cancelled").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.wait_event(&reference, "refund_due").await;
    let pending = app.app_book.store().pending_auto_refunds().await.unwrap();
    assert!(pending.is_empty(), "not refunded by qrgate: {pending:?}");
    assert!(app.mp.refunds().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_is_repeated_until_the_device_confirms_delivery() {
    let app = TestApp::spawn_with(|c| c.orders.paid_republish_secs = 10).await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let first = state_of(&pump, "1", "paid").await;
    app.clock.advance(Duration::from_secs(10));
    let again = state_of(&pump, "1", "paid").await;
    assert_eq!(
        again.payment_id, first.payment_id,
        "the same message is repeated"
    );
    assert_eq!(app.app_book.undelivered().len(), 1);

    pump.delivered("1", true, None).await.unwrap();
    wait_for("the delivery recorded", || async {
        app.app_book.undelivered().is_empty()
    })
    .await;
    assert_eq!(app.timeline(&reference).await.last().unwrap(), "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_sale_stops_the_repeats_of_an_undelivered_paid_one() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    assert_eq!(app.app_book.undelivered().len(), 1);
    // A paid sale waiting for confirmation does not block the next one.
    pump.publish_sale("2", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "2", "pending").await;
    assert!(app.app_book.undelivered().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_with_auto_refund_refunds_the_payment() {
    let app = TestApp::spawn_with(|c| c.orders.auto_refund = true).await;
    let machine =
        qrgate_devices::VendingMachine::connect(app.device_config("vending-1").without_presence())
            .await
            .unwrap();
    machine.set_jam(true);
    machine.select("1", &snack("100")).await.unwrap();
    let reference = state_of(machine.device(), "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = app.scan("vending-1").await;
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    machine.wait_paid_and_dispense("1", WAIT).await.unwrap();
    wait_for("a refund made", || async {
        if app.mp.refunds().is_empty() {
            Err(format!("{:?}", app.timeline(&reference).await))
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(app.mp.refunds()[0].payment_id, payment);
    app.wait_event(&reference, "refunded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_mosquitto_restart_mid_flow_loses_no_sale_and_no_paid() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Mosquitto::start_persistent(dir.path()) else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let pump = app.device("pump-1").await;
    let vending = app.device("vending-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;

    broker.restart();
    // Published while qrgate reconnects: the broker keeps it in qrgate's
    // session.
    vending.publish_sale("7", &snack("50"), None).await.unwrap();
    state_of(&vending, "7", "pending").await;
    app.wait_ready().await;

    let order = app.scan("pump-1").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    broker.restart();
    // A device that reboots after the restart still reads paid.
    let rebooted = app.device("pump-1").await;
    assert!(state_of(&rebooted, "1", "paid").await.retained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_that_forgot_everything_returns_qrgate_resubscribes_and_republishes_states()
{
    let Some(mut broker) = Mosquitto::start() else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;

    broker.restart();
    app.wait_ready().await;
    // The broker kept no retained state: this one is qrgate's republish.
    let rebooted = app.device("pump-1").await;
    assert!(state_of(&rebooted, "1", "pending").await.retained);
    // And device messages reach qrgate again (it subscribed anew).
    rebooted.cancel("1").await.unwrap();
    state_of(&rebooted, "1", "cancelled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_that_arrives_after_the_next_sale_still_confirms_its_own_sale() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    // The next sale overtakes the confirmation of the previous one.
    pump.publish_sale("2", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "2", "pending").await;
    pump.delivered("1", true, None).await.unwrap();
    wait_for("sale 1 delivered last", || async {
        let events = app.timeline(&reference).await;
        if events.last().map(String::as_str) == Some("delivered") {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await;
    // Sale 2 is untouched, and nothing was refused.
    assert_eq!(app.poll_kind("pump-1").await, "ok");
    assert!(app
        .app_book
        .store()
        .rejections("pump-1", 10)
        .await
        .unwrap()
        .is_empty());
}
