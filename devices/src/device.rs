use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use serde::Serialize;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::{DeviceConfig, DeviceError, StateMessage};

const KEEP_ALIVE: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long the first connection (CONNACK and SUBACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one publish may wait for its PUBACK, reconnections included.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `disconnect` waits for the DISCONNECT packet to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many skipped messages a `wait_state` timeout reports.
const SEEN_IN_ERROR: usize = 5;

/// One line of a sale, as the device sends it.
///
/// Quantities and prices are decimal strings so they reach qrgate exactly as
/// typed: at most 3 decimals for `quantity`, at most 2 for `unit_price`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// What the customer sees, e.g. `"Super 95"`.
    pub title: String,
    /// Decimal string, e.g. `"32.10"`.
    pub quantity: String,
    /// Decimal string, e.g. `"798.00"`.
    pub unit_price: String,
    /// e.g. `"litre"` or `"unit"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_measure: Option<String>,
    /// Optional longer text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Optional stock keeping unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// Optional category.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Taxes Mercado Pago shows on the item (Colombia's IVA), at most 4.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taxes: Vec<Tax>,
}

/// A tax on an item: `{"type": "IVA", "value": "19"}` (a percentage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tax {
    #[serde(rename = "type")]
    pub kind: String,
    /// Decimal string, e.g. `"19"`.
    pub value: String,
}

impl Item {
    /// A line with only the mandatory fields.
    pub fn new(
        title: impl Into<String>,
        quantity: impl Into<String>,
        unit_price: impl Into<String>,
    ) -> Item {
        Item {
            title: title.into(),
            quantity: quantity.into(),
            unit_price: unit_price.into(),
            unit_measure: None,
            description: None,
            sku: None,
            category: None,
            taxes: Vec::new(),
        }
    }

    /// Adds a tax, e.g. `.tax("IVA", "19")`.
    pub fn tax(mut self, kind: impl Into<String>, value: impl Into<String>) -> Item {
        self.taxes.push(Tax {
            kind: kind.into(),
            value: value.into(),
        });
        self
    }

    /// Sets `unit_measure`.
    pub fn unit_measure(mut self, unit: impl Into<String>) -> Item {
        self.unit_measure = Some(unit.into());
        self
    }

    /// Sets `description`.
    pub fn description(mut self, text: impl Into<String>) -> Item {
        self.description = Some(text.into());
        self
    }

    /// Sets `sku`.
    pub fn sku(mut self, sku: impl Into<String>) -> Item {
        self.sku = Some(sku.into());
        self
    }

    /// Sets `category`.
    pub fn category(mut self, category: impl Into<String>) -> Item {
        self.category = Some(category.into());
        self
    }
}

#[derive(Serialize)]
struct SalePayload<'a> {
    sale_id: &'a str,
    items: &'a [Item],
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<&'a str>,
}

#[derive(Serialize)]
struct SaleIdPayload<'a> {
    sale_id: &'a str,
}

#[derive(Serialize)]
struct DeliveredPayload<'a> {
    sale_id: &'a str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// What the event loop knows about the connection, shared through a watch
/// channel so waiters wake up on every change.
#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    /// Number of CONNACKs so far.
    connects: u64,
    /// Value of `connects` when the state subscription was last acknowledged.
    subscribed: u64,
    last_error: Option<String>,
    refused: Option<String>,
    subscription_denied: bool,
    stopped: bool,
}

enum AckOutcome {
    Acked,
    /// The connection dropped before the PUBACK; with a clean session the
    /// publish is gone and must be sent again.
    Lost,
    Stopped,
}

/// The one publish currently awaiting its PUBACK. Publishes are serialised by
/// `Shared::publish_lock`, so the next outgoing QoS 1 packet id is ours.
struct Waiter {
    pkid: Option<u16>,
    tx: oneshot::Sender<AckOutcome>,
}

struct Shared {
    client: AsyncClient,
    pos_id: String,
    /// `{prefix}/pos/{pos_id}/`
    topic_stem: String,
    state_topic: String,
    status_topic: String,
    announce_presence: bool,
    publish_lock: tokio::sync::Mutex<()>,
    waiter: Mutex<Option<Waiter>>,
    inbox: Mutex<VecDeque<StateMessage>>,
    arrived: Notify,
    link: watch::Sender<Link>,
    closing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later call into a panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn topic(&self, subtopic: &str) -> String {
        format!("{}{subtopic}", self.topic_stem)
    }

    fn resolve_waiter(&self, outcome: AckOutcome) {
        if let Some(w) = lock(&self.waiter).take() {
            let _ = w.tx.send(outcome);
        }
    }

    async fn publish_acked(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), DeviceError> {
        let _serial = self.publish_lock.lock().await;
        self.publish_locked(topic, payload, retain).await
    }

    async fn publish_locked(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), DeviceError> {
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let timeout = || DeviceError::Timeout(format!("PUBACK of publish to {topic}"));
        let mut link = self.link.subscribe();
        loop {
            // Publishing while disconnected would be dropped at the next clean
            // session anyway; wait for the connection instead.
            let up = tokio::time::timeout_at(deadline, link.wait_for(|l| l.connected || l.stopped))
                .await
                .map_err(|_| timeout())?
                .map_err(|_| DeviceError::Closed)?
                .connected;
            if !up {
                return Err(DeviceError::Closed);
            }

            let (tx, rx) = oneshot::channel();
            *lock(&self.waiter) = Some(Waiter { pkid: None, tx });
            let sent = tokio::time::timeout_at(
                deadline,
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload.clone()),
            )
            .await;
            match sent {
                Err(_) => {
                    lock(&self.waiter).take();
                    return Err(timeout());
                }
                Ok(Err(e)) => {
                    lock(&self.waiter).take();
                    return Err(DeviceError::Mqtt(e.to_string()));
                }
                Ok(Ok(())) => {}
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(AckOutcome::Acked)) => {
                    debug!(topic, "publish acknowledged");
                    return Ok(());
                }
                Ok(Ok(AckOutcome::Lost)) => {
                    debug!(topic, "connection lost before PUBACK, publishing again");
                }
                Ok(Ok(AckOutcome::Stopped)) | Ok(Err(_)) => return Err(DeviceError::Closed),
                Err(_) => {
                    lock(&self.waiter).take();
                    return Err(timeout());
                }
            }
        }
    }

    fn subscribe_state(self: &Arc<Self>) {
        if self
            .client
            .try_subscribe(&self.state_topic, QoS::AtLeastOnce)
            .is_err()
        {
            // Request channel momentarily full: queue it without blocking the
            // event loop, which is what drains that channel.
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                let _ = shared
                    .client
                    .subscribe(&shared.state_topic, QoS::AtLeastOnce)
                    .await;
            });
        }
    }

    fn announce_online_again(self: &Arc<Self>) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _serial = shared.publish_lock.lock().await;
            // A disconnect may have published `offline` meanwhile; don't undo it.
            if shared.closing.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = shared
                .publish_locked(&shared.status_topic, b"online".to_vec(), true)
                .await
            {
                warn!(pos_id = %shared.pos_id, "could not re-announce online: {e}");
            }
        });
    }
}

async fn run_event_loop(shared: Arc<Shared>, mut eventloop: EventLoop) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = MIN_BACKOFF;
                shared.link.send_modify(|l| {
                    l.connected = true;
                    l.connects += 1;
                    l.last_error = None;
                });
                debug!(pos_id = %shared.pos_id, "connected to broker");
                // Clean session: the subscription must be renewed on every connect.
                shared.subscribe_state();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                let mut connects = 0;
                shared.link.send_modify(|l| {
                    if ok {
                        l.subscribed = l.connects;
                    } else {
                        l.subscription_denied = true;
                    }
                    connects = l.connects;
                });
                if !ok {
                    warn!(pos_id = %shared.pos_id, topic = %shared.state_topic, "broker denied the state subscription");
                } else if connects > 1 && shared.announce_presence {
                    // The broker fired our last will when the old connection died.
                    shared.announce_online_again();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic != shared.state_topic {
                    continue;
                }
                match StateMessage::parse(&p.payload, p.retain) {
                    Ok(msg) => {
                        debug!(pos_id = %shared.pos_id, "state: {msg}");
                        lock(&shared.inbox).push_back(msg);
                        shared.arrived.notify_waiters();
                    }
                    Err(e) => warn!(pos_id = %shared.pos_id, "ignoring state message: {e}"),
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let mut waiter = lock(&shared.waiter);
                if waiter.as_ref().is_some_and(|w| w.pkid == Some(ack.pkid)) {
                    if let Some(w) = waiter.take() {
                        let _ = w.tx.send(AckOutcome::Acked);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if let Some(w) = lock(&shared.waiter).as_mut() {
                    w.pkid.get_or_insert(pkid);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if shared.closing.load(Ordering::SeqCst) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) {
                    break;
                }
                let refused = matches!(e, ConnectionError::ConnectionRefused(_));
                let text = e.to_string();
                shared.link.send_modify(|l| {
                    l.connected = false;
                    l.last_error = Some(text.clone());
                    if refused {
                        l.refused = Some(text.clone());
                    }
                });
                shared.resolve_waiter(AckOutcome::Lost);
                debug!(pos_id = %shared.pos_id, "MQTT connection error, retrying in {backoff:?}: {text}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    shared.link.send_modify(|l| {
        l.connected = false;
        l.stopped = true;
    });
    shared.resolve_waiter(AckOutcome::Stopped);
    shared.arrived.notify_waiters();
    // Dropping the event loop here closes the socket.
}

/// One MQTT connection playing one POS.
///
/// A background task polls the connection and reconnects (100 ms to 2 s
/// backoff) whenever the broker goes away, renewing the `state` subscription
/// and, with presence on, the retained `online` each time. Incoming `state`
/// messages queue up until read with [`next_state`](Device::next_state),
/// [`wait_state`](Device::wait_state), [`wait_for`](Device::wait_for) or
/// [`drain`](Device::drain).
///
/// Every publish is QoS 1 and returns only once the broker acknowledged it
/// (giving up after 10 s); publishes of one device are sent one at a time.
///
/// Dropping a `Device` without [`disconnect`](Device::disconnect) behaves like
/// [`crash`](Device::crash): the broker fires the last will.
pub struct Device {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Device {
    /// Connects, subscribes to the POS's `state` topic and, with presence on,
    /// publishes a retained `online`.
    ///
    /// Returns only after the SUBACK, so a retained state already on the
    /// broker is delivered to this device (read it with `next_state`). A
    /// broker that refuses the connection (bad credentials, not authorised)
    /// or that cannot be reached within 10 s gives [`DeviceError::Connect`].
    pub async fn connect(cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let mut opts = MqttOptions::new(cfg.effective_client_id(), cfg.host.clone(), cfg.port);
        opts.set_keep_alive(KEEP_ALIVE);
        opts.set_clean_session(true);
        opts.set_request_channel_capacity(64);
        if let Some(user) = &cfg.username {
            opts.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
        }
        let status_topic = cfg.topic("status");
        if cfg.announce_presence {
            opts.set_last_will(LastWill::new(
                status_topic.clone(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Small request/answer packets: Nagle plus delayed ACKs would add
        // tens of milliseconds to each step of a sale.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (link, _) = watch::channel(Link::default());
        let shared = Arc::new(Shared {
            client,
            pos_id: cfg.pos_id.clone(),
            topic_stem: cfg.topic(""),
            state_topic: cfg.topic("state"),
            status_topic,
            announce_presence: cfg.announce_presence,
            publish_lock: tokio::sync::Mutex::new(()),
            waiter: Mutex::new(None),
            inbox: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            link,
            closing: AtomicBool::new(false),
        });
        let mut link = shared.link.subscribe();
        let task = tokio::spawn(run_event_loop(Arc::clone(&shared), eventloop));
        let device = Device {
            shared,
            task: Some(task),
        };

        let waited = tokio::time::timeout(
            CONNECT_TIMEOUT,
            link.wait_for(|l| {
                l.subscribed > 0 || l.refused.is_some() || l.subscription_denied || l.stopped
            }),
        )
        .await
        .map(|r| r.map(|l| l.clone()));
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let outcome = match waited {
            Err(_) => Err(DeviceError::Connect(format!(
                "no connection to {addr} within {CONNECT_TIMEOUT:?}: {}",
                link.borrow()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no answer".into())
            ))),
            Ok(Err(_)) => Err(DeviceError::Closed),
            Ok(Ok(l)) => {
                if let Some(reason) = &l.refused {
                    Err(DeviceError::Connect(format!("{addr} refused: {reason}")))
                } else if l.subscription_denied {
                    Err(DeviceError::Connect(format!(
                        "{addr} denied the subscription to {}",
                        device.shared.state_topic
                    )))
                } else if l.stopped {
                    Err(DeviceError::Closed)
                } else {
                    Ok(())
                }
            }
        };
        // Dropping `device` on error aborts the event loop, stopping retries.
        outcome?;

        if cfg.announce_presence {
            device.set_status(true).await?;
        }
        debug!(pos_id = %cfg.pos_id, "device ready");
        Ok(device)
    }

    /// The POS this device plays.
    pub fn pos_id(&self) -> &str {
        &self.shared.pos_id
    }

    /// The full topic `{prefix}/pos/{pos_id}/{subtopic}`.
    pub fn topic(&self, subtopic: &str) -> String {
        self.shared.topic(subtopic)
    }

    /// Whether the connection to the broker is currently up.
    pub fn is_connected(&self) -> bool {
        self.shared.link.borrow().connected
    }

    /// Publishes a sale on `sale`; `amount` is optional (qrgate computes it
    /// from the lines, and checks it when given).
    pub async fn publish_sale(
        &self,
        sale_id: &str,
        items: &[Item],
        amount: Option<&str>,
    ) -> Result<(), DeviceError> {
        let payload = to_json(&SalePayload {
            sale_id,
            items,
            amount,
        });
        self.publish_raw("sale", payload).await
    }

    /// Announces a sale whose amount is not known yet (pump fuelling).
    pub async fn progress(&self, sale_id: &str) -> Result<(), DeviceError> {
        self.publish_raw("progress", to_json(&SaleIdPayload { sale_id }))
            .await
    }

    /// Withdraws a sale (e.g. the customer paid cash).
    pub async fn cancel(&self, sale_id: &str) -> Result<(), DeviceError> {
        self.publish_raw("cancel", to_json(&SaleIdPayload { sale_id }))
            .await
    }

    /// Confirms the device acted on `paid` (`ok`), or could not (`reason`).
    pub async fn delivered(
        &self,
        sale_id: &str,
        ok: bool,
        reason: Option<&str>,
    ) -> Result<(), DeviceError> {
        self.publish_raw(
            "delivered",
            to_json(&DeliveredPayload {
                sale_id,
                ok,
                reason,
            }),
        )
        .await
    }

    /// Publishes `online` or `offline`, retained, on `status`.
    pub async fn set_status(&self, online: bool) -> Result<(), DeviceError> {
        let text = if online { "online" } else { "offline" };
        self.shared
            .publish_acked(&self.shared.status_topic, text.as_bytes().to_vec(), true)
            .await
    }

    /// Publishes any payload to `{prefix}/pos/{pos_id}/{subtopic}`, QoS 1, not
    /// retained; meant for feeding qrgate malformed input.
    pub async fn publish_raw(
        &self,
        subtopic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), DeviceError> {
        let topic = self.topic(subtopic);
        self.shared
            .publish_acked(&topic, payload.into(), false)
            .await
    }

    /// Publishes to any topic, QoS 1 (e.g. another POS's topics, or a state
    /// message when a test plays qrgate).
    pub async fn publish_to(
        &self,
        full_topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<(), DeviceError> {
        self.shared
            .publish_acked(full_topic, payload.into(), retain)
            .await
    }

    /// The next `state` message, waiting up to `timeout`.
    pub async fn next_state(&self, timeout: Duration) -> Result<StateMessage, DeviceError> {
        let deadline = Instant::now() + timeout;
        self.next_until(deadline).await?.ok_or_else(|| {
            DeviceError::Timeout(format!(
                "a state message on {} within {timeout:?}",
                self.shared.state_topic
            ))
        })
    }

    /// The next `state` message satisfying `pred`, discarding the others.
    ///
    /// On timeout the error lists the last few discarded messages, which is
    /// usually all a failing test needs to explain itself.
    pub async fn wait_state(
        &self,
        timeout: Duration,
        pred: impl Fn(&StateMessage) -> bool,
    ) -> Result<StateMessage, DeviceError> {
        self.wait_described(timeout, "a matching state message", pred)
            .await
    }

    /// Waits for `state` about `sale_id` (e.g. `wait_for("000042", "paid", ..)`).
    pub async fn wait_for(
        &self,
        sale_id: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<StateMessage, DeviceError> {
        self.wait_described(
            timeout,
            &format!("state `{state}` of sale `{sale_id}`"),
            |m| m.state == state && m.is_for(sale_id),
        )
        .await
    }

    /// Everything that arrived and was not consumed yet, without waiting.
    pub fn drain(&self) -> Vec<StateMessage> {
        lock(&self.shared.inbox).drain(..).collect()
    }

    /// Leaves cleanly: with presence on, publishes a retained `offline` first,
    /// then sends DISCONNECT, so the broker does not fire the last will.
    ///
    /// If the broker is unreachable at that moment the connection is simply
    /// dropped (and the broker, whenever it notices, fires the last will).
    pub async fn disconnect(mut self) -> Result<(), DeviceError> {
        let mut result = Ok(());
        if self.is_connected() {
            if self.shared.announce_presence {
                result = self.set_status(false).await;
            }
            self.shared.closing.store(true, Ordering::SeqCst);
            if let Err(e) = self.shared.client.disconnect().await {
                result = result.and(Err(DeviceError::Mqtt(e.to_string())));
            }
            if let Some(task) = self.task.as_mut() {
                if tokio::time::timeout(DISCONNECT_TIMEOUT, task)
                    .await
                    .is_err()
                {
                    result = result.and(Err(DeviceError::Timeout(
                        "the DISCONNECT packet to be sent".into(),
                    )));
                }
            }
        }
        // Drop aborts the task if it is still running.
        result
    }

    /// Drops the connection abruptly, without a DISCONNECT packet, so the
    /// broker fires the last will (`offline`, retained) as it would for a
    /// device losing power.
    pub fn crash(self) {
        // Drop aborts the event loop task, which drops the socket.
        drop(self);
    }

    async fn next_until(&self, deadline: Instant) -> Result<Option<StateMessage>, DeviceError> {
        loop {
            // Register interest before checking the inbox so a message pushed
            // in between still wakes us.
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(msg) = lock(&self.shared.inbox).pop_front() {
                return Ok(Some(msg));
            }
            if self.shared.link.borrow().stopped {
                return Err(DeviceError::Closed);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn wait_described(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&StateMessage) -> bool,
    ) -> Result<StateMessage, DeviceError> {
        let deadline = Instant::now() + timeout;
        let mut seen: VecDeque<String> = VecDeque::new();
        let mut skipped = 0usize;
        while let Some(msg) = self.next_until(deadline).await? {
            if pred(&msg) {
                return Ok(msg);
            }
            skipped += 1;
            if seen.len() == SEEN_IN_ERROR {
                seen.pop_front();
            }
            seen.push_back(msg.to_string());
        }
        let seen = if seen.is_empty() {
            "no state message arrived".to_string()
        } else {
            format!(
                "{skipped} other state message(s) arrived, the last ones: {}",
                Vec::from(seen).join("; ")
            )
        };
        Err(DeviceError::Timeout(format!(
            "{what} on {} within {timeout:?} ({seen})",
            self.shared.state_topic
        )))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("pos_id", &self.shared.pos_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and bools: serialisation cannot fail.
    serde_json::to_vec(value).expect("payload serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sale_payload_shape() {
        let items = [
            Item::new("Super 95", "32.10", "798.00").unit_measure("litre"),
            Item::new("Water", "1", "1500.00")
                .sku("W-500")
                .category("drinks")
                .description("500 ml"),
        ];
        let json: serde_json::Value = serde_json::from_slice(&to_json(&SalePayload {
            sale_id: "000042",
            items: &items,
            amount: None,
        }))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "sale_id": "000042",
                "items": [
                    {"title": "Super 95", "quantity": "32.10", "unit_price": "798.00", "unit_measure": "litre"},
                    {"title": "Water", "quantity": "1", "unit_price": "1500.00", "description": "500 ml", "sku": "W-500", "category": "drinks"}
                ]
            })
        );
        let json: serde_json::Value = serde_json::from_slice(&to_json(&SalePayload {
            sale_id: "1",
            items: &items[..1],
            amount: Some("25615.80"),
        }))
        .unwrap();
        assert_eq!(json["amount"], "25615.80");
    }

    #[test]
    fn delivered_payload_shape() {
        let ok = to_json(&DeliveredPayload {
            sale_id: "7",
            ok: true,
            reason: None,
        });
        assert_eq!(ok, br#"{"sale_id":"7","ok":true}"#);
        let jam = to_json(&DeliveredPayload {
            sale_id: "7",
            ok: false,
            reason: Some("nozzle fault"),
        });
        assert_eq!(
            jam,
            br#"{"sale_id":"7","ok":false,"reason":"nozzle fault"}"#
        );
    }

    // Callers spawn these futures onto multi-threaded runtimes.
    #[allow(dead_code)]
    fn futures_are_send(device: &Device, pump: &crate::Pump, vm: &crate::VendingMachine) {
        fn is_send<T: Send>(_: T) {}
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<Device>();
        is_send_sync::<crate::Pump>();
        is_send_sync::<crate::VendingMachine>();
        let t = Duration::from_secs(1);
        is_send(Device::connect(DeviceConfig::new("h", 1, "p")));
        is_send(device.publish_sale("1", &[], None));
        is_send(device.wait_state(t, |_| true));
        is_send(device.wait_for("1", "paid", t));
        is_send(pump.wait_paid_and_release("1", t));
        is_send(vm.wait_paid_and_dispense("1", t));
    }

    #[allow(dead_code)]
    fn disconnect_is_send(device: Device) {
        fn is_send<T: Send>(_: T) {}
        is_send(device.disconnect());
    }
}
