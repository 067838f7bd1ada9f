//! Typed configuration: built-in defaults < TOML file < `QRGATE_` environment
//! (`QRGATE_HTTP__LISTEN=...`: section and key joined by `__`), then checked
//! into types. Every bad key is reported by name, all at once, before anything
//! binds. Secrets never come from the file: the environment, a file it names
//! or a systemd credential holds each one (`secrets`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Currency, Site};
use crate::orders::{mp_external_id, PollProtocol, PosConfig, PosId, PosKind, PosMode};

pub mod secrets;

/// The exit status of every subcommand stopped by its configuration
/// (sysexits' `EX_CONFIG`), so a supervisor can tell it from a crash.
pub const EX_CONFIG: u8 = 78;

/// The configuration file, when `--config` is not given.
pub const CONFIG_ENV: &str = "QRGATE_CONFIG";

/// The configuration file when neither `--config` nor `QRGATE_CONFIG` names
/// one.
pub const SYSTEM_CONFIG: &str = "/etc/qrgate/qrgate.toml";

/// The environment variable that holds Mercado Pago's access token.
pub const ACCESS_TOKEN_ENV: &str = "QRGATE_MP_ACCESS_TOKEN";

/// The environment variable that holds qrgate's own MQTT password.
pub const MQTT_PASSWORD_ENV: &str = "QRGATE_MQTT_PASSWORD";

/// The environment variable that holds the operator's admin token.
pub const ADMIN_TOKEN_ENV: &str = "QRGATE_ADMIN_TOKEN";

/// The environment variable that holds the webhook signing secret.
pub const WEBHOOK_SECRET_ENV: &str = "QRGATE_MP_WEBHOOK_SECRET";

/// The environment variable that holds the read-only token of `/metrics`.
pub const METRICS_TOKEN_ENV: &str = "QRGATE_METRICS_TOKEN";

pub use crate::store::postgres::STORE_PASSWORD_ENV;

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

/// Replaces `[log] filter` when set.
pub const LOG_FILTER_ENV: &str = "RUST_LOG";

/// Every environment variable qrgate reads, with its default, for `--help`
/// and docs/operations.md (a test holds the two together).
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (CONFIG_ENV, "the configuration file, when --config is not given (default: /etc/qrgate/qrgate.toml if it exists, else the development defaults)"),
    (ACCESS_TOKEN_ENV, "Mercado Pago's access token (default: none; payments cannot be verified)"),
    (WEBHOOK_SECRET_ENV, "the secret of panel-configured webhooks (default: none)"),
    (ADMIN_TOKEN_ENV, "the operator's token, 16 characters or more (default: none; console on loopback only)"),
    (METRICS_TOKEN_ENV, "a read-only token for /metrics alone (default: none)"),
    (MQTT_PASSWORD_ENV, "qrgate's password at an external broker (default: none)"),
    (STORE_PASSWORD_ENV, "the PostgreSQL password of [store] url (default: none)"),
    ("<VAR>_FILE", "a file holding the secret <VAR> (any variable above, or one a config key names)"),
    (secrets::CREDENTIALS_DIRECTORY_ENV, "systemd's credentials: <VAR> lower-cased without QRGATE_ (mp_access_token), and device_passwords"),
    ("QRGATE_<SECTION>__<KEY>", "overrides one config key (QRGATE_HTTP__LISTEN=0.0.0.0:8080)"),
    (LOG_FILTER_ENV, "replaces [log] filter (default: info)"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd inside the process, listening on `embedded_listen`.
    Embedded,
    /// A broker already running (Mosquitto on the station server).
    External { host: String, port: u16, tls: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (a service, a pipe), text when it is.
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Base of the URLs we hand to Mercado Pago, without a trailing `/`.
    pub public_url: String,
    /// `[http] public_url` is not set: `public_url` is `listen`'s.
    pub public_url_follows_listen: bool,
    /// The `key` a poll must carry, per POS (its own, or the global one).
    pub poll_keys: PollKeys,
    pub notification_rate_per_sec: u32,
    pub notification_burst: u32,
    /// A request's head and body must arrive within this time of its first
    /// byte (and a new connection must send its head within it), or the
    /// connection is answered 408 and closed.
    pub request_timeout: std::time::Duration,
    /// Open connections one source may hold (an IPv6 source is its /64);
    /// `0`: no cap.
    pub max_connections_per_address: u32,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the client
    /// (`http::forwarded`); empty: every peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Secrets in the POS URLs registered with Mercado Pago, so the URL of a
/// POS cannot be guessed from its id.
#[derive(Debug, Clone, Default)]
pub struct PollKeys {
    pub global: Option<Secret>,
    pub per_pos: std::collections::HashMap<PosId, Secret>,
}

impl PollKeys {
    pub fn for_pos(&self, pos: &PosId) -> Option<&Secret> {
        self.per_pos.get(pos).or(self.global.as_ref())
    }
}

impl HttpConfig {
    pub fn notification_url(&self) -> String {
        format!("{}/mp/notifications", self.public_url)
    }

    /// The POS URLs' pattern as logs show it: the poll key masked.
    pub fn pos_url_shown(&self) -> String {
        let keyed = self.poll_keys.global.is_some() || !self.poll_keys.per_pos.is_empty();
        format!(
            "{}/mp/pos/{{pos_id}}{}",
            self.public_url,
            if keyed { "?key=***" } else { "" }
        )
    }
}

#[derive(Debug, Clone)]
pub struct MercadoPagoConfig {
    pub api_base: String,
    pub collector_id: u64,
    pub sponsor_id: Option<u64>,
    pub access_token: Option<Secret>,
    pub timeout_ms: u64,
    /// The secret of panel-configured webhooks; when set, a notification
    /// that carries `x-signature` must verify.
    pub webhook_secret: Option<Secret>,
    pub signature_tolerance_secs: u64,
    /// The default for unattended POS; `[[pos]] poll_protocol` overrides it.
    pub poll_protocol: PollProtocol,
    pub attended_api: AttendedApi,
    /// The account's site; `None` when not configured (then each POS's
    /// currency names it).
    pub site: Option<Site>,
    /// How long attended orders live at Mercado Pago, and when qrgate
    /// places them again.
    pub attended_order: AttendedOrderLife,
    /// How often the access token is checked against Mercado Pago
    /// (`mercadopago::account_check`); `None`: never.
    pub token_check: Option<std::time::Duration>,
}

/// Which Mercado Pago API places orders on attended POS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttendedApi {
    /// `PUT /instore/qr/seller/collectors/…/orders` (MP's QR attended guide).
    Instore,
    /// `POST /mpmobile/instore/qr/…` (older accounts).
    Legacy,
    /// `POST /v1/orders` (MP's Orders API).
    Orders,
}

/// Mercado Pago's legacy attended API takes no expiry: its orders live its
/// own 10 minutes, whatever qrgate would like.
pub const LEGACY_ORDER_LIFETIME_SECS: u64 = 600;

/// How long an attended order stays payable at Mercado Pago when its sale
/// does not end first (a sale with `ttl_secs = 0`), and how long before
/// that qrgate places it again, so a pending sale always has an order to
/// pay (`[mercadopago] attended_order_lifetime_secs`,
/// `attended_renew_lead_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttendedOrderLife {
    pub lifetime_secs: u64,
    pub renew_lead_secs: u64,
}

impl Default for AttendedOrderLife {
    /// Mercado Pago's own default lifetime (10 minutes), renewed a minute
    /// ahead: room for a few retries with backoff through a short outage.
    fn default() -> Self {
        AttendedOrderLife {
            lifetime_secs: 600,
            renew_lead_secs: 60,
        }
    }
}

impl AttendedOrderLife {
    /// The lifetime `api` really gives an order.
    pub fn lifetime_secs_for(&self, api: AttendedApi) -> u64 {
        match api {
            AttendedApi::Legacy => self.lifetime_secs.min(LEGACY_ORDER_LIFETIME_SECS),
            AttendedApi::Instore | AttendedApi::Orders => self.lifetime_secs,
        }
    }
}

/// A store as `[[stores]]` describes it, for `qrgate pos register`.
#[derive(Debug, Clone, PartialEq)]
pub struct MpStore {
    /// The store's external id at Mercado Pago.
    pub id: String,
    pub name: String,
    pub location: StoreLocation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreLocation {
    pub street_name: String,
    pub street_number: String,
    pub city_name: String,
    pub state_name: String,
    // Coordinates are not money: MP takes them as JSON numbers.
    pub latitude: f64,
    pub longitude: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// What `qrgate pos register` needs of a POS beyond what the book needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PosRegistration {
    pub name: Option<String>,
    /// The merchant category code (MCC); fuel POS default to the site's
    /// gas-station code.
    pub category: Option<u32>,
}

/// A POS's allowance: `per_sec` messages a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

/// A login's allowance: packets a second on average, and at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub per_sec: u32,
    pub burst: u32,
}

impl Default for Allowance {
    /// 200 times a POS's default rate: no device keeping to its own rate
    /// waits, and 50 devices flooding at once add up to what qrgate reads.
    fn default() -> Allowance {
        Allowance {
            per_sec: 1_000,
            burst: 2_000,
        }
    }
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
    /// The embedded broker lets anyone in (development only).
    pub allow_anonymous: bool,
    /// The embedded broker may listen beyond loopback although it cannot
    /// confine a device to its own topics.
    pub embedded_unconfined: bool,
    /// Who may log in to the embedded broker: each POS's device (username =
    /// POS id) and `[[mqtt.users]]`.
    pub users: Vec<(String, Secret)>,
    /// A TLS listener of the embedded broker.
    pub embedded_tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA that signs an external broker's certificate (`mqtts://`).
    pub tls_ca: Option<PathBuf>,
    /// What one POS's device may send: messages a second on average, and at
    /// once (`device_rate_per_sec`, `device_burst`). More is refused
    /// (`rate_limited`) before it is read, so one device cannot hold up the
    /// others.
    pub device_rate: Rate,
    /// What one login may send the embedded broker: packets a second on
    /// average, and at once (`embedded_ingress_per_sec`,
    /// `embedded_ingress_burst`). Past it the broker reads the device more
    /// slowly, so that no device fills it faster than qrgate reads it.
    pub embedded_ingress: Allowance,
    /// Refusals of one POS kept one by one (a log line and a store row each)
    /// per minute; the rest are summed into one line and row per minute.
    pub stored_rejections_per_minute: u32,
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
    /// A paid sale is searched again this long after it was paid, once per
    /// value, for payments Mercado Pago never notified.
    pub recheck_after_secs: Vec<u64>,
    /// The longest wait between two fetches of a notification that failed.
    pub notification_retry_max_secs: u64,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// PostgreSQL (`url`) instead of the SQLite file at `path`.
    pub url: Option<crate::store::postgres::PgTarget>,
    /// From `QRGATE_STORE_PASSWORD`, for `url`.
    pub password: Option<Secret>,
    pub path: PathBuf,
    /// fsync at every commit (SQLite `synchronous = FULL`); off only for
    /// measurements.
    pub fsync: bool,
    /// Ended sales leave the live database this long after they ended
    /// (`retain_days`).
    pub retain: std::time::Duration,
    /// Sales leaving the live database are first written to a dated JSON
    /// Lines file under `archive/` beside it.
    pub archive: bool,
    /// qrgate checkpoints the WAL itself; off when another process does
    /// (Litestream).
    pub checkpoints: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub filter: String,
}

/// The operator's listener: console, admin API, metrics.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None`: the console is off.
    pub listen: Option<SocketAddr>,
    /// The station's time zone, for the console's times.
    pub timezone: chrono_tz::Tz,
    /// From `QRGATE_ADMIN_TOKEN`; without it only loopback is allowed.
    pub token: Option<Secret>,
    /// From `QRGATE_METRICS_TOKEN`: reads `/metrics`, nothing else.
    pub metrics_token: Option<Secret>,
    /// Names the console answers to besides loopback and its listen
    /// address (lowercase, no port): a `Host` outside them is refused, so a
    /// DNS-rebinding page cannot reach the console under its own name.
    pub hosts: Vec<String>,
    /// A login session ends after this long without a request.
    pub session_idle: std::time::Duration,
    /// At most this many login sessions; a new login evicts the least
    /// recently used.
    pub max_sessions: usize,
    /// Marks the session cookie `Secure` on every answer (the console is
    /// reached through HTTPS).
    pub secure_cookies: bool,
}

/// The shortest operator token qrgate accepts: long enough that guessing
/// it, even at the login's unthrottled pace, is hopeless.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 16;

#[derive(Debug, Clone)]
pub struct Config {
    pub admin: AdminConfig,
    pub http: HttpConfig,
    pub mercadopago: MercadoPagoConfig,
    pub mqtt: MqttConfig,
    pub orders: OrdersConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub pos: Vec<PosConfig>,
    pub stores: Vec<MpStore>,
    pub registration: std::collections::HashMap<PosId, PosRegistration>,
}

/// Start-up configuration errors, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

// ---- the file's shape -------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: RawAdmin,
    http: RawHttp,
    mercadopago: RawMp,
    mqtt: RawMqtt,
    orders: RawOrders,
    store: RawStore,
    log: RawLog,
    pos: Vec<RawPos>,
    #[serde(default)]
    stores: Vec<RawMpStore>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    hosts: Vec<String>,
    session_idle_secs: u64,
    max_sessions: usize,
    secure_cookies: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMpStore {
    id: String,
    name: String,
    location: StoreLocation,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    /// `None`: `http://` and `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    poll_key: Option<String>,
    notification_rate_per_sec: u32,
    notification_burst: u32,
    #[serde(default = "default_request_timeout_secs")]
    request_timeout_secs: u64,
    /// `None`: [`default_max_connections_per_address`], or
    /// `notification_burst` when that is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_connections_per_address: Option<u32>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

fn default_request_timeout_secs() -> u64 {
    5
}

/// Mercado Pago's notification bursts (up to `notification_burst`, 200 by
/// default) may each come on a connection of their own, from few addresses,
/// and a reverse proxy on the same host is one address for everybody: 512
/// leaves room for both; one source still cannot take every descriptor.
fn default_max_connections_per_address() -> u32 {
    512
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMp {
    api_base: String,
    collector_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sponsor_id: Option<u64>,
    timeout_ms: u64,
    signature_tolerance_secs: u64,
    #[serde(default = "default_poll_protocol")]
    poll_protocol: String,
    #[serde(default = "default_attended_api")]
    attended_api: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    #[serde(default = "default_attended_order_lifetime_secs")]
    attended_order_lifetime_secs: u64,
    #[serde(default = "default_attended_renew_lead_secs")]
    attended_renew_lead_secs: u64,
    #[serde(default = "default_token_check_secs")]
    token_check_secs: u64,
}

/// Five minutes: a revoked token shows within one, at one cheap call each.
fn default_token_check_secs() -> u64 {
    300
}

fn default_attended_order_lifetime_secs() -> u64 {
    AttendedOrderLife::default().lifetime_secs
}

fn default_attended_renew_lead_secs() -> u64 {
    AttendedOrderLife::default().renew_lead_secs
}

fn default_poll_protocol() -> String {
    "v1".into()
}

fn default_attended_api() -> String {
    "instore".into()
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
    allow_anonymous: bool,
    embedded_unconfined: bool,
    #[serde(default)]
    users: Vec<RawUser>,
    /// Device logins, `username:password` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_passwords_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    embedded_tls_listen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_ca: Option<String>,
    device_rate_per_sec: u32,
    device_burst: u32,
    embedded_ingress_per_sec: u32,
    embedded_ingress_burst: u32,
    stored_rejections_per_minute: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    username: String,
    /// The environment variable holding the password.
    password_env: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrders {
    ttl_secs: u64,
    reconcile_after_secs: u64,
    reconcile_window_secs: u64,
    paid_republish_secs: u64,
    auto_refund: bool,
    recheck_after_secs: Vec<u64>,
    notification_retry_max_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    path: String,
    fsync: bool,
    retain_days: f64,
    archive: bool,
    checkpoints: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
    filter: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPos {
    id: String,
    kind: String,
    /// Defaults to the site's currency, or ARS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_amount: Option<NumberOrText>,
    /// The environment variable holding this POS's device password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_password_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    poll_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    poll_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    category: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mp_external_id: Option<String>,
}

/// A TOML value written as an integer or as a decimal string (`50000` or
/// `"49999.99"`); TOML floats would pass through `f64`, so they are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Integer(i64),
    Text(String),
}

/// The first-run defaults: they run as they are, with two demo POS.
fn defaults() -> RawConfig {
    RawConfig {
        admin: RawAdmin {
            listen: "127.0.0.1:9090".into(),
            timezone: None,
            hosts: Vec::new(),
            session_idle_secs: 1800,
            max_sessions: 32,
            secure_cookies: false,
        },
        http: RawHttp {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            poll_key: None,
            notification_rate_per_sec: 100,
            notification_burst: 200,
            request_timeout_secs: default_request_timeout_secs(),
            max_connections_per_address: None,
            trusted_proxies: Vec::new(),
        },
        mercadopago: RawMp {
            api_base: "https://api.mercadopago.com".into(),
            collector_id: 178106235,
            sponsor_id: Some(334249281),
            timeout_ms: 5000,
            signature_tolerance_secs: 300,
            poll_protocol: default_poll_protocol(),
            attended_api: default_attended_api(),
            site: None,
            attended_order_lifetime_secs: default_attended_order_lifetime_secs(),
            attended_renew_lead_secs: default_attended_renew_lead_secs(),
            token_check_secs: default_token_check_secs(),
        },
        mqtt: RawMqtt {
            broker: "embedded".into(),
            embedded_listen: "127.0.0.1:1883".into(),
            topic_prefix: "qrgate".into(),
            client_id: "qrgate".into(),
            max_payload_bytes: 16 * 1024,
            username: None,
            allow_anonymous: false,
            embedded_unconfined: false,
            users: Vec::new(),
            device_passwords_file: None,
            embedded_tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            // A pump or a machine sends a few messages per sale; a
            // reconnection adds its status and the redelivery of what was
            // not acknowledged, and a device catching up after an outage
            // sends what it kept: a burst of 50 lets that through.
            device_rate_per_sec: 5,
            device_burst: 50,
            // 200 times a POS's rate, and a small fraction of what qrgate
            // reads (mqtt::ingress).
            embedded_ingress_per_sec: Allowance::default().per_sec,
            embedded_ingress_burst: Allowance::default().burst,
            stored_rejections_per_minute: 20,
        },
        orders: RawOrders {
            ttl_secs: 600,
            reconcile_after_secs: 10,
            reconcile_window_secs: 86_400,
            paid_republish_secs: 10,
            auto_refund: false,
            recheck_after_secs: vec![600, 7200],
            notification_retry_max_secs: 60,
        },
        store: RawStore {
            url: None,
            path: "qrgate.db".into(),
            fsync: true,
            retain_days: 90.0,
            archive: false,
            checkpoints: true,
        },
        log: RawLog {
            format: "auto".into(),
            filter: "info".into(),
        },
        pos: vec![
            RawPos {
                id: "pump-1".into(),
                kind: "fuel".into(),
                ..RawPos::default()
            },
            RawPos {
                id: "vending-1".into(),
                kind: "vending".into(),
                ..RawPos::default()
            },
        ],
        stores: Vec::new(),
    }
}

/// Default cap of one sale, in the currency's units: a full truck tank of
/// premium fuel in pesos fits; a typo with three extra zeros does not.
const DEFAULT_MAX_AMOUNT: i64 = 10_000_000;

/// What a configuration is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `serve` and `check-config`: every secret the file names must be there.
    Serve,
    /// `pos register` and `pos list` talk only to Mercado Pago: the console's
    /// token and the MQTT passwords are neither needed nor checked.
    Registration,
}

/// The configuration file: `--config`, else `QRGATE_CONFIG`, else `system`
/// when it exists (`SYSTEM_CONFIG`; tests pass their own); `None` runs the
/// development defaults.
pub fn locate(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    system: &Path,
) -> Option<PathBuf> {
    flag.map(Path::to_owned)
        .or_else(|| {
            env(CONFIG_ENV)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| system.exists().then(|| system.to_owned()))
}

impl Config {
    /// The first-run configuration, with nothing from file or environment.
    pub fn defaults() -> Config {
        validate(first_run(defaults()), &|_| None, Purpose::Serve)
            .expect("built-in defaults are valid")
    }

    /// Loads `path` (if any) over the defaults, then the `QRGATE_*__*`
    /// environment, then the secrets.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(path, &|name| std::env::var(name).ok())
    }

    /// `load`, reading the environment through `env` (tests pass their own).
    pub fn load_with(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::load_for(path, env, Purpose::Serve)
    }

    /// `load_with` for `purpose`.
    pub fn load_for(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        purpose: Purpose,
    ) -> Result<Config, ConfigError> {
        validate(extract(path)?, env, purpose)
    }

    /// What `qrgate check-config` prints: the effective configuration as
    /// TOML, every secret in it masked, then where each secret comes from.
    pub fn check(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ConfigError> {
        let raw = extract(path)?;
        let config = validate(raw.clone(), env, Purpose::Serve)?;
        Ok(render_effective(raw, &config, env))
    }

    /// What an operator should know at every start, one warning each.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Broker::External { .. }, Some(user), None) =
            (&self.mqtt.broker, &self.mqtt.username, &self.mqtt.password)
        {
            out.push(format!(
                "[mqtt] username is {user:?} but no password is set ({MQTT_PASSWORD_ENV}, \
                 {MQTT_PASSWORD_ENV}_FILE or the credential {}): qrgate logs in with an empty one",
                secrets::credential_name(MQTT_PASSWORD_ENV)
            ));
        }
        if !is_loopback(&self.http.listen) {
            let unkeyed: Vec<&str> = self
                .pos
                .iter()
                .filter(|p| p.mode != PosMode::Attended)
                .filter(|p| self.http.poll_keys.for_pos(&p.id).is_none())
                .map(|p| p.id.as_str())
                .collect();
            if !unkeyed.is_empty() {
                out.push(format!(
                    "HTTP listens on {} with no poll key for {} POS ({}): anyone who guesses a POS URL \
                     can read its orders; set [http] poll_key (QRGATE_HTTP__POLL_KEY)",
                    self.http.listen,
                    unkeyed.len(),
                    unkeyed
                        .iter()
                        .take(5)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if self.http.public_url_follows_listen {
                out.push(format!(
                    "[http] public_url is not set: the POS URLs and notification_url use {}, \
                     which Mercado Pago cannot reach; set [http] public_url",
                    self.http.public_url
                ));
            }
        }
        out
    }
}

/// The defaults, the file and the `QRGATE_SECTION__KEY` environment, merged.
fn extract(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
    let base = match path {
        None => first_run(defaults()),
        Some(_) => defaults(),
    };
    let mut figment = Figment::from(Serialized::defaults(base));
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
                    if let figment::error::Kind::UnknownField(field, _) = &e.kind {
                        // The path names the field itself.
                        let table = key.strip_suffix(field.as_str()).unwrap_or(&key);
                        if let Some(how) = secret_home(table.trim_end_matches('.'), field) {
                            return format!(
                                "key `{key}`: secrets are never read from the configuration file; {how}"
                            );
                        }
                    }
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
    Ok(raw)
}

/// Where a secret written as a file key (`field` in the table at `key`)
/// belongs instead; `None` for a key that is no secret.
fn secret_home(key: &str, field: &str) -> Option<String> {
    let var = |v: &str| {
        format!(
            "set {v} (or {v}_FILE, or the credential {})",
            secrets::credential_name(v)
        )
    };
    let section = key.split('.').next().unwrap_or("");
    // `mqtt.users.0`, `pos.3`: an entry of a list.
    let entry = key.contains('.') || section == "pos";
    match (section, entry, field) {
        ("mercadopago", false, "access_token" | "token") => Some(var(ACCESS_TOKEN_ENV)),
        ("mercadopago", false, "webhook_secret") => Some(var(WEBHOOK_SECRET_ENV)),
        ("mqtt", false, "password") => Some(var(MQTT_PASSWORD_ENV)),
        ("admin", false, "token") => Some(var(ADMIN_TOKEN_ENV)),
        ("admin" | "http", false, "metrics_token") => Some(var(METRICS_TOKEN_ENV)),
        ("store", false, "password") => Some(var(STORE_PASSWORD_ENV)),
        ("pos", _, "password" | "device_password") => Some(
            "name the variable that holds it with device_password_env, or list it in \
             [mqtt] device_passwords_file"
                .into(),
        ),
        ("mqtt", true, "password") => Some(
            "name the variable that holds it with password_env, or list it in \
             [mqtt] device_passwords_file"
                .into(),
        ),
        _ => None,
    }
}

/// With no configuration file at all, the embedded broker takes anonymous
/// clients (on loopback): the first run must work with no setup.
fn first_run(mut raw: RawConfig) -> RawConfig {
    raw.mqtt.allow_anonymous = true;
    raw
}

/// An `[admin] hosts` entry as the console compares it: a DNS name or an
/// IP address, lowercase, IPv6 without brackets; `None` when it is not one
/// (a scheme, a port or a path).
fn admin_host_name(entry: &str) -> Option<String> {
    let e = entry.trim().to_ascii_lowercase();
    let bare = e
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(&e);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Some(bare.to_owned());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    (e.len() <= 253 && e.split('.').all(label_ok)).then_some(e)
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    purpose: Purpose,
) -> Result<Config, ConfigError> {
    let serving = purpose == Purpose::Serve;
    let sources = secrets::Sources::new(env);
    // Secrets' own errors name their variable, not a key.
    let secret_errors = std::cell::RefCell::new(Vec::new());
    let secret = |name: &str| match sources.get(name) {
        Ok(found) => found.map(|(s, _)| s),
        Err(e) => {
            secret_errors.borrow_mut().push(e);
            None
        }
    };
    let access_token = secret(ACCESS_TOKEN_ENV);
    let store_password = secret(STORE_PASSWORD_ENV);
    let webhook_secret = secret(WEBHOOK_SECRET_ENV);
    let serving_secret = |name: &str| if serving { secret(name) } else { None };
    let mqtt_password = serving_secret(MQTT_PASSWORD_ENV);
    let admin_token = serving_secret(ADMIN_TOKEN_ENV);
    let mut errors = Vec::new();
    let mut bad = |key: &str, msg: String| errors.push(format!("key `{key}`: {msg}"));
    let nonempty_key = |k: &Option<String>| k.as_deref().filter(|k| !k.is_empty()).map(Secret::new);

    if admin_token
        .as_ref()
        .is_some_and(|t| t.expose().trim().chars().count() < ADMIN_TOKEN_MIN_CHARS)
    {
        // Never the token itself, nor its length: only what to do.
        bad(
            ADMIN_TOKEN_ENV,
            format!(
                "the operator's token must be at least {ADMIN_TOKEN_MIN_CHARS} characters \
                 (make one with `openssl rand -hex 16`)"
            ),
        );
    }
    let metrics_token = secret(METRICS_TOKEN_ENV);
    if metrics_token
        .as_ref()
        .is_some_and(|t| t.expose().trim().chars().count() < ADMIN_TOKEN_MIN_CHARS)
    {
        bad(
            METRICS_TOKEN_ENV,
            format!(
                "the metrics token must be at least {ADMIN_TOKEN_MIN_CHARS} characters \
                 (make one with `openssl rand -hex 16`)"
            ),
        );
    }
    let trusted_proxies: Vec<ipnet::IpNet> = raw
        .http
        .trusted_proxies
        .iter()
        .filter_map(|text| match parse_cidr(text) {
            Some(net) => Some(net),
            None => {
                bad(
                    "http.trusted_proxies",
                    format!(
                        "{:?} is not an address or a CIDR block like \"127.0.0.1/32\" or \"fd00::/8\"",
                        text.chars().take(64).collect::<String>()
                    ),
                );
                None
            }
        })
        .collect();
    let admin_hosts: Vec<String> = raw
        .admin
        .hosts
        .iter()
        .filter_map(|h| match admin_host_name(h) {
            Some(name) => Some(name),
            None => {
                bad(
                    "admin.hosts",
                    format!(
                        "{h:?} is not a host name like \"console.station.example.com\" or an \
                         IP address (no scheme, port or path: the port is not matched)"
                    ),
                );
                None
            }
        })
        .collect();
    if !(1..=604_800).contains(&raw.admin.session_idle_secs) {
        bad(
            "admin.session_idle_secs",
            "must be between 1 and 604800 (a week)".into(),
        );
    }
    if !(1..=10_000).contains(&raw.admin.max_sessions) {
        bad("admin.max_sessions", "must be between 1 and 10000".into());
    }
    let admin_listen = match raw.admin.listen.trim() {
        "" => None,
        text => match text.parse::<SocketAddr>() {
            Ok(addr) if !addr.ip().is_loopback() && admin_token.is_none() && serving => {
                bad(
                    "admin.listen",
                    format!(
                        "{addr} is not a loopback address: the console there needs a token \
                         (set {ADMIN_TOKEN_ENV}), or listen on 127.0.0.1"
                    ),
                );
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                bad(
                    "admin.listen",
                    format!("{text:?} is not an address like 127.0.0.1:9090 (\"\" turns the console off)"),
                );
                None
            }
        },
    };
    let timezone = match raw.admin.timezone.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
            bad(
                "admin.timezone",
                format!("{name:?} is not an IANA time zone like America/Argentina/Buenos_Aires"),
            );
            chrono_tz::UTC
        }),
        _ => iana_time_zone::get_timezone()
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(chrono_tz::UTC),
    };
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
    let public_url_follows_listen = raw.http.public_url.is_none();
    let public_url = match &raw.http.public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", raw.http.listen.trim()),
    };
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
    let poll_protocol_of = |key: &str, v: &str, bad: &mut dyn FnMut(&str, String)| match v {
        "v1" => Some(PollProtocol::V1),
        "v2" => Some(PollProtocol::V2),
        other => {
            bad(key, format!("{other:?} must be \"v1\" or \"v2\""));
            None
        }
    };
    let poll_protocol = poll_protocol_of(
        "mercadopago.poll_protocol",
        &raw.mercadopago.poll_protocol,
        &mut bad,
    )
    .unwrap_or(PollProtocol::V1);
    let attended_api = match raw.mercadopago.attended_api.as_str() {
        "instore" => AttendedApi::Instore,
        "legacy" => AttendedApi::Legacy,
        "orders" => AttendedApi::Orders,
        other => {
            bad(
                "mercadopago.attended_api",
                format!("{other:?} must be \"instore\", \"legacy\" or \"orders\""),
            );
            AttendedApi::Instore
        }
    };
    let attended_order = AttendedOrderLife {
        lifetime_secs: raw.mercadopago.attended_order_lifetime_secs,
        renew_lead_secs: raw.mercadopago.attended_renew_lead_secs,
    };
    let lifetime = attended_order.lifetime_secs_for(attended_api);
    if attended_order.lifetime_secs == 0 {
        bad(
            "mercadopago.attended_order_lifetime_secs",
            "must be greater than 0".into(),
        );
    } else if attended_order.renew_lead_secs == 0 || attended_order.renew_lead_secs >= lifetime {
        // A lead of the whole lifetime would place the order again at once,
        // forever; none would place it again only once it is gone.
        bad(
            "mercadopago.attended_renew_lead_secs",
            format!(
                "must be at least 1 and less than the order's lifetime ({lifetime} s{})",
                if lifetime < attended_order.lifetime_secs {
                    ": the legacy API's orders live 10 minutes"
                } else {
                    ""
                }
            ),
        );
    }
    let site = raw.mercadopago.site.as_deref().and_then(|s| {
        s.parse::<Site>()
            .map_err(|e| bad("mercadopago.site", e))
            .ok()
    });
    let mut stores = Vec::new();
    let mut store_ids = std::collections::HashSet::new();
    for (i, s) in raw.stores.iter().enumerate() {
        let key = |k: &str| format!("stores.{i}.{k}");
        if s.id.trim().is_empty() || s.id.chars().count() > 60 {
            bad(
                &key("id"),
                "must be 1 to 60 characters (the store's external id at Mercado Pago)".into(),
            );
        } else if !store_ids.insert(s.id.clone()) {
            bad(&key("id"), format!("{:?} is configured twice", s.id));
        }
        if s.name.trim().is_empty() {
            bad(&key("name"), "must not be empty".into());
        }
        let l = &s.location;
        for (field, value) in [
            ("street_name", &l.street_name),
            ("street_number", &l.street_number),
            ("city_name", &l.city_name),
            ("state_name", &l.state_name),
        ] {
            if value.trim().is_empty() {
                bad(
                    &key(&format!("location.{field}")),
                    "must not be empty".into(),
                );
            }
        }
        if !(-90.0..=90.0).contains(&l.latitude) || !(-180.0..=180.0).contains(&l.longitude) {
            bad(
                &key("location"),
                "latitude must be within ±90 and longitude within ±180".into(),
            );
        }
        stores.push(MpStore {
            id: s.id.clone(),
            name: s.name.clone(),
            location: l.clone(),
        });
    }
    let mut registration = std::collections::HashMap::new();
    // Mercado Pago's external id -> the POS that derived it.
    let mut mp_ids: std::collections::HashMap<String, PosId> = std::collections::HashMap::new();
    let broker = match raw.mqtt.broker.as_str() {
        "embedded" => Some(Broker::Embedded),
        other => match parse_mqtt_url(other) {
            Some((host, port, tls)) => Some(Broker::External { host, port, tls }),
            None => {
                bad(
                    "mqtt.broker",
                    format!("{other:?} must be \"embedded\" or like \"mqtt://127.0.0.1:1883\" or \"mqtts://broker:8883\""),
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
    if !(1..=10_000).contains(&raw.mqtt.device_rate_per_sec) {
        bad(
            "mqtt.device_rate_per_sec",
            "must be from 1 to 10000 messages a second".into(),
        );
    }
    if !(1..=100_000).contains(&raw.mqtt.device_burst) {
        bad(
            "mqtt.device_burst",
            "must be from 1 to 100000 messages".into(),
        );
    }
    if !(1..=10_000_000).contains(&raw.mqtt.embedded_ingress_per_sec) {
        bad(
            "mqtt.embedded_ingress_per_sec",
            "must be from 1 to 10000000 packets a second".into(),
        );
    }
    if !(1..=10_000_000).contains(&raw.mqtt.embedded_ingress_burst) {
        bad(
            "mqtt.embedded_ingress_burst",
            "must be from 1 to 10000000 packets".into(),
        );
    }
    if raw.mqtt.stored_rejections_per_minute > 10_000 {
        bad(
            "mqtt.stored_rejections_per_minute",
            "must be from 0 to 10000".into(),
        );
    }
    if !(256..=1024 * 1024).contains(&raw.mqtt.max_payload_bytes) {
        bad(
            "mqtt.max_payload_bytes",
            "must be between 256 and 1048576".into(),
        );
    }
    let format = match raw.log.format.as_str() {
        "auto" => LogFormat::Auto,
        // `pretty` is what `text` was called before `auto` came.
        "text" | "pretty" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            bad(
                "log.format",
                format!("{other:?} must be \"auto\", \"text\" or \"json\""),
            );
            LogFormat::Auto
        }
    };
    if raw.orders.paid_republish_secs == 0 {
        bad("orders.paid_republish_secs", "must be at least 1".into());
    }
    if !(1..=3600).contains(&raw.orders.notification_retry_max_secs) {
        bad(
            "orders.notification_retry_max_secs",
            "must be from 1 to 3600".into(),
        );
    }
    if raw.orders.reconcile_window_secs > 30 * 86_400 {
        bad(
            "orders.reconcile_window_secs",
            "must be at most 2592000 (30 days)".into(),
        );
    }
    // Searches of paid sales are forgotten after two days.
    let rechecks = &raw.orders.recheck_after_secs;
    if rechecks.len() > 10
        || rechecks.iter().any(|s| !(1..=86_400).contains(s))
        || rechecks.windows(2).any(|w| w[0] >= w[1])
    {
        bad(
            "orders.recheck_after_secs",
            "must be at most 10 growing numbers of seconds from 1 to 86400 (e.g. [600, 7200]; [] turns it off)"
                .into(),
        );
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
    let store_url = match raw.store.url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => crate::store::postgres::PgTarget::parse(url)
            .map_err(|e| bad("store.url", e))
            .ok(),
    };
    // A day or a fraction of one (tests and benchmarks use minutes), up to
    // a hundred years.
    let retain = match raw.store.retain_days {
        d if (0.0001..=36_500.0).contains(&d) => {
            std::time::Duration::from_millis((d * 86_400_000.0).round() as u64)
        }
        d => {
            bad(
                "store.retain_days",
                format!("{d} must be a number of days from 0.0001 to 36500"),
            );
            std::time::Duration::ZERO
        }
    };

    let mut pos = Vec::new();
    let mut users: Vec<(String, Secret)> = Vec::new();
    let mut per_pos_keys = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (i, u) in raw.mqtt.users.iter().enumerate() {
        match serving_secret(&u.password_env) {
            Some(pw) if !u.username.is_empty() => users.push((u.username.clone(), pw)),
            Some(_) => bad(
                &format!("mqtt.users.{i}.username"),
                "must not be empty".into(),
            ),
            None if serving => bad(
                &format!("mqtt.users.{i}.password_env"),
                not_set(&u.password_env),
            ),
            None => {}
        }
    }
    if raw.pos.is_empty() {
        bad("pos", "configure at least one [[pos]]".into());
    }
    for (i, p) in raw.pos.iter().enumerate() {
        let key = |k: &str| format!("pos.{i}.{k}");
        let id = PosId::parse(&p.id)
            .map_err(|e| bad(&key("id"), e.to_string()))
            .ok();
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
        let currency = match &p.currency {
            None => Some(site.map_or(Currency::Ars, Site::currency)),
            Some(c) => c
                .parse::<Currency>()
                .map_err(|e| {
                    bad(
                        &key("currency"),
                        format!("{e}; one of ARS BRL CLP COP MXN PEN UYU"),
                    )
                })
                .ok(),
        };
        if let (Some(site), Some(currency)) = (site, currency) {
            if site.currency() != currency {
                bad(
                    &key("currency"),
                    format!(
                        "{currency} is not the currency of site {site} ({}): one account, one currency",
                        site.currency()
                    ),
                );
            }
        }
        let mode = match (p.mode.as_deref(), p.poll_protocol.as_deref()) {
            (None | Some("unattended"), None) => Some(PosMode::Unattended(poll_protocol)),
            (None | Some("unattended"), Some(v)) => {
                poll_protocol_of(&key("poll_protocol"), v, &mut bad).map(PosMode::Unattended)
            }
            (Some("attended"), None) => Some(PosMode::Attended),
            (Some("attended"), Some(_)) => {
                bad(
                    &key("poll_protocol"),
                    "an attended POS is never polled: remove poll_protocol".into(),
                );
                None
            }
            (Some(other), _) => {
                bad(
                    &key("mode"),
                    format!("{other:?} must be \"unattended\" or \"attended\""),
                );
                None
            }
        };
        let store = p.store.clone().filter(|s| !s.trim().is_empty());
        if let Some(s) = &store {
            if s.chars().count() > 60 {
                bad(&key("store"), format!("{s:?} is longer than 60 characters"));
            }
        }
        if mode == Some(PosMode::Attended) && store.is_none() {
            bad(
                &key("store"),
                "an attended POS needs the external id of its store at Mercado Pago".into(),
            );
        }
        if let Some(n) = &p.name {
            if n.trim().is_empty() || n.chars().count() > 100 {
                bad(&key("name"), "must be 1 to 100 characters".into());
            }
        }
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
        if let (Some(id), Some(kind), Some(currency), Some(max_amount), Some(mode)) =
            (id, kind, currency, max_amount, mode)
        {
            let mp_id = p
                .mp_external_id
                .clone()
                .unwrap_or_else(|| mp_external_id(&id));
            if mp_id.is_empty()
                || mp_id.len() >= 40
                || !mp_id.chars().all(|c| c.is_ascii_alphanumeric())
            {
                bad(
                    &key("mp_external_id"),
                    format!(
                        "{mp_id:?} (for POS {id}) must be 1 to 39 letters and digits, as Mercado Pago's \
                         POS external_id; set [[pos]] mp_external_id"
                    ),
                );
            } else if let Some(other) = mp_ids.get(&mp_id) {
                if other != &id {
                    bad(
                        &key("mp_external_id"),
                        format!(
                            "POS {id} and POS {other} both have Mercado Pago external id {mp_id:?}; \
                             set [[pos]] mp_external_id on one of them"
                        ),
                    );
                }
            } else {
                mp_ids.insert(mp_id.clone(), id.clone());
            }
            registration.insert(
                id.clone(),
                PosRegistration {
                    name: p.name.clone(),
                    category: p.category,
                },
            );
            // A set, not a scan: a chain may configure 100,000 POS.
            if !seen.insert(id.clone()) {
                bad(&key("id"), format!("{id} is configured twice"));
            }
            if let Some(var) = &p.device_password_env {
                match serving_secret(var) {
                    Some(pw) => users.push((id.as_str().to_owned(), pw)),
                    None if serving => bad(&key("device_password_env"), not_set(var)),
                    None => {}
                }
            }
            if let Some(k) = nonempty_key(&p.poll_key) {
                per_pos_keys.insert(id.clone(), k);
            }
            let ttl = p.ttl_secs.unwrap_or(raw.orders.ttl_secs);
            pos.push(PosConfig {
                id,
                kind,
                currency,
                ttl_secs: (ttl > 0).then_some(ttl),
                max_amount,
                mode,
                mp_external_id: mp_id,
                store,
            });
        }
    }

    if serving {
        let file = raw.mqtt.device_passwords_file.as_deref().map(PathBuf::from);
        let credential = sources.credential(secrets::DEVICE_PASSWORDS_CREDENTIAL);
        for (path, origin) in [
            file.map(|p| {
                let o = format!("[mqtt] device_passwords_file {}", p.display());
                (p, o)
            }),
            credential.map(|p| {
                let o = format!("credential {}", secrets::DEVICE_PASSWORDS_CREDENTIAL);
                (p, o)
            }),
        ]
        .into_iter()
        .flatten()
        {
            let logins = std::fs::read_to_string(&path)
                .map_err(|e| vec![format!("{origin}: cannot be read: {e}")])
                .and_then(|text| secrets::device_passwords(&text, &origin));
            match logins {
                Ok(logins) => {
                    add_logins(&mut users, logins, &origin, &mut secret_errors.borrow_mut())
                }
                Err(e) => secret_errors.borrow_mut().extend(e),
            }
        }
    }
    if mqtt_password.is_some() && raw.mqtt.username.as_deref().is_none_or(str::is_empty) {
        bad(
            "mqtt.username",
            format!("{MQTT_PASSWORD_ENV} is set but no username is configured"),
        );
    }
    let path_of = |key: &str, v: &Option<String>, bad: &mut dyn FnMut(&str, String)| {
        v.as_ref().map(PathBuf::from).filter(|p| {
            let ok = p.is_file();
            if !ok {
                bad(key, format!("{} is not a readable file", p.display()));
            }
            ok
        })
    };
    let tls_cert = path_of("mqtt.tls_cert", &raw.mqtt.tls_cert, &mut bad);
    let tls_key = path_of("mqtt.tls_key", &raw.mqtt.tls_key, &mut bad);
    let tls_ca = path_of("mqtt.tls_ca", &raw.mqtt.tls_ca, &mut bad);
    let embedded_tls_listen = raw.mqtt.embedded_tls_listen.as_ref().and_then(|a| {
        a.parse::<SocketAddr>()
            .map_err(|_| {
                bad(
                    "mqtt.embedded_tls_listen",
                    format!("{a:?} is not an address like 127.0.0.1:8883"),
                )
            })
            .ok()
    });
    if matches!(broker, Some(Broker::Embedded)) {
        // rumqttd cannot confine a device to its own topics (docs/decisions.md,
        // "Device confinement and the embedded broker"):
        // off loopback it takes an explicit choice.
        for (key, addr) in [
            ("mqtt.embedded_listen", embedded_listen),
            ("mqtt.embedded_tls_listen", embedded_tls_listen),
        ] {
            if let Some(a) = addr.filter(|a| !is_loopback(a) && !raw.mqtt.embedded_unconfined) {
                bad(key, format!(
                    "the embedded broker cannot confine a device to its own POS's topics, so it listens \
                     only on loopback; {a} needs `[mqtt] embedded_unconfined = true` (or use Mosquitto with \
                     deploy/mosquitto.acl)"
                ));
            }
        }
        if embedded_tls_listen.is_some() && (tls_cert.is_none() || tls_key.is_none()) {
            bad(
                "mqtt.embedded_tls_listen",
                "needs mqtt.tls_cert and mqtt.tls_key".into(),
            );
        }
        if !raw.mqtt.allow_anonymous && users.is_empty() && serving {
            bad("mqtt.allow_anonymous", "the embedded broker needs device credentials \
                ([[pos]] device_password_env or [[mqtt.users]]), or allow_anonymous = true for development".into());
        }
        // qrgate's client id, and the ids derived from it, are its own
        // login's (mqtt::logins): a device login named so would own them too.
        let id = &raw.mqtt.client_id;
        if let Some((user, _)) =
            users
                .iter()
                .filter(|_| !raw.mqtt.allow_anonymous)
                .find(|(u, _)| {
                    u.strip_prefix(id.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
                })
        {
            bad(
                "mqtt.client_id",
                format!(
                    "{id:?} is qrgate's own client id at the embedded broker, reserved with every id that \
                     starts with \"{id}-\"; the device login {:?} would share it: rename one",
                    user.chars().take(64).collect::<String>()
                ),
            );
        }
    }
    if matches!(broker, Some(Broker::External { tls: true, .. })) && tls_ca.is_none() {
        bad(
            "mqtt.tls_ca",
            "an mqtts:// broker needs the CA that signed its certificate".into(),
        );
    }
    if raw.http.notification_rate_per_sec == 0 || raw.http.notification_burst == 0 {
        bad(
            "http.notification_rate_per_sec",
            "rate and burst must be at least 1".into(),
        );
    }
    if !(1..=60).contains(&raw.http.request_timeout_secs) {
        bad("http.request_timeout_secs", "must be from 1 to 60".into());
    }
    let per_address = raw
        .http
        .max_connections_per_address
        .unwrap_or(default_max_connections_per_address().max(raw.http.notification_burst));
    if per_address != 0 && per_address < raw.http.notification_burst {
        bad(
            "http.max_connections_per_address",
            format!(
                "{per_address} is below notification_burst ({}): a burst of Mercado Pago's notifications \
                 may come on that many connections at once; use at least that, or 0 for no cap",
                raw.http.notification_burst
            ),
        );
    }

    errors.extend(secret_errors.into_inner());
    if !errors.is_empty() {
        return Err(ConfigError(errors));
    }
    let (Some(listen), Some(broker), Some(embedded_listen)) = (listen, broker, embedded_listen)
    else {
        return Err(ConfigError(vec!["invalid configuration".into()]));
    };
    Ok(Config {
        admin: AdminConfig {
            listen: admin_listen,
            timezone,
            token: admin_token,
            metrics_token,
            hosts: admin_hosts,
            session_idle: std::time::Duration::from_secs(raw.admin.session_idle_secs),
            max_sessions: raw.admin.max_sessions,
            secure_cookies: raw.admin.secure_cookies,
        },
        http: HttpConfig {
            listen,
            public_url,
            public_url_follows_listen,
            poll_keys: PollKeys {
                global: nonempty_key(&raw.http.poll_key),
                per_pos: per_pos_keys,
            },
            notification_rate_per_sec: raw.http.notification_rate_per_sec,
            notification_burst: raw.http.notification_burst,
            request_timeout: std::time::Duration::from_secs(raw.http.request_timeout_secs),
            max_connections_per_address: per_address,
            trusted_proxies,
        },
        mercadopago: MercadoPagoConfig {
            api_base,
            collector_id: raw.mercadopago.collector_id,
            sponsor_id: raw.mercadopago.sponsor_id,
            access_token,
            timeout_ms: raw.mercadopago.timeout_ms,
            webhook_secret,
            signature_tolerance_secs: raw.mercadopago.signature_tolerance_secs,
            poll_protocol,
            attended_api,
            site,
            attended_order,
            token_check: (raw.mercadopago.token_check_secs > 0)
                .then(|| std::time::Duration::from_secs(raw.mercadopago.token_check_secs)),
        },
        mqtt: MqttConfig {
            broker,
            embedded_listen,
            topic_prefix: prefix,
            client_id: raw.mqtt.client_id,
            max_payload_bytes: raw.mqtt.max_payload_bytes,
            username: raw.mqtt.username.filter(|u| !u.is_empty()),
            password: mqtt_password,
            allow_anonymous: raw.mqtt.allow_anonymous,
            embedded_unconfined: raw.mqtt.embedded_unconfined,
            users,
            embedded_tls_listen,
            tls_cert,
            tls_key,
            tls_ca,
            device_rate: Rate {
                per_sec: raw.mqtt.device_rate_per_sec,
                burst: raw.mqtt.device_burst,
            },
            embedded_ingress: Allowance {
                per_sec: raw.mqtt.embedded_ingress_per_sec,
                burst: raw.mqtt.embedded_ingress_burst,
            },
            stored_rejections_per_minute: raw.mqtt.stored_rejections_per_minute,
        },
        orders: OrdersConfig {
            ttl_secs: raw.orders.ttl_secs,
            reconcile_after_secs: raw.orders.reconcile_after_secs,
            reconcile_window_secs: raw.orders.reconcile_window_secs,
            paid_republish_secs: raw.orders.paid_republish_secs,
            auto_refund: raw.orders.auto_refund,
            recheck_after_secs: raw.orders.recheck_after_secs,
            notification_retry_max_secs: raw.orders.notification_retry_max_secs,
        },
        store: StoreConfig {
            url: store_url,
            password: store_password,
            path: PathBuf::from(raw.store.path),
            fsync: raw.store.fsync,
            retain,
            archive: raw.store.archive,
            checkpoints: raw.store.checkpoints,
        },
        log: LogConfig {
            format,
            filter: raw.log.filter,
        },
        pos,
        stores,
        registration,
    })
}

/// The effective configuration as TOML (what `check-config` prints): every
/// poll key masked, `public_url` as derived, then each secret's source.
fn render_effective(
    mut raw: RawConfig,
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> String {
    let mask = |v: &mut Option<String>| {
        if v.as_deref().is_some_and(|k| !k.is_empty()) {
            *v = Some("***".into());
        }
    };
    mask(&mut raw.http.poll_key);
    raw.pos.iter_mut().for_each(|p| mask(&mut p.poll_key));
    raw.http.public_url = Some(config.http.public_url.clone());
    let mut out = String::from(
        "# qrgate's effective configuration: built-in defaults < file < QRGATE_SECTION__KEY\n",
    );
    match toml::to_string_pretty(&raw) {
        Ok(text) => out.push_str(&text),
        Err(e) => out.push_str(&format!("# (cannot be shown as TOML: {e})\n")),
    }
    out.push_str("\n# Secrets: never read from the file, never shown\n");
    let sources = secrets::Sources::new(env);
    let named = raw
        .mqtt
        .users
        .iter()
        .map(|u| u.password_env.as_str())
        .chain(
            raw.pos
                .iter()
                .filter_map(|p| p.device_password_env.as_deref()),
        );
    for var in [
        ACCESS_TOKEN_ENV,
        WEBHOOK_SECRET_ENV,
        ADMIN_TOKEN_ENV,
        METRICS_TOKEN_ENV,
        MQTT_PASSWORD_ENV,
    ]
    .into_iter()
    .chain(config.store.url.is_some().then_some(STORE_PASSWORD_ENV))
    .chain(named)
    {
        let line = match sources.get(var) {
            Ok(Some((_, origin))) => format!("# {var} = \"***\"  (from {origin})\n"),
            Ok(None) => format!("# {var}: not set\n"),
            Err(e) => format!("# {e}\n"),
        };
        out.push_str(&line);
    }
    out.push_str(&format!(
        "# device logins at the embedded broker: {}\n",
        config.mqtt.users.len()
    ));
    out
}

/// The error of a secret that no source holds.
fn not_set(var: &str) -> String {
    format!(
        "{var} is not set (nor {var}_FILE, nor the credential {})",
        secrets::credential_name(var)
    )
}

/// Adds a password file's logins to `users`; a login both there and
/// elsewhere must have the same password.
fn add_logins(
    users: &mut Vec<(String, Secret)>,
    logins: Vec<(String, Secret)>,
    origin: &str,
    errors: &mut Vec<String>,
) {
    for (user, pw) in logins {
        match users.iter().find(|(u, _)| *u == user) {
            Some((_, known)) if *known == pw => {}
            Some(_) => errors.push(format!(
                "{origin}: the login {user:?} has another password elsewhere \
                 (device_password_env, password_env or another file); keep one"
            )),
            None => users.push((user, pw)),
        }
    }
}

/// A `[http] trusted_proxies` entry: a CIDR block, or one address (its
/// own block); host bits are cleared.
fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })
        .map(|n| n.trunc())
}

fn parse_mqtt_url(s: &str) -> Option<(String, u16, bool)> {
    let (rest, tls) = if let Some(r) = s.strip_prefix("mqtts://") {
        (r, true)
    } else {
        (
            s.strip_prefix("mqtt://")
                .or_else(|| s.strip_prefix("tcp://"))?,
            false,
        )
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port, tls))
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
                port: 1884,
                tls: false
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
        for bad in [
            "recheck_after_secs = [7200, 600]",
            "recheck_after_secs = [0]",
            "recheck_after_secs = [100000]",
            "notification_retry_max_secs = 0",
            "notification_retry_max_secs = 3601",
            "reconcile_window_secs = 99999999",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = load_toml(&format!("[orders]\n{bad}\n")).unwrap_err();
            assert!(
                e.to_string().contains(&format!("orders.{key}")),
                "{bad}: {e}"
            );
        }
        let ok = load_toml("[mqtt]\nallow_anonymous = true\n[orders]\nrecheck_after_secs = []\n")
            .unwrap();
        assert!(ok.orders.recheck_after_secs.is_empty());
    }

    fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with(Some(f.path()), &move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    const PUMP: &str = "[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\n";

    #[test]
    fn store_retention_is_90_days_unless_set_in_days_or_a_fraction_of_one() {
        let day = std::time::Duration::from_secs(86_400);
        let c = Config::defaults();
        assert_eq!(c.store.retain, day * 90);
        assert!(!c.store.archive && c.store.checkpoints);
        let text =
            |store: &str| format!("[mqtt]\nallow_anonymous = true\n[store]\n{store}\n{PUMP}");
        let c = load_toml(&text(
            "retain_days = 30\narchive = true\ncheckpoints = false",
        ))
        .unwrap();
        assert_eq!(c.store.retain, day * 30);
        assert!(c.store.archive && !c.store.checkpoints);
        let c = load_toml(&text("retain_days = 0.002")).unwrap();
        assert_eq!(c.store.retain, std::time::Duration::from_millis(172_800));
        for bad in ["retain_days = 0", "retain_days = -1", "retain_days = 40000"] {
            let e = load_toml(&text(bad)).unwrap_err().to_string();
            assert!(e.contains("store.retain_days"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_store_url_selects_postgresql_with_its_password_from_the_environment_never_the_file() {
        assert!(Config::defaults().store.url.is_none(), "SQLite by default");
        let text =
            |store: &str| format!("[mqtt]\nallow_anonymous = true\n[store]\n{store}\n{PUMP}");
        let url = "postgres://qrgate@db.example.com/qrgate?sslmode=verify-full";
        let c = load_env(
            &text(&format!("url = \"{url}\"")),
            &[(STORE_PASSWORD_ENV, "pg-s3cret")],
        )
        .unwrap();
        assert_eq!(
            c.store.url.as_ref().map(|u| u.to_string()).as_deref(),
            Some(url)
        );
        assert_eq!(
            c.store.password.as_ref().map(Secret::expose),
            Some("pg-s3cret")
        );
        for bad in [
            "url = \"postgres://qrgate:hunter2@db/qrgate\"",
            "url = \"postgres://qrgate@db/qrgate?password=hunter2\"",
            "password = \"hunter2\"",
        ] {
            let e = load_toml(&text(bad)).unwrap_err().to_string();
            assert!(e.contains(STORE_PASSWORD_ENV), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
        let e = load_toml(&text("url = \"postgres://qrgate@db/qrgate?sslmode=allow\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.url") && e.contains("verify-full"), "{e}");
    }

    #[test]
    fn a_config_file_with_the_embedded_broker_needs_device_credentials_or_says_anonymous() {
        let e = load_env(PUMP, &[]).unwrap_err();
        assert!(e.to_string().contains("mqtt.allow_anonymous"), "{e}");
        let c = load_env(&format!("[mqtt]\nallow_anonymous = true\n{PUMP}"), &[]).unwrap();
        assert!(c.mqtt.allow_anonymous);
        let with_device = format!("{PUMP}device_password_env = \"PUMP1_PW\"\n");
        let e = load_env(&with_device, &[]).unwrap_err();
        assert!(e.to_string().contains("pos.0.device_password_env"), "{e}");
        assert!(e.to_string().contains("PUMP1_PW"), "{e}");
        let c = load_env(&with_device, &[("PUMP1_PW", "s3cret")]).unwrap();
        assert!(!c.mqtt.allow_anonymous);
        assert_eq!(c.mqtt.users.len(), 1);
        assert_eq!(c.mqtt.users[0].0, "pump-1");
        assert_eq!(c.mqtt.users[0].1.expose(), "s3cret");
        let users =
            format!("[[mqtt.users]]\nusername = \"monitor\"\npassword_env = \"MON_PW\"\n{PUMP}");
        let c = load_env(&users, &[("MON_PW", "x")]).unwrap();
        assert_eq!(c.mqtt.users[0].0, "monitor");
        // No file at all: the first run takes anonymous clients on loopback.
        assert!(Config::defaults().mqtt.allow_anonymous);
    }

    #[test]
    fn device_rates_are_configurable_and_checked() {
        let c = Config::defaults();
        assert_eq!(
            (
                c.mqtt.device_rate.per_sec,
                c.mqtt.device_rate.burst,
                c.mqtt.stored_rejections_per_minute
            ),
            (5, 50, 20)
        );
        let c = load_env(
            &format!("[mqtt]\nallow_anonymous = true\ndevice_rate_per_sec = 2\ndevice_burst = 8\nstored_rejections_per_minute = 0\n{PUMP}"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.mqtt.device_rate.per_sec, c.mqtt.device_rate.burst),
            (2, 8)
        );
        assert_eq!(c.mqtt.stored_rejections_per_minute, 0);
        for bad in [
            "device_rate_per_sec = 0",
            "device_rate_per_sec = 10001",
            "device_burst = 0",
            "stored_rejections_per_minute = 10001",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = load_env(
                &format!("[mqtt]\nallow_anonymous = true\n{bad}\n{PUMP}"),
                &[],
            )
            .unwrap_err();
            assert!(e.to_string().contains(&format!("mqtt.{key}")), "{bad}: {e}");
        }
        let e = load_env(
            &format!("[mqtt]\nallow_anonymous = true\ndevice_rate_per_sec = 1.5\n{PUMP}"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("mqtt.device_rate_per_sec"), "{e}");
    }

    #[test]
    fn the_embedded_brokers_allowance_per_login_is_configurable_and_checked() {
        let c = Config::defaults();
        assert_eq!(
            c.mqtt.embedded_ingress,
            Allowance {
                per_sec: 1000,
                burst: 2000
            }
        );
        let c = load_env(
            &format!("[mqtt]\nallow_anonymous = true\nembedded_ingress_per_sec = 7\nembedded_ingress_burst = 9\n{PUMP}"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (
                c.mqtt.embedded_ingress.per_sec,
                c.mqtt.embedded_ingress.burst
            ),
            (7, 9)
        );
        for bad in [
            "embedded_ingress_per_sec = 0",
            "embedded_ingress_burst = 0",
            "embedded_ingress_burst = 10000001",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = load_env(
                &format!("[mqtt]\nallow_anonymous = true\n{bad}\n{PUMP}"),
                &[],
            )
            .unwrap_err();
            assert!(e.to_string().contains(&format!("mqtt.{key}")), "{bad}: {e}");
        }
    }

    #[test]
    fn no_device_login_may_share_qrgates_client_id_at_the_embedded_broker() {
        for (name, ok) in [("qrgate", false), ("qrgate-2", false), ("qrgate2", true)] {
            let text =
                format!("[[mqtt.users]]\nusername = \"{name}\"\npassword_env = \"PW\"\n{PUMP}");
            let r = load_env(&text, &[("PW", "x")]);
            assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("mqtt.client_id"), "{e}");
            }
        }
        // With another client id, or anonymous access (no logins), nothing
        // is reserved.
        let user = "[[mqtt.users]]\nusername = \"qrgate\"\npassword_env = \"PW\"\n";
        for mqtt in ["client_id = \"gw\"", "allow_anonymous = true"] {
            let text = format!("[mqtt]\n{mqtt}\n{user}{PUMP}");
            assert!(load_env(&text, &[("PW", "x")]).is_ok(), "{mqtt}");
        }
    }

    #[test]
    fn the_embedded_broker_stays_on_loopback_unless_told_it_is_unconfined() {
        let open =
            format!("[mqtt]\nallow_anonymous = true\nembedded_listen = \"0.0.0.0:1883\"\n{PUMP}");
        let e = load_env(&open, &[]).unwrap_err();
        assert!(e.to_string().contains("mqtt.embedded_listen"), "{e}");
        assert!(e.to_string().contains("embedded_unconfined"), "{e}");
        let c = load_env(&format!("{open}\n[mqtt]\n"), &[]);
        assert!(c.is_err(), "a repeated table is a TOML error");
        let ok = format!("[mqtt]\nallow_anonymous = true\nembedded_unconfined = true\nembedded_listen = \"0.0.0.0:1883\"\n{PUMP}");
        assert!(load_env(&ok, &[]).is_ok());
    }

    #[test]
    fn tls_brokers_and_listeners_need_their_files() {
        let e = load_env(
            &format!("[mqtt]\nbroker = \"mqtts://broker.example:8883\"\n{PUMP}"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("mqtt.tls_ca"), "{e}");
        let e = load_env(
            &format!(
                "[mqtt]\nallow_anonymous = true\nembedded_tls_listen = \"127.0.0.1:8883\"\n{PUMP}"
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls_cert"), "{e}");
        let e = load_env(
            &format!("[mqtt]\nbroker = \"mqtt://b\"\ntls_ca = \"/nonexistent.pem\"\n{PUMP}"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("mqtt.tls_ca"), "{e}");
    }

    #[test]
    fn the_edge_limits_default_sanely_and_a_cap_below_the_notification_burst_is_refused() {
        let c = Config::defaults();
        assert_eq!(c.http.request_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.http.max_connections_per_address, 512);
        assert!(c.http.max_connections_per_address >= c.http.notification_burst);
        let c = load_toml("[mqtt]\nallow_anonymous = true\n[http]\nmax_connections_per_address = 0\nrequest_timeout_secs = 2\n")
            .unwrap();
        assert_eq!(c.http.max_connections_per_address, 0, "0: no cap");
        // Unset, it follows a larger burst.
        let follows =
            load_toml("[mqtt]\nallow_anonymous = true\n[http]\nnotification_burst = 5000\n")
                .unwrap();
        assert_eq!(follows.http.max_connections_per_address, 5000);
        assert_eq!(c.http.request_timeout, std::time::Duration::from_secs(2));
        let e = load_toml(
            "[mqtt]\nallow_anonymous = true\n[http]\nmax_connections_per_address = 100\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("http.max_connections_per_address"),
            "{e}"
        );
        let c = load_toml("[mqtt]\nallow_anonymous = true\n[http]\nmax_connections_per_address = 16\nnotification_burst = 16\n")
            .unwrap();
        assert_eq!(c.http.max_connections_per_address, 16);
        for bad in ["0", "61"] {
            let e = load_toml(&format!(
                "[mqtt]\nallow_anonymous = true\n[http]\nrequest_timeout_secs = {bad}\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("http.request_timeout_secs"), "{e}");
        }
    }

    #[test]
    fn a_pos_poll_key_overrides_the_global_one() {
        let text = "[http]\npoll_key = \"global-key\"\n[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"a\"\nkind = \"fuel\"\n[[pos]]\nid = \"b\"\nkind = \"fuel\"\npoll_key = \"b-key\"\n";
        let c = load_env(text, &[]).unwrap();
        let a = PosId::parse("a").unwrap();
        let b = PosId::parse("b").unwrap();
        assert_eq!(c.http.poll_keys.for_pos(&a).unwrap().expose(), "global-key");
        assert_eq!(c.http.poll_keys.for_pos(&b).unwrap().expose(), "b-key");
    }

    #[test]
    fn dialects_are_chosen_per_account_and_per_pos() {
        let text = "[mercadopago]\npoll_protocol = \"v2\"\nattended_api = \"legacy\"\n[mqtt]\nallow_anonymous = true\n\
            [[pos]]\nid = \"p-1\"\nkind = \"fuel\"\n\
            [[pos]]\nid = \"p-2\"\nkind = \"fuel\"\npoll_protocol = \"v1\"\n\
            [[pos]]\nid = \"shop_3\"\nkind = \"vending\"\nmode = \"attended\"\nstore = \"st01\"\nname = \"Shop till\"\ncategory = 621102\n";
        let c = load_env(text, &[]).unwrap();
        assert_eq!(c.mercadopago.attended_api, AttendedApi::Legacy);
        assert_eq!(c.pos[0].mode, PosMode::Unattended(PollProtocol::V2));
        assert_eq!(c.pos[1].mode, PosMode::Unattended(PollProtocol::V1));
        assert_eq!(c.pos[2].mode, PosMode::Attended);
        assert_eq!(c.pos[2].store.as_deref(), Some("st01"));
        // Mercado Pago's POS external_id: letters and digits only.
        assert_eq!(c.pos[0].mp_external_id, "p1");
        assert_eq!(c.pos[2].mp_external_id, "shop3");
        let reg = &c.registration[&c.pos[2].id];
        assert_eq!(reg.name.as_deref(), Some("Shop till"));
        assert_eq!(reg.category, Some(621102));
    }

    #[test]
    fn two_pos_deriving_the_same_mp_external_id_are_refused_naming_both() {
        let text = "[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\n[[pos]]\nid = \"pump_1\"\nkind = \"fuel\"\n";
        let e = load_env(text, &[]).unwrap_err().to_string();
        assert!(e.contains("pos.1.mp_external_id"), "{e}");
        assert!(
            e.contains("pump_1") && e.contains("pump-1") && e.contains("\"pump1\""),
            "{e}"
        );
        let fixed = format!("{text}mp_external_id = \"pump1b\"\n");
        assert_eq!(
            load_env(&fixed, &[]).unwrap().pos[1].mp_external_id,
            "pump1b"
        );
        let bad = format!("{text}mp_external_id = \"pump-1b\"\n");
        let e = load_env(&bad, &[]).unwrap_err().to_string();
        assert!(e.contains("letters and digits"), "{e}");
    }

    #[test]
    fn bad_dialect_settings_are_named() {
        let text = "[mercadopago]\npoll_protocol = \"v3\"\nattended_api = \"fax\"\nsite = \"XXX\"\n[mqtt]\nallow_anonymous = true\n\
            [[pos]]\nid = \"a\"\nkind = \"fuel\"\nmode = \"attended\"\n\
            [[pos]]\nid = \"b\"\nkind = \"fuel\"\nmode = \"self-service\"\n\
            [[pos]]\nid = \"c\"\nkind = \"fuel\"\nmode = \"attended\"\nstore = \"s\"\npoll_protocol = \"v2\"\n";
        let e = load_env(text, &[]).unwrap_err().to_string();
        for key in [
            "mercadopago.poll_protocol",
            "mercadopago.attended_api",
            "mercadopago.site",
            "pos.0.store",
            "pos.1.mode",
            "pos.2.poll_protocol",
        ] {
            assert!(e.contains(key), "{key} missing in: {e}");
        }
    }

    #[test]
    fn the_site_sets_the_currency_and_refuses_another() {
        let text = "[mercadopago]\nsite = \"MCO\"\n[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"a\"\nkind = \"fuel\"\n";
        let c = load_env(text, &[]).unwrap();
        assert_eq!(c.pos[0].currency, Currency::Cop);
        assert_eq!(c.mercadopago.site, Some(Site::Mco));
        let e = load_env(&format!("{text}currency = \"ARS\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pos.0.currency") && e.contains("MCO"), "{e}");
    }

    #[test]
    fn stores_need_a_name_and_an_address() {
        let text = "[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"a\"\nkind = \"fuel\"\nstore = \"st01\"\n\
            [[stores]]\nid = \"st01\"\nname = \"Ruta 8\"\n[stores.location]\nstreet_name = \"Av. Siempre Viva\"\nstreet_number = \"742\"\n\
            city_name = \"Pilar\"\nstate_name = \"Buenos Aires\"\nlatitude = -34.45\nlongitude = -58.91\n";
        let c = load_env(text, &[]).unwrap();
        assert_eq!(c.stores[0].id, "st01");
        assert_eq!(c.stores[0].location.city_name, "Pilar");
        let e = load_env(
            &text.replace("Ruta 8", "").replace("\"Pilar\"", "\"\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("stores.0.name") && e.contains("stores.0.location.city_name"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/qrgate.example.toml");
        let c = Config::load_with(Some(Path::new(path)), &|name| {
            (name == MQTT_PASSWORD_ENV).then(|| "pw".to_owned())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.mqtt.broker, Broker::External { .. }));
        assert!(c.pos.len() >= 2);
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.lines().any(|l| l == "[admin]"), "no [admin] section");
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn attended_orders_live_ten_minutes_and_are_renewed_a_minute_ahead_unless_configured() {
        let anon = "[mqtt]\nallow_anonymous = true\n";
        let c = load_env(anon, &[]).unwrap();
        assert_eq!(c.mercadopago.attended_order, AttendedOrderLife::default());
        assert_eq!(c.mercadopago.attended_order.lifetime_secs, 600);
        assert_eq!(c.mercadopago.attended_order.renew_lead_secs, 60);
        let short = format!(
            "{anon}[mercadopago]\nattended_order_lifetime_secs = 4\nattended_renew_lead_secs = 3\n"
        );
        let c = load_env(&short, &[]).unwrap();
        assert_eq!(
            c.mercadopago.attended_order,
            AttendedOrderLife {
                lifetime_secs: 4,
                renew_lead_secs: 3
            }
        );
        for (keys, named) in [
            (
                "attended_order_lifetime_secs = 0",
                "mercadopago.attended_order_lifetime_secs",
            ),
            (
                "attended_renew_lead_secs = 0",
                "mercadopago.attended_renew_lead_secs",
            ),
            (
                "attended_order_lifetime_secs = 60\nattended_renew_lead_secs = 60",
                "mercadopago.attended_renew_lead_secs",
            ),
            // The legacy API's orders live 10 minutes, whatever the lifetime.
            (
                "attended_api = \"legacy\"\nattended_order_lifetime_secs = 3600\nattended_renew_lead_secs = 600",
                "mercadopago.attended_renew_lead_secs",
            ),
        ] {
            let e = load_env(&format!("{anon}[mercadopago]\n{keys}\n"), &[]).unwrap_err();
            assert!(e.to_string().contains(named), "{keys}: {e}");
        }
        let legacy = load_env(
            &format!("{anon}[mercadopago]\nattended_api = \"legacy\"\nattended_order_lifetime_secs = 3600\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            legacy
                .mercadopago
                .attended_order
                .lifetime_secs_for(AttendedApi::Legacy),
            600
        );
    }

    #[test]
    fn the_console_listens_on_loopback_by_default_and_elsewhere_only_with_a_token() {
        let with_anon = |t: &str| format!("[mqtt]\nallow_anonymous = true\n{t}");
        let c = load_env(&with_anon(""), &[]).unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(c.admin.token.is_none());
        let off = load_env(&with_anon("[admin]\nlisten = \"\"\n"), &[]).unwrap();
        assert_eq!(off.admin.listen, None);
        let err = load_env(&with_anon("[admin]\nlisten = \"0.0.0.0:9090\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.listen") && err.contains(ADMIN_TOKEN_ENV),
            "{err}"
        );
        let ok = load_env(
            &with_anon("[admin]\nlisten = \"0.0.0.0:9090\"\ntimezone = \"America/Argentina/Buenos_Aires\"\n"),
            &[(ADMIN_TOKEN_ENV, "s3cret-s3cret-s3cret")],
        )
        .unwrap();
        assert_eq!(ok.admin.token, Some(Secret::new("s3cret-s3cret-s3cret")));
        assert_eq!(
            ok.admin.timezone,
            chrono_tz::America::Argentina::Buenos_Aires
        );
        let err = load_env(&with_anon("[admin]\ntimezone = \"Mars/Olympus\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.timezone"), "{err}");
    }

    #[test]
    fn the_console_edge_keys_are_typed_bounded_and_the_token_long() {
        let with_anon = |t: &str| format!("[mqtt]\nallow_anonymous = true\n{t}");
        let c = load_env(&with_anon(""), &[]).unwrap();
        assert!(c.admin.hosts.is_empty());
        assert_eq!(c.admin.session_idle, std::time::Duration::from_secs(1800));
        assert_eq!(c.admin.max_sessions, 32);
        assert!(!c.admin.secure_cookies);
        let c = load_env(
            &with_anon(
                "[admin]\nhosts = [\"Console.Station.example.com\", \"10.0.0.5\", \"[::1]\"]\n\
                 session_idle_secs = 60\nmax_sessions = 4\nsecure_cookies = true\n",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.admin.hosts,
            ["console.station.example.com", "10.0.0.5", "::1"]
        );
        assert_eq!(c.admin.session_idle, std::time::Duration::from_secs(60));
        assert_eq!(c.admin.max_sessions, 4);
        assert!(c.admin.secure_cookies);
        for (bad, key) in [
            ("hosts = [\"http://console.example.com\"]", "admin.hosts"),
            ("hosts = [\"console.example.com:9090\"]", "admin.hosts"),
            ("hosts = [\"\"]", "admin.hosts"),
            ("session_idle_secs = 0", "admin.session_idle_secs"),
            ("max_sessions = 0", "admin.max_sessions"),
        ] {
            let err = load_env(&with_anon(&format!("[admin]\n{bad}\n")), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        // A short token stops the start, named by its variable and never
        // echoed; 16 characters pass.
        let err = load_env(&with_anon(""), &[(ADMIN_TOKEN_ENV, "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains(ADMIN_TOKEN_ENV) && err.contains("16"), "{err}");
        let err = load_env(&with_anon(""), &[(ADMIN_TOKEN_ENV, "fifteen-chars-x")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("fifteen-chars-x"), "{err}");
        assert!(load_env(&with_anon(""), &[(ADMIN_TOKEN_ENV, "sixteen-chars-xy")]).is_ok());
    }

    #[test]
    fn the_file_is_found_through_the_flag_then_qrgate_config_then_the_system_path() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("qrgate.toml");
        let flag = Path::new("/from/flag.toml");
        let env_set = |name: &str| (name == CONFIG_ENV).then(|| "/from/env.toml".to_owned());
        let env_unset = |_: &str| None;
        let missing = dir.path().join("absent.toml");
        assert_eq!(locate(Some(flag), &env_set, &system).as_deref(), Some(flag));
        assert_eq!(
            locate(None, &env_set, &missing),
            Some(PathBuf::from("/from/env.toml"))
        );
        assert_eq!(locate(None, &env_unset, &missing), None);
        std::fs::write(&system, "").unwrap();
        assert_eq!(locate(None, &env_unset, &system), Some(system.clone()));
        assert_eq!(
            locate(None, &env_set, &system),
            Some(PathBuf::from("/from/env.toml")),
            "QRGATE_CONFIG wins over the system path"
        );
    }

    #[test]
    fn a_secret_written_in_the_file_is_refused_naming_the_variable_to_use() {
        for (text, var) in [
            ("[mercadopago]\naccess_token = \"APP_USR-9\"\n", ACCESS_TOKEN_ENV),
            ("[mercadopago]\nwebhook_secret = \"APP_USR-9\"\n", WEBHOOK_SECRET_ENV),
            ("[mqtt]\npassword = \"APP_USR-9\"\n", MQTT_PASSWORD_ENV),
            ("[admin]\ntoken = \"APP_USR-9\"\n", ADMIN_TOKEN_ENV),
            ("[admin]\nmetrics_token = \"APP_USR-9\"\n", METRICS_TOKEN_ENV),
            (
                "[[pos]]\nid = \"p\"\nkind = \"fuel\"\npassword = \"APP_USR-9\"\n",
                "device_password_env",
            ),
            (
                "[[mqtt.users]]\nusername = \"m\"\npassword_env = \"X\"\npassword = \"APP_USR-9\"\n",
                "password_env",
            ),
        ] {
            let e = load_env(text, &[]).unwrap_err().to_string();
            assert!(e.contains(var), "{text}: {e}");
            assert!(e.contains("never read from the configuration file"), "{e}");
            assert!(!e.contains("APP_USR-9"), "{e}");
        }
    }

    #[test]
    fn secrets_come_from_files_and_credentials_and_sources_that_disagree_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        for (name, value) in [
            ("mp_access_token", "APP_USR-cred\n"),
            ("mp_webhook_secret", "whsec\n"),
            ("admin_token", "sixteen-chars-xy\n"),
            ("metrics_token", "scrape-me-scrape-me\n"),
            ("mqtt_password", "q-secret\n"),
            ("pump1_pw", "p1\n"),
        ] {
            std::fs::write(creds.join(name), value).unwrap();
        }
        let file = dir.path().join("token");
        std::fs::write(&file, "APP_USR-cred\n").unwrap();
        let creds_dir = creds.display().to_string();
        let text = format!(
            "[mqtt]\nbroker = \"mqtt://b\"\nusername = \"qrgate\"\n{PUMP}device_password_env = \"PUMP1_PW\"\n"
        );
        let c = load_env(&text, &[("CREDENTIALS_DIRECTORY", &creds_dir)]).unwrap();
        assert_eq!(c.mercadopago.access_token.unwrap().expose(), "APP_USR-cred");
        assert_eq!(c.mercadopago.webhook_secret.unwrap().expose(), "whsec");
        assert_eq!(c.admin.token.unwrap().expose(), "sixteen-chars-xy");
        assert_eq!(
            c.admin.metrics_token.unwrap().expose(),
            "scrape-me-scrape-me"
        );
        assert_eq!(c.mqtt.password.unwrap().expose(), "q-secret");
        assert_eq!(c.mqtt.users[0].1.expose(), "p1");

        let file_var = format!("{ACCESS_TOKEN_ENV}_FILE");
        let path = file.display().to_string();
        let c = load_env(PUMP_ANON, &[(&file_var, &path)]).unwrap();
        assert_eq!(c.mercadopago.access_token.unwrap().expose(), "APP_USR-cred");
        let e = load_env(
            PUMP_ANON,
            &[(&file_var, &path), (ACCESS_TOKEN_ENV, "APP_USR-other")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&file_var) && e.contains("different"), "{e}");
        assert!(
            !e.contains("APP_USR-other") && !e.contains("APP_USR-cred"),
            "{e}"
        );
        let e = load_env(PUMP_ANON, &[(&file_var, "/nonexistent/token")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(&file_var), "{e}");
    }

    const PUMP_ANON: &str =
        "[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\n";

    #[test]
    fn device_passwords_come_from_one_file_or_credential_and_a_bad_line_is_named_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("devices");
        std::fs::write(
            &list,
            "# station devices\npump-1:p1-secret\n\nvending-1:v1-secret\n",
        )
        .unwrap();
        let text = format!(
            "[mqtt]\ndevice_passwords_file = \"{}\"\n{PUMP}[[pos]]\nid = \"vending-1\"\nkind = \"vending\"\n",
            list.display()
        );
        let c = load_env(&text, &[]).unwrap();
        let users: Vec<(&str, &str)> = c
            .mqtt
            .users
            .iter()
            .map(|(u, p)| (u.as_str(), p.expose()))
            .collect();
        assert_eq!(users, [("pump-1", "p1-secret"), ("vending-1", "v1-secret")]);
        // The same login through a variable too: the same password passes,
        // another is refused.
        let both = format!("{text}device_password_env = \"V1\"\n");
        assert_eq!(
            load_env(&both, &[("V1", "v1-secret")])
                .unwrap()
                .mqtt
                .users
                .len(),
            2
        );
        let e = load_env(&both, &[("V1", "other")]).unwrap_err().to_string();
        assert!(e.contains("vending-1") && !e.contains("v1-secret"), "{e}");

        std::fs::write(&list, "pump-1:p1-secret\nvending-1 v1-secret\n").unwrap();
        let e = load_env(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("device_passwords_file") && e.contains("line 2"),
            "{e}"
        );
        assert!(!e.contains("v1-secret"), "{e}");

        // systemd's credential `device_passwords` serves the same purpose.
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("device_passwords"), "pump-1:p1-secret\n").unwrap();
        let c = load_env(
            PUMP,
            &[("CREDENTIALS_DIRECTORY", &creds.display().to_string())],
        )
        .unwrap();
        assert_eq!(c.mqtt.users[0].0, "pump-1");
    }

    #[test]
    fn registration_needs_neither_the_consoles_token_nor_mqtt_passwords() {
        let text = format!(
            "[admin]\nlisten = \"0.0.0.0:9090\"\n[mqtt]\nusername = \"qrgate\"\n{PUMP}device_password_env = \"PUMP1_PW\"\n"
        );
        let load = |purpose| {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(text.as_bytes()).unwrap();
            Config::load_for(Some(f.path()), &|_| None, purpose)
        };
        let e = load(Purpose::Serve).unwrap_err().to_string();
        assert!(e.contains(ADMIN_TOKEN_ENV) && e.contains("PUMP1_PW"), "{e}");
        let c = load(Purpose::Registration).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.pos.len(), 1);
    }

    #[test]
    fn the_log_format_is_auto_by_default_and_text_or_json_when_chosen() {
        assert_eq!(Config::defaults().log.format, LogFormat::Auto);
        for (value, format) in [
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("pretty", LogFormat::Text),
            ("json", LogFormat::Json),
        ] {
            let c = load_env(&format!("{PUMP_ANON}[log]\nformat = \"{value}\"\n"), &[]).unwrap();
            assert_eq!(c.log.format, format, "{value}");
        }
        let e = load_env(&format!("{PUMP_ANON}[log]\nformat = \"xml\"\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("log.format"), "{e}");
    }

    #[test]
    fn public_url_follows_http_listen_unless_set_and_the_shown_pos_url_masks_the_key() {
        let c = load_env(
            &format!("[http]\nlisten = \"127.0.0.1:8181\"\n{PUMP_ANON}"),
            &[],
        )
        .unwrap();
        assert_eq!(c.http.public_url, "http://127.0.0.1:8181");
        assert!(c.http.public_url_follows_listen);
        assert_eq!(
            c.http.pos_url_shown(),
            "http://127.0.0.1:8181/mp/pos/{pos_id}"
        );
        let c = load_env(
            &format!(
                "[http]\npublic_url = \"https://s.example\"\npoll_key = \"k-s3cret\"\n{PUMP_ANON}"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.http.pos_url_shown(),
            "https://s.example/mp/pos/{pos_id}?key=***"
        );
        assert!(!c.http.public_url_follows_listen);
    }

    #[test]
    fn start_up_warnings_name_a_username_without_password_and_unkeyed_pos_off_loopback() {
        assert!(Config::defaults().warnings().is_empty());
        let c = load_env(
            &format!("[mqtt]\nbroker = \"mqtt://b\"\nusername = \"qrgate\"\n{PUMP}"),
            &[],
        )
        .unwrap();
        let w = c.warnings().join("\n");
        assert!(
            w.contains("[mqtt] username") && w.contains(MQTT_PASSWORD_ENV),
            "{w}"
        );
        let c = load_env(
            &format!("[http]\nlisten = \"0.0.0.0:8080\"\n{PUMP_ANON}"),
            &[],
        )
        .unwrap();
        let w = c.warnings().join("\n");
        assert!(w.contains("poll_key") && w.contains("pump-1"), "{w}");
        assert!(w.contains("public_url"), "{w}");
        let keyed = load_env(
            &format!("[http]\nlisten = \"0.0.0.0:8080\"\npublic_url = \"https://s.example\"\npoll_key = \"k\"\n{PUMP_ANON}"),
            &[],
        )
        .unwrap();
        assert!(keyed.warnings().is_empty(), "{:?}", keyed.warnings());
    }

    #[test]
    fn check_config_prints_the_effective_configuration_with_every_secret_masked() {
        let text = format!(
            "[http]\npoll_key = \"pk-global-s3cret\"\n{PUMP_ANON}poll_key = \"pk-pump-s3cret\"\n"
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let env = |name: &str| match name {
            ACCESS_TOKEN_ENV => Some("APP_USR-s3cret".to_owned()),
            ADMIN_TOKEN_ENV => Some("admin-token-s3cret".to_owned()),
            _ => None,
        };
        let out = Config::check(Some(f.path()), &env).unwrap();
        for secret in [
            "pk-global-s3cret",
            "pk-pump-s3cret",
            "APP_USR-s3cret",
            "admin-token-s3cret",
        ] {
            assert!(!out.contains(secret), "{secret} shown in:\n{out}");
        }
        assert!(out.contains("poll_key = \"***\""), "{out}");
        assert!(
            out.contains(&format!("# {ACCESS_TOKEN_ENV} = \"***\"")),
            "{out}"
        );
        assert!(
            out.contains(&format!("# {WEBHOOK_SECRET_ENV}: not set")),
            "{out}"
        );
        assert!(
            out.contains("public_url = \"http://127.0.0.1:8080\""),
            "{out}"
        );
        // What it prints is a configuration qrgate reads back.
        let mut back = tempfile::NamedTempFile::new().unwrap();
        back.write_all(out.replace("\"***\"", "\"k\"").as_bytes())
            .unwrap();
        assert!(
            Config::load_with(Some(back.path()), &|_| None).is_ok(),
            "{out}"
        );
        let e = Config::check(Some(Path::new("/nonexistent.toml")), &env).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn every_environment_variable_the_code_reads_is_listed_and_documented() {
        let docs = include_str!("../docs/operations.md");
        let table: Vec<&str> = docs
            .split("### Environment variables")
            .nth(1)
            .and_then(|rest| rest.split("\n#").next())
            .expect("docs/operations.md has a section \"Environment variables\"")
            .lines()
            .filter(|l| l.starts_with("| `"))
            .collect();
        for (name, _) in ENVIRONMENT {
            assert!(
                table.iter().any(|l| l.contains(&format!("`{name}`"))),
                "{name} is not in docs/operations.md's table"
            );
        }
        // Every QRGATE_ name written in the code (not `SECTION__KEY`
        // overrides, which the table covers as one row).
        let mut dirs = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let code = std::fs::read_to_string(&path).unwrap_or_default();
                for (i, _) in code.match_indices("QRGATE_") {
                    let name: String = code[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if name.contains("__") || name == "QRGATE_" {
                        continue;
                    }
                    // `<VAR>_FILE` is one row for every secret.
                    let name = name.strip_suffix("_FILE").unwrap_or(&name).to_owned();
                    assert!(
                        ENVIRONMENT.iter().any(|(n, _)| *n == name),
                        "{name} ({}) is read but not in config::ENVIRONMENT",
                        path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn trusted_proxies_are_cidr_blocks_checked_at_load() {
        assert!(Config::defaults().http.trusted_proxies.is_empty());
        let c = load_toml(
            "[mqtt]\nallow_anonymous = true\n[http]\ntrusted_proxies = [\"127.0.0.1\", \"10.1.2.3/8\", \"fd00::/8\", \"::1\"]\n",
        )
        .unwrap();
        let shown: Vec<String> = c
            .http
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(shown, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8", "::1/128"]);
        for bad in ["10.0.0.0/33", "proxy.local", "10.0.0.0/", ""] {
            let e = load_toml(&format!(
                "[mqtt]\nallow_anonymous = true\n[http]\ntrusted_proxies = [\"{bad}\"]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("http.trusted_proxies") && e.contains("CIDR"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_metrics_token_is_its_own_secret_and_the_token_check_can_be_off() {
        let anon = "[mqtt]\nallow_anonymous = true\n";
        let c = load_env(anon, &[(METRICS_TOKEN_ENV, "metrics-only-0123")]).unwrap();
        assert_eq!(
            c.admin.metrics_token,
            Some(Secret::new("metrics-only-0123"))
        );
        assert_eq!(c.admin.token, None);
        let err = load_env(anon, &[(METRICS_TOKEN_ENV, "tiny-tok")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(METRICS_TOKEN_ENV) && !err.contains("tiny-tok"),
            "{err}"
        );
        assert_eq!(
            Config::defaults().mercadopago.token_check,
            Some(std::time::Duration::from_secs(300))
        );
        let off =
            load_toml("[mqtt]\nallow_anonymous = true\n[mercadopago]\ntoken_check_secs = 0\n")
                .unwrap();
        assert_eq!(off.mercadopago.token_check, None);
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("APP_USR-123")), "Secret(***)");
    }
}
