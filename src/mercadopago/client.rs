//! Mercado Pago's API as qrgate calls it: bearer token, timeouts, and retries
//! with backoff and jitter for what MP says to retry (timeouts, 5xx, 429);
//! other 4xx are final (docs/mercadopago.md, "Errors").

use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;

use super::wire::{ApiError, ApiOrder, MerchantOrder, Payment, SearchPage};
use crate::config::{MercadoPagoConfig, Secret};
use crate::orders::MpId;

#[derive(Debug, thiserror::Error)]
pub enum MpError {
    #[error("no access token: set {}", crate::config::ACCESS_TOKEN_ENV)]
    NoToken,
    #[error("Mercado Pago did not answer in time")]
    Timeout,
    #[error("cannot reach Mercado Pago: {0}")]
    Transport(String),
    /// `code` is MP's `error` field (`FIXED_AMOUNT_FALSE`, `not_found`, …),
    /// empty when the answer had none.
    #[error("Mercado Pago answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    #[error("Mercado Pago is rate limiting us (429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("unexpected answer from Mercado Pago: {0}")]
    Decode(String),
}

impl MpError {
    /// What MP says to retry.
    pub fn is_transient(&self) -> bool {
        match self {
            MpError::Timeout | MpError::Transport(_) | MpError::RateLimited { .. } => true,
            MpError::Status { status, .. } => *status >= 500,
            MpError::NoToken | MpError::Decode(_) => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, MpError::Status { status: 404, .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MpError::Status { status, .. } => Some(*status),
            MpError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// MP's error code, compared without case (MP mixes `forbidden` and
    /// `FIXED_AMOUNT_FALSE`).
    pub fn has_code(&self, code: &str) -> bool {
        matches!(self, MpError::Status { code: c, .. } if c.eq_ignore_ascii_case(code))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random wait up to the exponential step, so many sales
    /// failing together do not retry together.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let jittered =
            Duration::from_millis(rand::thread_rng().gen_range(0..=exp.as_millis() as u64));
        retry_after.map_or(jittered, |r| r.max(jittered).min(self.max.max(r)))
    }
}

/// One API call.
struct Request<'a> {
    method: reqwest::Method,
    path: &'a str,
    /// Query parameters, escaped by reqwest.
    query: &'a [(&'a str, &'a str)],
    idempotency_key: Option<&'a str>,
    /// A JSON body; `None` sends an empty one (a full refund, a delete).
    body: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    fn get(path: &'a str) -> Request<'a> {
        Request {
            method: reqwest::Method::GET,
            path,
            query: &[],
            idempotency_key: None,
            body: None,
        }
    }
}

#[derive(serde::Deserialize)]
struct RefundAnswer {
    id: super::wire::Id,
    #[serde(default, deserialize_with = "super::wire::opt_decimal")]
    amount: Option<rust_decimal::Decimal>,
}

/// A refund Mercado Pago made: its id and, when the answer says it, how
/// much it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundMade {
    pub id: MpId,
    pub amount: Option<rust_decimal::Decimal>,
}

#[derive(Clone)]
pub struct MpClient {
    http: reqwest::Client,
    base: String,
    token: Option<Secret>,
    retry: RetryPolicy,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl MpClient {
    pub fn new(cfg: &MercadoPagoConfig) -> Result<MpClient, MpError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(3000)))
            .user_agent(concat!("qrgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MpError::Transport(e.to_string()))?;
        Ok(MpClient {
            http,
            base: cfg.api_base.clone(),
            token: cfg.access_token.clone(),
            retry: RetryPolicy::default(),
            metrics: None,
        })
    }

    /// Counts and times every call in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> MpClient {
        self.metrics = Some(metrics);
        self
    }

    fn observe(&self, path: &str, status: Option<u16>, started: std::time::Instant) {
        if let Some(m) = &self.metrics {
            m.mp_call(path, status, started.elapsed().as_secs_f64());
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> MpClient {
        self.retry = retry;
        self
    }

    async fn call_once(&self, req: &Request<'_>) -> Result<bytes::Bytes, MpError> {
        let token = self.token.as_ref().ok_or(MpError::NoToken)?;
        let url = format!("{}{}", self.base, req.path);
        let mut builder = self.http.request(req.method.clone(), url);
        if !req.query.is_empty() {
            builder = builder.query(req.query);
        }
        if let Some(key) = req.idempotency_key {
            builder = builder.header("X-Idempotency-Key", key);
        }
        builder = match req.body {
            Some(body) => builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec()),
            None if req.method != reqwest::Method::GET => {
                builder.header(reqwest::header::CONTENT_LENGTH, 0)
            }
            None => builder,
        };
        builder = builder.bearer_auth(token.expose());
        let started = std::time::Instant::now();
        let sent = builder.send().await;
        self.observe(
            req.path,
            sent.as_ref().ok().map(|r| r.status().as_u16()),
            started,
        );
        let resp = sent.map_err(transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.map_err(transport)?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(MpError::RateLimited { retry_after });
        }
        if !status.is_success() {
            let parsed = serde_json::from_slice::<ApiError>(&body).ok();
            let code = parsed
                .as_ref()
                .and_then(|e| e.error.clone())
                .unwrap_or_default();
            let message = parsed
                .and_then(|e| e.message.or(e.error))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(MpError::Status {
                code,
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// A JSON call of any method, with query parameters; for the stores and
    /// POS API (`pos_api.rs`).
    pub(crate) async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, MpError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| MpError::Decode(e.to_string()))?;
        self.call(&Request {
            method,
            path,
            query,
            idempotency_key: None,
            body: body.as_deref(),
        })
        .await
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, MpError> {
        self.call(&Request::get(path)).await
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, req: &Request<'_>) -> Result<T, MpError> {
        let body = self.call_raw(req).await?;
        serde_json::from_slice(&body).map_err(|e| MpError::Decode(e.to_string()))
    }

    async fn call_raw(&self, req: &Request<'_>) -> Result<bytes::Bytes, MpError> {
        let path = req.path;
        let mut attempt = 0;
        loop {
            match self.call_once(req).await {
                Err(e) if e.is_transient() && attempt + 1 < self.retry.attempts => {
                    let retry_after = match &e {
                        MpError::RateLimited { retry_after } => *retry_after,
                        _ => None,
                    };
                    let wait = self.retry.delay(attempt, retry_after);
                    tracing::warn!(path, error = %e, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, "Mercado Pago call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    pub async fn merchant_order(&self, id: u64) -> Result<(MerchantOrder, String), MpError> {
        let raw: Box<serde_json::value::RawValue> =
            self.get(&format!("/merchant_orders/{id}")).await?;
        let mo: MerchantOrder =
            serde_json::from_str(raw.get()).map_err(|e| MpError::Decode(e.to_string()))?;
        Ok((mo, raw.get().to_owned()))
    }

    pub async fn payment(&self, id: u64) -> Result<Payment, MpError> {
        self.get(&format!("/v1/payments/{id}")).await
    }

    /// Every merchant order of a sale (one per scan), each with its body,
    /// page after page. One Mercado Pago cannot be read is skipped, with a
    /// line saying so: the others still count.
    pub async fn search_merchant_orders(
        &self,
        external_reference: &str,
    ) -> Result<Vec<(MerchantOrder, String)>, MpError> {
        /// A sale has one merchant order per scan: a few, never thousands.
        const MAX_PAGES: usize = 20;
        let mut found = Vec::new();
        let mut offset = 0u64;
        for _ in 0..MAX_PAGES {
            // External references are [A-Za-z0-9_-]: nothing to escape.
            let path = if offset == 0 {
                format!("/merchant_orders/search?external_reference={external_reference}")
            } else {
                format!(
                    "/merchant_orders/search?external_reference={external_reference}&offset={offset}"
                )
            };
            let page: SearchPage = self.get(&path).await?;
            let elements = page.elements.unwrap_or_default();
            let n = elements.len() as u64;
            for raw in elements {
                match serde_json::from_str::<MerchantOrder>(raw.get()) {
                    Ok(mo) => found.push((mo, raw.get().to_owned())),
                    Err(e) => tracing::warn!(external_reference, error = %e,
                        "a merchant order in Mercado Pago's search cannot be read; skipped"),
                }
            }
            let next = page.next_offset.unwrap_or(offset + n);
            if n == 0 || next <= offset || page.total.is_none_or(|t| next >= t) {
                break;
            }
            offset = next;
        }
        Ok(found)
    }

    /// Refunds a payment for the operator: all that is left (`None`, an
    /// empty body) or `amount` (`{"amount": 10.50}`); the refund's id.
    pub async fn refund_amount(
        &self,
        payment_id: u64,
        amount: Option<&str>,
        idempotency_key: &str,
    ) -> Result<RefundMade, MpError> {
        let body = amount.map(|a| format!("{{\"amount\":{a}}}"));
        let r: RefundAnswer = self
            .call(&Request {
                method: reqwest::Method::POST,
                path: &format!("/v1/payments/{payment_id}/refunds"),
                query: &[],
                idempotency_key: Some(idempotency_key),
                body: body.as_deref().map(str::as_bytes),
            })
            .await?;
        Ok(RefundMade {
            id: MpId::Num(r.id.0),
            amount: r.amount,
        })
    }

    /// Refunds an Orders API order: all of it (`None`) or `amount` of its
    /// payment `transaction`.
    pub async fn refund_order_amount(
        &self,
        id: &str,
        part: Option<(&str, &str)>,
        idempotency_key: &str,
    ) -> Result<RefundMade, MpError> {
        let body = part.map(|(transaction, amount)| {
            serde_json::json!({"transactions": [{"id": transaction, "amount": amount}]}).to_string()
        });
        let order: ApiOrder = self
            .call(&Request {
                method: reqwest::Method::POST,
                path: &format!("/v1/orders/{}/refund", path_segment(id)),
                query: &[],
                idempotency_key: Some(idempotency_key),
                body: body.as_deref().map(str::as_bytes),
            })
            .await?;
        order
            .last_refund()
            .ok_or_else(|| MpError::Decode(format!("order {id} refunded without a refund id")))
    }

    /// Creates an order with MP's Orders API. The idempotency key is derived
    /// from the sale, so a retry (or a restart) never creates a second one.
    pub async fn create_order(
        &self,
        body: &[u8],
        idempotency_key: &str,
    ) -> Result<ApiOrder, MpError> {
        self.call(&Request {
            method: reqwest::Method::POST,
            path: "/v1/orders",
            query: &[],
            idempotency_key: Some(idempotency_key),
            body: Some(body),
        })
        .await
    }

    /// An Orders API order, with its body as fetched.
    pub async fn order(&self, id: &str) -> Result<(ApiOrder, String), MpError> {
        let raw: Box<serde_json::value::RawValue> = self
            .get(&format!("/v1/orders/{}", path_segment(id)))
            .await?;
        let order: ApiOrder =
            serde_json::from_str(raw.get()).map_err(|e| MpError::Decode(e.to_string()))?;
        Ok((order, raw.get().to_owned()))
    }

    /// Cancels an Orders API order that nobody paid.
    pub async fn cancel_order(&self, id: &str, idempotency_key: &str) -> Result<(), MpError> {
        self.call_raw(&Request {
            method: reqwest::Method::POST,
            path: &format!("/v1/orders/{}/cancel", path_segment(id)),
            query: &[],
            idempotency_key: Some(idempotency_key),
            body: None,
        })
        .await
        .map(drop)
    }

    /// Places an attended order on a POS (instore API); it replaces any
    /// order already there, so placing the same sale twice is harmless.
    pub async fn place_instore_order(
        &self,
        collector_id: u64,
        store: &str,
        pos: &str,
        body: &[u8],
    ) -> Result<(), MpError> {
        let path = format!(
            "/instore/qr/seller/collectors/{collector_id}/stores/{}/pos/{}/orders",
            path_segment(store),
            path_segment(pos)
        );
        self.call_raw(&Request {
            method: reqwest::Method::PUT,
            path: &path,
            query: &[],
            idempotency_key: None,
            body: Some(body),
        })
        .await
        .map(drop)
    }

    /// Removes the attended order from a POS (instore API). `false` when
    /// there was none (404): already paid, expired or removed.
    pub async fn remove_instore_order(
        &self,
        collector_id: u64,
        pos: &str,
    ) -> Result<bool, MpError> {
        let path = format!(
            "/instore/qr/seller/collectors/{collector_id}/pos/{}/orders",
            path_segment(pos)
        );
        self.delete(&path).await
    }

    /// Whether an attended order is on the POS (instore API).
    pub async fn instore_order_present(
        &self,
        collector_id: u64,
        pos: &str,
    ) -> Result<bool, MpError> {
        let path = format!(
            "/instore/qr/seller/collectors/{collector_id}/pos/{}/orders",
            path_segment(pos)
        );
        match self.call_raw(&Request::get(&path)).await {
            Ok(body) => Ok(serde_json::from_slice::<Vec<serde_json::Value>>(&body)
                .map(|orders| !orders.is_empty())
                // An answer that is not an array still says 200: something is there.
                .unwrap_or(true)),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Places an attended order with the legacy API (any 2xx is success).
    pub async fn place_legacy_order(
        &self,
        collector_id: u64,
        pos: &str,
        body: &[u8],
    ) -> Result<(), MpError> {
        let path = format!("/mpmobile/instore/qr/{collector_id}/{}", path_segment(pos));
        self.call_raw(&Request {
            method: reqwest::Method::POST,
            path: &path,
            query: &[],
            idempotency_key: None,
            body: Some(body),
        })
        .await
        .map(drop)
    }

    /// Removes a legacy attended order; `false` when there was none.
    pub async fn remove_legacy_order(&self, collector_id: u64, pos: &str) -> Result<bool, MpError> {
        let path = format!("/mpmobile/instore/qr/{collector_id}/{}", path_segment(pos));
        self.delete(&path).await
    }

    async fn delete(&self, path: &str) -> Result<bool, MpError> {
        match self
            .call_raw(&Request {
                method: reqwest::Method::DELETE,
                path,
                query: &[],
                idempotency_key: None,
                body: None,
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Store and POS external ids are checked at start, but a path segment is
/// escaped anyway: nothing in configuration may rewrite a URL's path.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A failed request, without its URL (the rule everywhere), with its causes
/// ("connection refused" is in them).
fn transport(e: reqwest::Error) -> MpError {
    if e.is_timeout() {
        return MpError::Timeout;
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    MpError::Transport(text)
}
