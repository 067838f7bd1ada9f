//! Time as qrgate reads it: the wall clock for what is stored and compared
//! with Mercado Pago (`now_millis`), a monotonic instant for what only
//! qrgate measures (`instant`), and the sleeps of every schedule.
//!
//! In production it is the system's clock. A test that checks a TTL or a
//! schedule (a sale's expiry, the reconcile window, a console session)
//! builds the app with [`Clock::adjustable`] and moves it forward with
//! [`Clock::advance`]: whatever sleeps on the clock wakes and finds the time
//! passed, while sockets, the broker and the store keep real time.
//! `tokio::time::pause` cannot do this: it stops the whole runtime's timers,
//! the broker's thread and the store's thread keep theirs, and a paused
//! runtime jumps ahead whenever it is idle waiting on them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::orders::UnixMillis;

const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A handle on the clock; cheap to clone, every clone sees the same time.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: the system clock plus an offset a
    /// test moves forward; its watchers are the sleepers to wake.
    ahead: Option<Arc<watch::Sender<Duration>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ahead {
            None => f.write_str("Clock::system"),
            Some(a) => write!(f, "Clock::adjustable(+{:?})", *a.borrow()),
        }
    }
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Clock {
        Clock { ahead: None }
    }

    /// The system's clock plus an offset that only grows, by
    /// [`Clock::advance`]. For tests.
    pub fn adjustable() -> Clock {
        Clock {
            ahead: Some(Arc::new(watch::Sender::new(Duration::ZERO))),
        }
    }

    /// Moves an adjustable clock forward by `by` and wakes every sleeper to
    /// look at it again. Time never goes back, so nothing that was due stops
    /// being due.
    ///
    /// # Panics
    /// On the system clock: moving it is a mistake in the test.
    pub fn advance(&self, by: Duration) {
        let ahead = self
            .ahead
            .as_ref()
            .expect("only an adjustable clock can be moved");
        ahead.send_modify(|a| *a += by);
    }

    fn offset(&self) -> Duration {
        self.ahead.as_ref().map_or(Duration::ZERO, |a| *a.borrow())
    }

    /// Milliseconds since the Unix epoch: what is stored, shown and compared
    /// with Mercado Pago's dates.
    pub fn now_millis(&self) -> UnixMillis {
        let ms = i64::try_from(self.offset().as_millis()).unwrap_or(i64::MAX);
        chrono::Utc::now().timestamp_millis().saturating_add(ms)
    }

    /// A monotonic instant, for what qrgate alone measures (sessions,
    /// lockouts).
    pub fn instant(&self) -> Instant {
        Instant::now() + self.offset()
    }

    /// Waits `d` on this clock (a century at most: `Instant` arithmetic
    /// must not overflow).
    pub async fn sleep(&self, d: Duration) {
        let d = d.min(CENTURY);
        match &self.ahead {
            None => tokio::time::sleep(d).await,
            Some(_) => self.sleep_until_instant(self.instant() + d).await,
        }
    }

    /// Waits until the wall clock reads `at` (at once when it is past).
    pub async fn sleep_until(&self, at: UnixMillis) {
        let left = u64::try_from(at.saturating_sub(self.now_millis())).unwrap_or(0);
        self.sleep(Duration::from_millis(left)).await;
    }

    async fn sleep_until_instant(&self, due: Instant) {
        let Some(ahead) = &self.ahead else {
            return tokio::time::sleep_until(due.into()).await;
        };
        let mut moved = ahead.subscribe();
        loop {
            let now = self.instant();
            if now >= due {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(due - now) => {}
                // The sender lives as long as this clock does.
                _ = moved.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sleep_on_an_adjustable_clock_ends_when_the_clock_passes_it() {
        let clock = Clock::adjustable();
        let before = clock.now_millis();
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_secs(3600)).await }
        });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "half an hour is not an hour");
        clock.advance(Duration::from_secs(1800));
        sleeper.await.unwrap();
        assert!(clock.now_millis() - before >= 3_600_000);
    }

    #[tokio::test]
    async fn sleeping_until_a_past_time_returns_at_once() {
        let clock = Clock::adjustable();
        clock.sleep_until(clock.now_millis() - 1000).await;
        Clock::system()
            .sleep_until(chrono::Utc::now().timestamp_millis() - 1)
            .await;
    }

    #[test]
    fn the_instant_moves_with_the_wall_clock() {
        let clock = Clock::adjustable();
        let (i, w) = (clock.instant(), clock.now_millis());
        clock.advance(Duration::from_secs(90));
        assert!(clock.instant() - i >= Duration::from_secs(90));
        assert!(clock.now_millis() - w >= 90_000);
    }

    #[test]
    #[should_panic(expected = "only an adjustable clock")]
    fn the_system_clock_cannot_be_moved() {
        Clock::system().advance(Duration::from_secs(1));
    }
}
