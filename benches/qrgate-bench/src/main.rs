//! qrgate's benchmark suite. It starts the *release* `qrgate` binary (and the
//! `floor` binary) as child processes, drives them from this process (real
//! MQTT clients, the Mercado Pago simulator) and from `wrk` (HTTP load), and
//! prints one table, also written as JSON.
//!
//! `benches/run [all|quick] [--out FILE] [--mix-secs N]` builds, installs
//! `wrk` and `mosquitto` when missing, and runs this.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use mpsim::{NotifyMode, PaymentOutcome, Scan, Simulator, SimulatorConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::oneshot;

mod instances;
#[path = "../../../tests/common/wait.rs"]
mod wait;

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The release binaries, next to this one.
fn bin(name: &str) -> Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("no executable directory")?
        .to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run through benches/run, which builds it",
            p.display()
        );
    }
    Ok(p)
}

enum BrokerChoice {
    Embedded,
    External(u16),
}

/// The release qrgate as a child process.
struct Qrgate {
    child: Child,
    base: String,
    /// The operator's console (`[admin] listen`).
    admin: String,
    mqtt_port: u16,
    config: PathBuf,
    dir: PathBuf,
}

impl Qrgate {
    /// For the parts that measure capacity: each of their MQTT connections
    /// is many devices at once (a `Fleet`), which the embedded broker's
    /// allowance per login (`[mqtt] embedded_ingress_per_sec`, set for one
    /// device) would pace; it is opened up here. The flood part keeps it as
    /// deployed (`start_as_deployed`).
    fn start(pos: usize, broker: &BrokerChoice, api_base: &str, dir: &Path) -> Result<Qrgate> {
        Qrgate::start_with(pos, broker, api_base, dir, true)
    }

    fn start_as_deployed(
        pos: usize,
        broker: &BrokerChoice,
        api_base: &str,
        dir: &Path,
    ) -> Result<Qrgate> {
        Qrgate::start_with(pos, broker, api_base, dir, false)
    }

    fn start_with(
        pos: usize,
        broker: &BrokerChoice,
        api_base: &str,
        dir: &Path,
        open_ingress: bool,
    ) -> Result<Qrgate> {
        Qrgate::start_retaining(pos, broker, api_base, dir, open_ingress, None)
    }

    /// `start_with`; with `retain_days`, ended sales leave the store that
    /// long after they ended, and paid sales are not searched again (the
    /// searches would keep them for two hours).
    fn start_retaining(
        pos: usize,
        broker: &BrokerChoice,
        api_base: &str,
        dir: &Path,
        open_ingress: bool,
        retain_days: Option<f64>,
    ) -> Result<Qrgate> {
        let http = free_port();
        let admin = free_port();
        let mqtt = match broker {
            BrokerChoice::Embedded => free_port(),
            BrokerChoice::External(p) => *p,
        };
        let broker_line = match broker {
            BrokerChoice::Embedded => "embedded".to_owned(),
            BrokerChoice::External(p) => format!("mqtt://127.0.0.1:{p}"),
        };
        let mut text = format!(
            r#"[http]
listen = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
notification_rate_per_sec = 100000
notification_burst = 100000
[mercadopago]
api_base = "{api_base}"
[mqtt]
broker = "{broker_line}"
embedded_listen = "127.0.0.1:{mqtt}"
allow_anonymous = true
client_id = "qrgate-bench"
{ingress}[orders]
ttl_secs = 0
reconcile_after_secs = 600
{rechecks}[store]
path = "{db}"
{retain}[log]
format = "json"
filter = "info"
[admin]
# The console is on by default: measured with it on.
listen = "127.0.0.1:{admin}"
"#,
            db = dir.join("qrgate.db").display(),
            rechecks = if retain_days.is_some() {
                "recheck_after_secs = []\n"
            } else {
                ""
            },
            retain = retain_days
                .map(|d| format!("retain_days = {d}\n"))
                .unwrap_or_default(),
            ingress = if open_ingress {
                "embedded_ingress_per_sec = 10000000\nembedded_ingress_burst = 10000000\n\
                 device_rate_per_sec = 10000\ndevice_burst = 100000\n"
            } else {
                ""
            },
        );
        for i in 0..pos {
            let kind = if i % 2 == 0 { "fuel" } else { "vending" };
            text.push_str(&format!("[[pos]]\nid = \"p{i}\"\nkind = \"{kind}\"\n"));
        }
        let config = dir.join("qrgate.toml");
        std::fs::write(&config, text)?;
        let q = Qrgate {
            child: Qrgate::spawn(&config, dir)?,
            base: format!("http://127.0.0.1:{http}"),
            admin: format!("http://127.0.0.1:{admin}"),
            mqtt_port: mqtt,
            config,
            dir: dir.to_path_buf(),
        };
        Ok(q)
    }

    fn spawn(config: &Path, dir: &Path) -> Result<Child> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("qrgate.log"))?;
        Ok(Command::new(bin("qrgate")?)
            .args(["--config", config.to_str().unwrap_or_default(), "serve"])
            .env(
                qrgate::config::ACCESS_TOKEN_ENV,
                SimulatorConfig::default().access_token,
            )
            .env_remove("RUST_LOG")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()?)
    }

    async fn ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.base)).await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("qrgate never became ready");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM and wait: a graceful stop.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Qrgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Who waits for which (pos, sale, state) message.
type Waiters = Arc<Mutex<HashMap<(String, String, String), oneshot::Sender<Instant>>>>;

/// Many devices over one MQTT connection: publishes for any POS and
/// wakes whoever waits for a (pos, sale, state).
#[derive(Clone)]
struct Fleet {
    client: AsyncClient,
    waiters: Waiters,
    /// CONNACKs: more than one means the bench's own connection dropped.
    connects: Arc<std::sync::atomic::AtomicU64>,
}

impl Fleet {
    async fn connect(port: u16, id: &str) -> Result<Fleet> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(1000);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 100_000);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let (sub_tx, sub_rx) = oneshot::channel();
        let mut sub_tx = Some(sub_tx);
        let w = Arc::clone(&waiters);
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, resub) = (Arc::clone(&connects), client.clone());
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = Instant::now();
                        let Some(pos) = p.topic.split('/').nth(2) else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                            continue;
                        };
                        let key = (
                            pos.to_owned(),
                            v["sale_id"].as_str().unwrap_or("").to_owned(),
                            v["state"].as_str().unwrap_or("").to_owned(),
                        );
                        if let Some(tx) = w.lock().map(|mut m| m.remove(&key)).ok().flatten() {
                            let _ = tx.send(at);
                        }
                    }
                    // A clean session forgets the subscription: subscribe on
                    // every connection, or a reconnect silences the bench.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let resub = resub.clone();
                        tokio::spawn(async move {
                            let _ = resub
                                .subscribe("qrgate/pos/+/state", QoS::AtLeastOnce)
                                .await;
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx).await??;
        Ok(Fleet {
            client,
            waiters,
            connects,
        })
    }

    /// Registers interest before the action that causes the message.
    fn expect(&self, pos: &str, sale: &str, state: &str) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.waiters.lock() {
            m.insert((pos.to_owned(), sale.to_owned(), state.to_owned()), tx);
        }
        rx
    }

    async fn sale(&self, pos: &str, sale: &str) -> Result<()> {
        let body = format!(
            r#"{{"sale_id":"{sale}","items":[{{"title":"Super 95","quantity":"10.5","unit_price":"798.00","unit_measure":"litre"}}]}}"#
        );
        self.client
            .publish(
                format!("qrgate/pos/{pos}/sale"),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await?;
        Ok(())
    }

    async fn send(&self, pos: &str, kind: &str, body: String) -> Result<()> {
        self.client
            .publish(
                format!("qrgate/pos/{pos}/{kind}"),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await?;
        Ok(())
    }
}

async fn arrived(rx: oneshot::Receiver<Instant>, what: &str) -> Result<Instant> {
    tokio::time::timeout(WAIT, rx)
        .await
        .with_context(|| format!("timed out waiting for {what}"))?
        .with_context(|| format!("lost the wait for {what}"))
}

/// Nanoseconds up to 2 minutes. (It was 0.6 s, which hdrhistogram rounds up
/// to 1.07 s: slower cycles were dropped from the mix's windows, whose p99
/// then read 1,071 ms whatever happened.)
fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

// ---------------------------------------------------------------------------
// 1. Polls, against the floor, with wrk.

const LUA: &str = r#"
local n = tonumber(os.getenv("QRGATE_BENCH_POS"))
request = function()
  return wrk.format("GET", "/mp/pos/p" .. math.random(0, n - 1))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {\"requests\":%d,\"duration_us\":%d,\"socket_errors\":%d,\"p50_us\":%d,\"p99_us\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

fn wrk(base: &str, pos: usize, connections: usize, secs: u64, dir: &Path) -> Result<Value> {
    let script = dir.join("poll.lua");
    std::fs::write(&script, LUA)?;
    let threads = connections.min(2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "-s",
            script.to_str().unwrap_or_default(),
            base,
        ])
        .env("QRGATE_BENCH_POS", pos.to_string())
        .output()
        .context("wrk did not run (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("JSON "))
        .with_context(|| format!("no result from wrk: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    let rps =
        v["requests"].as_f64().unwrap_or(0.0) / (v["duration_us"].as_f64().unwrap_or(1.0) / 1e6);
    Ok(json!({
        "connections": connections,
        "rps": rps.round(),
        "p50_ms": v["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p99_ms": v["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "socket_errors": v["socket_errors"],
    }))
}

fn start_floor() -> Result<(Child, String)> {
    let mut child = Command::new(bin("floor")?).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("floor stdout")?).read_line(&mut line)?;
    Ok((child, format!("http://127.0.0.1:{}", line.trim())))
}

/// Publishes a sale on each of `pos` and waits until each is pending.
async fn pending_sales(fleet: &Fleet, pos: impl Iterator<Item = usize>, tag: &str) -> Result<()> {
    let mut waits = Vec::new();
    for i in pos {
        let p = format!("p{i}");
        let sale = format!("{tag}{i}");
        waits.push(fleet.expect(&p, &sale, "pending"));
        fleet.sale(&p, &sale).await?;
    }
    for w in waits {
        arrived(w, "a pending sale").await?;
    }
    Ok(())
}

async fn polls(sim: &Simulator, quick: bool) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(1000, &BrokerChoice::Embedded, &sim.base_url(), dir.path())?;
    q.ready().await?;
    let fleet = Fleet::connect(q.mqtt_port, "bench-polls").await?;
    // Half the POS have a pending sale.
    pending_sales(&fleet, (0..1000).step_by(2), "poll-").await?;
    let (mut floor, floor_base) = start_floor()?;
    let secs = if quick { 3 } else { 8 };
    let mut rows = Vec::new();
    for c in [1, 16, 64, 256] {
        let ours = wrk(&q.base, 1000, c, secs, dir.path())?;
        let base = wrk(&floor_base, 1000, c, secs, dir.path())?;
        let ratio =
            ours["rps"].as_f64().unwrap_or(0.0) / base["rps"].as_f64().unwrap_or(1.0).max(1.0);
        let p99_ratio = ours["p99_ms"].as_f64().unwrap_or(0.0)
            / base["p99_ms"].as_f64().unwrap_or(1.0).max(0.001);
        rows.push(json!({ "connections": c, "qrgate": ours, "floor": base,
            "throughput_ratio": (ratio * 100.0).round() / 100.0, "p99_ratio": (p99_ratio * 100.0).round() / 100.0 }));
    }
    let _ = floor.kill();
    let _ = floor.wait();
    Ok(Value::Array(rows))
}

/// Polls at 64 connections over 1,000 POS with and without a browser on the
/// operator's console, while devices keep it busy (a sale started or
/// cancelled every 10 ms): without, with, without again, in one run.
async fn console_attached(sim: &Simulator, quick: bool) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(1000, &BrokerChoice::Embedded, &sim.base_url(), dir.path())?;
    q.ready().await?;
    let fleet = std::sync::Arc::new(Fleet::connect(q.mqtt_port, "bench-console").await?);
    pending_sales(&fleet, (0..1000).step_by(2), "poll-").await?;
    // The console's feed gets events: odd POS start and cancel sales.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (fleet, stop) = (std::sync::Arc::clone(&fleet), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let pos = format!("p{}", 1 + 2 * (k % 500));
                let sale = format!("c{}", k / 2);
                let _ = if k.is_multiple_of(2) {
                    fleet.sale(&pos, &sale).await
                } else {
                    fleet
                        .send(
                            &pos,
                            "cancel",
                            format!(r#"{{"sale_id":"c{}"}}"#, (k - 1) / 2),
                        )
                        .await
                };
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let secs = if quick { 3 } else { 8 };
    let before = wrk(&q.base, 1000, 64, secs, dir.path())?;
    // What the page asks of qrgate, without a browser's rendering on the
    // same two cores: the event stream open, and the POS table fetched at
    // most every 200 ms while events arrive (console.js).
    let page_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let page_load = {
        let (admin, stop) = (q.admin.clone(), std::sync::Arc::clone(&page_stop));
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let events = http.get(format!("{admin}/api/events")).send().await;
            let mut fetched = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = http.get(format!("{admin}/api/pos")).send().await {
                    let _ = r.bytes().await;
                    fetched += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(events);
            fetched
        })
    };
    let with_client = wrk(&q.base, 1000, 64, secs, dir.path())?;
    page_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let fetched = page_load.await.unwrap_or(0);
    let profile = dir.path().join("chromium");
    let mut browser = Command::new(
        ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .ok_or_else(|| anyhow::anyhow!("chromium is not installed"))?,
    )
    .args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        &format!("--user-data-dir={}", profile.display()),
        &format!("{}/", q.admin),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    // Time to load the page and open its event stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let with = wrk(&q.base, 1000, 64, secs, dir.path())?;
    let _ = browser.kill();
    let _ = browser.wait();
    let after = wrk(&q.base, 1000, 64, secs, dir.path())?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = churn.await;
    Ok(
        json!({ "connections": 64, "without": before, "with_page_requests": with_client,
        "pos_tables_fetched": fetched, "with_browser": with, "without_again": after }),
    )
}

// ---------------------------------------------------------------------------
// 2. Sale to servable, through the embedded broker and through Mosquitto.

async fn servable(sim: &Simulator, broker: BrokerChoice, sales: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(200, &broker, &sim.base_url(), dir.path())?;
    q.ready().await?;
    let fleet = Fleet::connect(q.mqtt_port, "bench-servable").await?;
    let http = reqwest::Client::new();
    let mut h = hist();
    for k in 0..sales {
        let pos = format!("p{}", k % 200);
        let sale = format!("s{k}");
        let t0 = Instant::now();
        fleet.sale(&pos, &sale).await?;
        loop {
            let r = http.get(format!("{}/mp/pos/{pos}", q.base)).send().await?;
            if r.status() == 200 {
                h.record(t0.elapsed().as_nanos() as u64)?;
                break;
            }
            if t0.elapsed() > WAIT {
                bail!("sale {sale} never became servable");
            }
        }
        fleet
            .send(&pos, "cancel", format!(r#"{{"sale_id":"{sale}"}}"#))
            .await?;
        // The cancel must land before the POS is used again.
        if k % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(json!({ "sales": sales, "p50_us": us(&h, 0.5), "p99_us": us(&h, 0.99) }))
}

// ---------------------------------------------------------------------------
// 3. Notification to device.

async fn notify_to_device(sim: &Simulator, sales: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(200, &BrokerChoice::Embedded, &sim.base_url(), dir.path())?;
    q.ready().await?;
    let fleet = Fleet::connect(q.mqtt_port, "bench-notify").await?;
    let mut r = instances::notify(sim, &fleet, &[&q], sales, "n").await?;
    r["sales"] = json!(sales);
    Ok(r)
}

// ---------------------------------------------------------------------------
// 4. Scale: memory per pending sale, polls at 100,000, restart.

async fn scale(sim: &Simulator, quick: bool) -> Result<Value> {
    let n = 100_000;
    let dir = tempfile::tempdir()?;
    let mut q = Qrgate::start(n, &BrokerChoice::Embedded, &sim.base_url(), dir.path())?;
    q.ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = q.rss_bytes();
    let fleet = Fleet::connect(q.mqtt_port, "bench-scale").await?;
    pending_sales(&fleet, 0..10_000, "m").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss10 = q.rss_bytes();
    pending_sales(&fleet, 10_000..n, "m").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss100 = q.rss_bytes();
    let polls = wrk(&q.base, n, 64, if quick { 3 } else { 8 }, dir.path())?;
    q.stop();
    let t0 = Instant::now();
    q.child = Qrgate::spawn(&q.config, &q.dir)?;
    q.ready().await?;
    let restart = t0.elapsed().as_secs_f64();
    let r = reqwest::get(format!("{}/mp/pos/p{}", q.base, n - 1)).await?;
    if r.status() != 200 {
        bail!("after the restart the last sale is not servable");
    }
    Ok(json!({
        "rss_bytes": { "0": rss0, "10000": rss10, "100000": rss100 },
        "bytes_per_pending_sale": (rss100.saturating_sub(rss0)) / n as u64,
        "polls_at_100000": polls,
        "restart_secs_100000": (restart * 100.0).round() / 100.0,
    }))
}

/// What each connected device costs the embedded broker: 5,000 MQTT clients,
/// one per POS, each subscribed to its own `state` topic as a device is.
/// (The other parts play every device over one connection, which hides this.)
async fn memory_per_device(sim: &Simulator) -> Result<Value> {
    use std::io::{Read, Write};
    let n = 5_000;
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(n, &BrokerChoice::Embedded, &sim.base_url(), dir.path())?;
    q.ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = q.rss_bytes();
    let port = q.mqtt_port;
    let clients = tokio::task::spawn_blocking(move || -> Result<Vec<std::net::TcpStream>> {
        let field = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        };
        // MQTT 3.1.1 packets; every body here is under 128 bytes, so the
        // remaining length is one byte.
        let packet = |kind: u8, body: Vec<u8>| [vec![kind, body.len() as u8], body].concat();
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(WAIT))?;
            let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58];
            field(&mut connect, format!("bench-device-{i}").as_bytes());
            s.write_all(&packet(0x10, connect))?;
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack)?;
            let mut subscribe = vec![0, 1];
            field(&mut subscribe, format!("qrgate/pos/p{i}/state").as_bytes());
            subscribe.push(1);
            s.write_all(&packet(0x82, subscribe))?;
            let mut suback = [0u8; 5];
            s.read_exact(&mut suback)?;
            clients.push(s);
        }
        Ok(clients)
    })
    .await??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = q.rss_bytes();
    drop(clients);
    Ok(json!({
        "devices": n,
        "rss_bytes": { "0": rss0, "connected": rss },
        "bytes_per_device": rss.saturating_sub(rss0) / n as u64,
    }))
}

/// The same memory measure with Mosquitto as the broker: qrgate's own
/// share, without the embedded broker's retained and buffered messages.
async fn memory_without_broker(sim: &Simulator, port: u16) -> Result<Value> {
    let n = 100_000;
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(
        n,
        &BrokerChoice::External(port),
        &sim.base_url(),
        dir.path(),
    )?;
    q.ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = q.rss_bytes();
    let fleet = Fleet::connect(q.mqtt_port, "bench-scale-mosquitto").await?;
    pending_sales(&fleet, 0..n, "w").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss100 = q.rss_bytes();
    Ok(json!({
        "rss_bytes": { "0": rss0, "100000": rss100 },
        "bytes_per_pending_sale": (rss100.saturating_sub(rss0)) / n as u64,
    }))
}

// ---------------------------------------------------------------------------
// 5. Sustained mix.

/// The database's size on disk: the file and its WAL.
fn store_bytes(dir: &Path) -> u64 {
    ["qrgate.db", "qrgate.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

async fn mix(
    sim: &Simulator,
    secs: u64,
    broker: &BrokerChoice,
    pos_count: usize,
    retain_days: Option<f64>,
) -> Result<Value> {
    let tmp = tempfile::tempdir()?;
    // QRGATE_BENCH_KEEP=1 keeps qrgate's log and database for a look after.
    let (_tmp, dir) = if std::env::var("QRGATE_BENCH_KEEP").is_ok() {
        let kept = tmp.keep();
        eprintln!("keeping {}", kept.display());
        (None, kept)
    } else {
        let path = tmp.path().to_path_buf();
        (Some(tmp), path)
    };
    let q = Qrgate::start_retaining(pos_count, broker, &sim.base_url(), &dir, true, retain_days)?;
    q.ready().await?;
    let fleet = Fleet::connect(q.mqtt_port, "bench-mix").await?;
    sim.set_notify_mode(NotifyMode::Ipn);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let window = Duration::from_secs(if secs >= 120 { 60 } else { 10 });
    let windows: Arc<Mutex<Vec<Histogram<u64>>>> = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let paid = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The failed cycles, to find them in qrgate's log and store.
    let failures: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    // The store's size, once a window, to see whether it levels off.
    let sizes = {
        let dir = dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(window);
            let mut mib = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                mib.push((store_bytes(&dir) as f64 / 1048576.0 * 10.0).round() / 10.0);
            }
            mib
        })
    };
    let mut tasks = Vec::new();
    for i in 0..pos_count {
        let (fleet, sim, base) = (fleet.clone(), sim.clone(), q.base.clone());
        let (windows, errors, started, paid, failures) = (
            Arc::clone(&windows),
            Arc::clone(&errors),
            Arc::clone(&started),
            Arc::clone(&paid),
            Arc::clone(&failures),
        );
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let pos = format!("p{i}");
            let mut k = 0u64;
            while Instant::now() < end {
                k += 1;
                let sale = format!("x{i}-{k}");
                let t0 = Instant::now();
                started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let cycle = async {
                    let pending = fleet.expect(&pos, &sale, "pending");
                    fleet.sale(&pos, &sale).await?;
                    arrived(pending, "pending").await?;
                    let url = format!("{base}/mp/pos/{pos}");
                    let r = http.get(&url).send().await?;
                    if r.status() != 200 {
                        bail!("not servable after pending: {} {}", r.status(), r.text().await.unwrap_or_default());
                    }
                    let Scan::Order(order) = sim.scan(&url).await? else {
                        bail!("no order");
                    };
                    let done = fleet.expect(&pos, &sale, "paid");
                    sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
                        .await?;
                    arrived(done, "paid").await?;
                    fleet
                        .send(
                            &pos,
                            "delivered",
                            format!(r#"{{"sale_id":"{sale}","ok":true}}"#),
                        )
                        .await?;
                    Ok::<_, anyhow::Error>(())
                };
                match cycle.await {
                    Ok(()) => {
                        paid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let w = (t0.duration_since(start).as_secs() / window.as_secs()) as usize;
                        if let Ok(mut ws) = windows.lock() {
                            while ws.len() <= w {
                                ws.push(hist());
                            }
                            ws[w].saturating_record(t0.elapsed().as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // As a pump would: a sale that went wrong is cancelled,
                        // so that one failure does not block the POS's next ones.
                        // MQTT does not order topics: the next sale waits for
                        // the cancel to land.
                        let cancelled = fleet.expect(&pos, &sale, "cancelled");
                        let _ = fleet
                            .send(&pos, "cancel", format!(r#"{{"sale_id":"{sale}"}}"#))
                            .await;
                        let _ = arrived(cancelled, "cancelled").await;
                        let at_s = t0.duration_since(start).as_secs_f64();
                        eprintln!("mix: cycle {sale} on {pos} failed after {:.1} s (started at {at_s:.1} s): {e:#}",
                            t0.elapsed().as_secs_f64());
                        if let Ok(mut f) = failures.lock() {
                            if f.len() < 100 {
                                f.push(json!({ "pos": pos, "sale_id": sale, "started_at_s": (at_s * 10.0).round() / 10.0,
                                    "error": format!("{e:#}") }));
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut store_mib = sizes.await.unwrap_or_default();
    store_mib.push((store_bytes(&dir) as f64 / 1048576.0 * 10.0).round() / 10.0);
    let started = started.load(std::sync::atomic::Ordering::Relaxed);
    let paid = paid.load(std::sync::atomic::Ordering::Relaxed);
    let ws = windows.lock().map(|w| w.clone()).unwrap_or_default();
    let over_time: Vec<Value> = ws
        .iter()
        .enumerate()
        .map(|(n, h)| {
            json!({ "from_s": n as u64 * window.as_secs(), "cycles": h.len(),
            "p50_ms": us(h, 0.5) / 1000.0, "p99_ms": us(h, 0.99) / 1000.0 })
        })
        .collect();
    Ok(json!({
        "seconds": secs, "pos": pos_count, "cycles_paid": paid, "cycles_per_sec": (paid as f64 / elapsed).round(),
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "bench_mqtt_connects": fleet.connects.load(std::sync::atomic::Ordering::Relaxed),
        "qrgate_mqtt_connects": std::fs::read_to_string(dir.join("qrgate.log"))
            .map(|l| l.matches("connected to the MQTT broker").count())
            .unwrap_or(0),
        "lost_sales": started - paid,
        "failures": failures.lock().map(|f| f.clone()).unwrap_or_default(),
        "notifications_not_delivered": sim.notifications_sent().iter().filter(|n| n.status != Some(200)).count(),
        "sale_to_paid_over_time": over_time,
        "retain_days": retain_days,
        "store_mib_over_time": store_mib,
    }))
}

// ---------------------------------------------------------------------------
// 6. One device's flood: how long another POS's message takes to act.

/// Other pumps sell and cancel (4 at a time, each POS at most twice every few
/// seconds, well within its rate), first alone, then while one device
/// (`p0`, its own connection) publishes `cancel`s as fast as its client can,
/// QoS 1 with 1,000 in flight. Measured: from publishing a `sale` or a
/// `cancel` of another POS to its `pending` or `cancelled` state arriving.
/// qrgate is configured as deployed (the embedded broker's allowance per
/// login at its default); each of the 4 loops has its own connection, a
/// controller for a quarter of the POS.
async fn flood(sim: &Simulator, broker: &BrokerChoice, secs: u64) -> Result<Value> {
    const POS: usize = 1000;
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start_as_deployed(POS, broker, &sim.base_url(), dir.path())?;
    q.ready().await?;
    let mut fleets = Vec::new();
    for l in 0..4 {
        fleets.push(Fleet::connect(q.mqtt_port, &format!("bench-flood-others-{l}")).await?);
    }
    let phase = |flooding: bool| {
        let fleets = fleets.clone();
        async move {
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let end = Instant::now() + Duration::from_secs(secs);
            let flooder = if flooding {
                let mut opts = MqttOptions::new("bench-flooder", "127.0.0.1", q.mqtt_port);
                opts.set_keep_alive(Duration::from_secs(30));
                opts.set_inflight(1000);
                let (client, mut events) = AsyncClient::new(opts, 10_000);
                let a = Arc::clone(&acked);
                let reader = tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
                let s = Arc::clone(&sent);
                let writer = tokio::spawn(async move {
                    while Instant::now() < end {
                        let body = r#"{"sale_id":"flood"}"#;
                        if client
                            .publish("qrgate/pos/p0/cancel", QoS::AtLeastOnce, false, body)
                            .await
                            .is_err()
                        {
                            break;
                        }
                        s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                Some((reader, writer))
            } else {
                None
            };
            let h = Arc::new(Mutex::new(hist()));
            let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut loops = Vec::new();
            for (l, fleet) in fleets.iter().enumerate().take(4) {
                let (fleet, h, errors) = (fleet.clone(), Arc::clone(&h), Arc::clone(&errors));
                let tag = if flooding { "f" } else { "q" };
                loops.push(tokio::spawn(async move {
                    let mut k = 0usize;
                    while Instant::now() < end {
                        // p1..p999, each loop its own quarter, in turn.
                        let pos = format!("p{}", 1 + l + 4 * (k % ((POS - 1) / 4)));
                        let sale = format!("{tag}{l}-{k}");
                        k += 1;
                        let cycle = async {
                            let pending = fleet.expect(&pos, &sale, "pending");
                            let t0 = Instant::now();
                            fleet.sale(&pos, &sale).await?;
                            let at = arrived(pending, "pending").await?;
                            let cancelled = fleet.expect(&pos, &sale, "cancelled");
                            let t1 = Instant::now();
                            fleet
                                .send(&pos, "cancel", format!(r#"{{"sale_id":"{sale}"}}"#))
                                .await?;
                            let done = arrived(cancelled, "cancelled").await?;
                            Ok::<_, anyhow::Error>([at - t0, done - t1])
                        };
                        match cycle.await {
                            Ok(delays) => {
                                if let Ok(mut h) = h.lock() {
                                    for d in delays {
                                        h.saturating_record(d.as_nanos() as u64);
                                    }
                                }
                            }
                            Err(e) => {
                                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                eprintln!("flood: {sale} on {pos}: {e:#}");
                            }
                        }
                    }
                }));
            }
            for t in loops {
                let _ = t.await;
            }
            if let Some((reader, writer)) = flooder {
                let _ = writer.await;
                reader.abort();
            }
            let h = h.lock().map(|h| h.clone()).unwrap_or_else(|_| hist());
            let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
            json!({
                "messages": h.len(), "p50_ms": us(&h, 0.5) / 1000.0, "p99_ms": us(&h, 0.99) / 1000.0,
                "max_ms": h.max() as f64 / 1e6,
                "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
                "flood_acked": acked, "flood_per_sec": (acked as f64 / secs as f64).round(),
            })
        }
    };
    let quiet = phase(false).await;
    let flooded = phase(true).await;
    let metrics = reqwest::get(format!("{}/metrics", q.admin))
        .await?
        .text()
        .await?;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(json!({
        "seconds": secs, "pos": POS, "quiet": quiet, "flooded": flooded,
        "over_rate": counter("qrgate_device_messages_over_rate_total"),
        "summed": counter("qrgate_device_rejections_summed_total"),
        "qrgate_mqtt_connects": counter("qrgate_mqtt_connections_total"),
    }))
}

// ---------------------------------------------------------------------------

/// Mosquitto as a station would run it for many POS: its default queue of
/// 1000 messages per client drops the rest of a burst (measured: the
/// 100,000-sale burst lost sales with it), so the queue is opened up; and
/// TCP_NODELAY on, as deploy/mosquitto.conf sets it (without it, some
/// messages wait on Nagle and delayed ACKs: a sale → servable p99 of 40 ms).
fn start_mosquitto() -> Result<(Child, u16)> {
    let port = free_port();
    let conf = std::env::temp_dir().join(format!("qrgate-bench-mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nmax_inflight_messages 0\nset_tcp_nodelay true\n"),
    )?;
    let child = Command::new("mosquitto")
        .args(["-c", conf.to_str().unwrap_or_default()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("mosquitto is not installed")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("mosquitto did not listen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, port))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn print_table(r: &Value) {
    println!(
        "\nqrgate benchmark — {}\n",
        r["machine"].as_str().unwrap_or("")
    );
    println!("| measure | qrgate | floor | qrgate/floor |");
    println!("|---|---|---|---|");
    if let Some(c) = r.get("console").filter(|c| !c.is_null()) {
        for (label, key) in [
            ("no browser", "without"),
            (
                "the page's requests without a browser",
                "with_page_requests",
            ),
            (
                "a headless chromium on the console, same 2 cores",
                "with_browser",
            ),
            ("no browser again", "without_again"),
        ] {
            println!(
                "| polls/s and p99 ms at 64 conn, 1000 POS, devices busy, {label} | {} / {:.2} | | |",
                c[key]["rps"],
                c[key]["p99_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    for row in r["polls"].as_array().into_iter().flatten() {
        let c = &row["connections"];
        println!(
            "| polls/s, {c} conn | {} | {} | {} |",
            row["qrgate"]["rps"], row["floor"]["rps"], row["throughput_ratio"]
        );
        println!(
            "| poll p50 / p99 ms, {c} conn | {:.2} / {:.2} | {:.2} / {:.2} | p99 {} |",
            row["qrgate"]["p50_ms"].as_f64().unwrap_or(0.0),
            row["qrgate"]["p99_ms"].as_f64().unwrap_or(0.0),
            row["floor"]["p50_ms"].as_f64().unwrap_or(0.0),
            row["floor"]["p99_ms"].as_f64().unwrap_or(0.0),
            row["p99_ratio"]
        );
    }
    for (name, key) in [
        ("sale → servable, embedded broker", "servable_embedded"),
        ("sale → servable, Mosquitto", "servable_mosquitto"),
        ("notification → device paid", "notify_to_device"),
    ] {
        if let Some(v) = r.get(key).filter(|v| !v.is_null()) {
            println!(
                "| {name}, p50 / p99 ms ({} sales) | {:.2} / {:.2} | | |",
                v["sales"],
                v["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
                v["p99_us"].as_f64().unwrap_or(0.0) / 1000.0
            );
        }
    }
    if let Some(s) = r.get("scale").filter(|v| !v.is_null()) {
        let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1_048_576.0;
        println!(
            "| RSS with 0 / 10,000 / 100,000 pending sales, MiB | {:.1} / {:.1} / {:.1} | | |",
            mib(&s["rss_bytes"]["0"]),
            mib(&s["rss_bytes"]["10000"]),
            mib(&s["rss_bytes"]["100000"])
        );
        println!(
            "| memory per pending sale (embedded broker in the process), bytes | {} | | |",
            s["bytes_per_pending_sale"]
        );
        if let Some(m) = r.get("memory_mosquitto").filter(|v| !v.is_null()) {
            println!(
                "| memory per pending sale (broker outside: Mosquitto), bytes | {} | | |",
                m["bytes_per_pending_sale"]
            );
        }
        let p = &s["polls_at_100000"];
        println!(
            "| polls at 100,000 pending, 64 conn: req/s, p50 / p99 ms | {} , {:.2} / {:.2} | | |",
            p["rps"],
            p["p50_ms"].as_f64().unwrap_or(0.0),
            p["p99_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| restart with 100,000 stored sales, s | {} | | |",
            s["restart_secs_100000"]
        );
    }
    if let Some(d) = r.get("memory_per_device").filter(|v| !v.is_null()) {
        println!(
            "| memory per connected device (embedded broker, {} clients), bytes | {} | | |",
            d["devices"], d["bytes_per_device"]
        );
    }
    for (name, key) in [
        ("embedded broker", "flood_embedded"),
        ("Mosquitto", "flood_mosquitto"),
    ] {
        if let Some(f) = r.get(key).filter(|v| !v.is_null()) {
            println!(
                "| another POS's sale/cancel → its state while one device floods ({} msg/s), {name}: p50 / p99 ms, measurements, errors (without the flood) | {:.1} / {:.1}, {}, {} ({:.1} / {:.1}, {}, {}) | | |",
                f["flooded"]["flood_per_sec"],
                f["flooded"]["p50_ms"].as_f64().unwrap_or(0.0),
                f["flooded"]["p99_ms"].as_f64().unwrap_or(0.0),
                f["flooded"]["messages"],
                f["flooded"]["errors"],
                f["quiet"]["p50_ms"].as_f64().unwrap_or(0.0),
                f["quiet"]["p99_ms"].as_f64().unwrap_or(0.0),
                f["quiet"]["messages"],
                f["quiet"]["errors"],
            );
            println!(
                "| … flood messages qrgate refused over the POS's rate / summed | {} / {} | | |",
                f["over_rate"], f["summed"]
            );
        }
    }
    if let Some(i) = r.get("instances").filter(|v| !v.is_null()) {
        let ms = |v: &Value| v.as_f64().unwrap_or(0.0) / 1000.0;
        println!(
            "| two instances on PostgreSQL (fsync on), Mosquitto, {} POS: sales accepted/s, all POS at once (one on SQLite) | {} ({}) | | |",
            i["pos"], i["accepted_per_sec"], i["sqlite"]["accepted_per_sec"]
        );
        println!(
            "| one instance on SQLite (fsync on), Mosquitto: notification → device paid, p50 / p99 ms ({} sales) | {:.2} / {:.2} | | |",
            i["sales"],
            ms(&i["sqlite"]["notify_to_device"]["p50_us"]),
            ms(&i["sqlite"]["notify_to_device"]["p99_us"])
        );
        for (name, key) in [
            ("sale → servable by the first instance", "servable_first"),
            ("sale → servable by both instances", "servable_both"),
            ("… lag of the second instance behind the first", "lag"),
            (
                "notification (to either instance) → device paid",
                "notify_to_device",
            ),
        ] {
            println!(
                "| {name}, p50 / p99 ms ({} sales) | {:.2} / {:.2} | | |",
                i["sales"],
                ms(&i[key]["p50_us"]),
                ms(&i[key]["p99_us"])
            );
        }
        if !i["polls_64"].is_null() {
            println!(
                "| polls/s per instance, 64 conn, the other instance running | {} (p99 {:.2} ms) | | |",
                i["polls_64"]["rps"],
                i["polls_64"]["p99_ms"].as_f64().unwrap_or(0.0)
            );
        }
        let f = &i["failover"];
        println!(
            "| failover, kill -9 of the leader, {} POS paid and unsettled: survivor leads / every notification answered / every device told paid, ms | {:.0} / {:.0} / {:.0} | | |",
            f["pos"],
            f["survivor_leads_ms"].as_f64().unwrap_or(0.0),
            f["notifications_answered_ms"].as_f64().unwrap_or(0.0),
            f["every_pos_paid_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(m) = r.get("mix").filter(|v| !v.is_null()) {
        println!(
            "| sustained mix {} s, {} POS: cycles/s, errors, lost | {} , {} , {} | | |",
            m["seconds"], m["pos"], m["cycles_per_sec"], m["errors"], m["lost_sales"]
        );
        println!(
            "| sustained mix: MQTT connections of qrgate / of the bench (1 = never dropped) | {} / {} | | |",
            m["qrgate_mqtt_connects"], m["bench_mqtt_connects"]
        );
        println!(
            "| sustained mix: store size, MiB, once a window (retain_days {}) | {} | | |",
            m["retain_days"],
            m["store_mib_over_time"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for w in m["sale_to_paid_over_time"].as_array().into_iter().flatten() {
            println!(
                "| mix from {} s: sale → paid p50 / p99 ms ({} cycles) | {:.1} / {:.1} | | |",
                w["from_s"],
                w["cycles"],
                w["p50_ms"].as_f64().unwrap_or(0.0),
                w["p99_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    qrgate::app::install_crypto();
    // The simulator's warnings (a notification it could not deliver) on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("all");
    let quick = mode == "quick";
    // `smoke`: the shortest run, for a test that the bench completes and
    // reports: few sales, a 3 s mix over 50 POS, no wrk, no Mosquitto, no
    // 100,000-POS scale. Its numbers mean nothing.
    let smoke = mode == "smoke";
    if !matches!(mode, "all" | "quick" | "smoke") {
        bail!("usage: qrgate-bench [all|quick|smoke] [--only PART] [--out FILE] [--mix-secs N] [--mix-broker embedded|mosquitto] [--mix-retain-days D]; PART: polls|servable|notify|scale|devices|mix|flood|console|instances");
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out =
        flag("--out").map_or_else(|| PathBuf::from("target/bench/results.json"), PathBuf::from);
    let mix_secs: u64 = flag("--mix-secs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke {
            3
        } else if quick {
            30
        } else {
            600
        });
    // `--mix-retain-days D`: the mix with `[store] retain_days = D`, to see
    // the store's size level off.
    let mix_retain: Option<f64> = flag("--mix-retain-days").and_then(|s| s.parse().ok());
    let sales = if smoke {
        30
    } else if quick {
        300
    } else {
        1000
    };
    // `--only polls|servable|notify|scale|devices|mix|flood` runs one part.
    let only = flag("--only");
    let run = |part: &str| {
        only.as_deref().map_or(
            !smoke || matches!(part, "servable" | "notify" | "mix"),
            |o| o == part,
        )
    };
    let mix_pos = if smoke { 50 } else { 1000 };

    let sim = Simulator::start(SimulatorConfig::default()).await?;
    let mut r = json!({ "machine": machine(), "mode": mode });
    if run("polls") {
        eprintln!("polls vs floor...");
        r["polls"] = polls(&sim, quick).await?;
    }
    // Not in `all`: it needs chromium (`--only console`).
    if only.as_deref() == Some("console") {
        eprintln!("polls with a browser on the console...");
        r["console"] = console_attached(&sim, quick).await?;
    }
    if run("servable") {
        eprintln!("sale to servable (embedded)...");
        r["servable_embedded"] = servable(&sim, BrokerChoice::Embedded, sales).await?;
        eprintln!("sale to servable (Mosquitto)...");
        let mosquitto = if smoke {
            Err(anyhow::anyhow!("not in smoke mode"))
        } else {
            start_mosquitto()
        };
        r["servable_mosquitto"] = match mosquitto {
            Ok((mut m, port)) => {
                let v = servable(&sim, BrokerChoice::External(port), sales).await?;
                let _ = m.kill();
                let _ = m.wait();
                v
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                Value::Null
            }
        };
    }
    if run("scale") {
        eprintln!("memory with Mosquitto (100,000 POS)...");
        r["memory_mosquitto"] = match start_mosquitto() {
            Ok((mut m, port)) => {
                let v = memory_without_broker(&sim, port).await?;
                let _ = m.kill();
                let _ = m.wait();
                v
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                Value::Null
            }
        };
        eprintln!("scale (100,000 POS)...");
        r["scale"] = scale(&sim, quick).await?;
    }
    if run("devices") {
        eprintln!("memory per connected device (5,000 MQTT clients)...");
        r["memory_per_device"] = memory_per_device(&sim).await?;
    }
    if run("notify") {
        eprintln!("notification to device...");
        r["notify_to_device"] = notify_to_device(&sim, sales).await?;
    }
    if run("flood") {
        let secs = if quick { 10 } else { 30 };
        eprintln!("one device flooding, {secs} s quiet then {secs} s flooded (embedded)...");
        r["flood_embedded"] = flood(&sim, &BrokerChoice::Embedded, secs).await?;
        eprintln!("one device flooding (Mosquitto)...");
        r["flood_mosquitto"] = match start_mosquitto() {
            Ok((mut m, port)) => {
                let v = flood(&sim, &BrokerChoice::External(port), secs).await?;
                let _ = m.kill();
                let _ = m.wait();
                v
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                Value::Null
            }
        };
    }
    if run("instances") {
        eprintln!("two instances on PostgreSQL...");
        r["instances"] = match instances::run(&sim, sales, quick).await {
            Ok(v) => v,
            Err(e) if only.is_none() => {
                eprintln!("skipped: {e:#}");
                Value::Null
            }
            Err(e) => return Err(e),
        };
    }
    if run("mix") {
        // `--mix-broker mosquitto` runs the mix through Mosquitto instead.
        if flag("--mix-broker").as_deref() == Some("mosquitto") {
            eprintln!("sustained mix ({mix_secs} s, Mosquitto)...");
            let (mut m, port) = start_mosquitto()?;
            r["mix"] = mix(
                &sim,
                mix_secs,
                &BrokerChoice::External(port),
                mix_pos,
                mix_retain,
            )
            .await?;
            r["mix"]["broker"] = json!("mosquitto");
            let _ = m.kill();
            let _ = m.wait();
        } else {
            eprintln!("sustained mix ({mix_secs} s)...");
            r["mix"] = mix(&sim, mix_secs, &BrokerChoice::Embedded, mix_pos, mix_retain).await?;
            r["mix"]["broker"] = json!("embedded");
        }
    }

    print_table(&r);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&r)?)?;
    println!("\nJSON: {}", out.display());
    let failed = r.get("mix").is_some()
        && (r["mix"]["errors"].as_u64() != Some(0) || r["mix"]["lost_sales"].as_u64() != Some(0));
    if failed {
        bail!("the sustained mix had errors or lost sales");
    }
    Ok(())
}
