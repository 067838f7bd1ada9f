//! End-to-end tests: the real app, a real broker, a real SQLite file, and the
//! Mercado Pago simulator. One test binary, so the embedded broker is shared.

mod admin;
mod attended;
mod backup;
#[path = "../common/book.rs"]
mod book;
mod browser;
mod checklist;
mod console_edge;
pub mod crash;
mod device_hardening;
mod durability;
mod flow;
mod health;
mod helpers;
mod hostile_devices;
mod hostile_http;
mod instances;
mod ledger;
mod messages;
mod metrics;
mod mosquitto;
#[path = "../common/mosquitto.rs"]
mod mosquitto_tools;
mod notifications;
mod operator_view;
mod polls;
mod proxy;
mod retention;
mod security;
#[path = "../common/wait.rs"]
mod wait;
