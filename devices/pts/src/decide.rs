//! What the bridge does for one pump, as a function of what the controller
//! says (`PumpGetStatus`, the outcome of a close) and what qrgate says (the
//! POS's `state`): the post-pay cycle of the device contract. No I/O, no
//! clock: [`PumpMachine`] changes its memory and returns the [`Action`]s to
//! carry out, which `bridge` does.
//!
//! The cycle, per transaction of the controller:
//! - filling → `progress`, once;
//! - end of transaction with volume > 0 → `sale` (the fuel grade, the
//!   volume, the price, the controller's amount rounded to the currency);
//! - qrgate says `paid` → close the transaction on the controller (with a
//!   payment record first where a payment form is configured) → `delivered`
//!   `ok: true`; a transaction someone else closed or paid → `ok: false` with
//!   why, so the payment is owed back;
//! - the transaction is gone from the pump unpaid (closed in the shop) →
//!   `cancel`;
//! - `served` (a customer is paying) → lock the pump's transaction to the
//!   bridge's user, so the shop's system cannot close it meanwhile;
//! - an `expired`, `cancelled` or refused sale closes nothing: the fuel is
//!   still owed at the shop.
//!
//! Nothing here remembers more than the controller and qrgate can tell again:
//! after a restart the machine starts empty, and the first statuses and the
//! retained `state` rebuild it (see [`PumpMachine::heard`]).

use qrgate_devices::StateMessage;
use rust_decimal::{Decimal, RoundingStrategy};
use std::collections::HashSet;

use crate::jsonpts::{Num, PaymentForTransaction, PaymentPart, PumpStatus, TransactionStatus};

/// The currency's code and the decimals qrgate's amounts and prices take in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    pub code: String,
    pub decimals: u32,
}

impl Currency {
    /// qrgate's rule: 0 decimals for CLP and COP, 2 for the others.
    pub fn new(code: &str) -> Currency {
        let code = code.trim().to_ascii_uppercase();
        let decimals = if matches!(code.as_str(), "CLP" | "COP") {
            0
        } else {
            2
        };
        Currency { code, decimals }
    }

    fn round(&self, d: Decimal) -> Decimal {
        let mut r = d.round_dp_with_strategy(self.decimals, RoundingStrategy::MidpointAwayFromZero);
        r.rescale(self.decimals);
        r
    }
}

/// One pump as the bridge plays it.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    /// The controller's logical pump number (1 to 120).
    pub pump: u16,
    /// The POS id at qrgate and Mercado Pago.
    pub pos_id: String,
    /// The controller's unique identifier: the first part of every sale id.
    pub controller_id: String,
    pub currency: Currency,
    /// Where set, a paid sale is recorded on the controller
    /// (`PaymentCreateTransaction`) with this payment form before its close.
    pub payment_form: Option<u8>,
    /// Titles by nozzle (1 first), for controllers whose nozzles are not
    /// linked to fuel grades (then the status has no grade name).
    pub nozzle_titles: Vec<String>,
}

/// What the bridge must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish the POS's presence (`online` / `offline`).
    Presence(bool),
    Progress {
        sale_id: String,
    },
    Sale(Sale),
    Cancel {
        sale_id: String,
    },
    Delivered {
        sale_id: String,
        ok: bool,
        reason: Option<String>,
    },
    /// `PumpLock`: the transaction becomes the bridge user's.
    Lock {
        sale_id: String,
        transaction: u32,
    },
    /// `PumpUnlock`: give the pump back once the bridge is done with it.
    Unlock {
        sale_id: String,
    },
    /// Close the transaction (its payment recorded first when `payment` is
    /// set), then report the outcome with [`PumpMachine::closed`].
    Close {
        sale_id: String,
        transaction: u32,
        payment: Option<PaymentForTransaction>,
    },
}

/// A priced sale, as the device contract's `sale` carries it (one line).
#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    pub sale_id: String,
    pub title: String,
    pub quantity: String,
    pub unit_price: String,
    pub unit_measure: String,
    pub description: Option<String>,
    pub amount: String,
}

/// How a close went, as the bridge saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum CloseOutcome {
    /// The controller closed the transaction for us.
    Closed,
    /// The transaction was paid on the controller by someone else (error
    /// 102, or `IsPaid`): the text says so.
    PaidElsewhere(String),
    /// The transaction is no longer open (closed elsewhere).
    ClosedElsewhere(String),
    /// The controller refused to close it, for good.
    Refused(String),
    /// Nothing decided (no answer, busy): try again at the next status.
    Retry(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Told {
    Nothing,
    Progress,
    Sale,
}

/// What qrgate last said of the tracked sale.
#[derive(Debug, Clone, PartialEq)]
enum Qr {
    Unknown,
    InProcess,
    Pending,
    Paid,
    /// Cancelled, expired or refused: over for qrgate, nothing to close.
    Over(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Closing {
    Open,
    InFlight,
    Done { ok: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Locking {
    NotAsked,
    Asked,
    Locked,
    Refused,
}

/// The transaction the bridge speaks for on this pump.
#[derive(Debug, Clone)]
struct Tracked {
    sale_id: String,
    transaction: u32,
    start: Option<String>,
    told: Told,
    qr: Qr,
    closing: Closing,
    locking: Locking,
    /// The reason given with `delivered`, to say it again when `paid` is
    /// repeated.
    delivered_reason: Option<String>,
    /// The end of filling and the amount, for the payment record.
    ended_at: Option<String>,
    amount: Option<Decimal>,
}

/// What the last status said the pump is doing.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Unknown,
    Idle,
    Filling(u32),
    EndOfTransaction(u32),
    Offline,
}

/// One pump's memory and rules.
#[derive(Debug)]
pub struct PumpMachine {
    cfg: PumpConfig,
    presence: Option<bool>,
    seen: Seen,
    sale: Option<Tracked>,
    /// qrgate's retained state for a sale this machine does not track yet:
    /// after a restart, it says what qrgate knows of the pump's last sale.
    replayed: Option<StateMessage>,
    /// Sales whose transaction the bridge itself closed, as its close
    /// record says (kept across restarts by the bridge).
    closed_here: HashSet<String>,
}

impl PumpMachine {
    pub fn new(cfg: PumpConfig) -> PumpMachine {
        PumpMachine {
            cfg,
            presence: None,
            seen: Seen::Unknown,
            sale: None,
            replayed: None,
            closed_here: HashSet::new(),
        }
    }

    /// A sale whose transaction the bridge closed before a restart, its
    /// `delivered` maybe not sent: found paid and gone, it was delivered.
    pub fn remember_closed(&mut self, sale_id: String) {
        self.closed_here.insert(sale_id);
    }

    pub fn config(&self) -> &PumpConfig {
        &self.cfg
    }

    /// The sale id of the tracked transaction, if any.
    pub fn sale_id(&self) -> Option<&str> {
        self.sale.as_ref().map(|s| s.sale_id.as_str())
    }

    /// The controller could not be asked (no answer, refused): the pump is
    /// offline as far as qrgate goes. A pending sale stays payable there.
    pub fn unreachable(&mut self) -> Vec<Action> {
        self.seen = Seen::Offline;
        self.presence(false).into_iter().collect()
    }

    /// A status of this pump; `now` (`YYYYMMDDhhmmss`) stands in for a start
    /// time the controller does not send (firmwares before R68).
    pub fn observe(&mut self, status: &PumpStatus, now: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if let PumpStatus::Offline(_) = status {
            self.seen = Seen::Offline;
            out.extend(self.presence(false));
            return out;
        }
        if let PumpStatus::Other { .. } = status {
            return out;
        }
        out.extend(self.presence(true));
        match status {
            PumpStatus::Idle(_) => {
                self.seen = Seen::Idle;
                out.extend(self.replayed_sale_gone());
                if let Some(old) = self.sale.as_mut() {
                    out.extend(gone(old));
                }
            }
            PumpStatus::Filling(t) => {
                self.seen = Seen::Filling(t.transaction);
                out.extend(self.switch_to(t, now));
                if let Some(s) = self.sale.as_mut() {
                    if s.told == Told::Nothing && s.qr == Qr::Unknown {
                        s.told = Told::Progress;
                        out.push(Action::Progress {
                            sale_id: s.sale_id.clone(),
                        });
                    }
                }
            }
            PumpStatus::EndOfTransaction(t) => {
                self.seen = Seen::EndOfTransaction(t.transaction);
                out.extend(self.switch_to(t, now));
                out.extend(self.at_end_of_transaction(t));
            }
            PumpStatus::Offline(_) | PumpStatus::Other { .. } => {}
        }
        out
    }

    /// A `state` message from qrgate for this POS.
    pub fn heard(&mut self, msg: &StateMessage) -> Vec<Action> {
        let Some(sale_id) = msg.sale_id.as_deref() else {
            return Vec::new();
        };
        let tracked = self.sale.as_ref().is_some_and(|s| s.sale_id == sale_id);
        if !tracked {
            // Only a replayed (retained) state can be an older sale of ours
            // that the bridge lost track of, by a restart; any other message
            // for another sale is a repeat of the past.
            if msg.retained && self.is_ours(sale_id) {
                self.replayed = Some(msg.clone());
                if self.seen != Seen::Unknown {
                    return self.adopt_or_settle_replayed();
                }
            }
            return Vec::new();
        }
        let seen = self.seen.clone();
        let Some(s) = self.sale.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let at_end = seen == Seen::EndOfTransaction(s.transaction);
        match msg.state.as_str() {
            "in_process" => s.qr = Qr::InProcess,
            "pending" => {
                s.qr = Qr::Pending;
                if s.told == Told::Progress {
                    s.told = Told::Sale;
                }
                if msg.served && at_end && s.locking == Locking::NotAsked {
                    s.locking = Locking::Asked;
                    out.push(Action::Lock {
                        sale_id: s.sale_id.clone(),
                        transaction: s.transaction,
                    });
                }
            }
            "paid" => {
                s.qr = Qr::Paid;
                match s.closing {
                    Closing::Done { ok } => out.push(Action::Delivered {
                        sale_id: s.sale_id.clone(),
                        ok,
                        reason: s.delivered_reason.clone(),
                    }),
                    Closing::InFlight => {}
                    Closing::Open if at_end => out.push(close(s, &self.cfg)),
                    // Offline or not polled yet: closed at the next end of
                    // transaction seen; gone (idle) is judged there too.
                    Closing::Open => {}
                }
            }
            "cancelled" | "expired" => {
                s.qr = Qr::Over(msg.state.clone());
                out.extend(unlock(s));
            }
            "rejected" => match msg.reason.as_deref() {
                // Said again at the next status: qrgate took nothing.
                Some("busy") | Some("rate_limited") => {
                    if s.qr == Qr::Unknown {
                        s.told = Told::Nothing;
                    }
                }
                reason => {
                    if matches!(s.qr, Qr::Unknown | Qr::InProcess) {
                        s.qr = Qr::Over(format!("rejected: {}", reason.unwrap_or("?")));
                    }
                }
            },
            _ => {}
        }
        out
    }

    /// The outcome of an [`Action::Close`].
    pub fn closed(&mut self, outcome: CloseOutcome) -> Vec<Action> {
        let Some(s) = self.sale.as_mut() else {
            return Vec::new();
        };
        let (ok, reason) = match outcome {
            CloseOutcome::Retry(_) => {
                s.closing = Closing::Open;
                return Vec::new();
            }
            CloseOutcome::Closed => (true, None),
            CloseOutcome::PaidElsewhere(r)
            | CloseOutcome::ClosedElsewhere(r)
            | CloseOutcome::Refused(r) => (false, Some(r)),
        };
        s.closing = Closing::Done { ok };
        s.delivered_reason = reason.clone();
        let mut out = vec![Action::Delivered {
            sale_id: s.sale_id.clone(),
            ok,
            reason,
        }];
        out.extend(unlock(s));
        out
    }

    /// An action the bridge could not carry out (the broker did not take
    /// the message): what can be said again is, at the next status.
    pub fn unsent(&mut self, action: &Action) {
        if let Action::Presence(_) = action {
            self.presence = None;
        }
        let Some(s) = self.sale.as_mut() else { return };
        match action {
            Action::Progress { sale_id } | Action::Sale(Sale { sale_id, .. })
                if *sale_id == s.sale_id && matches!(s.qr, Qr::Unknown | Qr::InProcess) =>
            {
                s.told = Told::Nothing;
            }
            Action::Cancel { sale_id } if *sale_id == s.sale_id => s.qr = Qr::Unknown,
            // `delivered` is said again when qrgate repeats `paid`.
            _ => {}
        }
    }

    /// The outcome of an [`Action::Lock`].
    pub fn locked(&mut self, ok: bool) {
        if let Some(s) = self.sale.as_mut() {
            s.locking = if ok {
                Locking::Locked
            } else {
                Locking::Refused
            };
        }
    }

    /// An `UploadPumpTransaction` of this pump (remote mode): a transaction
    /// the controller finished. Repeats change nothing.
    pub fn uploaded(&mut self, transaction: u32) -> Vec<Action> {
        match self.sale.as_mut() {
            // Our own close uploads it too: only one we did not close counts.
            Some(s) if s.transaction == transaction && s.closing == Closing::Open => gone(s),
            _ => Vec::new(),
        }
    }

    fn presence(&mut self, online: bool) -> Option<Action> {
        (self.presence != Some(online)).then(|| {
            self.presence = Some(online);
            Action::Presence(online)
        })
    }

    /// The sale ids this pump's transactions get start with this.
    fn prefix(&self) -> String {
        format!("{}-{}-", self.cfg.controller_id, self.cfg.pump)
    }

    fn is_ours(&self, sale_id: &str) -> bool {
        sale_id.starts_with(&self.prefix())
    }

    /// Makes the transaction of `t` the tracked one; what was tracked before
    /// is gone from the pump.
    fn switch_to(&mut self, t: &TransactionStatus, now: &str) -> Vec<Action> {
        let start = t.date_time_start.as_deref().and_then(stamp);
        let same = self.sale.as_ref().is_some_and(|s| {
            s.transaction == t.transaction
                && (s.start.is_none() || start.is_none() || s.start == start)
        });
        if same {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(old) = self.sale.as_mut() {
            out.extend(gone(old));
        }
        let sale_id = format!(
            "{}{}-{}",
            self.prefix(),
            t.transaction,
            start.as_deref().unwrap_or(now)
        );
        self.sale = Some(Tracked {
            sale_id,
            transaction: t.transaction,
            start,
            told: Told::Nothing,
            qr: Qr::Unknown,
            closing: Closing::Open,
            locking: Locking::NotAsked,
            delivered_reason: None,
            ended_at: None,
            amount: None,
        });
        out.extend(self.adopt_or_settle_replayed());
        out
    }

    /// A replayed sale of ours: the tracked transaction's own sale (adopt
    /// what qrgate knows of it), or an older one that is no longer on the
    /// pump (settle it as gone).
    fn adopt_or_settle_replayed(&mut self) -> Vec<Action> {
        let Some(msg) = self.replayed.take() else {
            return Vec::new();
        };
        let Some(sale_id) = msg.sale_id.clone() else {
            return Vec::new();
        };
        let adopted = self.sale.as_mut().is_some_and(|s| {
            let own_prefix = format!(
                "{}-{}-{}-",
                self.cfg.controller_id, self.cfg.pump, s.transaction
            );
            let matches =
                sale_id == s.sale_id || (s.start.is_none() && sale_id.starts_with(&own_prefix));
            if matches {
                s.sale_id = sale_id.clone();
                let told = if msg.state == "in_process" {
                    Told::Progress
                } else {
                    Told::Sale
                };
                if s.told != Told::Sale {
                    s.told = told;
                }
            }
            matches
        });
        if adopted {
            // What qrgate says now is heard as if it came now.
            return self.heard(&StateMessage {
                retained: false,
                ..msg
            });
        }
        // Its transaction, as the sale id says: `{controller}-{pump}-{n}-…`.
        let transaction = sale_id
            .strip_prefix(&format!("{}-{}-", self.cfg.controller_id, self.cfg.pump))
            .and_then(|rest| rest.split('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut old = Tracked {
            sale_id,
            transaction,
            start: None,
            told: Told::Sale,
            qr: match msg.state.as_str() {
                "in_process" => Qr::InProcess,
                "pending" => Qr::Pending,
                "paid" => Qr::Paid,
                other => Qr::Over(other.to_owned()),
            },
            closing: Closing::Open,
            locking: Locking::NotAsked,
            delivered_reason: None,
            ended_at: None,
            amount: None,
        };
        if old.qr == Qr::Paid && self.closed_here.contains(&old.sale_id) {
            // Closed here, then the bridge stopped before it said so.
            return vec![Action::Delivered {
                sale_id: old.sale_id,
                ok: true,
                reason: None,
            }];
        }
        gone(&mut old)
    }

    fn replayed_sale_gone(&mut self) -> Vec<Action> {
        let Some(msg) = self.replayed.as_ref() else {
            return Vec::new();
        };
        let tracked = self
            .sale
            .as_ref()
            .is_some_and(|s| Some(&s.sale_id) == msg.sale_id.as_ref());
        if tracked {
            return Vec::new();
        }
        self.adopt_or_settle_replayed()
    }

    fn at_end_of_transaction(&mut self, t: &TransactionStatus) -> Vec<Action> {
        let cfg = &self.cfg;
        let Some(s) = self.sale.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let volume = t.volume.unwrap_or_default();
        if volume.0 <= Decimal::ZERO {
            // Nothing dispensed: nothing to pay. The transaction is the
            // station's to close.
            if s.told == Told::Progress && matches!(s.qr, Qr::Unknown | Qr::InProcess) {
                s.qr = Qr::Over("nothing dispensed".into());
                out.push(Action::Cancel {
                    sale_id: s.sale_id.clone(),
                });
            }
            return out;
        }
        if s.told != Told::Sale && matches!(s.qr, Qr::Unknown | Qr::InProcess) {
            match price(cfg, &s.sale_id, t) {
                Ok(sale) => {
                    s.told = Told::Sale;
                    s.ended_at = t.date_time.clone();
                    s.amount = Decimal::from_str_exact(&sale.amount).ok();
                    out.push(Action::Sale(sale));
                }
                Err(why) => {
                    // Not a sale qrgate could take: the shop sells it.
                    s.qr = Qr::Over(why);
                    if s.told == Told::Progress {
                        out.push(Action::Cancel {
                            sale_id: s.sale_id.clone(),
                        });
                    }
                }
            }
        } else if s.ended_at.is_none() {
            s.ended_at = t.date_time.clone();
        }
        if s.amount.is_none() {
            s.amount = t.amount.map(|a| cfg.currency.round(a.0)).or_else(|| {
                price(cfg, &s.sale_id, t)
                    .ok()
                    .and_then(|p| p.amount.parse().ok())
            });
        }
        if s.qr == Qr::Paid && s.closing == Closing::Open {
            out.push(close(s, cfg));
        }
        out
    }
}

/// The tracked transaction is no longer open on the pump (closed in the
/// shop, or while the bridge was away).
fn gone(s: &mut Tracked) -> Vec<Action> {
    let sale_id = s.sale_id.clone();
    let mut out = Vec::new();
    match s.qr {
        Qr::Paid if matches!(s.closing, Closing::Open | Closing::InFlight) => {
            let reason = format!(
                "transaction {} was closed on the controller before the bridge closed it: \
                 it was settled at the station (paid in the shop?)",
                s.transaction
            );
            s.closing = Closing::Done { ok: false };
            s.delivered_reason = Some(reason.clone());
            out.push(Action::Delivered {
                sale_id,
                ok: false,
                reason: Some(reason),
            });
        }
        Qr::Unknown | Qr::InProcess | Qr::Pending if s.told != Told::Nothing => {
            s.qr = Qr::Over("closed at the station".into());
            out.push(Action::Cancel { sale_id });
            out.extend(unlock(s));
        }
        _ => {}
    }
    out
}

fn close(s: &mut Tracked, cfg: &PumpConfig) -> Action {
    s.closing = Closing::InFlight;
    let payment = match (cfg.payment_form, &s.ended_at, s.amount) {
        (Some(form), Some(ended_at), Some(amount)) => Some(PaymentForTransaction {
            pump: cfg.pump,
            transaction: s.transaction,
            date_time: ended_at.clone(),
            payments: vec![PaymentPart {
                amount: Num(amount),
                payment_form_id: form,
            }],
        }),
        _ => None,
    };
    Action::Close {
        sale_id: s.sale_id.clone(),
        transaction: s.transaction,
        payment,
    }
}

fn unlock(s: &mut Tracked) -> Option<Action> {
    (s.locking == Locking::Locked).then(|| {
        s.locking = Locking::NotAsked;
        Action::Unlock {
            sale_id: s.sale_id.clone(),
        }
    })
}

/// `2019-05-19T12:44:01` → `20190519124401`; `None` for anything else.
pub fn stamp(date_time: &str) -> Option<String> {
    let digits: String = date_time.chars().filter(char::is_ascii_digit).collect();
    (digits.len() == 14 && date_time.len() == 19).then_some(digits)
}

/// The `sale` for an end of transaction: one line of the volume at the
/// price, or, where qrgate's money rules cannot express the controller's
/// amount that way (a price with more decimals than the currency, or a
/// volume × price that does not round to the amount), one unit at the
/// amount with the volume and price in the description. The amount is
/// always the controller's.
pub fn price(cfg: &PumpConfig, sale_id: &str, t: &TransactionStatus) -> Result<Sale, String> {
    let volume = t
        .volume
        .map(|v| v.0)
        .ok_or("the end of transaction has no volume")?;
    let unit = t.price.map(|p| p.0);
    let amount = match (t.amount, unit) {
        (Some(a), _) => a.0,
        (None, Some(p)) => volume * p,
        (None, None) => return Err("the end of transaction has neither amount nor price".into()),
    };
    let currency = &cfg.currency;
    let amount = currency.round(amount);
    if amount <= Decimal::ZERO {
        return Err(format!(
            "transaction {} has no amount to pay",
            t.transaction
        ));
    }
    let title = t
        .fuel_grade_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            t.nozzle.and_then(|n| {
                cfg.nozzle_titles
                    .get(usize::from(n).checked_sub(1)?)
                    .cloned()
            })
        })
        .unwrap_or_else(|| match t.nozzle {
            Some(n) => format!("Fuel, nozzle {n}"),
            None => "Fuel".to_owned(),
        });
    let volume = volume.normalize();
    let line = unit.and_then(|p| {
        let p = p.normalize();
        let fits = p > Decimal::ZERO
            && p.scale() <= currency.decimals
            && volume.scale() <= 3
            && currency.round(volume * p) == amount;
        fits.then(|| {
            let mut p = p;
            p.rescale(currency.decimals);
            (volume.to_string(), p.to_string())
        })
    });
    Ok(match line {
        Some((quantity, unit_price)) => Sale {
            sale_id: sale_id.to_owned(),
            title,
            quantity,
            unit_price,
            unit_measure: "litre".into(),
            description: None,
            amount: amount.to_string(),
        },
        None => Sale {
            sale_id: sale_id.to_owned(),
            title,
            quantity: "1".into(),
            unit_price: amount.to_string(),
            unit_measure: "unit".into(),
            description: Some(match unit {
                Some(p) => format!("{volume} L at {} per litre", p.normalize()),
                None => format!("{volume} L"),
            }),
            amount: amount.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonpts::{IdleStatus, OfflineStatus};

    const NOW: &str = "20251104100000";

    fn cfg() -> PumpConfig {
        PumpConfig {
            pump: 3,
            pos_id: "pump-3".into(),
            controller_id: "003A003A3435510938393730".into(),
            currency: Currency::new("ARS"),
            payment_form: None,
            nozzle_titles: vec!["Super 95".into(), "Diesel".into()],
        }
    }

    fn n(text: &str) -> Option<Num> {
        Some(text.parse().unwrap())
    }

    fn filling(transaction: u32, start: &str) -> PumpStatus {
        PumpStatus::Filling(TransactionStatus {
            pump: 3,
            nozzle: Some(1),
            transaction,
            volume: n("1.00"),
            price: n("798.00"),
            amount: n("798.00"),
            date_time_start: Some(start.into()),
            ..Default::default()
        })
    }

    fn ended(transaction: u32, start: &str) -> PumpStatus {
        PumpStatus::EndOfTransaction(TransactionStatus {
            pump: 3,
            nozzle: Some(1),
            fuel_grade_name: Some("Super 95".into()),
            transaction,
            volume: n("32.10"),
            price: n("798.00"),
            amount: n("25615.80"),
            date_time_start: Some(start.into()),
            date_time: Some("2025-11-04T10:03:10".into()),
            ..Default::default()
        })
    }

    fn idle() -> PumpStatus {
        PumpStatus::Idle(IdleStatus {
            pump: 3,
            ..Default::default()
        })
    }

    fn offline() -> PumpStatus {
        PumpStatus::Offline(OfflineStatus {
            pump: 3,
            ..Default::default()
        })
    }

    const START: &str = "2025-11-04T10:00:01";
    const ID: &str = "003A003A3435510938393730-3-41-20251104100001";

    fn state(sale_id: &str, state: &str) -> StateMessage {
        let text = format!(r#"{{"sale_id":"{sale_id}","state":"{state}"}}"#);
        StateMessage::parse(text.as_bytes(), false).unwrap()
    }

    fn served(sale_id: &str) -> StateMessage {
        let text = format!(r#"{{"sale_id":"{sale_id}","state":"pending","served":true}}"#);
        StateMessage::parse(text.as_bytes(), false).unwrap()
    }

    fn replayed(sale_id: &str, state: &str) -> StateMessage {
        StateMessage {
            retained: true,
            ..self::state(sale_id, state)
        }
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Presence(true) => "online",
                Action::Presence(false) => "offline",
                Action::Progress { .. } => "progress",
                Action::Sale(_) => "sale",
                Action::Cancel { .. } => "cancel",
                Action::Delivered { ok: true, .. } => "delivered ok",
                Action::Delivered { ok: false, .. } => "delivered not ok",
                Action::Lock { .. } => "lock",
                Action::Unlock { .. } => "unlock",
                Action::Close { .. } => "close",
            })
            .collect()
    }

    /// A machine that told qrgate the sale of transaction 41 and heard it pending.
    fn pending() -> PumpMachine {
        let mut m = PumpMachine::new(cfg());
        m.observe(&filling(41, START), NOW);
        m.observe(&ended(41, START), NOW);
        m.heard(&state(ID, "pending"));
        m
    }

    #[test]
    fn filling_says_progress_once_and_the_end_of_transaction_the_priced_sale_once() {
        let mut m = PumpMachine::new(cfg());
        let a = m.observe(&filling(41, START), NOW);
        assert_eq!(
            a,
            [
                Action::Presence(true),
                Action::Progress { sale_id: ID.into() }
            ]
        );
        assert!(m.observe(&filling(41, START), NOW).is_empty());
        m.heard(&state(ID, "in_process"));
        let a = m.observe(&ended(41, START), NOW);
        assert_eq!(
            a,
            [Action::Sale(Sale {
                sale_id: ID.into(),
                title: "Super 95".into(),
                quantity: "32.1".into(),
                unit_price: "798.00".into(),
                unit_measure: "litre".into(),
                description: None,
                amount: "25615.80".into(),
            })]
        );
        assert!(m.observe(&ended(41, START), NOW).is_empty());
        m.heard(&state(ID, "pending"));
        assert!(m.observe(&ended(41, START), NOW).is_empty());
    }

    #[test]
    fn paid_closes_the_transaction_and_its_close_says_delivered() {
        let mut m = pending();
        let a = m.heard(&state(ID, "paid"));
        assert_eq!(
            a,
            [Action::Close {
                sale_id: ID.into(),
                transaction: 41,
                payment: None
            }]
        );
        // In flight: a status meanwhile closes nothing twice.
        assert!(m.observe(&ended(41, START), NOW).is_empty());
        let a = m.closed(CloseOutcome::Closed);
        assert_eq!(
            a,
            [Action::Delivered {
                sale_id: ID.into(),
                ok: true,
                reason: None
            }]
        );
        // qrgate repeats paid until it hears delivered: said again, not closed again.
        assert_eq!(kinds(&m.heard(&state(ID, "paid"))), ["delivered ok"]);
        assert!(m.observe(&idle(), NOW).is_empty());
    }

    #[test]
    fn with_a_payment_form_the_close_carries_the_payment_of_the_amount_told() {
        let mut m = PumpMachine::new(PumpConfig {
            payment_form: Some(4),
            ..cfg()
        });
        m.observe(&ended(41, START), NOW);
        let a = m.heard(&state(ID, "paid"));
        let Action::Close {
            payment: Some(p), ..
        } = &a[0]
        else {
            panic!("{a:?}")
        };
        assert_eq!((p.pump, p.transaction), (3, 41));
        assert_eq!(p.date_time, "2025-11-04T10:03:10");
        assert_eq!(p.payments[0].amount.to_string(), "25615.80");
        assert_eq!(p.payments[0].payment_form_id, 4);
    }

    #[test]
    fn a_transaction_closed_in_the_shop_before_its_payment_is_delivered_not_ok() {
        let mut m = pending();
        m.heard(&state(ID, "paid"));
        let a = m.closed(CloseOutcome::PaidElsewhere("controller error 102".into()));
        assert_eq!(
            a,
            [Action::Delivered {
                sale_id: ID.into(),
                ok: false,
                reason: Some("controller error 102".into())
            }]
        );

        // Paid while the pump shows it idle: closed elsewhere.
        let mut m = pending();
        m.observe(&idle(), NOW);
        let mut m2 = pending();
        assert_eq!(kinds(&m2.observe(&idle(), NOW)), ["cancel"]);
        assert!(m.heard(&state(ID, "paid")).is_empty());

        let mut m = pending();
        // paid arrives while offline: nothing closes; the pump comes back idle.
        m.observe(&offline(), NOW);
        assert!(m.heard(&state(ID, "paid")).is_empty());
        let a = m.observe(&idle(), NOW);
        assert_eq!(kinds(&a), ["online", "delivered not ok"]);
        let Action::Delivered { reason, .. } = &a[1] else {
            panic!()
        };
        assert!(
            reason.as_deref().unwrap().contains("transaction 41"),
            "{reason:?}"
        );
        // Repeats of paid say the same again.
        assert_eq!(kinds(&m.heard(&state(ID, "paid"))), ["delivered not ok"]);
    }

    #[test]
    fn the_pump_idle_again_with_the_sale_unpaid_cancels_it() {
        let mut m = pending();
        assert_eq!(
            m.observe(&idle(), NOW),
            [Action::Cancel { sale_id: ID.into() }]
        );
        assert!(m.observe(&idle(), NOW).is_empty());
        // A payment after that closes nothing.
        assert!(m.heard(&state(ID, "paid")).is_empty());
    }

    #[test]
    fn an_offline_pump_is_offline_once_and_a_paid_sale_closes_when_it_is_back() {
        let mut m = pending();
        assert_eq!(m.observe(&offline(), NOW), [Action::Presence(false)]);
        assert!(m.observe(&offline(), NOW).is_empty());
        assert!(m.heard(&state(ID, "paid")).is_empty());
        assert_eq!(
            kinds(&m.observe(&ended(41, START), NOW)),
            ["online", "close"]
        );
        assert_eq!(m.unreachable(), [Action::Presence(false)]);
    }

    #[test]
    fn served_locks_the_transaction_once_and_its_end_gives_the_pump_back() {
        let mut m = pending();
        assert_eq!(
            m.heard(&served(ID)),
            [Action::Lock {
                sale_id: ID.into(),
                transaction: 41
            }]
        );
        assert!(m.heard(&served(ID)).is_empty());
        m.locked(true);
        m.heard(&state(ID, "paid"));
        assert_eq!(
            kinds(&m.closed(CloseOutcome::Closed)),
            ["delivered ok", "unlock"]
        );

        let mut m = pending();
        m.heard(&served(ID));
        m.locked(true);
        assert_eq!(kinds(&m.heard(&state(ID, "cancelled"))), ["unlock"]);

        // A lock the controller refused is not undone.
        let mut m = pending();
        m.heard(&served(ID));
        m.locked(false);
        assert!(m.heard(&state(ID, "cancelled")).is_empty());
    }

    #[test]
    fn an_expired_sale_never_closes_the_transaction_whose_fuel_is_owed() {
        let mut m = pending();
        assert!(m.heard(&state(ID, "expired")).is_empty());
        for _ in 0..3 {
            assert!(m.observe(&ended(41, START), NOW).is_empty());
        }
        // The shop closes it: nothing to cancel, it is over for qrgate.
        let mut m = pending();
        m.heard(&state(ID, "expired"));
        assert!(m.observe(&idle(), NOW).is_empty());
    }

    #[test]
    fn close_outcomes_that_decide_nothing_are_tried_again_at_the_next_status() {
        let mut m = pending();
        m.heard(&state(ID, "paid"));
        assert!(m.closed(CloseOutcome::Retry("no answer".into())).is_empty());
        assert_eq!(kinds(&m.observe(&ended(41, START), NOW)), ["close"]);
        assert_eq!(
            kinds(&m.closed(CloseOutcome::Refused("controller error 40".into()))),
            ["delivered not ok"]
        );
        assert!(m.observe(&ended(41, START), NOW).is_empty());
    }

    #[test]
    fn sale_ids_name_the_controller_pump_transaction_and_start_so_wrapped_numbers_differ() {
        let mut m = PumpMachine::new(cfg());
        m.observe(&filling(65535, "2025-11-04T09:00:00"), NOW);
        assert_eq!(
            m.sale_id(),
            Some("003A003A3435510938393730-3-65535-20251104090000")
        );
        // The number wrapped; and the same number again later is another sale.
        m.observe(&filling(1, "2025-11-04T09:10:00"), NOW);
        assert_eq!(
            m.sale_id(),
            Some("003A003A3435510938393730-3-1-20251104091000")
        );
        let a = m.observe(&filling(1, "2026-02-01T09:10:00"), NOW);
        assert_eq!(kinds(&a), ["cancel", "progress"]);
        assert_eq!(
            m.sale_id(),
            Some("003A003A3435510938393730-3-1-20260201091000")
        );
        let id = m.sale_id().unwrap();
        assert!(id.len() <= 64);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn a_restart_adopts_the_retained_sale_of_the_open_transaction_and_closes_it_once_paid() {
        let mut m = PumpMachine::new(cfg());
        assert!(m.heard(&replayed(ID, "pending")).is_empty());
        // Nothing is said again: qrgate has the sale.
        assert_eq!(m.observe(&ended(41, START), NOW), [Action::Presence(true)]);
        assert_eq!(kinds(&m.heard(&state(ID, "paid"))), ["close"]);

        // Retained paid while the bridge was down: closed at once.
        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed(ID, "paid"));
        assert_eq!(
            kinds(&m.observe(&ended(41, START), NOW)),
            ["online", "close"]
        );

        // The retained state comes after the first status: adopted all the same.
        let mut m = PumpMachine::new(cfg());
        assert_eq!(
            kinds(&m.observe(&ended(41, START), NOW)),
            ["online", "sale"]
        );
        assert!(m.heard(&replayed(ID, "pending")).is_empty());
        assert_eq!(kinds(&m.heard(&state(ID, "paid"))), ["close"]);
    }

    #[test]
    fn a_restart_never_closes_an_unpaid_transaction_and_settles_sales_no_longer_on_the_pump() {
        let old = "003A003A3435510938393730-3-40-20251104093000";
        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed(old, "pending"));
        assert_eq!(
            m.observe(&ended(41, START), NOW),
            [
                Action::Presence(true),
                Action::Cancel {
                    sale_id: old.into()
                },
                Action::Sale(price(&cfg(), ID, &ended_status()).unwrap())
            ]
        );

        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed(old, "paid"));
        let settled = m.observe(&idle(), NOW);
        assert_eq!(kinds(&settled), ["online", "delivered not ok"]);
        assert!(
            matches!(&settled[1], Action::Delivered { reason: Some(r), .. } if r.contains("transaction 40 ")),
            "the reason names the transaction its sale id says: {settled:?}"
        );

        // The same, but the bridge's close record says it closed that
        // transaction before it stopped: delivered, the fuel was paid.
        let mut m = PumpMachine::new(cfg());
        m.remember_closed(old.to_owned());
        m.heard(&replayed(old, "paid"));
        assert_eq!(
            m.observe(&idle(), NOW),
            [
                Action::Presence(true),
                Action::Delivered {
                    sale_id: old.to_owned(),
                    ok: true,
                    reason: None
                }
            ]
        );
        // A record of another sale changes nothing for this one.
        let mut m = PumpMachine::new(cfg());
        m.remember_closed(format!("{old}-not-it"));
        m.heard(&replayed(old, "paid"));
        assert_eq!(
            kinds(&m.observe(&idle(), NOW)),
            ["online", "delivered not ok"]
        );

        // An unpaid retained sale of the open transaction: nothing closes.
        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed(ID, "pending"));
        for _ in 0..3 {
            assert!(!kinds(&m.observe(&ended(41, START), NOW)).contains(&"close"));
        }

        // Another controller's or pump's sale on the topic: not ours to touch.
        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed("other-3-40-20251104093000", "pending"));
        m.heard(&replayed(
            "003A003A3435510938393730-4-40-20251104093000",
            "pending",
        ));
        assert_eq!(m.observe(&idle(), NOW), [Action::Presence(true)]);
    }

    fn ended_status() -> TransactionStatus {
        let PumpStatus::EndOfTransaction(t) = ended(41, START) else {
            unreachable!()
        };
        t
    }

    #[test]
    fn without_a_start_time_the_sale_id_takes_the_bridges_clock_and_a_restart_finds_it() {
        let no_start = |s: PumpStatus| match s {
            PumpStatus::EndOfTransaction(t) => PumpStatus::EndOfTransaction(TransactionStatus {
                date_time_start: None,
                ..t
            }),
            other => other,
        };
        let mut m = PumpMachine::new(cfg());
        m.observe(&no_start(ended(41, START)), NOW);
        let first = m.sale_id().unwrap().to_owned();
        assert_eq!(first, "003A003A3435510938393730-3-41-20251104100000");

        let mut m = PumpMachine::new(cfg());
        m.heard(&replayed(&first, "pending"));
        assert_eq!(
            m.observe(&no_start(ended(41, START)), "20251104100500"),
            [Action::Presence(true)]
        );
        assert_eq!(m.sale_id(), Some(first.as_str()));
    }

    #[test]
    fn nothing_dispensed_cancels_the_progress_and_sells_nothing() {
        let mut m = PumpMachine::new(cfg());
        m.observe(&filling(41, START), NOW);
        let zero = match ended(41, START) {
            PumpStatus::EndOfTransaction(t) => PumpStatus::EndOfTransaction(TransactionStatus {
                volume: n("0.00"),
                amount: n("0.00"),
                ..t
            }),
            _ => unreachable!(),
        };
        assert_eq!(kinds(&m.observe(&zero, NOW)), ["cancel"]);
        assert!(m.observe(&zero, NOW).is_empty());
    }

    #[test]
    fn an_upload_of_a_transaction_the_bridge_did_not_close_settles_it_once() {
        let mut m = pending();
        assert_eq!(kinds(&m.uploaded(41)), ["cancel"]);
        assert!(m.uploaded(41).is_empty());
        assert!(m.uploaded(7).is_empty());

        let mut m = pending();
        m.heard(&state(ID, "paid"));
        // Our own close is uploaded too.
        assert!(m.uploaded(41).is_empty());
    }

    #[test]
    fn a_busy_refusal_of_the_sale_is_said_again_at_the_next_status() {
        let mut m = PumpMachine::new(cfg());
        m.observe(&ended(41, START), NOW);
        let text = format!(r#"{{"sale_id":"{ID}","state":"rejected","reason":"busy"}}"#);
        m.heard(&StateMessage::parse(text.as_bytes(), false).unwrap());
        assert_eq!(kinds(&m.observe(&ended(41, START), NOW)), ["sale"]);
        let text = format!(r#"{{"sale_id":"{ID}","state":"rejected","reason":"bad_amount"}}"#);
        m.heard(&StateMessage::parse(text.as_bytes(), false).unwrap());
        assert!(m.observe(&ended(41, START), NOW).is_empty());
    }

    fn priced(volume: &str, price_: &str, amount: &str, currency: &str) -> Sale {
        let cfg = PumpConfig {
            currency: Currency::new(currency),
            ..cfg()
        };
        let t = TransactionStatus {
            pump: 3,
            nozzle: Some(2),
            transaction: 9,
            volume: n(volume),
            price: n(price_),
            amount: n(amount),
            ..Default::default()
        };
        price(&cfg, "s", &t).unwrap()
    }

    #[test]
    fn a_sale_is_the_volume_at_the_price_when_qrgates_rules_give_the_controllers_amount() {
        let s = priced("10.004", "2.50", "25.01", "ARS");
        assert_eq!(
            (
                s.title.as_str(),
                s.quantity.as_str(),
                s.unit_price.as_str(),
                s.amount.as_str()
            ),
            ("Diesel", "10.004", "2.50", "25.01")
        );
        // Amounts round half up to the currency.
        assert_eq!(priced("1.000", "12.345", "12.345", "ARS").amount, "12.35");
        assert_eq!(priced("2.5", "999", "2497.5", "CLP").amount, "2498");
        assert_eq!(priced("2.5", "999", "2497.5", "CLP").unit_price, "999");
    }

    #[test]
    fn a_price_qrgate_cannot_take_sells_one_unit_at_the_controllers_amount() {
        // Three decimals in the price: more than the currency has.
        let s = priced("20.5", "1.239", "25.400", "ARS");
        assert_eq!(
            (
                s.quantity.as_str(),
                s.unit_price.as_str(),
                s.unit_measure.as_str(),
                s.amount.as_str()
            ),
            ("1", "25.40", "unit", "25.40")
        );
        assert_eq!(s.description.as_deref(), Some("20.5 L at 1.239 per litre"));
        // A volume × price that does not round to the controller's amount.
        let s = priced("10.004", "2.50", "25.00", "ARS");
        assert_eq!((s.quantity.as_str(), s.amount.as_str()), ("1", "25.00"));
        // Nothing to pay is not a sale.
        let t = TransactionStatus {
            volume: n("1.0"),
            price: n("0"),
            amount: n("0.004"),
            ..Default::default()
        };
        assert!(price(&cfg(), "s", &t).is_err());
    }

    #[test]
    fn stamps_are_the_start_times_digits_or_nothing() {
        assert_eq!(
            stamp("2019-05-19T12:44:01").as_deref(),
            Some("20190519124401")
        );
        assert_eq!(stamp("2019-05-19"), None);
        assert_eq!(stamp("x019-05-19T12:44:01"), None);
    }
}
