//! Notification → fetch → settle. A notification only names a resource; the
//! merchant order is always fetched with our token, and the order book
//! decides. Work for the same resource never runs twice at once: a
//! notification that arrives while its resource is being fetched makes that
//! run fetch once more when it ends, so a late "closed" is never missed.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::mercadopago::client::{MpClient, MpError};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    MerchantOrder(u64),
    Payment(u64),
    /// An order of MP's Orders API (`order` notifications).
    Order(String),
}

#[derive(Clone)]
pub struct Settler {
    tx: mpsc::UnboundedSender<Resource>,
}

impl Settler {
    /// Never blocks and never drops: the queue is unbounded because each
    /// entry is a few bytes and losing one could lose a payment.
    pub fn enqueue(&self, r: Resource) {
        if let Err(e) = self.tx.send(r) {
            tracing::error!(r = ?e.0, "settlement has stopped; notification not processed");
        }
    }
}

/// Most fetches in flight at once: keeps a burst of notifications from
/// looking like an attack to Mercado Pago's rate limiter.
const CONCURRENCY: usize = 16;

pub fn spawn(
    client: MpClient,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Settler {
    let (tx, mut rx) = mpsc::unbounded_channel::<Resource>();
    let inflight: Arc<DashMap<Resource, bool>> = Arc::new(DashMap::new());
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let r = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                _ = shutdown.cancelled() => break,
            };
            // Already being fetched: ask that run to fetch again.
            if let Some(mut again) = inflight.get_mut(&r) {
                *again = true;
                continue;
            }
            inflight.insert(r.clone(), false);
            let (client, gateway, inflight, permits) = (
                client.clone(),
                Arc::clone(&gateway),
                Arc::clone(&inflight),
                Arc::clone(&permits),
            );
            inner.spawn(async move {
                let Ok(_permit) = permits.acquire().await else { return };
                loop {
                    let result = process(&client, &gateway, r.clone()).await;
                    let label = if result.is_ok() { "processed" } else { "failed" };
                    gateway.metrics().notifications.with_label_values(&[label]).inc();
                    if let Err(e) = result {
                        tracing::error!(?r, error = %e, "notification could not be processed; Mercado Pago re-sends it, and reconciliation looks again");
                    }
                    // Fetch again if another notification came meanwhile.
                    let again = inflight
                        .remove_if(&r, |_, again| !*again)
                        .is_none();
                    if !again {
                        break;
                    }
                    if let Some(mut a) = inflight.get_mut(&r) {
                        *a = false;
                    }
                }
            });
        }
    });
    Settler { tx }
}

#[derive(Debug, thiserror::Error)]
enum ProcessError {
    #[error(transparent)]
    Mp(#[from] MpError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
}

async fn process(client: &MpClient, gateway: &Gateway, r: Resource) -> Result<(), ProcessError> {
    let ids = match r {
        Resource::Order(id) => {
            let (order, raw) = client.order(&id).await?;
            let status = order.status.clone().unwrap_or_default();
            // The sale's POS names the currency (one account, one currency).
            let currency = order
                .external_reference
                .as_deref()
                .and_then(|r| crate::orders::ExternalReference::parse(r).ok())
                .and_then(|r| r.pos_id())
                .and_then(|p| gateway.pos_config(p.as_str()).map(|c| c.currency.code()))
                .unwrap_or("");
            match order.facts(gateway.collector_id(), currency) {
                Some(facts) => {
                    gateway.settle(&facts, raw, &status).await?;
                }
                None => {
                    tracing::warn!(order = %id, "the Orders API answered an order without a usable id; nothing settled")
                }
            }
            return Ok(());
        }
        Resource::MerchantOrder(id) => vec![id],
        Resource::Payment(id) => {
            let p = client.payment(id).await?;
            match (p.merchant_order_id(), p.external_reference.as_deref()) {
                (Some(mo), _) => vec![mo],
                (None, Some(reference)) => {
                    let found = client.search_merchant_orders(reference).await?;
                    return settle_all(gateway, found).await;
                }
                (None, None) => {
                    tracing::warn!(
                        payment = id,
                        "payment names no merchant order and no reference; nothing to settle"
                    );
                    vec![]
                }
            }
        }
    };
    for id in ids {
        let (mo, raw) = client.merchant_order(id).await?;
        let status = mo.status.clone().unwrap_or_default();
        gateway.settle(&mo.facts(), raw, &status).await?;
    }
    Ok(())
}

async fn settle_all(
    gateway: &Gateway,
    found: Vec<(crate::mercadopago::wire::MerchantOrder, String)>,
) -> Result<(), ProcessError> {
    for (mo, raw) in found {
        let status = mo.status.clone().unwrap_or_default();
        gateway.settle(&mo.facts(), raw, &status).await?;
    }
    Ok(())
}
