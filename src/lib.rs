//! qrgate: Mercado Pago QR payments for fuel pumps and vending machines.
//!
//! One sale's path through the modules:
//! 1. `mqtt::inbound`: a device publishes a sale; it becomes a `Command`.
//! 2. `gateway` + `orders`: the order book decides (pure rules in `orders`),
//!    writes the change to the `store`, then shows it to polls.
//! 3. `http::poll`: Mercado Pago polls the POS URL; `http::answer` renders.
//! 4. `http::notifications` → `settlement`: a notification names a merchant
//!    order; it is fetched through `mercadopago::client` and settled.
//! 5. `mqtt::outbound`: the device is told its sale's state.
//!
//! Beside them, `reconcile` searches for payments whose notifications never
//! came, and `refunds` returns money for sales that could not take it.
//!
//! `app` wires them; `config` types the settings; `money` keeps amounts exact.
//! `registration` (`qrgate pos register`, `qrgate pos list`) makes the
//! configured stores and POS exist at Mercado Pago.

pub mod admin;
pub mod app;
pub mod attended;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod events;
pub mod gateway;
pub mod http;
pub mod mercadopago;
pub mod metrics;
pub mod money;
pub mod mqtt;
pub mod orders;
pub mod reconcile;
pub mod refunds;
pub mod registration;
pub mod settlement;
pub mod store;
pub mod telemetry;
