//! The embedded broker: rumqttd on its own OS thread (its `start` blocks
//! forever and builds its own runtimes; inside a tokio task it hangs). It has
//! no shutdown API, so it lives as long as the process. rumqttd listens on a
//! loopback port of its own; devices reach it through `ingress`, which holds
//! each login to an allowance, so that no device can fill the broker faster
//! than qrgate reads it. qrgate's own client connects to rumqttd's port over
//! TCP (`ingress::direct`). With logins required, a client id belongs to its
//! login (`logins`): no device can take over qrgate's session.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use super::inbound;
use super::ingress::{self, Allowance};
use super::logins::{Logins, Refusal, RefusalLog};
use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "the embedded MQTT broker cannot listen on {addr}: {reason}. If a broker (e.g. Mosquitto) \
         already runs there, use it instead with QRGATE_MQTT__BROKER=mqtt://{addr} \
         (or `[mqtt] broker = \"mqtt://{addr}\"`), or move the embedded one with \
         `[mqtt] embedded_listen`"
    )]
    PortTaken { addr: SocketAddr, reason: String },
    #[error("the embedded MQTT broker did not start: {0}")]
    Start(String),
}

/// Who may connect to the embedded broker.
#[derive(Clone)]
pub enum Access {
    /// Anyone: development only (rumqttd refuses clients without a login as
    /// soon as any authentication is configured, so this turns it off).
    Anonymous,
    /// Only these username/password pairs (the devices, and `[[mqtt.users]]`),
    /// each with the client ids derived from its username (`logins`), and
    /// qrgate's own login (`OwnLogin`).
    Users(Vec<(String, Secret)>),
}

/// The embedded broker's TLS listener.
#[derive(Clone, Debug)]
pub struct Tls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the started broker listens.
#[derive(Clone, Debug)]
pub struct Listening {
    /// Where devices connect.
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    /// rumqttd itself, on loopback: qrgate's own client, never a device.
    pub internal: SocketAddr,
    /// Held by [`start_with`] until its caller opens it (once qrgate's own
    /// client has subscribed); open from the start with [`start`].
    pub door: Arc<ingress::Door>,
}

/// Takes a port (0 picks one) and releases it for rumqttd, which binds
/// inside its own thread and only logs a failure there: a taken port must
/// stop the start-up here, while it still can.
fn claim(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = TcpListener::bind(listen).map_err(|e| BrokerError::PortTaken {
        addr: listen,
        reason: e.to_string(),
    })?;
    probe
        .local_addr()
        .map_err(|e| BrokerError::Start(e.to_string()))
}

/// The largest packet the embedded broker reads from anyone (qrgate's
/// client included): 4 × `[mqtt] max_payload_bytes`, at least 64 KiB, as
/// deploy/mosquitto.conf's `max_packet_size`.
fn max_packet_size(max_payload_bytes: usize) -> usize {
    (max_payload_bytes * 4).max(64 * 1024)
}

/// qrgate's own login at the embedded broker, and the client id its client
/// connects with (`[mqtt] client_id`), which no device may use.
#[derive(Clone)]
pub struct OwnLogin {
    pub username: String,
    pub password: Secret,
    pub client_id: String,
}

impl OwnLogin {
    /// The id of the start-up probe: one of qrgate's own, never the client's
    /// (the probe would disconnect it).
    fn probe_id(&self) -> String {
        format!("{}-probe", self.client_id)
    }
}

/// The login check both listeners share, and its log's memory.
struct LoginCheck {
    logins: Logins,
    log: Mutex<RefusalLog>,
}

impl LoginCheck {
    fn check(&self, client_id: &str, user: &str, pass: &str) -> bool {
        let Err(refusal) = self.logins.check(client_id, user, pass) else {
            return true;
        };
        let user = inbound::cut(user, 64);
        let due = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused(&user, Instant::now());
        if let Some(refused) = due {
            let client_id = inbound::cut(client_id, 64);
            match refusal {
                Refusal::BadLogin => tracing::warn!(username = %user, %client_id, refused,
                    reason = refusal.reason(), "MQTT login refused by the embedded broker (logged again with \
                    backoff while it retries)"),
                Refusal::ClientId {
                    reserved_for_qrgate,
                } => tracing::warn!(username = %user,
                    %client_id, refused, reason = refusal.reason(), reserved_for_qrgate,
                    "MQTT login refused by the embedded broker: a client id must be the login's username, or \
                    start with it and `-` (logged again with backoff while it retries)"),
            }
        }
        false
    }
}

fn connections(max_payload_bytes: usize, check: Option<&Arc<LoginCheck>>) -> ConnectionSettings {
    let mut c = ConnectionSettings {
        connection_timeout_ms: 10_000,
        // rumqttd compares this with a packet's remaining length and drops
        // the publisher's connection on reading a larger one's header, before
        // its payload is read: a hostile device cannot make the broker hold
        // 256 MiB. Above qrgate's own cap, so that a merely oversize message
        // still reaches qrgate and is refused with a reason the device sees.
        max_payload_size: max_packet_size(max_payload_bytes),
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(check) = check {
        let check = Arc::clone(check);
        // rumqttd hands over the CONNECT's client id with the login: the id is
        // checked with it (see `logins`), or a device could take over
        // qrgate's session with its own password.
        c.set_auth_handler(move |client_id: String, user: String, pass: String| {
            std::future::ready(check.check(&client_id, &user, &pass))
        });
    }
    c
}

/// Binds a device listener here, where a taken port can still stop the
/// start-up.
fn bind(listen: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(listen).map_err(|e| BrokerError::PortTaken {
        addr: listen,
        reason: e.to_string(),
    })
}

/// [`start_with`] with the default allowance per login and the door open:
/// a broker for clients that are not qrgate's (tests, benchmarks).
pub fn start(
    listen: SocketAddr,
    max_payload_bytes: usize,
    access: Access,
    tls: Option<Tls>,
    own: Option<OwnLogin>,
) -> Result<Listening, BrokerError> {
    start_with(
        listen,
        max_payload_bytes,
        access,
        tls,
        own,
        Allowance::default(),
    )
    .inspect(|l| l.door.open())
}

/// Starts rumqttd and the devices' listeners on `listen` (and `tls`), each
/// login's packets let through at `allowance` (`ingress`), and waits until it
/// accepts connections. Port 0 picks a free port; the addresses used are
/// returned. Devices are held at the door until the caller opens it.
pub fn start_with(
    listen: SocketAddr,
    max_payload_bytes: usize,
    access: Access,
    tls: Option<Tls>,
    own: Option<OwnLogin>,
    allowance: Allowance,
) -> Result<Listening, BrokerError> {
    let plain = bind(listen)?;
    let tls_listener = tls.as_ref().map(|t| bind(t.listen)).transpose()?;
    let addr = plain
        .local_addr()
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    let tls_addr = tls_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    let internal = claim(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let logins_checked = matches!(access, Access::Users(_));
    let check = match access {
        Access::Anonymous => None,
        Access::Users(devices) => Some(Arc::new(LoginCheck {
            logins: Logins::new(
                devices,
                own.as_ref()
                    .map(|o| (o.username.clone(), o.password.clone(), o.client_id.clone())),
            ),
            log: Mutex::new(RefusalLog::default()),
        })),
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "qrgate".to_owned(),
        ServerSettings {
            name: "qrgate-mqtt".to_owned(),
            listen: internal,
            // TLS is ended in `ingress`, which relays to this port.
            tls: None,
            next_connection_delay_ms: 1,
            connections: connections(max_payload_bytes, check.as_ref()),
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_010,
            max_outgoing_packet_count: 1_000,
            // rumqttd keeps every message of a subscription filter in memory
            // up to size × count, and a subscriber that falls further behind
            // than that loses messages, QoS 1 or not. 100 MiB × 10 let one
            // busy filter (all sales) grow to 1 GiB; 1 MiB × 4 lost sales in a
            // burst of 90,000 (measured). 64 MiB holds some 350,000 device
            // messages. In segments of 1 MiB rather than 8: a segment is a Vec
            // of 232-byte entries grown by doubling, so smaller ones leave
            // less spare capacity and freed copies behind (about 170 bytes
            // less RSS per pending sale at 100,000, measured).
            max_segment_size: 1024 * 1024,
            max_segment_count: 64,
            ..RouterConfig::default()
        },
        v4: Some(v4),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("qrgate-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut untuned = true;
    let mut spoke_at: Option<Instant> = None;
    let door = Arc::new(ingress::Door::default());
    let listening = Listening {
        addr,
        tls_addr,
        internal,
        door: Arc::clone(&door),
    };
    let devices = |tls_listener: Option<TcpListener>| {
        // A TLS listener whose certificate cannot be used is reported and
        // left out; the plain one still serves (as rumqttd did).
        let tls = match (tls_listener, &tls) {
            (Some(l), Some(t)) => match ingress::tls_acceptor(&t.cert, &t.key) {
                Ok(acceptor) => Some((l, acceptor)),
                Err(e) => {
                    tracing::error!(listen = %t.listen, error = %e,
                        "the embedded broker's TLS listener cannot start");
                    None
                }
            },
            _ => None,
        };
        ingress::start(
            ingress::Listeners { plain, tls },
            internal,
            Arc::clone(&door),
            allowance,
            logins_checked,
            max_packet_size(max_payload_bytes),
            ingress::CONNECT_TIMEOUT,
        )
        .map_err(|e| BrokerError::Start(e.to_string()))
    };
    let mut devices = Some((devices, tls_listener));
    loop {
        // Before anyone connects, when we can: see `nodelay_on_listener`.
        if untuned {
            untuned = match nodelay_on_listener(internal) {
                Ok(set) => !set,
                Err(e) => {
                    tracing::warn!(listener = %internal, error = %e, "cannot set TCP_NODELAY on the \
                        embedded broker's listener: its messages may wait up to 40 ms (Nagle)");
                    false
                }
            };
        }
        if spoke_at.is_none() && speaks_mqtt(internal, own.as_ref()) {
            spoke_at = Some(Instant::now());
        }
        if let Some(at) = spoke_at {
            if !untuned || at.elapsed() > Duration::from_secs(1) {
                if untuned {
                    tracing::warn!(listener = %internal, "embedded broker listener not found: \
                        TCP_NODELAY not set on it");
                }
                // Devices come in once the broker answers.
                if let Some((start_devices, tls_listener)) = devices.take() {
                    start_devices(tls_listener)?;
                }
                return Ok(listening);
            }
        }
        if Instant::now() > deadline {
            return Err(BrokerError::Start(format!(
                "nothing listens on {addr} after 10 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// rumqttd never sets TCP_NODELAY on the connections it accepts, so what it
/// writes to qrgate's own client and to devices waits on Nagle's algorithm
/// and the peer's delayed ACK (a p99 of some 40 ms from a device's sale to a
/// servable poll, measured). It offers no setting for it and no way to hand
/// it a listener, but on Linux an accepted socket inherits TCP_NODELAY from
/// its listening socket, and rumqttd runs in this process: this finds its
/// listening socket among the process's file descriptors (a TCP listener
/// bound to `addr`) and sets TCP_NODELAY on it. Connections accepted before
/// this ran keep Nagle. `Ok(true)` when set, `Ok(false)` when no such socket
/// is open (yet).
#[cfg(target_os = "linux")]
pub fn nodelay_on_listener(addr: SocketAddr) -> std::io::Result<bool> {
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the calls below and
        // never closed here. Another thread may close it, or reuse its number,
        // in between: then these calls fail, or see another socket, which is
        // only changed if it too listens on `addr`, and only one can.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let is_it = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
            && sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a == addr)
            && sock.is_listener().unwrap_or(false);
        if is_it {
            sock.set_tcp_nodelay(true)?;
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(not(target_os = "linux"))]
pub fn nodelay_on_listener(_addr: SocketAddr) -> std::io::Result<bool> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// A full MQTT handshake (CONNECT, CONNACK, DISCONNECT), so readiness is
/// the broker answering, and the probe leaves no error in its log.
fn speaks_mqtt(addr: SocketAddr, login: Option<&OwnLogin>) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    // MQTT 3.1.1 CONNECT, clean session, keep-alive 10 s, with qrgate's
    // login and one of its ids when the broker wants one.
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&[0, 10]);
    let id = login.map_or_else(|| "qrgate-probe".to_owned(), OwnLogin::probe_id);
    field(&mut body, id.as_bytes());
    if let Some(own) = login {
        field(&mut body, own.username.as_bytes());
        field(&mut body, own.password.expose().as_bytes());
    }
    // MQTT's variable-length "remaining length".
    let mut connect = vec![0x10];
    let mut n = body.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        connect.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    connect.extend_from_slice(&body);
    let mut connack = [0u8; 4];
    let ok = s.write_all(&connect).is_ok()
        && s.read_exact(&mut connack).is_ok()
        && connack[0] == 0x20
        && connack[3] == 0;
    let _ = s.write_all(&[0xE0, 0]);
    // Let the broker close first, so it does not log our leaving as an error.
    let mut rest = [0u8; 16];
    while matches!(s.read(&mut rest), Ok(n) if n > 0) {}
    ok
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// The listener is found by its address among the process's descriptors,
    /// and the connections it accepts afterwards have TCP_NODELAY.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_tuned_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _before = TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!accepted.nodelay().unwrap(), "Linux's default is Nagle on");

        assert!(nodelay_on_listener(addr).unwrap());
        let _after = TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());

        // The accepted sockets share its address but are not listeners.
        drop(listener);
        assert!(!nodelay_on_listener(addr).unwrap());
    }
}
