//! Property test: random interleavings of device messages, scans, payments
//! (several per merchant order, several merchant orders per sale, before and
//! after the sale ends), duplicate and late notifications, operator and
//! automatic refunds and restarts, against the order book's rules. For every
//! sale, at every step:
//! - approved = kept + refunded + owed (+ held while it can still be paid);
//! - kept ≤ total, and the money that paid a sale told `paid` is its total;
//! - every approved payment reported is in exactly one ledger, once;
//! - no sale is told `paid` twice, and a busy sale leaves only by being
//!   cancelled, expired or paid.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::ledger::{Refund, RefundCall, RefundOf};
use super::merchant_order::{MerchantOrderFacts, MerchantOrderStatus, PaymentFacts, PaymentStatus};
use super::rules::{
    apply, record_refunds, refund_plan, settle, Command, Given, LineRequest, Outcome, PosConfig,
    PosState, SaleEvent, SaleRequest,
};
use super::sale::{ExternalReference, MpId, PosId, PosKind, RefundReason, Sale, SaleId, SaleState};
use crate::money::Currency;

const COLLECTOR: u64 = 178;

#[derive(Debug, Clone)]
enum Op {
    Sale {
        id: u8,
        qty: u8,
        price: u8,
    },
    Progress {
        id: u8,
    },
    Cancel {
        id: u8,
    },
    Expire,
    Served,
    Delivered {
        ok: bool,
    },
    /// A customer scans: a merchant order for the current pending sale.
    Scan,
    /// A payment on merchant order `mo` (modulo how many exist), open or
    /// closed: what is left, half of it, one more than it, the whole total
    /// again, or a rejected one.
    Pay {
        mo: u8,
        kind: u8,
    },
    /// A notification for merchant order `mo`: fetched and settled.
    Notify {
        mo: u8,
    },
    /// A `payment` notification: the payment resource alone.
    NotifyPayment {
        payment: u8,
    },
    /// The operator refunds sale `sale` (modulo the sales stored): all that
    /// is owed or kept, or part of what it kept.
    OperatorRefund {
        sale: u8,
        part: bool,
    },
    /// qrgate refunds what it owes by itself, for every sale.
    AutoRefunds,
    /// Everything reloaded from the store; refunds reported again.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 1u8..4, 1u8..4).prop_map(|(id, qty, price)| Op::Sale { id, qty, price }),
        (0u8..4).prop_map(|id| Op::Progress { id }),
        (0u8..4).prop_map(|id| Op::Cancel { id }),
        Just(Op::Expire),
        Just(Op::Served),
        any::<bool>().prop_map(|ok| Op::Delivered { ok }),
        Just(Op::Scan),
        Just(Op::Scan),
        (any::<u8>(), 0u8..5).prop_map(|(mo, kind)| Op::Pay { mo, kind }),
        (any::<u8>(), 0u8..5).prop_map(|(mo, kind)| Op::Pay { mo, kind }),
        any::<u8>().prop_map(|mo| Op::Notify { mo }),
        any::<u8>().prop_map(|mo| Op::Notify { mo }),
        any::<u8>().prop_map(|payment| Op::NotifyPayment { payment }),
        (any::<u8>(), any::<bool>()).prop_map(|(sale, part)| Op::OperatorRefund { sale, part }),
        Just(Op::AutoRefunds),
        Just(Op::Restart),
    ]
}

struct Mo {
    facts: MerchantOrderFacts,
    total: Decimal,
}

fn sid(id: u8) -> SaleId {
    SaleId::parse(&id.to_string()).unwrap()
}

/// The refunds Mercado Pago makes for `calls`, with ids of its own.
fn made(calls: &[RefundCall], by: &str, now: i64, next_id: &mut u64) -> Vec<(MpId, Refund)> {
    calls
        .iter()
        .map(|c| {
            *next_id += 1;
            (
                c.payment.clone(),
                Refund {
                    id: MpId::Num(*next_id),
                    amount: c.amount,
                    at: now,
                    by: by.into(),
                    of: c.of,
                    request: None,
                },
            )
        })
        .collect()
}

fn check_sale(sale: &Sale, told_paid: bool) -> Result<(), TestCaseError> {
    let l = &sale.ledger;
    let r = &sale.external_reference;
    let total = sale.amount.unwrap_or_default();
    if sale.is_payable() {
        prop_assert_eq!(l.kept(), Decimal::ZERO, "{} keeps money while payable", r);
    } else {
        prop_assert_eq!(l.held(), Decimal::ZERO, "{} holds money after it ended", r);
    }
    prop_assert_eq!(
        l.approved(),
        l.held() + l.kept() + l.refunded() + l.owed(),
        "{} out of balance: {:?}",
        r,
        l
    );
    prop_assert!(l.kept() <= total, "{} keeps more than its total", r);
    for p in l.payments() {
        prop_assert!(
            p.refunded() <= p.amount,
            "payment {} refunded beyond itself",
            p.id
        );
    }
    // The money that paid the sale: still kept, refunded from what was
    // kept, or owed back because the device could not deliver.
    let paid_it: Decimal = l.kept()
        + l.refunds()
            .filter(|(_, x)| x.of == RefundOf::Kept)
            .map(|(_, x)| x.amount)
            .sum::<Decimal>()
        + l.payments()
            .iter()
            .flat_map(|p| p.owed.iter())
            .filter(|o| o.reason == RefundReason::DeliveryFailed)
            .map(|o| o.amount)
            .sum::<Decimal>();
    if told_paid {
        prop_assert_eq!(paid_it, total, "{} was told paid but kept {}", r, paid_it);
    } else {
        prop_assert_eq!(
            paid_it,
            Decimal::ZERO,
            "{} kept money without being paid",
            r
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let pos = PosConfig {
        ttl_secs: Some(60),
        max_amount: Decimal::from(1_000_000),
        ..PosConfig::new(
            PosId::parse("pump-1").unwrap(),
            PosKind::Fuel,
            Currency::Ars,
        )
    };
    let mut state = PosState::idle();
    let mut store: HashMap<ExternalReference, Sale> = HashMap::new();
    let mut order: Vec<ExternalReference> = Vec::new();
    let mut paid_events: HashMap<ExternalReference, usize> = HashMap::new();
    let mut mos: Vec<Mo> = Vec::new();
    // Approved payments Mercado Pago reported to qrgate: id → amount.
    let mut reported: HashMap<MpId, Decimal> = HashMap::new();
    let mut refunds_made: Vec<(ExternalReference, Vec<(MpId, Refund)>)> = Vec::new();
    let mut now = 0i64;
    let mut next_id = 1u64;
    for (step, op) in ops.into_iter().enumerate() {
        now += 1_000;
        let ctx = Given {
            now,
            random: step as u32,
            auto_refund: step % 3 != 0,
        };
        let busy_before = state.busy_sale().cloned();
        let mut outcomes: Vec<Outcome> = Vec::new();
        let settle_mo = |facts: &MerchantOrderFacts,
                         store: &HashMap<ExternalReference, Sale>,
                         reported: &mut HashMap<MpId, Decimal>|
         -> Option<Outcome> {
            let reference = ExternalReference::parse(facts.external_reference.as_deref()?).ok()?;
            let sale = store.get(&reference)?;
            for p in facts.approved() {
                reported.insert(p.id.clone(), p.amount);
            }
            settle(sale, facts, COLLECTOR, ctx).ok()
        };
        match op.clone() {
            Op::Sale { id, qty, price } => outcomes.push(apply(
                &pos,
                &state,
                Command::Sale(SaleRequest {
                    sale_id: sid(id),
                    lines: vec![LineRequest {
                        title: "x".into(),
                        description: None,
                        quantity: Decimal::from(qty),
                        unit_price: Decimal::from(price),
                        unit_measure: None,
                        sku: None,
                        category: None,
                        taxes: Vec::new(),
                    }],
                    amount: None,
                }),
                ctx,
            )),
            Op::Progress { id } => {
                outcomes.push(apply(&pos, &state, Command::Progress(sid(id)), ctx))
            }
            Op::Cancel { id } => outcomes.push(apply(&pos, &state, Command::Cancel(sid(id)), ctx)),
            Op::Expire => {
                now += 61_000;
                outcomes.push(apply(&pos, &state, Command::Expire, Given { now, ..ctx }))
            }
            Op::Served => {
                if let Some(s) = state.busy_sale() {
                    outcomes.push(apply(
                        &pos,
                        &state,
                        Command::Served(s.external_reference.clone()),
                        ctx,
                    ));
                }
            }
            Op::Delivered { ok } => {
                if let Some(s) = &state.current {
                    outcomes.push(apply(
                        &pos,
                        &state,
                        Command::Delivered {
                            sale_id: s.sale_id.clone(),
                            ok,
                            reason: None,
                        },
                        ctx,
                    ));
                }
            }
            Op::Scan => {
                if let Some(s) = state.busy_sale().filter(|s| s.state == SaleState::Pending) {
                    mos.push(Mo {
                        facts: MerchantOrderFacts {
                            id: MpId::Num(next_id),
                            status: MerchantOrderStatus::Opened,
                            external_reference: Some(s.external_reference.as_str().to_owned()),
                            collector_id: Some(COLLECTOR),
                            payments: vec![],
                        },
                        total: s.amount.unwrap_or_default(),
                    });
                    next_id += 1;
                }
            }
            Op::Pay { mo, kind } => {
                if !mos.is_empty() {
                    let n = mos.len();
                    let m = &mut mos[mo as usize % n];
                    let paid: Decimal = m.facts.approved().map(|p| p.amount).sum();
                    let left = (m.total - paid).max(Decimal::ZERO);
                    let (status, amount) = match kind {
                        0 => (PaymentStatus::Approved, left),
                        1 => (PaymentStatus::Approved, left / Decimal::from(2)),
                        2 => (PaymentStatus::Approved, left + Decimal::ONE),
                        3 => (PaymentStatus::Approved, m.total),
                        _ => (PaymentStatus::Other("rejected".into()), m.total),
                    };
                    if amount > Decimal::ZERO {
                        m.facts.payments.push(PaymentFacts {
                            id: MpId::Num(next_id),
                            status,
                            amount,
                            currency: Some("ARS".into()),
                            // Approval times may come out of order.
                            approved_at: Some(now - i64::from(kind) * 700),
                        });
                        next_id += 1;
                    }
                    let paid: Decimal = m.facts.approved().map(|p| p.amount).sum();
                    if paid >= m.total && m.total > Decimal::ZERO {
                        m.facts.status = MerchantOrderStatus::Closed;
                    }
                }
            }
            Op::Notify { mo } => {
                if !mos.is_empty() {
                    let facts = mos[mo as usize % mos.len()].facts.clone();
                    outcomes.extend(settle_mo(&facts, &store, &mut reported));
                }
            }
            Op::NotifyPayment { payment } => {
                let all: Vec<(MerchantOrderFacts, PaymentFacts)> = mos
                    .iter()
                    .flat_map(|m| {
                        m.facts
                            .payments
                            .iter()
                            .map(|p| (m.facts.clone(), p.clone()))
                    })
                    .collect();
                if !all.is_empty() {
                    let (mo, p) = all[payment as usize % all.len()].clone();
                    // As a payment resource reads: an open order holding it.
                    let alone = MerchantOrderFacts {
                        status: MerchantOrderStatus::Opened,
                        payments: vec![p],
                        ..mo
                    };
                    outcomes.extend(settle_mo(&alone, &store, &mut reported));
                }
            }
            Op::OperatorRefund { sale, part } => {
                if !order.is_empty() {
                    let r = order[sale as usize % order.len()].clone();
                    let s = &store[&r];
                    let asked = part
                        .then(|| s.ledger.kept() / Decimal::from(3))
                        .map(|a| a.round_dp(2));
                    if let Ok(calls) = refund_plan(s, asked.filter(|a| *a > Decimal::ZERO), "t") {
                        let m = made(&calls, "token", now, &mut next_id);
                        refunds_made.push((r.clone(), m.clone()));
                        outcomes.extend(record_refunds(s, &m, now));
                    }
                }
            }
            Op::AutoRefunds => {
                for r in &order {
                    let s = &store[r];
                    let calls = s.ledger.plan_owed(s.currency, true);
                    let keys: HashSet<&str> = calls.iter().map(|c| c.key.as_str()).collect();
                    prop_assert_eq!(keys.len(), calls.len(), "two calls share a key");
                    if !calls.is_empty() {
                        let m = made(&calls, "qrgate", now, &mut next_id);
                        refunds_made.push((r.clone(), m.clone()));
                        if let Some(Outcome::Changed { sale, .. }) = record_refunds(s, &m, now) {
                            prop_assert_eq!(
                                sale.ledger.owed() + sale.ledger.refunded(),
                                s.ledger.owed() + s.ledger.refunded(),
                                "a refund changed the sum owed + refunded"
                            );
                            prop_assert!(
                                !sale.ledger.owes_auto(),
                                "auto refunds left something auto owed"
                            );
                            outcomes.push(Outcome::Changed {
                                sale,
                                event: SaleEvent::Refunded {
                                    amount: Decimal::ZERO,
                                    by: "qrgate".into(),
                                },
                            });
                        }
                    }
                }
            }
            Op::Restart => {
                let reloaded: HashMap<ExternalReference, Sale> = store
                    .iter()
                    .map(|(r, s)| {
                        let body = serde_json::to_string(s).unwrap();
                        (r.clone(), serde_json::from_str(&body).unwrap())
                    })
                    .collect();
                prop_assert_eq!(&reloaded, &store, "a sale changed through the store");
                state.current = order.last().map(|r| store[r].clone());
                // Refunds reported again change nothing.
                for (r, m) in &refunds_made {
                    prop_assert_eq!(
                        record_refunds(&store[r], m, now),
                        None,
                        "a refund counted twice"
                    );
                }
            }
        }
        for outcome in outcomes {
            if let Outcome::Changed { sale, event } = &outcome {
                if let SaleEvent::Paid { .. } = event {
                    let n = paid_events
                        .entry(sale.external_reference.clone())
                        .or_default();
                    *n += 1;
                    prop_assert_eq!(*n, 1, "two paid for {}", sale.external_reference);
                }
                if !store.contains_key(&sale.external_reference) {
                    order.push(sale.external_reference.clone());
                }
                store.insert(sale.external_reference.clone(), sale.clone());
                // As the book does: only the current sale is shown.
                let current = state.current.as_ref().map(|c| &c.external_reference);
                let device = matches!(
                    op,
                    Op::Sale { .. }
                        | Op::Progress { .. }
                        | Op::Cancel { .. }
                        | Op::Expire
                        | Op::Served
                        | Op::Delivered { .. }
                );
                if device || current == Some(&sale.external_reference) {
                    state.current = Some(sale.clone());
                }
            }
            if let Outcome::Presence(p) = outcome {
                state.presence = p;
            }
        }
        // A busy sale leaves only by being cancelled, expired or paid.
        if let Some(before) = busy_before {
            let after = &store[&before.external_reference];
            let still_current = state
                .current
                .as_ref()
                .is_some_and(|c| c.external_reference == before.external_reference);
            prop_assert!(
                still_current
                    || matches!(
                        after.state,
                        SaleState::Cancelled | SaleState::Expired | SaleState::Paid
                    ),
                "pending sale {} lost at step {step} ({op:?})",
                before.external_reference
            );
        }
        // Every sale balances; every reported approved payment is in
        // exactly one ledger, once.
        let mut seen: HashMap<MpId, Decimal> = HashMap::new();
        for s in store.values() {
            check_sale(s, paid_events.contains_key(&s.external_reference))?;
            for p in s.ledger.payments() {
                prop_assert!(
                    seen.insert(p.id.clone(), p.amount).is_none(),
                    "payment {} counted twice",
                    p.id
                );
            }
        }
        prop_assert_eq!(
            &seen,
            &reported,
            "a reported payment is missing from the ledgers"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn every_approved_payment_is_kept_owed_or_refunded_once(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
