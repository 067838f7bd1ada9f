//! Logs for operators: one line per event, with the fields they search by
//! (`pos`, `sale_id`, `external_reference`, `merchant_order`, `payment`),
//! pretty or JSON. `RUST_LOG` overrides the configured filter. The embedded
//! broker's own logs are off by default (it reports every device disconnect as
//! an error); `RUST_LOG=info,rumqttd=warn` shows them.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; a second call (tests) does nothing.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},rumqttd=off,actix_server=warn", cfg.filter)))
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,actix_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
