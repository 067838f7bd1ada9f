//! The embedded broker: rumqttd on its own OS thread (its `start` blocks
//! forever and builds its own runtimes; inside a tokio task it hangs). It has
//! no shutdown API, so it lives as long as the process. qrgate connects to it
//! over TCP like any device.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

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

/// Starts rumqttd on `listen` and waits until it accepts connections.
/// Port 0 picks a free port; the address actually used is returned.
/// A full MQTT handshake (CONNECT, CONNACK, DISCONNECT), so readiness is
/// the broker answering, and the probe leaves no error in its log.
fn speaks_mqtt(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    // MQTT 3.1.1 CONNECT, clean session, keep-alive 10 s, client id "qrgate-probe".
    let mut connect = vec![
        0x10, 24, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 12,
    ];
    connect.extend_from_slice(b"qrgate-probe");
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

pub fn start(listen: SocketAddr, max_payload_bytes: usize) -> Result<SocketAddr, BrokerError> {
    // rumqttd binds inside its own thread and only logs a failure there, so
    // the port is checked here first, while it can still stop the start-up.
    let probe = TcpListener::bind(listen).map_err(|e| BrokerError::PortTaken {
        addr: listen,
        reason: e.to_string(),
    })?;
    let addr = probe
        .local_addr()
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    drop(probe);

    let mut v4 = HashMap::new();
    v4.insert(
        "qrgate".to_owned(),
        ServerSettings {
            name: "qrgate-mqtt".to_owned(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                // Above qrgate's own cap, so that an oversize message still
                // reaches qrgate and is refused with a reason the device sees.
                max_payload_size: (max_payload_bytes * 4).max(64 * 1024),
                max_inflight_count: 500,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_010,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
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
    loop {
        if speaks_mqtt(addr) {
            return Ok(addr);
        }
        if Instant::now() > deadline {
            return Err(BrokerError::Start(format!(
                "nothing listens on {addr} after 10 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
