//! The public listener against hostile clients (issue 13, items 3, 4, 5, 8,
//! 9 and 10): slow bodies, floods and forged lines in the log, ids a
//! signature does not cover, answers that tell which POS exist, and protocol
//! errors. Against the real binary (`Gate`) wherever the process's own
//! listener or its log is the point.

use std::net::IpAddr;

use mpsim::{NotifyMode, PaymentOutcome, Simulator, SimulatorConfig};
use qrgate::config::Secret;

use crate::crash::Gate;
use crate::helpers::*;

/// Loopback addresses other than 127.0.0.1 are another source to qrgate.
const STRANGER: [u8; 4] = [127, 0, 0, 2];

async fn gate(env: &[(&str, &str)]) -> (Simulator, Gate) {
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let gate = Gate::with(&mp, None, free_port(), "", env);
    gate.ready().await;
    (mp, gate)
}

/// The JSON lines of a Gate's log at `level`.
fn lines_at<'a>(log: &'a str, level: &str) -> Vec<&'a str> {
    let tag = format!("\"level\":\"{level}\"");
    log.lines().filter(|l| l.contains(&tag)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slow_bodies_are_cut_off_while_polls_are_answered() {
    let (_mp, gate) = gate(&[]).await;
    let addr = addr_of(&gate.base);
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let slow: Vec<_> = (0..500)
        .map(|_| {
            tokio::spawn(slow_body_client(
                addr,
                IpAddr::from(STRANGER),
                started_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..500 {
        started.recv().await.unwrap();
    }
    // Every head is out and every body trickling: polls still answer.
    for _ in 0..20 {
        let (status, body) = gate_poll(&gate, "pump-1").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("unavailable"), "{body}");
    }
    // And qrgate closes every slow one, with a 408 in JSON when it could
    // still answer.
    let mut answered = 0;
    for h in slow {
        match h.await.unwrap() {
            SlowEnd::Closed(answer) => {
                if !answer.is_empty() {
                    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
                    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
                    answered += 1;
                }
            }
            SlowEnd::StillOpen => panic!("a slow body was never cut off"),
        }
    }
    assert!(answered > 0, "no slow client read its 408");
    let log = gate_log(&gate);
    assert!(log.contains("file descriptor limit"), "{log}");
    // 500 times the same warning from one source: a few lines, the rest counted.
    let warned = log.matches(r#""kind":"slow_request""#).count();
    assert!((1..=10).contains(&warned), "{warned} warnings");
}

async fn gate_poll(gate: &Gate, pos: &str) -> (u16, String) {
    let r = reqwest::get(gate.pos_url(pos)).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_connection_cap_is_refused_and_others_are_served() {
    let (_mp, gate) = gate(&[
        ("QRGATE_HTTP__MAX_CONNECTIONS_PER_ADDRESS", "16"),
        ("QRGATE_HTTP__NOTIFICATION_BURST", "16"),
    ])
    .await;
    let addr = addr_of(&gate.base);
    // 16 kept-alive connections, each known to be taken in (answered).
    let mut held = Vec::new();
    for _ in 0..16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((IpAddr::from(STRANGER), 0).into()).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let refused = raw_exchange_from(
        addr,
        STRANGER.into(),
        b"GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains(r#""code":"too_many_connections""#),
        "{refused}"
    );
    // Another source is served meanwhile.
    assert_eq!(gate_poll(&gate, "pump-1").await.0, 400);
    // Closed connections give their places back.
    drop(held);
    wait_for("the stranger's places back", || async {
        let answer = raw_exchange_from(
            addr,
            STRANGER.into(),
            b"GET /healthz HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n",
        )
        .await;
        answer.starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_head_trickled_on_a_kept_alive_connection_is_cut_off_with_a_408() {
    let app = TestApp::spawn().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr_of(&app.base))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // actix-http times out only a connection's first head.
    let next = b"GET /healthz HTTP/1.1\r\nHost: q\r\nX-Slow: ".repeat(20);
    let mut answer = Vec::new();
    wait_for_event("the slow head cut off", async {
        for byte in next.iter() {
            if s.write_all(&[*byte]).await.is_err() {
                break;
            }
            // The trickle's pace (what is tested): a byte every 200 ms, or
            // as soon as qrgate answered something.
            match tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut buf))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_user_agents_grows_the_log_by_a_bounded_amount() {
    let (_mp, gate) = gate(&[("QRGATE_HTTP__POLL_KEY", "the-key")]).await;
    let before = gate_log(&gate).len();
    let agent = "A".repeat(100 * 1024);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let r = http
            .get(gate.pos_url("pump-1"))
            .header("user-agent", &agent)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    // Each warning was written before its answer: the log is complete.
    let log = gate_log(&gate);
    let grown = log.len() - before;
    // 200 × 100 KB before; now a few lines, each value cut at 128 characters.
    assert!(grown < 16 * 1024, "the log grew by {grown} bytes");
    let warned: Vec<_> = lines_at(&log, "WARN")
        .into_iter()
        .filter(|l| l.contains("poll without the right key"))
        .collect();
    assert!((1..=10).contains(&warned.len()), "{}", warned.len());
    assert!(warned[0].len() < 1024, "{}", warned[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pos_id_cannot_forge_a_log_line_or_put_control_characters_in_the_pretty_log() {
    let (_mp, gate) = gate(&[("QRGATE_LOG__FORMAT", "pretty")]).await;
    let forged = "pump-9%0AFORGED%20INFO%20sale%20paid%20pos%3Dpump-1%1B%5B2J%07";
    let r = reqwest::get(format!("{}/mp/pos/{forged}", gate.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let log = gate_log(&gate);
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged line: {log}"
    );
    assert!(
        !log.contains(['\u{1b}', '\u{7}']),
        "control characters in the log: {log:?}"
    );
    assert!(
        log.contains(r"pump-9\nFORGED"),
        "the poll was logged: {log}"
    );
}

/// A pending vending sale, scanned and paid at Mercado Pago, with no
/// notification sent yet: the payment's id.
async fn paid_not_notified(app: &TestApp) -> (qrgate_devices::Device, u64) {
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = app.scan("vending-1").await;
    app.mp.set_notify_mode(NotifyMode::None);
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    (vending, payment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_acts_only_on_the_id_that_was_signed() {
    let app =
        TestApp::spawn_with(|c| c.mercadopago.webhook_secret = Some(Secret::new("whsec"))).await;
    let (vending, payment) = paid_not_notified(&app).await;
    let now = chrono::Utc::now().timestamp();
    let signed = mp_signature(Some(&payment.to_string()), "req-1", now, "whsec");
    let http = reqwest::Client::new();
    let post = |query: String, signature: &str, body: String| {
        http.post(format!("{}/mp/notifications?{query}", app.base))
            .header("x-signature", signature)
            .header("x-request-id", "req-1")
            .body(body)
            .send()
    };
    let body = format!(r#"{{"type":"payment","data":{{"id":"{payment}"}}}}"#);
    // A second id beside the signed one, in the query or the body: 400.
    for (query, body) in [
        (
            format!("type=payment&data.id={payment}&id=999"),
            body.clone(),
        ),
        (
            format!("type=payment&data.id={payment}&data.id=999"),
            body.clone(),
        ),
        (
            format!("type=payment&data.id={payment}"),
            r#"{"type":"payment","data":{"id":"999"}}"#.to_owned(),
        ),
    ] {
        let r = post(query.clone(), &signed, body).await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], "bad_notification", "{query}");
    }
    // An id only in the body, under a signature that covers no id: 401.
    let no_id = mp_signature(None, "req-1", now, "whsec");
    let r = post("type=payment".into(), &no_id, body.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Ids that disagree are refused unsigned too.
    let r = http
        .post(format!(
            "{}/mp/notifications?type=payment&data.id={payment}&id=999",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Nothing was fetched for any of them.
    let fetched: Vec<String> = app.mp.api_calls().into_iter().map(|c| c.path).collect();
    assert!(
        !fetched.iter().any(|p| p.starts_with("/v1/payments/")),
        "{fetched:?}"
    );
    // The notification as signed is taken.
    let r = post(format!("type=payment&data.id={payment}"), &signed, body)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    state_of(&vending, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_pos_and_a_wrong_key_get_the_same_answer() {
    // Per-POS keys and no global key: the case that answered `invalid`.
    let app = TestApp::spawn_with(|c| {
        c.http.poll_keys.global = None;
        c.http.poll_keys.per_pos.insert(
            qrgate::orders::PosId::parse("pump-1").unwrap(),
            Secret::new("k-pump"),
        );
    })
    .await;
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for url in [
        format!("{}?key=wrong", app.pos_url("pump-1")),
        app.pos_url("pump-1"),
        format!("{}?key=wrong", app.pos_url("ghost")),
        app.pos_url("ghost"),
        format!("{}?key=k-pump", app.pos_url("ghost")),
    ] {
        answers.push((
            url.clone(),
            whole_answer(http.get(&url).send().await.unwrap()).await,
        ));
        answers.push((
            format!("POST {url}"),
            whole_answer(http.post(&url).send().await.unwrap()).await,
        ));
    }
    let (first_url, first) = &answers[0];
    assert_eq!(first.0, 404);
    for (url, answer) in &answers[1..] {
        assert_eq!(answer, first, "{url} differs from {first_url}");
    }
    // The right key still works.
    let (status, _) = app.get("/mp/pos/pump-1?key=k-pump").await;
    assert_eq!(status, 400, "unavailable: no sale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_line_is_answered_in_json_and_logged_as_a_warning() {
    let (_mp, gate) = gate(&[]).await;
    let answer = raw_exchange(addr_of(&gate.base), b"GARBAGE\x01 /x HTTP/1.1\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect(&answer);
    assert!(head.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(head.contains("content-type: application/json"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(v["code"], "bad_request");
    // Its warning is written before its answer.
    let log = gate_log(&gate);
    assert!(lines_at(&log, "ERROR").is_empty(), "{log}");
    assert!(
        lines_at(&log, "WARN")
            .iter()
            .any(|l| l.contains(r#""kind":"malformed_request""#) && l.contains("127.0.0.1")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_too_large_is_answered_431_in_json() {
    let (_mp, gate) = gate(&[]).await;
    // Exactly actix-http's limit (128 KiB), never ended: all of it is read,
    // so closing sends no reset that could eat the answer.
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: q\r\nX-Big: ".to_vec();
    head.resize(128 * 1024, b'a');
    let answer = raw_exchange(addr_of(&gate.base), &head).await;
    let (head, body) = answer.split_once("\r\n\r\n").expect(&answer);
    assert!(head.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(head.contains("content-type: application/json"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(v["code"], "request_header_fields_too_large");
    let log = gate_log(&gate);
    assert!(lines_at(&log, "ERROR").is_empty(), "{log}");
    assert!(log.contains(r#""kind":"head_too_large""#), "{log}");
}
