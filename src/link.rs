//! The state of qrgate's connection to the broker: written by the MQTT
//! client (`mqtt::connection`), read by the health checks and the console,
//! which need not know MQTT to ask whether devices can be heard.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Whether qrgate is connected to the broker and subscribed to the device
/// topics.
#[derive(Debug, Default)]
pub struct LinkState {
    pub connected: AtomicBool,
    pub subscribed: AtomicBool,
    /// CONNACKs received: more than one means the connection was lost.
    pub connections: AtomicU64,
}

impl LinkState {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.subscribed.load(Ordering::Acquire)
    }
}
