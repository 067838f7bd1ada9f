//! The control API, under `/_sim/` (a path Mercado Pago never uses, so it cannot shadow one of its
//! endpoints): what the customer's app and MP's backend do, asked for over HTTP by `mpsim`'s CLI
//! (`cli`), by scripts, and by tests that run the simulator as a process of its own. Each call
//! runs the same [`Simulator`] method a library test calls, so a scan, a payment or a notification
//! is the one the crate's own tests check against MP's wire format.
//!
//! JSON in and out. Every call names its subject with `target`, read in this order: a URL
//! (`http://…`, a POS URL as given), a merchant order id, a payment id, an Orders API order id,
//! a registered POS (its `external_id`, else its `name`), an attended POS's `external_id`, an
//! `external_reference`. Errors are `{"error": code, "message": …}`: 400 `bad_request`, 404
//! `unknown`, 409 `nothing_to_pay` / `nothing_to_do`, 422 `refused` (MP would refuse it), 502
//! `unreachable` (the POS URL did not answer) or `bad_answer`.
//!
//! - `GET /_sim/state`: stores, POS, merchant orders, payments, refunds, the latest notifications.
//! - `POST /_sim/scan {"target"}`: a customer scans a POS (its registered `url`, or the attended
//!   order on it); an order answer opens a merchant order, remembered as that POS's last scan.
//! - `POST /_sim/pay {"target", "status"?, "status_detail"?, "amount"?}`: the customer pays. A POS
//!   pays its last scan while that can still be paid, else scans it first; a reference pays its
//!   newest payable merchant order. `status`: `approved` (default; `amount` for a short or over
//!   payment), `rejected` (`status_detail` MP's reason, `cc_rejected_other_reason` by default),
//!   `in_process`.
//! - `POST /_sim/notify {"target"?}`: without a target, sends every withheld notification; with
//!   one, an IPN for a merchant order (a POS: its last scan; a reference: each of its merchant
//!   orders), a webhook for a payment, the `order` webhook for an Orders API order.
//! - `POST /_sim/withhold-notifications {"on"}`: keep payments' notifications instead of sending
//!   them (turning it off sends nothing: `notify` does).
//! - `POST /_sim/refund {"target", "amount"?}`: a refund made at MP (not through its API) of a
//!   payment, all that is left of it by default.
//! - `POST /_sim/expire {"target"}`: MP gives up on an unpaid merchant order (a POS: its last
//!   scan's; a reference: each payable one), an attended POS's order, an Orders API order.

use std::sync::{OnceLock, Weak};

use serde_json::{json, Value};

use super::*;

pub(super) const PREFIX: &str = "/_sim";
/// `state` shows the latest notifications only: a simulator may run for days.
const STATE_NOTIFICATIONS: usize = 100;

/// The control API's view of the simulator, held by the HTTP server: weakly, so that dropping the
/// last [`Simulator`] still stops the server.
#[derive(Default)]
pub(super) struct Handle {
    sim: OnceLock<Weak<Inner>>,
    /// The last order each POS served (keyed by [`PosRef::key`]), for `pay` and `notify` of a POS.
    last_scans: Mutex<HashMap<String, Scanned>>,
}

impl Handle {
    pub(super) fn attach(&self, sim: &Simulator) {
        let _ = self.sim.set(Arc::downgrade(&sim.inner));
    }

    fn simulator(&self) -> Option<Simulator> {
        let inner = self.sim.get()?.upgrade()?;
        Some(Simulator { inner })
    }

    fn last_scan(&self, pos: &PosRef) -> Option<Scanned> {
        self.scans().get(&pos.key()).cloned()
    }

    fn remember(&self, pos: &PosRef, scan: &Scan) {
        let scanned = match scan {
            Scan::Order(order) => match &order.order_id {
                Some(id) => Scanned::Order(id.clone()),
                None => Scanned::MerchantOrder(order.merchant_order_id),
            },
            Scan::Waiting { .. } => return,
        };
        self.scans().insert(pos.key(), scanned);
    }

    fn scans(&self) -> MutexGuard<'_, HashMap<String, Scanned>> {
        // A map of ids stays consistent whatever panicked while holding it.
        self.last_scans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a scan opened: a merchant order, or an Orders API order (which opens none).
#[derive(Clone, Debug)]
enum Scanned {
    MerchantOrder(u64),
    Order(String),
}

/// A POS as the customer reaches it: the URL its QR makes MP poll, or the attended order on it.
#[derive(Debug)]
enum PosRef {
    Url(String),
    Attended(String),
}

impl PosRef {
    fn key(&self) -> String {
        match self {
            PosRef::Url(url) => url.clone(),
            PosRef::Attended(pos) => format!("attended:{pos}"),
        }
    }
}

#[derive(Debug)]
enum Target {
    Pos(PosRef),
    MerchantOrder(u64),
    Payment(u64),
    Order(String),
    Reference(String),
}

/// A control call's failure, with its status and stable code.
#[derive(Debug)]
struct ControlError {
    status: u16,
    code: &'static str,
    message: String,
}

impl ControlError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ControlError {
        ControlError::new(400, "bad_request", message)
    }

    fn response(&self) -> HttpResponse {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({"error": self.code, "message": self.message});
        json_response(code, body.to_string())
    }
}

impl From<SimError> for ControlError {
    fn from(error: SimError) -> ControlError {
        let (status, code) = match &error {
            SimError::Http(_) => (502, "unreachable"),
            SimError::BadAnswer { .. } => (502, "bad_answer"),
            SimError::InvalidOrder(_) | SimError::PosWithoutUrl(_) => (422, "refused"),
            SimError::UnknownMerchantOrder(_)
            | SimError::UnknownPayment(_)
            | SimError::UnknownPos(_)
            | SimError::UnknownStore(_)
            | SimError::UnknownOrder(_) => (404, "unknown"),
        };
        ControlError::new(status, code, error.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayBody {
    target: String,
    status: Option<String>,
    status_detail: Option<String>,
    amount: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NotifyBody {
    target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WithholdBody {
    on: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    target: String,
    amount: Option<Value>,
}

pub(super) async fn handle(
    req: HttpRequest,
    body: web::Bytes,
    handle: web::Data<Handle>,
) -> HttpResponse {
    let Some(sim) = handle.simulator() else {
        return ControlError::new(503, "stopping", "the simulator is stopping").response();
    };
    let path = req.path().strip_prefix(PREFIX).unwrap_or_default();
    let result = match (req.method().as_str(), path) {
        ("GET", "/state") => Ok(state(&sim, &handle)),
        ("POST", "/scan") => match parse::<TargetBody>(&body) {
            Ok(call) => scan(&sim, &handle, &call.target).await,
            Err(error) => Err(error),
        },
        ("POST", "/pay") => match parse::<PayBody>(&body) {
            Ok(call) => pay(&sim, &handle, call).await,
            Err(error) => Err(error),
        },
        ("POST", "/notify") => match parse_or_default::<NotifyBody>(&body) {
            Ok(call) => notify(&sim, &handle, call.target.as_deref()).await,
            Err(error) => Err(error),
        },
        ("POST", "/withhold-notifications") => {
            parse::<WithholdBody>(&body).map(|call| withhold(&sim, call.on))
        }
        ("POST", "/refund") => match parse::<RefundBody>(&body) {
            Ok(call) => refund(&sim, call),
            Err(error) => Err(error),
        },
        ("POST", "/expire") => match parse::<TargetBody>(&body) {
            Ok(call) => expire(&sim, &handle, &call.target),
            Err(error) => Err(error),
        },
        (method, _) => Err(ControlError::new(
            404,
            "unknown",
            format!(
                "no control call {method} {}: the calls are GET {PREFIX}/state and POST \
                 {PREFIX}/scan, pay, notify, withhold-notifications, refund, expire",
                req.path()
            ),
        )),
    };
    match result {
        Ok(answer) => json_response(StatusCode::OK, answer.to_string()),
        Err(error) => error.response(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body)
        .map_err(|error| ControlError::bad_request(format!("the JSON body: {error}")))
}

fn parse_or_default<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ControlError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body)
}

/// What `target` names; see the module's documentation for the order it is read in.
fn resolve(sim: &Simulator, target: &str) -> Result<Target, ControlError> {
    let target = target.trim();
    if target.is_empty() {
        return Err(ControlError::bad_request(
            "name a POS, a POS URL, a merchant order, a payment or an external_reference",
        ));
    }
    if target.starts_with("http://") || target.starts_with("https://") {
        return Ok(Target::Pos(PosRef::Url(target.to_owned())));
    }
    if let Ok(id) = target.parse::<u64>() {
        let state = sim.inner.shared.lock();
        if state.merchant_orders.contains_key(&id) {
            return Ok(Target::MerchantOrder(id));
        }
        if state.payments.contains_key(&id) {
            return Ok(Target::Payment(id));
        }
    }
    if sim.orders_api_order(target).is_some() {
        return Ok(Target::Order(target.to_owned()));
    }
    let registered = sim.pos_by_external_id(target).or_else(|| {
        let named: Vec<Value> = sim
            .pos_list()
            .into_iter()
            .filter(|pos| pos["name"] == target)
            .collect();
        match <[Value; 1]>::try_from(named) {
            Ok([pos]) => Some(pos),
            Err(_) => None,
        }
    });
    if let Some(pos) = registered {
        return Ok(Target::Pos(match pos["url"].as_str() {
            Some(url) => PosRef::Url(url.to_owned()),
            None => PosRef::Attended(pos["external_id"].as_str().unwrap_or(target).to_owned()),
        }));
    }
    let state = sim.inner.shared.lock();
    if state.attended.contains_key(target) {
        return Ok(Target::Pos(PosRef::Attended(target.to_owned())));
    }
    if !state.orders_for(Some(target)).is_empty() {
        return Ok(Target::Reference(target.to_owned()));
    }
    Err(ControlError::new(
        404,
        "unknown",
        format!(
            "{target:?} is no POS URL, merchant order, payment, Orders API order, registered POS \
             (external_id or name), attended POS or external_reference known here"
        ),
    ))
}

async fn scan(sim: &Simulator, handle: &Handle, target: &str) -> Result<Value, ControlError> {
    let pos = match resolve(sim, target)? {
        Target::Pos(pos) => pos,
        other => {
            return Err(ControlError::bad_request(format!(
                "scan names a POS (its external_id or name at MP) or a POS URL, not {other:?}"
            )))
        }
    };
    let scan = scan_pos(sim, handle, &pos).await?;
    Ok(scan_json(&pos, &scan))
}

async fn scan_pos(sim: &Simulator, handle: &Handle, pos: &PosRef) -> Result<Scan, ControlError> {
    let scan = match pos {
        PosRef::Url(url) => sim.scan(url).await?,
        PosRef::Attended(external_id) => sim.scan_attended(external_id).await?,
    };
    handle.remember(pos, &scan);
    Ok(scan)
}

fn scan_json(pos: &PosRef, scan: &Scan) -> Value {
    let mut answer = match scan {
        Scan::Waiting {
            http_status,
            kind,
            message,
        } => json!({
            "answer": "wait",
            "http_status": http_status,
            "kind": kind,
            "message": message,
        }),
        Scan::Order(order) => json!({
            "answer": "order",
            "http_status": order.status,
            "merchant_order": (order.merchant_order_id != 0).then_some(order.merchant_order_id),
            "order_id": order.order_id,
            "external_reference": order.external_reference,
            "total_amount": amount_text(order.total_amount, &order.currency_id),
            "currency_id": order.currency_id,
            "notification_url": order.notification_url,
        }),
    };
    answer["pos"] = Value::from(pos.key());
    answer
}

fn outcome(call: &PayBody) -> Result<PaymentOutcome, ControlError> {
    let amount = match &call.amount {
        None | Some(Value::Null) => None,
        Some(value) => match json_decimal(value) {
            Some(amount) if amount > Decimal::ZERO => Some(amount),
            _ => {
                return Err(ControlError::bad_request(format!(
                    "amount {value} is not a positive decimal"
                )))
            }
        },
    };
    let status = call.status.as_deref().unwrap_or("approved");
    let detail = call.status_detail.as_deref();
    match (status, detail, amount) {
        ("approved", None, None) => Ok(PaymentOutcome::Approved),
        ("approved", None, Some(amount)) => Ok(PaymentOutcome::ApprovedAmount(amount)),
        ("rejected", None, None) => Ok(PaymentOutcome::Rejected),
        ("rejected", Some(detail), None) if status_detail_shape(detail) => {
            Ok(PaymentOutcome::RejectedWith(detail.to_owned()))
        }
        ("rejected", Some(detail), None) => Err(ControlError::bad_request(format!(
            "status_detail {detail:?} is not one of MP's codes (letters, digits and _, at most 64)"
        ))),
        ("in_process", None, None) => Ok(PaymentOutcome::InProcess),
        ("approved" | "in_process", Some(_), _) => Err(ControlError::bad_request(
            "status_detail names why a payment was rejected: use it with status rejected",
        )),
        ("rejected" | "in_process", _, Some(_)) => Err(ControlError::bad_request(
            "amount is what an approved payment paid: use it with status approved",
        )),
        (other, _, _) => Err(ControlError::bad_request(format!(
            "status {other:?}: approved, rejected or in_process"
        ))),
    }
}

fn status_detail_shape(detail: &str) -> bool {
    !detail.is_empty()
        && detail.len() <= 64
        && detail
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

async fn pay(sim: &Simulator, handle: &Handle, call: PayBody) -> Result<Value, ControlError> {
    let outcome = outcome(&call)?;
    let payable = match resolve(sim, &call.target)? {
        Target::MerchantOrder(id) => Scanned::MerchantOrder(id),
        Target::Order(id) => Scanned::Order(id),
        Target::Reference(reference) => newest_payable(sim, &reference).ok_or_else(|| {
            ControlError::new(
                409,
                "nothing_to_pay",
                format!("no merchant order of {reference} can be paid: scan its POS again"),
            )
        })?,
        Target::Payment(id) => {
            return Err(ControlError::bad_request(format!(
                "{id} is a payment: pay a POS, a merchant order or an external_reference"
            )))
        }
        Target::Pos(pos) => match handle.last_scan(&pos).filter(|s| payable(sim, s)) {
            Some(scanned) => scanned,
            None => match scan_pos(sim, handle, &pos).await? {
                Scan::Order(order) => match order.order_id {
                    Some(id) => Scanned::Order(id),
                    None => Scanned::MerchantOrder(order.merchant_order_id),
                },
                Scan::Waiting {
                    http_status, kind, ..
                } => {
                    return Err(ControlError::new(
                        409,
                        "nothing_to_pay",
                        format!(
                            "{} answers HTTP {http_status} {kind}: nothing to pay",
                            pos.key()
                        ),
                    ))
                }
            },
        },
    };
    match payable {
        Scanned::MerchantOrder(id) => {
            let (payment, dispatched) = sim.pay_notifying(id, outcome).await?;
            let state = sim.inner.shared.lock();
            let mut answer = state
                .payments
                .get(&payment)
                .map(payment_json)
                .unwrap_or_else(|| json!({"payment": payment}));
            answer["notifications"] = sent_json(&dispatched.sent);
            answer["withheld"] = Value::from(dispatched.withheld);
            Ok(answer)
        }
        Scanned::Order(id) => {
            let (payment, dispatched) = sim.pay_order_notifying(&id, outcome).await?;
            let order = sim.orders_api_order(&id).unwrap_or(Value::Null);
            Ok(json!({
                "order_id": id,
                "payment": payment,
                "status": order["status"],
                "status_detail": order["transactions"]["payments"][0]["status_detail"],
                "external_reference": order["external_reference"],
                "notifications": sent_json(&dispatched.sent),
                "withheld": dispatched.withheld,
            }))
        }
    }
}

fn payable(sim: &Simulator, scanned: &Scanned) -> bool {
    match scanned {
        Scanned::MerchantOrder(id) => sim.merchant_order_payable(*id),
        Scanned::Order(id) => sim.orders_api_order(id).is_some_and(|order| {
            matches!(
                order["status"].as_str(),
                Some("created" | "action_required")
            )
        }),
    }
}

fn newest_payable(sim: &Simulator, reference: &str) -> Option<Scanned> {
    let ids = sim.inner.shared.lock().orders_for(Some(reference));
    ids.into_iter()
        .rev()
        .find(|id| sim.merchant_order_payable(*id))
        .map(Scanned::MerchantOrder)
}

/// An amount with its currency's decimals (98 ARS: "98.00"), as MP shows it.
fn amount_text(amount: Decimal, currency: &str) -> String {
    let mut amount = amount;
    if amount.scale() < currency_decimals(currency) {
        amount.rescale(currency_decimals(currency));
    }
    amount.to_string()
}

fn payment_json(payment: &Payment) -> Value {
    let text = |amount| amount_text(amount, &payment.currency_id);
    json!({
        "payment": payment.id,
        "merchant_order": payment.merchant_order_id,
        "status": payment.status,
        "status_detail": payment.status_detail,
        "amount": text(payment.amount),
        "refunded": text(payment.refunded),
        "currency_id": payment.currency_id,
        "external_reference": payment.external_reference,
    })
}

fn sent_json(sent: &[SentNotification]) -> Value {
    sent.iter()
        .map(|n| json!({"url": n.url, "status": n.status}))
        .collect()
}

async fn notify(
    sim: &Simulator,
    handle: &Handle,
    target: Option<&str>,
) -> Result<Value, ControlError> {
    let outgoing = match target {
        None => {
            let sent = sim.release_notifications().await;
            return Ok(json!({"notifications": sent_json(&sent), "withheld": 0}));
        }
        Some(target) => match resolve(sim, target)? {
            Target::MerchantOrder(id) => vec![merchant_order_ipn(sim, id)?],
            Target::Payment(id) => vec![payment_webhook(sim, id)?],
            Target::Order(id) => vec![order_webhook(sim, &id)?],
            Target::Reference(reference) => {
                let ids = sim.inner.shared.lock().orders_for(Some(&reference));
                ids.into_iter()
                    .map(|id| merchant_order_ipn(sim, id))
                    .collect::<Result<_, _>>()?
            }
            Target::Pos(pos) => match handle.last_scan(&pos) {
                Some(Scanned::MerchantOrder(id)) => vec![merchant_order_ipn(sim, id)?],
                Some(Scanned::Order(id)) => vec![order_webhook(sim, &id)?],
                None => {
                    return Err(ControlError::new(
                        409,
                        "nothing_to_do",
                        format!("{} was not scanned here yet: nothing to notify", pos.key()),
                    ))
                }
            },
        },
    };
    // Asked for by name: sent now, even while withholding.
    let sent = sim.deliver_all(outgoing).await.sent;
    let (_, withheld) = sim.withheld_notifications();
    Ok(json!({"notifications": sent_json(&sent), "withheld": withheld}))
}

fn merchant_order_ipn(sim: &Simulator, id: u64) -> Result<Outgoing, ControlError> {
    let state = sim.inner.shared.lock();
    let url = state
        .merchant_orders
        .get(&id)
        .and_then(Stored::notification_url)
        .ok_or_else(|| {
            ControlError::new(
                409,
                "nothing_to_do",
                format!("merchant order {id} has no notification_url"),
            )
        })?;
    Ok(ipn(&url, id))
}

fn payment_webhook(sim: &Simulator, id: u64) -> Result<Outgoing, ControlError> {
    let state = sim.inner.shared.lock();
    let url = state
        .payments
        .get(&id)
        .and_then(|payment| payment.notification_url.clone())
        .ok_or_else(|| {
            ControlError::new(
                409,
                "nothing_to_do",
                format!("payment {id} has no notification_url"),
            )
        })?;
    Ok(webhook(&url, id, sim.inner.shared.config.collector_id))
}

fn order_webhook(sim: &Simulator, id: &str) -> Result<Outgoing, ControlError> {
    sim.order_notification(id).ok_or_else(|| {
        ControlError::new(
            409,
            "nothing_to_do",
            format!("order {id}: no webhook url is set for the Orders API"),
        )
    })
}

fn withhold(sim: &Simulator, on: bool) -> Value {
    sim.withhold_notifications(on);
    let (withholding, withheld) = sim.withheld_notifications();
    tracing::info!(
        withholding,
        withheld,
        "simulated notifications withheld or not"
    );
    json!({"withholding": withholding, "withheld": withheld})
}

fn refund(sim: &Simulator, call: RefundBody) -> Result<Value, ControlError> {
    let amount = match &call.amount {
        None | Some(Value::Null) => None,
        Some(value) => Some(json_decimal(value).ok_or_else(|| {
            ControlError::bad_request(format!("amount {value} is not a decimal"))
        })?),
    };
    let payment = match resolve(sim, &call.target)? {
        Target::Payment(id) => id,
        other => {
            return Err(ControlError::bad_request(format!(
                "refund names a payment, not {other:?}"
            )))
        }
    };
    let refund = sim.refund_payment(payment, amount)?;
    let state = sim.inner.shared.lock();
    let mut answer = state
        .payments
        .get(&payment)
        .map(payment_json)
        .unwrap_or_default();
    answer["refund"] = Value::from(refund);
    Ok(answer)
}

fn expire(sim: &Simulator, handle: &Handle, target: &str) -> Result<Value, ControlError> {
    let mut expired = Vec::new();
    match resolve(sim, target)? {
        Target::MerchantOrder(id) => {
            sim.expire_merchant_order(id)?;
            expired.push(json!({"merchant_order": id}));
        }
        Target::Order(id) => {
            sim.expire_order(&id)?;
            expired.push(json!({"order_id": id}));
        }
        Target::Reference(reference) => {
            let ids = sim.inner.shared.lock().orders_for(Some(&reference));
            for id in ids.into_iter().filter(|id| sim.merchant_order_payable(*id)) {
                sim.expire_merchant_order(id)?;
                expired.push(json!({"merchant_order": id}));
            }
        }
        Target::Pos(PosRef::Attended(pos)) => {
            if sim.expire_attended_order(&pos) {
                expired.push(json!({"attended_pos": pos}));
            }
        }
        Target::Pos(pos) => match handle.last_scan(&pos) {
            Some(Scanned::MerchantOrder(id)) if sim.merchant_order_payable(id) => {
                sim.expire_merchant_order(id)?;
                expired.push(json!({"merchant_order": id}));
            }
            Some(Scanned::Order(id)) => {
                sim.expire_order(&id)?;
                expired.push(json!({"order_id": id}));
            }
            _ => {}
        },
        Target::Payment(id) => {
            return Err(ControlError::bad_request(format!(
                "{id} is a payment: a payment does not expire (refund it)"
            )))
        }
    }
    if expired.is_empty() {
        return Err(ControlError::new(
            409,
            "nothing_to_do",
            format!("nothing of {target} can expire: no unpaid order"),
        ));
    }
    Ok(json!({ "expired": expired }))
}

/// Everything the simulator holds, for `mpsim state` and for tests that check what MP saw.
fn state(sim: &Simulator, handle: &Handle) -> Value {
    let stores: Vec<Value> = sim
        .stores()
        .iter()
        .map(|s| json!({"id": s["id"], "external_id": s["external_id"], "name": s["name"]}))
        .collect();
    let pos: Vec<Value> = sim
        .pos_list()
        .iter()
        .map(|p| {
            json!({"id": p["id"], "external_id": p["external_id"], "name": p["name"],
                   "external_store_id": p["external_store_id"], "url": p["url"]})
        })
        .collect();
    let last_scans: serde_json::Map<String, Value> = handle
        .scans()
        .iter()
        .map(|(pos, scanned)| {
            let value = match scanned {
                Scanned::MerchantOrder(id) => json!({"merchant_order": id}),
                Scanned::Order(id) => json!({"order_id": id}),
            };
            (pos.clone(), value)
        })
        .collect();
    let config = &sim.inner.shared.config;
    let state = sim.inner.shared.lock();
    let merchant_orders: Vec<Value> = state
        .merchant_orders
        .iter()
        .map(|(id, stored)| match stored {
            Stored::Sim(order) => {
                let totals = state.totals(order);
                let (status, order_status) = match order_state(order.total_amount, &totals) {
                    ("opened", _) if order.expired => ("expired", "expired"),
                    other => other,
                };
                json!({
                    "id": id,
                    "external_reference": order.external_reference,
                    "status": status,
                    "order_status": order_status,
                    "total_amount": amount_text(order.total_amount, &order.currency_id),
                    "paid_amount": amount_text(totals.paid, &order.currency_id),
                    "refunded_amount": amount_text(totals.refunded, &order.currency_id),
                    "currency_id": order.currency_id,
                    "notification_url": order.notification_url,
                    "payments": order.payment_ids,
                })
            }
            Stored::Raw(value) => json!({
                "id": id,
                "external_reference": value.get("external_reference"),
                "inserted": true,
            }),
        })
        .collect();
    let payments: Vec<Value> = state.payments.values().map(payment_json).collect();
    let refunds: Vec<Value> = state
        .refunds
        .iter()
        .map(|r| {
            let currency = state
                .payments
                .get(&r.record.payment_id)
                .map_or("", |p| p.currency_id.as_str());
            json!({"refund": r.record.refund_id, "payment": r.record.payment_id,
                   "amount": amount_text(r.amount, currency)})
        })
        .collect();
    let skip = state
        .notifications
        .len()
        .saturating_sub(STATE_NOTIFICATIONS);
    let notifications: Vec<Value> = state
        .notifications
        .iter()
        .skip(skip)
        .map(|n| json!({"url": n.url, "status": n.status}))
        .collect();
    let withheld: Vec<&str> = state.withheld.iter().map(|n| n.url.as_str()).collect();
    json!({
        "collector_id": config.collector_id,
        "site_currency": config.site_currency,
        "withholding": state.withhold,
        "withheld": withheld,
        "stores": stores,
        "pos": pos,
        "last_scans": last_scans,
        "merchant_orders": merchant_orders,
        "payments": payments,
        "refunds": refunds,
        "notifications": notifications,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{send, start, Pos};
    use super::*;
    use reqwest::Method;

    /// A control call, without MP's token: the control API needs none.
    async fn control(sim: &Simulator, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{PREFIX}/{path}", sim.base_url());
        let client = reqwest::Client::new();
        let request = if body.is_null() {
            client.get(url)
        } else {
            client.post(url).body(body.to_string())
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str(&response.text().await.unwrap()).unwrap(),
        )
    }

    /// Store st01 and a POS with this name (external_id: the name without '-'), polled at `url`.
    async fn register(sim: &Simulator, name: &str, url: &str) {
        let store = json!({
            "name": "Estación Centro", "external_id": "st01",
            "location": {"street_number": "3039", "street_name": "Caseros", "city_name": "Belgrano",
                         "state_name": "Capital Federal", "latitude": -32.88, "longitude": -68.84}
        });
        let (status, _) = send(
            sim,
            Method::POST,
            "/users/178106235/stores",
            &store.to_string(),
        )
        .await;
        assert!(status == 201 || status == 400, "{status}");
        let pos = json!({
            "name": name, "fixed_amount": true, "category": 473000, "external_store_id": "st01",
            "external_id": name.replace('-', ""), "url": url,
        });
        let (status, body) = send(sim, Method::POST, "/pos", &pos.to_string()).await;
        assert_eq!(status, 201, "{body}");
    }

    async fn registered() -> (Simulator, Pos) {
        let (sim, pos) = start().await;
        register(&sim, "pump-1", &pos.url).await;
        (sim, pos)
    }

    #[tokio::test]
    async fn a_pos_registered_through_the_api_is_scanned_by_its_name_and_paid_once_scanned() {
        let (sim, pos) = registered().await;
        pos.order("25615.80");
        let (status, scan) = control(&sim, "scan", json!({"target": "pump-1"})).await;
        assert_eq!(status, 200, "{scan}");
        assert_eq!(scan["answer"], "order");
        assert_eq!(
            scan["pos"], pos.url,
            "the url learnt at registration was polled"
        );
        assert_eq!(scan["total_amount"], "25615.80");
        let merchant_order = scan["merchant_order"].as_u64().unwrap();

        // By its external_id too; paying the POS pays what its last scan opened.
        let (status, paid) = control(&sim, "pay", json!({"target": "pump1"})).await;
        assert_eq!(status, 200, "{paid}");
        assert_eq!(paid["merchant_order"], merchant_order);
        assert_eq!(
            (&paid["status"], &paid["status_detail"], &paid["amount"]),
            (&json!("approved"), &json!("accredited"), &json!("25615.80"))
        );
        let sent = paid["notifications"].as_array().unwrap();
        assert_eq!(sent.len(), 2, "an IPN and a webhook: {paid}");
        assert!(sent.iter().all(|n| n["status"] == 200), "{paid}");
        assert_eq!(pos.received().len(), 2);
        assert_eq!(
            sim.merchant_orders_for(super::super::tests::REFERENCE)
                .len(),
            1
        );
        assert_eq!(
            sim.merchant_order(merchant_order).unwrap()["status"],
            "closed"
        );

        // Nothing left on that merchant order: paying the POS scans again, as the app would.
        let (status, again) = control(&sim, "pay", json!({"target": "pump-1"})).await;
        assert_eq!(status, 200, "{again}");
        assert_ne!(again["merchant_order"], merchant_order);
    }

    #[tokio::test]
    async fn a_rejection_carries_its_status_detail_and_leaves_the_merchant_order_payable() {
        let (sim, pos) = registered().await;
        pos.order("798.00");
        let rejected = json!({"target": pos.url, "status": "rejected",
                              "status_detail": "cc_rejected_insufficient_amount"});
        let (status, paid) = control(&sim, "pay", rejected).await;
        assert_eq!(status, 200, "{paid}");
        assert_eq!(paid["status"], "rejected");
        assert_eq!(paid["status_detail"], "cc_rejected_insufficient_amount");
        let merchant_order = paid["merchant_order"].as_u64().unwrap();
        let served = sim.merchant_order(merchant_order).unwrap();
        assert_eq!(served["status"], "opened");
        assert_eq!(
            served["payments"][0]["status_detail"],
            "cc_rejected_insufficient_amount"
        );

        // The retry, by external_reference, pays the same merchant order.
        let reference = super::super::tests::REFERENCE;
        let (status, retry) = control(&sim, "pay", json!({"target": reference})).await;
        assert_eq!(status, 200, "{retry}");
        assert_eq!(retry["merchant_order"], merchant_order);
        assert_eq!(
            sim.merchant_order(merchant_order).unwrap()["status"],
            "closed"
        );

        for (body, why) in [
            (
                json!({"target": reference, "status": "rejected", "status_detail": "no way!"}),
                "shape",
            ),
            (
                json!({"target": reference, "status_detail": "cc_rejected_other_reason"}),
                "approved",
            ),
            (json!({"target": reference, "status": "refunded"}), "status"),
            (json!({"target": reference, "amount": "-3"}), "amount"),
        ] {
            let (status, refused) = control(&sim, "pay", body).await;
            assert_eq!(
                (status, &refused["error"]),
                (400, &json!("bad_request")),
                "{why}: {refused}"
            );
        }
    }

    #[tokio::test]
    async fn withheld_notifications_wait_until_notify_sends_them() {
        let (sim, pos) = registered().await;
        pos.order("798.00");
        let (status, on) = control(&sim, "withhold-notifications", json!({"on": true})).await;
        assert_eq!((status, &on["withholding"]), (200, &json!(true)));
        let (_, paid) = control(&sim, "pay", json!({"target": "pump-1"})).await;
        assert_eq!(paid["status"], "approved", "{paid}");
        assert_eq!(paid["withheld"], 2);
        assert_eq!(paid["notifications"], json!([]));
        assert!(pos.received().is_empty());
        let (_, state) = control(&sim, "state", Value::Null).await;
        assert_eq!(state["withheld"].as_array().unwrap().len(), 2, "{state}");

        let (_, off) = control(&sim, "withhold-notifications", json!({"on": false})).await;
        assert_eq!(
            (&off["withholding"], &off["withheld"]),
            (&json!(false), &json!(2))
        );
        assert!(pos.received().is_empty(), "turning it off sends nothing");
        let (status, sent) = control(&sim, "notify", json!({})).await;
        assert_eq!(status, 200, "{sent}");
        assert_eq!(sent["notifications"].as_array().unwrap().len(), 2, "{sent}");
        assert_eq!(pos.received().len(), 2);

        // By name: an IPN for the POS's last merchant order, a webhook for the payment.
        let payment = paid["payment"].to_string();
        let (_, ipn) = control(&sim, "notify", json!({"target": "pump-1"})).await;
        let (_, webhook) = control(&sim, "notify", json!({"target": payment})).await;
        let query = |answer: &Value| {
            answer["notifications"][0]["url"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(query(&ipn).ends_with(&format!(
            "topic=merchant_order&id={}",
            paid["merchant_order"]
        )));
        assert!(query(&webhook).ends_with(&format!("type=payment&data.id={payment}")));
        assert_eq!(pos.received().len(), 4);
    }

    #[tokio::test]
    async fn a_refund_at_mp_and_an_expiry_show_in_mps_answers() {
        let (sim, pos) = registered().await;
        pos.order("798.00");
        let (_, paid) = control(&sim, "pay", json!({"target": "pump-1"})).await;
        let payment = paid["payment"].to_string();
        let (status, refund) = control(
            &sim,
            "refund",
            json!({"target": payment, "amount": "98.00"}),
        )
        .await;
        assert_eq!(status, 200, "{refund}");
        assert_eq!(
            (&refund["refunded"], &refund["status"]),
            (&json!("98.00"), &json!("approved"))
        );
        let order = sim
            .merchant_order(paid["merchant_order"].as_u64().unwrap())
            .unwrap();
        assert_eq!(order["order_status"], "partially_reverted");
        let (status, rest) = control(&sim, "refund", json!({"target": payment})).await;
        assert_eq!(status, 200, "{rest}");
        assert_eq!(
            (&rest["refunded"], &rest["status"]),
            (&json!("798.00"), &json!("refunded"))
        );
        let (status, refused) = control(&sim, "refund", json!({"target": payment})).await;
        assert_eq!(
            (status, &refused["error"]),
            (422, &json!("refused")),
            "{refused}"
        );
        assert_eq!(sim.refunds().len(), 2);

        let (_, scan) = control(&sim, "scan", json!({"target": "pump-1"})).await;
        let merchant_order = scan["merchant_order"].as_u64().unwrap();
        let (status, expired) = control(&sim, "expire", json!({"target": "pump-1"})).await;
        assert_eq!(status, 200, "{expired}");
        assert_eq!(
            expired["expired"],
            json!([{"merchant_order": merchant_order}])
        );
        let order = sim.merchant_order(merchant_order).unwrap();
        assert_eq!(
            (&order["status"], &order["order_status"]),
            (&json!("expired"), &json!("expired"))
        );
        let (status, refused) =
            control(&sim, "pay", json!({"target": merchant_order.to_string()})).await;
        assert_eq!(
            (status, &refused["error"]),
            (422, &json!("refused")),
            "{refused}"
        );
        let (status, _) = control(
            &sim,
            "expire",
            json!({"target": merchant_order.to_string()}),
        )
        .await;
        assert_eq!(status, 422, "an expired order is no longer open");
    }

    #[tokio::test]
    async fn unknown_targets_and_calls_are_refused_with_their_code() {
        let (sim, pos) = registered().await;
        let (status, refused) = control(&sim, "scan", json!({"target": "pump-9"})).await;
        assert_eq!(
            (status, &refused["error"]),
            (404, &json!("unknown")),
            "{refused}"
        );
        assert!(refused["message"].as_str().unwrap().contains("pump-9"));

        // The POS answers 400 unavailable: a scan, but nothing to pay.
        let (status, scan) = control(&sim, "scan", json!({"target": "pump-1"})).await;
        assert_eq!(
            (status, &scan["answer"], &scan["kind"]),
            (200, &json!("wait"), &json!("unavailable"))
        );
        let (status, refused) = control(&sim, "pay", json!({"target": "pump-1"})).await;
        assert_eq!(
            (status, &refused["error"]),
            (409, &json!("nothing_to_pay")),
            "{refused}"
        );

        pos.order("798.00");
        let (_, paid) = control(&sim, "pay", json!({"target": "pump-1"})).await;
        let payment = paid["payment"].to_string();
        let (status, refused) = control(&sim, "pay", json!({"target": payment})).await;
        assert_eq!(
            (status, &refused["error"]),
            (400, &json!("bad_request")),
            "{refused}"
        );
        let (status, refused) = control(&sim, "scan", json!({"target": payment})).await;
        assert_eq!(status, 400, "{refused}");

        let (status, refused) = control(&sim, "scan", json!({"pos": "pump-1"})).await;
        assert_eq!(
            (status, &refused["error"]),
            (400, &json!("bad_request")),
            "{refused}"
        );
        let (status, refused) = control(&sim, "teleport", json!({})).await;
        assert_eq!(
            (status, &refused["error"]),
            (404, &json!("unknown")),
            "{refused}"
        );

        // A POS URL nobody answers: the scan says so.
        let (status, refused) = control(
            &sim,
            "scan",
            json!({"target": "http://127.0.0.1:9/mp/pos/x"}),
        )
        .await;
        assert_eq!(
            (status, &refused["error"]),
            (502, &json!("unreachable")),
            "{refused}"
        );

        // MP's own paths still want the token; the control API never shows up in them.
        let (status, _) = send(&sim, Method::GET, "/_sim/state", "").await;
        assert_eq!(status, 200);
        assert!(sim.api_calls().iter().all(|c| !c.path.starts_with(PREFIX)));
    }
}
