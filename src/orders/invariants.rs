//! Property test: random interleavings of device messages, scans, payments
//! and (duplicate, late, out-of-order) notifications against the order
//! book's rules, checking what must never happen: two `paid` for one sale, a
//! `paid` without approved payments covering the total of a closed merchant
//! order, a busy sale disappearing without being cancelled, expired or paid.

use std::collections::HashMap;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::book::{
    apply, pay, Command, Ctx, LineRequest, Outcome, PosConfig, PosState, SaleEvent, SaleRequest,
};
use super::sale::{ExternalReference, MpId, PosId, PosKind, Sale, SaleId, SaleState};
use super::settle::{
    check_payment, MerchantOrderFacts, MerchantOrderStatus, PaymentFacts, PaymentStatus,
};
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
    /// A payment on merchant order `mo` (modulo how many exist).
    Pay {
        mo: u8,
        kind: u8,
    },
    /// A notification for merchant order `mo`: fetched and settled.
    Notify {
        mo: u8,
    },
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
        (any::<u8>(), 0u8..4).prop_map(|(mo, kind)| Op::Pay { mo, kind }),
        any::<u8>().prop_map(|mo| Op::Notify { mo }),
        any::<u8>().prop_map(|mo| Op::Notify { mo }),
    ]
}

struct Mo {
    facts: MerchantOrderFacts,
    total: Decimal,
}

fn sid(id: u8) -> SaleId {
    SaleId::parse(&id.to_string()).unwrap()
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
    let mut paid_events: HashMap<ExternalReference, usize> = HashMap::new();
    let mut mos: Vec<Mo> = Vec::new();
    let mut now = 0i64;
    let mut next_id = 1u64;
    for (step, op) in ops.into_iter().enumerate() {
        now += 1_000;
        let ctx = Ctx {
            now,
            random: step as u32,
            auto_refund: false,
        };
        let busy_before = state.busy_sale().cloned();
        let outcome = match op.clone() {
            Op::Sale { id, qty, price } => apply(
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
            ),
            Op::Progress { id } => apply(&pos, &state, Command::Progress(sid(id)), ctx),
            Op::Cancel { id } => apply(&pos, &state, Command::Cancel(sid(id)), ctx),
            Op::Expire => {
                now += 61_000;
                apply(&pos, &state, Command::Expire, Ctx { now, ..ctx })
            }
            Op::Served => match state.busy_sale() {
                Some(s) => apply(
                    &pos,
                    &state,
                    Command::Served(s.external_reference.clone()),
                    ctx,
                ),
                None => Outcome::Nothing,
            },
            Op::Delivered { ok } => match &state.current {
                Some(s) => apply(
                    &pos,
                    &state,
                    Command::Delivered {
                        sale_id: s.sale_id.clone(),
                        ok,
                        reason: None,
                    },
                    ctx,
                ),
                None => Outcome::Nothing,
            },
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
                Outcome::Nothing
            }
            Op::Pay { mo, kind } => {
                if !mos.is_empty() {
                    let n = mos.len();
                    let m = &mut mos[mo as usize % n];
                    let paid: Decimal = m.facts.approved().map(|p| p.amount).sum();
                    let left = m.total - paid;
                    let (status, amount) = match kind {
                        0 => (PaymentStatus::Approved, left),
                        1 => (PaymentStatus::Approved, left / Decimal::from(2)),
                        2 => (PaymentStatus::Approved, left + Decimal::ONE),
                        _ => (PaymentStatus::Other("rejected".into()), m.total),
                    };
                    if amount > Decimal::ZERO {
                        m.facts.payments.push(PaymentFacts {
                            id: MpId::Num(next_id),
                            status,
                            amount,
                            currency: Some("ARS".into()),
                        });
                        next_id += 1;
                    }
                    let paid: Decimal = m.facts.approved().map(|p| p.amount).sum();
                    if paid >= m.total {
                        m.facts.status = MerchantOrderStatus::Closed;
                    }
                }
                Outcome::Nothing
            }
            Op::Notify { mo } => {
                if mos.is_empty() {
                    Outcome::Nothing
                } else {
                    let m = &mos[mo as usize % mos.len()];
                    let reference =
                        ExternalReference::parse(m.facts.external_reference.as_deref().unwrap())
                            .unwrap();
                    let sale = store
                        .get(&reference)
                        .cloned()
                        .expect("a scanned sale is stored");
                    match check_payment(&sale, &m.facts, COLLECTOR) {
                        Err(_) => Outcome::Nothing,
                        Ok(payment) => {
                            let out = pay(&sale, &payment, ctx);
                            if let Outcome::Changed {
                                event: SaleEvent::Paid { .. },
                                ..
                            } = &out
                            {
                                let approved: Decimal = m.facts.approved().map(|p| p.amount).sum();
                                prop_assert_eq!(&m.facts.status, &MerchantOrderStatus::Closed);
                                prop_assert!(
                                    approved >= sale.amount.unwrap(),
                                    "paid without the total"
                                );
                            }
                            out
                        }
                    }
                }
            }
        };
        if let Outcome::Changed { sale, event } = &outcome {
            if let SaleEvent::Paid { .. } = event {
                let n = paid_events
                    .entry(sale.external_reference.clone())
                    .or_default();
                *n += 1;
                prop_assert_eq!(*n, 1, "two paid for {}", sale.external_reference);
            }
            store.insert(sale.external_reference.clone(), sale.clone());
            // As the gateway does: a device command changes the current sale
            // (or starts one); a payment shows only on the current sale.
            let current = state.current.as_ref().map(|c| &c.external_reference);
            if !matches!(op, Op::Notify { .. }) || current == Some(&sale.external_reference) {
                state.current = Some(sale.clone());
            }
        }
        if let Outcome::Presence(p) = outcome {
            state.presence = p;
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
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn no_interleaving_pays_twice_pays_short_or_loses_a_pending_sale(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
