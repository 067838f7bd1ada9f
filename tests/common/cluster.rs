//! Several `qrgate serve` processes of the real binary sharing one
//! PostgreSQL database, for the failover tests (tests/failover.rs): a
//! fresh database per test, a Mosquitto started for the test, and the
//! Mercado Pago simulator in this process. Each instance is named by its
//! MQTT client id (its persistent session, and its name on the store) and
//! runs until the test kills it (`kill -9`), pauses it (SIGSTOP) or drops
//! the cluster.
//!
//! Every process's log goes to one buffer, each line marked with its
//! process, in the order the lines arrived; a failing test prints it
//! (`QRGATE_CLUSTER_LOG=1`: every test), since a failure across processes
//! cannot be read from one of them.
//!
//! Processes are spawned from the test's own thread and die with it
//! (`PR_SET_PDEATHSIG`), so a test binary killed halfway leaves no
//! qrgate or Mosquitto behind. Mosquitto missing is a skip, said on
//! stderr, unless QRGATE_REQUIRE_MOSQUITTO=1.

#![allow(dead_code)] // each test uses its own part of it

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpsim::{NotifyMode, Scan, ScannedOrder, Simulator, SimulatorConfig};
use qrgate::store::postgres::PgTarget;
use qrgate_devices::{Device, DeviceConfig};
use tokio::task::AbortHandle;

use crate::wait::{wait_for, wait_for_blocking, wait_for_event};

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

static NEXT_DEVICE: AtomicUsize = AtomicUsize::new(0);

/// Every process's log, one line each, in arrival order.
#[derive(Clone)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    since: Instant,
}

impl Log {
    fn new() -> Log {
        Log {
            lines: Arc::default(),
            since: Instant::now(),
        }
    }

    /// A line of `who`'s: qrgate's JSON shown as `LEVEL message key=value`.
    fn push(&self, who: &str, line: &str) {
        let at = self.since.elapsed().as_secs_f64();
        let shown = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(mut v)) => {
                let field = |v: &mut serde_json::Map<_, _>, k: &str| match v.remove(k) {
                    Some(serde_json::Value::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let level = field(&mut v, "level");
                let message = field(&mut v, "message");
                v.remove("timestamp");
                v.remove("spans");
                let rest: Vec<String> = v.iter().map(|(k, x)| format!("{k}={x}")).collect();
                format!("{level:<5} {message} {}", rest.join(" "))
            }
            _ => line.to_owned(),
        };
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.push(format!("{at:8.3}s {who:<9} {shown}"));
    }

    /// What the test did, in the same timeline.
    pub fn note(&self, what: &str) {
        self.push("test", what);
    }

    /// Whether `who`'s log has a line containing each of `parts`.
    pub fn has(&self, who: &str, parts: &[&str]) -> bool {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().any(|l| {
            l.split_whitespace().nth(1) == Some(who) && parts.iter().all(|p| l.contains(p))
        })
    }

    fn dump(&self) {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("---- the cluster's log ({} lines) ----", lines.len());
        for l in lines.iter() {
            eprintln!("{l}");
        }
        eprintln!("---- end of the cluster's log ----");
    }
}

/// Reads a child's output into the log, line by line, off the test's
/// thread; each line also goes to `seen` while anyone listens.
fn read_into(
    log: &Log,
    who: &str,
    out: impl Read + Send + 'static,
    seen: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) {
    let (log, who) = (log.clone(), who.to_owned());
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            log.push(&who, &line);
            if let Some(seen) = &seen {
                let _ = seen.send(line);
            }
        }
    });
}

/// The child dies when the thread that spawned it ends (the test's own).
fn dies_with_this_thread(cmd: &mut Command) {
    // SAFETY: only an async-signal-safe call between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A port the OS picked and released, for Mosquitto, which binds by number.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto of the test's own, without persistence: a restart forgets
/// every session and subscription, as a broker replaced by another does.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    log: Log,
}

impl Mosquitto {
    /// `None` (said on stderr) when Mosquitto is not installed, unless
    /// QRGATE_REQUIRE_MOSQUITTO=1 makes that a failure.
    fn start(log: &Log) -> Option<Mosquitto> {
        if !crate::mosquitto::installed(&["mosquitto"]) {
            return None;
        }
        let port = free_port();
        let child = Mosquitto::spawn(log, port);
        Some(Mosquitto {
            port,
            child,
            log: log.clone(),
        })
    }

    fn spawn(log: &Log, port: u16) -> Child {
        let mut cmd = Command::new("mosquitto");
        cmd.args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        dies_with_this_thread(&mut cmd);
        let mut child = cmd.spawn().expect("mosquitto starts");
        read_into(log, "mosquitto", child.stderr.take().unwrap(), None);
        wait_for_blocking(format!("mosquitto listening on {port}"), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
        child
    }

    /// Stops the broker as a service restart does (SIGTERM) and starts it
    /// again on the same port: every client's connection drops.
    pub fn restart(&mut self) {
        self.log.note("mosquitto restarting");
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.child = Mosquitto::spawn(&self.log, self.port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        end(&mut self.child);
    }
}

/// Kills a child of the test's (SIGKILL: a paused one too) and reaps it.
fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP relay between one instance and the broker or the store, which
/// the test cuts (the instance loses it while everything else keeps it),
/// slows (the instance hears the broker late) or freezes (nothing passes
/// either way, as in a network partition, until it thaws).
pub struct Relay {
    pub port: u16,
    open: Arc<AtomicBool>,
    gate: Arc<Gate>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    pub async fn start(to: u16) -> Relay {
        Relay::slowed(to, Duration::ZERO).await
    }

    /// A relay whose bytes from the other end arrive `late`.
    pub async fn slowed(to: u16, late: Duration) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let gate = Arc::new(Gate::default());
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (open, gate, links) = (Arc::clone(&open), Arc::clone(&gate), Arc::clone(&links));
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    // Cut: taken and closed at once, as a peer that is gone.
                    if !open.load(Ordering::Acquire) {
                        continue;
                    }
                    let gate = Arc::clone(&gate);
                    let link = tokio::spawn(async move {
                        if let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                            relay(inbound, out, late, &gate).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            })
            .abort_handle()
        };
        Relay {
            port,
            open,
            gate,
            links,
            accept,
        }
    }

    /// Closes every connection through the relay and every one after.
    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Freezes the relay when the instance next sends `bytes` (a statement
    /// of its own, say), before they pass.
    pub fn freeze_before(&self, bytes: &[u8]) {
        *self.gate.before.lock().unwrap() = Some(bytes.to_vec());
    }

    pub fn frozen(&self) -> bool {
        self.gate.frozen.load(Ordering::Acquire)
    }

    /// What waits at the relay passes, and everything after.
    pub fn thaw(&self) {
        self.gate.frozen.store(false, Ordering::Release);
        self.gate.thawed.notify_waiters();
    }
}

/// Where a frozen relay holds its bytes.
#[derive(Default)]
struct Gate {
    frozen: AtomicBool,
    /// What freezes the relay when the instance sends it.
    before: Mutex<Option<Vec<u8>>>,
    thawed: tokio::sync::Notify,
}

impl Gate {
    /// Returns when `bytes` may pass.
    async fn pass(&self, bytes: &[u8], from_instance: bool) {
        if from_instance {
            let mut before = self.before.lock().unwrap();
            let hit = before
                .as_ref()
                .is_some_and(|b| bytes.windows(b.len()).any(|w| w == b.as_slice()));
            if hit {
                *before = None;
                self.frozen.store(true, Ordering::Release);
            }
        }
        loop {
            let thawed = self.thawed.notified();
            tokio::pin!(thawed);
            thawed.as_mut().enable();
            if !self.frozen.load(Ordering::Acquire) {
                return;
            }
            thawed.await;
        }
    }
}

/// Both directions until either side closes: what the instance (`to`)
/// sends goes on at once, what the other end sends `late`, and nothing
/// while the gate is frozen.
async fn relay(
    to: tokio::net::TcpStream,
    from: tokio::net::TcpStream,
    late: Duration,
    gate: &Gate,
) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn pump(
        mut read: impl AsyncRead + Unpin,
        mut write: impl AsyncWrite + Unpin,
        late: Duration,
        gate: &Gate,
        from_instance: bool,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !late.is_zero() {
                tokio::time::sleep(late).await;
            }
            gate.pass(&buf[..n], from_instance).await;
            if write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let (to_read, to_write) = to.into_split();
    let (from_read, from_write) = from.into_split();
    tokio::select! {
        _ = pump(to_read, from_write, Duration::ZERO, gate, true) => {}
        _ = pump(from_read, to_write, late, gate, false) => {}
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        self.thaw();
    }
}

/// One running `qrgate serve`.
struct Instance {
    http: SocketAddr,
    admin: SocketAddr,
    child: Child,
    paused: bool,
}

impl Drop for Instance {
    fn drop(&mut self) {
        end(&mut self.child);
    }
}

/// The instances, the broker and Mercado Pago of one test. Shared by the
/// futures of a test (`&Cluster`): the instances are behind a lock that no
/// `.await` holds.
pub struct Cluster {
    pub mp: Simulator,
    pub broker: Mosquitto,
    pub log: Log,
    pub url: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    instances: Mutex<BTreeMap<String, Instance>>,
    db: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster on database `url` serving POS `pos` (`vending-…` ones are
    /// vending machines, the others pumps; no sale expires), with nothing
    /// running yet; `None` when Mosquitto is not installed (see the
    /// module's note).
    ///
    /// `paid` is repeated once an hour only: a test that sees the device
    /// told knows who told it.
    pub async fn new(url: String, pos: &[&str]) -> Option<Cluster> {
        let log = Log::new();
        let broker = Mosquitto::start(&log)?;
        let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
        // The test sends each notification where the case needs it.
        mp.set_notify_mode(NotifyMode::None);
        let dir = tempfile::tempdir().unwrap();
        let sim = SimulatorConfig::default();
        let mut text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             # The balancer's address in production: every instance hands Mercado\n\
             # Pago the same notification_url, so their poll answers are the same.\n\
             public_url = \"http://127.0.0.1:9\"\n\
             [mercadopago]\napi_base = \"{}\"\ncollector_id = {}\n\
             [mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\n\
             [orders]\npaid_republish_secs = 3600\n\
             [store]\nurl = \"{url}\"\npath = \"{}\"\n\
             [log]\nformat = \"json\"\n",
            mp.base_url(),
            sim.collector_id,
            broker.port,
            dir.path().join("unused.db").display(),
        );
        for p in pos {
            let kind = if p.starts_with("vending") {
                "vending"
            } else {
                "fuel"
            };
            text.push_str(&format!(
                "[[pos]]\nid = \"{p}\"\nkind = \"{kind}\"\nttl_secs = 0\n"
            ));
        }
        let config = dir.path().join("qrgate.toml");
        std::fs::write(&config, text).unwrap();
        Some(Cluster {
            mp,
            broker,
            log,
            url,
            config,
            env: vec![(
                qrgate::config::ACCESS_TOKEN_ENV.to_owned(),
                sim.access_token,
            )],
            instances: Mutex::default(),
            db: tokio::sync::Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            _dir: dir,
        })
    }

    /// Sets a configuration key for every instance started after, as an
    /// operator's environment does (`QRGATE_SECTION__KEY`).
    pub fn set(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instance>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The setting that makes an instance reach the broker on `port` (a
    /// [`Relay`]'s).
    pub fn broker_at(port: u16) -> (&'static str, String) {
        ("QRGATE_MQTT__BROKER", format!("mqtt://127.0.0.1:{port}"))
    }

    /// The store's port (PostgreSQL's, on loopback).
    pub fn store_port(&self) -> u16 {
        self.store_url_parts().1.parse().unwrap()
    }

    /// The setting that makes an instance reach the store on `port` (a
    /// [`Relay`]'s).
    pub fn store_at(&self, port: u16) -> (&'static str, String) {
        let (head, _, tail) = self.store_url_parts();
        (
            "QRGATE_STORE__URL",
            format!("{head}@127.0.0.1:{port}/{tail}"),
        )
    }

    fn store_url_parts(&self) -> (&str, &str, &str) {
        let (head, rest) = self.url.split_once("@127.0.0.1:").expect("a loopback URL");
        let (port, tail) = rest.split_once('/').expect("a database");
        (head, port, tail)
    }

    /// Instance `name`'s HTTP and admin addresses, while it runs.
    pub fn addr(&self, name: &str) -> Option<(SocketAddr, SocketAddr)> {
        self.instances().get(name).map(|i| (i.http, i.admin))
    }

    /// `path` on instance `name`'s HTTP listener; an error once it is gone
    /// (a test that picked it may have killed it since).
    fn http_url(&self, name: &str, path: &str) -> Result<String, String> {
        let (http, _) = self.addr(name).ok_or(format!("{name} is not running"))?;
        Ok(format!("http://{http}{path}"))
    }

    /// Starts instance `name` and waits until it is ready.
    pub async fn start(&self, name: &str) {
        self.start_with(name, &[]).await;
    }

    /// Starts instance `name` with settings of its own (`QRGATE_…` keys:
    /// a [`Relay`] for its broker or its store), and waits until it is
    /// ready.
    pub async fn start_with(&self, name: &str, env: &[(&str, String)]) {
        self.launch(name, env).await;
        wait_for(format!("{name} ready"), || self.ready(name)).await;
        self.log.note(&format!("{name} is ready"));
    }

    /// Starts instance `name` and waits only until it listens.
    pub async fn launch(&self, name: &str, env: &[(&str, String)]) {
        assert!(
            !self.instances().contains_key(name),
            "{name} is running already"
        );
        self.log.note(&format!("starting {name}"));
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .env("QRGATE_MQTT__CLIENT_ID", name)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        dies_with_this_thread(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let (seen, mut lines) = tokio::sync::mpsc::unbounded_channel();
        read_into(&self.log, name, child.stdout.take().unwrap(), Some(seen));
        read_into(&self.log, name, child.stderr.take().unwrap(), None);
        let (mut http, mut admin) = (None, None);
        while http.is_none() || admin.is_none() {
            let Some(line) = wait_for_event(format!("{name} listening"), lines.recv()).await else {
                panic!("{name} ended before it listened (its log is below)");
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let listen = || v["listen"].as_str().and_then(|a| a.parse().ok());
            match v["message"].as_str() {
                Some("HTTP listening") => http = listen(),
                Some("console and admin API listening") => admin = listen(),
                _ => {}
            }
        }
        let (Some(http), Some(admin)) = (http, admin) else {
            unreachable!("both addresses were read")
        };
        self.instances().insert(
            name.to_owned(),
            Instance {
                http,
                admin,
                child,
                paused: false,
            },
        );
    }

    /// `kill -9`: the instance dies wherever it was.
    pub fn kill(&self, name: &str) {
        let gone = self
            .instances()
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        drop(gone);
        self.log.note(&format!("{name} killed (SIGKILL)"));
    }

    /// SIGSTOP: the instance freezes where it is, its sockets open.
    pub fn pause(&self, name: &str) {
        self.signal(name, libc::SIGSTOP, true);
        self.log.note(&format!("{name} paused (SIGSTOP)"));
    }

    /// SIGCONT: the instance goes on from where it froze.
    pub fn resume(&self, name: &str) {
        self.signal(name, libc::SIGCONT, false);
        self.log.note(&format!("{name} resumed (SIGCONT)"));
    }

    fn signal(&self, name: &str, signal: i32, paused: bool) {
        let mut instances = self.instances();
        let i = instances
            .get_mut(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(i.child.id() as i32, signal) };
        i.paused = paused;
    }

    /// The instances running and not paused.
    pub fn awake(&self) -> Vec<String> {
        self.instances()
            .iter()
            .filter(|(_, i)| !i.paused)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub async fn ready(&self, name: &str) -> bool {
        let Ok(url) = self.http_url(name, "/readyz") else {
            return false;
        };
        self.http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    /// A poll of `pos` on instance `name`, as Mercado Pago makes it: its
    /// status and body.
    pub async fn poll(&self, name: &str, pos: &str) -> Result<(u16, String), String> {
        let url = self.http_url(name, &format!("/mp/pos/{pos}"))?;
        let answer = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        Ok((status, answer.text().await.map_err(|e| e.to_string())?))
    }

    /// What a poll of `pos` on `name` answers: `ok` (an order), or the
    /// waiting answer's kind (`unavailable`, `timeout`…).
    pub async fn poll_kind(&self, name: &str, pos: &str) -> String {
        match self.poll(name, pos).await {
            Ok((200, _)) => "ok".into(),
            Ok((_, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                v["error"]["type"].as_str().unwrap_or("?").to_owned()
            }
            Err(e) => format!("no answer: {e}"),
        }
    }

    /// A customer scans `pos`'s QR and Mercado Pago polls instance `name`
    /// until it is served an order (the instance may still be reading the
    /// sale another one stored).
    pub async fn scan(&self, name: &str, pos: &str) -> ScannedOrder {
        wait_for(format!("{name} serving {pos}'s sale"), || {
            self.try_scan(name, pos)
        })
        .await
    }

    /// One scan of `pos`'s QR with Mercado Pago polling instance `name`:
    /// the order, or what came instead.
    pub async fn try_scan(&self, name: &str, pos: &str) -> Result<ScannedOrder, String> {
        let url = self.http_url(name, &format!("/mp/pos/{pos}"))?;
        match self.mp.scan(&url).await {
            Ok(Scan::Order(order)) => {
                self.log.note(&format!(
                    "{pos} scanned at {name}: merchant order {}",
                    order.merchant_order_id
                ));
                Ok(order)
            }
            other => Err(format!("{name}: {other:?}")),
        }
    }

    /// Mercado Pago notifies instance `name` of a merchant order (its
    /// IPN): the status it answered, or `None` without an answer.
    pub async fn notify(&self, name: &str, merchant_order: u64) -> Option<u16> {
        self.log.note(&format!(
            "merchant order {merchant_order} notified to {name}"
        ));
        let body = serde_json::json!({
            "resource": format!("https://api.mercadolibre.com/merchant_orders/{merchant_order}"),
            "topic": "merchant_order",
        });
        self.mp
            .post_notification(
                &self.http_url(name, "/mp/notifications").ok()?,
                &format!("topic=merchant_order&id={merchant_order}"),
                &body.to_string(),
            )
            .await
            .ok()
    }

    /// Mercado Pago notifies instance `name` of a payment (its webhook).
    pub async fn notify_payment(&self, name: &str, payment: u64) -> Option<u16> {
        self.log
            .note(&format!("payment {payment} notified to {name}"));
        let body = serde_json::json!({
            "action": "payment.created",
            "type": "payment",
            "data": { "id": payment.to_string() },
        });
        self.mp
            .post_notification(
                &self.http_url(name, "/mp/notifications").ok()?,
                &format!("type=payment&data.id={payment}"),
                &body.to_string(),
            )
            .await
            .ok()
    }

    /// A metric of instance `name`, summed over its labels; `None` when the
    /// instance does not answer.
    pub async fn metric(&self, name: &str, metric: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.addr(name)?.1);
        let text = self.http.get(&url).send().await.ok()?.text().await.ok()?;
        Some(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    let n = series.split_once('{').map_or(series, |(n, _)| n);
                    (n == metric).then(|| value.parse::<f64>().ok())?
                })
                .sum(),
        )
    }

    /// The one instance leading the singletons, once exactly one of those
    /// awake says so.
    pub async fn leader(&self) -> String {
        wait_for("exactly one instance leading", || async {
            let mut leading = Vec::new();
            for n in self.awake() {
                if self.metric(&n, "qrgate_leader").await == Some(1.0) {
                    leading.push(n);
                }
            }
            match leading.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(format!("leading: {leading:?}")),
            }
        })
        .await
    }

    /// A device playing `pos` on the test's broker, without presence.
    pub async fn device(&self, pos: &str) -> Device {
        let n = NEXT_DEVICE.fetch_add(1, Ordering::Relaxed);
        Device::connect(
            DeviceConfig::new("127.0.0.1", self.broker.port, pos)
                .client_id(format!("device-{pos}-{n}"))
                .without_presence(),
        )
        .await
        .unwrap()
    }

    /// Rows of `sql` on the cluster's database, read by the test itself
    /// (on a connection of its own, made again after PostgreSQL restarts).
    pub async fn sql(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let mut db = self.db.lock().await;
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            let (config, tls) = PgTarget::parse(&self.url).unwrap().connector(None).unwrap();
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(connection);
            *db = Some(client);
        }
        db.as_ref().unwrap().query(sql, params).await
    }

    /// The one number `sql` selects (a count).
    pub async fn count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        let rows = self.sql(sql, params).await.unwrap();
        rows[0].get(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // QRGATE_CLUSTER_LOG=1 shows it for a test that passed, too.
        if std::thread::panicking() || std::env::var("QRGATE_CLUSTER_LOG").as_deref() == Ok("1") {
            self.log.dump();
        }
    }
}
