//! `/healthz`: the process is up; it does no I/O. `/readyz`: qrgate can
//! take sales: the store is writable, and the broker connected and
//! subscribed to the device topics. Both are served on the public and the
//! admin listener.
//!
//! Seeing that the store is writable is a write (and an fsync), so however
//! many ask, the store is probed at most once a second: one probe runs at a
//! time, whoever asks meanwhile shares its result, and a result younger than
//! a second is answered as it is. The probe runs in a task of its own, so a
//! client that hangs up does not cancel it and start another.
//!
//! The answer carries stable codes only, never the store's error text
//! (`/readyz` is reachable by anyone who reaches the listener); the error
//! goes to the log, when it starts and then at most once a minute. How
//! Mercado Pago took the access token is shown too (`mercadopago`), without
//! making qrgate unready: polls are still answered without it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use serde_json::json;
use tokio::sync::watch;

use crate::link::LinkState;
use crate::mercadopago::account_check::TokenStatus;
use crate::metrics::Metrics;
use crate::store::Store;

/// How long a probe's result is answered without probing again.
const FRESH: Duration = Duration::from_secs(1);
/// A probe that takes longer says the store is not writable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A store that stays unwritable is logged again this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What `/readyz` looks at, shared by both listeners.
#[derive(Clone)]
pub struct Readiness(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    link: Arc<LinkState>,
    token: Arc<TokenStatus>,
    metrics: Arc<Metrics>,
    probe: Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    /// When the last probe ended, and whether the store was writable.
    last: Option<(Instant, bool)>,
    /// The probe under way: its result, once there is one.
    running: Option<watch::Receiver<Option<bool>>>,
    /// When the store's failure was last logged, while it lasts.
    logged: Option<Instant>,
}

fn lock(m: &Mutex<ProbeState>) -> MutexGuard<'_, ProbeState> {
    // Plain values, each written whole: a panicking holder breaks nothing.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Readiness {
    pub fn new(
        store: Arc<dyn Store>,
        link: Arc<LinkState>,
        token: Arc<TokenStatus>,
        metrics: Arc<Metrics>,
    ) -> Readiness {
        Readiness(Arc::new(Inner {
            store,
            link,
            token,
            metrics,
            probe: Mutex::new(ProbeState::default()),
        }))
    }

    /// The access token's last check, for the console.
    pub fn token(&self) -> Arc<TokenStatus> {
        Arc::clone(&self.0.token)
    }

    /// Whether the store is writable, probed at most once a second.
    pub async fn store_writable(&self) -> bool {
        let mut result = {
            let mut state = lock(&self.0.probe);
            if let Some((at, ok)) = state.last {
                if at.elapsed() < FRESH {
                    return ok;
                }
            }
            match &state.running {
                Some(running) => running.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let inner = Arc::clone(&self.0);
                    tokio::spawn(async move {
                        let ok = inner.probe().await;
                        let _ = tx.send(Some(ok));
                    });
                    state.running = Some(rx.clone());
                    rx
                }
            }
        };
        let answer = result.wait_for(Option::is_some).await.ok().and_then(|v| *v);
        answer.unwrap_or_else(|| {
            // The probe died without an answer (only a panic does that):
            // not writable, and the next ask starts another.
            lock(&self.0.probe).running = None;
            false
        })
    }
}

impl Inner {
    async fn probe(&self) -> bool {
        self.metrics.store_probes.inc();
        let error = match tokio::time::timeout(PROBE_TIMEOUT, self.store.check_writable()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no write finished within {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        let mut state = lock(&self.probe);
        state.last = Some((Instant::now(), error.is_none()));
        state.running = None;
        match error {
            Some(error) => {
                if state.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    state.logged = Some(Instant::now());
                    tracing::error!(error, "the store is not writable: /readyz answers 503");
                }
                false
            }
            None => {
                if state.logged.take().is_some() {
                    tracing::info!("the store is writable again");
                }
                true
            }
        }
    }
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let mut reasons = Vec::new();
    if !readiness.store_writable().await {
        reasons.push("store_not_writable");
    }
    let link = &readiness.0.link;
    if !link.connected.load(std::sync::atomic::Ordering::Acquire) {
        reasons.push("broker_not_connected");
    } else if !link.ready() {
        reasons.push("not_subscribed");
    }
    let mercadopago = readiness.0.token.get().as_str();
    if reasons.is_empty() {
        HttpResponse::Ok().json(json!({ "status": "ready", "mercadopago": mercadopago }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "unready",
            "reasons": reasons,
            "mercadopago": mercadopago,
        }))
    }
}
