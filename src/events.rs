//! The operator's event stream: one small record per thing that happened to
//! a sale or a POS, sent where its log line is written (the book's
//! `log_event`, rejections, presence, settlements, refunds), so the
//! console's feed and the logs say the same thing. A bounded broadcast: a
//! slow subscriber lags and is told how much it missed; the book never
//! waits for it.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::orders::{Sale, UnixMillis};

/// How many events a subscriber may fall behind before it lags.
pub const CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpEvent {
    /// Unix millis.
    pub at: UnixMillis,
    pub pos: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sale_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
    /// A stable word: the store's event name (`accepted`, `paid`,
    /// `refunded_by_operator`...), or `rejected`, `presence`,
    /// `notification`.
    pub kind: String,
    /// The log line's message, word for word.
    pub detail: String,
    /// The sale's state after the event, when it is about a sale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
}

impl OpEvent {
    pub fn of_sale(sale: &Sale, kind: &str, detail: &str) -> OpEvent {
        OpEvent {
            at: sale.updated_at,
            pos: sale.pos.to_string(),
            sale_id: Some(sale.sale_id.to_string()),
            external_reference: Some(sale.external_reference.to_string()),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
            state: Some(sale.state.as_str()),
        }
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<OpEvent>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(CAPACITY)
    }
}

impl Events {
    pub fn new(capacity: usize) -> Events {
        Events {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Never blocks; nobody listening is fine.
    pub fn emit(&self, event: OpEvent) {
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<OpEvent>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: i64) -> OpEvent {
        OpEvent {
            at: n,
            pos: "pump-1".into(),
            sale_id: None,
            external_reference: None,
            kind: "presence".into(),
            detail: "device presence".into(),
            state: None,
        }
    }

    #[test]
    fn a_slow_subscriber_lags_and_is_told_while_the_sender_never_waits() {
        let events = Events::new(4);
        let mut slow = events.subscribe();
        for n in 0..10 {
            events.emit(ev(n));
        }
        match slow.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(missed)) => assert_eq!(missed, 6),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(slow.try_recv().unwrap().at, 6);
    }
}
