//! qrgate's own MQTT client. One task owns rumqttc's `EventLoop`; it
//! reconnects with backoff, re-subscribes on every CONNACK (rumqttc does not)
//! and republishes every POS's retained state (the broker may have lost them).
//! Each device message is first held to its POS's rate (`intake`): one over it
//! is refused there and then, unread. The others wait in their POS's queue,
//! and a pool of workers takes POS in turn, one message at a time, so each
//! POS's messages keep their order, POS proceed in parallel, and none waits
//! behind another's backlog. A message is acknowledged only after its effect
//! is stored (manual acks), so a crash before that makes the broker deliver it
//! again. Acknowledgements still leave in arrival order: rumqttd drops a
//! client that acknowledges out of order.
//!
//! The client reaches the broker through `guard`, so that no device message,
//! whatever its size, can break this connection.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::guard::{self, Marker};
use super::inbound;
use super::intake::{self, Admission, RateLimiter, Turns};
use super::outbound;
use super::topics::{DeviceTopic, Topics};
use crate::book::{Book, BookError, Tell};
use crate::config::{Broker, MqttConfig, Secret};
use crate::link::LinkState;
use crate::orders::PosId;
use crate::store::Store;

/// Where qrgate's client connects, and how it proves who it is.
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub login: Option<(String, Secret)>,
    /// The CA certificate (PEM) of a TLS broker.
    pub tls_ca: Option<Vec<u8>>,
}

/// Starts the client's tasks on `tracker`.
pub fn spawn(
    cfg: &MqttConfig,
    endpoint: Endpoint,
    book: Arc<Book>,
    mut outbox: mpsc::UnboundedReceiver<Tell>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Arc<LinkState> {
    let cap = cfg.max_payload_bytes;
    book.refusals()
        .set_per_minute(cfg.stored_rejections_per_minute);
    if let (Broker::External { .. }, Some((user, _))) = (&cfg.broker, &endpoint.login) {
        // deploy/mosquitto.conf ties every client id to its username
        // (use_username_as_clientid), qrgate's too: its persistent session
        // is then the username's, whatever client id it sends.
        if *user != cfg.client_id {
            tracing::warn!(username = %user, client_id = %cfg.client_id,
                "[mqtt] client_id differs from [mqtt] username: a Mosquitto configured as \
                deploy/mosquitto.conf keeps qrgate's session under its username; set client_id to the \
                username so both name the same session");
        }
    }
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
            let (host, port) = match super::ingress::direct(&endpoint.host, endpoint.port) {
                Some(broker) => (broker.ip().to_string(), broker.port()),
                None => (endpoint.host, endpoint.port),
            };
            let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
            if let Some(ca) = endpoint.tls_ca {
                opts.set_transport(rumqttc::Transport::tls(ca, None, None));
            }
            (opts, Marker::random())
        }
    };
    opts.set_keep_alive(Duration::from_secs(10));
    // A persistent session: what devices publish while qrgate is down waits
    // for it at the broker (docs/decisions.md, "MQTT sessions").
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // Through the guard nothing larger arrives: a payload over the cap comes
    // as a small stand-in, and rumqttc fails the whole connection on a
    // packet over this.
    let max = guard::max_incoming_packet(cap);
    opts.set_max_packet_size(max, max);
    opts.set_inflight(200);
    let login_user = endpoint.login.as_ref().map(|(user, _)| user.clone());
    if let Some((user, password)) = endpoint.login {
        opts.set_credentials(user, password.expose().to_owned());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    // MQTT packets are small and answer each other: with Nagle's algorithm
    // and delayed ACKs a sale could wait 40 ms or more to be read.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let topics = Topics::new(&cfg.topic_prefix);

    let link = Arc::new(LinkState::default());
    // Outgoing: state messages, in order. A stored change's is marked told
    // once the broker acknowledged it (the event loop below).
    let sender = Sender {
        client: client.clone(),
        owed: Arc::default(),
        turn: Arc::default(),
    };
    let (told, marks) = mpsc::unbounded_channel();
    tracker.spawn(mark_told(Arc::clone(book.store()), marks));
    {
        let sender = sender.clone();
        let shutdown = shutdown.clone();
        let topics = topics.clone();
        tracker.spawn(async move {
            loop {
                let tell = tokio::select! {
                    t = outbox.recv() => match t { Some(t) => t, None => break },
                    _ = shutdown.cancelled() => break,
                };
                let p = outbound::render(&tell, &topics);
                let owes = match &tell {
                    Tell::Stored { sale, version } => Some((sale.pos.as_str().to_owned(), *version)),
                    _ => None,
                };
                if let Err(e) = sender.publish(p.topic.clone(), p.retain, p.payload, owes).await {
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

    // Incoming: a fixed pool of workers taking POS in turn (`intake`). (A
    // task per POS cost ~5 KiB each: 500 MiB at 100,000 POS.)
    let queue = Arc::new(Queue::default());
    for _ in 0..WORKERS {
        tracker.spawn(worker(
            Arc::clone(&queue),
            Arc::clone(&book),
            cap,
            shutdown.clone(),
        ));
    }
    // Refusals summed over a minute become one line and one row each, once
    // the minute is over, and at shutdown.
    {
        let book = Arc::clone(&book);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => book.flush_refusal_summaries(false).await,
                    _ = shutdown.cancelled() => break,
                }
            }
            book.flush_refusal_summaries(true).await;
        });
    }
    let mut router = Router {
        topics: topics.clone(),
        book: Arc::clone(&book),
        queue,
        marker,
        limiter: RateLimiter::new(cfg.device_rate),
        clock: Instant::now(),
        strays: Strays::default(),
        cap,
        replay: Replay {
            topic: (matches!(cfg.broker, Broker::External { .. }) && book.is_shared())
                .then(|| topics.mark(&cfg.client_id)),
            since: None,
        },
    };

    let state = Arc::clone(&link);
    let mut subscriptions = topics.subscriptions();
    subscriptions.extend(router.replay.topic.clone());
    let mark = router.replay.topic.clone();
    tracker.spawn(async move {
        // Publishes sent and not acknowledged yet: what each owes the outbox.
        let mut awaiting_ack: HashMap<u16, Option<(String, u64)>> = HashMap::new();
        let mut failures: u32 = 0;
        // Consecutive refusals of qrgate's own login.
        let mut refusals: u32 = 0;
        loop {
            let event = tokio::select! {
                e = eventloop.poll() => e,
                _ = shutdown.cancelled() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    refusals = 0;
                    state.connected.store(true, Ordering::Release);
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    book.metrics().mqtt_connections.inc();
                    tracing::info!(session_present = ack.session_present, "connected to the MQTT broker");
                    // What the session kept comes first; the mark, published
                    // after, comes back behind it.
                    let mark = mark.clone().filter(|_| ack.session_present);
                    if mark.is_some() {
                        router.replay.since = Some(Instant::now());
                    }
                    // Never await the client inside the event loop's task:
                    // its requests need this loop to be polled.
                    let client = client.clone();
                    let sender = sender.clone();
                    let subs = subscriptions.clone();
                    let book = Arc::clone(&book);
                    let topics = topics.clone();
                    tokio::spawn(async move {
                        let filters = subs
                            .into_iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!(error = %e, "cannot subscribe to device topics");
                        }
                        if let Some(mark) = mark {
                            if let Err(e) = sender.publish(mark, false, Vec::new(), None).await {
                                tracing::warn!(error = %e, "cannot mark the end of what the session kept");
                            }
                        }
                        // Among several instances the leader alone
                        // republishes, once it caught up with what the others
                        // stored: retained states go out once, as stored.
                        if !book.leads() {
                            return;
                        }
                        if let Err(e) = book.catch_up().await {
                            tracing::warn!(error = %e, "cannot read the store before republishing retained states; republishing what this instance has");
                        }
                        for tell in book.retained_states() {
                            let p = outbound::render(&tell, &topics);
                            let _ = sender.publish(p.topic, true, p.payload, None).await;
                        }
                    });
                }
                // A publish going out for the first time takes what it owes
                // (a resend after a reconnection has its packet id noted).
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    if let std::collections::hash_map::Entry::Vacant(e) = awaiting_ack.entry(pkid) {
                        e.insert(sender.going_out());
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(Some(owed)) = awaiting_ack.remove(&ack.pkid) {
                        let _ = told.send(owed);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    state.set_subscribed();
                    tracing::info!("subscribed to device topics");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let (done, handled) = oneshot::channel();
                    let _ = ack_tx.send((p.clone(), handled));
                    router.route(p, done);
                }
                Ok(_) => {}
                Err(e) => {
                    state.connected.store(false, Ordering::Release);
                    state.subscribed.store(false, Ordering::Release);
                    failures = failures.saturating_add(1);
                    let step = Duration::from_millis(100).saturating_mul(1 << failures.min(6));
                    let wait = step.min(Duration::from_secs(5));
                    let wait = wait.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                    if let Some(code) = refused_login(&e) {
                        refusals = refusals.saturating_add(1);
                        // Nothing works until the operator fixes it: said
                        // at once, then less and less often, never dropped.
                        if refusals.is_power_of_two() || refusals % 64 == 0 {
                            tracing::error!(attempts = refusals, code = ?code,
                                "{}", refused_login_message(login_user.as_deref()));
                        }
                    } else if failures == 1 || failures % 20 == 0 {
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

/// What qrgate's client publishes, each with what the outbox owes for it
/// (a stored change's POS and version), so that the row is marked told only
/// once the broker acknowledged the message. rumqttc names a publish's
/// packet id only as it goes out (`Outgoing::Publish`), in the order
/// publishes were handed to it: every publish goes through [`Sender`],
/// which notes what it owes in that order, one publish at a time.
/// A stored change's POS and version: what a publish owes the outbox.
type Owed = (String, u64);

#[derive(Clone)]
struct Sender {
    client: AsyncClient,
    owed: Arc<Mutex<std::collections::VecDeque<Option<Owed>>>>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Sender {
    async fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        owes: Option<(String, u64)>,
    ) -> Result<(), rumqttc::ClientError> {
        let _turn = self.turn.lock().await;
        lock(&self.owed).push_back(owes);
        let r = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await;
        if r.is_err() {
            // Never handed over: it will never go out.
            lock(&self.owed).pop_back();
        }
        r
    }

    /// What the next publish going out owes.
    fn going_out(&self) -> Option<(String, u64)> {
        lock(&self.owed).pop_front().flatten()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks in the store what was told, as many at once as came meanwhile. A
/// mark that fails leaves its rows to the outbox sweep, which publishes
/// them again: a device hears its state twice, never not at all.
async fn mark_told(store: Arc<dyn Store>, mut marks: mpsc::UnboundedReceiver<(String, u64)>) {
    while let Some(first) = marks.recv().await {
        let mut told = vec![first];
        while told.len() < 256 {
            match marks.try_recv() {
                Ok(m) => told.push(m),
                Err(_) => break,
            }
        }
        if let Err(e) = store.outbox_told(&told).await {
            tracing::warn!(error = %e, changes = told.len(),
                "cannot mark device messages told; the outbox sweep publishes them again");
        }
    }
}

/// The broker's refusal of qrgate's own login, if `e` is one.
fn refused_login(e: &rumqttc::ConnectionError) -> Option<rumqttc::ConnectReturnCode> {
    use rumqttc::ConnectReturnCode::{BadUserNamePassword, NotAuthorized};
    match e {
        rumqttc::ConnectionError::ConnectionRefused(
            code @ (BadUserNamePassword | NotAuthorized),
        ) => Some(*code),
        _ => None,
    }
}

/// What to fix when the broker refuses qrgate's login.
fn refused_login_message(user: Option<&str>) -> String {
    use crate::config::{secrets::credential_name, MQTT_PASSWORD_ENV};
    let password = format!(
        "{MQTT_PASSWORD_ENV} (or {MQTT_PASSWORD_ENV}_FILE, or the credential {})",
        credential_name(MQTT_PASSWORD_ENV)
    );
    match user {
        Some(user) => format!(
            "the MQTT broker refused qrgate's login as {user:?}: check [mqtt] username and {password} \
             against the broker's password file; retrying"
        ),
        None => format!(
            "the MQTT broker refused qrgate's anonymous login: set [mqtt] username and {password} \
             to a login the broker knows; retrying"
        ),
    }
}

/// A device message waiting for its POS's turn, and where to say it was
/// handled.
struct Job {
    kind: DeviceTopic,
    publish: rumqttc::Publish,
    /// The size of a payload the guard dropped (`publish` is its stand-in).
    dropped: Option<usize>,
    /// Kept for this instance by its session while it was away.
    replayed: bool,
    done: oneshot::Sender<bool>,
}

/// Device workers: enough that one POS's slow write rarely delays another,
/// few enough to cost nothing.
const WORKERS: usize = 64;

/// The POS queues the workers share (`intake::Turns`); each permit of
/// `ready` is one POS waiting for its turn. The lock is never held across an
/// `.await`.
struct Queue {
    turns: Mutex<Turns<PosId, Job>>,
    ready: Semaphore,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            turns: Mutex::new(Turns::default()),
            ready: Semaphore::new(0),
        }
    }
}

impl Queue {
    fn turns(&self) -> std::sync::MutexGuard<'_, Turns<PosId, Job>> {
        // A panic in a push or take leaves the queues as they were.
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, pos: PosId, job: Job) {
        if self.turns().push(pos, job) {
            self.ready.add_permits(1);
        }
    }

    async fn next(&self) -> Option<(PosId, Job)> {
        self.ready.acquire().await.ok()?.forget();
        self.turns().take()
    }

    fn done(&self, pos: &PosId) {
        if self.turns().done(pos) {
            self.ready.add_permits(1);
        }
    }
}

/// Lines about messages that name no configured POS, or no contract topic,
/// a minute: such messages are only logged (there is no POS to answer or to
/// hold to a rate), so a device publishing them in a loop must not flood the
/// log either.
const STRAY_LINES_PER_MINUTE: u32 = 20;

#[derive(Default)]
struct Strays {
    minute: u64,
    lines: u32,
    skipped: u64,
}

impl Strays {
    /// Whether to log this one; first, how many the previous minute left out.
    fn admit(&mut self, now_ms: u64) -> (bool, u64) {
        let minute = now_ms / 60_000;
        let mut left_out = 0;
        if minute != self.minute {
            left_out = std::mem::take(&mut self.skipped);
            self.minute = minute;
            self.lines = 0;
        }
        if self.lines < STRAY_LINES_PER_MINUTE {
            self.lines += 1;
            (true, left_out)
        } else {
            self.skipped += 1;
            (false, left_out)
        }
    }
}

/// The event loop's side of the intake: everything here is done in place,
/// never awaited, so the loop reads the broker as fast as it sends.
struct Router {
    topics: Topics,
    book: Arc<Book>,
    queue: Arc<Queue>,
    marker: Marker,
    limiter: RateLimiter,
    clock: Instant,
    strays: Strays,
    /// The largest payload read whole (`[mqtt] max_payload_bytes`).
    cap: usize,
    /// Until this instance's mark comes back: what arrives was kept by its
    /// session while it was away ([`Replay`]).
    replay: Replay,
}

/// What a persistent session kept while the instance was away comes first
/// at a reconnection, before anything published after it: among several
/// instances sharing the store, the others heard those messages then. The
/// instance publishes a mark to itself once connected; everything before
/// it comes back is a replay.
#[derive(Default)]
struct Replay {
    /// The mark's topic; `None` when replays need no telling apart (one
    /// instance on its store, or the embedded broker, which keeps no
    /// session across its restarts).
    topic: Option<String>,
    /// Since when the mark is awaited.
    since: Option<Instant>,
}

/// A mark that never comes back (a broker refusing the topic) ends the
/// replay after this.
const REPLAY_AT_MOST: Duration = Duration::from_secs(30);

impl Replay {
    fn replaying(&mut self) -> bool {
        match self.since {
            Some(at) if at.elapsed() < REPLAY_AT_MOST => true,
            Some(_) => {
                tracing::warn!("this instance's mark did not come back from the broker within 30 s: \
                    messages are taken as new from now on (does the broker let qrgate use its instances/<name>/mark topic?)");
                self.since = None;
                false
            }
            None => false,
        }
    }
}

impl Router {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether to log a message nobody answers; says first how many the
    /// last minute left unlogged.
    fn log_stray(&mut self) -> bool {
        let (log, left_out) = self.strays.admit(self.now_ms());
        if left_out > 0 {
            tracing::warn!(
                ignored = left_out,
                "more messages on topics outside the device contract or for unknown POS were ignored \
                 in the last minute than are logged one by one"
            );
        }
        log
    }

    /// Sends a message to its POS's queue, or refuses it over the POS's rate;
    /// anything else is answered here.
    fn route(&mut self, p: rumqttc::Publish, done: oneshot::Sender<bool>) {
        if self.replay.topic.as_deref() == Some(p.topic.as_str()) {
            if self.replay.since.take().is_some() {
                tracing::info!(
                    "this instance's session has delivered what it kept while it was away"
                );
            }
            let _ = done.send(true);
            return;
        }
        let replayed = self.replay.replaying();
        let dropped = self.marker.dropped_size(&p.payload);
        let size = dropped.unwrap_or(p.payload.len());
        let Some((pos, kind)) = self.topics.parse(&p.topic) else {
            if self.log_stray() {
                tracing::warn!(topic = %inbound::cut(&p.topic, 128), size, "message on a topic outside the device contract; ignored");
            }
            let _ = done.send(true);
            return;
        };
        let Some(kind) = kind else {
            if self.log_stray() {
                tracing::warn!(topic = %inbound::cut(&p.topic, 128), size, "unknown device topic; ignored");
            }
            let _ = done.send(true);
            return;
        };
        let Some(id) = self.book.pos_config(pos).map(|c| c.id.clone()) else {
            // No state topic to answer on for a POS we do not know.
            if self.log_stray() {
                tracing::warn!(pos = %inbound::cut(pos, 64), topic_kind = kind.as_str(), size,
                    retained = p.retain, "message for an unknown POS; ignored");
            }
            let _ = done.send(true);
            return;
        };
        let now = self.now_ms();
        match self.limiter.admit(intake::key(id.as_str()), now) {
            Admission::Accepted => self.queue.push(
                id,
                Job {
                    kind,
                    publish: p,
                    dropped,
                    replayed,
                    done,
                },
            ),
            Admission::OverRate { tell } => {
                self.book.metrics().device_messages_over_rate.inc();
                // Refused unread, acknowledged at once (the broker must not
                // deliver it again). A refused `cancel` or `sale` changes the
                // device's sale: it must learn that it was not taken, so the
                // refusal is told (not for presence, which has no state to
                // answer on), at most once a second per POS, naming the sale
                // when the message does.
                let tell = tell && kind != DeviceTopic::Status;
                let sale_id = if tell && dropped.is_none() && p.payload.len() <= self.cap {
                    inbound::sniff_sale_id(&p.payload)
                } else {
                    None
                };
                let rate = self.limiter.rate();
                let message = format!(
                    "{} of {size} bytes: refused unread, over the POS's rate of {} messages a second \
                     (burst {}); send what still matters again, more slowly",
                    kind.as_str(),
                    rate.per_sec,
                    rate.burst
                );
                self.book.reject_now(
                    &id,
                    sale_id.as_ref().map(|s| s.as_str()),
                    RATE_LIMITED,
                    &message,
                    tell,
                    Some((kind.as_str(), size)),
                );
                let _ = done.send(true);
            }
        }
    }
}

/// The refusal code of a message over its POS's rate.
pub const RATE_LIMITED: &str = "rate_limited";

async fn worker(queue: Arc<Queue>, book: Arc<Book>, max_bytes: usize, shutdown: CancellationToken) {
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = queue.next() => next,
        };
        let Some((pos, job)) = next else { break };
        let Job {
            kind,
            publish,
            dropped,
            replayed,
            done,
        } = job;
        let arrived = Delivery {
            kind,
            publish: &publish,
            dropped,
            replayed,
        };
        let handled = handle(&book, &pos, arrived, max_bytes, &shutdown).await;
        queue.done(&pos);
        let _ = done.send(handled);
    }
}

/// A device message as the worker takes it.
struct Delivery<'a> {
    kind: DeviceTopic,
    publish: &'a rumqttc::Publish,
    /// The size of a payload the guard dropped (`publish` is its stand-in).
    dropped: Option<usize>,
    replayed: bool,
}

/// One device message, from screening to its stored effect: `true` once
/// that is stored (or there is nothing to store), `false` when it must be
/// left unacknowledged for redelivery.
async fn handle(
    book: &Book,
    pos: &PosId,
    delivery: Delivery<'_>,
    max_bytes: usize,
    shutdown: &CancellationToken,
) -> bool {
    let Delivery {
        kind,
        publish: p,
        dropped,
        replayed,
    } = delivery;
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
            book.reject(
                pos,
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
                let executed = if replayed {
                    book.execute_replayed(pos, cmd.clone()).await
                } else {
                    book.execute(pos, cmd.clone()).await
                };
                match executed {
                    Ok(_) => break,
                    // Held, unacknowledged, until the store takes it: the
                    // broker would deliver it again only after a
                    // reconnection, and the device's next messages wait
                    // behind it, in order.
                    Err(BookError::Store(e)) => {
                        attempt = attempt.saturating_add(1);
                        book.metrics().device_messages_held.inc();
                        if attempt.is_power_of_two() {
                            tracing::error!(pos = %pos, error = %e, attempt,
                                "cannot store a device message: held unacknowledged and tried again until the store takes it");
                        }
                        let wait = Duration::from_millis(200)
                            .saturating_mul(attempt)
                            .min(Duration::from_secs(5));
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            // Left unacknowledged: the broker delivers it
                            // again to the next qrgate.
                            _ = shutdown.cancelled() => return false,
                        }
                    }
                    Err(e) => {
                        // Nothing a redelivery would change.
                        tracing::error!(pos = %pos, error = %e, "device message not applied; acknowledged");
                        break;
                    }
                }
            }
            if attempt > 0 {
                tracing::info!(pos = %pos, attempts = attempt, "device message stored after the store came back");
            }
        }
    }
    true
}
