//! The `mpsim` binary as a script or a second terminal uses it: `serve` on a
//! port the OS picks says where in its first line, the other commands drive
//! it and say what happened, the exit status says how it went, and SIGTERM
//! stops it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mpsim");

/// A POS URL that always serves the same order, and a notification endpoint
/// that counts what it receives: what qrgate serves, reduced to a fixture.
async fn pos() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let order = format!(
        r#"{{"collector_id":178106235,"items":[{{"title":"Super 95","currency_id":"ARS",
        "quantity":1,"unit_price":798.00}}],"external_reference":"pump-1-cli",
        "notification_url":"{base}/mp/notifications"}}"#
    );
    let data = web::Data::from(Arc::clone(&received));
    let server =
        HttpServer::new(move || {
            let order = order.clone();
            App::new()
            .app_data(data.clone())
            .route(
                "/mp/pos/pump-1",
                web::get().to(move || {
                    let order = order.clone();
                    async move { HttpResponse::Ok().content_type("application/json").body(order) }
                }),
            )
            .route(
                "/mp/notifications",
                web::post().to(
                    |req: actix_web::HttpRequest, seen: web::Data<Mutex<Vec<String>>>| async move {
                        seen.lock().unwrap().push(req.query_string().to_owned());
                        HttpResponse::Ok().finish()
                    },
                ),
            )
        })
        .listen(listener)
        .unwrap()
        .workers(1)
        .disable_signals()
        .run();
    tokio::spawn(server);
    (format!("{base}/mp/pos/pump-1"), received)
}

/// Runs `mpsim --sim SIM ARGS`: (exit status, stdout, stderr).
async fn mpsim(sim: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["--sim", sim])
        .args(args)
        .env_remove("MPSIM_URL")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_says_where_it_listens_the_commands_drive_it_and_sigterm_stops_it() {
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--collector-id",
            "178106235",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = serve.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .unwrap()
        .expect("a first line");
    let listening: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(listening["mpsim"], "listening", "{line}");
    assert_eq!(listening["access_token"], "TEST-sim-token");
    assert_eq!(listening["collector_id"], 178_106_235);
    let sim = listening["base_url"].as_str().unwrap().to_owned();
    assert!(sim.starts_with("http://127.0.0.1:"), "{sim}");
    assert!(!sim.ends_with(":0"), "the port the OS picked: {sim}");
    assert_eq!(listening["control"], format!("{sim}/_sim/"));

    let (code, state, _) = mpsim(&sim, &["state"]).await;
    assert_eq!(code, 0);
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["merchant_orders"], serde_json::json!([]));

    let (url, received) = pos().await;
    let (code, out, err) = mpsim(&sim, &["scan", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("{url}: HTTP 200 an order of 798.00 ARS (external_reference pump-1-cli): merchant order 30000000001 opened")
    );
    let (code, out, err) = mpsim(
        &sim,
        &[
            "pay",
            &url,
            "--status",
            "rejected",
            "--status-detail",
            "cc_rejected_insufficient_amount",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("payment 90000000001 rejected (cc_rejected_insufficient_amount): 798.00 ARS on merchant order 30000000001"),
        "{out}"
    );
    assert!(
        out.contains("topic=merchant_order&id=30000000001 -> HTTP 200"),
        "{out}"
    );
    assert_eq!(received.lock().unwrap().len(), 2, "an IPN and a webhook");

    let (code, out, _) = mpsim(&sim, &["withhold-notifications", "on"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("notifications withheld: on"), "{out}");
    let (code, out, _) = mpsim(&sim, &["pay", "pump-1-cli"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("approved (accredited): 798.00 ARS on merchant order 30000000001"),
        "{out}"
    );
    assert!(out.contains("2 notification(s) withheld"), "{out}");
    assert_eq!(received.lock().unwrap().len(), 2);
    let (code, out, _) = mpsim(&sim, &["notify"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.matches("-> HTTP 200").count(), 2, "{out}");
    assert_eq!(received.lock().unwrap().len(), 4);

    let (code, out, _) = mpsim(&sim, &["refund", "90000000002", "98"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("98.00 of 798.00 ARS refunded"), "{out}");

    // Refused by the simulator: 1, with its reason; not reached: 2.
    let (code, _, err) = mpsim(&sim, &["scan", "pump-9"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("\"pump-9\" is no POS URL") && err.contains("(unknown)"),
        "{err}"
    );
    let (code, _, err) = mpsim(&sim, &["pay", "pump-1-cli", "--status", "refunded"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("approved, rejected or in_process"), "{err}");
    let (code, _, err) = mpsim("http://127.0.0.1:9", &["state"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach the simulator"), "{err}");

    let pid = serve.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = serve.wait().await.unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM stops it cleanly");
}

#[tokio::test]
async fn serve_on_a_taken_port_says_so_and_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["serve", "--listen", &address])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no listening line");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {address}")),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--currency", "EUR"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--currency EUR"));
}
