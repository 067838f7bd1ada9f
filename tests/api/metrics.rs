//! `/metrics`: who may read it (a program on the station, the read-only
//! metrics token, the operator), and what it says: the build, the process,
//! sales served and not paid, and series that do not grow with the number
//! of POS.

use std::collections::BTreeSet;

use mpsim::PaymentOutcome;
use qrgate::config::Secret;
use qrgate::orders::PosKind;

use crate::admin::admin;
use crate::helpers::*;

const OPERATOR: &str = "operator-token-0123456789";
const SCRAPER: &str = "scraper-token-0123456789";

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut r = reqwest::Client::new().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_token_reads_metrics_and_opens_nothing_else() {
    let app = TestApp::spawn_with(|c| {
        c.admin.token = Some(Secret::new(OPERATOR));
        c.admin.metrics_token = Some(Secret::new(SCRAPER));
    })
    .await;
    let base = admin(&app);
    let metrics = format!("{base}/metrics");
    let (k, scraper) = bearer(SCRAPER);
    let (_, operator) = bearer(OPERATOR);
    let (_, wrong) = bearer("not-the-token-at-all");
    for (headers, status, who) in [
        (vec![], 200, "a program on the station, no token"),
        (vec![(k, scraper.as_str())], 200, "the metrics token"),
        (vec![(k, operator.as_str())], 200, "the operator's token"),
        (
            vec![("x-forwarded-for", "203.0.113.5")],
            401,
            "a client a proxy on the station forwards, no token",
        ),
        (
            vec![("forwarded", "for=203.0.113.5")],
            401,
            "the same, by Forwarded",
        ),
        (
            vec![("x-forwarded-for", "203.0.113.5"), (k, scraper.as_str())],
            200,
            "a forwarded scraper with the metrics token",
        ),
        (
            vec![(k, wrong.as_str())],
            401,
            "a wrong token, even from loopback",
        ),
    ] {
        let (got, body) = get(&metrics, &headers).await;
        assert_eq!(got, status, "{who}: {body}");
        if status == 200 {
            assert!(body.contains("qrgate_build_info{"), "{who}");
        }
    }
    // The metrics token is no operator's token: not for the API...
    for path in ["/api/pos", "/api/sales", "/api/events"] {
        let (got, body) = get(&format!("{base}{path}"), &[(k, scraper.as_str())]).await;
        assert_eq!(got, 401, "{path}: {body}");
    }
    // ...nor for the console's login.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{base}/login"))
        .form(&[("token", SCRAPER)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_without_an_operators_token_must_still_be_right() {
    let app = TestApp::spawn_with(|c| c.admin.metrics_token = Some(Secret::new(SCRAPER))).await;
    let metrics = format!("{}/metrics", admin(&app));
    let (k, scraper) = bearer(SCRAPER);
    let (_, wrong) = bearer("not-the-token-at-all");
    assert_eq!(get(&metrics, &[]).await.0, 200);
    assert_eq!(get(&metrics, &[(k, scraper.as_str())]).await.0, 200);
    assert_eq!(get(&metrics, &[(k, wrong.as_str())]).await.0, 401);
}

/// Every series' name and labels, values left out.
async fn series(app: &TestApp) -> BTreeSet<String> {
    let (status, text) = get(&format!("{}/metrics", admin(app)), &[]).await;
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_owned()))
        .collect()
}

/// An app with `ids` as POS, each polled once and one sale pending and
/// served on the first: every per-POS path the metrics count.
async fn station(ids: &[String]) -> (TestApp, BTreeSet<String>) {
    let pos: Vec<_> = ids.iter().map(|id| pos(id, PosKind::Vending)).collect();
    let app = TestApp::spawn_with(move |c| c.pos = pos).await;
    for id in ids {
        assert_eq!(app.poll_kind(id).await, "unavailable");
    }
    let device = app.device(&ids[0]).await;
    device.publish_sale("1", &snack("100"), None).await.unwrap();
    state_of(&device, "1", "pending").await;
    let order = app.scan(&ids[0]).await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&device, "1", "paid").await;
    let s = series(&app).await;
    (app, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_do_not_grow_with_the_number_of_pos() {
    // Ids without digits: a label that took them for words would show.
    let names = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let a = (b'a' + (i % 26) as u8) as char;
                let b = (b'a' + (i / 26) as u8) as char;
                format!("kiosk-{b}{a}")
            })
            .collect()
    };
    let (_few, few) = station(&names(2)).await;
    let (_many, many) = station(&names(60)).await;
    let only_few: Vec<_> = few.difference(&many).collect();
    let only_many: Vec<_> = many.difference(&few).collect();
    assert!(
        only_few.is_empty() && only_many.is_empty(),
        "2 POS only: {only_few:?}\n60 POS only: {only_many:?}"
    );
    assert!(
        !many.iter().any(|s| s.contains("kiosk")),
        "no series names a POS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_build_the_process_and_the_sales_served_but_unpaid() {
    let app = TestApp::spawn().await;
    let console = admin(&app);
    assert_eq!(metric(&console, "qrgate_build_info", "version=").await, 1.0);
    assert!(metric(&console, "process_open_fds", "").await > 0.0);
    assert!(metric(&console, "process_resident_memory_bytes", "").await > 0.0);
    let cpu = metric(&console, "process_cpu_seconds_total", "").await;
    assert!(cpu >= 0.0);
    assert_eq!(
        metric(&console, "qrgate_sales_served_unpaid", "").await,
        0.0
    );
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    assert_eq!(metric(&console, "qrgate_pos_busy", "").await, 1.0);
    assert_eq!(
        metric(&console, "qrgate_sales_served_unpaid", "").await,
        0.0,
        "pending, not yet served"
    );
    let order = app.scan("vending-1").await;
    wait_for("the sale counted as served and unpaid", || async {
        metric(&console, "qrgate_sales_served_unpaid", "").await == 1.0
    })
    .await;
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
    assert_eq!(
        metric(&console, "qrgate_sales_served_unpaid", "").await,
        0.0
    );
    assert_eq!(metric(&console, "qrgate_pos_busy", "").await, 0.0);
}
