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

use yaml_rust2::Yaml;

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
    /// Its console and admin API, when it has one.
    admin: Option<SocketAddr>,
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
        let mut admin = None;
        let listen = loop {
            let Ok(line) = log.recv_timeout(wait::WAIT) else {
                let _ = child.kill();
                panic!("qrgate never said where it listens; it said: {seen:#?}");
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
            let at = || v["listen"].as_str().unwrap().parse().unwrap();
            match v["message"].as_str() {
                Some("HTTP listening") => break at(),
                Some("console and admin API listening") => admin = Some(at()),
                _ => {}
            }
            seen.push(line);
        };
        Qrgate {
            child,
            listen,
            admin,
        }
    }

    /// The polls it has answered, whatever the answer: the sum of its
    /// `qrgate_polls_total`. Behind a balancer, this tells which instance
    /// answered.
    async fn polls_answered(&self) -> f64 {
        let admin = self.admin.expect("the console is on");
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("metrics parse");
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "qrgate_polls_total")
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("qrgate_polls_total is {other:?}"),
            })
            .sum()
    }

    /// kill -9, and reaped.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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

    let _mosquitto = mosquitto(broker_port);
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

/// deploy/compose.yaml, its merge keys (`<<`) resolved as compose resolves
/// them.
fn compose() -> Yaml {
    let text = std::fs::read_to_string(format!("{DEPLOY}/compose.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("compose.yaml is YAML");
    merged(&docs[0])
}

/// `y` with every `<<` key replaced by the keys it merges, a map's own keys
/// winning.
fn merged(y: &Yaml) -> Yaml {
    match y {
        Yaml::Hash(map) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            for (k, v) in map {
                if k.as_str() != Some("<<") {
                    out.insert(k.clone(), merged(v));
                }
            }
            if let Some(Yaml::Hash(base)) = map.get(&Yaml::String("<<".into())).map(merged) {
                for (k, v) in base {
                    out.entry(k).or_insert(v);
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merged).collect()),
        other => other.clone(),
    }
}

/// The qrgate instances compose runs (the services of qrgate's image), by
/// service name.
fn compose_instances(compose: &Yaml) -> Vec<(String, Yaml)> {
    compose["services"]
        .as_hash()
        .expect("services")
        .iter()
        .filter(|(_, s)| s["image"].as_str() == Some("localhost/qrgate:latest"))
        .map(|(name, s)| (name.as_str().unwrap().to_owned(), s.clone()))
        .collect()
}

/// A service's `environment` variable.
fn env_of<'a>(service: &'a Yaml, key: &str) -> &'a str {
    service["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {service:?}"))
}

/// Where a service's secret appears in /run/secrets (its `target`), by
/// the compose secret it comes from.
fn secrets_of(service: &Yaml) -> Vec<(String, String)> {
    service["secrets"]
        .as_vec()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| match s.as_str() {
            Some(name) => (name.to_owned(), name.to_owned()),
            None => (
                s["source"].as_str().unwrap().to_owned(),
                s["target"].as_str().unwrap().to_owned(),
            ),
        })
        .collect()
}

/// The topic lines of each `user` block of deploy/mosquitto.acl, by
/// username (a `pattern` line belongs to nobody: it applies to everyone).
fn acl_users() -> std::collections::HashMap<String, Vec<String>> {
    let acl = std::fs::read_to_string(format!("{DEPLOY}/mosquitto.acl")).unwrap();
    let mut users = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in acl.lines().map(str::trim) {
        if let Some(user) = line.strip_prefix("user ") {
            current = Some(user.trim().to_owned());
            users.insert(user.trim().to_owned(), Vec::new());
        } else if line.starts_with("pattern ") {
            current = None;
        } else if let (Some(user), true) = (&current, line.starts_with("topic ")) {
            users.get_mut(user).unwrap().push(line.to_owned());
        }
    }
    users
}

/// compose.yaml's instances share one database and each has a name of its
/// own: its MQTT client id, equal to its broker login (use_username_as_clientid),
/// with a password of its own, qrgate's rights in the ACL, and a line in the
/// password file's instructions. Caddy balances every one of them.
#[test]
fn compose_runs_two_instances_on_one_database_each_with_its_own_name_and_login() {
    let compose = compose();
    let instances = compose_instances(&compose);
    let names: Vec<&str> = instances.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["qrgate-a", "qrgate-b"]);

    let logins: Vec<&str> = instances
        .iter()
        .map(|(name, s)| {
            let id = env_of(s, "QRGATE_MQTT__CLIENT_ID");
            assert_eq!(
                env_of(s, "QRGATE_MQTT__USERNAME"),
                id,
                "{name}: the broker takes the username as the client id"
            );
            id
        })
        .collect();
    let unique: std::collections::HashSet<&&str> = logins.iter().collect();
    assert_eq!(unique.len(), logins.len(), "client ids shared: {logins:?}");

    // One database, reached as the role the PostgreSQL service creates,
    // with no password in the URL.
    let urls: Vec<&str> = instances
        .iter()
        .map(|(_, s)| env_of(s, "QRGATE_STORE__URL"))
        .collect();
    assert!(urls.iter().all(|u| *u == urls[0]), "{urls:?}");
    let postgres = &compose["services"]["postgres"];
    let (user, db) = (
        env_of(postgres, "POSTGRES_USER"),
        env_of(postgres, "POSTGRES_DB"),
    );
    assert!(
        urls[0].starts_with(&format!("postgres://{user}@postgres:5432/{db}?")),
        "{}",
        urls[0]
    );
    let major: u32 = postgres["image"]
        .as_str()
        .and_then(|i| i.rsplit_once(':'))
        .and_then(|(_, tag)| tag.split(['.', '-']).next()?.parse().ok())
        .expect("postgres image pinned to a major version");
    assert!(major >= 14, "PostgreSQL {major}: 14 or newer is required");
    assert_eq!(
        env_of(postgres, "POSTGRES_PASSWORD_FILE"),
        "/run/secrets/store_password"
    );
    assert!(secrets_of(postgres).contains(&("store_password".into(), "store_password".into())));

    // Each its own MQTT password, under the credential name qrgate reads.
    let mut sources = Vec::new();
    for (name, s) in &instances {
        let secrets = secrets_of(s);
        assert!(
            secrets.contains(&("store_password".into(), "store_password".into())),
            "{name}: {secrets:?}"
        );
        let (source, _) = secrets
            .iter()
            .find(|(_, target)| target == "mqtt_password")
            .unwrap_or_else(|| panic!("{name} has no mqtt_password: {secrets:?}"));
        assert!(compose["secrets"][source.as_str()]["file"]
            .as_str()
            .is_some());
        sources.push(source.clone());
    }
    sources.dedup();
    assert_eq!(
        sources.len(),
        instances.len(),
        "one MQTT password for two logins"
    );

    // Caddy in front of all of them, at the image's HTTP port.
    let (_, listen) = image_env()
        .into_iter()
        .find(|(k, _)| k == "QRGATE_HTTP__LISTEN")
        .unwrap();
    let port = listen.rsplit_once(':').unwrap().1;
    let upstream: Vec<&str> = env_of(&compose["services"]["caddy"], "QRGATE_UPSTREAM")
        .split_whitespace()
        .collect();
    let expected: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    assert_eq!(upstream, expected);

    // Each login has qrgate's rights, and is made in the password file.
    let acl = acl_users();
    let rights = &acl["qrgate"];
    assert!(
        rights.iter().any(|l| l == "topic read qrgate/pos/+/sale"),
        "{rights:?}"
    );
    let readme = std::fs::read_to_string(format!("{DEPLOY}/README.md")).unwrap();
    for login in &logins {
        assert_eq!(
            acl.get(*login),
            Some(rights),
            "{login}'s rights in mosquitto.acl"
        );
        assert!(
            readme.contains(&format!("mosquitto_passwd /w/qrgate.passwd {login}"))
                || readme.contains(&format!("mosquitto_passwd -c /w/qrgate.passwd {login}")),
            "deploy/README.md does not make {login}'s login"
        );
    }
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
    let conf = settings("compose/mosquitto.conf");
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
            assert!(conf.iter().any(|l| key(l) == key(line)), "no {line:?}");
        } else {
            assert!(conf.contains(line), "compose/mosquitto.conf lacks {line:?}");
        }
    }
    let mounts: Vec<String> = compose()["services"]["mosquitto"]["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for line in &conf {
        if let Some(path) = line
            .strip_prefix("acl_file ")
            .or(line.strip_prefix("password_file "))
        {
            assert!(
                mounts.iter().any(|m| m.ends_with(&format!(":{path}:ro"))),
                "{path} is not mounted: {mounts:?}"
            );
        }
    }
    assert!(mounts.contains(&"./mosquitto.acl:/mosquitto/config/qrgate.acl:ro".to_owned()));
}

/// compose/mosquitto.conf runs: the real Mosquitto, with its container
/// paths under a temporary root and its listener on a free loopback port,
/// takes each compose instance's own login from the password file, under
/// the MQTT settings compose gives it; both are ready at once (neither
/// takes the other's session), and the ACL lets each read a device's sale
/// and tell the device: each instance takes the sale (here each on its own
/// SQLite file, so each makes its own reference), serves it, and the
/// device hears both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_compose_instances_log_in_as_themselves_on_the_compose_broker_and_each_hears_and_tells_a_device(
) {
    use std::os::unix::fs::PermissionsExt;
    if !installed("mosquitto", "-h", "QRGATE_REQUIRE_MOSQUITTO") {
        return;
    }
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().join("mosquitto");
    std::fs::create_dir_all(root.join("config")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    // Started as root, Mosquitto drops to its own user: it must read its
    // files and write its persistence.
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    for dir in [root_dir.path(), &root, &root.join("config")] {
        mode(dir, 0o755);
    }
    mode(&root.join("data"), 0o777);

    let instances = compose_instances(&compose());
    let passwd = root.join("config/qrgate.passwd");
    let mut logins: Vec<(String, String)> = instances
        .iter()
        .map(|(name, s)| {
            let user = env_of(s, "QRGATE_MQTT__USERNAME").to_owned();
            (user, format!("{name}-secret"))
        })
        .collect();
    logins.push(("pump-1".into(), "device-secret".into()));
    for (i, (user, password)) in logins.iter().enumerate() {
        let create: &[&str] = if i == 0 { &["-c", "-b"] } else { &["-b"] };
        let made = Command::new("mosquitto_passwd")
            .args(create)
            .arg(&passwd)
            .args([user, password])
            .status()
            .unwrap();
        assert!(made.success(), "mosquitto_passwd {user}");
    }
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

    // Each instance with compose's MQTT settings for it, its password as
    // the credential compose mounts, on this broker.
    let mut running = Vec::new();
    for ((name, service), (_, password)) in instances.iter().zip(&logins) {
        let station = Station::new();
        let credentials = station.path("credentials");
        std::fs::create_dir_all(&credentials).unwrap();
        std::fs::write(credentials.join("mqtt_password"), password).unwrap();
        let mut env = with(
            &station.env(),
            "QRGATE_MQTT__BROKER",
            &format!("mqtt://127.0.0.1:{port}"),
        );
        for (k, v) in service["environment"].as_hash().unwrap() {
            let k = k.as_str().unwrap();
            if k.starts_with("QRGATE_MQTT__") && k != "QRGATE_MQTT__BROKER" {
                env = with(&env, k, v.as_str().unwrap());
            }
        }
        env = with(
            &env,
            "CREDENTIALS_DIRECTORY",
            &credentials.display().to_string(),
        );
        running.push((name.clone(), Qrgate::start(&env), station));
    }
    for (_, qrgate, _) in &running {
        wait_ready(&qrgate.url("/readyz")).await;
    }

    let mut device = rumqttc::MqttOptions::new("pump-1", "127.0.0.1", port);
    device.set_credentials("pump-1", "device-secret");
    let (client, mut events) = rumqttc::AsyncClient::new(device, 16);
    client
        .subscribe("qrgate/pos/pump-1/state", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    wait::wait_for_event("the device subscribed to its state", async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
                events.poll().await.unwrap()
            {
                return;
            }
        }
    })
    .await;
    client
        .publish(
            "qrgate/pos/pump-1/sale",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"sale_id":"compose-1","items":[{"title":"Super 95","quantity":"10","unit_price":"100.00"}]}"#,
        )
        .await
        .unwrap();
    let told = wait::wait_for_event("pending from every instance", async {
        let mut references = std::collections::HashSet::new();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                events.poll().await.unwrap()
            {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                if v["sale_id"] == "compose-1" && v["state"] == "pending" {
                    references.insert(v["external_reference"].as_str().unwrap().to_owned());
                    if references.len() == running.len() {
                        return references;
                    }
                }
            }
        }
    })
    .await;
    let mut served = std::collections::HashSet::new();
    for (name, qrgate, _) in &running {
        let r = reqwest::get(qrgate.url("/mp/pos/pump-1")).await.unwrap();
        assert_eq!(r.status(), 200, "{name} does not serve the sale");
        let v: serde_json::Value = r.json().await.unwrap();
        served.insert(v["external_reference"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        served, told,
        "each instance told the device the sale it serves"
    );
}

#[tokio::test]
async fn caddy_forwards_only_mp_to_qrgate_and_answers_everything_else_404() {
    if !installed("caddy", "version", "QRGATE_REQUIRE_CADDY") {
        return;
    }
    let station = Station::new();
    let qrgate = Qrgate::start(&station.env());
    wait_ready(&qrgate.url("/readyz")).await;

    let valid = Command::new("caddy")
        .args(["validate", "--adapter", "caddyfile", "--config", CADDYFILE])
        .env("HOME", station.path(""))
        .output()
        .unwrap();
    assert!(
        valid.status.success(),
        "caddy validate: {}",
        String::from_utf8_lossy(&valid.stderr)
    );

    let caddy = Caddy::start(&[&qrgate]).await;
    let site = &caddy.site;

    // A poll reaches qrgate: its own JSON answer for an idle POS.
    poll_idle(&reqwest::Client::new(), site).await.unwrap();
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
        let status = raw_get(&format!("127.0.0.1:{}", caddy.port), path).await;
        assert_ne!(status, 200, "{path} answered 200");
    }
}

/// Several addresses in QRGATE_UPSTREAM, separated by spaces, are as many
/// upstreams (Caddy puts the value in before it reads the file): the
/// balancer checks each on /readyz, and falls back to the same list,
/// unchecked, when none is ready.
#[test]
fn the_caddyfile_makes_every_address_of_qrgate_upstream_an_upstream_checked_on_readyz() {
    if !installed("caddy", "version", "QRGATE_REQUIRE_CADDY") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let upstreams = ["127.0.0.1:8081", "127.0.0.1:8082", "10.0.0.3:8080"];
    let caddy = |command: &str| {
        let out = Command::new("caddy")
            .args([command, "--adapter", "caddyfile", "--config", CADDYFILE])
            .env("HOME", home.path())
            .env("QRGATE_UPSTREAM", upstreams.join(" "))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "caddy {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    caddy("validate");
    let config: serde_json::Value = serde_json::from_slice(&caddy("adapt")).unwrap();

    let mut proxies = Vec::new();
    reverse_proxies(&config, &mut proxies);
    assert_eq!(
        proxies.len(),
        2,
        "the balancer and its fallback: {proxies:#?}"
    );
    for proxy in &proxies {
        let dials: Vec<&str> = proxy["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["dial"].as_str().unwrap())
            .collect();
        assert_eq!(dials, upstreams);
    }
    let (checked, unchecked): (Vec<&serde_json::Value>, Vec<_>) = proxies
        .iter()
        .partition(|p| !p["health_checks"]["active"].is_null());
    let active = &checked[0]["health_checks"]["active"];
    assert_eq!(active["uri"], "/readyz", "{active}");
    assert_eq!(active["expect_status"], 200, "{active}");
    assert_eq!(unchecked.len(), 1);
}

/// Every `reverse_proxy` handler in Caddy's JSON configuration.
fn reverse_proxies<'a>(v: &'a serde_json::Value, found: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("handler").and_then(|h| h.as_str()) == Some("reverse_proxy") {
                found.push(v);
            }
            map.values().for_each(|v| reverse_proxies(v, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| reverse_proxies(v, found)),
        _ => {}
    }
}

/// Two instances behind deploy/Caddyfile: Mercado Pago's polls reach both,
/// and when one is killed (kill -9: no drain, its connections cut) every
/// poll still gets qrgate's answer, from the survivor, whether it was under
/// way at the kill or sent after it; so does a notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_spreads_polls_over_both_instances_and_loses_none_when_one_is_killed() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    if !installed("caddy", "version", "QRGATE_REQUIRE_CADDY") {
        return;
    }
    let (station_a, station_b) = (Station::new(), Station::new());
    let a = Qrgate::start(&station_a.env());
    let mut b = Qrgate::start(&station_b.env());
    wait_ready(&a.url("/readyz")).await;
    wait_ready(&b.url("/readyz")).await;
    let mut caddy = Caddy::start(&[&a, &b]).await;
    let client = reqwest::Client::new();

    wait::wait_for("polls through Caddy answered by both instances", || async {
        poll_idle(&client, &caddy.site).await?;
        let answered = (a.polls_answered().await, b.polls_answered().await);
        match answered {
            (a, b) if a > 0.0 && b > 0.0 => Ok(()),
            _ => Err(format!("answered by a and b: {answered:?}")),
        }
    })
    .await;

    // Polls keep coming, four at a time, while b is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let pollers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            let (client, site) = (client.clone(), caddy.site.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = poll_idle(&client, &site).await {
                        failed.push(e);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                failed
            })
        })
        .collect();
    let at_least = |n: u64| {
        let sent = Arc::clone(&sent);
        move || {
            let sent = Arc::clone(&sent);
            async move { sent.load(Ordering::Relaxed) >= n }
        }
    };
    wait::wait_for("polls under way", at_least(100)).await;
    b.kill();
    caddy.forget_log();
    let at_kill = sent.load(Ordering::Relaxed);
    wait::wait_for("polls after the kill", at_least(at_kill + 200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failed = Vec::new();
    for poller in pollers {
        failed.extend(poller.await.unwrap());
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {sent} polls not answered by qrgate: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // Every further poll is the survivor's.
    let before = a.polls_answered().await;
    const N: u32 = 50;
    poll_idle_times(&client, &caddy.site, N, "after the kill").await;
    assert_eq!(a.polls_answered().await - before, f64::from(N));

    // A notification, once Caddy's check took b out (a POST is retried
    // after a refused connection only by Caddy 2.11.2 and later; Debian
    // 12's is 2.6.2).
    caddy.until_checks_fail(&[&b], 2).await;
    let r = client
        .post(format!("{}/mp/notifications", caddy.site))
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    assert!(
        status == 400 && body["code"] == "bad_notification",
        "a notification after the kill: {status} {body}"
    );
}

/// deploy/Caddyfile's readiness checks: an instance whose /readyz answers
/// 503 gets no poll while another is ready, and gets them again once it
/// answers 200. When no instance is ready, polls still reach them (an
/// unready qrgate answers from memory, so a pending sale stays payable)
/// instead of being refused at the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_sends_nothing_to_an_unready_instance_while_another_is_ready_and_sends_anyway_when_none_is(
) {
    if !installed("caddy", "version", "QRGATE_REQUIRE_CADDY")
        || !installed("mosquitto", "-h", "QRGATE_REQUIRE_MOSQUITTO")
    {
        return;
    }
    // Each instance on a broker of its own that the test starts and stops:
    // without its broker an instance is unready (broker_not_connected).
    let (port_a, port_b) = (free_port(), free_port());
    let broker_a = mosquitto(port_a);
    let (station_a, station_b) = (Station::new(), Station::new());
    let on = |station: &Station, port: u16| {
        with(
            &station.env(),
            "QRGATE_MQTT__BROKER",
            &format!("mqtt://127.0.0.1:{port}"),
        )
    };
    let a = Qrgate::start(&on(&station_a, port_a));
    let b = Qrgate::start(&on(&station_b, port_b));
    wait_ready(&a.url("/readyz")).await;
    wait_unready(&b).await;
    let mut caddy = Caddy::start(&[&a, &b]).await;
    let client = reqwest::Client::new();
    const N: u32 = 50;
    let answered = || async { (a.polls_answered().await, b.polls_answered().await) };

    caddy.until_checks_fail(&[&b], 2).await;
    let before = answered().await;
    poll_idle_times(&client, &caddy.site, N, "with b unready").await;
    let after = answered().await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (f64::from(N), 0.0),
        "polls answered by a and b while b is unready"
    );

    let broker_b = mosquitto(port_b);
    wait_ready(&b.url("/readyz")).await;
    caddy.until_checked_ready(&b).await;
    wait::wait_for("polls through Caddy reaching b again", || async {
        poll_idle(&client, &caddy.site).await?;
        let now = b.polls_answered().await;
        if now > after.1 {
            Ok(())
        } else {
            Err(format!("b answered {now}"))
        }
    })
    .await;

    drop((broker_a, broker_b));
    wait_unready(&a).await;
    wait_unready(&b).await;
    caddy.until_checks_fail(&[&a, &b], 2).await;
    let before = answered().await;
    poll_idle_times(&client, &caddy.site, N, "with no instance ready").await;
    let after = answered().await;
    assert_eq!(
        after.0 - before.0 + after.1 - before.1,
        f64::from(N),
        "polls answered by a and b with neither ready"
    );
}

/// Waits for `qrgate` to answer /readyz 503 for want of its broker.
async fn wait_unready(qrgate: &Qrgate) {
    wait::wait_for("/readyz 503 broker_not_connected", || async {
        let r = reqwest::get(qrgate.url("/readyz"))
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body = r.text().await.map_err(|e| e.to_string())?;
        match status.as_u16() == 503 && body.contains("broker_not_connected") {
            true => Ok(()),
            false => Err(format!("{status} {body}")),
        }
    })
    .await
}

/// `n` polls of an idle POS through `site`, one after another, each of
/// which must get qrgate's own answer.
async fn poll_idle_times(client: &reqwest::Client, site: &str, n: u32, when: &str) {
    for i in 0..n {
        if let Err(e) = poll_idle(client, site).await {
            panic!("poll {i} {when}: {e}");
        }
    }
}

/// A poll of an idle POS, as Mercado Pago sends it, through `site`: `Ok`
/// when it got qrgate's own answer (400, `unavailable`), else what came
/// instead.
async fn poll_idle(client: &reqwest::Client, site: &str) -> Result<(), String> {
    let r = client
        .get(format!("{site}/mp/pos/pump-1"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.text().await.map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match status.as_u16() == 400 && v["error"]["type"] == "unavailable" {
        true => Ok(()),
        false => Err(format!("{status} {body:?}")),
    }
}

const CADDYFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Caddyfile");

/// The real Caddy running deploy/Caddyfile on a free port of this host,
/// plain HTTP (no certificate), in front of `upstreams`; its log (JSON on
/// stderr) read as it comes.
struct Caddy {
    /// `http://127.0.0.1:{port}`.
    site: String,
    port: u16,
    log: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    _process: Killed,
    _home: tempfile::TempDir,
}

impl Caddy {
    async fn start(upstreams: &[&Qrgate]) -> Caddy {
        let home = tempfile::tempdir().unwrap();
        let port = free_port();
        let site = format!("http://127.0.0.1:{port}");
        let upstream: Vec<String> = upstreams
            .iter()
            .map(|q| format!("127.0.0.1:{}", q.listen.port()))
            .collect();
        let mut child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config", CADDYFILE])
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("QRGATE_SITE", &site)
            .env("QRGATE_UPSTREAM", upstream.join(" "))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Read to the end whoever listens, so Caddy never blocks.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        wait::wait_for("caddy answering", || async {
            reqwest::get(format!("{site}/")).await.is_ok()
        })
        .await;
        Caddy {
            site,
            port,
            log,
            _process: Killed(child),
            _home: home,
        }
    }

    /// Waits until each of `instances` has failed `times` of Caddy's
    /// /readyz checks (an answer other than 200, or none), counted from
    /// now. Twice is sure to be acted on: Caddy logs a failed check just
    /// before it marks the instance down.
    async fn until_checks_fail(&mut self, instances: &[&Qrgate], times: usize) {
        let mut failed: std::collections::HashMap<String, usize> = instances
            .iter()
            .map(|q| (format!("127.0.0.1:{}", q.listen.port()), 0))
            .collect();
        let log = &mut self.log;
        wait::wait_for_event(format!("Caddy's checks failing {failed:?}"), async {
            while let Some(v) = log.recv().await {
                let host = v["host"].as_str().unwrap_or_default();
                if v["msg"] == "unexpected status code" || v["msg"] == "HTTP request failed" {
                    if let Some(n) = failed.get_mut(host) {
                        *n += 1;
                    }
                }
                if failed.values().all(|n| *n >= times) {
                    return;
                }
            }
            panic!("Caddy's log ended");
        })
        .await
    }

    /// Forgets what Caddy logged so far: a wait counts from here.
    fn forget_log(&mut self) {
        while self.log.try_recv().is_ok() {}
    }

    /// Waits for Caddy to find `instance` ready again.
    async fn until_checked_ready(&mut self, instance: &Qrgate) {
        let host = format!("127.0.0.1:{}", instance.listen.port());
        let log = &mut self.log;
        wait::wait_for_event(format!("Caddy finding {host} up"), async {
            while let Some(v) = log.recv().await {
                if v["msg"] == "host is up" && v["host"] == host.as_str() {
                    return;
                }
            }
            panic!("Caddy's log ended");
        })
        .await
    }
}

/// `mosquitto -p port`, killed when dropped.
fn mosquitto(port: u16) -> Killed {
    Killed(
        Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
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
