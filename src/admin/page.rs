//! The console page: server-rendered HTML with one stylesheet and a little
//! plain JavaScript embedded in the binary (stations are often offline: no
//! CDN, no build step). The page reads and acts through the admin API only.

use actix_web::http::header::{CACHE_CONTROL, LOCATION, SET_COOKIE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::auth::{Auth, Session};
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

/// The session the page runs in: the request's, or (no token configured)
/// a new one.
fn session_for(admin: &Admin, req: &HttpRequest) -> Option<(Session, bool)> {
    if let Some(s) = admin.auth.session(req) {
        return Some((s, false));
    }
    (!admin.auth.needs_login()).then(|| (admin.auth.new_session(), true))
}

fn page(admin: &Admin, session: &Session, fresh: bool, title: &str, body: &str) -> HttpResponse {
    let head = format!(
        "<meta name=\"csrf-token\" content=\"{}\"><meta name=\"timezone\" content=\"{}\">\
         <script src=\"/assets/console.js\" defer></script>",
        esc(&session.csrf),
        esc(admin.timezone.name())
    );
    let mut r = html(StatusCode::OK, shell(title, &head, body));
    if fresh {
        if let Ok(v) = Auth::cookie(session).parse() {
            r.headers_mut().insert(SET_COOKIE, v);
        }
    }
    r
}

pub async fn index(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    let Some((session, fresh)) = session_for(&admin, &req) else {
        return login_page(StatusCode::OK, None);
    };
    let body = "<header><h1>qrgate</h1>\
        <div class=\"counts\"><span>pending <b id=\"count-pending\">0</b></span>\
        <span>paid, undelivered <b id=\"count-paid_undelivered\">0</b></span>\
        <span>refund due <b id=\"count-refund_due\">0</b></span>\
        <span id=\"live\" class=\"off\">offline</span></div></header>\
        <main data-page=\"index\"><table id=\"pos\"><thead><tr><th>POS</th><th>kind</th><th>device</th>\
        <th>sale</th><th>amount</th><th>age</th></tr></thead><tbody></tbody></table>\
        <h2>Owed back</h2><table id=\"owing\"><thead><tr><th>sale</th><th>POS</th><th>state</th>\
        <th>owed</th><th>age</th></tr></thead><tbody></tbody></table>\
        <h2>Events <select id=\"feed-pos\"><option value=\"\">all POS</option></select></h2>\
        <ol id=\"feed\"></ol></main>";
    page(&admin, &session, fresh, "qrgate console", body)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(form: web::Form<LoginForm>, admin: web::Data<Admin>) -> HttpResponse {
    if admin.auth.needs_login() && !admin.auth.token_ok(form.token.trim()) {
        tracing::warn!("console login refused: wrong token");
        return login_page(StatusCode::UNAUTHORIZED, Some("Wrong token."));
    }
    let session = admin.auth.new_session();
    let mut r = HttpResponse::SeeOther()
        .insert_header((LOCATION, "/"))
        .finish();
    if let Ok(v) = Auth::cookie(&session).parse() {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

pub async fn sale(
    req: HttpRequest,
    path: web::Path<String>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    let Some((session, fresh)) = session_for(&admin, &req) else {
        return login_page(StatusCode::OK, None);
    };
    let reference = match crate::orders::ExternalReference::parse(&path) {
        Ok(r) => r,
        Err(m) => return html(StatusCode::NOT_FOUND, shell("no such sale", "", &esc(&m))),
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
        Err(r) => return r,
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
        "<header><h1><a href=\"/\">qrgate</a> / sale {reference}</h1></header>\
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
    );
    page(&admin, &session, fresh, &format!("sale {reference}"), &body)
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
