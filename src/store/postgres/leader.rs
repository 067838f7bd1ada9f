//! The singletons' leader among the instances sharing a database: the one
//! that reconciles, expires, works the notification inbox, refunds, sweeps
//! the outbox and retains. It holds a session-level advisory lock on a
//! connection of its own; taking it moves the `leadership` term on, which
//! every write the singletons make checks (`store::fence`).
//!
//! The session runs with `idle_session_timeout` at [`LEASE`] and is pinged
//! every [`BEAT`]: a leader that stops answering (its process paused, its
//! host cut off) has its session ended by PostgreSQL within the lease, and
//! the lock with it, so another instance leads on. A leader that died is
//! replaced as soon as PostgreSQL sees its connection close. A leader that
//! comes back after its lease finds its session gone and stops leading; the
//! writes it had under way meanwhile are refused by the term.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::pg;
use crate::store::StoreError;

/// The leader's advisory lock, apart from the migrations' and the names'.
pub const LEADER_LOCK: i64 = 0x7172_6761_7465_0003;

/// How long a leader that stopped answering keeps leading.
pub const LEASE: Duration = Duration::from_secs(5);

/// How often the session is pinged: the leader's heartbeat, and a
/// follower's attempt to lead.
const BEAT: Duration = Duration::from_secs(1);

/// Tries to lead until `shutdown`; the receiver holds the term while this
/// instance leads, `None` while it does not. The first decision, leader or
/// follower, is always sent.
pub fn spawn(
    config: Config,
    tls: MakeRustlsConnect,
    name: String,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<u64>> {
    let (leading, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        let mut undecided = true;
        loop {
            let Err(ended) = tokio::select! {
                r = session(&config, &tls, &name, &leading, &mut undecided) => r,
                _ = shutdown.cancelled() => break,
            };
            if leading.send_replace(None).is_some() {
                tracing::warn!(name = %name, "this instance no longer leads the singletons");
            }
            failures = failures.saturating_add(1);
            if failures.is_power_of_two() {
                tracing::warn!(name = %name, error = %ended, attempts = failures,
                    "the leadership session ended; connecting again");
            }
            let wait = Duration::from_millis(100)
                .saturating_mul(1 << failures.min(5))
                .min(BEAT * 2);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // Leaving: the session closes with this task, and the lock with it.
        leading.send_replace(None);
    });
    rx
}

/// One session: follows until the lock is free, then leads until the
/// session fails.
async fn session(
    config: &Config,
    tls: &MakeRustlsConnect,
    name: &str,
    leading: &watch::Sender<Option<u64>>,
    undecided: &mut bool,
) -> Result<std::convert::Infallible, StoreError> {
    let (client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
    let mut connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let _abort = AbortOnDrop(connection.abort_handle());
    client
        .batch_execute(&format!("SET idle_session_timeout = {}", LEASE.as_millis()))
        .await
        .map_err(|e| {
            StoreError::Database(format!(
                "cannot bound the leader's session (PostgreSQL 14 or newer is needed): {}",
                pg(e)
            ))
        })?;
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = &mut connection => return Err(StoreError::Unavailable("the session closed".into())),
        }
        let answer = tokio::time::timeout(BEAT * 2, async {
            if leading.borrow().is_some() {
                client.simple_query("SELECT 1").await.map(|_| None)
            } else {
                let taken: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                    .await?
                    .get(0);
                if !taken {
                    return Ok(None);
                }
                let row = client
                    .query_one(
                        "UPDATE leadership SET term = term + 1, holder = $1,
                           since = (extract(epoch from now()) * 1000)::bigint
                         WHERE id = 1 RETURNING term",
                        &[&name],
                    )
                    .await?;
                Ok(Some(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
            }
        })
        .await;
        match answer {
            Ok(Ok(Some(term))) => {
                tracing::info!(name, term, "this instance leads the singletons");
                leading.send_replace(Some(term));
            }
            // A follower says so once, so that whoever waits for the
            // first decision hears it.
            Ok(Ok(None)) => {
                leading.send_if_modified(|_| std::mem::take(&mut *undecided));
            }
            Ok(Err(e)) => return Err(pg(e)),
            Err(_) => {
                return Err(StoreError::Unavailable(
                    "the leadership session stopped answering".into(),
                ))
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
