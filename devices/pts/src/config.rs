//! The bridge's configuration: a TOML file (deploy/… or
//! docs/devices/pts2.md shows one), checked whole before anything starts,
//! every bad key reported at once. Passwords are never in the file: each is
//! named by an environment variable (`…_env`) or a file (`…_file`), and no
//! `Debug` of this module prints one.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Login, Scheme};
use crate::controller::parse_pin;
use crate::decide::Currency;

/// How the bridge reaches the controller.
#[derive(Debug, Clone)]
pub enum Link {
    /// The bridge calls the controller's web server.
    Http {
        url: String,
        login: Login,
        scheme: Scheme,
        /// SHA-256 of the controller's certificate (hex), for `https`.
        certificate_sha256: Option<String>,
    },
    /// The controller connects to the bridge (remote mode): the bridge
    /// listens for its WebSocket; `login`, when set, is the user the
    /// controller must present.
    Remote {
        listen: SocketAddr,
        login: Option<Login>,
    },
}

/// Where qrgate's broker is.
#[derive(Debug, Clone)]
pub struct Mqtt {
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
}

/// One pump and its POS.
#[derive(Clone)]
pub struct Pump {
    pub pump: u16,
    pub pos_id: String,
    /// The POS's broker password (its username is the POS id), if the broker
    /// asks for one.
    pub mqtt_password: Option<String>,
    /// Titles by nozzle, for nozzles not linked to fuel grades.
    pub nozzles: Vec<String>,
}

impl std::fmt::Debug for Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pump")
            .field("pump", &self.pump)
            .field("pos_id", &self.pos_id)
            .field(
                "mqtt_password",
                &self.mqtt_password.as_ref().map(|_| "<redacted>"),
            )
            .field("nozzles", &self.nozzles)
            .finish()
    }
}

/// The whole configuration, checked.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub link: Link,
    /// The controller's unique identifier; asked of the controller
    /// (`GetUniqueIdentifier`) when not set.
    pub controller_id: Option<String>,
    pub mqtt: Mqtt,
    pub currency: Currency,
    /// A payment form of the controller (1 to 10) to record QR payments with.
    pub payment_form: Option<u8>,
    pub poll_interval: Duration,
    pub pumps: Vec<Pump>,
    /// Where the bridge records the transactions it closed until it has
    /// said `delivered` for them (`state_dir`): without it, a paid sale
    /// found closed after a restart is delivered `ok: false`.
    pub state_dir: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    currency: String,
    controller: Option<ControllerFile>,
    remote: Option<RemoteFile>,
    #[serde(default)]
    mqtt: MqttFile,
    payment_form_id: Option<u8>,
    poll_interval_ms: Option<u64>,
    state_dir: Option<std::path::PathBuf>,
    #[serde(default)]
    pumps: Vec<PumpFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerFile {
    url: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
    auth: Option<Scheme>,
    certificate_sha256: Option<String>,
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteFile {
    listen: String,
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttFile {
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_prefix")]
    topic_prefix: String,
}

impl Default for MqttFile {
    fn default() -> Self {
        MqttFile {
            host: default_host(),
            port: default_port(),
            topic_prefix: default_prefix(),
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "qrgate".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PumpFile {
    pump: u16,
    pos_id: String,
    mqtt_password_env: Option<String>,
    #[serde(default)]
    nozzles: Vec<String>,
}

/// A password named by `VAR` or by a file; `what` names the key in errors.
fn secret(
    what: &str,
    var: Option<&str>,
    file: Option<&str>,
    env: &impl Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) -> Option<String> {
    match (var, file) {
        (Some(_), Some(_)) => {
            errors.push(format!(
                "{what}: set password_env or password_file, not both"
            ));
            None
        }
        (Some(var), None) => {
            let value = env(var);
            if value.is_none() {
                errors.push(format!(
                    "{what}.password_env: the variable {var} is not set"
                ));
            }
            value
        }
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                errors.push(format!("{what}.password_file: {path}: {e}"));
                None
            }
        },
        (None, None) => None,
    }
}

fn pos_id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reads and checks a configuration; `env` looks up environment variables.
/// Every problem is listed, each naming its key.
pub fn parse(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<BridgeConfig, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();

    let currency = file.currency.trim();
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_alphabetic()) {
        errors.push(format!(
            "currency: {currency:?} is not a three-letter code (ARS, BRL, CLP…)"
        ));
    }
    let link = match (&file.controller, &file.remote) {
        (Some(ControllerFile { url: Some(_), .. }), Some(_)) => {
            errors.push("controller.url and [remote]: the bridge either calls the controller or listens for it, not both".into());
            None
        }
        (Some(c @ ControllerFile { url: Some(url), .. }), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                errors.push(format!(
                    "controller.url: {url:?} is not an http:// or https:// URL"
                ));
            }
            let pin = c.certificate_sha256.clone();
            match &pin {
                Some(p) => {
                    if let Err(e) = parse_pin(p) {
                        errors.push(format!("controller.{e}"));
                    }
                }
                None if url.starts_with("https://") => errors.push(
                    "controller.certificate_sha256: an https controller needs its certificate pinned (its SHA-256, as `openssl x509 -fingerprint -sha256` prints it)".into(),
                ),
                None => {}
            }
            let user = c.user.clone().unwrap_or_default();
            if user.is_empty() {
                errors.push(
                    "controller.user: the controller's user for the bridge is required".into(),
                );
            }
            let password = secret(
                "controller",
                c.password_env.as_deref(),
                c.password_file.as_deref(),
                &env,
                &mut errors,
            );
            if password.is_none() && c.password_env.is_none() && c.password_file.is_none() {
                errors.push("controller: password_env or password_file is required".into());
            }
            Some(Link::Http {
                url: url.clone(),
                login: Login {
                    user,
                    password: password.unwrap_or_default(),
                },
                scheme: c.auth.unwrap_or(Scheme::Digest),
                certificate_sha256: pin,
            })
        }
        (_, Some(r)) => {
            let listen = r.listen.parse::<SocketAddr>();
            if listen.is_err() {
                errors.push(format!(
                    "remote.listen: {:?} is not an address and port",
                    r.listen
                ));
            }
            let password = secret(
                "remote",
                r.password_env.as_deref(),
                r.password_file.as_deref(),
                &env,
                &mut errors,
            );
            let login = r.user.clone().map(|user| Login {
                user,
                password: password.unwrap_or_default(),
            });
            listen.ok().map(|listen| Link::Remote { listen, login })
        }
        _ => {
            errors.push(
                "controller.url or [remote] listen: how to reach the controller is required".into(),
            );
            None
        }
    };
    let controller_id = file.controller.as_ref().and_then(|c| c.id.clone());
    if let Some(id) = &controller_id {
        if id.is_empty() || id.len() > 24 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            errors.push(format!(
                "controller.id: {id:?} is not up to 24 hexadecimal digits"
            ));
        }
    }
    if let Some(f) = file.payment_form_id {
        if !(1..=10).contains(&f) {
            errors.push(format!(
                "payment_form_id: {f} is not a payment form of the controller (1 to 10)"
            ));
        }
    }
    let poll_ms = file.poll_interval_ms.unwrap_or(1000);
    if !(200..=10_000).contains(&poll_ms) {
        errors.push(format!(
            "poll_interval_ms: {poll_ms} is outside 200 to 10000"
        ));
    }
    if file.pumps.is_empty() {
        errors.push("pumps: at least one [[pumps]] with pump and pos_id is required".into());
    }
    let mut pumps = Vec::new();
    for (i, p) in file.pumps.iter().enumerate() {
        let key = format!("pumps[{i}]");
        if !(1..=120).contains(&p.pump) {
            errors.push(format!(
                "{key}.pump: {} is not a pump of the controller (1 to 120)",
                p.pump
            ));
        }
        if !pos_id_ok(&p.pos_id) {
            errors.push(format!(
                "{key}.pos_id: {:?} is not a POS id (1 to 64 letters, digits, -, _, .)",
                p.pos_id
            ));
        }
        if file.pumps[..i].iter().any(|q| q.pump == p.pump) {
            errors.push(format!("{key}.pump: pump {} is mapped twice", p.pump));
        }
        if file.pumps[..i].iter().any(|q| q.pos_id == p.pos_id) {
            errors.push(format!("{key}.pos_id: {} is mapped twice", p.pos_id));
        }
        let mqtt_password = secret(
            &key,
            p.mqtt_password_env.as_deref(),
            None,
            &env,
            &mut errors,
        );
        pumps.push(Pump {
            pump: p.pump,
            pos_id: p.pos_id.clone(),
            mqtt_password,
            nozzles: p.nozzles.clone(),
        });
    }
    match link {
        Some(link) if errors.is_empty() => Ok(BridgeConfig {
            link,
            controller_id,
            mqtt: Mqtt {
                host: file.mqtt.host,
                port: file.mqtt.port,
                topic_prefix: file.mqtt.topic_prefix,
            },
            currency: Currency::new(currency),
            payment_form: file.payment_form_id,
            poll_interval: Duration::from_millis(poll_ms),
            pumps,
            state_dir: file.state_dir,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "PTS_PASSWORD" || name == "PUMP1_MQTT").then(|| "s3cret".to_owned())
    }

    const GOOD: &str = r#"
currency = "ARS"
payment_form_id = 4
[controller]
url = "https://192.168.1.117/jsonPTS"
user = "qrgate"
password_env = "PTS_PASSWORD"
auth = "digest"
certificate_sha256 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
[mqtt]
host = "10.0.0.5"
[[pumps]]
pump = 1
pos_id = "pump-1"
mqtt_password_env = "PUMP1_MQTT"
nozzles = ["Super 95", "Diesel"]
[[pumps]]
pump = 2
pos_id = "pump-2"
"#;

    #[test]
    fn a_stations_configuration_reads_with_its_secrets_from_the_environment() {
        let c = parse(GOOD, env).unwrap();
        let Link::Http { login, scheme, .. } = &c.link else {
            panic!()
        };
        assert_eq!(
            (login.password.as_str(), *scheme),
            ("s3cret", Scheme::Digest)
        );
        assert_eq!(c.currency.decimals, 2);
        assert_eq!((c.mqtt.host.as_str(), c.mqtt.port), ("10.0.0.5", 1883));
        assert_eq!(c.pumps[0].mqtt_password.as_deref(), Some("s3cret"));
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_example_configuration_reads() {
        let text = include_str!("../qrgate-pts.example.toml");
        let c = parse(text, |_| Some("x".into())).unwrap();
        assert_eq!(c.pumps.len(), 2);
        assert_eq!(c.payment_form, Some(4));
        assert_eq!(c.pumps[1].nozzles, ["Super 95", "Diesel"]);
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        let bad = GOOD
            .replace("currency = \"ARS\"", "currency = \"pesos\"")
            .replace("payment_form_id = 4", "payment_form_id = 11")
            .replace("certificate_sha256 = \"AB:CD", "certificate_sha256 = \"zz")
            .replace("pos_id = \"pump-2\"", "pos_id = \"pump-1\"")
            .replace("pump = 2", "pump = 121");
        let errors = parse(&bad, |_| None).unwrap_err();
        let all = errors.join("\n");
        for key in [
            "currency",
            "payment_form_id",
            "controller.certificate_sha256",
            "pumps[1].pos_id",
            "pumps[1].pump",
            "PTS_PASSWORD",
            "PUMP1_MQTT",
        ] {
            assert!(all.contains(key), "{key} not in:\n{all}");
        }
    }

    #[test]
    fn https_needs_a_pin_and_remote_mode_excludes_a_url() {
        let no_pin = GOOD
            .lines()
            .filter(|l| !l.starts_with("certificate_sha256"))
            .collect::<Vec<_>>()
            .join("\n");
        let errors = parse(&no_pin, env).unwrap_err();
        assert!(errors[0].contains("certificate_sha256"), "{errors:?}");

        let both = format!("{GOOD}\n[remote]\nlisten = \"0.0.0.0:8081\"\n");
        assert!(parse(&both, env).unwrap_err()[0].contains("not both"));

        let remote = r#"
currency = "CLP"
[remote]
listen = "0.0.0.0:8081"
[[pumps]]
pump = 1
pos_id = "pump-1"
"#;
        let c = parse(remote, env).unwrap();
        assert!(matches!(c.link, Link::Remote { login: None, .. }));
        assert_eq!(c.currency.decimals, 0);
        assert!(parse("currency = \"ARS\"\nunknown = 1", env).is_err());
    }
}
