//! `qrgate-pts demo`: a pump on the simulated PTS-2 paid by QR, end to end,
//! with nothing real: the Mercado Pago simulator (`mpsim`), the real `qrgate`
//! binary on a configuration of its own (ports the OS picks, a temporary
//! store), the PTS-2 simulator over HTTPS with digest, and the bridge. It
//! prints the story and exits 0, or says where it stopped.
//!
//! [`Station`] (qrgate started on such a configuration) is also what
//! qrgate's own loop test (tests/pts.rs) starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::auth::{Login, Scheme};
use crate::bridge::Bridge;
use crate::config::{BridgeConfig, Link, Mqtt, Pump};
use crate::decide::Currency;
use crate::sim::{SimConfig, Simulator};

/// How long each step of the story may take.
const STEP: Duration = Duration::from_secs(30);

/// `qrgate serve` on a configuration of its own, stopped when dropped.
pub struct Station {
    _child: Child,
    /// `http://…` of qrgate's public listener.
    pub http: String,
    /// `http://…` of the console and admin API.
    pub admin: String,
    /// The embedded broker.
    pub mqtt: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Station {
    /// Starts `bin serve` against the Mercado Pago at `api_base` with
    /// `token`, one fuel POS `pump-1` that never expires, the embedded broker
    /// open on loopback. qrgate's HTTP port is in every notification_url, so
    /// it is picked first; one taken meanwhile starts qrgate over.
    pub async fn start(bin: &Path, api_base: &str, token: &str) -> anyhow::Result<Station> {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let dir = tempfile::tempdir()?;
            let config = dir.path().join("qrgate.toml");
            std::fs::write(
                &config,
                station_config(port, api_base, &dir.path().join("q.db")),
            )?;
            let mut child = Command::new(bin)
                .arg("--config")
                .arg(&config)
                .arg("serve")
                .env_remove("QRGATE_CONFIG")
                .env_remove("RUST_LOG")
                .env("QRGATE_MP_ACCESS_TOKEN", token)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("running {}", bin.display()))?;
            let stdout = child.stdout.take().context("qrgate's stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let (mut http, mut admin, mut mqtt) = (None, None, None);
            while http.is_none() || admin.is_none() || mqtt.is_none() {
                let next = tokio::time::timeout(STEP, lines.next_line())
                    .await
                    .context("qrgate did not say where it listens")??;
                let Some(text) = next else { break };
                let line: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let listen = line["listen"].as_str().map(str::to_owned);
                match line["message"].as_str() {
                    Some("HTTP listening") => http = listen,
                    Some("console and admin API listening") => admin = listen,
                    Some("embedded MQTT broker listening") => mqtt = listen,
                    _ => {}
                }
            }
            let (Some(http), Some(admin), Some(mqtt)) = (http, admin, mqtt) else {
                continue;
            };
            // The rest of the log is read so that qrgate never blocks on it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let station = Station {
                _child: child,
                http: format!("http://{http}"),
                admin: format!("http://{admin}"),
                mqtt: mqtt.parse()?,
                _dir: dir,
            };
            station.ready().await?;
            return Ok(station);
        }
        bail!("qrgate did not start on five ports in a row")
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.http);
        until("qrgate ready", || async {
            reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(drop)
        })
        .await
    }

    /// Whether the sale `reference`'s timeline at qrgate has `event`.
    pub async fn timeline_has(&self, reference: &str, event: &str) -> bool {
        let url = format!("{}/api/sales/{reference}", self.admin);
        let Ok(response) = reqwest::get(&url).await else {
            return false;
        };
        let sale: Value = response.json().await.unwrap_or(Value::Null);
        sale["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["event"] == event))
    }

    /// The bridge's configuration for pump 1 of `pts` → this station's `pump-1`.
    pub fn bridge_config(&self, pts: &Simulator) -> BridgeConfig {
        BridgeConfig {
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
                host: self.mqtt.ip().to_string(),
                port: self.mqtt.port(),
                topic_prefix: "qrgate".into(),
            },
            currency: Currency::new("ARS"),
            payment_form: Some(4),
            poll_interval: Duration::from_millis(250),
            state_dir: None,
            pumps: vec![Pump {
                pump: 1,
                pos_id: "pump-1".into(),
                mqtt_password: None,
                nozzles: Vec::new(),
            }],
        }
    }
}

fn station_config(port: u16, api_base: &str, db: &Path) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[mercadopago]
api_base = "{api_base}"
[mqtt]
embedded_listen = "127.0.0.1:0"
client_id = "qrgate-pts-demo"
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
        db = db.display()
    )
}

/// Asks `probe` until it answers `Some`, for at most [`STEP`].
async fn until<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: nothing within {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `qrgate` binary beside this one, else on PATH.
pub fn qrgate_beside_me() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("qrgate")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("qrgate"))
}

/// The story: a pump fills on the PTS-2, the customer scans and pays, the
/// transaction is closed on the controller. `say` prints each step.
pub async fn run(qrgate: &Path, mut say: impl FnMut(String)) -> anyhow::Result<()> {
    let mp = mpsim::Simulator::start(mpsim::SimulatorConfig::default()).await?;
    say(format!("Mercado Pago simulator at {}", mp.base_url()));
    let station = Station::start(qrgate, &mp.base_url(), "TEST-sim-token")
        .await
        .with_context(|| format!("starting {} (build it: cargo build)", qrgate.display()))?;
    say(format!(
        "qrgate at {}, its broker at {}",
        station.http, station.mqtt
    ));
    let pts = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::new()
    })
    .await?;
    say(format!(
        "PTS-2 simulator at {} (certificate SHA-256 {}), digest login",
        pts.url(),
        pts.fingerprint().unwrap_or_default()
    ));
    let _bridge = Bridge::start(station.bridge_config(&pts)).await?;
    say("bridge: PTS-2 pump 1 is qrgate's POS pump-1".into());

    pts.lift_nozzle(1, 1)?;
    pts.fill(1, "32.10")?;
    pts.hang_up(1)?;
    say("pump 1: nozzle up, 32.10 L of Super 95 at 798.00, nozzle down: transaction 1 waits for payment".into());

    let pos_url = format!("{}/mp/pos/pump-1", station.http);
    let order = until("the customer's scan", || async {
        match mp.scan(&pos_url).await {
            Ok(mpsim::Scan::Order(order)) => Some(order),
            _ => None,
        }
    })
    .await?;
    say(format!(
        "customer scans pump-1's QR: an order of {} {} ({})",
        order.total_amount, order.currency_id, order.external_reference
    ));
    let payment = mp
        .pay(order.merchant_order_id, mpsim::PaymentOutcome::Approved)
        .await
        .map_err(|e| anyhow!("paying: {e}"))?;
    say(format!("customer pays: payment {payment} approved"));
    let closed = until("the transaction's close", || async {
        pts.transaction(1, 1).filter(|t| t.closed_by.is_some())
    })
    .await?;
    say(format!(
        "PTS-2: transaction {} closed by user {}, paid {}",
        closed.number,
        closed.closed_by.unwrap_or_default(),
        closed.paid
    ));
    until("qrgate's delivered", || async {
        station
            .timeline_has(&order.external_reference, "delivered")
            .await
            .then_some(())
    })
    .await?;
    say("qrgate: the sale is delivered; pump 1 is free for the next customer".into());
    Ok(())
}
