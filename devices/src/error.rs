/// Everything that can go wrong while playing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The first connection to the broker failed: refused by the broker (bad
    /// credentials, not authorised), unreachable, or the state subscription was
    /// denied.
    #[error("MQTT connect failed: {0}")]
    Connect(String),
    /// Nothing suitable arrived in time; the text says what was awaited (and,
    /// for state waits, what was seen instead).
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The connection's event loop has stopped; the device cannot be used any more.
    #[error("device connection is closed")]
    Closed,
    /// The MQTT client rejected a request.
    #[error("MQTT client error: {0}")]
    Mqtt(String),
    /// A `state` payload was not a JSON object.
    #[error("invalid state message: {0}")]
    Parse(String),
}
