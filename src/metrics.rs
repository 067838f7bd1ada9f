//! Prometheus metrics, one registry per app (tests run many apps in one
//! process). Counters on hot paths are resolved once, at start, so a poll
//! costs an atomic increment and a histogram observation, no allocation
//! and no label lookup. Gauges that describe the book (pending sales,
//! devices online, MQTT link) are read from it when scraped.
//!
//! No series has a POS, a sale or any other open-ended label: a station's
//! series are the same whatever its number of POS (per-POS detail is the
//! console's). Mercado Pago's paths are labelled by their shape only
//! ([`endpoint_of`]).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[cfg(target_os = "linux")]
mod process;

/// The poll answers counted without a label lookup.
const POLL_ANSWERS: [&str; 6] = [
    "ok",
    "unavailable",
    "in_process",
    "invalid",
    "timeout",
    "nothing_to_pay",
];

pub struct Metrics {
    registry: Registry,
    polls: IntCounterVec,
    poll_by_answer: [IntCounter; 6],
    pub poll_seconds: Histogram,
    pub sales: IntCounterVec,
    pub sale_events: IntCounterVec,
    pub notifications: IntCounterVec,
    pub mp_requests: IntCounterVec,
    pub mp_seconds: HistogramVec,
    pub reconcile_runs: IntCounter,
    pub reconcile_closed: IntCounter,
    pub refunds: IntCounterVec,
    pub store_write_seconds: Histogram,
    pub device_rejections: IntCounterVec,
    /// Device messages refused for their POS's rate, before being read.
    pub device_messages_over_rate: IntCounter,
    /// Refusals counted and summed, not stored one by one.
    pub device_rejections_summed: IntCounter,
    /// Tries of device messages the store could not take yet (held).
    pub device_messages_held: IntCounter,
    /// qrgate's connections to the broker (CONNACKs): more than one means
    /// the link was lost, or taken over.
    pub mqtt_connections: IntCounter,
    /// 1 while this instance leads the singletons.
    pub leader: IntGauge,
    /// Terms this instance began to lead.
    pub leader_terms: IntCounter,
    /// The singletons' writes refused because another instance had begun
    /// to lead.
    pub fenced_writes: IntCounter,
    /// Device messages a stored change owed, published by the outbox sweep
    /// because the instance that stored it did not mark them published.
    pub outbox_swept: IntCounter,
    // Read from the book at scrape time.
    pub sales_pending: IntGauge,
    pub sales_paid_undelivered: IntGauge,
    pub sales_refund_due: IntGauge,
    pub devices_online: IntGauge,
    pub devices_offline: IntGauge,
    pub mqtt_connected: IntGauge,
    /// Configured POS with a sale `in_process` or `pending`.
    pub pos_busy: IntGauge,
    /// Sales served to Mercado Pago's poll and not yet paid or closed.
    pub sales_served_unpaid: IntGauge,
    /// 1 while Mercado Pago refuses the access token.
    pub mp_token_refused: IntGauge,
    /// Writes `/readyz` made to see that the store is writable.
    pub store_probes: IntCounter,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let polls = counter_vec(
            &r,
            "qrgate_polls_total",
            "Polls of POS URLs by answer.",
            &["answer"],
        );
        let poll_by_answer = POLL_ANSWERS.map(|a| polls.with_label_values(&[a]));
        let mp_seconds = HistogramVec::new(
            HistogramOpts::new(
                "qrgate_mp_request_duration_seconds",
                "Mercado Pago API calls' latency by endpoint.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["endpoint"],
        )
        .expect("valid metric");
        r.register(Box::new(mp_seconds.clone()))
            .expect("unique metric");
        let build = IntGaugeVec::new(
            Opts::new("qrgate_build_info", "1, labelled with the running build."),
            &["version", "profile"],
        )
        .expect("valid metric");
        r.register(Box::new(build.clone())).expect("unique metric");
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), profile])
            .set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(process::Process::new()))
            .expect("unique metric");
        Metrics {
            polls,
            poll_by_answer,
            poll_seconds: histogram(
                &r,
                "qrgate_poll_duration_seconds",
                "Time to answer a poll.",
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
                ],
            ),
            sales: counter_vec(
                &r,
                "qrgate_sales_total",
                "Sales that ended, by outcome.",
                &["outcome"],
            ),
            sale_events: counter_vec(
                &r,
                "qrgate_sale_events_total",
                "Stored sale events, by event.",
                &["event"],
            ),
            notifications: counter_vec(
                &r,
                "qrgate_notifications_total",
                "Mercado Pago notifications, by result.",
                &["result"],
            ),
            mp_requests: counter_vec(
                &r,
                "qrgate_mp_requests_total",
                "Mercado Pago API calls, by endpoint and HTTP status (`error`: no answer).",
                &["endpoint", "status"],
            ),
            mp_seconds,
            reconcile_runs: counter(
                &r,
                "qrgate_reconciliation_runs_total",
                "Searches of Mercado Pago for a served sale's payment.",
            ),
            reconcile_closed: counter(
                &r,
                "qrgate_reconciliation_closings_total",
                "Sales paid or found owed back by reconciliation.",
            ),
            refunds: counter_vec(
                &r,
                "qrgate_refunds_total",
                "Refunds asked of Mercado Pago, by who asked (`auto`, `operator`) and result.",
                &["by", "result"],
            ),
            store_write_seconds: histogram(
                &r,
                "qrgate_store_write_duration_seconds",
                "Time to durably write a sale's change.",
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ],
            ),
            device_rejections: counter_vec(
                &r,
                "qrgate_device_rejections_total",
                "Device messages refused, by reason.",
                &["reason"],
            ),
            device_messages_over_rate: counter(
                &r,
                "qrgate_device_messages_over_rate_total",
                "Device messages refused (rate_limited) because their POS sent more than [mqtt] device_rate_per_sec / device_burst.",
            ),
            device_rejections_summed: counter(
                &r,
                "qrgate_device_rejections_summed_total",
                "Device refusals beyond [mqtt] stored_rejections_per_minute for their POS: summed into one row a minute, not stored one by one.",
            ),
            device_messages_held: counter(
                &r,
                "qrgate_device_messages_held_total",
                "Tries of a device message the store could not take: held unacknowledged and tried again until it can.",
            ),
            mqtt_connections: counter(
                &r,
                "qrgate_mqtt_connections_total",
                "Connections of qrgate's MQTT client to the broker (CONNACKs received).",
            ),
            leader: gauge(
                &r,
                "qrgate_leader",
                "1 while this instance leads the singletons (reconciliation, expiry, the inbox, refunds, retention, the outbox sweep).",
            ),
            leader_terms: counter(
                &r,
                "qrgate_leader_terms_total",
                "Times this instance began to lead the singletons.",
            ),
            fenced_writes: counter(
                &r,
                "qrgate_fenced_writes_total",
                "Writes of the singletons refused because another instance had begun to lead meanwhile.",
            ),
            outbox_swept: counter(
                &r,
                "qrgate_outbox_swept_total",
                "Device messages published by the outbox sweep: the instance that stored the change did not publish them within their lease.",
            ),
            sales_pending: gauge(&r, "qrgate_sales_pending", "Sales pending payment now."),
            sales_paid_undelivered: gauge(
                &r,
                "qrgate_sales_paid_undelivered",
                "Current sales paid whose device has not confirmed delivery.",
            ),
            sales_refund_due: gauge(
                &r,
                "qrgate_sales_refund_due",
                "Current sales with a payment owed back and not refunded.",
            ),
            devices_online: gauge(
                &r,
                "qrgate_devices_online",
                "Configured POS whose device is online (or never spoke presence).",
            ),
            devices_offline: gauge(
                &r,
                "qrgate_devices_offline",
                "Configured POS whose device said it is offline.",
            ),
            mqtt_connected: gauge(
                &r,
                "qrgate_mqtt_connected",
                "1 while qrgate is connected and subscribed to the broker.",
            ),
            pos_busy: gauge(
                &r,
                "qrgate_pos_busy",
                "Configured POS with a sale in_process or pending.",
            ),
            sales_served_unpaid: gauge(
                &r,
                "qrgate_sales_served_unpaid",
                "Sales served to Mercado Pago's poll (a customer scanned) and not yet paid or closed.",
            ),
            mp_token_refused: gauge(
                &r,
                "qrgate_mp_token_refused",
                "1 while Mercado Pago refuses the access token (QRGATE_MP_ACCESS_TOKEN).",
            ),
            store_probes: counter(
                &r,
                "qrgate_store_probes_total",
                "Writes /readyz made to check the store (at most one a second).",
            ),
            registry: r,
        }
    }

    /// The poll hot path: an atomic increment.
    pub fn poll(&self, answer: &str) {
        match POLL_ANSWERS.iter().position(|a| *a == answer) {
            Some(i) => self.poll_by_answer[i].inc(),
            None => self.polls.with_label_values(&[answer]).inc(),
        }
    }

    /// One Mercado Pago call: `status` is the HTTP status, `None` when
    /// no answer came.
    pub fn mp_call(&self, path: &str, status: Option<u16>, seconds: f64) {
        let endpoint = endpoint_of(path);
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.mp_requests
            .with_label_values(&[&endpoint, &status])
            .inc();
        self.mp_seconds
            .with_label_values(&[&endpoint])
            .observe(seconds);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The words of Mercado Pago's paths that qrgate calls; any other segment
/// is an id (a payment's, a store's, a POS's...).
const PATH_WORDS: [&str; 17] = [
    "merchant_orders",
    "search",
    "v1",
    "payments",
    "refunds",
    "refund",
    "orders",
    "cancel",
    "instore",
    "qr",
    "seller",
    "collectors",
    "stores",
    "pos",
    "mpmobile",
    "users",
    "me",
];

/// A bounded label for a Mercado Pago path: every segment that is not one
/// of [`PATH_WORDS`] becomes `:id` (a POS id without a digit is still an
/// id), the query is dropped.
pub fn endpoint_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    path.split('/')
        .map(|seg| {
            if seg.is_empty() || PATH_WORDS.contains(&seg) {
                seg
            } else {
                ":id"
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mercado_pago_endpoints_are_labelled_without_their_ids() {
        assert_eq!(endpoint_of("/merchant_orders/123"), "/merchant_orders/:id");
        assert_eq!(
            endpoint_of("/v1/orders/ORD01ABC/refund"),
            "/v1/orders/:id/refund"
        );
        assert_eq!(
            endpoint_of("/merchant_orders/search?external_reference=pump-1-x"),
            "/merchant_orders/search"
        );
        // POS and store ids without a digit are ids all the same.
        assert_eq!(
            endpoint_of("/instore/qr/seller/collectors/178106235/stores/north/pos/kiosk/orders"),
            "/instore/qr/seller/collectors/:id/stores/:id/pos/:id/orders"
        );
        assert_eq!(
            endpoint_of("/mpmobile/instore/qr/178106235/pumpa"),
            "/mpmobile/instore/qr/:id/:id"
        );
        assert_eq!(endpoint_of("/users/me"), "/users/me");
        assert_eq!(endpoint_of("/pos?external_id=kiosk"), "/pos");
    }

    #[test]
    fn the_build_and_the_process_are_described() {
        let text = Metrics::new().render();
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let build = format!(
            "qrgate_build_info{{profile=\"{profile}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in {text}"));
            let value: f64 = line[name.len()..].parse().unwrap();
            let can_be_zero = name.starts_with("process_cpu");
            assert!(value > 0.0 || (can_be_zero && value == 0.0), "{line}");
        }
    }

    #[test]
    fn polls_are_counted_by_answer() {
        let m = Metrics::new();
        m.poll("ok");
        m.poll("ok");
        m.poll("weird");
        let text = m.render();
        assert!(
            text.contains("qrgate_polls_total{answer=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("qrgate_polls_total{answer=\"weird\"} 1"));
    }
}
