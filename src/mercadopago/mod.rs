//! Mercado Pago: its API client and its wire formats.

pub mod client;
pub mod order_body;
pub mod pos_api;
pub mod wire;
