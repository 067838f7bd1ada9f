//! The public HTTP side: the POS URL Mercado Pago polls, the notification
//! endpoint, and health. Handlers extract, call the book or enqueue, render.

pub mod edge;
pub mod error;
pub mod forwarded;
pub mod health;
pub mod notifications;
pub mod poll;
pub mod ratelimit;
pub mod signature;

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::CONTENT_TYPE;
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::web;
use actix_web::ResponseError;

pub use error::ApiError;

use std::sync::Arc;

use crate::book::Book;
use crate::config::Secret;
use crate::inbox::Inbox;
use crate::link::LinkState;

/// Largest request body any endpoint reads.
pub const MAX_BODY: usize = 16 * 1024;

/// What the public listener's handlers share, built by whoever serves it.
pub struct State {
    pub book: Arc<Book>,
    pub inbox: Inbox,
    pub link: Arc<LinkState>,
    pub poll_access: poll::PollAccess,
    pub limiter: ratelimit::RateLimiter,
    pub webhook_secret: Option<Secret>,
    pub signature_tolerance_secs: u64,
    /// Rate limits the warnings strangers can cause, per source.
    pub warnings: Arc<ratelimit::WarnLimiter>,
    /// Whose proxy headers name the client (`[http] trusted_proxies`).
    pub proxies: forwarded::TrustedProxies,
    /// What `/readyz` looks at, shared with the admin listener.
    pub readiness: web::Data<health::Readiness>,
}

impl State {
    /// The client a request is counted and logged under: its peer, or the
    /// client a trusted proxy names.
    pub fn client(&self, req: &actix_web::HttpRequest) -> Option<std::net::IpAddr> {
        let peer = req.peer_addr()?.ip();
        Some(self.proxies.client(peer, req.headers()))
    }
}

/// Errors actix-web produces itself (405, 413, 408...) become the same JSON
/// as ours, with a stable code and nothing internal.
pub fn json_errors<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    // JSON errors are ours already; an HTML page (the console's login form
    // answering a wrong token) is meant for a person and passes as it is.
    let ours = res.headers().get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/json") || v.starts_with(b"text/html")
    });
    if ours {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let resp = ApiError::from_status(res.status()).error_response();
    let (req, _) = res.into_parts();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, resp).map_into_right_body(),
    ))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_BODY))
        .service(
            web::resource("/mp/pos/{pos_id}")
                .route(web::get().to(poll::poll))
                .route(web::post().to(poll::poll)),
        )
        .service(
            web::resource("/mp/notifications")
                .app_data(web::PayloadConfig::new(notifications::MAX_BODY))
                .route(web::post().to(notifications::receive)),
        )
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .default_service(web::to(|| async { ApiError::NotFound.error_response() }));
}
