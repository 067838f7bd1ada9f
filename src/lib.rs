//! qrgate: Mercado Pago QR payments for fuel pumps and vending machines.
//!
//! One sale's path through the modules (docs/architecture.md walks it):
//! 1. `mqtt::inbound`: a device publishes a sale; it becomes a `Command`.
//! 2. `book` decides with the pure rules of `orders`, writes the change to
//!    the `store`, then shows it to polls and says what to tell the device.
//! 3. `http::poll`: Mercado Pago polls the POS URL; the answer was rendered
//!    by `mercadopago::poll_answer` when the POS's state changed.
//! 4. `http::notifications` → `inbox`: a notification names a merchant
//!    order; it is fetched through `mercadopago::client` and the book
//!    settles the sale with it.
//! 5. `mqtt::outbound`: what the book tells the device becomes its topic and
//!    payload.
//!
//! Beside them, `reconcile` searches for payments whose notifications never
//! came, `refunds` returns money a sale owes, `attended` places orders
//! on POS for the attended model, and `retention` moves ended sales out of
//! the live database.
//!
//! Imports point downward: `main`/`app`/`demo` wire, with `service` (the
//! service manager's notify protocol) and `healthcheck` (`qrgate health`);
//! `http`, `admin` and `mqtt` are the edges; `inbox`, `reconcile`, `refunds`, `attended` and
//! `registration` work with the book and Mercado Pago; `book` holds the live
//! state; `mercadopago`, `store`, `config`, `metrics`, `events`, `link` and
//! `telemetry` serve them; `orders` and `money` are the domain, with no I/O.

pub mod admin;
pub mod app;
pub mod attended;
pub mod book;
pub mod clock;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod events;
pub mod healthcheck;
pub mod http;
pub mod inbox;
pub mod leadership;
pub mod link;
pub mod mercadopago;
pub mod metrics;
pub mod money;
pub mod mqtt;
pub mod orders;
pub mod reconcile;
pub mod refunds;
pub mod registration;
pub mod retention;
pub mod service;
pub mod store;
pub mod telemetry;
