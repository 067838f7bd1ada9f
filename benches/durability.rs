//! The cost of durability, measured: sales accepted per second through the
//! order book (decide, write to SQLite, show) with fsync at every commit and
//! without, and the time a restart takes to rebuild the book from 100,000
//! stored sales. `cargo bench --bench durability` prints a table.
//!
//! Many POS write at once, as at a busy station chain; the store's group
//! commit puts their writes in shared transactions.

use std::sync::Arc;
use std::time::Instant;

use qrgate::book::{Book, BookSettings};
use qrgate::mercadopago::poll_answer::MpAccount;
use qrgate::money::Currency;
use qrgate::orders::rules::{LineRequest, SaleRequest};
use qrgate::orders::{Command, PosConfig, PosId, PosKind, SaleId};
use qrgate::store::{SqliteStore, Store};
use rust_decimal::Decimal;

fn pos_list(n: usize) -> Vec<PosConfig> {
    (0..n)
        .map(|i| PosConfig {
            ttl_secs: None,
            max_amount: Decimal::from(1_000_000),
            ..PosConfig::new(
                PosId::parse(&format!("pump-{i}")).unwrap(),
                PosKind::Fuel,
                Currency::Ars,
            )
        })
        .collect()
}

async fn book(store: Arc<dyn Store>, pos: Vec<PosConfig>) -> Arc<Book> {
    let (publish, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Polls do not mark sales served here (its receiver is gone).
    let (served, _) = tokio::sync::mpsc::unbounded_channel();
    // Nobody listens to the devices here; keep the channel drained.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    Arc::new(
        Book::load(
            pos,
            store,
            MpAccount {
                poll_protocol: qrgate::orders::PollProtocol::V1,
                collector_id: 1,
                sponsor_id: None,
                notification_url: "http://127.0.0.1/mp/notifications".into(),
            },
            BookSettings {
                collector_id: 1,
                auto_refund: false,
                poll_protocol: qrgate::orders::PollProtocol::V1,
                attended: None,
                clock: qrgate::clock::Clock::system(),
            },
            publish,
            served,
        )
        .await
        .unwrap(),
    )
}

fn sale(id: usize) -> Command {
    Command::Sale(SaleRequest {
        sale_id: SaleId::parse(&id.to_string()).unwrap(),
        lines: vec![LineRequest {
            title: "Super 95".into(),
            description: None,
            quantity: Decimal::new(3210, 2),
            unit_price: Decimal::new(79800, 2),
            unit_measure: Some("litre".into()),
            sku: None,
            category: None,
            taxes: Vec::new(),
        }],
        amount: None,
    })
}

/// `pos` POS each accept `per_pos` sales (each then cancelled to free the
/// POS): returns sales accepted per second.
async fn accept_rate(fsync: bool, pos: usize, per_pos: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("b.db"), fsync).unwrap());
    let g = book(store, pos_list(pos)).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..pos {
        let g = Arc::clone(&g);
        tasks.push(tokio::spawn(async move {
            let id = PosId::parse(&format!("pump-{p}")).unwrap();
            for k in 0..per_pos {
                g.execute(&id, sale(k)).await.unwrap();
                g.execute(&id, Command::Cancel(SaleId::parse(&k.to_string()).unwrap()))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (pos * per_pos) as f64 / start.elapsed().as_secs_f64()
}

/// Stores one sale on each of `n` POS, then times what a start does:
/// open the store and rebuild the book.
async fn rebuild_time(n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, false).unwrap());
        let g = book(Arc::clone(&store), pos_list(n)).await;
        let mut tasks = Vec::new();
        for chunk in 0..64 {
            let g = Arc::clone(&g);
            tasks.push(tokio::spawn(async move {
                for p in (chunk..n).step_by(64) {
                    let id = PosId::parse(&format!("pump-{p}")).unwrap();
                    g.execute(&id, sale(1)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        store.check_writable().await.unwrap();
    }
    let bytes = std::fs::metadata(&path).unwrap().len() as f64;
    let start = Instant::now();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, true).unwrap());
    let g = book(store, pos_list(n)).await;
    let took = start.elapsed().as_secs_f64();
    assert_eq!(
        g.poll("pump-0").status,
        200,
        "the rebuilt book serves the stored sale"
    );
    (took, bytes)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "qrgate durability benchmark ({} CPUs)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!();
        println!("| measure | fsync every commit | no fsync |");
        println!("|---|---|---|");
        for (pos, per) in [(1, 500), (64, 40), (1000, 5)] {
            let on = accept_rate(true, pos, per).await;
            let off = accept_rate(false, pos, per).await;
            println!("| sales accepted/s, {pos} POS at once | {on:.0} | {off:.0} |");
        }
        let (took, bytes) = rebuild_time(100_000).await;
        println!();
        println!(
            "restart: rebuilt the book from 100,000 stored sales in {:.2} s (database {:.1} MiB)",
            took,
            bytes / 1_048_576.0
        );
    });
}
