//! A bridge from Technotrade's PTS-2 forecourt controller to qrgate, and a
//! PTS-2 simulator to test it against.
//!
//! A station's pumps are driven by the controller; qrgate knows POS that speak
//! its MQTT device contract (devices/README.md). The bridge is one device per
//! pump: it polls the controller over jsonPTS and speaks the contract for each
//! pump's POS, post-pay (fuel first, then the QR payment, then the controller's
//! transaction is closed).
//!
//! - [`jsonpts`]: the protocol's wire types, its error table; no I/O.
//! - [`decide`]: what the bridge does for one pump, as a function of what the
//!   controller says and what qrgate says; no I/O.
//! - [`config`]: the bridge's TOML configuration, checked whole.
//! - [`auth`]: HTTP basic and digest authentication, both sides.
//! - [`controller`]: one jsonPTS call to the controller, over HTTP(S) with a
//!   pinned certificate or over the controller's own WebSocket (remote mode).
//! - [`bridge`]: the loop that polls, decides, publishes and closes.
//! - [`sim`]: the PTS-2 simulator (HTTP(S), auth, pumps, the error table,
//!   remote mode) for tests and the demo.
//! - [`demo`] (feature `demo`): `qrgate-pts demo`, a pump paid by QR end to
//!   end against the real `qrgate` and the Mercado Pago simulator.

pub mod auth;
pub mod bridge;
pub mod config;
pub mod controller;
pub mod decide;
#[cfg(feature = "demo")]
pub mod demo;
pub mod jsonpts;
pub mod sim;
