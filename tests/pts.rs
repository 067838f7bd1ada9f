//! The whole loop of a station whose pumps a PTS-2 controller drives: the
//! PTS-2 simulator → the `qrgate-pts` bridge → the real `qrgate` binary (its
//! embedded broker) → the Mercado Pago simulator: a pump fills, its sale is
//! pending, a customer scans and pays, qrgate says paid, the bridge closes
//! the transaction on the controller and qrgate records the delivery.
#![cfg(feature = "demo")]

use std::process::Stdio;
use std::time::Duration;

use qrgate_pts::auth::{Login, Scheme};
use qrgate_pts::bridge::Bridge;
use qrgate_pts::config::{BridgeConfig, Link, Mqtt, Pump};
use qrgate_pts::decide::Currency;
use qrgate_pts::sim::{SimConfig, Simulator};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[path = "common/wait.rs"]
mod wait;

use wait::{wait_for, wait_for_event};

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

/// `qrgate serve` on a configuration of its own, killed when dropped.
struct Qrgate {
    _child: Child,
    http: String,
    admin: String,
    mqtt: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Qrgate {
    /// qrgate's HTTP port is in every notification_url, so it is picked
    /// before qrgate starts; a port taken meanwhile starts it over.
    async fn start(mp: &mpsim::Simulator) -> Qrgate {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("qrgate.toml");
            std::fs::write(
                &config,
                format!(
                    r#"
[admin]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[mercadopago]
api_base = "{api}"
[mqtt]
embedded_listen = "127.0.0.1:0"
client_id = "qrgate-pts-loop"
allow_anonymous = true
[store]
path = "{db}"
[log]
format = "json"
[orders]
reconcile_after_secs = 3600
[[pos]]
id = "pump-1"
kind = "fuel"
ttl_secs = 0
"#,
                    api = mp.base_url(),
                    db = dir.path().join("q.db").display()
                ),
            )
            .unwrap();
            let mut child = Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .arg("serve")
                .env_remove("QRGATE_CONFIG")
                .env_remove("RUST_LOG")
                .env("QRGATE_MP_ACCESS_TOKEN", "TEST-sim-token")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let (mut http, mut admin, mut mqtt) = (None, None, None);
            let mut stopped = false;
            while http.is_none() || admin.is_none() || mqtt.is_none() {
                let Some(text) = wait_for_event("qrgate's listening lines", lines.next_line())
                    .await
                    .unwrap()
                else {
                    stopped = true;
                    break;
                };
                let line: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let listen = line["listen"].as_str().map(str::to_owned);
                match line["message"].as_str() {
                    Some("HTTP listening") => http = listen,
                    Some("console and admin API listening") => admin = listen,
                    Some("embedded MQTT broker listening") => mqtt = listen,
                    _ => {}
                }
            }
            if stopped {
                continue;
            }
            // The rest of the log is read so that qrgate never blocks on it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let q = Qrgate {
                _child: child,
                http: format!("http://{}", http.unwrap()),
                admin: format!("http://{}", admin.unwrap()),
                mqtt: mqtt.unwrap().parse().unwrap(),
                _dir: dir,
            };
            let ready = format!("{}/readyz", q.http);
            wait_for("qrgate ready", || async {
                reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
            })
            .await;
            return q;
        }
        panic!("qrgate did not start on five ports in a row");
    }

    async fn timeline_has(&self, reference: &str, event: &str) -> bool {
        let url = format!("{}/api/sales/{reference}", self.admin);
        let Ok(response) = reqwest::get(&url).await else {
            return false;
        };
        let sale: Value = response.json().await.unwrap_or(Value::Null);
        sale["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["event"] == event))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_on_the_pts2_is_paid_by_qr_and_its_transaction_closed_on_the_controller() {
    let mp = mpsim::Simulator::start(mpsim::SimulatorConfig::default())
        .await
        .unwrap();
    let qrgate = Qrgate::start(&mp).await;
    let pts = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::new()
    })
    .await
    .unwrap();
    let _bridge = Bridge::start(BridgeConfig {
        link: Link::Http {
            url: pts.url(),
            login: Login {
                user: "qrgate".into(),
                password: "secret".into(),
            },
            scheme: Scheme::Digest,
            certificate_sha256: pts.fingerprint(),
        },
        controller_id: None,
        mqtt: Mqtt {
            host: qrgate.mqtt.ip().to_string(),
            port: qrgate.mqtt.port(),
            topic_prefix: "qrgate".into(),
        },
        currency: Currency::new("ARS"),
        payment_form: Some(4),
        poll_interval: Duration::from_millis(250),
        pumps: vec![Pump {
            pump: 1,
            pos_id: "pump-1".into(),
            mqtt_password: None,
            nozzles: Vec::new(),
        }],
    })
    .await
    .unwrap();

    // The customer fills 32.10 litres of Super 95 at 798.00.
    pts.lift_nozzle(1, 1).unwrap();
    pts.fill(1, "32.10").unwrap();
    pts.hang_up(1).unwrap();

    // The sale is pending at qrgate: a scan gets its order.
    let pos_url = format!("{}/mp/pos/pump-1", qrgate.http);
    let order = wait_for("the pump's order on a scan", || async {
        match mp.scan(&pos_url).await {
            Ok(mpsim::Scan::Order(order)) => Ok(order),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(order.total_amount.to_string(), "25615.80");
    assert_eq!(pts.seen("PumpCloseTransaction"), 0, "nothing closed unpaid");

    // Paid: qrgate says so, the bridge closes the transaction on the
    // controller (its payment recorded) and qrgate hears it delivered.
    mp.pay(order.merchant_order_id, mpsim::PaymentOutcome::Approved)
        .await
        .unwrap();
    let closed = wait_for("the transaction closed on the controller", || async {
        pts.transaction(1, 1)
            .filter(|t| t.closed_by.is_some())
            .ok_or("still open")
    })
    .await;
    assert_eq!(closed.closed_by.as_deref(), Some("qrgate"));
    assert!(closed.paid);
    assert_eq!(pts.seen("PaymentCreateTransaction"), 1);
    wait_for("delivered in the sale's timeline", || {
        qrgate.timeline_has(&order.external_reference, "delivered")
    })
    .await;
}
