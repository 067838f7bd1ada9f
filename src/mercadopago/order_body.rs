//! Every order body qrgate sends Mercado Pago, rendered from one model of a
//! sale: the v1 poll answer, the v2 poll answer (which is also the attended
//! model's order), the legacy attended order and the Orders API order
//! (docs/mercadopago.md). Pure functions: the same sale renders the
//! same bytes every time.

use chrono::{DateTime, FixedOffset};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::money::{decimal_json_number, Amount};
use crate::orders::sale::{Line, Tax};
use crate::orders::{PosKind, Sale};

/// What every order body carries besides the sale.
#[derive(Debug, Clone)]
pub struct MpAccount {
    pub collector_id: u64,
    pub sponsor_id: Option<u64>,
    pub notification_url: String,
    /// The account's poll protocol, for answers to URLs Mercado Pago does
    /// not poll (an attended POS's).
    pub poll_protocol: crate::orders::PollProtocol,
}

// ---- v1 ---------------------------------------------------------------------

#[derive(Serialize)]
struct V1Item<'a> {
    title: String,
    currency_id: &'static str,
    description: &'a str,
    quantity: u64,
    unit_price: Box<RawValue>,
}

#[derive(Serialize)]
struct V1Order<'a> {
    collector_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sponsor_id: Option<u64>,
    items: Vec<V1Item<'a>>,
    external_reference: &'a str,
    notification_url: &'a str,
}

fn measure(unit: Option<&str>) -> &str {
    match unit {
        Some("litre" | "liter" | "litres" | "liters" | "l" | "L") => "L",
        Some(other) => other,
        None => "",
    }
}

/// A line with a whole quantity as it is; a fractional one (litres) as one
/// item whose title carries the quantity and whose price is the line's
/// total, since v1 and the legacy API take whole quantities only.
struct WholeLine<'a> {
    title: String,
    description: &'a str,
    quantity: u64,
    unit_price: Box<RawValue>,
}

fn whole_line<'a>(line: &'a Line, sale: &Sale) -> WholeLine<'a> {
    let description = line.description.as_deref().unwrap_or(&line.title);
    if line.quantity.fract().is_zero() {
        WholeLine {
            title: line.title.clone(),
            description,
            quantity: line.quantity.trunc().to_u64().unwrap_or(1),
            unit_price: Amount::new(line.unit_price, sale.currency).json_number(),
        }
    } else {
        let unit = measure(line.unit_measure.as_deref());
        let title = if unit.is_empty() {
            format!("{} — {}", line.title, line.quantity)
        } else {
            format!("{} — {} {}", line.title, line.quantity, unit)
        };
        WholeLine {
            title,
            description,
            quantity: 1,
            unit_price: decimal_json_number(Amount::new(line.total, sale.currency).value()),
        }
    }
}

/// The v1 poll answer's body.
pub fn v1(sale: &Sale, ctx: &MpAccount) -> Vec<u8> {
    let body = V1Order {
        collector_id: ctx.collector_id,
        sponsor_id: ctx.sponsor_id,
        items: sale
            .lines
            .iter()
            .map(|l| {
                let w = whole_line(l, sale);
                V1Item {
                    title: w.title,
                    currency_id: sale.currency.code(),
                    description: w.description,
                    quantity: w.quantity,
                    unit_price: w.unit_price,
                }
            })
            .collect(),
        external_reference: sale.external_reference.as_str(),
        notification_url: &ctx.notification_url,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---- v2 and the attended model (instore API) --------------------------------

#[derive(Serialize)]
struct TaxJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    value: Box<RawValue>,
}

fn taxes(taxes: &[Tax]) -> Vec<TaxJson<'_>> {
    taxes
        .iter()
        .map(|t| TaxJson {
            kind: &t.kind,
            value: decimal_json_number(t.value.normalize()),
        })
        .collect()
}

#[derive(Serialize)]
struct V2Item<'a> {
    sku_number: String,
    category: &'a str,
    title: &'a str,
    description: &'a str,
    quantity: Box<RawValue>,
    unit_measure: &'a str,
    unit_price: Box<RawValue>,
    total_amount: Box<RawValue>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    taxes: Vec<TaxJson<'a>>,
}

#[derive(Serialize)]
struct Sponsor {
    id: u64,
}

#[derive(Serialize)]
struct V2Order<'a> {
    external_reference: &'a str,
    title: String,
    description: String,
    notification_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration_date: Option<String>,
    total_amount: Box<RawValue>,
    items: Vec<V2Item<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sponsor: Option<Sponsor>,
}

fn kind_word(kind: PosKind) -> &'static str {
    match kind {
        PosKind::Fuel => "fuel",
        PosKind::Vending => "vending",
    }
}

/// The order's own title: its only item's, or how many items it has.
fn order_title(sale: &Sale) -> String {
    match sale.lines.as_slice() {
        [only] => only.title.clone(),
        lines => format!("{} items", lines.len()),
    }
}

fn order_description(sale: &Sale) -> String {
    format!("POS {}, sale {}", sale.pos, sale.sale_id)
}

fn v2_order<'a>(
    sale: &'a Sale,
    kind: PosKind,
    ctx: &'a MpAccount,
    expiration_date: Option<String>,
) -> V2Order<'a> {
    let currency = sale.currency;
    V2Order {
        external_reference: sale.external_reference.as_str(),
        title: order_title(sale),
        description: order_description(sale),
        notification_url: &ctx.notification_url,
        expiration_date,
        total_amount: Amount::new(sale.lines.iter().map(|l| l.total).sum(), currency).json_number(),
        items: sale
            .lines
            .iter()
            .enumerate()
            .map(|(n, l)| V2Item {
                // Defaults: the line's 1-based number, the POS kind, `unit`
                // (docs/decisions.md, "Calls to Mercado Pago").
                sku_number: l.sku.clone().unwrap_or_else(|| (n + 1).to_string()),
                category: l.category.as_deref().unwrap_or(kind_word(kind)),
                title: &l.title,
                description: l.description.as_deref().unwrap_or(&l.title),
                quantity: decimal_json_number(l.quantity.normalize()),
                unit_measure: l.unit_measure.as_deref().unwrap_or("unit"),
                unit_price: Amount::new(l.unit_price, currency).json_number(),
                total_amount: Amount::new(l.total, currency).json_number(),
                taxes: taxes(&l.taxes),
            })
            .collect(),
        sponsor: ctx.sponsor_id.map(|id| Sponsor { id }),
    }
}

/// The v2 poll answer's body.
pub fn v2(sale: &Sale, kind: PosKind, ctx: &MpAccount) -> Vec<u8> {
    serde_json::to_vec(&v2_order(sale, kind, ctx, None)).unwrap_or_default()
}

/// The attended order for `PUT …/pos/{id}/orders`: the v2 body with the
/// moment Mercado Pago must drop it.
pub fn instore(
    sale: &Sale,
    kind: PosKind,
    ctx: &MpAccount,
    expires: Option<DateTime<FixedOffset>>,
) -> Vec<u8> {
    let expiration = expires.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Millis, false));
    serde_json::to_vec(&v2_order(sale, kind, ctx, expiration)).unwrap_or_default()
}

// ---- the legacy attended API ------------------------------------------------

#[derive(Serialize)]
struct LegacyItem<'a> {
    title: String,
    currency_id: &'static str,
    unit_price: Box<RawValue>,
    quantity: u64,
    description: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    taxes: Vec<TaxJson<'a>>,
}

#[derive(Serialize)]
struct LegacyOrder<'a> {
    external_reference: &'a str,
    notification_url: &'a str,
    items: Vec<LegacyItem<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sponsor_id: Option<u64>,
}

/// The order for `POST /mpmobile/instore/qr/{collector}/{pos}`.
pub fn legacy(sale: &Sale, ctx: &MpAccount) -> Vec<u8> {
    let body = LegacyOrder {
        external_reference: sale.external_reference.as_str(),
        notification_url: &ctx.notification_url,
        items: sale
            .lines
            .iter()
            .map(|l| {
                let w = whole_line(l, sale);
                LegacyItem {
                    title: w.title,
                    currency_id: sale.currency.code(),
                    unit_price: w.unit_price,
                    quantity: w.quantity,
                    description: w.description,
                    taxes: taxes(&l.taxes),
                }
            })
            .collect(),
        sponsor_id: ctx.sponsor_id,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---- MP's Orders API --------------------------------------------------------

#[derive(Serialize)]
struct OrdersApiItem<'a> {
    title: String,
    unit_price: String,
    quantity: u64,
    unit_measure: &'a str,
    external_code: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    taxes: Vec<TaxJson<'a>>,
}

#[derive(Serialize)]
struct OrdersApiQr<'a> {
    external_pos_id: &'a str,
    mode: &'static str,
}

#[derive(Serialize)]
struct OrdersApiConfig<'a> {
    qr: OrdersApiQr<'a>,
}

#[derive(Serialize)]
struct OrdersApiPayment {
    amount: String,
}

#[derive(Serialize)]
struct OrdersApiTransactions {
    payments: Vec<OrdersApiPayment>,
}

#[derive(Serialize)]
struct OrdersApiOrder<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    total_amount: String,
    external_reference: &'a str,
    description: String,
    expiration_time: String,
    config: OrdersApiConfig<'a>,
    transactions: OrdersApiTransactions,
    items: Vec<OrdersApiItem<'a>>,
}

/// The order for `POST /v1/orders` (type `qr`, static mode): amounts are
/// decimal strings there. `ttl_secs` is how long it stays payable (at least
/// a second: the order desk decides how long, down to test lifetimes of
/// seconds).
pub fn orders_api(sale: &Sale, mp_external_id: &str, ttl_secs: u64) -> Vec<u8> {
    // The Orders API writes every amount as a string with two decimals,
    // whole currencies included.
    let text = |d: Decimal| {
        let mut d = d;
        d.rescale(2);
        d.to_string()
    };
    let total = text(sale.lines.iter().map(|l| l.total).sum());
    let body = OrdersApiOrder {
        kind: "qr",
        total_amount: total.clone(),
        external_reference: sale.external_reference.as_str(),
        description: order_description(sale),
        expiration_time: format!("PT{}S", ttl_secs.max(1)),
        config: OrdersApiConfig {
            qr: OrdersApiQr {
                external_pos_id: mp_external_id,
                mode: "static",
            },
        },
        transactions: OrdersApiTransactions {
            payments: vec![OrdersApiPayment { amount: total }],
        },
        items: sale
            .lines
            .iter()
            .enumerate()
            .map(|(n, l)| {
                let w = whole_line(l, sale);
                let unit_price = if l.quantity.fract().is_zero() {
                    l.unit_price
                } else {
                    l.total
                };
                OrdersApiItem {
                    title: w.title,
                    unit_price: text(unit_price),
                    quantity: w.quantity,
                    unit_measure: if l.quantity.fract().is_zero() {
                        l.unit_measure.as_deref().unwrap_or("unit")
                    } else {
                        "unit"
                    },
                    external_code: l.sku.clone().unwrap_or_else(|| (n + 1).to_string()),
                    taxes: taxes(&l.taxes),
                }
            })
            .collect(),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}
