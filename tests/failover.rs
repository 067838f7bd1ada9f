//! Failover, on real processes: two or three `qrgate serve` of the real
//! binary share one PostgreSQL, one Mosquitto and Mercado Pago (the
//! simulator), and instances die (`kill -9`), freeze (SIGSTOP), lose the
//! broker, or see PostgreSQL or the broker restart. Whatever dies and
//! whenever, a sale is closed once, told `paid` once it is, and every
//! payment Mercado Pago approved is recorded once: each case checks this
//! in the database itself (`closings`, the `paid` events, `ledger_payments`)
//! and on the device's state topic.
//!
//! The harness is tests/common/cluster.rs; a failing case prints every
//! process's log, merged. Skipped, said on stderr, when PostgreSQL or
//! Mosquitto is not installed, unless QRGATE_REQUIRE_POSTGRES=1 or
//! QRGATE_REQUIRE_MOSQUITTO=1.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use mpsim::{PaymentOutcome, Simulator};
use qrgate_devices::{Device, Item, StateMessage};
use rust_decimal::Decimal;

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/mosquitto.rs"]
mod mosquitto;
#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/wait.rs"]
mod wait;

use cluster::{Cluster, Relay};
use postgres::Postgres;
use wait::{wait_for, wait_for_event, WAIT};

/// A cluster on a fresh database of the test binary's PostgreSQL.
async fn cluster(pos: &[&str]) -> Option<Cluster> {
    let pg = postgres::shared()?;
    Cluster::new(pg.fresh_url(), pos).await
}

/// One line of fuel at `price`: the sale's amount.
fn fuel(price: &str) -> Vec<Item> {
    vec![Item::new("Super 95", "1", price)]
}

/// Waits for the device to hear `state` of `sale`.
async fn heard(device: &Device, sale: &str, state: &str) -> StateMessage {
    device
        .wait_for(sale, state, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{} never heard {state} of {sale}: {e}", device.pos_id()))
}

/// Every state the device heard up to `state` of `sale`, that one included.
async fn heard_until(device: &Device, sale: &str, state: &str) -> Vec<StateMessage> {
    let what = format!("{} hearing {state} of {sale}", device.pos_id());
    wait_for_event(&what, async {
        let mut heard = Vec::new();
        loop {
            let m = device
                .next_state(WAIT)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}; heard {heard:?}"));
            let last = m.is_for(sale) && m.state == state;
            heard.push(m);
            if last {
                return heard;
            }
        }
    })
    .await
}

/// How many of `heard` say `state` of `sale`.
fn told(heard: &[StateMessage], sale: &str, state: &str) -> usize {
    heard
        .iter()
        .filter(|m| m.is_for(sale) && m.state == state)
        .count()
}

/// The payments Mercado Pago approved for a sale, by id: their amounts.
fn approved(mp: &Simulator, reference: &str) -> BTreeMap<String, Decimal> {
    mp.merchant_orders_for(reference)
        .iter()
        .flat_map(|mo| mo["payments"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["status"] == "approved")
        .map(|p| {
            let amount = Decimal::from_str(&p["transaction_amount"].to_string()).unwrap();
            (p["id"].to_string(), amount)
        })
        .collect()
}

/// The sale's rows of `table` (a count).
async fn rows_of(c: &Cluster, table: &str, reference: &str) -> i64 {
    c.count(
        &format!("SELECT count(*) FROM {table} WHERE external_reference = $1"),
        &[&reference],
    )
    .await
}

/// How many `event`s the sale's timeline holds.
async fn events(c: &Cluster, reference: &str, event: &str) -> i64 {
    c.count(
        "SELECT count(*) FROM sale_events WHERE external_reference = $1 AND event = $2",
        &[&reference, &event],
    )
    .await
}

/// The money, from the database itself: the sale closed `closes` times
/// (0 or 1) with one `paid` event each, and every payment Mercado Pago
/// approved for it in the ledger once, with its amount.
async fn assert_money(c: &Cluster, reference: &str, closes: i64) {
    assert_eq!(
        rows_of(c, "closings", reference).await,
        closes,
        "closings of {reference}"
    );
    assert_eq!(
        events(c, reference, "paid").await,
        closes,
        "`paid` events of {reference}"
    );
    let ledger: BTreeMap<String, Decimal> = c
        .sql(
            "SELECT payment_id, amount FROM ledger_payments WHERE external_reference = $1",
            &[&reference],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let amount: String = r.get(1);
            (r.get(0), Decimal::from_str(&amount).unwrap())
        })
        .collect();
    assert_eq!(
        ledger,
        approved(&c.mp, reference),
        "the ledger of {reference} against Mercado Pago's approved payments"
    );
}

/// No device message was refused: every one these tests send is valid
/// when sent, so a refusal is one decided on a view behind the store.
async fn assert_no_refusals(c: &Cluster) {
    let refused: Vec<String> = c
        .sql("SELECT pos, code, message FROM device_rejections", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect();
    assert!(
        refused.is_empty(),
        "valid device messages refused: {refused:?}"
    );
}

/// The outbox rows no instance has marked told yet.
async fn untold(c: &Cluster) -> i64 {
    c.count(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        &[],
    )
    .await
}

/// A pending sale `sale` on the device's POS, heard: its external
/// reference.
async fn sell(device: &Device, sale: &str, price: &str) -> String {
    device.publish_sale(sale, &fuel(price), None).await.unwrap();
    heard(device, sale, "pending")
        .await
        .external_reference
        .expect("a pending sale names its external reference")
}

/// A customer scans `pos`'s QR with Mercado Pago polling `scan_at`, and
/// pays in full: the merchant order and the payment (nobody notified yet).
async fn scan_and_pay(c: &Cluster, scan_at: &str, pos: &str) -> (u64, u64) {
    let mo = c.scan(scan_at, pos).await.merchant_order_id;
    (mo, c.mp.pay(mo, PaymentOutcome::Approved).await.unwrap())
}

/// A customer scans the device's QR with Mercado Pago polling `scan_at`
/// and pays; Mercado Pago notifies `notify_to`. Returns once the device
/// heard `paid` with that payment.
async fn pay(c: &Cluster, device: &Device, sale: &str, scan_at: &str, notify_to: &str) {
    let (mo, payment) = scan_and_pay(c, scan_at, device.pos_id()).await;
    assert_eq!(c.notify(notify_to, mo).await, Some(200));
    let paid = heard(device, sale, "paid").await;
    assert_eq!(
        paid.payment_id,
        Some(payment),
        "{sale} told paid by another payment"
    );
}

/// What the store holds, as one number that any stored change moves: every
/// timeline event and every POS's version.
async fn stored(c: &Cluster) -> i64 {
    c.count("SELECT count(*) FROM sale_events", &[]).await
        + c.count(
            "SELECT coalesce(sum(version), 0)::bigint FROM pos_heads",
            &[],
        )
        .await
}

/// The device says it is offline (or online) and each of `instances`
/// shows it. Presence is not stored: each instance hears it itself, so
/// one that shows it has handled every message of the POS before it
/// (a pump with a sale pending stays payable offline: this needs a
/// vending machine, or a pump without one).
async fn hears_presence(c: &Cluster, instances: &[&str], device: &Device, online: bool) {
    device.set_status(online).await.unwrap();
    let pos = device.pos_id();
    for n in instances {
        wait_for(format!("{n} hearing {pos} online: {online}"), || async {
            let kind = c.poll_kind(n, pos).await;
            (kind == "timeout") != online
        })
        .await;
    }
}

// ---- (a) ----

/// Three instances hear the same device sale; the first to store it
/// tells the device, the others find it stored. Every instance serves it
/// with the same bytes, and a change stored by one (the cancel) is
/// followed by all. A, the leader, which answers a message sent again,
/// hears the broker late: it has always read each change from the store
/// before the device message that made it, and must not take that
/// message for one sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_is_served_with_the_same_body_by_every_instance() {
    let Some(c) = cluster(&["pump-1"]).await else {
        return;
    };
    let late = Relay::slowed(c.broker.port, Duration::from_millis(300)).await;
    c.start_with("a", &[Cluster::broker_at(late.port)]).await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    c.start("c").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "1234.50").await;

    let mut bodies = Vec::new();
    for n in ["a", "b", "c"] {
        let body = wait_for(format!("{n} serving s1"), || async {
            match c.poll(n, "pump-1").await {
                Ok((200, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        bodies.push(body);
    }
    assert!(bodies[0].contains(&reference), "{}", bodies[0]);
    assert!(bodies[0].contains("1234.5"), "{}", bodies[0]);
    assert_eq!(bodies[1], bodies[0], "b serves other bytes than a");
    assert_eq!(bodies[2], bodies[0], "c serves other bytes than a");
    assert_eq!(events(&c, &reference, "accepted").await, 1);

    pump.cancel("s1").await.unwrap();
    let heard = heard_until(&pump, "s1", "cancelled").await;
    // The polls served it: one instance stored that and told it, once.
    let served = heard.iter().filter(|m| m.state == "pending" && m.served);
    assert_eq!(served.count(), 1, "served told other than once: {heard:?}");
    let again = heard.iter().filter(|m| m.state == "pending" && !m.served);
    assert_eq!(again.count(), 0, "pending told twice: {heard:?}");
    for n in ["a", "b", "c"] {
        wait_for(format!("{n} no longer serving s1"), || async {
            c.poll_kind(n, "pump-1").await == "unavailable"
        })
        .await;
    }
    assert_eq!(events(&c, &reference, "cancelled").await, 1);
    // Once each shows the pump offline, each has handled the sale and the
    // cancel (A last): none told them again.
    hears_presence(&c, &["a", "b", "c"], &pump, false).await;
    for n in ["a", "b", "c"] {
        assert!(!c.log.has(n, &["same sale again"]), "{n} told it again");
    }
    assert_no_refusals(&c).await;
}

// ---- (b) ----

/// A, the leader, serves the sale to the customer and is killed; Mercado
/// Pago's notification reaches B, which leads next and settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_after_serving_leaves_the_notification_to_another_which_closes_the_sale_once(
) {
    let Some(c) = cluster(&["pump-1"]).await else {
        return;
    };
    c.start("a").await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "500.00").await;
    let order = c.scan("a", "pump-1").await;
    c.kill("a");

    let payment =
        c.mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
    assert_eq!(c.notify("b", order.merchant_order_id).await, Some(200));
    let paid = heard(&pump, "s1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert_eq!(c.leader().await, "b");
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;
}

// ---- (c) ----

/// The same payment notified to A and B at once, as a merchant order and
/// as a payment: both answer 200, and the sale closes once, told once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_notification_to_two_instances_at_once_closes_the_sale_once() {
    let Some(c) = cluster(&["pump-1"]).await else {
        return;
    };
    c.start("a").await;
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "250.00").await;
    let (mo, payment) = scan_and_pay(&c, "b", "pump-1").await;
    let answers = tokio::join!(
        c.notify("a", mo),
        c.notify("b", mo),
        c.notify_payment("a", payment),
        c.notify_payment("b", payment),
    );
    assert_eq!(
        answers,
        (Some(200), Some(200), Some(200), Some(200)),
        "every notification is answered 200 once in the inbox"
    );
    let heard = heard_until(&pump, "s1", "paid").await;
    assert_eq!(heard.last().unwrap().payment_id, Some(payment));
    // Every notification applied: the inbox is empty, and the money is
    // where it belongs.
    wait_for("the inbox worked off", || async {
        c.count("SELECT count(*) FROM inbox WHERE done_at IS NULL", &[])
            .await
            == 0
    })
    .await;
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;

    // A later sale on the POS: whatever both instances told about s1 came
    // before it.
    pump.delivered("s1", true, None).await.unwrap();
    pump.publish_sale("s2", &fuel("10.00"), None).await.unwrap();
    let later = heard_until(&pump, "s2", "pending").await;
    assert_eq!(
        told(&heard, "s1", "paid") + told(&later, "s1", "paid"),
        1,
        "paid told more than once: {heard:?} {later:?}"
    );
}

// ---- (d) ----

/// A leads and loses the broker (its relay is cut), then settles a
/// payment: the change is stored with its outbox row, which A cannot
/// publish. A is killed; B leads next, and its sweep tells the device.
/// `paid` is repeated once an hour only, so the sweep is what told it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_dying_between_commit_and_publish_leaves_the_device_to_the_next_leaders_sweep()
{
    let Some(c) = cluster(&["pump-1"]).await else {
        return;
    };
    let relay = Relay::start(c.broker.port).await;
    c.start_with("a", &[Cluster::broker_at(relay.port)]).await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "700.00").await;
    let (mo, payment) = scan_and_pay(&c, "b", "pump-1").await;

    relay.cut();
    c.log.note("a's broker link cut");
    wait_for("a unready without its broker", || async {
        !c.ready("a").await
    })
    .await;
    assert_eq!(c.notify("b", mo).await, Some(200));
    // The leader, A, settles: stored, not told.
    wait_for("a closing s1", || async {
        rows_of(&c, "closings", &reference).await == 1
    })
    .await;
    assert!(untold(&c).await >= 1, "the outbox row of `paid` is marked");
    assert_eq!(c.metric("b", "qrgate_outbox_swept_total").await, Some(0.0));
    c.kill("a");

    let paid = heard(&pump, "s1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert_eq!(c.leader().await, "b");
    assert!(
        c.metric("b", "qrgate_outbox_swept_total").await >= Some(1.0),
        "b's sweep did not tell it"
    );
    assert!(c.log.has("b", &["told by the sweep", "pump-1"]));
    wait_for("the outbox row marked told", || async {
        untold(&c).await == 0
    })
    .await;
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;
}

// ---- (e) ----

/// A is killed and restarted under the same name while B works on. Its
/// book is rebuilt from the store (it serves what B stored meanwhile with
/// B's bytes); the messages its session kept at the broker fold into what
/// is stored; nothing is stored again, the sweep has nothing to tell, and
/// the devices hear nothing of their sales but, at most, their current
/// state again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_rebuilds_its_book_and_tells_nothing_twice() {
    let Some(c) = cluster(&["pump-1", "vending-1"]).await else {
        return;
    };
    c.start("a").await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let vending = c.device("vending-1").await;
    let s1 = sell(&pump, "s1", "300.00").await;
    pay(&c, &pump, "s1", "a", "a").await;
    pump.delivered("s1", true, None).await.unwrap();
    wait_for("s1 delivered", || async {
        events(&c, &s1, "delivered").await == 1
    })
    .await;
    wait_for("every change told", || async { untold(&c).await == 0 }).await;

    c.kill("a");
    // B alone: what the devices publish now waits in A's session too.
    let s2 = sell(&pump, "s2", "450.00").await;
    pay(&c, &pump, "s2", "b", "b").await;
    pump.delivered("s2", true, None).await.unwrap();
    let t1 = sell(&vending, "t1", "80.00").await;
    // Served (a poll marks it, and that is stored) before A returns.
    c.scan("b", "vending-1").await;
    wait_for("t1 stored as served", || async {
        events(&c, &t1, "served").await == 1
    })
    .await;
    wait_for("s2 delivered", || async {
        events(&c, &s2, "delivered").await == 1
    })
    .await;
    wait_for("every change told", || async { untold(&c).await == 0 }).await;
    let before = stored(&c).await;
    pump.drain();
    vending.drain();

    c.start("a").await;
    let (_, b_body) = c.poll("b", "vending-1").await.unwrap();
    let (status, a_body) = c.poll("a", "vending-1").await.unwrap();
    assert_eq!((status, &a_body), (200, &b_body), "a's rebuilt book");
    // Once A shows both POS offline, it has handled every message its
    // session kept.
    hears_presence(&c, &["a", "b"], &pump, false).await;
    hears_presence(&c, &["a", "b"], &vending, false).await;
    assert_eq!(stored(&c).await, before, "a stored something again");
    for n in ["a", "b"] {
        assert_eq!(c.metric(n, "qrgate_outbox_swept_total").await, Some(0.0));
    }
    for (device, sale, state) in [(&pump, "s2", "paid"), (&vending, "t1", "pending")] {
        for m in device.drain() {
            assert!(
                m.is_for(sale) && m.state == state,
                "{} heard {m} after a's restart; its state is {state} of {sale}",
                device.pos_id()
            );
        }
    }

    // A works on: t1 is paid through it.
    hears_presence(&c, &["a", "b"], &pump, true).await;
    hears_presence(&c, &["a", "b"], &vending, true).await;
    pay(&c, &vending, "t1", "a", "a").await;
    for (reference, closes) in [(&s1, 1), (&s2, 1), (&t1, 1)] {
        assert_money(&c, reference, closes).await;
        assert_eq!(events(&c, reference, "accepted").await, 1);
    }
    assert_no_refusals(&c).await;
}

/// B is down while a vending machine sells twice (one paid, one cancelled); its
/// session at the broker keeps both sales' messages. Started again, B
/// must find them applied, as the messages of a POS's latest sale are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_replaying_its_session_takes_no_older_sale_again() {
    let Some(c) = cluster(&["vending-1"]).await else {
        return;
    };
    c.start("a").await;
    c.start("b").await;
    let machine = c.device("vending-1").await;
    c.kill("b");
    let s1 = sell(&machine, "s1", "150.00").await;
    pay(&c, &machine, "s1", "a", "a").await;
    machine.delivered("s1", true, None).await.unwrap();
    sell(&machine, "s2", "20.00").await;
    machine.cancel("s2").await.unwrap();
    heard(&machine, "s2", "cancelled").await;
    wait_for("s1 delivered", || async {
        events(&c, &s1, "delivered").await == 1
    })
    .await;
    let before = stored(&c).await;

    c.start("b").await;
    hears_presence(&c, &["b"], &machine, false).await;
    let after: Vec<String> = machine.drain().iter().map(|m| m.to_string()).collect();
    assert_eq!(
        stored(&c).await,
        before,
        "b stored again; the machine heard {after:?}"
    );
    assert_eq!(c.count("SELECT count(*) FROM sales", &[]).await, 2);
    assert_no_refusals(&c).await;
}

// ---- (f) ----

/// PostgreSQL restarts under two instances. While it is down, polls answer
/// from memory (a customer scans and pays), readiness drops, a device's
/// cancel is held unacknowledged and Mercado Pago's notification is
/// refused. Once it is back, the cancel is stored once, the notification
/// (sent again, as Mercado Pago does) closes the sale once, and readiness
/// and leadership return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_restarts_polls_answer_messages_wait_and_then_everything_catches_up() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let Some(c) = Cluster::new(pg.fresh_url(), &["pump-1", "pump-2"]).await else {
        return;
    };
    c.start("a").await;
    c.start("b").await;
    let one = c.device("pump-1").await;
    let two = c.device("pump-2").await;
    let s1 = sell(&one, "s1", "900.00").await;
    let t1 = sell(&two, "t1", "60.00").await;
    let mut served = Vec::new();
    for n in ["a", "b"] {
        for pos in ["pump-1", "pump-2"] {
            let body = wait_for(format!("{n} serving {pos}"), || async {
                match c.poll(n, pos).await {
                    Ok((200, body)) => Ok(body),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            served.push(((n, pos), body));
        }
    }
    // Those polls served the sales, which one instance stores and the
    // other follows. A POS whose change an instance heard of and has not
    // read yet is answered from the store (never from what may be wrong),
    // so the outage starts once each shows both sales served.
    for n in ["a", "b"] {
        wait_for(format!("{n} showing both sales served"), || async {
            c.metric(n, "qrgate_sales_served_unpaid").await == Some(2.0)
        })
        .await;
    }

    pg.stop();
    c.log.note("PostgreSQL stopped");
    for n in ["a", "b"] {
        wait_for(format!("{n} unready"), || async { !c.ready(n).await }).await;
    }
    for ((n, pos), body) in &served {
        let answer = c.poll(n, pos).await.unwrap();
        assert_eq!(&answer, &(200, body.clone()), "{n} polled for {pos}");
    }
    let (mo, payment) = scan_and_pay(&c, "a", "pump-1").await;
    let refused = c.notify("b", mo).await;
    assert_ne!(refused, Some(200), "a notification answered 200 unstored");
    two.cancel("t1").await.unwrap();
    for n in ["a", "b"] {
        wait_for(format!("{n} holding the cancel"), || async {
            c.metric(n, "qrgate_device_messages_held_total").await >= Some(3.0)
        })
        .await;
    }

    pg.restart();
    c.log.note("PostgreSQL back");
    heard(&two, "t1", "cancelled").await;
    for n in ["a", "b"] {
        wait_for(format!("{n} ready again"), || c.ready(n)).await;
    }
    // Mercado Pago sends it again.
    assert_eq!(c.notify("b", mo).await, Some(200));
    let paid = heard(&one, "s1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    for n in ["a", "b"] {
        for pos in ["pump-1", "pump-2"] {
            wait_for(format!("{n} no longer serving {pos}"), || async {
                c.poll_kind(n, pos).await == "unavailable"
            })
            .await;
        }
    }
    c.leader().await;
    assert_eq!(events(&c, &t1, "cancelled").await, 1);
    assert_money(&c, &s1, 1).await;
    assert_money(&c, &t1, 0).await;
    assert_no_refusals(&c).await;
}

// ---- (g) ----

/// Mosquitto restarts and forgets every session: each instance connects
/// again and subscribes again, which each one's own view of a device's
/// presence (never stored) shows, and a sale goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_restarts_every_instance_subscribes_again() {
    let Some(mut c) = cluster(&["pump-1"]).await else {
        return;
    };
    c.start("a").await;
    c.start("b").await;
    let mut connections = Vec::new();
    for n in ["a", "b"] {
        connections.push(c.metric(n, "qrgate_mqtt_connections_total").await);
    }
    c.broker.restart();
    for (n, before) in ["a", "b"].into_iter().zip(connections) {
        wait_for(format!("{n} connected again and ready"), || async {
            c.metric(n, "qrgate_mqtt_connections_total").await > before && c.ready(n).await
        })
        .await;
    }
    let pump = c.device("pump-1").await;
    hears_presence(&c, &["a", "b"], &pump, false).await;
    hears_presence(&c, &["a", "b"], &pump, true).await;
    let reference = sell(&pump, "s1", "120.00").await;
    pay(&c, &pump, "s1", "b", "a").await;
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;
}

// ---- (h) ----

/// A leads and is fetching a merchant order (Mercado Pago answers slowly)
/// when it freezes for 30 s. B leads within the lease and settles the same
/// notification from the inbox. A thaws with the answer to its fetch and
/// its old term, and finds its session gone: its singletons stop (the
/// fetch with them), and whatever of theirs reaches the store first is
/// refused by the term or finds the sale closed. The sale closed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_while_another_takes_over_loses_every_stale_action() {
    const PAUSE: Duration = Duration::from_secs(30);
    let Some(mut c) = cluster(&["pump-1"]).await else {
        return;
    };
    // A's fetch waits for its answer across the pause rather than time out.
    c.set("QRGATE_MERCADOPAGO__TIMEOUT_MS", "120000");
    c.start("a").await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "880.00").await;
    let (mo, payment) = scan_and_pay(&c, "b", "pump-1").await;
    let fetches = |mp: &Simulator| {
        mp.api_calls()
            .iter()
            .filter(|call| call.path.starts_with(&format!("/merchant_orders/{mo}")))
            .count()
    };

    c.mp.set_latency("/merchant_orders/", Duration::from_secs(2));
    assert_eq!(c.notify("b", mo).await, Some(200));
    wait_for("a fetching the merchant order", || async {
        fetches(&c.mp) == 1
    })
    .await;
    // Only A's fetch is slow: B's, later, is answered at once.
    c.mp.set_latency("/merchant_orders/", Duration::ZERO);
    c.pause("a");
    let paused = Instant::now();
    let term_of_a: i64 = c.sql("SELECT term FROM leadership", &[]).await.unwrap()[0].get(0);

    assert_eq!(c.leader().await, "b");
    let paid = heard(&pump, "s1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));
    assert!(fetches(&c.mp) >= 2, "b settled without fetching");
    // The pause is the case itself: A sleeps through B's whole takeover.
    tokio::time::sleep(PAUSE.saturating_sub(paused.elapsed())).await;
    c.resume("a");

    // A's singletons end with its term; until they have, the gauge says 1.
    wait_for("a no longer leading", || async {
        c.metric("a", "qrgate_leader").await == Some(0.0)
    })
    .await;
    assert!(c.log.has("a", &["no longer leads the singletons"]));
    assert_eq!(c.leader().await, "b");
    let rows = c
        .sql("SELECT term, holder FROM leadership", &[])
        .await
        .unwrap();
    let (term, holder): (i64, String) = (rows[0].get(0), rows[0].get(1));
    assert_eq!(holder, "b");
    assert!(term > term_of_a, "term {term} after a's {term_of_a}");
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;
}

// ---- (i) ----

/// How a sale of the mix is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Paid, and notified to one instance.
    Once,
    /// Paid, and notified to two instances at once.
    ToTwo,
    /// Scanned twice and both merchant orders paid: the second payment is
    /// owed back.
    Twice,
    /// Cancelled by the device after the scan, then paid: owed back.
    CancelledThenPaid,
    /// Paid and never notified: reconciliation finds it.
    Unnotified,
}

/// The instances of the mix.
const INSTANCES: [&str; 3] = ["a", "b", "c"];

const WAYS: [Way; 5] = [
    Way::Once,
    Way::Twice,
    Way::ToTwo,
    Way::CancelledThenPaid,
    Way::Unnotified,
];

/// A sale of the mix, and what the device was told of its payment.
struct Sold {
    reference: String,
    amount: Decimal,
    way: Way,
    told_payment: Option<u64>,
}

/// An instance awake, at random.
fn pick(c: &Cluster, rng: &mut rand::rngs::StdRng) -> String {
    use rand::seq::SliceRandom;
    c.awake().choose(rng).cloned().expect("an instance awake")
}

/// A scan served by some instance, picked at random at each attempt (the
/// one picked may have been killed since).
async fn scan_any(c: &Cluster, rng: &mut rand::rngs::StdRng, pos: &str) -> mpsim::ScannedOrder {
    wait_for(format!("some instance serving {pos}"), || {
        let n = pick(c, rng);
        async move { c.try_scan(&n, pos).await }
    })
    .await
}

/// A notification of `mo` taken (200) by some instance.
async fn notify_any(c: &Cluster, rng: &mut rand::rngs::StdRng, mo: u64) {
    wait_for(format!("merchant order {mo} notified"), || {
        let n = pick(c, rng);
        async move { c.notify(&n, mo).await == Some(200) }
    })
    .await;
}

/// One sale on the device's POS, paid `way` through instances picked at
/// random, until the device heard its end and the ledger holds each of
/// its payments.
async fn sell_in_the_mix(
    c: &Cluster,
    device: &Device,
    rng: &mut rand::rngs::StdRng,
    sale: &str,
    way: Way,
) -> Sold {
    use rand::Rng;
    let pos = device.pos_id();
    let amount = Decimal::new(rng.gen_range(100..100_000), 2);
    let reference = sell(device, sale, &amount.to_string()).await;
    let mut orders = vec![scan_any(c, rng, pos).await.merchant_order_id];
    match way {
        Way::Twice => orders.push(scan_any(c, rng, pos).await.merchant_order_id),
        Way::CancelledThenPaid => {
            device.cancel(sale).await.unwrap();
            heard(device, sale, "cancelled").await;
        }
        // Reconciliation searches sales stored as served; the instance that
        // served it may have died before storing that: the customer's app
        // polls again.
        Way::Unnotified => {
            wait_for(format!("{reference} stored as served"), || {
                let n = pick(c, rng);
                let reference = &reference;
                async move {
                    let _ = c.poll(&n, pos).await;
                    events(c, reference, "served").await == 1
                }
            })
            .await
        }
        Way::Once | Way::ToTwo => {}
    }
    for mo in &orders {
        c.mp.pay(*mo, PaymentOutcome::Approved).await.unwrap();
    }
    match way {
        Way::Unnotified => {}
        Way::ToTwo => {
            use rand::seq::SliceRandom;
            let two: Vec<String> = c.awake().choose_multiple(rng, 2).cloned().collect();
            let (x, y) = (&two[0], &two[two.len() - 1]);
            let answers = tokio::join!(c.notify(x, orders[0]), c.notify(y, orders[0]));
            // One of them killed meanwhile: Mercado Pago sends it again.
            if answers != (Some(200), Some(200)) {
                notify_any(c, rng, orders[0]).await;
            }
        }
        Way::Once | Way::Twice | Way::CancelledThenPaid => {
            for mo in &orders {
                notify_any(c, rng, *mo).await;
            }
        }
    }
    let told_payment = if way == Way::CancelledThenPaid {
        None
    } else {
        let paid = heard(device, sale, "paid").await;
        device.delivered(sale, true, None).await.unwrap();
        paid.payment_id
    };
    wait_for(
        format!("every payment of {reference} in the ledger"),
        || async {
            let recorded = rows_of(c, "ledger_payments", &reference).await;
            let made = approved(&c.mp, &reference).len() as i64;
            (recorded == made)
                .then_some(())
                .ok_or(format!("{recorded} of {made}"))
        },
    )
    .await;
    Sold {
        reference,
        amount,
        way,
        told_payment,
    }
}

/// Three instances, three pumps selling at once, every way of paying; an
/// instance killed (`kill -9`) at a random point every few sales and
/// started again under its name (a pump's next sale waits until it runs:
/// see `sell_in_the_mix`). At the end, from the database: every sale
/// stored once, closed once if Mercado Pago was paid for it while it was
/// payable, told `paid` with the payment that closed it, every approved
/// payment in the ledger once, and nothing owed but what was paid beyond
/// the sale. `QRGATE_FAILOVER_SEED` replays a run (its seed is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_during_a_sustained_mix_leave_every_payment_recorded_once_and_every_sale_closed_once(
) {
    use rand::{Rng, SeedableRng};
    const PUMPS: [&str; 3] = ["pump-1", "pump-2", "pump-3"];
    const SALES_PER_PUMP: usize = 10;
    const KILL_EVERY: usize = 3;
    let Some(mut c) = cluster(&PUMPS).await else {
        return;
    };
    let seed: u64 = std::env::var("QRGATE_FAILOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("failover mix: QRGATE_FAILOVER_SEED={seed}");
    c.log.note(&format!("seed {seed}"));
    c.set("QRGATE_ORDERS__RECONCILE_AFTER_SECS", "1");
    let c = c;
    for n in INSTANCES {
        c.start(n).await;
    }
    let mut devices = Vec::new();
    for pos in PUMPS {
        devices.push(c.device(pos).await);
    }
    let total = PUMPS.len() * SALES_PER_PUMP;
    let (done, mut progress) = tokio::sync::watch::channel(0usize);

    let sales = futures_util::future::join_all(devices.iter().enumerate().map(|(i, device)| {
        let (c, done) = (&c, &done);
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let mut sold = Vec::new();
            for k in 0..SALES_PER_PUMP {
                let way = WAYS[(k + i) % WAYS.len()];
                sold.push(sell_in_the_mix(c, device, &mut rng, &format!("s{k}"), way).await);
                done.send_modify(|d| *d += 1);
            }
            sold
        }
    }));
    let chaos = async {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6b69_6c6c);
        let mut kills = 0;
        while (kills + 1) * KILL_EVERY < total {
            let due = (kills + 1) * KILL_EVERY;
            // No hang guard: the sales under way have theirs.
            let _ = progress.wait_for(|d| *d >= due).await;
            // Not a wait for anything: it puts the kill at a random point
            // of the sales under way.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
            let victim = pick(&c, &mut rng);
            c.kill(&victim);
            c.start(&victim).await;
            kills += 1;
        }
        kills
    };
    let started = Instant::now();
    let (sales, kills) = tokio::join!(sales, chaos);
    let sold: Vec<Sold> = sales.into_iter().flatten().collect();
    let terms: i64 = c.sql("SELECT term FROM leadership", &[]).await.unwrap()[0].get(0);
    eprintln!(
        "failover mix: {} sales, {kills} kills, {terms} leadership terms, in {:?}",
        sold.len(),
        started.elapsed()
    );
    assert!(kills >= 8, "{kills} kills");

    let store = qrgate::store::PgStore::connect(&c.url).await.unwrap();
    let mut closed = 0;
    let mut payments = 0;
    for s in &sold {
        let closes = i64::from(s.way != Way::CancelledThenPaid);
        closed += closes;
        assert_money(&c, &s.reference, closes).await;
        assert_eq!(events(&c, &s.reference, "accepted").await, 1);
        let at_mp = approved(&c.mp, &s.reference);
        payments += at_mp.len() as i64;
        let reference = qrgate::orders::ExternalReference::parse(&s.reference).unwrap();
        let sale = qrgate::store::Store::sale(&store, &reference)
            .await
            .unwrap()
            .expect("the sale is stored");
        let kept = if closes == 1 { s.amount } else { Decimal::ZERO };
        assert_eq!(
            sale.ledger.kept(),
            kept,
            "kept of {} ({:?})",
            s.reference,
            s.way
        );
        assert_eq!(
            sale.ledger.owed(),
            at_mp.values().sum::<Decimal>() - kept,
            "owed by {} ({:?})",
            s.reference,
            s.way
        );
        if closes == 1 {
            let closing: String = c
                .sql(
                    "SELECT payment_id FROM closings WHERE external_reference = $1",
                    &[&s.reference],
                )
                .await
                .unwrap()[0]
                .get(0);
            assert_eq!(
                s.told_payment.map(|p| p.to_string()),
                Some(closing),
                "{} told paid with another payment than its closing's",
                s.reference
            );
        }
    }
    assert_eq!(
        c.count("SELECT count(*) FROM sales", &[]).await,
        total as i64
    );
    assert_eq!(c.count("SELECT count(*) FROM closings", &[]).await, closed);
    assert_eq!(
        c.count("SELECT count(*) FROM ledger_payments", &[]).await,
        payments
    );
    assert_no_refusals(&c).await;
}

/// A leader cut off from PostgreSQL in the middle of a singleton's write
/// (its term checked under the row lock, the next statement not yet
/// sent), as a host that loses the network or freezes mid-transaction.
/// Its session ends with the lease and B leads within it, settles the
/// notification and tells the device; the cut-off write never commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_in_the_middle_of_a_write_is_replaced_within_the_lease() {
    let Some(c) = cluster(&["pump-1"]).await else {
        return;
    };
    let store = Relay::start(c.store_port()).await;
    c.start_with("a", &[c.store_at(store.port)]).await;
    assert_eq!(c.leader().await, "a");
    c.start("b").await;
    let pump = c.device("pump-1").await;
    let reference = sell(&pump, "s1", "640.00").await;
    let (mo, payment) = scan_and_pay(&c, "b", "pump-1").await;

    // A settles what it fetched: its first write checks its term, then
    // writes the merchant order, which never reaches PostgreSQL.
    store.freeze_before(b"INSERT INTO merchant_orders");
    assert_eq!(c.notify("b", mo).await, Some(200));
    wait_for("a cut off in the middle of its write", || async {
        store.frozen()
    })
    .await;
    c.log.note("a's store link frozen in the middle of a write");
    wait_for("b leading", || async {
        c.metric("b", "qrgate_leader").await == Some(1.0)
    })
    .await;
    let paid = heard(&pump, "s1", "paid").await;
    assert_eq!(paid.payment_id, Some(payment));

    store.thaw();
    c.log.note("a's store link back");
    assert_eq!(c.leader().await, "b");
    assert_money(&c, &reference, 1).await;
    assert_no_refusals(&c).await;
}
