//! Deciding whether what Mercado Pago says about a merchant order pays a sale
//! (MP-API.md section 2, "Never trust the notification"). The facts come from
//! our own fetch of the merchant order, never from a notification's body.

use rust_decimal::Decimal;

use super::sale::{MpId, Sale, SaleState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MerchantOrderStatus {
    Opened,
    Closed,
    Expired,
    /// A status MP may add later: it closes nothing.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentStatus {
    Approved,
    /// Pending, rejected, refunded...: none counts toward the paid total.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentFacts {
    pub id: MpId,
    pub status: PaymentStatus,
    pub amount: Decimal,
    pub currency: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantOrderFacts {
    pub id: MpId,
    pub status: MerchantOrderStatus,
    pub external_reference: Option<String>,
    pub collector_id: Option<u64>,
    pub payments: Vec<PaymentFacts>,
}

impl MerchantOrderFacts {
    pub fn approved(&self) -> impl Iterator<Item = &PaymentFacts> {
        self.payments
            .iter()
            .filter(|p| p.status == PaymentStatus::Approved)
    }
}

/// Why a merchant order pays nothing. Each one is logged for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ForeignCollector {
        collector: Option<u64>,
    },
    ForeignReference {
        external_reference: Option<String>,
    },
    NotClosed {
        status: String,
    },
    NoApprovedPayment,
    CurrencyMismatch {
        expected: String,
        got: String,
    },
    ShortAmount {
        paid: Decimal,
        total: Decimal,
    },
    /// The sale was never given an amount, so nothing can have paid it.
    NoAmount,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ForeignCollector { collector } => {
                write!(
                    f,
                    "merchant order belongs to another collector ({collector:?})"
                )
            }
            Refusal::ForeignReference { external_reference } => write!(
                f,
                "merchant order's external_reference {external_reference:?} is not this sale's"
            ),
            Refusal::NotClosed { status } => {
                write!(
                    f,
                    "merchant order is {status}, not closed: it proves nothing"
                )
            }
            Refusal::NoApprovedPayment => f.write_str("merchant order has no approved payment"),
            Refusal::CurrencyMismatch { expected, got } => {
                write!(f, "payment currency {got} is not the sale's {expected}")
            }
            Refusal::ShortAmount { paid, total } => {
                write!(
                    f,
                    "approved payments add up to {paid}, short of the total {total}"
                )
            }
            Refusal::NoAmount => f.write_str("sale has no amount yet"),
        }
    }
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::ForeignCollector { .. } => "foreign_collector",
            Refusal::ForeignReference { .. } => "foreign_reference",
            Refusal::NotClosed { .. } => "not_closed",
            Refusal::NoApprovedPayment => "no_approved_payment",
            Refusal::CurrencyMismatch { .. } => "currency_mismatch",
            Refusal::ShortAmount { .. } => "short_amount",
            Refusal::NoAmount => "no_amount",
        }
    }
}

/// A merchant order that pays a sale in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub merchant_order: MpId,
    /// The approved payment reported to the device (the latest, when several
    /// add up to the total).
    pub payment_id: MpId,
    pub paid: Decimal,
    pub overpaid: bool,
}

/// Checks every condition of MP-API.md section 2 for `sale`, whatever the
/// sale's own state (the caller decides what a payment means for it).
pub fn check_payment(
    sale: &Sale,
    mo: &MerchantOrderFacts,
    collector_id: u64,
) -> Result<Payment, Refusal> {
    if mo.collector_id != Some(collector_id) {
        return Err(Refusal::ForeignCollector {
            collector: mo.collector_id,
        });
    }
    if mo.external_reference.as_deref() != Some(sale.external_reference.as_str()) {
        return Err(Refusal::ForeignReference {
            external_reference: mo.external_reference.clone(),
        });
    }
    match &mo.status {
        MerchantOrderStatus::Closed => {}
        MerchantOrderStatus::Opened => {
            return Err(Refusal::NotClosed {
                status: "opened".into(),
            })
        }
        MerchantOrderStatus::Expired => {
            return Err(Refusal::NotClosed {
                status: "expired".into(),
            })
        }
        MerchantOrderStatus::Other(s) => return Err(Refusal::NotClosed { status: s.clone() }),
    }
    let total = sale.amount.ok_or(Refusal::NoAmount)?;
    let expected = sale.currency.code();
    let mut paid = Decimal::ZERO;
    let mut latest: Option<&MpId> = None;
    for p in mo.approved() {
        match p.currency.as_deref() {
            Some(c) if c == expected => {}
            other => {
                return Err(Refusal::CurrencyMismatch {
                    expected: expected.to_owned(),
                    got: other.unwrap_or("none").to_owned(),
                })
            }
        }
        paid += p.amount;
        latest = Some(latest.map_or(&p.id, |l| l.max(&p.id)));
    }
    let payment_id = latest.cloned().ok_or(Refusal::NoApprovedPayment)?;
    if paid < total {
        return Err(Refusal::ShortAmount { paid, total });
    }
    Ok(Payment {
        merchant_order: mo.id.clone(),
        payment_id,
        paid,
        overpaid: paid > total,
    })
}

/// What a full payment means for a sale, given where the sale is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The sale was payable: it is paid now.
    Close,
    /// This very payment already closed the sale: a duplicate, harmless.
    AlreadyPaid,
    /// Money arrived for a sale that could no longer take it (cancelled,
    /// expired, or paid by another merchant order): it must be refunded.
    RefundDue,
}

pub fn effect_of(sale: &Sale, payment: &Payment) -> Effect {
    if sale.knows_merchant_order(&payment.merchant_order) {
        return Effect::AlreadyPaid;
    }
    match sale.state {
        SaleState::Pending | SaleState::InProcess => Effect::Close,
        SaleState::Paid
        | SaleState::Cancelled
        | SaleState::Expired
        | SaleState::Rejected
        | SaleState::Refunded
        | SaleState::PartiallyRefunded => Effect::RefundDue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::sale::*;
    use std::str::FromStr;

    fn sale(state: SaleState) -> Sale {
        Sale {
            external_reference: ExternalReference::parse("pump-1-abc").unwrap(),
            pos: PosId::parse("pump-1").unwrap(),
            sale_id: SaleId::parse("42").unwrap(),
            currency: Currency::Ars,
            state,
            lines: vec![],
            amount: Some(Decimal::from_str("100.00").unwrap()),
            accepted_at: 0,
            expires_at: None,
            served_at: None,
            settled: None,
            delivered_at: None,
            placed_at: None,
            mp_order: None,
            rejection: None,
            refunds: vec![],
            operator_refunds: vec![],
            updated_at: 0,
        }
    }

    fn mo(status: MerchantOrderStatus, payments: Vec<(u64, bool, &str)>) -> MerchantOrderFacts {
        MerchantOrderFacts {
            id: MpId::Num(7),
            status,
            external_reference: Some("pump-1-abc".into()),
            collector_id: Some(178),
            payments: payments
                .into_iter()
                .map(|(id, ok, amount)| PaymentFacts {
                    id: MpId::Num(id),
                    status: if ok {
                        PaymentStatus::Approved
                    } else {
                        PaymentStatus::Other("rejected".into())
                    },
                    amount: Decimal::from_str(amount).unwrap(),
                    currency: Some("ARS".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn a_closed_order_paid_in_full_pays_the_sale() {
        let p = check_payment(
            &sale(SaleState::Pending),
            &mo(MerchantOrderStatus::Closed, vec![(1, true, "100")]),
            178,
        )
        .unwrap();
        assert_eq!(p.payment_id, 1);
        assert!(!p.overpaid);
    }

    #[test]
    fn an_opened_order_proves_nothing_even_with_an_approved_payment() {
        let r = check_payment(
            &sale(SaleState::Pending),
            &mo(MerchantOrderStatus::Opened, vec![(1, true, "100")]),
            178,
        );
        assert_eq!(r.unwrap_err().code(), "not_closed");
    }

    #[test]
    fn rejected_payments_do_not_count() {
        let r = check_payment(
            &sale(SaleState::Pending),
            &mo(
                MerchantOrderStatus::Closed,
                vec![(1, false, "100"), (2, true, "50")],
            ),
            178,
        );
        assert_eq!(r.unwrap_err().code(), "short_amount");
    }

    #[test]
    fn several_approved_payments_add_up_and_more_is_an_overpayment() {
        let p = check_payment(
            &sale(SaleState::Pending),
            &mo(
                MerchantOrderStatus::Closed,
                vec![(1, true, "60"), (3, true, "60")],
            ),
            178,
        )
        .unwrap();
        assert_eq!(p.payment_id, 3);
        assert!(p.overpaid);
    }

    #[test]
    fn foreign_collectors_references_and_currencies_are_refused() {
        let s = sale(SaleState::Pending);
        let mut m = mo(MerchantOrderStatus::Closed, vec![(1, true, "100")]);
        assert_eq!(
            check_payment(&s, &m, 999).unwrap_err().code(),
            "foreign_collector"
        );
        m.external_reference = Some("other".into());
        assert_eq!(
            check_payment(&s, &m, 178).unwrap_err().code(),
            "foreign_reference"
        );
        let mut m = mo(MerchantOrderStatus::Closed, vec![(1, true, "100")]);
        m.payments[0].currency = Some("BRL".into());
        assert_eq!(
            check_payment(&s, &m, 178).unwrap_err().code(),
            "currency_mismatch"
        );
    }

    #[test]
    fn what_a_payment_means_depends_on_the_sale() {
        let m = mo(MerchantOrderStatus::Closed, vec![(1, true, "100")]);
        let p = check_payment(&sale(SaleState::Pending), &m, 178).unwrap();
        assert_eq!(effect_of(&sale(SaleState::Pending), &p), Effect::Close);
        assert_eq!(
            effect_of(&sale(SaleState::Cancelled), &p),
            Effect::RefundDue
        );
        assert_eq!(effect_of(&sale(SaleState::Expired), &p), Effect::RefundDue);
        let mut paid = sale(SaleState::Paid);
        paid.settled = Some(Settled {
            payment_id: MpId::Num(1),
            merchant_order: MpId::Num(7),
            paid: Decimal::from(100),
            at: 0,
        });
        assert_eq!(effect_of(&paid, &p), Effect::AlreadyPaid);
        let other = Payment {
            merchant_order: MpId::Num(8),
            ..p
        };
        assert_eq!(effect_of(&paid, &other), Effect::RefundDue);
    }
}
