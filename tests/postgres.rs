//! What the PostgreSQL store has beyond the contract it shares with SQLite
//! (tests/store_contract.rs): migrations under a lock, a POS's open sale id
//! unique in the database, TLS and the password, readiness while PostgreSQL
//! is frozen or down, one qrgate per instance name, the leader and its
//! fenced terms, the outbox, turns across instances, and the real app on
//! it: a sale accepted, scanned, paid, and still there after a restart.
//!
//! Skipped, said on stderr, when PostgreSQL is not installed, unless
//! QRGATE_REQUIRE_POSTGRES=1 (tests/common/postgres.rs).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use mpsim::{PaymentOutcome, Scan, Simulator, SimulatorConfig};
use qrgate::app::App;
use qrgate::config::{Broker, Config, Secret};
use qrgate::orders::{ExternalReference, PosConfig, PosId, PosKind, SaleEvent, SaleState};
use qrgate::store::postgres::{migrate, PgTarget};
use qrgate::store::{PgLock, PgStore, SqliteStore, Store, StoreError};
use qrgate_devices::{Device, DeviceConfig, Item};
use rust_decimal::Decimal;

#[path = "common/book.rs"]
mod book;
#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/sales.rs"]
mod sales;
#[path = "common/wait.rs"]
mod wait;

use postgres::{Postgres, SECURED_PASSWORD, SECURED_ROLE};
use sales::{put, sale};
use wait::{wait_for, wait_for_event, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");

/// A plain connection to `url`, for looking at the database itself.
async fn client(url: &str) -> tokio_postgres::Client {
    let (config, tls) = PgTarget::parse(url).unwrap().connector(None).unwrap();
    let (client, connection) = config.connect(tls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn migrations_run_once_and_an_older_database_is_brought_forward() {
    let Some(pg) = postgres::shared() else { return };
    let url = pg.fresh_url();
    let mut c = client(&url).await;
    assert_eq!(
        migrate::run(&mut c, migrate::MIGRATIONS).await.unwrap(),
        [1, 2]
    );
    // A second run finds nothing to do, and changes nothing.
    assert!(migrate::run(&mut c, migrate::MIGRATIONS)
        .await
        .unwrap()
        .is_empty());
    // A newer qrgate adds a step: the database at version 2 is brought
    // forward by it alone.
    let newer = [
        migrate::MIGRATIONS[0],
        migrate::MIGRATIONS[1],
        migrate::Migration {
            version: 3,
            name: "a_later_step",
            sql: "ALTER TABLE sales ADD COLUMN note TEXT",
        },
    ];
    assert_eq!(migrate::run(&mut c, &newer).await.unwrap(), [3]);
    let versions: Vec<i64> = c
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    c.execute("UPDATE sales SET note = 'the column is there'", &[])
        .await
        .unwrap();
    // The older qrgate refuses the newer database rather than guess.
    let e = migrate::run(&mut c, migrate::MIGRATIONS).await.unwrap_err();
    assert!(
        e.to_string().contains("newer than this qrgate knows"),
        "{e}"
    );
    let e = PgStore::connect(&url).await.err().expect("refused");
    assert!(e.to_string().contains("version 3"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_qrgates_opening_one_new_database_at_once_migrate_it_once() {
    let Some(pg) = postgres::shared() else { return };
    let url = pg.fresh_url();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url).await.map(drop) })
        })
        .collect();
    for open in opens {
        open.await.unwrap().unwrap();
    }
    let c = client(&url).await;
    let row = c
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), migrate::MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn a_pos_has_one_open_sale_per_device_sale_id_in_the_database() {
    let Some(pg) = postgres::shared() else { return };
    let store = PgStore::connect(&pg.fresh_url()).await.unwrap();
    let mut first = sale("pump-1", "pump-1-a", "5", SaleState::Pending, 1);
    put(&store, &first, &SaleEvent::Accepted).await.unwrap();
    // A second writer accepting the same device sale (the same message
    // delivered twice) is refused by the database itself.
    let twice = sale("pump-1", "pump-1-b", "5", SaleState::Pending, 1);
    let e = put(&store, &twice, &SaleEvent::Accepted).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Database(m) if m.contains("already has an open sale") && m.contains("pump-1-b")),
        "{e}"
    );
    assert!(store
        .sale(&twice.external_reference)
        .await
        .unwrap()
        .is_none());
    // Another POS, or the same id once the first sale ended (a device reset),
    // is a new sale.
    put(
        &store,
        &sale("pump-2", "pump-2-a", "5", SaleState::Pending, 1),
        &SaleEvent::Accepted,
    )
    .await
    .unwrap();
    first.state = SaleState::Cancelled;
    put(&store, &first, &SaleEvent::Cancelled).await.unwrap();
    put(&store, &twice, &SaleEvent::Accepted).await.unwrap();
}

/// Whether a connection to `url` is encrypted, as the server sees it.
async fn encrypted(url: &str) -> bool {
    client(url)
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn tls_require_and_verify_full_encrypt_and_verify_full_checks_the_certificate() {
    let Some(pg) = postgres::shared() else { return };
    let db = pg.database();
    let base = format!("postgres://qrgate@127.0.0.1:{}/{db}", pg.port);
    let ca = pg.ca().display().to_string();
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let url = format!("{base}?{query}");
        assert!(encrypted(&url).await, "{query}: not encrypted");
        let store = PgStore::connect(&url).await.unwrap();
        store.check_writable().await.unwrap();
    }
    assert!(!encrypted(&format!("{base}?sslmode=disable")).await);
    // A certificate from a CA nobody trusts, or for another name, is refused.
    let refused = [
        format!("{base}?sslmode=verify-full"),
        format!(
            "postgres://qrgate@db.example.com:{}/{db}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}",
            pg.port
        ),
    ];
    for url in refused {
        let e = PgStore::connect(&url).await.err().expect("refused");
        assert!(matches!(e, StoreError::Unavailable(_)), "{url}: {e}");
        assert!(
            e.to_string().to_lowercase().contains("certificate"),
            "{url}: {e}"
        );
    }
}

#[tokio::test]
async fn the_password_comes_from_the_caller_never_the_url() {
    let Some(pg) = postgres::shared() else { return };
    let db = pg.database();
    let target = PgTarget::parse(&format!(
        "postgres://{SECURED_ROLE}@127.0.0.1:{}/{db}?sslmode=disable",
        pg.port
    ))
    .unwrap();
    let e = PgStore::open(&target, None).await.err().expect("refused");
    assert!(e.to_string().contains("password"), "{e}");
    let e = PgStore::open(&target, Some("wrong"))
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );
    assert!(!e.to_string().contains("wrong"), "{e}");
    let store = PgStore::open(&target, Some(SECURED_PASSWORD))
        .await
        .unwrap();
    store.check_writable().await.unwrap();
}

/// Readiness asks `check_writable`: with PostgreSQL frozen it must answer an
/// error (its own timeout), not hang; with PostgreSQL stopped, at once; and
/// once PostgreSQL is back, the store works again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_or_stopped_postgresql_makes_the_store_answer_unavailable_then_it_recovers() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.fresh_url();
    let store = PgStore::connect(&url).await.unwrap();
    store.check_writable().await.unwrap();

    pg.signal(libc::SIGSTOP);
    let started = Instant::now();
    let e = wait_for_event(
        "check_writable answering while PostgreSQL is frozen",
        store.check_writable(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    eprintln!(
        "frozen PostgreSQL: unavailable after {:?}",
        started.elapsed()
    );
    pg.signal(libc::SIGCONT);
    wait_for("the store writable again", || store.check_writable()).await;

    pg.stop();
    let e = wait_for_event(
        "check_writable answering while PostgreSQL is down",
        store.check_writable(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    pg.restart();
    wait_for("the store writable after PostgreSQL's restart", || {
        store.check_writable()
    })
    .await;
    let s = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    put(&store, &s, &SaleEvent::Accepted).await.unwrap();
}

async fn advisory_locks_granted(pg: &Postgres) -> i64 {
    pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    )
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_name_is_held_by_one_qrgate_named_in_a_refusal_freed_on_drop_and_taken_again_after_a_restart(
) {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let target = PgTarget::parse(&pg.fresh_url()).unwrap();
    let first = PgLock::take(&target, None, "qrgate-a", "127.0.0.1:8080".parse().unwrap())
        .await
        .unwrap();
    let e = PgLock::take(&target, None, "qrgate-a", "127.0.0.1:8081".parse().unwrap())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    assert!(text.contains("HTTP on 127.0.0.1:8080"), "{text}");
    assert!(text.contains("as \"qrgate-a\""), "{text}");
    assert!(text.contains("QRGATE_MQTT__CLIENT_ID"), "{text}");
    // Another name shares the database.
    let other = PgLock::take(&target, None, "qrgate-b", "127.0.0.1:8084".parse().unwrap())
        .await
        .unwrap();

    // A restart of PostgreSQL ends the sessions that held them; the holders
    // take them again, and a newcomer under a held name is still refused.
    pg.restart();
    wait_for("both names held again", || async {
        advisory_locks_granted(&pg).await == 2
    })
    .await;
    let e = PgLock::take(&target, None, "qrgate-a", "127.0.0.1:8082".parse().unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("HTTP on 127.0.0.1:8080"), "{e}");
    assert!(!first.lost().is_cancelled());
    assert!(!other.lost().is_cancelled());

    drop(first);
    let second = wait_for("the name free once its holder dropped it", || async {
        PgLock::take(&target, None, "qrgate-a", "127.0.0.1:8083".parse().unwrap())
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert!(!second.lost().is_cancelled());
}

// ---- The real app on PostgreSQL ----

static BROKER: OnceLock<u16> = OnceLock::new();

/// The test binary's embedded broker (it cannot be shut down: each app
/// gets its own topic prefix).
fn broker_port() -> u16 {
    *BROKER.get_or_init(|| {
        qrgate::mqtt::broker::start(
            "127.0.0.1:0".parse().unwrap(),
            16 * 1024,
            qrgate::mqtt::broker::Access::Anonymous,
            None,
            None,
        )
        .unwrap()
        .addr
        .port()
    })
}

fn app_config(url: &str, mp: &Simulator, prefix: &str, listener: &TcpListener) -> Config {
    let mut config = Config::defaults();
    config.http.listen = listener.local_addr().unwrap();
    config.http.public_url = format!("http://{}", config.http.listen);
    config.mercadopago.api_base = mp.base_url();
    config.mercadopago.access_token = Some(Secret::new(SimulatorConfig::default().access_token));
    config.mercadopago.collector_id = SimulatorConfig::default().collector_id;
    config.mqtt.broker = Broker::External {
        host: "127.0.0.1".into(),
        port: broker_port(),
        tls: false,
    };
    config.mqtt.topic_prefix = prefix.into();
    config.mqtt.client_id = format!("qrgate-{prefix}");
    config.admin.listen = None;
    config.store.url = Some(PgTarget::parse(url).unwrap());
    config.pos = vec![pos("pump-1", PosKind::Fuel)];
    config
}

fn pos(id: &str, kind: PosKind) -> PosConfig {
    PosConfig {
        max_amount: Decimal::from(1_000_000),
        ..PosConfig::new(
            PosId::parse(id).unwrap(),
            kind,
            qrgate::money::Currency::Ars,
        )
    }
}

/// A running app: its HTTP address and the handle that stops it.
struct Running {
    http: std::net::SocketAddr,
    book: std::sync::Arc<qrgate::book::Book>,
    stop: tokio_util::sync::CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

async fn run(config: Config, listener: TcpListener) -> Running {
    let app = App::build_on(config, listener).await.expect("app builds");
    let (http, book, stop) = (app.http_addr(), app.book(), app.shutdown_token());
    let done = tokio::spawn(async move { app.run_until_stopped().await.unwrap() });
    let ready = format!("http://{http}/readyz");
    wait_for("the app ready", || async {
        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    Running {
        http,
        book,
        stop,
        done,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.done.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_paid_on_postgresql_is_still_there_with_its_timeline_after_a_restart() {
    let Some(pg) = postgres::shared() else { return };
    let url = pg.fresh_url();
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let prefix = format!("pg{}", std::process::id());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = app_config(&url, &mp, &prefix, &listener);
    let app = run(config.clone(), listener).await;
    let pump = Device::connect(
        DeviceConfig::new("127.0.0.1", broker_port(), "pump-1")
            .topic_prefix(prefix.clone())
            .client_id(format!("{prefix}-pump"))
            .without_presence(),
    )
    .await
    .unwrap();
    pump.publish_sale("s1", &[Item::new("Super", "10", "100.00")], None)
        .await
        .unwrap();
    let pending = pump.wait_for("s1", "pending", WAIT).await.unwrap();
    let reference = ExternalReference::parse(&pending.external_reference.unwrap()).unwrap();
    let order = match mp
        .scan(&format!("http://{}/mp/pos/pump-1", app.http))
        .await
        .unwrap()
    {
        Scan::Order(o) => o,
        other => panic!("the scan got no order: {other:?}"),
    };
    mp.pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    let told = pump.wait_for("s1", "paid", WAIT).await.unwrap();
    assert_eq!(told.amount.as_deref(), Some("1000.00"));
    let timeline = |store: std::sync::Arc<dyn Store>| {
        let reference = reference.clone();
        async move {
            store
                .timeline(&reference)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.1)
                .collect::<Vec<_>>()
        }
    };
    let before = timeline(app.book.store().clone()).await;
    assert_eq!(before, ["accepted", "served", "paid"]);
    app.stop().await;

    // Restarted on the same database: the book is rebuilt from it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let app = run(app_config(&url, &mp, &prefix, &listener), listener).await;
    let store = app.book.store().clone();
    let sale = store.sale(&reference).await.unwrap().unwrap();
    assert_eq!(sale.state, SaleState::Paid);
    assert_eq!(
        sale.settled.unwrap().merchant_order,
        order.merchant_order_id
    );
    assert_eq!(timeline(store.clone()).await, before);
    let mo = store
        .merchant_order(&qrgate::orders::MpId::Num(order.merchant_order_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mo.status, "closed");
    // Paid and not yet delivered: the new book repeats `paid` to the pump.
    let undelivered: Vec<_> = app
        .book
        .undelivered()
        .into_iter()
        .map(|s| s.external_reference)
        .collect();
    assert_eq!(undelivered, std::slice::from_ref(&reference));
    pump.delivered("s1", true, None).await.unwrap();
    wait_for("the delivery recorded", || async {
        timeline(store.clone()).await.last().map(String::as_str) == Some("delivered")
    })
    .await;
    app.stop().await;
}

/// A `qrgate serve` of the real binary on `config`, its HTTP address read
/// from its log; killed when dropped.
struct Serving {
    child: Child,
    http: String,
}

impl Serving {
    fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Serving {
        let mut child = Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let http = lines
            .by_ref()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .find(|v| v["message"] == "HTTP listening")
            .and_then(|v| v["listen"].as_str().map(str::to_owned))
            .expect("an HTTP line");
        // The rest of the log is read so that the child never blocks on it.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        Serving { child, http }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("qrgate.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"\"\n[http]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9\"\n\
             [mqtt]\nembedded_listen = \"127.0.0.1:0\"\nallow_anonymous = true\n\
             [store]\nurl = \"{url}\"\npath = \"{}\"\n[log]\nformat = \"json\"\n\
             [[pos]]\nid = \"pump-7\"\nkind = \"fuel\"\n",
            dir.join("unused.db").display()
        ),
    )
    .unwrap();
    path
}

fn qrgate(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("QRGATE_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_qrgate_under_the_same_name_refuses_to_start_naming_the_first_and_another_name_starts(
) {
    let Some(pg) = postgres::shared() else { return };
    let db = pg.database();
    let dir = tempfile::tempdir().unwrap();
    // The first logs in with its password, from a file.
    let url = format!(
        "postgres://{SECURED_ROLE}@127.0.0.1:{}/{db}?sslmode=disable",
        pg.port
    );
    let config = write_config(dir.path(), &url);
    let password = dir.path().join("store_password");
    std::fs::write(&password, format!("{SECURED_PASSWORD}\n")).unwrap();
    let secret = [("QRGATE_STORE_PASSWORD_FILE", password.to_str().unwrap())];
    let mut first = Serving::start(&config, &secret);

    let (code, _, err) = qrgate(&config, &["serve"], &secret);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("pid {}", first.child.id())), "{err}");
    assert!(err.contains(&format!("HTTP on {}", first.http)), "{err}");
    assert!(err.contains("another qrgate serves the store"), "{err}");
    assert!(!err.contains(SECURED_PASSWORD), "{err}");
    // Under its own name, a second instance shares the database.
    let mut secret_b = secret.to_vec();
    secret_b.push(("QRGATE_MQTT__CLIENT_ID", "qrgate-b"));
    let second = Serving::start(&config, &secret_b);
    assert_ne!(second.http, first.http);
    // Without the password: a clear error, not a hang.
    let (code, _, err) = qrgate(&config, &["serve"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("password"), "{err}");

    // The same, in process.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut in_process = Config::load_with(Some(&config), &|_| None).unwrap();
    in_process.store.password = Some(Secret::new(SECURED_PASSWORD));
    let e = App::build_on(in_process.clone(), listener)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{e:#}").contains(&format!("pid {}", first.child.id())),
        "{e:#}"
    );

    // kill -9 of the holder ends its session: the next start takes over.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let app = wait_for("a start after the holder died", || {
        let config = in_process.clone();
        async move {
            App::build_on(config, TcpListener::bind("127.0.0.1:0").unwrap())
                .await
                .map_err(|e| format!("{e:#}"))
        }
    })
    .await;
    let c = client(&pg.url(&db)).await;
    let holder = c
        .query_one("SELECT pid FROM instances WHERE name = 'qrgate'", &[])
        .await
        .unwrap();
    assert_eq!(holder.get::<_, i64>(0), i64::from(std::process::id()));
    drop(app);
}

#[test]
fn backup_names_pg_dump_and_check_config_shows_the_url_and_where_the_password_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres://qrgate@db.example.com:5432/qrgate?sslmode=verify-full";
    let config = write_config(dir.path(), url);
    let (code, _, err) = qrgate(&config, &["backup", "/tmp/never.db"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("pg_dump"), "{err}");
    assert!(!std::path::Path::new("/tmp/never.db").exists());
    let (code, out, err) = qrgate(
        &config,
        &["check-config"],
        &[("QRGATE_STORE_PASSWORD", "pg-s3cret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("url = \"{url}\"")), "{out}");
    assert!(
        out.contains("# QRGATE_STORE_PASSWORD = \"***\"  (from QRGATE_STORE_PASSWORD)"),
        "{out}"
    );
    assert!(!out.contains("pg-s3cret"), "{out}");
    let with_password = write_config(dir.path(), "postgres://qrgate:pg-s3cret@db/qrgate");
    let (code, _, err) = qrgate(&with_password, &["check-config"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("QRGATE_STORE_PASSWORD") && !err.contains("pg-s3cret"),
        "{err}"
    );
}

// ---- Measurements (`cargo test --release --test postgres -- --ignored --nocapture`) ----

/// `record` writes per second on each engine, one writer and 16 at once:
/// numbers for docs/operations.md, not an assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn record_throughput_on_each_engine() {
    const SALES: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    // A server of its own, durable as in production.
    let pg = Postgres::start();
    if let Some(pg) = &pg {
        pg.psql("postgres", "ALTER SYSTEM SET fsync = on");
        pg.psql("postgres", "ALTER SYSTEM SET full_page_writes = on");
        pg.psql("postgres", "SELECT pg_reload_conf()");
        assert_eq!(pg.psql("postgres", "SHOW fsync"), "on");
    }
    for writers in [1usize, 16] {
        let mut engines: Vec<(&str, std::sync::Arc<dyn Store>)> = vec![(
            "sqlite (fsync on)",
            std::sync::Arc::new(
                SqliteStore::open(&dir.path().join(format!("w{writers}.db")), true).unwrap(),
            ),
        )];
        if let Some(pg) = &pg {
            engines.push((
                "postgresql (fsync on)",
                std::sync::Arc::new(PgStore::connect(&pg.fresh_url()).await.unwrap()),
            ));
        }
        for (name, store) in engines {
            let started = Instant::now();
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let store = std::sync::Arc::clone(&store);
                    tokio::spawn(async move {
                        // Each writer its own POS, whose version it knows.
                        let mut version = 0;
                        for n in (w..SALES).step_by(writers) {
                            let s = sale(
                                &format!("pump-{w}"),
                                &format!("pump-{w}-{n}"),
                                &n.to_string(),
                                SaleState::Cancelled,
                                1,
                            );
                            version = store
                                .record(&s, &SaleEvent::Accepted, version)
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{name}, {writers} writer(s): {SALES} records in {secs:.2} s = {:.0}/s",
                SALES as f64 / secs
            );
        }
    }
}

fn device_sale(pos: &str, sale_id: &str, price: &str) -> qrgate::orders::Command {
    let body = format!(
        r#"{{"sale_id":"{sale_id}","items":[{{"title":"Super 95","quantity":"1","unit_price":"{price}"}}]}}"#
    );
    qrgate::mqtt::inbound::parse(
        qrgate::mqtt::topics::DeviceTopic::Sale,
        pos,
        body.as_bytes(),
        16 * 1024,
    )
    .unwrap()
}

/// Two books on one PostgreSQL, as two instances: a change one stores is
/// heard by the other as it commits (`pg_notify`), and shown by its polls
/// with the same bytes. PostgreSQL restarts: the other's listening session
/// comes back, catches up on what it could not hear, and goes on hearing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stored_by_one_book_is_served_by_the_other_as_it_commits_and_after_postgresql_restarts(
) {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.fresh_url();
    let pumps = || vec![pos("pump-1", PosKind::Fuel), pos("pump-2", PosKind::Fuel)];
    let a_store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(PgStore::connect(&url).await.unwrap());
    let b_store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(PgStore::connect(&url).await.unwrap());
    let (a, _) = book::book_on(a_store, pumps()).await;
    let (b, mut b_told) = book::book_on(std::sync::Arc::clone(&b_store), pumps()).await;
    let b = std::sync::Arc::new(b);
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(std::sync::Arc::clone(&b).follow_changes(b_store.changes(stop).unwrap()));

    let one = PosId::parse("pump-1").unwrap();
    a.execute(&one, device_sale("pump-1", "1", "100.00"))
        .await
        .unwrap();
    wait_for("B serving A's sale", || async {
        b.poll("pump-1").status == 200
    })
    .await;
    assert_eq!(
        b.poll("pump-1").body,
        a.poll("pump-1").body,
        "the same bytes"
    );
    assert!(
        b_told.try_recv().is_err(),
        "B tells the device nothing of A's change"
    );

    // Every session ends; A's change meanwhile is not heard, then caught up.
    pg.restart();
    let two = PosId::parse("pump-2").unwrap();
    wait_for("A storing again after the restart", || async {
        a.execute(&two, device_sale("pump-2", "7", "50.00")).await
    })
    .await;
    wait_for("B serving A's sale on pump-2", || async {
        b.poll("pump-2").status == 200
    })
    .await;
    assert_eq!(b.poll("pump-2").body, a.poll("pump-2").body);
    let cancel = qrgate::mqtt::inbound::parse(
        qrgate::mqtt::topics::DeviceTopic::Cancel,
        "pump-1",
        br#"{"sale_id":"1"}"#,
        1024,
    )
    .unwrap();
    a.execute(&one, cancel).await.unwrap();
    wait_for("B hearing the cancel", || async {
        b.poll("pump-1").status == 400
    })
    .await;
}

/// PostgreSQL stops under a running qrgate: polls still answer from memory,
/// so the pending sale stays payable; readiness drops; the device's cancel
/// is held unacknowledged, not lost. PostgreSQL comes back: the cancel is
/// stored, the device hears it, polls stop serving the sale, and readiness
/// returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_is_down_polls_answer_from_memory_and_a_device_message_waits_for_it() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.fresh_url();
    let mp = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let prefix = format!("pgdown{}", std::process::id());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let app = run(app_config(&url, &mp, &prefix, &listener), listener).await;
    let pump = Device::connect(
        DeviceConfig::new("127.0.0.1", broker_port(), "pump-1")
            .topic_prefix(prefix.clone())
            .client_id(format!("{prefix}-pump"))
            .without_presence(),
    )
    .await
    .unwrap();
    pump.publish_sale("s1", &[Item::new("Super", "10", "100.00")], None)
        .await
        .unwrap();
    pump.wait_for("s1", "pending", WAIT).await.unwrap();
    let http = reqwest::Client::new();
    let poll = format!("http://{}/mp/pos/pump-1", app.http);
    let ready = format!("http://{}/readyz", app.http);
    let answered = http.get(&poll).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    let body = answered.text().await.unwrap();

    pg.stop();
    wait_for("readiness dropping", || async {
        http.get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let answered = http.get(&poll).send().await.unwrap();
    assert_eq!(answered.status(), 200, "polls answer from memory");
    assert_eq!(answered.text().await.unwrap(), body, "the same bytes");
    pump.cancel("s1").await.unwrap();
    // Held past what a few quick retries would cover (200 ms growing to
    // 5 s a try: the sixth comes after 3 s).
    let held = || app.book.metrics().device_messages_held.get();
    wait_for("the cancel tried six times", || async { held() >= 6 }).await;

    pg.restart();
    pump.wait_for("s1", "cancelled", WAIT).await.unwrap();
    assert_ne!(http.get(&poll).send().await.unwrap().status(), 200);
    wait_for("readiness back", || async {
        http.get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let store = app.book.store().clone();
    let head = store.pos_head("pump-1").await.unwrap();
    assert_eq!(head.latest.unwrap().state, SaleState::Cancelled);
    app.stop().await;
}

/// A measurement, not an assertion: from a sale stored and shown on one
/// book (`execute` returned) to another book on the same PostgreSQL serving
/// it through the change feed, 1,000 times over 50 POS (a sale, then its
/// cancel, each heard). `cargo test --test postgres -- --ignored
/// served_elsewhere --nocapture`; docs/performance.md has the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn served_elsewhere_latency() {
    const POS: usize = 50;
    const SALES: usize = 1_000;
    let Some(pg) = Postgres::start() else { return };
    pg.psql("postgres", "ALTER SYSTEM SET fsync = on");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let url = pg.fresh_url();
    let pumps: Vec<PosConfig> = (0..POS)
        .map(|i| pos(&format!("pump-{i}"), PosKind::Fuel))
        .collect();
    let a_store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(PgStore::connect(&url).await.unwrap());
    let b_store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(PgStore::connect(&url).await.unwrap());
    let (a, _) = book::book_on(a_store, pumps.clone()).await;
    let (b, _) = book::book_on(std::sync::Arc::clone(&b_store), pumps).await;
    let b = std::sync::Arc::new(b);
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(std::sync::Arc::clone(&b).follow_changes(b_store.changes(stop).unwrap()));
    let mut from_commit = Vec::with_capacity(SALES);
    for n in 0..SALES {
        let (i, round) = (n % POS, n / POS);
        let name = format!("pump-{i}");
        let id = PosId::parse(&name).unwrap();
        let sale_id = format!("s{round}");
        let (cmd, served) = if round % 2 == 0 {
            (device_sale(&name, &sale_id, "100.00"), 200)
        } else {
            let prev = format!(r#"{{"sale_id":"s{}"}}"#, round - 1);
            (
                qrgate::mqtt::inbound::parse(
                    qrgate::mqtt::topics::DeviceTopic::Cancel,
                    &name,
                    prev.as_bytes(),
                    1024,
                )
                .unwrap(),
                400,
            )
        };
        a.execute(&id, cmd).await.unwrap();
        let committed = Instant::now();
        wait_for_event("B serving A's change", async {
            while b.poll(&name).status != served {
                tokio::task::yield_now().await;
            }
        })
        .await;
        from_commit.push(committed.elapsed());
    }
    from_commit.sort();
    let at =
        |q: f64| from_commit[((from_commit.len() as f64 * q) as usize).min(from_commit.len() - 1)];
    eprintln!(
        "served elsewhere after the commit, {SALES} changes over {POS} POS: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        from_commit.last().unwrap()
    );
}

// ---- Several instances: leadership, fencing, the outbox, turns ----

/// The term `leading` holds once it holds one.
async fn leads(leading: &tokio::sync::watch::Receiver<Option<u64>>) -> u64 {
    let mut leading = leading.clone();
    let term = match tokio::time::timeout(WAIT, leading.wait_for(Option::is_some)).await {
        Ok(Ok(term)) => *term,
        _ => None,
    };
    term.expect("a term within the wait")
}

/// The leadership row: its term and holder.
async fn leadership_row(c: &tokio_postgres::Client) -> (u64, String) {
    let r = c
        .query_one("SELECT term, holder FROM leadership", &[])
        .await
        .unwrap();
    (r.get::<_, i64>(0) as u64, r.get::<_, String>(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_at_a_time_and_a_former_leaders_writes_are_refused_by_its_term() {
    use qrgate::store::fence;
    use tokio_util::sync::CancellationToken;
    let Some(pg) = postgres::shared() else { return };
    let url = pg.fresh_url();
    let a = PgStore::connect(&url).await.unwrap().named("a");
    let b = PgStore::connect(&url).await.unwrap().named("b");
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let leading_a = a.leadership("a", stop_a.clone());
    let first = leads(&leading_a).await;
    let leading_b = b.leadership("b", stop_b.clone());
    let c = client(&url).await;
    assert_eq!(leadership_row(&c).await, (first, "a".to_owned()));

    // The leader's term writes; a write with no term (a device's, a
    // poll's) is never fenced.
    let mut s = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    fence::under(first, put(&a, &s, &SaleEvent::Accepted))
        .await
        .unwrap();
    assert!(leading_b.borrow().is_none(), "b follows while a leads");

    // a stops leading (its session ends): b leads, under a newer term.
    stop_a.cancel();
    let second = leads(&leading_b).await;
    assert!(second > first, "{second} > {first}");
    assert_eq!(leadership_row(&c).await, (second, "b".to_owned()));

    // What a does under its old term is refused and writes nothing, through
    // a transaction or a single statement alike.
    let before = a.pos_head("pump-1").await.unwrap().version;
    s.state = SaleState::Expired;
    let e = fence::under(first, put(&a, &s, &SaleEvent::Expired))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Fenced { term } if term == first),
        "{e}"
    );
    assert_eq!(a.pos_head("pump-1").await.unwrap().version, before);
    let entry = a.inbox_add("merchant_order", "77", 1).await.unwrap();
    let e = fence::under(
        first,
        a.inbox_retry("merchant_order", "77", entry.generation, 1, 99, "x"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
    let e = fence::under(
        first,
        a.inbox_done("merchant_order", "77", entry.generation, 2, "paid"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
    assert_eq!(a.inbox_pending().await.unwrap(), [entry]);
    // b's term writes.
    fence::under(second, put(&b, &s, &SaleEvent::Expired))
        .await
        .unwrap();
    stop_b.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_is_kept_with_its_change_and_due_past_its_lease_until_marked_told() {
    let Some(pg) = postgres::shared() else { return };
    let store = PgStore::connect(&pg.fresh_url()).await.unwrap().named("a");
    let s1 = sale("pump-1", "pump-1-a", "1", SaleState::Pending, 1);
    let s2 = sale("pump-2", "pump-2-a", "1", SaleState::Pending, 1);
    // Told and marked at once, as a connected instance does.
    let v1 = store
        .record_to_tell(&s1, &SaleEvent::Accepted, 0)
        .await
        .unwrap();
    store.outbox_told(&[("pump-1".into(), v1)]).await.unwrap();
    // Never marked, as when its instance died before publishing; and a
    // change that tells nothing keeps no row.
    let v2 = store
        .record_to_tell(&s2, &SaleEvent::Accepted, 0)
        .await
        .unwrap();
    let mut served = s2.clone();
    served.served_at = Some(2);
    store.record(&served, &SaleEvent::Served, v2).await.unwrap();
    let due = wait_for("the unmarked row due past its lease", || async {
        Some(store.outbox_due(10).await.unwrap()).filter(|d| !d.is_empty())
    })
    .await;
    assert_eq!(due, [("pump-2".to_owned(), v2)]);
    // The sweep told it: nothing is due any more.
    store.outbox_told(&due).await.unwrap();
    assert!(store.outbox_due(10).await.unwrap().is_empty());
    // A failed change writes no row.
    let e = store
        .record_to_tell(&s1, &SaleEvent::Cancelled, 0)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Stale { .. }), "{e}");
    let c = client(&pg.url(&url_db(&store))).await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
}

/// The database a store's URL names.
fn url_db(store: &PgStore) -> String {
    store
        .target()
        .to_string()
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_taken_by_one_instance_is_waited_for_by_another_until_it_ends() {
    let Some(pg) = postgres::shared() else { return };
    let url = pg.fresh_url();
    let a = PgStore::connect(&url).await.unwrap();
    let b = std::sync::Arc::new(PgStore::connect(&url).await.unwrap());
    let held = a
        .exclusive("refund pump-1-a")
        .await
        .unwrap()
        .expect("a turn");
    // Another turn is free meanwhile.
    drop(b.exclusive("refund pump-1-b").await.unwrap());
    let waiting = {
        let b = std::sync::Arc::clone(&b);
        tokio::spawn(async move { b.exclusive("refund pump-1-a").await.map(drop) })
    };
    let c = client(&url).await;
    wait_for("b waiting for a's turn", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    assert!(!waiting.is_finished());
    drop(held);
    waiting.await.unwrap().unwrap();
}
