//! What the operator sees and why: each POS's device (never seen, online),
//! its refused device messages (the last on its row, the history on its
//! page), a sale's payments with their ids and why Mercado Pago rejected
//! one, the same attention on the list and the sale page, readable timeline
//! details, one way of writing times, and the warning before cancelling a
//! sale a customer may be paying.

use mpsim::{NotifyMode, PaymentOutcome};
use serde_json::Value;

use crate::admin::{admin, get_json};
use crate::helpers::*;

async fn page(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn row<'a>(list: &'a Value, pos: &str) -> &'a Value {
    list["pos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == pos)
        .unwrap_or_else(|| panic!("no row for {pos}: {list}"))
}

/// Whether `text` holds a time written the console's way
/// (`2026-12-03 14:05:09`), and none written another way (ISO `T`, a zone
/// abbreviation after the seconds).
fn times_written_one_way(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut found = false;
    for i in 0..bytes.len().saturating_sub(19) {
        let w = &bytes[i..i + 19];
        let shape = w.iter().enumerate().all(|(k, b)| match k {
            4 | 7 => *b == b'-',
            10 => *b == b' ' || *b == b'T',
            13 | 16 => *b == b':',
            _ => b.is_ascii_digit(),
        });
        if shape {
            if w[10] == b'T' {
                return false;
            }
            // No zone after the seconds: the zone is named once per page.
            let after = &text[i + 19..];
            if after.starts_with(' ') && after[1..].starts_with(|c: char| c.is_ascii_uppercase()) {
                return false;
            }
            found = true;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pos_shows_its_device_and_the_device_messages_qrgate_refused() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    // Nothing has connected for either POS yet.
    let (_, list) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(row(&list, "pump-1")["device"], "never_seen", "{list}");
    assert_eq!(row(&list, "vending-1")["device"], "never_seen", "{list}");
    assert_eq!(row(&list, "pump-1")["last_rejection"], Value::Null);

    // The machine comes online; the pump sends a second sale while its first
    // is pending, which is refused.
    let _machine = qrgate_devices::Device::connect(app.device_config("vending-1"))
        .await
        .unwrap();
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    state_of(&pump, "1", "pending").await;
    pump.publish_sale("2", &fuel("2", "100"), None)
        .await
        .unwrap();
    let refused = rejection(&pump).await;
    let code = refused.reason.clone().unwrap();
    wait_rejections(&app, "pump-1", 1).await;

    let list = wait_for("the machine online", || async {
        let (_, list) = get_json(&format!("{base}/api/pos"), None).await;
        (row(&list, "vending-1")["device"] == "online").then_some(list)
    })
    .await;
    // A pump that sends sales but never said whether it is there.
    assert_eq!(row(&list, "pump-1")["device"], "no_presence", "{list}");
    let last = &row(&list, "pump-1")["last_rejection"];
    assert_eq!(last["code"], code.as_str(), "{list}");
    assert_eq!(last["sale_id"], "2");
    assert_eq!(row(&list, "vending-1")["last_rejection"], Value::Null);

    // The POS's page keeps the history, newest first, in words.
    let (status, detail) = get_json(&format!("{base}/api/pos/pump-1"), None).await;
    assert_eq!(status, 200, "{detail}");
    let history = detail["rejections"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{detail}");
    assert_eq!(history[0]["code"], code.as_str());
    assert!(!history[0]["message"].as_str().unwrap().is_empty());
    assert_eq!(detail["sales"][0]["sale_id"], "1");
    let (status, html) = page(&format!("{base}/pos/pump-1")).await;
    assert_eq!(status, 200);
    assert!(html.contains("id=\"rejections\""), "{html}");
    assert!(
        html.contains(&format!("<td class=\"code\">{code}</td>")),
        "{html}"
    );
    assert!(times_written_one_way(&html), "{html}");
    let (status, _) = page(&format!("{base}/pos/pump-9")).await;
    assert_eq!(status, 404);
    let (status, v) = get_json(&format!("{base}/api/pos/pump-9"), None).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("unknown_pos")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sale_page_shows_payment_ids_why_a_payment_was_rejected_and_the_lists_attention() {
    let app = TestApp::spawn().await;
    let base = admin(&app);
    let pump = app.device("pump-1").await;
    pump.publish_sale("1", &fuel("1", "100"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "1", "pending")
        .await
        .external_reference
        .unwrap();
    let order = app.scan("pump-1").await;
    // Served: cancelling now warns that the customer may be paying.
    let (_, html) = page(&format!("{base}/sales/{reference}")).await;
    assert!(
        html.contains("id=\"cancel\" class=\"danger\" data-served=\"true\""),
        "{html}"
    );
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Rejected)
        .await
        .unwrap();
    let approved = app
        .mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "1", "paid").await;

    // Paid and not yet delivered: the list and the page say the same.
    let (_, list) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(
        row(&list, "pump-1")["sale"]["attention"],
        "paid_undelivered"
    );
    let (_, html) = page(&format!("{base}/sales/{reference}")).await;
    assert!(
        html.contains(
            "<dd id=\"sale-attention\" class=\"state paid_undelivered\">paid_undelivered</dd>"
        ),
        "{html}"
    );
    // The approved payment by its id, and the rejected one with MP's reason.
    assert!(
        html.contains(&format!("<td class=\"payment-id\">{approved}</td>")),
        "{html}"
    );
    assert!(
        html.contains("<span class=\"status-detail\">cc_rejected_other_reason</span>"),
        "{html}"
    );
    let (_, detail) = get_json(&format!("{base}/api/sales/{reference}"), None).await;
    let seen: Vec<&Value> = detail["merchant_orders"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|mo| mo["payments"].as_array().unwrap())
        .collect();
    assert!(
        seen.iter()
            .any(|p| p["status"] == "rejected" && p["status_detail"] == "cc_rejected_other_reason"),
        "{detail}"
    );
    // Timeline details are words, not JSON; times are written one way.
    let timeline = &html[html.find("id=\"timeline\"").unwrap()..];
    let timeline = &timeline[..timeline.find("</table>").unwrap()];
    assert!(
        !timeline.contains('{') && !timeline.contains("&quot;"),
        "{timeline}"
    );
    assert!(timeline.contains("paid"), "{timeline}");
    assert!(times_written_one_way(&html), "{html}");

    // Delivered: no attention left on either.
    pump.delivered("1", true, None).await.unwrap();
    app.wait_event(&reference, "delivered").await;
    let (_, list) = get_json(&format!("{base}/api/pos"), None).await;
    assert_eq!(row(&list, "pump-1")["sale"]["attention"], Value::Null);
    let (_, html) = page(&format!("{base}/sales/{reference}")).await;
    assert!(!html.contains("sale-attention"), "{html}");
}

#[test]
fn a_timeline_detail_reads_as_words() {
    let detail = serde_json::json!({
        "amount": "100.00",
        "payment_id": 123,
        "closing": {"merchant_order": 456},
        "lines": [{"title": "Super 95"}, {"title": "Water"}],
        "none": null,
    });
    assert_eq!(
        qrgate::admin::page::readable(&detail),
        "amount 100.00 · closing merchant order 456 · lines title Super 95, title Water · payment id 123"
    );
    assert_eq!(qrgate::admin::page::readable(&Value::Null), "");
}
