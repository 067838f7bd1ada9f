//! Several instances on one PostgreSQL (`--only instances`): two
//! `qrgate serve` of the release binary sharing a PostgreSQL started from
//! initdb (fsync on, as in production) and a Mosquitto, as deployed. It
//! measures what the single-instance parts measure, beside them: a sale
//! served by both instances (and the lag between them), a notification to
//! the device's `paid` when any instance may get it, sales accepted per
//! second, polls per instance, and a failover: kill -9 of the leader with
//! every POS paid and unsettled, until the survivor has told every device.

use super::*;

#[path = "../../../tests/common/postgres.rs"]
mod postgres;

/// One instance of a cluster: the release binary on the shared store.
fn instance(
    name: &str,
    pos: usize,
    broker: u16,
    api_base: &str,
    url: &str,
    dir: &Path,
) -> Result<Qrgate> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let http = free_port();
    let admin = free_port();
    let mut text = format!(
        r#"[http]
listen = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
notification_rate_per_sec = 100000
notification_burst = 100000
[mercadopago]
api_base = "{api_base}"
[mqtt]
broker = "mqtt://127.0.0.1:{broker}"
client_id = "{name}"
device_rate_per_sec = 10000
device_burst = 100000
[orders]
ttl_secs = 0
reconcile_after_secs = 600
[store]
url = "{url}"
path = "{db}"
[log]
format = "json"
filter = "info"
[admin]
listen = "127.0.0.1:{admin}"
"#,
        db = dir.join("unused.db").display(),
    );
    for i in 0..pos {
        let kind = if i % 2 == 0 { "fuel" } else { "vending" };
        text.push_str(&format!("[[pos]]\nid = \"p{i}\"\nkind = \"{kind}\"\n"));
    }
    let config = dir.join("qrgate.toml");
    std::fs::write(&config, text)?;
    Ok(Qrgate {
        child: Qrgate::spawn(&config, &dir)?,
        base: format!("http://127.0.0.1:{http}"),
        admin: format!("http://127.0.0.1:{admin}"),
        mqtt_port: broker,
        config,
        dir: dir.to_path_buf(),
    })
}

/// Whether an instance leads the singletons now (its `qrgate_leader`).
async fn leads(http: &reqwest::Client, q: &Qrgate) -> bool {
    leads_at(http, &q.admin).await
}

async fn leads_at(http: &reqwest::Client, admin: &str) -> bool {
    let Ok(r) = http.get(format!("{admin}/metrics")).send().await else {
        return false;
    };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "qrgate_leader 1")
}

/// Scans `pos` on `q` until it serves the sale: the device hears `pending`
/// from the instance that stored it, and the other may not have read it yet
/// (the lag measured above).
async fn scan(sim: &Simulator, q: &Qrgate, pos: &str) -> Result<mpsim::ScannedOrder> {
    let t0 = Instant::now();
    loop {
        if let Scan::Order(order) = sim.scan(&format!("{}/mp/pos/{pos}", q.base)).await? {
            return Ok(order);
        }
        if t0.elapsed() > WAIT {
            bail!("{pos} served no order on {}", q.base);
        }
    }
}

/// Polls `pos` on `q` until it answers 200: when.
async fn servable_at(
    http: &reqwest::Client,
    q: &Qrgate,
    pos: &str,
    t0: Instant,
) -> Result<Instant> {
    loop {
        let r = http.get(format!("{}/mp/pos/{pos}", q.base)).send().await?;
        if r.status() == 200 {
            return Ok(Instant::now());
        }
        if t0.elapsed() > WAIT {
            bail!("{pos} never became servable on {}", q.base);
        }
    }
}

/// Sales accepted per second: one on each of `pos` POS at once, until every
/// device heard `pending`; then each is cancelled.
async fn burst(fleet: &Fleet, pos: usize, tag: &str) -> Result<f64> {
    let t0 = Instant::now();
    pending_sales(fleet, 0..pos, tag).await?;
    let rate = (pos as f64 / t0.elapsed().as_secs_f64()).round();
    let cancelled: Vec<_> = (0..pos)
        .map(|i| fleet.expect(&format!("p{i}"), &format!("{tag}{i}"), "cancelled"))
        .collect();
    for i in 0..pos {
        fleet
            .send(
                &format!("p{i}"),
                "cancel",
                format!(r#"{{"sale_id":"{tag}{i}"}}"#),
            )
            .await?;
    }
    for c in cancelled {
        arrived(c, "a cancel").await?;
    }
    Ok(rate)
}

/// Notification to the device's `paid`, each notification to the next of
/// `to` in turn (the single instance's part too).
pub async fn notify(
    sim: &Simulator,
    fleet: &Fleet,
    to: &[&Qrgate],
    sales: usize,
    tag: &str,
) -> Result<Value> {
    let http = reqwest::Client::new();
    sim.set_notify_mode(NotifyMode::None);
    let mut h = hist();
    for k in 0..sales {
        let pos = format!("p{}", k % 200);
        let sale = format!("{tag}{k}");
        let to = to[k % to.len()];
        let pending = fleet.expect(&pos, &sale, "pending");
        fleet.sale(&pos, &sale).await?;
        arrived(pending, "pending").await?;
        let order = scan(sim, to, &pos).await?;
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await?;
        let paid = fleet.expect(&pos, &sale, "paid");
        let t0 = Instant::now();
        let resp = http
            .post(format!(
                "{}/mp/notifications?topic=merchant_order&id={}",
                to.base, order.merchant_order_id
            ))
            .send()
            .await?;
        if resp.status() != 200 {
            bail!("notification answered {}", resp.status());
        }
        let at = arrived(paid, "paid").await?;
        h.record(at.duration_since(t0).as_nanos() as u64)?;
        fleet
            .send(
                &pos,
                "delivered",
                format!(r#"{{"sale_id":"{sale}","ok":true}}"#),
            )
            .await?;
    }
    Ok(json!({ "p50_us": us(&h, 0.5), "p99_us": us(&h, 0.99) }))
}

/// One instance on SQLite (fsync on) through the same Mosquitto: the same
/// measures, beside.
async fn on_sqlite(sim: &Simulator, broker: u16, pos: usize, sales: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let q = Qrgate::start(
        pos,
        &BrokerChoice::External(broker),
        &sim.base_url(),
        dir.path(),
    )?;
    q.ready().await?;
    let fleet = Fleet::connect(broker, "bench-instances-sqlite").await?;
    Ok(json!({
        "accepted_per_sec": burst(&fleet, pos, "sqlite-burst").await?,
        "notify_to_device": notify(sim, &fleet, &[&q], sales, "sqlite-n").await?,
    }))
}

pub async fn run(sim: &Simulator, sales: usize, quick: bool) -> Result<Value> {
    let Some(pg) = postgres::Postgres::start() else {
        bail!("PostgreSQL is not installed (initdb)");
    };
    // Durable, as in production (the test server runs without fsync).
    pg.psql("postgres", "ALTER SYSTEM SET fsync = on");
    pg.psql("postgres", "ALTER SYSTEM SET full_page_writes = on");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let url = pg.fresh_url();
    let (mut mosquitto, broker) = start_mosquitto()?;
    let dir = tempfile::tempdir()?;
    const POS: usize = 1000;
    let sqlite = on_sqlite(sim, broker, POS, sales).await?;
    let a = instance("qrgate-a", POS, broker, &sim.base_url(), &url, dir.path())?;
    a.ready().await?;
    let b = instance("qrgate-b", POS, broker, &sim.base_url(), &url, dir.path())?;
    b.ready().await?;
    let both = [&a, &b];
    let fleet = Fleet::connect(broker, "bench-instances").await?;
    let http = reqwest::Client::new();
    let mut r = json!({ "pos": POS, "sales": sales, "sqlite": sqlite });

    r["accepted_per_sec"] = json!(burst(&fleet, POS, "burst").await?);

    // A sale served by both instances: when the first serves it, when both
    // do, and the lag between them.
    let (mut first, mut all, mut lag) = (hist(), hist(), hist());
    for k in 0..sales {
        let pos = format!("p{}", k % 200);
        let sale = format!("s{k}");
        let t0 = Instant::now();
        fleet.sale(&pos, &sale).await?;
        let (ta, tb) = tokio::try_join!(
            servable_at(&http, &a, &pos, t0),
            servable_at(&http, &b, &pos, t0)
        )?;
        let (early, late) = (ta.min(tb), ta.max(tb));
        first.record(early.duration_since(t0).as_nanos() as u64)?;
        all.record(late.duration_since(t0).as_nanos() as u64)?;
        lag.record(late.duration_since(early).as_nanos().max(1) as u64)?;
        let done = fleet.expect(&pos, &sale, "cancelled");
        fleet
            .send(&pos, "cancel", format!(r#"{{"sale_id":"{sale}"}}"#))
            .await?;
        arrived(done, "a cancel").await?;
    }
    r["servable_first"] = json!({ "p50_us": us(&first, 0.5), "p99_us": us(&first, 0.99) });
    r["servable_both"] = json!({ "p50_us": us(&all, 0.5), "p99_us": us(&all, 0.99) });
    r["lag"] = json!({ "p50_us": us(&lag, 0.5), "p99_us": us(&lag, 0.99) });

    // Notification to the device's `paid`, each notification to the other
    // instance in turn.
    r["notify_to_device"] = notify(sim, &fleet, &both, sales, "n").await?;

    // Polls per instance, the other one running beside it.
    if !quick {
        r["polls_64"] = match wrk(&a.base, POS, 64, 10, dir.path()) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("polls skipped: {e}");
                Value::Null
            }
        };
    }

    // Failover: every one of 200 POS pending, scanned and paid at Mercado
    // Pago, its notification not sent; kill -9 of the leader; then every
    // notification to the survivor, until every device heard `paid`.
    let leader = if leads(&http, &a).await { 0 } else { 1 };
    let mut instances = [a, b];
    let survivor_at = 1 - leader;
    let mut orders = Vec::new();
    for i in 0..200 {
        let pos = format!("p{i}");
        let sale = format!("f{i}");
        let pending = fleet.expect(&pos, &sale, "pending");
        fleet.sale(&pos, &sale).await?;
        arrived(pending, "pending").await?;
        let order = scan(sim, &instances[survivor_at], &pos).await?;
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await?;
        orders.push((pos, sale, order.merchant_order_id));
    }
    let paid: Vec<_> = orders
        .iter()
        .map(|(pos, sale, _)| fleet.expect(pos, sale, "paid"))
        .collect();
    let killed = Instant::now();
    instances[leader].child.kill()?;
    let _ = instances[leader].child.wait();
    let survivor = &instances[survivor_at];
    let leading = {
        let (http, admin) = (http.clone(), survivor.admin.clone());
        tokio::spawn(async move {
            loop {
                if leads_at(&http, &admin).await {
                    return Some(killed.elapsed());
                }
                if killed.elapsed() > WAIT {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for (_, _, mo) in &orders {
        let resp = http
            .post(format!(
                "{}/mp/notifications?topic=merchant_order&id={mo}",
                survivor.base
            ))
            .send()
            .await?;
        if resp.status() != 200 {
            bail!("the survivor answered a notification {}", resp.status());
        }
    }
    let answered = killed.elapsed();
    let leading_after = leading.await?.context("the survivor never led")?;
    for p in paid {
        arrived(p, "paid after the failover").await?;
    }
    let settled = killed.elapsed();
    r["failover"] = json!({
        "pos": orders.len(),
        "notifications_answered_ms": answered.as_secs_f64() * 1000.0,
        "survivor_leads_ms": leading_after.as_secs_f64() * 1000.0,
        "every_pos_paid_ms": settled.as_secs_f64() * 1000.0,
    });
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
    Ok(r)
}
