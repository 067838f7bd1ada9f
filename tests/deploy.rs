//! deploy/ against the real binary: qrgate started as the container image
//! starts it (the shipped example configuration and the Containerfile's
//! `ENV`), the systemd unit's notify protocol and hardening score,
//! `qrgate health`, and Caddy in front of qrgate forwarding only `/mp/`.
//!
//! Building the image and `compose up` need a container engine and image
//! registries, which the test machine does not have; what they would run is
//! run here directly. systemd-analyze and caddy are skipped, with a note on
//! stderr, when not installed, unless `QRGATE_REQUIRE_SYSTEMD=1` or
//! `QRGATE_REQUIRE_CADDY=1` (CI sets both).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[path = "common/wait.rs"]
mod wait;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The Containerfile's last stage (the runtime image), continued lines
/// joined.
fn runtime_stage() -> String {
    let text = std::fs::read_to_string(format!("{DEPLOY}/Containerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let (_, stage) = joined
        .rsplit_once("\nFROM ")
        .expect("the Containerfile has stages");
    stage.to_owned()
}

/// The runtime image's instruction `name`: the rest of its line.
fn instruction(name: &str) -> Vec<String> {
    runtime_stage()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_owned)
        .collect()
}

/// The image's `ENV`, in order.
fn image_env() -> Vec<(String, String)> {
    instruction("ENV")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A JSON array: exec form, as the image has no shell.
fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not exec form (a JSON array): {text}: {e}"))
}

/// The image's `instruction` in exec form: its argv.
fn image_argv(instruction_name: &str) -> Vec<String> {
    let line = &instruction(instruction_name)[0];
    match instruction_name {
        "HEALTHCHECK" => exec_form(
            line.split_once(" CMD ")
                .expect("HEALTHCHECK ... CMD [...]")
                .1,
        ),
        _ => exec_form(line),
    }
}

/// One station's files, laid out as in the image: the example
/// configuration at `etc/qrgate/qrgate.toml`, the state directory
/// `var/lib/qrgate`, both under a temporary root.
struct Station {
    root: tempfile::TempDir,
}

impl Station {
    fn new() -> Station {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/qrgate")).unwrap();
        std::fs::create_dir_all(root.path().join("var/lib/qrgate")).unwrap();
        std::fs::copy(
            format!("{DEPLOY}/qrgate.example.toml"),
            root.path().join("etc/qrgate/qrgate.toml"),
        )
        .unwrap();
        Station { root }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    /// The image's environment with its paths under this root, and the
    /// changes a test on one machine needs: ports the OS picks (the image's
    /// wildcard HTTP address stays), the console on loopback, and the
    /// embedded broker with anonymous devices instead of the station's
    /// Mosquitto.
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = image_env()
            .into_iter()
            .map(|(k, v)| {
                let v = match v.strip_prefix('/') {
                    Some(p) if k == "QRGATE_CONFIG" || k.starts_with("QRGATE_STORE__") => {
                        self.path(p).display().to_string()
                    }
                    _ if k == "QRGATE_HTTP__LISTEN" => {
                        let at: SocketAddr = v.parse().expect("QRGATE_HTTP__LISTEN is an address");
                        SocketAddr::new(at.ip(), 0).to_string()
                    }
                    _ => v,
                };
                (k, v)
            })
            .collect();
        for (k, v) in [
            ("QRGATE_ADMIN__LISTEN", "127.0.0.1:0"),
            ("QRGATE_MQTT__BROKER", "embedded"),
            ("QRGATE_MQTT__EMBEDDED_LISTEN", "127.0.0.1:0"),
            ("QRGATE_MQTT__ALLOW_ANONYMOUS", "true"),
        ] {
            env.push((k.to_owned(), v.to_owned()));
        }
        env
    }
}

/// A running `qrgate serve`, killed if the test ends before it does.
struct Qrgate {
    child: Child,
    /// Where it listens for HTTP, from its "HTTP listening" log line.
    listen: SocketAddr,
}

impl Qrgate {
    /// Starts qrgate as the image does (`CMD`: `serve`) with exactly `env`
    /// (nothing inherited) and waits for its "HTTP listening" line.
    fn start(env: &[(String, String)]) -> Qrgate {
        // The image's ENTRYPOINT is the binary; its CMD the arguments.
        let mut child = Command::new(BIN)
            .args(image_argv("CMD"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Read to the end whoever listens, so qrgate never blocks
                // on a full pipe.
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let listen = loop {
            let Ok(line) = log.recv_timeout(wait::WAIT) else {
                let _ = child.kill();
                panic!("qrgate never said where it listens; it said: {seen:#?}");
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
            if v["message"] == "HTTP listening" {
                break v["listen"].as_str().unwrap().parse().unwrap();
            }
            seen.push(line);
        };
        Qrgate { child, listen }
    }

    /// Where a client on this host reaches it.
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen.port())
    }

    fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits for it to exit; its exit code.
    async fn exited(mut self) -> Option<i32> {
        let status = wait::wait_for_event(
            "qrgate to exit",
            tokio::task::spawn_blocking(move || self.child.wait()),
        )
        .await;
        status.unwrap().unwrap().code()
    }
}

impl Drop for Qrgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(url: &str) {
    wait::wait_for(format!("{url} answering 200"), || async {
        match reqwest::get(url).await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!("{}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}

/// The image's `HEALTHCHECK` with `env`, this build's binary in place of
/// the image's: (exit code, stdout, stderr).
fn health(env: &[(String, String)]) -> (Option<i32>, String, String) {
    let check = image_argv("HEALTHCHECK");
    assert_eq!(check[..1], image_argv("ENTRYPOINT"), "another program");
    let out = Command::new(BIN)
        .args(&check[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn with(env: &[(String, String)], key: &str, value: &str) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
    env
}

/// Whether `tool` runs; a missing one skips the test (`None`) unless
/// `require` names a variable set to 1.
fn installed(tool: &str, probe: &str, require: &str) -> bool {
    let found = Command::new(tool)
        .arg(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var(require).as_deref() == Ok("1") {
            panic!("{tool} is required ({require}=1) but not installed");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

#[tokio::test]
async fn under_systemd_qrgate_says_ready_when_readyz_answers_pings_the_watchdog_and_says_stopping_on_sigterm(
) {
    // The station's broker is not up yet: qrgate cannot be ready.
    if !installed("mosquitto", "-h", "QRGATE_REQUIRE_MOSQUITTO") {
        return;
    }
    let broker_port = free_port();
    let station = Station::new();
    let socket_path = station.path("notify.sock");
    let mut manager = Manager {
        socket: tokio::net::UnixDatagram::bind(&socket_path).unwrap(),
        said: Vec::new(),
    };
    let mut env = with(
        &station.env(),
        "QRGATE_MQTT__BROKER",
        &format!("mqtt://127.0.0.1:{broker_port}"),
    );
    env.push((
        "NOTIFY_SOCKET".to_owned(),
        socket_path.display().to_string(),
    ));
    // One second: a ping every half second.
    env.push(("WATCHDOG_USEC".to_owned(), "1000000".to_owned()));
    let qrgate = Qrgate::start(&env);

    manager
        .until("STATUS=waiting", |l| l.starts_with("STATUS=waiting"))
        .await;
    let said = &manager.said;
    assert!(
        !said.iter().any(|m| m.contains("READY=1")),
        "READY=1 without a broker: {said:?}"
    );
    assert!(
        said.last().unwrap().contains("broker_not_connected"),
        "{said:?}"
    );
    let readyz = reqwest::get(qrgate.url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);

    let _mosquitto = Killed(
        Command::new("mosquitto")
            .args(["-p", &broker_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    manager.until("READY=1", |l| l == "READY=1").await;
    // At that moment, not later: READY=1 means what /readyz 200 means.
    let readyz = reqwest::get(qrgate.url("/readyz")).await.unwrap();
    let said = &manager.said;
    assert_eq!(readyz.status(), 200, "READY=1 before /readyz: {said:?}");
    let ready = said.last().unwrap();
    assert!(ready.contains("STATUS=ready"), "{ready}");

    manager.until("WATCHDOG=1", |l| l == "WATCHDOG=1").await;
    qrgate.terminate();
    manager.until("STOPPING=1", |l| l == "STOPPING=1").await;
    assert_eq!(qrgate.exited().await, Some(0), "SIGTERM must exit 0");
}

#[tokio::test]
async fn qrgate_health_exits_0_when_ready_1_with_the_reason_when_unready_and_1_when_nothing_answers(
) {
    let station = Station::new();
    let env = station.env();
    let qrgate = Qrgate::start(&env);
    wait_ready(&qrgate.url("/readyz")).await;
    // What the image's HEALTHCHECK runs: the same environment, so the same
    // listener (the image's wildcard address, reached on loopback).
    let running = with(&env, "QRGATE_HTTP__LISTEN", &qrgate.listen.to_string());
    assert!(qrgate.listen.ip().is_unspecified(), "{}", qrgate.listen);
    assert!(
        station.path("var/lib/qrgate/qrgate.db").exists(),
        "the store is not in the image's state directory"
    );
    let (code, out, err) = health(&running);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("ready:"), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");

    qrgate.terminate();
    assert_eq!(qrgate.exited().await, Some(0));
    let (code, out, err) = health(&running);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.starts_with("not ready:"), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Up, but its broker is not there: unready, and the line says why.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("mqtt://{}", closed.local_addr().unwrap());
    drop(closed);
    let env = with(&env, "QRGATE_MQTT__BROKER", &nowhere);
    let qrgate = Qrgate::start(&env);
    let unready = with(&env, "QRGATE_HTTP__LISTEN", &qrgate.listen.to_string());
    wait::wait_for("qrgate up", || async {
        reqwest::get(qrgate.url("/healthz")).await.is_ok()
    })
    .await;
    let (code, out, err) = health(&unready);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("broker_not_connected"), "{err}");
}

#[test]
fn the_unit_is_scored_ok_by_systemd_analyze_and_verifies_clean() {
    if !installed("systemd-analyze", "--version", "QRGATE_REQUIRE_SYSTEMD") {
        return;
    }
    let unit = format!("{DEPLOY}/qrgate.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", &unit])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for qrgate.service:"))
        .map(|(_, score)| score.trim().to_owned())
        .unwrap_or_else(|| {
            panic!(
                "no overall score in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let exposure: f64 = overall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {overall:?}"));
    assert!(
        exposure <= 2.0 && overall.contains("OK"),
        "exposure {overall}, over 2.0:\n{text}"
    );

    // verify needs the program to exist: the one just built, in a copy.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("qrgate.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/qrgate "), "{text}");
    std::fs::write(&copy, text.replace("/usr/local/bin/qrgate", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
}

/// The unit and the shipped configuration agree: the store lives in the
/// unit's state directory, the configuration where the unit reads it, a
/// configuration error (78) is not restarted, and every secret comes as a
/// credential.
#[test]
fn the_unit_keeps_the_store_in_its_state_directory_and_loads_the_secrets_as_credentials() {
    let unit = std::fs::read_to_string(format!("{DEPLOY}/qrgate.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(value("Type"), ["notify"]);
    assert_eq!(value("RestartPreventExitStatus"), ["78"]);
    let state = value("StateDirectory");
    let config = qrgate::config::Config::load_with(
        Some(Path::new(&format!("{DEPLOY}/qrgate.example.toml"))),
        &|_| None,
    )
    .unwrap();
    assert_eq!(
        config.store.path.parent().unwrap(),
        Path::new("/var/lib").join(&state[0]),
        "[store] path of the example is outside StateDirectory={state:?}"
    );
    let conf_dir = value("ConfigurationDirectory");
    let exec = value("ExecStart");
    assert!(
        exec[0].contains(&format!("/etc/{}/qrgate.toml", conf_dir[0])),
        "{exec:?}"
    );
    let credentials: Vec<String> = value("LoadCredential")
        .iter()
        .map(|c| c.split(':').next().unwrap().to_owned())
        .collect();
    for secret in ["mp_access_token", "mqtt_password"] {
        assert!(
            credentials.iter().any(|c| c == secret),
            "{secret} not in {credentials:?}"
        );
    }
    // Optional secrets: a credential whose file is missing stops the start.
    for secret in ["mp_webhook_secret", "admin_token"] {
        assert!(
            unit.contains(&format!("#LoadCredential={secret}:")),
            "{secret}"
        );
    }
}

/// What the watchdog pings for: the real app's listener and store answer;
/// a listener that takes connections and never answers (a hung qrgate, seen
/// from outside) does not.
#[tokio::test]
async fn the_watchdog_counts_qrgate_alive_only_while_its_listener_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = qrgate::config::Config::defaults();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = None;
    config.mqtt.embedded_listen = "127.0.0.1:0".parse().unwrap();
    config.store.path = dir.path().join("q.db");
    let app = qrgate::app::App::build(config).await.unwrap();
    let addr = app.http_addr();
    let store = app.book().store().clone();
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());

    let within = Duration::from_millis(500);
    let client = qrgate::healthcheck::client(within).unwrap();
    wait::wait_for("qrgate alive", || {
        qrgate::service::alive(&client, addr, store.as_ref(), within)
    })
    .await;

    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let why = qrgate::service::alive(&client, hung.local_addr().unwrap(), store.as_ref(), within)
        .await
        .unwrap_err();
    assert!(why.contains("timed out"), "{why}");

    stop.cancel();
    running.await.unwrap().unwrap();
}

/// compose/mosquitto.conf is deploy/mosquitto.conf in a container: every
/// setting the same but the host's paths and addresses, and the ACL file
/// itself shared.
#[test]
fn the_compose_broker_keeps_every_setting_of_the_station_broker_but_its_paths() {
    let settings = |file: &str| -> Vec<String> {
        std::fs::read_to_string(format!("{DEPLOY}/{file}"))
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let station = settings("mosquitto.conf");
    let compose = settings("compose/mosquitto.conf");
    let key = |l: &str| l.split_whitespace().next().unwrap_or("").to_owned();
    // Host paths and addresses, said again for the container; the pid file
    // is the host service manager's.
    let placed = [
        "log_dest",
        "persistence_location",
        "password_file",
        "acl_file",
        "listener",
    ];
    for line in station.iter().filter(|l| key(l) != "pid_file") {
        if placed.contains(&key(line).as_str()) {
            assert!(compose.iter().any(|l| key(l) == key(line)), "no {line:?}");
        } else {
            assert!(
                compose.contains(line),
                "compose/mosquitto.conf lacks {line:?}"
            );
        }
    }
    let compose_yaml = std::fs::read_to_string(format!("{DEPLOY}/compose.yaml")).unwrap();
    for line in &compose {
        if let Some(path) = line
            .strip_prefix("acl_file ")
            .or(line.strip_prefix("password_file "))
        {
            assert!(
                compose_yaml.contains(&format!(":{path}:ro")),
                "{path} is not mounted"
            );
        }
    }
    assert!(compose_yaml.contains("./mosquitto.acl:/mosquitto/config/qrgate.acl:ro"));
}

/// compose/mosquitto.conf runs: the real Mosquitto, with its container
/// paths under a temporary root and its listener on a free loopback port,
/// takes qrgate's login from the password file and the ACL compose mounts,
/// and qrgate becomes ready on it.
#[tokio::test]
async fn qrgate_becomes_ready_on_the_compose_broker_with_its_password_file_and_acl() {
    use std::os::unix::fs::PermissionsExt;
    if !installed("mosquitto", "-h", "QRGATE_REQUIRE_MOSQUITTO") {
        return;
    }
    let station = Station::new();
    let root = station.path("mosquitto");
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    // Started as root, Mosquitto drops to its own user: it must read its
    // files and write its persistence.
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    for dir in [station.path(""), root.clone(), root.join("config")] {
        mode(&dir, 0o755);
    }
    mode(&root.join("data"), 0o777);
    let passwd = root.join("config/qrgate.passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["qrgate", "compose-secret"])
        .status()
        .unwrap();
    assert!(made.success());
    mode(&passwd, 0o644);
    std::fs::copy(
        format!("{DEPLOY}/mosquitto.acl"),
        root.join("config/qrgate.acl"),
    )
    .unwrap();
    let port = free_port();
    let conf = std::fs::read_to_string(format!("{DEPLOY}/compose/mosquitto.conf"))
        .unwrap()
        .replace("/mosquitto/", &format!("{}/", root.display()))
        .replace(
            "\nlistener 1883\n",
            &format!("\nlistener {port} 127.0.0.1\n"),
        );
    assert!(conf.contains(&format!("listener {port} ")), "{conf}");
    std::fs::write(root.join("mosquitto.conf"), conf).unwrap();
    let _mosquitto = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(root.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let env = with(
        &station.env(),
        "QRGATE_MQTT__BROKER",
        &format!("mqtt://127.0.0.1:{port}"),
    );
    let qrgate = Qrgate::start(&with(&env, "QRGATE_MQTT_PASSWORD", "compose-secret"));
    wait_ready(&qrgate.url("/readyz")).await;
}

#[tokio::test]
async fn caddy_forwards_only_mp_to_qrgate_and_answers_everything_else_404() {
    if !installed("caddy", "version", "QRGATE_REQUIRE_CADDY") {
        return;
    }
    let station = Station::new();
    let qrgate = Qrgate::start(&station.env());
    wait_ready(&qrgate.url("/readyz")).await;

    let caddyfile = format!("{DEPLOY}/Caddyfile");
    let valid = Command::new("caddy")
        .args(["validate", "--adapter", "caddyfile", "--config", &caddyfile])
        .env("HOME", station.path(""))
        .output()
        .unwrap();
    assert!(
        valid.status.success(),
        "caddy validate: {}",
        String::from_utf8_lossy(&valid.stderr)
    );

    let port = free_port();
    let site = format!("http://127.0.0.1:{port}");
    let _caddy = Killed(
        Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config", &caddyfile])
            .env("HOME", station.path(""))
            .env("XDG_DATA_HOME", station.path("caddy-data"))
            .env("XDG_CONFIG_HOME", station.path("caddy-config"))
            .env("QRGATE_SITE", &site)
            .env(
                "QRGATE_UPSTREAM",
                format!("127.0.0.1:{}", qrgate.listen.port()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait::wait_for("caddy answering", || async {
        reqwest::get(format!("{site}/")).await.is_ok()
    })
    .await;

    // A poll reaches qrgate: its own JSON answer for an idle POS.
    let r = reqwest::get(format!("{site}/mp/pos/pump-1")).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "unavailable", "{v}");
    // So does a notification (400: no topic or id, from qrgate).
    let r = reqwest::Client::new()
        .post(format!("{site}/mp/notifications"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 404, "notifications must reach qrgate");

    for path in [
        "/",
        "/readyz",
        "/healthz",
        "/metrics",
        "/admin",
        "/api/pos",
        "/mp",
        "/mpx/pos/pump-1",
    ] {
        let r = reqwest::get(format!("{site}{path}")).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.is_empty(), "{path} reached qrgate: {body}");
    }
    // Dot segments, written raw (a client would clean them), do not
    // climb out of /mp/.
    for path in ["/mp/../readyz", "/mp/%2e%2e/readyz", "/mp/..%2freadyz"] {
        let status = raw_get(&format!("127.0.0.1:{port}"), path).await;
        assert_ne!(status, 200, "{path} answered 200");
    }
}

/// The service manager's end of the notify socket.
struct Manager {
    socket: tokio::net::UnixDatagram,
    /// Every datagram received, one state a line.
    said: Vec<String>,
}

impl Manager {
    /// Receives until a datagram has a line that `line` accepts.
    async fn until(&mut self, what: &str, line: impl Fn(&str) -> bool) {
        wait::wait_for_event(what, async {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = self.socket.recv(&mut buf).await.unwrap();
                let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                let found = message.lines().any(&line);
                self.said.push(message);
                if found {
                    return;
                }
            }
        })
        .await
    }
}

/// A port the OS picked, free again: for a program that cannot say which
/// port it got when given 0 (Caddy, Mosquitto).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status of `GET {path}` sent byte for byte as written.
async fn raw_get(addr: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}
