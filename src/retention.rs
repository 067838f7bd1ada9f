//! Retention: ended sales leave the live database `[store] retain_days`
//! after they ended, with their timeline, ledger and merchant orders; with
//! `[store] archive = true` they are first written to a dated JSON Lines
//! file beside the database. Refused device messages older than that go
//! too, and the short-lived records (done inbox entries, answered refund
//! requests, searches of paid sales) after [`KEEP_RECORDS`].
//!
//! A pass runs at start and then periodically, in pages: each page is one
//! read and, per chunk of sales, one write of the store's writer, so sales
//! being taken meanwhile wait for a few milliseconds at most. What "ended"
//! means is [`ended`], written down in docs/decisions.md ("Retention").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{OrdersConfig, StoreConfig};
use crate::orders::{ExternalReference, SaleState};
use crate::store::{RetentionCandidate, RetentionPage, Store, StoreError};

/// How long done inbox entries, answered refund requests and searches of
/// paid sales are kept.
pub const KEEP_RECORDS: i64 = 48 * 3600 * 1000;

/// Candidates read per page.
const PAGE: usize = 500;
/// Sales removed per write.
const CHUNK: usize = 50;
/// After each write a pass waits as long as the write took, and at least
/// this: it takes at most half of the writer's time, so sales being taken
/// wait a write's length at most, and it still removes sales faster than a
/// busy station makes them (a fixed 20 ms after writes of 10 capped it at
/// 500 a second, behind a mix making 800).
const MIN_BREATHE: Duration = Duration::from_millis(5);
/// Refused device messages removed per write.
const REJECTIONS_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the archive {path}: {reason}")]
    Archive { path: String, reason: String },
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Sales removed from the live database.
    pub sales: usize,
    /// Old sales kept because they have not ended (see [`ended`]).
    pub kept: usize,
    /// Refused device messages removed.
    pub rejections: usize,
    /// The archive file written, if any.
    pub archive: Option<PathBuf>,
}

/// How retention runs, from the configuration.
#[derive(Debug, Clone)]
pub struct Retention {
    retain: Duration,
    /// The directory of archive files, when archiving.
    archive: Option<PathBuf>,
    reconcile_window: Duration,
    rechecks: u32,
}

impl Retention {
    pub fn new(store: &StoreConfig, orders: &OrdersConfig) -> Retention {
        let dir = store
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Retention {
            retain: store.retain,
            archive: store.archive.then(|| dir.join("archive")),
            reconcile_window: Duration::from_secs(orders.reconcile_window_secs),
            rechecks: u32::try_from(orders.recheck_after_secs.len()).unwrap_or(u32::MAX),
        }
    }

    /// How often a pass runs: often enough that nothing stays much longer
    /// than it should, at most hourly, at least 10 s apart.
    pub fn every(&self) -> Duration {
        (self.retain / 8).clamp(Duration::from_secs(10), Duration::from_secs(3600))
    }

    /// One pass as of `now` (unix millis): the clock is the caller's, so a
    /// test can stand 90 days ahead.
    pub async fn pass(&self, store: &dyn Store, now: i64) -> Result<Swept, RetentionError> {
        let mut swept = Swept::default();
        let before = now.saturating_sub(millis(self.retain));
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let page = store
                .retention_candidates(RetentionPage {
                    ended_before: before,
                    after,
                    limit: PAGE,
                    rechecks: self.rechecks,
                    with_records: self.archive.is_some(),
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            let full = page.len() == PAGE;
            let (leaving, staying): (Vec<_>, Vec<_>) = page
                .into_iter()
                .partition(|c| ended(c, now, self.reconcile_window));
            swept.kept += staying.len();
            if !leaving.is_empty() {
                if let Some(dir) = &self.archive {
                    swept.archive = Some(archive(dir, &leaving, now).await?);
                }
                for chunk in leaving.chunks(CHUNK) {
                    let sales = chunk
                        .iter()
                        .map(|c| (c.sale.external_reference.clone(), c.sale.updated_at))
                        .collect::<Vec<(ExternalReference, i64)>>();
                    let started = std::time::Instant::now();
                    swept.sales += store.forget_sales(sales).await?;
                    breathe(started.elapsed()).await;
                }
            }
            if !full {
                break;
            }
        }
        loop {
            let started = std::time::Instant::now();
            let n = store.forget_rejections(before, REJECTIONS_CHUNK).await?;
            swept.rejections += n;
            if n < REJECTIONS_CHUNK {
                break;
            }
            breathe(started.elapsed()).await;
        }
        store.prune(now.saturating_sub(KEEP_RECORDS)).await?;
        Ok(swept)
    }
}

/// The pause after a write that took `took`: see [`MIN_BREATHE`].
async fn breathe(took: Duration) {
    tokio::time::sleep(took.max(MIN_BREATHE)).await;
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a sale has ended for retention: nothing can still happen to it
/// and nobody still needs it live.
///
/// - its state is final: not `in_process` or `pending`;
/// - its ledger holds nothing and owes nothing (`refund_due` clear, no
///   refund of qrgate's own pending);
/// - it is not paid and undelivered;
/// - no operator's refund of it is under way (sent, no final answer);
/// - no search is still due: reconciliation of a sale served (or placed)
///   and not closed, for `[orders] reconcile_window_secs` after it was
///   handed to Mercado Pago; the searches of a paid sale at
///   `[orders] recheck_after_secs`;
/// - it is not its POS's latest sale (the device's retained state).
pub fn ended(c: &RetentionCandidate, now: i64, reconcile_window: Duration) -> bool {
    let sale = &c.sale;
    let final_state = !matches!(sale.state, SaleState::InProcess | SaleState::Pending);
    let settled_ledger =
        sale.ledger.owed().is_zero() && !sale.ledger.payments().iter().any(|p| p.held);
    let searched = sale.settled.is_some()
        || sale
            .handed_at()
            .is_none_or(|at| at < now.saturating_sub(millis(reconcile_window)));
    final_state
        && settled_ledger
        && !sale.is_paid_undelivered()
        && !c.refunding
        && searched
        && !c.rechecking
        && c.superseded
}

/// Appends one line per sale to the day's archive file and syncs it; the
/// sales are removed only after this returns.
async fn archive(
    dir: &Path,
    leaving: &[RetentionCandidate],
    now: i64,
) -> Result<PathBuf, RetentionError> {
    let day = chrono::DateTime::from_timestamp_millis(now)
        .unwrap_or_default()
        .format("%Y-%m-%d");
    let path = dir.join(format!("sales-{day}.jsonl"));
    let mut text = String::new();
    for c in leaving {
        let mut line = c.record.clone().unwrap_or_else(|| serde_json::json!({}));
        line["sale"] = serde_json::to_value(&c.sale).unwrap_or_default();
        line["archived_at"] = now.into();
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let (dir, at) = (dir.to_owned(), path.clone());
    tokio::task::spawn_blocking(move || append_synced(&dir, &at, text.as_bytes()))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| RetentionError::Archive {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(path)
}

fn append_synced(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let new_dir = !dir.exists();
    std::fs::create_dir_all(dir)?;
    let new_file = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // A new name is durable once its directory is.
    if new_file {
        std::fs::File::open(dir)?.sync_all()?;
    }
    if new_dir {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Runs a pass at start and then every [`Retention::every`] of `clock`,
/// until shutdown.
pub async fn run(
    store: Arc<dyn Store>,
    retention: Retention,
    clock: Clock,
    shutdown: CancellationToken,
) {
    loop {
        match retention.pass(store.as_ref(), clock.now_millis()).await {
            Ok(s) if s.sales > 0 || s.rejections > 0 => tracing::info!(
                sales = s.sales,
                kept = s.kept,
                rejections = s.rejections,
                archive = s.archive.map(|p| p.display().to_string()),
                "old sales removed from the store"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; retried at the next"),
        }
        tokio::select! {
            _ = clock.sleep(retention.every()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
