//! A bridge from Technotrade's PTS-2 forecourt controller to qrgate, and a
//! PTS-2 simulator to test it against.
//!
//! - [`jsonpts`]: the protocol's wire types, its error table; no I/O.
//! - [`decide`]: what the bridge does for one pump, as a function of what the
//!   controller says and what qrgate says; no I/O.

pub mod decide;
pub mod jsonpts;
