//! The POS URL: every answer of docs/mercadopago.md ("What the poll answers"),
//! and the presence rules of docs/decisions.md ("Presence and polls").

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_pos_is_invalid_with_mercado_pagos_error_shape() {
    let app = TestApp::spawn().await;
    for pos in [
        "pump-9",
        "no%20such",
        "a-very-long-pos-id-that-is-over-forty-characters",
    ] {
        let (status, body, _) = app.poll(pos).await;
        assert_eq!(status, 400, "{pos}");
        assert_eq!(body["error"]["type"], "invalid", "{pos}");
        assert!(body["error"]["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_answer_get_and_post_with_json_and_ignore_unknown_query_parameters() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    for req in [
        http.get(format!("{}?storeid=6232&posid=1", app.pos_url("pump-1"))),
        http.post(app.pos_url("pump-1")).body("{\"anything\":1}"),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "unavailable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poll_of_a_sale_returns_the_same_bytes_even_after_it_is_served() {
    let app = TestApp::spawn().await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale(
            "11",
            &[
                qrgate_devices::Item::new("Cola", "2", "1500.50"),
                qrgate_devices::Item::new("Chips", "1", "800"),
            ],
            Some("3801.00"),
        )
        .await
        .unwrap();
    state_of(&vending, "11", "pending").await;
    let (status, body, first) = app.wait_poll("vending-1", "ok").await;
    assert_eq!(status, 200);
    assert!(first.contains(r#""unit_price":1500.50"#), "{first}");
    assert_eq!(body["collector_id"], 178106235);
    assert_eq!(body["sponsor_id"], 334249281);
    assert_eq!(body["items"].as_array().unwrap().len(), 2);
    assert_eq!(body["items"][0]["quantity"], 2);
    assert_eq!(body["items"][0]["currency_id"], "ARS");
    assert_eq!(
        body["notification_url"],
        format!("{}/mp/notifications", app.base)
    );
    let reference = body["external_reference"].as_str().unwrap();
    assert!(reference.len() <= 64);
    assert!(reference
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));

    vending
        .wait_state(WAIT, |m| m.served)
        .await
        .expect("served republished");
    for _ in 0..5 {
        let (_, _, again) = app.poll("vending-1").await;
        assert_eq!(again, first);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_vending_machine_times_out_even_with_a_pending_sale() {
    let app = TestApp::spawn().await;
    let machine = qrgate_devices::Device::connect(app.device_config("vending-1"))
        .await
        .unwrap();
    machine
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&machine, "1", "pending").await;
    app.wait_poll("vending-1", "ok").await;
    // The broker publishes its last will: offline, retained.
    machine.crash();
    app.wait_poll("vending-1", "timeout").await;

    // Back online, the sale is payable again.
    let back = qrgate_devices::Device::connect(app.device_config("vending-1"))
        .await
        .unwrap();
    app.wait_poll("vending-1", "ok").await;
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_pump_keeps_its_pending_sale_payable_but_times_out_when_idle() {
    let app = TestApp::spawn().await;
    let pump = qrgate_devices::Device::connect(app.device_config("pump-1"))
        .await
        .unwrap();
    pump.set_status(false).await.unwrap();
    app.wait_poll("pump-1", "timeout").await;
    pump.set_status(true).await.unwrap();
    app.wait_poll("pump-1", "unavailable").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    app.wait_poll("pump-1", "ok").await;
    pump.crash();
    // Post-pay: the fuel is in the tank, the sale stays payable offline.
    let observer = app.device("pump-1").await;
    drop(observer);
    wait_for("the last will", || async {
        app.app_book
            .view(&qrgate::orders::PosId::parse("pump-1").unwrap())
            .unwrap()
            .state
            .presence
            .is_offline()
    })
    .await;
    assert_eq!(app.poll_kind("pump-1").await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_up_and_ready_means_store_and_broker() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.get("/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("\"code\":\"not_found\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_with_a_reason_when_the_broker_is_unreachable() {
    // A port where nothing listens.
    let port = free_port();
    let app = BareApp::start(|c| {
        c.mqtt.broker = qrgate::config::Broker::External {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        };
    })
    .await;
    let base = &app.base;
    let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["reasons"],
        serde_json::json!(["broker_not_connected"]),
        "{body}"
    );
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

/// A device that polls the moment it hears `pending` must be served: the
/// book shows a change to polls before it tells the device. (Found by the
/// sustained mix: rarely, a device heard `pending` and its poll still
/// answered the previous state.) A thread reads the book's outgoing MQTT
/// messages as they are queued and polls at once, as the fastest device
/// would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_right_after_the_device_hears_pending_is_served() {
    use qrgate::mqtt::inbound::parse;
    use qrgate::mqtt::topics::DeviceTopic;
    use qrgate::orders::{PosId, PosKind};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (book, mut publish_rx) =
        crate::helpers::bare_book(&dir.path().join("q.db"), vec![pos("pump-1", PosKind::Fuel)])
            .await;
    let book = Arc::new(book);
    let (heard, unserved, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let device = {
        let (book, heard, unserved, done) = (
            Arc::clone(&book),
            Arc::clone(&heard),
            Arc::clone(&unserved),
            Arc::clone(&done),
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                match publish_rx.try_recv() {
                    Ok(
                        qrgate::book::Tell::State(sale) | qrgate::book::Tell::Stored { sale, .. },
                    ) if sale.state == qrgate::orders::SaleState::Pending => {
                        if book.poll("pump-1").status != 200 {
                            unserved.fetch_add(1, Ordering::Relaxed);
                        }
                        heard.fetch_add(1, Ordering::Release);
                    }
                    _ => std::hint::spin_loop(),
                }
            }
        })
    };
    // The device thread stops however the test ends.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let stop = Stop(Arc::clone(&done));
    let id = PosId::parse("pump-1").unwrap();
    let sales = 1000;
    for k in 0..sales {
        let sale = format!(
            r#"{{"sale_id":"s{k}","items":[{{"title":"Super 95","quantity":"10","unit_price":"800.00"}}]}}"#
        );
        let cmd = parse(DeviceTopic::Sale, "pump-1", sale.as_bytes(), 16 * 1024).unwrap();
        book.execute(&id, cmd).await.unwrap();
        // Spun on, not polled every few milliseconds: a thousand sales.
        wait_for_event("the device hearing pending", async {
            while heard.load(Ordering::Acquire) < k + 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let cancel = format!(r#"{{"sale_id":"s{k}"}}"#);
        let cmd = parse(DeviceTopic::Cancel, "pump-1", cancel.as_bytes(), 16 * 1024).unwrap();
        book.execute(&id, cmd).await.unwrap();
    }
    drop(stop);
    device.join().unwrap();
    assert_eq!(
        unserved.load(Ordering::Relaxed),
        0,
        "of {sales} polls made as the device heard `pending`, some were not served"
    );
}
