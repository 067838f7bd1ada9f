//! `GET|POST /mp/pos/{pos_id}`: the URL Mercado Pago calls while a customer
//! waits. It only reads the order book; unknown query parameters are ignored.

use actix_web::http::header::{HeaderValue, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::app::Shared;

pub async fn poll(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let pos = path.into_inner();
    let answer = shared.gateway.poll(&pos);
    if answer.kind == "invalid" {
        let agent = req
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::warn!(pos = %pos.chars().take(64).collect::<String>(), user_agent = agent,
            "poll for an unknown POS answered invalid");
    } else {
        tracing::debug!(pos = %pos, answer = answer.kind, "poll");
    }
    let mut resp =
        HttpResponse::new(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.set_body(actix_web::body::BoxBody::new(answer.body))
}
