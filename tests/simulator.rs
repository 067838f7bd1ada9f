//! The simulator standalone, as a device maker runs it: `qrgate simulator`
//! and `qrgate serve` as two processes of the real binary, qrgate registered
//! at the simulator with `qrgate pos register`, a pump played over MQTT, and
//! the customer and Mercado Pago played only through the simulator's
//! command line (`qrgate simulator scan|pay|notify|…`). The operator's
//! refund goes through qrgate's admin API, as on a station.
#![cfg(feature = "demo")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use qrgate_devices::{DeviceConfig, Pump};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

#[path = "common/wait.rs"]
mod wait;

use wait::{wait_for, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

/// `qrgate simulator` and `qrgate serve`, both killed when dropped.
struct Station {
    /// The simulator's base URL, from the first line it prints.
    sim: String,
    http: String,
    admin: String,
    mqtt: SocketAddr,
    _processes: [Child; 2],
    _dir: tempfile::TempDir,
}

async fn first_line(child: &mut Child) -> (Value, Lines<BufReader<ChildStdout>>) {
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = wait::wait_for_event("the first line on stdout", lines.next_line())
        .await
        .expect("stdout readable")
        .expect("a first line");
    let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    (value, lines)
}

/// Runs `qrgate serve` on `config` until it says where it listens: the
/// process and its HTTP, console and broker addresses; or, when it stops
/// first, what it printed on stderr.
async fn serve(
    config: &std::path::Path,
    token: &str,
) -> Result<(Child, String, String, String), String> {
    let mut qrgate = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_remove("QRGATE_CONFIG")
        .env_remove("RUST_LOG")
        .env("QRGATE_MP_ACCESS_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = qrgate.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let (mut http, mut admin, mut mqtt) = (None, None, None);
    loop {
        let next = wait::wait_for_event("qrgate's listening lines", lines.next_line()).await;
        let Some(text) = next.unwrap() else {
            let mut why = String::new();
            if let Some(mut err) = qrgate.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = err.read_to_string(&mut why).await;
            }
            return Err(why);
        };
        let line: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let listen = line["listen"].as_str().map(str::to_owned);
        match line["message"].as_str() {
            Some("HTTP listening") => http = listen,
            Some("console and admin API listening") => admin = listen,
            Some("embedded MQTT broker listening") => mqtt = listen,
            _ => {}
        }
        if let (Some(h), Some(a), Some(m)) = (&http, &admin, &mqtt) {
            let found = (h.clone(), a.clone(), m.clone());
            // The rest of the log is read so that qrgate never blocks on it;
            // stderr too.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            if let Some(err) = qrgate.stderr.take() {
                let mut err = BufReader::new(err).lines();
                tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
            }
            return Ok((qrgate, found.0, found.1, found.2));
        }
    }
}

impl Station {
    /// Starts the simulator on a port the OS picks, registers pump-1 there
    /// with `qrgate pos register`, and starts qrgate on it. `orders` is the
    /// `[orders]` section.
    async fn start(orders: &str) -> Station {
        let mut sim = Command::new(BIN)
            .args(["simulator", "serve", "--listen", "127.0.0.1:0"])
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (listening, _) = first_line(&mut sim).await;
        assert_eq!(listening["mpsim"], "listening", "{listening}");
        let base_url = listening["base_url"].as_str().unwrap().to_owned();
        let token = listening["access_token"].as_str().unwrap().to_owned();

        // qrgate's HTTP port must be known before it starts: it is in the
        // POS url registered at Mercado Pago and in every notification_url.
        // A port the OS picked and released may be taken again by another
        // test before qrgate binds it: then qrgate says `http.listen` and
        // exits, and the station starts over on another port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let config = write_config(&dir, port, &base_url, orders);
            let register = Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(["pos", "register"])
                .env_remove("QRGATE_CONFIG")
                .env_remove("RUST_LOG")
                .env("QRGATE_MP_ACCESS_TOKEN", &token)
                .output()
                .await
                .unwrap();
            assert!(
                register.status.success(),
                "{}{}",
                String::from_utf8_lossy(&register.stdout),
                String::from_utf8_lossy(&register.stderr)
            );
            match serve(&config, &token).await {
                Ok((qrgate, http, admin, mqtt)) => {
                    let station = Station {
                        sim: base_url,
                        http: format!("http://{http}"),
                        admin: format!("http://{admin}"),
                        mqtt: mqtt.parse().unwrap(),
                        _processes: [sim, qrgate],
                        _dir: dir,
                    };
                    let ready = format!("{}/readyz", station.http);
                    wait_for("qrgate ready", || async {
                        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
                    })
                    .await;
                    return station;
                }
                Err(why) if why.contains("http.listen") => continue,
                Err(why) => panic!("qrgate stopped before it listened: {why}"),
            }
        }
        panic!("five HTTP ports in a row were taken before qrgate could bind them");
    }

    /// `qrgate simulator --json ARGS` against this station's simulator: its
    /// exit code and what it printed (JSON on success, the control API's
    /// error on failure).
    async fn simulator(&self, args: &[&str]) -> (i32, Value) {
        let out = Command::new(BIN)
            .args(["simulator", "--sim", &self.sim, "--json"])
            .args(args)
            .env_remove("QRGATE_CONFIG")
            .env_remove("MPSIM_URL")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let answer = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            panic!(
                "{args:?} printed no JSON: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), answer)
    }

    /// [`Station::simulator`] that must succeed.
    async fn sim(&self, args: &[&str]) -> Value {
        let (code, answer) = self.simulator(args).await;
        assert_eq!(code, 0, "{args:?}: {answer}");
        answer
    }

    async fn pump(&self) -> Pump {
        let config = DeviceConfig::new(self.mqtt.ip().to_string(), self.mqtt.port(), "pump-1");
        Pump::connect(config).await.unwrap()
    }

    /// Publishes a priced sale of pump-1 and returns its `pending` state's
    /// external reference.
    async fn pending_sale(&self, pump: &Pump, sale_id: &str) -> String {
        pump.start_fuelling(sale_id).await.unwrap();
        pump.finish_fuelling(sale_id, "Super 95", "32.10", "798.00")
            .await
            .unwrap();
        let pending = pump
            .device()
            .wait_for(sale_id, "pending", WAIT)
            .await
            .unwrap();
        assert_eq!(pending.amount.as_deref(), Some("25615.80"));
        pending.external_reference.unwrap()
    }

    /// The admin API's detail of a sale.
    async fn sale(&self, reference: &str) -> Value {
        let url = format!("{}/api/sales/{reference}", self.admin);
        let response = reqwest::get(&url).await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        response.json().await.unwrap()
    }

    async fn timeline_has(&self, reference: &str, event: &str) -> bool {
        self.sale(reference).await["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["event"] == event))
    }
}

fn write_config(dir: &tempfile::TempDir, port: u16, sim: &str, orders: &str) -> PathBuf {
    let path = dir.path().join("qrgate.toml");
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[mercadopago]
api_base = "{sim}"
timeout_ms = 2000
[mqtt]
embedded_listen = "127.0.0.1:0"
client_id = "qrgate-sim"
allow_anonymous = true
[store]
path = "{db}"
[log]
format = "json"
[orders]
{orders}

[[stores]]
id = "st01"
name = "Estación Ruta 8"
[stores.location]
street_name = "Av. Siempre Viva"
street_number = "742"
city_name = "Pilar"
state_name = "Buenos Aires"
latitude = -34.45
longitude = -58.91

[[pos]]
id = "pump-1"
kind = "fuel"
store = "st01"
"#,
        db = dir.path().join("q.db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Reconciliation far away: only notifications close sales.
const NOTIFIED: &str = "reconcile_after_secs = 3600";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_is_scanned_paid_delivered_and_refunded_with_the_simulators_commands() {
    let st = Station::start(NOTIFIED).await;
    let pump = st.pump().await;

    // Before any sale the app waits; the POS url is the one registered.
    let scan = st.sim(&["scan", "pump-1"]).await;
    assert_eq!(
        (&scan["answer"], &scan["http_status"], &scan["kind"]),
        (&"wait".into(), &400.into(), &"unavailable".into()),
        "{scan}"
    );
    assert_eq!(scan["pos"], format!("{}/mp/pos/pump-1", st.http));

    let reference = st.pending_sale(&pump, "000001").await;
    let scan = st.sim(&["scan", "pump-1"]).await;
    assert_eq!(scan["answer"], "order", "{scan}");
    assert_eq!(scan["total_amount"], "25615.80");
    assert_eq!(scan["external_reference"], reference.as_str());
    assert_eq!(
        scan["notification_url"],
        format!("{}/mp/notifications", st.http)
    );
    // The scan served the sale: the pump hears it, and may stop taking cash.
    pump.device()
        .wait_state(WAIT, |m| {
            m.is_for("000001") && m.state == "pending" && m.served
        })
        .await
        .unwrap();

    let paid = st.sim(&["pay", "pump-1"]).await;
    assert_eq!(paid["merchant_order"], scan["merchant_order"], "{paid}");
    assert_eq!(paid["status"], "approved");
    let notified = paid["notifications"].as_array().unwrap();
    assert!(
        !notified.is_empty() && notified.iter().all(|n| n["status"] == 200),
        "qrgate took every notification: {paid}"
    );
    let told = pump.wait_paid_and_release("000001", WAIT).await.unwrap();
    assert_eq!(told.payment_id, paid["payment"].as_u64());
    assert_eq!(told.merchant_order, paid["merchant_order"].as_u64());
    wait_for("delivered in the sale's timeline", || {
        st.timeline_has(&reference, "delivered")
    })
    .await;

    // The operator refunds 15.80 from the console's API: Mercado Pago gets
    // the refund, the pump is told.
    let refund = reqwest::Client::new()
        .post(format!("{}/api/sales/{reference}/refund", st.admin))
        .header("content-type", "application/json")
        .body(r#"{"amount":"15.80"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refund.status(), 200, "{}", refund.text().await.unwrap());
    let refunded = pump
        .device()
        .wait_for("000001", "refunded", WAIT)
        .await
        .unwrap();
    assert_eq!(refunded.amount.as_deref(), Some("15.80"));
    let state = st.sim(&["state"]).await;
    assert_eq!(
        state["refunds"],
        serde_json::json!([{"refund": state["refunds"][0]["refund"], "payment": paid["payment"], "amount": "15.80"}]),
        "{state}"
    );
    let payment = &state["payments"][0];
    assert_eq!(
        (&payment["refunded"], &payment["status"]),
        (&"15.80".into(), &"approved".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_payment_with_its_status_detail_leaves_the_sale_payable_until_a_retry_pays() {
    let st = Station::start(NOTIFIED).await;
    let pump = st.pump().await;
    let reference = st.pending_sale(&pump, "000002").await;

    let rejected = st
        .sim(&[
            "pay",
            "pump-1",
            "--status",
            "rejected",
            "--status-detail",
            "cc_rejected_insufficient_amount",
        ])
        .await;
    assert_eq!(rejected["status"], "rejected", "{rejected}");
    assert_eq!(rejected["status_detail"], "cc_rejected_insufficient_amount");
    let merchant_order = rejected["merchant_order"].clone();
    // qrgate fetched the merchant order its notification named, and recorded
    // it with the rejected payment: it closes nothing.
    let seen = wait_for("the rejected merchant order in the sale", || async {
        let sale = st.sale(&reference).await;
        let rejected_seen = sale["merchant_orders"].as_array().is_some_and(|mos| {
            mos.iter().any(|mo| {
                mo["id"] == merchant_order
                    && mo["payments"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["status"] == "rejected"))
            })
        });
        rejected_seen.then_some(sale)
    })
    .await;
    assert_eq!(seen["summary"]["state"], "pending", "{seen}");
    assert!(
        pump.device().drain().iter().all(|m| m.state != "paid"),
        "no paid after a rejection"
    );
    // Still payable: the app is still served the same sale.
    let scan = st.sim(&["scan", "pump-1"]).await;
    assert_eq!(scan["answer"], "order", "{scan}");
    assert_eq!(scan["external_reference"], reference.as_str());

    // The retry, by the sale's reference, pays the newest merchant order.
    let paid = st.sim(&["pay", &reference]).await;
    assert_eq!(paid["status"], "approved", "{paid}");
    assert_eq!(paid["merchant_order"], scan["merchant_order"]);
    let told = pump.wait_paid_and_release("000002", WAIT).await.unwrap();
    assert_eq!(told.payment_id, paid["payment"].as_u64());

    // A reason that is not MP's shape is refused by the simulator, saying why.
    let (code, refused) = st
        .simulator(&[
            "pay",
            "pump-1",
            "--status",
            "rejected",
            "--status-detail",
            "no way",
        ])
        .await;
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_notifications_are_withheld_is_found_by_reconciliation() {
    let st = Station::start("reconcile_after_secs = 1").await;
    let pump = st.pump().await;
    let reference = st.pending_sale(&pump, "000003").await;

    let on = st.sim(&["withhold-notifications", "on"]).await;
    assert_eq!(on["withholding"], true, "{on}");
    let paid = st.sim(&["pay", "pump-1"]).await;
    assert_eq!(paid["status"], "approved", "{paid}");
    assert_eq!(paid["notifications"], serde_json::json!([]));
    assert_eq!(paid["withheld"], 2);

    let told = pump.wait_paid_and_release("000003", WAIT).await.unwrap();
    assert_eq!(told.payment_id, paid["payment"].as_u64());
    let state = st.sim(&["state"]).await;
    assert_eq!(state["notifications"], serde_json::json!([]), "{state}");
    assert_eq!(state["withheld"].as_array().map(Vec::len), Some(2));

    // Sent late, they change nothing: the sale was paid once.
    let sent = st.sim(&["notify"]).await;
    assert_eq!(
        sent["notifications"].as_array().map(Vec::len),
        Some(2),
        "{sent}"
    );
    wait_for("delivered in the sale's timeline", || {
        st.timeline_has(&reference, "delivered")
    })
    .await;
    let sale = st.sale(&reference).await;
    assert_eq!(sale["summary"]["state"], "paid", "{sale}");
    assert_eq!(sale["ledger"]["kept"], "25615.80", "{sale}");
    assert_eq!(sale["ledger"]["owed"], "0.00", "{sale}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_notification_sent_later_pays_the_sale_and_a_late_second_payment_is_owed_back() {
    let st = Station::start(NOTIFIED).await;
    let pump = st.pump().await;
    let reference = st.pending_sale(&pump, "000004").await;

    // Two phones scan the same sale: two merchant orders.
    let first = st.sim(&["scan", "pump-1"]).await;
    let second = st.sim(&["scan", "pump-1"]).await;
    assert_ne!(first["merchant_order"], second["merchant_order"]);

    st.sim(&["withhold-notifications", "on"]).await;
    let paid = st.sim(&["pay", &first["merchant_order"].to_string()]).await;
    assert_eq!(paid["withheld"], 2, "{paid}");
    // Nothing tells qrgate yet; the notification, sent now, does.
    let sent = st
        .sim(&["notify", &first["merchant_order"].to_string()])
        .await;
    assert_eq!(sent["notifications"][0]["status"], 200, "{sent}");
    let told = pump.wait_paid_and_release("000004", WAIT).await.unwrap();
    assert_eq!(told.payment_id, paid["payment"].as_u64());

    // The second phone pays too, notified at once: qrgate owes it back.
    st.sim(&["withhold-notifications", "off"]).await;
    let late = st
        .sim(&["pay", &second["merchant_order"].to_string()])
        .await;
    assert_eq!(late["status"], "approved", "{late}");
    let sale = wait_for("the late payment owed back", || async {
        let sale = st.sale(&reference).await;
        (sale["summary"]["attention"] == "refund_due").then_some(sale)
    })
    .await;
    assert_eq!(sale["summary"]["owed"], "25615.80", "{sale}");
    assert_eq!(sale["summary"]["state"], "paid", "the sale keeps its state");
}
