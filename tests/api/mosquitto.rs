//! The core scenarios against a real Mosquitto, the broker stations run.

use mpsim::PaymentOutcome;

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

/// Mosquitto as deploy/ configures it: no anonymous clients, passwords, and
/// deploy/mosquitto.acl confining each device to its own POS's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_locked_down_mosquitto_qrgate_logs_in_and_a_device_cannot_sell_for_another_pos() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let Some(broker) = Mosquitto::start_with(|port| {
        for (i, (user, pass)) in [
            ("qrgate", "q-secret"),
            ("pump-1", "p1-secret"),
            ("vending-1", "v1-secret"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut cmd = std::process::Command::new("mosquitto_passwd");
            if i == 0 {
                cmd.arg("-c");
            }
            let ok = cmd
                .args(["-b", passwd.to_str().unwrap(), user, pass])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mosquitto.acl");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {acl}\n",
                passwd.display()
            ),
        )
        .unwrap();
        Some(conf)
    }) else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |c| {
        c.mqtt.topic_prefix = "qrgate".into();
        c.mqtt.username = Some("qrgate".into());
        c.mqtt.password = Some(qrgate::config::Secret::new("q-secret"));
    })
    .await;
    let login = |pos: &str, pass: &str| {
        app.device_config(pos)
            .credentials(pos, pass)
            .without_presence()
    };
    let pump = qrgate_devices::Device::connect(login("pump-1", "p1-secret"))
        .await
        .unwrap();
    assert!(
        qrgate_devices::Device::connect(login("pump-1", "wrong"))
            .await
            .is_err(),
        "a wrong password is refused"
    );

    // pump-1 tries to create a sale on vending-1: the ACL drops it.
    pump.publish_to(
        "qrgate/pos/vending-1/sale",
        r#"{"sale_id":"x","items":[{"title":"t","quantity":1,"unit_price":1}]}"#,
        false,
    )
    .await
    .unwrap();
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
    // The forged sale, published before pump-1's own, never reached qrgate.
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
}
