//! Mercado Pago: its API client and its wire formats.

pub mod account_check;
pub mod client;
pub mod order_body;
pub mod poll_answer;
pub mod pos_api;
pub mod wire;
