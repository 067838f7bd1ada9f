//! `/healthz` and `/readyz` on both listeners, the store probed at most once
//! a second however many ask, stable codes instead of the store's error,
//! and the access token's check: a refused token is loud, an outage is not a
//! refused token.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use qrgate::config::Secret;
use serde_json::Value;

use crate::admin::admin;
use crate::helpers::*;

async fn get_json(url: String) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn probes(app: &TestApp) -> f64 {
    metric(&admin(app), "qrgate_store_probes_total", "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_probes_the_store_at_most_once_a_second_however_many_ask() {
    let app = TestApp::spawn().await;
    let console = admin(&app);
    let before = probes(&app).await;
    let started = Instant::now();
    let asks = (0..200).map(|i| {
        // Both listeners answer it, from one shared probe.
        let base = if i % 2 == 0 { &app.base } else { &console };
        get_json(format!("{base}/readyz"))
    });
    let answers = join_all(asks).await;
    let elapsed = started.elapsed();
    let during = probes(&app).await - before;
    for (status, v) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["status"], "ready", "{v}");
    }
    // One probe per whole second that passed, and the one in flight.
    let bound = elapsed.as_secs() as f64 + 1.0;
    assert!(
        during <= bound,
        "{during} store probes for 200 asks in {elapsed:?} (at most {bound})"
    );
    // And the answer is not frozen: once the last result is a second old,
    // the next ask probes again.
    let seen = before + during;
    wait_for("a new probe after a second", || async {
        let _ = get_json(format!("{}/readyz", app.base)).await;
        probes(&app).await > seen
    })
    .await;
    let (status, v) = get_json(format!("{console}/healthz")).await;
    assert_eq!((status, &v["status"]), (200, &Value::from("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_is_a_stable_code_on_readyz_and_healthz_does_not_look() {
    let app = TestApp::spawn().await;
    // Another process holds the database's write lock: every write of
    // qrgate's waits, then fails.
    let db = rusqlite::Connection::open(app.dir.path().join("qrgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let v = wait_for("/readyz unready", || async {
        let (status, v) = get_json(format!("{}/readyz", app.base)).await;
        (status == 503).then_some(v)
    })
    .await;
    assert_eq!(v["status"], "unready");
    assert_eq!(v["reasons"], serde_json::json!(["store_not_writable"]));
    let text = v.to_string();
    for internal in ["locked", "database", "sqlite", "within"] {
        assert!(!text.to_lowercase().contains(internal), "{text}");
    }
    // Liveness looks at nothing: it answers at once, and probes nothing.
    let probed = probes(&app).await;
    for _ in 0..20 {
        let (status, _) = get_json(format!("{}/healthz", app.base)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(probes(&app).await, probed);
    db.execute_batch("COMMIT").unwrap();
    app.wait_ready().await;
}

/// `/readyz`'s `mercadopago`, waited for until it is `state`; the answer.
async fn wait_token_state(app: &TestApp, state: &str) -> (u16, Value) {
    wait_for(format!("/readyz saying mercadopago {state}"), || async {
        let (status, v) = get_json(format!("{}/readyz", app.base)).await;
        if v["mercadopago"] == state {
            Ok((status, v))
        } else {
            Err(v.to_string())
        }
    })
    .await
}

async fn console_page(app: &TestApp) -> String {
    reqwest::get(format!("{}/", admin(app)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_access_token_is_loud_and_qrgate_stays_ready() {
    let app = TestApp::spawn_with(|c| {
        c.mercadopago.access_token = Some(Secret::new("APP_USR-revoked-long-ago"));
    })
    .await;
    let (status, v) = wait_token_state(&app, "token_refused").await;
    assert_eq!((status, &v["status"]), (200, &Value::from("ready")), "{v}");
    let (_, pos) = get_json(format!("{}/api/pos", admin(&app))).await;
    assert_eq!(pos["mercadopago"], "token_refused");
    let page = console_page(&app).await;
    assert!(
        page.contains("<p id=\"mp-banner\" class=\"banner\">"),
        "the banner shows: {page}"
    );
    assert_eq!(
        metric(&admin(&app), "qrgate_mp_token_refused", "").await,
        1.0
    );
    // Polls are still answered.
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_not_a_refused_token_and_a_revoked_one_shows_at_the_next_check() {
    let app = TestApp::spawn_with(|c| {
        c.mercadopago.token_check = Some(Duration::from_secs(1));
    })
    .await;
    wait_token_state(&app, "ok").await;
    assert!(console_page(&app)
        .await
        .contains("class=\"banner\" hidden>"));
    assert_eq!(
        metric(&admin(&app), "qrgate_mp_token_refused", "").await,
        0.0
    );
    // Mercado Pago is down: nothing is known about the token.
    app.mp.fail_next("/users/me", 503, 1_000_000);
    let (status, _) = wait_token_state(&app, "unreachable").await;
    assert_eq!(status, 200);
    app.mp.clear_failures();
    wait_token_state(&app, "ok").await;
    // The token is revoked while qrgate runs.
    app.mp.fail_next("/users/me", 401, 1_000_000);
    wait_token_state(&app, "token_refused").await;
    let refused: Vec<u16> = app
        .mp
        .api_calls()
        .iter()
        .filter(|c| c.path == "/users/me")
        .map(|c| c.status)
        .collect();
    assert!(
        refused.contains(&503) && refused.contains(&401),
        "{refused:?}"
    );
    let (_, pos) = get_json(format!("{}/api/pos", admin(&app))).await;
    assert_eq!(pos["mercadopago"], "token_refused");
}
