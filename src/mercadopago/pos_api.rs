//! Mercado Pago's stores and POS API, as `qrgate pos register` and `qrgate pos
//! list` call it: find, create and update stores
//! (`/users/{collector_id}/stores…`) and POS (`/pos…`).
//!
//! Apart from `client.rs` because these calls send JSON bodies with PUT and
//! POST and need MP's error *code* (`error`: `FIXED_AMOUNT_FALSE`,
//! `External_id-already-used`, …), not only its message. Same rules: bearer
//! token, timeouts, retries with backoff and jitter for timeouts, 5xx and 429,
//! other 4xx final. Retrying a create is safe: a second POST of the same POS
//! is a 409 and of the same store a 400 `External_id-already-used`, and the
//! caller looks both up.
//!
//! MP's answers are parsed tolerantly: ids as numbers or strings, any field
//! missing or `null`, unknown fields ignored.

use std::time::Duration;

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use super::wire::Id;
use crate::config::{MercadoPagoConfig, Secret, StoreLocation};

#[derive(Debug, thiserror::Error)]
pub enum PosApiError {
    #[error("no access token: set {}", crate::config::ACCESS_TOKEN_ENV)]
    NoToken,
    #[error("Mercado Pago did not answer in time")]
    Timeout,
    #[error("cannot reach Mercado Pago: {0}")]
    Transport(String),
    /// `code` is MP's `error` field (`FIXED_AMOUNT_FALSE`, `forbidden`, …).
    #[error("Mercado Pago answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from Mercado Pago: {0}")]
    Decode(String),
}

impl PosApiError {
    /// What MP says to retry.
    fn is_transient(&self) -> bool {
        match self {
            PosApiError::Timeout | PosApiError::Transport(_) => true,
            PosApiError::Status { status, .. } => *status == 429 || *status >= 500,
            PosApiError::NoToken | PosApiError::Decode(_) => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            PosApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// MP's error code, compared without case (MP mixes `forbidden` and
    /// `FIXED_AMOUNT_FALSE`).
    pub fn has_code(&self, code: &str) -> bool {
        matches!(self, PosApiError::Status { code: c, .. } if c.eq_ignore_ascii_case(code))
    }
}

/// The QR links MP returns for a POS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct QrLinks {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub template_document: Option<String>,
    #[serde(default)]
    pub template_image: Option<String>,
}

/// A store as MP serves it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MpStoreState {
    pub id: Id,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub location: Option<MpLocation>,
}

/// A store's location as MP serves it: MP's reference shows `address_line`
/// and the coordinates; the fields qrgate sent may or may not come back.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MpLocation {
    #[serde(default)]
    pub street_name: Option<String>,
    #[serde(default)]
    pub street_number: Option<String>,
    #[serde(default)]
    pub city_name: Option<String>,
    #[serde(default)]
    pub state_name: Option<String>,
    #[serde(default, deserialize_with = "opt_f64")]
    pub latitude: Option<f64>,
    #[serde(default, deserialize_with = "opt_f64")]
    pub longitude: Option<f64>,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub address_line: Option<String>,
}

/// A POS as MP serves it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MpPosState {
    pub id: Id,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub fixed_amount: Option<bool>,
    #[serde(default)]
    pub category: Option<Id>,
    #[serde(default)]
    pub store_id: Option<Id>,
    #[serde(default)]
    pub external_store_id: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub qr: Option<QrLinks>,
}

/// A coordinate as a JSON number or a numeric string, or `null`.
fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => Ok(n.as_f64()),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("not a coordinate: {s:?}"))),
        Some(other) => Err(de::Error::custom(format!("not a coordinate: {other}"))),
    }
}

#[derive(Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    results: Vec<T>,
}

/// The body of a store create or update.
#[derive(Debug, Serialize)]
pub struct StoreBody<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<&'a str>,
    pub location: &'a StoreLocation,
}

/// The body of a POS create.
#[derive(Debug, Serialize)]
pub struct PosCreate<'a> {
    pub name: &'a str,
    pub fixed_amount: bool,
    pub category: u32,
    pub external_store_id: &'a str,
    pub external_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
}

#[derive(Clone)]
pub struct PosApi {
    http: reqwest::Client,
    base: String,
    collector_id: u64,
    token: Secret,
    attempts: u32,
    backoff: Duration,
}

impl PosApi {
    pub fn new(cfg: &MercadoPagoConfig) -> Result<PosApi, PosApiError> {
        let token = cfg.access_token.clone().ok_or(PosApiError::NoToken)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(3000)))
            .user_agent(concat!("qrgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PosApiError::Transport(e.to_string()))?;
        Ok(PosApi {
            http,
            base: cfg.api_base.clone(),
            collector_id: cfg.collector_id,
            token,
            attempts: 5,
            backoff: Duration::from_millis(200),
        })
    }

    /// Fewer attempts and shorter waits (tests of failures).
    pub fn with_retry(mut self, attempts: u32, backoff: Duration) -> PosApi {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    async fn call_once<T: serde::de::DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, PosApiError> {
        let mut builder = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(self.token.expose());
        if !query.is_empty() {
            builder = builder.query(query);
        }
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                PosApiError::Timeout
            } else {
                // Without the URL (the rule everywhere), with the causes
                // ("connection refused" is in them).
                let e = e.without_url();
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                PosApiError::Transport(text)
            }
        };
        let resp = builder.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| PosApiError::Decode(e.to_string()))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, PosApiError> {
        let mut attempt = 0;
        loop {
            match self.call_once(&method, path, query, body).await {
                Err(e) if e.is_transient() && attempt + 1 < self.attempts => {
                    // Full jitter up to the exponential step.
                    let step = self
                        .backoff
                        .saturating_mul(1u32 << attempt.min(10))
                        .min(Duration::from_secs(5));
                    let wait = Duration::from_millis(
                        rand::thread_rng().gen_range(0..=step.as_millis() as u64),
                    );
                    tracing::warn!(%method, path, error = %e, attempt = attempt + 1, "Mercado Pago call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn stores_path(&self) -> String {
        format!("/users/{}/stores", self.collector_id)
    }

    /// The store with this external id, if MP has one.
    pub async fn find_store(&self, external_id: &str) -> Result<Option<MpStoreState>, PosApiError> {
        let page: Page<MpStoreState> = self
            .call(
                Method::GET,
                &format!("{}/search", self.stores_path()),
                &[("external_id", external_id)],
                None,
            )
            .await?;
        Ok(page
            .results
            .into_iter()
            .find(|s| s.external_id.as_deref() == Some(external_id)))
    }

    pub async fn create_store(&self, body: &StoreBody<'_>) -> Result<MpStoreState, PosApiError> {
        let body = to_value(body)?;
        self.call(Method::POST, &self.stores_path(), &[], Some(&body))
            .await
    }

    pub async fn update_store(
        &self,
        id: u64,
        body: &StoreBody<'_>,
    ) -> Result<MpStoreState, PosApiError> {
        let body = to_value(body)?;
        self.call(
            Method::PUT,
            &format!("{}/{id}", self.stores_path()),
            &[],
            Some(&body),
        )
        .await
    }

    /// The POS with this external id, if MP has one.
    pub async fn find_pos(&self, external_id: &str) -> Result<Option<MpPosState>, PosApiError> {
        let page: Page<MpPosState> = self
            .call(Method::GET, "/pos", &[("external_id", external_id)], None)
            .await?;
        Ok(page
            .results
            .into_iter()
            .find(|p| p.external_id.as_deref() == Some(external_id)))
    }

    pub async fn create_pos(&self, body: &PosCreate<'_>) -> Result<MpPosState, PosApiError> {
        let body = to_value(body)?;
        self.call(Method::POST, "/pos", &[], Some(&body)).await
    }

    /// Changes the fields `body` names (a JSON object).
    pub async fn update_pos(
        &self,
        id: u64,
        body: &serde_json::Value,
    ) -> Result<MpPosState, PosApiError> {
        self.call(Method::PUT, &format!("/pos/{id}"), &[], Some(body))
            .await
    }
}

fn to_value(body: &impl Serialize) -> Result<serde_json::Value, PosApiError> {
    serde_json::to_value(body).map_err(|e| PosApiError::Decode(e.to_string()))
}

/// MP's error body `{"message", "error", "status", "cause"}`, whatever is there.
fn api_error(status: StatusCode, body: &[u8]) -> PosApiError {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        error: Option<String>,
    }
    let parsed = serde_json::from_slice::<Body>(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|b| b.error.clone())
        .unwrap_or_default();
    let message = parsed
        .and_then(|b| b.message)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
    PosApiError::Status {
        status: status.as_u16(),
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pos_parses_with_string_ids_nulls_and_unknown_fields() {
        let p: MpPosState = serde_json::from_str(
            r#"{"id":"3000001","name":"Pump 1","fixed_amount":true,"category":null,"store_id":"40000001",
                "external_store_id":"st01","external_id":"pump1","url":null,"status":"active","uuid":"x",
                "qr":{"image":"https://qr/1.png","template_document":"https://qr/1.pdf","template_image":null}}"#,
        )
        .unwrap();
        assert_eq!(p.id, Id(3000001));
        assert_eq!(p.category, None);
        assert_eq!(p.url, None);
        assert_eq!(p.store_id, Some(Id(40000001)));
        assert_eq!(p.qr.unwrap().template_image, None);
        let p: MpPosState = serde_json::from_str(r#"{"id":7,"category":473000}"#).unwrap();
        assert_eq!(p.category, Some(Id(473000)));
    }

    #[test]
    fn a_store_parses_with_coordinates_as_numbers_or_strings() {
        let s: MpStoreState = serde_json::from_str(
            r#"{"id":40000001,"name":"Ruta 8","external_id":"st01","date_creation":"x",
                "location":{"address_line":"Av 1, Pilar, BA","latitude":"-34.45","longitude":-58.91,"reference":null}}"#,
        )
        .unwrap();
        let l = s.location.unwrap();
        assert_eq!(l.latitude, Some(-34.45));
        assert_eq!(l.longitude, Some(-58.91));
        assert_eq!(l.street_name, None);
    }

    #[test]
    fn errors_keep_mp_s_code_and_message() {
        let e = api_error(
            StatusCode::BAD_REQUEST,
            br#"{"message":"If the URL field is indicated, the FIXED_AMOUNT field must be true.","error":"FIXED_AMOUNT_FALSE","status":400,"cause":[]}"#,
        );
        assert!(e.has_code("fixed_amount_false"));
        assert_eq!(e.status(), Some(400));
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert!(e.is_transient());
        assert!(e.to_string().contains("bad gateway"));
    }
}
