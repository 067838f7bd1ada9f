//! Mercado Pago's go-live checklist (docs/mercadopago.md) run once per
//! dialect qrgate speaks: the v1 and v2 poll answers, and the attended model
//! through the instore and the legacy APIs. The device does the same in
//! every dialect; only how Mercado Pago gets the order differs.
//!
//! Item 6 (refund from the POS side) is the operator's refund, through the
//! console's admin API.

use mpsim::{NotifyMode, PaymentOutcome, Scan, ScannedOrder};
use qrgate::config::{AttendedApi, Config};
use qrgate::orders::{MpId, PollProtocol, PosMode};
use qrgate_devices::Device;

use crate::helpers::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dialect {
    V1,
    V2,
    Instore,
    Legacy,
    /// MP's Orders API: its orders, payments and notifications, no merchant
    /// orders.
    Orders,
}

const POS: &str = "vending-1";
const MP_POS: &str = "vending1";
const STORE: &str = "st01";

fn configure(c: &mut Config, d: Dialect) {
    let p = c.pos.iter_mut().find(|p| p.id.as_str() == POS).unwrap();
    match d {
        Dialect::V1 => {}
        Dialect::V2 => p.mode = PosMode::Unattended(PollProtocol::V2),
        Dialect::Instore | Dialect::Legacy | Dialect::Orders => {
            p.mode = PosMode::Attended;
            p.store = Some(STORE.into());
        }
    }
    match d {
        Dialect::Legacy => c.mercadopago.attended_api = AttendedApi::Legacy,
        Dialect::Orders => c.mercadopago.attended_api = AttendedApi::Orders,
        _ => {}
    }
}

fn attended(d: Dialect) -> bool {
    matches!(d, Dialect::Instore | Dialect::Legacy | Dialect::Orders)
}

/// The customer pays what the scan showed them.
async fn pay(app: &TestApp, d: Dialect, order: &ScannedOrder, outcome: PaymentOutcome) -> String {
    if d == Dialect::Orders {
        let id = order.order_id.as_deref().expect("an Orders API order");
        app.mp.pay_order(id, outcome).await.unwrap()
    } else {
        app.mp
            .pay(order.merchant_order_id, outcome)
            .await
            .unwrap()
            .to_string()
    }
}

/// qrgate fetched and stored what was paid (merchant order or order).
async fn wait_seen(app: &TestApp, d: Dialect, order: &ScannedOrder) {
    let id = match (d, &order.order_id) {
        (Dialect::Orders, Some(id)) => MpId::Text(id.clone()),
        _ => MpId::Num(order.merchant_order_id),
    };
    wait_for(format!("{d:?}: {id} fetched"), || async {
        app.app_book
            .store()
            .merchant_order(&id)
            .await
            .unwrap()
            .is_some()
    })
    .await;
}

/// One scan as the customer's app makes it in this dialect.
async fn scan(app: &TestApp, d: Dialect) -> Scan {
    if attended(d) {
        app.mp.scan_attended(MP_POS).await.unwrap()
    } else {
        app.mp.scan(&app.pos_url(POS)).await.unwrap()
    }
}

async fn scan_order(app: &TestApp, d: Dialect) -> ScannedOrder {
    match scan(app, d).await {
        Scan::Order(o) => o,
        Scan::Waiting { kind, .. } => panic!("{d:?}: scan got a wait screen: {kind}"),
    }
}

/// What the app shows when there is nothing to pay, per dialect.
fn waits(d: Dialect, s: &Scan) -> bool {
    match (d, s) {
        (
            Dialect::V1,
            Scan::Waiting {
                http_status, kind, ..
            },
        ) => *http_status == 400 && kind == "unavailable",
        (
            Dialect::V2,
            Scan::Waiting {
                http_status, kind, ..
            },
        ) => *http_status == 202 && kind == "Waiting_for_order",
        // No order on the POS: the simulator's own "nothing here".
        (_, Scan::Waiting { http_status, .. }) => *http_status == 404,
        _ => false,
    }
}

async fn wait_nothing_to_pay(app: &TestApp, d: Dialect) {
    wait_for(format!("{d:?}: scans waiting again"), || async {
        let s = scan(app, d).await;
        if waits(d, &s) {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await
}

async fn checklist(d: Dialect) {
    let app = TestApp::spawn_with(|c| configure(c, d)).await;
    app.mp.set_notify_mode(NotifyMode::Both);
    // The Orders API notifies the application's webhook, not the order's.
    app.mp
        .set_orders_webhook_url(format!("{}/mp/notifications", app.base));
    let device: Device = app.device(POS).await;

    // 1. Scan before the sale exists: the app waits.
    let first = scan(&app, d).await;
    assert!(waits(d, &first), "{d:?}: {first:?}");

    // 2. The amount shown is the sale's amount.
    device
        .publish_sale(
            "1",
            &[
                qrgate_devices::Item::new("Cola", "2", "1500.50"),
                qrgate_devices::Item::new("Chips", "1", "800"),
            ],
            None,
        )
        .await
        .unwrap();
    let pending = state_of(&device, "1", "pending").await;
    if attended(d) {
        // The order is at Mercado Pago before the device hears `pending`.
        let placed = app.mp.attended_order(MP_POS);
        assert!(
            placed.is_some(),
            "{d:?}: pending before the order was placed"
        );
    }
    let order = scan_order(&app, d).await;
    assert_eq!(order.total_amount.to_string(), "3801.00", "{d:?}");
    assert_eq!(
        Some(order.external_reference.clone()),
        pending.external_reference,
        "{d:?}"
    );
    if d != Dialect::Orders {
        assert_eq!(
            order.notification_url,
            format!("{}/mp/notifications", app.base)
        );
    }

    // 4. A rejected payment: nothing closes, the sale stays payable.
    pay(&app, d, &order, PaymentOutcome::Rejected).await;
    wait_seen(&app, d, &order).await;
    let reference = order.external_reference.clone();
    assert!(
        !app.timeline(&reference).await.iter().any(|e| e == "paid"),
        "{d:?}: a rejected payment closed the sale"
    );

    // 5. A second attempt succeeds on the same sale.
    let retry = scan_order(&app, d).await;
    assert_eq!(retry.external_reference, reference, "{d:?}");
    if d == Dialect::Orders {
        // The same order, still `created`, takes the second attempt.
        assert_eq!(retry.order_id, order.order_id);
    } else {
        assert_ne!(retry.merchant_order_id, order.merchant_order_id);
    }
    // 3. Approved: the sale closes and the device is told.
    let payment = pay(&app, d, &retry, PaymentOutcome::Approved).await;
    let paid = state_of(&device, "1", "paid").await;
    assert_eq!(paid.payment.as_deref(), Some(payment.as_str()), "{d:?}");
    if d == Dialect::Orders {
        assert_eq!(paid.order_id, retry.order_id, "{d:?}");
        assert_eq!(paid.merchant_order, None);
    } else {
        assert_eq!(paid.merchant_order, Some(retry.merchant_order_id));
    }
    assert_eq!(paid.amount.as_deref(), Some("3801.00"));
    device.delivered("1", true, None).await.unwrap();
    app.wait_event(&reference, "delivered").await;

    // 6. Refund of the paid sale from the POS side (the operator's console).
    let admin = app.admin.clone().expect("the console listens");
    let r = reqwest::Client::new()
        .post(format!("{admin}/api/sales/{reference}/refund"))
        .header("Idempotency-Key", format!("checklist-{d:?}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{d:?}: {v}");
    assert_eq!(v["state"], "refunded", "{d:?}: {v}");
    let refunded = state_of(&device, "1", "refunded").await;
    assert_eq!(refunded.raw["refunded_total"], "3801.00", "{d:?}");
    if d == Dialect::Orders {
        let refunds = app.mp.order_refunds();
        assert_eq!(refunds.len(), 1, "{refunds:?}");
        assert_eq!(Some(refunds[0].order_id.clone()), retry.order_id);
    } else {
        let refunds = app.mp.refunds();
        assert_eq!(refunds.len(), 1, "{refunds:?}");
        assert_eq!(refunds[0].payment_id.to_string(), payment);
    }
    // The sale is final: later scans wait again (v2 says there is nothing
    // left to pay until the next sale).
    if d == Dialect::V2 {
        match scan(&app, d).await {
            Scan::Waiting {
                http_status: 202,
                kind,
                ..
            } => assert_eq!(kind, "notihing_to_pay"),
            other => panic!("v2 after payment: {other:?}"),
        }
    } else {
        wait_nothing_to_pay(&app, d).await;
    }

    // 7. A sale cancelled (the customer paid cash): later scans wait again.
    device.publish_sale("2", &snack("900"), None).await.unwrap();
    state_of(&device, "2", "pending").await;
    scan_order(&app, d).await;
    device.cancel("2").await.unwrap();
    state_of(&device, "2", "cancelled").await;
    wait_nothing_to_pay(&app, d).await;
    if attended(d) {
        assert!(
            app.mp.attended_order(MP_POS).is_none(),
            "{d:?}: the cancelled sale's order is still on the POS"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_live_checklist_v1() {
    checklist(Dialect::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_live_checklist_v2() {
    checklist(Dialect::V2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_live_checklist_attended_instore() {
    checklist(Dialect::Instore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_live_checklist_attended_legacy() {
    checklist(Dialect::Legacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_live_checklist_attended_orders_api() {
    checklist(Dialect::Orders).await;
}
