//! The bridge between the PTS-2 simulator and a real Mosquitto, the test
//! playing qrgate's side of the device contract: it reads what the pumps'
//! POS publish and publishes their retained `state`, as qrgate does.
//!
//! Each test starts its own `mosquitto -p PORT`. Without mosquitto on PATH
//! the tests are skipped, unless `QRGATE_REQUIRE_MOSQUITTO=1`.

#[path = "../../../tests/common/wait.rs"]
mod wait;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qrgate_pts::auth::{Login, Scheme};
use qrgate_pts::bridge::Bridge;
use qrgate_pts::config::{BridgeConfig, Link, Mqtt, Pump};
use qrgate_pts::decide::Currency;
use qrgate_pts::sim::{SimConfig, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use wait::{wait_for, wait_for_blocking, wait_for_event};

struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    fn start() -> Option<Broker> {
        let installed = Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            assert_ne!(
                std::env::var("QRGATE_REQUIRE_MOSQUITTO").as_deref(),
                Ok("1"),
                "mosquitto is not on PATH and QRGATE_REQUIRE_MOSQUITTO=1"
            );
            eprintln!("skipped: mosquitto is not on PATH");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut child = Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        wait_for_blocking(format!("mosquitto on port {port}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto exited: {status}");
            }
            TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
        Some(Broker { child, port })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's qrgate: what the POS publish, and the retained state it says.
struct Qrgate {
    client: AsyncClient,
    heard: mpsc::UnboundedReceiver<(String, String, Value)>,
}

impl Qrgate {
    async fn connect(port: u16) -> Qrgate {
        let mut opts = MqttOptions::new("qrgate-test", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, heard) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        client
            .subscribe("qrgate/pos/+/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let parts: Vec<&str> = p.topic.split('/').collect();
                        if parts.len() != 4 || parts[3] == "state" {
                            continue;
                        }
                        let text = String::from_utf8_lossy(&p.payload).to_string();
                        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        let _ = tx.send((parts[2].to_owned(), parts[3].to_owned(), body));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        wait_for_event("qrgate's subscription", subscribed.recv()).await;
        Qrgate { client, heard }
    }

    /// The next message of `kind` from `pos`, skipping others.
    async fn next(&mut self, pos: &str, kind: &str) -> Value {
        let what = format!("{kind} from {pos}");
        wait_for_event(&what, async {
            loop {
                let (p, k, body) = self.heard.recv().await.expect("observer running");
                if p == pos && k == kind {
                    return body;
                }
            }
        })
        .await
    }

    /// The retained state qrgate tells `pos`.
    async fn tell(&self, pos: &str, state: Value) {
        self.client
            .publish(
                format!("qrgate/pos/{pos}/state"),
                QoS::AtLeastOnce,
                true,
                state.to_string(),
            )
            .await
            .unwrap();
    }
}

fn config(broker: &Broker, link: Link, payment_form: Option<u8>) -> BridgeConfig {
    BridgeConfig {
        link,
        controller_id: None,
        mqtt: Mqtt {
            host: "127.0.0.1".into(),
            port: broker.port,
            topic_prefix: "qrgate".into(),
        },
        currency: Currency::new("ARS"),
        payment_form,
        poll_interval: Duration::from_millis(200),
        state_dir: None,
        pumps: vec![
            Pump {
                pump: 1,
                pos_id: "pump-1".into(),
                mqtt_password: None,
                nozzles: Vec::new(),
            },
            Pump {
                pump: 2,
                pos_id: "pump-2".into(),
                mqtt_password: None,
                nozzles: Vec::new(),
            },
        ],
    }
}

fn http(sim: &Simulator, scheme: Scheme) -> Link {
    Link::Http {
        url: sim.url(),
        login: Login {
            user: "qrgate".into(),
            password: "secret".into(),
        },
        scheme,
        certificate_sha256: sim.fingerprint(),
    }
}

/// A broker, the simulator as `sim` sets it up, the test's qrgate and a
/// bridge calling the simulator; `None` when Mosquitto is not installed.
async fn station(
    sim: SimConfig,
    payment_form: Option<u8>,
) -> Option<(Broker, Simulator, Qrgate, Bridge)> {
    let broker = Broker::start()?;
    let scheme = sim.scheme;
    let sim = Simulator::start(sim).await.unwrap();
    let q = Qrgate::connect(broker.port).await;
    let bridge = Bridge::start(config(&broker, http(&sim, scheme), payment_form))
        .await
        .unwrap();
    Some((broker, sim, q, bridge))
}

/// A filling of `litres` on `pump`, until the POS's sale: its sale id.
async fn fill(sim: &Simulator, q: &mut Qrgate, pump: u16, litres: &str) -> (String, Value) {
    let pos = format!("pump-{pump}");
    sim.lift_nozzle(pump, 1).unwrap();
    sim.fill(pump, litres).unwrap();
    let progress = q.next(&pos, "progress").await;
    let sale_id = progress["sale_id"].as_str().unwrap().to_owned();
    sim.hang_up(pump).unwrap();
    let sale = q.next(&pos, "sale").await;
    assert_eq!(sale["sale_id"], sale_id.as_str());
    (sale_id, sale)
}

fn state(sale_id: &str, state: &str) -> Value {
    json!({"sale_id": sale_id, "external_reference": "pump-x", "state": state, "amount": "1.00", "currency": "ARS"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_filled_and_paid_by_qr_is_closed_on_the_controller_then_delivered() {
    let sim = SimConfig {
        tls: true,
        ..SimConfig::new()
    };
    let Some((_broker, sim, mut q, _bridge)) = station(sim, Some(4)).await else {
        return;
    };
    assert_eq!(q.next("pump-1", "status").await, "online");

    let (sale_id, sale) = fill(&sim, &mut q, 1, "32.10").await;
    assert!(
        sale_id.starts_with(&format!("{}-1-1-", sim.id())),
        "{sale_id}"
    );
    assert_eq!(
        sale["items"],
        json!([{"title": "Super 95", "quantity": "32.1", "unit_price": "798.00", "unit_measure": "litre"}])
    );
    assert_eq!(sale["amount"], "25615.80");

    q.tell("pump-1", state(&sale_id, "pending")).await;
    q.tell("pump-1", state(&sale_id, "paid")).await;
    let delivered = q.next("pump-1", "delivered").await;
    assert_eq!(delivered, json!({"sale_id": sale_id, "ok": true}));
    let t = sim.transaction(1, 1).unwrap();
    assert_eq!(t.closed_by.as_deref(), Some("qrgate"));
    assert!(t.paid, "the payment form recorded the payment");
    assert_eq!(sim.seen("PaymentCreateTransaction"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_closing_or_paying_a_transaction_cancels_its_sale_or_owes_its_payment_back() {
    let sim = SimConfig {
        scheme: Scheme::Basic,
        ..SimConfig::new()
    };
    let Some((_broker, sim, mut q, _bridge)) = station(sim, None).await else {
        return;
    };

    // Paid in cash, closed by the shop: the sale is withdrawn.
    let (first, _) = fill(&sim, &mut q, 1, "5").await;
    q.tell("pump-1", state(&first, "pending")).await;
    sim.pay_in_shop(1).unwrap();
    assert_eq!(q.next("pump-1", "cancel").await, json!({"sale_id": first}));

    // Paid in the shop, left open, then paid by QR too: nothing closed by
    // the bridge, and the payment is owed back.
    let (second, _) = fill(&sim, &mut q, 1, "2").await;
    assert_ne!(second, first);
    q.tell("pump-1", state(&second, "pending")).await;
    sim.mark_paid_in_shop(1).unwrap();
    q.tell("pump-1", state(&second, "paid")).await;
    let delivered = q.next("pump-1", "delivered").await;
    assert_eq!(delivered["ok"], false, "{delivered}");
    assert!(
        delivered["reason"]
            .as_str()
            .unwrap()
            .contains("already paid"),
        "{delivered}"
    );
    assert_eq!(sim.seen("PumpCloseTransaction"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_sale_locks_its_transaction_against_cash_and_an_offline_pump_says_so() {
    let Some((_broker, sim, mut q, _bridge)) = station(SimConfig::new(), None).await else {
        return;
    };
    let (sale_id, _) = fill(&sim, &mut q, 2, "1.5").await;
    q.tell(
        "pump-2",
        json!({"sale_id": sale_id, "state": "pending", "served": true}),
    )
    .await;
    wait_for("the transaction locked by the bridge's user", || async {
        sim.forecourt().locked_by(2).as_deref() == Some("qrgate")
    })
    .await;
    assert!(sim.pay_in_shop(2).is_err(), "the shop cannot close it now");

    sim.set_offline(2, true).unwrap();
    assert_eq!(q.next("pump-2", "status").await, "offline");
    // Paid while offline: closed once the pump is back.
    q.tell("pump-2", state(&sale_id, "paid")).await;
    sim.set_offline(2, false).unwrap();
    assert_eq!(q.next("pump-2", "status").await, "online");
    assert_eq!(
        q.next("pump-2", "delivered").await,
        json!({"sale_id": sale_id, "ok": true})
    );
    assert_eq!(sim.forecourt().locked_by(2), None);

    // The whole controller gone: every pump offline.
    sim.set_unreachable(true);
    assert_eq!(q.next("pump-1", "status").await, "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_keeps_the_sale_id_and_closes_only_once_paid() {
    let Some((broker, sim, mut q, bridge)) = station(SimConfig::new(), None).await else {
        return;
    };
    let (sale_id, _) = fill(&sim, &mut q, 1, "3").await;
    q.tell("pump-1", state(&sale_id, "pending")).await;
    bridge.stop();
    // Its POS went away: the last will says so.
    assert_eq!(q.next("pump-1", "status").await, "offline");

    let _bridge = Bridge::start(config(&broker, http(&sim, Scheme::Digest), None))
        .await
        .unwrap();
    assert_eq!(q.next("pump-1", "status").await, "online");
    assert_eq!(sim.seen("PumpCloseTransaction"), 0);
    q.tell("pump-1", state(&sale_id, "paid")).await;
    assert_eq!(
        q.next("pump-1", "delivered").await,
        json!({"sale_id": sale_id, "ok": true}),
        "the same sale id, adopted from qrgate's retained state"
    );
    assert_eq!(sim.seen("PumpCloseTransaction"), 1);
}

/// The bridge closed a paid transaction and stopped before it said
/// `delivered`: its close record says so after the restart, and the sale is
/// delivered, not owed back. The record is gone once `delivered` is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_recorded_before_a_restart_is_delivered_ok_and_then_forgotten() {
    let Some((broker, sim, mut q, bridge)) = station(SimConfig::new(), None).await else {
        return;
    };
    let (sale_id, _) = fill(&sim, &mut q, 1, "3").await;
    q.tell("pump-1", state(&sale_id, "pending")).await;
    bridge.stop();
    assert_eq!(q.next("pump-1", "status").await, "offline");
    // What the stopped bridge left: qrgate's retained `paid`, the
    // transaction no longer open on the pump, and its record of the close.
    q.tell("pump-1", state(&sale_id, "paid")).await;
    retained_at_the_broker(broker.port, "pump-1", "paid").await;
    sim.pay_in_shop(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir_all(&closed).unwrap();
    std::fs::write(closed.join(&sale_id), b"").unwrap();

    let _bridge = Bridge::start(BridgeConfig {
        state_dir: Some(dir.path().to_owned()),
        ..config(&broker, http(&sim, Scheme::Digest), None)
    })
    .await
    .unwrap();
    assert_eq!(q.next("pump-1", "status").await, "online");
    assert_eq!(
        q.next("pump-1", "delivered").await,
        json!({"sale_id": sale_id, "ok": true})
    );
    assert_eq!(sim.seen("PumpCloseTransaction"), 0, "nothing closed again");
    wait_until_empty(&closed).await;
}

/// Waits until the broker keeps `state` as the POS's retained state, as a
/// client subscribing now reads it (a publish returns once queued).
async fn retained_at_the_broker(port: u16, pos: &str, state: &str) {
    let mut opts = MqttOptions::new("qrgate-test-reader", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let topic = format!("qrgate/pos/{pos}/state");
    wait_for_event("the retained state at the broker", async {
        loop {
            let (client, mut events) = AsyncClient::new(opts.clone(), 16);
            client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        if v["state"] == state {
                            return;
                        }
                        // An older retained state: ask again.
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = client.disconnect().await;
        }
    })
    .await;
}

/// The record is removed right after `delivered` is published, which the
/// test has just read: waited for, the removal being the bridge's next step.
async fn wait_until_empty(dir: &std::path::Path) {
    for _ in 0..1000 {
        if std::fs::read_dir(dir).unwrap().next().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the close record is still there after delivered was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_remote_mode_the_controller_connects_to_the_bridge_and_its_uploads_are_acted_on_once() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    let mut q = Qrgate::connect(broker.port).await;
    let link = Link::Remote {
        listen: "127.0.0.1:0".parse().unwrap(),
        login: Some(Login {
            user: "qrgate".into(),
            password: "secret".into(),
        }),
    };
    let bridge = Bridge::start(config(&broker, link, None)).await.unwrap();
    sim.connect_remote(&format!(
        "ws://{}/ptsWebSocket",
        bridge.remote_addr().unwrap()
    ));

    let (paid, _) = fill(&sim, &mut q, 1, "4").await;
    q.tell("pump-1", state(&paid, "pending")).await;
    q.tell("pump-1", state(&paid, "paid")).await;
    assert_eq!(
        q.next("pump-1", "delivered").await,
        json!({"sale_id": paid, "ok": true})
    );

    // Closed in the shop: its upload and the idle pump say it once.
    let (cash, _) = fill(&sim, &mut q, 2, "1").await;
    q.tell("pump-2", state(&cash, "pending")).await;
    sim.pay_in_shop(2).unwrap();
    assert_eq!(q.next("pump-2", "cancel").await, json!({"sale_id": cash}));
    wait_for("every upload confirmed", || async {
        sim.forecourt().uploads.is_empty()
    })
    .await;
}
