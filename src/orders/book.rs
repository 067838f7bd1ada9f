//! The order book's rules: what each device message, each tick of the clock
//! and each payment does to one POS. Pure functions of (POS, state, command,
//! clock): the caller stores the outcome before it makes it visible.

use rust_decimal::Decimal;

use super::sale::*;
use super::settle::{effect_of, Effect, Payment};
use crate::money::{self, Amount, Currency, MoneyError};

/// A POS as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosConfig {
    pub id: PosId,
    pub kind: PosKind,
    pub currency: Currency,
    /// Seconds a sale stays payable; `None` never expires.
    pub ttl_secs: Option<u64>,
    pub max_amount: Decimal,
    /// How Mercado Pago learns of this POS's sales.
    pub mode: PosMode,
    /// This POS's `external_id` at Mercado Pago: letters and digits only.
    pub mp_external_id: String,
    /// The external id of the store it belongs to at Mercado Pago.
    pub store: Option<String>,
}

impl PosConfig {
    /// An unattended v1 POS with the default limits; the rest is set by
    /// the caller.
    pub fn new(id: PosId, kind: PosKind, currency: Currency) -> PosConfig {
        PosConfig {
            mp_external_id: mp_external_id(&id),
            id,
            kind,
            currency,
            ttl_secs: Some(600),
            max_amount: Decimal::from(10_000_000),
            mode: PosMode::Unattended(PollProtocol::V1),
            store: None,
        }
    }
}

/// Mercado Pago's POS `external_id` allows letters and digits only: the
/// default is the POS id without its other characters.
pub fn mp_external_id(id: &PosId) -> String {
    id.as_str()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// Which poll answer an unattended POS's account is set up for (MP-API.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollProtocol {
    V1,
    V2,
}

/// Unattended: Mercado Pago polls the POS's URL. Attended: qrgate places the
/// order on the POS through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PosMode {
    Unattended(PollProtocol),
    Attended,
}

/// Whether the device speaks, as far as its retained `status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Never published `status`: treated as online (CONTRACT-NOTES).
    Unknown,
    Online {
        since: UnixMillis,
    },
    Offline {
        since: UnixMillis,
    },
}

impl Presence {
    pub fn is_offline(self) -> bool {
        matches!(self, Presence::Offline { .. })
    }
}

/// One POS: its device's presence and its current (or last) sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosState {
    pub presence: Presence,
    pub current: Option<Sale>,
}

impl PosState {
    pub fn idle() -> PosState {
        PosState {
            presence: Presence::Unknown,
            current: None,
        }
    }

    pub fn busy_sale(&self) -> Option<&Sale> {
        self.current.as_ref().filter(|s| s.state.is_busy())
    }
}

/// A line as the device sent it, before the money rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRequest {
    pub title: String,
    pub description: Option<String>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub unit_measure: Option<String>,
    pub sku: Option<String>,
    pub category: Option<String>,
    pub taxes: Vec<Tax>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleRequest {
    pub sale_id: SaleId,
    pub lines: Vec<LineRequest>,
    pub amount: Option<Decimal>,
}

/// What happens at a POS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Sale(SaleRequest),
    Progress(SaleId),
    Cancel(SaleId),
    Presence {
        online: bool,
    },
    Delivered {
        sale_id: SaleId,
        ok: bool,
        reason: Option<String>,
    },
    /// A poll handed this sale to Mercado Pago.
    Served(ExternalReference),
    /// Mercado Pago accepted the attended order for this sale; `order` is
    /// the Orders API's id for it.
    Placed {
        reference: ExternalReference,
        order: Option<String>,
    },
    /// Mercado Pago refused the attended order for this sale, for good.
    Refused {
        reference: ExternalReference,
        reason: String,
    },
    Expire,
    /// The operator cancels this pending (or in-process) sale; `by` says who.
    CancelByOperator {
        reference: ExternalReference,
        by: String,
    },
    /// Mercado Pago's Orders API took a new order for this pending sale
    /// before the old one expired: `order` is the one to cancel or look up
    /// from now on.
    Replaced {
        reference: ExternalReference,
        order: String,
    },
}

/// Why a device message changed nothing. `code` is the stable word devices
/// and operators match on; `Display` says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Busy { current: SaleId },
    BadMessage(String),
    BadAmount(MoneyError),
    AmountMismatch { amount: Decimal, lines: Decimal },
    OverMaxAmount { amount: Decimal, max: Decimal },
    UnknownSale,
    NotCancellable { state: SaleState },
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Busy { .. } => "busy",
            Rejection::BadMessage(_) => "bad_message",
            Rejection::BadAmount(_) => "bad_amount",
            Rejection::AmountMismatch { .. } => "amount_mismatch",
            Rejection::OverMaxAmount { .. } => "over_max_amount",
            Rejection::UnknownSale => "unknown_sale",
            Rejection::NotCancellable { .. } => "not_cancellable",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Busy { current } => {
                write!(f, "sale {current} is still in flight on this POS")
            }
            Rejection::BadMessage(m) => f.write_str(m),
            Rejection::BadAmount(e) => write!(f, "{e}"),
            Rejection::AmountMismatch { amount, lines } => {
                write!(
                    f,
                    "amount {amount} differs from the sum of the lines {lines}"
                )
            }
            Rejection::OverMaxAmount { amount, max } => {
                write!(f, "amount {amount} is over this POS's max_amount {max}")
            }
            Rejection::UnknownSale => f.write_str("no such sale on this POS"),
            Rejection::NotCancellable { state } => {
                write!(
                    f,
                    "the sale is {} and can no longer be cancelled",
                    state.as_str()
                )
            }
        }
    }
}

/// A change to a sale that must be stored, then published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleEvent {
    Accepted,
    Priced,
    Served,
    Paid {
        overpaid: bool,
    },
    Cancelled,
    Expired,
    Delivered {
        ok: bool,
        reason: Option<String>,
    },
    RefundDue,
    /// Mercado Pago refunded `payment_id`.
    Refunded {
        payment_id: MpId,
    },
    /// The attended order is on the POS at Mercado Pago.
    Placed,
    /// Mercado Pago refused the attended order.
    Refused {
        reason: String,
    },
    /// The operator cancelled the sale.
    CancelledByOperator {
        by: String,
    },
    /// The operator refunded `amount` of the paid sale.
    RefundedByOperator {
        amount: Decimal,
        by: String,
    },
}

impl SaleEvent {
    pub fn name(&self) -> &'static str {
        match self {
            SaleEvent::Accepted => "accepted",
            SaleEvent::Priced => "priced",
            SaleEvent::Served => "served",
            SaleEvent::Paid { .. } => "paid",
            SaleEvent::Cancelled => "cancelled",
            SaleEvent::Expired => "expired",
            SaleEvent::Delivered { .. } => "delivered",
            SaleEvent::RefundDue => "refund_due",
            SaleEvent::Refunded { .. } => "refunded",
            SaleEvent::Placed => "placed",
            SaleEvent::Refused { .. } => "refused",
            SaleEvent::CancelledByOperator { .. } => "cancelled_by_operator",
            SaleEvent::RefundedByOperator { .. } => "refunded_by_operator",
        }
    }
}

// An outcome lives for one command and is moved once: boxing the sale would
// only add an allocation per device message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sale changed: store it, then publish its state.
    Changed { sale: Sale, event: SaleEvent },
    /// A redelivery: republish the current state, store nothing.
    Republish,
    /// Refused; the current sale is untouched.
    Rejected {
        sale_id: Option<SaleId>,
        why: Rejection,
    },
    /// Only presence changed.
    Presence(Presence),
    /// Nothing to do.
    Nothing,
}

/// The clock and the randomness a command may need, passed in.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: UnixMillis,
    pub random: u32,
    /// `[orders] auto_refund`, fixed on each refund as it comes due.
    pub auto_refund: bool,
}

fn expiry(pos: &PosConfig, now: UnixMillis) -> Option<UnixMillis> {
    pos.ttl_secs
        .filter(|&t| t > 0)
        .map(|t| now.saturating_add((t as i64).saturating_mul(1000)))
}

/// Applies money rules to a sale request: per-line totals rounded half-up,
/// the amount (when sent) equal to their sum, within the POS's bounds.
pub fn price(pos: &PosConfig, req: &SaleRequest) -> Result<(Vec<Line>, Amount), Rejection> {
    if req.lines.is_empty() {
        return Err(Rejection::BadMessage(
            "a sale needs at least one item".into(),
        ));
    }
    let mut total = Amount::zero(pos.currency);
    let mut lines = Vec::with_capacity(req.lines.len());
    for l in &req.lines {
        let quantity = money::quantity(l.quantity).map_err(Rejection::BadAmount)?;
        let unit_price =
            money::unit_price(l.unit_price, pos.currency).map_err(Rejection::BadAmount)?;
        let line_total = money::line_total(quantity, unit_price, pos.currency);
        if line_total.value() <= Decimal::ZERO {
            return Err(Rejection::BadAmount(MoneyError::NotPositive {
                what: "line total",
                value: line_total.value(),
            }));
        }
        total = total
            .checked_add(line_total)
            .ok_or_else(|| Rejection::BadMessage("mixed currencies".into()))?;
        lines.push(Line {
            title: l.title.clone(),
            description: l.description.clone(),
            quantity,
            unit_price,
            unit_measure: l.unit_measure.clone(),
            sku: l.sku.clone(),
            category: l.category.clone(),
            taxes: l.taxes.clone(),
            total: line_total.value(),
        });
    }
    if let Some(sent) = req.amount {
        let sent = money::amount(sent, pos.currency).map_err(Rejection::BadAmount)?;
        if sent != total {
            return Err(Rejection::AmountMismatch {
                amount: sent.value(),
                lines: total.value(),
            });
        }
    }
    if total.value() > pos.max_amount {
        return Err(Rejection::OverMaxAmount {
            amount: total.value(),
            max: pos.max_amount,
        });
    }
    Ok((lines, total))
}

fn new_sale(pos: &PosConfig, sale_id: SaleId, ctx: Ctx) -> Sale {
    Sale {
        external_reference: ExternalReference::generate(&pos.id, ctx.now, ctx.random),
        pos: pos.id.clone(),
        sale_id,
        currency: pos.currency,
        state: SaleState::InProcess,
        lines: Vec::new(),
        amount: None,
        accepted_at: ctx.now,
        expires_at: expiry(pos, ctx.now),
        served_at: None,
        settled: None,
        delivered_at: None,
        placed_at: None,
        mp_order: None,
        rejection: None,
        refunds: Vec::new(),
        operator_refunds: Vec::new(),
        updated_at: ctx.now,
    }
}

fn rejected(sale_id: &SaleId, why: Rejection) -> Outcome {
    Outcome::Rejected {
        sale_id: Some(sale_id.clone()),
        why,
    }
}

/// The order book's one rule set.
pub fn apply(pos: &PosConfig, state: &PosState, cmd: Command, ctx: Ctx) -> Outcome {
    let current = state.current.as_ref();
    let is_current = |id: &SaleId| current.is_some_and(|s| &s.sale_id == id);
    match cmd {
        Command::Sale(req) => {
            // The same sale_id as the latest sale is a redelivery, unless it
            // prices the sale the device announced with `progress`.
            let pricing =
                current.filter(|s| s.sale_id == req.sale_id && s.state == SaleState::InProcess);
            if pricing.is_none() && is_current(&req.sale_id) {
                return Outcome::Republish;
            }
            // A broken sale is refused for what is wrong with it, even on a
            // busy POS: that is what the device must fix.
            let (lines, total) = match price(pos, &req) {
                Ok(p) => p,
                Err(why) => return rejected(&req.sale_id, why),
            };
            if let Some(busy) = state.busy_sale().filter(|_| pricing.is_none()) {
                return rejected(
                    &req.sale_id,
                    Rejection::Busy {
                        current: busy.sale_id.clone(),
                    },
                );
            }
            let (mut sale, event) = match pricing {
                Some(s) => (s.clone(), SaleEvent::Priced),
                None => (new_sale(pos, req.sale_id, ctx), SaleEvent::Accepted),
            };
            sale.state = SaleState::Pending;
            sale.lines = lines;
            sale.amount = Some(total.value());
            sale.expires_at = expiry(pos, ctx.now);
            sale.updated_at = ctx.now;
            Outcome::Changed { sale, event }
        }
        Command::Progress(sale_id) => {
            if is_current(&sale_id) {
                return Outcome::Republish;
            }
            if let Some(busy) = state.busy_sale() {
                return rejected(
                    &sale_id,
                    Rejection::Busy {
                        current: busy.sale_id.clone(),
                    },
                );
            }
            Outcome::Changed {
                sale: new_sale(pos, sale_id, ctx),
                event: SaleEvent::Accepted,
            }
        }
        Command::Cancel(sale_id) => match current.filter(|s| s.sale_id == sale_id) {
            None => rejected(&sale_id, Rejection::UnknownSale),
            Some(s) if s.state.is_busy() => {
                let mut sale = s.clone();
                sale.state = SaleState::Cancelled;
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Cancelled,
                }
            }
            // A repeated cancel of a cancelled sale is a redelivery.
            Some(s) if s.state == SaleState::Cancelled => Outcome::Republish,
            Some(s) => rejected(&sale_id, Rejection::NotCancellable { state: s.state }),
        },
        Command::Presence { online } => {
            let presence = if online {
                Presence::Online { since: ctx.now }
            } else {
                Presence::Offline { since: ctx.now }
            };
            if state.presence.is_offline() != online && state.presence != Presence::Unknown {
                return Outcome::Nothing;
            }
            Outcome::Presence(presence)
        }
        Command::Delivered {
            sale_id,
            ok,
            reason,
        } => match current.filter(|s| s.sale_id == sale_id) {
            Some(s) => deliver(s, ok, reason, ctx),
            None => rejected(&sale_id, Rejection::UnknownSale),
        },
        Command::Served(reference) => match current {
            Some(s)
                if s.external_reference == reference
                    && s.state == SaleState::Pending
                    && s.served_at.is_none() =>
            {
                let mut sale = s.clone();
                sale.served_at = Some(ctx.now);
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Served,
                }
            }
            _ => Outcome::Nothing,
        },
        Command::Placed { reference, order } => match current {
            Some(s)
                if s.external_reference == reference
                    && s.state == SaleState::Pending
                    && s.placed_at.is_none() =>
            {
                let mut sale = s.clone();
                sale.placed_at = Some(ctx.now);
                sale.mp_order = order;
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Placed,
                }
            }
            _ => Outcome::Nothing,
        },
        Command::Refused { reference, reason } => match state.busy_sale() {
            Some(s) if s.external_reference == reference => {
                let mut sale = s.clone();
                sale.state = SaleState::Rejected;
                sale.rejection = Some(reason.clone());
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Refused { reason },
                }
            }
            _ => Outcome::Nothing,
        },
        Command::Expire => match state.busy_sale() {
            Some(s) if s.expires_at.is_some_and(|at| at <= ctx.now) => {
                let mut sale = s.clone();
                sale.state = SaleState::Expired;
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Expired,
                }
            }
            _ => Outcome::Nothing,
        },
        Command::CancelByOperator { reference, by } => match current {
            Some(s) if s.external_reference == reference && s.state.is_busy() => {
                let mut sale = s.clone();
                sale.state = SaleState::Cancelled;
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::CancelledByOperator { by },
                }
            }
            Some(s) if s.external_reference == reference => {
                rejected(&s.sale_id, Rejection::NotCancellable { state: s.state })
            }
            _ => Outcome::Rejected {
                sale_id: None,
                why: Rejection::UnknownSale,
            },
        },
        // Stored as `Placed`: the sale has an order on its POS again. It
        // keeps its first `placed_at`, which reconciliation counts from.
        Command::Replaced { reference, order } => match current {
            Some(s) if s.external_reference == reference && s.state == SaleState::Pending => {
                let mut sale = s.clone();
                sale.mp_order = Some(order);
                sale.updated_at = ctx.now;
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Placed,
                }
            }
            _ => Outcome::Nothing,
        },
    }
}

/// Why the operator's refund of a sale is refused. `code` is the stable
/// word of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundRefusal {
    /// Only a paid sale (or one partly refunded) can be refunded.
    NotPaid {
        state: SaleState,
    },
    /// More than what is left to refund.
    ExceedsPaid {
        asked: Decimal,
        left: Decimal,
    },
    BadAmount(MoneyError),
}

impl RefundRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            RefundRefusal::NotPaid { .. } => "not_refundable",
            RefundRefusal::ExceedsPaid { .. } => "refund_exceeds_paid",
            RefundRefusal::BadAmount(_) => "bad_amount",
        }
    }
}

impl std::fmt::Display for RefundRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefundRefusal::NotPaid { state } => write!(
                f,
                "the sale is {}: only a paid sale can be refunded",
                state.as_str()
            ),
            RefundRefusal::ExceedsPaid { asked, left } => write!(
                f,
                "the refund {asked} exceeds what is left to refund ({left})"
            ),
            RefundRefusal::BadAmount(e) => write!(f, "{e}"),
        }
    }
}

/// What an operator's refund of `sale` would return: `asked`, or all that
/// is left when `None` (a full refund). Checked before Mercado Pago is
/// asked, and again when its answer is recorded.
pub fn refundable(sale: &Sale, asked: Option<Decimal>) -> Result<Decimal, RefundRefusal> {
    let paid = match (sale.state, &sale.settled) {
        (SaleState::Paid | SaleState::PartiallyRefunded, Some(s)) => s.paid,
        (state, _) => return Err(RefundRefusal::NotPaid { state }),
    };
    let left = paid - sale.refunded_total();
    if left <= Decimal::ZERO {
        return Err(RefundRefusal::NotPaid {
            state: SaleState::Refunded,
        });
    }
    let Some(asked) = asked else {
        return Ok(left);
    };
    let asked = money::amount(asked, sale.currency)
        .map_err(RefundRefusal::BadAmount)?
        .value();
    if asked > left {
        return Err(RefundRefusal::ExceedsPaid { asked, left });
    }
    Ok(asked)
}

/// Records a refund Mercado Pago made for the operator: the sale is
/// `refunded` once all that was paid went back, `partially_refunded` before.
pub fn operator_refund(sale: &Sale, refund: OperatorRefund) -> Result<Outcome, RefundRefusal> {
    refundable(sale, Some(refund.amount))?;
    let mut s = sale.clone();
    let (amount, by, now) = (refund.amount, refund.by.clone(), refund.at);
    s.operator_refunds.push(refund);
    let paid = s.settled.as_ref().map_or(Decimal::ZERO, |p| p.paid);
    s.state = if s.refunded_total() >= paid {
        SaleState::Refunded
    } else {
        SaleState::PartiallyRefunded
    };
    s.updated_at = now;
    Ok(Outcome::Changed {
        sale: s,
        event: SaleEvent::RefundedByOperator { amount, by },
    })
}

/// The device says it acted (or failed to act) on a paid sale, current or
/// not: MQTT does not order `delivered` against the device's next `sale`.
pub fn deliver(s: &Sale, ok: bool, reason: Option<String>, ctx: Ctx) -> Outcome {
    match s.state {
        SaleState::Paid if s.delivered_at.is_none() => {
            let mut sale = s.clone();
            sale.delivered_at = Some(ctx.now);
            sale.updated_at = ctx.now;
            // The customer paid and got nothing: the payment is owed back.
            if let (false, Some(paid)) = (ok, &s.settled) {
                sale.refunds.push(RefundDue {
                    payment_id: paid.payment_id.clone(),
                    merchant_order: paid.merchant_order.clone(),
                    amount: paid.paid,
                    at: ctx.now,
                    reason: RefundReason::DeliveryFailed,
                    auto: ctx.auto_refund,
                    refunded: None,
                });
            }
            Outcome::Changed {
                sale,
                event: SaleEvent::Delivered { ok, reason },
            }
        }
        SaleState::Paid => Outcome::Nothing,
        state => rejected(
            &s.sale_id,
            Rejection::BadMessage(format!(
                "delivered for a sale that is {}, not paid",
                state.as_str()
            )),
        ),
    }
}

/// Records that Mercado Pago refunded `payment_id` of `sale`; `None` when
/// it is not owed or already refunded.
pub fn refunded(
    sale: &Sale,
    payment_id: &MpId,
    refund_id: MpId,
    now: UnixMillis,
) -> Option<Outcome> {
    let mut s = sale.clone();
    let r = s
        .refunds
        .iter_mut()
        .find(|r| &r.payment_id == payment_id && r.refunded.is_none())?;
    r.refunded = Some(Refunded { refund_id, at: now });
    s.updated_at = now;
    Some(Outcome::Changed {
        sale: s,
        event: SaleEvent::Refunded {
            payment_id: payment_id.clone(),
        },
    })
}

/// What a verified full payment does to a sale (current or not).
pub fn pay(sale: &Sale, payment: &Payment, ctx: Ctx) -> Outcome {
    let now = ctx.now;
    match effect_of(sale, payment) {
        Effect::AlreadyPaid => Outcome::Nothing,
        Effect::Close => {
            let mut s = sale.clone();
            s.state = SaleState::Paid;
            s.settled = Some(Settled {
                payment_id: payment.payment_id.clone(),
                merchant_order: payment.merchant_order.clone(),
                paid: payment.paid,
                at: now,
            });
            s.updated_at = now;
            Outcome::Changed {
                sale: s,
                event: SaleEvent::Paid {
                    overpaid: payment.overpaid,
                },
            }
        }
        Effect::RefundDue => {
            let mut s = sale.clone();
            s.refunds.push(RefundDue {
                payment_id: payment.payment_id.clone(),
                merchant_order: payment.merchant_order.clone(),
                amount: payment.paid,
                at: now,
                reason: if sale.state == SaleState::Paid {
                    RefundReason::DoublePayment
                } else {
                    RefundReason::LatePayment
                },
                auto: ctx.auto_refund,
                refunded: None,
            });
            s.updated_at = now;
            Outcome::Changed {
                sale: s,
                event: SaleEvent::RefundDue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn pos(kind: PosKind) -> PosConfig {
        PosConfig {
            max_amount: Decimal::from(1_000_000),
            ..PosConfig::new(PosId::parse("pump-1").unwrap(), kind, Currency::Ars)
        }
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn sid(s: &str) -> SaleId {
        SaleId::parse(s).unwrap()
    }

    fn ctx(now: i64) -> Ctx {
        Ctx {
            now,
            random: 7,
            auto_refund: false,
        }
    }

    fn sale_req(id: &str, qty: &str, price: &str, amount: Option<&str>) -> SaleRequest {
        SaleRequest {
            sale_id: sid(id),
            lines: vec![LineRequest {
                title: "Super 95".into(),
                description: None,
                quantity: d(qty),
                unit_price: d(price),
                unit_measure: Some("litre".into()),
                sku: None,
                category: None,
                taxes: Vec::new(),
            }],
            amount: amount.map(d),
        }
    }

    /// Applies and, when the sale changed, makes it current (as the caller
    /// does after storing it).
    fn step(p: &PosConfig, st: &mut PosState, cmd: Command, now: i64) -> Outcome {
        let out = apply(p, st, cmd, ctx(now));
        match &out {
            Outcome::Changed { sale, .. } => st.current = Some(sale.clone()),
            Outcome::Presence(pr) => st.presence = *pr,
            _ => {}
        }
        out
    }

    #[test]
    fn a_sale_on_an_idle_pos_is_pending_with_its_amount() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        let out = step(
            &p,
            &mut st,
            Command::Sale(sale_req("42", "32.10", "798.00", Some("25615.80"))),
            1000,
        );
        let Outcome::Changed { sale, event } = out else {
            panic!("{out:?}")
        };
        assert_eq!(event, SaleEvent::Accepted);
        assert_eq!(sale.state, SaleState::Pending);
        assert_eq!(sale.amount, Some(d("25615.80")));
        assert_eq!(sale.expires_at, Some(1000 + 600_000));
    }

    #[test]
    fn a_second_sale_while_one_is_pending_is_busy_and_the_same_id_is_a_redelivery() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        let before = st.clone();
        let out = step(
            &p,
            &mut st,
            Command::Sale(sale_req("2", "1", "10", None)),
            1,
        );
        assert!(matches!(
            out,
            Outcome::Rejected {
                why: Rejection::Busy { .. },
                ..
            }
        ));
        assert_eq!(
            step(
                &p,
                &mut st,
                Command::Sale(sale_req("1", "1", "10", None)),
                2
            ),
            Outcome::Republish
        );
        assert_eq!(st, before);
    }

    #[test]
    fn progress_then_sale_prices_the_same_sale_and_keeps_its_reference() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        let Outcome::Changed { sale: started, .. } =
            step(&p, &mut st, Command::Progress(sid("9")), 0)
        else {
            panic!()
        };
        assert_eq!(started.state, SaleState::InProcess);
        assert_eq!(
            step(&p, &mut st, Command::Progress(sid("9")), 1),
            Outcome::Republish
        );
        assert!(matches!(
            step(&p, &mut st, Command::Progress(sid("10")), 1),
            Outcome::Rejected {
                why: Rejection::Busy { .. },
                ..
            }
        ));
        let Outcome::Changed { sale, event } =
            step(&p, &mut st, Command::Sale(sale_req("9", "2", "5", None)), 2)
        else {
            panic!()
        };
        assert_eq!(event, SaleEvent::Priced);
        assert_eq!(sale.external_reference, started.external_reference);
        assert_eq!(sale.amount, Some(d("10.00")));
    }

    #[test]
    fn money_errors_reject_without_touching_the_pending_sale() {
        let p = pos(PosKind::Vending);
        let mut st = PosState::idle();
        for (req, code) in [
            (sale_req("1", "0", "10", None), "bad_amount"),
            (sale_req("1", "1", "-10", None), "bad_amount"),
            (sale_req("1", "1", "10.001", None), "bad_amount"),
            (sale_req("1", "1", "10", Some("10.001")), "bad_amount"),
            (sale_req("1", "1", "10", Some("11")), "amount_mismatch"),
            (sale_req("1", "1", "2000000", None), "over_max_amount"),
        ] {
            match step(&p, &mut st, Command::Sale(req), 0) {
                Outcome::Rejected { why, .. } => assert_eq!(why.code(), code),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(st, PosState::idle());
    }

    #[test]
    fn cancel_ends_a_pending_sale_and_frees_the_pos() {
        let p = pos(PosKind::Vending);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        assert!(matches!(
            step(&p, &mut st, Command::Cancel(sid("2")), 1),
            Outcome::Rejected {
                why: Rejection::UnknownSale,
                ..
            }
        ));
        assert!(matches!(
            step(&p, &mut st, Command::Cancel(sid("1")), 1),
            Outcome::Changed {
                event: SaleEvent::Cancelled,
                ..
            }
        ));
        assert_eq!(
            step(&p, &mut st, Command::Cancel(sid("1")), 2),
            Outcome::Republish
        );
        assert!(matches!(
            step(
                &p,
                &mut st,
                Command::Sale(sale_req("2", "1", "10", None)),
                3
            ),
            Outcome::Changed {
                event: SaleEvent::Accepted,
                ..
            }
        ));
    }

    #[test]
    fn sales_expire_after_their_ttl_and_never_with_ttl_zero() {
        let p = pos(PosKind::Vending);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        assert_eq!(
            step(&p, &mut st, Command::Expire, 599_999),
            Outcome::Nothing
        );
        assert!(matches!(
            step(&p, &mut st, Command::Expire, 600_000),
            Outcome::Changed {
                event: SaleEvent::Expired,
                ..
            }
        ));
        let never = PosConfig {
            ttl_secs: None,
            ..pos(PosKind::Fuel)
        };
        let mut st = PosState::idle();
        step(
            &never,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        assert_eq!(
            step(&never, &mut st, Command::Expire, i64::MAX),
            Outcome::Nothing
        );
    }

    #[test]
    fn a_payment_closes_a_pending_sale_once_and_is_refund_due_after_cancel() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        let payment = Payment {
            merchant_order: MpId::Num(5),
            payment_id: MpId::Num(6),
            paid: d("10"),
            overpaid: false,
        };
        let sale = st.current.clone().unwrap();
        let Outcome::Changed { sale: paid, .. } = pay(&sale, &payment, ctx(1)) else {
            panic!()
        };
        assert_eq!(paid.state, SaleState::Paid);
        assert_eq!(pay(&paid, &payment, ctx(2)), Outcome::Nothing);

        let mut cancelled = sale.clone();
        cancelled.state = SaleState::Cancelled;
        let Outcome::Changed { sale: due, event } = pay(&cancelled, &payment, ctx(3)) else {
            panic!()
        };
        assert_eq!(event, SaleEvent::RefundDue);
        assert_eq!(due.state, SaleState::Cancelled);
        assert_eq!(pay(&due, &payment, ctx(4)), Outcome::Nothing);
    }

    #[test]
    fn delivered_marks_a_paid_sale_once() {
        let p = pos(PosKind::Vending);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        let delivered = Command::Delivered {
            sale_id: sid("1"),
            ok: true,
            reason: None,
        };
        assert!(matches!(
            step(&p, &mut st, delivered.clone(), 1),
            Outcome::Rejected { .. }
        ));
        let mut s = st.current.clone().unwrap();
        s.state = SaleState::Paid;
        st.current = Some(s);
        assert!(matches!(
            step(&p, &mut st, delivered.clone(), 2),
            Outcome::Changed {
                event: SaleEvent::Delivered { ok: true, .. },
                ..
            }
        ));
        assert_eq!(step(&p, &mut st, delivered, 3), Outcome::Nothing);
    }

    #[test]
    fn presence_changes_are_reported_once() {
        let p = pos(PosKind::Vending);
        let mut st = PosState::idle();
        assert!(matches!(
            step(&p, &mut st, Command::Presence { online: true }, 1),
            Outcome::Presence(Presence::Online { since: 1 })
        ));
        assert_eq!(
            step(&p, &mut st, Command::Presence { online: true }, 2),
            Outcome::Nothing
        );
        assert!(matches!(
            step(&p, &mut st, Command::Presence { online: false }, 3),
            Outcome::Presence(Presence::Offline { since: 3 })
        ));
    }

    fn paid_sale(total: &str) -> Sale {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("9", "1", total, None)),
            1,
        );
        let mut s = st.current.unwrap();
        s.state = SaleState::Paid;
        s.settled = Some(Settled {
            payment_id: MpId::Num(77),
            merchant_order: MpId::Num(88),
            paid: d(total),
            at: 2,
        });
        s
    }

    fn op_refund(amount: &str, at: i64) -> OperatorRefund {
        OperatorRefund {
            refund_id: MpId::Num(at as u64),
            payment_id: MpId::Num(77),
            amount: d(amount),
            at,
            by: "token".into(),
        }
    }

    fn changed(o: Outcome) -> Sale {
        match o {
            Outcome::Changed { sale, .. } => sale,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn a_full_refund_returns_all_that_was_paid_and_the_sale_is_refunded() {
        let s = paid_sale("100.00");
        assert_eq!(refundable(&s, None), Ok(d("100.00")));
        let s = changed(operator_refund(&s, op_refund("100.00", 5)).unwrap());
        assert_eq!(s.state, SaleState::Refunded);
        assert_eq!(s.refunded_total(), d("100.00"));
        assert_eq!(refundable(&s, None).unwrap_err().code(), "not_refundable");
    }

    #[test]
    fn partial_refunds_add_up_until_nothing_is_left() {
        let s = paid_sale("100.00");
        let s = changed(operator_refund(&s, op_refund("10.50", 5)).unwrap());
        assert_eq!(s.state, SaleState::PartiallyRefunded);
        assert_eq!(refundable(&s, None), Ok(d("89.50")));
        let err = refundable(&s, Some(d("89.51"))).unwrap_err();
        assert_eq!(err.code(), "refund_exceeds_paid");
        assert_eq!(
            err.to_string(),
            "the refund 89.51 exceeds what is left to refund (89.50)"
        );
        let s = changed(operator_refund(&s, op_refund("89.50", 6)).unwrap());
        assert_eq!(s.state, SaleState::Refunded);
        assert_eq!(s.operator_refunds.len(), 2);
    }

    #[test]
    fn only_paid_sales_are_refunded_and_amounts_follow_the_currency() {
        let mut s = paid_sale("100.00");
        assert_eq!(
            refundable(&s, Some(d("1.005"))).unwrap_err().code(),
            "bad_amount"
        );
        assert_eq!(
            refundable(&s, Some(d("0"))).unwrap_err().code(),
            "bad_amount"
        );
        s.state = SaleState::Pending;
        assert_eq!(refundable(&s, None).unwrap_err().code(), "not_refundable");
        assert!(operator_refund(&s, op_refund("1.00", 5)).is_err());
    }

    #[test]
    fn the_operator_cancels_a_pending_sale_by_reference_but_not_a_paid_one() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("9", "1", "10", None)),
            1,
        );
        let reference = st.current.as_ref().unwrap().external_reference.clone();
        let other = ExternalReference::parse("pump-1-000000000000000").unwrap();
        assert!(matches!(
            apply(
                &p,
                &st,
                Command::CancelByOperator {
                    reference: other,
                    by: "token".into()
                },
                ctx(2)
            ),
            Outcome::Rejected {
                why: Rejection::UnknownSale,
                ..
            }
        ));
        let out = step(
            &p,
            &mut st,
            Command::CancelByOperator {
                reference: reference.clone(),
                by: "console".into(),
            },
            3,
        );
        assert!(matches!(
            out,
            Outcome::Changed { event: SaleEvent::CancelledByOperator { ref by }, .. } if by == "console"
        ));
        assert_eq!(st.current.as_ref().unwrap().state, SaleState::Cancelled);
        assert!(matches!(
            apply(
                &p,
                &st,
                Command::CancelByOperator {
                    reference,
                    by: "token".into()
                },
                ctx(4)
            ),
            Outcome::Rejected {
                why: Rejection::NotCancellable {
                    state: SaleState::Cancelled
                },
                ..
            }
        ));
    }

    #[test]
    fn a_replaced_order_is_the_pending_sales_order_from_then_on_and_nothing_once_it_ended() {
        let p = PosConfig {
            ttl_secs: None,
            mode: PosMode::Attended,
            ..pos(PosKind::Vending)
        };
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            1,
        );
        let reference = st.current.as_ref().unwrap().external_reference.clone();
        step(
            &p,
            &mut st,
            Command::Placed {
                reference: reference.clone(),
                order: Some("ORD1".into()),
            },
            2,
        );
        let replaced = |order: &str| Command::Replaced {
            reference: reference.clone(),
            order: order.into(),
        };
        let out = step(&p, &mut st, replaced("ORD2"), 3);
        assert!(matches!(
            out,
            Outcome::Changed {
                event: SaleEvent::Placed,
                ..
            }
        ));
        let sale = st.current.clone().unwrap();
        assert_eq!(sale.mp_order.as_deref(), Some("ORD2"));
        assert_eq!(
            sale.placed_at,
            Some(2),
            "reconciliation counts from the first"
        );
        assert_eq!(sale.state, SaleState::Pending);
        let other = ExternalReference::parse("vending-1-000000000000000").unwrap();
        assert_eq!(
            apply(
                &p,
                &st,
                Command::Replaced {
                    reference: other,
                    order: "ORD3".into()
                },
                ctx(4)
            ),
            Outcome::Nothing
        );
        step(&p, &mut st, Command::Cancel(sid("1")), 5);
        assert_eq!(apply(&p, &st, replaced("ORD3"), ctx(6)), Outcome::Nothing);
    }
}
