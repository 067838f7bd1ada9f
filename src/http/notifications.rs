//! `POST /mp/notifications`: both shapes Mercado Pago sends (IPN
//! `?topic=merchant_order&id=…` and webhooks `?type=payment&data.id=…` with a
//! JSON body). It answers once the notification is in the inbox; the work
//! happens after, in `settlement`.
//! Nothing in a notification is trusted beyond the id it names.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error;
use super::signature::{self, SignatureError};
use crate::app::Shared;
use crate::settlement::Resource;

/// Mercado Pago's notifications are a few hundred bytes.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Deserialize, Default)]
struct Body {
    topic: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    resource: Option<serde_json::Value>,
    data: Option<BodyData>,
}

#[derive(Deserialize)]
struct BodyData {
    id: Option<serde_json::Value>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Work(Resource),
    /// A topic we do not act on (chargebacks, point integrations...).
    Ignored(String),
}

fn id_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_id(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| {
        format!(
            "id {:?} is not a number",
            s.chars().take(32).collect::<String>()
        )
    })
}

/// Reads what a notification names. Errors say what was missing.
pub fn parse(query: &str, body: &[u8]) -> Result<Parsed, String> {
    let mut q_topic = None;
    let mut q_id = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = v.to_owned();
        match k {
            "topic" | "type" => q_topic = Some(v),
            "id" | "data.id" => q_id = Some(v),
            _ => {}
        }
    }
    let body: Body = if body.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?
    };
    let topic = q_topic
        .or(body.topic)
        .or(body.kind)
        .ok_or_else(|| "no topic or type".to_owned())?;
    let from_resource = body
        .resource
        .as_ref()
        .and_then(id_text)
        .and_then(|r| r.rsplit('/').next().map(str::to_owned));
    let id = q_id
        .or_else(|| {
            body.data
                .as_ref()
                .and_then(|d| d.id.as_ref())
                .and_then(id_text)
        })
        .or(from_resource);
    match topic.as_str() {
        "merchant_order" | "topic_merchant_order_wh" => {
            let id = id.ok_or("merchant_order notification without an id")?;
            Ok(Parsed::Work(Resource::MerchantOrder(parse_id(&id)?)))
        }
        "payment" => {
            let id = id.ok_or("payment notification without an id")?;
            Ok(Parsed::Work(Resource::Payment(parse_id(&id)?)))
        }
        // MP's Orders API: the body's shape is not in MP's reference, so only
        // the id is read, and the order is always fetched.
        "order" => {
            let id = id.ok_or("order notification without an id")?;
            match crate::orders::MpId::parse(&id) {
                Some(id) => Ok(Parsed::Work(Resource::Order(id.to_string()))),
                None => Err(format!(
                    "order id {:?} is not an id",
                    id.chars().take(32).collect::<String>()
                )),
            }
        }
        other => Ok(Parsed::Ignored(other.chars().take(64).collect())),
    }
}

/// `data.id` of the query string, which is what Mercado Pago signs.
fn query_data_id(query: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Q {
        #[serde(rename = "data.id")]
        data_id: Option<String>,
    }
    web::Query::<Q>::from_query(query)
        .ok()
        .and_then(|q| q.into_inner().data_id)
}

pub async fn receive(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let peer = req.peer_addr().map(|a| a.ip());
    if let Some(ip) = peer {
        if !shared.limiter.allow(ip, std::time::Instant::now()) {
            tracing::warn!(peer = %ip, "notification rate limit exceeded; answered 429");
            shared
                .gateway
                .metrics()
                .notifications
                .with_label_values(&["rate_limited"])
                .inc();
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests",
            );
        }
    }
    if let (Some(secret), Some(header)) = (&shared.webhook_secret, req.headers().get("x-signature"))
    {
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        let verified = header
            .to_str()
            .map_err(|_| SignatureError::Malformed)
            .and_then(|h| {
                signature::verify(
                    h,
                    query_data_id(req.query_string()).as_deref(),
                    request_id,
                    secret.expose(),
                    chrono::Utc::now().timestamp(),
                    shared.signature_tolerance_secs,
                )
            });
        if let Err(why) = verified {
            tracing::warn!(peer = peer.map(|p| p.to_string()), reason = %why, "notification with a bad x-signature refused");
            shared
                .gateway
                .metrics()
                .notifications
                .with_label_values(&["bad_signature"])
                .inc();
            return error(StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized");
        }
    }
    match parse(req.query_string(), &body) {
        Ok(Parsed::Work(resource)) => {
            // Written before the 200: a notification answered is never lost.
            if let Err(e) = shared.inbox.accept(&resource).await {
                tracing::error!(topic = resource.topic(), id = %resource.id(), error = %e,
                    "cannot write a notification to the inbox; answered 503 so Mercado Pago sends it again");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later",
                );
            }
            tracing::info!(topic = resource.topic(), id = %resource.id(), "notification received");
            shared
                .gateway
                .metrics()
                .notifications
                .with_label_values(&["accepted"])
                .inc();
            HttpResponse::Ok().json(serde_json::json!({ "status": "accepted" }))
        }
        Ok(Parsed::Ignored(topic)) => {
            tracing::info!(topic = %topic, "notification of a topic qrgate does not act on; ignored");
            shared
                .gateway
                .metrics()
                .notifications
                .with_label_values(&["ignored"])
                .inc();
            HttpResponse::Ok().json(serde_json::json!({ "status": "ignored" }))
        }
        Err(why) => {
            tracing::warn!(reason = %why, "unreadable notification refused");
            shared
                .gateway
                .metrics()
                .notifications
                .with_label_values(&["bad_notification"])
                .inc();
            error(StatusCode::BAD_REQUEST, "bad_notification", &why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipn_and_webhook_shapes_name_their_resource() {
        assert_eq!(
            parse("topic=merchant_order&id=1234567890", b"").unwrap(),
            Parsed::Work(Resource::MerchantOrder(1234567890))
        );
        assert_eq!(
            parse(
                "",
                br#"{"resource":"https://api.mercadolibre.com/merchant_orders/55","topic":"merchant_order"}"#
            )
            .unwrap(),
            Parsed::Work(Resource::MerchantOrder(55))
        );
        assert_eq!(
            parse(
                "type=payment&data.id=987654321",
                br#"{"action":"payment.created","type":"payment","data":{"id":"987654321"},"live_mode":true}"#
            )
            .unwrap(),
            Parsed::Work(Resource::Payment(987654321))
        );
        assert_eq!(
            parse("", br#"{"type":"payment","data":{"id":12}}"#).unwrap(),
            Parsed::Work(Resource::Payment(12))
        );
        assert_eq!(
            parse("topic=chargebacks&id=1", b"").unwrap(),
            Parsed::Ignored("chargebacks".into())
        );
    }

    #[test]
    fn orders_api_notifications_name_their_order_whatever_the_body() {
        // MP documents no body for `order`: only the id is read.
        assert_eq!(
            parse(
                "data.id=ORD01JQ4S4KY8HWQ6NA5PXB65B3D3&type=order",
                br#"{"action":"order.processed","type":"order","data":{"id":"ORD01JQ4S4KY8HWQ6NA5PXB65B3D3","status":"processed","total_paid_amount":"10.00"},"unexpected":[1,{"x":null}]}"#
            )
            .unwrap(),
            Parsed::Work(Resource::Order("ORD01JQ4S4KY8HWQ6NA5PXB65B3D3".into()))
        );
        assert_eq!(
            parse("", br#"{"type":"order","data":{"id":"ORD01ABC"}}"#).unwrap(),
            Parsed::Work(Resource::Order("ORD01ABC".into()))
        );
        assert!(parse("type=order", b"").is_err());
        assert!(parse("type=order&data.id=ORD%2F..%2Fx", b"").is_err());
    }

    use proptest::prelude::*;

    fn id_of(r: &Resource) -> String {
        match r {
            Resource::MerchantOrder(id) | Resource::Payment(id) => id.to_string(),
            Resource::Order(id) => id.clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// Whatever arrives, nothing panics, and work is only ever taken
        /// for an id that the notification itself spelled out.
        #[test]
        fn no_notification_panics_or_invents_work(
            query in "[a-z_.=&0-9%]{0,40}",
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            if let Ok(Parsed::Work(r)) = parse(&query, &body) {
                let id = id_of(&r);
                let text = format!("{query}{}", String::from_utf8_lossy(&body));
                prop_assert!(text.contains(&id), "{id} not in {text}");
            }
        }

        #[test]
        fn json_shaped_notifications_never_panic(
            topic in "(merchant_order|payment|x)?",
            id in "[0-9a-z\"-]{0,24}",
        ) {
            let body = format!(r#"{{"type":"{topic}","data":{{"id":{id}}},"resource":"{id}"}}"#);
            if let Ok(Parsed::Work(r)) = parse("", body.as_bytes()) {
                prop_assert!(body.contains(&id_of(&r).to_string()));
            }
        }
    }

    #[test]
    fn notifications_without_a_usable_id_are_refused() {
        assert!(parse("topic=merchant_order", b"").is_err());
        assert!(parse("topic=merchant_order&id=abc", b"").is_err());
        assert!(parse("", b"{not json").is_err());
        assert!(parse("", b"").is_err());
    }
}
