//! Device messages out of contract: each is refused with a reason on the
//! POS's state topic (not retained) and never changes the pending sale.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sale_on_a_busy_pos_is_rejected_busy_and_the_first_stays() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    let (_, _, before) = app.wait_poll("pump-1", "ok").await;

    pump.publish_sale("2", &fuel("2", "100"), None)
        .await
        .unwrap();
    let r = rejection(&pump).await;
    assert_eq!(r.reason.as_deref(), Some("busy"));
    assert_eq!(r.sale_id.as_deref(), Some("2"));
    assert!(!r.retained);

    pump.progress("3").await.unwrap();
    assert_eq!(rejection(&pump).await.reason.as_deref(), Some("busy"));

    let (_, _, after) = app.poll("pump-1").await;
    assert_eq!(after, before);

    // A rebooting device still reads the pending sale, not the refusal.
    let rebooted = app.device("pump-1").await;
    let retained = rebooted.next_state(WAIT).await.unwrap();
    assert_eq!(retained.state, "pending");
    assert_eq!(retained.sale_id.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_sale_again_republishes_its_state_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let first = state_of(&pump, "1", "pending").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let again = state_of(&pump, "1", "pending").await;
    assert_eq!(again.external_reference, first.external_reference);
    let reference = first.external_reference.unwrap();
    assert_eq!(app.timeline(&reference).await, ["accepted"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_message_kind_is_rejected_with_its_reason_and_changes_nothing() {
    let app = TestApp::spawn_with(|c| c.mqtt.max_payload_bytes = 1024).await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    let (_, _, before) = app.wait_poll("pump-1", "ok").await;
    let big = format!(
        r#"{{"sale_id":"9","items":[{{"title":"{}","quantity":1,"unit_price":1}}]}}"#,
        "x".repeat(2000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("sale", "{not json".into(), "bad_json"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":-5}]}"#.into(), "bad_amount"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":0}]}"#.into(), "bad_amount"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":"1.001"}]}"#.into(), "bad_amount"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":1}],"amount":"1.001"}"#.into(), "bad_amount"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":1}],"amount":"0"}"#.into(), "bad_amount"),
        ("sale", r#"{"sale_id":"9","items":[{"title":"x","quantity":1,"unit_price":1}],"amount":"2.00"}"#.into(), "amount_mismatch"),
        ("sale", r#"{"sale_id":"9","pos_id":"pump-2","items":[{"title":"x","quantity":1,"unit_price":1}]}"#.into(), "pos_mismatch"),
        ("sale", r#"{"sale_id":"9","items":[]}"#.into(), "bad_message"),
        ("sale", big, "payload_too_large"),
        ("cancel", r#"{"sale_id":"404"}"#.into(), "unknown_sale"),
        ("progress", "[]".into(), "bad_json"),
        ("delivered", r#"{"sale_id":"1"}"#.into(), "bad_message"),
    ];
    for (topic, payload, reason) in cases {
        pump.publish_raw(topic, payload.clone()).await.unwrap();
        let r = rejection(&pump).await;
        assert_eq!(r.reason.as_deref(), Some(reason), "{topic} {payload}");
        assert!(!r.retained);
        assert!(
            r.message().is_some_and(|m| !m.is_empty()),
            "a reason an operator can act on"
        );
    }
    let (_, _, after) = app.poll("pump-1").await;
    assert_eq!(after, before);
    // Each refusal is kept for the operator.
    let stored = app
        .app_book
        .store()
        .rejections("pump-1", 100)
        .await
        .unwrap();
    assert_eq!(stored.len(), 13, "{stored:?}");
    assert_eq!(stored[0].code, "bad_message");
    assert_eq!(stored[12].code, "bad_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sale_on_an_idle_pos_creates_nothing() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    vending
        .publish_raw("sale", r#"{"sale_id":"1","items":[{"title":"x","quantity":"1","unit_price":"10"}],"amount":"11"}"#)
        .await
        .unwrap();
    assert_eq!(
        rejection(&vending).await.reason.as_deref(),
        Some("amount_mismatch")
    );
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_for_an_unknown_pos_creates_nothing_and_known_pos_go_on() {
    let app = TestApp::spawn().await;
    let ghost = app.device("pump-99").await;
    ghost
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    assert_eq!(app.poll_kind("pump-99").await, "invalid");
    // No state is ever published for a POS qrgate does not know.
    assert!(ghost.drain().is_empty(), "{:?}", ghost.drain());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clp_sales_are_whole_pesos() {
    let app = TestApp::spawn_with(|c| {
        c.pos[0].currency = qrgate::money::Currency::Clp;
    })
    .await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("10.5", "999.5"), None)
        .await
        .unwrap();
    assert_eq!(rejection(&pump).await.reason.as_deref(), Some("bad_amount"));
    // 10.5 L × 999 = 10489.5 → 10490 (half-up).
    pump.publish_sale("2", &fuel("10.5", "999"), None)
        .await
        .unwrap();
    let pending = state_of(&pump, "2", "pending").await;
    assert_eq!(pending.amount.as_deref(), Some("10490"));
    let (_, _, text) = app.wait_poll("pump-1", "ok").await;
    assert!(text.contains(r#""unit_price":10490"#), "{text}");
    assert!(text.contains(r#""currency_id":"CLP""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_pos_is_handled_without_losing_the_broker_connection() {
    // rumqttd drops a client that acknowledges out of order; POS are handled
    // in parallel, so acknowledgements must still leave in arrival order.
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    let vending = app.device("vending-1").await;
    for i in 0..20 {
        let id = i.to_string();
        pump.publish_sale(&id, &fuel("1", "10"), None)
            .await
            .unwrap();
        vending.publish_sale(&id, &snack("10"), None).await.unwrap();
        pump.cancel(&id).await.unwrap();
        vending.cancel(&id).await.unwrap();
    }
    state_of(&pump, "19", "cancelled").await;
    state_of(&vending, "19", "cancelled").await;
    assert_eq!(
        app.link
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "qrgate's broker connection dropped during the burst"
    );
}
