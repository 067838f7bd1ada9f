//! Every payment accounted for, once: double charges on one merchant order, a
//! sale paid in parts, notifications answered during an outage, the
//! operator's refund of what a sale owes, and a payment nobody notified. On
//! Mosquitto and the simulator; the kill -9 cases are in crash.rs.

use std::time::Duration;

use mpsim::{NotifyMode, PaymentOutcome};
use qrgate::config::Config;
use qrgate_devices::Device;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::admin::{admin, get_json, post};
use crate::helpers::*;

struct Station {
    _broker: Mosquitto,
    app: TestApp,
    pump: Device,
}

/// qrgate on a Mosquitto of its own, with pump-1 connected.
async fn station(tweak: impl FnOnce(&mut Config)) -> Option<Station> {
    let broker = Mosquitto::start()?;
    let app = TestApp::spawn_on(Where::Port(broker.port), |c| {
        c.orders.auto_refund = true;
        c.orders.recheck_after_secs = vec![];
        tweak(c);
    })
    .await;
    let pump = app.device("pump-1").await;
    Some(Station {
        _broker: broker,
        app,
        pump,
    })
}

/// A pending sale of 100.00 on pump-1; its reference.
async fn sale_of_100(s: &Station) -> String {
    s.pump
        .publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&s.pump, "1", "pending")
        .await
        .external_reference
        .unwrap()
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// The sale as the admin API shows it.
async fn detail(app: &TestApp, reference: &str) -> Value {
    let (status, v) = get_json(&format!("{}/api/sales/{reference}", admin(app)), None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until the sale's ledger owes nothing and has refunded `total`.
async fn settled(app: &TestApp, reference: &str, total: &str) -> Value {
    wait_for(&format!("{reference} refunded {total} in all"), || async {
        let v = detail(app, reference).await;
        (v["ledger"]["refunded"] == total && v["ledger"]["owed"] == "0.00").then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_payment_on_the_merchant_order_that_paid_is_refunded_alone() {
    let Some(s) = station(|_| {}).await else {
        return;
    };
    let reference = sale_of_100(&s).await;
    let order = s.app.scan("pump-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    let first = s
        .app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&s.pump, "1", "paid").await;
    assert_eq!(paid.payment_id, Some(first));
    // The customer's app charges the same merchant order again.
    let second = s
        .app
        .mp
        .pay(
            order.merchant_order_id,
            PaymentOutcome::ApprovedAmount(d("100")),
        )
        .await
        .unwrap();
    let v = settled(&s.app, &reference, "100.00").await;
    let made = s.app.mp.refunds();
    assert_eq!(made.len(), 1, "one refund: {made:?}");
    assert_eq!(made[0].payment_id, second, "of the second payment");
    assert_eq!(made[0].amount, None, "in full");
    assert_eq!(
        made[0].idempotency_key.as_deref(),
        Some(format!("qrgate-refund-{second}").as_str())
    );
    assert_eq!(v["ledger"]["kept"], "100.00");
    assert_eq!(v["summary"]["state"], "paid");
    assert_eq!(
        v["summary"]["attention"], "paid_undelivered",
        "nothing owed; the device has not confirmed yet"
    );
    // The device heard nothing of the second payment.
    assert!(s.pump.drain().iter().all(|m| m.payment_id != Some(second)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_paid_sixty_and_forty_that_is_not_delivered_gets_both_back() {
    let Some(s) = station(|_| {}).await else {
        return;
    };
    let reference = sale_of_100(&s).await;
    let order = s.app.scan("pump-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    let sixty = s
        .app
        .mp
        .pay(
            order.merchant_order_id,
            PaymentOutcome::ApprovedAmount(d("60")),
        )
        .await
        .unwrap();
    s.app.wait_event(&reference, "payment_held").await;
    let forty = s
        .app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let paid = state_of(&s.pump, "1", "paid").await;
    assert_eq!(
        paid.payment_id,
        Some(forty),
        "the payment that reached the total"
    );
    s.pump
        .delivered("1", false, Some("nozzle jammed"))
        .await
        .unwrap();
    let v = settled(&s.app, &reference, "100.00").await;
    let mut made: Vec<(u64, Option<Decimal>, Option<String>)> = s
        .app
        .mp
        .refunds()
        .into_iter()
        .map(|r| (r.payment_id, r.amount, r.idempotency_key))
        .collect();
    made.sort();
    assert_eq!(
        made,
        [
            (sixty, None, Some(format!("qrgate-refund-{sixty}"))),
            (forty, None, Some(format!("qrgate-refund-{forty}"))),
        ],
        "two refunds, each a whole payment"
    );
    let payments = v["ledger"]["payments"].as_array().unwrap();
    assert!(payments.iter().all(|p| p["refunded"] == p["amount"]), "{v}");
    assert_eq!(v["summary"]["attention"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_merchant_order_notified_during_an_outage_is_refunded_afterwards() {
    let Some(s) = station(|c| c.orders.notification_retry_max_secs = 60).await else {
        return;
    };
    let reference = sale_of_100(&s).await;
    // Two phones scanned the same QR.
    let first = s.app.scan("pump-1").await;
    let second = s.app.scan("pump-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    s.app
        .mp
        .pay(first.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&s.pump, "1", "paid").await;
    let path = format!("/merchant_orders/{}", second.merchant_order_id);
    s.app.mp.fail_next(&path, 500, 100_000);
    let sent = s.app.mp.notifications_sent().len();
    let late = s
        .app
        .mp
        .pay(second.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    // More failed fetches than the five tries the notification used to get;
    // each retry comes at most a minute after the last.
    wait_for("six failed fetches", || async {
        s.app.clock.advance(Duration::from_secs(60));
        let failed = s
            .app
            .mp
            .api_calls()
            .iter()
            .filter(|c| c.path == path && c.status == 500)
            .count();
        failed >= 6
    })
    .await;
    assert!(s.app.mp.refunds().is_empty());
    s.app.mp.clear_failures();
    s.app.clock.advance(Duration::from_secs(60));
    settled(&s.app, &reference, "100.00").await;
    let made = s.app.mp.refunds();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].payment_id, late);
    assert_eq!(
        s.app.mp.notifications_sent().len(),
        sent + 1,
        "no second notification was needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_refund_the_operator_refunds_what_a_sale_owes_and_attention_clears() {
    let Some(s) = station(|c| c.orders.auto_refund = false).await else {
        return;
    };
    let reference = sale_of_100(&s).await;
    let order = s.app.scan("pump-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    let payment = s
        .app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&s.pump, "1", "paid").await;
    s.pump
        .delivered("1", false, Some("dispenser empty"))
        .await
        .unwrap();
    s.app.wait_event(&reference, "delivered").await;
    let base = admin(&s.app);
    let v = detail(&s.app, &reference).await;
    assert_eq!(v["summary"]["attention"], "refund_due", "{v}");
    assert_eq!(v["owed"], "100.00");
    assert_eq!(v["refundable"], Value::Null, "nothing kept to refund");
    let (_, owing) = get_json(&format!("{base}/api/sales?attention=refund_due"), None).await;
    assert_eq!(owing["sales"][0]["external_reference"], reference.as_str());
    let (_, pos) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(pos["counts"]["refund_due"], 1);
    assert!(s.app.mp.refunds().is_empty(), "left to the operator");

    let url = format!("{base}/api/sales/{reference}/refund");
    let (status, answer) = post(&url, None, Some("owed-1"), "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["owed"], "0.00");
    assert_eq!(answer["state"], "paid", "refund_due is not a state");
    let made = s.app.mp.refunds();
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].payment_id, payment);
    assert_eq!(made[0].amount, None);
    assert_eq!(
        made[0].idempotency_key.as_deref(),
        Some(format!("qrgate-refund-{payment}").as_str())
    );
    let v = detail(&s.app, &reference).await;
    assert_eq!(v["summary"]["attention"], Value::Null, "{v}");
    let (_, pos) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(pos["counts"]["refund_due"], 0);
    // Pressed again: nothing is owed, nothing is sent.
    let (status, again) = post(&url, None, Some("owed-2"), "").await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(s.app.mp.refunds().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_sale_is_searched_again_and_a_payment_nobody_notified_is_refunded() {
    let Some(s) = station(|c| c.orders.recheck_after_secs = vec![600]).await else {
        return;
    };
    let reference = sale_of_100(&s).await;
    let first = s.app.scan("pump-1").await;
    let second = s.app.scan("pump-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    s.app
        .mp
        .pay(first.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&s.pump, "1", "paid").await;
    // The second phone pays later, and Mercado Pago tells nobody.
    s.app.mp.set_notify_mode(NotifyMode::None);
    let unnotified = s
        .app
        .mp
        .pay(second.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    // Ten minutes after the sale was paid it is searched again.
    s.app.clock.advance(Duration::from_secs(600));
    settled(&s.app, &reference, "100.00").await;
    let made = s.app.mp.refunds();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].payment_id, unnotified);
    let searched = s
        .app
        .mp
        .api_calls()
        .iter()
        .filter(|c| c.path.starts_with("/merchant_orders/search"))
        .count();
    assert!(searched >= 1, "found by searching the paid sale again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pos_slow_merchant_orders_do_not_hold_up_another_pos_notification() {
    // Mercado Pago is given all the time it takes: slowness is not failure.
    let Some(s) = station(|c| c.mercadopago.timeout_ms = 60_000).await else {
        return;
    };
    sale_of_100(&s).await;
    // Many phones scanned pump-1, and Mercado Pago is slow on every one of
    // those merchant orders: more of them than the fetches that start together.
    let mut slow = Vec::new();
    for _ in 0..24 {
        let order = s.app.scan("pump-1").await;
        let path = format!("/merchant_orders/{}", order.merchant_order_id);
        s.app.mp.set_latency(&path, Duration::from_secs(60));
        slow.push((order.merchant_order_id, path));
    }
    for (id, _) in &slow {
        s.app.mp.notify_merchant_order(*id).await.unwrap();
    }
    wait_for("every slow fetch under way", || async {
        let calls = s.app.mp.api_calls();
        slow.iter()
            .all(|(_, path)| calls.iter().any(|c| &c.path == path))
    })
    .await;
    // Another POS's customer pays: its notification is not queued behind them.
    let vending = s.app.device("vending-1").await;
    vending
        .publish_sale("v1", &snack("300"), None)
        .await
        .unwrap();
    state_of(&vending, "v1", "pending").await;
    let order = s.app.scan("vending-1").await;
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    s.app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&vending, "v1", "paid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_order_mercado_pago_answers_404_for_at_first_is_fetched_until_it_knows_it() {
    let Some(s) = station(|c| c.orders.notification_retry_max_secs = 60).await else {
        return;
    };
    sale_of_100(&s).await;
    let order = s.app.scan("pump-1").await;
    let path = format!("/merchant_orders/{}", order.merchant_order_id);
    s.app.mp.fail_next(&path, 404, 3);
    s.app.mp.set_notify_mode(NotifyMode::Ipn);
    s.app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    // Each retry comes at most a minute after the last.
    wait_for("the merchant order fetched whole", || async {
        s.app.clock.advance(Duration::from_secs(60));
        s.app
            .mp
            .api_calls()
            .iter()
            .any(|c| c.path == path && c.status == 200)
    })
    .await;
    state_of(&s.pump, "1", "paid").await;
    let not_found = s
        .app
        .mp
        .api_calls()
        .iter()
        .filter(|c| c.path == path && c.status == 404)
        .count();
    assert_eq!(not_found, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_that_only_ever_gets_404_is_given_up_after_the_reconcile_window() {
    let Some(s) = station(|c| {
        c.orders.reconcile_after_secs = 0;
        c.orders.reconcile_window_secs = 86_400;
    })
    .await
    else {
        return;
    };
    let r = reqwest::Client::new()
        .post(format!(
            "{}/mp/notifications?topic=merchant_order&id=4242424242",
            s.app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The first fetch got its 404 and the entry waits for the next.
    wait_for("the first 404 noted", || async {
        let pending = s.app.app_book.store().inbox_pending().await.ok()?;
        pending
            .iter()
            .any(|e| e.id == "4242424242" && e.attempts >= 1)
            .then_some(())
    })
    .await;
    // A day later, past the reconcile window, the next 404 gives it up.
    s.app.clock.advance(Duration::from_secs(86_400));
    let metrics = format!("{}/metrics", admin(&s.app));
    wait_for("the notification given up", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .any(|l| l.starts_with("qrgate_notifications_total{result=\"abandoned\"} 1"))
            .then_some(())
    })
    .await;
    let tries = s
        .app
        .mp
        .api_calls()
        .iter()
        .filter(|c| c.path == "/merchant_orders/4242424242")
        .count();
    assert!(tries >= 2, "fetched again before giving up: {tries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_reads_every_page_of_mercado_pagos_search() {
    let Some(s) = station(|c| c.orders.reconcile_after_secs = 0).await else {
        return;
    };
    sale_of_100(&s).await;
    // More scans than one page of the search holds; the last one is paid,
    // and Mercado Pago tells nobody.
    let mut last = None;
    for _ in 0..35 {
        last = Some(s.app.scan("pump-1").await);
    }
    s.app.mp.set_notify_mode(NotifyMode::None);
    s.app
        .mp
        .pay(last.unwrap().merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&s.pump, "1", "paid").await;
    assert!(s
        .app
        .mp
        .api_calls()
        .iter()
        .any(|c| c.path.starts_with("/merchant_orders/search") && c.path.contains("offset=")));
}
