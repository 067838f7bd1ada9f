//! The store as the real `qrgate` binary keeps it, seen from other
//! processes: one qrgate per database, and a reader holding the database
//! open (a backup, Litestream, an operator's sqlite3) costs qrgate no CPU.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qrgate_devices::{Device, DeviceConfig, Item};

#[path = "common/wait.rs"]
mod wait;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("qrgate.toml");
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:9"
[mqtt]
embedded_listen = "127.0.0.1:0"
client_id = "qrgate-store"
allow_anonymous = true
[store]
path = "{}"
[log]
format = "json"
[[pos]]
id = "pump-7"
kind = "fuel"
currency = "ARS"
"#,
        dir.join("q.db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `qrgate serve`, its HTTP and broker addresses read from its log.
struct Serving {
    child: Child,
    http: String,
    mqtt: std::net::SocketAddr,
    _drain: std::thread::JoinHandle<()>,
}

impl Serving {
    fn start(config: &std::path::Path) -> Serving {
        let mut child = Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut http, mut mqtt) = (None, None);
        for line in lines.by_ref() {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            let listen = v["listen"].as_str().map(str::to_owned);
            match v["message"].as_str() {
                Some("HTTP listening") => http = listen,
                Some("embedded MQTT broker listening") => mqtt = listen,
                _ => {}
            }
            if http.is_some() && mqtt.is_some() {
                break;
            }
        }
        // The rest of the log is read so that the child never blocks on it.
        let drain = std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        Serving {
            child,
            http: http.expect("an HTTP line"),
            mqtt: mqtt.expect("a broker line").parse().unwrap(),
            _drain: drain,
        }
    }

    /// User and system CPU time the process has used so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads a constant of the system.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / per_sec)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_second_qrgate_on_the_same_database_refuses_to_start_naming_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut first = Serving::start(&config);

    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env_remove("QRGATE_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_ne!(
        out.status.code(),
        Some(78),
        "not a configuration error: {err}"
    );
    assert!(err.contains(&format!("pid {}", first.child.id())), "{err}");
    assert!(err.contains(&format!("HTTP on {}", first.http)), "{err}");
    assert!(err.contains("started 20"), "{err}");

    // A crash releases it: the next start takes the database.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let second = Serving::start(&config);
    let said: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("q.db.lock")).unwrap())
            .unwrap();
    assert_eq!(said["pid"], second.child.id());
    assert_eq!(said["http_listen"], second.http.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_the_database_open_for_30_s_costs_qrgate_almost_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let qrgate = Serving::start(&config);
    let ready = format!("http://{}/readyz", qrgate.http);
    wait::wait_for("qrgate ready", || async {
        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let pump = Device::connect(
        DeviceConfig::new("127.0.0.1", qrgate.mqtt.port(), "pump-7").without_presence(),
    )
    .await
    .unwrap();
    let sell = |n: u32| {
        let pump = &pump;
        async move {
            let id = format!("s{n}");
            let litre = [Item::new("Super", "1", "100.00")];
            pump.publish_sale(&id, &litre, None).await.unwrap();
            pump.wait_for(&id, "pending", wait::WAIT).await.unwrap();
            pump.cancel(&id).await.unwrap();
            pump.wait_for(&id, "cancelled", wait::WAIT).await.unwrap();
        }
    };
    sell(0).await;

    // An operator's sqlite3 with a read transaction open: checkpoints
    // cannot pass its snapshot while it stays.
    let reader = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM sales", [], |r| r.get(0))
        .unwrap();
    let cpu_before = qrgate.cpu();
    let held = Instant::now();
    let mut n = 1;
    while held.elapsed() < Duration::from_secs(30) {
        sell(n).await;
        n += 1;
        // The pace of a light load: one sale a second, each written after
        // the reader's snapshot.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let used = qrgate.cpu() - cpu_before;
    reader.execute_batch("COMMIT").unwrap();
    eprintln!("qrgate used {used:?} of CPU beside a reader for 30 s ({n} sales)");
    assert!(
        used < Duration::from_secs(3),
        "qrgate used {used:?} of CPU in {:?} beside a reader, {n} sales",
        held.elapsed()
    );
}
