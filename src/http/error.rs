//! The one error type of qrgate's two HTTP listeners, the public one and the
//! console's. Each error's status and stable `code` sit in one table
//! ([`ApiError::parts`]); the body is always `{"code": …, "message": …}` and
//! never carries internal detail (that goes to the log, where the handler
//! that failed writes it). actix-web's own errors (405, 413…) and the answers
//! actix-http writes before any handler (400, 408, 431) map onto the same
//! table through [`ApiError::from_status`].

use actix_web::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no such endpoint")]
    NotFound,
    /// The console or the admin API named a sale that is not there.
    #[error("{0}")]
    UnknownSale(String),
    /// The console or the admin API named a POS that is not configured.
    #[error("{0}")]
    UnknownPos(String),
    #[error("{0}")]
    BadRequest(String),
    /// A console query parameter that cannot be read.
    #[error("{0}")]
    BadQuery(String),
    /// A notification qrgate cannot read, or whose ids disagree.
    #[error("{0}")]
    BadNotification(String),
    #[error("{0}")]
    Unauthorized(String),
    /// A state-changing console request without the session's CSRF token.
    #[error("{0}")]
    Csrf(String),
    /// A console request from a page of another origin.
    #[error("{0}")]
    Origin(String),
    /// A console request under a host name the console does not answer to.
    #[error("{0}")]
    UnknownHost(String),
    #[error("{0}")]
    NotCancellable(String),
    #[error("{0}")]
    RateLimited(String),
    /// The admin API without the operator's token, or with a wrong one:
    /// `retry_after` (seconds) when that guess locked the source out.
    #[error("the admin API needs the operator's token (Authorization: Bearer ...)")]
    TokenNeeded { retry_after: Option<u64> },
    /// A source locked out after too many wrong tokens.
    #[error("too many wrong tokens from this address: try again in {retry_after} s")]
    LockedOut { retry_after: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("method not allowed here")]
    MethodNotAllowed,
    #[error("the request took too long")]
    RequestTimeout,
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("the request head is too large")]
    HeadTooLarge,
    #[error("{0}")]
    Internal(String),
    /// A server error actix produced by itself (a 503 while stopping…).
    #[error("internal error")]
    ServerError(StatusCode),
    /// Any other status actix produces by itself.
    #[error("the request failed")]
    Other(StatusCode),
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// The status and the stable code of each error: the one table.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::UnknownSale(_) => (StatusCode::NOT_FOUND, "unknown_sale"),
            ApiError::UnknownPos(_) => (StatusCode::NOT_FOUND, "unknown_pos"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
            ApiError::BadNotification(_) => (StatusCode::BAD_REQUEST, "bad_notification"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Csrf(_) => (StatusCode::FORBIDDEN, "csrf"),
            ApiError::Origin(_) => (StatusCode::FORBIDDEN, "origin"),
            ApiError::UnknownHost(_) => (StatusCode::MISDIRECTED_REQUEST, "unknown_host"),
            ApiError::NotCancellable(_) => (StatusCode::CONFLICT, "not_cancellable"),
            ApiError::RateLimited(_) | ApiError::LockedOut { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            }
            ApiError::TokenNeeded { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::HeadTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
            ),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            ApiError::ServerError(status) => (*status, "internal_error"),
            ApiError::Other(status) => (*status, "error"),
        }
    }

    /// The error for a status actix produced by itself.
    pub fn from_status(status: StatusCode) -> ApiError {
        match status.as_u16() {
            400 => ApiError::BadRequest("the request could not be read".into()),
            404 => ApiError::NotFound,
            405 => ApiError::MethodNotAllowed,
            408 => ApiError::RequestTimeout,
            413 => ApiError::PayloadTooLarge,
            429 => ApiError::RateLimited("too many requests".into()),
            431 => ApiError::HeadTooLarge,
            500..=599 => ApiError::ServerError(status),
            _ => ApiError::Other(status),
        }
    }

    /// The body, as sent.
    pub fn body(&self) -> Vec<u8> {
        let message = self.to_string();
        serde_json::to_vec(&Body {
            code: self.parts().1,
            message: &message,
        })
        .unwrap_or_default()
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        r.content_type("application/json");
        if let ApiError::TokenNeeded { .. } = self {
            r.insert_header((WWW_AUTHENTICATE, "Bearer"));
        }
        match self {
            ApiError::TokenNeeded {
                retry_after: Some(s),
            }
            | ApiError::LockedOut { retry_after: s } => {
                r.insert_header((RETRY_AFTER, *s));
            }
            _ => {}
        }
        r.body(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_actix_produces_keeps_its_status_and_gets_a_stable_code() {
        for (status, code) in [
            (400, "bad_request"),
            (404, "not_found"),
            (405, "method_not_allowed"),
            (408, "request_timeout"),
            (413, "payload_too_large"),
            (429, "rate_limited"),
            (431, "request_header_fields_too_large"),
            (500, "internal_error"),
            (503, "internal_error"),
            (418, "error"),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            let e = ApiError::from_status(status);
            assert_eq!(e.parts(), (status, code), "{status}");
        }
    }

    #[test]
    fn the_body_is_the_code_and_the_message_and_nothing_else() {
        let e = ApiError::UnknownSale("no such sale".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "unknown_sale", "message": "no such sale"})
        );
        assert_eq!(e.error_response().status(), StatusCode::NOT_FOUND);
    }
}
