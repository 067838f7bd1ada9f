//! The order book's rules: what each device message, each tick of the clock
//! and each payment does to one POS. Pure functions of (POS, state, command,
//! clock): the caller stores the outcome before it makes it visible.

use rust_decimal::Decimal;

use super::ledger::{Refund, RefundCall, RefundOf};
use super::merchant_order::{self, MerchantOrderFacts, MerchantOrderStatus, Unpaid};
use super::sale::*;
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

/// Which poll answer an unattended POS's account is set up for: MP's
/// original v1 or the newer v2 (docs/mercadopago.md, "What the poll answers").
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
    /// Never published `status`: treated as online, so devices that do not
    /// speak presence still work (docs/decisions.md, "Presence and polls").
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

impl Command {
    /// The device's sale a device message names, if any.
    pub fn device_sale_id(&self) -> Option<&SaleId> {
        match self {
            Command::Sale(r) => Some(&r.sale_id),
            Command::Progress(id) | Command::Cancel(id) => Some(id),
            Command::Delivered { sale_id, .. } => Some(sale_id),
            _ => None,
        }
    }
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
    /// An approved payment the sale holds until it closes or ends.
    PaymentHeld,
    Cancelled,
    Expired,
    Delivered {
        ok: bool,
        reason: Option<String>,
    },
    /// Money arrived that the sale cannot keep: owed back.
    RefundDue,
    /// Mercado Pago refunded `amount` of what was owed back.
    Refunded {
        amount: Decimal,
        by: String,
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
    /// The operator refunded `amount` of what the paid sale kept.
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
            SaleEvent::PaymentHeld => "payment_held",
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
pub struct Given {
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

fn new_sale(pos: &PosConfig, sale_id: SaleId, ctx: Given) -> Sale {
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
        ledger: Default::default(),
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
pub fn apply(pos: &PosConfig, state: &PosState, cmd: Command, ctx: Given) -> Outcome {
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
            Some(s) if s.state.is_busy() => Outcome::Changed {
                sale: end(s, SaleState::Cancelled, ctx),
                event: SaleEvent::Cancelled,
            },
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
                let mut sale = end(s, SaleState::Rejected, ctx);
                sale.rejection = Some(reason.clone());
                Outcome::Changed {
                    sale,
                    event: SaleEvent::Refused { reason },
                }
            }
            _ => Outcome::Nothing,
        },
        Command::Expire => match state.busy_sale() {
            Some(s) if s.expires_at.is_some_and(|at| at <= ctx.now) => Outcome::Changed {
                sale: end(s, SaleState::Expired, ctx),
                event: SaleEvent::Expired,
            },
            _ => Outcome::Nothing,
        },
        Command::CancelByOperator { reference, by } => match current {
            Some(s) if s.external_reference == reference && s.state.is_busy() => Outcome::Changed {
                sale: end(s, SaleState::Cancelled, ctx),
                event: SaleEvent::CancelledByOperator { by },
            },
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

/// A busy sale ends unpaid: what it held is owed back.
fn end(s: &Sale, state: SaleState, ctx: Given) -> Sale {
    let mut sale = s.clone();
    sale.state = state;
    sale.ledger
        .release_held(RefundReason::LatePayment, ctx.now, ctx.auto_refund);
    sale.updated_at = ctx.now;
    sale
}

/// Why the operator's refund of a sale is refused. `code` is the stable
/// word of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CannotRefund {
    /// Nothing is owed, and the sale is not paid (or all it kept went back).
    NotRefundable {
        state: SaleState,
    },
    /// More than what is left to refund.
    ExceedsPaid {
        asked: Decimal,
        left: Decimal,
    },
    BadAmount(MoneyError),
}

impl CannotRefund {
    pub fn code(&self) -> &'static str {
        match self {
            CannotRefund::NotRefundable { .. } => "not_refundable",
            CannotRefund::ExceedsPaid { .. } => "refund_exceeds_paid",
            CannotRefund::BadAmount(_) => "bad_amount",
        }
    }
}

impl std::fmt::Display for CannotRefund {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CannotRefund::NotRefundable { state } => write!(
                f,
                "the sale is {} and owes nothing: only a paid sale, or money owed back, can be refunded",
                state.as_str()
            ),
            CannotRefund::ExceedsPaid { asked, left } => write!(
                f,
                "the refund {asked} exceeds what is left to refund ({left})"
            ),
            CannotRefund::BadAmount(e) => write!(f, "{e}"),
        }
    }
}

/// What the operator may still refund of what a paid sale kept.
pub fn refundable(sale: &Sale) -> Decimal {
    match sale.state {
        SaleState::Paid | SaleState::PartiallyRefunded => sale.ledger.kept(),
        _ => Decimal::ZERO,
    }
}

/// The refund calls an operator's request makes. Without an amount it
/// returns what the sale owes, if anything; else all that the paid sale
/// kept. With an amount, that much of what it kept, the latest kept
/// payment first. `tag` names the request in the calls' keys.
pub fn refund_plan(
    sale: &Sale,
    asked: Option<Decimal>,
    tag: &str,
) -> Result<Vec<RefundCall>, CannotRefund> {
    let left = refundable(sale);
    let not_refundable = || CannotRefund::NotRefundable {
        state: if left.is_zero() && sale.state == SaleState::PartiallyRefunded {
            SaleState::Refunded
        } else {
            sale.state
        },
    };
    let amount = match asked {
        None if sale.ledger.owed() > Decimal::ZERO => {
            return Ok(sale.ledger.plan_owed(sale.currency, false))
        }
        None if left > Decimal::ZERO => left,
        None => return Err(not_refundable()),
        Some(a) => {
            let a = money::amount(a, sale.currency)
                .map_err(CannotRefund::BadAmount)?
                .value();
            if left.is_zero() {
                return Err(not_refundable());
            }
            if a > left {
                return Err(CannotRefund::ExceedsPaid { asked: a, left });
            }
            a
        }
    };
    Ok(sale.ledger.plan_kept(amount, sale.currency, tag))
}

/// Records refunds Mercado Pago made of `sale`'s payments (those not
/// recorded already). Refunds of what the sale kept make it `refunded`, or
/// `partially_refunded` while some is still kept. `None` when every refund
/// was known.
pub fn record_refunds(sale: &Sale, made: &[(MpId, Refund)], now: UnixMillis) -> Option<Outcome> {
    let mut s = sale.clone();
    let (mut kept, mut owed) = (Decimal::ZERO, Decimal::ZERO);
    let mut by = String::new();
    for (payment, r) in made {
        if s.ledger.record_refund(payment, r.clone()) {
            match r.of {
                RefundOf::Kept => kept += r.amount,
                RefundOf::Owed(_) => owed += r.amount,
            }
            by.clone_from(&r.by);
        }
    }
    if kept.is_zero() && owed.is_zero() {
        return None;
    }
    s.updated_at = now;
    let event = if kept > Decimal::ZERO {
        if matches!(s.state, SaleState::Paid | SaleState::PartiallyRefunded) {
            s.state = if s.ledger.kept().is_zero() {
                SaleState::Refunded
            } else {
                SaleState::PartiallyRefunded
            };
        }
        SaleEvent::RefundedByOperator { amount: kept, by }
    } else {
        SaleEvent::Refunded { amount: owed, by }
    };
    Some(Outcome::Changed { sale: s, event })
}

/// The device says it acted (or failed to act) on a paid sale, current or
/// not: MQTT does not order `delivered` against the device's next `sale`.
pub fn deliver(s: &Sale, ok: bool, reason: Option<String>, ctx: Given) -> Outcome {
    // The operator may have refunded part (or all) of it before the device
    // spoke: it is still the sale the device was told to deliver.
    let paid = matches!(
        s.state,
        SaleState::Paid | SaleState::PartiallyRefunded | SaleState::Refunded
    );
    match s.state {
        _ if paid && s.delivered_at.is_none() => {
            let mut sale = s.clone();
            sale.delivered_at = Some(ctx.now);
            sale.updated_at = ctx.now;
            // The customer paid and got nothing: what was kept is owed back.
            if !ok {
                sale.ledger
                    .owe_kept(RefundReason::DeliveryFailed, ctx.now, ctx.auto_refund);
            }
            Outcome::Changed {
                sale,
                event: SaleEvent::Delivered { ok, reason },
            }
        }
        _ if paid => Outcome::Nothing,
        state => rejected(
            &s.sale_id,
            Rejection::BadMessage(format!(
                "delivered for a sale that is {}, not paid",
                state.as_str()
            )),
        ),
    }
}

/// What a merchant order (or an Orders API order), fetched with our token,
/// does to `sale`, current or not. Its approved payments enter the ledger
/// once each. A closed order whose payments reach the total pays a payable
/// sale; money for a sale that can no longer take it is owed back. `Err`
/// says why nothing changed.
pub fn settle(
    sale: &Sale,
    mo: &MerchantOrderFacts,
    collector_id: u64,
    ctx: Given,
) -> Result<Outcome, Unpaid> {
    let approved = merchant_order::verify(sale, mo, collector_id)?;
    let now = ctx.now;
    let mut s = sale.clone();
    if !sale.is_payable() {
        let reason = match sale.state {
            SaleState::Paid | SaleState::Refunded | SaleState::PartiallyRefunded => {
                RefundReason::DoublePayment
            }
            _ => RefundReason::LatePayment,
        };
        let mut new = false;
        for p in &approved {
            new |= s.ledger.record_owed(p, reason, now, ctx.auto_refund);
        }
        if !new {
            return Ok(Outcome::Nothing);
        }
        s.updated_at = now;
        return Ok(Outcome::Changed {
            sale: s,
            event: SaleEvent::RefundDue,
        });
    }
    let mut new = false;
    for p in &approved {
        new |= s.ledger.record(p, now);
    }
    if let (MerchantOrderStatus::Closed, Some(total)) = (&mo.status, s.amount) {
        let ids: Vec<MpId> = approved.iter().map(|p| p.id.clone()).collect();
        if let Some(c) = s.ledger.close(&mo.id, &ids, total, now, ctx.auto_refund) {
            s.state = SaleState::Paid;
            s.settled = Some(Closing {
                payment_id: c.payment,
                merchant_order: mo.id.clone(),
                paid: c.paid,
                at: now,
            });
            s.updated_at = now;
            return Ok(Outcome::Changed {
                sale: s,
                event: SaleEvent::Paid {
                    overpaid: c.overpaid > Decimal::ZERO,
                },
            });
        }
    }
    if new {
        s.updated_at = now;
        return Ok(Outcome::Changed {
            sale: s,
            event: SaleEvent::PaymentHeld,
        });
    }
    Err(merchant_order::why_not_closing(sale, mo, &approved))
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

    fn ctx(now: i64) -> Given {
        Given {
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

    fn mo(id: u64, closed: bool, payments: &[(u64, &str)], reference: &str) -> MerchantOrderFacts {
        use super::merchant_order::{PaymentFacts, PaymentStatus};
        MerchantOrderFacts {
            id: MpId::Num(id),
            status: if closed {
                MerchantOrderStatus::Closed
            } else {
                MerchantOrderStatus::Opened
            },
            external_reference: Some(reference.to_owned()),
            collector_id: Some(178),
            payments: payments
                .iter()
                .map(|(pid, amount)| PaymentFacts {
                    id: MpId::Num(*pid),
                    status: PaymentStatus::Approved,
                    amount: d(amount),
                    currency: Some("ARS".into()),
                    approved_at: Some(*pid as i64),
                })
                .collect(),
        }
    }

    fn changed(o: Outcome) -> (Sale, SaleEvent) {
        match o {
            Outcome::Changed { sale, event } => (sale, event),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn a_payment_closes_a_pending_sale_once_and_is_owed_back_after_cancel() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "10", None)),
            0,
        );
        let sale = st.current.clone().unwrap();
        let r = sale.external_reference.as_str();
        let closed = mo(5, true, &[(6, "10")], r);
        let (paid, event) = changed(settle(&sale, &closed, 178, ctx(1)).unwrap());
        assert_eq!(event, SaleEvent::Paid { overpaid: false });
        assert_eq!(paid.state, SaleState::Paid);
        assert_eq!(paid.settled.as_ref().unwrap().payment_id, MpId::Num(6));
        assert_eq!(settle(&paid, &closed, 178, ctx(2)), Ok(Outcome::Nothing));

        let mut cancelled = sale.clone();
        cancelled.state = SaleState::Cancelled;
        let (due, event) = changed(settle(&cancelled, &closed, 178, ctx(3)).unwrap());
        assert_eq!(event, SaleEvent::RefundDue);
        assert_eq!(due.state, SaleState::Cancelled);
        assert_eq!(due.ledger.owed(), d("10"));
        assert_eq!(settle(&due, &closed, 178, ctx(4)), Ok(Outcome::Nothing));
    }

    #[test]
    fn a_second_payment_on_the_merchant_order_that_paid_is_owed_back() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "100", None)),
            0,
        );
        let sale = st.current.clone().unwrap();
        let r = sale.external_reference.as_str().to_owned();
        let (paid, _) =
            changed(settle(&sale, &mo(5, true, &[(6, "100")], &r), 178, ctx(1)).unwrap());
        let twice = mo(5, true, &[(6, "100"), (7, "100")], &r);
        let (due, event) = changed(settle(&paid, &twice, 178, ctx(2)).unwrap());
        assert_eq!(event, SaleEvent::RefundDue);
        let owed: Vec<_> = due
            .ledger
            .open_owed()
            .map(|(p, o)| (p.id.clone(), o.amount, o.reason))
            .collect();
        assert_eq!(
            owed,
            [(MpId::Num(7), d("100"), RefundReason::DoublePayment)]
        );
        assert_eq!(settle(&due, &twice, 178, ctx(3)), Ok(Outcome::Nothing));
    }

    #[test]
    fn a_partial_payment_is_held_and_owed_back_when_the_sale_is_cancelled() {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("1", "1", "100", None)),
            0,
        );
        let sale = st.current.clone().unwrap();
        let r = sale.external_reference.as_str().to_owned();
        let opened = mo(5, false, &[(6, "60")], &r);
        let (held, event) = changed(settle(&sale, &opened, 178, ctx(1)).unwrap());
        assert_eq!(event, SaleEvent::PaymentHeld);
        assert_eq!(held.state, SaleState::Pending);
        assert_eq!(held.ledger.held(), d("60"));
        assert_eq!(
            settle(&held, &opened, 178, ctx(2)).unwrap_err().code(),
            "not_closed"
        );
        st.current = Some(held);
        let (cancelled, _) = changed(step(&p, &mut st, Command::Cancel(sid("1")), 3));
        assert_eq!(cancelled.ledger.held(), Decimal::ZERO);
        assert_eq!(cancelled.ledger.owed(), d("60"));
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

    fn paid_sale(payments: &[(u64, &str)]) -> Sale {
        let p = pos(PosKind::Fuel);
        let mut st = PosState::idle();
        let total: Decimal = payments.iter().map(|(_, a)| d(a)).sum();
        step(
            &p,
            &mut st,
            Command::Sale(sale_req("9", "1", &total.to_string(), None)),
            1,
        );
        let s = st.current.unwrap();
        let r = s.external_reference.as_str().to_owned();
        changed(settle(&s, &mo(88, true, payments, &r), 178, ctx(2)).unwrap()).0
    }

    fn made(calls: &[RefundCall], at: i64) -> Vec<(MpId, Refund)> {
        calls
            .iter()
            .enumerate()
            .map(|(n, c)| {
                (
                    c.payment.clone(),
                    Refund {
                        id: MpId::Num(at as u64 * 100 + n as u64),
                        amount: c.amount,
                        at,
                        by: "token".into(),
                        of: c.of,
                        request: Some(format!("r{at}")),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_full_refund_returns_every_kept_payment_and_the_sale_is_refunded() {
        let s = paid_sale(&[(77, "60.00"), (78, "40.00")]);
        assert_eq!(refundable(&s), d("100.00"));
        let calls = refund_plan(&s, None, "t").unwrap();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let (s, event) = changed(record_refunds(&s, &made(&calls, 5), 5).unwrap());
        assert_eq!(
            event,
            SaleEvent::RefundedByOperator {
                amount: d("100.00"),
                by: "token".into()
            }
        );
        assert_eq!(s.state, SaleState::Refunded);
        assert_eq!(s.refunded_total(), d("100.00"));
        assert_eq!(record_refunds(&s, &made(&calls, 5), 6), None);
        assert_eq!(
            refund_plan(&s, None, "t").unwrap_err().code(),
            "not_refundable"
        );
    }

    #[test]
    fn partial_refunds_add_up_until_nothing_is_left() {
        let s = paid_sale(&[(77, "100.00")]);
        let calls = refund_plan(&s, Some(d("10.50")), "t").unwrap();
        let (s, _) = changed(record_refunds(&s, &made(&calls, 5), 5).unwrap());
        assert_eq!(s.state, SaleState::PartiallyRefunded);
        assert_eq!(refundable(&s), d("89.50"));
        let err = refund_plan(&s, Some(d("89.51")), "t").unwrap_err();
        assert_eq!(err.code(), "refund_exceeds_paid");
        assert_eq!(
            err.to_string(),
            "the refund 89.51 exceeds what is left to refund (89.50)"
        );
        let calls = refund_plan(&s, Some(d("89.50")), "u").unwrap();
        let (s, _) = changed(record_refunds(&s, &made(&calls, 6), 6).unwrap());
        assert_eq!(s.state, SaleState::Refunded);
        assert_eq!(s.ledger.refunds().count(), 2);
    }

    #[test]
    fn only_paid_sales_or_money_owed_are_refunded_and_amounts_follow_the_currency() {
        let mut s = paid_sale(&[(77, "100.00")]);
        assert_eq!(
            refund_plan(&s, Some(d("1.005")), "t").unwrap_err().code(),
            "bad_amount"
        );
        assert_eq!(
            refund_plan(&s, Some(d("0")), "t").unwrap_err().code(),
            "bad_amount"
        );
        s.state = SaleState::Cancelled;
        assert_eq!(
            refund_plan(&s, None, "t").unwrap_err().code(),
            "not_refundable"
        );
    }

    #[test]
    fn a_partial_operator_refund_then_a_failed_delivery_owes_the_rest() {
        let s = paid_sale(&[(77, "60.00"), (78, "40.00")]);
        let calls = refund_plan(&s, Some(d("30.00")), "t").unwrap();
        let (s, _) = changed(record_refunds(&s, &made(&calls, 5), 5).unwrap());
        assert_eq!(s.state, SaleState::PartiallyRefunded);
        let Outcome::Changed { sale: s, event } = deliver(&s, false, None, ctx(6)) else {
            panic!("a partly refunded sale is still the one the device delivers")
        };
        assert_eq!(
            event,
            SaleEvent::Delivered {
                ok: false,
                reason: None
            }
        );
        assert_eq!(s.ledger.owed(), d("70.00"));
        assert_eq!(s.ledger.kept(), Decimal::ZERO);
        assert_eq!(deliver(&s, true, None, ctx(7)), Outcome::Nothing);
    }

    #[test]
    fn what_a_refund_due_sale_owes_is_the_operators_to_refund() {
        let s = paid_sale(&[(77, "60.00"), (78, "40.00")]);
        let Outcome::Changed { sale: s, .. } = deliver(&s, false, None, ctx(3)) else {
            panic!()
        };
        assert_eq!(s.ledger.owed(), d("100.00"));
        assert_eq!(refundable(&s), Decimal::ZERO);
        let calls = refund_plan(&s, None, "t").unwrap();
        let plan: Vec<_> = calls.iter().map(|c| (c.key.as_str(), c.amount)).collect();
        assert_eq!(
            plan,
            [
                ("qrgate-refund-77", d("60.00")),
                ("qrgate-refund-78", d("40.00"))
            ]
        );
        let (s, event) = changed(record_refunds(&s, &made(&calls, 5), 5).unwrap());
        assert!(matches!(event, SaleEvent::Refunded { .. }));
        assert_eq!(s.ledger.owed(), Decimal::ZERO);
        assert_eq!(s.state, SaleState::Paid);
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
