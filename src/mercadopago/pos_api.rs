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

use reqwest::Method;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use super::client::{MpClient, MpError, RetryPolicy};
use super::wire::Id;
use crate::config::{MercadoPagoConfig, StoreLocation};

/// The stores and POS API's errors are the client's: MP's `error` code is in
/// [`MpError::Status`].
pub type PosApiError = MpError;

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
    client: MpClient,
    collector_id: u64,
}

impl PosApi {
    pub fn new(cfg: &MercadoPagoConfig) -> Result<PosApi, PosApiError> {
        if cfg.access_token.is_none() {
            return Err(MpError::NoToken);
        }
        Ok(PosApi {
            client: MpClient::new(cfg)?,
            collector_id: cfg.collector_id,
        })
    }

    /// Fewer attempts and shorter waits (tests of failures).
    pub fn with_retry(mut self, attempts: u32, backoff: Duration) -> PosApi {
        self.client = self.client.with_retry(RetryPolicy {
            attempts: attempts.max(1),
            base: backoff,
            max: Duration::from_secs(5),
        });
        self
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, PosApiError> {
        self.client.send(method, path, query, body).await
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
    serde_json::to_value(body).map_err(|e| MpError::Decode(e.to_string()))
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
}
