//! `qrgate backup PATH`, the real binary in its own process, beside a
//! running qrgate: a consistent copy under load, which a fresh qrgate then
//! serves from; and the refusals an operator can act on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mpsim::NotifyMode;
use qrgate::orders::ExternalReference;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

/// `qrgate backup` with `args`, reading the store's path from the
/// environment as `serve` would: (exit code, stdout, stderr).
async fn run_backup(db: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("backup")
        .args(args)
        .env_remove("QRGATE_CONFIG")
        .env("QRGATE_STORE__PATH", db)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One whole sale on `device`: accepted, scanned, paid, delivered.
async fn sell(app: &TestApp, device: &qrgate_devices::Device, sale_id: &str) -> String {
    let (reference, _, _) = app.paid_sale(device, sale_id, &snack("10.00")).await;
    device.delivered(sale_id, true, None).await.unwrap();
    app.wait_event(&reference, "delivered").await;
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_serves_a_fresh_qrgate_with_every_sale_stored_before_it_began() {
    let app = TestApp::spawn().await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    let db = app.config.store.path.clone();
    // Bulk, so the copy takes several steps while sales go on: 20 MB of
    // refused messages, written by a connection of our own.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        c.execute_batch("BEGIN").unwrap();
        for n in 0..40_000 {
            c.execute(
                "INSERT INTO device_rejections (pos, sale_id, code, message, at)
                 VALUES ('pump-1', ?1, 'bad', ?2, 0)",
                rusqlite::params![n.to_string(), "x".repeat(500)],
            )
            .unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
    }
    let pump = app.device("pump-1").await;
    let store = app.app_book.store();
    let mut before = Vec::new();
    for n in 0..5 {
        let reference = sell(&app, &pump, &format!("b{n}")).await;
        let r = ExternalReference::parse(&reference).unwrap();
        let sale = store.sale(&r).await.unwrap().unwrap();
        let timeline = store.timeline(&r).await.unwrap();
        before.push((r, sale, timeline));
    }

    // Sales go on being made and paid on the other POS while the copy runs.
    let stop = Arc::new(AtomicBool::new(false));
    let vending = app.device("vending-1").await;
    let load = {
        let stop = Arc::clone(&stop);
        let app = &app;
        async move {
            let mut done = 0;
            while !stop.load(Ordering::Acquire) {
                sell(app, &vending, &format!("l{done}")).await;
                done += 1;
            }
            done
        }
    };
    let copy_dir = Arc::new(tempfile::tempdir().unwrap());
    let copy = copy_dir.path().join("qrgate.db");
    let copy_arg = copy.to_str().unwrap().to_owned();
    let backup = async {
        // The load has begun: its first sale is pending.
        let (code, out, err) = run_backup(&db, &[&copy_arg]).await;
        stop.store(true, Ordering::Release);
        (code, out, err)
    };
    let (sold_meanwhile, (code, out, err)) = tokio::join!(load, backup);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("backed up to"), "{out}");
    assert!(sold_meanwhile > 0);

    // The copy is whole and consistent on its own.
    {
        let c = rusqlite::Connection::open(&copy).unwrap();
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let unclosed: i64 = c
            .query_row(
                "SELECT count(*) FROM sales s WHERE state = 'paid' AND NOT EXISTS
                   (SELECT 1 FROM closings c WHERE c.external_reference = s.external_reference)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unclosed, 0, "a paid sale without its closing");
        let bulk: i64 = c
            .query_row("SELECT count(*) FROM device_rejections", [], |r| r.get(0))
            .unwrap();
        assert_eq!(bulk, 40_000);
    }
    assert!(
        !copy_dir.path().join("qrgate.db-wal").exists(),
        "the copy is one file"
    );

    // A fresh qrgate on the copy has every sale stored before the backup.
    let fresh = TestApp::resume(
        app.mqtt_port,
        app.mp.clone(),
        Arc::clone(&copy_dir),
        format!("{}c", app.prefix),
        app.config.clone(),
    )
    .await;
    let restored = fresh.app_book.store();
    for (r, sale, timeline) in &before {
        assert_eq!(restored.sale(r).await.unwrap().as_ref(), Some(sale), "{r}");
        assert_eq!(&restored.timeline(r).await.unwrap(), timeline, "{r}");
        let mos = restored.merchant_orders_of(r).await.unwrap();
        assert_eq!(mos.len(), 1, "{r}");
        assert_eq!(mos[0].payments.len(), 1, "{r}");
    }
    fresh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_refuses_an_existing_file_without_force_and_a_bad_configuration_exits_78() {
    let app = TestApp::spawn().await;
    let db = app.config.store.path.clone();
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("copy.db");
    std::fs::write(&to, b"an operator's file").unwrap();
    let to_arg = to.to_str().unwrap();

    let (code, _, err) = run_backup(&db, &[to_arg]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&to).unwrap(), b"an operator's file");

    let (code, _, err) = run_backup(&db, &[to_arg, "--force"]).await;
    assert_eq!(code, 0, "{err}");
    let c = rusqlite::Connection::open(&to).unwrap();
    let _: i64 = c
        .query_row("SELECT count(*) FROM sales", [], |r| r.get(0))
        .unwrap();

    let (code, _, err) = run_backup(&db, &[db.to_str().unwrap(), "--force"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("live database"), "{err}");

    let out = tokio::process::Command::new(BIN)
        .args(["--config", "/nonexistent/qrgate.toml", "backup", to_arg])
        .env_remove("QRGATE_CONFIG")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
