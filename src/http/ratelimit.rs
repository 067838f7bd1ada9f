//! A token bucket per source address for the notification endpoint. Sized
//! so Mercado Pago's real bursts (dozens a second from few addresses after an
//! outage) always pass (CONTRACT-NOTES: at least 100/s, burst 200).

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
