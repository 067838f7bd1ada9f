//! The attended model: qrgate places the order on a POS and the customer's scan shows it. Two of MP's
//! APIs place it on the same per-POS slot (one order per POS, a new one replaces it):
//! - the instore API: `PUT /instore/qr/seller/collectors/{user}/stores/{store}/pos/{pos}/orders` (204),
//!   `GET /instore/qr/seller/collectors/{user}/pos/{pos}/orders` (200 with an array of the order as
//!   placed, or 404 `point_of_sale_in_store_order_not_found`), `DELETE` on that path (204, or 404 when
//!   there is none);
//! - the legacy API: `POST /mpmobile/instore/qr/{user}/{pos}` (200 `{}`), `DELETE` on that path
//!   (204, or 404).
//!
//! MP's Orders API (`orders_api`) uses the slot too, but these endpoints neither show nor delete its
//! orders. An expired order counts as none. A fully approved payment takes the order off the POS (MP
//! closes it); a rejected one leaves it, so the customer can retry on the same merchant order.

use super::validate::{validate_v1_like, Collector};
use super::*;

/// Which API placed the order on the POS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AttendedApi {
    Instore,
    Legacy,
    /// MP's Orders API, with the order's id.
    Orders(String),
}

/// Routes the attended calls; `None` when the path is not one of them.
pub(super) fn route(
    shared: &Shared,
    method: &str,
    segments: &[&str],
    body: &[u8],
) -> Option<HttpResponse> {
    let (user, pos, api) = match (method, segments) {
        (
            "PUT",
            ["instore", "qr", "seller", "collectors", user, "stores", store, "pos", pos, "orders"],
        ) => {
            return Some(with_collector(shared, user, || {
                place_instore(shared, store, pos, body)
            }))
        }
        ("POST", ["mpmobile", "instore", "qr", user, pos]) => {
            return Some(with_collector(shared, user, || {
                place_legacy(shared, pos, body)
            }))
        }
        ("GET", ["instore", "qr", "seller", "collectors", user, "pos", pos, "orders"]) => {
            return Some(with_collector(shared, user, || show(shared, pos)))
        }
        ("DELETE", ["instore", "qr", "seller", "collectors", user, "pos", pos, "orders"]) => {
            (user, pos, AttendedApi::Instore)
        }
        ("DELETE", ["mpmobile", "instore", "qr", user, pos]) => (user, pos, AttendedApi::Legacy),
        _ => return None,
    };
    Some(with_collector(shared, user, || remove(shared, pos, &api)))
}

fn with_collector(
    shared: &Shared,
    user: &str,
    then: impl FnOnce() -> HttpResponse,
) -> HttpResponse {
    if !is_collector(shared, user) {
        return collector_mismatch();
    }
    then()
}

fn no_order(pos: &str) -> HttpResponse {
    mp_error(
        404,
        &format!("point of sale {pos} has no in-store order"),
        "point_of_sale_in_store_order_not_found",
    )
}

/// With [`Simulator::set_require_registered_pos`], the POS must be registered (and in `store`, when
/// the path names one).
fn check_registered(shared: &Shared, store: Option<&str>, pos: &str) -> Result<(), MpError> {
    let state = shared.lock();
    if !state.require_registered_pos {
        return Ok(());
    }
    let Some(found) = state.registry.pos_fields(pos) else {
        return Err(MpError::new(
            404,
            &format!("point of sale {pos} is not registered"),
            "point_of_sale_not_found",
        ));
    };
    if let Some(store) = store {
        if found.as_deref() != Some(store) {
            return Err(MpError::new(
                400,
                &format!("point of sale {pos} does not belong to store {store}"),
                "invalid_store",
            ));
        }
    }
    Ok(())
}

fn place_instore(shared: &Shared, store: &str, pos: &str, body: &[u8]) -> HttpResponse {
    if let Err(error) = check_registered(shared, Some(store), pos) {
        return error.response();
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return mp_error(400, "the body is not UTF-8", "invalid_body");
    };
    let request = match validate_v2(text, &shared.config) {
        Ok(request) => request,
        Err(refusal) => return refusal.response(),
    };
    let expires = match expiration(text) {
        Ok(expires) => expires,
        Err(error) => return error.response(),
    };
    place(shared, pos, request, text, expires, AttendedApi::Instore);
    HttpResponse::NoContent().finish()
}

/// `expiration_date`: absent is MP's 10 minutes; otherwise an RFC 3339 date in the future.
fn expiration(text: &str) -> Result<DateTime<Utc>, MpError> {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let refuse = |why: &str| {
        MpError::new(
            400,
            &format!("Expiration date must be a valid and future date: {why}"),
            "invalid_expiration_date",
        )
    };
    match value.get("expiration_date") {
        None | Some(serde_json::Value::Null) => {
            Ok(Utc::now() + chrono::Duration::minutes(ATTENDED_TTL_MINUTES))
        }
        Some(serde_json::Value::String(date)) => match DateTime::parse_from_rfc3339(date) {
            Ok(date) if date.with_timezone(&Utc) > Utc::now() => Ok(date.with_timezone(&Utc)),
            Ok(_) => Err(refuse(&format!("{date} is past"))),
            Err(_) => Err(refuse(&format!("{date} is not RFC 3339"))),
        },
        Some(other) => Err(refuse(&format!("{other} is not a string"))),
    }
}

fn place_legacy(shared: &Shared, pos: &str, body: &[u8]) -> HttpResponse {
    if let Err(error) = check_registered(shared, None, pos) {
        return error.response();
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return mp_error(400, "the body is not UTF-8", "invalid_body");
    };
    let request = match validate_v1_like(text, &shared.config, Collector::Optional) {
        Ok(request) => request,
        Err(refusal) => return refusal.response(),
    };
    // The legacy body has no expiration: MP's 10 minutes.
    let expires = Utc::now() + chrono::Duration::minutes(ATTENDED_TTL_MINUTES);
    place(shared, pos, request, text, expires, AttendedApi::Legacy);
    json_response(StatusCode::OK, "{}".to_owned())
}

pub(super) fn place(
    shared: &Shared,
    pos: &str,
    request: OrderRequest,
    body: &str,
    expires: DateTime<Utc>,
    api: AttendedApi,
) {
    tracing::info!(pos, external_reference = %request.external_reference, ?api, "simulated attended order placed");
    // A new order replaces whatever was on the POS.
    shared.lock().attended.insert(
        pos.to_owned(),
        AttendedOrder {
            request,
            body: body.to_owned(),
            expires,
            api,
        },
    );
}

/// The order on the POS if it is one of these endpoints' and has not expired (an expired one is
/// dropped, as MP drops it).
fn current(state: &mut State, pos: &str) -> Option<AttendedOrder> {
    let placed = state.attended.get(pos)?.clone();
    if placed.expires <= Utc::now() {
        state.attended.remove(pos);
        return None;
    }
    match placed.api {
        AttendedApi::Orders(_) => None,
        AttendedApi::Instore | AttendedApi::Legacy => Some(placed),
    }
}

fn show(shared: &Shared, pos: &str) -> HttpResponse {
    match current(&mut shared.lock(), pos) {
        Some(placed) => json_response(StatusCode::OK, format!("[{}]", placed.body.trim())),
        None => no_order(pos),
    }
}

/// Either API's DELETE removes the order on the POS, whichever of the two placed it.
fn remove(shared: &Shared, pos: &str, api: &AttendedApi) -> HttpResponse {
    let mut state = shared.lock();
    if current(&mut state, pos).is_none() {
        return no_order(pos);
    }
    state.attended.remove(pos);
    tracing::info!(pos, ?api, "simulated attended order deleted");
    HttpResponse::NoContent().finish()
}

impl Simulator {
    /// MP dropped the order on this POS on its own; true when there was one.
    pub fn drop_attended_order(&self, external_pos_id: &str) -> bool {
        self.inner
            .shared
            .lock()
            .attended
            .remove(external_pos_id)
            .is_some()
    }

    /// Time passes: the order on this POS (of any API) reaches its expiration now; true when there
    /// was one.
    pub fn expire_attended_order(&self, external_pos_id: &str) -> bool {
        let order_id = {
            let mut state = self.inner.shared.lock();
            let Some(placed) = state.attended.get_mut(external_pos_id) else {
                return false;
            };
            placed.expires = Utc::now();
            match &placed.api {
                AttendedApi::Orders(id) => Some(id.clone()),
                AttendedApi::Instore | AttendedApi::Legacy => None,
            }
        };
        if let Some(id) = order_id {
            let _ = self.expire_order(&id);
        }
        true
    }

    /// When true, placing an attended order (any API) on a POS that is not registered answers 404
    /// `point_of_sale_not_found`, and the instore PUT's store must be the POS's (400 `invalid_store`).
    /// Off by default, so tests that do not register POS can place orders.
    pub fn set_require_registered_pos(&self, yes: bool) {
        self.inner.shared.lock().require_registered_pos = yes;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{dec, send, start, Pos};
    use super::*;
    use reqwest::Method;

    const PUT: &str = "/instore/qr/seller/collectors/178106235/stores/st01/pos/st01p03/orders";
    const ORDERS: &str = "/instore/qr/seller/collectors/178106235/pos/st01p03/orders";
    const LEGACY: &str = "/mpmobile/instore/qr/178106235/st01p03";

    fn instore_body(pos: &Pos) -> serde_json::Value {
        serde_json::json!({
            "external_reference": "st01-p03-000042",
            "title": "Snacks",
            "description": "Tray 4",
            "notification_url": pos.notify_url,
            "expiration_date": mp_time(Utc::now() + chrono::Duration::minutes(5)),
            "total_amount": 119.0,
            "items": [
                {"sku_number": "A123", "category": "FOOD", "title": "Snack", "description": "d",
                 "unit_price": 20, "quantity": 5, "unit_measure": "unit", "total_amount": 100,
                 "taxes": [{"type": "IVA", "value": 19}]},
                {"sku_number": "2", "category": "vending", "title": "Water",
                 "unit_price": 9.5, "quantity": 2, "unit_measure": "unit", "total_amount": 19}
            ],
            "sponsor": {"id": 446566691}
        })
    }

    fn legacy_body(pos: &Pos) -> serde_json::Value {
        serde_json::json!({
            "external_reference": "st01-p03-000043",
            "notification_url": pos.notify_url,
            "items": [{"title": "Super 95", "currency_id": "ARS", "unit_price": 25615.80,
                       "quantity": 1, "description": "Pump 3",
                       "taxes": [{"type": "IVA", "value": 21}]}],
            "sponsor_id": 446566691
        })
    }

    async fn put(sim: &Simulator, body: &serde_json::Value) -> (u16, serde_json::Value) {
        send(sim, Method::PUT, PUT, &body.to_string()).await
    }

    async fn order_of(sim: &Simulator) -> ScannedOrder {
        match sim.scan_attended("st01p03").await.unwrap() {
            Scan::Order(order) => order,
            other => panic!("expected an order, got {other:?}"),
        }
    }

    fn waits(scan: Scan) -> bool {
        matches!(
            scan,
            Scan::Waiting {
                http_status: 404,
                ..
            }
        )
    }

    #[tokio::test]
    async fn the_order_on_a_pos_is_shown_and_deleted_once() {
        let (sim, pos) = start().await;
        let (status, answer) = send(&sim, Method::GET, ORDERS, "").await;
        assert_eq!(status, 404);
        assert_eq!(answer["error"], "point_of_sale_in_store_order_not_found");
        assert_eq!(answer["status"], 404);

        let body = instore_body(&pos);
        let (status, answer) = put(&sim, &body).await;
        assert_eq!(status, 204, "{answer}");
        let (status, shown) = send(&sim, Method::GET, ORDERS, "").await;
        assert_eq!(status, 200);
        assert_eq!(shown, serde_json::json!([body]));
        assert_eq!(
            sim.attended_order("st01p03").unwrap()["items"][0]["taxes"],
            serde_json::json!([{"type": "IVA", "value": 19}])
        );
        assert_eq!(order_of(&sim).await.total_amount, dec("119"));

        assert_eq!(send(&sim, Method::DELETE, ORDERS, "").await.0, 204);
        let (status, answer) = send(&sim, Method::DELETE, ORDERS, "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (404, Some("point_of_sale_in_store_order_not_found"))
        );
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 404);
        assert!(waits(sim.scan_attended("st01p03").await.unwrap()));

        let foreign = "/instore/qr/seller/collectors/1/pos/st01p03/orders";
        assert_eq!(send(&sim, Method::GET, foreign, "").await.0, 403);
        assert_eq!(send(&sim, Method::DELETE, foreign, "").await.0, 403);
    }

    #[tokio::test]
    async fn an_approved_payment_takes_the_order_off_the_pos_and_a_rejected_one_leaves_it() {
        let (sim, pos) = start().await;
        assert_eq!(put(&sim, &instore_body(&pos)).await.0, 204);
        let order = order_of(&sim).await;
        sim.pay(order.merchant_order_id, PaymentOutcome::Rejected)
            .await
            .unwrap();
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 200);
        assert!(sim.attended_order("st01p03").is_some());
        // The customer retries on the same merchant order.
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        assert_eq!(
            sim.merchant_order(order.merchant_order_id).unwrap()["status"],
            "closed"
        );
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 404);
        assert!(waits(sim.scan_attended("st01p03").await.unwrap()));
        assert_eq!(send(&sim, Method::DELETE, ORDERS, "").await.0, 404);

        // A partial payment does not close it either.
        assert_eq!(put(&sim, &instore_body(&pos)).await.0, 204);
        let order = order_of(&sim).await;
        sim.pay(
            order.merchant_order_id,
            PaymentOutcome::ApprovedAmount(dec("100")),
        )
        .await
        .unwrap();
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 200);
    }

    #[tokio::test]
    async fn mp_may_drop_the_order_on_its_own() {
        let (sim, pos) = start().await;
        assert_eq!(put(&sim, &instore_body(&pos)).await.0, 204);
        assert!(sim.drop_attended_order("st01p03"));
        assert!(!sim.drop_attended_order("st01p03"));
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 404);
        assert!(waits(sim.scan_attended("st01p03").await.unwrap()));
    }

    #[tokio::test]
    async fn an_order_expires_after_its_date_or_mps_ten_minutes() {
        let (sim, pos) = start().await;
        let mut body = instore_body(&pos);
        body.as_object_mut().unwrap().remove("expiration_date");
        assert_eq!(put(&sim, &body).await.0, 204);
        let expires = sim.inner.shared.lock().attended["st01p03"].expires;
        let left = expires - Utc::now();
        assert!(
            left > chrono::Duration::minutes(9) && left <= chrono::Duration::minutes(10),
            "{left}"
        );
        // Time passes.
        assert!(sim.expire_attended_order("st01p03"));
        assert!(matches!(
            sim.scan_attended("st01p03").await.unwrap(),
            Scan::Waiting { kind, .. } if kind == "expired"
        ));
        assert_eq!(send(&sim, Method::GET, ORDERS, "").await.0, 404);
        assert_eq!(send(&sim, Method::DELETE, ORDERS, "").await.0, 404);
        assert!(!sim.expire_attended_order("st01p03"));

        for date in [
            serde_json::json!(mp_time(Utc::now() - chrono::Duration::seconds(5))),
            serde_json::json!("2026-11-23 16:34"),
            serde_json::json!(1_700_000_000),
        ] {
            body["expiration_date"] = date.clone();
            let (status, answer) = put(&sim, &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some("invalid_expiration_date")),
                "{date}"
            );
        }
        assert!(sim.attended_order("st01p03").is_none());
    }

    #[tokio::test]
    async fn the_instore_put_is_checked_like_mp() {
        let (sim, pos) = start().await;
        let valid = instore_body(&pos);
        let with = |pointer: &str, value: serde_json::Value| {
            let mut body = valid.clone();
            match value {
                serde_json::Value::Null => {
                    let (parent, key) = pointer.rsplit_once('/').unwrap();
                    let parent = if parent.is_empty() {
                        &mut body
                    } else {
                        body.pointer_mut(parent).unwrap()
                    };
                    parent.as_object_mut().unwrap().remove(key);
                }
                value => *body.pointer_mut(pointer).unwrap() = value,
            }
            body
        };
        let cases = [
            (
                with("/external_reference", serde_json::Value::Null),
                "invalid_external_reference",
            ),
            (
                with("/external_reference", "r".repeat(257).into()),
                "invalid_external_reference",
            ),
            (
                with("/notification_url", "ftp://x".into()),
                "invalid_notification_url",
            ),
            (
                with("/notification_url", serde_json::Value::Null),
                "invalid_notification_url",
            ),
            (with("/total_amount", 120.into()), "invalid_total_amount"),
            (with("/total_amount", "119".into()), "invalid_total_amount"),
            (
                with("/total_amount", serde_json::Value::Null),
                "invalid_total_amount",
            ),
            (
                with("/items/0/total_amount", 99.into()),
                "invalid_items.total_amount",
            ),
            (
                with("/items/0/unit_price", "20".into()),
                "invalid_items.unit_price",
            ),
            (
                with("/items/0/unit_price", 20.001.into()),
                "invalid_items.unit_price",
            ),
            (
                with("/items/0/quantity", 0.into()),
                "invalid_items.quantity",
            ),
            (
                with("/items/0/title", serde_json::Value::Null),
                "invalid_items.title",
            ),
            (with("/items/0/title", 7.into()), "invalid_items.title"),
            (
                with("/items/0/unit_measure", serde_json::Value::Null),
                "invalid_items.unit_measure",
            ),
            (
                with("/items/0/sku_number", 123.into()),
                "invalid_items.sku_number",
            ),
            (
                with("/items/0/taxes", serde_json::json!({"type": "IVA"})),
                "invalid_items.taxes",
            ),
            (
                with("/items/0/taxes/0/value", "19".into()),
                "invalid_items.taxes",
            ),
            (
                with("/items/0/taxes/0/type", 19.into()),
                "invalid_items.taxes",
            ),
            (with("/items", serde_json::json!([])), "invalid_items"),
            (
                with("/sponsor/id", "446566691".into()),
                "invalid_sponsor.id",
            ),
            (
                with("/sponsor", serde_json::json!({})),
                "invalid_sponsor.id",
            ),
            (with("/title", 1.into()), "invalid_title"),
        ];
        for (body, error) in cases {
            let (status, answer) = put(&sim, &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(error)),
                "{body}"
            );
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        assert!(sim.attended_order("st01p03").is_none());
        let (status, _) = send(&sim, Method::PUT, PUT, "not json").await;
        assert_eq!(status, 400);

        // Optional parts may be left out: sponsor, taxes, sku_number, category, description, title.
        let mut lean = with("/sponsor", serde_json::Value::Null);
        for key in ["title", "description", "expiration_date"] {
            lean.as_object_mut().unwrap().remove(key);
        }
        for item in lean["items"].as_array_mut().unwrap() {
            for key in ["taxes", "sku_number", "category", "description"] {
                item.as_object_mut().unwrap().remove(key);
            }
        }
        let (status, answer) = put(&sim, &lean).await;
        assert_eq!(status, 204, "{answer}");
        let foreign = "/instore/qr/seller/collectors/1/stores/st01/pos/st01p03/orders";
        assert_eq!(
            send(&sim, Method::PUT, foreign, &lean.to_string()).await.0,
            403
        );
    }

    #[tokio::test]
    async fn a_new_order_replaces_the_one_on_the_pos() {
        let (sim, pos) = start().await;
        assert_eq!(put(&sim, &instore_body(&pos)).await.0, 204);
        let mut second = instore_body(&pos);
        second["external_reference"] = "second".into();
        assert_eq!(put(&sim, &second).await.0, 204);
        assert_eq!(order_of(&sim).await.external_reference, "second");
    }

    #[tokio::test]
    async fn registered_pos_can_be_required() {
        let (sim, pos) = start().await;
        sim.set_require_registered_pos(true);
        let (status, answer) = put(&sim, &instore_body(&pos)).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (404, Some("point_of_sale_not_found"))
        );
        let (status, answer) =
            send(&sim, Method::POST, LEGACY, &legacy_body(&pos).to_string()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (404, Some("point_of_sale_not_found"))
        );
        let store = serde_json::json!({"name": "S", "external_id": "st01", "location": {
            "street_number": "1", "street_name": "A", "city_name": "B", "state_name": "C",
            "latitude": 0, "longitude": 0}});
        let other =
            serde_json::json!({"name": "S2", "external_id": "st02", "location": store["location"]});
        for body in [store, other] {
            assert_eq!(
                send(
                    &sim,
                    Method::POST,
                    "/users/178106235/stores",
                    &body.to_string()
                )
                .await
                .0,
                201
            );
        }
        let pos_body = serde_json::json!({"name": "P3", "fixed_amount": true, "category": 5499,
            "external_store_id": "st02", "external_id": "st01p03"});
        assert_eq!(
            send(&sim, Method::POST, "/pos", &pos_body.to_string())
                .await
                .0,
            201
        );
        let (status, answer) = put(&sim, &instore_body(&pos)).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_store"))
        );
        let path = PUT.replace("/stores/st01/", "/stores/st02/");
        assert_eq!(
            send(&sim, Method::PUT, &path, &instore_body(&pos).to_string())
                .await
                .0,
            204
        );
    }

    async fn post_legacy(sim: &Simulator, body: &serde_json::Value) -> (u16, serde_json::Value) {
        send(sim, Method::POST, LEGACY, &body.to_string()).await
    }

    #[tokio::test]
    async fn a_legacy_order_is_placed_scanned_and_paid_like_the_instore_one() {
        let (sim, pos) = start().await;
        let body = legacy_body(&pos);
        let (status, answer) = post_legacy(&sim, &body).await;
        assert_eq!((status, answer), (200, serde_json::json!({})));
        let (status, shown) = send(&sim, Method::GET, ORDERS, "").await;
        assert_eq!((status, shown), (200, serde_json::json!([body])));
        let order = order_of(&sim).await;
        assert_eq!(order.total_amount, dec("25615.80"));
        assert_eq!(order.external_reference, "st01-p03-000043");
        assert_eq!(order.notification_url, pos.notify_url);
        sim.set_notify_mode(NotifyMode::Ipn);
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        assert_eq!(pos.received().len(), 1);
        assert_eq!(send(&sim, Method::DELETE, LEGACY, "").await.0, 404);
    }

    #[tokio::test]
    async fn a_legacy_order_is_deleted_once_and_either_api_replaces_the_other() {
        let (sim, pos) = start().await;
        assert_eq!(post_legacy(&sim, &legacy_body(&pos)).await.0, 200);
        assert_eq!(send(&sim, Method::DELETE, LEGACY, "").await.0, 204);
        let (status, answer) = send(&sim, Method::DELETE, LEGACY, "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (404, Some("point_of_sale_in_store_order_not_found"))
        );

        assert_eq!(put(&sim, &instore_body(&pos)).await.0, 204);
        assert_eq!(post_legacy(&sim, &legacy_body(&pos)).await.0, 200);
        assert_eq!(order_of(&sim).await.external_reference, "st01-p03-000043");
        assert_eq!(send(&sim, Method::DELETE, ORDERS, "").await.0, 204);
        assert_eq!(send(&sim, Method::DELETE, LEGACY, "").await.0, 404);

        let foreign = "/mpmobile/instore/qr/1/st01p03";
        let body = legacy_body(&pos).to_string();
        assert_eq!(send(&sim, Method::POST, foreign, &body).await.0, 403);
        assert_eq!(send(&sim, Method::DELETE, foreign, "").await.0, 403);
    }

    #[tokio::test]
    async fn the_legacy_body_is_checked_like_the_v1_answer() {
        let (sim, pos) = start().await;
        let valid = legacy_body(&pos);
        let with = |pointer: &str, value: serde_json::Value| {
            let mut body = valid.clone();
            if value.is_null() {
                let (parent, key) = pointer.rsplit_once('/').unwrap();
                let parent = if parent.is_empty() {
                    &mut body
                } else {
                    body.pointer_mut(parent).unwrap()
                };
                parent.as_object_mut().unwrap().remove(key);
            } else if body.pointer(pointer).is_some() {
                *body.pointer_mut(pointer).unwrap() = value;
            } else {
                let key = pointer.trim_start_matches('/');
                body[key] = value;
            }
            body
        };
        let cases = [
            (
                with("/items/0/currency_id", "BRL".into()),
                "invalid_items.currency_id",
            ),
            (
                with("/items/0/unit_price", 10.123.into()),
                "invalid_items.unit_price",
            ),
            (
                with("/items/0/unit_price", 0.into()),
                "invalid_items.unit_price",
            ),
            (
                with("/items/0/quantity", 1.5.into()),
                "invalid_items.quantity",
            ),
            (
                with("/items/0/title", serde_json::Value::Null),
                "invalid_items.title",
            ),
            (with("/items/0/taxes", "IVA".into()), "invalid_items.taxes"),
            (with("/items", serde_json::json!([])), "invalid_items"),
            (
                with("/external_reference", serde_json::Value::Null),
                "invalid_external_reference",
            ),
            (
                with("/notification_url", "mp/notifications".into()),
                "invalid_notification_url",
            ),
            (with("/sponsor_id", "abc".into()), "invalid_sponsor_id"),
            (with("/collector_id", 999.into()), "invalid_collector_id"),
        ];
        for (body, error) in cases {
            let (status, answer) = post_legacy(&sim, &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(error)),
                "{body}"
            );
        }
        assert!(sim.attended_order("st01p03").is_none());
        // The path names the collector; the body may too.
        let named = with("/collector_id", 178_106_235.into());
        assert_eq!(post_legacy(&sim, &named).await.0, 200);
    }

    #[tokio::test]
    async fn colombian_pesos_are_whole_in_the_legacy_body() {
        let sim = Simulator::start(SimulatorConfig {
            site_currency: "COP".to_owned(),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let pos = Pos::spawn().await;
        let mut body = legacy_body(&pos);
        body["items"][0]["currency_id"] = "COP".into();
        body["items"][0]["unit_price"] = 12000.5.into();
        let (status, answer) = post_legacy(&sim, &body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_items.unit_price"))
        );
        body["items"][0]["unit_price"] = 12000.into();
        body["items"][0]["taxes"] = serde_json::json!([{"type": "IVA", "value": 19}]);
        assert_eq!(post_legacy(&sim, &body).await.0, 200);
        assert_eq!(
            sim.attended_order("st01p03").unwrap()["items"][0]["taxes"][0]["type"],
            "IVA"
        );
        assert_eq!(order_of(&sim).await.currency_id, "COP");
    }
}
