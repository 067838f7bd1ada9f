//! kill -9 of the real binary at each point of a sale's flow, then a restart
//! on the same store: every accepted sale is still there, polls answer the
//! same body, and every paid sale ends `paid` exactly once.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome, Scan, Simulator, SimulatorConfig};
use qrgate::orders::ExternalReference;
use qrgate::store::{SqliteStore, Store};
use qrgate_devices::{Device, DeviceConfig};

use crate::helpers::*;

/// qrgate as a child process on a fixed store, broker and HTTP address.
pub struct Gate {
    child: Option<Child>,
    config: std::path::PathBuf,
    pub dir: Arc<tempfile::TempDir>,
    pub base: String,
    /// The console's base URL.
    pub admin: String,
    runs: usize,
    /// Extra environment (secrets, overrides).
    env: Vec<(String, String)>,
}

impl Gate {
    /// `broker`: an external broker's port, or `None` for the embedded one
    /// (then on `embedded_port`).
    fn new(mp: &Simulator, broker: Option<u16>, embedded_port: u16) -> Gate {
        Gate::with(mp, broker, embedded_port, "", Vec::new())
    }

    /// `extra` is appended to the config file; `env` is added to the
    /// process's environment.
    pub fn with(
        mp: &Simulator,
        broker: Option<u16>,
        embedded_port: u16,
        extra: &str,
        env: Vec<(String, String)>,
    ) -> Gate {
        Gate::with_orders(mp, broker, embedded_port, "", extra, env)
    }

    /// `orders` is added to the `[orders]` table.
    pub fn with_orders(
        mp: &Simulator,
        broker: Option<u16>,
        embedded_port: u16,
        orders: &str,
        extra: &str,
        env: Vec<(String, String)>,
    ) -> Gate {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let admin_port = free_port();
        let broker = broker.map_or("embedded".to_owned(), |p| format!("mqtt://127.0.0.1:{p}"));
        let config = dir.path().join("qrgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[admin]
listen = "127.0.0.1:{admin_port}"
[http]
listen = "127.0.0.1:{port}"
public_url = "{base}"
[mercadopago]
api_base = "{api}"
timeout_ms = 5000
[mqtt]
broker = "{broker}"
embedded_listen = "127.0.0.1:{embedded_port}"
allow_anonymous = true
[orders]
reconcile_after_secs = 0
paid_republish_secs = 1
{orders}
[store]
path = "{db}"
[log]
format = "json"
filter = "info"
{extra}
"#,
                api = mp.base_url(),
                db = dir.path().join("qrgate.db").display()
            ),
        )
        .unwrap();
        let mut g = Gate {
            child: None,
            config,
            dir,
            base,
            admin: format!("http://127.0.0.1:{admin_port}"),
            runs: 0,
            env,
        };
        g.start();
        g
    }

    pub fn start(&mut self) {
        self.runs += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("run{}.log", self.runs))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qrgate"))
            .args(["--config", self.config.to_str().unwrap(), "serve"])
            .env(
                qrgate::config::ACCESS_TOKEN_ENV,
                SimulatorConfig::default().access_token,
            )
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub async fn ready(&self) {
        let http = reqwest::Client::new();
        wait_for("qrgate ready", || readyz(&http, &self.base)).await;
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    async fn restart(&mut self) {
        self.kill9();
        self.start();
        self.ready().await;
    }

    pub fn pos_url(&self, pos: &str) -> String {
        format!("{}/mp/pos/{pos}", self.base)
    }

    async fn poll(&self, pos: &str) -> (u16, String) {
        let r = reqwest::get(self.pos_url(pos)).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The stored events of a sale (read beside the running process).
    async fn timeline(&self, reference: &str) -> Vec<String> {
        let store = SqliteStore::open(&self.dir.path().join("qrgate.db"), false).unwrap();
        store
            .timeline(&ExternalReference::parse(reference).unwrap())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.1)
            .collect()
    }

    async fn count(&self, reference: &str, event: &str) -> usize {
        self.timeline(reference)
            .await
            .iter()
            .filter(|e| *e == event)
            .count()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Scene {
    _broker: Option<Mosquitto>,
    mp: Simulator,
    gate: Gate,
    pump: Device,
}

/// qrgate (the binary) on a Mosquitto, the simulator, and pump-1.
async fn scene() -> Option<Scene> {
    let broker = Mosquitto::start()?;
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let gate = Gate::new(&mp, Some(broker.port), 0);
    gate.ready().await;
    let pump =
        Device::connect(DeviceConfig::new("127.0.0.1", broker.port, "pump-1").without_presence())
            .await
            .unwrap();
    Some(Scene {
        _broker: Some(broker),
        mp,
        gate,
        pump,
    })
}

async fn scan(mp: &Simulator, url: &str) -> mpsim::ScannedOrder {
    match mp.scan(url).await.unwrap() {
        Scan::Order(o) => o,
        other => panic!("{other:?}"),
    }
}

/// The device ends with `paid` and the store with exactly one close.
async fn paid_exactly_once(s: &Scene, sale_id: &str, reference: &str) {
    state_of(&s.pump, sale_id, "paid").await;
    assert_eq!(
        s.gate.count(reference, "paid").await,
        1,
        "{:?}",
        s.gate.timeline(reference).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_a_sale_is_stored_it_polls_the_same_body_and_still_closes() {
    let Some(mut s) = scene().await else { return };
    s.pump
        .publish_sale("1", &fuel("12.345", "999.99"), None)
        .await
        .unwrap();
    let reference = state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let (_, before) = s.gate.poll("pump-1").await;
    s.gate.restart().await;
    assert_eq!(s.gate.poll("pump-1").await, (200, before));
    let order = scan(&s.mp, &s.gate.pos_url("pump-1")).await;
    s.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    paid_exactly_once(&s, "1", &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_right_after_the_device_published_the_sale_is_taken_once_after_restart() {
    let Some(mut s) = scene().await else { return };
    // The broker has it (PUBACK); qrgate may or may not have stored it.
    s.pump
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    s.gate.kill9();
    s.gate.start();
    s.gate.ready().await;
    let reference = state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    assert_eq!(s.gate.timeline(&reference).await, ["accepted"]);
    assert_eq!(s.gate.poll("pump-1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_sale_was_served_it_remembers_it_and_closes_once() {
    let Some(mut s) = scene().await else { return };
    s.pump
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = scan(&s.mp, &s.gate.pos_url("pump-1")).await;
    s.pump.wait_state(WAIT, |m| m.served).await.unwrap();
    let (_, before) = s.gate.poll("pump-1").await;
    s.gate.restart().await;
    assert_eq!(s.gate.poll("pump-1").await, (200, before));
    assert_eq!(s.gate.count(&reference, "served").await, 1);
    s.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    paid_exactly_once(&s, "1", &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_fetching_a_notified_merchant_order_the_payment_is_found_after_restart() {
    let Some(mut s) = scene().await else { return };
    s.pump
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = scan(&s.mp, &s.gate.pos_url("pump-1")).await;
    let path = format!("/merchant_orders/{}", order.merchant_order_id);
    s.mp.set_latency(&path, Duration::from_secs(30));
    s.mp.set_notify_mode(NotifyMode::Ipn);
    // The notification was answered 200: Mercado Pago will not resend it soon.
    s.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    wait_for("the fetch started", || async {
        s.mp.api_calls().iter().any(|c| c.path == path)
    })
    .await;
    s.gate.kill9();
    s.mp.set_latency(&path, Duration::ZERO);
    s.gate.start();
    s.gate.ready().await;
    // The notification waited in the inbox.
    paid_exactly_once(&s, "1", &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_fetch_and_close_the_sale_ends_paid_once_whatever_was_stored() {
    let Some(mut s) = scene().await else { return };
    s.pump
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = scan(&s.mp, &s.gate.pos_url("pump-1")).await;
    let path = format!("/merchant_orders/{}", order.merchant_order_id);
    s.mp.set_notify_mode(NotifyMode::Ipn);
    s.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    wait_for("the fetch answered", || async {
        s.mp.api_calls()
            .iter()
            .any(|c| c.path == path && c.status == 200)
    })
    .await;
    s.gate.kill9();
    s.gate.start();
    s.gate.ready().await;
    // Late duplicates after the restart change nothing.
    s.mp.notify_merchant_order(order.merchant_order_id)
        .await
        .unwrap();
    s.mp.notify_merchant_order(order.merchant_order_id)
        .await
        .unwrap();
    paid_exactly_once(&s, "1", &reference).await;
    s.pump.delivered("1", true, None).await.unwrap();
    wait_for("the delivery recorded", || async {
        s.gate.count(&reference, "delivered").await > 0
    })
    .await;
    assert_eq!(s.gate.count(&reference, "paid").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_qrgate_restarts_its_embedded_broker_and_devices_read_their_state_again() {
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let mqtt = free_port();
    let mut gate = Gate::new(&mp, None, mqtt);
    gate.ready().await;
    let pump = Device::connect(DeviceConfig::new("127.0.0.1", mqtt, "pump-1").without_presence())
        .await
        .unwrap();
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    gate.restart().await;
    // The embedded broker came back empty; qrgate republished the state
    // and the device's client reconnected and resubscribed.
    let back = Device::connect(
        DeviceConfig::new("127.0.0.1", mqtt, "pump-1")
            .client_id("pump-1-b")
            .without_presence(),
    )
    .await
    .unwrap();
    assert!(state_of(&back, "1", "pending").await.retained);
    let order = scan(&mp, &gate.pos_url("pump-1")).await;
    mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;
    assert_eq!(gate.count(&reference, "paid").await, 1);
}

/// qrgate (the binary) on a Mosquitto with `orders` in its `[orders]`, and
/// a pending sale of 100.00 on pump-1 scanned twice (two phones).
async fn two_scans(
    orders: &str,
) -> Option<(Scene, String, mpsim::ScannedOrder, mpsim::ScannedOrder)> {
    let broker = Mosquitto::start()?;
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let gate = Gate::with_orders(&mp, Some(broker.port), 0, orders, "", Vec::new());
    gate.ready().await;
    let pump =
        Device::connect(DeviceConfig::new("127.0.0.1", broker.port, "pump-1").without_presence())
            .await
            .unwrap();
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let first = scan(&mp, &gate.pos_url("pump-1")).await;
    let second = scan(&mp, &gate.pos_url("pump-1")).await;
    let s = Scene {
        _broker: Some(broker),
        mp,
        gate,
        pump,
    };
    Some((s, reference, first, second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_refund_sent_again_with_its_key_after_kill_9_is_made_once() {
    let Some((mut s, reference, order, _)) =
        two_scans("auto_refund = false\nrecheck_after_secs = []").await
    else {
        return;
    };
    s.mp.set_notify_mode(NotifyMode::Ipn);
    let payment =
        s.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
    paid_exactly_once(&s, "1", &reference).await;
    let url = format!("{}/api/sales/{reference}/refund", s.gate.admin);

    // Answered, then killed: the same key gets the same answer.
    let (status, first) =
        crate::admin::post(&url, None, Some("op-1"), r#"{"amount":"30.00"}"#).await;
    assert_eq!(status, 200, "{first}");
    s.gate.restart().await;
    let again = crate::admin::post(&url, None, Some("op-1"), r#"{"amount":"30.00"}"#).await;
    assert_eq!(again, (200, first));
    assert_eq!(s.mp.refunds().len(), 1, "{:?}", s.mp.refunds());

    // Killed while Mercado Pago's answer was on its way: the same key
    // finishes the same call, and Mercado Pago refunds once.
    let path = format!("/v1/payments/{payment}/refunds");
    cut_short(&mut s, &url, &path, "op-2", "20.00", 2).await;
    let (status, third) =
        crate::admin::post(&url, None, Some("op-2"), r#"{"amount":"20.00"}"#).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(third["amount"], "20.00");
    assert_eq!(third["refunded_total"], "50.00");
    let made = s.mp.refunds();
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(third["refund_id"], made[1].refund_id);

    // Cut short again, and the operator presses again (the console sends a
    // new key): the first request is finished before the second is planned.
    cut_short(&mut s, &url, &path, "op-3", "10.00", 3).await;
    let (status, fourth) =
        crate::admin::post(&url, None, Some("op-4"), r#"{"amount":"5.00"}"#).await;
    assert_eq!(status, 200, "{fourth}");
    assert_eq!(fourth["refunded_total"], "65.00", "10 finished, then 5");
    assert_eq!(s.mp.refunds().len(), 4, "{:?}", s.mp.refunds());
    let (status, third_again) =
        crate::admin::post(&url, None, Some("op-3"), r#"{"amount":"10.00"}"#).await;
    assert_eq!((status, &third_again["amount"]), (200, &"10.00".into()));
    assert_eq!(s.mp.refunds().len(), 4);
    s.pump
        .wait_state(WAIT, |m| {
            m.state == "refunded" && m.raw["refunded_total"] == "65.00"
        })
        .await
        .unwrap();
}

/// Sends an operator refund with `key` and kills qrgate once Mercado Pago
/// made it (the `n`th refund) but before its answer arrived; restarts.
async fn cut_short(s: &mut Scene, url: &str, path: &str, key: &str, amount: &str, n: usize) {
    s.mp.set_latency(path, Duration::from_secs(60));
    let cut = tokio::spawn({
        let (url, key, body) = (
            url.to_owned(),
            key.to_owned(),
            format!(r#"{{"amount":"{amount}"}}"#),
        );
        async move {
            let _ = reqwest::Client::new()
                .post(&url)
                .header("Idempotency-Key", key)
                .body(body)
                .send()
                .await;
        }
    });
    wait_for("Mercado Pago made the refund", || async {
        s.mp.refunds().len() == n
    })
    .await;
    s.gate.kill9();
    cut.abort();
    s.mp.set_latency(path, Duration::ZERO);
    s.gate.start();
    s.gate.ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_merchant_order_notified_while_its_fetch_stalls_is_refunded_after_kill_9() {
    let Some((mut s, reference, first, second)) =
        two_scans("auto_refund = true\nrecheck_after_secs = []").await
    else {
        return;
    };
    s.mp.set_notify_mode(NotifyMode::Ipn);
    s.mp.pay(first.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    paid_exactly_once(&s, "1", &reference).await;
    let path = format!("/merchant_orders/{}", second.merchant_order_id);
    s.mp.set_latency(&path, Duration::from_secs(30));
    let sent = s.mp.notifications_sent().len();
    // Answered 200: Mercado Pago will not send it again soon.
    let late =
        s.mp.pay(second.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
    wait_for("the fetch of the second merchant order", || async {
        s.mp.api_calls().iter().any(|c| c.path == path)
    })
    .await;
    s.gate.kill9();
    s.mp.set_latency(&path, Duration::ZERO);
    s.gate.start();
    s.gate.ready().await;
    let made = wait_for("the late payment refunded", || async {
        let r = s.mp.refunds();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].payment_id, late);
    assert_eq!(
        s.mp.notifications_sent().len(),
        sent + 1,
        "no second notification"
    );
    assert_eq!(s.gate.count(&reference, "paid").await, 1);
}
