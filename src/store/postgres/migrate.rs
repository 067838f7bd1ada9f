//! The schema, versioned in the repository (`migrations/postgres/`) and
//! brought up to date at every start. Each migration runs once, recorded in
//! `schema_migrations`; all of a start's migrations run in one transaction
//! under a transaction-level advisory lock, so two qrgates starting at once
//! never both migrate (the second waits, then finds nothing to do), and a
//! migration that fails leaves the database as it was.

use tokio_postgres::Client;

use super::pg;
use crate::store::StoreError;

/// One step of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A new one is appended with the next version;
/// one already released is never edited.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "instances",
        sql: include_str!("../../../migrations/postgres/0002_instances.sql"),
    },
];

/// The advisory lock held while migrating (an arbitrary constant, "qrgate
/// migrate" in spirit), apart from the single-instance lock's.
pub const MIGRATION_LOCK: i64 = 0x7172_6761_7465_0001;

/// Brings the database up to `migrations`' last version; the versions it
/// applied. A database newer than this qrgate knows is refused: its schema
/// may mean something this code does not.
pub async fn run(client: &mut Client, migrations: &[Migration]) -> Result<Vec<i64>, StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    BIGINT PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;
    let done: Vec<i64> = tx
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = migrations.last().map_or(0, |m| m.version);
    if let Some(newer) = done.iter().copied().find(|v| *v > known) {
        return Err(StoreError::Database(format!(
            "the database's schema is at version {newer}, newer than this qrgate knows ({known}): \
             run the qrgate that migrated it, or a newer one"
        )));
    }
    let mut applied = Vec::new();
    for m in migrations.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Database(format!(
                "migration {:04}_{} failed: {}",
                m.version,
                m.name,
                pg(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(pg)?;
        applied.push(m.version);
    }
    tx.commit().await.map_err(pg)?;
    for version in &applied {
        tracing::info!(version, "database migrated");
    }
    Ok(applied)
}
