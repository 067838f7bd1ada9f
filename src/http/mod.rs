//! The public HTTP side: the POS URL Mercado Pago polls, the notification
//! endpoint, and health. Handlers extract, call the book or enqueue, render.

pub mod answer;
pub mod health;
pub mod notifications;
pub mod poll;

use actix_web::{web, HttpResponse};
use serde::Serialize;

/// Our own endpoints' error body: a stable `code` and a `message`.
#[derive(Serialize)]
pub struct ApiError<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

pub fn error(status: actix_web::http::StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(ApiError { code, message })
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/mp/pos/{pos_id}", web::get().to(poll::poll))
        .route("/mp/pos/{pos_id}", web::post().to(poll::poll))
        .service(
            web::resource("/mp/notifications")
                .app_data(web::PayloadConfig::new(notifications::MAX_BODY))
                .route(web::post().to(notifications::receive)),
        )
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .default_service(web::to(|| async {
            error(
                actix_web::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint",
            )
        }));
}
