//! A token bucket per source address for the notification endpoint. Sized
//! so Mercado Pago's real bursts (dozens a second from few addresses after an
//! outage) always pass: at least 100/s per address, burst 200
//! (docs/decisions.md, "Notifications").
//!
//! [`WarnLimiter`]: the same idea for the log. A warning that a stranger can
//! cause (a wrong poll key, a malformed request, a bad signature...) is written
//! a few times per source and kind, then counted: one client must not be able
//! to fill the disk through qrgate's log.

use std::net::IpAddr;
use std::time::Instant;

use dashmap::DashMap;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: DashMap<IpAddr, (f64, Instant)>,
}

/// Above this many addresses, idle ones are forgotten.
const MAX_ADDRESSES: usize = 10_000;

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst),
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `ip`; `false` when its bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() > MAX_ADDRESSES {
            let burst = self.burst;
            let rate = self.rate;
            // A bucket that refilled completely holds no information.
            self.buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let mut entry = self.buckets.entry(ip).or_insert((self.burst, now));
        let (tokens, last) = entry.value_mut();
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Warnings of one kind from one source written in a row before counting starts.
const WARN_BURST: f64 = 10.0;
/// Then one more every 6 seconds (ten a minute).
const WARN_PER_SEC: f64 = 1.0 / 6.0;
/// Sources tracked at most; beyond, new sources share one entry per kind.
const MAX_WARN_SOURCES: usize = 10_000;

struct WarnEntry {
    tokens: f64,
    last: Instant,
    /// Warnings not written since the last one that was.
    suppressed: u64,
}

/// Rate limits warnings per (source, kind); see the module's doc.
#[derive(Default)]
pub struct WarnLimiter {
    entries: DashMap<(IpAddr, &'static str), WarnEntry>,
}

/// What [`WarnLimiter::drain`] reports for one source and kind.
#[derive(Debug, PartialEq, Eq)]
pub struct Suppressed {
    pub source: IpAddr,
    pub kind: &'static str,
    pub count: u64,
}

impl WarnLimiter {
    pub fn new() -> WarnLimiter {
        WarnLimiter::default()
    }

    /// `Some(n)` when a warning of `kind` caused by `source` may be written
    /// now, `n` being how many were suppressed before it (write it in the
    /// line); `None` when this one is to be counted instead.
    pub fn allow(&self, source: Option<IpAddr>, kind: &'static str, now: Instant) -> Option<u64> {
        let mut source = source.map_or(IpAddr::from([0, 0, 0, 0]), super::edge::source_key);
        if self.entries.len() >= MAX_WARN_SOURCES && !self.entries.contains_key(&(source, kind)) {
            self.prune(now);
            if self.entries.len() >= MAX_WARN_SOURCES {
                // Everybody new shares the unspecified address's entry.
                source = IpAddr::from([0, 0, 0, 0]);
            }
        }
        let mut e = self.entries.entry((source, kind)).or_insert(WarnEntry {
            tokens: WARN_BURST,
            last: now,
            suppressed: 0,
        });
        let refill = now.saturating_duration_since(e.last).as_secs_f64() * WARN_PER_SEC;
        e.tokens = (e.tokens + refill).min(WARN_BURST);
        e.last = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            Some(std::mem::take(&mut e.suppressed))
        } else {
            e.suppressed += 1;
            None
        }
    }

    /// Takes every count of suppressed warnings (to report them when the
    /// flood is over, not only with the next warning), and forgets sources
    /// that have been quiet long enough to be back to a full burst.
    pub fn drain(&self, now: Instant) -> Vec<Suppressed> {
        let mut out = Vec::new();
        for mut e in self.entries.iter_mut() {
            if e.suppressed > 0 {
                out.push(Suppressed {
                    source: e.key().0,
                    kind: e.key().1,
                    count: std::mem::take(&mut e.suppressed),
                });
            }
        }
        self.prune(now);
        out
    }

    fn prune(&self, now: Instant) {
        self.entries.retain(|_, e| {
            e.suppressed > 0
                || e.tokens + now.saturating_duration_since(e.last).as_secs_f64() * WARN_PER_SEC
                    < WARN_BURST
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn warnings_pass_a_burst_per_source_and_kind_then_are_counted() {
        let w = WarnLimiter::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..10).all(|_| w.allow(Some(a), "poll_key", t0) == Some(0)));
        assert_eq!(w.allow(Some(a), "poll_key", t0), None);
        assert_eq!(w.allow(Some(a), "poll_key", t0), None);
        assert_eq!(w.allow(Some(a), "malformed", t0), Some(0), "another kind");
        assert_eq!(w.allow(Some(b), "poll_key", t0), Some(0), "another source");
        // Six seconds later one more passes and says what was not written.
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(w.allow(Some(a), "poll_key", t1), Some(2));
        assert_eq!(w.allow(Some(a), "poll_key", t1), None);
        assert_eq!(
            w.drain(t1),
            vec![Suppressed {
                source: a,
                kind: "poll_key",
                count: 1
            }]
        );
        assert!(w.drain(t1).is_empty(), "reported once");
        // A quiet source is forgotten once its burst is whole again.
        w.drain(t1 + Duration::from_secs(600));
        assert!(w.entries.is_empty());
    }

    #[test]
    fn an_ipv6_source_is_its_64_and_sources_beyond_the_cap_share_an_entry() {
        let w = WarnLimiter::new();
        let t0 = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..10 {
            w.allow(Some(one), "k", t0);
        }
        assert_eq!(w.allow(Some(same_64), "k", t0), None);
        for i in 0..MAX_WARN_SOURCES as u32 + 5 {
            w.allow(Some(IpAddr::from(i.to_be_bytes())), "flood", t0);
        }
        assert!(w.entries.len() <= MAX_WARN_SOURCES + 1);
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_address() {
        let l = RateLimiter::new(100, 200);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..200).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0), "another address has its own bucket");
        // 100 ms later, 10 more.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| l.allow(a, t1)).count(), 10);
    }
}
