//! The state of qrgate's connection to the broker: written by the MQTT
//! client (`mqtt::connection`), read by the health checks and the console,
//! which need not know MQTT to ask whether devices can be heard.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// Whether qrgate is connected to the broker and subscribed to the device
/// topics.
#[derive(Debug, Default)]
pub struct LinkState {
    pub connected: AtomicBool,
    pub subscribed: AtomicBool,
    /// CONNACKs received: more than one means the connection was lost.
    pub connections: AtomicU64,
    /// Woken each time qrgate has subscribed.
    pub subscribed_now: Notify,
}

impl LinkState {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.subscribed.load(Ordering::Acquire)
    }

    /// Records a subscription acknowledged by the broker.
    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Release);
        self.subscribed_now.notify_waiters();
    }

    /// Returns once qrgate is connected and subscribed.
    pub async fn until_ready(&self) {
        loop {
            let woken = self.subscribed_now.notified();
            tokio::pin!(woken);
            // Registered before the check, so a subscription in between wakes it.
            woken.as_mut().enable();
            if self.ready() {
                return;
            }
            woken.await;
        }
    }
}
