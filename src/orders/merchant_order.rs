//! Deciding whether what Mercado Pago says about a merchant order pays a sale
//! (docs/mercadopago.md, "Never trust a notification"). The facts come from
//! our own fetch of the merchant order, never from a notification's body.

use rust_decimal::Decimal;

use super::ledger::Approved;
use super::sale::{MpId, Sale};

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
    /// Mercado Pago's `date_approved`, which orders a sale's payments.
    pub approved_at: Option<i64>,
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
pub enum Unpaid {
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

impl std::fmt::Display for Unpaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unpaid::ForeignCollector { collector } => {
                write!(
                    f,
                    "merchant order belongs to another collector ({collector:?})"
                )
            }
            Unpaid::ForeignReference { external_reference } => write!(
                f,
                "merchant order's external_reference {external_reference:?} is not this sale's"
            ),
            Unpaid::NotClosed { status } => {
                write!(
                    f,
                    "merchant order is {status}, not closed: it proves nothing"
                )
            }
            Unpaid::NoApprovedPayment => f.write_str("merchant order has no approved payment"),
            Unpaid::CurrencyMismatch { expected, got } => {
                write!(f, "payment currency {got} is not the sale's {expected}")
            }
            Unpaid::ShortAmount { paid, total } => {
                write!(
                    f,
                    "approved payments add up to {paid}, short of the total {total}"
                )
            }
            Unpaid::NoAmount => f.write_str("sale has no amount yet"),
        }
    }
}

impl Unpaid {
    pub fn code(&self) -> &'static str {
        match self {
            Unpaid::ForeignCollector { .. } => "foreign_collector",
            Unpaid::ForeignReference { .. } => "foreign_reference",
            Unpaid::NotClosed { .. } => "not_closed",
            Unpaid::NoApprovedPayment => "no_approved_payment",
            Unpaid::CurrencyMismatch { .. } => "currency_mismatch",
            Unpaid::ShortAmount { .. } => "short_amount",
            Unpaid::NoAmount => "no_amount",
        }
    }
}

/// Checks who a merchant order belongs to (docs/mercadopago.md): our
/// collector, this sale's reference, the sale's currency. Its approved
/// payments, for the ledger; whether they pay the sale is the ledger's rule.
pub fn verify(
    sale: &Sale,
    mo: &MerchantOrderFacts,
    collector_id: u64,
) -> Result<Vec<Approved>, Unpaid> {
    if mo.collector_id != Some(collector_id) {
        return Err(Unpaid::ForeignCollector {
            collector: mo.collector_id,
        });
    }
    if mo.external_reference.as_deref() != Some(sale.external_reference.as_str()) {
        return Err(Unpaid::ForeignReference {
            external_reference: mo.external_reference.clone(),
        });
    }
    let expected = sale.currency.code();
    // A report without the amount paid counts as nothing paid: it records
    // nothing, so a later report with the amount is not taken for a repeat.
    mo.approved()
        .filter(|p| p.amount > Decimal::ZERO)
        .map(|p| match p.currency.as_deref() {
            Some(c) if c == expected => Ok(Approved {
                id: p.id.clone(),
                merchant_order: mo.id.clone(),
                amount: p.amount,
                approved_at: p.approved_at,
            }),
            other => Err(Unpaid::CurrencyMismatch {
                expected: expected.to_owned(),
                got: other.unwrap_or("none").to_owned(),
            }),
        })
        .collect()
}

/// Why a verified merchant order closes nothing (its approved payments,
/// if any, are held by the sale meanwhile).
pub fn why_not_closing(sale: &Sale, mo: &MerchantOrderFacts, approved: &[Approved]) -> Unpaid {
    match &mo.status {
        MerchantOrderStatus::Closed => {}
        MerchantOrderStatus::Opened => {
            return Unpaid::NotClosed {
                status: "opened".into(),
            }
        }
        MerchantOrderStatus::Expired => {
            return Unpaid::NotClosed {
                status: "expired".into(),
            }
        }
        MerchantOrderStatus::Other(s) => return Unpaid::NotClosed { status: s.clone() },
    }
    let Some(total) = sale.amount else {
        return Unpaid::NoAmount;
    };
    if approved.is_empty() {
        return Unpaid::NoApprovedPayment;
    }
    Unpaid::ShortAmount {
        paid: approved.iter().map(|p| p.amount).sum(),
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::orders::sale::*;
    use std::str::FromStr;

    fn sale() -> Sale {
        Sale {
            external_reference: ExternalReference::parse("pump-1-abc").unwrap(),
            pos: PosId::parse("pump-1").unwrap(),
            sale_id: SaleId::parse("42").unwrap(),
            currency: Currency::Ars,
            state: SaleState::Pending,
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
            ledger: Default::default(),
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
                    approved_at: None,
                })
                .collect(),
        }
    }

    #[test]
    fn only_approved_payments_of_our_collector_reference_and_currency_count() {
        let s = sale();
        let m = mo(
            MerchantOrderStatus::Closed,
            vec![(1, false, "100"), (2, true, "50")],
        );
        let approved = verify(&s, &m, 178).unwrap();
        assert_eq!(approved.len(), 1);
        assert_eq!(approved[0].id, MpId::Num(2));
        assert_eq!(approved[0].merchant_order, MpId::Num(7));
        assert_eq!(why_not_closing(&s, &m, &approved).code(), "short_amount");
        assert_eq!(verify(&s, &m, 999).unwrap_err().code(), "foreign_collector");
        let mut m2 = m.clone();
        m2.external_reference = Some("other".into());
        assert_eq!(
            verify(&s, &m2, 178).unwrap_err().code(),
            "foreign_reference"
        );
        let mut m3 = m.clone();
        m3.payments[1].currency = Some("BRL".into());
        assert_eq!(
            verify(&s, &m3, 178).unwrap_err().code(),
            "currency_mismatch"
        );
    }

    #[test]
    fn an_opened_order_proves_nothing_even_with_an_approved_payment() {
        let s = sale();
        let m = mo(MerchantOrderStatus::Opened, vec![(1, true, "100")]);
        let approved = verify(&s, &m, 178).unwrap();
        assert_eq!(why_not_closing(&s, &m, &approved).code(), "not_closed");
    }
}
