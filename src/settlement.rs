//! Notification → inbox → fetch → settle. A notification only names a
//! resource; its topic and id are written to the store's inbox before the
//! 200 goes out, so a notification answered 200 is never lost: not to a
//! failing fetch, not to a crash. A worker fetches each entry with our own
//! token (never trusting the notification) and hands what Mercado Pago says
//! to the order book; the entry is done only once that was applied.
//!
//! - Failed fetches are tried again with backoff, across restarts, until
//!   Mercado Pago answers; a resource it keeps answering 404 for is given up
//!   after `[orders] reconcile_window_secs` (reconciliation searches on).
//! - One fetch at a time per resource; a notification that arrives meanwhile
//!   makes it fetch once more, so a late "closed" is never missed.
//! - First attempts have a lane of their own: resources that keep failing
//!   (one POS's outage) wait in the retry lane and never hold up another
//!   POS's fresh notifications. A fetch that takes more than a second gives
//!   its place in the lane up, so slow resources cannot fill it either.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::{now_millis, Gateway, GatewayError, Settlement};
use crate::mercadopago::client::{MpClient, MpError};
use crate::orders::settle::PaymentStatus;
use crate::store::{InboxEntry, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    MerchantOrder(u64),
    Payment(u64),
    /// An order of MP's Orders API (`order` notifications).
    Order(String),
}

impl Resource {
    pub fn topic(&self) -> &'static str {
        match self {
            Resource::MerchantOrder(_) => "merchant_order",
            Resource::Payment(_) => "payment",
            Resource::Order(_) => "order",
        }
    }

    pub fn id(&self) -> String {
        match self {
            Resource::MerchantOrder(id) | Resource::Payment(id) => id.to_string(),
            Resource::Order(id) => id.clone(),
        }
    }

    /// Back from the inbox; `None` for an entry no version of qrgate wrote.
    pub fn from_entry(topic: &str, id: &str) -> Option<Resource> {
        match topic {
            "merchant_order" => id.parse().ok().map(Resource::MerchantOrder),
            "payment" => id.parse().ok().map(Resource::Payment),
            "order" => crate::orders::MpId::parse(id).map(|i| Resource::Order(i.to_string())),
            _ => None,
        }
    }
}

/// Where notifications are written before they are answered.
#[derive(Clone)]
pub struct Inbox {
    store: Arc<dyn Store>,
    wake: mpsc::UnboundedSender<InboxEntry>,
}

impl Inbox {
    /// Writes the notification durably (group commit makes this one fsync
    /// shared by every write of the moment), then wakes the worker. An error
    /// means nothing was written: Mercado Pago must be told to send again.
    pub async fn accept(&self, r: &Resource) -> Result<(), StoreError> {
        let entry = self
            .store
            .inbox_add(r.topic(), &r.id(), now_millis())
            .await?;
        // Only fails after shutdown; the entry waits in the store.
        let _ = self.wake.send(entry);
        Ok(())
    }
}

/// How the inbox retries.
#[derive(Debug, Clone, Copy)]
pub struct InboxSettings {
    /// A resource Mercado Pago keeps failing for is given up after this.
    pub window: Duration,
    /// The longest wait between two attempts.
    pub retry_max: Duration,
}

/// Fetches in flight at once for first attempts, and for retries: enough
/// for a burst of notifications, few enough that Mercado Pago's rate
/// limiter does not take the burst for an attack.
const FRESH_LANE: usize = 16;
const RETRY_LANE: usize = 4;
const RETRY_BASE: Duration = Duration::from_millis(250);
/// A fetch slower than this stops counting against its lane.
const SLOW: Duration = Duration::from_secs(1);

type Key = (String, String);

fn key(e: &InboxEntry) -> Key {
    (e.topic.clone(), e.id.clone())
}

/// The wait before attempt `attempts + 1`: exponential from 250 ms up to
/// `max`, with jitter so entries failing together do not retry together.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let step = RETRY_BASE
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(max);
    step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// What one fetch came to.
enum Fetched {
    Applied(&'static str),
    Failed(String, bool),
}

/// Starts the worker with the entries a stop left pending.
pub async fn spawn(
    client: MpClient,
    gateway: Arc<Gateway>,
    settings: InboxSettings,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Inbox, StoreError> {
    let store = Arc::clone(gateway.store());
    let pending = store.inbox_pending().await?;
    if !pending.is_empty() {
        tracing::info!(
            entries = pending.len(),
            "notifications not yet applied: fetching them again"
        );
    }
    let (wake, mut woken) = mpsc::unbounded_channel::<InboxEntry>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(InboxEntry, Fetched)>();
    let lanes = (
        Arc::new(Semaphore::new(FRESH_LANE)),
        Arc::new(Semaphore::new(RETRY_LANE)),
    );
    let inner = tracker.clone();
    let worker_store = Arc::clone(&store);
    tracker.spawn(async move {
        let store = worker_store;
        // Latest known state of each entry, whether it is being fetched,
        // and when it is due.
        let mut entries: HashMap<Key, (InboxEntry, bool)> = HashMap::new();
        let mut due: BTreeMap<(i64, u64), Key> = BTreeMap::new();
        let mut seq: u64 = 0;
        let mut schedule = |due: &mut BTreeMap<(i64, u64), Key>, e: &InboxEntry| {
            seq += 1;
            due.insert((e.next_at, seq), key(e));
        };
        for e in pending {
            schedule(&mut due, &e);
            entries.insert(key(&e), (e, false));
        }
        loop {
            let next = due.keys().next().map(|(at, _)| *at);
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis((at - now_millis()).clamp(0, 3_600_000) as u64)
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                e = woken.recv() => {
                    let Some(e) = e else { break };
                    let k = key(&e);
                    let busy = entries.get(&k).is_some_and(|(_, busy)| *busy);
                    entries.insert(k, (e.clone(), busy));
                    // Being fetched: the fetch ends with the older
                    // generation and the entry comes back due.
                    if !busy {
                        schedule(&mut due, &e);
                    }
                }
                d = done_rx.recv() => {
                    let Some((e, fetched)) = d else { break };
                    let k = key(&e);
                    let now = now_millis();
                    let again = match fetched {
                        Fetched::Applied(outcome) => {
                            match store.inbox_done(&e.topic, &e.id, e.generation, now, outcome).await {
                                Ok(true) => None,
                                // A notification came during the fetch.
                                Ok(false) => Some(InboxEntry { attempts: 0, next_at: now, ..e.clone() }),
                                Err(err) => {
                                    tracing::error!(topic = %e.topic, id = %e.id, error = %err, "cannot mark a notification done; fetched again later");
                                    Some(InboxEntry { next_at: now + settings.retry_max.as_millis() as i64, ..e.clone() })
                                }
                            }
                        }
                        Fetched::Failed(why, not_found) => {
                            let attempts = e.attempts.saturating_add(1);
                            let age = now - e.received_at;
                            if age >= settings.window.as_millis() as i64 {
                                gateway.metrics().notifications.with_label_values(&["abandoned"]).inc();
                                tracing::error!(topic = %e.topic, id = %e.id, attempts, error = %why, not_found,
                                    "notification given up: Mercado Pago did not answer for it within reconcile_window_secs; reconciliation searches its sale");
                                match store.inbox_done(&e.topic, &e.id, e.generation, now, "abandoned").await {
                                    Ok(true) => None,
                                    Ok(false) => Some(InboxEntry { attempts: 0, next_at: now, received_at: now, ..e.clone() }),
                                    Err(_) => Some(InboxEntry { next_at: now + settings.retry_max.as_millis() as i64, ..e.clone() }),
                                }
                            } else {
                                let next_at = now + backoff(attempts, settings.retry_max).as_millis() as i64;
                                if attempts == 1 || attempts % 10 == 0 {
                                    tracing::warn!(topic = %e.topic, id = %e.id, attempts, error = %why,
                                        retry_in_ms = next_at - now, "notification not applied yet; fetched again with backoff");
                                }
                                if let Err(err) = store.inbox_retry(&e.topic, &e.id, attempts, next_at, &why).await {
                                    tracing::warn!(topic = %e.topic, id = %e.id, error = %err, "cannot note a failed fetch");
                                }
                                Some(InboxEntry { attempts, next_at, ..e.clone() })
                            }
                        }
                    };
                    // A newer generation than the one fetched may have come.
                    let newer = entries.get(&k).map(|(n, _)| n.clone()).filter(|n| n.generation > e.generation);
                    match (again, newer) {
                        (_, Some(n)) => {
                            let n = InboxEntry { next_at: now, attempts: 0, ..n };
                            schedule(&mut due, &n);
                            entries.insert(k, (n, false));
                        }
                        (Some(a), None) => {
                            schedule(&mut due, &a);
                            entries.insert(k, (a, false));
                        }
                        (None, None) => {
                            entries.remove(&k);
                        }
                    }
                }
                _ = tokio::time::sleep(sleep), if next.is_some() => {}
            }
            // Starts every entry now due that is not being fetched.
            let now = now_millis();
            while let Some(((at, s), k)) = due.first_key_value().map(|(a, k)| (*a, k.clone())) {
                if at > now {
                    break;
                }
                due.remove(&(at, s));
                let Some((e, busy)) = entries.get_mut(&k) else { continue };
                if *busy || e.next_at > now {
                    continue;
                }
                *busy = true;
                let e = e.clone();
                let lane = Arc::clone(if e.attempts == 0 { &lanes.0 } else { &lanes.1 });
                let (client, gateway, done, shutdown) =
                    (client.clone(), Arc::clone(&gateway), done_tx.clone(), shutdown.clone());
                inner.spawn(async move {
                    let Ok(permit) = lane.acquire().await else { return };
                    let Some(r) = Resource::from_entry(&e.topic, &e.id) else {
                        tracing::warn!(topic = %e.topic, id = %e.id, "inbox entry names nothing qrgate reads; dropped");
                        let _ = done.send((e, Fetched::Applied("unreadable")));
                        return;
                    };
                    let fetch = process(&client, &gateway, &r);
                    tokio::pin!(fetch);
                    // A slow fetch gives its place up: the lane bounds how
                    // many fetches start together, never how long the next
                    // notification waits behind a slow one.
                    let result = tokio::select! {
                        r = &mut fetch => Some(r),
                        _ = tokio::time::sleep(SLOW) => None,
                        _ = shutdown.cancelled() => return,
                    };
                    drop(permit);
                    // A fetch cut by shutdown leaves the entry pending.
                    let result = match result {
                        Some(r) => r,
                        None => tokio::select! {
                            r = &mut fetch => r,
                            _ = shutdown.cancelled() => return,
                        },
                    };
                    let label = if result.is_ok() { "processed" } else { "failed" };
                    gateway.metrics().notifications.with_label_values(&[label]).inc();
                    let fetched = match result {
                        Ok(outcome) => Fetched::Applied(outcome),
                        Err(err) => {
                            let not_found = matches!(&err, ProcessError::Mp(m) if m.is_not_found());
                            Fetched::Failed(err.to_string(), not_found)
                        }
                    };
                    let _ = done.send((e, fetched));
                });
            }
        }
    });
    Ok(Inbox { store, wake })
}

#[derive(Debug, thiserror::Error)]
enum ProcessError {
    #[error(transparent)]
    Mp(#[from] MpError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

fn word(s: &Settlement) -> &'static str {
    match s {
        Settlement::Paid { .. } => "paid",
        Settlement::Held { .. } => "held",
        Settlement::Duplicate => "duplicate",
        Settlement::RefundDue { .. } => "refund_due",
        Settlement::Refused(_) => "refused",
    }
}

/// Fetches what a notification names and applies it; what it came to.
async fn process(
    client: &MpClient,
    gateway: &Gateway,
    r: &Resource,
) -> Result<&'static str, ProcessError> {
    match r {
        Resource::Order(id) => {
            let (order, raw) = client.order(id).await?;
            let status = order.status.clone().unwrap_or_default();
            // The sale's POS names the currency (one account, one currency).
            let currency = order
                .external_reference
                .as_deref()
                .and_then(|r| crate::orders::ExternalReference::parse(r).ok())
                .and_then(|r| r.pos_id())
                .and_then(|p| gateway.pos_config(p.as_str()).map(|c| c.currency.code()))
                .unwrap_or("");
            match order.facts(gateway.collector_id(), currency) {
                Some(facts) => Ok(word(&gateway.settle(&facts, Some(raw), &status).await?)),
                None => {
                    tracing::warn!(order = %id, "the Orders API answered an order without a usable id; nothing settled");
                    Ok("unusable")
                }
            }
        }
        Resource::MerchantOrder(id) => {
            let (mo, raw) = client.merchant_order(*id).await?;
            let status = mo.status.clone().unwrap_or_default();
            Ok(word(
                &gateway.settle(&mo.facts(), Some(raw), &status).await?,
            ))
        }
        Resource::Payment(id) => {
            let p = client.payment(*id).await?;
            let mut outcome = "nothing";
            match (p.merchant_order_id(), p.external_reference.as_deref()) {
                (Some(mo), _) => {
                    let (mo, raw) = client.merchant_order(mo).await?;
                    let status = mo.status.clone().unwrap_or_default();
                    outcome = word(&gateway.settle(&mo.facts(), Some(raw), &status).await?);
                }
                (None, Some(reference)) => {
                    for (mo, raw) in client.search_merchant_orders(reference).await? {
                        let status = mo.status.clone().unwrap_or_default();
                        outcome = word(&gateway.settle(&mo.facts(), Some(raw), &status).await?);
                    }
                }
                (None, None) => {
                    tracing::warn!(
                        payment = id,
                        "payment names no merchant order and no reference; nothing to settle"
                    );
                }
            }
            // An approved payment its merchant order does not list yet still
            // reaches the ledger (it can close nothing on its own).
            let facts = p.facts();
            if facts
                .payments
                .iter()
                .any(|f| f.status == PaymentStatus::Approved)
            {
                let s = gateway.settle(&facts, None, "").await?;
                if !matches!(s, Settlement::Duplicate | Settlement::Refused(_)) {
                    outcome = word(&s);
                }
            }
            Ok(outcome)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_go_to_the_inbox_and_back() {
        for r in [
            Resource::MerchantOrder(12),
            Resource::Payment(34),
            Resource::Order("ORD01ABC".into()),
        ] {
            assert_eq!(Resource::from_entry(r.topic(), &r.id()), Some(r));
        }
        assert_eq!(Resource::from_entry("merchant_order", "x"), None);
        assert_eq!(Resource::from_entry("chargebacks", "1"), None);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let max = Duration::from_secs(60);
        let first = backoff(1, max);
        assert!(
            first >= Duration::from_millis(125) && first <= RETRY_BASE,
            "{first:?}"
        );
        let fifth = backoff(5, max);
        assert!(
            fifth >= Duration::from_secs(2) && fifth <= Duration::from_secs(4),
            "{fifth:?}"
        );
        assert!(backoff(30, max) <= max);
        assert!(backoff(30, max) >= max / 2);
    }
}
