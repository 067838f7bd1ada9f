//! The real `qrgate` binary as an operator runs it: a config file, env
//! overrides, secrets from files, start-up errors that name what to fix (and
//! exit 78 when the configuration is at fault), the log as a service sees it,
//! SIGTERM, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use qrgate::config::EX_CONFIG;

#[path = "common/mosquitto.rs"]
mod mosquitto;
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

/// Runs the binary to its end and returns (exit status, stdout, stderr).
fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("QRGATE_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const POLL_KEY: &str = "pk-bin-s3cret";

#[test]
fn serve_logs_where_it_listens_answers_polls_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env_remove(qrgate::config::ACCESS_TOKEN_ENV)
        .env_remove("RUST_LOG")
        .env("QRGATE_HTTP__POLL_KEY", POLL_KEY)
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
        assert!(!line.contains(POLL_KEY), "the poll key is logged: {line}");
        if v["message"] == "HTTP listening" {
            http = v["listen"].as_str().map(str::to_owned);
            assert_eq!(
                v["pos_url"], "http://127.0.0.1:9/mp/pos/{pos_id}?key=***",
                "{line}"
            );
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
        let r = reqwest::get(format!("http://{http}/mp/pos/pump-7?key={POLL_KEY}"))
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
    let (code, _, err) = run(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("orders.ttl_secs"), "{err}");

    let config = write_config(dir.path(), "");
    let (code, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[
            ("QRGATE_HTTP__LISTEN", "not-an-address"),
            ("QRGATE_MQTT__BROKER", "amqp://x"),
        ],
    );
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("http.listen"), "{err}");
    assert!(err.contains("mqtt.broker"), "{err}");

    let (code, _, err) = run(&["--config", "/nonexistent/qrgate.toml"], &[]);
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn the_access_token_never_comes_from_the_file_and_never_shows_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[mercadopago]\naccess_token = \"APP_USR-secret-in-file\"\n",
    );
    let (code, out, err) = run(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("access_token"), "{err}");
    assert!(
        err.contains("QRGATE_MP_ACCESS_TOKEN"),
        "names the variable to use: {err}"
    );
    assert!(!err.contains("APP_USR-secret-in-file") && !out.contains("APP_USR-secret-in-file"));
}

#[test]
fn a_taken_broker_port_stops_the_start_and_shows_how_to_use_that_broker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (code, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_MQTT__EMBEDDED_LISTEN", &format!("127.0.0.1:{port}"))],
    );
    assert_eq!(code, 1, "a taken port is no configuration error: {err}");
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
    let (code, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_MQTT__EMBEDDED_LISTEN", "0.0.0.0:0")],
    );
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
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

/// `qrgate serve` running, its stdout read line by line on a thread.
struct Serving {
    child: KillOnDrop,
    lines: Arc<Mutex<Vec<String>>>,
    /// Whether stdout carried an escape byte (ANSI colours).
    escape: Arc<Mutex<bool>>,
}

impl Serving {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Serving {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .env_remove(qrgate::config::ACCESS_TOKEN_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let escape = Arc::new(Mutex::new(false));
        let (l, e) = (Arc::clone(&lines), Arc::clone(&escape));
        std::thread::spawn(move || {
            for line in out.split(b'\n').map_while(Result::ok) {
                if line.contains(&0x1b) {
                    *e.lock().unwrap() = true;
                }
                l.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&line).into_owned());
            }
        });
        Serving {
            child: KillOnDrop(child),
            lines,
            escape,
        }
    }

    /// Every line so far, each parsed as JSON (a line that is not fails).
    fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// Waits for a JSON line `pred` accepts.
    fn wait_line(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait::wait_for_blocking(what, || self.json_lines().into_iter().find(|v| pred(v)))
    }

    fn message_has(v: &serde_json::Value, text: &str) -> bool {
        v["message"].as_str().is_some_and(|m| m.contains(text))
    }

    /// SIGTERM once serving (qrgate listens for it from then on), then the
    /// exit status.
    fn stop(mut self) -> Option<i32> {
        wait::wait_for_blocking("HTTP listening", || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("HTTP listening"))
        });
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status();
        self.child.0.wait().unwrap().code()
    }
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn without_a_config_file_serve_runs_the_development_defaults_warning_in_json_without_escapes() {
    if std::path::Path::new(qrgate::config::SYSTEM_CONFIG).exists() {
        eprintln!("SKIPPED: {} exists here", qrgate::config::SYSTEM_CONFIG);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    // The defaults, on ports the OS picks.
    let serving = Serving::start(
        &["serve"],
        &[
            ("QRGATE_HTTP__LISTEN", "127.0.0.1:0"),
            ("QRGATE_ADMIN__LISTEN", "127.0.0.1:0"),
            ("QRGATE_MQTT__EMBEDDED_LISTEN", "127.0.0.1:0"),
            ("QRGATE_STORE__PATH", db.to_str().unwrap()),
        ],
    );
    let warning = serving.wait_line("the development-defaults warning", |v| {
        Serving::message_has(v, "no configuration file")
    });
    assert_eq!(warning["level"], "WARN", "{warning}");
    let text = warning["message"].as_str().unwrap();
    assert!(
        text.contains("development defaults") && text.contains("loopback"),
        "{text}"
    );
    let http = serving.wait_line("HTTP listening", |v| v["message"] == "HTTP listening");
    // public_url follows http.listen when unset: the port the OS picked.
    let listen = http["listen"].as_str().unwrap();
    assert!(!listen.ends_with(":0"), "{http}");
    assert_eq!(
        http["pos_url"],
        format!("http://{listen}/mp/pos/{{pos_id}}"),
        "{http}"
    );
    assert_eq!(
        http["notification_url"],
        format!("http://{listen}/mp/notifications"),
        "{http}"
    );
    // Piped stdout under `auto`: JSON lines (json_lines parses every one) and
    // not one escape byte.
    assert!(!serving.json_lines().is_empty());
    assert!(!*serving.escape.lock().unwrap(), "an escape byte on a pipe");
    assert_eq!(serving.stop(), Some(0));
}

#[test]
fn a_text_log_on_a_pipe_has_no_escape_codes_either() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let serving = Serving::start(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_LOG__FORMAT", "text")],
    );
    wait::wait_for_blocking("the HTTP line in text", || {
        serving
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("HTTP listening") && l.contains("INFO"))
    });
    assert!(!*serving.escape.lock().unwrap(), "an escape byte on a pipe");
    assert_eq!(serving.stop(), Some(0));
}

#[test]
fn a_bad_config_exits_78_from_every_subcommand_and_check_config_shows_the_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[orders]\nttl_secs = \"soon\"\n");
    let path = config.to_str().unwrap();
    for args in [
        &["--config", path, "serve"][..],
        &["--config", path, "check-config"][..],
        &["--config", path, "pos", "list"][..],
        &["--config", path, "pos", "register", "--dry-run"][..],
    ] {
        let (code, out, err) = run(args, &[]);
        assert_eq!(code, i32::from(EX_CONFIG), "{args:?}: {out}{err}");
        assert!(err.contains("orders.ttl_secs"), "{args:?}: {err}");
    }
    // QRGATE_CONFIG is looked at when --config is not given.
    let (code, _, err) = run(&["check-config"], &[("QRGATE_CONFIG", path)]);
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("orders.ttl_secs"), "{err}");
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_from_files_masked() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "APP_USR-from-a-file\n").unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("admin_token"), "admin-from-credential\n").unwrap();
    let envs = [
        ("QRGATE_MP_ACCESS_TOKEN_FILE", token_file.to_str().unwrap()),
        ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
        ("QRGATE_HTTP__POLL_KEY", POLL_KEY),
    ];
    let (code, out, err) = run(
        &["check-config"],
        &[
            envs[0],
            envs[1],
            envs[2],
            ("QRGATE_CONFIG", config.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0, "{err}");
    for secret in ["APP_USR-from-a-file", "admin-from-credential", POLL_KEY] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} shown:\n{out}"
        );
    }
    assert!(out.contains("poll_key = \"***\""), "{out}");
    assert!(
        out.contains("# QRGATE_MP_ACCESS_TOKEN = \"***\"  (from QRGATE_MP_ACCESS_TOKEN_FILE"),
        "{out}"
    );
    assert!(
        out.contains("# QRGATE_ADMIN_TOKEN = \"***\"  (from credential admin_token"),
        "{out}"
    );
    assert!(out.contains("id = \"pump-7\""), "{out}");

    // Two sources that disagree stop it, naming the variable.
    let (code, _, err) = run(
        &["--config", config.to_str().unwrap(), "check-config"],
        &[envs[0], ("QRGATE_MP_ACCESS_TOKEN", "APP_USR-another")],
    );
    assert_eq!(code, i32::from(EX_CONFIG), "{err}");
    assert!(err.contains("QRGATE_MP_ACCESS_TOKEN_FILE"), "{err}");
    assert!(!err.contains("APP_USR-"), "{err}");
}

#[test]
fn help_lists_every_environment_variable() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for (name, _) in qrgate::config::ENVIRONMENT {
        assert!(out.contains(name), "{name} missing from --help:\n{out}");
    }
    assert!(out.contains("78"), "{out}");
}

#[cfg(feature = "demo")]
#[test]
fn the_demo_refuses_a_config_file_and_says_what_to_run_instead() {
    let (code, out, err) = run(&["demo", "--config", "/etc/qrgate/qrgate.toml"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("qrgate serve --config"), "{err}");
}

#[test]
fn a_username_without_a_password_is_warned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    // No broker there: the warning comes before any connection.
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = nothing.local_addr().unwrap().port();
    drop(nothing);
    let serving = Serving::start(
        &["--config", config.to_str().unwrap()],
        &[
            ("QRGATE_MQTT__BROKER", &format!("mqtt://127.0.0.1:{port}")),
            ("QRGATE_MQTT__USERNAME", "qrgate"),
        ],
    );
    let warning = serving.wait_line("the missing password warning", |v| {
        v["level"] == "WARN" && Serving::message_has(v, "[mqtt] username")
    });
    assert!(
        Serving::message_has(&warning, "QRGATE_MQTT_PASSWORD"),
        "{warning}"
    );
    assert_eq!(serving.stop(), Some(0));
}

#[test]
fn a_taken_http_port_names_http_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (code, _, err) = run(
        &["--config", config.to_str().unwrap()],
        &[("QRGATE_HTTP__LISTEN", &addr)],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("http.listen") && err.contains(&addr), "{err}");
}

/// A Mosquitto that knows one login, `qrgate` with `right-password`, and
/// takes no anonymous client; killed when dropped. `None` when Mosquitto is
/// not installed (unless QRGATE_REQUIRE_MOSQUITTO=1).
struct LockedMosquitto {
    _child: KillOnDrop,
    port: u16,
}

impl LockedMosquitto {
    fn start(dir: &std::path::Path) -> Option<LockedMosquitto> {
        use std::os::unix::fs::PermissionsExt;
        if !mosquitto::installed(&["mosquitto", "mosquitto_passwd"]) {
            return None;
        }
        // Started as root, Mosquitto drops to its own user: it must read these.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let passwd = dir.join("passwd");
        let made = Command::new("mosquitto_passwd")
            .args([
                "-c",
                "-b",
                passwd.to_str().unwrap(),
                "qrgate",
                "right-password",
            ])
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                passwd.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .args(["-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait::wait_for_blocking(format!("mosquitto listening on {port}"), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
        Some(LockedMosquitto {
            _child: KillOnDrop(child),
            port,
        })
    }
}

#[test]
fn a_broker_refusing_qrgates_login_is_an_error_naming_the_settings_repeated_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = LockedMosquitto::start(dir.path()) else {
        return;
    };
    let config = write_config(dir.path(), "");
    let password = dir.path().join("mqtt_password");
    std::fs::write(&password, "wrong-password\n").unwrap();
    let serving = Serving::start(
        &["--config", config.to_str().unwrap()],
        &[
            (
                "QRGATE_MQTT__BROKER",
                &format!("mqtt://127.0.0.1:{}", broker.port),
            ),
            ("QRGATE_MQTT__USERNAME", "qrgate"),
            ("QRGATE_MQTT_PASSWORD_FILE", password.to_str().unwrap()),
        ],
    );
    let refused = |v: &serde_json::Value| {
        v["level"] == "ERROR" && Serving::message_has(v, "refused qrgate's login")
    };
    let first = serving.wait_line("the refused login", refused);
    let text = first["message"].as_str().unwrap();
    assert!(
        text.contains("[mqtt] username") && text.contains("QRGATE_MQTT_PASSWORD"),
        "{text}"
    );
    assert_eq!(first["attempts"], 1, "{first}");
    // It keeps being said while qrgate retries, less and less often: the
    // fourth attempt is logged, the third was not.
    serving.wait_line("the fourth refused attempt", |v| {
        refused(v) && v["attempts"] == 4
    });
    let attempts: Vec<u64> = serving
        .json_lines()
        .iter()
        .filter(|v| refused(v))
        .filter_map(|v| v["attempts"].as_u64())
        .filter(|a| *a <= 4)
        .collect();
    assert_eq!(attempts, [1, 2, 4], "logged at attempts {attempts:?}");
    assert!(
        serving
            .lines
            .lock()
            .unwrap()
            .iter()
            .all(|l| !l.contains("wrong-password")),
        "the password is logged"
    );
    assert_eq!(serving.stop(), Some(0));
}
