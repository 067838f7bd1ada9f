//! Notifications: both shapes, duplicates, disorder, and everything that must
//! close nothing (docs/mercadopago.md, "Notifications").

use mpsim::{NotifyMode, PaymentOutcome};
use serde_json::json;

use crate::helpers::*;

/// A pending sale on vending-1 and its external reference.
async fn pending_sale(
    app: &TestApp,
    sale_id: &str,
    price: &str,
) -> (qrgate_devices::Device, String) {
    let vending = app.device("vending-1").await;
    vending
        .publish_sale(sale_id, &snack(price), None)
        .await
        .unwrap();
    let s = state_of(&vending, sale_id, "pending").await;
    (vending, s.external_reference.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_webhook_alone_closes_the_sale() {
    let app = TestApp::spawn().await;
    let (vending, reference) = pending_sale(&app, "1", "100").await;
    let order = app.scan("vending-1").await;
    app.mp.set_notify_mode(NotifyMode::Webhook);
    let payment = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&vending, "1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert_eq!(app.timeline(&reference).await.last().unwrap(), "paid");
    let fetched: Vec<_> = app.mp.api_calls().into_iter().map(|c| c.path).collect();
    assert!(
        fetched
            .iter()
            .any(|p| p == &format!("/v1/payments/{payment}")),
        "{fetched:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dozens_of_concurrent_duplicates_give_one_paid() {
    // No timed repeat of the undelivered paid: every paid of sale 1 after
    // the first would be the duplicates' doing.
    let app = TestApp::spawn_with(|c| c.orders.paid_republish_secs = 3_600).await;
    let (vending, reference) = pending_sale(&app, "1", "100").await;
    let order = app.scan("vending-1").await;
    app.mp.set_notify_mode(NotifyMode::Duplicated(20));
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
    // Every state message heard from here on is kept (waiting for sale 2's
    // would skip the others).
    let heard = std::sync::Mutex::new(Vec::new());
    let hear = |sale: &str, state: &str, m: &qrgate_devices::StateMessage| {
        heard.lock().unwrap().push(m.clone());
        m.is_for(sale) && m.state == state
    };
    // Late re-sends, hours later as far as qrgate can tell.
    for _ in 0..5 {
        assert_eq!(
            app.mp
                .notify_merchant_order(order.merchant_order_id)
                .await
                .unwrap(),
            200
        );
    }
    let payment = app.mp.merchant_order(order.merchant_order_id).unwrap()["payments"][0]["id"]
        .as_u64()
        .unwrap();
    app.mp.notify_payment(payment).await.unwrap();
    // A second sale is processed after the duplicates: when it is paid, the
    // duplicates before it are done.
    vending.publish_sale("2", &snack("5"), None).await.unwrap();
    vending
        .wait_state(WAIT, |m| hear("2", "pending", m))
        .await
        .unwrap();
    let second = app.scan("vending-1").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(second.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    vending
        .wait_state(WAIT, |m| hear("2", "paid", m))
        .await
        .unwrap();
    let paid_events = app
        .timeline(&reference)
        .await
        .into_iter()
        .filter(|e| e == "paid")
        .count();
    assert_eq!(paid_events, 1);
    let paid_messages = heard
        .into_inner()
        .unwrap()
        .into_iter()
        .chain(vending.drain())
        .filter(|m| m.sale_id.as_deref() == Some("1") && m.state == "paid")
        .count();
    assert_eq!(paid_messages, 0, "no paid republished for duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_notification_after_the_close_changes_nothing_and_one_before_proves_nothing() {
    let app = TestApp::spawn().await;
    app.mp.set_notify_on_open(true);
    let (vending, reference) = pending_sale(&app, "1", "100").await;
    let order = app.scan("vending-1").await;
    // The "opened" notification sent on scan is processed and refused.
    assert_eq!(
        app.wait_merchant_order_seen(order.merchant_order_id).await,
        "opened"
    );
    assert_eq!(app.poll_kind("vending-1").await, "ok");
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "1", "paid").await;
    // Out of order: a stale "opened" merchant order for the same sale.
    let stale = app.mp.insert_merchant_order(json!({
        "status": "opened", "external_reference": reference, "collector": {"id": 178106235},
        "total_amount": 100, "paid_amount": 0, "payments": [],
        "notification_url": format!("{}/mp/notifications", app.base)
    }));
    app.mp.notify_merchant_order(stale).await.unwrap();
    app.wait_merchant_order_seen(stale).await;
    assert_eq!(
        app.timeline(&reference).await,
        ["accepted", "served", "paid"]
    );
}

/// Inserts a merchant order, notifies it, waits until qrgate processed it,
/// and checks the sale is still pending.
async fn refused(
    app: &TestApp,
    vending: &qrgate_devices::Device,
    reference: &str,
    mut mo: serde_json::Value,
) {
    mo["notification_url"] = json!(format!("{}/mp/notifications", app.base));
    let id = app.mp.insert_merchant_order(mo);
    app.mp.notify_merchant_order(id).await.unwrap();
    app.wait_merchant_order_seen(id).await;
    assert_eq!(app.poll_kind("vending-1").await, "ok");
    assert!(!app.timeline(reference).await.contains(&"paid".to_owned()));
    assert!(vending.drain().iter().all(|m| m.state != "paid"));
}

/// A closed merchant order with one payment, of an id of its own (Mercado
/// Pago never reports one payment in two merchant orders).
fn closed(
    reference: &str,
    collector: u64,
    amount: &str,
    currency: &str,
    status: &str,
) -> serde_json::Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(90_000_000_900);
    let payment = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    json!({
        "status": "closed", "external_reference": reference, "collector": {"id": collector},
        "total_amount": amount.parse::<f64>().unwrap(), "order_status": "paid",
        "payments": [{ "id": payment, "transaction_amount": serde_json::Value::String(amount.into()),
                       "currency_id": currency, "status": status }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_amounts_foreign_references_foreign_collectors_and_other_currencies_close_nothing() {
    let app = TestApp::spawn().await;
    let (vending, reference) = pending_sale(&app, "1", "100").await;
    refused(
        &app,
        &vending,
        &reference,
        closed(&reference, 178106235, "99.99", "ARS", "approved"),
    )
    .await;
    refused(
        &app,
        &vending,
        &reference,
        closed("someone-elses-sale", 178106235, "100", "ARS", "approved"),
    )
    .await;
    refused(
        &app,
        &vending,
        &reference,
        closed(&reference, 999, "100", "ARS", "approved"),
    )
    .await;
    refused(
        &app,
        &vending,
        &reference,
        closed(&reference, 178106235, "100", "BRL", "approved"),
    )
    .await;
    refused(
        &app,
        &vending,
        &reference,
        closed(&reference, 178106235, "100", "ARS", "rejected"),
    )
    .await;
    let mut opened = closed(&reference, 178106235, "100", "ARS", "approved");
    opened["status"] = json!("opened");
    refused(&app, &vending, &reference, opened).await;

    // More than the total closes it (an overpayment, logged).
    let mut over = closed(&reference, 178106235, "100.50", "ARS", "approved");
    over["notification_url"] = json!(format!("{}/mp/notifications", app.base));
    let id = app.mp.insert_merchant_order(over);
    app.mp.notify_merchant_order(id).await.unwrap();
    let paid = state_of(&vending, "1", "paid").await;
    assert_eq!(paid.merchant_order, Some(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_after_cancel_is_refund_due_and_the_device_is_not_told_to_dispense() {
    let app = TestApp::spawn().await;
    let (vending, reference) = pending_sale(&app, "1", "100").await;
    let order = app.scan("vending-1").await;
    vending.cancel("1").await.unwrap();
    state_of(&vending, "1", "cancelled").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    app.wait_merchant_order_seen(order.merchant_order_id).await;
    app.wait_event(&reference, "refund_due").await;
    assert!(vending.drain().iter().all(|m| m.state != "paid"));
    assert_eq!(app.poll_kind("vending-1").await, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_at_once_refuses_garbage_and_caps_bodies() {
    let app = TestApp::spawn().await;
    let url = format!("{}/mp/notifications", app.base);
    // An id Mercado Pago does not know: answered 200 at once, the failed
    // fetch is logged after.
    assert_eq!(
        app.mp
            .post_notification(&url, "topic=merchant_order&id=123", "")
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        app.mp
            .post_notification(&url, "topic=chargebacks&id=1", "")
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        app.mp
            .post_notification(&url, "topic=merchant_order&id=abc", "")
            .await
            .unwrap(),
        400
    );
    assert_eq!(
        app.mp.post_notification(&url, "", "{broken").await.unwrap(),
        400
    );
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(64 * 1024));
    assert_eq!(
        app.mp
            .post_notification(&url, "topic=merchant_order&id=1", &big)
            .await
            .unwrap(),
        413
    );
}
