//! How device messages get from the broker to the order book without one
//! device holding up the others: a rate per POS, checked first, and a turn
//! per POS among the workers.
//!
//! A flood queued in three places: at the broker (rumqttd keeps one queue per
//! subscription filter, so every POS's `cancel` waits behind a flooding POS's
//! `cancel`s, and it sends qrgate at most 100 unacknowledged messages, which
//! qrgate must acknowledge in order), in qrgate's single event loop, and in
//! the worker a POS shares with about 1/64 of the others. A device publishing
//! 1,000 messages a second, each refused and stored, delayed another pump's
//! `cancel` by up to 15 s. So:
//!
//! - [`RateLimiter`]: in the event loop, before anything is read or stored, a
//!   token bucket per POS (`[mqtt] device_rate_per_sec`, `device_burst`). A
//!   message over it costs a hash lookup and a counter: it is refused,
//!   counted and acknowledged at once, so qrgate drains the broker as fast as a
//!   device can fill it (at the embedded broker, which takes messages faster
//!   than anyone reads them, a device fills it no faster than its login's
//!   allowance: `ingress`), and a POS can only ever queue its burst.
//! - [`Turns`]: the messages a POS may send wait in its own queue; workers take
//!   POS in turn, one message at a time, and a POS is on one worker at a time
//!   (its messages keep their order). A POS with a backlog goes to the back
//!   after each message, so another POS's message waits for at most one
//!   message of each POS ahead of it, never for a backlog.
//!
//! Both are plain data, the clock passed in; `connection` runs them.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

pub use crate::config::Rate;

/// A message over its POS's rate: refused; `tell` says whether the device is
/// told so now (at most once a second per POS, or the refusals would flood
/// its state topic in turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    OverRate { tell: bool },
}

/// One POS's bucket, in thousandths of a message so that refills need no
/// floating point.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    at_ms: u64,
    /// When the device was last told it is over its rate.
    told_ms: Option<u64>,
}

const MILLI: u64 = 1000;
/// Forget idle buckets this often.
const SWEEP_MS: u64 = 60_000;

/// Token buckets by POS. Keyed by a hash of the POS id (8 bytes, not the
/// id's string: 100,000 POS must stay cheap), only while a POS is under way:
/// a full bucket says nothing a new one would not, so idle POS are swept out.
/// Two configured POS sharing a hash would share a rate, which is harmless
/// and, with 64 bits, as good as never.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    buckets: HashMap<u64, Bucket>,
    swept_ms: u64,
}

pub fn key(pos: &str) -> u64 {
    // SipHash with fixed keys: stable in the process; POS ids are configured,
    // not chosen by devices.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pos.hash(&mut h);
    h.finish()
}

impl RateLimiter {
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            rate: Rate {
                per_sec: rate.per_sec.max(1),
                burst: rate.burst.max(1),
            },
            buckets: HashMap::new(),
            swept_ms: 0,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn capacity(&self) -> u64 {
        u64::from(self.rate.burst) * MILLI
    }

    fn refilled(&self, b: &Bucket, now_ms: u64) -> u64 {
        let grown = now_ms
            .saturating_sub(b.at_ms)
            .saturating_mul(u64::from(self.rate.per_sec));
        b.tokens.saturating_add(grown).min(self.capacity())
    }

    /// One message of the POS `key` at `now_ms` (a monotonic clock).
    pub fn admit(&mut self, key: u64, now_ms: u64) -> Admission {
        if now_ms.saturating_sub(self.swept_ms) >= SWEEP_MS {
            self.sweep(now_ms);
        }
        let capacity = self.capacity();
        let b = *self.buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            at_ms: now_ms,
            told_ms: None,
        });
        let tokens = self.refilled(&b, now_ms);
        let (admission, b) = if tokens >= MILLI {
            let b = Bucket {
                tokens: tokens - MILLI,
                at_ms: now_ms,
                ..b
            };
            (Admission::Accepted, b)
        } else {
            let tell = b.told_ms.is_none_or(|t| now_ms.saturating_sub(t) >= 1000);
            let b = Bucket {
                tokens,
                at_ms: now_ms,
                told_ms: if tell { Some(now_ms) } else { b.told_ms },
            };
            (Admission::OverRate { tell }, b)
        };
        self.buckets.insert(key, b);
        admission
    }

    /// Drops the buckets that have filled up again.
    fn sweep(&mut self, now_ms: u64) {
        self.swept_ms = now_ms;
        let capacity = self.capacity();
        let rate = self.rate.per_sec;
        self.buckets.retain(|_, b| {
            let grown = now_ms
                .saturating_sub(b.at_ms)
                .saturating_mul(u64::from(rate));
            b.tokens.saturating_add(grown) < capacity
        });
        self.buckets.shrink_to_fit();
    }

    /// POS with a bucket now (for tests and the sweep's own check).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// One queue per POS and the order in which POS take turns. A POS is either
/// waiting for its turn (in `turns`, with messages queued), on a worker, or
/// absent; never on two workers at once.
#[derive(Debug)]
pub struct Turns<K, T> {
    queues: HashMap<K, PosQueue<T>>,
    turns: VecDeque<K>,
}

#[derive(Debug)]
struct PosQueue<T> {
    items: VecDeque<T>,
    /// A worker holds one of its messages.
    busy: bool,
}

impl<K: Hash + Eq + Clone, T> Default for Turns<K, T> {
    fn default() -> Self {
        Turns {
            queues: HashMap::new(),
            turns: VecDeque::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Turns<K, T> {
    /// Queues a message; `true` when its POS became ready for a turn (one
    /// more POS a worker can take).
    pub fn push(&mut self, pos: K, item: T) -> bool {
        let q = self.queues.entry(pos.clone()).or_insert_with(|| PosQueue {
            items: VecDeque::new(),
            busy: false,
        });
        q.items.push_back(item);
        let ready = !q.busy && q.items.len() == 1;
        if ready {
            self.turns.push_back(pos);
        }
        ready
    }

    /// The next POS's next message; the POS is busy until [`Turns::done`].
    pub fn take(&mut self) -> Option<(K, T)> {
        while let Some(pos) = self.turns.pop_front() {
            if let Some(q) = self.queues.get_mut(&pos) {
                if let Some(item) = q.items.pop_front() {
                    q.busy = true;
                    return Some((pos, item));
                }
            }
        }
        None
    }

    /// The POS's message was handled; `true` when the POS is ready again (it
    /// has more queued, and goes to the back of the line).
    pub fn done(&mut self, pos: &K) -> bool {
        let Some(q) = self.queues.get_mut(pos) else {
            return false;
        };
        q.busy = false;
        if q.items.is_empty() {
            self.queues.remove(pos);
            false
        } else {
            self.turns.push_back(pos.clone());
            true
        }
    }

    /// Messages queued, of all POS.
    pub fn queued(&self) -> usize {
        self.queues.values().map(|q| q.items.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_sec: 5,
        burst: 20,
    };

    #[test]
    fn a_pos_may_send_its_burst_then_its_rate() {
        let mut l = RateLimiter::new(RATE);
        let a = key("pump-1");
        let burst: Vec<Admission> = (0..20).map(|_| l.admit(a, 1_000)).collect();
        assert!(burst.iter().all(|x| *x == Admission::Accepted));
        // The 21st at the same moment is over, and told.
        assert_eq!(l.admit(a, 1_000), Admission::OverRate { tell: true });
        // Told at most once a second.
        assert_eq!(l.admit(a, 1_100), Admission::OverRate { tell: false });
        // 5 a second: one every 200 ms (1,100 → 1,200 refilled one).
        assert_eq!(l.admit(a, 1_200), Admission::Accepted);
        assert_eq!(l.admit(a, 1_300), Admission::OverRate { tell: false });
        // 701 ms later, four more have come in (and half of a fifth).
        for _ in 0..4 {
            assert_eq!(l.admit(a, 2_001), Admission::Accepted);
        }
        // Over again, and a second after the last time: told.
        assert_eq!(l.admit(a, 2_001), Admission::OverRate { tell: true });
        // Another POS is not affected.
        assert_eq!(l.admit(key("pump-2"), 2_001), Admission::Accepted);
    }

    #[test]
    fn a_flood_gets_the_rate_and_no_more() {
        let mut l = RateLimiter::new(RATE);
        let a = key("pump-1");
        // 1,000 a second for 10 s.
        let accepted = (0..10_000u64)
            .filter(|i| l.admit(a, 5_000 + i) == Admission::Accepted)
            .count();
        assert_eq!(accepted, 20 + 5 * 10 - 1, "the burst, then 5 a second");
        let told = {
            let mut l = RateLimiter::new(RATE);
            (0..10_000u64)
                .filter(|i| l.admit(a, 5_000 + i) == Admission::OverRate { tell: true })
                .count()
        };
        assert_eq!(told, 10, "once a second");
    }

    #[test]
    fn idle_pos_are_forgotten() {
        let mut l = RateLimiter::new(RATE);
        for p in 0..1000 {
            l.admit(key(&format!("p{p}")), 0);
        }
        assert_eq!(l.tracked(), 1000);
        // A minute later their buckets are full again: swept.
        l.admit(key("p0"), 60_000);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn a_pos_with_a_backlog_waits_behind_every_other_pos_not_the_other_way() {
        let mut t: Turns<&str, u32> = Turns::default();
        // The flooding POS queued 1,000 messages; then pump-2 sends one.
        for i in 0..1000 {
            t.push("flood", i);
        }
        assert!(t.push("pump-2", 0));
        assert!(!t.push("pump-2", 1), "already waiting for its turn");
        let (pos, item) = t.take().unwrap();
        assert_eq!((pos, item), ("flood", 0));
        // While the flood's first message is handled, pump-2 is next.
        let (pos, item) = t.take().unwrap();
        assert_eq!((pos, item), ("pump-2", 0));
        assert!(t.take().is_none(), "both POS are on workers");
        assert!(t.done(&"flood"));
        assert!(t.done(&"pump-2"));
        // Turns alternate; each POS's messages keep their order.
        let order: Vec<(&str, u32)> = (0..4)
            .map(|_| {
                let (p, i) = t.take().unwrap();
                t.done(&p);
                (p, i)
            })
            .collect();
        assert_eq!(
            order,
            [("flood", 1), ("pump-2", 1), ("flood", 2), ("flood", 3)]
        );
        assert_eq!(t.queued(), 996);
    }

    #[test]
    fn a_pos_is_never_on_two_workers() {
        let mut t: Turns<&str, u32> = Turns::default();
        t.push("a", 1);
        let (p, _) = t.take().unwrap();
        // More for `a` while it is busy: not ready until done.
        assert!(!t.push("a", 2));
        assert!(t.take().is_none());
        assert!(t.done(&p));
        assert_eq!(t.take(), Some(("a", 2)));
        assert!(!t.done(&"a"));
        assert_eq!(t.queued(), 0);
        assert!(t.take().is_none());
    }
}
