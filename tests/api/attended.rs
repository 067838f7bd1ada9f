//! The attended model's order desk against the Mercado Pago simulator: what
//! happens when Mercado Pago refuses, fails, drops or outlives an order.

use std::time::Duration;

use mpsim::{PaymentOutcome, Scan, SimulatorConfig};
use qrgate::orders::PosMode;

use crate::helpers::*;

const POS: &str = "vending-1";
const MP_POS: &str = "vending1";
const ORDERS: &str = "/instore/qr/seller/collectors/";

fn attended(c: &mut qrgate::config::Config) {
    let p = c.pos.iter_mut().find(|p| p.id.as_str() == POS).unwrap();
    p.mode = PosMode::Attended;
    p.store = Some("st01".into());
}

fn puts(app: &TestApp) -> Vec<u16> {
    app.mp
        .api_calls()
        .into_iter()
        .filter(|c| c.method == "PUT" && c.path.starts_with(ORDERS))
        .map(|c| c.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_4xx_rejects_the_sale_with_mercado_pagos_message_and_frees_the_pos() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    app.mp.fail_next(ORDERS, 400, 1);
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let rejected = state_of(&device, "1", "rejected").await;
    assert_eq!(rejected.reason.as_deref(), Some("mp_refused"));
    assert!(
        rejected.message().is_some_and(|m| !m.is_empty()),
        "{:?}",
        rejected.raw
    );
    let reference = rejected.external_reference.clone().unwrap();
    let timeline = app.timeline(&reference).await;
    assert!(timeline.iter().any(|e| e == "refused"), "{timeline:?}");
    assert!(!timeline.iter().any(|e| e == "placed"), "{timeline:?}");
    // Nothing to pay on the POS, and the POS takes the next sale.
    assert!(app.mp.attended_order(MP_POS).is_none());
    device
        .publish_sale("2", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "2", "pending").await;
    assert!(app.mp.attended_order(MP_POS).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_and_429s_are_retried_and_the_device_hears_pending_only_once_placed() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    app.mp.fail_next(ORDERS, 429, 1);
    app.mp.fail_next(ORDERS, 503, 10_000);
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    wait_for("a 429 and a 503 answered", || async {
        puts(&app).len() >= 2
    })
    .await;
    // The sale is stored, its order is not at Mercado Pago: the device has
    // heard nothing of it.
    let heard = device.drain();
    assert!(
        !heard.iter().any(|m| m.is_for("1") && m.state == "pending"),
        "{heard:?}"
    );
    app.mp.clear_failures();
    let pending = state_of(&device, "1", "pending").await;
    // Nobody scanned yet: not `served` (the device may still take cash).
    assert!(!pending.served);
    assert!(app.mp.attended_order(MP_POS).is_some());
    let statuses = puts(&app);
    assert!(
        statuses.iter().filter(|s| **s >= 429).count() >= 2,
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&204), "{statuses:?}");
    let reference = pending.external_reference.unwrap();
    let timeline = app.timeline(&reference).await;
    assert_eq!(
        timeline.iter().filter(|e| *e == "placed").count(),
        1,
        "{timeline:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_expires_with_the_sale_and_is_removed() {
    let app = TestApp::spawn_with(|c| {
        attended(c);
        c.pos[1].ttl_secs = Some(300);
    })
    .await;
    let device = app.device(POS).await;
    let before = chrono::Utc::now();
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let body = app.mp.attended_order(MP_POS).expect("placed");
    // MP drops the order when the sale expires: 300 s after it was accepted.
    let expiration = body["expiration_date"].as_str().unwrap().to_owned();
    let at = chrono::DateTime::parse_from_rfc3339(&expiration).unwrap();
    let ttl = chrono::Duration::seconds(300);
    assert!(
        at >= before + ttl - chrono::Duration::seconds(1) && at <= chrono::Utc::now() + ttl,
        "{expiration}"
    );
    app.clock.advance(Duration::from_secs(300));
    state_of(&device, "1", "expired").await;
    // qrgate takes it off itself rather than rely on MP's clock.
    let deletes = || {
        app.mp
            .api_calls()
            .into_iter()
            .filter(|c| c.method == "DELETE" && c.path.contains(&format!("/pos/{MP_POS}/orders")))
            .count()
    };
    wait_for("the expired sale's order removed", || async {
        deletes() > 0
    })
    .await;
    assert_eq!(deletes(), 1);
    assert!(app.mp.attended_order(MP_POS).is_none());
    assert!(pending.external_reference.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_for_a_removed_order_is_a_late_payment_owed_back() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "1", "pending").await;
    let Scan::Order(order) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    device.cancel("1").await.unwrap();
    state_of(&device, "1", "cancelled").await;
    wait_for("the order removed", || async {
        app.mp.attended_order(MP_POS).is_none()
    })
    .await;
    // The customer's app still had it open and pays anyway.
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.wait_event(&order.external_reference, "refund_due")
        .await;
    let timeline = app.timeline(&order.external_reference).await;
    assert!(!timeline.iter().any(|e| e == "paid"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_mercado_pago_dropped_is_placed_again_after_a_rejected_payment() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "1", "pending").await;
    let Scan::Order(order) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    // Mercado Pago loses the order on its side.
    let sim = SimulatorConfig::default();
    let r = reqwest::Client::new()
        .delete(format!(
            "{}{ORDERS}{}/pos/{MP_POS}/orders",
            app.mp.base_url(),
            sim.collector_id
        ))
        .bearer_auth(&sim.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(app.mp.attended_order(MP_POS).is_none());
    // The customer's payment is rejected; the retry needs the order back.
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Rejected)
        .await
        .unwrap();
    wait_for("the order placed again", || async {
        app.mp.attended_order(MP_POS).is_some()
    })
    .await;
    let Scan::Order(retry) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("the order is not back")
    };
    assert_eq!(retry.external_reference, order.external_reference);
    app.mp
        .pay(retry.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&device, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attended_pos_url_answers_invalid() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "1", "pending").await;
    let (status, body, _) = app.poll(POS).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid");
}

// ---- MP's Orders API -------------------------------------------------------

fn orders_api(c: &mut qrgate::config::Config) {
    attended(c);
    c.mercadopago.attended_api = qrgate::config::AttendedApi::Orders;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_api_create_retried_after_a_lost_answer_makes_one_order() {
    let app = TestApp::spawn_with(|c| {
        orders_api(c);
        c.mercadopago.timeout_ms = 300;
    })
    .await;
    let device = app.device(POS).await;
    // Mercado Pago creates the order but its answer is lost (too slow):
    // qrgate retries with the same idempotency key.
    app.mp
        .set_latency("/v1/orders", Duration::from_millis(1000));
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let creates = || calls(&app, "POST", "/v1/orders");
    // The first create's answer is lost: qrgate sends it again (the calls
    // are recorded as they arrive, before the simulator's delay).
    wait_for("the create sent again", || async { creates() >= 2 }).await;
    app.mp.set_latency("/v1/orders", Duration::ZERO);
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.unwrap();
    let creates = creates();
    assert!(creates >= 2, "the create was not retried: {creates}");
    let orders = app.mp.orders_api_orders_for(&reference);
    assert_eq!(orders.len(), 1, "{orders:?}");
    let on_pos = app
        .mp
        .order_on_pos(MP_POS)
        .expect("the order is on the POS");
    assert_eq!(on_pos["id"], orders[0]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_orders_api_sale_cancels_its_order() {
    let app = TestApp::spawn_with(orders_api).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.unwrap();
    let id = app.mp.order_on_pos(MP_POS).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    device.cancel("1").await.unwrap();
    state_of(&device, "1", "cancelled").await;
    wait_for("the order canceled", || async {
        app.mp.orders_api_order(&id).unwrap()["status"] == "canceled"
    })
    .await;
    assert!(app.mp.order_on_pos(MP_POS).is_none());
    assert_eq!(app.mp.orders_api_orders_for(&reference).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_orders_api_payment_is_refunded_through_the_order() {
    let app = TestApp::spawn_with(|c| {
        orders_api(c);
        c.orders.auto_refund = true;
    })
    .await;
    app.mp
        .set_orders_webhook_url(format!("{}/mp/notifications", app.base));
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "1", "pending").await;
    let Scan::Order(order) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    let id = order.order_id.clone().expect("an Orders API order");
    // The cancel does not reach Mercado Pago before the customer pays.
    app.mp
        .fail_next(&format!("/v1/orders/{id}/cancel"), 503, 10_000);
    device.cancel("1").await.unwrap();
    state_of(&device, "1", "cancelled").await;
    app.mp
        .pay_order(&id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.mp.clear_failures();
    app.wait_event(&order.external_reference, "refund_due")
        .await;
    app.wait_event(&order.external_reference, "refunded").await;
    let refunds = app.mp.order_refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].order_id, id);
    assert!(refunds[0].idempotency_key.starts_with("qrgate-refund-"));
    let timeline = app.timeline(&order.external_reference).await;
    assert!(!timeline.iter().any(|e| e == "paid"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_orders_api_notification_is_found_by_reconciliation() {
    let app = TestApp::spawn_with(|c| {
        orders_api(c);
        c.orders.reconcile_after_secs = 0;
    })
    .await;
    // No webhook url: Mercado Pago's notification never arrives.
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "1", "pending").await;
    let Scan::Order(order) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    let payment = app
        .mp
        .pay_order(order.order_id.as_deref().unwrap(), PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&device, "1", "paid").await;
    assert_eq!(paid.payment.as_deref(), Some(payment.as_str()));
    assert_eq!(paid.order_id, order.order_id);
    assert!(app
        .mp
        .api_calls()
        .iter()
        .any(|c| c.method == "GET" && c.path.starts_with("/v1/orders/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_taxes_sku_and_category_reach_mercado_pago_in_every_order_that_carries_them() {
    let items = [qrgate_devices::Item::new("Gaseosa", "2", "3000")
        .sku("GAS-05")
        .category("drinks")
        .tax("IVA", "19")];
    // Attended, instore API: the v2 body.
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    device.publish_sale("1", &items, None).await.unwrap();
    state_of(&device, "1", "pending").await;
    let body = app.mp.attended_order(MP_POS).unwrap();
    let item = &body["items"][0];
    assert_eq!(item["sku_number"], "GAS-05");
    assert_eq!(item["category"], "drinks");
    assert_eq!(item["taxes"][0]["type"], "IVA");
    assert_eq!(item["taxes"][0]["value"], 19);
    // Attended, legacy API.
    let app = TestApp::spawn_with(|c| {
        attended(c);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Legacy;
    })
    .await;
    let device = app.device(POS).await;
    device.publish_sale("1", &items, None).await.unwrap();
    state_of(&device, "1", "pending").await;
    let body = app.mp.attended_order(MP_POS).unwrap();
    assert_eq!(body["items"][0]["taxes"][0]["type"], "IVA");
    assert_eq!(body["items"][0]["currency_id"], "ARS");
    // Unattended v2: the poll answer; v1 ignores them.
    let app = TestApp::spawn_with(|c| {
        c.pos[1].mode = PosMode::Unattended(qrgate::orders::PollProtocol::V2);
    })
    .await;
    let device = app.device(POS).await;
    device.publish_sale("1", &items, None).await.unwrap();
    state_of(&device, "1", "pending").await;
    let Scan::Order(order) = app.mp.scan(&app.pos_url(POS)).await.unwrap() else {
        panic!("no order")
    };
    let v: serde_json::Value = serde_json::from_str(&order.raw_body).unwrap();
    assert_eq!(v["items"][0]["taxes"][0]["value"], 19);
    assert_eq!(v["items"][0]["sku_number"], "GAS-05");
    // Attended, Orders API.
    let app2 = TestApp::spawn_with(|c| {
        attended(c);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Orders;
    })
    .await;
    let device = app2.device(POS).await;
    device.publish_sale("1", &items, None).await.unwrap();
    state_of(&device, "1", "pending").await;
    let body = app2.mp.order_on_pos(MP_POS).unwrap();
    assert_eq!(body["items"][0]["taxes"][0]["type"], "IVA", "{body}");
    assert_eq!(body["items"][0]["external_code"], "GAS-05", "{body}");
    assert!(
        order.raw_body.contains(r#""total_amount":6000.00"#),
        "{}",
        order.raw_body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_not_yet_placed_when_qrgate_stops_is_placed_at_the_next_start() {
    let app = TestApp::spawn_with(attended).await;
    let device = app.device(POS).await;
    // Mercado Pago is down: the sale is stored, its order cannot be placed.
    app.mp.fail_next(ORDERS, 503, 10_000);
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    wait_for("a placement attempted", || async { !puts(&app).is_empty() }).await;
    let app = app.restart().await;
    app.mp.clear_failures();
    let pending = state_of(&device, "1", "pending").await;
    let body = app
        .mp
        .attended_order(MP_POS)
        .expect("placed after the restart");
    assert_eq!(
        body["external_reference"].as_str(),
        pending.external_reference.as_deref()
    );
}

// ---- orders Mercado Pago would expire before their sale ---------------------

/// A sale that never expires (`ttl_secs = 0`) on an attended POS whose
/// orders live `lifetime` seconds at Mercado Pago, placed again `lead`
/// seconds ahead.
fn never_expiring(c: &mut qrgate::config::Config, lifetime: u64, lead: u64) {
    attended(c);
    c.pos[1].ttl_secs = None;
    c.mercadopago.attended_order = qrgate::config::AttendedOrderLife {
        lifetime_secs: lifetime,
        renew_lead_secs: lead,
    };
    // Reconciliation stays out of the way: what these tests see is the
    // order desk's doing.
    c.orders.reconcile_after_secs = 3_600;
}

fn calls(app: &TestApp, method: &str, path: &str) -> usize {
    app.mp
        .api_calls()
        .iter()
        .filter(|c| c.method == method && c.path == path)
        .count()
}

fn instant(text: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// When an Orders API order stops being payable, from its own fields.
fn orders_api_expiry(order: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    let created = instant(order["created_date"].as_str().unwrap());
    let ttl = order["expiration_time"].as_str().unwrap();
    let secs: i64 = ttl
        .strip_prefix("PT")
        .and_then(|t| t.strip_suffix('S'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("expiration_time {ttl}"));
    created + chrono::Duration::seconds(secs)
}

/// The customer scans the POS until it is past `after`; every scan must find
/// an order (an order gone while the sale is pending is the bug).
async fn scan_after(app: &TestApp, after: chrono::DateTime<chrono::Utc>) -> mpsim::ScannedOrder {
    wait_for(format!("a scan past {after}"), || async {
        let now = chrono::Utc::now();
        match app.mp.scan_attended(MP_POS).await.unwrap() {
            Scan::Order(order) => (now > after).then_some(order),
            Scan::Waiting { kind, .. } => {
                panic!("the pending sale has nothing to pay at Mercado Pago: {kind}")
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instore_order_is_placed_again_before_it_expires_and_a_later_scan_pays_the_sale() {
    let app = TestApp::spawn_with(|c| never_expiring(c, 4, 3)).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.clone().unwrap();
    let first = app.mp.attended_order(MP_POS).expect("placed");
    // Mercado Pago is told when it may drop the order: the lifetime.
    let first_expiry = instant(first["expiration_date"].as_str().unwrap());
    assert!(
        first_expiry <= chrono::Utc::now() + chrono::Duration::seconds(4),
        "{first}"
    );
    // Past the first order's expiry the sale is still there to pay: its
    // order was placed again (same reference, a later expiry).
    let order = scan_after(&app, first_expiry).await;
    assert_eq!(order.external_reference, reference);
    let again = app.mp.attended_order(MP_POS).expect("on the POS");
    assert_eq!(again["external_reference"], reference.as_str());
    assert!(
        instant(again["expiration_date"].as_str().unwrap()) > first_expiry,
        "{again}"
    );
    assert!(puts(&app).len() >= 2, "{:?}", puts(&app));
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&device, "1", "paid").await;
    assert_eq!(paid.merchant_order, Some(order.merchant_order_id));
    assert!(puts(&app).iter().all(|s| *s == 204), "{:?}", puts(&app));
    let timeline = app.timeline(&reference).await;
    assert!(!timeline.iter().any(|e| e == "refused"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_api_order_is_replaced_before_it_expires_and_a_later_scan_pays_the_sale() {
    let app = TestApp::spawn_with(|c| {
        never_expiring(c, 6, 4);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Orders;
    })
    .await;
    app.mp
        .set_orders_webhook_url(format!("{}/mp/notifications", app.base));
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.clone().unwrap();
    let first = app.mp.order_on_pos(MP_POS).expect("created");
    let first_id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["expiration_time"], "PT6S", "{first}");
    let first_expiry = orders_api_expiry(&first);
    // Past the first order's expiry, the customer scans and pays (scanning
    // again if the order they saw was replaced in between, as they would).
    let paid_order = wait_for("an order paid", || async {
        let order = scan_after(&app, first_expiry).await;
        assert_eq!(order.external_reference, reference);
        let id = order.order_id.clone().expect("an Orders API order");
        app.mp
            .pay_order(&id, PaymentOutcome::Approved)
            .await
            .map(|_| id)
    })
    .await;
    let paid = state_of(&device, "1", "paid").await;
    assert_eq!(paid.order_id.as_deref(), Some(paid_order.as_str()));
    // A new order for the same sale each time, the old one cancelled: one
    // order at a time can be paid.
    assert_ne!(paid_order, first_id);
    assert_eq!(
        app.mp.orders_api_order(&first_id).unwrap()["status"],
        "canceled"
    );
    // Nothing else is left to pay for the sale.
    wait_for("no other order payable", || async {
        app.mp
            .orders_api_orders_for(&reference)
            .iter()
            .all(|o| o["status"] != "created")
    })
    .await;
    let timeline = app.timeline(&reference).await;
    assert!(!timeline.iter().any(|e| e == "refused"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instore_renewal_mercado_pago_refuses_ends_the_sale_with_mp_order_expired() {
    let app = TestApp::spawn_with(|c| never_expiring(c, 600, 60)).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.clone().unwrap();
    // Placed again 540 s after the first placement, when Mercado Pago refuses.
    app.mp.fail_next(ORDERS, 400, 1);
    app.clock.advance(Duration::from_secs(540));
    let rejected = state_of(&device, "1", "rejected").await;
    assert_eq!(rejected.reason.as_deref(), Some("mp_order_expired"));
    let message = rejected.message().unwrap_or_default().to_owned();
    assert!(message.starts_with("mp_order_expired"), "{message}");
    assert!(message.contains("Simulated failure"), "{message}");
    let statuses = puts(&app);
    assert_eq!(statuses.last(), Some(&400), "{statuses:?}");
    assert!(
        statuses[..statuses.len() - 1].iter().all(|s| *s == 204),
        "{statuses:?}"
    );
    let timeline = app.timeline(&reference).await;
    assert!(timeline.iter().any(|e| e == "refused"), "{timeline:?}");
    // The operator's console shows the sale rejected with the same reason.
    let sale = app
        .app_book
        .find_sale(&qrgate::orders::ExternalReference::parse(&reference).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sale.state, qrgate::orders::SaleState::Rejected);
    assert_eq!(sale.rejection.as_deref(), Some(message.as_str()));
    // The old order is taken off: nobody pays a sale that is over.
    wait_for("the old order removed", || async {
        app.mp.attended_order(MP_POS).is_none()
    })
    .await;
    // The POS takes the next sale.
    device
        .publish_sale("2", &snack("1000"), None)
        .await
        .unwrap();
    state_of(&device, "2", "pending").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_api_renewal_mercado_pago_refuses_ends_the_sale_and_cancels_the_old_order() {
    let app = TestApp::spawn_with(|c| {
        never_expiring(c, 600, 60);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Orders;
    })
    .await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.clone().unwrap();
    let first_id = app.mp.order_on_pos(MP_POS).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Replaced 540 s after the first order was created, when Mercado Pago
    // refuses.
    app.mp.fail_next("/v1/orders", 400, 1);
    app.clock.advance(Duration::from_secs(540));
    let rejected = state_of(&device, "1", "rejected").await;
    assert_eq!(rejected.reason.as_deref(), Some("mp_order_expired"));
    let message = rejected.message().unwrap_or_default().to_owned();
    assert!(message.starts_with("mp_order_expired"), "{message}");
    assert!(calls(&app, "POST", "/v1/orders") >= 2);
    // Nothing is left to pay for a sale that is over.
    assert_eq!(
        app.mp.orders_api_order(&first_id).unwrap()["status"],
        "canceled"
    );
    let orders = app.mp.orders_api_orders_for(&reference);
    assert!(
        orders.iter().all(|o| o["status"] == "canceled"),
        "{orders:?}"
    );
    let timeline = app.timeline(&reference).await;
    assert!(timeline.iter().any(|e| e == "refused"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_on_the_old_orders_api_order_while_the_new_one_is_created_pays_the_sale() {
    let app = TestApp::spawn_with(|c| {
        // Replaced 3 s after the first order was created.
        never_expiring(c, 60, 57);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Orders;
    })
    .await;
    // No webhook url: the payment's notification is lost.
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let reference = pending.external_reference.clone().unwrap();
    let Scan::Order(old) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    let old_id = old.order_id.clone().unwrap();
    // Mercado Pago creates the new order but answers slowly; meanwhile the
    // customer, who had the old one open, pays it.
    app.mp
        .set_latency("/v1/orders", Duration::from_millis(1500));
    wait_for("the new order created at Mercado Pago", || async {
        calls(&app, "POST", "/v1/orders") == 2
    })
    .await;
    app.mp
        .pay_order(&old_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&device, "1", "paid").await;
    assert_eq!(paid.order_id.as_deref(), Some(old_id.as_str()));
    // The new order, which nobody needs any more, is cancelled.
    wait_for("the new order cancelled", || async {
        app.mp
            .orders_api_orders_for(&reference)
            .iter()
            .all(|o| o["status"] != "created")
    })
    .await;
    app.mp.set_latency("/v1/orders", Duration::ZERO);
    let orders = app.mp.orders_api_orders_for(&reference);
    assert_eq!(orders.len(), 2, "{orders:?}");
    let timeline = app.timeline(&reference).await;
    assert_eq!(
        timeline.iter().filter(|e| *e == "paid").count(),
        1,
        "{timeline:?}"
    );
    assert!(!timeline.iter().any(|e| e == "refund_due"), "{timeline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_order_is_placed_again_within_mercado_pagos_ten_minutes() {
    // Legacy orders live Mercado Pago's 10 minutes: renewed 60 s ahead, the
    // order is placed again 540 s after it was first placed.
    let app = TestApp::spawn_with(|c| {
        never_expiring(c, 600, 60);
        c.mercadopago.attended_api = qrgate::config::AttendedApi::Legacy;
    })
    .await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let legacy = format!("/mpmobile/instore/qr/178106235/{MP_POS}");
    assert_eq!(calls(&app, "POST", &legacy), 1);
    app.clock.advance(Duration::from_secs(540));
    wait_for("the legacy order placed again", || async {
        calls(&app, "POST", &legacy) >= 2
    })
    .await;
    let Scan::Order(order) = app.mp.scan_attended(MP_POS).await.unwrap() else {
        panic!("no order on the POS")
    };
    assert_eq!(
        Some(order.external_reference.as_str()),
        pending.external_reference.as_deref()
    );
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&device, "1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_before_a_restart_is_still_placed_again_before_it_expires() {
    let app = TestApp::spawn_with(|c| never_expiring(c, 10, 3)).await;
    let device = app.device(POS).await;
    device
        .publish_sale("1", &snack("1000"), None)
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    let first = app.mp.attended_order(MP_POS).expect("placed");
    let first_expiry = instant(first["expiration_date"].as_str().unwrap());
    let app = app.restart_keeping_mercadopago().await;
    let order = scan_after(&app, first_expiry).await;
    assert_eq!(
        Some(order.external_reference.as_str()),
        pending.external_reference.as_deref()
    );
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&device, "1", "paid").await;
}
