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
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::book::{Book, BookError, Verdict};
use crate::clock::Clock;
use crate::mercadopago::client::{MpClient, MpError};
use crate::orders::merchant_order::PaymentStatus;
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

/// Where notifications are written before they are answered. The worker
/// runs on the instance that leads the singletons ([`work`]); any instance
/// writes, and the leader hears of what others wrote through the store.
#[derive(Clone)]
pub struct Inbox {
    store: Arc<dyn Store>,
    wake: mpsc::UnboundedSender<Wake>,
    clock: Clock,
    leading: watch::Receiver<Option<u64>>,
}

/// What wakes the worker.
#[derive(Debug)]
pub enum Wake {
    /// An entry was written (here, or by another instance).
    Entry(InboxEntry),
    /// Entries may have been written unheard: read the inbox again.
    Reread,
}

/// The worker's end of the wakes, handed from one leadership term's worker
/// to the next.
pub type Woken = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Wake>>>;

impl Inbox {
    /// The inbox of `store`, waking the worker while `leading` holds a term.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        leading: watch::Receiver<Option<u64>>,
    ) -> (Inbox, Woken) {
        let (wake, woken) = mpsc::unbounded_channel();
        let inbox = Inbox {
            store,
            wake,
            clock,
            leading,
        };
        (inbox, Arc::new(tokio::sync::Mutex::new(woken)))
    }

    /// Writes the notification durably (group commit makes this one fsync
    /// shared by every write of the moment), then wakes the worker. An error
    /// means nothing was written: Mercado Pago must be told to send again.
    pub async fn accept(&self, r: &Resource) -> Result<(), StoreError> {
        let entry = self
            .store
            .inbox_add(r.topic(), &r.id(), self.clock.now_millis())
            .await?;
        self.wake(Wake::Entry(entry));
        Ok(())
    }

    /// What another instance wrote, or that something may have gone
    /// unheard.
    pub fn heard(&self, w: Wake) {
        self.wake(w);
    }

    fn wake(&self, w: Wake) {
        // A follower's worker does not run: the leader hears of the entry
        // through the store, and reads the inbox whole when it begins.
        if self.leading.borrow().is_some() {
            // Only fails after shutdown; the entry waits in the store.
            let _ = self.wake.send(w);
        }
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

/// Which inbox entries are due, and which are being fetched. No I/O: the
/// worker asks it what to start and tells it what the store said.
#[derive(Default)]
struct Schedule {
    /// The latest known state of each entry, and whether it is being fetched.
    entries: HashMap<Key, (InboxEntry, bool)>,
    /// When each entry is due; a stale key (the entry moved) is skipped.
    due: BTreeMap<(i64, u64), Key>,
    seq: u64,
}

impl Schedule {
    fn put(&mut self, e: InboxEntry) {
        self.seq += 1;
        self.due.insert((e.next_at, self.seq), key(&e));
        self.entries.insert(key(&e), (e, false));
    }

    /// A notification was written. A newer generation is due now (at once
    /// if nothing fetches it, after the fetch under way otherwise); a wake
    /// that arrives after a newer one changes nothing.
    fn woken(&mut self, e: InboxEntry) {
        match self.entries.get_mut(&key(&e)) {
            Some((known, _)) if e.generation <= known.generation => {}
            Some((known, true)) => *known = e,
            _ => self.put(e),
        }
    }

    /// A fetch of `fetched` ended; `next` is what the store says comes
    /// next for it (`None`: done). A notification that came during the
    /// fetch makes it due again now.
    fn finished(&mut self, fetched: &InboxEntry, next: Option<InboxEntry>, now: i64) {
        let newer = self
            .entries
            .get(&key(fetched))
            .map(|(n, _)| n.clone())
            .filter(|n| n.generation > fetched.generation);
        let next = match (next, newer) {
            (next, Some(n)) => Some(InboxEntry {
                generation: n.generation.max(next.map_or(0, |x| x.generation)),
                attempts: 0,
                next_at: now,
                ..n
            }),
            (next, None) => next,
        };
        match next {
            Some(e) => self.put(e),
            None => {
                self.entries.remove(&key(fetched));
            }
        }
    }

    fn next_at(&self) -> Option<i64> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// The entries due at `now` and not being fetched, marked as fetched.
    fn take_due(&mut self, now: i64) -> Vec<InboxEntry> {
        let mut out = Vec::new();
        while let Some((&(at, s), _)) = self.due.first_key_value() {
            if at > now {
                break;
            }
            let Some(k) = self.due.remove(&(at, s)) else {
                break;
            };
            if let Some((e, busy)) = self.entries.get_mut(&k) {
                if !*busy && e.next_at <= now {
                    *busy = true;
                    out.push(e.clone());
                }
            }
        }
        out
    }
}

/// After a resource Mercado Pago does not know for this long, it is asked
/// again only every [`NOT_FOUND_EVERY`]: a notification naming a made-up id
/// costs a few calls an hour, not one a minute.
const NOT_FOUND_SLOW_AFTER: i64 = 5 * 60_000;
const NOT_FOUND_EVERY: Duration = Duration::from_secs(600);

/// Ended fetches written together at most (one batch of the store's).
const DONE_BATCH: usize = 256;

/// Writes what a fetch came to, and says what comes next for the entry.
async fn after_fetch(
    store: &Arc<dyn Store>,
    book: &Book,
    settings: InboxSettings,
    e: &InboxEntry,
    fetched: Fetched,
    now: i64,
) -> Option<InboxEntry> {
    let later = InboxEntry {
        next_at: now + settings.retry_max.as_millis() as i64,
        ..e.clone()
    };
    let (outcome, failure) = match fetched {
        Fetched::Applied(outcome) => (outcome, None),
        Fetched::Failed(why, not_found) => {
            let age = now - e.received_at;
            if age < settings.window.as_millis() as i64 {
                let attempts = e.attempts.saturating_add(1);
                let cap = if not_found && age > NOT_FOUND_SLOW_AFTER {
                    NOT_FOUND_EVERY
                } else {
                    settings.retry_max
                };
                let next_at = now + backoff(attempts, cap).as_millis() as i64;
                if attempts == 1 || attempts % 10 == 0 {
                    tracing::warn!(topic = %e.topic, id = %e.id, attempts, error = %why, not_found,
                        retry_in_ms = next_at - now, "notification not applied yet; fetched again with backoff");
                }
                if let Err(err) = store
                    .inbox_retry(&e.topic, &e.id, e.generation, attempts, next_at, &why)
                    .await
                {
                    tracing::warn!(topic = %e.topic, id = %e.id, error = %err, "cannot note a failed fetch");
                }
                return Some(InboxEntry {
                    attempts,
                    next_at,
                    ..e.clone()
                });
            }
            ("abandoned", Some((why, not_found)))
        }
    };
    if let Some((why, not_found)) = &failure {
        book.metrics()
            .notifications
            .with_label_values(&["abandoned"])
            .inc();
        tracing::error!(topic = %e.topic, id = %e.id, attempts = e.attempts, error = %why, not_found,
            "notification given up: Mercado Pago did not answer for it within reconcile_window_secs");
    }
    match store
        .inbox_done(&e.topic, &e.id, e.generation, now, outcome)
        .await
    {
        Ok(None) => None,
        // A notification came during the fetch: fetch it afresh.
        Ok(Some(generation)) => Some(InboxEntry {
            generation,
            attempts: 0,
            next_at: now,
            received_at: if failure.is_some() {
                now
            } else {
                e.received_at
            },
            ..e.clone()
        }),
        Err(err) => {
            tracing::error!(topic = %e.topic, id = %e.id, error = %err,
                "cannot mark a notification done; fetched again later");
            Some(later)
        }
    }
}

/// The inbox's entries still pending, read until it answers or `shutdown`.
async fn read_pending(store: &dyn Store, shutdown: &CancellationToken) -> Option<Vec<InboxEntry>> {
    let mut wait = Duration::from_millis(200);
    loop {
        match store.inbox_pending().await {
            Ok(p) => return Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the notification inbox yet; reading it again")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return None,
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// The worker, for as long as this instance leads (until `shutdown`):
/// fetches the entries pending, then each one it is woken for.
pub async fn work(
    client: MpClient,
    book: Arc<Book>,
    settings: InboxSettings,
    woken: Woken,
    shutdown: CancellationToken,
) {
    let store = Arc::clone(book.store());
    let clock = book.clock().clone();
    // The previous term's worker is gone once its shutdown was cancelled;
    // the lock is the handover.
    let mut woken = woken.lock().await;
    let Some(pending) = read_pending(store.as_ref(), &shutdown).await else {
        return;
    };
    if !pending.is_empty() {
        tracing::info!(
            entries = pending.len(),
            "notifications not yet applied: fetching them again"
        );
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(InboxEntry, Fetched)>();
    let lanes = Lanes {
        fresh: Arc::new(Semaphore::new(FRESH_LANE)),
        retry: Arc::new(Semaphore::new(RETRY_LANE)),
    };
    let fetches = TaskTracker::new();
    let mut schedule = Schedule::default();
    for e in pending {
        schedule.put(e);
    }
    loop {
        let next = schedule.next_at();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            w = woken.recv() => match w {
                Some(Wake::Entry(e)) => schedule.woken(e),
                Some(Wake::Reread) => {
                    let Some(pending) = read_pending(store.as_ref(), &shutdown).await else { break };
                    for e in pending {
                        schedule.woken(e);
                    }
                }
                None => break,
            },
            d = done_rx.recv() => {
                let Some(first) = d else { break };
                // Every fetch that ended meanwhile is written at once:
                // the store commits them in one batch, where one commit
                // each let the inbox fall behind a busy station.
                let mut ended = vec![first];
                while ended.len() < DONE_BATCH {
                    match done_rx.try_recv() {
                        Ok(d) => ended.push(d),
                        Err(_) => break,
                    }
                }
                let now = clock.now_millis();
                let (entries, fetched): (Vec<_>, Vec<_>) = ended.into_iter().unzip();
                let nexts = futures_util::future::join_all(
                    entries
                        .iter()
                        .zip(fetched)
                        .map(|(e, f)| after_fetch(&store, &book, settings, e, f, now)),
                )
                .await;
                for (e, next) in entries.iter().zip(nexts) {
                    schedule.finished(e, next, now);
                }
            }
            _ = clock.sleep_until(next.unwrap_or(i64::MAX)), if next.is_some() => {}
        }
        for e in schedule.take_due(clock.now_millis()) {
            let job = Fetch {
                client: client.clone(),
                book: Arc::clone(&book),
                done: done_tx.clone(),
                shutdown: shutdown.clone(),
            };
            fetches.spawn(crate::store::fence::carry(job.run(e, lanes.clone())));
        }
    }
    fetches.close();
    fetches.wait().await;
}

#[derive(Clone)]
struct Lanes {
    fresh: Arc<Semaphore>,
    retry: Arc<Semaphore>,
}

/// One fetch of one inbox entry.
struct Fetch {
    client: MpClient,
    book: Arc<Book>,
    done: mpsc::UnboundedSender<(InboxEntry, Fetched)>,
    shutdown: CancellationToken,
}

impl Fetch {
    async fn run(self, e: InboxEntry, lanes: Lanes) {
        let lane = if e.attempts == 0 {
            lanes.fresh
        } else {
            lanes.retry
        };
        let Ok(permit) = lane.acquire_owned().await else {
            return;
        };
        let Some(r) = Resource::from_entry(&e.topic, &e.id) else {
            tracing::warn!(topic = %e.topic, id = %e.id, "inbox entry names nothing qrgate reads; dropped");
            let _ = self.done.send((e, Fetched::Applied("unreadable")));
            return;
        };
        // Its own task: a panic on some answer fails this fetch, not the
        // entry's bookkeeping.
        let (client, book) = (self.client.clone(), Arc::clone(&self.book));
        let mut fetch = tokio::spawn(crate::store::fence::carry(async move {
            process(&client, &book, &r).await
        }));
        // A slow fetch gives its place up: the lane bounds how many fetches
        // start together, never how long the next notification waits
        // behind a slow one.
        let result = tokio::select! {
            r = &mut fetch => Some(r),
            _ = tokio::time::sleep(SLOW) => None,
            _ = self.shutdown.cancelled() => { fetch.abort(); return }
        };
        drop(permit);
        // A fetch cut by shutdown leaves the entry pending.
        let result = match result {
            Some(r) => r,
            None => tokio::select! {
                r = &mut fetch => r,
                _ = self.shutdown.cancelled() => { fetch.abort(); return }
            },
        };
        let label = if matches!(result, Ok(Ok(_))) {
            "processed"
        } else {
            "failed"
        };
        self.book
            .metrics()
            .notifications
            .with_label_values(&[label])
            .inc();
        let fetched = match result {
            Ok(Ok(outcome)) => Fetched::Applied(outcome),
            Ok(Err(err)) => {
                let not_found = matches!(&err, ProcessError::Mp(m) if m.is_not_found());
                Fetched::Failed(err.to_string(), not_found)
            }
            Err(join) => {
                tracing::error!(topic = %e.topic, id = %e.id, error = %join, "a fetch failed unexpectedly; fetched again later");
                Fetched::Failed(format!("fetch failed: {join}"), false)
            }
        };
        let _ = self.done.send((e, fetched));
    }
}

#[derive(Debug, thiserror::Error)]
enum ProcessError {
    #[error(transparent)]
    Mp(#[from] MpError),
    #[error(transparent)]
    Book(#[from] BookError),
}

fn word(s: &Verdict) -> &'static str {
    match s {
        Verdict::Paid { .. } => "paid",
        Verdict::Held { .. } => "held",
        Verdict::Duplicate => "duplicate",
        Verdict::RefundDue { .. } => "refund_due",
        Verdict::Unpaid(_) => "refused",
    }
}

/// Fetches what a notification names and applies it; what it came to.
async fn process(
    client: &MpClient,
    book: &Book,
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
                .and_then(|p| book.pos_config(p.as_str()).map(|c| c.currency.code()))
                .unwrap_or("");
            match order.facts(book.collector_id(), currency) {
                Some(facts) => Ok(word(&book.settle(&facts, Some(raw), &status).await?)),
                None => {
                    tracing::warn!(order = %id, "the Orders API answered an order without a usable id; nothing settled");
                    Ok("unusable")
                }
            }
        }
        Resource::MerchantOrder(id) => {
            let (mo, raw) = client.merchant_order(*id).await?;
            let status = mo.status.clone().unwrap_or_default();
            Ok(word(&book.settle(&mo.facts(), Some(raw), &status).await?))
        }
        Resource::Payment(id) => {
            let p = client.payment(*id).await?;
            let mut outcome = "nothing";
            match (p.merchant_order_id(), p.external_reference.as_deref()) {
                (Some(mo), _) => {
                    let (mo, raw) = client.merchant_order(mo).await?;
                    let status = mo.status.clone().unwrap_or_default();
                    outcome = word(&book.settle(&mo.facts(), Some(raw), &status).await?);
                }
                (None, Some(reference)) => {
                    for (mo, raw) in client.search_merchant_orders(reference).await? {
                        let status = mo.status.clone().unwrap_or_default();
                        outcome = word(&book.settle(&mo.facts(), Some(raw), &status).await?);
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
                let s = book.settle(&facts, None, "").await?;
                if !matches!(s, Verdict::Duplicate | Verdict::Unpaid(_)) {
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

    fn entry(id: &str, generation: i64, next_at: i64) -> InboxEntry {
        InboxEntry {
            topic: "merchant_order".into(),
            id: id.into(),
            received_at: 0,
            generation,
            attempts: 0,
            next_at,
        }
    }

    #[test]
    fn a_notification_during_a_fetch_makes_it_due_again_once_it_ends() {
        let mut s = Schedule::default();
        s.woken(entry("7", 1, 10));
        assert!(s.take_due(9).is_empty());
        let fetching = s.take_due(10);
        assert_eq!(fetching, [entry("7", 1, 10)]);
        // Two more notifications while it is fetched: nothing starts.
        s.woken(entry("7", 3, 11));
        s.woken(entry("7", 2, 11));
        assert!(s.take_due(20).is_empty());
        // The store marked generation 1 done (the wakes were written after
        // it): the newest generation is due now all the same.
        s.finished(&fetching[0], None, 30);
        let again = s.take_due(30);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].generation, again[0].next_at), (3, 30));
        // Done: forgotten; a stale wake costs one fetch, never a loop.
        s.finished(&again[0], None, 40);
        assert_eq!(s.next_at(), None);
        s.woken(entry("7", 2, 50));
        let stale = s.take_due(50);
        s.finished(&stale[0], None, 60);
        assert!(s.take_due(i64::MAX).is_empty());
    }

    #[test]
    fn a_failed_fetch_waits_its_backoff_and_the_store_names_a_newer_generation() {
        let mut s = Schedule::default();
        s.put(entry("7", 1, 0));
        let e = s.take_due(0).remove(0);
        let retry = InboxEntry {
            attempts: 1,
            next_at: 500,
            ..e.clone()
        };
        s.finished(&e, Some(retry), 100);
        assert!(s.take_due(499).is_empty());
        let e = s.take_due(500).remove(0);
        assert_eq!(e.attempts, 1);
        // The store says a newer notification is pending.
        s.finished(&e, Some(entry("7", 4, 600)), 600);
        assert_eq!(s.take_due(600)[0].generation, 4);
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
