//! The device side: the embedded broker, qrgate's own client, and the
//! device contract's topics and payloads (devices/README.md).

pub mod broker;
pub mod connection;
pub mod guard;
pub mod inbound;
pub mod ingress;
pub mod intake;
pub mod logins;
pub mod outbound;
pub mod topics;
