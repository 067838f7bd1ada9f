//! What one device publishes must never stop qrgate nor open a sale it should
//! not: a message of any size on any topic (on Mosquitto with and without a
//! size limit, and on the embedded broker), retained device messages that a
//! broker delivers again, and numbers that are not plain decimals.

use std::sync::atomic::Ordering;

use mpsim::PaymentOutcome;

use crate::helpers::*;

/// deploy/mosquitto.conf's size limit line, as stations run it.
fn deployed_limit() -> String {
    let conf = include_str!("../../deploy/mosquitto.conf");
    conf.lines()
        .find(|l| l.starts_with("max_packet_size "))
        .expect("deploy/mosquitto.conf sets max_packet_size")
        .to_owned()
}

/// Bytes that are no JSON, no UTF-8, and compress to nothing useful.
fn noise(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7919 % 251) as u8 ^ 0x80).collect()
}

/// One device sends a 300 KB message, then one of 40 KB (over qrgate's 16 KiB
/// cap, under the brokers' limits); another device sells and is paid all the
/// same, on qrgate's first connection. `broker_refuses`: the broker's own
/// limit stops the 300 KB one, so only the 40 KB one reaches qrgate.
async fn a_big_message_stops_nobody(app: &TestApp, broker_refuses: bool) {
    let pump = app.device("pump-1").await;
    let vending = app.device("vending-1").await;
    let topic = |pos: &str, kind: &str| format!("{}/pos/{pos}/{kind}", app.prefix);

    let big = noise(300_000);
    let published = raw_publish(
        app.mqtt_port,
        &topic("pump-1", "sale"),
        RawPayload::Bytes(&big),
        false,
    )
    .await;
    assert_eq!(published.is_err(), broker_refuses, "{published:?}");
    if !broker_refuses {
        let r = rejection(&pump).await;
        assert_eq!(r.reason.as_deref(), Some("payload_too_large"), "{r}");
        assert!(
            r.message().unwrap().starts_with("sale of 300000 bytes"),
            "{r}"
        );
        assert!(!r.retained);
        // Nor on a topic nobody answers on, nor for a POS nobody knows.
        for t in [topic("pump-1", "status"), topic("ghost", "cancel")] {
            raw_publish(app.mqtt_port, &t, RawPayload::Bytes(&big), false)
                .await
                .unwrap();
        }
    }
    let middle = noise(40_000);
    raw_publish(
        app.mqtt_port,
        &topic("pump-1", "progress"),
        RawPayload::Bytes(&middle),
        false,
    )
    .await
    .unwrap();
    let r = rejection(&pump).await;
    assert_eq!(r.reason.as_deref(), Some("payload_too_large"), "{r}");
    assert!(
        r.message().unwrap().starts_with("progress of 40000 bytes"),
        "{r}"
    );

    vending
        .publish_sale("v1", &snack("150"), None)
        .await
        .unwrap();
    state_of(&vending, "v1", "pending").await;
    let order = app.scan("vending-1").await;
    assert_eq!(order.total_amount.to_string(), "150.00");
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "v1", "paid").await;

    // Every refusal is kept for the operator, by name.
    let stored = app
        .app_book
        .store()
        .rejections("pump-1", 100)
        .await
        .unwrap();
    let sizes: Vec<&str> = stored.iter().map(|r| r.message.as_str()).collect();
    let expected = if broker_refuses {
        vec!["progress of 40000 bytes: over the 16384-byte cap"]
    } else {
        vec![
            "progress of 40000 bytes: over the 16384-byte cap",
            "status of 300000 bytes: over the 16384-byte cap",
            "sale of 300000 bytes: over the 16384-byte cap",
        ]
    };
    assert_eq!(sizes, expected);
    assert_eq!(
        app.link.connections.load(Ordering::Relaxed),
        1,
        "qrgate lost its broker connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_mosquitto_without_a_size_limit_a_300_kb_message_is_refused_by_name_and_others_sell() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    a_big_message_stops_nobody(&app, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mosquitto_as_deployed_the_broker_refuses_a_300_kb_message_and_others_sell() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Mosquitto::start_with(|port| {
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{}\n",
                deployed_limit()
            ),
        )
        .unwrap();
        Some(conf)
    }) else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    a_big_message_stops_nobody(&app, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker_a_300_kb_message_is_refused_and_others_sell() {
    let app = TestApp::spawn().await;
    a_big_message_stops_nobody(&app, true).await;
}

fn sale_json(sale_id: &str) -> String {
    format!(
        r#"{{"sale_id":"{sale_id}","items":[{{"title":"Super 95","quantity":"10","unit_price":"100"}}]}}"#
    )
}

/// The issue's case: a sale published retained is taken (a broker clears the
/// flag towards an established subscription), cancelled, and followed by
/// another sale; when qrgate comes back, and again when Mosquitto does, the
/// broker delivers the retained one with the flag, and it opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_sale_never_becomes_payable_again_when_qrgate_or_mosquitto_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Mosquitto::start_persistent(dir.path()) else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let pump = app.device("pump-1").await;
    let sale_topic = pump.topic("sale");
    pump.publish_to(&sale_topic, sale_json("A"), true)
        .await
        .unwrap();
    state_of(&pump, "A", "pending").await;
    pump.cancel("A").await.unwrap();
    state_of(&pump, "A", "cancelled").await;
    pump.publish_sale("B", &fuel("2", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "B", "pending").await;
    let order = app.scan("pump-1").await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&pump, "B", "paid").await;
    pump.delivered("B", true, None).await.unwrap();

    let app = app.restart().await;
    let r = rejection(&pump).await;
    assert_eq!(r.reason.as_deref(), Some("retained"), "{r}");
    assert_eq!(r.sale_id.as_deref(), Some("A"));
    let message = r.message().unwrap();
    assert!(
        message.contains(&format!("mosquitto_pub -r -n -t {sale_topic}")),
        "{message}"
    );
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");

    // Mosquitto keeps it across its own restart and delivers it again.
    broker.restart();
    let stored = wait_rejections(&app, "pump-1", 2).await;
    assert!(stored.iter().all(|r| r.code == "retained"), "{stored:?}");
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    // The device still reads B, its last sale, as retained state.
    let rebooted = app.device("pump-1").await;
    let state = rebooted.wait_state(WAIT, |m| m.retained).await.unwrap();
    assert_eq!(
        (
            state.sale_id.as_deref(),
            state.external_reference.as_deref()
        ),
        (Some("B"), paid.external_reference.as_deref())
    );
}

/// rumqttd keeps retained messages too and delivers them, flagged, to a new
/// subscription: here qrgate's first. Each device kind but presence is
/// refused; retained presence (a device's last will) still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_device_messages_waiting_on_the_embedded_broker_open_nothing() {
    let prefix = format!("retained{}", std::process::id());
    let port = shared_broker_port();
    let topic = |pos: &str, kind: &str| format!("{prefix}/pos/{pos}/{kind}");
    let waiting = [
        (topic("pump-1", "sale"), sale_json("R1")),
        (
            topic("pump-1", "progress"),
            r#"{"sale_id":"R2"}"#.to_owned(),
        ),
        (topic("pump-1", "cancel"), r#"{"sale_id":"R1"}"#.to_owned()),
        (
            topic("pump-1", "delivered"),
            r#"{"sale_id":"R1","ok":true}"#.to_owned(),
        ),
        (topic("vending-1", "status"), "offline".to_owned()),
    ];
    for (t, payload) in &waiting {
        raw_publish(port, t, RawPayload::Bytes(payload.as_bytes()), true)
            .await
            .unwrap();
    }
    let app = TestApp::spawn_with(|c| c.mqtt.topic_prefix = prefix.clone()).await;
    let stored = wait_rejections(&app, "pump-1", 4).await;
    let mut kinds: Vec<&str> = stored
        .iter()
        .map(|r| {
            assert_eq!(r.code, "retained", "{r:?}");
            r.message.split(' ').next().unwrap_or("")
        })
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["cancel", "delivered", "progress", "sale"]);
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    // An offline vending machine is not payable: its retained status was read.
    app.wait_poll("vending-1", "timeout").await;
    assert!(app
        .app_book
        .store()
        .rejections("vending-1", 10)
        .await
        .unwrap()
        .is_empty());
}

/// The device contract's numbers are plain decimals; `1_000` was read as 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_that_are_not_plain_decimals_are_refused_as_bad_amount() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    for (quantity, price) in [("1", "1_000"), ("1.0_5", "10"), ("1.", "10"), ("+1", "10")] {
        let payload = format!(
            r#"{{"sale_id":"n1","items":[{{"title":"Chips","quantity":"{quantity}","unit_price":"{price}"}}]}}"#
        );
        vending.publish_raw("sale", payload).await.unwrap();
        let r = rejection(&vending).await;
        assert_eq!(
            r.reason.as_deref(),
            Some("bad_amount"),
            "{quantity} {price}: {r}"
        );
        assert_eq!(r.sale_id.as_deref(), Some("n1"));
    }
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
    // Written plainly, the same sale is taken.
    vending
        .publish_raw(
            "sale",
            r#"{"sale_id":"n1","items":[{"title":"Chips","quantity":"1","unit_price":"1000"}]}"#,
        )
        .await
        .unwrap();
    let pending = state_of(&vending, "n1", "pending").await;
    assert_eq!(pending.amount.as_deref(), Some("1000.00"));
}

/// Measures what a 256 MiB message costs qrgate, through a Mosquitto that
/// lets it through. Run alone, as the process's peak is measured:
/// `cargo test --test api -- --ignored --exact device_hardening::the_largest_mqtt_message_costs_qrgate_next_to_no_memory --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: 256 MiB through a local Mosquitto; run alone"]
async fn the_largest_mqtt_message_costs_qrgate_next_to_no_memory() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |_| {}).await;
    let pump = app.device("pump-1").await;
    let topic = pump.topic("sale");
    let peak = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = peak();
    // The MQTT maximum: a remaining length of 268,435,455 bytes.
    let size = 268_435_455 - 2 - topic.len() - 2;
    raw_publish(broker.port, &topic, RawPayload::Zeros(size), false)
        .await
        .unwrap();
    let r = rejection(&pump).await;
    assert_eq!(r.reason.as_deref(), Some("payload_too_large"));
    assert!(r.message().unwrap().contains(&size.to_string()), "{r}");
    let after = peak();
    eprintln!(
        "a {size}-byte message: peak RSS {before} KiB before, {after} KiB after (+{} KiB)",
        after - before
    );
    assert!(after - before < 32 * 1024, "+{} KiB", after - before);
    assert_eq!(app.link.connections.load(Ordering::Relaxed), 1);
}

/// rumqttd forgets a connection as it reads its DISCONNECT and gives its
/// number to the next one; a link that read the end of the stream after that
/// dropped the number's new owner: a device just past its CONNACK, its
/// publish cut ("early eof"). Each of 3,200 clients here connects through
/// the door, publishes a retained QoS 1 message and leaves cleanly, 32 at a
/// time. Before the door left the closing to the broker, 6 to 12 of them were
/// cut per run (4 runs; 2 and 3 going straight to rumqttd); since, none (5
/// runs). A race, so a measurement, on a broker of its own:
/// `cargo test --test api -- --ignored --exact device_hardening::clients_leaving_cleanly_never_cut_off_one_arriving --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: 3,200 connections to a broker of its own; run alone"]
async fn clients_leaving_cleanly_never_cut_off_one_arriving() {
    const CLIENTS: usize = 32;
    const EACH: usize = 100;
    let port = qrgate::mqtt::broker::start(
        "127.0.0.1:0".parse().unwrap(),
        16 * 1024,
        qrgate::mqtt::broker::Access::Anonymous,
        None,
        None,
    )
    .unwrap()
    .addr
    .port();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let mut cut = Vec::new();
                for n in 0..EACH {
                    let topic = format!("leaving/{c}/{n}");
                    if let Err(e) = raw_publish(port, &topic, RawPayload::Bytes(b"{}"), true).await
                    {
                        cut.push(e);
                    }
                }
                cut
            })
        })
        .collect();
    let mut cut = Vec::new();
    for c in clients {
        cut.extend(c.await.unwrap());
    }
    eprintln!("{} of {} publishes cut", cut.len(), CLIENTS * EACH);
    assert!(cut.is_empty(), "{cut:?}");
}
