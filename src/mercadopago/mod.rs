//! Mercado Pago: its API client, its wire formats, and the simulator that
//! stands in for it in tests and `qrgate demo`.

pub mod client;
pub mod order_body;
pub mod poll_answer;
pub mod pos_api;
pub mod simulator;
pub mod wire;
