//! The console's edge (issue 13, items 6 and 7): it answers only under its
//! own names and to its own pages; without a token it hands out no session;
//! with one, guesses are throttled per source, the token is long, sessions
//! end (idle, logout, eviction) and the cookie is `Secure` where it must be.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use qrgate::config::Secret;
use serde_json::Value;

use crate::admin::admin;
use crate::helpers::*;

fn with_token(c: &mut qrgate::config::Config) {
    c.admin.token = Some(Secret::new(OPERATOR_TOKEN));
}

/// The `host:port` of the console (no scheme).
fn authority(app: &TestApp) -> String {
    admin(app).trim_start_matches("http://").to_owned()
}

fn port(app: &TestApp) -> String {
    authority(app).rsplit_once(':').unwrap().1.to_owned()
}

async fn json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_another_host_name_is_refused_on_every_path() {
    let app = TestApp::spawn_with(|c| c.admin.hosts = vec!["console.station.example".into()]).await;
    let base = admin(&app);
    let http = console_client("127.0.0.1");
    let port = port(&app);
    // A DNS-rebinding page: the attacker's name, resolved to the console.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("localhost.evil.example:{port}"),
        format!("10.9.9.9:{port}"),
    ] {
        for path in [
            "/",
            "/api/pos",
            "/api/sales",
            "/api/events",
            "/metrics",
            "/sales/pump-1-000000000000000",
            "/assets/console.js",
            "/no-such-path",
        ] {
            let r = http
                .get(format!("{base}{path}"))
                .header("Host", &host)
                .send()
                .await
                .unwrap();
            let (status, v) = json(r).await;
            assert_eq!(status, 421, "{host} {path}: {v}");
            assert_eq!(v["code"], "unknown_host", "{host} {path}");
        }
        for path in ["/api/sales/pump-1-000000000000000/cancel", "/login"] {
            let r = http
                .post(format!("{base}{path}"))
                .header("Host", &host)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 421, "{host} POST {path}");
        }
    }
    // Its own names, with any port: an SSH tunnel picks its local one.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost:8000".to_owned(),
        "[::1]:9090".to_owned(),
        "console.station.example".to_owned(),
        "Console.Station.Example:8443".to_owned(),
    ] {
        let r = http
            .get(format!("{base}/api/pos"))
            .header("Host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_changing_request_from_another_origin_is_refused() {
    let app = TestApp::spawn_with(with_token).await;
    let base = admin(&app);
    let host = authority(&app);
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("2", "100.00"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let cancel = format!("{base}/api/sales/{reference}/cancel");
    let http = console_client("127.0.0.1");
    let (cookie, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    let csrf = console_csrf(&http, &base, &cookie).await;

    let foreign = [
        "https://evil.example".to_owned(),
        // Another page on the same machine: the same site, not the origin.
        format!("http://{}", host.replace(&port(&app), "3000")),
        "null".to_owned(),
    ];
    for origin in &foreign {
        // With the operator's bearer token (a page could not add it, but a
        // foreign Origin is refused whatever else the request carries).
        let r = http
            .post(&cancel)
            .bearer_auth(OPERATOR_TOKEN)
            .header("Origin", origin)
            .send()
            .await
            .unwrap();
        let (status, v) = json(r).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (403, Some("origin")),
            "{origin}"
        );
        // With the session cookie and its CSRF token.
        let r = http
            .post(&cancel)
            .header("Cookie", &cookie)
            .header("X-CSRF-Token", &csrf)
            .header("Origin", origin)
            .send()
            .await
            .unwrap();
        let (status, v) = json(r).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (403, Some("origin")),
            "{origin}"
        );
    }
    // The session's change without any Origin: a replayed cookie, refused.
    let r = http
        .post(&cancel)
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, v) = json(
        http.get(format!("{base}/api/sales/{reference}"))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["summary"]["state"], "pending", "nothing was cancelled");

    // The console's own page cancels it.
    let r = http
        .post(&cancel)
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .header("Origin", format!("http://{host}"))
        .send()
        .await
        .unwrap();
    let (status, v) = json(r).await;
    assert_eq!(status, 200, "{v}");
    state_of(&pump, "1", "cancelled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_no_session_is_made_and_the_page_s_own_origin_cancels() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    let host = authority(&app);
    let http = console_client("127.0.0.1");
    for path in ["/", "/sales/pump-1-000000000000000"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert!(
            r.headers().get("set-cookie").is_none(),
            "{path} set a cookie: {:?}",
            r.headers().get("set-cookie")
        );
        let page = r.text().await.unwrap();
        assert!(
            !page.contains("csrf-token"),
            "{path}: no session, no CSRF token"
        );
    }
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"pos\""), "the console itself: {page}");

    let pump = app.device("pump-1").await;
    pump.publish_sale("2", &fuel("1", "50.00"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "2", "pending")
        .await
        .external_reference
        .unwrap();
    let cancel = format!("{base}/api/sales/{reference}/cancel");
    // Another site's page first: refused, the sale stays.
    let r = http
        .post(&cancel)
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    let (status, v) = json(r).await;
    assert_eq!((status, v["code"].as_str()), (403, Some("origin")));
    // The console's page, as a browser sends it: no cookie, its Origin.
    let r = http
        .post(&cancel)
        .header("Origin", format!("http://{host}"))
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    let (status, v) = json(r).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sale"]["state"], "cancelled");
    state_of(&pump, "2", "cancelled").await;
    let (_, v) = json(
        http.get(format!("{base}/api/sales/{reference}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let last = v["timeline"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "cancelled_by_operator");
    assert_eq!(last["detail"]["by"], "console", "the page, not a program");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_the_token_locks_the_source_out_for_longer_each_time() {
    let app = TestApp::spawn_with(with_token).await;
    let base = admin(&app);
    let guesser = console_client("127.0.0.1");
    let login = |client: &reqwest::Client, token: &str| {
        client
            .post(format!("{base}/login"))
            .form(&[("token", token)])
            .send()
    };
    let retry_after = |r: &reqwest::Response| -> Option<u64> {
        r.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse().unwrap())
    };
    // Typos are free.
    for n in 1..=qrgate::admin::auth::FREE_FAILURES {
        let r = login(&guesser, &format!("guess-{n}")).await.unwrap();
        assert_eq!(r.status(), 401, "guess {n}");
        assert_eq!(retry_after(&r), None, "guess {n}");
    }
    // The next wrong one locks the source out for a second, during which
    // nothing from it is looked at.
    let r = login(&guesser, "guess-6").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(retry_after(&r), Some(1));
    let r = login(&guesser, "guess-7").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r).is_some_and(|s| s >= 1));

    // Guessing on: refusals until the lock ends, then the next wrong token
    // is looked at and locks the source out twice as long.
    app.clock.advance(qrgate::admin::auth::FIRST_LOCK);
    let r = login(&guesser, "guess-7").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(retry_after(&r), Some(2), "the second lock is longer");
    // During it no token from this source is looked at, the right one
    // included (else a 303 against a 429 would still answer each guess),
    // through either door.
    let r = login(&guesser, OPERATOR_TOKEN).await.unwrap();
    assert_eq!(r.status(), 429);
    let page = r.text().await.unwrap();
    assert!(page.contains("Too many wrong tokens"), "{page}");
    let r = guesser
        .get(format!("{base}/api/pos"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(retry_after(&r).is_some());
    let (status, v) = json(r).await;
    assert_eq!((status, v["code"].as_str()), (429, Some("rate_limited")));
    // Another source is not held up by this one.
    console_login(&console_client("127.0.0.2"), &base, OPERATOR_TOKEN).await;
    // Once it ends, the right token is let in.
    app.clock.advance(qrgate::admin::auth::FIRST_LOCK * 2);
    let r = login(&guesser, OPERATOR_TOKEN).await.unwrap();
    assert_eq!(r.status(), 303);
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config file for the real binary: ports of its own, a temp store.
fn binary_config(dir: &std::path::Path, http: u16) -> std::path::PathBuf {
    let path = dir.join("qrgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[admin]
listen = "127.0.0.1:{admin}"
[http]
listen = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
[mqtt]
embedded_listen = "127.0.0.1:{mqtt}"
allow_anonymous = true
[store]
path = "{db}"
[[pos]]
id = "pump-1"
kind = "fuel"
"#,
            admin = free_port(),
            mqtt = free_port(),
            db = dir.join("q.db").display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_admin_token_stops_the_real_binary_at_start_naming_its_variable() {
    const SHORT: &str = "short-tok-7731";
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = binary_config(dir.path(), http);
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_qrgate"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .env(qrgate::config::ADMIN_TOKEN_ENV, SHORT)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // It ends by itself; a qrgate that answers /readyz took the token.
    let status = wait_for("qrgate to stop or to serve", || {
        let exited = child.0.try_wait().unwrap();
        async move {
            if exited.is_none() {
                let ready = reqwest::get(format!("http://127.0.0.1:{http}/readyz"))
                    .await
                    .is_ok_and(|r| r.status() == 200);
                assert!(
                    !ready,
                    "qrgate started with a {}-character token",
                    SHORT.len()
                );
            }
            exited
        }
    })
    .await;
    let (mut stderr, mut stdout) = (String::new(), String::new());
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    // A configuration error: EX_CONFIG.
    assert_eq!(
        status.code(),
        Some(i32::from(qrgate::config::EX_CONFIG)),
        "{stderr}"
    );
    assert!(
        stderr.contains("invalid configuration")
            && stderr.contains(qrgate::config::ADMIN_TOKEN_ENV)
            && stderr.contains("at least 16 characters"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(SHORT) && !stdout.contains(SHORT),
        "the token is never echoed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_and_its_event_stream_closes_then() {
    let app = TestApp::spawn_with(|c| {
        with_token(c);
        c.admin.session_idle = Duration::from_secs(1800);
    })
    .await;
    let base = admin(&app);
    let http = console_client("127.0.0.1");
    let (cookie, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    let stream = http
        .get(format!("{base}/api/events"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200, "the new session works");
    // The stream does not keep its session alive: it ends with it, half an
    // hour later.
    app.clock.advance(Duration::from_secs(1800));
    stream_ends(stream).await;
    let r = http
        .get(format!("{base}/api/pos"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the idle session is over");
    let page = http
        .get(format!("{base}/"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"token\""), "the login form again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_the_session_its_stream_and_its_cookie() {
    let app = TestApp::spawn_with(with_token).await;
    let base = admin(&app);
    let origin = format!("http://{}", authority(&app));
    let http = console_client("127.0.0.1");
    let (cookie, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    let csrf = console_csrf(&http, &base, &cookie).await;
    let page = http
        .get(format!("{base}/"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"logout\""), "the page has the button");
    let stream = http
        .get(format!("{base}/api/events"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);

    let logout = |csrf: &str, origin: Option<&str>| {
        let mut r = http
            .post(format!("{base}/logout"))
            .header("Cookie", &cookie)
            .form(&[("csrf", csrf)]);
        if let Some(o) = origin {
            r = r.header("Origin", o);
        }
        r.send()
    };
    // Another page cannot log the operator out.
    assert_eq!(logout("wrong", Some(&origin)).await.unwrap().status(), 403);
    assert_eq!(logout(&csrf, None).await.unwrap().status(), 403);
    assert_eq!(
        logout(&csrf, Some("https://evil.example"))
            .await
            .unwrap()
            .status(),
        403
    );
    let r = http
        .get(format!("{base}/api/pos"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still logged in");

    // The button's form.
    let r = logout(&csrf, Some(&origin)).await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cleared = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("qrgate_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    stream_ends(stream).await;
    let r = http
        .get(format!("{base}/api/pos"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the session is over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_secure_when_configured_or_behind_a_tls_proxy() {
    let http = console_client("127.0.0.1");
    let secure = TestApp::spawn_with(|c| {
        with_token(c);
        c.admin.secure_cookies = true;
    })
    .await;
    let (_, set) = console_login(&http, &admin(&secure), OPERATOR_TOKEN).await;
    assert!(set.contains("; Secure"), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );

    let plain = TestApp::spawn_with(with_token).await;
    let base = admin(&plain);
    let (_, set) = console_login(&http, &base, OPERATOR_TOKEN).await;
    assert!(!set.contains("Secure"), "plain HTTP on loopback: {set}");
    // A TLS proxy says the browser came over HTTPS: the cookie is Secure.
    let r = http
        .post(format!("{base}/login"))
        .header("X-Forwarded-Proto", "https")
        .form(&[("token", OPERATOR_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(set.contains("; Secure"), "{set}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_anonymous_visits_make_none() {
    let app = TestApp::spawn_with(|c| {
        with_token(c);
        c.admin.max_sessions = 2;
    })
    .await;
    let base = admin(&app);
    let http = console_client("127.0.0.1");
    for _ in 0..50 {
        let r = http.get(format!("{base}/")).send().await.unwrap();
        assert!(r.headers().get("set-cookie").is_none());
        assert!(r.text().await.unwrap().contains("id=\"token\""));
    }
    let uses = |cookie: String| {
        let r = http
            .get(format!("{base}/api/pos"))
            .header("Cookie", cookie)
            .send();
        async move { r.await.unwrap().status().as_u16() }
    };
    let (a, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    let (b, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    assert_eq!(uses(a.clone()).await, 200, "a is used after b was made");
    // A third login: the least recently used session (b) makes way.
    let (c, _) = console_login(&http, &base, OPERATOR_TOKEN).await;
    assert_eq!(uses(b).await, 401, "evicted");
    assert_eq!(uses(a).await, 200);
    assert_eq!(uses(c).await, 200);
}
