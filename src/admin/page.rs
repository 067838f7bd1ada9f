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
        <main data-page=\"index\"><table id=\"pos\"><thead><tr><th>POS</th><th>kind</th><th>device</th>\
        <th>sale</th><th>amount</th><th>age</th></tr></thead><tbody></tbody></table>\
        <h2>Owed back</h2><table id=\"owing\"><thead><tr><th>sale</th><th>POS</th><th>state</th>\
        <th>owed</th><th>age</th></tr></thead><tbody></tbody></table>\
        <h2>Events <select id=\"feed-pos\"><option value=\"\">all POS</option></select></h2>\
        <ol id=\"feed\"></ol></main>",
        logout_form(session.as_ref())
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
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            text(&e["local"]),
            text(&e["event"]),
            esc(&e["detail"].to_string())
        ));
    }
    let mut orders = String::new();
    for mo in detail["merchant_orders"].as_array().into_iter().flatten() {
        let pays: Vec<String> = mo["payments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "payment {} {} {}",
                    esc(&p["id"].to_string()),
                    text(&p["status"]),
                    text(&p["amount"])
                )
            })
            .collect();
        orders.push_str(&format!(
            "<li>{} <b>{}</b> {} ({})</li>",
            esc(&mo["id"].to_string()),
            text(&mo["status"]),
            pays.join(", "),
            text(&mo["local"])
        ));
    }
    let state = s["state"].as_str().unwrap_or("");
    let cancel = if state == "pending" || state == "in_process" {
        "<button id=\"cancel\" class=\"danger\">Cancel sale</button>"
    } else {
        ""
    };
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
         <dt>state</dt><dd id=\"sale-state\" class=\"state {state}\">{state}</dd>\
         <dt>amount</dt><dd>{} {}</dd><dt>refunded</dt><dd id=\"refunded-total\">{}</dd></dl>\
         <div class=\"actions\">{cancel}{refund}<p id=\"action-result\"></p></div>\
         <h2>Timeline ({})</h2><table id=\"timeline\"><tbody>{rows}</tbody></table>\
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
