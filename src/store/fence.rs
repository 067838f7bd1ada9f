//! The leader's term, carried by the singletons' work: a write made under a
//! term is refused by a store several instances share once another
//! instance leads ([`crate::store::StoreError::Fenced`]). Work that is not
//! the singletons' (a device message, a poll, an operator) carries none and
//! is never refused for it.
//!
//! The term rides the task (`tokio::task_local!`): the singletons start
//! inside [`under`], and a task they spawn takes it along with [`carry`].

use std::future::Future;

tokio::task_local! {
    static TERM: u64;
}

/// Runs `f` as the singletons' work of leadership term `term`.
pub async fn under<F: Future>(term: u64, f: F) -> F::Output {
    TERM.scope(term, f).await
}

/// The term the current task works under, if any.
pub fn current() -> Option<u64> {
    TERM.try_with(|t| *t).ok()
}

/// `f` under the current task's term, for a task spawned by the
/// singletons' work.
pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let term = current();
    async move {
        match term {
            Some(term) => TERM.scope(term, f).await,
            None => f.await,
        }
    }
}
