//! Typed configuration: built-in defaults < TOML file < `QRGATE_` environment
//! (`QRGATE_HTTP__LISTEN=...`: section and key joined by `__`), then checked
//! into types. Every bad key is reported by name, all at once, before anything
//! binds. Secrets come only from the environment.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::Currency;
use crate::orders::{PosConfig, PosId, PosKind};

/// The environment variable that holds Mercado Pago's access token.
pub const ACCESS_TOKEN_ENV: &str = "QRGATE_MP_ACCESS_TOKEN";

/// The environment variable that holds qrgate's own MQTT password.
pub const MQTT_PASSWORD_ENV: &str = "QRGATE_MQTT_PASSWORD";

/// A value that must never reach a log, an error or a response.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd inside the process, listening on `embedded_listen`.
    Embedded,
    /// A broker already running (Mosquitto on the station server).
    External { host: String, port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Base of the URLs we hand to Mercado Pago, without a trailing `/`.
    pub public_url: String,
}

impl HttpConfig {
    pub fn notification_url(&self) -> String {
        format!("{}/mp/notifications", self.public_url)
    }
}

#[derive(Debug, Clone)]
pub struct MercadoPagoConfig {
    pub api_base: String,
    pub collector_id: u64,
    pub sponsor_id: Option<u64>,
    pub access_token: Option<Secret>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub broker: Broker,
    pub embedded_listen: SocketAddr,
    pub topic_prefix: String,
    pub client_id: String,
    pub max_payload_bytes: usize,
    /// qrgate's own login at an external broker (Mosquitto with
    /// `allow_anonymous false`); the password comes from the environment.
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct OrdersConfig {
    pub ttl_secs: u64,
    /// Seconds after a sale is first served before reconciliation searches
    /// for its merchant orders (MP's contingency for lost notifications).
    pub reconcile_after_secs: u64,
    /// How long reconciliation keeps looking at a served sale that did not
    /// close (a late payment for it must still become `refund_due`).
    pub reconcile_window_secs: u64,
    /// `paid` is republished this often until the device confirms delivery.
    pub paid_republish_secs: u64,
    /// Refund late payments and failed deliveries through the API.
    pub auto_refund: bool,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// fsync at every commit (SQLite `synchronous = FULL`); off only for
    /// measurements.
    pub fsync: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub filter: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub http: HttpConfig,
    pub mercadopago: MercadoPagoConfig,
    pub mqtt: MqttConfig,
    pub orders: OrdersConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub pos: Vec<PosConfig>,
}

/// Start-up configuration errors, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

// ---- the file's shape -------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    http: RawHttp,
    mercadopago: RawMp,
    mqtt: RawMqtt,
    orders: RawOrders,
    store: RawStore,
    log: RawLog,
    pos: Vec<RawPos>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    public_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMp {
    api_base: String,
    collector_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sponsor_id: Option<u64>,
    timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    broker: String,
    embedded_listen: String,
    topic_prefix: String,
    client_id: String,
    max_payload_bytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrders {
    ttl_secs: u64,
    reconcile_after_secs: u64,
    reconcile_window_secs: u64,
    paid_republish_secs: u64,
    auto_refund: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: String,
    fsync: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
    filter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPos {
    id: String,
    kind: String,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_amount: Option<NumberOrText>,
}

/// A TOML value written as an integer or as a decimal string (`50000` or
/// `"49999.99"`); TOML floats would pass through `f64`, so they are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Integer(i64),
    Text(String),
}

fn default_currency() -> String {
    "ARS".into()
}

/// The first-run defaults: they run as they are, with two demo POS.
fn defaults() -> RawConfig {
    RawConfig {
        http: RawHttp {
            listen: "127.0.0.1:8080".into(),
            public_url: "http://127.0.0.1:8080".into(),
        },
        mercadopago: RawMp {
            api_base: "https://api.mercadopago.com".into(),
            collector_id: 178106235,
            sponsor_id: Some(334249281),
            timeout_ms: 5000,
        },
        mqtt: RawMqtt {
            broker: "embedded".into(),
            embedded_listen: "127.0.0.1:1883".into(),
            topic_prefix: "qrgate".into(),
            client_id: "qrgate".into(),
            max_payload_bytes: 16 * 1024,
            username: None,
        },
        orders: RawOrders {
            ttl_secs: 600,
            reconcile_after_secs: 10,
            reconcile_window_secs: 86_400,
            paid_republish_secs: 10,
            auto_refund: false,
        },
        store: RawStore {
            path: "qrgate.db".into(),
            fsync: true,
        },
        log: RawLog {
            format: "pretty".into(),
            filter: "info".into(),
        },
        pos: vec![
            RawPos {
                id: "pump-1".into(),
                kind: "fuel".into(),
                currency: "ARS".into(),
                ttl_secs: None,
                max_amount: None,
            },
            RawPos {
                id: "vending-1".into(),
                kind: "vending".into(),
                currency: "ARS".into(),
                ttl_secs: None,
                max_amount: None,
            },
        ],
    }
}

/// Default cap of one sale, in the currency's units: a full truck tank of
/// premium fuel in pesos fits; a typo with three extra zeros does not.
const DEFAULT_MAX_AMOUNT: i64 = 10_000_000;

impl Config {
    /// The first-run configuration, with nothing from file or environment.
    pub fn defaults() -> Config {
        validate(defaults(), None).expect("built-in defaults are valid")
    }

    /// Loads `path` (if any) over the defaults, then the `QRGATE_*__*`
    /// environment, then the access token from its own variable.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(defaults()));
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError(vec![format!(
                    "config file {} does not exist",
                    p.display()
                )]));
            }
            figment = figment.merge(Toml::file(p));
        }
        // Only `SECTION__KEY` variables are overrides; QRGATE_CONFIG,
        // QRGATE_MP_ACCESS_TOKEN and the like are not keys.
        figment = figment.merge(
            Env::prefixed("QRGATE_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        let raw: RawConfig = figment.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| {
                        let key = e.path.join(".");
                        if key.is_empty() {
                            format!("{}", e.kind)
                        } else {
                            format!("key `{key}`: {}", e.kind)
                        }
                    })
                    .collect(),
            )
        })?;
        if raw.pos.iter().any(|p| p.id.is_empty() && p.kind.is_empty()) {
            return Err(ConfigError(vec!["key `pos`: empty entry".into()]));
        }
        let secret = |name| {
            std::env::var(name)
                .ok()
                .filter(|t: &String| !t.trim().is_empty())
                .map(Secret::new)
        };
        let mut config = validate(raw, secret(ACCESS_TOKEN_ENV))?;
        config.mqtt.password = secret(MQTT_PASSWORD_ENV);
        if config.mqtt.password.is_some() && config.mqtt.username.is_none() {
            return Err(ConfigError(vec![format!(
                "key `mqtt.username`: {MQTT_PASSWORD_ENV} is set but no username is configured"
            )]));
        }
        Ok(config)
    }
}

fn validate(raw: RawConfig, access_token: Option<Secret>) -> Result<Config, ConfigError> {
    let mut errors = Vec::new();
    let mut bad = |key: &str, msg: String| errors.push(format!("key `{key}`: {msg}"));

    let listen = raw
        .http
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            bad(
                "http.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    raw.http.listen
                ),
            )
        })
        .ok();
    let public_url = raw.http.public_url.trim_end_matches('/').to_owned();
    if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
        bad(
            "http.public_url",
            format!("{public_url:?} must start with http:// or https://"),
        );
    }
    let api_base = raw.mercadopago.api_base.trim_end_matches('/').to_owned();
    if !(api_base.starts_with("http://") || api_base.starts_with("https://")) {
        bad(
            "mercadopago.api_base",
            format!("{api_base:?} must start with http:// or https://"),
        );
    }
    if raw.mercadopago.collector_id == 0 {
        bad(
            "mercadopago.collector_id",
            "must be your Mercado Pago user id".into(),
        );
    }
    if raw.mercadopago.timeout_ms == 0 {
        bad("mercadopago.timeout_ms", "must be greater than 0".into());
    }
    let broker = match raw.mqtt.broker.as_str() {
        "embedded" => Some(Broker::Embedded),
        other => match parse_mqtt_url(other) {
            Some((host, port)) => Some(Broker::External { host, port }),
            None => {
                bad(
                    "mqtt.broker",
                    format!("{other:?} must be \"embedded\" or like \"mqtt://127.0.0.1:1883\""),
                );
                None
            }
        },
    };
    let embedded_listen = raw
        .mqtt
        .embedded_listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            bad(
                "mqtt.embedded_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:1883",
                    raw.mqtt.embedded_listen
                ),
            )
        })
        .ok();
    let prefix = raw.mqtt.topic_prefix.trim_matches('/').to_owned();
    if prefix.is_empty() || prefix.contains(['+', '#']) {
        bad(
            "mqtt.topic_prefix",
            "must be a non-empty topic without wildcards".into(),
        );
    }
    if raw.mqtt.client_id.is_empty() || raw.mqtt.client_id.len() > 64 {
        bad("mqtt.client_id", "must be 1 to 64 characters".into());
    }
    if !(256..=1024 * 1024).contains(&raw.mqtt.max_payload_bytes) {
        bad(
            "mqtt.max_payload_bytes",
            "must be between 256 and 1048576".into(),
        );
    }
    let format = match raw.log.format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            bad(
                "log.format",
                format!("{other:?} must be \"pretty\" or \"json\""),
            );
            LogFormat::Pretty
        }
    };
    if raw.orders.paid_republish_secs == 0 {
        bad("orders.paid_republish_secs", "must be at least 1".into());
    }
    if raw.orders.reconcile_window_secs < raw.orders.reconcile_after_secs {
        bad(
            "orders.reconcile_window_secs",
            "must not be shorter than orders.reconcile_after_secs".into(),
        );
    }
    if raw.store.path.trim().is_empty() {
        bad("store.path", "must name a database file".into());
    }

    let mut pos = Vec::new();
    if raw.pos.is_empty() {
        bad("pos", "configure at least one [[pos]]".into());
    }
    for (i, p) in raw.pos.iter().enumerate() {
        let key = |k: &str| format!("pos.{i}.{k}");
        let id = PosId::parse(&p.id).map_err(|e| bad(&key("id"), e)).ok();
        let kind = match p.kind.as_str() {
            "fuel" => Some(PosKind::Fuel),
            "vending" => Some(PosKind::Vending),
            other => {
                bad(
                    &key("kind"),
                    format!("{other:?} must be \"fuel\" or \"vending\""),
                );
                None
            }
        };
        let currency = p
            .currency
            .parse::<Currency>()
            .map_err(|e| {
                bad(
                    &key("currency"),
                    format!("{e}; one of ARS BRL CLP COP MXN PEN UYU"),
                )
            })
            .ok();
        let max_amount = match &p.max_amount {
            None => Some(Decimal::from(DEFAULT_MAX_AMOUNT)),
            Some(NumberOrText::Integer(n)) if *n > 0 => Some(Decimal::from(*n)),
            Some(NumberOrText::Integer(n)) => {
                bad(&key("max_amount"), format!("{n} must be positive"));
                None
            }
            Some(NumberOrText::Text(s)) => match crate::money::parse_decimal(s) {
                Ok(d) if d > Decimal::ZERO => Some(d),
                _ => {
                    bad(
                        &key("max_amount"),
                        format!("{s:?} must be a positive decimal"),
                    );
                    None
                }
            },
        };
        if let (Some(id), Some(kind), Some(currency), Some(max_amount)) =
            (id, kind, currency, max_amount)
        {
            if pos.iter().any(|q: &PosConfig| q.id == id) {
                bad(&key("id"), format!("{id} is configured twice"));
            }
            let ttl = p.ttl_secs.unwrap_or(raw.orders.ttl_secs);
            pos.push(PosConfig {
                id,
                kind,
                currency,
                ttl_secs: (ttl > 0).then_some(ttl),
                max_amount,
            });
        }
    }

    if !errors.is_empty() {
        return Err(ConfigError(errors));
    }
    let (Some(listen), Some(broker), Some(embedded_listen)) = (listen, broker, embedded_listen)
    else {
        return Err(ConfigError(vec!["invalid configuration".into()]));
    };
    Ok(Config {
        http: HttpConfig { listen, public_url },
        mercadopago: MercadoPagoConfig {
            api_base,
            collector_id: raw.mercadopago.collector_id,
            sponsor_id: raw.mercadopago.sponsor_id,
            access_token,
            timeout_ms: raw.mercadopago.timeout_ms,
        },
        mqtt: MqttConfig {
            broker,
            embedded_listen,
            topic_prefix: prefix,
            client_id: raw.mqtt.client_id,
            max_payload_bytes: raw.mqtt.max_payload_bytes,
            username: raw.mqtt.username.filter(|u| !u.is_empty()),
            password: None,
        },
        orders: OrdersConfig {
            ttl_secs: raw.orders.ttl_secs,
            reconcile_after_secs: raw.orders.reconcile_after_secs,
            reconcile_window_secs: raw.orders.reconcile_window_secs,
            paid_republish_secs: raw.orders.paid_republish_secs,
            auto_refund: raw.orders.auto_refund,
        },
        store: StoreConfig {
            path: PathBuf::from(raw.store.path),
            fsync: raw.store.fsync,
        },
        log: LogConfig {
            format,
            filter: raw.log.filter,
        },
        pos,
    })
}

fn parse_mqtt_url(s: &str) -> Option<(String, u16)> {
    let rest = s
        .strip_prefix("mqtt://")
        .or_else(|| s.strip_prefix("tcp://"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Config::load(Some(f.path()))
    }

    #[test]
    fn the_defaults_run_two_demo_pos_on_the_embedded_broker() {
        let c = Config::defaults();
        assert_eq!(c.mqtt.broker, Broker::Embedded);
        let ids: Vec<_> = c.pos.iter().map(|p| p.id.as_str().to_owned()).collect();
        assert_eq!(ids, ["pump-1", "vending-1"]);
        assert_eq!(
            c.http.notification_url(),
            "http://127.0.0.1:8080/mp/notifications"
        );
    }

    #[test]
    fn a_file_overrides_the_defaults_and_replaces_the_pos_list() {
        let c = load_toml(
            r#"
            [http]
            listen = "0.0.0.0:9000"
            public_url = "https://station.example.com/"
            [mqtt]
            broker = "mqtt://10.0.0.2:1884"
            [[pos]]
            id = "pump-3"
            kind = "fuel"
            currency = "CLP"
            ttl_secs = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.http.public_url, "https://station.example.com");
        assert_eq!(
            c.mqtt.broker,
            Broker::External {
                host: "10.0.0.2".into(),
                port: 1884
            }
        );
        assert_eq!(c.pos.len(), 1);
        assert_eq!(c.pos[0].currency, Currency::Clp);
        assert_eq!(c.pos[0].ttl_secs, None);
    }

    #[test]
    fn bad_keys_are_named() {
        let e = load_toml("[http]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.to_string().contains("http.listen"), "{e}");
        let e = load_toml("[http]\nlistn = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = load_toml("[[pos]]\nid = \"pump 1\"\nkind = \"fuel\"\n").unwrap_err();
        assert!(e.to_string().contains("pos.0.id"), "{e}");
        let e = load_toml("[[pos]]\nid = \"p\"\nkind = \"diesel\"\n").unwrap_err();
        assert!(e.to_string().contains("pos.0.kind"), "{e}");
        let e = load_toml("[mqtt]\nbroker = \"amqp://x\"\n").unwrap_err();
        assert!(e.to_string().contains("mqtt.broker"), "{e}");
        let e = load_toml("[mercadopago]\naccess_token = \"APP_USR-1\"\n").unwrap_err();
        assert!(e.to_string().contains("access_token"), "{e}");
        assert!(!e.to_string().contains("APP_USR-1"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("APP_USR-123")), "Secret(***)");
    }
}
