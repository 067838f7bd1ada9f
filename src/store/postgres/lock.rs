//! One `qrgate serve` per instance name on a PostgreSQL database. Several
//! instances share the database, each named by its MQTT client id, which is
//! also its persistent session at the broker: two processes under one name
//! would take each other's session (and its queued device messages) at
//! every reconnection.
//!
//! The guard is a session-level advisory lock (`pg_try_advisory_lock`) on
//! the name, taken on a connection of its own and held for the life of the
//! process. PostgreSQL releases it when that session ends, crash included,
//! so a holder that died never blocks a start. The `instances` row says who
//! holds the name (pid, host, start time, HTTP listen address), so a
//! refused start can name the running one.
//!
//! A restart of PostgreSQL ends the session, and the lock with it: the
//! holder takes it again as soon as PostgreSQL is back. Should another
//! qrgate have taken the name meanwhile, the holder is told (`lost`) and
//! stops.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::{pg, PgTarget};
use crate::store::{Holder, StoreError};

/// The class of the names' locks (the first half of a two-part advisory
/// key; the second is the name's hash), apart from the migrations' and the
/// leader's one-part keys.
pub const INSTANCE_LOCK: i32 = 0x7172_0002;

#[derive(Debug, thiserror::Error)]
pub enum PgLockError {
    #[error(
        "another qrgate serves the store {db} as {name:?} (pid {pid} on {host}, started {started}, HTTP on {http}); \
         give each instance its own [mqtt] client_id (QRGATE_MQTT__CLIENT_ID), or stop that one first",
        pid = .holder.pid, host = .holder.host, started = .holder.started_at, http = .holder.http_listen
    )]
    Held {
        db: String,
        name: String,
        holder: Holder,
    },
    #[error(
        "another qrgate serves the store {db} as {name:?} (it has not said who yet); \
         give each instance its own [mqtt] client_id (QRGATE_MQTT__CLIENT_ID)"
    )]
    HeldUnknown { db: String, name: String },
    #[error("cannot lock the store {db}: {error}")]
    Store { db: String, error: StoreError },
}

/// Held while qrgate serves the database under its name; dropping it ends
/// the session that holds the lock, which releases it.
#[derive(Debug)]
pub struct PgLock {
    stop: CancellationToken,
    lost: CancellationToken,
}

impl PgLock {
    /// Takes the instance name `name` on the database for this process, or
    /// names who has it.
    pub async fn take(
        target: &PgTarget,
        password: Option<&str>,
        name: &str,
        http_listen: SocketAddr,
    ) -> Result<PgLock, PgLockError> {
        let db = target.to_string();
        let store = |error| PgLockError::Store {
            db: db.clone(),
            error,
        };
        let (config, tls) = target.connector(password).map_err(store)?;
        let holder = Holder {
            pid: std::process::id(),
            host: crate::store::lock::host_name(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            http_listen: http_listen.to_string(),
        };
        let name = name.to_owned();
        let session = match attempt(&config, &tls, &name, &holder)
            .await
            .map_err(store)?
        {
            Attempt::Taken(session) => session,
            Attempt::Held(Some(holder)) => return Err(PgLockError::Held { db, name, holder }),
            Attempt::Held(None) => return Err(PgLockError::HeldUnknown { db, name }),
        };
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        tokio::spawn(hold(
            session,
            (config, tls),
            name,
            holder,
            db,
            stop.clone(),
            lost.clone(),
        ));
        Ok(PgLock { stop, lost })
    }

    /// Cancelled when the name was taken by another qrgate for good: this
    /// one must stop serving.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A session holding the lock: its client, and its connection's task,
/// which ends with the session.
type Session = (Client, tokio::task::JoinHandle<()>);

enum Attempt {
    Taken(Session),
    /// Someone else holds it (and says who, once it has written its row).
    Held(Option<Holder>),
}

/// Tries the name's lock once on a new session. Taken, the schema is
/// brought up to date and the holder row says who holds it.
async fn attempt(
    config: &Config,
    tls: &MakeRustlsConnect,
    name: &str,
    me: &Holder,
) -> Result<Attempt, StoreError> {
    let (mut client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let taken: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&INSTANCE_LOCK, &name],
        )
        .await
        .map_err(pg)?
        .get(0);
    if !taken {
        let row = match client
            .query_opt(
                "SELECT pid, host, started_at, http_listen FROM instances WHERE name = $1",
                &[&name],
            )
            .await
        {
            Ok(row) => row,
            // The holder is creating the schema right now.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
            Err(e) => return Err(pg(e)),
        };
        return Ok(Attempt::Held(row.map(|r| Holder {
            pid: u32::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            host: r.get(1),
            started_at: r.get(2),
            http_listen: r.get(3),
        })));
    }
    super::migrate::run(&mut client, super::migrate::MIGRATIONS).await?;
    client
        .execute(
            "INSERT INTO instances (name, pid, host, started_at, http_listen)
             VALUES ($5, $1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, host = excluded.host,
               started_at = excluded.started_at, http_listen = excluded.http_listen",
            &[
                &i64::from(me.pid),
                &me.host,
                &me.started_at,
                &me.http_listen,
                &name,
            ],
        )
        .await
        .map_err(pg)?;
    Ok(Attempt::Taken((client, task)))
}

/// Keeps the session open until `stop`; takes the lock again whenever the
/// session ends under it (PostgreSQL restarted, the network cut).
async fn hold(
    mut session: Session,
    (config, tls): (Config, MakeRustlsConnect),
    name: String,
    me: Holder,
    db: String,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = &mut session.1 => {}
            _ = stop.cancelled() => return,
        }
        tracing::error!(store = %db, name = %name, "the session holding this instance's name on the store ended; taking it again");
        let mut wait = Duration::from_millis(200);
        session = loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            match attempt(&config, &tls, &name, &me).await {
                Ok(Attempt::Taken(s)) => {
                    tracing::info!(store = %db, name = %name, "this instance holds its name on the store again");
                    break s;
                }
                Ok(Attempt::Held(holder)) => {
                    let by = holder.map_or_else(
                        || "another qrgate".to_owned(),
                        |h| {
                            format!(
                                "qrgate pid {} on {} (HTTP on {})",
                                h.pid, h.host, h.http_listen
                            )
                        },
                    );
                    tracing::error!(store = %db, name = %name, by = %by,
                        "another qrgate took this instance's name while this one was cut off from the store: stopping");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(store = %db, name = %name, error = %e, "cannot take this instance's name on the store again yet; retrying");
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        };
    }
}

/// Ends a session (its connection's task) when dropped.
pub(super) struct EndOnDrop(pub(super) tokio::task::AbortHandle);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
