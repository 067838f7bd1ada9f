//! The real `qrgate` binary as an operator runs it: a config file, env
//! overrides, start-up errors that name what to fix, SIGTERM, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[path = "common/wait.rs"]
mod wait;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
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
client_id = "qrgate-bin"
allow_anonymous = true
[store]
path = "{}"
[log]
format = "json"
{extra}
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

/// Runs the binary to its end and returns (success, stdout, stderr).
fn run(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("QRGATE_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_logs_where_it_listens_answers_polls_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env_remove(qrgate::config::ACCESS_TOKEN_ENV)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut http = None;
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        seen.push(v["message"].as_str().unwrap_or("").to_owned());
        if v["message"] == "HTTP listening" {
            http = v["listen"].as_str().map(str::to_owned);
        }
        if v["message"]
            .as_str()
            .unwrap_or("")
            .contains("no Mercado Pago access token")
        {
            break;
        }
    }
    let http = http.unwrap_or_else(|| panic!("no HTTP line in {seen:?}"));
    assert!(
        seen.iter().any(|m| m == "embedded MQTT broker listening"),
        "{seen:?}"
    );
    // Drain the rest of the log in the background so the child never blocks.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait::wait_for("qrgate ready", || async {
            reqwest::get(format!("http://{http}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let r = reqwest::get(format!("http://{http}/mp/pos/pump-7"))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "unavailable");
    });

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");
    let rest = drain.join().unwrap();
    assert!(rest.iter().any(|l| l.contains("\"stopped\"")), "{rest:?}");
}

#[test]
fn a_bad_config_stops_the_start_naming_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[orders]\nttl_secs = \"soon\"\n");
    let (ok, _, err) = run(&["--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("orders.ttl_secs"), "{err}");

    let config = write_config(dir.path(), "");
    let (ok, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[
            ("QRGATE_HTTP__LISTEN", "not-an-address"),
            ("QRGATE_MQTT__BROKER", "amqp://x"),
        ],
    );
    assert!(!ok);
    assert!(err.contains("http.listen"), "{err}");
    assert!(err.contains("mqtt.broker"), "{err}");

    let (ok, _, err) = run(&["--config", "/nonexistent/qrgate.toml"], &[]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn the_access_token_never_comes_from_the_file_and_never_shows_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[mercadopago]\naccess_token = \"APP_USR-secret-in-file\"\n",
    );
    let (ok, out, err) = run(&["--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("access_token"), "{err}");
    assert!(!err.contains("APP_USR-secret-in-file") && !out.contains("APP_USR-secret-in-file"));
}

#[test]
fn a_taken_broker_port_stops_the_start_and_shows_how_to_use_that_broker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (ok, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"))],
    );
    assert!(!ok);
    assert!(
        err.contains(&format!("QRGATE_MQTT__BROKER=mqtt://127.0.0.1:{port}")),
        "{err}"
    );
    drop(taken);
}

#[test]
fn the_embedded_broker_refuses_to_listen_beyond_loopback_unless_told_it_is_unconfined() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (ok, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_MQTT__EMBEDDED_LISTEN", "0.0.0.0:0")],
    );
    assert!(!ok);
    assert!(err.contains("mqtt.embedded_listen"), "{err}");
    assert!(err.contains("embedded_unconfined"), "{err}");
}

#[cfg(feature = "demo")]
#[test]
fn the_demo_tells_both_stories_to_paid_and_exits_0_leaving_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("demo")
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pump-1 is told: paid"), "{stdout}");
    assert!(stdout.contains("vending-1 is told: paid"), "{stdout}");
    assert!(stdout.contains("HTTP 400 unavailable"), "{stdout}");
    assert!(stdout.contains("HTTP 400 in_process"), "{stdout}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
