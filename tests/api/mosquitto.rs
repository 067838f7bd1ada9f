//! The core scenarios against a real Mosquitto, the broker stations run.

use qrgate::mercadopago::simulator::PaymentOutcome;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_a_sale_is_served_paid_and_retained_for_a_rebooting_device() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let pump = app.device("pump-1").await;
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    pump.publish_sale("1", &fuel("32.10", "798.00"), Some("25615.80"))
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    pump.publish_sale("2", &fuel("1", "1"), None).await.unwrap();
    assert_eq!(rejection(&pump).await.reason.as_deref(), Some("busy"));
    let order = app.scan("pump-1").await;
    assert_eq!(order.total_amount.to_string(), "25615.80");
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Rejected)
        .await
        .unwrap();
    app.wait_merchant_order_seen(order.merchant_order_id).await;
    assert_eq!(app.poll_kind("pump-1").await, "ok");
    let retry = app.scan("pump-1").await;
    app.mp
        .pay(retry.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    pump.crash();
    let rebooted = app.device("pump-1").await;
    let retained = state_of(&rebooted, "1", "paid").await;
    assert!(retained.retained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_sales_published_while_qrgate_is_down_are_taken_when_it_returns() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let vending = app.device("vending-1").await;
    // qrgate goes away; its persistent session keeps what devices publish.
    let config = app.config.clone();
    let dir = std::sync::Arc::clone(&app.dir);
    let mp = app.mp.clone();
    let prefix = app.prefix.clone();
    app.stop().await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    let app = TestApp::resume(broker.port, mp, dir, prefix, config).await;
    state_of(&vending, "1", "pending").await;
    app.wait_poll("vending-1", "ok").await;
    // Through the expiry path too: cancel works after the restart.
    vending.cancel("1").await.unwrap();
    state_of(&vending, "1", "cancelled").await;
}
