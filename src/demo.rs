//! `qrgate demo`: qrgate, the Mercado Pago simulator, a pump and a vending
//! machine in one process, telling the story of one fuel sale and one vending
//! sale from scan to `paid`. Ports are picked by the OS and the store lives
//! in a temporary directory, so it runs beside anything and leaves nothing.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{bail, Context};
use mpsim::{PaymentOutcome, Scan, Simulator, SimulatorConfig};
use qrgate_devices::{DeviceConfig, Item, Pump, VendingMachine};

use crate::app::App;
use crate::config::{Config, LogConfig, LogFormat, Secret};

const WAIT: Duration = Duration::from_secs(20);

fn say(line: &str) {
    println!("{line}");
}

async fn scan(mp: &Simulator, url: &str) -> anyhow::Result<Scan> {
    mp.scan(url)
        .await
        .context("the simulated app could not poll the POS URL")
}

/// Polls like the Mercado Pago app until the POS serves an order.
async fn scan_until_order(mp: &Simulator, url: &str) -> anyhow::Result<mpsim::ScannedOrder> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Scan::Order(o) = scan(mp, url).await? {
            return Ok(o);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{url} never served the order");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn waiting(s: &Scan) -> String {
    match s {
        Scan::Waiting {
            http_status,
            kind,
            message,
        } => format!(
            "HTTP {http_status} {kind}{}",
            message
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        ),
        Scan::Order(o) => format!("an order of {} {}", o.total_amount, o.currency_id),
    }
}

pub async fn run() -> anyhow::Result<()> {
    crate::telemetry::init(&LogConfig {
        format: LogFormat::Text,
        filter: "warn".into(),
    });
    let mp = Simulator::start(SimulatorConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let mut config = Config::defaults();
    config.http.public_url = base.clone();
    config.mercadopago.api_base = mp.base_url();
    config.mercadopago.access_token = Some(Secret::new(SimulatorConfig::default().access_token));
    config.mercadopago.collector_id = SimulatorConfig::default().collector_id;
    config.mqtt.embedded_listen = "127.0.0.1:0".parse()?;
    // Only ports the OS picks, so the demo runs beside anything: no console
    // (docs/decisions.md, "First run").
    config.admin.listen = None;
    config.store.path = dir.path().join("demo.db");
    let app = App::build_on(config, listener).await?;
    let mqtt = app.mqtt_addr();
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());

    say(&format!(
        "qrgate is up: HTTP {base}, embedded MQTT broker on {mqtt}, Mercado Pago simulator at {}",
        mp.base_url()
    ));
    let device = |pos: &str| DeviceConfig::new(mqtt.ip().to_string(), mqtt.port(), pos);
    let pump = Pump::connect(device("pump-1")).await?;
    let machine = VendingMachine::connect(device("vending-1")).await?;
    say("pump-1 (fuel) and vending-1 (vending) are online over MQTT");

    // --- A fuel sale: post-pay, the amount is known when the nozzle hangs up.
    let pump_url = format!("{base}/mp/pos/pump-1");
    say("\n== Fuel: pump-1 ==");
    let s = scan(&mp, &pump_url).await?;
    say(&format!(
        "customer scans before any sale: {}  -> the app shows a waiting screen",
        waiting(&s)
    ));
    pump.start_fuelling("000001").await?;
    pump.device().wait_for("000001", "in_process", WAIT).await?;
    let s = scan(&mp, &pump_url).await?;
    say(&format!("customer scans while fuelling: {}", waiting(&s)));
    pump.finish_fuelling("000001", "Super 95", "32.10", "798.00")
        .await?;
    let pending = pump.device().wait_for("000001", "pending", WAIT).await?;
    say(&format!(
        "pump publishes the sale: 32.10 L x 798.00 -> qrgate says pending, {} {} (external_reference {})",
        pending.amount.as_deref().unwrap_or("?"),
        pending.currency.as_deref().unwrap_or("?"),
        pending.external_reference.as_deref().unwrap_or("?")
    ));
    let order = scan_until_order(&mp, &pump_url).await?;
    say(&format!(
        "customer scans: HTTP 200, pays {} {} (merchant order {})",
        order.total_amount, order.currency_id, order.merchant_order_id
    ));
    mp.pay(order.merchant_order_id, PaymentOutcome::Rejected)
        .await?;
    say("the card is rejected: the merchant order stays opened and the sale stays payable");
    let retry = scan_until_order(&mp, &pump_url).await?;
    say(&format!(
        "customer scans again (merchant order {}) and pays with another card",
        retry.merchant_order_id
    ));
    let payment = mp
        .pay(retry.merchant_order_id, PaymentOutcome::Approved)
        .await?;
    say(&format!("Mercado Pago approves payment {payment} and notifies qrgate; qrgate fetches the merchant order and checks it"));
    let paid = pump.wait_paid_and_release("000001", WAIT).await?;
    say(&format!(
        "pump-1 is told: paid (payment {}, merchant order {}) -> pump released, delivery confirmed",
        paid.payment_id.unwrap_or_default(),
        paid.merchant_order.unwrap_or_default()
    ));
    let s = scan(&mp, &pump_url).await?;
    say(&format!("a later scan: {}", waiting(&s)));

    // --- A vending sale: pre-pay, the machine dispenses after payment.
    let machine_url = format!("{base}/mp/pos/vending-1");
    say("\n== Vending: vending-1 ==");
    machine
        .select(
            "A-17",
            &[
                Item::new("Cola 500 ml", "2", "1500.50"),
                Item::new("Chips", "1", "800"),
            ],
        )
        .await?;
    let pending = machine.device().wait_for("A-17", "pending", WAIT).await?;
    say(&format!(
        "customer picks 2 x Cola and 1 x Chips -> pending, {} {}",
        pending.amount.as_deref().unwrap_or("?"),
        pending.currency.as_deref().unwrap_or("?")
    ));
    let order = scan_until_order(&mp, &machine_url).await?;
    say(&format!(
        "customer scans: HTTP 200, {} {} (merchant order {})",
        order.total_amount, order.currency_id, order.merchant_order_id
    ));
    let payment = mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await?;
    say(&format!("payment {payment} approved"));
    let paid = machine.wait_paid_and_dispense("A-17", WAIT).await?;
    say(&format!(
        "vending-1 is told: paid (payment {}) -> products dispensed, delivery confirmed",
        paid.payment_id.unwrap_or_default()
    ));

    say("\ndone: both sales paid exactly once");
    stop.cancel();
    running.await??;
    drop(dir);
    Ok(())
}
