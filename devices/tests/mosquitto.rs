//! Runs the device side against a real mosquitto broker.
//!
//! Each test starts its own `mosquitto` on a free port. Without mosquitto on
//! PATH the tests are skipped, unless `QRGATE_REQUIRE_MOSQUITTO=1`.

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../tests/common/wait.rs"]
mod wait;

use qrgate_devices::{Device, DeviceConfig, DeviceError, Item, Pump, StateMessage, VendingMachine};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use wait::{try_wait_for_event, wait_for_blocking, wait_for_event, WAIT};

struct Broker {
    child: Child,
    port: u16,
    config: Option<PathBuf>,
}

impl Broker {
    /// `None` when mosquitto is not installed and not required.
    fn start() -> Option<Broker> {
        Self::start_with(None)
    }

    fn start_with(config_body: Option<&str>) -> Option<Broker> {
        let installed = match Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => panic!("cannot run mosquitto: {e}"),
        };
        if !installed {
            if std::env::var("QRGATE_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
                panic!("mosquitto is not on PATH and QRGATE_REQUIRE_MOSQUITTO=1");
            }
            eprintln!("skipped: mosquitto is not on PATH");
            return None;
        }
        let port = free_port();
        let config = config_body.map(|body| {
            let path = std::env::temp_dir().join(format!(
                "qrgate-devices-mosquitto-{}-{port}.conf",
                std::process::id()
            ));
            std::fs::write(&path, format!("listener {port} 127.0.0.1\n{body}\n"))
                .expect("write mosquitto config");
            path
        });
        let child = spawn_mosquitto(port, config.as_ref());
        let mut broker = Broker {
            child,
            port,
            config,
        };
        broker.wait_ready();
        Some(broker)
    }

    /// Kills the broker and starts a fresh one (no persistence) on the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_mosquitto(self.port, self.config.as_ref());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let (port, child) = (self.port, &mut self.child);
        wait_for_blocking(format!("mosquitto listening on port {port}"), || {
            if let Some(status) = child.try_wait().expect("poll mosquitto") {
                panic!("mosquitto on port {port} exited early: {status}");
            }
            TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
    }

    fn config(&self, pos_id: &str) -> DeviceConfig {
        DeviceConfig::new("127.0.0.1", self.port, pos_id)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.config {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn spawn_mosquitto(port: u16, config: Option<&PathBuf>) -> Child {
    let mut cmd = Command::new("mosquitto");
    match config {
        Some(path) => cmd.arg("-c").arg(path),
        None => cmd.arg("-p").arg(port.to_string()),
    };
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// A plain MQTT client watching what devices publish, independent of the
/// crate under test.
struct Observer {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<ObservedEvent>,
    buffered: VecDeque<Msg>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
enum ObservedEvent {
    SubAck,
    Msg(Msg),
}

#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

impl Observer {
    fn connect(port: u16, id: &str) -> Observer {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ObservedEvent::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => ObservedEvent::Msg(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(_) => continue,
                    Err(_) => {
                        // The pace of reconnecting (rumqttc reconnects on the
                        // next poll): nothing to wait on.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        Observer {
            client,
            events,
            buffered: VecDeque::new(),
            task,
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let (events, buffered) = (&mut self.events, &mut self.buffered);
        wait_for_event(format!("the SUBACK for {filter}"), async {
            loop {
                match events.recv().await {
                    Some(ObservedEvent::SubAck) => return,
                    Some(ObservedEvent::Msg(m)) => buffered.push_back(m),
                    None => panic!("observer event loop ended"),
                }
            }
        })
        .await;
    }

    async fn wait_msg(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        let mut seen = Vec::new();
        while let Some(m) = self.buffered.pop_front() {
            if pred(&m) {
                return m;
            }
            seen.push(format!("{} {}", m.topic, m.text()));
        }
        let events = &mut self.events;
        let got = try_wait_for_event(async {
            loop {
                match events.recv().await {
                    Some(ObservedEvent::Msg(m)) => {
                        if pred(&m) {
                            return m;
                        }
                        seen.push(format!("{} {}", m.topic, m.text()));
                    }
                    Some(ObservedEvent::SubAck) => {}
                    None => panic!("observer event loop ended"),
                }
            }
        })
        .await;
        got.unwrap_or_else(|| panic!("observer never saw {what}; saw {seen:?}"))
    }

    async fn wait_on(&mut self, topic: &str) -> Msg {
        self.wait_msg(topic, |m| m.topic == topic).await
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_delivery_and_last_will() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let pump = Device::connect(broker.config("pump-1")).await.unwrap();
    assert_eq!(pump.pos_id(), "pump-1");
    assert_eq!(pump.topic("state"), "qrgate/pos/pump-1/state");

    let mut watcher = Observer::connect(broker.port, "watcher");
    watcher.subscribe("qrgate/pos/pump-1/status").await;
    let online = watcher.wait_on("qrgate/pos/pump-1/status").await;
    assert_eq!(online.text(), "online");
    assert!(online.retain, "online must be retained");

    // A second device plays qrgate and publishes a retained state.
    let gate = Device::connect(broker.config("qrgate-sim").without_presence())
        .await
        .unwrap();
    gate.publish_to(
        "qrgate/pos/pump-1/state",
        r#"{"sale_id":"000042","external_reference":"pump-1-x","state":"pending","amount":25615.80,"currency":"ARS"}"#,
        true,
    )
    .await
    .unwrap();
    let pending = pump
        .wait_state(WAIT, |m| m.is_for("000042") && m.state == "pending")
        .await
        .unwrap();
    assert_eq!(pending.amount.as_deref(), Some("25615.80"));
    assert_eq!(pending.currency.as_deref(), Some("ARS"));
    assert!(!pending.retained, "live delivery carries no retain flag");

    // Garbage on the state topic is skipped, not fatal.
    gate.publish_to("qrgate/pos/pump-1/state", "not json", false)
        .await
        .unwrap();
    gate.publish_to(
        "qrgate/pos/pump-1/state",
        r#"{"state":"rejected","reason":"busy"}"#,
        false,
    )
    .await
    .unwrap();
    let rejected = pump.next_state(WAIT).await.unwrap();
    assert_eq!(rejected.state, "rejected");
    assert_eq!(rejected.sale_id, None);
    assert_eq!(rejected.reason.as_deref(), Some("busy"));

    // A timeout names what was seen instead.
    gate.publish_to(
        "qrgate/pos/pump-1/state",
        r#"{"sale_id":"000042","state":"pending","served":true}"#,
        false,
    )
    .await
    .unwrap();
    match pump
        .wait_for("000042", "paid", Duration::from_millis(500))
        .await
    {
        Err(DeviceError::Timeout(text)) => {
            assert!(text.contains("paid"), "{text}");
            assert!(text.contains("served"), "{text}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(pump.drain().is_empty());

    // A device connecting later finds the retained state waiting.
    gate.publish_to(
        "qrgate/pos/vm-1/state",
        r#"{"sale_id":"s-1","state":"paid","amount":"1500.00","payment_id":123456789,"merchant_order":987}"#,
        true,
    )
    .await
    .unwrap();
    let vm = Device::connect(broker.config("vm-1")).await.unwrap();
    let paid = vm.next_state(WAIT).await.unwrap();
    assert!(paid.retained);
    assert_eq!(paid.state, "paid");
    assert_eq!(paid.payment_id, Some(123456789));
    assert_eq!(paid.merchant_order, Some(987));

    // Crashing fires the last will: `offline`, retained.
    pump.crash();
    let offline = watcher.wait_msg("offline", |m| m.text() == "offline").await;
    assert_eq!(offline.topic, "qrgate/pos/pump-1/status");
    let mut late = Observer::connect(broker.port, "late-watcher");
    late.subscribe("qrgate/pos/pump-1/status").await;
    let status = late.wait_on("qrgate/pos/pump-1/status").await;
    assert_eq!(status.text(), "offline");
    assert!(status.retain);

    // A clean disconnect announces `offline` itself.
    vm.disconnect().await.unwrap();
    let mut vm_watcher = Observer::connect(broker.port, "vm-watcher");
    vm_watcher.subscribe("qrgate/pos/vm-1/status").await;
    assert_eq!(
        vm_watcher.wait_on("qrgate/pos/vm-1/status").await.text(),
        "offline"
    );
    gate.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulators_speak_the_contract() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let mut watcher = Observer::connect(broker.port, "watcher");
    watcher.subscribe("qrgate/pos/+/+").await;
    let gate = Device::connect(broker.config("qrgate-sim").without_presence())
        .await
        .unwrap();

    let pump = Pump::connect(broker.config("pump-1")).await.unwrap();
    pump.start_fuelling("000042").await.unwrap();
    let progress = watcher.wait_on("qrgate/pos/pump-1/progress").await;
    assert_eq!(progress.json(), json!({"sale_id": "000042"}));
    assert!(!progress.retain);

    pump.finish_fuelling("000042", "Super 95", "32.10", "798.00")
        .await
        .unwrap();
    let sale = watcher.wait_on("qrgate/pos/pump-1/sale").await;
    assert_eq!(
        sale.json(),
        json!({"sale_id": "000042", "items": [
            {"title": "Super 95", "quantity": "32.10", "unit_price": "798.00", "unit_measure": "litre"}
        ]})
    );

    gate.publish_to(
        "qrgate/pos/pump-1/state",
        r#"{"sale_id":"000042","state":"paid","amount":"25615.80","currency":"ARS","payment_id":555,"merchant_order":777}"#,
        true,
    )
    .await
    .unwrap();
    let paid = pump.wait_paid_and_release("000042", WAIT).await.unwrap();
    assert_eq!(paid.payment_id, Some(555));
    let delivered = watcher.wait_on("qrgate/pos/pump-1/delivered").await;
    assert_eq!(delivered.json(), json!({"sale_id": "000042", "ok": true}));

    let vm = VendingMachine::connect(broker.config("vm-1"))
        .await
        .unwrap();
    let items = [Item::new("Water 500 ml", "2", "750.00").sku("W500")];
    vm.select_with_amount("v-1", &items, "1500.00")
        .await
        .unwrap();
    let sale = watcher.wait_on("qrgate/pos/vm-1/sale").await;
    assert_eq!(
        sale.json(),
        json!({"sale_id": "v-1", "items": [
            {"title": "Water 500 ml", "quantity": "2", "unit_price": "750.00", "sku": "W500"}
        ], "amount": "1500.00"})
    );
    vm.set_jam(true);
    gate.publish_to(
        "qrgate/pos/vm-1/state",
        r#"{"sale_id":"v-1","state":"paid","amount":"1500.00"}"#,
        true,
    )
    .await
    .unwrap();
    vm.wait_paid_and_dispense("v-1", WAIT).await.unwrap();
    let delivered = watcher.wait_on("qrgate/pos/vm-1/delivered").await;
    assert_eq!(
        delivered.json(),
        json!({"sale_id": "v-1", "ok": false, "reason": "dispenser jammed"})
    );

    vm.select("v-2", &items).await.unwrap();
    let sale = watcher.wait_on("qrgate/pos/vm-1/sale").await;
    assert!(sale.json().get("amount").is_none());
    pump.device().cancel("000043").await.unwrap();
    let cancel = watcher.wait_on("qrgate/pos/pump-1/cancel").await;
    assert_eq!(cancel.json(), json!({"sale_id": "000043"}));
    pump.device().publish_raw("sale", "{oops").await.unwrap();
    assert_eq!(
        watcher.wait_on("qrgate/pos/pump-1/sale").await.text(),
        "{oops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_restart() {
    let Some(mut broker) = Broker::start() else {
        return;
    };
    let pump = Device::connect(broker.config("pump-1")).await.unwrap();
    let gate = Device::connect(broker.config("qrgate-sim").without_presence())
        .await
        .unwrap();

    broker.restart();

    // Published while the device is still reconnecting: must wait, not fail.
    pump.progress("000050").await.unwrap();
    gate.publish_to(
        "qrgate/pos/pump-1/state",
        r#"{"sale_id":"000050","state":"in_process"}"#,
        true,
    )
    .await
    .unwrap();
    let state: StateMessage = pump.wait_for("000050", "in_process", WAIT).await.unwrap();
    assert_eq!(state.state, "in_process");

    // The fresh broker lost the retained `online`; the device re-announces it.
    let mut watcher = Observer::connect(broker.port, "watcher");
    watcher.subscribe("qrgate/pos/pump-1/status").await;
    let status = watcher
        .wait_msg("online", |m| m.topic == "qrgate/pos/pump-1/status")
        .await;
    assert_eq!(status.text(), "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_a_connect_error() {
    let Some(broker) = Broker::start_with(Some("allow_anonymous false")) else {
        return;
    };
    let started = Instant::now();
    let result = Device::connect(broker.config("pump-1").credentials("nobody", "wrong")).await;
    match result {
        Err(DeviceError::Connect(reason)) => assert!(reason.contains("refused"), "{reason}"),
        other => panic!("expected a refused connection, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refusal should fail fast"
    );
}
