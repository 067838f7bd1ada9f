//! The payment ledger of one sale: every approved payment Mercado Pago
//! reported for it, once by its id, and what became of it.
//!
//! A payment is first *held* while its sale can still be paid (an approved
//! payment of a merchant order that is not closed yet may still be joined by
//! the rest). When the sale closes, the closing merchant order's payments, in
//! the order Mercado Pago approved them, are *kept* until they reach the
//! total; what the payment that reaches it carries beyond the total and every
//! other payment are *owed* back. When the sale ends unpaid, what it holds is
//! owed back. A refund settles what is owed, or returns part of what was kept
//! (the operator's refund of a paid sale). For every payment no longer held:
//! `amount = kept + owed + refunded`.
//!
//! Pure data and rules: the caller stores the sale before acting on it.

use std::cmp::Ordering;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::sale::{MpId, RefundReason, UnixMillis};
use crate::money::{Amount, Currency};

/// An approved payment as Mercado Pago reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    pub id: MpId,
    /// The merchant order (or Orders API order) that carries it.
    pub merchant_order: MpId,
    pub amount: Decimal,
    /// Mercado Pago's `date_approved`, when the report had it.
    pub approved_at: Option<UnixMillis>,
}

/// Money owed back from one payment, and the refund that returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owed {
    pub amount: Decimal,
    pub reason: RefundReason,
    /// Whether qrgate refunds it itself: `[orders] auto_refund` when it came
    /// due, so turning the setting on later refunds nothing by surprise.
    pub auto: bool,
    pub at: UnixMillis,
    /// The refund that returned it; `None` while it is owed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<MpId>,
}

impl Owed {
    pub fn is_open(&self) -> bool {
        self.refund.is_none()
    }
}

/// What a refund returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundOf {
    /// Part of what the sale kept: the operator refunded a paid sale.
    Kept,
    /// Money owed back, for this reason.
    Owed(RefundReason),
}

/// A refund Mercado Pago made of one payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: MpId,
    pub amount: Decimal,
    pub at: UnixMillis,
    /// `qrgate` for its own refunds; `token` or `console` for the operator's.
    pub by: String,
    pub of: RefundOf,
    /// The operator's request it belongs to (its key), when one asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// One approved payment of a sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPayment {
    pub id: MpId,
    pub merchant_order: MpId,
    pub amount: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<UnixMillis>,
    pub seen_at: UnixMillis,
    /// Waiting for its sale to close or end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// What of it pays the sale.
    #[serde(default)]
    pub kept: Decimal,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed: Vec<Owed>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refunds: Vec<Refund>,
}

impl LedgerPayment {
    fn new(p: &Approved, now: UnixMillis) -> LedgerPayment {
        LedgerPayment {
            id: p.id.clone(),
            merchant_order: p.merchant_order.clone(),
            amount: p.amount,
            approved_at: p.approved_at,
            seen_at: now,
            held: true,
            kept: Decimal::ZERO,
            owed: Vec::new(),
            refunds: Vec::new(),
        }
    }

    /// Owed and not yet refunded.
    pub fn owed_open(&self) -> Decimal {
        self.owed
            .iter()
            .filter(|o| o.is_open())
            .map(|o| o.amount)
            .sum()
    }

    pub fn refunded(&self) -> Decimal {
        self.refunds.iter().map(|r| r.amount).sum()
    }

    fn owe(&mut self, amount: Decimal, reason: RefundReason, now: UnixMillis, auto: bool) {
        if amount > Decimal::ZERO {
            self.owed.push(Owed {
                amount,
                reason,
                auto,
                at: now,
                refund: None,
            });
        }
    }

    /// Settles `amount` of what is open, taking first from the portions
    /// `first` picks, then from any other, splitting a portion when the
    /// refund covers only part of it. What no portion covers is returned.
    fn settle_owed(
        &mut self,
        mut amount: Decimal,
        refund: &MpId,
        first: impl Fn(&Owed) -> bool,
    ) -> Decimal {
        for pass in [true, false] {
            let mut i = 0;
            while i < self.owed.len() && amount > Decimal::ZERO {
                let o = &self.owed[i];
                if o.is_open() && first(o) == pass {
                    if o.amount > amount {
                        let rest = Owed {
                            amount: o.amount - amount,
                            ..o.clone()
                        };
                        self.owed[i].amount = amount;
                        self.owed.insert(i + 1, rest);
                    }
                    amount -= self.owed[i].amount;
                    self.owed[i].refund = Some(refund.clone());
                }
                i += 1;
            }
        }
        amount
    }

    /// The whole payment, nothing returned yet.
    fn untouched(&self, amount: Decimal) -> bool {
        amount == self.amount && self.refunds.is_empty()
    }

    /// All that is left of it at Mercado Pago: refunded with an empty body.
    fn rest(&self, amount: Decimal) -> bool {
        amount == self.amount - self.refunded()
    }
}

/// Approval order: Mercado Pago's `date_approved`, then the id. A payment
/// reported without a date comes after the dated ones.
fn approval_order(a: &LedgerPayment, b: &LedgerPayment) -> Ordering {
    let at = |p: &LedgerPayment| p.approved_at.unwrap_or(UnixMillis::MAX);
    at(a).cmp(&at(b)).then_with(|| a.id.cmp(&b.id))
}

/// How a sale closed: the payment that reached the total, the whole
/// amounts kept, and what the reaching payment carried beyond the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub payment: MpId,
    pub paid: Decimal,
    pub overpaid: Decimal,
}

/// One refund call to Mercado Pago: which payment, how much, and the key
/// that makes a retry or a restart send the same call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundCall {
    pub payment: MpId,
    pub merchant_order: MpId,
    pub amount: Decimal,
    /// All that is left of the payment: an empty body.
    pub whole: bool,
    pub of: RefundOf,
    pub key: String,
}

/// Every approved payment of a sale, in the order they were first seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ledger(Vec<LedgerPayment>);

impl Ledger {
    pub fn from_payments(payments: Vec<LedgerPayment>) -> Ledger {
        Ledger(payments)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn payments(&self) -> &[LedgerPayment] {
        &self.0
    }

    pub fn get(&self, id: &MpId) -> Option<&LedgerPayment> {
        self.0.iter().find(|p| &p.id == id)
    }

    pub fn approved(&self) -> Decimal {
        self.0.iter().map(|p| p.amount).sum()
    }

    pub fn kept(&self) -> Decimal {
        self.0.iter().map(|p| p.kept).sum()
    }

    /// Owed back and not refunded yet.
    pub fn owed(&self) -> Decimal {
        self.0.iter().map(LedgerPayment::owed_open).sum()
    }

    pub fn held(&self) -> Decimal {
        self.0.iter().filter(|p| p.held).map(|p| p.amount).sum()
    }

    pub fn refunded(&self) -> Decimal {
        self.0.iter().map(LedgerPayment::refunded).sum()
    }

    /// What refunds returned of what the sale kept.
    pub fn refunded_kept(&self) -> Decimal {
        self.refunds()
            .filter(|(_, r)| r.of == RefundOf::Kept)
            .map(|(_, r)| r.amount)
            .sum()
    }

    /// Something owed that qrgate refunds itself.
    pub fn owes_auto(&self) -> bool {
        self.open_owed().any(|(_, o)| o.auto)
    }

    pub fn open_owed(&self) -> impl Iterator<Item = (&LedgerPayment, &Owed)> {
        self.0
            .iter()
            .flat_map(|p| p.owed.iter().filter(|o| o.is_open()).map(move |o| (p, o)))
    }

    pub fn refunds(&self) -> impl Iterator<Item = (&LedgerPayment, &Refund)> {
        self.0
            .iter()
            .flat_map(|p| p.refunds.iter().map(move |r| (p, r)))
    }

    /// What the operator's latest refund of the kept money returned in all
    /// (one request may refund several payments).
    pub fn last_kept_refund(&self) -> Option<Decimal> {
        let last = self
            .refunds()
            .filter(|(_, r)| r.of == RefundOf::Kept)
            .max_by_key(|(_, r)| r.at)?
            .1;
        Some(
            self.refunds()
                .filter(|(_, r)| {
                    r.of == RefundOf::Kept
                        && match (&r.request, &last.request) {
                            (Some(a), Some(b)) => a == b,
                            _ => r.id == last.id,
                        }
                })
                .map(|(_, r)| r.amount)
                .sum(),
        )
    }

    /// Records a payment not seen before as held; `false` when its id is
    /// already in the ledger, whatever the report says about it now.
    pub fn record(&mut self, p: &Approved, now: UnixMillis) -> bool {
        if self.get(&p.id).is_some() {
            return false;
        }
        self.0.push(LedgerPayment::new(p, now));
        true
    }

    /// Records a payment not seen before as owed back in full.
    pub fn record_owed(
        &mut self,
        p: &Approved,
        reason: RefundReason,
        now: UnixMillis,
        auto: bool,
    ) -> bool {
        if !self.record(p, now) {
            return false;
        }
        if let Some(last) = self.0.last_mut() {
            last.held = false;
            last.owe(last.amount, reason, now, auto);
        }
        true
    }

    /// Closes the sale with the held payments that `merchant_order` (a
    /// closed one) carries, `payments` by id: in approval order they are
    /// kept until they reach `total`; the rest of that order, and everything
    /// held from other orders, is owed back. `None` (and nothing changed)
    /// when they do not reach the total.
    pub fn close(
        &mut self,
        merchant_order: &MpId,
        payments: &[MpId],
        total: Decimal,
        now: UnixMillis,
        auto: bool,
    ) -> Option<Close> {
        let mut order: Vec<usize> = (0..self.0.len())
            .filter(|&i| self.0[i].held && payments.contains(&self.0[i].id))
            .collect();
        let sum: Decimal = order.iter().map(|&i| self.0[i].amount).sum();
        if total <= Decimal::ZERO || sum < total {
            return None;
        }
        order.sort_by(|&a, &b| approval_order(&self.0[a], &self.0[b]));
        let mut left = total;
        let mut close: Option<Close> = None;
        for i in order {
            let p = &mut self.0[i];
            p.held = false;
            // First reported by a payment resource, it may not have known
            // its merchant order.
            p.merchant_order = merchant_order.clone();
            if left > Decimal::ZERO {
                let keep = p.amount.min(left);
                p.kept = keep;
                left -= keep;
                if left == Decimal::ZERO {
                    // Kept whole: what it carries beyond the total is an
                    // overpayment, the operator's to refund.
                    let excess = p.amount - keep;
                    p.owe(excess, RefundReason::Overpayment, now, false);
                    close = Some(Close {
                        payment: p.id.clone(),
                        paid: total + excess,
                        overpaid: excess,
                    });
                }
            } else {
                p.owe(p.amount, RefundReason::DoublePayment, now, auto);
            }
        }
        self.release_held(RefundReason::DoublePayment, now, auto);
        close
    }

    /// The sale will not take the money it holds (it ended, or another
    /// order paid it): every held payment is owed back in full.
    pub fn release_held(&mut self, reason: RefundReason, now: UnixMillis, auto: bool) {
        for p in self.0.iter_mut().filter(|p| p.held) {
            p.held = false;
            p.owe(p.amount, reason, now, auto);
        }
    }

    /// `amount` of what is kept is owed back, the latest kept payment first.
    pub fn owe_from_kept(
        &mut self,
        amount: Decimal,
        reason: RefundReason,
        now: UnixMillis,
        auto: bool,
    ) {
        let mut order: Vec<usize> = (0..self.0.len())
            .filter(|&i| self.0[i].kept > Decimal::ZERO)
            .collect();
        order.sort_by(|&a, &b| approval_order(&self.0[b], &self.0[a]));
        let mut left = amount;
        for i in order {
            let p = &mut self.0[i];
            let take = p.kept.min(left);
            p.kept -= take;
            left -= take;
            p.owe(take, reason, now, auto);
        }
    }

    /// Everything kept is owed back (the device could not deliver).
    pub fn owe_kept(&mut self, reason: RefundReason, now: UnixMillis, auto: bool) {
        for p in &mut self.0 {
            let kept = std::mem::take(&mut p.kept);
            p.owe(kept, reason, now, auto);
        }
    }

    /// Records a refund Mercado Pago made; `false` when its id is known
    /// already (or the payment is not this sale's). What it returned comes
    /// off what it was for first, then off whatever else is open, so the
    /// ledger follows the money even if the sale changed meanwhile.
    pub fn record_refund(&mut self, payment: &MpId, refund: Refund) -> bool {
        let known = self.refunds().any(|(_, r)| r.id == refund.id);
        let Some(p) = self.0.iter_mut().find(|p| &p.id == payment) else {
            return false;
        };
        if known {
            return false;
        }
        let amount = refund.amount;
        match refund.of {
            RefundOf::Kept => {
                let from_kept = p.kept.min(amount);
                p.kept -= from_kept;
                p.settle_owed(amount - from_kept, &refund.id, |_| true);
            }
            RefundOf::Owed(reason) => {
                let left = p.settle_owed(amount, &refund.id, |o| o.reason == reason);
                let from_kept = p.kept.min(left);
                p.kept -= from_kept;
            }
        }
        p.refunds.push(refund);
        true
    }

    /// The calls that refund what is owed (only what qrgate refunds itself
    /// when `auto_only`), one per owed portion. An automatic full refund of
    /// a payment keeps the key `qrgate-refund-{payment}`; any other is keyed
    /// by the payment, the reason and the amount, so a retry, a restart or
    /// a second process sends the same call.
    pub fn plan_owed(&self, currency: Currency, auto_only: bool) -> Vec<RefundCall> {
        let mut calls = Vec::new();
        for p in &self.0 {
            for o in p
                .owed
                .iter()
                .filter(|o| o.is_open() && (o.auto || !auto_only))
            {
                let whole = p.rest(o.amount);
                let key = if p.untouched(o.amount) {
                    format!("qrgate-refund-{}", p.id)
                } else {
                    format!(
                        "qrgate-refund-{}-{}-{}",
                        p.id,
                        o.reason.as_str(),
                        Amount::new(o.amount, currency)
                    )
                };
                calls.push(RefundCall {
                    payment: p.id.clone(),
                    merchant_order: p.merchant_order.clone(),
                    amount: o.amount,
                    whole,
                    of: RefundOf::Owed(o.reason),
                    key,
                });
            }
        }
        calls
    }

    /// The calls that refund `amount` of what the sale kept, the latest
    /// kept payment first. `tag` names the operator's request (derived from
    /// its key or from the sale and a time window), so the same request
    /// always sends the same calls.
    pub fn plan_kept(&self, amount: Decimal, currency: Currency, tag: &str) -> Vec<RefundCall> {
        let mut kept: Vec<&LedgerPayment> =
            self.0.iter().filter(|p| p.kept > Decimal::ZERO).collect();
        kept.sort_by(|a, b| approval_order(b, a));
        let mut left = amount;
        let mut calls = Vec::new();
        for p in kept {
            if left <= Decimal::ZERO {
                break;
            }
            let take = p.kept.min(left);
            left -= take;
            calls.push(RefundCall {
                payment: p.id.clone(),
                merchant_order: p.merchant_order.clone(),
                amount: take,
                whole: p.rest(take),
                of: RefundOf::Kept,
                key: format!(
                    "qrgate-oprefund-{}-{}-{tag}",
                    p.id,
                    Amount::new(take, currency)
                ),
            });
        }
        calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn approved(id: u64, mo: u64, amount: &str, at: i64) -> Approved {
        Approved {
            id: MpId::Num(id),
            merchant_order: MpId::Num(mo),
            amount: d(amount),
            approved_at: Some(at),
        }
    }

    fn ids(v: &[u64]) -> Vec<MpId> {
        v.iter().map(|&i| MpId::Num(i)).collect()
    }

    fn balanced(l: &Ledger) {
        for p in l.payments().iter().filter(|p| !p.held) {
            assert_eq!(
                p.amount,
                p.kept + p.owed_open() + p.refunded(),
                "payment {} out of balance: {p:?}",
                p.id
            );
        }
    }

    #[test]
    fn a_payment_is_recorded_once_by_its_id() {
        let mut l = Ledger::default();
        assert!(l.record(&approved(1, 7, "100", 1), 1));
        assert!(!l.record(&approved(1, 8, "100", 1), 2));
        assert!(!l.record_owed(
            &approved(1, 7, "100", 1),
            RefundReason::DoublePayment,
            3,
            true
        ));
        assert_eq!(l.approved(), d("100"));
        assert_eq!(l.held(), d("100"));
    }

    #[test]
    fn sixty_and_forty_on_one_order_are_both_kept() {
        let mut l = Ledger::default();
        l.record(&approved(2, 7, "40", 20), 1);
        l.record(&approved(1, 7, "60", 10), 1);
        let c = l
            .close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        assert_eq!(c.payment, MpId::Num(2));
        assert_eq!(c.overpaid, Decimal::ZERO);
        assert_eq!(l.kept(), d("100"));
        assert_eq!(l.owed(), Decimal::ZERO);
        balanced(&l);
    }

    #[test]
    fn a_second_payment_on_the_closing_order_is_owed_back_in_full() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "100", 10), 1);
        l.record(&approved(2, 7, "100", 20), 1);
        let c = l
            .close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        assert_eq!(c.payment, MpId::Num(1));
        let owed: Vec<_> = l
            .open_owed()
            .map(|(p, o)| (p.id.clone(), o.reason))
            .collect();
        assert_eq!(owed, [(MpId::Num(2), RefundReason::DoublePayment)]);
        let calls = l.plan_owed(Currency::Ars, true);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].key, "qrgate-refund-2");
        assert!(calls[0].whole);
        balanced(&l);
    }

    #[test]
    fn the_payment_reaching_the_total_is_kept_whole_and_its_excess_is_the_operators() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "60", 10), 1);
        l.record(&approved(2, 7, "60", 20), 1);
        let c = l
            .close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        assert_eq!(c.paid, d("120"));
        assert_eq!(c.overpaid, d("20"));
        assert_eq!(l.kept(), d("100"));
        assert_eq!(l.owed(), d("20"));
        assert!(!l.owes_auto(), "an overpayment is refunded by the operator");
        let calls = l.plan_owed(Currency::Ars, false);
        assert_eq!(calls[0].key, "qrgate-refund-2-overpayment-20.00");
        assert!(!calls[0].whole);
        balanced(&l);
    }

    #[test]
    fn held_payments_of_other_orders_are_owed_when_one_order_closes_the_sale() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "60", 10), 1);
        l.record(&approved(2, 8, "100", 20), 1);
        assert!(l
            .close(&MpId::Num(7), &ids(&[1]), d("100"), 2, true)
            .is_none());
        assert_eq!(l.held(), d("160"), "a short order changes nothing");
        l.close(&MpId::Num(8), &ids(&[2]), d("100"), 3, true)
            .unwrap();
        assert_eq!(l.kept(), d("100"));
        assert_eq!(l.owed(), d("60"));
        balanced(&l);
    }

    #[test]
    fn a_failed_delivery_owes_every_kept_payment_and_refunds_follow_per_payment() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "60", 10), 1);
        l.record(&approved(2, 7, "40", 20), 1);
        l.close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        l.owe_kept(RefundReason::DeliveryFailed, 3, true);
        let calls = l.plan_owed(Currency::Ars, true);
        let plan: Vec<_> = calls.iter().map(|c| (c.key.as_str(), c.amount)).collect();
        assert_eq!(
            plan,
            [("qrgate-refund-1", d("60")), ("qrgate-refund-2", d("40"))]
        );
        for (n, c) in calls.iter().enumerate() {
            let made = Refund {
                id: MpId::Num(900 + n as u64),
                amount: c.amount,
                at: 4,
                by: "qrgate".into(),
                of: c.of,
                request: None,
            };
            assert!(l.record_refund(&c.payment, made.clone()));
            assert!(!l.record_refund(&c.payment, made), "a refund counts once");
        }
        assert_eq!(l.owed(), Decimal::ZERO);
        assert_eq!(l.refunded(), d("100"));
        balanced(&l);
    }

    #[test]
    fn a_partial_operator_refund_then_a_failed_delivery_owes_the_rest() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "60", 10), 1);
        l.record(&approved(2, 7, "40", 20), 1);
        l.close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        let calls = l.plan_kept(d("50"), Currency::Ars, "t");
        let plan: Vec<_> = calls
            .iter()
            .map(|c| (c.payment.clone(), c.amount))
            .collect();
        assert_eq!(plan, [(MpId::Num(2), d("40")), (MpId::Num(1), d("10"))]);
        assert!(calls[0].whole && !calls[1].whole);
        for (n, c) in calls.iter().enumerate() {
            l.record_refund(
                &c.payment,
                Refund {
                    id: MpId::Num(900 + n as u64),
                    amount: c.amount,
                    at: 4,
                    by: "token".into(),
                    of: RefundOf::Kept,
                    request: Some("k".into()),
                },
            );
        }
        assert_eq!(l.last_kept_refund(), Some(d("50")));
        l.owe_kept(RefundReason::DeliveryFailed, 5, false);
        assert_eq!(l.owed(), d("50"));
        let calls = l.plan_owed(Currency::Ars, false);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].key, "qrgate-refund-1-delivery_failed-50.00");
        balanced(&l);
    }

    #[test]
    fn a_refund_larger_than_its_portion_comes_off_what_else_is_open() {
        let mut l = Ledger::default();
        l.record(&approved(1, 7, "100", 10), 1);
        l.close(&MpId::Num(7), &ids(&[1, 2]), d("100"), 2, true)
            .unwrap();
        l.owe_kept(RefundReason::DeliveryFailed, 3, true);
        // A kept refund planned before the failed delivery, recorded after.
        l.record_refund(
            &MpId::Num(1),
            Refund {
                id: MpId::Num(5),
                amount: d("30"),
                at: 4,
                by: "token".into(),
                of: RefundOf::Kept,
                request: None,
            },
        );
        assert_eq!(l.owed(), d("70"));
        balanced(&l);
    }
}
