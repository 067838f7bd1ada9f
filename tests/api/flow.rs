//! Mercado Pago's go-live checklist (docs/mercadopago.md) and the life of a
//! sale from device to `paid`.

use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_before_the_sale_waits_then_pays_the_exact_amount_and_the_pump_is_told() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;

    // 1. Scan before the sale exists: the app waits.
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");

    // 2. The amount shown is the sale's amount.
    pump.publish_sale("000042", &fuel("32.10", "798.00"), Some("25615.80"))
        .await
        .unwrap();
    let pending = state_of(&pump, "000042", "pending").await;
    assert_eq!(pending.amount.as_deref(), Some("25615.80"));
    assert_eq!(pending.currency.as_deref(), Some("ARS"));
    let order = app.scan("pump-1").await;
    assert_eq!(order.total_amount.to_string(), "25615.80");
    assert_eq!(
        Some(order.external_reference.clone()),
        pending.external_reference
    );
    assert_eq!(
        order.notification_url,
        format!("{}/mp/notifications", app.base)
    );

    // 3. Approved payment: the sale closes and the device is told.
    app.mp.set_notify_mode(NotifyMode::Ipn);
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&pump, "000042", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert_eq!(paid.merchant_order, Some(order.merchant_order_id));
    assert_eq!(paid.amount.as_deref(), Some("25615.80"));
    assert!(
        paid.raw["payment_id"].is_u64(),
        "ids are JSON numbers: {}",
        paid.raw
    );

    // The sale is final: later scans wait again.
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_payment_leaves_the_sale_payable_and_a_second_attempt_succeeds() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("7", &snack("1500.00"), None)
        .await
        .unwrap();
    state_of(&vending, "7", "pending").await;
    let (_, _, before) = app.wait_poll("vending-1", "ok").await;

    // 4. Rejected: nothing closes, the same order is still served.
    let first = app.scan("vending-1").await;
    app.mp
        .pay(first.merchant_order_id, PaymentOutcome::Rejected)
        .await
        .unwrap();
    app.wait_merchant_order_seen(first.merchant_order_id).await;
    let (status, _, after) = app.poll("vending-1").await;
    assert_eq!(status, 200);
    assert_eq!(after, before, "the sale must stay payable, unchanged");

    // 5. The customer retries on the same sale (a new scan, a new merchant
    // order) and pays.
    let second = app.scan("vending-1").await;
    assert_ne!(second.merchant_order_id, first.merchant_order_id);
    assert_eq!(second.external_reference, first.external_reference);
    let payment = app
        .mp
        .pay(second.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&vending, "7", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sale_makes_later_scans_wait_again() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("9", &fuel("10", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "9", "pending").await;
    app.wait_poll("pump-1", "ok").await;

    // 7. The customer paid cash.
    pump.cancel("9").await.unwrap();
    let cancelled = state_of(&pump, "9", "cancelled").await;
    assert!(cancelled.external_reference.is_some());
    app.wait_poll("pump-1", "unavailable").await;

    // The POS is free for the next sale.
    pump.publish_sale("10", &fuel("5", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "10", "pending").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_nobody_pays_expires_and_polls_answer_unavailable() {
    let app = TestApp::spawn_with(|c| {
        c.pos[1].ttl_secs = Some(300);
    })
    .await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    // Nearly the whole TTL passes: still pending, still offered.
    app.clock.advance(Duration::from_secs(299));
    app.scan("vending-1").await;
    vending
        .wait_state(WAIT, |m| m.state == "pending" && m.served)
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(1));
    let expired = state_of(&vending, "1", "expired").await;
    assert!(expired.external_reference.is_some());
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_announces_fuelling_then_prices_the_same_sale() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.progress("55").await.unwrap();
    let started = state_of(&pump, "55", "in_process").await;
    assert_eq!(app.poll_kind("pump-1").await, "in_process");

    pump.publish_sale("55", &fuel("20.5", "1000"), None)
        .await
        .unwrap();
    let pending = state_of(&pump, "55", "pending").await;
    assert_eq!(pending.external_reference, started.external_reference);
    assert_eq!(pending.amount.as_deref(), Some("20500.00"));
    let (_, body, _) = app.wait_poll("pump-1", "ok").await;
    assert_eq!(body["items"][0]["quantity"], 1);
    assert_eq!(body["items"][0]["title"], "Super 95 — 20.5 L");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_scan_republishes_the_sale_as_served_so_the_station_stops_taking_cash() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("3", &fuel("1", "100"), None)
        .await
        .unwrap();
    let pending = state_of(&pump, "3", "pending").await;
    assert!(!pending.served);
    app.scan("pump-1").await;
    let served = pump
        .wait_state(WAIT, |m| m.state == "pending" && m.served)
        .await
        .unwrap();
    assert_eq!(served.sale_id.as_deref(), Some("3"));
    let reference = served.external_reference.unwrap();
    assert_eq!(app.timeline(&reference).await, ["accepted", "served"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_reboots_reads_its_pending_and_its_paid_sale_from_the_retained_state() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("77", &fuel("2", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "77", "pending").await;
    pump.crash();

    let rebooted = app.device("pump-1").await;
    let retained = state_of(&rebooted, "77", "pending").await;
    assert!(retained.retained, "a reboot reads the retained message");

    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&rebooted, "77", "paid").await;
    rebooted.crash();
    let again = app.device("pump-1").await;
    let retained = state_of(&again, "77", "paid").await;
    assert!(retained.retained);
    assert_eq!(retained.merchant_order, Some(order.merchant_order_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_survive_a_restart_and_polls_answer_the_same_body() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("5", &fuel("3.333", "99.99"), None)
        .await
        .unwrap();
    state_of(&pump, "5", "pending").await;
    let (_, _, before) = app.wait_poll("pump-1", "ok").await;

    let app = app.restart().await;
    let (status, _, after) = app.poll("pump-1").await;
    assert_eq!(status, 200);
    assert_eq!(after, before);

    // And it still closes after the restart.
    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "5", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_runs_its_own_embedded_broker() {
    let app = BareApp::start(|_| {}).await;
    // Not waited ready: a device that connects while qrgate starts is held at
    // the door until qrgate has subscribed, so its first sale is heard.
    let (mp, base, port) = (&app.mp, &app.base, app.mqtt_port);

    let vending = qrgate_devices::Device::connect(
        qrgate_devices::DeviceConfig::new("127.0.0.1", port, "vending-1").without_presence(),
    )
    .await
    .unwrap();
    vending
        .publish_sale("1", &snack("250"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = match mp.scan(&format!("{base}/mp/pos/vending-1")).await.unwrap() {
        mpsim::Scan::Order(o) => o,
        other => panic!("{other:?}"),
    };
    mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
    app.stop().await;
}
