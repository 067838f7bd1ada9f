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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::tokio_rustls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

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
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The relay's shared state.
struct Ingress {
    broker: SocketAddr,
    logins: Arc<Logins>,
    /// Whether the broker checks logins: only then is a username someone's.
    logins_checked: bool,
    /// The largest CONNECT read (the broker's packet limit).
    max_connect: usize,
    connections: Arc<Semaphore>,
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
/// process). `broker`: rumqttd's loopback listener.
pub fn start(
    listeners: Listeners,
    broker: SocketAddr,
    allowance: Allowance,
    logins_checked: bool,
    max_connect: usize,
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
        logins: Arc::new(Logins::new(allowance)),
        logins_checked,
        max_connect,
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("qrgate-ingress".into())
        .spawn(move || {
            runtime.block_on(async move {
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
    let mut full_logged = false;
    loop {
        let (socket, _) = match listener.accept().await {
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
                    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake with a device failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = ingress.serve(device, permit).await {
                tracing::debug!(error = %e, "device connection closed");
            }
        });
    }
}

impl Ingress {
    async fn serve(
        &self,
        device: Box<dyn Stream>,
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
            loop {
                let n = from_broker.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                if let Some(tx) = accepted_tx.take() {
                    head.extend_from_slice(&buf[..n.min(4 - head.len())]);
                    if head.len() == 4 {
                        let _ = tx.send(head[0] == 0x20 && head[3] == 0);
                    } else {
                        accepted_tx = Some(tx);
                    }
                }
                to_device.write_all(&buf[..n]).await?;
                to_device.flush().await?;
            }
        };

        let up = async {
            let mut buf = vec![0u8; CHUNK];
            // The CONNECT, whole, and whatever came after it.
            let (mut connect, connect_len, body_at) = tokio::time::timeout(
                CONNECT_TIMEOUT,
                read_connect(&mut from_device, &mut buf, self.max_connect),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no CONNECT in time"))??;
            let name = connect_username(&connect[body_at..connect_len]);
            to_broker.write_all(&connect[..connect_len]).await?;
            // Nothing more is read from the device until the broker has
            // accepted the login: only then is its bucket the login's.
            if !matches!(accepted_rx.await, Ok(true)) {
                // Refused: the broker closes the connection (`down`).
                return std::future::pending::<io::Result<()>>().await;
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
                return Ok(());
            };
            let mut framer = Framer::default();
            let rest = connect.split_off(connect_len);
            drop(connect);
            relay(&mut framer, &claim, &rest, &mut to_broker).await?;
            drop(rest);
            loop {
                let n = from_device.read(&mut buf).await?;
                if n == 0 {
                    // Closed as the device closed it, so that the broker reads
                    // a DISCONNECT before the end (no last will then).
                    to_broker.shutdown().await?;
                    return Ok::<_, io::Error>(());
                }
                relay(&mut framer, &claim, &buf[..n], &mut to_broker).await?;
            }
        };
        tokio::pin!(down, up);
        tokio::select! {
            r = &mut down => r,
            r = &mut up => {
                r?;
                // The broker closes its side in turn; what it still says
                // goes to the device meanwhile.
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut down).await;
                Ok(())
            }
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
) -> io::Result<(Vec<u8>, usize, usize)> {
    let mut data = Vec::new();
    loop {
        if let Some((first, remaining, header)) = fixed_header(&data).map_err(invalid)? {
            if first >> 4 != 1 {
                return Err(invalid("the first packet is not a CONNECT"));
            }
            if remaining > max {
                return Err(invalid("a CONNECT over the packet limit"));
            }
            if data.len() >= header + remaining {
                return Ok((data, header + remaining, header));
            }
        }
        let n = from_device.read(buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Passes `input` on to the broker, waiting for the login's bucket before
/// each charged packet: what precedes it goes first, so the broker never
/// waits for bytes the relay holds.
async fn relay(
    framer: &mut Framer,
    claim: &Claim,
    input: &[u8],
    to_broker: &mut (impl AsyncWrite + Unpin),
) -> io::Result<()> {
    let mut at = 0;
    let mut sent = 0;
    while at < input.len() {
        match framer.step(&input[at..]).map_err(invalid)? {
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
    }
    if sent < input.len() {
        to_broker.write_all(&input[sent..]).await?;
    }
    Ok(())
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
        let mut p = vec![0x32];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            p.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        p.extend_from_slice(&body);
        p
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
}
