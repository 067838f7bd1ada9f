//! `GET|POST /mp/pos/{pos_id}`: the URL Mercado Pago calls while a customer
//! waits. It only reads the order book; unknown query parameters are ignored.
//! When the POS has a poll key, a poll without it is answered 404, as if the
//! URL did not exist, so a registered URL cannot be guessed from a POS id.
//! Once any POS has a key, an unknown POS gets that same 404, byte for byte:
//! a different answer would tell which POS ids exist.

use actix_web::ResponseError;
use std::collections::HashMap;

use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::ApiError;
use super::State;
use crate::config::{PollKeys, Secret};
use crate::orders::PosConfig;

#[derive(Deserialize)]
struct PollQuery {
    key: Option<String>,
}

/// Which key each POS's polls must carry, looked up by the id as the URL
/// spells it (no parse, no allocation on the poll's path).
pub struct PollAccess {
    /// Every configured POS: its own key, or the global one, or none.
    keys: HashMap<String, Option<Secret>>,
    /// Whether any POS has a key; without one, nothing is checked.
    any: bool,
}

impl PollAccess {
    pub fn new(keys: &PollKeys, pos: &[PosConfig]) -> PollAccess {
        let keys: HashMap<_, _> = pos
            .iter()
            .map(|p| (p.id.as_str().to_owned(), keys.for_pos(&p.id).cloned()))
            .collect();
        let any = keys.values().any(Option::is_some);
        PollAccess { keys, any }
    }

    /// `Err(why)` when the poll must be answered as if the URL did not
    /// exist; `why` is for the log only.
    fn check(&self, pos: &str, query: &str) -> Result<(), &'static str> {
        if !self.any {
            return Ok(());
        }
        let Some(required) = self.keys.get(pos) else {
            return Err("no such POS");
        };
        // A POS without a key of its own while others have one is open by
        // configuration: answering it normally reveals only itself.
        let Some(required) = required else {
            return Ok(());
        };
        let given = web::Query::<PollQuery>::from_query(query)
            .ok()
            .and_then(|q| q.into_inner().key)
            .unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(required.expose().as_bytes())) {
            Ok(())
        } else if given.is_empty() {
            Err("no key")
        } else {
            Err("wrong key")
        }
    }
}

fn user_agent(req: &HttpRequest) -> &str {
    req.headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

pub async fn poll(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<State>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let pos = path.into_inner();
    if let Err(why) = shared.poll_access.check(&pos, req.query_string()) {
        // Anybody can cause this one: rate-limited per source. The log's
        // formatter truncates and escapes the id and the user agent.
        let peer = shared.client(&req);
        if let Some(suppressed) = shared.warnings.allow(peer, "poll_key", started) {
            tracing::warn!(pos = %pos, reason = why, user_agent = user_agent(&req),
                peer = peer.map(|p| p.to_string()), suppressed,
                "poll without the right key answered 404");
        }
        return ApiError::NotFound.error_response();
    }
    // A change stored elsewhere is being read: never answer the old state.
    if let Some(version) = shared.book.behind(&pos) {
        if let Err(e) = shared.book.follow(&pos, version).await {
            tracing::warn!(pos = %pos, error = %e, "cannot read a POS changed elsewhere; poll answered 503");
            return ApiError::Unavailable("the POS is being read again; poll again".into())
                .error_response();
        }
    }
    let answer = shared.book.poll(&pos);
    let metrics = shared.book.metrics();
    metrics.poll(answer.kind);
    match answer.kind {
        "invalid" => {
            let why = if shared.book.pos_config(&pos).is_some() {
                "the POS is attended: Mercado Pago does not poll it, check its registered url"
            } else {
                "no such POS is configured"
            };
            let peer = shared.client(&req);
            if let Some(suppressed) = shared.warnings.allow(peer, "poll_invalid", started) {
                tracing::warn!(pos = %pos, user_agent = user_agent(&req), status = answer.status,
                    reason = why, peer = peer.map(|p| p.to_string()), suppressed, "poll answered invalid");
            }
        }
        // v2 has no code for these: the customer sees Waiting_for_order.
        // Anybody may poll a POS without a key: counted per source too.
        "timeout" if answer.status == 202 => {
            let peer = shared.client(&req);
            if let Some(suppressed) = shared.warnings.allow(peer, "poll_offline", started) {
                tracing::info!(pos = %pos, reason = "device offline", suppressed,
                    "v2 poll answered Waiting_for_order");
            }
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
