//! How tests wait: for a condition to hold ([`wait_for`]) or for an event to
//! come ([`wait_for_event`]), never for a length of time. The one module of
//! waiting, shared by every test binary (`#[path]`-included: tests/api,
//! tests/binary.rs, devices/tests/mosquitto.rs).
//!
//! Every wait gives up after [`WAIT`]. That deadline is a hang guard, not a
//! timing assertion: generous so that a busy machine never trips it, it only
//! turns a test that would hang into one that fails, naming what it waited
//! for (and what it saw instead, when the probe says).
//!
//! A fixed sleep is left only where there is nothing to wait on (the pace of
//! a load, or a check that something does *not* happen), with a comment
//! saying so at the sleep.
//!
//! No test pauses tokio's clock: every in-process test talks to a broker on
//! its own thread and over sockets, and a paused clock jumps ahead whenever
//! the runtime waits on them (tried on the sale-TTL and paid-repeat tests:
//! the devices' 10 s connect timeout fired at once). A test of a TTL or a
//! schedule moves the app's own clock instead (`TestApp::clock`, a
//! `qrgate::clock::Clock::adjustable`): every TTL and schedule of qrgate
//! reads it, so the test advances it by the TTL and waits for the effect.

#![allow(dead_code)] // each test binary uses its own part of it

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// The hang guard of every wait.
pub const WAIT: Duration = Duration::from_secs(15);

/// How often a condition is looked at again.
const POLL: Duration = Duration::from_millis(10);

/// What a probe of [`wait_for`] answers: whether its condition holds, with
/// what it found.
///
/// - `bool`: `true` holds.
/// - `Option<T>`: `Some(value)` holds, and `value` is what `wait_for`
///   returns.
/// - `Result<T, E>`: `Ok(value)` holds; `Err(seen)` does not, and the last
///   `seen` is named in the failure if the condition never holds (format a
///   `Debug` value into a `String` for it).
pub trait Holds {
    type Value;
    /// The value when the condition holds, else what was seen, if anything.
    fn holds(self) -> Result<Self::Value, Option<String>>;
}

impl Holds for bool {
    type Value = ();
    fn holds(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Holds for Option<T> {
    type Value = T;
    fn holds(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Holds for Result<T, E> {
    type Value = T;
    fn holds(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Waits until `probe`'s condition holds, and returns what it found.
///
/// `probe` is asked at once, then every few milliseconds; its future may
/// await (an HTTP request, a store read). Fails, naming `what` (and the last
/// thing the probe saw instead, if it said), when the condition does not
/// hold within [`WAIT`].
pub async fn wait_for<P, F, Fut>(what: impl Display, probe: F) -> P::Value
where
    P: Holds,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    match try_wait_for(probe).await {
        Ok(value) => value,
        Err(seen) => panic!("never saw {what} within {WAIT:?}{}", last(seen)),
    }
}

/// [`wait_for`] that hands back what the probe last saw instead of failing,
/// for a caller that adds to the failure (the browser tests save a
/// screenshot of the page).
pub async fn try_wait_for<P, F, Fut>(mut probe: F) -> Result<P::Value, Option<String>>
where
    P: Holds,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    // The hang guard runs on the wall clock, whatever tokio's clock does.
    let deadline = Instant::now() + WAIT;
    let mut seen = None;
    loop {
        match probe().await.holds() {
            Ok(value) => return Ok(value),
            Err(s) => seen = s.or(seen),
        }
        if Instant::now() >= deadline {
            return Err(seen);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for `event` (a message on a channel, the end of a stream, a loop
/// over incoming packets that returns at the one wanted) and returns its
/// output. Fails, naming `what`, when it does not come within [`WAIT`].
pub async fn wait_for_event<T>(what: impl Display, event: impl Future<Output = T>) -> T {
    try_wait_for_event(event)
        .await
        .unwrap_or_else(|| panic!("never saw {what} within {WAIT:?}"))
}

/// [`wait_for_event`] that answers `None` instead of failing, for a caller
/// that names what came instead (the event future is dropped by then, so
/// what it borrowed is free again).
pub async fn try_wait_for_event<T>(event: impl Future<Output = T>) -> Option<T> {
    // On tokio's clock: the wall clock, as no test pauses time (a paused
    // clock jumps while the runtime waits on a broker's thread or a socket,
    // which is all these tests do).
    tokio::time::timeout(WAIT, event).await.ok()
}

/// [`wait_for`] for code that cannot await (a broker started from a plain
/// function): the thread sleeps between looks.
pub fn wait_for_blocking<P: Holds>(what: impl Display, mut probe: impl FnMut() -> P) -> P::Value {
    let deadline = Instant::now() + WAIT;
    let mut seen = None;
    loop {
        match probe().holds() {
            Ok(value) => return value,
            Err(s) => seen = s.or(seen),
        }
        if Instant::now() >= deadline {
            panic!("never saw {what} within {WAIT:?}{}", last(seen));
        }
        std::thread::sleep(POLL);
    }
}

fn last(seen: Option<String>) -> String {
    seen.map(|s| format!("; last seen: {s}"))
        .unwrap_or_default()
}
