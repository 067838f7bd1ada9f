//! A sale and the names it goes by: the POS it belongs to, the device's
//! `sale_id`, and our `external_reference`, the one Mercado Pago sees.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::ledger::Ledger;
use crate::money::{Amount, Currency};

/// Milliseconds since the Unix epoch. The domain takes the clock as input.
pub type UnixMillis = i64;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The external POS id: letters, digits, `-` and `_`, at most 40 characters.
/// An id that breaks its rules: what it is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The POS id as given, cut to 64 characters.
    #[error("POS id {0:?} must be 1 to {max} letters, digits, '-' or '_'", max = PosId::MAX_LEN)]
    Pos(String),
    #[error("sale_id must be 1 to {max} letters, digits, '-', '_' or '.'", max = SaleId::MAX_LEN)]
    Sale,
    #[error("external_reference must be 1 to {max} of [A-Za-z0-9_-]", max = ExternalReference::MAX_LEN)]
    ExternalReference,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PosId(String);

impl PosId {
    pub const MAX_LEN: usize = 40;

    pub fn parse(s: &str) -> Result<PosId, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(is_id_char) {
            return Err(IdError::Pos(s.chars().take(64).collect()));
        }
        Ok(PosId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PosId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PosId::parse(&s)
    }
}

impl From<PosId> for String {
    fn from(p: PosId) -> String {
        p.0
    }
}

impl fmt::Display for PosId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The device's own id for a sale. Devices reuse them after a reset, so it
/// identifies a sale only together with the POS and only for a while.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SaleId(String);

impl SaleId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<SaleId, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(|c| is_id_char(c) || c == '.')
        {
            return Err(IdError::Sale);
        }
        Ok(SaleId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SaleId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SaleId::parse(&s)
    }
}

impl From<SaleId> for String {
    fn from(p: SaleId) -> String {
        p.0
    }
}

impl fmt::Display for SaleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Our id for a sale at Mercado Pago: unique forever, at most 64 characters of
/// `[A-Za-z0-9_-]` (what MP's Orders API requires), and free of personal data:
/// the POS id, the acceptance time and a random tail.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExternalReference(String);

impl ExternalReference {
    pub const MAX_LEN: usize = 64;

    /// `{pos}-{millis base 36}{random base 36}`; at most 40 + 1 + 9 + 6 chars.
    pub fn generate(pos: &PosId, now: UnixMillis, random: u32) -> ExternalReference {
        let mut s = String::with_capacity(56);
        s.push_str(pos.as_str());
        s.push('-');
        push_base36(&mut s, now.max(0) as u64, 9);
        push_base36(&mut s, u64::from(random) % 36u64.pow(6), 6);
        ExternalReference(s)
    }

    pub fn parse(s: &str) -> Result<ExternalReference, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(is_id_char) {
            return Err(IdError::ExternalReference);
        }
        Ok(ExternalReference(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The POS a reference of ours was made for: everything before its
    /// last `-` (the tail is base 36, without dashes). `None` for a
    /// reference that cannot be ours.
    pub fn pos_id(&self) -> Option<PosId> {
        let (pos, tail) = self.0.rsplit_once('-')?;
        (tail.len() == 15).then(|| PosId::parse(pos).ok()).flatten()
    }
}

fn push_base36(out: &mut String, mut n: u64, width: usize) {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = [b'0'; 16];
    for slot in buf.iter_mut().rev().take(width) {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    out.extend(buf[16 - width..].iter().map(|&b| b as char));
}

impl TryFrom<String> for ExternalReference {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ExternalReference::parse(&s)
    }
}

impl From<ExternalReference> for String {
    fn from(p: ExternalReference) -> String {
        p.0
    }
}

impl fmt::Display for ExternalReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a POS sells, which decides how presence affects payment: an offline
/// pump's pending sale stays payable, an offline machine's does not
/// (docs/decisions.md, "Presence and polls").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosKind {
    /// Post-pay: the fuel is in the tank before the customer pays.
    Fuel,
    /// Pre-pay: the machine hands out goods after payment.
    Vending,
}

impl PosKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PosKind::Fuel => "fuel",
            PosKind::Vending => "vending",
        }
    }
}

/// One line of a sale, checked and totalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_measure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Taxes Mercado Pago shows per item (Colombia's IVA), passed on as sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taxes: Vec<Tax>,
    /// `quantity × unit_price` rounded to the currency's decimals.
    pub total: Decimal,
}

/// A tax on an item, as Mercado Pago spells it: `{"type": "IVA", "value": 19}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tax {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Decimal,
}

/// Where a sale is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleState {
    /// The device said a sale started; the amount is not known yet.
    InProcess,
    /// The amount is known and Mercado Pago may collect it.
    Pending,
    Paid,
    Cancelled,
    Expired,
    /// Mercado Pago refused the attended order for it: final.
    Rejected,
    /// Paid, then refunded in full by the operator.
    Refunded,
    /// Paid, then refunded in part by the operator; more may follow.
    PartiallyRefunded,
}

impl SaleState {
    pub fn as_str(self) -> &'static str {
        match self {
            SaleState::InProcess => "in_process",
            SaleState::Pending => "pending",
            SaleState::Paid => "paid",
            SaleState::Cancelled => "cancelled",
            SaleState::Expired => "expired",
            SaleState::Rejected => "rejected",
            SaleState::Refunded => "refunded",
            SaleState::PartiallyRefunded => "partially_refunded",
        }
    }

    /// Only these hold the POS: one sale in flight per POS.
    pub fn is_busy(self) -> bool {
        matches!(self, SaleState::InProcess | SaleState::Pending)
    }
}

/// An id Mercado Pago gives a merchant order, a payment, a refund or an
/// order: a number in the classic APIs (sent as a JSON number, sometimes as
/// a string of digits), text in the Orders API (`ORD01…`, `PAY01…`). Kept
/// exactly, written back the way it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MpId {
    Num(u64),
    Text(String),
}

impl MpId {
    /// Digits become a number; letters, digits, `-` and `_` stay text.
    pub fn parse(s: &str) -> Option<MpId> {
        let s = s.trim();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return None;
        }
        Some(
            s.parse::<u64>()
                .map_or_else(|_| MpId::Text(s.to_owned()), MpId::Num),
        )
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MpId::Num(n) => Some(*n),
            MpId::Text(_) => None,
        }
    }
}

impl From<u64> for MpId {
    fn from(n: u64) -> MpId {
        MpId::Num(n)
    }
}

impl PartialEq<u64> for MpId {
    fn eq(&self, other: &u64) -> bool {
        self.as_u64() == Some(*other)
    }
}

impl fmt::Display for MpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MpId::Num(n) => write!(f, "{n}"),
            MpId::Text(s) => f.write_str(s),
        }
    }
}

impl Serialize for MpId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MpId::Num(n) => s.serialize_u64(*n),
            MpId::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for MpId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MpId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(MpId::Num(n)),
            Raw::Text(t) => MpId::parse(&t)
                .ok_or_else(|| serde::de::Error::custom(format!("not an id: {t:.32}"))),
        }
    }
}

/// The reason code of a sale whose attended order expired at Mercado Pago
/// and could not be placed again: its device is told `rejected` with it.
pub const ORDER_EXPIRED: &str = "mp_order_expired";

/// How a sale was closed: the merchant order that paid it and the payment
/// that reached its total (the one a device is told).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    pub payment_id: MpId,
    /// The merchant order, or the Orders API's order, that was paid.
    pub merchant_order: MpId,
    /// The whole amounts of the payments kept, which may exceed the total
    /// (an overpayment, owed back).
    pub paid: Decimal,
    pub at: UnixMillis,
}

/// Why money must go back to the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    /// Paid after the sale was cancelled or expired.
    LatePayment,
    /// Paid again after the sale was paid, or a payment the sale did not
    /// need (another merchant order paid it).
    DoublePayment,
    /// The device reported it could not deliver a paid sale.
    DeliveryFailed,
    /// What the payment that reached the total carried beyond it.
    Overpayment,
    /// A refund the operator asked for that did not return it all (found
    /// when an older store was given its ledger).
    OperatorRefund,
}

impl RefundReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundReason::LatePayment => "late_payment",
            RefundReason::DoublePayment => "double_payment",
            RefundReason::DeliveryFailed => "delivery_failed",
            RefundReason::Overpayment => "overpayment",
            RefundReason::OperatorRefund => "operator_refund",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    pub external_reference: ExternalReference,
    pub pos: PosId,
    pub sale_id: SaleId,
    pub currency: Currency,
    pub state: SaleState,
    /// Empty while `InProcess`.
    pub lines: Vec<Line>,
    /// `None` while `InProcess`.
    pub amount: Option<Decimal>,
    pub accepted_at: UnixMillis,
    /// When the sale expires if nobody pays; `None` never.
    pub expires_at: Option<UnixMillis>,
    /// First time a poll handed the order to Mercado Pago.
    #[serde(default)]
    pub served_at: Option<UnixMillis>,
    #[serde(default)]
    pub settled: Option<Closing>,
    #[serde(default)]
    pub delivered_at: Option<UnixMillis>,
    /// When Mercado Pago accepted the attended order placed for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_at: Option<UnixMillis>,
    /// The Orders API's order placed for it (attended POS on that API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mp_order: Option<String>,
    /// Why Mercado Pago refused it, in its own words (state `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<String>,
    /// Every approved payment reported for it and what became of each.
    #[serde(default, skip_serializing_if = "Ledger::is_empty")]
    pub ledger: Ledger,
    pub updated_at: UnixMillis,
}

impl Sale {
    /// When Mercado Pago first had this sale to collect: served to a poll,
    /// or placed on an attended POS. Reconciliation counts from here.
    pub fn handed_at(&self) -> Option<UnixMillis> {
        self.served_at.or(self.placed_at)
    }

    pub fn total(&self) -> Option<Amount> {
        self.amount.map(|a| Amount::new(a, self.currency))
    }

    /// Paid, and the device has not confirmed it acted on it yet.
    pub fn is_paid_undelivered(&self) -> bool {
        self.state == SaleState::Paid && self.delivered_at.is_none()
    }

    /// What the operator has refunded of what the sale kept.
    pub fn refunded_total(&self) -> Decimal {
        self.ledger.refunded_kept()
    }

    /// Whether the sale can still be paid: its payments are held until it
    /// closes or ends.
    pub fn is_payable(&self) -> bool {
        self.state.is_busy()
    }
}

// serde for Currency lives here so the store can keep sales as JSON.
impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pos_ids_are_letters_digits_dash_underscore_up_to_40() {
        assert!(PosId::parse("pump-1").is_ok());
        assert!(PosId::parse("vending_07").is_ok());
        assert!(PosId::parse("").is_err());
        assert!(PosId::parse("pump 1").is_err());
        assert!(PosId::parse("pump/1").is_err());
        assert!(PosId::parse(&"a".repeat(41)).is_err());
        assert!(PosId::parse(&"a".repeat(40)).is_ok());
    }

    #[test]
    fn external_references_fit_mercado_pagos_rules_even_for_the_longest_pos_id() {
        let pos = PosId::parse(&"p".repeat(40)).unwrap();
        let r = ExternalReference::generate(&pos, 4_102_444_800_000, u32::MAX);
        assert!(r.as_str().len() <= 64, "{}", r);
        assert!(ExternalReference::parse(r.as_str()).is_ok());
        let a = ExternalReference::generate(&pos, 1, 1);
        let b = ExternalReference::generate(&pos, 1, 2);
        assert_ne!(a, b);
        assert_eq!(r.pos_id(), Some(pos));
        let dashed = PosId::parse("st-01-pump-3").unwrap();
        let r = ExternalReference::generate(&dashed, 1_795_000_000_000, 77);
        assert_eq!(r.pos_id(), Some(dashed));
        assert_eq!(
            ExternalReference::parse("someone-elses-sale")
                .unwrap()
                .pos_id(),
            None
        );
    }

    #[test]
    fn sale_ids_are_bounded() {
        assert!(SaleId::parse("000042").is_ok());
        assert!(SaleId::parse("2026.11.26-7").is_ok());
        assert!(SaleId::parse("").is_err());
        assert!(SaleId::parse("a b").is_err());
        assert!(SaleId::parse(&"1".repeat(65)).is_err());
    }
}
