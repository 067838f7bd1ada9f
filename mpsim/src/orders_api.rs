//! MP's Orders API for QR (`type: "qr"`): `POST /v1/orders` (201), `GET /v1/orders/{id}` (200),
//! `POST /v1/orders/{id}/cancel` (200) and `POST /v1/orders/{id}/refund` (200), each `POST` with a
//! required `X-Idempotency-Key`, and the `order` webhook after a payment attempt
//! ([`Simulator::pay_order`]).
//!
//! Amounts are decimal strings with two decimals (`"100.00"`), as MP's reference requires. An order
//! takes its POS's attended slot (`config.qr.external_pos_id`), so [`Simulator::scan_attended`] finds
//! it; it leaves the slot when processed or canceled, and reads `expired` after its `expiration_time`.
//!
//! Errors carry MP's generic fields (`message`, `error`, `status`, `cause`) and the Orders API's own
//! `errors: [{"code", "message", "details"}]`, with the codes of MP's Orders API error list
//! (`empty_required_header`, `required_properties`, `unsupported_properties`, `property_type`,
//! `property_value`, `invalid_total_amount`, `minimum_items`, `maximum_items`); the 404 and 409 codes
//! (`order_not_found`, `cannot_cancel_order`, `cannot_refund_order`) are the simulator's own.

use serde_json::{Map, Value};

use super::attended::AttendedApi;
use super::*;

const MAX_IDEMPOTENCY_KEY: usize = 128;
const MAX_REFERENCE: usize = 64;
const DEFAULT_EXPIRATION: &str = "PT10M";
const ORDER_USER_AGENT: &str = "MercadoPago WebHook v1.0 order";
/// Shown as the webhook's `application_id` (the app whose webhook MP calls).
const SIM_APPLICATION_ID: &str = "4440011223344556";
const ORDER_FIELDS: &[&str] = &[
    "type",
    "total_amount",
    "external_reference",
    "description",
    "expiration_time",
    "processing_mode",
    "config",
    "transactions",
    "items",
    "integration_data",
];
const ITEM_FIELDS: &[&str] = &[
    "title",
    "unit_price",
    "quantity",
    "unit_measure",
    "external_code",
    "external_categories",
    "description",
    "picture_url",
    "taxes",
];
const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// One refund made through `POST /v1/orders/{id}/refund`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRefundRecord {
    pub order_id: String,
    pub refund_id: String,
    /// What was refunded.
    pub amount: Decimal,
    /// What was asked for: `None` is a full refund (empty body).
    pub requested: Option<Decimal>,
    pub idempotency_key: String,
}

#[derive(Default)]
pub(super) struct OrdersApi {
    orders: BTreeMap<String, ApiOrder>,
    /// X-Idempotency-Key of a create -> the first answer.
    created: HashMap<String, String>,
    /// (order id, key) -> the first answer of a cancel or refund.
    answers: HashMap<(String, &'static str, String), (u16, String)>,
    refunds: Vec<OrderRefundRecord>,
    webhook_url: Option<String>,
    unsent: Vec<String>,
}

struct ApiOrder {
    id: String,
    external_reference: String,
    description: Option<String>,
    total: Decimal,
    currency: String,
    expiration_text: String,
    expires: DateTime<Utc>,
    created_date: String,
    last_updated: String,
    config: Value,
    items: Option<Value>,
    integration_data: Option<Value>,
    external_pos_id: String,
    mode: String,
    status: &'static str,
    status_detail: &'static str,
    payment: ApiPayment,
    refunds: Vec<ApiRefund>,
    version: u32,
}

struct ApiPayment {
    id: String,
    status: &'static str,
    /// MP's reason, which a rejection may name (`cc_rejected_insufficient_amount`…).
    status_detail: String,
    paid: Decimal,
    refunded: Decimal,
}

struct ApiRefund {
    id: String,
    amount: Decimal,
}

impl ApiOrder {
    /// (status, status_detail) now: a `created` or `action_required` order past its expiration
    /// reads `expired`.
    fn state(&self, now: DateTime<Utc>) -> (&'static str, &'static str) {
        if matches!(self.status, "created" | "action_required") && now >= self.expires {
            ("expired", "expired")
        } else {
            (self.status, self.status_detail)
        }
    }

    fn payable(&self, now: DateTime<Utc>) -> bool {
        matches!(self.state(now).0, "created" | "action_required")
    }

    fn touch(&mut self) {
        self.version += 1;
        self.last_updated = mp_time(Utc::now());
    }

    fn render(&self, collector_id: u64) -> Value {
        let (status, status_detail) = self.state(Utc::now());
        let mut payment = Map::new();
        payment.insert("id".to_owned(), Value::from(self.payment.id.clone()));
        payment.insert("amount".to_owned(), Value::from(amount_text(self.total)));
        if !self.payment.paid.is_zero() {
            payment.insert(
                "paid_amount".to_owned(),
                Value::from(amount_text(self.payment.paid)),
            );
        }
        let payment_status = if status == "expired" {
            ("expired", "expired")
        } else {
            (self.payment.status, self.payment.status_detail.as_str())
        };
        payment.insert("status".to_owned(), Value::from(payment_status.0));
        payment.insert("status_detail".to_owned(), Value::from(payment_status.1));
        let mut transactions = Map::new();
        transactions.insert(
            "payments".to_owned(),
            Value::Array(vec![Value::Object(payment)]),
        );
        if !self.refunds.is_empty() {
            let refunds = self
                .refunds
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id,
                        "transaction_id": self.payment.id,
                        "amount": amount_text(r.amount),
                        "status": "processed",
                    })
                })
                .collect();
            transactions.insert("refunds".to_owned(), Value::Array(refunds));
        }
        let mut order = Map::new();
        let mut put = |key: &str, value: Value| {
            order.insert(key.to_owned(), value);
        };
        put("id", Value::from(self.id.clone()));
        put("type", Value::from("qr"));
        put("processing_mode", Value::from("automatic"));
        put(
            "external_reference",
            Value::from(self.external_reference.clone()),
        );
        if let Some(description) = &self.description {
            put("description", Value::from(description.clone()));
        }
        put("total_amount", Value::from(amount_text(self.total)));
        if !self.payment.paid.is_zero() {
            put(
                "total_paid_amount",
                Value::from(amount_text(self.payment.paid)),
            );
        }
        put("user_id", Value::from(collector_id.to_string()));
        put("currency", Value::from(self.currency.clone()));
        put("status", Value::from(status));
        put("status_detail", Value::from(status_detail));
        put("created_date", Value::from(self.created_date.clone()));
        put("last_updated_date", Value::from(self.last_updated.clone()));
        put("expiration_time", Value::from(self.expiration_text.clone()));
        put("version", Value::from(self.version));
        put("config", self.config.clone());
        put("transactions", Value::Object(transactions));
        if let Some(items) = &self.items {
            put("items", items.clone());
        }
        if let Some(data) = &self.integration_data {
            put("integration_data", data.clone());
        }
        if self.mode != "static" {
            // A made-up EMVCo-like payload: MP returns one for dynamic and hybrid QR.
            put(
                "type_response",
                serde_json::json!({ "qr_data": format!("00020101021243650016COM.MERCADOLIBRE0201306{}5204970053030325802AR6304", self.id) }),
            );
        }
        Value::Object(order)
    }
}

/// Two decimals, always (`100` -> `"100.00"`).
fn amount_text(amount: Decimal) -> String {
    let mut amount = amount;
    amount.rescale(2);
    amount.to_string()
}

fn ulid_like(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let tail: String = (0..24)
        .map(|_| CROCKFORD[rng.gen_range(0..CROCKFORD.len())] as char)
        .collect();
    format!("{prefix}01{tail}")
}

/// An ISO 8601 duration such as `PT10M`, `PT30S`, `PT1H30M` or `P1D`.
fn iso_duration(text: &str) -> Option<chrono::Duration> {
    let rest = text.strip_prefix('P')?;
    let (days, time) = match rest.split_once('T') {
        Some((days, time)) => (days, Some(time)),
        None => (rest, None),
    };
    let mut seconds: i64 = 0;
    let mut parse = |part: &str, units: &[(char, i64)]| -> Option<()> {
        let mut number = String::new();
        let mut seen = false;
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let (_, scale) = units.iter().find(|(unit, _)| *unit == c)?;
            let n: i64 = number.parse().ok()?;
            seconds = seconds.checked_add(n.checked_mul(*scale)?)?;
            number.clear();
            seen = true;
        }
        (number.is_empty() && (seen || part.is_empty())).then_some(())
    };
    parse(days, &[('D', 86_400)])?;
    if let Some(time) = time {
        if time.is_empty() {
            return None;
        }
        parse(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    (seconds > 0).then(|| chrono::Duration::seconds(seconds))
}

// ---------------------------------------------------------------------------------------------
// The API.

fn orders_error(status: u16, code: &str, message: &str) -> HttpResponse {
    let code_status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code_status, error_body(status, code, message))
}

/// Both MP's generic error fields and the Orders API's `errors` list.
fn error_body(status: u16, code: &str, message: &str) -> String {
    serde_json::json!({
        "message": message,
        "error": code,
        "status": status,
        "cause": [],
        "errors": [{ "code": code, "message": message, "details": [] }],
    })
    .to_string()
}

/// A refusal of the order body, before it is rendered.
struct Bad {
    code: &'static str,
    message: String,
}

fn bad<T>(code: &'static str, message: impl Into<String>) -> Result<T, Bad> {
    Err(Bad {
        code,
        message: message.into(),
    })
}

pub(super) fn route(
    shared: &Shared,
    req: &HttpRequest,
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<HttpResponse> {
    let response = match (method, segments) {
        ("POST", ["v1", "orders"]) => with_key(req, |key| create(shared, key, body)),
        ("GET", ["v1", "orders", id]) => {
            let state = shared.lock();
            match state.orders_api.orders.get(*id) {
                Some(order) => json_response(
                    StatusCode::OK,
                    order.render(shared.config.collector_id).to_string(),
                ),
                None => not_found(id),
            }
        }
        ("POST", ["v1", "orders", id, "cancel"]) => with_key(req, |key| {
            replayed(shared, id, "cancel", key, || cancel(shared, id))
        }),
        ("POST", ["v1", "orders", id, "refund"]) => with_key(req, |key| {
            replayed(shared, id, "refund", key, || refund(shared, id, key, body))
        }),
        _ => return None,
    };
    Some(response)
}

fn not_found(id: &str) -> HttpResponse {
    orders_error(404, "order_not_found", &format!("order {id} not found"))
}

/// Runs `then` with the request's X-Idempotency-Key, or answers MP's 400 without one.
fn with_key(req: &HttpRequest, then: impl FnOnce(&str) -> HttpResponse) -> HttpResponse {
    let key = req
        .headers()
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    match key {
        None => orders_error(
            400,
            "empty_required_header",
            "Missing HTTP header: X-Idempotency-Key",
        ),
        Some(key) if key.chars().count() > MAX_IDEMPOTENCY_KEY => orders_error(
            400,
            "invalid_idempotency_key_length",
            &format!("X-Idempotency-Key length exceeds {MAX_IDEMPOTENCY_KEY} characters"),
        ),
        Some(key) => then(key),
    }
}

/// The first answer for (order, action, key) again, or `act`'s answer, kept when it is a success.
fn replayed(
    shared: &Shared,
    id: &str,
    action: &'static str,
    key: &str,
    act: impl FnOnce() -> (u16, String),
) -> HttpResponse {
    let known = (id.to_owned(), action, key.to_owned());
    let first = shared.lock().orders_api.answers.get(&known).cloned();
    let (status, body) = match first {
        Some(first) => first,
        None => {
            let (status, body) = act();
            if status < 300 {
                shared
                    .lock()
                    .orders_api
                    .answers
                    .insert(known, (status, body.clone()));
            }
            (status, body)
        }
    };
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
}

fn create(shared: &Shared, key: &str, body: &[u8]) -> HttpResponse {
    if let Some(first) = shared.lock().orders_api.created.get(key).cloned() {
        return json_response(StatusCode::CREATED, first);
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return orders_error(400, "json_syntax_error", "the body is not a JSON object");
    };
    let config = &shared.config;
    let checked = match check_order(&body, config) {
        Ok(checked) => checked,
        Err(bad) => return orders_error(400, bad.code, &bad.message),
    };
    let mut state = shared.lock();
    if state.require_registered_pos
        && state
            .registry
            .pos_fields(&checked.external_pos_id)
            .is_none()
    {
        return orders_error(
            404,
            "point_of_sale_not_found",
            &format!(
                "point of sale {} is not registered",
                checked.external_pos_id
            ),
        );
    }
    // Two requests with one key may race: the first one stored wins.
    if let Some(first) = state.orders_api.created.get(key).cloned() {
        return json_response(StatusCode::CREATED, first);
    }
    let now = Utc::now();
    let order = ApiOrder {
        id: ulid_like("ORD"),
        external_reference: checked.external_reference,
        description: checked.description,
        total: checked.total,
        currency: config.site_currency.clone(),
        expiration_text: checked.expiration_text,
        expires: now + checked.expiration,
        created_date: mp_time(now),
        last_updated: mp_time(now),
        config: body.get("config").cloned().unwrap_or(Value::Null),
        items: body.get("items").cloned(),
        integration_data: body.get("integration_data").cloned(),
        external_pos_id: checked.external_pos_id,
        mode: checked.mode,
        status: "created",
        status_detail: "created",
        payment: ApiPayment {
            id: ulid_like("PAY"),
            status: "created",
            status_detail: "ready_to_process".to_owned(),
            paid: Decimal::ZERO,
            refunded: Decimal::ZERO,
        },
        refunds: Vec::new(),
        version: 1,
    };
    let answer = order.render(config.collector_id).to_string();
    let request = OrderRequest {
        external_reference: order.external_reference.clone(),
        notification_url: state.orders_api.webhook_url.clone().unwrap_or_default(),
        currency_id: order.currency.clone(),
        items: checked.items,
        total: order.total,
    };
    tracing::info!(order = %order.id, pos = %order.external_pos_id, total = %order.total, "simulated Orders API order created");
    // The order takes the POS's slot, replacing whatever was there.
    state.attended.insert(
        order.external_pos_id.clone(),
        AttendedOrder {
            request,
            body: Value::Object(body).to_string(),
            expires: order.expires,
            api: AttendedApi::Orders(order.id.clone()),
        },
    );
    state
        .orders_api
        .created
        .insert(key.to_owned(), answer.clone());
    state.orders_api.orders.insert(order.id.clone(), order);
    json_response(StatusCode::CREATED, answer)
}

struct CheckedOrder {
    external_reference: String,
    description: Option<String>,
    total: Decimal,
    expiration_text: String,
    expiration: chrono::Duration,
    external_pos_id: String,
    mode: String,
    items: Vec<OrderItem>,
}

/// A decimal string with exactly two decimals, positive; whole for CLP and COP.
fn money_string(value: Option<&Value>, name: &str, currency: &str) -> Result<Decimal, Bad> {
    let Some(value) = value else {
        return bad(
            "required_properties",
            format!("required property '{name}' is missing"),
        );
    };
    let Some(text) = value.as_str() else {
        return bad(
            "property_type",
            format!("{name} must be a string such as \"100.00\", not {value}"),
        );
    };
    let shape = text.split_once('.').is_some_and(|(whole, cents)| {
        !whole.is_empty()
            && whole.chars().all(|c| c.is_ascii_digit())
            && cents.len() == 2
            && cents.chars().all(|c| c.is_ascii_digit())
    });
    let Some(amount) = shape.then(|| Decimal::from_str(text).ok()).flatten() else {
        return bad(
            "property_value",
            format!("{name} {text:?} must have two decimals, such as \"100.00\""),
        );
    };
    if amount <= Decimal::ZERO {
        return bad("invalid_total_amount", format!("{name} cannot be zero"));
    }
    if currency_decimals(currency) == 0 && !amount.fract().is_zero() {
        return bad(
            "property_value",
            format!("{name} {text} is not a whole amount of {currency}"),
        );
    }
    Ok(amount)
}

fn unsupported(object: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), Bad> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => bad(
            "unsupported_properties",
            format!("property '{at}{key}' is not supported"),
        ),
        None => Ok(()),
    }
}

fn optional_text(object: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, Bad> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => bad(
            "property_type",
            format!("{at}{key} must be a string, not {other}"),
        ),
    }
}

fn check_order(body: &Map<String, Value>, config: &SimulatorConfig) -> Result<CheckedOrder, Bad> {
    unsupported(body, ORDER_FIELDS, "")?;
    for key in [
        "type",
        "total_amount",
        "external_reference",
        "config",
        "transactions",
    ] {
        if body.get(key).is_none_or(Value::is_null) {
            return bad(
                "required_properties",
                format!("required property '{key}' is missing"),
            );
        }
    }
    if body.get("type").and_then(Value::as_str) != Some("qr") {
        return bad("property_value", "type must be \"qr\"");
    }
    if let Some(mode) = optional_text(body, "processing_mode", "")? {
        if mode != "automatic" {
            return bad(
                "property_value",
                format!("processing_mode {mode} is not supported for QR: automatic"),
            );
        }
    }
    let currency = &config.site_currency;
    let total = money_string(body.get("total_amount"), "total_amount", currency)?;
    let external_reference = optional_text(body, "external_reference", "")?.unwrap_or_default();
    if external_reference.is_empty()
        || external_reference.chars().count() > MAX_REFERENCE
        || !external_reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad(
            "property_value",
            format!("external_reference {external_reference:?} must be 1 to {MAX_REFERENCE} of A-Z a-z 0-9 - _"),
        );
    }
    let description = optional_text(body, "description", "")?;
    let expiration_text = optional_text(body, "expiration_time", "")?
        .unwrap_or_else(|| DEFAULT_EXPIRATION.to_owned());
    let Some(expiration) = iso_duration(&expiration_text) else {
        return bad(
            "property_value",
            format!("expiration_time {expiration_text} is not an ISO 8601 duration such as PT10M"),
        );
    };
    if body
        .get("integration_data")
        .is_some_and(|v| !v.is_object() && !v.is_null())
    {
        return bad("property_type", "integration_data must be an object");
    }

    let qr = body
        .get("config")
        .and_then(Value::as_object)
        .and_then(|c| c.get("qr"))
        .and_then(Value::as_object);
    let Some(qr) = qr else {
        return bad(
            "required_properties",
            "required property 'config.qr' is missing",
        );
    };
    let external_pos_id =
        optional_text(qr, "external_pos_id", "config.qr.")?.filter(|p| !p.trim().is_empty());
    let Some(external_pos_id) = external_pos_id else {
        return bad(
            "required_properties",
            "required property 'config.qr.external_pos_id' is missing",
        );
    };
    let mode = optional_text(qr, "mode", "config.qr.")?.unwrap_or_else(|| "static".to_owned());
    if !matches!(mode.as_str(), "static" | "dynamic" | "hybrid") {
        return bad(
            "property_value",
            format!("config.qr.mode {mode} is not static, dynamic or hybrid"),
        );
    }

    let payments = body
        .get("transactions")
        .and_then(Value::as_object)
        .and_then(|t| t.get("payments"))
        .and_then(Value::as_array);
    let Some(payments) = payments else {
        return bad(
            "required_properties",
            "required property 'transactions.payments' is missing",
        );
    };
    match payments.len() {
        0 => return bad("minimum_items", "minimum 1 items required, but found 0"),
        1 => {}
        n => {
            return bad(
                "maximum_items",
                format!("maximum 1 items required, but found {n}"),
            )
        }
    }
    let paid = money_string(
        payments[0].get("amount"),
        "transactions.payments[0].amount",
        currency,
    )?;
    if paid != total {
        return bad(
            "invalid_total_amount",
            format!("total_amount {total} is not the payments' amount {paid}"),
        );
    }

    let mut items = Vec::new();
    if let Some(lines) = body.get("items").filter(|v| !v.is_null()) {
        let Some(lines) = lines.as_array() else {
            return bad("property_type", "items must be an array");
        };
        if lines.is_empty() {
            return bad("minimum_items", "minimum 1 items required, but found 0");
        }
        let mut sum = Decimal::ZERO;
        for (n, line) in lines.iter().enumerate() {
            let at = format!("items[{n}].");
            let Some(line) = line.as_object() else {
                return bad("property_type", format!("items[{n}] must be an object"));
            };
            unsupported(line, ITEM_FIELDS, &at)?;
            let title = optional_text(line, "title", &at)?.filter(|t| !t.trim().is_empty());
            let Some(title) = title else {
                return bad(
                    "required_properties",
                    format!("required property '{at}title' is missing"),
                );
            };
            let unit_price =
                money_string(line.get("unit_price"), &format!("{at}unit_price"), currency)?;
            let quantity = match line.get("quantity") {
                None => {
                    return bad(
                        "required_properties",
                        format!("required property '{at}quantity' is missing"),
                    )
                }
                Some(q) => match q.as_u64() {
                    Some(q) if q >= 1 => q,
                    _ => {
                        return bad(
                            "property_value",
                            format!("{at}quantity must be a whole number of at least 1, not {q}"),
                        )
                    }
                },
            };
            for key in [
                "unit_measure",
                "external_code",
                "description",
                "picture_url",
            ] {
                optional_text(line, key, &at)?;
            }
            if let Some(taxes) = line.get("taxes").filter(|t| !t.is_null()) {
                let good = taxes.as_array().is_some_and(|taxes| {
                    taxes.iter().all(|tax| {
                        tax.get("type")
                            .and_then(Value::as_str)
                            .is_some_and(|t| !t.is_empty())
                            && tax.get("value").is_some_and(Value::is_number)
                    })
                });
                if !good {
                    return bad(
                        "property_value",
                        format!("{at}taxes must be [{{\"type\": string, \"value\": number}}]"),
                    );
                }
            }
            let quantity = Decimal::from(quantity);
            sum += unit_price * quantity;
            items.push(OrderItem {
                title,
                description: optional_text(line, "description", &at)?.unwrap_or_default(),
                quantity,
                unit_price,
            });
        }
        if sum != total {
            return bad(
                "invalid_total_amount",
                format!("total_amount {total} is not equivalent to the sum of the items' unit_price × quantity ({sum})"),
            );
        }
    } else {
        items.push(OrderItem {
            title: description
                .clone()
                .unwrap_or_else(|| external_reference.clone()),
            description: String::new(),
            quantity: Decimal::ONE,
            unit_price: total,
        });
    }
    Ok(CheckedOrder {
        external_reference,
        description,
        total,
        expiration_text,
        expiration,
        external_pos_id,
        mode,
        items,
    })
}

/// Takes the order off its POS if it is still the one there.
fn leave_pos(state: &mut State, order_id: &str, pos: &str) {
    let there = state
        .attended
        .get(pos)
        .is_some_and(|placed| placed.api == AttendedApi::Orders(order_id.to_owned()));
    if there {
        state.attended.remove(pos);
    }
}

fn cancel(shared: &Shared, id: &str) -> (u16, String) {
    let mut state = shared.lock();
    let Some(order) = state.orders_api.orders.get_mut(id) else {
        return (
            404,
            error_body(404, "order_not_found", &format!("order {id} not found")),
        );
    };
    let (status, _) = order.state(Utc::now());
    if status != "created" {
        return (
            409,
            error_body(
                409,
                "cannot_cancel_order",
                &format!("order {id} is {status}: only a created order can be canceled"),
            ),
        );
    }
    order.status = "canceled";
    order.status_detail = "canceled";
    order.payment.status = "canceled";
    order.payment.status_detail = "canceled".to_owned();
    order.touch();
    let answer = order.render(shared.config.collector_id).to_string();
    let pos = order.external_pos_id.clone();
    leave_pos(&mut state, id, &pos);
    tracing::info!(order = id, "simulated Orders API order canceled");
    (200, answer)
}

fn refund(shared: &Shared, id: &str, key: &str, body: &[u8]) -> (u16, String) {
    let requested = match refund_request(body) {
        Ok(requested) => requested,
        Err(bad) => return (400, error_body(400, bad.code, &bad.message)),
    };
    let mut state = shared.lock();
    let currency = shared.config.site_currency.clone();
    let Some(order) = state.orders_api.orders.get_mut(id) else {
        return (
            404,
            error_body(404, "order_not_found", &format!("order {id} not found")),
        );
    };
    let (status, _) = order.state(Utc::now());
    if status != "processed" {
        return (
            409,
            error_body(
                409,
                "cannot_refund_order",
                &format!("order {id} is {status}: only a processed order can be refunded"),
            ),
        );
    }
    let left = order.payment.paid - order.payment.refunded;
    let amount = match &requested {
        None => left,
        Some((transaction, text)) => {
            if *transaction != order.payment.id {
                return (
                    400,
                    error_body(
                        400,
                        "property_value",
                        &format!("transaction {transaction} is not this order's payment"),
                    ),
                );
            }
            match money_string(
                Some(&Value::from(text.clone())),
                "transactions[0].amount",
                &currency,
            ) {
                Ok(amount) if amount <= left => amount,
                Ok(amount) => {
                    return (
                        400,
                        error_body(
                            400,
                            "property_value",
                            &format!("the refund {amount} exceeds what is left to refund ({left})"),
                        ),
                    )
                }
                Err(bad) => return (400, error_body(400, bad.code, &bad.message)),
            }
        }
    };
    let refund_id = ulid_like("REF");
    order.payment.refunded += amount;
    order.refunds.push(ApiRefund {
        id: refund_id.clone(),
        amount,
    });
    if order.payment.refunded >= order.payment.paid {
        order.status = "refunded";
        order.status_detail = "refunded";
        order.payment.status = "refunded";
        order.payment.status_detail = "refunded".to_owned();
    } else {
        order.status_detail = "partially_refunded";
        order.payment.status_detail = "partially_refunded".to_owned();
    }
    order.touch();
    let answer = order.render(shared.config.collector_id).to_string();
    state.orders_api.refunds.push(OrderRefundRecord {
        order_id: id.to_owned(),
        refund_id,
        amount,
        requested: requested
            .as_ref()
            .and_then(|(_, text)| Decimal::from_str(text).ok()),
        idempotency_key: key.to_owned(),
    });
    tracing::info!(order = id, %amount, "simulated Orders API refund");
    (200, answer)
}

/// `None` for a full refund (empty body or no transactions), else (payment id, amount text).
fn refund_request(body: &[u8]) -> Result<Option<(String, String)>, Bad> {
    let text = std::str::from_utf8(body).unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
        return bad("json_syntax_error", "the body is not a JSON object");
    };
    unsupported(&body, &["transactions"], "")?;
    let Some(transactions) = body.get("transactions").filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    let Some([transaction]) = transactions.as_array().map(Vec::as_slice) else {
        return bad(
            "property_value",
            "transactions must be an array of one {\"id\", \"amount\"}",
        );
    };
    let id = transaction.get("id").and_then(Value::as_str);
    let amount = transaction.get("amount").and_then(Value::as_str);
    match (id, amount) {
        (Some(id), Some(amount)) => Ok(Some((id.to_owned(), amount.to_owned()))),
        _ => bad(
            "required_properties",
            "a refunded transaction needs its id and an amount string",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Paying and notifying.

impl Simulator {
    /// The customer pays the Orders API order (after [`Simulator::scan_attended`], or directly);
    /// the `order` webhook goes out per [`NotifyMode`] before this returns. Returns the payment's id.
    /// - `Approved`: order `processed`/`accredited`, payment `processed`, `total_paid_amount` the total;
    ///   the order leaves its POS.
    /// - `ApprovedAmount(x)`: the same with `total_paid_amount` x, whatever x: MP charges the order's
    ///   amount, so this is the forged or broken case a client must not close a sale on.
    /// - `Rejected`: the payment reads `failed`/`cc_rejected_other_reason` and the order stays
    ///   `created` on its POS, so the customer can retry (MP does not document this case).
    /// - `InProcess`: order and payment `action_required`/`in_process`; still payable.
    pub async fn pay_order(
        &self,
        order_id: &str,
        outcome: PaymentOutcome,
    ) -> Result<String, SimError> {
        Ok(self.pay_order_notifying(order_id, outcome).await?.0)
    }

    /// [`Simulator::pay_order`], saying what became of the webhooks.
    pub(super) async fn pay_order_notifying(
        &self,
        order_id: &str,
        outcome: PaymentOutcome,
    ) -> Result<(String, Dispatched), SimError> {
        let payment_id = {
            let mut state = self.inner.shared.lock();
            let Some(order) = state.orders_api.orders.get_mut(order_id) else {
                return Err(SimError::UnknownOrder(order_id.to_owned()));
            };
            let now = Utc::now();
            if !order.payable(now) {
                return Err(SimError::InvalidOrder(format!(
                    "order {order_id} is {}: nothing to pay",
                    order.state(now).0
                )));
            }
            match outcome {
                PaymentOutcome::Approved | PaymentOutcome::ApprovedAmount(_) => {
                    let paid = match outcome {
                        PaymentOutcome::ApprovedAmount(amount) if amount <= Decimal::ZERO => {
                            return Err(SimError::InvalidOrder(format!(
                                "a payment of {amount} is not a payment"
                            )))
                        }
                        PaymentOutcome::ApprovedAmount(amount) => amount,
                        _ => order.total,
                    };
                    order.status = "processed";
                    order.status_detail = "accredited";
                    order.payment.status = "processed";
                    order.payment.status_detail = "accredited".to_owned();
                    order.payment.paid = paid;
                }
                PaymentOutcome::Rejected | PaymentOutcome::RejectedWith(_) => {
                    order.status = "created";
                    order.status_detail = "created";
                    order.payment.status = "failed";
                    order.payment.status_detail = outcome.rejection_detail().to_owned();
                }
                PaymentOutcome::InProcess => {
                    order.status = "action_required";
                    order.status_detail = "in_process";
                    order.payment.status = "action_required";
                    order.payment.status_detail = "in_process".to_owned();
                }
            }
            order.touch();
            let payment_id = order.payment.id.clone();
            if order.status == "processed" {
                let pos = order.external_pos_id.clone();
                leave_pos(&mut state, order_id, &pos);
            }
            tracing::info!(order = order_id, ?outcome, "simulated Orders API payment");
            payment_id
        };
        let times = match self.inner.shared.lock().notify_mode {
            NotifyMode::None => 0,
            NotifyMode::Ipn | NotifyMode::Webhook | NotifyMode::Both => 1,
            NotifyMode::Duplicated(n) => n,
        };
        let outgoing = (0..times)
            .filter_map(|_| self.order_notification(order_id))
            .collect();
        Ok((payment_id, self.dispatch(outgoing).await))
    }

    /// The `order` webhook for the order as it is now, or `None` (recorded in
    /// [`Simulator::unsent_order_notifications`]) when no webhook url is set.
    pub(super) fn order_notification(&self, order_id: &str) -> Option<Outgoing> {
        let mut state = self.inner.shared.lock();
        let collector = self.inner.shared.config.collector_id;
        let order = state.orders_api.orders.get(order_id)?;
        let (status, status_detail) = order.state(Utc::now());
        let mut data = serde_json::json!({
            "id": order.id,
            "status": status,
            "status_detail": status_detail,
            "version": order.version,
        });
        if !order.payment.paid.is_zero() {
            data["total_paid_amount"] = Value::from(amount_text(order.payment.paid));
        }
        // The action names the order's status, except that a created order after a failed attempt
        // asks the customer to act again.
        let action = match status {
            "created" => "order.action_required".to_owned(),
            other => format!("order.{other}"),
        };
        let body = serde_json::json!({
            "action": action,
            "api_version": "v1",
            "application_id": SIM_APPLICATION_ID,
            "date_created": Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "id": rand::thread_rng().gen_range(100_000_000_000_u64..999_999_999_999).to_string(),
            "live_mode": false,
            "type": "order",
            "user_id": collector.to_string(),
            "data": data,
        });
        let Some(url) = state.orders_api.webhook_url.clone() else {
            tracing::warn!(
                order = order_id,
                "no Orders API webhook url set: order notification not sent"
            );
            state.orders_api.unsent.push(order_id.to_owned());
            return None;
        };
        Some(Outgoing {
            url: with_query(&url, &format!("data.id={order_id}&type=order")),
            body: body.to_string(),
            user_agent: ORDER_USER_AGENT,
        })
    }

    /// Sends one `order` webhook for this order now, as it is now.
    pub async fn notify_order(&self, order_id: &str) -> Result<u16, SimError> {
        if !self
            .inner
            .shared
            .lock()
            .orders_api
            .orders
            .contains_key(order_id)
        {
            return Err(SimError::UnknownOrder(order_id.to_owned()));
        }
        let notification = self
            .order_notification(order_id)
            .ok_or_else(|| SimError::InvalidOrder("no Orders API webhook url is set".to_owned()))?;
        deliver(
            self.inner.client.clone(),
            Arc::clone(&self.inner.shared),
            notification,
        )
        .await
    }

    /// Where `order` webhooks go: MP sends them to the application's configured webhook, since the
    /// Orders API body has no notification_url. Unset by default: nothing is sent (and that is
    /// recorded).
    pub fn set_orders_webhook_url(&self, url: impl Into<String>) {
        self.inner.shared.lock().orders_api.webhook_url = Some(url.into());
    }

    /// Order ids whose `order` notification was not sent because no webhook url was set.
    pub fn unsent_order_notifications(&self) -> Vec<String> {
        self.inner.shared.lock().orders_api.unsent.clone()
    }

    /// The Orders API order as `GET /v1/orders/{id}` serves it.
    pub fn orders_api_order(&self, order_id: &str) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let order = state.orders_api.orders.get(order_id)?;
        Some(order.render(self.inner.shared.config.collector_id))
    }

    /// Every Orders API order created for `external_reference`, as served.
    pub fn orders_api_orders_for(&self, external_reference: &str) -> Vec<serde_json::Value> {
        let state = self.inner.shared.lock();
        let collector = self.inner.shared.config.collector_id;
        state
            .orders_api
            .orders
            .values()
            .map(|o| o.render(collector))
            .filter(|v| v["external_reference"] == external_reference)
            .collect()
    }

    /// The Orders API order on this POS now (not expired, not paid, not canceled, not replaced).
    pub fn order_on_pos(&self, external_pos_id: &str) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let placed = state.attended.get(external_pos_id)?;
        let AttendedApi::Orders(id) = &placed.api else {
            return None;
        };
        let order = state.orders_api.orders.get(id)?;
        order
            .payable(Utc::now())
            .then(|| order.render(self.inner.shared.config.collector_id))
    }

    /// Every refund made through `POST /v1/orders/{id}/refund`, in order.
    pub fn order_refunds(&self) -> Vec<OrderRefundRecord> {
        self.inner.shared.lock().orders_api.refunds.clone()
    }

    /// Time passes: the Orders API order reaches its `expiration_time` now.
    pub fn expire_order(&self, order_id: &str) -> Result<(), SimError> {
        let mut state = self.inner.shared.lock();
        let now = Utc::now();
        let order = state
            .orders_api
            .orders
            .get_mut(order_id)
            .ok_or_else(|| SimError::UnknownOrder(order_id.to_owned()))?;
        order.expires = now;
        let pos = order.external_pos_id.clone();
        if let Some(placed) = state.attended.get_mut(&pos) {
            if placed.api == AttendedApi::Orders(order_id.to_owned()) {
                placed.expires = now;
            }
        }
        Ok(())
    }

    /// The scan of an Orders API order on a POS: no merchant order is opened (the Orders API has
    /// none), so `merchant_order_id` is 0 and `order_id` names the order; pay it with
    /// [`Simulator::pay_order`].
    pub(super) fn scan_orders_api(&self, order_id: &str, external_pos_id: &str) -> Scan {
        let state = self.inner.shared.lock();
        let Some(order) = state.orders_api.orders.get(order_id) else {
            return no_order(external_pos_id);
        };
        let now = Utc::now();
        if !order.payable(now) {
            return Scan::Waiting {
                http_status: 404,
                kind: order.state(now).0.to_owned(),
                message: Some(format!(
                    "the order on POS {external_pos_id} is {}",
                    order.state(now).0
                )),
            };
        }
        Scan::Order(ScannedOrder {
            merchant_order_id: 0,
            order_id: Some(order.id.clone()),
            external_reference: order.external_reference.clone(),
            total_amount: order.total,
            currency_id: order.currency.clone(),
            notification_url: state.orders_api.webhook_url.clone().unwrap_or_default(),
            raw_body: order
                .render(self.inner.shared.config.collector_id)
                .to_string(),
            status: 200,
        })
    }
}

fn no_order(external_pos_id: &str) -> Scan {
    Scan::Waiting {
        http_status: 404,
        kind: "no_order".to_owned(),
        message: Some(format!("no order on POS {external_pos_id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{call, dec, start, Pos};
    use super::*;
    use reqwest::Method;

    fn order_body() -> Value {
        serde_json::json!({
            "type": "qr",
            "total_amount": "100.00",
            "external_reference": "st01-p03_000042",
            "description": "Snacks",
            "expiration_time": "PT10M",
            "config": {"qr": {"external_pos_id": "st01p03", "mode": "static"}},
            "transactions": {"payments": [{"amount": "100.00"}]},
            "items": [
                {"title": "Snack", "unit_price": "20.00", "quantity": 4, "unit_measure": "unit",
                 "external_code": "A1"},
                {"title": "Water", "unit_price": "20.00", "quantity": 1, "unit_measure": "unit",
                 "taxes": [{"type": "IVA", "value": 19}]}
            ]
        })
    }

    async fn post(sim: &Simulator, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(key) = key {
            headers.push(("X-Idempotency-Key", key));
        }
        let (status, _, text) = call(
            sim,
            Method::POST,
            path,
            Some("TEST-sim-token"),
            &headers,
            body,
        )
        .await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(sim: &Simulator, path: &str) -> (u16, Value) {
        let (status, _, text) = call(sim, Method::GET, path, Some("TEST-sim-token"), &[], "").await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn create(sim: &Simulator, key: &str) -> String {
        let (status, order) = post(sim, "/v1/orders", Some(key), &order_body().to_string()).await;
        assert_eq!(status, 201, "{order}");
        order["id"].as_str().unwrap().to_owned()
    }

    async fn with_webhook() -> (Simulator, Pos) {
        let (sim, pos) = start().await;
        sim.set_orders_webhook_url(pos.notify_url.clone());
        (sim, pos)
    }

    #[tokio::test]
    async fn an_order_is_created_once_per_idempotency_key() {
        let (sim, _pos) = start().await;
        let body = order_body().to_string();
        let (status, order) = post(&sim, "/v1/orders", Some("sale-42"), &body).await;
        assert_eq!(status, 201, "{order}");
        let id = order["id"].as_str().unwrap();
        assert!(id.starts_with("ORD01") && id.len() == 29, "{id}");
        for (key, value) in [
            ("type", "qr"),
            ("processing_mode", "automatic"),
            ("external_reference", "st01-p03_000042"),
            ("description", "Snacks"),
            ("total_amount", "100.00"),
            ("status", "created"),
            ("status_detail", "created"),
            ("expiration_time", "PT10M"),
            ("currency", "ARS"),
            ("user_id", "178106235"),
        ] {
            assert_eq!(order[key], value, "{key}");
        }
        assert!(order.get("total_paid_amount").is_none());
        assert!(order["created_date"].is_string() && order["last_updated_date"].is_string());
        assert_eq!(order["config"], order_body()["config"]);
        assert_eq!(order["items"], order_body()["items"]);
        let payment = &order["transactions"]["payments"][0];
        assert!(payment["id"].as_str().unwrap().starts_with("PAY01"));
        assert_eq!(payment["amount"], "100.00");
        assert_eq!(payment["status"], "created");
        assert!(
            order.get("type_response").is_none(),
            "static QR has no qr_data"
        );

        let (status, again) = post(&sim, "/v1/orders", Some("sale-42"), &body).await;
        assert_eq!((status, &again), (201, &order));
        let (status, other) = post(&sim, "/v1/orders", Some("sale-43"), &body).await;
        assert_eq!(status, 201);
        assert_ne!(other["id"], order["id"]);
        assert_eq!(sim.inner.shared.lock().orders_api.orders.len(), 2);

        let (status, fetched) = get(&sim, &format!("/v1/orders/{id}")).await;
        assert_eq!((status, &fetched), (200, &order));
        assert_eq!(sim.orders_api_order(id).unwrap(), order);
        let (status, missing) = get(&sim, "/v1/orders/ORD01NOPE").await;
        assert_eq!(
            (status, missing["error"].as_str()),
            (404, Some("order_not_found"))
        );
        assert_eq!(missing["errors"][0]["code"], "order_not_found");

        // The second order replaced the first on the POS.
        assert_eq!(sim.order_on_pos("st01p03").unwrap()["id"], other["id"]);
        let Scan::Order(scanned) = sim.scan_attended("st01p03").await.unwrap() else {
            panic!("expected the order");
        };
        assert_eq!(scanned.merchant_order_id, 0);
        assert_eq!(scanned.order_id.as_deref(), other["id"].as_str());
        assert_eq!(scanned.total_amount, dec("100"));
        assert_eq!(scanned.external_reference, "st01-p03_000042");
        assert!(sim.merchant_orders_for("st01-p03_000042").is_empty());
    }

    #[tokio::test]
    async fn every_post_wants_an_idempotency_key() {
        let (sim, _pos) = start().await;
        let body = order_body().to_string();
        let id = create(&sim, "k1").await;
        for path in [
            "/v1/orders".to_owned(),
            format!("/v1/orders/{id}/cancel"),
            format!("/v1/orders/{id}/refund"),
        ] {
            let (status, answer) = post(&sim, &path, None, &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some("empty_required_header")),
                "{path}"
            );
            assert_eq!(
                answer["errors"][0]["message"],
                "Missing HTTP header: X-Idempotency-Key"
            );
            let long = "k".repeat(129);
            let (status, answer) = post(&sim, &path, Some(&long), &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some("invalid_idempotency_key_length"))
            );
        }
        assert_eq!(sim.orders_api_order(&id).unwrap()["status"], "created");
    }

    #[tokio::test]
    async fn mp_refuses_orders_it_would_not_create() {
        let (sim, _pos) = start().await;
        let with = |pointer: &str, value: Value| {
            let mut body = order_body();
            if value.is_null() {
                let (parent, key) = pointer.rsplit_once('/').unwrap();
                let parent = if parent.is_empty() {
                    &mut body
                } else {
                    body.pointer_mut(parent).unwrap()
                };
                parent.as_object_mut().unwrap().remove(key);
            } else if let Some(slot) = body.pointer_mut(pointer) {
                *slot = value;
            } else {
                body[pointer.trim_start_matches('/')] = value;
            }
            body
        };
        let two_payments =
            serde_json::json!({"payments": [{"amount": "50.00"}, {"amount": "50.00"}]});
        let cases = [
            (with("/total_amount", 100.into()), "property_type"),
            (with("/total_amount", "100".into()), "property_value"),
            (with("/total_amount", "100.0".into()), "property_value"),
            (with("/total_amount", "1e2".into()), "property_value"),
            (with("/total_amount", Value::Null), "required_properties"),
            (with("/items/0/quantity", 3.into()), "invalid_total_amount"),
            (
                with("/transactions/payments/0/amount", "99.00".into()),
                "invalid_total_amount",
            ),
            (with("/transactions", two_payments), "maximum_items"),
            (
                with("/transactions/payments", serde_json::json!([])),
                "minimum_items",
            ),
            (with("/transactions", Value::Null), "required_properties"),
            (
                with("/external_reference", "st01 p03".into()),
                "property_value",
            ),
            (
                with("/external_reference", "r".repeat(65).into()),
                "property_value",
            ),
            (
                with("/external_reference", Value::Null),
                "required_properties",
            ),
            (with("/config/qr/mode", "fancy".into()), "property_value"),
            (
                with("/config/qr/external_pos_id", Value::Null),
                "required_properties",
            ),
            (with("/config/qr", Value::Null), "required_properties"),
            (with("/type", "point".into()), "property_value"),
            (with("/processing_mode", "manual".into()), "property_value"),
            (
                with("/expiration_time", "10 minutes".into()),
                "property_value",
            ),
            (with("/expiration_time", "PT0M".into()), "property_value"),
            (
                with("/notification_url", "http://x".into()),
                "unsupported_properties",
            ),
            (
                with("/items/0/sku_number", "1".into()),
                "unsupported_properties",
            ),
            (with("/items/0/quantity", 1.5.into()), "property_value"),
            (
                with("/items/0/quantity", Value::Null),
                "required_properties",
            ),
            (with("/items/0/unit_price", 20.into()), "property_type"),
            (with("/items/0/title", Value::Null), "required_properties"),
            (
                with("/items/1/taxes", serde_json::json!([{"type": "IVA"}])),
                "property_value",
            ),
            (with("/items", serde_json::json!([])), "minimum_items"),
        ];
        for (n, (body, error)) in cases.into_iter().enumerate() {
            let (status, answer) = post(
                &sim,
                "/v1/orders",
                Some(&format!("k{n}")),
                &body.to_string(),
            )
            .await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(error)),
                "{body}"
            );
            assert_eq!(answer["errors"][0]["code"], error);
            assert_eq!(answer["status"], 400);
        }
        let (status, answer) = post(&sim, "/v1/orders", Some("kx"), "not json").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("json_syntax_error"))
        );
        let zero = with("/total_amount", "0.00".into());
        let zero = {
            let mut zero = zero;
            zero["transactions"]["payments"][0]["amount"] = "0.00".into();
            zero.as_object_mut().unwrap().remove("items");
            zero
        };
        let (status, answer) = post(&sim, "/v1/orders", Some("kz"), &zero.to_string()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_total_amount"))
        );
        assert!(sim.inner.shared.lock().orders_api.orders.is_empty());
        assert!(sim.order_on_pos("st01p03").is_none());

        // Accepted variants: no items, no description, seconds, a dynamic QR.
        let mut lean = with("/items", Value::Null);
        lean.as_object_mut().unwrap().remove("description");
        lean["expiration_time"] = "PT30S".into();
        lean["config"]["qr"]["mode"] = "dynamic".into();
        let (status, order) = post(&sim, "/v1/orders", Some("lean"), &lean.to_string()).await;
        assert_eq!(status, 201, "{order}");
        assert!(order["type_response"]["qr_data"].is_string());
        assert!(order.get("items").is_none());
    }

    #[tokio::test]
    async fn whole_currencies_take_whole_amounts() {
        let sim = Simulator::start(SimulatorConfig {
            site_currency: "COP".to_owned(),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let mut body = order_body();
        body["total_amount"] = "100.50".into();
        let (status, answer) = post(&sim, "/v1/orders", Some("a"), &body.to_string()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("property_value"))
        );
        let (status, order) = post(&sim, "/v1/orders", Some("b"), &order_body().to_string()).await;
        assert_eq!((status, order["currency"].as_str()), (201, Some("COP")));
    }

    #[tokio::test]
    async fn an_approved_payment_processes_the_order_and_sends_the_order_webhook() {
        let (sim, pos) = with_webhook().await;
        let id = create(&sim, "k1").await;
        let payment = sim.pay_order(&id, PaymentOutcome::Approved).await.unwrap();
        let order = sim.orders_api_order(&id).unwrap();
        assert_eq!(order["status"], "processed");
        assert_eq!(order["status_detail"], "accredited");
        assert_eq!(order["total_paid_amount"], "100.00");
        let paid = &order["transactions"]["payments"][0];
        assert_eq!(
            (paid["id"].as_str(), paid["status"].as_str()),
            (Some(payment.as_str()), Some("processed"))
        );
        assert_eq!(paid["paid_amount"], "100.00");

        let received = pos.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].0, format!("data.id={id}&type=order"));
        let note: Value = serde_json::from_str(&received[0].1).unwrap();
        assert_eq!(note["action"], "order.processed");
        assert_eq!(note["type"], "order");
        assert_eq!(note["api_version"], "v1");
        assert_eq!(note["live_mode"], false);
        assert_eq!(note["user_id"], "178106235");
        assert!(note["application_id"].is_string() && note["id"].is_string());
        assert_eq!(note["data"]["id"], id.as_str());
        assert_eq!(note["data"]["status"], "processed");
        assert_eq!(note["data"]["status_detail"], "accredited");
        assert_eq!(note["data"]["total_paid_amount"], "100.00");
        assert_eq!(note["data"]["version"], order["version"]);

        assert!(sim.order_on_pos("st01p03").is_none());
        assert!(matches!(
            sim.scan_attended("st01p03").await.unwrap(),
            Scan::Waiting {
                http_status: 404,
                ..
            }
        ));
        assert!(matches!(
            sim.pay_order(&id, PaymentOutcome::Approved).await,
            Err(SimError::InvalidOrder(_))
        ));
        assert_eq!(
            sim.pay_order("ORD01NOPE", PaymentOutcome::Approved).await,
            Err(SimError::UnknownOrder("ORD01NOPE".to_owned()))
        );
    }

    #[tokio::test]
    async fn a_rejected_payment_leaves_the_order_payable_on_its_pos() {
        let (sim, pos) = with_webhook().await;
        let id = create(&sim, "k1").await;
        sim.pay_order(&id, PaymentOutcome::Rejected).await.unwrap();
        let order = sim.orders_api_order(&id).unwrap();
        assert_eq!(
            (order["status"].as_str(), order["status_detail"].as_str()),
            (Some("created"), Some("created"))
        );
        let payment = &order["transactions"]["payments"][0];
        assert_eq!(payment["status"], "failed");
        assert_eq!(payment["status_detail"], "cc_rejected_other_reason");
        assert!(order.get("total_paid_amount").is_none());
        assert_eq!(sim.order_on_pos("st01p03").unwrap()["id"], id.as_str());
        let note: Value = serde_json::from_str(&pos.received()[0].1).unwrap();
        assert_eq!(note["action"], "order.action_required");
        assert_eq!(note["data"]["status"], "created");

        assert!(matches!(
            sim.scan_attended("st01p03").await.unwrap(),
            Scan::Order(_)
        ));
        sim.pay_order(&id, PaymentOutcome::Approved).await.unwrap();
        assert_eq!(sim.orders_api_order(&id).unwrap()["status"], "processed");
        assert_eq!(pos.received().len(), 2);
    }

    #[tokio::test]
    async fn short_and_pending_payments_read_as_they_are() {
        let (sim, _pos) = with_webhook().await;
        let id = create(&sim, "k1").await;
        sim.pay_order(&id, PaymentOutcome::InProcess).await.unwrap();
        let order = sim.orders_api_order(&id).unwrap();
        assert_eq!(
            (order["status"].as_str(), order["status_detail"].as_str()),
            (Some("action_required"), Some("in_process"))
        );
        let cancel = format!("/v1/orders/{id}/cancel");
        assert_eq!(post(&sim, &cancel, Some("c1"), "").await.0, 409);
        assert!(sim.order_on_pos("st01p03").is_some());

        sim.pay_order(&id, PaymentOutcome::ApprovedAmount(dec("50")))
            .await
            .unwrap();
        let order = sim.orders_api_order(&id).unwrap();
        assert_eq!(order["status"], "processed");
        assert_eq!(order["total_amount"], "100.00");
        assert_eq!(
            order["total_paid_amount"], "50.00",
            "processed, but not the full amount"
        );
    }

    #[tokio::test]
    async fn order_notifications_follow_the_notify_mode_and_need_a_webhook_url() {
        let (sim, pos) = start().await;
        let id = create(&sim, "k1").await;
        sim.pay_order(&id, PaymentOutcome::Rejected).await.unwrap();
        assert!(pos.received().is_empty());
        assert_eq!(sim.unsent_order_notifications(), std::slice::from_ref(&id));
        assert!(matches!(
            sim.notify_order(&id).await,
            Err(SimError::InvalidOrder(_))
        ));

        sim.set_orders_webhook_url(pos.notify_url.clone());
        sim.set_notify_mode(NotifyMode::None);
        sim.pay_order(&id, PaymentOutcome::Rejected).await.unwrap();
        assert!(pos.received().is_empty());
        sim.set_notify_mode(NotifyMode::Duplicated(3));
        sim.pay_order(&id, PaymentOutcome::Approved).await.unwrap();
        assert_eq!(pos.received().len(), 3);
        assert_eq!(sim.notify_order(&id).await, Ok(200));
        assert_eq!(pos.received().len(), 4);
        assert_eq!(sim.notifications_sent().len(), 4);
        assert_eq!(
            sim.notify_order("ORD01NOPE").await,
            Err(SimError::UnknownOrder("ORD01NOPE".to_owned()))
        );
    }

    #[tokio::test]
    async fn a_created_order_is_canceled_once() {
        let (sim, _pos) = start().await;
        let id = create(&sim, "k1").await;
        let path = format!("/v1/orders/{id}/cancel");
        let (status, canceled) = post(&sim, &path, Some("c1"), "").await;
        assert_eq!(status, 200, "{canceled}");
        assert_eq!(canceled["status"], "canceled");
        assert_eq!(canceled["status_detail"], "canceled");
        assert_eq!(
            canceled["transactions"]["payments"][0]["status"],
            "canceled"
        );
        assert!(sim.order_on_pos("st01p03").is_none());
        assert!(matches!(
            sim.scan_attended("st01p03").await.unwrap(),
            Scan::Waiting {
                http_status: 404,
                ..
            }
        ));
        let (status, again) = post(&sim, &path, Some("c1"), "").await;
        assert_eq!(
            (status, &again),
            (200, &canceled),
            "the same key answers the same"
        );
        let (status, answer) = post(&sim, &path, Some("c2"), "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (409, Some("cannot_cancel_order"))
        );
        assert!(matches!(
            sim.pay_order(&id, PaymentOutcome::Approved).await,
            Err(SimError::InvalidOrder(_))
        ));

        let paid = create(&sim, "k2").await;
        sim.set_notify_mode(NotifyMode::None);
        sim.pay_order(&paid, PaymentOutcome::Approved)
            .await
            .unwrap();
        let (status, _) = post(&sim, &format!("/v1/orders/{paid}/cancel"), Some("c3"), "").await;
        assert_eq!(status, 409);
        let (status, answer) = post(&sim, "/v1/orders/ORD01NOPE/cancel", Some("c4"), "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (404, Some("order_not_found"))
        );
    }

    #[tokio::test]
    async fn a_processed_order_is_refunded_in_part_then_in_full_once_per_key() {
        let (sim, _pos) = start().await;
        sim.set_notify_mode(NotifyMode::None);
        let id = create(&sim, "k1").await;
        let path = format!("/v1/orders/{id}/refund");
        let (status, answer) = post(&sim, &path, Some("r0"), "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (409, Some("cannot_refund_order"))
        );
        let payment = sim.pay_order(&id, PaymentOutcome::Approved).await.unwrap();

        let partial =
            serde_json::json!({"transactions": [{"id": payment, "amount": "30.00"}]}).to_string();
        let (status, order) = post(&sim, &path, Some("r1"), &partial).await;
        assert_eq!(status, 200, "{order}");
        assert_eq!(order["status"], "processed");
        assert_eq!(order["status_detail"], "partially_refunded");
        let refund = &order["transactions"]["refunds"][0];
        assert!(refund["id"].as_str().unwrap().starts_with("REF01"));
        assert_eq!(refund["transaction_id"], payment.as_str());
        assert_eq!(refund["amount"], "30.00");
        let (status, again) = post(&sim, &path, Some("r1"), &partial).await;
        assert_eq!((status, &again), (200, &order));
        assert_eq!(sim.order_refunds().len(), 1);

        let too_much =
            serde_json::json!({"transactions": [{"id": payment, "amount": "70.01"}]}).to_string();
        assert_eq!(post(&sim, &path, Some("r2"), &too_much).await.0, 400);
        let foreign =
            serde_json::json!({"transactions": [{"id": "PAY01X", "amount": "1.00"}]}).to_string();
        assert_eq!(post(&sim, &path, Some("r3"), &foreign).await.0, 400);
        assert_eq!(
            post(&sim, &path, Some("r4"), r#"{"amount": "1.00"}"#)
                .await
                .0,
            400
        );

        let (status, order) = post(&sim, &path, Some("r5"), "").await;
        assert_eq!(status, 200, "{order}");
        assert_eq!(
            (order["status"].as_str(), order["status_detail"].as_str()),
            (Some("refunded"), Some("refunded"))
        );
        assert_eq!(order["transactions"]["refunds"][1]["amount"], "70.00");
        assert_eq!(order["transactions"]["payments"][0]["status"], "refunded");
        assert_eq!(post(&sim, &path, Some("r6"), "{}").await.0, 409);
        assert_eq!(
            sim.order_refunds(),
            [
                OrderRefundRecord {
                    order_id: id.clone(),
                    refund_id: order["transactions"]["refunds"][0]["id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    amount: dec("30"),
                    requested: Some(dec("30")),
                    idempotency_key: "r1".to_owned(),
                },
                OrderRefundRecord {
                    order_id: id.clone(),
                    refund_id: order["transactions"]["refunds"][1]["id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    amount: dec("70"),
                    requested: None,
                    idempotency_key: "r5".to_owned(),
                },
            ]
        );
    }

    #[tokio::test]
    async fn an_order_past_its_expiration_time_reads_expired() {
        let (sim, _pos) = start().await;
        let id = create(&sim, "k1").await;
        let other = create(&sim, "k2").await;
        assert!(sim.expire_attended_order("st01p03"));
        assert_eq!(sim.orders_api_order(&other).unwrap()["status"], "expired");
        sim.expire_order(&id).unwrap();
        let (_, order) = get(&sim, &format!("/v1/orders/{id}")).await;
        assert_eq!(
            (order["status"].as_str(), order["status_detail"].as_str()),
            (Some("expired"), Some("expired"))
        );
        assert!(matches!(
            sim.scan_attended("st01p03").await.unwrap(),
            Scan::Waiting { http_status: 404, kind, .. } if kind == "expired"
        ));
        assert!(sim.order_on_pos("st01p03").is_none());
        assert!(sim.pay_order(&id, PaymentOutcome::Approved).await.is_err());
        assert_eq!(
            post(&sim, &format!("/v1/orders/{id}/cancel"), Some("c"), "")
                .await
                .0,
            409
        );
        assert_eq!(
            sim.expire_order("nope"),
            Err(SimError::UnknownOrder("nope".to_owned()))
        );

        assert_eq!(iso_duration("PT10M"), Some(chrono::Duration::minutes(10)));
        assert_eq!(iso_duration("PT30S"), Some(chrono::Duration::seconds(30)));
        assert_eq!(iso_duration("PT1H30M"), Some(chrono::Duration::minutes(90)));
        assert_eq!(iso_duration("P1D"), Some(chrono::Duration::days(1)));
        for bad in ["", "P", "PT", "10M", "PT10", "PTM", "PT-1M", "PT0S", "PT1Y"] {
            assert_eq!(iso_duration(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn the_instore_endpoints_do_not_touch_an_orders_api_order_but_a_new_order_replaces_it() {
        let (sim, pos) = start().await;
        let id = create(&sim, "k1").await;
        let orders = "/instore/qr/seller/collectors/178106235/pos/st01p03/orders";
        for method in [Method::GET, Method::DELETE] {
            let (status, _, _) = call(&sim, method, orders, Some("TEST-sim-token"), &[], "").await;
            assert_eq!(status, 404);
        }
        assert_eq!(sim.order_on_pos("st01p03").unwrap()["id"], id.as_str());
        let legacy = serde_json::json!({"external_reference": "legacy", "notification_url": pos.notify_url,
            "items": [{"title": "x", "currency_id": "ARS", "unit_price": 10, "quantity": 1}]});
        let (status, _, _) = call(
            &sim,
            Method::POST,
            "/mpmobile/instore/qr/178106235/st01p03",
            Some("TEST-sim-token"),
            &[],
            &legacy.to_string(),
        )
        .await;
        assert_eq!(status, 200);
        assert!(sim.order_on_pos("st01p03").is_none());
        assert_eq!(
            sim.orders_api_order(&id).unwrap()["status"],
            "created",
            "off the POS, still created"
        );
    }
}
