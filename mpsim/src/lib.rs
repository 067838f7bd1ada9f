//! A Mercado Pago simulator for qrgate's tests and `qrgate demo`, since MP's servers cannot be reached
//! from a test run.
//!
//! It plays the three parts MP plays in the unattended QR model (docs/mercadopago.md):
//! - the MP app: [`Simulator::scan`] polls a POS URL once, as a customer's phone does, and checks the
//!   order answer the way MP would; every successful scan opens a new merchant order, as MP does;
//! - MP's backend: [`Simulator::pay`] approves or rejects a payment and sends the IPN / webhook
//!   notifications to the order's `notification_url`;
//! - MP's API at [`Simulator::base_url`]: `GET /merchant_orders/{id}`, `GET /merchant_orders/search`,
//!   `GET /v1/payments/{id}`, `POST /v1/payments/{id}/refunds`, `GET /users/me` (the token's account),
//!   and the attended model's
//!   `PUT`/`DELETE .../pos/{pos}/orders`, with bodies shaped like captured real ones (noise fields,
//!   `null`s, `order.id` as a string in payments, amounts as exact JSON numbers).
//!
//! Stores and POS registration (`registry`): `GET /users/{collector}/stores/search?external_id=`,
//! `POST /users/{collector}/stores` (201), `PUT /users/{collector}/stores/{id}` (200), `GET /stores/{id}`,
//! `GET /pos?external_id=&external_store_id=&store_id=&category=&offset=&limit=`, `POST /pos` (201),
//! `GET /pos/{id}`, `PUT /pos/{id}` (200), `DELETE /pos/{id}` (204). Searches answer
//! `{"paging":{"total","offset","limit"},"results":[…]}` (limit 50 by default). Errors carry MP's codes
//! from its API reference in `error`: `FIXED_AMOUNT_FALSE`, `INVALID_EXTERNAL_ID`, `EXTERNAL_ID_TOO_LONG`
//! (40 or more), `INVALID_URL`, `URL_TOO_LONG` (300 or more: MP says "less than 300"), `UNKNOWN_MCC`
//! (`POS_UNKNOWN_MCC` on PUT), `INVALID_CATEGORY` (not a number), `INEXISTENT_EXTERNAL_STORE_ID`,
//! `EXTERNAL_STORE_ID_NOT_MATCH`, `NAME_TOO_LONG` (45 or more), `UNKNOWN_FIELD_EXCEPTION` (a field
//! MP does not know), `MISSING_BODY`; a url whose host is not enabled is 403 `forbidden`; an
//! `external_id` already used by another POS is 409 `pos_already_exists`. Stores: `UNKNOWN_FIELD`,
//! `INVALID_NAME`, `INVALID_LOCATION`, `INVALID_STREET_NAME`/`_NUMBER`, `INVALID_CITY_NAME`,
//! `INVALID_STATE_NAME` (strings, required), `INVALID_LATITUDE`/`LONGITUDE` (numbers, required),
//! `EXTERNAL_ID_TOO_LONG` (over 60) and 400 `External_id-already-used`. A collector in the path that is
//! not the token's is 403 `forbidden`.
//!
//! The attended model (`attended`): the instore API's `PUT …/stores/{store}/pos/{pos}/orders` (204),
//! `GET …/pos/{pos}/orders` (200 `[order as placed]`, or 404 `point_of_sale_in_store_order_not_found`)
//! and `DELETE …/pos/{pos}/orders` (204, or that 404 when there is none), and the legacy
//! `POST /mpmobile/instore/qr/{user}/{pos}` (200 `{}`) and `DELETE` on that path (204 or 404). One
//! order per POS, whichever API placed it; [`Simulator::scan_attended`] turns it into a merchant order.
//! Bodies are checked as `validate` reads POS answers (the PUT as the v2 answer, the legacy POST as
//! the v1 answer without `collector_id`), refusals answering 400 with MP-style codes
//! (`invalid_items.unit_price`, `invalid_total_amount`, `invalid_sponsor.id`, `invalid_expiration_date`…).
//!
//! MP's Orders API (`orders_api`): `POST /v1/orders` (201, `type: "qr"`, amounts as two-decimal
//! strings, `X-Idempotency-Key` required: the same key answers the first answer again),
//! `GET /v1/orders/{id}` (200/404), `POST /v1/orders/{id}/cancel` (200; 409 unless `created`) and
//! `POST /v1/orders/{id}/refund` (200; empty body = all that is left, or `{"transactions": [{"id":
//! payment id, "amount": "10.00"}]}`; 409 unless `processed`). [`Simulator::pay_order`] pays it and
//! sends the `order` webhook to [`Simulator::set_orders_webhook_url`]; the order sits on its POS's
//! attended slot, so [`Simulator::scan_attended`] shows it (with `merchant_order_id` 0 and `order_id`).
//!
//! Standalone (`cli`, `control`): `mpsim serve` (and `qrgate simulator`) serves all this on an address
//! of its own, with a control API under `/_sim/` that plays the app and MP's backend for scripts and
//! device makers (docs/simulator.md); [`Simulator::start_on`] serves on a listener the caller bound.
//!
//! Test levers ([`Simulator::fail_next`], [`Simulator::set_latency`], [`Simulator::insert_merchant_order`],
//! [`NotifyMode`], [`Simulator::set_allowed_url_hosts`], [`Simulator::set_known_categories`],
//! [`Simulator::set_pos_field`], [`Simulator::drop_attended_order`], [`Simulator::expire_attended_order`],
//! [`Simulator::expire_order`]) break it on purpose: outages, 429s, slow answers, lost, duplicated and
//! forged notifications, foreign merchant orders, hosts MP has not enabled, drift at MP.
//!
//! Choices where MP documents nothing (each one the simulator's own):
//! - Store and POS ids are JSON numbers; a POS's `store_id` is the store's number. MP's reference calls
//!   some of them strings: a client should accept both.
//! - A store needs `name` and a `location` with the four text fields and both coordinates; `reference`,
//!   `zip_code` and `business_hours` are optional and echoed. A PUT merges: the fields given replace,
//!   location fields one by one; `address_line` is "street_name street_number, city_name, state_name".
//! - A POS needs `name`, `external_id` and a store (`external_store_id` or `store_id`); `category` is
//!   optional (served as `null`). The known categories are the site's gas-station MCC
//!   ([`GAS_STATION_MCC`], the site taken from `site_currency`) and [`GENERIC_MCC_CATEGORIES`]. A
//!   missing store is 400 `INEXISTENT_EXTERNAL_STORE_ID`, as MP's reference says (not 404).
//! - A POS PUT may change any field of the POST, `url: null` removes the url; only the fields it sends
//!   are checked against the category list and the enabled hosts, so earlier drift does not fail it.
//! - POS checks run in this order: unknown fields, each field's type and shape, name, external_id,
//!   store, `FIXED_AMOUNT_FALSE`, category, host (403), uniqueness (409).
//!
//! - Attended orders: a missing `expiration_date` is MP's 10 minutes, a past or malformed one is 400;
//!   the legacy body has none (10 minutes). An expired order reads as none (GET and DELETE 404). A
//!   fully paid order leaves the POS (MP closes it), a rejected or partial payment leaves it there. The
//!   instore GET shows the order of either API, and either API's DELETE removes it. The POS need not
//!   be registered unless [`Simulator::set_require_registered_pos`] says so. `taxes` (`[{"type":
//!   string, "value": number}]`) are checked and kept as sent; they change no total.
//! - Orders API: statuses `created`, `action_required`, `processed`, `canceled`, `refunded`, and
//!   `expired` (read from `expiration_time`, an ISO 8601 duration, default `PT10M`). A rejected payment
//!   leaves the order `created` on its POS with its payment `failed`; `ApprovedAmount(x)` processes it
//!   with `total_paid_amount` x (short or over: the case a client must not close on); `InProcess` makes
//!   it `action_required` (still payable, not cancelable). A partial refund leaves it `processed` /
//!   `partially_refunded`. The webhook (`POST {url}?data.id={id}&type=order`) carries `action`
//!   `order.{status}` (`order.action_required` for a `created` order after a failed attempt), `type`
//!   `order`, `data: {id, status, status_detail, total_paid_amount?, version}`; one per payment
//!   attempt (`NotifyMode::None` none, `Duplicated(n)` n), none for cancel, refund or expiry; with no
//!   webhook url set nothing is sent and [`Simulator::unsent_order_notifications`] says so. Items are
//!   optional; when sent, Σ unit_price × quantity (whole quantities) must be `total_amount`, as must the
//!   one payment's `amount`. Unknown properties are `unsupported_properties`. The same key with a
//!   different body answers the first order. A new order of any API on the POS replaces an Orders API
//!   order there: it stays `created` until it expires, off the POS.
//! - v2 poll answers (`validate`): a 202's `status.status_detail` must be one of MP's spellings
//!   (`Waiting_for_order`, `in_process`, `notihing_to_pay`), anything else is
//!   [`SimError::InvalidOrder`] (v1's undocumented `error.type`s are only logged); a 200 is v2 only
//!   with `order-version: 2`, and a v2 body without the header is refused saying so.
//! - The v2 answer's amounts must be JSON numbers, `unit_measure` is required, `sponsor.id` must be a
//!   number; the v1 answer and legacy body keep v1's looseness (numbers or decimal strings).
//!
//! - Notifications withheld ([`Simulator::withhold_notifications`]) are kept in the order they would
//!   have gone, and [`Simulator::release_notifications`] sends them all at once; a notification
//!   asked for by name (`notify_*`) is sent even while withholding.
//! - A merchant order expires only when told ([`Simulator::expire_merchant_order`]): `status` and
//!   `order_status` read `expired` and it can no longer be paid; a closed one cannot expire.
//!
//! Not simulated: OAuth and `client-id`; `x-signature` on webhooks; MP's
//! own retries of failed notifications (a failed delivery is recorded, and a test re-sends with
//! `notify_*`); notifications after refunds; merchant orders expiring by themselves, chargebacks, `pending`
//! payment flows beyond [`PaymentOutcome::InProcess`]; `marketplace_fee` and `loyalty`; MP's
//! poll cadence (each [`Simulator::scan`] is one poll, the test decides how many); store deletion and
//! business-hours validation.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use chrono::{DateTime, FixedOffset, Utc};
use rand::Rng;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

mod attended;
pub mod cli;
mod control;
mod orders_api;
mod registry;
mod validate;

use validate::{validate_v1, validate_v2, waiting_v1, waiting_v2};

pub use orders_api::OrderRefundRecord;
pub use registry::{gas_station_mcc, GAS_STATION_MCC, GENERIC_MCC_CATEGORIES};

// Distinct ranges, so that a merchant order id used as a payment id (or the reverse) finds nothing.
const FIRST_MERCHANT_ORDER_ID: u64 = 30_000_000_001;
const FIRST_PAYMENT_ID: u64 = 90_000_000_001;
const FIRST_REFUND_ID: u64 = 50_000_001;

const MP_APP_USER_AGENT: &str = "MercadoPago-Android/2.0 (simulator)";
const IPN_USER_AGENT: &str = "MercadoPago Feed v2.0 merchant_order";
const WEBHOOK_USER_AGENT: &str = "MercadoPago WebHook v1.0 payment";
const RESOURCE_BASE: &str = "https://api.mercadolibre.com/merchant_orders/";

// MP's poll timeout is not documented; a POS URL slower than this is broken anyway.
const SCAN_TIMEOUT: Duration = Duration::from_secs(10);
// MP gives a notification endpoint 22 seconds to answer.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(22);
// Attended orders expire after 10 minutes unless `expiration_date` says otherwise.
const ATTENDED_TTL_MINUTES: i64 = 10;
const SEARCH_DEFAULT_LIMIT: usize = 30;
// `qrgate demo` may run for hours: the call and notification logs keep only the latest entries.
const LOG_CAP: usize = 100_000;

/// Who the simulated seller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatorConfig {
    pub access_token: String,
    pub collector_id: u64,
    /// Shown as the merchant orders' `sponsor_id` (MP usually sends `null` there).
    pub sponsor_id: Option<u64>,
    pub site_currency: String,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            access_token: "TEST-sim-token".to_owned(),
            collector_id: 178_106_235,
            sponsor_id: None,
            site_currency: "ARS".to_owned(),
        }
    }
}

/// Which notifications [`Simulator::pay`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotifyMode {
    /// Nothing: the "notifications lost" case.
    None,
    /// One IPN `topic=merchant_order`.
    Ipn,
    /// One webhook `type=payment`.
    Webhook,
    /// An IPN and a webhook, concurrently, as MP really sends several.
    #[default]
    Both,
    /// Each notification of `Both` sent n times, all concurrently.
    Duplicated(usize),
}

/// What the customer's payment attempt ends as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// Approved for what is left to pay of the merchant order.
    Approved,
    /// Approved for this amount (partial, short or over payment).
    ApprovedAmount(Decimal),
    /// `rejected` / `cc_rejected_other_reason`; the merchant order stays `opened`.
    Rejected,
    /// `rejected` with this `status_detail` (MP's reason: `cc_rejected_insufficient_amount`,
    /// `cc_rejected_call_for_authorize`…); the merchant order stays `opened`.
    RejectedWith(String),
    /// `in_process` / `pending_contingency`: counts toward nothing.
    InProcess,
}

impl PaymentOutcome {
    /// The `status_detail` of a rejection (MP's default reason when none is named).
    fn rejection_detail(&self) -> &str {
        match self {
            PaymentOutcome::RejectedWith(detail) => detail,
            _ => "cc_rejected_other_reason",
        }
    }
}

/// One poll of a POS URL, as the MP app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Nothing to pay yet: `kind` is the v1 `error.type` (HTTP 400) or the v2 `status.status_detail` (202).
    Waiting {
        http_status: u16,
        kind: String,
        message: Option<String>,
    },
    Order(ScannedOrder),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedOrder {
    /// 0 for an Orders API order, which opens no merchant order.
    pub merchant_order_id: u64,
    /// The Orders API order scanned (`None` for merchant orders).
    pub order_id: Option<String>,
    pub external_reference: String,
    pub total_amount: Decimal,
    pub currency_id: String,
    pub notification_url: String,
    pub raw_body: String,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRecord {
    pub payment_id: u64,
    /// What was asked for: `None` is a full refund (empty body).
    pub amount: Option<Decimal>,
    pub idempotency_key: Option<String>,
    pub refund_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    pub method: String,
    /// Path and query, as received.
    pub path: String,
    pub status: u16,
}

/// What became of the notifications of one payment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dispatched {
    pub sent: Vec<SentNotification>,
    /// Held back by [`Simulator::withhold_notifications`].
    pub withheld: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentNotification {
    pub url: String,
    /// `None`: no answer (connection failed or timed out).
    pub status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("HTTP failure: {0}")]
    Http(String),
    #[error("Mercado Pago would refuse this order: {0}")]
    InvalidOrder(String),
    #[error("unknown merchant order {0}")]
    UnknownMerchantOrder(u64),
    #[error("unknown payment {0}")]
    UnknownPayment(u64),
    #[error("unexpected answer: HTTP {status}: {body}")]
    BadAnswer { status: u16, body: String },
    #[error("no POS with external_id {0}")]
    UnknownPos(String),
    #[error("POS {0} has no url registered")]
    PosWithoutUrl(String),
    #[error("no store with external_id {0}")]
    UnknownStore(String),
    #[error("unknown Orders API order {0}")]
    UnknownOrder(String),
}

/// A running simulator; clones share it. Dropping the last clone stops its HTTP server.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    base_url: String,
    handle: ServerHandle,
    client: reqwest::Client,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The stop command is sent when `stop` is called; awaiting its completion is not needed here.
        #[allow(clippy::let_underscore_future)]
        let _ = self.handle.stop(false);
    }
}

impl Simulator {
    /// Binds 127.0.0.1 on a port the OS picks and serves MP's API there on the current tokio runtime.
    pub async fn start(config: SimulatorConfig) -> std::io::Result<Simulator> {
        Simulator::start_on(std::net::TcpListener::bind("127.0.0.1:0")?, config).await
    }

    /// Serves MP's API, and the control API under `/_sim/` (`control`), on a listener the caller
    /// bound: the standalone simulator binds the address it is given.
    pub async fn start_on(
        listener: std::net::TcpListener,
        config: SimulatorConfig,
    ) -> std::io::Result<Simulator> {
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::new()),
        });
        let data = web::Data::from(Arc::clone(&shared));
        let control = web::Data::new(control::Handle::default());
        let control_data = control.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(control_data.clone())
                .service(web::scope(control::PREFIX).default_service(web::to(control::handle)))
                .default_service(web::to(api))
        })
        .listen(listener)?
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .run();
        let handle = server.handle();
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "Mercado Pago simulator stopped");
            }
        });
        // No pooled connections: a connection is bound to the runtime that opened it, and callers
        // (tests, the demo's handlers) may use the simulator from several runtimes.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(std::io::Error::other)?;
        // A wildcard address is reached on loopback.
        let host = match address.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
            ip if ip.is_unspecified() => "[::1]".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let base_url = format!("http://{host}:{}", address.port());
        tracing::info!(%base_url, "Mercado Pago simulator listening");
        let simulator = Simulator {
            inner: Arc::new(Inner {
                shared,
                base_url,
                handle,
                client,
            }),
        };
        control.attach(&simulator);
        Ok(simulator)
    }

    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub async fn stop(&self) {
        self.inner.handle.stop(true).await;
    }

    /// One poll of `pos_url` as the MP app does it; an order answer opens a new merchant order. A 400
    /// is a v1 wait, a 202 a v2 wait, a 200 an order (v2 with the header `order-version: 2`).
    pub async fn scan(&self, pos_url: &str) -> Result<Scan, SimError> {
        let response = self
            .inner
            .client
            .get(pos_url)
            .header(reqwest::header::USER_AGENT, MP_APP_USER_AGENT)
            .timeout(SCAN_TIMEOUT)
            .send()
            .await
            .map_err(|e| SimError::Http(format!("GET {pos_url}: {e}")))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        };
        let v2 = header("order-version").as_deref() == Some("2");
        let content_type = header("content-type");
        let body = response
            .text()
            .await
            .map_err(|e| SimError::Http(format!("GET {pos_url}: reading the answer: {e}")))?;
        if !matches!(status, 200 | 202 | 400) {
            return Err(SimError::BadAnswer { status, body });
        }
        let is_json = content_type
            .as_deref()
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
        if !is_json {
            return Err(SimError::InvalidOrder(format!(
                "HTTP {status} answer has Content-Type {content_type:?}; MP expects application/json"
            )));
        }
        match status {
            400 => waiting_v1(&body).ok_or(SimError::BadAnswer { status, body }),
            202 => match waiting_v2(&body) {
                None => Err(SimError::BadAnswer { status, body }),
                Some(scan) => scan.map_err(|refusal| SimError::InvalidOrder(refusal.message)),
            },
            _ => {
                let config = &self.inner.shared.config;
                let request = if v2 {
                    validate_v2(&body, config)
                } else {
                    validate_v1(&body, config).map_err(|refusal| {
                        // MP reads a 200 without `order-version: 2` as v1, whatever the body.
                        if validate_v2(&body, config).is_ok() {
                            validate::Refusal {
                                code: "invalid_order_version".to_owned(),
                                message: "a v2 order body needs the header order-version: 2"
                                    .to_owned(),
                            }
                        } else {
                            refusal
                        }
                    })
                }
                .map_err(|refusal| SimError::InvalidOrder(refusal.message))?;
                Ok(Scan::Order(self.open_order(request, body, None).await))
            }
        }
    }

    /// The customer scans an attended POS's QR: opens a merchant order for the order placed there
    /// with `PUT .../pos/{external_pos_id}/orders`. With no order (or an expired one) the app shows
    /// nothing: `Scan::Waiting { http_status: 404, kind: "no_order" | "expired" }`, the simulator's own
    /// words, since MP documents no answer for that.
    pub async fn scan_attended(&self, external_pos_id: &str) -> Result<Scan, SimError> {
        let placed = self
            .inner
            .shared
            .lock()
            .attended
            .get(external_pos_id)
            .cloned();
        let Some(placed) = placed else {
            return Ok(Scan::Waiting {
                http_status: 404,
                kind: "no_order".to_owned(),
                message: Some(format!("no order on POS {external_pos_id}")),
            });
        };
        if placed.expires <= Utc::now() {
            return Ok(Scan::Waiting {
                http_status: 404,
                kind: "expired".to_owned(),
                message: Some(format!("the order on POS {external_pos_id} expired")),
            });
        }
        if let attended::AttendedApi::Orders(order_id) = &placed.api {
            return Ok(self.scan_orders_api(order_id, external_pos_id));
        }
        let pos = Some(external_pos_id.to_owned());
        Ok(Scan::Order(
            self.open_order(placed.request, placed.body, pos).await,
        ))
    }

    /// The order placed on an attended POS (its body as received), if any.
    pub fn attended_order(&self, external_pos_id: &str) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let placed = state.attended.get(external_pos_id)?;
        serde_json::from_str(&placed.body).ok()
    }

    async fn open_order(
        &self,
        request: OrderRequest,
        raw_body: String,
        attended_pos: Option<String>,
    ) -> ScannedOrder {
        let (id, notify) = {
            let mut state = self.inner.shared.lock();
            let id = state.next_merchant_order_id;
            state.next_merchant_order_id += 1;
            let now = mp_time(Utc::now());
            let preference_id = format!(
                "{}-{:08x}-{:04x}-{:012x}",
                self.inner.shared.config.collector_id,
                rand::thread_rng().gen::<u32>(),
                rand::thread_rng().gen::<u16>(),
                rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff
            );
            let order = MerchantOrder {
                id,
                external_reference: request.external_reference.clone(),
                preference_id,
                notification_url: request.notification_url.clone(),
                currency_id: request.currency_id.clone(),
                items: request.items,
                total_amount: request.total,
                payment_ids: Vec::new(),
                payer_id: None,
                date_created: now.clone(),
                last_updated: now,
                attended_pos,
                expired: false,
            };
            state
                .merchant_orders
                .insert(id, Stored::Sim(Box::new(order)));
            (id, state.notify_on_open)
        };
        tracing::info!(
            merchant_order = id,
            external_reference = %request.external_reference,
            total_amount = %request.total,
            "simulated scan opened a merchant order"
        );
        if notify {
            let ipn = ipn(&request.notification_url, id);
            // MP's "opened" notification proves nothing; a failure is recorded like any other.
            let _ = deliver(
                self.inner.client.clone(),
                Arc::clone(&self.inner.shared),
                ipn,
            )
            .await;
        }
        ScannedOrder {
            merchant_order_id: id,
            order_id: None,
            external_reference: request.external_reference,
            total_amount: request.total,
            currency_id: request.currency_id,
            notification_url: request.notification_url,
            raw_body,
            status: 200,
        }
    }

    /// The customer pays the merchant order; notifications go out per [`NotifyMode`] before this returns
    /// (or are held back while [`Simulator::withhold_notifications`] is on).
    pub async fn pay(
        &self,
        merchant_order_id: u64,
        outcome: PaymentOutcome,
    ) -> Result<u64, SimError> {
        Ok(self.pay_notifying(merchant_order_id, outcome).await?.0)
    }

    /// [`Simulator::pay`], saying what became of the notifications.
    async fn pay_notifying(
        &self,
        merchant_order_id: u64,
        outcome: PaymentOutcome,
    ) -> Result<(u64, Dispatched), SimError> {
        let (payment_id, notification_url, mode) = {
            let mut state = self.inner.shared.lock();
            state.record_payment(merchant_order_id, &outcome, &self.inner.shared.config)?
        };
        let mut outgoing = Vec::new();
        let ipn_note = ipn(&notification_url, merchant_order_id);
        let webhook_note = webhook(
            &notification_url,
            payment_id,
            self.inner.shared.config.collector_id,
        );
        match mode {
            NotifyMode::None => {}
            NotifyMode::Ipn => outgoing.push(ipn_note),
            NotifyMode::Webhook => outgoing.push(webhook_note),
            NotifyMode::Both => outgoing.extend([ipn_note, webhook_note]),
            NotifyMode::Duplicated(times) => {
                for _ in 0..times {
                    outgoing.push(ipn_note.clone());
                    outgoing.push(webhook_note.clone());
                }
            }
        }
        Ok((payment_id, self.dispatch(outgoing).await))
    }

    /// Sends these notifications concurrently, as MP does, or holds them back while withholding.
    async fn dispatch(&self, outgoing: Vec<Outgoing>) -> Dispatched {
        {
            let mut state = self.inner.shared.lock();
            if state.withhold {
                for notification in &outgoing {
                    tracing::info!(url = %notification.url, "simulated notification withheld");
                }
                let withheld = outgoing.len();
                state.withheld.extend(outgoing);
                return Dispatched {
                    sent: Vec::new(),
                    withheld,
                };
            }
        }
        self.deliver_all(outgoing).await
    }

    async fn deliver_all(&self, outgoing: Vec<Outgoing>) -> Dispatched {
        let mut tasks = tokio::task::JoinSet::new();
        for notification in outgoing {
            let client = self.inner.client.clone();
            let shared = Arc::clone(&self.inner.shared);
            tasks.spawn(async move {
                let url = notification.url.clone();
                let status = deliver(client, shared, notification).await.ok();
                SentNotification { url, status }
            });
        }
        // A failed delivery is recorded in `notifications_sent`; it is not pay()'s failure.
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(notification) = done {
                sent.push(notification);
            }
        }
        Dispatched { sent, withheld: 0 }
    }

    /// While on, the notifications of payments are kept instead of sent (the "notifications late"
    /// case, as opposed to [`NotifyMode::None`]'s lost ones); [`Simulator::release_notifications`]
    /// sends them. Turning it off sends nothing by itself.
    pub fn withhold_notifications(&self, on: bool) {
        self.inner.shared.lock().withhold = on;
    }

    /// Whether notifications are withheld, and how many wait.
    pub fn withheld_notifications(&self) -> (bool, usize) {
        let state = self.inner.shared.lock();
        (state.withhold, state.withheld.len())
    }

    /// Sends every withheld notification now, concurrently.
    pub async fn release_notifications(&self) -> Vec<SentNotification> {
        let outgoing = std::mem::take(&mut self.inner.shared.lock().withheld);
        self.deliver_all(outgoing).await.sent
    }

    pub fn set_notify_mode(&self, mode: NotifyMode) {
        self.inner.shared.lock().notify_mode = mode;
    }

    /// When true, each scan also sends an IPN for the new `opened` merchant order, as MP does.
    pub fn set_notify_on_open(&self, yes: bool) {
        self.inner.shared.lock().notify_on_open = yes;
    }

    /// Sends one IPN `topic=merchant_order` for this merchant order now.
    pub async fn notify_merchant_order(&self, merchant_order_id: u64) -> Result<u16, SimError> {
        let url = {
            let state = self.inner.shared.lock();
            match state.merchant_orders.get(&merchant_order_id) {
                None => return Err(SimError::UnknownMerchantOrder(merchant_order_id)),
                Some(stored) => stored.notification_url().ok_or_else(|| {
                    SimError::InvalidOrder(format!(
                        "merchant order {merchant_order_id} has no notification_url"
                    ))
                })?,
            }
        };
        let notification = ipn(&url, merchant_order_id);
        deliver(
            self.inner.client.clone(),
            Arc::clone(&self.inner.shared),
            notification,
        )
        .await
    }

    /// Sends one payment webhook for this payment now, to its merchant order's notification_url.
    pub async fn notify_payment(&self, payment_id: u64) -> Result<u16, SimError> {
        let url = {
            let state = self.inner.shared.lock();
            let payment = state
                .payments
                .get(&payment_id)
                .ok_or(SimError::UnknownPayment(payment_id))?;
            payment.notification_url.clone().ok_or_else(|| {
                SimError::InvalidOrder(format!("payment {payment_id} has no notification_url"))
            })?
        };
        let collector = self.inner.shared.config.collector_id;
        let notification = webhook(&url, payment_id, collector);
        deliver(
            self.inner.client.clone(),
            Arc::clone(&self.inner.shared),
            notification,
        )
        .await
    }

    /// A raw POST to `url` (with `query` appended when not empty), for malformed and forged notifications.
    pub async fn post_notification(
        &self,
        url: &str,
        query: &str,
        body: &str,
    ) -> Result<u16, SimError> {
        let query = query.trim_start_matches('?');
        let url = if query.is_empty() {
            url.to_owned()
        } else {
            with_query(url, query)
        };
        let notification = Outgoing {
            url,
            body: body.to_owned(),
            user_agent: WEBHOOK_USER_AGENT,
        };
        deliver(
            self.inner.client.clone(),
            Arc::clone(&self.inner.shared),
            notification,
        )
        .await
    }

    /// Stores a merchant order as given (forged, foreign, short...), served as is by the API. Assigns
    /// `"id"` when absent or not an id. Its `payments[]` become payments of `GET /v1/payments/{id}`
    /// (existing payments are kept). [`Simulator::pay`] does not pay such an order.
    pub fn insert_merchant_order(&self, mut mo: serde_json::Value) -> u64 {
        let mut state = self.inner.shared.lock();
        let given = mo.get("id").and_then(json_id);
        let id = match given {
            Some(id) => id,
            None => {
                let id = state.next_merchant_order_id;
                if let Some(object) = mo.as_object_mut() {
                    object.insert("id".to_owned(), serde_json::Value::from(id));
                }
                id
            }
        };
        if id >= state.next_merchant_order_id && id < FIRST_PAYMENT_ID {
            state.next_merchant_order_id = id + 1;
        }
        state.adopt_payments(id, &mo);
        state.merchant_orders.insert(id, Stored::Raw(mo));
        id
    }

    /// The merchant order as `GET /merchant_orders/{id}` serves it. Amounts become f64 in a `Value`;
    /// read the API's text for exact decimals.
    pub fn merchant_order(&self, id: u64) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let text = state.render_merchant_order(id, &self.inner.shared.config)?;
        serde_json::from_str(&text).ok()
    }

    pub fn merchant_orders_for(&self, external_reference: &str) -> Vec<serde_json::Value> {
        let state = self.inner.shared.lock();
        state
            .orders_for(Some(external_reference))
            .into_iter()
            .filter_map(|id| state.render_merchant_order(id, &self.inner.shared.config))
            .filter_map(|text| serde_json::from_str(&text).ok())
            .collect()
    }

    pub fn refunds(&self) -> Vec<RefundRecord> {
        let state = self.inner.shared.lock();
        state.refunds.iter().map(|r| r.record.clone()).collect()
    }

    pub fn api_calls(&self) -> Vec<ApiCall> {
        self.inner.shared.lock().api_calls.iter().cloned().collect()
    }

    pub fn notifications_sent(&self) -> Vec<SentNotification> {
        self.inner
            .shared
            .lock()
            .notifications
            .iter()
            .cloned()
            .collect()
    }

    /// The next `count` API calls whose path (with query) starts with `path_prefix` answer `status`
    /// with MP's error JSON (429 adds `Retry-After: 1`), before the token is even looked at.
    pub fn fail_next(&self, path_prefix: &str, status: u16, count: usize) {
        if count == 0 {
            return;
        }
        self.inner.shared.lock().failures.push(FailRule {
            prefix: path_prefix.to_owned(),
            status,
            remaining: count,
        });
    }

    /// Forgets every `fail_next` rule still pending: Mercado Pago is back.
    pub fn clear_failures(&self) {
        self.inner.shared.lock().failures.clear();
    }

    /// MP gives up on an unpaid merchant order: it reads `expired` and can no longer be paid. A closed
    /// one cannot expire.
    pub fn expire_merchant_order(&self, merchant_order_id: u64) -> Result<(), SimError> {
        let mut state = self.inner.shared.lock();
        let closed = match state.merchant_orders.get(&merchant_order_id) {
            Some(Stored::Sim(order)) if order.expired => {
                return Err(SimError::InvalidOrder(format!(
                    "merchant order {merchant_order_id} expired already"
                )))
            }
            Some(Stored::Sim(order)) => state.totals(order).paid >= order.total_amount,
            Some(Stored::Raw(_)) => {
                return Err(SimError::InvalidOrder(format!(
                    "merchant order {merchant_order_id} was inserted by a test: served as given"
                )))
            }
            None => return Err(SimError::UnknownMerchantOrder(merchant_order_id)),
        };
        if closed {
            return Err(SimError::InvalidOrder(format!(
                "merchant order {merchant_order_id} is closed: it cannot expire"
            )));
        }
        if let Some(Stored::Sim(order)) = state.merchant_orders.get_mut(&merchant_order_id) {
            order.expired = true;
            order.last_updated = mp_time(Utc::now());
        }
        tracing::info!(
            merchant_order = merchant_order_id,
            "simulated merchant order expired"
        );
        Ok(())
    }

    /// Whether a customer could still pay this merchant order: scanned here, not expired, not paid
    /// in full.
    pub fn merchant_order_payable(&self, merchant_order_id: u64) -> bool {
        let state = self.inner.shared.lock();
        match state.merchant_orders.get(&merchant_order_id) {
            Some(Stored::Sim(order)) => {
                !order.expired && state.totals(order).paid < order.total_amount
            }
            _ => false,
        }
    }

    /// A refund made at MP itself (the seller's panel, not qrgate's API call): `amount`, or all
    /// that is left of the payment. Returns the refund's id. MP's checks are those of
    /// `POST /v1/payments/{id}/refunds`.
    pub fn refund_payment(
        &self,
        payment_id: u64,
        amount: Option<Decimal>,
    ) -> Result<u64, SimError> {
        let mut state = self.inner.shared.lock();
        make_refund(
            &mut state,
            &self.inner.shared.config,
            payment_id,
            amount,
            None,
        )
        .map_err(|error| match error.status {
            404 => SimError::UnknownPayment(payment_id),
            _ => SimError::InvalidOrder(error.message),
        })?;
        Ok(state
            .refunds
            .last()
            .map(|refund| refund.record.refund_id)
            .unwrap_or_default())
    }

    /// Answers under `path_prefix` are delayed by `delay` (zero removes it). The call takes effect
    /// when received, so a client that times out has still, say, refunded: as with a lost answer.
    pub fn set_latency(&self, path_prefix: &str, delay: Duration) {
        let mut state = self.inner.shared.lock();
        state.latencies.retain(|(prefix, _)| prefix != path_prefix);
        if !delay.is_zero() {
            state.latencies.push((path_prefix.to_owned(), delay));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator's database.

struct Shared {
    config: SimulatorConfig,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("simulator state poisoned by a panic elsewhere")
    }
}

struct State {
    next_merchant_order_id: u64,
    next_payment_id: u64,
    next_refund_id: u64,
    merchant_orders: BTreeMap<u64, Stored>,
    payments: BTreeMap<u64, Payment>,
    refunds: Vec<StoredRefund>,
    /// (payment id, X-Idempotency-Key) -> the first answer's body.
    refund_answers: HashMap<(u64, String), String>,
    /// Attended orders by external POS id.
    attended: HashMap<String, AttendedOrder>,
    api_calls: VecDeque<ApiCall>,
    notifications: VecDeque<SentNotification>,
    failures: Vec<FailRule>,
    latencies: Vec<(String, Duration)>,
    notify_mode: NotifyMode,
    notify_on_open: bool,
    withhold: bool,
    withheld: Vec<Outgoing>,
    registry: registry::Registry,
    require_registered_pos: bool,
    orders_api: orders_api::OrdersApi,
}

enum Stored {
    Sim(Box<MerchantOrder>),
    /// Inserted by a test: served exactly as given.
    Raw(serde_json::Value),
}

impl Stored {
    fn external_reference(&self) -> Option<&str> {
        match self {
            Stored::Sim(order) => Some(&order.external_reference),
            Stored::Raw(value) => value.get("external_reference")?.as_str(),
        }
    }

    fn notification_url(&self) -> Option<String> {
        match self {
            Stored::Sim(order) => Some(order.notification_url.clone()),
            Stored::Raw(value) => Some(value.get("notification_url")?.as_str()?.to_owned()),
        }
    }
}

struct MerchantOrder {
    id: u64,
    external_reference: String,
    preference_id: String,
    notification_url: String,
    currency_id: String,
    items: Vec<OrderItem>,
    total_amount: Decimal,
    payment_ids: Vec<u64>,
    payer_id: Option<u64>,
    date_created: String,
    last_updated: String,
    attended_pos: Option<String>,
    /// MP gave up on it unpaid ([`Simulator::expire_merchant_order`]).
    expired: bool,
}

#[derive(Clone)]
struct OrderItem {
    title: String,
    description: String,
    quantity: Decimal,
    unit_price: Decimal,
}

struct Payment {
    id: u64,
    merchant_order_id: u64,
    status: String,
    status_detail: String,
    amount: Decimal,
    refunded: Decimal,
    currency_id: String,
    external_reference: Option<String>,
    description: String,
    notification_url: Option<String>,
    payer_id: u64,
    date_created: String,
    date_approved: Option<String>,
    last_modified: String,
}

struct StoredRefund {
    record: RefundRecord,
    amount: Decimal,
    date_created: String,
}

/// The order on an attended POS (one per POS; a new one replaces it).
#[derive(Clone)]
struct AttendedOrder {
    request: OrderRequest,
    /// The body as received.
    body: String,
    expires: DateTime<Utc>,
    api: attended::AttendedApi,
}

struct FailRule {
    prefix: String,
    status: u16,
    remaining: usize,
}

/// An order answer that passed MP's checks.
#[derive(Clone)]
struct OrderRequest {
    external_reference: String,
    notification_url: String,
    currency_id: String,
    items: Vec<OrderItem>,
    total: Decimal,
}

/// How a merchant order's payments add up.
struct Totals {
    paid: Decimal,
    refunded: Decimal,
    in_process: bool,
}

impl State {
    fn new() -> Self {
        State {
            next_merchant_order_id: FIRST_MERCHANT_ORDER_ID,
            next_payment_id: FIRST_PAYMENT_ID,
            next_refund_id: FIRST_REFUND_ID,
            merchant_orders: BTreeMap::new(),
            payments: BTreeMap::new(),
            refunds: Vec::new(),
            refund_answers: HashMap::new(),
            attended: HashMap::new(),
            api_calls: VecDeque::new(),
            notifications: VecDeque::new(),
            failures: Vec::new(),
            latencies: Vec::new(),
            notify_mode: NotifyMode::default(),
            notify_on_open: false,
            withhold: false,
            withheld: Vec::new(),
            registry: registry::Registry::new(),
            require_registered_pos: false,
            orders_api: orders_api::OrdersApi::default(),
        }
    }

    fn totals(&self, order: &MerchantOrder) -> Totals {
        let mut totals = Totals {
            paid: Decimal::ZERO,
            refunded: Decimal::ZERO,
            in_process: false,
        };
        for payment in order
            .payment_ids
            .iter()
            .filter_map(|id| self.payments.get(id))
        {
            match payment.status.as_str() {
                // A refunded payment was accredited: MP keeps it in paid_amount and reverts the order.
                "approved" | "refunded" => {
                    totals.paid += payment.amount;
                    totals.refunded += payment.refunded;
                }
                "in_process" | "pending" => totals.in_process = true,
                _ => {}
            }
        }
        totals
    }

    /// Creates the payment and attaches it; returns (payment id, notification_url, notify mode).
    fn record_payment(
        &mut self,
        merchant_order_id: u64,
        outcome: &PaymentOutcome,
        config: &SimulatorConfig,
    ) -> Result<(u64, String, NotifyMode), SimError> {
        let order = match self.merchant_orders.get(&merchant_order_id) {
            None => return Err(SimError::UnknownMerchantOrder(merchant_order_id)),
            Some(Stored::Raw(_)) => {
                return Err(SimError::InvalidOrder(format!(
                    "merchant order {merchant_order_id} was inserted by a test; pay() pays only scanned orders"
                )))
            }
            Some(Stored::Sim(order)) => order,
        };
        if order.expired {
            return Err(SimError::InvalidOrder(format!(
                "merchant order {merchant_order_id} expired: nothing to pay"
            )));
        }
        let left = order.total_amount - self.totals(order).paid;
        let owed = if left > Decimal::ZERO {
            left
        } else {
            order.total_amount
        };
        let (amount, status, detail) = match outcome {
            PaymentOutcome::Approved if left <= Decimal::ZERO => {
                return Err(SimError::InvalidOrder(format!(
                    "merchant order {merchant_order_id} has nothing left to pay; use ApprovedAmount to overpay"
                )))
            }
            PaymentOutcome::Approved => (left, "approved", "accredited"),
            PaymentOutcome::ApprovedAmount(amount) if *amount <= Decimal::ZERO => {
                return Err(SimError::InvalidOrder(format!(
                    "a payment of {amount} is not a payment"
                )))
            }
            PaymentOutcome::ApprovedAmount(amount) => (*amount, "approved", "accredited"),
            PaymentOutcome::Rejected | PaymentOutcome::RejectedWith(_) => {
                (owed, "rejected", outcome.rejection_detail())
            }
            PaymentOutcome::InProcess => (owed, "in_process", "pending_contingency"),
        };
        let now = mp_time(Utc::now());
        let payer_id = order
            .payer_id
            .unwrap_or_else(|| rand::thread_rng().gen_range(100_000_000..1_999_999_999));
        let notification_url = order.notification_url.clone();
        let payment_id = self.next_payment_id;
        let payment = Payment {
            id: payment_id,
            merchant_order_id,
            status: status.to_owned(),
            status_detail: detail.to_owned(),
            amount,
            refunded: Decimal::ZERO,
            currency_id: order.currency_id.clone(),
            external_reference: Some(order.external_reference.clone()),
            description: order
                .items
                .first()
                .map(|item| item.title.clone())
                .unwrap_or_default(),
            notification_url: Some(notification_url.clone()),
            payer_id,
            date_created: now.clone(),
            date_approved: (status == "approved").then(|| now.clone()),
            last_modified: now.clone(),
        };
        self.next_payment_id += 1;
        self.payments.insert(payment_id, payment);
        let mut closed_attended = None;
        if let Some(Stored::Sim(order)) = self.merchant_orders.get_mut(&merchant_order_id) {
            order.payment_ids.push(payment_id);
            order.payer_id = Some(payer_id);
            order.last_updated = now;
            closed_attended = order
                .attended_pos
                .clone()
                .map(|pos| (pos, order.external_reference.clone()));
        }
        if let (Some((pos, reference)), Some(Stored::Sim(order))) = (
            closed_attended,
            self.merchant_orders.get(&merchant_order_id),
        ) {
            // A paid attended order leaves its POS, so the next customer does not see it.
            if self.totals(order).paid >= order.total_amount
                && self
                    .attended
                    .get(&pos)
                    .is_some_and(|placed| placed.request.external_reference == reference)
            {
                self.attended.remove(&pos);
            }
        }
        tracing::info!(
            merchant_order = merchant_order_id,
            payment = payment_id,
            %amount,
            status,
            collector = config.collector_id,
            "simulated payment"
        );
        Ok((payment_id, notification_url, self.notify_mode))
    }

    /// Makes the payments of an inserted merchant order fetchable and refundable.
    fn adopt_payments(&mut self, merchant_order_id: u64, mo: &serde_json::Value) {
        let Some(payments) = mo.get("payments").and_then(|p| p.as_array()) else {
            return;
        };
        let text = |value: &serde_json::Value, key: &str| -> Option<String> {
            Some(value.get(key)?.as_str()?.to_owned())
        };
        let now = mp_time(Utc::now());
        for payment in payments {
            let Some(id) = payment.get("id").and_then(json_id) else {
                continue;
            };
            if self.payments.contains_key(&id) {
                continue;
            }
            let amount = |key: &str| payment.get(key).and_then(json_decimal);
            let status = text(payment, "status").unwrap_or_else(|| "approved".to_owned());
            self.payments.insert(
                id,
                Payment {
                    id,
                    merchant_order_id,
                    status_detail: text(payment, "status_detail")
                        .unwrap_or_else(|| "accredited".to_owned()),
                    status,
                    amount: amount("transaction_amount").unwrap_or_default(),
                    refunded: amount("amount_refunded").unwrap_or_default(),
                    currency_id: text(payment, "currency_id").unwrap_or_default(),
                    external_reference: text(mo, "external_reference"),
                    description: String::new(),
                    notification_url: text(mo, "notification_url"),
                    payer_id: 1_000_000_001,
                    date_created: text(payment, "date_created").unwrap_or_else(|| now.clone()),
                    date_approved: text(payment, "date_approved"),
                    last_modified: text(payment, "last_modified").unwrap_or_else(|| now.clone()),
                },
            );
            if id >= self.next_payment_id {
                self.next_payment_id = id + 1;
            }
        }
    }

    fn orders_for(&self, external_reference: Option<&str>) -> Vec<u64> {
        self.merchant_orders
            .iter()
            .filter(|(_, stored)| {
                external_reference.is_none_or(|wanted| stored.external_reference() == Some(wanted))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn render_merchant_order(&self, id: u64, config: &SimulatorConfig) -> Option<String> {
        match self.merchant_orders.get(&id)? {
            Stored::Raw(value) => Some(value.to_string()),
            Stored::Sim(order) => Some(self.render_sim_order(order, config)),
        }
    }

    fn render_sim_order(&self, order: &MerchantOrder, config: &SimulatorConfig) -> String {
        let decimals = currency_decimals(&order.currency_id);
        let totals = self.totals(order);
        let (status, order_status) = match order_state(order.total_amount, &totals) {
            ("opened", _) if order.expired => ("expired", "expired"),
            state => state,
        };
        let payments = order
            .payment_ids
            .iter()
            .filter_map(|id| self.payments.get(id))
            .map(|p| OrderPaymentJson {
                id: p.id,
                transaction_amount: money(p.amount, decimals),
                total_paid_amount: money(p.amount, decimals),
                shipping_cost: 0,
                currency_id: &p.currency_id,
                status: &p.status,
                status_detail: &p.status_detail,
                operation_type: "regular_payment",
                date_approved: p.date_approved.as_deref(),
                date_created: &p.date_created,
                last_modified: &p.last_modified,
                amount_refunded: money(p.refunded, decimals),
            })
            .collect();
        let items = order
            .items
            .iter()
            .map(|item| ItemJson {
                id: "",
                category_id: None,
                currency_id: &order.currency_id,
                description: &item.description,
                picture_url: None,
                title: &item.title,
                quantity: number(item.quantity.normalize().to_string()),
                unit_price: money(item.unit_price, decimals),
            })
            .collect();
        let json = MerchantOrderJson {
            id: order.id,
            status,
            external_reference: &order.external_reference,
            preference_id: &order.preference_id,
            payments,
            shipments: &[],
            payouts: &[],
            collector: CollectorJson {
                id: config.collector_id,
                email: "",
                nickname: "TESTSIMULATOR",
            },
            marketplace: "NONE",
            notification_url: &order.notification_url,
            date_created: &order.date_created,
            last_updated: &order.last_updated,
            sponsor_id: config.sponsor_id,
            shipping_cost: 0,
            total_amount: money(order.total_amount, decimals),
            site_id: site_id(&order.currency_id),
            paid_amount: money(totals.paid, decimals),
            refunded_amount: money(totals.refunded, decimals),
            payer: order.payer_id.map(|id| OrderPayerJson { id, email: "" }),
            items,
            cancelled: false,
            additional_info: "",
            application_id: None,
            is_test: false,
            order_status,
        };
        to_json(&json)
    }

    fn render_payment(&self, payment: &Payment, config: &SimulatorConfig) -> String {
        let decimals = currency_decimals(&payment.currency_id);
        let refunds = self
            .refunds
            .iter()
            .filter(|r| r.record.payment_id == payment.id)
            .map(|r| refund_json(r, config, decimals))
            .collect();
        let net = payment.amount;
        let json = PaymentJson {
            id: payment.id,
            date_created: &payment.date_created,
            date_approved: payment.date_approved.as_deref(),
            date_last_updated: &payment.last_modified,
            date_of_expiration: None,
            money_release_date: payment.date_approved.as_deref(),
            money_release_status: None,
            operation_type: "regular_payment",
            issuer_id: None,
            payment_method_id: "account_money",
            payment_type_id: "account_money",
            payment_method: PaymentMethodJson {
                id: "account_money",
                kind: "account_money",
            },
            status: &payment.status,
            status_detail: &payment.status_detail,
            currency_id: &payment.currency_id,
            description: &payment.description,
            live_mode: true,
            sponsor_id: config.sponsor_id,
            authorization_code: None,
            collector_id: config.collector_id,
            payer: PaymentPayerJson {
                // Real payments carry the payer's id as a string.
                id: payment.payer_id.to_string(),
                email: "",
                kind: None,
                identification: IdentificationJson {
                    kind: None,
                    number: None,
                },
                first_name: None,
                last_name: None,
                entity_type: None,
            },
            metadata: Empty {},
            additional_info: Empty {},
            order: PaymentOrderJson {
                // Captured real responses carry order.id as a string.
                id: payment.merchant_order_id.to_string(),
                kind: "mercadopago",
            },
            external_reference: payment.external_reference.as_deref(),
            transaction_amount: money(payment.amount, decimals),
            transaction_amount_refunded: money(payment.refunded, decimals),
            coupon_amount: 0,
            installments: 1,
            transaction_details: TransactionDetailsJson {
                net_received_amount: money(net, decimals),
                total_paid_amount: money(payment.amount, decimals),
                overpaid_amount: 0,
                installment_amount: money(payment.amount, decimals),
                external_resource_url: None,
                financial_institution: None,
                payment_method_reference_id: None,
            },
            fee_details: &[],
            charges_details: &[],
            captured: true,
            binary_mode: false,
            refunds,
            point_of_interaction: PointOfInteractionJson {
                kind: "UNSPECIFIED",
            },
            notification_url: payment.notification_url.as_deref(),
            pos_id: None,
            store_id: None,
            processing_mode: "aggregator",
            merchant_account_id: None,
        };
        to_json(&json)
    }

    fn take_failure(&mut self, path: &str) -> Option<u16> {
        let index = self
            .failures
            .iter()
            .position(|rule| path.starts_with(&rule.prefix))?;
        let rule = &mut self.failures[index];
        let status = rule.status;
        rule.remaining -= 1;
        if rule.remaining == 0 {
            self.failures.remove(index);
        }
        Some(status)
    }

    fn latency_for(&self, path: &str) -> Option<Duration> {
        self.latencies
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, delay)| *delay)
    }
}

fn push_capped<T>(log: &mut VecDeque<T>, entry: T) {
    if log.len() >= LOG_CAP {
        log.pop_front();
    }
    log.push_back(entry);
}

/// (status, order_status) of a merchant order from its payments.
fn order_state(total: Decimal, totals: &Totals) -> (&'static str, &'static str) {
    let has_refunds = totals.refunded > Decimal::ZERO;
    if totals.paid >= total && totals.paid > Decimal::ZERO {
        let order_status = if has_refunds && totals.refunded >= totals.paid {
            "reverted"
        } else if has_refunds {
            "partially_reverted"
        } else {
            "paid"
        };
        ("closed", order_status)
    } else if totals.paid > Decimal::ZERO {
        let order_status = if has_refunds {
            "partially_reverted"
        } else {
            "partially_paid"
        };
        ("opened", order_status)
    } else if totals.in_process {
        ("opened", "payment_in_process")
    } else {
        ("opened", "payment_required")
    }
}

// ---------------------------------------------------------------------------------------------
// The API side.

async fn api(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| req.path().to_owned());
    // The call takes effect before any configured delay, as when MP acts and the answer is slow.
    let response = answer(&shared, &req, &path, &body);
    let delay = {
        let mut state = shared.lock();
        let call = ApiCall {
            method: req.method().to_string(),
            path: path.clone(),
            status: response.status().as_u16(),
        };
        push_capped(&mut state.api_calls, call);
        state.latency_for(&path)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn answer(shared: &Shared, req: &HttpRequest, path: &str, body: &[u8]) -> HttpResponse {
    let failure = shared.lock().take_failure(path);
    if let Some(status) = failure {
        return injected_failure(status);
    }
    let expected = format!("Bearer {}", shared.config.access_token);
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == expected);
    if !authorized {
        return mp_error(401, "invalid access token", "unauthorized");
    }
    let segments: Vec<&str> = req.path().trim_start_matches('/').split('/').collect();
    let method = req.method().as_str();
    if let Some(response) = registry::route(shared, method, &segments, req.query_string(), body) {
        return response;
    }
    if let Some(response) = attended::route(shared, method, &segments, body) {
        return response;
    }
    if let Some(response) = orders_api::route(shared, req, method, &segments, body) {
        return response;
    }
    match (method, segments.as_slice()) {
        // The account the token belongs to, as MP's SDKs read it: the
        // cheapest call that needs a valid token.
        ("GET", ["users", "me"]) => json_response(
            StatusCode::OK,
            serde_json::json!({
                "id": shared.config.collector_id,
                "nickname": "TESTSIMULATOR",
                "site_id": site_id(&shared.config.site_currency),
            })
            .to_string(),
        ),
        ("GET", ["merchant_orders", "search"]) => search(shared, req.query_string()),
        ("GET", ["merchant_orders", id]) => {
            let state = shared.lock();
            match id
                .parse()
                .ok()
                .and_then(|id| state.render_merchant_order(id, &shared.config))
            {
                Some(text) => json_response(StatusCode::OK, text),
                None => mp_error(404, "Merchant Order not found", "not_found"),
            }
        }
        ("GET", ["v1", "payments", id]) => {
            let state = shared.lock();
            match id.parse().ok().and_then(|id: u64| state.payments.get(&id)) {
                Some(payment) => json_response(
                    StatusCode::OK,
                    state.render_payment(payment, &shared.config),
                ),
                None => mp_error(404, "Payment not found", "not_found"),
            }
        }
        ("POST", ["v1", "payments", id, "refunds"]) => match id.parse() {
            Ok(id) => refund(shared, req, id, body),
            Err(_) => mp_error(404, "Payment not found", "not_found"),
        },
        ("GET", ["v1", "payments", id, "refunds"]) => {
            let state = shared.lock();
            match id.parse().ok().and_then(|id: u64| state.payments.get(&id)) {
                Some(payment) => {
                    let decimals = currency_decimals(&payment.currency_id);
                    let list: Vec<RefundJson> = state
                        .refunds
                        .iter()
                        .filter(|r| r.record.payment_id == payment.id)
                        .map(|r| refund_json(r, &shared.config, decimals))
                        .collect();
                    json_response(StatusCode::OK, to_json(&list))
                }
                None => mp_error(404, "Payment not found", "not_found"),
            }
        }
        _ => mp_error(404, "resource not found", "not_found"),
    }
}

fn search(shared: &Shared, query: &str) -> HttpResponse {
    let params = web::Query::<HashMap<String, String>>::from_query(query)
        .map(web::Query::into_inner)
        .unwrap_or_default();
    let offset: usize = match params.get("offset").map(|v| v.parse()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return mp_error(400, "invalid offset", "bad_request"),
    };
    let limit: usize = match params.get("limit").map(|v| v.parse()) {
        None => SEARCH_DEFAULT_LIMIT,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return mp_error(400, "invalid limit", "bad_request"),
    };
    let state = shared.lock();
    let ids = state.orders_for(params.get("external_reference").map(String::as_str));
    if ids.is_empty() {
        // MP really sends null here, not an empty list.
        return json_response(
            StatusCode::OK,
            r#"{"elements":null,"total":0,"next_offset":0}"#.to_owned(),
        );
    }
    let page: Vec<String> = ids
        .iter()
        .skip(offset)
        .take(limit)
        .filter_map(|id| state.render_merchant_order(*id, &shared.config))
        .collect();
    let body = format!(
        r#"{{"elements":[{}],"total":{},"next_offset":{}}}"#,
        page.join(","),
        ids.len(),
        offset + page.len()
    );
    json_response(StatusCode::OK, body)
}

#[derive(Deserialize)]
struct RefundBody {
    amount: Option<Box<RawValue>>,
}

fn refund(shared: &Shared, req: &HttpRequest, payment_id: u64, body: &[u8]) -> HttpResponse {
    let key = req
        .headers()
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let mut state = shared.lock();
    if let Some(key) = &key {
        if let Some(first) = state.refund_answers.get(&(payment_id, key.clone())) {
            return json_response(StatusCode::CREATED, first.clone());
        }
    }
    if !state.payments.contains_key(&payment_id) {
        return mp_error(404, "Payment not found", "not_found");
    }
    let requested = match std::str::from_utf8(body).map(str::trim) {
        Ok("") => None,
        Ok(text) => match serde_json::from_str::<RefundBody>(text) {
            Ok(RefundBody { amount: None }) => None,
            Ok(RefundBody { amount: Some(raw) }) => match raw_decimal(&raw) {
                Some(amount) => Some(amount),
                None => return mp_error(400, "invalid amount", "bad_request"),
            },
            Err(_) => return mp_error(400, "invalid body", "bad_request"),
        },
        Err(_) => return mp_error(400, "invalid body", "bad_request"),
    };
    match make_refund(&mut state, &shared.config, payment_id, requested, key) {
        Ok(answer) => json_response(StatusCode::CREATED, answer),
        Err(error) => error.response(),
    }
}

/// Refunds `requested` (all that is left when `None`) of an approved payment, as MP's refund call
/// does; the answer is MP's refund JSON.
fn make_refund(
    state: &mut State,
    config: &SimulatorConfig,
    payment_id: u64,
    requested: Option<Decimal>,
    key: Option<String>,
) -> Result<String, MpError> {
    let Some(payment) = state.payments.get(&payment_id) else {
        return Err(MpError::new(404, "Payment not found", "not_found"));
    };
    if payment.status != "approved" {
        return Err(MpError::new(
            400,
            &format!("payment status {} cannot be refunded", payment.status),
            "bad_request",
        ));
    }
    let decimals = currency_decimals(&payment.currency_id);
    let left = payment.amount - payment.refunded;
    let amount = requested.unwrap_or(left);
    if amount <= Decimal::ZERO || amount.normalize().scale() > decimals {
        return Err(MpError::new(400, "invalid refund amount", "bad_request"));
    }
    if amount > left {
        return Err(MpError::new(
            400,
            "the refund amount exceeds the amount available to refund",
            "bad_request",
        ));
    }
    let merchant_order_id = payment.merchant_order_id;
    let refund_id = state.next_refund_id;
    state.next_refund_id += 1;
    let now = mp_time(Utc::now());
    if let Some(payment) = state.payments.get_mut(&payment_id) {
        payment.refunded += amount;
        payment.last_modified = now.clone();
        if payment.refunded >= payment.amount {
            payment.status = "refunded".to_owned();
            payment.status_detail = "refunded".to_owned();
        } else {
            payment.status_detail = "partially_refunded".to_owned();
        }
    }
    if let Some(Stored::Sim(order)) = state.merchant_orders.get_mut(&merchant_order_id) {
        order.last_updated = now.clone();
    }
    let stored = StoredRefund {
        record: RefundRecord {
            payment_id,
            amount: requested,
            idempotency_key: key.clone(),
            refund_id,
        },
        amount,
        date_created: now,
    };
    let answer = to_json(&refund_json(&stored, config, decimals));
    state.refunds.push(stored);
    if let Some(key) = key {
        state
            .refund_answers
            .insert((payment_id, key), answer.clone());
    }
    tracing::info!(payment = payment_id, refund = refund_id, %amount, "simulated refund");
    Ok(answer)
}

fn is_collector(shared: &Shared, user_id: &str) -> bool {
    user_id.parse::<u64>().ok() == Some(shared.config.collector_id)
}

fn collector_mismatch() -> HttpResponse {
    mp_error(
        403,
        "the collector in the path is not the access token's user",
        "forbidden",
    )
}

fn injected_failure(status: u16) -> HttpResponse {
    let (message, error) = match status {
        429 => ("Too many requests", "too_many_requests"),
        500 => ("Internal server error", "internal_server_error"),
        502 => ("Bad gateway", "bad_gateway"),
        503 => ("Service unavailable", "service_unavailable"),
        504 => ("Gateway timeout", "gateway_timeout"),
        _ => ("Simulated failure", "simulated_failure"),
    };
    let mut response = mp_error(status, message, error);
    if status == 429 {
        response.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from_static("1"),
        );
    }
    response
}

/// An MP error answer before it is rendered: its status, `message` and `error` together.
#[derive(Debug)]
struct MpError {
    status: u16,
    message: String,
    error: String,
}

impl MpError {
    fn new(status: u16, message: &str, error: &str) -> MpError {
        MpError {
            status,
            message: message.to_owned(),
            error: error.to_owned(),
        }
    }

    fn response(&self) -> HttpResponse {
        mp_error(self.status, &self.message, &self.error)
    }
}

fn mp_error(status: u16, message: &str, error: &str) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({
        "message": message,
        "error": error,
        "status": code.as_u16(),
        "cause": [],
    });
    json_response(code, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json; charset=utf-8")
        .body(body)
}

// ---------------------------------------------------------------------------------------------
// Notifications.

#[derive(Clone)]
struct Outgoing {
    url: String,
    body: String,
    user_agent: &'static str,
}

fn ipn(notification_url: &str, merchant_order_id: u64) -> Outgoing {
    let body = serde_json::json!({
        "resource": format!("{RESOURCE_BASE}{merchant_order_id}"),
        "topic": "merchant_order",
    });
    Outgoing {
        url: with_query(
            notification_url,
            &format!("topic=merchant_order&id={merchant_order_id}"),
        ),
        body: body.to_string(),
        user_agent: IPN_USER_AGENT,
    }
}

fn webhook(notification_url: &str, payment_id: u64, collector_id: u64) -> Outgoing {
    let body = serde_json::json!({
        "action": "payment.created",
        "api_version": "v1",
        "data": { "id": payment_id.to_string() },
        "date_created": Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "id": rand::thread_rng().gen_range(100_000_000_000_u64..999_999_999_999),
        "live_mode": true,
        "type": "payment",
        "user_id": collector_id.to_string(),
    });
    Outgoing {
        url: with_query(
            notification_url,
            &format!("type=payment&data.id={payment_id}"),
        ),
        body: body.to_string(),
        user_agent: WEBHOOK_USER_AGENT,
    }
}

fn with_query(url: &str, query: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

async fn deliver(
    client: reqwest::Client,
    shared: Arc<Shared>,
    notification: Outgoing,
) -> Result<u16, SimError> {
    let result = client
        .post(&notification.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::USER_AGENT, notification.user_agent)
        .body(notification.body)
        .timeout(NOTIFY_TIMEOUT)
        .send()
        .await;
    let status = result.as_ref().ok().map(|r| r.status().as_u16());
    let sent = SentNotification {
        url: notification.url.clone(),
        status,
    };
    push_capped(&mut shared.lock().notifications, sent);
    match (result, status) {
        (Ok(_), Some(status)) => {
            tracing::info!(url = %notification.url, status, "simulated notification delivered");
            Ok(status)
        }
        (Err(error), _) => {
            tracing::warn!(url = %notification.url, %error, "simulated notification not delivered");
            Err(SimError::Http(format!(
                "POST {}: {error}",
                notification.url
            )))
        }
        (Ok(_), None) => Err(SimError::Http(format!("POST {}", notification.url))),
    }
}

/// A JSON number (or decimal string) as an exact decimal.
fn raw_decimal(raw: &RawValue) -> Option<Decimal> {
    let text = raw.get().trim();
    let text = if text.starts_with('"') {
        serde_json::from_str::<String>(text).ok()?
    } else {
        text.to_owned()
    };
    Decimal::from_str(text.trim())
        .or_else(|_| Decimal::from_scientific(text.trim()))
        .ok()
}

/// An id sent as a number or a string.
fn raw_id(raw: &RawValue) -> Option<u64> {
    let text = raw.get().trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse().ok()
}

fn json_id(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn json_decimal(value: &serde_json::Value) -> Option<Decimal> {
    match value {
        // f64's shortest text is exact for the amounts MP carries (at most 2 decimals).
        serde_json::Value::Number(n) => Decimal::from_str(&n.to_string())
            .or_else(|_| Decimal::from_scientific(&n.to_string()))
            .ok(),
        serde_json::Value::String(s) => Decimal::from_str(s.trim()).ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering: amounts go out as the decimal's own text, never through f64.

fn number(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// An amount with the currency's decimals (25615.80), zero as MP writes it (0).
fn money(amount: Decimal, decimals: u32) -> Box<RawValue> {
    if amount.is_zero() {
        return number("0".to_owned());
    }
    let mut amount = amount;
    if amount.scale() < decimals {
        amount.rescale(decimals);
    }
    number(amount.to_string())
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|error| {
        tracing::error!(%error, "simulator could not render its own JSON");
        "null".to_owned()
    })
}

fn currency_decimals(currency: &str) -> u32 {
    match currency {
        "CLP" | "COP" => 0,
        _ => 2,
    }
}

fn site_id(currency: &str) -> &'static str {
    match currency {
        "BRL" => "MLB",
        "CLP" => "MLC",
        "COP" => "MCO",
        "MXN" => "MLM",
        "PEN" => "MPE",
        "UYU" => "MLU",
        _ => "MLA",
    }
}

/// MP's timestamps: Argentina's offset, milliseconds (2026-11-23T10:15:02.000-03:00).
fn mp_time(time: DateTime<Utc>) -> String {
    match FixedOffset::west_opt(3 * 3600) {
        Some(offset) => time
            .with_timezone(&offset)
            .format("%Y-%m-%dT%H:%M:%S%.3f%:z")
            .to_string(),
        None => time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    }
}

fn refund_json<'a>(
    refund: &'a StoredRefund,
    config: &SimulatorConfig,
    decimals: u32,
) -> RefundJson<'a> {
    RefundJson {
        id: refund.record.refund_id,
        payment_id: refund.record.payment_id,
        amount: money(refund.amount, decimals),
        metadata: Empty {},
        source: RefundSourceJson {
            id: config.collector_id.to_string(),
            name: "",
            kind: "collector",
        },
        date_created: &refund.date_created,
        unique_sequence_number: None,
        refund_mode: "standard",
        adjustment_amount: 0,
        status: "approved",
        reason: None,
        labels: &[],
        amount_refunded_to_payer: money(refund.amount, decimals),
        partition_details: &[],
    }
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct MerchantOrderJson<'a> {
    id: u64,
    status: &'a str,
    external_reference: &'a str,
    preference_id: &'a str,
    payments: Vec<OrderPaymentJson<'a>>,
    shipments: &'static [u8],
    payouts: &'static [u8],
    collector: CollectorJson<'a>,
    marketplace: &'a str,
    notification_url: &'a str,
    date_created: &'a str,
    last_updated: &'a str,
    sponsor_id: Option<u64>,
    shipping_cost: u8,
    total_amount: Box<RawValue>,
    site_id: &'a str,
    paid_amount: Box<RawValue>,
    refunded_amount: Box<RawValue>,
    payer: Option<OrderPayerJson<'a>>,
    items: Vec<ItemJson<'a>>,
    cancelled: bool,
    additional_info: &'a str,
    application_id: Option<u64>,
    is_test: bool,
    order_status: &'a str,
}

#[derive(Serialize)]
struct CollectorJson<'a> {
    id: u64,
    email: &'a str,
    nickname: &'a str,
}

#[derive(Serialize)]
struct OrderPayerJson<'a> {
    id: u64,
    email: &'a str,
}

#[derive(Serialize)]
struct ItemJson<'a> {
    id: &'a str,
    category_id: Option<&'a str>,
    currency_id: &'a str,
    description: &'a str,
    picture_url: Option<&'a str>,
    title: &'a str,
    quantity: Box<RawValue>,
    unit_price: Box<RawValue>,
}

#[derive(Serialize)]
struct OrderPaymentJson<'a> {
    id: u64,
    transaction_amount: Box<RawValue>,
    total_paid_amount: Box<RawValue>,
    shipping_cost: u8,
    currency_id: &'a str,
    status: &'a str,
    status_detail: &'a str,
    operation_type: &'a str,
    date_approved: Option<&'a str>,
    date_created: &'a str,
    last_modified: &'a str,
    amount_refunded: Box<RawValue>,
}

#[derive(Serialize)]
struct PaymentJson<'a> {
    id: u64,
    date_created: &'a str,
    date_approved: Option<&'a str>,
    date_last_updated: &'a str,
    date_of_expiration: Option<&'a str>,
    money_release_date: Option<&'a str>,
    money_release_status: Option<&'a str>,
    operation_type: &'a str,
    issuer_id: Option<&'a str>,
    payment_method_id: &'a str,
    payment_type_id: &'a str,
    payment_method: PaymentMethodJson<'a>,
    status: &'a str,
    status_detail: &'a str,
    currency_id: &'a str,
    description: &'a str,
    live_mode: bool,
    sponsor_id: Option<u64>,
    authorization_code: Option<&'a str>,
    collector_id: u64,
    payer: PaymentPayerJson<'a>,
    metadata: Empty,
    additional_info: Empty,
    order: PaymentOrderJson<'a>,
    external_reference: Option<&'a str>,
    transaction_amount: Box<RawValue>,
    transaction_amount_refunded: Box<RawValue>,
    coupon_amount: u8,
    installments: u8,
    transaction_details: TransactionDetailsJson<'a>,
    fee_details: &'static [u8],
    charges_details: &'static [u8],
    captured: bool,
    binary_mode: bool,
    refunds: Vec<RefundJson<'a>>,
    point_of_interaction: PointOfInteractionJson<'a>,
    notification_url: Option<&'a str>,
    pos_id: Option<&'a str>,
    store_id: Option<&'a str>,
    processing_mode: &'a str,
    merchant_account_id: Option<&'a str>,
}

#[derive(Serialize)]
struct PaymentMethodJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct PaymentPayerJson<'a> {
    id: String,
    email: &'a str,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    identification: IdentificationJson<'a>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    entity_type: Option<&'a str>,
}

#[derive(Serialize)]
struct IdentificationJson<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    number: Option<&'a str>,
}

#[derive(Serialize)]
struct PaymentOrderJson<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct TransactionDetailsJson<'a> {
    net_received_amount: Box<RawValue>,
    total_paid_amount: Box<RawValue>,
    overpaid_amount: u8,
    installment_amount: Box<RawValue>,
    external_resource_url: Option<&'a str>,
    financial_institution: Option<&'a str>,
    payment_method_reference_id: Option<&'a str>,
}

#[derive(Serialize)]
struct PointOfInteractionJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct RefundJson<'a> {
    id: u64,
    payment_id: u64,
    amount: Box<RawValue>,
    metadata: Empty,
    source: RefundSourceJson<'a>,
    date_created: &'a str,
    unique_sequence_number: Option<&'a str>,
    refund_mode: &'a str,
    adjustment_amount: u8,
    status: &'a str,
    reason: Option<&'a str>,
    labels: &'static [u8],
    amount_refunded_to_payer: Box<RawValue>,
    partition_details: &'static [u8],
}

#[derive(Serialize)]
struct RefundSourceJson<'a> {
    id: String,
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const REFERENCE: &str = "st01-p03-20261123-000042";

    pub(super) fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[derive(Clone)]
    struct PosAnswer {
        status: u16,
        order_version: bool,
        content_type: &'static str,
        body: String,
    }

    struct Received {
        query: String,
        body: String,
    }

    /// A POS URL and a notification endpoint, as qrgate would serve them.
    pub(super) struct Pos {
        pub(super) url: String,
        pub(super) notify_url: String,
        answer: Arc<Mutex<PosAnswer>>,
        received: Arc<Mutex<Vec<Received>>>,
    }

    impl Pos {
        pub(super) async fn spawn() -> Pos {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
            let answer = Arc::new(Mutex::new(PosAnswer {
                status: 400,
                order_version: false,
                content_type: "application/json",
                body: r#"{"error":{"type":"unavailable"}}"#.to_owned(),
            }));
            let received = Arc::new(Mutex::new(Vec::new()));
            let (answer_data, received_data) = (
                web::Data::from(Arc::clone(&answer)),
                web::Data::from(Arc::clone(&received)),
            );
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(answer_data.clone())
                    .app_data(received_data.clone())
                    .route("/pos", web::get().to(pos_answer))
                    .route("/mp/notifications", web::post().to(notification))
            })
            .listen(listener)
            .unwrap()
            .workers(1)
            .disable_signals()
            .run();
            tokio::spawn(server);
            Pos {
                url: format!("{base}/pos?storeid=1&posid=3"),
                notify_url: format!("{base}/mp/notifications"),
                answer,
                received,
            }
        }

        pub(super) fn answer(&self, status: u16, body: String) {
            *self.answer.lock().unwrap() = PosAnswer {
                status,
                order_version: false,
                content_type: "application/json",
                body,
            };
        }

        pub(super) fn answer_v2(&self, body: String) {
            self.answer(200, body);
            self.answer.lock().unwrap().order_version = true;
        }

        pub(super) fn order(&self, unit_price: &str) {
            self.answer(200, self.v1_body(REFERENCE, unit_price));
        }

        pub(super) fn v1_body(&self, reference: &str, unit_price: &str) -> String {
            format!(
                r#"{{"collector_id":178106235,"sponsor_id":334249281,
                "items":[{{"title":"Super 95 — 32.10 L","description":"Pump 3","currency_id":"ARS",
                "quantity":1,"unit_price":{unit_price}}}],
                "external_reference":"{reference}","notification_url":"{}"}}"#,
                self.notify_url
            )
        }

        pub(super) fn received(&self) -> Vec<(String, String)> {
            let received = self.received.lock().unwrap();
            received
                .iter()
                .map(|r| (r.query.clone(), r.body.clone()))
                .collect()
        }
    }

    async fn pos_answer(answer: web::Data<Mutex<PosAnswer>>) -> HttpResponse {
        let answer = answer.lock().unwrap().clone();
        let mut response = HttpResponse::build(StatusCode::from_u16(answer.status).unwrap());
        response.content_type(answer.content_type);
        if answer.order_version {
            response.insert_header(("order-version", "2"));
        }
        response.body(answer.body)
    }

    async fn notification(
        req: HttpRequest,
        body: web::Bytes,
        received: web::Data<Mutex<Vec<Received>>>,
    ) -> HttpResponse {
        received.lock().unwrap().push(Received {
            query: req.query_string().to_owned(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        HttpResponse::Ok().finish()
    }

    pub(super) async fn start() -> (Simulator, Pos) {
        let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
        (sim, Pos::spawn().await)
    }

    pub(super) async fn call(
        sim: &Simulator,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", sim.base_url()))
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    }

    /// An authorized call with a JSON body; the answer parsed (`Null` when empty or not JSON).
    pub(super) async fn send(
        sim: &Simulator,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (status, _, text) = call(
            sim,
            method,
            path,
            Some("TEST-sim-token"),
            &[("content-type", "application/json")],
            body,
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    pub(super) async fn get(sim: &Simulator, path: &str) -> (u16, String) {
        let (status, _, body) = call(
            sim,
            reqwest::Method::GET,
            path,
            Some("TEST-sim-token"),
            &[],
            "",
        )
        .await;
        (status, body)
    }

    async fn refund(sim: &Simulator, payment: u64, key: Option<&str>, body: &str) -> (u16, String) {
        let headers: Vec<(&str, &str)> =
            key.map(|k| ("X-Idempotency-Key", k)).into_iter().collect();
        let path = format!("/v1/payments/{payment}/refunds");
        let (status, _, body) = call(
            sim,
            reqwest::Method::POST,
            &path,
            Some("TEST-sim-token"),
            &headers,
            body,
        )
        .await;
        (status, body)
    }

    pub(super) async fn scanned(sim: &Simulator, pos: &Pos) -> ScannedOrder {
        match sim.scan(&pos.url).await.unwrap() {
            Scan::Order(order) => order,
            other => panic!("expected an order, got {other:?}"),
        }
    }

    pub(super) fn json(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn an_approved_payment_closes_the_merchant_order_and_sends_the_ipn() {
        let (sim, pos) = start().await;
        sim.set_notify_mode(NotifyMode::Ipn);
        pos.order("25615.80");

        let order = scanned(&sim, &pos).await;
        assert_eq!(order.merchant_order_id, FIRST_MERCHANT_ORDER_ID);
        assert_eq!(order.total_amount, dec("25615.80"));
        assert_eq!(order.external_reference, REFERENCE);
        assert_eq!(order.currency_id, "ARS");
        assert!(
            pos.received().is_empty(),
            "an opened order notifies nothing by default"
        );

        let payment = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        assert_eq!(payment, FIRST_PAYMENT_ID);

        let received = pos.received();
        assert_eq!(received.len(), 1);
        assert_eq!(
            received[0].0,
            format!("topic=merchant_order&id={}", order.merchant_order_id)
        );
        let body = json(&received[0].1);
        assert_eq!(body["topic"], "merchant_order");
        assert_eq!(
            body["resource"],
            format!(
                "https://api.mercadolibre.com/merchant_orders/{}",
                order.merchant_order_id
            )
        );
        assert_eq!(sim.notifications_sent()[0].status, Some(200));

        let (status, text) = get(
            &sim,
            &format!("/merchant_orders/{}", order.merchant_order_id),
        )
        .await;
        assert_eq!(status, 200);
        for exact in [
            r#""status":"closed""#,
            r#""order_status":"paid""#,
            r#""total_amount":25615.80"#,
            r#""paid_amount":25615.80"#,
            r#""refunded_amount":0"#,
            r#""sponsor_id":null"#,
            r#""marketplace":"NONE""#,
            r#""site_id":"MLA""#,
            r#""shipments":[]"#,
            r#""operation_type":"regular_payment""#,
            r#""id":"","category_id":null"#,
        ] {
            assert!(text.contains(exact), "{exact} missing in {text}");
        }
        let mo = json(&text);
        assert_eq!(mo["id"], order.merchant_order_id);
        assert_eq!(mo["collector"]["id"], 178_106_235);
        assert_eq!(mo["payments"][0]["id"], payment);
        assert_eq!(mo["payments"][0]["status"], "approved");
        assert!(mo["payer"]["id"].is_u64());
        assert!(mo["last_updated"].as_str().unwrap().ends_with("-03:00"));
        assert_eq!(
            sim.merchant_order(order.merchant_order_id).unwrap()["status"],
            "closed"
        );
    }

    #[tokio::test]
    async fn the_api_wants_the_bearer_token() {
        let (sim, pos) = start().await;
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        let path = format!("/merchant_orders/{}", order.merchant_order_id);
        for token in [None, Some("wrong")] {
            let (status, _, body) = call(&sim, reqwest::Method::GET, &path, token, &[], "").await;
            assert_eq!(status, 401);
            assert_eq!(
                json(&body),
                serde_json::json!({"message":"invalid access token","error":"unauthorized","status":401,"cause":[]})
            );
        }
        assert_eq!(get(&sim, &path).await.0, 200);
        let statuses: Vec<u16> = sim.api_calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [401, 401, 200]);
        assert_eq!(sim.api_calls()[2].path, path);
    }

    #[tokio::test]
    async fn users_me_names_the_tokens_account_and_refuses_another_token() {
        let (sim, _pos) = start().await;
        let (status, _, _) = call(
            &sim,
            reqwest::Method::GET,
            "/users/me",
            Some("wrong"),
            &[],
            "",
        )
        .await;
        assert_eq!(status, 401);
        let (status, body) = get(&sim, "/users/me").await;
        assert_eq!(status, 200);
        assert_eq!(json(&body)["id"], 178_106_235);
    }

    #[tokio::test]
    async fn search_finds_every_scan_of_a_reference_and_null_when_none() {
        let (sim, pos) = start().await;
        let (status, body) = get(&sim, "/merchant_orders/search?external_reference=nope").await;
        assert_eq!(status, 200);
        assert_eq!(body, r#"{"elements":null,"total":0,"next_offset":0}"#);

        pos.order("25615.80");
        let first = scanned(&sim, &pos).await;
        let second = scanned(&sim, &pos).await;
        assert_ne!(
            first.merchant_order_id, second.merchant_order_id,
            "each scan opens one"
        );
        let (status, body) = get(
            &sim,
            &format!("/merchant_orders/search?external_reference={REFERENCE}"),
        )
        .await;
        assert_eq!(status, 200);
        let found = json(&body);
        assert_eq!(found["total"], 2);
        assert_eq!(found["next_offset"], 2);
        assert_eq!(found["elements"][0]["id"], first.merchant_order_id);
        assert_eq!(found["elements"][1]["id"], second.merchant_order_id);
        assert_eq!(sim.merchant_orders_for(REFERENCE).len(), 2);

        let (_, body) = get(
            &sim,
            &format!("/merchant_orders/search?external_reference={REFERENCE}&offset=1&limit=5"),
        )
        .await;
        let page = json(&body);
        assert_eq!(page["elements"].as_array().unwrap().len(), 1);
        assert_eq!(page["next_offset"], 2);
    }

    #[tokio::test]
    async fn a_payment_names_its_merchant_order_as_a_string() {
        let (sim, pos) = start().await;
        pos.order("25615.80");
        let order = scanned(&sim, &pos).await;
        let payment = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        let (status, text) = get(&sim, &format!("/v1/payments/{payment}")).await;
        assert_eq!(status, 200);
        assert!(text.contains(r#""transaction_amount":25615.80"#), "{text}");
        let body = json(&text);
        assert_eq!(body["id"], payment);
        assert_eq!(body["status"], "approved");
        assert_eq!(body["status_detail"], "accredited");
        assert_eq!(body["currency_id"], "ARS");
        assert_eq!(body["external_reference"], REFERENCE);
        assert_eq!(body["order"]["id"], order.merchant_order_id.to_string());
        assert_eq!(body["order"]["type"], "mercadopago");
        assert_eq!(body["collector_id"], 178_106_235);
        assert!(body["payer"]["id"].is_string());
        assert!(body["date_approved"].is_string());

        let (status, text) = get(&sim, "/v1/payments/1").await;
        assert_eq!(status, 404);
        assert_eq!(json(&text)["error"], "not_found");
    }

    #[tokio::test]
    async fn a_rejected_payment_leaves_the_order_opened_and_a_retry_closes_it() {
        let (sim, pos) = start().await;
        pos.order("25615.80");
        let order = scanned(&sim, &pos).await;
        let rejected = sim
            .pay(order.merchant_order_id, PaymentOutcome::Rejected)
            .await
            .unwrap();
        let mo = sim.merchant_order(order.merchant_order_id).unwrap();
        assert_eq!(mo["status"], "opened");
        assert_eq!(mo["order_status"], "payment_required");
        assert_eq!(mo["payments"][0]["status"], "rejected");
        assert_eq!(
            mo["payments"][0]["status_detail"],
            "cc_rejected_other_reason"
        );
        assert!(mo["payments"][0]["date_approved"].is_null());

        // NotifyMode::Both by default: an IPN and a payment webhook.
        let mut queries: Vec<String> = pos.received().into_iter().map(|(q, _)| q).collect();
        queries.sort();
        assert_eq!(
            queries,
            [
                format!("topic=merchant_order&id={}", order.merchant_order_id),
                format!("type=payment&data.id={rejected}"),
            ]
        );
        let webhook = pos
            .received()
            .into_iter()
            .find(|(q, _)| q.starts_with("type="))
            .map(|(_, body)| json(&body))
            .unwrap();
        assert_eq!(webhook["action"], "payment.created");
        assert_eq!(webhook["data"]["id"], rejected.to_string());
        assert_eq!(webhook["user_id"], "178106235");

        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        let (_, text) = get(
            &sim,
            &format!("/merchant_orders/{}", order.merchant_order_id),
        )
        .await;
        assert!(text.contains(r#""paid_amount":25615.80"#), "{text}");
        assert_eq!(json(&text)["status"], "closed");
    }

    #[tokio::test]
    async fn partial_payments_add_up_to_a_closed_order() {
        let (sim, pos) = start().await;
        pos.order("25615.80");
        let order = scanned(&sim, &pos).await;
        sim.set_notify_mode(NotifyMode::None);
        sim.pay(
            order.merchant_order_id,
            PaymentOutcome::ApprovedAmount(dec("10000")),
        )
        .await
        .unwrap();
        let mo = sim.merchant_order(order.merchant_order_id).unwrap();
        assert_eq!(
            (mo["status"].as_str(), mo["order_status"].as_str()),
            (Some("opened"), Some("partially_paid"))
        );
        let rest = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        let (_, text) = get(&sim, &format!("/v1/payments/{rest}")).await;
        assert!(text.contains(r#""transaction_amount":15615.80"#), "{text}");
        assert_eq!(
            sim.merchant_order(order.merchant_order_id).unwrap()["status"],
            "closed"
        );
        assert!(
            pos.received().is_empty(),
            "NotifyMode::None loses every notification"
        );
        assert!(matches!(
            sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
                .await,
            Err(SimError::InvalidOrder(_))
        ));
    }

    #[tokio::test]
    async fn a_refund_with_the_same_idempotency_key_is_made_once() {
        let (sim, pos) = start().await;
        pos.order("25615.80");
        let order = scanned(&sim, &pos).await;
        let payment = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();

        let (status, first) = refund(&sim, payment, Some("key-1"), r#"{"amount": 10.50}"#).await;
        assert_eq!(status, 201, "{first}");
        let (status, again) = refund(&sim, payment, Some("key-1"), r#"{"amount": 10.50}"#).await;
        assert_eq!(status, 201);
        assert_eq!(first, again);
        assert!(first.contains(r#""amount":10.50"#), "{first}");
        assert_eq!(json(&first)["status"], "approved");
        assert_eq!(json(&first)["id"], FIRST_REFUND_ID);
        assert_eq!(
            sim.refunds(),
            [RefundRecord {
                payment_id: payment,
                amount: Some(dec("10.50")),
                idempotency_key: Some("key-1".to_owned()),
                refund_id: FIRST_REFUND_ID,
            }]
        );
        let (_, text) = get(&sim, &format!("/v1/payments/{payment}")).await;
        assert_eq!(json(&text)["status_detail"], "partially_refunded");

        // An empty body refunds what is left.
        let (status, rest) = refund(&sim, payment, Some("key-2"), "").await;
        assert_eq!(status, 201);
        assert!(rest.contains(r#""amount":25605.30"#), "{rest}");
        assert_eq!(sim.refunds()[1].amount, None);
        let (_, text) = get(&sim, &format!("/v1/payments/{payment}")).await;
        assert_eq!(json(&text)["status"], "refunded");
        let (_, text) = get(
            &sim,
            &format!("/merchant_orders/{}", order.merchant_order_id),
        )
        .await;
        assert!(text.contains(r#""refunded_amount":25615.80"#), "{text}");
        assert_eq!(json(&text)["order_status"], "reverted");

        let (status, body) = refund(&sim, payment, Some("key-3"), r#"{"amount": 1}"#).await;
        assert_eq!(status, 400);
        assert_eq!(json(&body)["status"], 400);
        assert_eq!(sim.refunds().len(), 2);
    }

    #[tokio::test]
    async fn a_refund_larger_than_what_is_left_is_refused() {
        let (sim, pos) = start().await;
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        let payment = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        let (status, body) = refund(&sim, payment, None, r#"{"amount": 100.01}"#).await;
        assert_eq!(status, 400);
        assert_eq!(json(&body)["error"], "bad_request");
        assert!(sim.refunds().is_empty());
        assert_eq!(refund(&sim, 1, None, "").await.0, 404);
    }

    #[tokio::test]
    async fn fail_next_answers_errors_then_recovers() {
        let (sim, pos) = start().await;
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        let path = format!("/merchant_orders/{}", order.merchant_order_id);

        sim.fail_next("/merchant_orders/", 500, 1);
        let (status, body) = get(&sim, &path).await;
        assert_eq!(status, 500);
        assert_eq!(json(&body)["status"], 500);
        assert_eq!(get(&sim, &path).await.0, 200);

        sim.fail_next("/merchant_orders/search", 429, 1);
        let (status, headers, _) = call(
            &sim,
            reqwest::Method::GET,
            "/merchant_orders/search?external_reference=x",
            Some("TEST-sim-token"),
            &[],
            "",
        )
        .await;
        assert_eq!(status, 429);
        assert_eq!(headers.get("retry-after").unwrap(), "1");
        assert_eq!(
            get(&sim, &path).await.0,
            200,
            "the rule matched only search"
        );

        let statuses: Vec<u16> = sim.api_calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [500, 200, 429, 200]);
    }

    #[tokio::test]
    async fn latency_delays_the_answers_under_a_prefix() {
        let (sim, _pos) = start().await;
        sim.set_latency("/v1/payments", Duration::from_millis(600));
        let client = reqwest::Client::new();
        let slow = client
            .get(format!("{}/v1/payments/1", sim.base_url()))
            .bearer_auth("TEST-sim-token")
            .timeout(Duration::from_millis(100))
            .send()
            .await;
        assert!(slow.unwrap_err().is_timeout());
        sim.set_latency("/v1/payments", Duration::ZERO);
        assert_eq!(get(&sim, "/v1/payments/1").await.0, 404);
    }

    #[tokio::test]
    async fn a_400_answer_is_a_wait_with_its_type() {
        let (sim, pos) = start().await;
        pos.answer(
            400,
            r#"{"error":{"type":"unavailable","message":"no pending sale on this pump"}}"#
                .to_owned(),
        );
        assert_eq!(
            sim.scan(&pos.url).await.unwrap(),
            Scan::Waiting {
                http_status: 400,
                kind: "unavailable".to_owned(),
                message: Some("no pending sale on this pump".to_owned()),
            }
        );
        pos.answer(
            202,
            r#"{"status":{"status_detail":"Waiting_for_order"}}"#.to_owned(),
        );
        assert_eq!(
            sim.scan(&pos.url).await.unwrap(),
            Scan::Waiting {
                http_status: 202,
                kind: "Waiting_for_order".to_owned(),
                message: None,
            }
        );
        assert!(sim.merchant_orders_for(REFERENCE).is_empty());
    }

    #[tokio::test]
    async fn mp_refuses_orders_it_would_not_charge() {
        let (sim, pos) = start().await;
        let valid = pos.v1_body(REFERENCE, "100");
        let cases = [
            valid.replace("178106235", "999"),
            pos.v1_body(REFERENCE, "0"),
            pos.v1_body(REFERENCE, "10.123"),
            valid.replace(r#""quantity":1"#, r#""quantity":1.5"#),
            valid.replace(r#""currency_id":"ARS""#, r#""currency_id":"BRL""#),
            valid.replace(r#""external_reference""#, r#""reference""#),
            valid.replace(r#""notification_url""#, r#""url""#),
            format!(
                r#"{{"collector_id":178106235,"items":[],"external_reference":"r","notification_url":"{}"}}"#,
                pos.notify_url
            ),
            "not json".to_owned(),
        ];
        for body in cases {
            pos.answer(200, body.clone());
            let scan = sim.scan(&pos.url).await;
            assert!(
                matches!(scan, Err(SimError::InvalidOrder(_))),
                "{body}: {scan:?}"
            );
        }
        pos.answer(200, valid);
        pos.answer.lock().unwrap().content_type = "text/plain";
        assert!(matches!(
            sim.scan(&pos.url).await,
            Err(SimError::InvalidOrder(_))
        ));

        pos.answer(500, "oops".to_owned());
        assert_eq!(
            sim.scan(&pos.url).await,
            Err(SimError::BadAnswer {
                status: 500,
                body: "oops".to_owned()
            })
        );
        pos.answer(400, "{}".to_owned());
        assert!(matches!(
            sim.scan(&pos.url).await,
            Err(SimError::BadAnswer { status: 400, .. })
        ));
        assert!(matches!(
            sim.scan("http://127.0.0.1:1/pos").await,
            Err(SimError::Http(_))
        ));
        assert!(sim.merchant_orders_for(REFERENCE).is_empty());
    }

    #[tokio::test]
    async fn a_v2_order_opens_a_merchant_order() {
        let (sim, pos) = start().await;
        let body = format!(
            r#"{{"external_reference":"{REFERENCE}","total_amount":25615.80,
            "items":[{{"sku_number":"1","category":"fuel","title":"Super 95","description":"Pump 3",
            "quantity":1,"unit_measure":"unit","unit_price":25615.80,"total_amount":25615.80}}],
            "title":"Super 95","description":"Pump 3","notification_url":"{}","sponsor":{{"id":334249281}}}}"#,
            pos.notify_url
        );
        pos.answer_v2(body.clone());
        let order = scanned(&sim, &pos).await;
        assert_eq!(order.total_amount, dec("25615.80"));
        assert_eq!(order.raw_body, body);

        // Without the order-version header MP reads it as v1 and refuses it.
        pos.answer(200, body.replace("\"total_amount\":25615.80,\n", ""));
        assert!(matches!(
            sim.scan(&pos.url).await,
            Err(SimError::InvalidOrder(_))
        ));
        pos.answer_v2(body.replace(r#""total_amount":25615.80,"#, r#""total_amount":25615.81,"#));
        assert!(matches!(
            sim.scan(&pos.url).await,
            Err(SimError::InvalidOrder(_))
        ));
    }

    #[tokio::test]
    async fn duplicated_notifications_arrive_n_times_each() {
        let (sim, pos) = start().await;
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        sim.set_notify_mode(NotifyMode::Duplicated(3));
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        let received = pos.received();
        assert_eq!(received.len(), 6);
        assert_eq!(
            received
                .iter()
                .filter(|(q, _)| q.starts_with("topic="))
                .count(),
            3
        );
        assert_eq!(sim.notifications_sent().len(), 6);
    }

    #[tokio::test]
    async fn notify_on_open_sends_an_ipn_for_the_opened_order() {
        let (sim, pos) = start().await;
        sim.set_notify_on_open(true);
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        assert_eq!(
            pos.received()[0].0,
            format!("topic=merchant_order&id={}", order.merchant_order_id)
        );
    }

    #[tokio::test]
    async fn notifications_can_be_sent_by_hand_and_failures_are_recorded() {
        let (sim, pos) = start().await;
        pos.order("100");
        let order = scanned(&sim, &pos).await;
        sim.set_notify_mode(NotifyMode::None);
        let payment = sim
            .pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        assert_eq!(
            sim.notify_merchant_order(order.merchant_order_id).await,
            Ok(200)
        );
        assert_eq!(sim.notify_payment(payment).await, Ok(200));
        assert_eq!(
            sim.post_notification(&pos.notify_url, "topic=merchant_order&id=abc", "{")
                .await,
            Ok(200)
        );
        let queries: Vec<String> = pos.received().into_iter().map(|(q, _)| q).collect();
        assert_eq!(queries[2], "topic=merchant_order&id=abc");
        assert_eq!(
            sim.notify_payment(1).await,
            Err(SimError::UnknownPayment(1))
        );
        assert_eq!(
            sim.notify_merchant_order(1).await,
            Err(SimError::UnknownMerchantOrder(1))
        );

        assert!(matches!(
            sim.post_notification("http://127.0.0.1:1/mp/notifications", "", "{}")
                .await,
            Err(SimError::Http(_))
        ));
        let last = sim.notifications_sent().pop().unwrap();
        assert_eq!(last.status, None);
    }

    #[tokio::test]
    async fn an_inserted_merchant_order_is_served_as_given() {
        let (sim, _pos) = start().await;
        let id = sim.insert_merchant_order(serde_json::json!({
            "status": "closed",
            "external_reference": "foreign-ref",
            "collector": {"id": 42},
            "total_amount": 100,
            "paid_amount": 100,
            "notification_url": "http://127.0.0.1:1/n",
            "payments": [{"id": "123", "transaction_amount": 99.5, "status": "approved", "currency_id": "ARS"}],
        }));
        assert_eq!(id, FIRST_MERCHANT_ORDER_ID);
        let (status, text) = get(&sim, &format!("/merchant_orders/{id}")).await;
        assert_eq!(status, 200);
        let mo = json(&text);
        assert_eq!(mo["id"], id);
        assert_eq!(mo["collector"]["id"], 42);
        assert_eq!(sim.merchant_orders_for("foreign-ref").len(), 1);
        let (status, text) = get(&sim, "/v1/payments/123").await;
        assert_eq!(status, 200);
        assert!(text.contains(r#""transaction_amount":99.50"#), "{text}");
        assert_eq!(json(&text)["order"]["id"], id.to_string());
        assert!(matches!(
            sim.pay(id, PaymentOutcome::Approved).await,
            Err(SimError::InvalidOrder(_))
        ));
        assert_eq!(sim.insert_merchant_order(serde_json::json!({"id": 7})), 7);
        assert_eq!(sim.merchant_order(7).unwrap()["id"], 7);
    }

    #[tokio::test]
    async fn unknown_routes_and_orders_are_404() {
        let (sim, _pos) = start().await;
        let (status, body) = get(&sim, "/merchant_orders/30000000001").await;
        assert_eq!(status, 404);
        assert_eq!(
            json(&body),
            serde_json::json!({"message":"Merchant Order not found","error":"not_found","status":404,"cause":[]})
        );
        assert_eq!(get(&sim, "/merchant_orders/abc").await.0, 404);
        assert_eq!(get(&sim, "/v1/orders").await.0, 404);
        assert!(sim.merchant_order(30_000_000_001).is_none());
    }

    #[tokio::test]
    async fn an_attended_order_is_placed_scanned_paid_and_leaves_its_pos() {
        let (sim, pos) = start().await;
        let order_body = format!(
            r#"{{"external_reference":"att-1","title":"Snack","description":"Tray 4",
            "notification_url":"{}","total_amount":100.0,
            "items":[{{"sku_number":"A123","category":"FOOD","title":"Snack","description":"d",
            "unit_price":20,"quantity":5,"unit_measure":"unit","total_amount":100}}],
            "sponsor":{{"id":446566691}}}}"#,
            pos.notify_url
        );
        let put = "/instore/qr/seller/collectors/178106235/stores/ST01/pos/POS3/orders";
        let (status, _, _) = call(
            &sim,
            reqwest::Method::PUT,
            put,
            Some("TEST-sim-token"),
            &[("content-type", "application/json")],
            &order_body,
        )
        .await;
        assert_eq!(status, 204);
        assert_eq!(
            sim.attended_order("POS3").unwrap()["external_reference"],
            "att-1"
        );

        let Scan::Order(order) = sim.scan_attended("POS3").await.unwrap() else {
            panic!("expected an order");
        };
        assert_eq!(order.total_amount, dec("100"));
        sim.pay(order.merchant_order_id, PaymentOutcome::Approved)
            .await
            .unwrap();
        assert!(sim.attended_order("POS3").is_none());
        assert!(matches!(
            sim.scan_attended("POS3").await.unwrap(),
            Scan::Waiting {
                http_status: 404,
                ..
            }
        ));

        let wrong = "/instore/qr/seller/collectors/1/stores/ST01/pos/POS3/orders";
        let (status, _, _) = call(
            &sim,
            reqwest::Method::PUT,
            wrong,
            Some("TEST-sim-token"),
            &[],
            &order_body,
        )
        .await;
        assert_eq!(status, 403);
        let delete = "/instore/qr/seller/collectors/178106235/pos/POS3/orders";
        let (status, _, _) = call(
            &sim,
            reqwest::Method::DELETE,
            delete,
            Some("TEST-sim-token"),
            &[],
            "",
        )
        .await;
        assert_eq!(
            status, 404,
            "MP closed the paid order: nothing left to delete"
        );
    }

    #[tokio::test]
    async fn stop_closes_the_api() {
        let (sim, _pos) = start().await;
        let url = format!("{}/v1/payments/1", sim.base_url());
        sim.stop().await;
        assert!(reqwest::get(&url).await.is_err());
    }
}
