//! `POST /mp/notifications`: both shapes Mercado Pago sends (IPN
//! `?topic=merchant_order&id=…` and webhooks `?type=payment&data.id=…` with a
//! JSON body). It answers once the notification is in the inbox; the work
//! happens after, in `inbox`.
//! Nothing in a notification is trusted beyond the id it names.

use actix_web::ResponseError;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::signature::{self, SignatureError};
use super::ApiError;
use super::State;
use crate::inbox::Resource;

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

/// The query's pairs, percent-decoded, every occurrence of every key: the
/// same reading for what is signed and for what is acted on.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    web::Query::<Vec<(String, String)>>::from_query(query)
        .map(web::Query::into_inner)
        .map_err(|_| "the query string cannot be read".to_owned())
}

/// Two spellings of one id: the same text, or the same number.
fn same_id(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    a == b || matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(x), Ok(y)) if x == y)
}

/// Reads what a notification names. Errors say what was missing, or that
/// it names more than one id: the query's `id` and `data.id` (each as often
/// as they appear), the body's `data.id` and the tail of its `resource`
/// must all agree, signed or not, so the id acted on is the only one the
/// notification names (and, when signed, the one Mercado Pago signed).
pub fn parse(query: &str, body: &[u8]) -> Result<Parsed, String> {
    let mut q_topic = None;
    let mut ids: Vec<String> = Vec::new();
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "topic" | "type" => q_topic = Some(v),
            "id" | "data.id" => ids.push(v),
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
    ids.extend(
        body.data
            .as_ref()
            .and_then(|d| d.id.as_ref())
            .and_then(id_text),
    );
    ids.extend(
        body.resource
            .as_ref()
            .and_then(id_text)
            .and_then(|r| r.rsplit('/').next().map(str::to_owned)),
    );
    if let Some(first) = ids.first() {
        if let Some(other) = ids.iter().find(|i| !same_id(first, i)) {
            return Err(format!(
                "the notification names more than one id ({:?} and {:?})",
                first.chars().take(32).collect::<String>(),
                other.chars().take(32).collect::<String>()
            ));
        }
    }
    let id = ids.into_iter().next();
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

/// `data.id` of the query string, which is what Mercado Pago signs. Once
/// [`parse`] accepted the notification, it is the id acted on.
fn query_data_id(query: &str) -> Option<String> {
    query_pairs(query)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == "data.id").then_some(v))
}

/// A warning a stranger can cause, rate-limited per source.
fn warn_refused(shared: &State, peer: Option<std::net::IpAddr>, kind: &'static str, reason: &str) {
    if let Some(suppressed) = shared.warnings.allow(peer, kind, std::time::Instant::now()) {
        tracing::warn!(
            peer = peer.map(|p| p.to_string()),
            reason,
            suppressed,
            kind,
            "notification refused"
        );
    }
}

pub async fn receive(req: HttpRequest, body: web::Bytes, shared: web::Data<State>) -> HttpResponse {
    // Behind a trusted proxy, the client it names: Mercado Pago keeps its
    // own bucket instead of sharing the proxy's with everybody.
    let peer = shared.client(&req);
    let metrics = shared.book.metrics();
    if let Some(ip) = peer {
        if !shared.limiter.allow(ip, std::time::Instant::now()) {
            warn_refused(
                &shared,
                peer,
                "rate_limited",
                "rate limit exceeded; answered 429",
            );
            metrics
                .notifications
                .with_label_values(&["rate_limited"])
                .inc();
            return ApiError::RateLimited("too many requests".into()).error_response();
        }
    }
    // Read before the signature is checked: the signature is checked over
    // the very id this reading acts on.
    let parsed = match parse(req.query_string(), &body) {
        Ok(p) => p,
        Err(why) => {
            warn_refused(&shared, peer, "bad_notification", &why);
            metrics
                .notifications
                .with_label_values(&["bad_notification"])
                .inc();
            return ApiError::BadNotification(why.to_string()).error_response();
        }
    };
    if let (Some(secret), Some(header)) = (&shared.webhook_secret, req.headers().get("x-signature"))
    {
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        // Mercado Pago signs the query's data.id. A signed notification
        // without one names its id somewhere the signature does not cover.
        let verified = match (header.to_str(), query_data_id(req.query_string())) {
            (Err(_), _) => Err(SignatureError::Malformed.to_string()),
            (Ok(_), None) => {
                Err("x-signature does not cover the id: no data.id in the query".to_owned())
            }
            (Ok(h), Some(id)) => signature::verify(
                h,
                Some(&id),
                request_id,
                secret.expose(),
                chrono::Utc::now().timestamp(),
                shared.signature_tolerance_secs,
            )
            .map_err(|e| e.to_string()),
        };
        if let Err(why) = verified {
            warn_refused(&shared, peer, "bad_signature", &why);
            metrics
                .notifications
                .with_label_values(&["bad_signature"])
                .inc();
            return ApiError::Unauthorized("unauthorized".into()).error_response();
        }
    }
    match parsed {
        Parsed::Work(resource) => {
            // Written before the 200: a notification answered is never lost.
            if let Err(e) = shared.inbox.accept(&resource).await {
                tracing::error!(topic = resource.topic(), id = %resource.id(), error = %e,
                    "cannot write a notification to the inbox; answered 503 so Mercado Pago sends it again");
                return ApiError::Unavailable("try again later".into()).error_response();
            }
            tracing::info!(topic = resource.topic(), id = %resource.id(), "notification received");
            metrics.notifications.with_label_values(&["accepted"]).inc();
            HttpResponse::Ok().json(serde_json::json!({ "status": "accepted" }))
        }
        Parsed::Ignored(topic) => {
            tracing::info!(topic = %topic, "notification of a topic qrgate does not act on; ignored");
            metrics.notifications.with_label_values(&["ignored"]).inc();
            HttpResponse::Ok().json(serde_json::json!({ "status": "ignored" }))
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
                // As the query is read: percent-decoded.
                let decoded: String = query_pairs(&query)
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}&"))
                    .collect();
                let text = format!("{decoded}{}", String::from_utf8_lossy(&body));
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
    fn a_notification_that_names_two_ids_is_refused_signed_or_not() {
        for (q, b) in [
            ("type=payment&data.id=123&id=999", ""),
            ("type=payment&data.id=123&data.id=999", ""),
            ("type=payment&data.id=123&data%2Eid=999", ""),
            (
                "type=payment&id=123",
                r#"{"type":"payment","data":{"id":"999"}}"#,
            ),
            (
                "topic=merchant_order&id=1",
                r#"{"resource":"https://api.mercadolibre.com/merchant_orders/2","topic":"merchant_order"}"#,
            ),
            ("topic=chargebacks&id=1&id=2", ""),
        ] {
            let e = parse(q, b.as_bytes()).unwrap_err();
            assert!(e.contains("more than one id"), "{q} {b}: {e}");
        }
        // One id spelled more than once, as text or as a number, is one id.
        assert_eq!(
            parse(
                "type=payment&data.id=12&id=12",
                br#"{"type":"payment","data":{"id":12}}"#
            )
            .unwrap(),
            Parsed::Work(Resource::Payment(12))
        );
        // Percent-encoded keys and values are read as the signature reads them.
        assert_eq!(
            parse("type=payment&data%2Eid=%31%32", b"").unwrap(),
            Parsed::Work(Resource::Payment(12))
        );
        assert_eq!(
            query_data_id("type=payment&data%2Eid=%31%32").as_deref(),
            Some("12")
        );
    }

    #[test]
    fn notifications_without_a_usable_id_are_refused() {
        assert!(parse("topic=merchant_order", b"").is_err());
        assert!(parse("topic=merchant_order&id=abc", b"").is_err());
        assert!(parse("", b"{not json").is_err());
        assert!(parse("", b"").is_err());
    }
}
