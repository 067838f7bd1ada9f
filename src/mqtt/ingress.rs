//! The embedded broker's front door: devices connect here, and each
//! connection is relayed to rumqttd on a loopback port of its own, reading
//! what the device sends no faster than its login's allowance.
//!
//! rumqttd takes what a client sends as fast as the network brings it, far
//! faster than qrgate can read it back (a device publishing as fast as its
//! client could got 320,000 messages a second acknowledged; qrgate reads some
//! 75,000). The surplus waits in the broker's log of the subscription filter,
//! which every POS's message on that topic shares, and while that log is
//! behind rumqttd sends qrgate nothing from its other filters
//! (docs/hostile-devices.md). No router setting bounds that backlog, so it
//! is kept from forming: a device's packets enter the broker only as fast as
//! a token bucket per login allows (`[mqtt] embedded_ingress_per_sec`,
//! `embedded_ingress_burst`). Past it the relay stops reading the device's
//! socket, TCP's flow control stops the device, and its acknowledgements come
//! at that pace. The allowance is set far above what a POS may send
//! (`device_rate_per_sec`), so a device keeping to its rate never waits here,
//! and far below what qrgate reads, so that the flood qrgate refuses still
//! reaches it, counted, and never builds up in the broker.
//!
//! - **Per login, not per connection.** A login may open several connections
//!   (client ids `username-…`); they share one bucket, and at most
//!   [`MAX_CONNECTIONS_PER_LOGIN`] of them may be open, so that opening more
//!   buys nothing. A bucket is charged only once the broker has accepted the
//!   login (its CONNACK), or a stranger could spend a device's allowance by
//!   sending its username with a wrong password. A login's bucket outlives
//!   its connections until it has filled up again, so reconnecting does not
//!   refill it either. Without logins (`allow_anonymous`, development) each
//!   connection has its own.
//! - **What is charged.** One token per packet a device sends that costs the
//!   broker work of its own (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PINGREQ); the
//!   acknowledgements of what the broker sent it are free (the broker bounds
//!   those), and the CONNECT is the login's business.
//! - **Memory.** Per connection: one task, a 2 KiB buffer each way, the CONNECT
//!   while it is checked (at most the broker's packet limit); at most
//!   [`MAX_CONNECTIONS`] connections. Buckets exist for logins with a
//!   connection or a bucket not yet full, so at most one per configured login.
//! - **TLS** is ended here (`[mqtt] embedded_tls_listen`); the broker only has
//!   the loopback port, which qrgate's own client uses directly (`direct`).
//! - **Leaving.** A device's DISCONNECT is the last thing passed on, and the
//!   broker, not the relay, ends the connection (`Left::Disconnected`).
//! - **Held until qrgate listens.** At start-up the door takes no device
//!   connection until qrgate's own client has subscribed ([`Door`]): the
//!   embedded broker keeps no session across restarts, so a sale a device
//!   published in between would reach no one and never be answered. Devices
//!   wait in the listen backlog meanwhile (milliseconds).
//! - **Refusals** (not MQTT, no CONNECT in time, a failed TLS handshake) are
//!   logged at WARN with the peer's address: the first of each kind in a
//!   minute, then a count ([`Warnings`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::tokio_rustls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

pub use crate::config::Allowance;

/// Device connections open at once; rumqttd takes 20,010 (`broker`), and the
/// rest are qrgate's own.
pub const MAX_CONNECTIONS: usize = 20_000;
/// Connections one login may have open at once.
pub const MAX_CONNECTIONS_PER_LOGIN: usize = 8;
/// Bytes read from either side at a time: device packets are small, and
/// each connection holds one buffer each way (8 KiB ones cost 12 KiB more
/// per connected device, measured).
const CHUNK: usize = 2 * 1024;
/// Time for a TLS handshake and the CONNECT, as rumqttd gives the CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the broker has to close a connection whose device sent DISCONNECT
/// (it does at once; this bounds a connection the broker forgot).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A token bucket, in thousandths of a packet.
#[derive(Debug)]
struct Bucket {
    allowance: Allowance,
    milli: u64,
    at: Instant,
}

impl Bucket {
    fn new(allowance: Allowance, now: Instant) -> Bucket {
        Bucket {
            allowance,
            milli: u64::from(allowance.burst) * 1000,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ms =
            u64::try_from(now.saturating_duration_since(self.at).as_millis()).unwrap_or(u64::MAX);
        let cap = u64::from(self.allowance.burst) * 1000;
        self.milli = self
            .milli
            .saturating_add(ms.saturating_mul(u64::from(self.allowance.per_sec)))
            .min(cap);
        // Only whole milliseconds were credited: keep the rest for next time.
        self.at += Duration::from_millis(ms);
    }

    /// One packet: `Ok` when it may go now, else how long until it may.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            return Ok(());
        }
        let missing = 1000 - self.milli;
        let per_sec = u64::from(self.allowance.per_sec.max(1));
        Err(Duration::from_millis(missing.div_ceil(per_sec)).max(Duration::from_millis(1)))
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.milli >= u64::from(self.allowance.burst) * 1000
    }
}

/// One login's bucket and open connections.
struct Login {
    bucket: Arc<Mutex<Bucket>>,
    connections: usize,
}

/// The buckets of the logins under way.
struct Logins {
    allowance: Allowance,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_name: HashMap<String, Login>,
    /// Sweep when the table reaches this size: a sweep per connection would
    /// cost 100,000 POS reconnecting at once 10^10 steps.
    sweep_at: usize,
}

/// A connection's claim on its login: its bucket, released on drop.
struct Claim {
    logins: Arc<Logins>,
    name: Option<String>,
    bucket: Arc<Mutex<Bucket>>,
}

impl Logins {
    fn new(allowance: Allowance) -> Logins {
        Logins {
            allowance,
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bucket of a connection accepted as `name` (`None`: its own), or
    /// `None` when the login has all the connections it may.
    fn claim(self: &Arc<Self>, name: Option<&str>) -> Option<Claim> {
        let now = Instant::now();
        let Some(name) = name else {
            return Some(Claim {
                logins: Arc::clone(self),
                name: None,
                bucket: Arc::new(Mutex::new(Bucket::new(self.allowance, now))),
            });
        };
        let mut table = self.table();
        if table.by_name.len() >= table.sweep_at {
            // Logins with no connection left are kept until their bucket is
            // full again (or reconnecting would refill it), then forgotten.
            table.by_name.retain(|_, l| {
                l.connections > 0 || !l.bucket.lock().unwrap_or_else(|e| e.into_inner()).full(now)
            });
            table.sweep_at = (table.by_name.len() * 2).max(1024);
        }
        let login = table
            .by_name
            .entry(name.to_owned())
            .or_insert_with(|| Login {
                bucket: Arc::new(Mutex::new(Bucket::new(self.allowance, now))),
                connections: 0,
            });
        if login.connections >= MAX_CONNECTIONS_PER_LOGIN {
            return None;
        }
        login.connections += 1;
        let bucket = Arc::clone(&login.bucket);
        Some(Claim {
            logins: Arc::clone(self),
            name: Some(name.to_owned()),
            bucket,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let mut table = self.logins.table();
            if let Some(l) = table.by_name.get_mut(name) {
                l.connections = l.connections.saturating_sub(1);
            }
        }
    }
}

impl Claim {
    /// Waits until one more packet may go.
    async fn take(&self) {
        loop {
            let wait = match self
                .bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(Instant::now())
            {
                Ok(()) => return,
                Err(wait) => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A device's byte stream did not frame as MQTT.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the device sent a malformed MQTT packet")]
pub struct Malformed;

/// Finds where packets start in a byte stream however it is cut: MQTT's
/// fixed header (a type byte, then one to four bytes of remaining length),
/// then that many bytes of body.
#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes of the fixed header read so far.
    header: [u8; 5],
    len: usize,
    /// Body bytes still to come.
    body: usize,
}

/// What [`Framer::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A packet starts here, with this first byte (type and flags).
    Starts(u8),
    /// This many bytes belong to the packet under way.
    Within(usize),
    /// A fixed header is complete: its remaining length.
    Header(usize),
}

impl Framer {
    /// Whether the next byte starts a packet.
    pub fn at_start(&self) -> bool {
        self.len == 0 && self.body == 0
    }

    /// Whether the bytes stepped over so far end with a whole DISCONNECT.
    pub fn after_disconnect(&self) -> bool {
        self.at_start() && self.header[0] >> 4 == 14
    }

    /// Looks at the start of `input` (not empty): says what it is and, but
    /// for `Starts`, how much was consumed (`Within(n)`: n bytes; `Header`:
    /// one byte).
    pub fn step(&mut self, input: &[u8]) -> Result<Step, Malformed> {
        if self.body > 0 {
            let n = self.body.min(input.len());
            self.body -= n;
            return Ok(Step::Within(n));
        }
        if self.len == 0 {
            self.header[0] = input[0];
            self.len = 1;
            return Ok(Step::Starts(input[0]));
        }
        self.header[self.len] = input[0];
        self.len += 1;
        if input[0] & 0x80 != 0 {
            // The remaining length has at most four bytes.
            if self.len == 5 {
                return Err(Malformed);
            }
            return Ok(Step::Within(1));
        }
        let remaining = self.header[1..self.len]
            .iter()
            .rev()
            .fold(0usize, |acc, b| (acc << 7) | usize::from(b & 0x7f));
        self.len = 0;
        self.body = remaining;
        Ok(Step::Header(remaining))
    }
}

/// Whether a packet of this type (high nibble) is charged to the login.
pub fn charged(first: u8) -> bool {
    // PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PINGREQ.
    matches!(first >> 4, 3 | 8 | 10 | 12)
}

/// The username of a CONNECT's body (MQTT 3.1, 3.1.1 and 5), if it has one.
pub fn connect_username(body: &[u8]) -> Option<String> {
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn field(&mut self) -> Option<&'a [u8]> {
            let n = self.take(2)?;
            self.take(usize::from(u16::from_be_bytes([n[0], n[1]])))
        }
        fn varint(&mut self) -> Option<usize> {
            let mut v = 0usize;
            for i in 0..4 {
                let b = self.u8()?;
                v |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return Some(v);
                }
            }
            None
        }
        fn properties(&mut self) -> Option<()> {
            let n = self.varint()?;
            self.take(n).map(|_| ())
        }
    }
    let mut c = Cursor(body);
    c.field()?; // "MQTT" or "MQIsdp"
    let level = c.u8()?;
    let flags = c.u8()?;
    c.take(2)?; // keep-alive
    let v5 = level == 5;
    if v5 {
        c.properties()?;
    }
    c.field()?; // client id
    if flags & 0x04 != 0 {
        if v5 {
            c.properties()?;
        }
        c.field()?; // will topic
        c.field()?; // will payload
    }
    if flags & 0x80 == 0 {
        return None;
    }
    c.field().map(|u| String::from_utf8_lossy(u).into_owned())
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Whether the door takes device connections yet: held at start-up until
/// whoever started the broker opens it, once and for good.
#[derive(Debug, Default)]
pub struct Door {
    open: AtomicBool,
    opened: Notify,
}

impl Door {
    /// A door that takes connections from the start.
    pub fn open_now() -> Arc<Door> {
        let door = Arc::new(Door::default());
        door.open();
        door
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Returns once the door is open.
    pub async fn opened(&self) {
        loop {
            let notified = self.opened.notified();
            tokio::pin!(notified);
            // Registered before the check, so an `open` in between is seen.
            notified.as_mut().enable();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

/// The relay's shared state.
struct Ingress {
    broker: SocketAddr,
    door: Arc<Door>,
    logins: Arc<Logins>,
    /// Whether the broker checks logins: only then is a username someone's.
    logins_checked: bool,
    /// The largest CONNECT read (the broker's packet limit).
    max_connect: usize,
    /// Time for a TLS handshake and the CONNECT ([`CONNECT_TIMEOUT`]).
    connect_timeout: Duration,
    connections: Arc<Semaphore>,
    warnings: Warnings,
}

/// Where the relay listens, and what it needs.
pub struct Listeners {
    pub plain: std::net::TcpListener,
    pub tls: Option<(std::net::TcpListener, TlsAcceptor)>,
}

/// A TLS acceptor for the embedded broker's certificate and key (PEM).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("the certificate and key do not make a TLS identity: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Relay listeners to the broker's loopback port, keyed by where they
/// listen: qrgate's own client, when it is told to connect to one of them,
/// goes to the broker directly instead (`direct`).
fn routes() -> &'static Mutex<HashMap<SocketAddr, SocketAddr>> {
    static ROUTES: OnceLock<Mutex<HashMap<SocketAddr, SocketAddr>>> = OnceLock::new();
    ROUTES.get_or_init(Default::default)
}

/// The broker's own port when `host:port` is a device listener of an
/// embedded broker in this process. qrgate's client is not a device: it must
/// read the broker at full speed, which is the point of the allowance.
pub fn direct(host: &str, port: u16) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = host.parse().ok()?;
    let routes = routes().lock().unwrap_or_else(|e| e.into_inner());
    routes.get(&SocketAddr::new(ip, port)).copied().or_else(|| {
        // A listener on every address also listens on loopback.
        routes
            .iter()
            .find(|(l, _)| l.ip().is_unspecified() && l.port() == port && ip.is_loopback())
            .map(|(_, b)| *b)
    })
}

/// Starts the relay on its own thread (like rumqttd, it lives as long as the
/// process). `broker`: rumqttd's loopback listener. It logs where the
/// caller's thread logs.
pub fn start(
    listeners: Listeners,
    broker: SocketAddr,
    door: Arc<Door>,
    allowance: Allowance,
    logins_checked: bool,
    max_connect: usize,
    connect_timeout: Duration,
) -> io::Result<()> {
    {
        let mut routes = routes().lock().unwrap_or_else(|e| e.into_inner());
        routes.insert(listeners.plain.local_addr()?, broker);
        if let Some((l, _)) = &listeners.tls {
            routes.insert(l.local_addr()?, broker);
        }
    }
    listeners.plain.set_nonblocking(true)?;
    if let Some((l, _)) = &listeners.tls {
        l.set_nonblocking(true)?;
    }
    let ingress = Arc::new(Ingress {
        broker,
        door,
        logins: Arc::new(Logins::new(allowance)),
        logins_checked,
        max_connect,
        connect_timeout,
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        warnings: Warnings::default(),
    });
    let logs = tracing::dispatcher::get_default(|d| d.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("qrgate-ingress".into())
        .spawn(move || {
            let _logs = tracing::dispatcher::set_default(&logs);
            runtime.block_on(async move {
                tokio::spawn(summaries(Arc::clone(&ingress)));
                let plain = match TcpListener::from_std(listeners.plain) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the embedded broker's listener failed");
                        return;
                    }
                };
                if let Some((l, acceptor)) = listeners.tls {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(accept(Arc::clone(&ingress), l, Some(acceptor)));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the embedded broker's TLS listener failed")
                        }
                    }
                }
                accept(ingress, plain, None).await;
            });
        })?;
    Ok(())
}

async fn accept(ingress: Arc<Ingress>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    ingress.door.opened().await;
    let mut full_logged = false;
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, typically: the device retries.
                tracing::warn!(error = %e, "the embedded broker cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&ingress.connections).try_acquire_owned() else {
            if !full_logged {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "the embedded broker has all the device connections it takes; closing new ones"
                );
                full_logged = true;
            }
            continue;
        };
        full_logged = false;
        let _ = socket.set_nodelay(true);
        let ingress = Arc::clone(&ingress);
        let tls = tls.clone();
        tokio::spawn(async move {
            let device: Box<dyn Stream> = match tls {
                None => Box::new(socket),
                Some(acceptor) => {
                    match tokio::time::timeout(ingress.connect_timeout, acceptor.accept(socket))
                        .await
                    {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            ingress.refused(peer, Refusal::TlsHandshake, &e.to_string());
                            return;
                        }
                        Err(_) => {
                            ingress.refused(peer, Refusal::ConnectTimeout, "no TLS handshake");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = ingress.serve(device, peer, permit).await {
                tracing::debug!(%peer, error = %e, "device connection closed");
            }
        });
    }
}

/// Why the door closed a device's connection itself: a device's firmware or
/// certificate to fix, or a stranger probing the port. Either way a stranger
/// can cause it, so it is written once a minute per kind with the peer's
/// address, and the rest counted ([`Warnings`]); never what the device sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// What it sent does not frame as MQTT, or does not start with a CONNECT
    /// the broker would read.
    Malformed,
    /// No TLS handshake and CONNECT within the time allowed.
    ConnectTimeout,
    /// Its TLS handshake failed.
    TlsHandshake,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::Malformed,
        Refusal::ConnectTimeout,
        Refusal::TlsHandshake,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Refusal::Malformed => "device connection closed by the embedded broker: not MQTT",
            Refusal::ConnectTimeout => {
                "device connection closed by the embedded broker: no CONNECT in time"
            }
            Refusal::TlsHandshake => {
                "device connection closed by the embedded broker: TLS handshake failed"
            }
        }
    }
}

/// Per kind of [`Refusal`], the minute under way: whether its first was
/// written, and how many more came.
#[derive(Default)]
struct Warnings {
    minute: Mutex<[Tally; Refusal::ALL.len()]>,
}

#[derive(Clone, Copy, Default)]
struct Tally {
    written: bool,
    more: u64,
    last_peer: Option<SocketAddr>,
}

impl Warnings {
    fn minute(&self) -> std::sync::MutexGuard<'_, [Tally; Refusal::ALL.len()]> {
        self.minute.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `true` when this one is to be written (the first of its kind this
    /// minute); otherwise it is counted.
    fn note(&self, refusal: Refusal, peer: SocketAddr) -> bool {
        let mut minute = self.minute();
        let tally = &mut minute[refusal as usize];
        if !tally.written {
            tally.written = true;
            return true;
        }
        tally.more += 1;
        tally.last_peer = Some(peer);
        false
    }

    /// Ends the minute: each kind with more than its first written, how many
    /// more, and the last one's peer.
    fn drain(&self) -> Vec<(Refusal, u64, Option<SocketAddr>)> {
        let mut minute = self.minute();
        Refusal::ALL
            .into_iter()
            .filter_map(|r| {
                let tally = std::mem::take(&mut minute[r as usize]);
                (tally.more > 0).then_some((r, tally.more, tally.last_peer))
            })
            .collect()
    }
}

/// Writes, once a minute, how many refusals of each kind were only counted.
async fn summaries(ingress: Arc<Ingress>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once.
    every.tick().await;
    loop {
        every.tick().await;
        for (refusal, more, last_peer) in ingress.warnings.drain() {
            tracing::warn!(
                reason = refusal.reason(),
                more,
                last_peer = last_peer.map(|p| p.to_string()),
                "{} ({more} more in the last minute, counted)",
                refusal.what()
            );
        }
    }
}

/// Why the relay ended a connection, when not because a side closed it.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("{reason}: {detail}", reason = .0.reason(), detail = .1)]
    Refused(Refusal, String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Malformed> for Cut {
    fn from(_: Malformed) -> Cut {
        Cut::Refused(
            Refusal::Malformed,
            "a remaining length of more than four bytes".into(),
        )
    }
}

/// How the device's side of a connection ended.
enum Left {
    /// It closed, or may not stay: its end goes to the broker as it came.
    Closed,
    /// It sent a DISCONNECT: the broker is left to end the connection.
    Disconnected,
}

impl Ingress {
    fn refused(&self, peer: SocketAddr, refusal: Refusal, detail: &str) {
        if self.warnings.note(refusal, peer) {
            tracing::warn!(
                %peer,
                reason = refusal.reason(),
                detail,
                "{} (the first of the minute; the rest are counted)",
                refusal.what()
            );
        }
    }

    async fn serve(
        &self,
        device: Box<dyn Stream>,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
    ) -> io::Result<()> {
        let broker = TcpStream::connect(self.broker).await?;
        broker.set_nodelay(true)?;
        let (mut from_device, mut to_device) = tokio::io::split(device);
        let (mut from_broker, mut to_broker) = broker.into_split();
        let (accepted_tx, accepted_rx) = oneshot::channel::<bool>();

        let down = async {
            // The broker's first packet answers the CONNECT: 0x20, its
            // length, flags, and the return code (0: accepted).
            let mut accepted_tx = Some(accepted_tx);
            let mut head = Vec::with_capacity(4);
            let mut buf = vec![0u8; CHUNK];
            // A device gone is `up`'s to notice; meanwhile the broker is read
            // to its end, so that it is always the one to close (see
            // `Left::Disconnected`).
            let mut device_gone = None;
            loop {
                let n = from_broker.read(&mut buf).await?;
                if n == 0 {
                    return device_gone.map_or(Ok(()), Err);
                }
                if let Some(tx) = accepted_tx.take() {
                    head.extend_from_slice(&buf[..n.min(4 - head.len())]);
                    if head.len() == 4 {
                        let _ = tx.send(head[0] == 0x20 && head[3] == 0);
                    } else {
                        accepted_tx = Some(tx);
                    }
                }
                if device_gone.is_none() {
                    let written = match to_device.write_all(&buf[..n]).await {
                        Ok(()) => to_device.flush().await,
                        Err(e) => Err(e),
                    };
                    device_gone = written.err();
                }
            }
        };

        let up = async {
            let mut buf = vec![0u8; CHUNK];
            // The CONNECT, whole, and whatever came after it.
            let (mut connect, connect_len, body_at) = tokio::time::timeout(
                self.connect_timeout,
                read_connect(&mut from_device, &mut buf, self.max_connect),
            )
            .await
            .map_err(|_| Cut::Refused(Refusal::ConnectTimeout, "no CONNECT".into()))??;
            let name = connect_username(&connect[body_at..connect_len]);
            to_broker.write_all(&connect[..connect_len]).await?;
            // Nothing more is read from the device until the broker has
            // accepted the login: only then is its bucket the login's.
            if !matches!(accepted_rx.await, Ok(true)) {
                // Refused: the broker closes the connection (`down`).
                return std::future::pending::<Result<Left, Cut>>().await;
            }
            let name = if self.logins_checked {
                name.filter(|n| !n.is_empty())
            } else {
                None
            };
            let Some(claim) = self.logins.claim(name.as_deref()) else {
                tracing::warn!(username = %super::inbound::cut(name.as_deref().unwrap_or(""), 64),
                    max = MAX_CONNECTIONS_PER_LOGIN,
                    "a device login has all the connections it may open; closing a new one");
                return Ok(Left::Closed);
            };
            let mut framer = Framer::default();
            let rest = connect.split_off(connect_len);
            drop(connect);
            if let Relayed::Disconnect = relay(&mut framer, &claim, &rest, &mut to_broker).await? {
                return Ok(Left::Disconnected);
            }
            drop(rest);
            loop {
                let n = from_device.read(&mut buf).await?;
                if n == 0 {
                    // Closed as the device closed it, so that the broker reads
                    // a DISCONNECT before the end (no last will then).
                    to_broker.shutdown().await?;
                    return Ok(Left::Closed);
                }
                if let Relayed::Disconnect =
                    relay(&mut framer, &claim, &buf[..n], &mut to_broker).await?
                {
                    return Ok(Left::Disconnected);
                }
            }
        };
        tokio::pin!(down, up);
        let ended: Result<(), Cut> = tokio::select! {
            r = &mut down => r.map_err(Cut::Io),
            r = &mut up => match r {
                // The broker closes its side in turn; what it still says
                // goes to the device meanwhile.
                Ok(Left::Closed) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut down).await;
                    Ok(())
                }
                // rumqttd forgets a connection when it reads its DISCONNECT,
                // and gives its number to the next one to connect; its link
                // to the device then ends on its own. If the link reads the
                // end of the stream first, it reports that number gone once
                // more, and the router drops whichever connection holds it
                // now: another device's, just after its CONNACK, with what it
                // publishes. So the relay never ends a connection whose
                // device said DISCONNECT: it stops reading the device and
                // waits for the broker to close (docs/decisions.md).
                Ok(Left::Disconnected) => {
                    if tokio::time::timeout(LEAVE_TIMEOUT, &mut down).await.is_err() {
                        tracing::debug!(%peer, "the broker kept a connection open after its DISCONNECT");
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        match ended {
            // Written while the device's socket is still open: it sees the
            // end after the line is in the log.
            Err(Cut::Refused(refusal, detail)) => {
                self.refused(peer, refusal, &detail);
                Ok(())
            }
            Err(Cut::Io(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }
}

/// A fixed header at the start of `data`: its first byte, remaining length
/// and own length; `None` while incomplete.
fn fixed_header(data: &[u8]) -> Result<Option<(u8, usize, usize)>, Malformed> {
    let Some(&first) = data.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 1..5 {
        let Some(&b) = data.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok(Some((first, remaining, i + 1)));
        }
    }
    Err(Malformed)
}

/// Reads until a whole CONNECT is in: returns what was read, the CONNECT's
/// length and where its body starts.
async fn read_connect(
    from_device: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    max: usize,
) -> Result<(Vec<u8>, usize, usize), Cut> {
    let malformed = |detail: &str| Cut::Refused(Refusal::Malformed, detail.into());
    let mut data = Vec::new();
    loop {
        if let Some((first, remaining, header)) = fixed_header(&data)? {
            if first >> 4 != 1 {
                return Err(malformed("the first packet is not a CONNECT"));
            }
            if remaining > max {
                return Err(malformed("a CONNECT over the packet limit"));
            }
            if data.len() >= header + remaining {
                return Ok((data, header + remaining, header));
            }
        }
        let n = from_device.read(buf).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// What [`relay`] passed on.
enum Relayed {
    /// All of it.
    All,
    /// Everything up to the end of a DISCONNECT; nothing after it.
    Disconnect,
}

/// Passes `input` on to the broker, waiting for the login's bucket before
/// each charged packet: what precedes it goes first, so the broker never
/// waits for bytes the relay holds. Stops after a DISCONNECT: the device
/// may send nothing after it.
async fn relay(
    framer: &mut Framer,
    claim: &Claim,
    input: &[u8],
    to_broker: &mut (impl AsyncWrite + Unpin),
) -> Result<Relayed, Cut> {
    let mut at = 0;
    let mut sent = 0;
    while at < input.len() {
        match framer.step(&input[at..])? {
            Step::Starts(first) => {
                if charged(first) {
                    if sent < at {
                        to_broker.write_all(&input[sent..at]).await?;
                        sent = at;
                    }
                    claim.take().await;
                }
                at += 1;
            }
            Step::Within(n) => at += n,
            Step::Header(_) => at += 1,
        }
        if framer.after_disconnect() {
            to_broker.write_all(&input[sent..at]).await?;
            return Ok(Relayed::Disconnect);
        }
    }
    if sent < input.len() {
        to_broker.write_all(&input[sent..]).await?;
    }
    Ok(Relayed::All)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(framer: &mut Framer, input: &[u8]) -> Vec<u8> {
        let mut starts = Vec::new();
        let mut at = 0;
        while at < input.len() {
            match framer.step(&input[at..]).unwrap() {
                Step::Starts(first) => {
                    starts.push(first);
                    at += 1;
                }
                Step::Within(n) => at += n,
                Step::Header(_) => at += 1,
            }
        }
        starts
    }

    fn publish(topic: &str, payload_len: usize) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(std::iter::repeat_n(b'x', payload_len));
        packet(0x32, &body)
    }

    #[test]
    fn packets_are_found_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        stream.extend(publish("a/b", 10));
        stream.extend([0xC0, 0]); // PINGREQ
        stream.extend(publish("c", 300)); // a two-byte length
        stream.extend([0x40, 2, 0, 1]); // PUBACK
        for cut in 0..stream.len() {
            let mut f = Framer::default();
            let mut starts = packets(&mut f, &stream[..cut]);
            starts.extend(packets(&mut f, &stream[cut..]));
            assert_eq!(starts, vec![0x32, 0xC0, 0x32, 0x40], "cut at {cut}");
            assert!(f.at_start());
        }
        let charged_ones = [0x32u8, 0xC0, 0x32, 0x40]
            .iter()
            .filter(|f| charged(**f))
            .count();
        assert_eq!(charged_ones, 3, "acknowledgements are free");
    }

    #[test]
    fn a_length_over_four_bytes_is_malformed() {
        let mut f = Framer::default();
        let input = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut at = 0;
        let mut failed = false;
        while at < input.len() {
            match f.step(&input[at..]) {
                Ok(Step::Within(n)) => at += n,
                Ok(_) => at += 1,
                Err(Malformed) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed);
    }

    fn connect_body(level: u8, user: Option<&str>, will: bool) -> Vec<u8> {
        let field = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        };
        let mut b = Vec::new();
        field(&mut b, b"MQTT");
        b.push(level);
        let mut flags = 0x02;
        if user.is_some() {
            flags |= 0xC0;
        }
        if will {
            flags |= 0x04;
        }
        b.push(flags);
        b.extend_from_slice(&[0, 30]);
        if level == 5 {
            b.extend_from_slice(&[3, 0x21, 0, 10]); // receive maximum
        }
        field(&mut b, b"pump-1-display");
        if will {
            if level == 5 {
                b.push(0);
            }
            field(&mut b, b"qrgate/pos/pump-1/status");
            field(&mut b, b"offline");
        }
        if let Some(u) = user {
            field(&mut b, u.as_bytes());
            field(&mut b, b"secret");
        }
        b
    }

    #[test]
    fn the_username_is_read_from_connects_of_every_version() {
        for level in [3, 4, 5] {
            for will in [false, true] {
                assert_eq!(
                    connect_username(&connect_body(level, Some("pump-1"), will)).as_deref(),
                    Some("pump-1"),
                    "level {level}, will {will}"
                );
                assert_eq!(connect_username(&connect_body(level, None, will)), None);
            }
        }
        assert_eq!(connect_username(&[0, 4, b'M']), None, "cut short");
    }

    #[test]
    fn a_bucket_lets_its_burst_through_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Allowance {
                per_sec: 100,
                burst: 5,
            },
            t0,
        );
        for _ in 0..5 {
            assert_eq!(b.take(t0), Ok(()));
        }
        assert_eq!(b.take(t0), Err(Duration::from_millis(10)));
        assert_eq!(b.take(t0 + Duration::from_millis(10)), Ok(()));
        assert!(b.take(t0 + Duration::from_millis(15)).is_err());
        assert!(!b.full(t0 + Duration::from_millis(15)));
        assert!(b.full(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_logins_connections_share_one_bucket_and_are_capped() {
        let logins = Arc::new(Logins::new(Allowance {
            per_sec: 1,
            burst: 3,
        }));
        let claims: Vec<Claim> = (0..MAX_CONNECTIONS_PER_LOGIN)
            .map(|_| logins.claim(Some("pump-1")).unwrap())
            .collect();
        assert!(logins.claim(Some("pump-1")).is_none(), "over the cap");
        assert!(logins.claim(Some("pump-2")).is_some(), "another login");
        let now = Instant::now();
        let taken = claims
            .iter()
            .filter(|c| c.bucket.lock().unwrap().take(now).is_ok())
            .count();
        assert_eq!(taken, 3, "one burst for all of them");
        drop(claims);
        // Reconnecting finds the same, still empty, bucket.
        let again = logins.claim(Some("pump-1")).unwrap();
        assert!(again.bucket.lock().unwrap().take(now).is_err());
        // Without a login, each connection has its own.
        let a = logins.claim(None).unwrap();
        let b = logins.claim(None).unwrap();
        assert!(!Arc::ptr_eq(&a.bucket, &b.bucket));
    }

    /// A packet with this first byte around `body`.
    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            p.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        p.extend_from_slice(body);
        p
    }

    /// Starts a door in front of `broker`; where devices connect.
    fn door(broker: SocketAddr, connect_timeout: Duration) -> SocketAddr {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let listeners = Listeners { plain, tls: None };
        start(
            listeners,
            broker,
            Door::open_now(),
            Allowance::default(),
            false,
            64 * 1024,
            connect_timeout,
        )
        .unwrap();
        addr
    }

    /// What the door logs, from the test's thread (the door logs where the
    /// thread that started it does).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        fn lines(&self, containing: &str) -> Vec<String> {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .filter(|l| l.contains(containing))
                .map(str::to_owned)
                .collect()
        }
    }

    /// Reads until the door closes the connection: what came before.
    async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
            .await
            .expect("the door closes the connection");
        got
    }

    /// At start-up the door is held until qrgate has subscribed: a device
    /// that connects meanwhile waits in the backlog, its CONNECT unread,
    /// and goes on to the broker once the door opens.
    #[tokio::test]
    async fn a_held_door_lets_a_waiting_device_in_once_it_opens() {
        let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let held = Arc::new(Door::default());
        start(
            Listeners { plain, tls: None },
            broker.local_addr().unwrap(),
            Arc::clone(&held),
            Allowance::default(),
            false,
            64 * 1024,
            CONNECT_TIMEOUT,
        )
        .unwrap();
        let mut device = TcpStream::connect(addr).await.unwrap();
        let connect = packet(0x10, &connect_body(4, None, false));
        device.write_all(&connect).await.unwrap();
        let early = futures_util::FutureExt::now_or_never(broker.accept());
        assert!(early.is_none(), "nothing reaches the broker while held");
        assert!(!held.is_open());

        held.open();
        let (mut at_broker, _) = broker.accept().await.unwrap();
        let mut got = vec![0; connect.len()];
        at_broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, connect);
        // Opening is for good: opened() no longer waits.
        held.opened().await;
    }

    /// rumqttd forgets a connection on its DISCONNECT and reuses its number;
    /// a link that then reads the end of the stream drops the number's new
    /// owner (a device just connected, with its publish). So after a
    /// DISCONNECT the door sends the broker nothing, not even the end of
    /// the stream the device closed at once, until the broker closes.
    /// Here a listener stands in for rumqttd, to see what the door sends it.
    #[tokio::test]
    async fn after_a_disconnect_the_door_sends_nothing_and_lets_the_broker_close() {
        let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let door = door(broker.local_addr().unwrap(), CONNECT_TIMEOUT);
        let mut device = TcpStream::connect(door).await.unwrap();
        let connect = packet(0x10, &connect_body(4, None, false));
        device.write_all(&connect).await.unwrap();
        let (mut at_broker, _) = broker.accept().await.unwrap();
        let mut got = vec![0; connect.len()];
        at_broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, connect);
        at_broker.write_all(&[0x20, 2, 0, 0]).await.unwrap();
        let mut connack = [0; 4];
        device.read_exact(&mut connack).await.unwrap();

        // A publish and a DISCONNECT, then the end of the stream at once, as
        // a device leaving cleanly does (with a stray PINGREQ before the end).
        let mut leaving = publish("a/b", 5);
        leaving.extend([0xE0, 0]);
        let said = leaving.len();
        leaving.extend([0xC0, 0]);
        device.write_all(&leaving).await.unwrap();
        device.shutdown().await.unwrap();
        let mut got = vec![0; said];
        at_broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, leaving[..said]);
        // Nothing more has come, and the stream has not ended.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        let now = socket2::SockRef::from(&at_broker).recv(&mut probe);
        assert!(
            matches!(&now, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{now:?}"
        );
        // The broker ends the connection: nothing came after the DISCONNECT.
        at_broker.shutdown().await.unwrap();
        let mut rest = Vec::new();
        at_broker.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"");
        // And the device's side is closed after the broker's.
        assert_eq!(until_closed(&mut device).await, b"");
    }

    /// A device whose stream is not MQTT is logged at WARN with its address
    /// (never what it sent), the first of the minute; the next is counted.
    #[tokio::test]
    async fn a_device_stream_that_is_not_mqtt_is_logged_at_warn_once_a_minute() {
        let (logs, _guard) = Logs::capture();
        let listening = crate::mqtt::broker::start(
            "127.0.0.1:0".parse().unwrap(),
            16 * 1024,
            crate::mqtt::broker::Access::Anonymous,
            None,
            None,
        )
        .unwrap();
        let mut peers = Vec::new();
        for _ in 0..2 {
            let mut device = TcpStream::connect(listening.addr).await.unwrap();
            peers.push(device.local_addr().unwrap().to_string());
            let connect = packet(0x10, &connect_body(4, None, false));
            device.write_all(&connect).await.unwrap();
            let mut connack = [0; 4];
            device.read_exact(&mut connack).await.unwrap();
            assert_eq!(connack, [0x20, 2, 0, 0]);
            // A remaining length of five bytes, and what would be a secret.
            device
                .write_all(&[
                    0x30, 0xff, 0xff, 0xff, 0xff, 0x01, b'h', b'u', b'n', b't', b'e', b'r', b'2',
                ])
                .await
                .unwrap();
            until_closed(&mut device).await;
        }
        let warned = logs.lines("not MQTT");
        assert_eq!(warned.len(), 1, "{warned:?}");
        let line = &warned[0];
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&format!("peer={}", peers[0])), "{line}");
        assert!(line.contains("reason=\"malformed\""), "{line}");
        assert!(logs.lines("hunter2").is_empty());
    }

    /// A device that connects and says nothing is logged at WARN when the
    /// door gives up on its CONNECT.
    #[tokio::test]
    async fn a_device_that_sends_no_connect_in_time_is_logged_at_warn() {
        let (logs, _guard) = Logs::capture();
        // Never reached: the CONNECT is awaited first.
        let broker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let door = door(broker.local_addr().unwrap(), Duration::from_millis(50));
        let mut device = TcpStream::connect(door).await.unwrap();
        let peer = device.local_addr().unwrap().to_string();
        assert_eq!(until_closed(&mut device).await, b"");
        let warned = logs.lines("no CONNECT in time");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("WARN"), "{}", warned[0]);
        assert!(warned[0].contains(&format!("peer={peer}")), "{}", warned[0]);
        assert!(
            warned[0].contains("reason=\"connect_timeout\""),
            "{}",
            warned[0]
        );
    }

    #[test]
    fn the_first_refusal_of_a_minute_is_written_and_the_rest_counted() {
        let w = Warnings::default();
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        assert!(w.note(Refusal::Malformed, a));
        assert!(!w.note(Refusal::Malformed, a));
        assert!(!w.note(Refusal::Malformed, b));
        assert!(w.note(Refusal::ConnectTimeout, a), "another kind");
        assert_eq!(w.drain(), vec![(Refusal::Malformed, 2, Some(b))]);
        // A new minute: its first is written again.
        assert!(w.drain().is_empty());
        assert!(w.note(Refusal::Malformed, b));
    }
}
