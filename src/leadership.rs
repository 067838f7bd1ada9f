//! The singletons: the work one instance does for all of them sharing a
//! store (reconciliation, expiry, the notification inbox, refunds,
//! retention, the outbox sweep, repeating `paid`). They run on the leader
//! only, for as long as its term lasts, each under the term
//! ([`crate::store::fence`]), and stop when it ends; on SQLite the one
//! process leads from start to stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::store::fence;

/// One singleton's work, until its stop token is cancelled.
pub type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts `singletons` at every term this instance leads and stops them
/// when it ends, until `shutdown`; `said` hears whether it leads.
pub async fn run(
    mut leading: watch::Receiver<Option<u64>>,
    singletons: impl Fn(CancellationToken) -> Vec<Work>,
    said: impl Fn(bool),
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let term = *leading.borrow_and_update();
        if let Some(term) = term {
            let stop = shutdown.child_token();
            let work = TaskTracker::new();
            for w in singletons(stop.clone()) {
                work.spawn(fence::under(term, w));
            }
            work.close();
            said(true);
            metrics.leader.set(1);
            metrics.leader_terms.inc();
            until_changed(&mut leading, &shutdown).await;
            said(false);
            stop.cancel();
            work.wait().await;
            metrics.leader.set(0);
            if *leading.borrow() != Some(term) {
                tracing::info!(term, "the singletons of this term stopped");
            }
        } else {
            until_changed(&mut leading, &shutdown).await;
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Until leadership changes, or `shutdown`. A leadership that can no longer
/// change (SQLite's) lasts until `shutdown`.
async fn until_changed(leading: &mut watch::Receiver<Option<u64>>, shutdown: &CancellationToken) {
    tokio::select! {
        r = leading.changed() => if r.is_err() { shutdown.cancelled().await },
        _ = shutdown.cancelled() => {}
    }
}
