//! Who may use the admin listener. The token is compared in constant time;
//! sessions live in memory (a restart logs the operator out).

use actix_web::http::header::{AUTHORIZATION, COOKIE, ORIGIN};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use dashmap::DashMap;
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::http::error;

pub const COOKIE_NAME: &str = "qrgate_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

pub struct Auth {
    token: Option<Secret>,
    /// Session id -> its CSRF token.
    sessions: DashMap<String, String>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A session the request carries.
pub struct Session {
    pub id: String,
    pub csrf: String,
}

impl Auth {
    pub fn new(token: Option<Secret>) -> Auth {
        Auth {
            token,
            sessions: DashMap::new(),
        }
    }

    pub fn needs_login(&self) -> bool {
        self.token.is_some()
    }

    pub fn token_ok(&self, given: &str) -> bool {
        self.token.as_ref().is_some_and(|t| same(given, t.expose()))
    }

    pub fn new_session(&self) -> Session {
        let s = Session {
            id: random_hex(),
            csrf: random_hex(),
        };
        self.sessions.insert(s.id.clone(), s.csrf.clone());
        s
    }

    pub fn cookie(session: &Session) -> String {
        format!(
            "{COOKIE_NAME}={}; HttpOnly; SameSite=Strict; Path=/",
            session.id
        )
    }

    pub fn session(&self, req: &HttpRequest) -> Option<Session> {
        let header = req.headers().get(COOKIE)?.to_str().ok()?;
        let id = header
            .split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE_NAME)
            .map(|(_, v)| v.to_owned())?;
        let csrf = self.sessions.get(&id)?.value().clone();
        Some(Session { id, csrf })
    }

    /// Who is asking (`token`, `console`, `local`), or the answer that
    /// refuses them. `changes` marks a state-changing request.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: &HttpRequest, changes: bool) -> Result<&'static str, HttpResponse> {
        let bearer = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(given) = bearer {
            return match &self.token {
                Some(t) if same(given.trim(), t.expose()) => Ok("token"),
                Some(_) => Err(unauthorized()),
                None => Ok("local"),
            };
        }
        if let Some(session) = self.session(req) {
            if !changes {
                return Ok("console");
            }
            let given = req
                .headers()
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if same(given, &session.csrf) {
                return Ok("console");
            }
            return Err(error(
                StatusCode::FORBIDDEN,
                "csrf",
                "a state-changing request from the console needs its CSRF token",
            ));
        }
        if self.token.is_some() {
            return Err(unauthorized());
        }
        // No token: loopback only. A browser's cross-site request carries
        // an Origin; only non-browser clients may change state without a
        // session.
        if changes && req.headers().contains_key(ORIGIN) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "csrf",
                "a state-changing request from a browser needs the console's session and CSRF token",
            ));
        }
        Ok("local")
    }
}

pub fn unauthorized() -> HttpResponse {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs the operator's token (Authorization: Bearer ...)",
    );
    r.headers_mut().insert(
        actix_web::http::header::WWW_AUTHENTICATE,
        actix_web::http::header::HeaderValue::from_static("Bearer"),
    );
    r
}
