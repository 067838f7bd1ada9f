//! qrgate's own MQTT client. One task owns rumqttc's `EventLoop`; it
//! reconnects with backoff, re-subscribes on every CONNACK (rumqttc does not)
//! and republishes every POS's retained state (the broker may have lost them).
//! Device messages go to one worker per POS, so each POS's messages keep
//! their order while POS proceed in parallel; a message is acknowledged only
//! after its effect is stored (manual acks), so a crash before that makes the
//! broker deliver it again. Acknowledgements still leave in arrival order:
//! rumqttd drops a client that acknowledges out of order.
//!
//! The client reaches the broker through `guard`, so that no device message,
//! whatever its size, can break this connection.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::guard::{self, Marker};
use super::inbound;
use super::topics::{DeviceTopic, Topics};
use crate::config::{MqttConfig, Secret};
use crate::gateway::{Gateway, GatewayError, Publish};
use crate::orders::PosId;

/// Connection state for readiness.
#[derive(Debug, Default)]
pub struct LinkState {
    pub connected: AtomicBool,
    pub subscribed: AtomicBool,
    /// CONNACKs received: more than one means the connection was lost.
    pub connections: AtomicU64,
}

impl LinkState {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.subscribed.load(Ordering::Acquire)
    }
}

/// Starts the client's tasks on `tracker`.
/// Where qrgate's client connects, and how it proves who it is.
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub login: Option<(String, Secret)>,
    /// The CA certificate (PEM) of a TLS broker.
    pub tls_ca: Option<Vec<u8>>,
}

pub fn spawn(
    cfg: &MqttConfig,
    endpoint: Endpoint,
    gateway: Arc<Gateway>,
    mut outbox: mpsc::UnboundedReceiver<Publish>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Arc<LinkState> {
    let cap = cfg.max_payload_bytes;
    let upstream = guard::Upstream {
        host: endpoint.host.clone(),
        port: endpoint.port,
        tls_ca: endpoint.tls_ca.clone(),
    };
    let (mut opts, marker) = match guard::spawn(upstream, cap, shutdown.clone(), tracker) {
        // The guard speaks TLS to the broker when it must; rumqttc speaks
        // plain MQTT to the guard on loopback.
        Ok((at, marker)) => (
            MqttOptions::new(cfg.client_id.clone(), at.ip().to_string(), at.port()),
            marker,
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the MQTT relay: connecting directly, where \
                one oversize device message breaks qrgate's broker connection");
            let mut opts = MqttOptions::new(cfg.client_id.clone(), endpoint.host, endpoint.port);
            if let Some(ca) = endpoint.tls_ca {
                opts.set_transport(rumqttc::Transport::tls(ca, None, None));
            }
            (opts, Marker::random())
        }
    };
    opts.set_keep_alive(Duration::from_secs(10));
    // A persistent session: what devices publish while qrgate is down waits
    // for it at the broker (CONTRACT-NOTES, MQTT sessions).
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // Through the guard nothing larger arrives: a payload over the cap comes
    // as a small stand-in, and rumqttc fails the whole connection on a
    // packet over this.
    let max = guard::max_incoming_packet(cap);
    opts.set_max_packet_size(max, max);
    opts.set_inflight(200);
    if let Some((user, password)) = endpoint.login {
        opts.set_credentials(user, password.expose().to_owned());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    // MQTT packets are small and answer each other: with Nagle's algorithm
    // and delayed ACKs a sale could wait 40 ms or more to be read.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let link = Arc::new(LinkState::default());
    let topics = Topics::new(&cfg.topic_prefix);

    // Outgoing: state messages, in order.
    {
        let client = client.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            loop {
                let p = tokio::select! {
                    p = outbox.recv() => match p { Some(p) => p, None => break },
                    _ = shutdown.cancelled() => break,
                };
                if let Err(e) = client
                    .publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
                    .await
                {
                    tracing::warn!(topic = %p.topic, error = %e, "cannot queue a state message; it is republished at the next connection");
                }
            }
        });
    }

    // Acknowledgements, in arrival order, each once its message is handled.
    let (ack_tx, mut ack_rx) =
        mpsc::unbounded_channel::<(rumqttc::Publish, oneshot::Receiver<bool>)>();
    {
        let client = client.clone();
        tracker.spawn(async move {
            while let Some((p, handled)) = ack_rx.recv().await {
                // `false` or a dropped sender: not stored, so not acknowledged;
                // the broker delivers it again after the next reconnection.
                if handled.await == Ok(true) {
                    if let Err(e) = client.ack(&p).await {
                        tracing::debug!(error = %e, "acknowledgement not sent; the broker will redeliver");
                    }
                }
            }
        });
    }

    // Incoming: a fixed pool of workers, each POS always on the same one, so
    // its messages keep their order while different POS proceed in
    // parallel. (A task per POS cost ~5 KiB each: 500 MiB at 100,000 POS.)
    let mut workers: Vec<mpsc::UnboundedSender<Job>> = Vec::with_capacity(WORKERS);
    for _ in 0..WORKERS {
        let (tx, rx) = mpsc::unbounded_channel();
        workers.push(tx);
        tracker.spawn(worker(rx, Arc::clone(&gateway), cap));
    }

    let state = Arc::clone(&link);
    let subscriptions = topics.subscriptions();
    tracker.spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let event = tokio::select! {
                e = eventloop.poll() => e,
                _ = shutdown.cancelled() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    state.connected.store(true, Ordering::Release);
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
                    // Never await the client inside the event loop's task:
                    // its requests need this loop to be polled.
                    let client = client.clone();
                    let subs = subscriptions.clone();
                    let gateway = Arc::clone(&gateway);
                    tokio::spawn(async move {
                        let filters = subs
                            .into_iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!(error = %e, "cannot subscribe to device topics");
                        }
                        for p in gateway.retained_states() {
                            let _ = client
                                .publish(p.topic, QoS::AtLeastOnce, true, p.payload)
                                .await;
                        }
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    state.subscribed.store(true, Ordering::Release);
                    tracing::info!("subscribed to device topics");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let (done, handled) = oneshot::channel();
                    let _ = ack_tx.send((p.clone(), handled));
                    route(&topics, &gateway, &workers, marker, p, done);
                }
                Ok(_) => {}
                Err(e) => {
                    state.connected.store(false, Ordering::Release);
                    state.subscribed.store(false, Ordering::Release);
                    failures = failures.saturating_add(1);
                    let step = Duration::from_millis(100).saturating_mul(1 << failures.min(6));
                    let wait = step.min(Duration::from_secs(5));
                    let wait = wait.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(error = %e, failures, "MQTT broker connection lost; reconnecting");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    });
    link
}

/// A device message for a POS worker, and where to say it was handled.
struct Job {
    pos: PosId,
    kind: DeviceTopic,
    publish: rumqttc::Publish,
    /// The size of a payload the guard dropped (`publish` is its stand-in).
    dropped: Option<usize>,
    done: oneshot::Sender<bool>,
}

/// Device workers: enough that one POS's slow write rarely delays another,
/// few enough to cost nothing.
const WORKERS: usize = 64;

/// Sends a message to its POS's worker; anything else is answered here.
fn route(
    topics: &Topics,
    gateway: &Gateway,
    workers: &[mpsc::UnboundedSender<Job>],
    marker: Marker,
    p: rumqttc::Publish,
    done: oneshot::Sender<bool>,
) {
    let dropped = marker.dropped_size(&p.payload);
    let size = dropped.unwrap_or(p.payload.len());
    let Some((pos, kind)) = topics.parse(&p.topic) else {
        tracing::warn!(topic = %inbound::cut(&p.topic, 128), size, "message on a topic outside the device contract; ignored");
        let _ = done.send(true);
        return;
    };
    let Some(kind) = kind else {
        tracing::warn!(topic = %inbound::cut(&p.topic, 128), size, "unknown device topic; ignored");
        let _ = done.send(true);
        return;
    };
    match gateway.pos_config(pos).map(|c| c.id.clone()) {
        Some(id) => {
            let shard = {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                id.hash(&mut h);
                (h.finish() % workers.len() as u64) as usize
            };
            let job = Job {
                pos: id,
                kind,
                publish: p,
                dropped,
                done,
            };
            if let Err(mpsc::error::SendError(job)) = workers[shard].send(job) {
                tracing::error!(pos = %job.pos, "device worker stopped; message left for redelivery");
            }
        }
        None => {
            // No state topic to answer on for a POS we do not know.
            tracing::warn!(pos = %inbound::cut(pos, 64), topic_kind = kind.as_str(), size,
                retained = p.retain, "message for an unknown POS; ignored");
            let _ = done.send(true);
        }
    }
}

async fn worker(mut rx: mpsc::UnboundedReceiver<Job>, gateway: Arc<Gateway>, max_bytes: usize) {
    while let Some(job) = rx.recv().await {
        let Job {
            pos,
            kind,
            publish: p,
            dropped,
            done,
        } = job;
        let arrived = inbound::Arrived {
            kind,
            pos: pos.as_str(),
            topic: &p.topic,
            retain: p.retain,
            size: dropped.unwrap_or(p.payload.len()),
            payload: dropped.is_none().then_some(&p.payload[..]),
        };
        match inbound::screen(&arrived, max_bytes) {
            Ok(None) => {
                tracing::info!(pos = %pos, topic_kind = kind.as_str(), size = 0,
                    "empty device message (what clearing a retained message leaves): nothing to do");
            }
            Err(r) => {
                // A broken presence message has no state to answer on.
                let tell = kind != DeviceTopic::Status;
                gateway
                    .reject(
                        &pos,
                        r.sale_id.as_ref().map(|s| s.as_str()),
                        r.code,
                        &r.message,
                        tell,
                        Some((kind.as_str(), arrived.size)),
                    )
                    .await;
            }
            Ok(Some(cmd)) => {
                let mut attempt = 0u32;
                loop {
                    match gateway.execute(&pos, cmd.clone()).await {
                        Ok(_) => break,
                        Err(GatewayError::Store(e)) if attempt < 5 => {
                            attempt += 1;
                            tracing::error!(pos = %pos, error = %e, attempt, "cannot store a device message; retrying");
                            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt)))
                                .await;
                        }
                        Err(e) => {
                            // Not acknowledged: the broker delivers it again
                            // after the next reconnection.
                            tracing::error!(pos = %pos, error = %e, "device message not stored; left unacknowledged for redelivery");
                            break;
                        }
                    }
                }
                if attempt >= 5 {
                    let _ = done.send(false);
                    continue;
                }
            }
        }
        let _ = done.send(true);
    }
}
