//! Reading order bodies as MP does: the POS URL's answers (v1 and v2, docs/mercadopago.md) and
//! the attended APIs' bodies, which are the same shapes (the instore `PUT` is the v2 body, the legacy
//! `mpmobile` `POST` the v1 body without `collector_id`).
//!
//! A refusal carries a code in MP's style (`invalid_items.unit_price`, from the instore API's reference)
//! and a sentence; the API answers 400 with both, [`Simulator::scan`] reports the sentence.

use super::*;

/// The JSON object as raw values, so amounts stay exact and types can be told apart.
type RawObject = BTreeMap<String, Box<RawValue>>;

/// The largest `external_reference` MP takes in the v1/v2 and attended bodies.
const MAX_EXTERNAL_REFERENCE: usize = 256;

/// Why MP refuses an order body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) code: String,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn response(&self) -> HttpResponse {
        mp_error(400, &self.message, &self.code)
    }
}

fn refuse<T>(code: &str, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        code: code.to_owned(),
        message: message.into(),
    })
}

/// Whether the legacy body must name the collector (the poll answer) or may (`mpmobile`, whose path
/// names it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Collector {
    Required,
    Optional,
}

// ---------------------------------------------------------------------------------------------
// Waiting answers.

#[derive(Deserialize)]
struct V1Waiting {
    error: V1WaitingError,
}

#[derive(Deserialize)]
struct V1WaitingError {
    #[serde(rename = "type")]
    kind: String,
    message: Option<String>,
}

#[derive(Deserialize)]
struct V2Waiting {
    status: V2WaitingStatus,
}

#[derive(Deserialize)]
struct V2WaitingStatus {
    status_detail: String,
    message: Option<String>,
}

/// MP's v2 `status_detail`s, spelled as MP spells them.
pub(super) const V2_WAITING: &[&str] = &["Waiting_for_order", "in_process", "notihing_to_pay"];

/// A v1 400 answer. An undocumented `error.type` is logged and passed on: the app shows its generic
/// screen.
pub(super) fn waiting_v1(body: &str) -> Option<Scan> {
    let answer: V1Waiting = serde_json::from_str(body).ok()?;
    if !matches!(
        answer.error.kind.as_str(),
        "in_process" | "unavailable" | "invalid" | "timeout"
    ) {
        tracing::warn!(kind = %answer.error.kind, "POS answered an undocumented v1 error.type");
    }
    Some(Scan::Waiting {
        http_status: 400,
        kind: answer.error.kind,
        message: answer.error.message,
    })
}

/// A v2 202 answer: `None` when it is not `{"status": {"status_detail": …}}`, a refusal when the
/// detail is not one of MP's three spellings (`waiting_for_order` or `nothing_to_pay` are bugs).
pub(super) fn waiting_v2(body: &str) -> Option<Result<Scan, Refusal>> {
    let answer: V2Waiting = serde_json::from_str(body).ok()?;
    if !V2_WAITING.contains(&answer.status.status_detail.as_str()) {
        return Some(refuse(
            "invalid_status_detail",
            format!(
                "status_detail {:?} is not one of MP's {V2_WAITING:?} (spelled exactly so)",
                answer.status.status_detail
            ),
        ));
    }
    Some(Ok(Scan::Waiting {
        http_status: 202,
        kind: answer.status.status_detail,
        message: answer.status.message,
    }))
}

// ---------------------------------------------------------------------------------------------
// Order bodies.

/// The v1 answer of a POS URL.
pub(super) fn validate_v1(body: &str, config: &SimulatorConfig) -> Result<OrderRequest, Refusal> {
    validate_v1_like(body, config, Collector::Required)
}

/// The v1 shape: `collector_id`, `sponsor_id`, `items` with `currency_id`, `external_reference`,
/// `notification_url`. Amounts may be numbers or decimal strings (MP's v1 pages are loose there).
pub(super) fn validate_v1_like(
    body: &str,
    config: &SimulatorConfig,
    collector: Collector,
) -> Result<OrderRequest, Refusal> {
    let order = object(body, "v1")?;
    match present(&order, "collector_id") {
        None if collector == Collector::Required => {
            return refuse("invalid_collector_id", "collector_id is missing")
        }
        None => {}
        Some(raw) => {
            let Some(id) = raw_id(raw) else {
                return refuse(
                    "invalid_collector_id",
                    format!("collector_id {} is not an id", raw.get()),
                );
            };
            if id != config.collector_id {
                return refuse(
                    "invalid_collector_id",
                    format!(
                        "collector_id {id} is not the seller's ({})",
                        config.collector_id
                    ),
                );
            }
        }
    }
    if let Some(sponsor) = present(&order, "sponsor_id") {
        if raw_id(sponsor).is_none() {
            return refuse(
                "invalid_sponsor_id",
                format!("sponsor_id {} is not an id", sponsor.get()),
            );
        }
    }
    let external_reference = external_reference(&order)?;
    let notification_url = notification_url(&order)?;
    let lines = items(&order)?;
    let decimals = currency_decimals(&config.site_currency);
    let mut items = Vec::with_capacity(lines.len());
    let mut total = Decimal::ZERO;
    for (n, line) in lines.iter().enumerate() {
        let title = item_text(line, n, "title")?.ok_or_else(|| missing_item(n, "title"))?;
        let description = item_text(line, n, "description")?.unwrap_or_default();
        if let Some(currency) = item_text(line, n, "currency_id")? {
            if currency != config.site_currency {
                return refuse(
                    "invalid_items.currency_id",
                    format!(
                        "items[{n}].currency_id {currency} is not the site's currency {}",
                        config.site_currency
                    ),
                );
            }
        }
        let quantity = loose_amount(line, n, "quantity")?;
        if quantity <= Decimal::ZERO || !quantity.fract().is_zero() {
            return refuse(
                "invalid_items.quantity",
                format!("items[{n}].quantity {quantity} is not a positive whole number"),
            );
        }
        let unit_price = unit_price(loose_amount(line, n, "unit_price")?, n, decimals)?;
        taxes(line, n)?;
        total += quantity * unit_price;
        items.push(OrderItem {
            title,
            description,
            quantity,
            unit_price,
        });
    }
    Ok(OrderRequest {
        external_reference,
        notification_url,
        currency_id: config.site_currency.clone(),
        items,
        total,
    })
}

/// The v2 answer, also the instore API's order. Amounts must be JSON numbers. Quantities may have
/// decimals here (`unit_measure` can be litres, at most 3 decimals); each item's `total_amount` must be
/// its quantity × unit_price rounded to the currency, and the order's the sum of the items'. MP
/// documents no finer rule. `collector_id` and `currency_id` are not needed (and ignored if sent).
pub(super) fn validate_v2(body: &str, config: &SimulatorConfig) -> Result<OrderRequest, Refusal> {
    let order = object(body, "v2")?;
    let external_reference = external_reference(&order)?;
    let notification_url = notification_url(&order)?;
    for key in ["title", "description"] {
        if present(&order, key).is_some_and(|raw| raw_string(raw).is_none()) {
            return refuse(&format!("invalid_{key}"), format!("{key} must be string"));
        }
    }
    if let Some(sponsor) = present(&order, "sponsor") {
        let id = serde_json::from_str::<RawObject>(sponsor.get())
            .ok()
            .and_then(|sponsor| sponsor.get("id").map(|id| id.get().to_owned()));
        match id {
            None => return refuse("invalid_sponsor.id", "sponsor.id must be present"),
            Some(id) if id.parse::<u64>().is_err() => {
                return refuse(
                    "invalid_sponsor.id",
                    format!("sponsor.id must be number, not {id}"),
                )
            }
            Some(_) => {}
        }
    }
    let lines = items(&order)?;
    let decimals = currency_decimals(&config.site_currency);
    let mut items = Vec::with_capacity(lines.len());
    let mut sum = Decimal::ZERO;
    for (n, line) in lines.iter().enumerate() {
        let title = item_text(line, n, "title")?.ok_or_else(|| missing_item(n, "title"))?;
        let description = item_text(line, n, "description")?.unwrap_or_default();
        for key in ["sku_number", "category"] {
            item_text(line, n, key)?;
        }
        item_text(line, n, "unit_measure")?.ok_or_else(|| missing_item(n, "unit_measure"))?;
        let quantity = item_number(line, n, "quantity")?;
        if quantity <= Decimal::ZERO || quantity.normalize().scale() > 3 {
            return refuse(
                "invalid_items.quantity",
                format!("items[{n}].quantity {quantity} is not positive with at most 3 decimals"),
            );
        }
        let unit_price = unit_price(item_number(line, n, "unit_price")?, n, decimals)?;
        let line_total = item_number(line, n, "total_amount")?;
        let expected = (quantity * unit_price)
            .round_dp_with_strategy(decimals, RoundingStrategy::MidpointAwayFromZero);
        if line_total != expected {
            return refuse(
                "invalid_items.total_amount",
                format!(
                    "items[{n}].total_amount {line_total} is not quantity × unit_price ({expected})"
                ),
            );
        }
        taxes(line, n)?;
        sum += line_total;
        items.push(OrderItem {
            title,
            description,
            quantity,
            unit_price,
        });
    }
    let total = match present(&order, "total_amount") {
        None => return refuse("invalid_total_amount", "total_amount must be present"),
        Some(raw) => raw_number(raw).ok_or_else(|| Refusal {
            code: "invalid_total_amount".to_owned(),
            message: format!("total_amount must be number, not {}", raw.get()),
        })?,
    };
    if total != sum {
        return refuse(
            "invalid_total_amount",
            format!("total_amount {total} is not the sum of the items' total_amount ({sum})"),
        );
    }
    Ok(OrderRequest {
        external_reference,
        notification_url,
        currency_id: config.site_currency.clone(),
        items,
        total,
    })
}

fn object(body: &str, shape: &str) -> Result<RawObject, Refusal> {
    serde_json::from_str(body)
        .or_else(|e| refuse("invalid_body", format!("not a {shape} order body: {e}")))
}

/// The raw value of `key`, a JSON `null` counting as absent.
fn present<'a>(object: &'a RawObject, key: &str) -> Option<&'a RawValue> {
    object
        .get(key)
        .map(|raw| &**raw)
        .filter(|raw| raw.get().trim() != "null")
}

fn raw_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

/// A JSON number (not a string) as an exact decimal.
fn raw_number(raw: &RawValue) -> Option<Decimal> {
    let text = raw.get().trim();
    if text.starts_with('"') {
        return None;
    }
    raw_decimal(raw)
}

fn external_reference(order: &RawObject) -> Result<String, Refusal> {
    let reference = present(order, "external_reference")
        .and_then(raw_string)
        .filter(|r| !r.trim().is_empty());
    let Some(reference) = reference else {
        return refuse(
            "invalid_external_reference",
            "external_reference must be present (a non-empty string)",
        );
    };
    if reference.chars().count() > MAX_EXTERNAL_REFERENCE {
        return refuse(
            "invalid_external_reference",
            format!("external_reference is longer than {MAX_EXTERNAL_REFERENCE} characters"),
        );
    }
    Ok(reference)
}

fn notification_url(order: &RawObject) -> Result<String, Refusal> {
    let url = present(order, "notification_url")
        .and_then(raw_string)
        .filter(|u| !u.trim().is_empty());
    match url {
        None => refuse(
            "invalid_notification_url",
            "notification_url must be present",
        ),
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => refuse(
            "invalid_notification_url",
            format!("notification_url {url} is not an http(s) URL"),
        ),
        Some(url) => Ok(url),
    }
}

fn items(order: &RawObject) -> Result<Vec<RawObject>, Refusal> {
    let items = present(order, "items")
        .and_then(|raw| serde_json::from_str::<Vec<RawObject>>(raw.get()).ok());
    match items {
        Some(items) if !items.is_empty() => Ok(items),
        Some(_) => refuse("invalid_items", "items is empty"),
        None => refuse(
            "invalid_items",
            "items is missing or not an array of objects",
        ),
    }
}

fn missing_item(n: usize, key: &str) -> Refusal {
    Refusal {
        code: format!("invalid_items.{key}"),
        message: format!("items[{n}].{key} must be present"),
    }
}

/// An optional string field of an item; present but not a string is refused.
fn item_text(item: &RawObject, n: usize, key: &str) -> Result<Option<String>, Refusal> {
    match present(item, key) {
        None => Ok(None),
        Some(raw) => match raw_string(raw) {
            Some(text) if !text.trim().is_empty() => Ok(Some(text)),
            Some(_) => Ok(None),
            None => refuse(
                &format!("invalid_items.{key}"),
                format!("items[{n}].{key} must be string, not {}", raw.get()),
            ),
        },
    }
}

/// A required JSON number of an item.
fn item_number(item: &RawObject, n: usize, key: &str) -> Result<Decimal, Refusal> {
    let raw = present(item, key).ok_or_else(|| missing_item(n, key))?;
    raw_number(raw).ok_or_else(|| Refusal {
        code: format!("invalid_items.{key}"),
        message: format!("items[{n}].{key} must be number, not {}", raw.get()),
    })
}

/// A required number or decimal string of an item.
fn loose_amount(item: &RawObject, n: usize, key: &str) -> Result<Decimal, Refusal> {
    let raw = present(item, key).ok_or_else(|| missing_item(n, key))?;
    raw_decimal(raw).ok_or_else(|| Refusal {
        code: format!("invalid_items.{key}"),
        message: format!("items[{n}].{key} {} is not a number", raw.get()),
    })
}

fn unit_price(price: Decimal, n: usize, decimals: u32) -> Result<Decimal, Refusal> {
    if price <= Decimal::ZERO {
        return refuse(
            "invalid_items.unit_price",
            format!("items[{n}].unit_price {price} is not positive"),
        );
    }
    if price.normalize().scale() > decimals {
        return refuse(
            "invalid_items.unit_price",
            format!("items[{n}].unit_price {price} has more than {decimals} decimals"),
        );
    }
    Ok(price)
}

/// Colombia's item taxes: `[{"type": "IVA", "value": 19}]`, kept in the body as sent. They change no
/// total (prices include them).
fn taxes(item: &RawObject, n: usize) -> Result<(), Refusal> {
    let Some(raw) = present(item, "taxes") else {
        return Ok(());
    };
    let bad = |why: &str| {
        refuse(
            "invalid_items.taxes",
            format!("items[{n}].taxes {why}: {}", raw.get()),
        )
    };
    let Ok(taxes) = serde_json::from_str::<Vec<RawObject>>(raw.get()) else {
        return bad("must be an array of objects");
    };
    for tax in &taxes {
        let kind = present(tax, "type").and_then(raw_string);
        if kind.is_none_or(|k| k.trim().is_empty()) {
            return bad("need a string type");
        }
        if present(tax, "value").and_then(raw_number).is_none() {
            return bad("need a number value");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{dec, start, Pos};
    use super::*;
    use serde_json::{json, Value};

    fn v2_body(pos: &Pos) -> Value {
        json!({
            "external_reference": "st01-p03-000042",
            "total_amount": 25615.80,
            "items": [{"sku_number": "SUPER95", "category": "fuel", "title": "Super 95",
                       "description": "Pump 3", "quantity": 32.10, "unit_measure": "litre",
                       "unit_price": 798.00, "total_amount": 25615.80}],
            "title": "Super 95",
            "description": "Pump 3",
            "notification_url": pos.notify_url,
            "sponsor": {"id": 334249281}
        })
    }

    async fn scan_v2(sim: &Simulator, pos: &Pos, body: &Value) -> Result<Scan, SimError> {
        pos.answer_v2(body.to_string());
        sim.scan(&pos.url).await
    }

    fn refused(scan: Result<Scan, SimError>, why: &str) {
        match scan {
            Err(SimError::InvalidOrder(message)) => {
                assert!(message.contains(why), "{message} should say {why}")
            }
            other => panic!("expected a refusal saying {why}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn each_of_mps_three_v2_waits_is_a_wait() {
        let (sim, pos) = start().await;
        for detail in V2_WAITING {
            let body = json!({"status": {"status_detail": detail, "message": "wait"}});
            pos.answer(202, body.to_string());
            assert_eq!(
                sim.scan(&pos.url).await.unwrap(),
                Scan::Waiting {
                    http_status: 202,
                    kind: (*detail).to_owned(),
                    message: Some("wait".to_owned()),
                }
            );
        }
    }

    #[tokio::test]
    async fn a_v2_wait_spelled_otherwise_than_mp_is_refused() {
        let (sim, pos) = start().await;
        for detail in [
            "waiting_for_order",
            "nothing_to_pay",
            "In_process",
            "unavailable",
        ] {
            let body = json!({"status": {"status_detail": detail}});
            pos.answer(202, body.to_string());
            refused(sim.scan(&pos.url).await, "spelled exactly");
        }
        pos.answer(202, json!({"status_detail": "in_process"}).to_string());
        assert!(matches!(
            sim.scan(&pos.url).await,
            Err(SimError::BadAnswer { status: 202, .. })
        ));
    }

    #[tokio::test]
    async fn a_v2_order_needs_the_order_version_header() {
        let (sim, pos) = start().await;
        let body = v2_body(&pos);
        pos.answer(200, body.to_string());
        refused(sim.scan(&pos.url).await, "order-version: 2");
        let Scan::Order(order) = scan_v2(&sim, &pos, &body).await.unwrap() else {
            panic!("expected an order");
        };
        assert_eq!(order.total_amount, dec("25615.80"));
        assert_eq!(order.currency_id, "ARS", "the site's currency");
        // A v1 body under the v2 header is read as v2: its items lack v2's fields.
        let v1 = pos.v1_body("r", "100");
        pos.answer_v2(v1);
        refused(
            sim.scan(&pos.url).await,
            "items[0].unit_measure must be present",
        );
    }

    #[tokio::test]
    async fn a_v2_order_total_is_the_sum_of_its_items_totals() {
        let (sim, pos) = start().await;
        let mut body = v2_body(&pos);
        body["total_amount"] = json!(25615.81);
        refused(scan_v2(&sim, &pos, &body).await, "sum of the items");
        body["total_amount"] = json!("25615.80");
        refused(scan_v2(&sim, &pos, &body).await, "must be number");

        // Two items add up; a litre quantity rounds to the cent.
        let mut two = v2_body(&pos);
        two["items"] = json!([
            {"title": "Snack", "quantity": 1.333, "unit_measure": "kg", "unit_price": 10, "total_amount": 13.33},
            {"title": "Water", "quantity": 2, "unit_measure": "unit", "unit_price": 1.5, "total_amount": 3}
        ]);
        two["total_amount"] = json!(16.33);
        assert!(matches!(
            scan_v2(&sim, &pos, &two).await,
            Ok(Scan::Order(_))
        ));
    }

    #[tokio::test]
    async fn each_v2_item_total_is_its_quantity_times_its_price() {
        let (sim, pos) = start().await;
        let mut body = v2_body(&pos);
        body["items"][0]["total_amount"] = json!(25615.79);
        body["total_amount"] = json!(25615.79);
        refused(scan_v2(&sim, &pos, &body).await, "quantity × unit_price");
        let mut body = v2_body(&pos);
        body["items"][0]["unit_price"] = json!("798.00");
        refused(scan_v2(&sim, &pos, &body).await, "must be number");
        let mut body = v2_body(&pos);
        body["items"][0]["quantity"] = json!(32.1001);
        refused(scan_v2(&sim, &pos, &body).await, "at most 3 decimals");
        let mut body = v2_body(&pos);
        body["items"][0]
            .as_object_mut()
            .unwrap()
            .remove("unit_measure");
        refused(scan_v2(&sim, &pos, &body).await, "unit_measure");
    }

    #[tokio::test]
    async fn a_v2_order_needs_no_collector_nor_currency() {
        let (sim, pos) = start().await;
        let body = v2_body(&pos);
        assert!(
            body.get("collector_id").is_none() && body["items"][0].get("currency_id").is_none()
        );
        assert!(matches!(
            scan_v2(&sim, &pos, &body).await,
            Ok(Scan::Order(_))
        ));
        // Sent anyway, they are ignored (MP reads only the v2 fields).
        let mut extra = body.clone();
        extra["collector_id"] = json!(1);
        extra["items"][0]["currency_id"] = json!("BRL");
        assert!(matches!(
            scan_v2(&sim, &pos, &extra).await,
            Ok(Scan::Order(_))
        ));
    }

    #[tokio::test]
    async fn a_v2_sponsor_is_an_object_with_a_numeric_id() {
        let (sim, pos) = start().await;
        let mut body = v2_body(&pos);
        body["sponsor"] = json!({"id": "334249281"});
        refused(
            scan_v2(&sim, &pos, &body).await,
            "sponsor.id must be number",
        );
        body["sponsor"] = json!({});
        refused(
            scan_v2(&sim, &pos, &body).await,
            "sponsor.id must be present",
        );
        body.as_object_mut().unwrap().remove("sponsor");
        assert!(
            matches!(scan_v2(&sim, &pos, &body).await, Ok(Scan::Order(_))),
            "sponsor is optional"
        );
    }

    #[tokio::test]
    async fn v2_items_may_carry_colombian_taxes() {
        let sim = Simulator::start(SimulatorConfig {
            site_currency: "COP".to_owned(),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let pos = Pos::spawn().await;
        let mut body = v2_body(&pos);
        body["items"] = json!([{"title": "Corriente", "quantity": 10, "unit_measure": "gal",
            "unit_price": 15000, "total_amount": 150000, "taxes": [{"type": "IVA", "value": 19}]}]);
        body["total_amount"] = json!(150000);
        let Scan::Order(order) = scan_v2(&sim, &pos, &body).await.unwrap() else {
            panic!("expected an order");
        };
        assert!(order
            .raw_body
            .contains(r#""taxes":[{"type":"IVA","value":19}]"#));
        assert_eq!(order.currency_id, "COP");
        for taxes in [
            json!({"type": "IVA", "value": 19}),
            json!([{"value": 19}]),
            json!([{"type": "IVA", "value": "19"}]),
        ] {
            body["items"][0]["taxes"] = taxes;
            refused(scan_v2(&sim, &pos, &body).await, "taxes");
        }
        body["items"][0]["taxes"] = json!([]);
        body["items"][0]["unit_price"] = json!(15000.5);
        body["items"][0]["total_amount"] = json!(150005);
        body["total_amount"] = json!(150005);
        refused(scan_v2(&sim, &pos, &body).await, "decimals");
    }

    #[tokio::test]
    async fn a_v2_order_needs_its_reference_and_notification_url() {
        let (sim, pos) = start().await;
        for (key, why) in [
            ("external_reference", "external_reference"),
            ("notification_url", "notification_url"),
            ("items", "items"),
        ] {
            let mut body = v2_body(&pos);
            body.as_object_mut().unwrap().remove(key);
            refused(scan_v2(&sim, &pos, &body).await, why);
        }
        let mut body = v2_body(&pos);
        body["notification_url"] = json!("/mp/notifications");
        refused(scan_v2(&sim, &pos, &body).await, "http(s)");
    }
}
