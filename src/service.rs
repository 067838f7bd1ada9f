//! The service manager's notify protocol (systemd's `Type=notify`,
//! sd_notify(3)): `READY=1` once qrgate can take sales, `STOPPING=1` when it
//! starts draining, `WATCHDOG=1` while it still answers. Without
//! `NOTIFY_SOCKET` (not under systemd: a shell, a container, the tests)
//! nothing is sent and no task is started.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::healthcheck;
use crate::store::Store;

/// How often `READY=1` waits look at `/readyz` again.
const READY_POLL: Duration = Duration::from_millis(100);

fn managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Under a service manager: tells it `READY=1` once qrgate's own `/readyz`
/// first answers 200 (the store writable, the broker connected and
/// subscribed), saying in `STATUS=` what it waits for until then; and, when
/// the unit sets `WatchdogSec=`, starts the watchdog.
pub fn spawn(http: SocketAddr, store: Arc<dyn Store>, shutdown: CancellationToken) {
    if !managed() {
        return;
    }
    let addr = healthcheck::local_addr(http);
    tokio::spawn(ready(addr, shutdown.clone()));
    if let Some(every) = sd_notify::watchdog_enabled().and_then(ping_every) {
        tokio::spawn(watchdog(addr, store, every, shutdown));
    }
}

/// `STOPPING=1`: qrgate drains from now on; systemd shows "deactivating"
/// instead of taking the exit for a crash.
pub fn stopping() {
    if managed() {
        send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }
}

async fn ready(addr: SocketAddr, shutdown: CancellationToken) {
    let client = match healthcheck::client(healthcheck::TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot tell the service manager when qrgate is ready");
            return;
        }
    };
    let mut said = String::new();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match healthcheck::ask(&client, addr, "/readyz").await {
            Ok(()) => break,
            Err(why) if why != said => {
                send(&[NotifyState::Status(&format!("waiting: {why}"))]);
                said = why;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(READY_POLL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("ready: HTTP on {addr}")),
    ]);
    tracing::info!("service manager told: ready");
}

/// Whether qrgate still answers: its listener at `addr` answers `/healthz`
/// with 200 and its store's writer answers a write within `within` (an
/// error is an answer). What the watchdog pings for.
pub async fn alive(
    client: &reqwest::Client,
    addr: SocketAddr,
    store: &dyn Store,
    within: Duration,
) -> Result<(), String> {
    healthcheck::ask(client, addr, "/healthz").await?;
    match tokio::time::timeout(within, store.check_writable()).await {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "the store did not answer within {} ms",
            within.as_millis()
        )),
    }
}

/// Half the watchdog's timeout, as sd_watchdog_enabled(3) advises; none
/// for `WATCHDOG_USEC=0`, which no unit sets and which would make a timer of
/// no period.
fn ping_every(timeout: Duration) -> Option<Duration> {
    Some(timeout / 2).filter(|every| !every.is_zero())
}

/// Pings at half the unit's `WatchdogSec`, each time only after the public
/// listener answered `/healthz` and the store's writer answered a write
/// (an error counts as an answer: a full disk is for `/readyz` to report,
/// and a restart would not cure it). A hung listener, writer or runtime
/// stops the pings, and systemd restarts qrgate.
async fn watchdog(
    addr: SocketAddr,
    store: Arc<dyn Store>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let client = match healthcheck::client(every) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot run the service watchdog");
            return;
        }
    };
    tracing::info!(every_ms = every.as_millis() as u64, "service watchdog on");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match alive(&client, addr, store.as_ref(), every).await {
            Ok(()) => {
                send(&[NotifyState::Watchdog]);
                if failing {
                    tracing::info!("service watchdog: qrgate answers again");
                    failing = false;
                }
            }
            Err(why) => {
                if !failing {
                    tracing::warn!(reason = %why, "service watchdog: not pinging, qrgate does not answer");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout_and_a_zero_timeout_starts_nothing() {
        assert_eq!(
            ping_every(Duration::from_secs(30)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(ping_every(Duration::ZERO), None);
    }
}
