//! `TestApp::spawn()`: the real app on port 0, a temp SQLite file, the
//! Mercado Pago simulator, and a real broker: one embedded rumqttd shared by
//! the whole test binary (it cannot be shut down, so each test gets its own
//! topic prefix and client id instead of its own broker), or a Mosquitto
//! started by the test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mpsim::{Scan, ScannedOrder, Simulator, SimulatorConfig};
use qrgate::app::App;
use qrgate::clock::Clock;
use qrgate::config::{Broker, Config, Secret};
use qrgate::orders::{ExternalReference, PosConfig, PosId, PosKind};
use qrgate_devices::{Device, DeviceConfig, Item, StateMessage};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

pub use crate::wait::{try_wait_for, wait_for, wait_for_blocking, wait_for_event, WAIT};

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SHARED_BROKER: OnceLock<u16> = OnceLock::new();

/// The test binary's embedded broker, started on first use.
pub fn shared_broker_port() -> u16 {
    *SHARED_BROKER.get_or_init(|| {
        qrgate::mqtt::broker::start(
            "127.0.0.1:0".parse().unwrap(),
            16 * 1024,
            qrgate::mqtt::broker::Access::Anonymous,
            None,
            None,
        )
        .expect("embedded broker starts")
        .addr
        .port()
    })
}

/// A Mosquitto started for one test, killed when dropped.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    args: Vec<String>,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// `None` (and a note on stderr) when Mosquitto is not installed, unless
    /// QRGATE_REQUIRE_MOSQUITTO=1 makes that a failure.
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::start_with(|_| None)
    }

    /// Starts Mosquitto with the config `conf(port)` returns (or `-p PORT`
    /// when it returns `None`).
    pub fn start_with(conf: impl FnOnce(u16) -> Option<std::path::PathBuf>) -> Option<Mosquitto> {
        if !crate::mosquitto_tools::installed(&["mosquitto"]) {
            return None;
        }
        let port = free_port();
        let args = match conf(port) {
            Some(path) => vec!["-c".to_owned(), path.display().to_string()],
            None => vec!["-p".to_owned(), port.to_string()],
        };
        let child = Mosquitto::spawn(&args, port);
        Some(Mosquitto { child, port, args })
    }

    fn spawn(args: &[String], port: u16) -> Child {
        let child = Command::new("mosquitto")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        wait_for_blocking(format!("mosquitto listening on {port}"), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
        child
    }

    /// Stops the broker as a service restart does (SIGTERM: a persistent
    /// one saves its sessions) and starts it again on the same port.
    pub fn restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.child = Mosquitto::spawn(&self.args, self.port);
    }

    /// Mosquitto with persistence, as deploy/mosquitto.conf runs it: sessions,
    /// queued messages and retained states survive its restarts.
    pub fn start_persistent(dir: &std::path::Path) -> Option<Mosquitto> {
        // Started as root, Mosquitto drops to its own user: let it write.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = dir.to_owned();
        Mosquitto::start_with(move |port| {
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
                    dir.display()
                ),
            )
            .unwrap();
            Some(conf)
        })
    }
}

/// A port the OS picked and released (for brokers that bind by number).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct TestApp {
    pub base: String,
    /// The console's base URL (`[admin] listen` on port 0).
    pub admin: Option<String>,
    pub mqtt_port: u16,
    pub prefix: String,
    pub mp: Simulator,
    pub config: Config,
    pub app_book: Arc<qrgate::book::Book>,
    /// The app's clock: a TTL or schedule test moves it forward instead of
    /// waiting (restarts keep it).
    pub clock: Clock,
    pub link: Arc<qrgate::link::LinkState>,
    stop: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
    pub dir: Arc<tempfile::TempDir>,
    http: reqwest::Client,
}

pub fn pos(id: &str, kind: PosKind) -> PosConfig {
    PosConfig {
        max_amount: Decimal::from(1_000_000),
        ..PosConfig::new(
            PosId::parse(id).unwrap(),
            kind,
            qrgate::money::Currency::Ars,
        )
    }
}

pub enum Where {
    SharedEmbedded,
    Port(u16),
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        TestApp::spawn_on(Where::SharedEmbedded, tweak).await
    }

    pub async fn spawn_on(broker: Where, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        TestApp::start(broker, mp, dir, None, None, Clock::adjustable(), tweak).await
    }

    async fn start(
        broker: Where,
        mp: Simulator,
        dir: Arc<tempfile::TempDir>,
        prefix: Option<String>,
        http: Option<std::net::SocketAddr>,
        clock: Clock,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = prefix.unwrap_or_else(|| format!("t{}x{n}", std::process::id()));
        let port = match broker {
            Where::SharedEmbedded => shared_broker_port(),
            Where::Port(p) => p,
        };
        // A restart keeps its HTTP address: public_url is part of the body.
        // Another process may hold the port a moment (an outgoing
        // connection given it as its local port): bound once it is free.
        let at = http.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let listener = wait_for(format!("{at} free to listen on"), || async move {
            TcpListener::bind(at).ok()
        })
        .await;
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut config = Config::defaults();
        config.http.listen = listener.local_addr().unwrap();
        config.http.public_url = base.clone();
        config.mercadopago.api_base = mp.base_url();
        config.mercadopago.access_token =
            Some(Secret::new(SimulatorConfig::default().access_token));
        config.mercadopago.collector_id = SimulatorConfig::default().collector_id;
        config.mqtt.broker = Broker::External {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        };
        config.mqtt.topic_prefix = prefix.clone();
        config.mqtt.client_id = format!("qrgate-{prefix}");
        config.store.path = dir.path().join("qrgate.db");
        config.store.fsync = false;
        config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        config.pos = vec![
            pos("pump-1", PosKind::Fuel),
            pos("vending-1", PosKind::Vending),
        ];
        tweak(&mut config);
        let prefix = config.mqtt.topic_prefix.clone();
        let app = App::build_timed(config.clone(), listener, clock.clone())
            .await
            .expect("app builds");
        let app_book = app.book();
        let admin = app.admin_addr().map(|a| format!("http://{a}"));
        let link = app.link();
        let stop = app.shutdown_token();
        let done = tokio::spawn(async move {
            app.run_until_stopped().await.unwrap();
        });
        let t = TestApp {
            base,
            admin,
            mqtt_port: port,
            prefix,
            mp,
            config,
            app_book,
            link,
            stop,
            done: Some(done),
            dir,
            http: reqwest::Client::new(),
            clock,
        };
        t.wait_ready().await;
        t
    }

    /// Stops this app gracefully and starts a new one on the same store,
    /// broker, prefix and simulator (a restart).
    pub async fn restart(mut self) -> TestApp {
        self.stop.cancel();
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
        let config = self.config.clone();
        TestApp::start(
            Where::Port(self.mqtt_port),
            self.mp.clone(),
            Arc::clone(&self.dir),
            Some(self.prefix.clone()),
            Some(config.http.listen),
            self.clock.clone(),
            move |c| {
                c.pos = config.pos;
                c.orders = config.orders;
            },
        )
        .await
    }

    /// Starts an app on an existing store, broker, prefix and simulator.
    pub async fn resume(
        port: u16,
        mp: Simulator,
        dir: Arc<tempfile::TempDir>,
        prefix: String,
        config: Config,
    ) -> TestApp {
        let clock = Clock::adjustable();
        TestApp::start(
            Where::Port(port),
            mp,
            dir,
            Some(prefix),
            None,
            clock,
            move |c| {
                c.pos = config.pos;
                c.orders = config.orders;
            },
        )
        .await
    }

    pub async fn wait_ready(&self) {
        wait_for("the app ready", || readyz(&self.http, &self.base)).await;
    }

    pub fn pos_url(&self, pos: &str) -> String {
        format!("{}/mp/pos/{pos}", self.base)
    }

    pub fn device_config(&self, pos: &str) -> DeviceConfig {
        DeviceConfig::new("127.0.0.1", self.mqtt_port, pos)
            .topic_prefix(self.prefix.clone())
            .client_id(format!(
                "{}-{pos}-{}",
                self.prefix,
                NEXT.fetch_add(1, Ordering::Relaxed)
            ))
    }

    /// A device that does not speak presence (treated as online).
    pub async fn device(&self, pos: &str) -> Device {
        Device::connect(self.device_config(pos).without_presence())
            .await
            .expect("device connects")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// One poll as Mercado Pago makes it: status and parsed body.
    pub async fn poll(&self, pos: &str) -> (u16, serde_json::Value, String) {
        let r = self.http.get(self.pos_url(pos)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, v, text)
    }

    /// The 400 error type of a poll, or "ok" for a 200.
    pub async fn poll_kind(&self, pos: &str) -> String {
        let (status, v, _) = self.poll(pos).await;
        if status == 200 {
            "ok".into()
        } else {
            v["error"]["type"].as_str().unwrap_or("?").to_owned()
        }
    }

    /// Polls until the answer is `kind` (state reaches polls through the
    /// store first, so a device's message shows after a moment).
    pub async fn wait_poll(&self, pos: &str, kind: &str) -> (u16, serde_json::Value, String) {
        wait_for(format!("a poll of {pos} answered {kind}"), || async {
            let (s, v, t) = self.poll(pos).await;
            let k = if s == 200 {
                "ok"
            } else {
                v["error"]["type"].as_str().unwrap_or("?")
            };
            if k == kind {
                Ok((s, v, t))
            } else {
                Err(format!("{s} {t}"))
            }
        })
        .await
    }

    /// A customer scans the QR: the simulator polls and opens a merchant order.
    pub async fn scan(&self, pos: &str) -> ScannedOrder {
        match self.mp.scan(&self.pos_url(pos)).await.unwrap() {
            Scan::Order(o) => o,
            Scan::Waiting { kind, .. } => panic!("scan of {pos} got a wait screen: {kind}"),
        }
    }

    /// The store's events of a sale, by name.
    pub async fn timeline(&self, reference: &str) -> Vec<String> {
        let r = ExternalReference::parse(reference).unwrap();
        self.app_book
            .store()
            .timeline(&r)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.1)
            .collect()
    }

    /// Waits until the store has recorded `event` for the sale.
    pub async fn wait_event(&self, reference: &str, event: &str) {
        wait_for(format!("sale {reference} recording {event}"), || async {
            let events = self.timeline(reference).await;
            if events.iter().any(|e| e == event) {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        })
        .await
    }

    /// Waits until the store has seen merchant order `id` (a notification
    /// was fully processed), and returns its recorded status.
    pub async fn wait_merchant_order_seen(&self, id: u64) -> String {
        wait_for(format!("merchant order {id} processed"), || async {
            self.app_book
                .store()
                .merchant_order(&qrgate::orders::MpId::Num(id))
                .await
                .unwrap()
                .map(|r| r.status)
        })
        .await
    }

    /// A sale accepted, scanned and paid on `device`: its reference, the
    /// merchant order scanned and the payment.
    pub async fn paid_sale(
        &self,
        device: &Device,
        sale_id: &str,
        items: &[Item],
    ) -> (String, ScannedOrder, u64) {
        device.publish_sale(sale_id, items, None).await.unwrap();
        let reference = state_of(device, sale_id, "pending")
            .await
            .external_reference
            .unwrap();
        let order = self.scan(device.pos_id()).await;
        let payment = self
            .mp
            .pay(order.merchant_order_id, mpsim::PaymentOutcome::Approved)
            .await
            .unwrap();
        state_of(device, sale_id, "paid").await;
        (reference, order, payment)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn fuel(litres: &str, price: &str) -> Vec<Item> {
    vec![Item::new("Super 95", litres, price).unit_measure("litre")]
}

pub fn snack(price: &str) -> Vec<Item> {
    vec![Item::new("Chips", "1", price)]
}

/// Waits for the device's `state` of `sale_id`: an event (the device's own
/// queue of the messages it heard), under the same guard as [`wait_for`].
pub async fn state_of(device: &Device, sale_id: &str, state: &str) -> StateMessage {
    device
        .wait_for(sale_id, state, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for a rejection on the device's state topic.
pub async fn rejection(device: &Device) -> StateMessage {
    device
        .wait_state(WAIT, |m| m.state == "rejected")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The app built from `Config::defaults()` as the first run has it (its own
/// embedded broker, on port 0 here), with the simulator and a temp store;
/// `tweak` changes the rest. Not waited on: readiness is the caller's to test.
pub struct BareApp {
    pub base: String,
    pub mp: Simulator,
    pub mqtt_port: u16,
    pub mqtt_tls_port: Option<u16>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl BareApp {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> BareApp {
        let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut config = Config::defaults();
        config.http.public_url = base.clone();
        config.mercadopago.api_base = mp.base_url();
        config.mercadopago.access_token =
            Some(Secret::new(SimulatorConfig::default().access_token));
        config.mqtt.embedded_listen = "127.0.0.1:0".parse().unwrap();
        config.store.path = dir.path().join("q.db");
        config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let app = App::build_on(config, listener).await.unwrap();
        let mqtt_port = app.mqtt_addr().port();
        let mqtt_tls_port = app.mqtt_tls_addr().map(|a| a.port());
        let stop = app.shutdown_token();
        let done = tokio::spawn(app.run_until_stopped());
        BareApp {
            base,
            mp,
            mqtt_port,
            mqtt_tls_port,
            stop,
            done,
            _dir: dir,
        }
    }

    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        wait_for("the app ready", || readyz(&http, &self.base)).await;
    }

    /// Stops gracefully; the app must end without error.
    pub async fn stop(self) {
        self.stop.cancel();
        self.done.await.unwrap().unwrap();
    }
}

/// A probe for [`wait_for`]: `/readyz` at `base` answers 200 (else what it
/// answered).
pub async fn readyz(http: &reqwest::Client, base: &str) -> Result<(), String> {
    match http.get(format!("{base}/readyz")).send().await {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("/readyz answered {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

impl TestApp {
    /// Like [`TestApp::restart`], keeping `[mercadopago]` too (the attended
    /// API and its order lifetimes).
    pub async fn restart_keeping_mercadopago(mut self) -> TestApp {
        self.stop.cancel();
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
        let config = self.config.clone();
        TestApp::start(
            Where::Port(self.mqtt_port),
            self.mp.clone(),
            Arc::clone(&self.dir),
            Some(self.prefix.clone()),
            Some(config.http.listen),
            self.clock.clone(),
            move |c| {
                c.pos = config.pos;
                c.orders = config.orders;
                c.mercadopago = config.mercadopago;
            },
        )
        .await
    }
}

/// What `raw_publish` sends as a payload.
pub enum RawPayload<'a> {
    Bytes(&'a [u8]),
    /// This many zero bytes, written a chunk at a time (never held whole).
    Zeros(usize),
}

/// Publishes one message as a bare MQTT 3.1.1 client, QoS 1: any bytes, any
/// size up to the MQTT maximum, retained or not, on any topic. `Ok` once the
/// broker acknowledged it, `Err` when it closed the connection instead (a
/// broker refusing an oversize packet).
pub async fn raw_publish(
    port: u16,
    topic: &str,
    payload: RawPayload<'_>,
    retain: bool,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn field(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    }
    fn header(first: u8, mut len: usize) -> Vec<u8> {
        let mut out = vec![first];
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            out.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                return out;
            }
        }
    }
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let id = format!(
            "raw-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
        field(&mut connect, id.as_bytes());
        let mut packet = header(0x10, connect.len());
        packet.extend_from_slice(&connect);
        s.write_all(&packet).await.map_err(|e| e.to_string())?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack)
            .await
            .map_err(|e| format!("no CONNACK: {e}"))?;
        if connack != [0x20, 2, 0, 0] {
            return Err(format!("refused: {connack:?}"));
        }
        let len = match payload {
            RawPayload::Bytes(b) => b.len(),
            RawPayload::Zeros(n) => n,
        };
        let mut head = Vec::new();
        field(&mut head, topic.as_bytes());
        head.extend_from_slice(&[0, 1]);
        let mut packet = header(0x32 | u8::from(retain), head.len() + len);
        packet.extend_from_slice(&head);
        let sent = async {
            s.write_all(&packet).await?;
            match payload {
                RawPayload::Bytes(b) => s.write_all(b).await?,
                RawPayload::Zeros(mut n) => {
                    let chunk = vec![0u8; 64 * 1024];
                    while n > 0 {
                        let k = n.min(chunk.len());
                        s.write_all(&chunk[..k]).await?;
                        n -= k;
                    }
                }
            }
            let mut puback = [0u8; 4];
            s.read_exact(&mut puback).await?;
            Ok::<_, std::io::Error>(puback)
        };
        match sent.await {
            Ok([0x40, 2, 0, 1]) => {
                let _ = s.write_all(&[0xE0, 0]).await;
                Ok(())
            }
            Ok(other) => Err(format!("not a PUBACK: {other:?}")),
            Err(e) => Err(format!("closed by the broker: {e}")),
        }
    };
    // A 256 MiB publish takes a while on a shared machine.
    tokio::time::timeout(WAIT * 8, talk)
        .await
        .unwrap_or_else(|_| Err("no answer from the broker".into()))
}

/// Waits until the store holds at least `n` refusals for `pos`; newest first.
pub async fn wait_rejections(
    app: &TestApp,
    pos: &str,
    n: usize,
) -> Vec<qrgate::store::RejectionRecord> {
    wait_for(format!("{n} refusals for {pos}"), || async {
        let stored = app.app_book.store().rejections(pos, 100).await.unwrap();
        if stored.len() >= n {
            Ok(stored)
        } else {
            Err(format!("{stored:?}"))
        }
    })
    .await
}

/// The operator's token the console tests configure (at least 16
/// characters, as qrgate requires).
pub const OPERATOR_TOKEN: &str = "op-s3cret-long-enough";

/// An HTTP client that does not follow redirects (a login's 303 is the
/// answer), its requests coming from `source` (any 127.x address reaches a
/// loopback listener on Linux, each a source of its own).
pub fn console_client(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(Some(source.parse().unwrap()))
        .build()
        .unwrap()
}

/// Logs in at the console at `base` with `token`: the session's `name=value`
/// cookie, and the whole `Set-Cookie` header.
pub async fn console_login(client: &reqwest::Client, base: &str, token: &str) -> (String, String) {
    let r = client
        .post(format!("{base}/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the login succeeds");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let cookie = set.split(';').next().unwrap().to_owned();
    (cookie, set)
}

/// The CSRF token the console's page carries for the session `cookie`.
pub async fn console_csrf(client: &reqwest::Client, base: &str, cookie: &str) -> String {
    let page = client
        .get(format!("{base}/"))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let marker = "name=\"csrf-token\" content=\"";
    let at = page.find(marker).expect("the page carries a CSRF token") + marker.len();
    page[at..].split('"').next().unwrap().to_owned()
}

/// Reads an open event stream until the server ends it.
pub async fn stream_ends(mut stream: reqwest::Response) {
    wait_for_event("the end of the event stream", async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
}

// ---- Hostile HTTP clients (hostile_http.rs) ---------------------------------

/// The socket address of a base URL such as `http://127.0.0.1:8080`.
pub fn addr_of(base: &str) -> std::net::SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// The log of a `Gate`'s first run, as the process wrote it so far.
pub fn gate_log(gate: &crate::crash::Gate) -> String {
    std::fs::read_to_string(gate.dir.path().join("run1.log")).unwrap()
}

/// Sends `bytes` as they are on a new connection from `from`, and returns
/// all that comes back until the server closes the connection (or `WAIT`
/// passes: then what came so far).
pub async fn raw_exchange_from(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    bytes: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    // The server may answer and close before taking everything (a head too
    // large): what it answered is what matters.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// [`raw_exchange_from`] 127.0.0.1.
pub async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    raw_exchange_from(addr, [127, 0, 0, 1].into(), bytes).await
}

/// How a slow client's connection ended.
#[derive(Debug)]
pub enum SlowEnd {
    /// qrgate closed it (end of stream or reset); what it answered first.
    Closed(String),
    /// Still open after twice `WAIT`.
    StillOpen,
}

/// A client from `from` that sends a notification's head announcing a 1000
/// byte body, then the body one byte every 200 ms, until qrgate closes the
/// connection. `started` hears once the head is out.
pub async fn slow_body_client(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    started: tokio::sync::mpsc::UnboundedSender<()>,
) -> SlowEnd {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let Ok(mut s) = socket.connect(addr).await else {
        let _ = started.send(());
        return SlowEnd::Closed(String::new());
    };
    let head = "POST /mp/notifications?topic=merchant_order&id=1 HTTP/1.1\r\nHost: qrgate\r\n\
                Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    let sent = s.write_all(head.as_bytes()).await;
    let _ = started.send(());
    if sent.is_err() {
        return SlowEnd::Closed(String::new());
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // The pace of the slow client (what is tested), and its hang guard: a
    // connection still open after it is the answer `StillOpen`.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let give_up = tokio::time::sleep(WAIT * 2);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            _ = &mut give_up => return SlowEnd::StillOpen,
            _ = tick.tick() => {
                if s.write_all(b" ").await.is_err() {
                    return SlowEnd::Closed(String::from_utf8_lossy(&answer).into_owned());
                }
            }
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return SlowEnd::Closed(String::from_utf8_lossy(&answer).into_owned()),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
        }
    }
}

/// `x-signature` as Mercado Pago makes it (docs/mercadopago.md, "Signatures"): the `id:`
/// part is left out when `data_id` is `None`.
pub fn mp_signature(data_id: Option<&str>, request_id: &str, ts: i64, secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut manifest = String::new();
    if let Some(id) = data_id {
        manifest.push_str(&format!("id:{id};"));
    }
    manifest.push_str(&format!("request-id:{request_id};ts:{ts};"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(manifest.as_bytes());
    format!("ts={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Status, headers (but `date`) and body of an answer, to compare answers
/// byte for byte.
pub async fn whole_answer(r: reqwest::Response) -> (u16, Vec<(String, String)>, String) {
    let status = r.status().as_u16();
    let mut headers: Vec<(String, String)> = r
        .headers()
        .iter()
        .filter(|(k, _)| *k != "date")
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    (status, headers, r.text().await.unwrap())
}

/// A Mosquitto as deploy/ configures stations: deploy/mosquitto.conf line by
/// line (one listener, on a free loopback port; the pid file and the log
/// file left out; persistence, the password file and the ACL in `dir`),
/// deploy/mosquitto.acl as it is, and `users` in a password file.
pub fn deployed_mosquitto(dir: &std::path::Path, users: &[(&str, &str)]) -> Option<Mosquitto> {
    use std::os::unix::fs::PermissionsExt;
    // Started as root, Mosquitto drops to its own user: it must read these
    // and write its persistence.
    let open = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(dir, 0o755);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    open(&data, 0o777);
    let passwd = dir.join("qrgate.passwd");
    password_file(&passwd, users);
    open(&passwd, 0o644);
    let acl = dir.join("qrgate.acl");
    std::fs::write(&acl, include_str!("../../deploy/mosquitto.acl")).unwrap();
    open(&acl, 0o644);
    let dir = dir.to_owned();
    Mosquitto::start_with(move |port| {
        let mut listener = false;
        let mut lines = Vec::new();
        for line in include_str!("../../deploy/mosquitto.conf").lines() {
            let key = line.split_whitespace().next().unwrap_or("");
            let line = match key {
                "pid_file" | "log_dest" => continue,
                "listener" if listener => continue,
                "listener" => {
                    listener = true;
                    format!("listener {port} 127.0.0.1")
                }
                "persistence_location" => format!("persistence_location {}/", data.display()),
                "password_file" => format!("password_file {}", passwd.display()),
                "acl_file" => format!("acl_file {}", acl.display()),
                _ => line.to_owned(),
            };
            lines.push(line);
        }
        for needed in [
            "listener ",
            "password_file ",
            "acl_file ",
            "allow_anonymous false",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(needed)),
                "deploy/mosquitto.conf has no `{needed}` line"
            );
        }
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, lines.join("\n") + "\n").unwrap();
        Some(conf)
    })
}

/// A Mosquitto password file with `users`: made by `mosquitto_passwd` when it
/// is installed, else written here in the salted SHA-512 form (`$6$`) that
/// Mosquitto 2.0 still reads.
pub fn password_file(path: &std::path::Path, users: &[(&str, &str)]) {
    let tool = Command::new("mosquitto_passwd")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if tool {
        std::fs::write(path, "").unwrap();
        for (user, pass) in users {
            let ok = Command::new("mosquitto_passwd")
                .args(["-b", path.to_str().unwrap(), user, pass])
                .status()
                .unwrap();
            assert!(ok.success(), "mosquitto_passwd failed for {user}");
        }
        return;
    }
    use sha2::{Digest, Sha512};
    let mut text = String::new();
    for (user, pass) in users {
        let salt: [u8; 12] = rand::random();
        let hash = Sha512::new()
            .chain_update(pass.as_bytes())
            .chain_update(salt)
            .finalize();
        text.push_str(&format!("{user}:$6${}${}\n", base64(&salt), base64(&hash)));
    }
    std::fs::write(path, text).unwrap();
}

/// Standard base64 with padding (no crate for a few bytes).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The console's `/metrics`: the sum of the series named `name` whose labels
/// contain `labels` (`""` for all).
pub async fn metric(admin: &str, name: &str, labels: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// [`book_on`](crate::book::book_on) the SQLite file at `path`.
pub async fn bare_book(
    path: &std::path::Path,
    pos: Vec<PosConfig>,
) -> (
    qrgate::book::Book,
    tokio::sync::mpsc::UnboundedReceiver<qrgate::book::Tell>,
) {
    let store = Arc::new(qrgate::store::SqliteStore::open(path, false).unwrap());
    crate::book::book_on(store, pos).await
}
