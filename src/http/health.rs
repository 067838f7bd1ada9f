//! `/healthz`: the process is up. `/readyz`: qrgate can take sales: the
//! store is writable and the broker connected and subscribed.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::State;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub async fn readyz(shared: web::Data<State>) -> HttpResponse {
    let mut reasons = Vec::new();
    if let Err(e) = shared.book.store().check_writable().await {
        reasons.push(format!("store not writable: {e}"));
    }
    if !shared
        .link
        .connected
        .load(std::sync::atomic::Ordering::Acquire)
    {
        reasons.push("MQTT broker not connected".to_owned());
    } else if !shared.link.ready() {
        reasons.push("not yet subscribed to device topics".to_owned());
    }
    if reasons.is_empty() {
        HttpResponse::Ok().json(json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({ "status": "unready", "reasons": reasons }))
    }
}
