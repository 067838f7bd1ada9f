//! The console page: server-rendered HTML with one stylesheet and a little
//! plain JavaScript embedded in the binary (stations are often offline: no
//! CDN, no build step). The page reads and acts through the admin API only.
//! With a token it runs in a login session (login, logout here); without
//! one, in none.

use crate::http::ApiError;
use actix_web::http::header::{CACHE_CONTROL, LOCATION, ORIGIN, RETRY_AFTER, SET_COOKIE};
use actix_web::http::StatusCode;
use actix_web::ResponseError;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::auth::{same, whole_secs, Attempt, Session, CSRF_HEADER};
use super::Admin;
use crate::mercadopago::account_check::TokenState;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// HTML-escapes text put in the page.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A timeline event's detail as an operator reads it: `amount 100.00 ·
/// payment id 123`, nested fields by their path, lists joined; never JSON.
pub fn readable(detail: &serde_json::Value) -> String {
    use serde_json::Value;
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Null => {}
            Value::Object(m) => {
                for (k, v) in m {
                    let key = k.replace('_', " ");
                    let path = if prefix.is_empty() {
                        key
                    } else {
                        format!("{prefix} {key}")
                    };
                    walk(&path, v, out);
                }
            }
            Value::Array(items) => {
                let mut parts = Vec::new();
                for item in items {
                    let mut inner = Vec::new();
                    walk("", item, &mut inner);
                    if !inner.is_empty() {
                        parts.push(inner.join(" "));
                    }
                }
                if !parts.is_empty() {
                    out.push(format!("{prefix} {}", parts.join(", ")).trim().to_owned());
                }
            }
            Value::String(t) => out.push(format!("{prefix} {t}").trim().to_owned()),
            other => out.push(format!("{prefix} {other}").trim().to_owned()),
        }
    }
    let mut out = Vec::new();
    walk("", detail, &mut out);
    out.join(" · ")
}

fn shell(title: &str, head: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/assets/console.css\">{head}</head>\
         <body>{body}</body></html>",
        esc(title)
    )
}

fn html(status: StatusCode, text: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((CACHE_CONTROL, "no-store"))
        .body(text)
}

fn login_page(status: StatusCode, note: Option<&str>) -> HttpResponse {
    let note = note
        .map(|n| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(n)))
        .unwrap_or_default();
    html(
        status,
        shell(
            "qrgate console: log in",
            "",
            &format!(
                "<main class=\"login\"><h1>qrgate console</h1>{note}\
                 <form method=\"post\" action=\"/login\">\
                 <label>Operator token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label>\
                 <button type=\"submit\" id=\"login\">Log in</button></form></main>"
            ),
        ),
    )
}

/// What the page runs in: `Some(None)` without a token (no session is
/// needed), `Some(Some(session))` logged in, `None` not logged in.
fn session_for(admin: &Admin, req: &HttpRequest) -> Option<Option<Session>> {
    if !admin.auth.needs_login() {
        return Some(None);
    }
    admin.auth.session(req).map(Some)
}

/// The header's log-out button: a plain form, so it works without script.
fn logout_form(session: Option<&Session>) -> String {
    session
        .map(|s| {
            format!(
                "<form method=\"post\" action=\"/logout\" class=\"logout\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button type=\"submit\" id=\"logout\">Log out</button></form>",
                esc(&s.csrf)
            )
        })
        .unwrap_or_default()
}

fn page(admin: &Admin, session: Option<&Session>, title: &str, body: &str) -> HttpResponse {
    let csrf = session
        .map(|s| format!("<meta name=\"csrf-token\" content=\"{}\">", esc(&s.csrf)))
        .unwrap_or_default();
    let head = format!(
        "{csrf}<meta name=\"timezone\" content=\"{}\">\
         <script src=\"/assets/console.js\" defer></script>",
        esc(admin.timezone.name())
    );
    html(StatusCode::OK, shell(title, &head, body))
}

pub async fn index(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    let Some(session) = session_for(&admin, &req) else {
        return login_page(StatusCode::OK, None);
    };
    let body = format!(
        "<header><h1>qrgate</h1>\
        <div class=\"counts\"><span>pending <b id=\"count-pending\">0</b></span>\
        <span>paid, undelivered <b id=\"count-paid_undelivered\">0</b></span>\
        <span>refund due <b id=\"count-refund_due\">0</b></span>\
        <span id=\"live\" class=\"off\">offline</span></div>{}</header>\
        <p id=\"mp-banner\" class=\"banner\"{banner}>Mercado Pago refuses the access token \
        (QRGATE_MP_ACCESS_TOKEN): no payment can be verified and no sale closes until it is replaced.</p>\
        <main data-page=\"index\"><p class=\"zone\">Times in {zone}.</p>\
        <table id=\"pos\"><thead><tr><th>POS</th><th>kind</th><th>device</th>\
        <th>sale</th><th>amount</th><th>age</th><th>last rejection</th></tr></thead><tbody></tbody></table>\
        <h2>Owed back</h2><table id=\"owing\"><thead><tr><th>sale</th><th>POS</th><th>state</th>\
        <th>owed</th><th>age</th></tr></thead><tbody></tbody></table>\
        <h2>Events <select id=\"feed-pos\"><option value=\"\">all POS</option></select></h2>\
        <ol id=\"feed\"></ol></main>",
        logout_form(session.as_ref()),
        zone = esc(admin.timezone.name()),
        // The page's script shows or hides it as the state changes.
        banner = if admin.token_status.get() == TokenState::Refused { "" } else { " hidden" },
    );
    page(&admin, session.as_ref(), "qrgate console", &body)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    if !admin.auth.needs_login() {
        // Nothing to log in to: the console needs no session here.
        return HttpResponse::SeeOther()
            .insert_header((LOCATION, "/"))
            .finish();
    }
    match admin.auth.attempt(&req, form.token.trim(), "login") {
        Attempt::Right => {}
        Attempt::Wrong { lock } => {
            let note = match lock {
                Some(d) => format!(
                    "Wrong token. Too many from this address: wait {} s.",
                    whole_secs(d)
                ),
                None => "Wrong token.".to_owned(),
            };
            let mut r = login_page(StatusCode::UNAUTHORIZED, Some(&note));
            if let Some(d) = lock {
                r.headers_mut().insert(
                    RETRY_AFTER,
                    actix_web::http::header::HeaderValue::from(whole_secs(d)),
                );
            }
            return r;
        }
        Attempt::Locked { wait } => {
            let secs = whole_secs(wait);
            let mut r = login_page(
                StatusCode::TOO_MANY_REQUESTS,
                Some(&format!(
                    "Too many wrong tokens from this address. Try again in {secs} s."
                )),
            );
            r.headers_mut().insert(
                RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(secs),
            );
            return r;
        }
    }
    let session = admin.auth.new_session();
    tracing::info!("console login");
    let mut r = HttpResponse::SeeOther()
        .insert_header((LOCATION, "/"))
        .finish();
    if let Ok(v) = admin.auth.cookie(&req, &session).parse() {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// Ends the request's session (the page's button sends its CSRF token as a
/// form field, a script may send the header) and sends the browser to the
/// login form. Without a live session there is nothing to end.
pub async fn logout(
    req: HttpRequest,
    form: Option<web::Form<LogoutForm>>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    let back = |admin: &Admin| {
        let mut r = HttpResponse::SeeOther()
            .insert_header((LOCATION, "/"))
            .finish();
        if admin.auth.needs_login() {
            if let Ok(v) = admin.auth.cleared_cookie(&req).parse() {
                r.headers_mut().insert(SET_COOKIE, v);
            }
        }
        r
    };
    let Some(session) = admin.auth.session(&req) else {
        return back(&admin);
    };
    // Like every change made with the session: its page's Origin and CSRF
    // token, so no other page can log the operator out.
    if !req.headers().contains_key(ORIGIN) {
        return ApiError::Origin(
            "a state-changing request with the console's session must carry its Origin".into(),
        )
        .error_response();
    }
    let given = req
        .headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| form.map(|f| f.into_inner().csrf))
        .unwrap_or_default();
    if !same(&given, &session.csrf) {
        return ApiError::Csrf(
            "a state-changing request from the console needs its CSRF token".into(),
        )
        .error_response();
    }
    admin.auth.end(&session.id);
    tracing::info!("console logout");
    back(&admin)
}

pub async fn sale(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    let Some(session) = session_for(&admin, &req) else {
        return login_page(StatusCode::OK, None);
    };
    let reference = match crate::orders::ExternalReference::parse(&path) {
        Ok(r) => r,
        Err(m) => {
            return html(
                StatusCode::NOT_FOUND,
                shell("no such sale", "", &esc(&m.to_string())),
            )
        }
    };
    let detail = match super::api::sale_detail(&admin, &reference).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return html(
                StatusCode::NOT_FOUND,
                shell(
                    "no such sale",
                    "",
                    "<main><p>No such sale.</p><a href=\"/\">back</a></main>",
                ),
            )
        }
        Err(e) => return e.error_response(),
    };
    let s = &detail["summary"];
    let text = |v: &serde_json::Value| esc(v.as_str().unwrap_or(""));
    let mut rows = String::new();
    for e in detail["timeline"].as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&e["local"]),
            text(&e["event"]),
            esc(&readable(&e["detail"]))
        ));
    }
    let mut orders = String::new();
    for mo in detail["merchant_orders"].as_array().into_iter().flatten() {
        let pays: Vec<String> = mo["payments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let detail = p["status_detail"]
                    .as_str()
                    .map(|d| format!(" (<span class=\"status-detail\">{}</span>)", esc(d)))
                    .unwrap_or_default();
                format!(
                    "payment <span class=\"payment-id\">{}</span> {}{detail} {}",
                    esc(&id_text(&p["id"])),
                    text(&p["status"]),
                    text(&p["amount"])
                )
            })
            .collect();
        orders.push_str(&format!(
            "<li>merchant order {} <b>{}</b> {} (seen {})</li>",
            esc(&id_text(&mo["id"])),
            text(&mo["status"]),
            pays.join(", "),
            text(&mo["local"])
        ));
    }
    let state = s["state"].as_str().unwrap_or("");
    // A sale Mercado Pago already showed to a phone may be being paid right
    // now: the page says so before the operator cancels it.
    let cancel = if state == "pending" || state == "in_process" {
        format!(
            "<button id=\"cancel\" class=\"danger\" data-served=\"{}\">Cancel sale</button>",
            s["served"].as_bool().unwrap_or(false)
        )
    } else {
        String::new()
    };
    let attention = s["attention"]
        .as_str()
        .map(|a| {
            format!(
                "<dt>attention</dt><dd id=\"sale-attention\" class=\"state {a}\">{a}</dd>",
                a = esc(a)
            )
        })
        .unwrap_or_default();
    let mut payments = String::new();
    for p in detail["ledger"]["payments"]
        .as_array()
        .into_iter()
        .flatten()
    {
        payments.push_str(&format!(
            "<tr><td class=\"payment-id\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&id_text(&p["payment_id"])),
            esc(&id_text(&p["merchant_order"])),
            text(&p["amount"]),
            text(&p["kept"]),
            text(&p["owed"]),
            text(&p["refunded"]),
        ));
    }
    let payments = table_or(
        "payments",
        &[
            "payment",
            "merchant order",
            "amount",
            "kept",
            "owed back",
            "refunded",
        ],
        &payments,
        "<p>No approved payment.</p>",
    );
    // What is owed goes back first, whole; what the sale kept, by amount.
    let owed = if detail["owed"].is_string() {
        format!(
            "<p class=\"owed\">Owed back: <b id=\"owed\">{}</b> {}</p>\
             <button id=\"refund-owed\" class=\"danger\" data-owed=\"{}\">Refund what is owed</button>",
            text(&detail["owed"]),
            text(&s["currency"]),
            text(&detail["owed"])
        )
    } else {
        String::new()
    };
    let refund = if detail["refundable"].is_string() {
        let label = if detail["owed"].is_string() {
            format!("Amount (of the {} kept)", text(&detail["refundable"]))
        } else {
            format!("Amount (empty: all {} left)", text(&detail["refundable"]))
        };
        format!(
            "{owed}<form id=\"refund-form\" data-owed=\"{}\"><label>{label} <input id=\"refund-amount\" inputmode=\"decimal\" placeholder=\"{}\"></label>\
             <button id=\"refund\" class=\"danger\">Refund</button></form>",
            detail["owed"].is_string(),
            text(&detail["refundable"])
        )
    } else {
        owed
    };
    let body = format!(
        "<header><h1><a href=\"/\">qrgate</a> / sale {reference}</h1>{logout}</header>\
         <main data-page=\"sale\" data-reference=\"{reference}\">\
         <dl><dt>POS</dt><dd>{}</dd><dt>device sale id</dt><dd>{}</dd>\
         <dt>state</dt><dd id=\"sale-state\" class=\"state {state}\">{state}</dd>{attention}\
         <dt>amount</dt><dd>{} {}</dd><dt>refunded</dt><dd id=\"refunded-total\">{}</dd></dl>\
         <div class=\"actions\">{cancel}{refund}<p id=\"action-result\"></p></div>\
         <h2>Payments</h2>{payments}\
         <h2>Timeline</h2><p class=\"zone\">Times in {}.</p><table id=\"timeline\"><tbody>{rows}</tbody></table>\
         <h2>Merchant orders and payments seen</h2><ul id=\"orders\">{orders}</ul></main>",
        text(&s["pos"]),
        text(&s["sale_id"]),
        text(&s["amount"]),
        text(&s["currency"]),
        s["refunded_total"]
            .as_str()
            .map(esc)
            .unwrap_or_else(|| "-".into()),
        esc(admin.timezone.name()),
        reference = esc(reference.as_str()),
        state = esc(state),
        logout = logout_form(session.as_ref()),
    );
    page(
        &admin,
        session.as_ref(),
        &format!("sale {reference}"),
        &body,
    )
}

/// A table of `rows` (rendered `<tr>`s) under `heads`, or `empty` when
/// there are none.
fn table_or(id: &str, heads: &[&str], rows: &str, empty: &str) -> String {
    if rows.is_empty() {
        return empty.to_owned();
    }
    let heads: String = heads
        .iter()
        .map(|h| format!("<th>{}</th>", esc(h)))
        .collect();
    format!("<table id=\"{id}\"><thead><tr>{heads}</tr></thead><tbody>{rows}</tbody></table>")
}

/// An id as the page shows it: a number or a text, never JSON quotes.
fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A POS's page: its device, its current sale, the device messages qrgate
/// refused (newest first) and its latest sales.
pub async fn pos(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    let Some(session) = session_for(&admin, &req) else {
        return login_page(StatusCode::OK, None);
    };
    let detail = match super::api::pos_detail(&admin, &path).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return html(
                StatusCode::NOT_FOUND,
                shell(
                    "no such POS",
                    "",
                    "<main><p>No such POS.</p><a href=\"/\">back</a></main>",
                ),
            )
        }
        Err(e) => return e.error_response(),
    };
    let text = |v: &serde_json::Value| esc(v.as_str().unwrap_or(""));
    let mut rejections = String::new();
    for r in detail["rejections"].as_array().into_iter().flatten() {
        rejections.push_str(&format!(
            "<tr><td>{}</td><td class=\"code\">{}</td><td>{}</td><td>{}</td></tr>",
            text(&r["local"]),
            text(&r["code"]),
            text(&r["sale_id"]),
            text(&r["message"]),
        ));
    }
    let rejections = table_or(
        "rejections",
        &["when", "code", "sale id", "why"],
        &rejections,
        "<p id=\"no-rejections\">No device message was refused.</p>",
    );
    let mut sales = String::new();
    for s in detail["sales"].as_array().into_iter().flatten() {
        let state = s["attention"]
            .as_str()
            .or(s["state"].as_str())
            .unwrap_or("");
        sales.push_str(&format!(
            "<tr><td>{}</td><td><a href=\"/sales/{r}\">{r}</a></td><td>{}</td><td class=\"state {state}\">{state}</td><td>{} {}</td></tr>",
            text(&s["accepted_local"]),
            text(&s["sale_id"]),
            text(&s["amount"]),
            text(&s["currency"]),
            r = text(&s["external_reference"]),
            state = esc(state),
        ));
    }
    let device = match detail["device"].as_str().unwrap_or("") {
        "never_seen" => "never seen".to_owned(),
        "no_presence" => "no presence reported".to_owned(),
        other => match detail["since_local"].as_str() {
            Some(since) => format!("{} since {}", esc(other), esc(since)),
            None => esc(other),
        },
    };
    let id = text(&detail["id"]);
    let body = format!(
        "<header><h1><a href=\"/\">qrgate</a> / POS {id}</h1>{logout}</header>\
         <main data-page=\"pos\" data-pos=\"{id}\"><p class=\"zone\">Times in {zone}.</p>\
         <dl><dt>kind</dt><dd>{}</dd><dt>mode</dt><dd>{}</dd><dt>device</dt><dd id=\"device\">{device}</dd></dl>\
         <h2>Refused device messages</h2>{rejections}\
         <h2>Latest sales</h2><table id=\"sales\"><thead><tr><th>accepted</th><th>sale</th><th>sale id</th>\
         <th>state</th><th>amount</th></tr></thead><tbody>{sales}</tbody></table></main>",
        text(&detail["kind"]),
        text(&detail["mode"]),
        logout = logout_form(session.as_ref()),
        zone = text(&detail["timezone"]),
    );
    page(&admin, session.as_ref(), &format!("POS {id}"), &body)
}

pub async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(CSS)
}

pub async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(JS)
}
