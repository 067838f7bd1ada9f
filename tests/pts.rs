//! The whole loop of a station whose pumps a PTS-2 controller drives: the
//! PTS-2 simulator → the `qrgate-pts` bridge → the real `qrgate` binary (its
//! embedded broker) → the Mercado Pago simulator: a pump fills, its sale is
//! pending, a customer scans and pays, qrgate says paid, the bridge closes
//! the transaction on the controller and qrgate records the delivery.
#![cfg(feature = "demo")]

use std::path::Path;

use qrgate_pts::bridge::Bridge;
use qrgate_pts::demo::Station;
use qrgate_pts::sim::{SimConfig, Simulator};

#[path = "common/wait.rs"]
mod wait;

use wait::wait_for;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_on_the_pts2_is_paid_by_qr_and_its_transaction_closed_on_the_controller() {
    let mp = mpsim::Simulator::start(mpsim::SimulatorConfig::default())
        .await
        .unwrap();
    let qrgate = Station::start(Path::new(BIN), &mp.base_url(), "TEST-sim-token")
        .await
        .unwrap();
    let pts = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::new()
    })
    .await
    .unwrap();
    // HTTPS with the certificate pinned, digest, a payment form.
    let _bridge = Bridge::start(qrgate.bridge_config(&pts)).await.unwrap();

    // The customer fills 32.10 litres of Super 95 at 798.00.
    pts.lift_nozzle(1, 1).unwrap();
    pts.fill(1, "32.10").unwrap();
    pts.hang_up(1).unwrap();

    // The sale is pending at qrgate: a scan gets its order.
    let pos_url = format!("{}/mp/pos/pump-1", qrgate.http);
    let order = wait_for("the pump's order on a scan", || async {
        match mp.scan(&pos_url).await {
            Ok(mpsim::Scan::Order(order)) => Ok(order),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(order.total_amount.to_string(), "25615.80");
    assert_eq!(pts.seen("PumpCloseTransaction"), 0, "nothing closed unpaid");

    // Paid: qrgate says so, the bridge closes the transaction on the
    // controller (its payment recorded) and qrgate hears it delivered.
    mp.pay(order.merchant_order_id, mpsim::PaymentOutcome::Approved)
        .await
        .unwrap();
    let closed = wait_for("the transaction closed on the controller", || async {
        pts.transaction(1, 1)
            .filter(|t| t.closed_by.is_some())
            .ok_or("still open")
    })
    .await;
    assert_eq!(closed.closed_by.as_deref(), Some("qrgate"));
    assert!(closed.paid);
    assert_eq!(pts.seen("PaymentCreateTransaction"), 1);
    wait_for("delivered in the sale's timeline", || {
        qrgate.timeline_has(&order.external_reference, "delivered")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tells_a_pump_paid_by_qr_to_its_close_on_the_controller() {
    let mut story = Vec::new();
    qrgate_pts::demo::run(Path::new(BIN), |line| story.push(line))
        .await
        .unwrap();
    let last = story.last().unwrap();
    assert!(last.contains("delivered"), "{story:#?}");
    assert!(
        story
            .iter()
            .any(|l| l.contains("closed by user qrgate, paid true")),
        "{story:#?}"
    );
}
