//! Wiring: `App::build` opens the store, starts (or reaches) the broker,
//! loads the order book, binds HTTP and spawns the background tasks; tests
//! build it with port 0 everywhere and read the ports back.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::book::{Book, BookSettings};
use crate::clock::Clock;
use crate::config::Secret;
use crate::config::{Broker, Config};
use crate::inbox::{self, InboxSettings};
use crate::link::LinkState;
use crate::mercadopago::client::MpClient;
use crate::mercadopago::poll_answer::MpAccount;
use crate::mqtt::broker;
use crate::mqtt::connection::{self, Endpoint};
use crate::orders::Command;
use crate::store::{Heard, InstanceLock, PgLock, PgStore, SqliteStore, Store};

/// Two TLS stacks are linked (reqwest's and rumqttc's), so rustls cannot pick
/// its crypto provider by itself: choose one for the process, once.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct App {
    http_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    mqtt_tls_addr: Option<SocketAddr>,
    server: actix_web::dev::Server,
    admin_addr: Option<SocketAddr>,
    admin_server: Option<actix_web::dev::Server>,
    book: Arc<Book>,
    link: Arc<LinkState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    db_lock: crate::store::InstanceLock,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        // Bind HTTP before anything starts in the background, so a taken
        // port fails the start cleanly.
        let listener = TcpListener::bind(config.http.listen).with_context(|| {
            format!(
                "cannot listen for HTTP on {} (key `http.listen`)",
                config.http.listen
            )
        })?;
        App::build_on(config, listener).await
    }

    /// Builds on a listener bound by the caller (tests bind port 0 first, to
    /// put the real port in `public_url`).
    pub async fn build_on(config: Config, listener: TcpListener) -> anyhow::Result<App> {
        App::build_timed(config, listener, Clock::system()).await
    }

    /// Builds on the caller's listener with the caller's clock: tests of
    /// TTLs and schedules move it forward rather than wait.
    pub async fn build_timed(
        mut config: Config,
        listener: TcpListener,
        clock: Clock,
    ) -> anyhow::Result<App> {
        install_crypto();
        // The console's port is checked before anything starts, too.
        let admin_listener = match config.admin.listen {
            Some(addr) => Some(TcpListener::bind(addr).with_context(|| {
                format!(
                    "cannot listen for the console on {addr} (key `admin.listen`; \"\" turns the console off)"
                )
            })?),
            None => None,
        };
        // The instance's name: its persistent session at the broker, and
        // who it is among the instances sharing a PostgreSQL store.
        let name = config.mqtt.client_id.clone();
        // One qrgate per SQLite file, one per name on PostgreSQL: taken
        // before the store opens.
        let (store, db_lock): (Arc<dyn Store>, InstanceLock) = match &config.store.url {
            Some(url) => {
                let password = config.store.password.as_ref().map(Secret::expose);
                let lock = PgLock::take(url, password, &name, listener.local_addr()?).await?;
                let store = PgStore::open(url, password)
                    .await
                    .with_context(|| format!("cannot open the store {url}"))?
                    .named(&name);
                tracing::info!(store = %url, tls = url.tls().as_str(), "store: PostgreSQL");
                (Arc::new(store), InstanceLock::Postgres(lock))
            }
            None => {
                let lock = crate::store::DbLock::take(&config.store.path, listener.local_addr()?)?;
                let store = SqliteStore::open_with(
                    &config.store.path,
                    config.store.fsync,
                    config.store.checkpoints,
                )
                .with_context(|| {
                    format!("cannot open the store {}", config.store.path.display())
                })?;
                (Arc::new(store), InstanceLock::File(lock))
            }
        };
        let http_addr = listener.local_addr()?;
        // Unset, public_url is the listener's: its real port, when the OS
        // picked it.
        if config.http.public_url_follows_listen && config.http.listen.port() == 0 {
            config.http.public_url = format!("http://{http_addr}");
        }

        let (endpoint, mqtt_addr, mqtt_tls_addr, door) = match &config.mqtt.broker {
            Broker::Embedded => {
                let m = &config.mqtt;
                // qrgate's own login, new at every start, known only here.
                let internal = (
                    "qrgate.internal".to_owned(),
                    Secret::new(hex::encode(rand::random::<[u8; 24]>())),
                );
                let access = if m.allow_anonymous {
                    broker::Access::Anonymous
                } else {
                    broker::Access::Users(m.users.clone())
                };
                let tls = match (m.embedded_tls_listen, &m.tls_cert, &m.tls_key) {
                    (Some(listen), Some(cert), Some(key)) => Some(broker::Tls {
                        listen,
                        cert: cert.clone(),
                        key: key.clone(),
                    }),
                    _ => None,
                };
                let login = (!m.allow_anonymous).then_some(internal);
                // qrgate's client id is its own login's alone (mqtt::logins).
                let own = login.clone().map(|(username, password)| broker::OwnLogin {
                    username,
                    password,
                    client_id: m.client_id.clone(),
                });
                let at = broker::start_with(
                    m.embedded_listen,
                    m.max_payload_bytes,
                    access,
                    tls,
                    own,
                    m.embedded_ingress,
                )?;
                tracing::info!(listen = %at.addr, tls_listen = at.tls_addr.map(|a| a.to_string()),
                    devices = m.users.len(), "embedded MQTT broker listening");
                if m.allow_anonymous {
                    tracing::warn!("the embedded MQTT broker accepts anonymous clients: for development only; \
                        give each [[pos]] a device_password_env in production");
                }
                if m.embedded_unconfined {
                    tracing::warn!("the embedded MQTT broker listens beyond loopback and cannot confine a device to \
                        its own topics: a device can publish for another POS. Confinement needs Mosquitto with \
                        deploy/mosquitto.acl");
                }
                let endpoint = Endpoint {
                    host: at.addr.ip().to_string(),
                    port: at.addr.port(),
                    login,
                    tls_ca: None,
                };
                (endpoint, at.addr, at.tls_addr, Some(at.door))
            }
            Broker::External { host, port, tls } => {
                let addr = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], *port)));
                tracing::info!(broker = %format!("{host}:{port}"), tls, "using an external MQTT broker");
                let tls_ca = match (&config.mqtt.tls_ca, tls) {
                    (Some(ca), true) => Some(
                        std::fs::read(ca)
                            .with_context(|| format!("cannot read mqtt.tls_ca {}", ca.display()))?,
                    ),
                    _ => None,
                };
                let login = match (&config.mqtt.username, &config.mqtt.password) {
                    (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                    (Some(u), None) => Some((u.clone(), Secret::new(""))),
                    _ => None,
                };
                let endpoint = Endpoint {
                    host: host.clone(),
                    port: *port,
                    login,
                    tls_ca,
                };
                (endpoint, addr, None, None)
            }
        };

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let InstanceLock::Postgres(lock) = &db_lock {
            // Another qrgate took the database while this one was cut off.
            let (lost, shutdown) = (lock.lost(), shutdown.clone());
            tracker.spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => shutdown.cancel(),
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        let (publish_tx, publish_rx) = mpsc::unbounded_channel();
        let (served_tx, mut served_rx) = mpsc::unbounded_channel();
        let any_attended = config
            .pos
            .iter()
            .any(|p| p.mode == crate::orders::PosMode::Attended);
        let (attended_tx, attended_rx) = mpsc::unbounded_channel();
        let ctx = MpAccount {
            poll_protocol: config.mercadopago.poll_protocol,
            collector_id: config.mercadopago.collector_id,
            sponsor_id: config.mercadopago.sponsor_id,
            notification_url: config.http.notification_url(),
        };
        let book = Arc::new(
            Book::load(
                config.pos.clone(),
                Arc::clone(&store),
                ctx.clone(),
                BookSettings {
                    collector_id: config.mercadopago.collector_id,
                    auto_refund: config.orders.auto_refund,
                    poll_protocol: config.mercadopago.poll_protocol,
                    attended: any_attended.then_some(attended_tx),
                    clock: clock.clone(),
                },
                publish_tx,
                served_tx,
            )
            .await?,
        );

        let leading = store.leadership(&name, shutdown.clone());
        // Whether it leads decides what it tells devices at its first
        // connection to the broker (the leader republishes every state):
        // known before it connects. SQLite's one process leads from the
        // start.
        {
            let mut first = leading.clone();
            let _ = tokio::time::timeout(Duration::from_secs(5), first.changed()).await;
        }
        book.set_leading(leading.borrow().is_some());
        let (inbox, woken) = inbox::Inbox::new(Arc::clone(&store), clock.clone(), leading.clone());
        // What other instances store, as they commit (PostgreSQL): changes
        // for the book, notifications written for the leader's inbox.
        if let Some(mut heard) = store.changes(shutdown.clone()) {
            book.set_shared();
            let (changes, followed) = mpsc::unbounded_channel();
            tracker.spawn(Arc::clone(&book).follow_changes(followed));
            let inbox = inbox.clone();
            tracker.spawn(async move {
                while let Some(h) = heard.recv().await {
                    match h {
                        Heard::Inbox(entry) => inbox.heard(inbox::Wake::Entry(entry)),
                        Heard::Gap => {
                            inbox.heard(inbox::Wake::Reread);
                            let _ = changes.send(Heard::Gap);
                        }
                        change => {
                            let _ = changes.send(change);
                        }
                    }
                }
            });
        }
        let link = connection::spawn(
            &config.mqtt,
            endpoint,
            Arc::clone(&book),
            publish_rx,
            shutdown.clone(),
            &tracker,
        );
        if let Some(door) = door {
            // The embedded broker keeps no session across restarts: a device
            // let in before qrgate subscribed could sell to no one.
            let (link, shutdown) = (Arc::clone(&link), shutdown.clone());
            tracker.spawn(async move {
                tokio::select! {
                    _ = link.until_ready() => {
                        door.open();
                        tracing::info!("the embedded broker takes device connections");
                    }
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        let client = MpClient::new(&config.mercadopago)?.with_metrics(Arc::clone(book.metrics()));
        // The inbox retries with its own backoff, across restarts: one
        // attempt per fetch.
        let inbox_client = client
            .clone()
            .with_retry(crate::mercadopago::client::RetryPolicy {
                attempts: 1,
                ..Default::default()
            });
        let inbox_settings = InboxSettings {
            window: Duration::from_secs(config.orders.reconcile_window_secs),
            retry_max: Duration::from_secs(config.orders.notification_retry_max_secs),
        };
        if any_attended {
            crate::attended::spawn(
                crate::attended::Placer::new(
                    client.clone(),
                    Arc::clone(&book),
                    config.mercadopago.attended_api,
                    config.mercadopago.collector_id,
                    ctx.clone(),
                )
                .with_order_life(config.mercadopago.attended_order),
                attended_rx,
                shutdown.clone(),
                &tracker,
            );
        }
        let singletons = {
            let (book, store, client, orders, link) = (
                Arc::clone(&book),
                Arc::clone(&store),
                client.clone(),
                config.orders.clone(),
                Arc::clone(&link),
            );
            let retention = crate::retention::Retention::new(&config.store, &config.orders);
            let paid_every = Duration::from_secs(config.orders.paid_republish_secs);
            move |stop: CancellationToken| -> Vec<crate::leadership::Work> {
                vec![
                    Box::pin(inbox::work(
                        inbox_client.clone(),
                        Arc::clone(&book),
                        inbox_settings,
                        Arc::clone(&woken),
                        stop.clone(),
                    )),
                    Box::pin(crate::reconcile::run(
                        client.clone(),
                        Arc::clone(&book),
                        orders.clone(),
                        stop.clone(),
                    )),
                    Box::pin(crate::retention::run(
                        Arc::clone(&store),
                        retention.clone(),
                        book.clock().clone(),
                        stop.clone(),
                    )),
                    Box::pin(crate::refunds::run(
                        client.clone(),
                        Arc::clone(&book),
                        stop.clone(),
                    )),
                    Box::pin(repeat_paid(Arc::clone(&book), paid_every, stop.clone())),
                    Box::pin(sweep_outbox(
                        Arc::clone(&book),
                        Arc::clone(&link),
                        stop.clone(),
                    )),
                    Box::pin(expire(Arc::clone(&book), stop)),
                ]
            }
        };
        let said = {
            let book = Arc::clone(&book);
            move |yes: bool| book.set_leading(yes)
        };
        tracker.spawn(crate::leadership::run(
            leading,
            singletons,
            said,
            Arc::clone(book.metrics()),
            shutdown.clone(),
        ));
        let token_status = Arc::new(crate::mercadopago::account_check::TokenStatus::default());
        tracker.spawn(crate::mercadopago::account_check::run(
            client.clone(),
            Arc::clone(&token_status),
            Arc::clone(book.metrics()),
            config.mercadopago.token_check,
            shutdown.clone(),
        ));
        let readiness = crate::http::health::Readiness::new(
            Arc::clone(&store),
            Arc::clone(&link),
            token_status,
            Arc::clone(book.metrics()),
        );
        // Marks served sales off the poll path.
        {
            let book = Arc::clone(&book);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                loop {
                    let (pos, reference) = tokio::select! {
                        r = served_rx.recv() => match r { Some(r) => r, None => break },
                        _ = shutdown.cancelled() => break,
                    };
                    if let Err(e) = book.execute(&pos, Command::Served(reference)).await {
                        tracing::error!(pos = %pos, error = %e, "cannot record that a sale was served");
                    }
                }
            });
        }
        let shared = web::Data::new(crate::http::State {
            book: Arc::clone(&book),
            inbox,
            link: Arc::clone(&link),
            poll_access: crate::http::poll::PollAccess::new(&config.http.poll_keys, &config.pos),
            limiter: crate::http::ratelimit::RateLimiter::new(
                config.http.notification_rate_per_sec,
                config.http.notification_burst,
            ),
            webhook_secret: config.mercadopago.webhook_secret.clone(),
            signature_tolerance_secs: config.mercadopago.signature_tolerance_secs,
            warnings: Arc::new(crate::http::ratelimit::WarnLimiter::new()),
            proxies: crate::http::forwarded::TrustedProxies::new(
                config.http.trusted_proxies.clone(),
            ),
            readiness: web::Data::new(readiness.clone()),
        });
        tracker.spawn(crate::http::edge::report_suppressed(
            Arc::clone(&shared.warnings),
            shutdown.clone(),
        ));
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let server = crate::http::edge::serve(listener, &config.http, shared, workers)?;

        let (admin_addr, admin_server) = match admin_listener {
            Some(l) => {
                let addr = l.local_addr()?;
                let server = crate::admin::serve(
                    &config.admin,
                    l,
                    Arc::clone(&book),
                    client.clone(),
                    Arc::clone(&link),
                    readiness,
                    shutdown.clone(),
                )?;
                tracing::info!(listen = %addr, console = %format!("http://{addr}/"),
                    token = config.admin.token.is_some(), timezone = config.admin.timezone.name(),
                    "console and admin API listening");
                (Some(addr), Some(server))
            }
            None => {
                tracing::info!("console off ([admin] listen = \"\")");
                (None, None)
            }
        };

        tracing::info!(listen = %http_addr, pos_url = %config.http.pos_url_shown(),
            notification_url = %config.http.notification_url(), "HTTP listening");
        tracing::info!(count = config.pos.len(), pos = %config.pos.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(","),
            "points of sale configured");
        if config.mercadopago.access_token.is_none() {
            tracing::warn!(
                "no Mercado Pago access token is set ({}): payments cannot be verified until it is",
                crate::config::ACCESS_TOKEN_ENV
            );
        }

        Ok(App {
            http_addr,
            mqtt_addr,
            mqtt_tls_addr,
            server,
            admin_addr,
            admin_server,
            book,
            link,
            shutdown,
            tracker,
            db_lock,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The console's listener, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The broker qrgate talks to (the embedded one's real port).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The embedded broker's TLS listener, when configured.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    pub fn book(&self) -> Arc<Book> {
        Arc::clone(&self.book)
    }

    pub fn link(&self) -> Arc<LinkState> {
        Arc::clone(&self.link)
    }

    /// Cancelling it stops the app gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains: HTTP stops
    /// taking requests, in-flight work finishes, background tasks end.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        let admin = self.admin_server.map(|s| (s.handle(), tokio::spawn(s)));
        self.shutdown.cancelled().await;
        tracing::info!("shutting down");
        handle.stop(true).await;
        let _ = server.await;
        if let Some((handle, server)) = admin {
            handle.stop(true).await;
            let _ = server.await;
        }
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not finish within 10 s");
        }
        // A write queued behind every other: when it commits, all before it
        // are on disk.
        if let Err(e) = self.book.store().check_writable().await {
            tracing::error!(error = %e, "store could not be flushed at shutdown");
        }
        tracing::info!("stopped");
        drop(self.db_lock);
        Ok(())
    }
}

/// Repeats `paid` until the device confirms it acted on it (a singleton).
async fn repeat_paid(book: Arc<Book>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = book.clock().sleep(every) => {}
            _ = stop.cancelled() => break,
        }
        for sale in book.undelivered() {
            tracing::debug!(pos = %sale.pos, external_reference = %sale.external_reference,
                "paid_undelivered: paid republished");
            book.republish(sale);
        }
    }
}

/// Expires sales nobody paid (a singleton).
async fn expire(book: Arc<Book>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = book.clock().sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => break,
        }
        for pos in book.expired(book.clock().now_millis()) {
            if let Err(e) = book.execute(&pos, Command::Expire).await {
                tracing::error!(pos = %pos, error = %e, "cannot expire a sale");
            }
        }
    }
}

/// Publishes what stored changes owed their devices and their instances
/// left unpublished past the lease (a singleton): while the broker link is
/// up, so that what it publishes goes out.
async fn sweep_outbox(book: Arc<Book>, link: Arc<LinkState>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => break,
        }
        if !link.connected.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        let due = match book.store().outbox_due(256).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox; swept again in a second");
                continue;
            }
        };
        for (pos, version) in due {
            match book.retell(&pos).await {
                Ok(()) => {
                    book.metrics().outbox_swept.inc();
                    tracing::info!(pos = %pos, version,
                        "a stored change was not told to its device by the instance that stored it: told by the sweep");
                }
                Err(e) => tracing::warn!(pos = %pos, version, error = %e,
                    "cannot tell a device what the outbox owes it; swept again in a second"),
            }
        }
    }
}
