//! Behind a reverse proxy: every test request comes from 127.0.0.1, as every
//! request does behind a proxy on the station's host. With 127.0.0.1 listed
//! in `[http] trusted_proxies`, the client its headers name gets its own
//! notification bucket; without it, the same headers change nothing.

use crate::helpers::*;

/// A notification of a topic qrgate ignores (no Mercado Pago call), sent
/// with `headers`; its status.
async fn notify(app: &TestApp, headers: &[(&str, &str)]) -> u16 {
    let mut r = reqwest::Client::new().post(format!(
        "{}/mp/notifications?topic=chargebacks&id=1",
        app.base
    ));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap().status().as_u16()
}

/// Sends `burst` notifications as `headers`, then one more: the statuses.
async fn burst_then_one(app: &TestApp, burst: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..=burst {
        statuses.push(notify(app, headers).await);
    }
    statuses
}

const BURST: u32 = 5;

async fn app_trusting(proxies: &[&str]) -> TestApp {
    let proxies: Vec<ipnet::IpNet> = proxies.iter().map(|p| p.parse().unwrap()).collect();
    TestApp::spawn_with(move |c| {
        // One token a minute: nothing refills while the test runs.
        c.http.notification_rate_per_sec = 1;
        c.http.notification_burst = BURST;
        c.http.trusted_proxies = proxies;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_behind_a_trusted_proxy_get_a_bucket_each() {
    let app = app_trusting(&["127.0.0.1/32", "::1/128"]).await;
    let flooder = [("x-forwarded-for", "198.51.100.7, 127.0.0.1")];
    let statuses = burst_then_one(&app, BURST as usize, &flooder).await;
    assert_eq!(&statuses[..BURST as usize], &[200; BURST as usize]);
    assert_eq!(statuses[BURST as usize], 429, "{statuses:?}");
    // Mercado Pago, through the same proxy, is not in the flooder's bucket:
    // named by X-Forwarded-For or by Forwarded.
    assert_eq!(
        notify(&app, &[("x-forwarded-for", "203.0.113.20")]).await,
        200
    );
    assert_eq!(
        notify(
            &app,
            &[("forwarded", "for=\"[2001:db8::20]:443\";proto=https")]
        )
        .await,
        200
    );
    // A forged left part does not escape the bucket of who sent it: the
    // right-most stranger is the client.
    assert_eq!(
        notify(&app, &[("x-forwarded-for", "203.0.113.99, 198.51.100.7")]).await,
        429
    );
    // Headers that say nothing usable, or disagree, count as the proxy:
    // its own bucket, neither the flooder's nor Mercado Pago's.
    let proxy_itself = [
        [("x-forwarded-for", "not an address")],
        [("forwarded", "for=unknown")],
        [("forwarded", "for=_hidden")],
    ];
    for h in &proxy_itself {
        assert_eq!(notify(&app, h).await, 200, "{h:?}");
    }
    let disagree = [
        ("x-forwarded-for", "203.0.113.30"),
        ("forwarded", "for=198.51.100.31"),
    ];
    assert_eq!(notify(&app, &disagree).await, 200);
    assert_eq!(
        notify(&app, &[]).await,
        200,
        "the proxy's bucket: 5th token"
    );
    assert_eq!(notify(&app, &[]).await, 429, "the proxy's bucket is spent");
    assert_eq!(
        notify(&app, &[("x-forwarded-for", "203.0.113.20")]).await,
        200,
        "Mercado Pago's own bucket is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_headers_from_an_untrusted_peer_are_ignored() {
    // A proxy elsewhere is trusted; the test's loopback peer is not.
    let app = app_trusting(&["10.0.0.0/8"]).await;
    let statuses =
        burst_then_one(&app, BURST as usize, &[("x-forwarded-for", "198.51.100.7")]).await;
    assert_eq!(statuses[BURST as usize], 429, "{statuses:?}");
    // Another named client is the same peer: one bucket.
    assert_eq!(
        notify(&app, &[("x-forwarded-for", "203.0.113.20")]).await,
        429
    );
    assert_eq!(
        notify(&app, &[("forwarded", "for=203.0.113.21")]).await,
        429
    );
    assert_eq!(notify(&app, &[]).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_forwarded_headers_change_nothing() {
    let app = app_trusting(&[]).await;
    let mut statuses = Vec::new();
    for i in 0..=BURST {
        // A fresh address per request would escape any limit that read it.
        let xff = format!("198.51.100.{i}");
        statuses.push(notify(&app, &[("x-forwarded-for", &xff)]).await);
    }
    assert_eq!(statuses[BURST as usize], 429, "{statuses:?}");
}
