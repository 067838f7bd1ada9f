//! The order book's domain: sales, the rules that move them, and the rules
//! that decide whether a merchant order pays one. No I/O, no async, the clock
//! passed in.

pub mod ledger;
pub mod merchant_order;
pub mod rules;
pub mod sale;

#[cfg(test)]
mod invariants;

pub use rules::{
    apply, mp_external_id, record_refunds, refund_plan, refundable, settle, CannotRefund, Command,
    Given, Outcome, PollProtocol, PosConfig, PosMode, PosState, Presence, Rejection, SaleEvent,
};
pub use sale::{ExternalReference, MpId, PosId, PosKind, Sale, SaleId, SaleState, UnixMillis};
