//! A filter between qrgate's MQTT client and the broker, so that no device
//! message can cut qrgate off.
//!
//! rumqttc reads each packet whole into memory, and one whose remaining length
//! is over the client's maximum fails the connection before it is read
//! (`mqttbytes::check`, `PayloadSizeLimitExceeded`). With a persistent session
//! and QoS 1 the broker delivers that unacknowledged message again after every
//! reconnection: one oversize publish on a device topic stopped every POS, and
//! restarting qrgate did not help. Raising the client's maximum to the MQTT
//! limit instead would cost up to 256 MiB per message (more while several are
//! read together), on a broker that does not refuse them itself.
//!
//! The guard is a local TCP listener that rumqttc connects to; each connection
//! is relayed to the broker (over TLS when configured, which the guard then
//! does in rumqttc's place). What the broker sends is read as a stream of MQTT
//! packets: a PUBLISH whose payload is over the cap is handed on as a small
//! stand-in with the same flags, topic and packet id (so qrgate's
//! acknowledgement reaches the broker for the original), and its payload is
//! skipped as it arrives. Memory per connection is a few buffers of at most
//! 64 KiB whatever the broker sends. What qrgate sends goes through untouched.
//!
//! [`Filter`] is the byte-stream logic, without I/O; [`spawn`] runs the relay.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::TlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The MQTT PUBLISH packet type (high nibble of the first byte).
const PUBLISH: u8 = 3;
/// An MQTT topic is at most this long (a 16-bit length).
const MAX_TOPIC: usize = u16::MAX as usize;
/// Bytes read from either side at a time.
const CHUNK: usize = 64 * 1024;
/// A stand-in's payload: the marker, then the original payload's size.
const STAND_IN_LEN: usize = 16 + 8;

/// Marks a stand-in's payload. Random per process and never sent beyond the
/// relay's loopback hop, so a device cannot forge a stand-in.
#[derive(Clone, Copy)]
pub struct Marker([u8; 16]);

impl Marker {
    pub fn random() -> Marker {
        Marker(rand::random())
    }

    fn stand_in(&self, size: usize) -> [u8; STAND_IN_LEN] {
        let mut p = [0u8; STAND_IN_LEN];
        p[..16].copy_from_slice(&self.0);
        p[16..].copy_from_slice(&(size as u64).to_be_bytes());
        p
    }

    /// The size of the payload a stand-in replaced; `None` for a real one.
    pub fn dropped_size(&self, payload: &[u8]) -> Option<usize> {
        if payload.len() != STAND_IN_LEN || payload[..16] != self.0 {
            return None;
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&payload[16..]);
        usize::try_from(u64::from_be_bytes(size)).ok()
    }
}

/// The largest packet the client can then receive: a payload at the cap (or
/// a stand-in) behind the longest topic and a packet id.
pub fn max_incoming_packet(cap: usize) -> usize {
    cap.max(STAND_IN_LEN) + 2 + MAX_TOPIC + 2
}

/// The broker's byte stream did not frame as MQTT.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the broker sent a malformed MQTT packet")]
pub struct Malformed;

/// Where the filter stands in the broker's byte stream.
enum Stage {
    /// A fixed header: the type byte and up to four length bytes.
    Header { bytes: [u8; 5], len: usize },
    /// A PUBLISH whose packet is over the cap: its topic and packet id are
    /// read to learn whether its payload is.
    Head {
        first: u8,
        remaining: usize,
        head: Vec<u8>,
    },
    /// This many bytes more go through as they are.
    Pass(usize),
    /// This many bytes more of an oversize payload are dropped.
    Skip(usize),
}

impl Stage {
    fn header() -> Stage {
        Stage::Header {
            bytes: [0; 5],
            len: 0,
        }
    }
}

/// Rewrites the broker's stream: oversize publishes become stand-ins.
pub struct Filter {
    cap: usize,
    marker: Marker,
    stage: Stage,
}

impl Filter {
    /// `cap`: the largest payload passed on whole.
    pub fn new(cap: usize, marker: Marker) -> Filter {
        Filter {
            cap,
            marker,
            stage: Stage::header(),
        }
    }

    /// Takes the next bytes from the broker, however they are cut, and
    /// appends what the client is to read. `out` grows by at most
    /// `input.len()` plus one stand-in (a topic's length) per call.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        while !input.is_empty() {
            match &mut self.stage {
                Stage::Pass(n) => {
                    let k = (*n).min(input.len());
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    *n -= k;
                    if *n == 0 {
                        self.stage = Stage::header();
                    }
                }
                Stage::Skip(n) => {
                    let k = (*n).min(input.len());
                    input = &input[k..];
                    *n -= k;
                    if *n == 0 {
                        self.stage = Stage::header();
                    }
                }
                Stage::Header { bytes, len } => {
                    bytes[*len] = input[0];
                    *len += 1;
                    input = &input[1..];
                    if *len == 1 || bytes[*len - 1] & 0x80 != 0 {
                        // MQTT's remaining length has at most four bytes.
                        if *len == 5 {
                            return Err(Malformed);
                        }
                        continue;
                    }
                    let remaining = bytes[1..*len]
                        .iter()
                        .rev()
                        .fold(0usize, |acc, b| (acc << 7) | usize::from(b & 0x7f));
                    let first = bytes[0];
                    // Small packets go through at once: their payload cannot
                    // be over the cap, whatever their topic.
                    if first >> 4 == PUBLISH && remaining > self.cap {
                        self.stage = Stage::Head {
                            first,
                            remaining,
                            head: Vec::new(),
                        };
                    } else {
                        out.extend_from_slice(&bytes[..*len]);
                        self.stage = if remaining == 0 {
                            Stage::header()
                        } else {
                            Stage::Pass(remaining)
                        };
                    }
                }
                Stage::Head {
                    first,
                    remaining,
                    head,
                } => {
                    // The topic's length first, then the topic and packet id.
                    if head.len() < 2 {
                        let k = (2 - head.len()).min(input.len());
                        head.extend_from_slice(&input[..k]);
                        input = &input[k..];
                        if head.len() < 2 {
                            continue;
                        }
                    }
                    let id_len = if (*first >> 1) & 3 == 0 { 0 } else { 2 };
                    let need = 2 + usize::from(u16::from_be_bytes([head[0], head[1]])) + id_len;
                    if need > *remaining {
                        return Err(Malformed);
                    }
                    let k = (need - head.len()).min(input.len());
                    head.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    if head.len() < need {
                        continue;
                    }
                    let payload = *remaining - need;
                    let first = *first;
                    let head = std::mem::take(head);
                    if payload <= self.cap {
                        push_header(out, first, *remaining);
                        out.extend_from_slice(&head);
                        self.stage = if payload == 0 {
                            Stage::header()
                        } else {
                            Stage::Pass(payload)
                        };
                    } else {
                        push_header(out, first, need + STAND_IN_LEN);
                        out.extend_from_slice(&head);
                        out.extend_from_slice(&self.marker.stand_in(payload));
                        self.stage = Stage::Skip(payload);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A fixed header: the type and flags byte, then MQTT's variable-length
/// remaining length.
fn push_header(out: &mut Vec<u8>, first: u8, mut remaining: usize) {
    out.push(first);
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        out.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
}

/// Where the relay connects, and how.
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// The broker's CA (PEM) when it speaks TLS.
    pub tls_ca: Option<Vec<u8>>,
}

/// The TLS side of the relay, as rumqttc would have done it: the broker's
/// certificate is checked against the configured CA and the broker's name.
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

fn tls(host: &str, ca: &[u8]) -> Result<Tls, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(ca)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("mqtt.tls_ca cannot be read: {e}"))?;
    roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err("mqtt.tls_ca holds no usable certificate".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a name a TLS certificate can have: {e}"))?;
    Ok(Tls {
        connector: TlsConnector::from(Arc::new(config)),
        name,
    })
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Relay {
    host: String,
    port: u16,
    tls: Option<Result<Tls, String>>,
    cap: usize,
    marker: Marker,
    /// The broker could not be reached last time: say so once, not at every
    /// retry.
    failing: AtomicBool,
}

impl Relay {
    async fn connect(&self) -> io::Result<Box<dyn Stream>> {
        // An embedded broker in this process is reached at its own port, not
        // through the devices' door and its allowance (`ingress`).
        let direct = super::ingress::direct(&self.host, self.port);
        let tcp = tokio::time::timeout(Duration::from_secs(10), async {
            match direct {
                Some(broker) => TcpStream::connect(broker).await,
                None => TcpStream::connect((self.host.as_str(), self.port)).await,
            }
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 10 s"))??;
        // MQTT packets are small and answer each other (see connection.rs).
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidInput, e.clone())),
            Some(Ok(t)) => Ok(Box::new(t.connector.connect(t.name.clone(), tcp).await?)),
        }
    }

    async fn serve(&self, client: TcpStream, shutdown: CancellationToken) {
        let _ = client.set_nodelay(true);
        let broker = match self.connect().await {
            Ok(b) => {
                self.failing.store(false, Ordering::Relaxed);
                b
            }
            Err(e) => {
                // The client sees its connection closed and retries with
                // backoff; the reason is only known here.
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(broker = %format!("{}:{}", self.host, self.port), error = %e,
                        "cannot reach the MQTT broker");
                } else {
                    tracing::debug!(error = %e, "cannot reach the MQTT broker");
                }
                return;
            }
        };
        let (mut from_broker, mut to_broker) = tokio::io::split(broker);
        let (mut from_client, mut to_client) = client.into_split();
        let down = async {
            let mut filter = Filter::new(self.cap, self.marker);
            let mut buf = vec![0u8; CHUNK];
            let mut out = Vec::with_capacity(CHUNK);
            loop {
                let n = from_broker.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                filter
                    .feed(&buf[..n], &mut out)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if !out.is_empty() {
                    to_client.write_all(&out).await?;
                    out.clear();
                }
                // A stand-in's topic may have grown it; keep the bound.
                out.shrink_to(CHUNK);
            }
        };
        let up = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = from_client.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                to_broker.write_all(&buf[..n]).await?;
                // TLS buffers what it writes.
                to_broker.flush().await?;
            }
        };
        // Either side ending ends both: rumqttc reconnects through a new one.
        let ended = tokio::select! {
            r = down => r,
            r = up => r,
            _ = shutdown.cancelled() => Ok(()),
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "MQTT relay closed");
        }
    }
}

/// Starts the guard for `upstream`: returns the loopback address qrgate's
/// client connects to, and the marker of its stand-ins. Publishes whose
/// payload is over `cap` bytes arrive as stand-ins.
pub fn spawn(
    upstream: Upstream,
    cap: usize,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<(SocketAddr, Marker)> {
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let addr = listener.local_addr()?;
    let marker = Marker::random();
    let tls = upstream.tls_ca.as_deref().map(|ca| tls(&upstream.host, ca));
    if let Some(Err(e)) = &tls {
        tracing::error!(error = %e, "qrgate cannot speak TLS to the MQTT broker");
    }
    let relay = Arc::new(Relay {
        host: upstream.host,
        port: upstream.port,
        tls,
        cap,
        marker,
        failing: AtomicBool::new(false),
    });
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.cancelled() => break,
            };
            match accepted {
                Ok((client, _)) => {
                    let relay = Arc::clone(&relay);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move { relay.serve(client, shutdown).await });
                }
                Err(e) => {
                    // Out of descriptors, typically: the client retries.
                    tracing::warn!(error = %e, "MQTT relay cannot accept");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
    });
    Ok((addr, marker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use rumqttc::{Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode};

    const CAP: usize = 1024;

    fn bytes_of(packets: &[Packet]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for p in packets {
            p.write(&mut b, usize::MAX).unwrap();
        }
        b.to_vec()
    }

    fn publish(topic: &str, qos: QoS, retain: bool, pkid: u16, size: usize) -> Packet {
        let mut p = Publish::new(topic, qos, vec![7u8; size]);
        p.retain = retain;
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
        Packet::Publish(p)
    }

    /// What rumqttc reads from the filtered stream, with its own parser.
    fn read_all(mut b: BytesMut) -> Vec<Packet> {
        let mut packets = Vec::new();
        while !b.is_empty() {
            packets.push(Packet::read(&mut b, max_incoming_packet(CAP)).unwrap());
        }
        packets
    }

    fn filtered(input: &[u8], cuts: &[usize], marker: Marker) -> Vec<u8> {
        let mut f = Filter::new(CAP, marker);
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([&input.len()]) {
            let c = c.clamp(at, input.len());
            f.feed(&input[at..c], &mut out).unwrap();
            at = c;
        }
        out
    }

    #[test]
    fn packets_within_the_cap_go_through_byte_for_byte() {
        let stream = bytes_of(&[
            Packet::SubAck(SubAck::new(
                1,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            )),
            publish("q/pos/p/sale", QoS::AtLeastOnce, false, 1, CAP),
            Packet::PingResp,
            // Over the cap as a packet, not as a payload: a long topic.
            publish(&"t".repeat(3000), QoS::AtLeastOnce, true, 2, CAP),
            publish("q/pos/p/status", QoS::AtMostOnce, true, 0, 0),
            Packet::PubAck(PubAck::new(9)),
        ]);
        let marker = Marker::random();
        assert_eq!(filtered(&stream, &[], marker), stream);
        // However the network cuts it.
        for cut in 0..stream.len() {
            assert_eq!(filtered(&stream, &[cut], marker), stream, "cut at {cut}");
        }
    }

    #[test]
    fn an_oversize_publish_becomes_a_stand_in_with_its_flags_topic_and_packet_id() {
        let marker = Marker::random();
        for (qos, pkid) in [
            (QoS::AtLeastOnce, 77),
            (QoS::AtMostOnce, 0),
            (QoS::ExactlyOnce, 3),
        ] {
            let stream = bytes_of(&[
                publish("q/pos/p/sale", qos, true, pkid, 300_000),
                publish("q/pos/v/sale", QoS::AtLeastOnce, false, 78, 10),
            ]);
            let out = filtered(&stream, &[1, 2, 5, 20, 1000, 299_999], marker);
            assert!(out.len() < 200, "{}", out.len());
            let packets = read_all(BytesMut::from(&out[..]));
            let Packet::Publish(p) = &packets[0] else {
                panic!("{packets:?}")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos, p.retain, p.pkid),
                ("q/pos/p/sale", qos, true, pkid)
            );
            assert_eq!(marker.dropped_size(&p.payload), Some(300_000));
            let Packet::Publish(next) = &packets[1] else {
                panic!("{packets:?}")
            };
            assert_eq!((next.pkid, next.payload.len()), (78, 10));
            assert_eq!(marker.dropped_size(&next.payload), None);
        }
    }

    #[test]
    fn the_largest_mqtt_packet_costs_no_more_than_a_small_one() {
        // 256 MiB: fed in chunks, never held.
        let marker = Marker::random();
        let mut f = Filter::new(CAP, marker);
        let mut out = Vec::new();
        let total = 268_435_455;
        let mut head = Vec::new();
        push_header(&mut head, 0x32, total);
        head.extend_from_slice(&[0, 3, b'a', b'/', b'b', 0, 1]);
        f.feed(&head, &mut out).unwrap();
        let chunk = vec![0u8; CHUNK];
        let mut left = total - 7;
        while left > 0 {
            let k = left.min(CHUNK);
            f.feed(&chunk[..k], &mut out).unwrap();
            assert!(out.len() < 100);
            left -= k;
        }
        let packets = read_all(BytesMut::from(&out[..]));
        let Packet::Publish(p) = &packets[0] else {
            panic!()
        };
        assert_eq!(marker.dropped_size(&p.payload), Some(total - 7));
    }

    #[test]
    fn a_device_cannot_forge_a_stand_in() {
        let marker = Marker::random();
        let other = Marker::random();
        assert_eq!(marker.dropped_size(&other.stand_in(5)), None);
        assert_eq!(marker.dropped_size(&marker.stand_in(5)), Some(5));
        assert_eq!(marker.dropped_size(&[0u8; STAND_IN_LEN]), None);
    }

    #[test]
    fn a_broken_stream_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        // A remaining length with five bytes.
        assert_eq!(
            Filter::new(CAP, Marker::random())
                .feed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &mut out),
            Err(Malformed)
        );
        // A topic longer than its packet.
        let mut b = Vec::new();
        push_header(&mut b, 0x32, CAP + 10);
        b.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(
            Filter::new(CAP, Marker::random()).feed(&b, &mut out),
            Err(Malformed)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn no_stream_panics_the_filter(bytes in proptest::collection::vec(any::<u8>(), 0..4096), cut in 0usize..4096) {
            let mut f = Filter::new(64, Marker::random());
            let mut out = Vec::new();
            let cut = cut.min(bytes.len());
            if f.feed(&bytes[..cut], &mut out).is_ok() {
                let _ = f.feed(&bytes[cut..], &mut out);
            }
            prop_assert!(out.len() <= bytes.len() + 2 * STAND_IN_LEN + 16);
        }

        #[test]
        fn publishes_come_out_as_rumqttc_reads_them(
            sizes in proptest::collection::vec(0usize..3000, 1..6),
            cuts in proptest::collection::vec(0usize..20_000, 0..6),
        ) {
            let marker = Marker::random();
            let packets: Vec<Packet> = sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| publish(&format!("q/pos/p{i}/sale"), QoS::AtLeastOnce, i % 2 == 0, i as u16 + 1, s))
                .collect();
            let stream = bytes_of(&packets);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let read = read_all(BytesMut::from(&filtered(&stream, &cuts, marker)[..]));
            prop_assert_eq!(read.len(), packets.len());
            for ((got, sent), &size) in read.iter().zip(&packets).zip(&sizes) {
                let (Packet::Publish(got), Packet::Publish(sent)) = (got, sent) else {
                    panic!()
                };
                prop_assert_eq!((&got.topic, got.pkid, got.retain), (&sent.topic, sent.pkid, sent.retain));
                if size > CAP {
                    prop_assert_eq!(marker.dropped_size(&got.payload), Some(size));
                } else {
                    prop_assert_eq!(&got.payload, &sent.payload);
                }
            }
        }
    }
}
