//! The operator's side, on its own listener (`[admin] listen`), never the
//! public one: the console page (`page`), the admin API (`api`),
//! `/metrics` and the health checks. Every request first passes the edge
//! (`edge`: its `Host` must be one of the console's names, its `Origin`, if
//! any, the console's own),
//! then who may use it (`auth`): with `QRGATE_ADMIN_TOKEN` set, a bearer
//! header for API clients, or a session cookie from the login form for the
//! page, whose state-changing calls also carry the session's CSRF token;
//! without a token (loopback only, checked at start) no session at all.
//! `/metrics` has its own readers besides (`api::metrics_reader`), and
//! `/healthz` and `/readyz` need nobody.

pub mod api;
pub mod auth;
pub mod edge;
pub mod page;

use actix_web::ResponseError;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpServer};
use tokio_util::sync::CancellationToken;

use crate::book::Book;
use crate::config::{AdminConfig, Secret};
use crate::http::health::Readiness;
use crate::http::ApiError;
use crate::link::LinkState;
use crate::mercadopago::account_check::TokenStatus;
use crate::mercadopago::client::MpClient;

/// What the admin handlers share.
pub struct Admin {
    pub book: Arc<Book>,
    pub link: Arc<LinkState>,
    pub timezone: chrono_tz::Tz,
    pub auth: auth::Auth,
    pub edge: edge::Edge,
    pub refunds: crate::refunds::OperatorRefunds,
    pub shutdown: CancellationToken,
    /// `QRGATE_METRICS_TOKEN`: reads `/metrics`, nothing else.
    pub metrics_token: Option<Secret>,
    /// Whether Mercado Pago takes the access token.
    pub token_status: Arc<TokenStatus>,
}

/// Starts the admin server on a listener bound by the caller.
pub fn serve(
    cfg: &AdminConfig,
    listener: TcpListener,
    book: Arc<Book>,
    client: MpClient,
    link: Arc<LinkState>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<actix_web::dev::Server> {
    let local = listener.local_addr()?;
    let clock = book.clock().clone();
    let admin = web::Data::new(Admin {
        refunds: crate::refunds::OperatorRefunds::new(client, Arc::clone(&book)),
        book,
        link,
        timezone: cfg.timezone,
        auth: auth::Auth::new(cfg, clock),
        edge: edge::Edge::new(&cfg.hosts, local),
        shutdown,
        metrics_token: cfg.metrics_token.clone(),
        token_status: readiness.token(),
    });
    let readiness = web::Data::new(readiness);
    Ok(HttpServer::new(move || {
        actix_web::App::new()
            .wrap(
                actix_web::middleware::ErrorHandlers::new()
                    .default_handler(crate::http::json_errors),
            )
            // Outermost: nothing answers a foreign Host or Origin.
            .wrap(actix_web::middleware::from_fn(edge::guard))
            .app_data(admin.clone())
            .app_data(readiness.clone())
            .configure(routes)
    })
    // On a wildcard listen, the console answers to the address each
    // connection came in on.
    .on_connect(|conn, data| {
        if let Some(Ok(addr)) = conn
            .downcast_ref::<actix_web::rt::net::TcpStream>()
            .map(|s| s.local_addr())
        {
            data.insert(edge::LocalAddr(addr));
        }
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .client_request_timeout(Duration::from_secs(5))
    .listen(listener)?
    .run())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(crate::http::MAX_BODY))
        .route("/", web::get().to(page::index))
        .route("/login", web::post().to(page::login))
        .route("/logout", web::post().to(page::logout))
        .route("/sales/{reference}", web::get().to(page::sale))
        .route("/pos/{id}", web::get().to(page::pos))
        .route("/assets/console.css", web::get().to(page::css))
        .route("/assets/console.js", web::get().to(page::js))
        .route("/metrics", web::get().to(api::metrics))
        .route("/healthz", web::get().to(crate::http::health::healthz))
        .route("/readyz", web::get().to(crate::http::health::readyz))
        .route("/api/pos", web::get().to(api::pos))
        .route("/api/pos/{id}", web::get().to(api::pos_one))
        .route("/api/sales", web::get().to(api::sales))
        .route("/api/sales/{reference}", web::get().to(api::sale))
        .route("/api/sales/{reference}/cancel", web::post().to(api::cancel))
        .route("/api/sales/{reference}/refund", web::post().to(api::refund))
        .route("/api/events", web::get().to(api::events))
        .default_service(web::to(|| async { ApiError::NotFound.error_response() }));
}
