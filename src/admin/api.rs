//! The admin API (JSON): POS, sales, a sale's timeline, the operator's
//! cancel and refund, the live event stream (SSE) and `/metrics`. Errors are
//! `{"code", "message"}` with stable codes. Handlers check who asks, call
//! the book, the store or Mercado Pago, and render.

// Helpers return the refusing response as their error: built once, sent as is.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Admin;
use crate::http::ApiError;
use crate::orders::{
    self, Command, ExternalReference, Outcome, PosMode, Presence, Rejection, Sale,
};
use crate::store::{RejectionRecord, SaleFilter};

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "admin API failed");
    ApiError::Internal("internal error (see the log)".into())
}

fn no_such_sale() -> ApiError {
    ApiError::UnknownSale("no such sale".into())
}

fn parse_reference(text: &str) -> Result<ExternalReference, ApiError> {
    ExternalReference::parse(text).map_err(|m| ApiError::UnknownSale(m.to_string()))
}

/// Money as text, with the currency's decimals.
fn money(sale: &Sale, v: Decimal) -> String {
    crate::money::Amount::new(v, sale.currency).to_string()
}

/// The operator's word for a sale that needs them, if any.
pub fn attention(sale: &Sale) -> Option<&'static str> {
    if sale.ledger.owed() > Decimal::ZERO {
        Some("refund_due")
    } else if sale.is_paid_undelivered() {
        Some("paid_undelivered")
    } else {
        None
    }
}

/// A sale as lists show it.
pub fn summary(sale: &Sale, now: i64) -> Value {
    json!({
        "external_reference": sale.external_reference,
        "pos": sale.pos,
        "sale_id": sale.sale_id,
        "state": sale.state.as_str(),
        "attention": attention(sale),
        "amount": sale.total().map(|a| a.to_string()),
        "currency": sale.currency.code(),
        "accepted_at": sale.accepted_at,
        "age_secs": (now - sale.accepted_at).max(0) / 1000,
        "served": sale.served_at.is_some(),
        "refunded_total": (sale.refunded_total() > Decimal::ZERO).then(|| money(sale, sale.refunded_total())),
        "owed": (sale.ledger.owed() > Decimal::ZERO).then(|| money(sale, sale.ledger.owed())),
    })
}

/// What the console says of a POS's device: `online`, `offline`, or
/// `never_seen` when it never said whether it is there. A device that sends
/// sales without speaking presence is payable (treated as online), but the
/// operator is told it never reported itself: `no_presence`.
pub fn device_seen(presence: Presence, has_sale: bool) -> &'static str {
    match presence {
        Presence::Online { .. } => "online",
        Presence::Offline { .. } => "offline",
        Presence::Unknown if has_sale => "no_presence",
        Presence::Unknown => "never_seen",
    }
}

/// Times as the console writes them everywhere: the configured zone, to the
/// second, the zone named once per page.
pub fn local_time(tz: chrono_tz::Tz, ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S").to_string())
}

fn rejection_json(r: &RejectionRecord, tz: chrono_tz::Tz) -> Value {
    json!({
        "code": r.code,
        "sale_id": r.sale_id,
        "message": r.message,
        "at": r.at,
        "local": local_time(tz, r.at),
    })
}

/// Per payment, what was paid, kept, owed and refunded.
fn ledger(sale: &Sale) -> Value {
    let m = |v: Decimal| money(sale, v);
    json!({
        "approved": m(sale.ledger.approved()),
        "kept": m(sale.ledger.kept()),
        "held": m(sale.ledger.held()),
        "owed": m(sale.ledger.owed()),
        "refunded": m(sale.ledger.refunded()),
        "payments": sale.ledger.payments().iter().map(|p| json!({
            "payment_id": p.id,
            "merchant_order": p.merchant_order,
            "amount": m(p.amount),
            "approved_at": p.approved_at,
            "held": p.held,
            "kept": m(p.kept),
            "owed": m(p.owed_open()),
            "refunded": m(p.refunded()),
            "dues": p.owed.iter().map(|o| json!({
                "amount": m(o.amount), "reason": o.reason.as_str(), "auto": o.auto, "at": o.at,
                "refund_id": o.refund,
            })).collect::<Vec<_>>(),
            "refunds": p.refunds.iter().map(|r| json!({
                "refund_id": r.id, "amount": m(r.amount), "at": r.at, "by": r.by,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Who may read `/metrics` (docs/decisions.md, "The console and the admin
/// API"): the metrics token, a program on the station itself (a loopback
/// peer that no proxy speaks for, without a token), or whoever may use the
/// admin API. A wrong bearer token is refused, from loopback too.
fn metrics_reader(req: &HttpRequest, admin: &Admin) -> Result<&'static str, ApiError> {
    let bearer = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (bearer, &admin.metrics_token) {
        (Some(given), Some(token)) if super::auth::same(given, token.expose()) => {
            return Ok("metrics_token")
        }
        // Without an operator's token nothing else could make it right.
        (Some(_), Some(_)) if !admin.auth.needs_login() => {
            return Err(super::auth::unauthorized(None))
        }
        (None, _) if on_this_machine(req) => return Ok("local"),
        _ => {}
    }
    admin.auth.check(req, false)
}

/// A loopback peer that no proxy speaks for: a proxy on the same machine
/// is loopback too, and says whom it forwards.
fn on_this_machine(req: &HttpRequest) -> bool {
    let loopback = req
        .peer_addr()
        .is_some_and(|a| super::edge::canonical(a.ip()).is_loopback());
    let h = req.headers();
    loopback
        && !["forwarded", "x-forwarded-for", "x-real-ip"]
            .iter()
            .any(|name| h.contains_key(*name))
}

pub async fn metrics(req: HttpRequest, admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    metrics_reader(&req, &admin)?;
    let m = admin.book.metrics();
    let (mut pending, mut undelivered, mut online, mut offline) = (0, 0, 0, 0);
    let (mut busy, mut served) = (0, 0);
    for cfg in admin.book.pos_configs() {
        let Some(view) = admin.book.view(&cfg.id) else {
            continue;
        };
        let s = view.state.current.as_ref();
        busy += i64::from(view.state.busy_sale().is_some());
        served += i64::from(
            s.is_some_and(|s| s.served_at.is_some() && s.state == orders::SaleState::Pending),
        );
        pending += i64::from(s.is_some_and(|s| s.state == orders::SaleState::Pending));
        undelivered += i64::from(s.is_some_and(|s| s.is_paid_undelivered()));
        if view.state.presence.is_offline() {
            offline += 1;
        } else {
            online += 1;
        }
    }
    // Money owed back is any sale's, not only a POS's current one. While
    // the store cannot count it the last count stands: an outage of the
    // store is when the rest of the page is read most.
    if let Ok(n) = admin.book.store().count_owing().await {
        m.sales_refund_due.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    m.sales_pending.set(pending);
    m.sales_paid_undelivered.set(undelivered);
    m.devices_online.set(online);
    m.devices_offline.set(offline);
    m.mqtt_connected.set(i64::from(admin.link.ready()));
    m.pos_busy.set(busy);
    m.sales_served_unpaid.set(served);
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render()))
}

pub async fn pos(req: HttpRequest, admin: web::Data<Admin>) -> Result<HttpResponse, ApiError> {
    admin.auth.check(&req, false)?;
    let now = admin.book.clock().now_millis();
    let mut configs: Vec<_> = admin.book.pos_configs().collect();
    configs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut last: std::collections::HashMap<String, RejectionRecord> = admin
        .book
        .store()
        .latest_rejections()
        .await
        .map_err(internal)?
        .into_iter()
        .map(|r| (r.pos.clone(), r))
        .collect();
    let (mut pending, mut undelivered) = (0, 0);
    let list: Vec<Value> = configs
        .iter()
        .filter_map(|cfg| {
            let view = admin.book.view(&cfg.id)?;
            let sale = view.state.current.as_ref();
            if let Some(s) = sale {
                pending += usize::from(s.state == orders::SaleState::Pending);
                undelivered += usize::from(s.is_paid_undelivered());
            }
            let (online, since) = match view.state.presence {
                Presence::Unknown => (true, None),
                Presence::Online { since } => (true, Some(since)),
                Presence::Offline { since } => (false, Some(since)),
            };
            Some(json!({
                "id": cfg.id,
                "kind": cfg.kind.as_str(),
                "mode": match cfg.mode { PosMode::Attended => "attended", PosMode::Unattended(_) => "unattended" },
                "online": online,
                "device": device_seen(view.state.presence, sale.is_some()),
                "since": since,
                "sale": sale.map(|s| summary(s, now)),
                "last_rejection": last.remove(cfg.id.as_str()).map(|r| rejection_json(&r, admin.timezone)),
            }))
        })
        .collect();
    // Money owed back may be any sale's, not only a POS's current one.
    let store = admin.book.store();
    let (due, owing) = match (
        store.count_owing().await,
        store
            .sales(SaleFilter {
                owing: true,
                limit: 100,
                ..SaleFilter::default()
            })
            .await,
    ) {
        (Ok(n), Ok(owing)) => (n, owing),
        (Err(e), _) | (_, Err(e)) => return Err(internal(e)),
    };
    Ok(HttpResponse::Ok().json(json!({
        "counts": {"pending": pending, "paid_undelivered": undelivered, "refund_due": due},
        "timezone": admin.timezone.name(),
        "mercadopago": admin.token_status.get().as_str(),
        "pos": list,
        "owing": owing.iter().map(|s| summary(s, now)).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub struct SalesQuery {
    pos: Option<String>,
    /// `refund_due`: only sales that owe money back.
    attention: Option<String>,
    state: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

pub async fn sales(
    req: HttpRequest,
    q: web::Query<SalesQuery>,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    admin.auth.check(&req, false)?;
    let q = q.into_inner();
    let since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<i64>().ok().or_else(|| {
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| d.timestamp_millis())
        }) {
            Some(v) => Some(v),
            None => {
                return Err(ApiError::BadQuery(
                    "since must be unix milliseconds or an RFC 3339 time".into(),
                ))
            }
        },
    };
    let filter = SaleFilter {
        owing: q.attention.as_deref() == Some("refund_due"),
        pos: q.pos.filter(|s| !s.is_empty()),
        state: q.state.filter(|s| !s.is_empty()),
        since,
        limit: q.limit.unwrap_or(50).clamp(1, 1000),
    };
    let list = admin.book.store().sales(filter).await.map_err(internal)?;
    let now = admin.book.clock().now_millis();
    Ok(HttpResponse::Ok().json(json!({
        "sales": list.iter().map(|s| summary(s, now)).collect::<Vec<_>>(),
    })))
}

/// A sale with its timeline and the merchant orders seen for it.
pub async fn sale_detail(
    admin: &Admin,
    reference: &ExternalReference,
) -> Result<Option<Value>, ApiError> {
    let Some(sale) = admin.book.find_sale(reference).await.map_err(internal)? else {
        return Ok(None);
    };
    let store = admin.book.store();
    let timeline = store.timeline(reference).await.map_err(internal)?;
    let seen = store
        .merchant_orders_of(reference)
        .await
        .map_err(internal)?;
    let tz = admin.timezone;
    let local = |ms: i64| local_time(tz, ms);
    Ok(Some(json!({
        "sale": sale,
        "summary": summary(&sale, admin.book.clock().now_millis()),
        "refundable": Some(orders::refundable(&sale)).filter(|v| *v > Decimal::ZERO).map(|v| money(&sale, v)),
        "owed": Some(sale.ledger.owed()).filter(|v| *v > Decimal::ZERO).map(|v| money(&sale, v)),
        "ledger": ledger(&sale),
        "timezone": tz.name(),
        "timeline": timeline.iter().map(|(at, event, detail)| json!({
            "at": at,
            "local": local(*at),
            "event": event,
            "detail": serde_json::from_str::<Value>(detail).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "merchant_orders": seen.iter().map(|mo| {
            let details = status_details(&mo.body);
            json!({
                "id": mo.id,
                "status": mo.status,
                "seen_at": mo.seen_at,
                "local": local(mo.seen_at),
                "payments": mo.payments.iter().map(|p| json!({
                    "id": p.id, "status": p.status, "amount": p.amount, "currency": p.currency,
                    "status_detail": details.get(&p.id.to_string()),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })))
}

/// Each payment's `status_detail` by payment id (why Mercado Pago rejected
/// it, say `cc_rejected_insufficient_amount`), read once from the merchant
/// order's body as fetched: the stored payment rows keep only what settles
/// the sale.
fn status_details(body: &str) -> std::collections::HashMap<String, String> {
    let Ok(mo) = serde_json::from_str::<Value>(body) else {
        return Default::default();
    };
    mo["payments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let id = match &p["id"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => return None,
            };
            Some((id, p["status_detail"].as_str()?.to_owned()))
        })
        .collect()
}

/// A POS, its device, its current sale, its stored device rejections
/// (newest first) and its latest sales.
pub async fn pos_detail(admin: &Admin, id: &str) -> Result<Option<Value>, ApiError> {
    let Some(cfg) = admin.book.pos_configs().find(|c| c.id.as_str() == id) else {
        return Ok(None);
    };
    let Some(view) = admin.book.view(&cfg.id) else {
        return Ok(None);
    };
    let now = admin.book.clock().now_millis();
    let store = admin.book.store();
    let rejections = store
        .rejections(cfg.id.as_str(), 100)
        .await
        .map_err(internal)?;
    let sales = store
        .sales(SaleFilter {
            pos: Some(cfg.id.to_string()),
            limit: 20,
            ..SaleFilter::default()
        })
        .await
        .map_err(internal)?;
    let sale = view.state.current.as_ref();
    let since = match view.state.presence {
        Presence::Online { since } | Presence::Offline { since } => Some(since),
        Presence::Unknown => None,
    };
    Ok(Some(json!({
        "id": cfg.id,
        "kind": cfg.kind.as_str(),
        "mode": match cfg.mode { PosMode::Attended => "attended", PosMode::Unattended(_) => "unattended" },
        "device": device_seen(view.state.presence, sale.is_some()),
        "since": since,
        "since_local": since.and_then(|ms| local_time(admin.timezone, ms)),
        "sale": sale.map(|s| summary(s, now)),
        "timezone": admin.timezone.name(),
        "rejections": rejections.iter().map(|r| rejection_json(r, admin.timezone)).collect::<Vec<_>>(),
        "sales": sales.iter().map(|s| {
            let mut v = summary(s, now);
            v["accepted_local"] = json!(local_time(admin.timezone, s.accepted_at));
            v
        }).collect::<Vec<_>>(),
    })))
}

pub async fn pos_one(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    admin.auth.check(&req, false)?;
    match pos_detail(&admin, &path).await? {
        Some(v) => Ok(HttpResponse::Ok().json(v)),
        None => Err(ApiError::UnknownPos(format!("no POS {:?}", path.as_str()))),
    }
}

pub async fn sale(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    admin.auth.check(&req, false)?;
    let reference = parse_reference(&path)?;
    match sale_detail(&admin, &reference).await? {
        Some(v) => Ok(HttpResponse::Ok().json(v)),
        None => Err(no_such_sale()),
    }
}

pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    let by = admin.auth.check(&req, true)?;
    let reference = parse_reference(&path)?;
    let pos = reference.pos_id().ok_or_else(no_such_sale)?;
    let cmd = Command::CancelByOperator {
        reference: reference.clone(),
        by: by.to_owned(),
    };
    match admin.book.execute(&pos, cmd).await {
        Ok(Outcome::Changed { sale, .. }) => Ok(HttpResponse::Ok()
            .json(json!({"sale": summary(&sale, admin.book.clock().now_millis())}))),
        Ok(Outcome::Rejected {
            why: Rejection::NotCancellable { state },
            ..
        }) => Err(ApiError::NotCancellable(format!(
            "the sale is {} and can no longer be cancelled",
            state.as_str()
        ))),
        Ok(_) => match admin.book.find_sale(&reference).await.map_err(internal)? {
            Some(s) => Err(ApiError::NotCancellable(format!(
                "the sale is {} and is not its POS's current sale",
                s.state.as_str()
            ))),
            None => Err(no_such_sale()),
        },
        Err(crate::book::BookError::UnknownPos(_)) => Err(no_such_sale()),
        Err(e) => Err(internal(e)),
    }
}

/// `None`: a full refund. Amounts may be sent as a string or a number, and
/// are plain decimals either way (`money::parse_plain_decimal`); neither
/// passes through a float.
fn requested_amount(body: &[u8]) -> Result<Option<Decimal>, &'static str> {
    // The number's own text: a `serde_json::Value` would hold it as an f64.
    #[derive(Deserialize)]
    struct RefundBody {
        #[serde(default)]
        amount: Option<Box<serde_json::value::RawValue>>,
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| "the body is not UTF-8")?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    let b: RefundBody = serde_json::from_str(text)
        .map_err(|_| "the body must be {\"amount\": \"10.50\"} or empty")?;
    let Some(raw) = b.amount else {
        return Ok(None);
    };
    let number = match raw.get().as_bytes().first() {
        Some(b'n') => return Ok(None),
        Some(b'"') => {
            serde_json::from_str::<String>(raw.get()).map_err(|_| "amount is not a number")?
        }
        Some(b'-' | b'0'..=b'9') => raw.get().to_owned(),
        _ => return Err("amount must be a string like \"10.50\""),
    };
    crate::money::parse_plain_decimal(&number)
        .map(Some)
        .map_err(|_| "amount must be a plain decimal like \"10.50\"")
}

pub async fn refund(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    let by = admin.auth.check(&req, true)?;
    let reference = parse_reference(&path)?;
    let asked = requested_amount(&body).map_err(|m| ApiError::BadRequest(m.to_string()))?;
    let given_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 128);
    let answer = admin
        .refunds
        .request(&reference, asked, by, given_key)
        .await;
    Ok(HttpResponse::build(
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    )
    .json(answer.body))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    pos: Option<String>,
}

#[derive(Serialize)]
struct Lagged {
    missed: u64,
}

/// Server-sent events: one `data:` line per operator event; `event:
/// lagged` when this client fell behind and missed some. A stream opened
/// with a login session ends when the session does (logout, eviction, or
/// idle time: the stream itself does not keep it alive).
pub async fn events(
    req: HttpRequest,
    q: web::Query<EventsQuery>,
    admin: web::Data<Admin>,
) -> Result<HttpResponse, ApiError> {
    admin.auth.check(&req, false)?;
    use tokio::sync::broadcast::error::RecvError;
    const KEEP_ALIVE: Duration = Duration::from_secs(15);
    let rx = admin.book.events().subscribe();
    let pos = q.into_inner().pos.filter(|p| !p.is_empty());
    let session = admin.auth.watch(&req);
    let first = web::Bytes::from_static(b": connected\n\n");
    let state = (Some(first), rx, admin.clone(), pos, session);
    let stream = futures_util::stream::unfold(
        state,
        |(first, mut rx, admin, pos, session)| async move {
            if let Some(b) = first {
                return Some((
                    Ok::<_, actix_web::Error>(b),
                    (None, rx, admin, pos, session),
                ));
            }
            let keep_alive = tokio::time::Instant::now() + KEEP_ALIVE;
            loop {
                // Wake at the session's end too, to close the stream then.
                let (left, ended) = match &session {
                    Some((id, ended)) => match admin.auth.time_left(id) {
                        Some(left) => (Some(left), ended.clone()),
                        None => return None,
                    },
                    None => (None, CancellationToken::new()),
                };
                let got = tokio::select! {
                    _ = admin.shutdown.cancelled() => return None,
                    _ = ended.cancelled() => return None,
                    // Look again: the session may have been used meanwhile.
                    _ = admin.book.clock().sleep(left.unwrap_or(KEEP_ALIVE)), if left.is_some() => continue,
                    _ = tokio::time::sleep_until(keep_alive) => {
                        return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), (None, rx, admin, pos, session)));
                    }
                    r = rx.recv() => r,
                };
                let chunk = match got {
                    Ok(ev) => {
                        if pos.as_deref().is_some_and(|p| p != ev.pos) {
                            continue;
                        }
                        format!(
                            "data: {}\n\n",
                            serde_json::to_string(&*ev).unwrap_or_default()
                        )
                    }
                    Err(RecvError::Lagged(missed)) => format!(
                        "event: lagged\ndata: {}\n\n",
                        serde_json::to_string(&Lagged { missed }).unwrap_or_default()
                    ),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(web::Bytes::from(chunk)), (None, rx, admin, pos, session)));
            }
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn refund_amounts_are_read_without_floats() {
        assert_eq!(requested_amount(b""), Ok(None));
        assert_eq!(requested_amount(b"{}"), Ok(None));
        assert_eq!(
            requested_amount(br#"{"amount":"10.50"}"#),
            Ok(Some(Decimal::from_str("10.50").unwrap()))
        );
        assert_eq!(
            requested_amount(br#"{"amount":10.5}"#),
            Ok(Some(Decimal::from_str("10.5").unwrap()))
        );
        assert_eq!(requested_amount(br#"{"amount":null}"#), Ok(None));
        assert!(requested_amount(br#"{"amount":[1]}"#).is_err());
        assert!(requested_amount(b"ten").is_err());
        // 12345678901234567.89 is not an f64.
        assert_eq!(
            requested_amount(br#"{"amount":12345678901234567.89}"#),
            Ok(Some(Decimal::from_str("12345678901234567.89").unwrap()))
        );
    }

    #[test]
    fn refund_amounts_are_plain_decimals() {
        for loose in [
            r#""1_000""#,
            r#""1.0_5""#,
            r#""1.""#,
            r#""+1""#,
            r#"".5""#,
            r#"" 10.50""#,
            r#""1e3""#,
            "1e3",
            "1.5E2",
            r#""10,50""#,
            r#""""#,
            "true",
        ] {
            let body = format!(r#"{{"amount":{loose}}}"#);
            assert!(requested_amount(body.as_bytes()).is_err(), "{body}");
        }
        assert_eq!(
            requested_amount(br#"{"amount":"-1"}"#),
            Ok(Some(Decimal::from_str("-1").unwrap())),
            "plain; the book refuses it as not positive"
        );
    }
}
