//! `GET|POST /mp/pos/{pos_id}`: the URL Mercado Pago calls while a customer
//! waits. It only reads the order book; unknown query parameters are ignored.
//! When the POS has a poll key, a poll without it is answered 404, as if the
//! URL did not exist, so a registered URL cannot be guessed from a POS id.

use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error;
use crate::app::Shared;
use crate::orders::PosId;

#[derive(Deserialize)]
struct PollQuery {
    key: Option<String>,
}

/// Whether the poll carries the key its POS requires (constant time).
fn key_ok(shared: &Shared, pos: &str, query: &str) -> bool {
    let keys = &shared.poll_keys;
    // Without per-POS keys there is no id to parse (one allocation less).
    let required = if keys.per_pos.is_empty() {
        keys.global.as_ref()
    } else {
        PosId::parse(pos).map_or(keys.global.as_ref(), |id| keys.for_pos(&id))
    };
    let Some(required) = required else {
        return true;
    };
    let given = web::Query::<PollQuery>::from_query(query)
        .ok()
        .and_then(|q| q.into_inner().key)
        .unwrap_or_default();
    bool::from(given.as_bytes().ct_eq(required.expose().as_bytes()))
}

pub async fn poll(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let pos = path.into_inner();
    let shown: String = pos.chars().take(64).collect();
    let agent = req
        .headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !key_ok(&shared, &pos, req.query_string()) {
        let peer = req.peer_addr().map(|a| a.ip().to_string());
        tracing::warn!(pos = %shown, user_agent = agent, peer, "poll without the right key answered 404");
        return error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    let answer = shared.gateway.poll(&pos);
    let metrics = shared.gateway.metrics();
    metrics.poll(answer.kind);
    match answer.kind {
        "invalid" => {
            let why = if shared.gateway.pos_config(&pos).is_some() {
                "the POS is attended: Mercado Pago does not poll it, check its registered url"
            } else {
                "no such POS is configured"
            };
            tracing::warn!(pos = %shown, user_agent = agent, status = answer.status, reason = why,
                "poll answered invalid");
        }
        // v2 has no code for these: the customer sees Waiting_for_order.
        "timeout" if answer.status == 202 => {
            tracing::info!(pos = %pos, reason = "device offline", "v2 poll answered Waiting_for_order");
        }
        kind => tracing::debug!(pos = %pos, answer = kind, "poll"),
    }
    let mut resp =
        HttpResponse::new(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if answer.v2 {
        resp.headers_mut().insert(
            HeaderName::from_static("order-version"),
            HeaderValue::from_static("2"),
        );
    }
    let resp = resp.set_body(actix_web::body::BoxBody::new(answer.body));
    metrics
        .poll_seconds
        .observe(started.elapsed().as_secs_f64());
    resp
}
