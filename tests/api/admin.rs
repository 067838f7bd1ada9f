//! The operator's listener: admin paths never on the public one, the token,
//! cancel and refund end to end against the simulator, the live stream and
//! `/metrics`.

use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome};
use qrgate::config::Secret;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::helpers::*;

pub(crate) fn admin(app: &TestApp) -> String {
    app.admin.clone().expect("the console listens")
}

pub(crate) async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn post(
    url: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(url).body(body.to_owned());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A fuel sale on pump-1, paid through the simulator; its reference.
pub(crate) async fn paid_sale(
    app: &TestApp,
    pump: &qrgate_devices::Device,
    id: &str,
    price: &str,
) -> String {
    pump.publish_sale(id, &fuel("1", price), None)
        .await
        .unwrap();
    let pending = state_of(pump, id, "pending").await;
    let order = app.scan("pump-1").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(pump, id, "paid").await;
    pending.external_reference.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_404_json_on_the_public_listener() {
    let app = TestApp::spawn().await;
    for path in [
        "/",
        "/api/pos",
        "/api/sales",
        "/api/events",
        "/metrics",
        "/login",
        "/sales/pump-1-abc",
        "/assets/console.js",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 404, "{path}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "not_found", "{path}: {body}");
    }
    let r = reqwest::Client::new()
        .post(format!("{}/api/sales/pump-1-abc/refund", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The same paths answer on the admin listener.
    let (status, v) = get_json(&format!("{}/api/pos", admin(&app)), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["pos"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_api_needs_it_and_a_wrong_one_is_refused() {
    let app = TestApp::spawn_with(|c| c.admin.token = Some(Secret::new("op-s3cret"))).await;
    let base = admin(&app);
    // `/metrics` has readers of its own (tests/api/metrics.rs).
    for path in ["/api/pos", "/api/sales", "/api/events"] {
        let (status, v) = get_json(&format!("{base}{path}"), None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(v["code"], "unauthorized");
        let (status, _) = get_json(&format!("{base}{path}?x"), Some("wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let (status, _) = post(
        &format!("{base}/api/sales/pump-1-000000000000000/cancel"),
        None,
        None,
        "",
    )
    .await;
    assert_eq!(status, 401);
    let (status, v) = get_json(&format!("{base}/api/pos"), Some("op-s3cret")).await;
    assert_eq!(status, 200, "{v}");

    // The login form: a wrong token is refused, the right one sets an
    // HttpOnly, SameSite=Strict session cookie.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/login"))
        .form(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = client
        .post(format!("{base}/login"))
        .form(&[("token", "op-s3cret")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = client
        .get(format!("{base}/"))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("csrf-token"), "{page}");
    // A state-changing call with the cookie but without the CSRF token is refused.
    let r = client
        .post(format!("{base}/api/sales/pump-1-000000000000000/cancel"))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cancels_a_pending_sale_and_it_is_audited() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    let pump = app.device("pump-1").await;
    pump.publish_sale("51", &fuel("2", "100.00"), None)
        .await
        .unwrap();
    let pending = state_of(&pump, "51", "pending").await;
    let reference = pending.external_reference.unwrap();

    let (status, v) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["counts"]["pending"], 1);
    let row = v["pos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "pump-1")
        .unwrap()
        .clone();
    assert_eq!(row["sale"]["state"], "pending");
    assert_eq!(row["sale"]["amount"], "200.00");

    let (status, v) = post(
        &format!("{base}/api/sales/{reference}/cancel"),
        None,
        None,
        "",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sale"]["state"], "cancelled");
    state_of(&pump, "51", "cancelled").await;
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");

    let (status, v) = get_json(&format!("{base}/api/sales/{reference}"), None).await;
    assert_eq!(status, 200);
    let last = v["timeline"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "cancelled_by_operator");
    assert_eq!(last["detail"]["by"], "local");

    // Twice: the sale is no longer cancellable; an unknown sale is 404.
    let (status, v) = post(
        &format!("{base}/api/sales/{reference}/cancel"),
        None,
        None,
        "",
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(v["code"], "not_cancellable");
    let (status, v) = post(
        &format!("{base}/api/sales/pump-1-000000000000000/cancel"),
        None,
        None,
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(v["code"], "unknown_sale");

    let (_, v) = get_json(
        &format!("{base}/api/sales?pos=pump-1&state=cancelled"),
        None,
    )
    .await;
    assert_eq!(v["sales"][0]["external_reference"], reference.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_partial_then_full_are_sent_once_each_and_too_much_is_422() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    let pump = app.device("pump-1").await;
    let reference = paid_sale(&app, &pump, "61", "100.00").await;
    let url = format!("{base}/api/sales/{reference}/refund");

    // Partial, pressed twice with the same key and once without any.
    let (status, v) = post(&url, None, Some("k1"), r#"{"amount":"10.50"}"#).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "partially_refunded");
    assert_eq!(v["refunded_total"], "10.50");
    let (status, again) = post(&url, None, Some("k1"), r#"{"amount":"10.50"}"#).await;
    assert_eq!((status, &again), (200, &v));
    assert_eq!(app.mp.refunds().len(), 1, "one request to Mercado Pago");
    let told = pump
        .wait_state(WAIT, |m| {
            m.state == "refunded" && m.sale_id.as_deref() == Some("61")
        })
        .await
        .unwrap();
    assert_eq!(told.amount.as_deref(), Some("10.50"));
    assert_eq!(told.raw["refunded_total"], "10.50");
    assert_eq!(
        app.mp.refunds()[0].amount,
        Some(Decimal::new(1050, 2)),
        "a partial refund names its amount"
    );

    // More than what is left.
    let (status, v) = post(&url, None, None, r#"{"amount":"89.51"}"#).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["code"], "refund_exceeds_paid");

    // The rest, without a key: a repeat within a minute is the first answer.
    let (status, v) = post(&url, None, None, "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "refunded");
    assert_eq!(v["amount"], "89.50");
    let (status, again) = post(&url, None, None, "").await;
    assert_eq!((status, &again), (200, &v));
    let refunds = app.mp.refunds();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(
        refunds[1].amount, None,
        "what is left goes with an empty body"
    );
    pump.wait_state(WAIT, |m| {
        m.state == "refunded" && m.raw["refunded_total"] == "100.00"
    })
    .await
    .unwrap();

    // Nothing left: refused, nothing sent.
    let (status, v) = post(&url, None, Some("k9"), "").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["code"], "not_refundable");
    assert_eq!(app.mp.refunds().len(), 2);
    let (_, v) = get_json(&format!("{base}/api/sales/{reference}"), None).await;
    let events: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == "refunded_by_operator")
            .count(),
        2,
        "{events:?}"
    );
    assert!(!v["merchant_orders"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_delivers_what_the_logs_say() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    let mut stream = reqwest::get(format!("{base}/api/events?pos=pump-1"))
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // The stream's first chunk says it is connected: subscribed from here on.
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b": connected"));
    let pump = app.device("pump-1").await;
    pump.publish_sale("71", &fuel("1", "50.00"), None)
        .await
        .unwrap();
    let mut seen = String::new();
    wait_for_event("the accepted event on the stream", async {
        while !seen.contains("\"kind\":\"accepted\"") {
            let chunk = stream.chunk().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await;
    let line = seen
        .lines()
        .find(|l| l.starts_with("data: ") && l.contains("\"accepted\""))
        .unwrap();
    let v: Value = serde_json::from_str(&line["data: ".len()..]).unwrap();
    assert_eq!(v["pos"], "pump-1");
    assert_eq!(v["sale_id"], "71");
    assert_eq!(v["state"], "pending");
    assert!(
        v["detail"].as_str().unwrap().starts_with("sale accepted"),
        "{v}"
    );
    assert!(v["external_reference"].as_str().is_some() && v["at"].is_i64());
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_the_traffic() {
    let app = TestApp::spawn().await;
    let url = format!("{}/metrics", admin(&app));
    let before = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&before, "qrgate_polls_total", &[("answer", "unavailable")]),
        0.0
    );
    for _ in 0..3 {
        assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    }
    let pump = app.device("pump-1").await;
    paid_sale(&app, &pump, "81", "20.00").await;
    let after = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&after, "qrgate_polls_total", &[("answer", "unavailable")]),
        3.0
    );
    assert!(sample(&after, "qrgate_polls_total", &[("answer", "ok")]) >= 1.0);
    assert_eq!(
        sample(&after, "qrgate_sales_total", &[("outcome", "paid")]),
        1.0
    );
    assert!(
        sample(
            &after,
            "qrgate_mp_requests_total",
            &[("endpoint", "/merchant_orders/:id"), ("status", "200")]
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "qrgate_mqtt_connected", &[]), 1.0);
    assert!(sample(&after, "qrgate_store_write_duration_seconds_count", &[]) >= 3.0);
    assert!(sample(&after, "qrgate_poll_duration_seconds_count", &[]) >= 4.0);
    assert_eq!(sample(&after, "qrgate_devices_online", &[]), 2.0);
}

/// Headless Chromium, or `None` (and a note) when it is not installed,
/// unless QRGATE_REQUIRE_CHROMIUM=1 makes that a failure.
pub(crate) fn chromium() -> Option<&'static str> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new(name)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return Some(name);
        }
    }
    if std::env::var("QRGATE_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("chromium is required (QRGATE_REQUIRE_CHROMIUM=1) but not installed");
    }
    eprintln!("SKIPPED: chromium is not installed");
    None
}

/// Runs headless Chromium on `url`: the DOM after its scripts ran, and a
/// screenshot at `png`.
async fn browse(browser: &str, url: &str, png: &std::path::Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let common = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--hide-scrollbars".to_owned(),
        "--window-size=1000,700".to_owned(),
        format!("--user-data-dir={}", profile.path().display()),
        // The page keeps its event stream open, so the load never ends by
        // itself: Chromium stops it after this and then dumps or shoots.
        "--timeout=4000".to_owned(),
    ];
    let run = |extra: Vec<String>| {
        let mut c = tokio::process::Command::new(browser);
        c.args(&common)
            .args(extra)
            .arg(url)
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(Duration::from_secs(60), c.output())
                .await
                .expect("chromium ends")
                .unwrap()
        }
    };
    let dom = run(vec!["--dump-dom".into()]).await;
    let shot = run(vec![format!("--screenshot={}", png.display())]).await;
    assert!(
        shot.status.success(),
        "chromium could not take the screenshot"
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_loads_in_a_real_browser_and_saves_a_screenshot() {
    let Some(browser) = chromium() else { return };
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    paid_sale(&app, &pump, "91", "120.00").await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("5", &snack("1500.00"), None)
        .await
        .unwrap();
    state_of(&vending, "5", "pending").await;

    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let png = target.join("console-smoke.png");
    let dom = browse(browser, &format!("{}/", admin(&app)), &png).await;
    // The browser got the console itself (without a token, no login and
    // no session); the rows are filled by its script (see the screenshot:
    // the dump is taken at load, before the script's fetch of /api/pos
    // answers).
    assert!(!dom.contains("id=\"token\""), "{dom}");
    assert!(dom.contains("console.js"), "{dom}");
    assert!(dom.contains("id=\"pos\""), "{dom}");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}
