//! Only the right parties (issue 4): device logins at the embedded broker,
//! TLS, poll keys, webhook signatures, rate limits, HTTP hygiene.

use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome, Scan};
use qrgate::config::Secret;
use qrgate_devices::{Device, DeviceConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};

use crate::helpers::*;

/// A CA, and a certificate it signed for 127.0.0.1 and localhost, as PEM
/// files in `dir`: (ca, cert, key).
pub fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    // Mosquitto drops to its own user and must read them.
    use std::os::unix::fs::PermissionsExt;
    for p in [
        dir.to_path_buf(),
        paths.0.clone(),
        paths.1.clone(),
        paths.2.clone(),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_lets_in_only_devices_with_their_password() {
    let app = BareApp::start(|c| {
        c.mqtt.allow_anonymous = false;
        c.mqtt.users = vec![("pump-1".into(), Secret::new("p1-secret"))];
    })
    .await;
    app.wait_ready().await;
    let cfg = |user: Option<(&str, &str)>| {
        let c = DeviceConfig::new("127.0.0.1", app.mqtt_port, "pump-1").without_presence();
        match user {
            Some((u, p)) => c.credentials(u, p),
            None => c,
        }
    };
    // rumqttd closes a refused connection without a CONNACK, so each device
    // gives up only after its connect timeout: wait for the three at once.
    let (anonymous, wrong, other) = tokio::join!(
        Device::connect(cfg(None)),
        Device::connect(cfg(Some(("pump-1", "wrong")))),
        Device::connect(cfg(Some(("vending-1", "p1-secret")))),
    );
    assert!(anonymous.is_err(), "anonymous refused");
    assert!(wrong.is_err(), "wrong password refused");
    assert!(other.is_err(), "another POS's name refused");
    let pump = Device::connect(cfg(Some(("pump-1", "p1-secret"))))
        .await
        .unwrap();
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_can_reach_the_embedded_broker_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let app = BareApp::start(|c| {
        c.mqtt.embedded_tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.mqtt.tls_cert = Some(cert);
        c.mqtt.tls_key = Some(key);
    })
    .await;
    app.wait_ready().await;
    let tls_port = app.mqtt_tls_port.expect("a TLS listener");
    let mut opts = MqttOptions::new("tls-pump", "127.0.0.1", tls_port);
    opts.set_transport(Transport::tls(std::fs::read(&ca).unwrap(), None, None));
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .subscribe("qrgate/pos/pump-1/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "qrgate/pos/pump-1/sale",
            QoS::AtLeastOnce,
            false,
            r#"{"sale_id":"tls-1","items":[{"title":"Super","quantity":"1","unit_price":"100"}]}"#,
        )
        .await
        .unwrap();
    let pending = wait_for_event("pending over TLS", async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    if v["state"] == "pending" {
                        return v;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("TLS connection failed: {e}"),
            }
        }
    })
    .await;
    assert_eq!(pending["sale_id"], "tls-1");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qrgate_reaches_a_tls_mosquitto_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let (cert2, key2) = (cert.clone(), key.clone());
    let Some(broker) = Mosquitto::start_with(move |port| {
        let conf = cert2.parent().unwrap().join("tls.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {}\nkeyfile {}\n",
                cert2.display(),
                key2.display()
            ),
        )
        .unwrap();
        Some(conf)
    }) else {
        return;
    };
    let app = TestApp::spawn_on(Where::Port(broker.port), |c| {
        c.mqtt.broker = qrgate::config::Broker::External {
            host: "127.0.0.1".into(),
            port: broker.port,
            tls: true,
        };
        c.mqtt.tls_ca = Some(ca);
    })
    .await;
    // Ready means connected and subscribed, over TLS.
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_poll_key_a_poll_without_it_is_404_and_serves_nothing() {
    let app = TestApp::spawn_with(|c| {
        c.http.poll_keys.global = Some(Secret::new("k-global"));
        c.http.poll_keys.per_pos.insert(
            qrgate::orders::PosId::parse("pump-1").unwrap(),
            Secret::new("k-pump"),
        );
    })
    .await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    for query in [
        "",
        "?key=",
        "?key=k-global",
        "?key=k-pum",
        "?key=k-pumpX",
        "?storeid=1",
    ] {
        let r = reqwest::get(format!("{}{query}", app.pos_url("pump-1")))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{query}");
        let body = r.text().await.unwrap();
        assert!(body.contains("\"code\":\"not_found\""), "{body}");
    }
    // Nobody was served: the device was never told a customer is paying.
    // Bounded by a marker: a sale of vending-1 served after those polls goes
    // through the queue a `served` of theirs would have gone through first.
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("marker", &snack("10"), None)
        .await
        .unwrap();
    state_of(&vending, "marker", "pending").await;
    let served = format!("{}?key=k-global", app.pos_url("vending-1"));
    assert_eq!(reqwest::get(served).await.unwrap().status(), 200);
    vending
        .wait_state(WAIT, |m| m.is_for("marker") && m.served)
        .await
        .unwrap();
    let timeline = app.timeline(&reference).await;
    assert!(!timeline.iter().any(|e| e == "served"), "{timeline:?}");
    assert!(pump.drain().iter().all(|m| !m.served));
    vending.cancel("marker").await.unwrap();
    state_of(&vending, "marker", "cancelled").await;

    let keyed = format!("{}?storeid=6232&key=k-pump", app.pos_url("pump-1"));
    match app.mp.scan(&keyed).await.unwrap() {
        Scan::Order(o) => assert_eq!(o.total_amount.to_string(), "100.00"),
        other => panic!("{other:?}"),
    }
    // Other POS use the global key. An unknown POS is 404 whatever the key:
    // with keys in use, `invalid` would tell which ids exist.
    let r = reqwest::get(format!("{}?key=k-global", app.pos_url("vending-1")))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        reqwest::get(app.pos_url("ghost")).await.unwrap().status(),
        404
    );
    let r = reqwest::get(format!("{}?key=k-global", app.pos_url("ghost")))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

fn sign(data_id: &str, request_id: &str, ts: i64, secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("id:{data_id};request-id:{request_id};ts:{ts};").as_bytes());
    format!("ts={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_webhook_secret_a_signed_notification_must_verify() {
    let app =
        TestApp::spawn_with(|c| c.mercadopago.webhook_secret = Some(Secret::new("whsec"))).await;
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
    let url = format!(
        "{}/mp/notifications?type=payment&data.id={payment}",
        app.base
    );
    let body = format!(r#"{{"type":"payment","data":{{"id":"{payment}"}}}}"#);
    let now = chrono::Utc::now().timestamp();
    let http = reqwest::Client::new();
    let post = |sig: String| {
        http.post(&url)
            .header("x-signature", sig)
            .header("x-request-id", "req-7")
            .body(body.clone())
            .send()
    };
    for bad in [
        sign(&payment.to_string(), "req-7", now, "not-the-secret"),
        sign(&payment.to_string(), "req-8", now, "whsec"),
        sign(&payment.to_string(), "req-7", now - 3600, "whsec"),
        "ts=1,v1=zz".to_owned(),
    ] {
        let r = post(bad).await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.text().await.unwrap(),
            r#"{"code":"unauthorized","message":"unauthorized"}"#
        );
    }
    assert_eq!(
        app.poll_kind("vending-1").await,
        "ok",
        "a refused notification settles nothing"
    );
    // Milliseconds are accepted too.
    let r = post(sign(&payment.to_string(), "req-7", now * 1000, "whsec"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    state_of(&vending, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_without_a_signature_are_still_taken_when_a_secret_is_set() {
    // QR notifications cannot be signed (docs/decisions.md, "Notifications"):
    // the fetch is the proof.
    let app =
        TestApp::spawn_with(|c| c.mercadopago.webhook_secret = Some(Secret::new("whsec"))).await;
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("1", &snack("100"), None)
        .await
        .unwrap();
    state_of(&vending, "1", "pending").await;
    let order = app.scan("vending-1").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_notifications_from_one_address_is_answered_429() {
    let app = TestApp::spawn_with(|c| {
        c.http.notification_rate_per_sec = 1;
        c.http.notification_burst = 5;
    })
    .await;
    let url = format!("{}/mp/notifications", app.base);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            app.mp
                .post_notification(&url, "topic=chargebacks&id=1", "")
                .await
                .unwrap(),
        );
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert!(statuses[5..].contains(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_ours_is_json_with_a_stable_code_and_nothing_internal() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let cases = [
        (http.put(app.pos_url("pump-1")), 405, "method_not_allowed"),
        (
            http.get(format!("{}/mp/notifications", app.base)),
            405,
            "method_not_allowed",
        ),
        (http.get(format!("{}/admin", app.base)), 404, "not_found"),
        (
            http.post(format!(
                "{}/mp/notifications?topic=merchant_order&id=1",
                app.base
            ))
            .body(vec![b'x'; 17 * 1024]),
            413,
            "payload_too_large",
        ),
        (
            http.post(format!("{}/mp/notifications", app.base))
                .body("{oops"),
            400,
            "bad_notification",
        ),
    ];
    for (req, status, code) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{code}");
        assert_eq!(r.headers()["content-type"], "application/json", "{code}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], code);
        let text = v.to_string();
        assert!(
            !text.contains("src/") && !text.contains("panicked"),
            "{text}"
        );
    }
}

/// A whole run of the real binary, logging at `debug`, with every kind of
/// secret in use (and some wrong ones tried): none of them may appear in
/// the log or in the health answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_the_health_answers() {
    use crate::crash::Gate;
    use mpsim::{Simulator, SimulatorConfig};
    const TOKEN: &str = "APP_USR-canary-token-7731";
    const POLL_KEY: &str = "pollkey-canary-8842";
    const DEVICE_PW: &str = "devpw-canary-9953";
    const WRONG_PW: &str = "wrongpw-canary-1064";
    const WEBHOOK: &str = "whsec-canary-2175";
    const ADMIN: &str = "admin-canary-3286";
    const WRONG_ADMIN: &str = "wrongadmin-canary-4397";
    let admin_port = free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let mp = Simulator::start(SimulatorConfig {
        access_token: TOKEN.into(),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let mqtt = free_port();
    let env = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let gate = Gate::with(
        &mp,
        None,
        mqtt,
        "[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\ndevice_password_env = \"PUMP1_PW\"\n",
        vec![
            env(qrgate::config::ACCESS_TOKEN_ENV, TOKEN),
            env("PUMP1_PW", DEVICE_PW),
            env("QRGATE_HTTP__POLL_KEY", POLL_KEY),
            env("QRGATE_MQTT__ALLOW_ANONYMOUS", "false"),
            env("QRGATE_LOG__FILTER", "debug"),
            env(qrgate::config::WEBHOOK_SECRET_ENV, WEBHOOK),
            env(qrgate::config::ADMIN_TOKEN_ENV, ADMIN),
            env("QRGATE_ADMIN__LISTEN", &format!("127.0.0.1:{admin_port}")),
        ],
    );
    gate.ready().await;
    // The console: a wrong login, a wrong bearer, then the right one.
    let http = reqwest::Client::new();
    let login = http
        .post(format!("{admin}/login"))
        .form(&[("token", WRONG_ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 401);
    let api = |token: &'static str| {
        http.get(format!("{admin}/api/pos"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(api(WRONG_ADMIN).await.unwrap().status(), 401);
    assert_eq!(api(ADMIN).await.unwrap().status(), 200);
    let device = |pw: &str| {
        DeviceConfig::new("127.0.0.1", mqtt, "pump-1")
            .credentials("pump-1", pw)
            .without_presence()
    };
    assert!(Device::connect(device(WRONG_PW)).await.is_err());
    let pump = Device::connect(device(DEVICE_PW)).await.unwrap();
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    assert_eq!(
        reqwest::get(gate.pos_url("pump-1")).await.unwrap().status(),
        404
    );
    let bad_key = format!("{}?key=not-{POLL_KEY}", gate.pos_url("pump-1"));
    assert_eq!(reqwest::get(bad_key).await.unwrap().status(), 404);
    let order = match mp
        .scan(&format!("{}?key={POLL_KEY}", gate.pos_url("pump-1")))
        .await
        .unwrap()
    {
        Scan::Order(o) => o,
        other => panic!("{other:?}"),
    };
    // A forged signature, then the real payment.
    let forged = reqwest::Client::new()
        .post(format!(
            "{}/mp/notifications?type=payment&data.id=1",
            gate.base
        ))
        .header("x-signature", format!("ts=1,v1={}", hex::encode(WEBHOOK)))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    let mut answers = String::new();
    for path in ["/healthz", "/readyz"] {
        answers.push_str(
            &reqwest::get(format!("{}{path}", gate.base))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    let log = std::fs::read_to_string(gate.dir.path().join("run1.log")).unwrap();
    assert!(log.contains("sale paid"), "the run was logged");
    assert!(log.contains("\"level\":\"DEBUG\""), "logged at debug");
    let metrics = http
        .get(format!("{admin}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    answers.push_str(&metrics);
    for secret in [
        TOKEN,
        POLL_KEY,
        DEVICE_PW,
        WRONG_PW,
        WEBHOOK,
        ADMIN,
        WRONG_ADMIN,
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
        assert!(
            !answers.contains(secret),
            "{secret} leaked into a health answer"
        );
    }
}
