//! The device side of qrgate's MQTT contract.
//!
//! qrgate sits between Mercado Pago's QR payments and the controllers of fuel
//! pumps and vending machines. Those controllers talk to qrgate only over MQTT;
//! this crate plays such a controller: [`Device`] is one MQTT connection for one
//! point of sale (POS), and [`Pump`] and [`VendingMachine`] are small simulators
//! built on it that qrgate's integration tests and `qrgate demo` drive.
//!
//! The crate deliberately does **not** depend on the `qrgate` crate. Real devices
//! only ever see the wire contract (topics and JSON payloads, documented in this
//! crate's `README.md`), so the simulators speak exactly that and nothing more:
//! if qrgate's internal types drift away from the documented contract, tests
//! written against these simulators break instead of silently following along.
//!
//! Money and quantities are decimal strings throughout (`"798.00"`), never
//! floating point, so what a test sends is byte for byte what a device would.
//!
//! ```no_run
//! use std::time::Duration;
//! use qrgate_devices::{DeviceConfig, Pump};
//!
//! # async fn demo() -> Result<(), qrgate_devices::DeviceError> {
//! let pump = Pump::connect(DeviceConfig::new("127.0.0.1", 1883, "pump-1")).await?;
//! pump.start_fuelling("000042").await?;
//! pump.finish_fuelling("000042", "Super 95", "32.10", "798.00").await?;
//! let paid = pump.wait_paid_and_release("000042", Duration::from_secs(300)).await?;
//! println!("paid by payment {:?}", paid.payment_id);
//! # Ok(())
//! # }
//! ```

mod config;
mod device;
mod error;
mod sim;
mod state;

pub use config::DeviceConfig;
pub use device::{Device, Item, Tax};
pub use error::DeviceError;
pub use sim::{Pump, VendingMachine};
pub use state::StateMessage;

// Compiles the Rust examples of the integrator's document, so it cannot drift
// from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
