//! `qrgate pos register` and `qrgate pos list`: the stores and POS that the
//! configuration describes, made to exist at Mercado Pago as described.
//!
//! Three parts. What each POS should be at MP ([`target`]) and what differs
//! between that and what MP has ([`pos_changes`], [`store_changes`]) are
//! plain functions without I/O. [`reconcile`] then finds each store and POS
//! (`mercadopago::pos_api`), creates what is missing and updates what
//! differs, or with `dry_run` only says what it would do; `pos list` is the
//! same walk in dry-run, rendered as a comparison. Running it twice changes
//! nothing the second time: a POS or store whose fields all match gets no
//! call but its lookup.
//!
//! Decisions (docs/decisions.md, "Registering with Mercado Pago"): a POS without a store
//! is an error naming it; a store that differs at MP is updated like a POS; a
//! store create answered 400 `External_id-already-used` and a POS create
//! answered 409 are looked up and used. One POS's failure never stops the
//! others. Nothing printed carries the access token or a poll key: urls are
//! shown with `key=***`, and the whole output is redacted once more.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::{Config, MpStore};
use crate::mercadopago::pos_api::{
    MpPosState, MpStoreState, PosApi, PosApiError, PosCreate, QrLinks, StoreBody,
};
use crate::money::Site;
use crate::orders::{PosConfig, PosId, PosKind, PosMode};
use crate::store::{RegistrationRecord, Store, StoreError};

/// MP: "The URL must be less than 300 characters".
pub const MAX_URL_CHARS: usize = 300;

/// POS reconciled at the same time (MP rate-limits; 429s are retried).
const CONCURRENCY: usize = 4;

// ---- what MP should have ------------------------------------------------------

/// What one POS should be at Mercado Pago.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosTarget {
    pub pos: PosId,
    /// MP's `external_id` of the POS (letters and digits).
    pub external_id: String,
    /// The store's external id.
    pub store: String,
    pub name: String,
    /// The merchant category code.
    pub category: u32,
    /// The POS URL MP polls, with the poll key; `None` for attended POS.
    /// Sent to MP only: shown through [`mask_url`].
    pub url: Option<String>,
}

/// The POS URL MP calls for an unattended POS: `public_url/mp/pos/{id}`, plus
/// `?key=…` when the POS has a poll key.
pub fn pos_url(public_url: &str, pos: &PosId, key: Option<&str>) -> String {
    let mut url = format!("{public_url}/mp/pos/{pos}");
    if let Some(key) = key {
        url.push_str("?key=");
        url.push_str(&percent_encode(key));
    }
    url
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The url with the value of any `key` query parameter replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("key") => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", masked.join("&"))
}

/// The MCC a POS registers with: its `category`, else for fuel the site's
/// gas-station code (the site configured, else the one of its currency).
pub fn category(config: &Config, pos: &PosConfig) -> Result<u32, String> {
    if let Some(c) = config.registration.get(&pos.id).and_then(|r| r.category) {
        return Ok(c);
    }
    match pos.kind {
        PosKind::Fuel => Ok(config
            .mercadopago
            .site
            .unwrap_or_else(|| Site::of(pos.currency))
            .gas_station_mcc()),
        PosKind::Vending => Err(format!(
            "POS {} is a vending POS and has no category: set [[pos]] category to its merchant \
             category code (MCC) at Mercado Pago; only fuel POS default (to the site's gas-station code)",
            pos.id
        )),
    }
}

/// What `pos` should be at MP, or why it cannot be registered.
pub fn target(config: &Config, pos: &PosConfig) -> Result<PosTarget, String> {
    let store = pos.store.clone().ok_or_else(|| {
        format!(
            "POS {} has no store: set [[pos]] store to the external id of its store (one of [[stores]])",
            pos.id
        )
    })?;
    let category = category(config, pos)?;
    let url = match pos.mode {
        PosMode::Attended => None,
        PosMode::Unattended(_) => {
            let key = config.http.poll_keys.for_pos(&pos.id).map(|k| k.expose());
            let url = pos_url(&config.http.public_url, &pos.id, key);
            let n = url.chars().count();
            if n >= MAX_URL_CHARS {
                return Err(format!(
                    "POS {}: its url is {n} characters and Mercado Pago takes fewer than {MAX_URL_CHARS} \
                     (URL_TOO_LONG): shorten [http] public_url or the poll key",
                    pos.id
                ));
            }
            Some(url)
        }
    };
    let name = config
        .registration
        .get(&pos.id)
        .and_then(|r| r.name.clone())
        .unwrap_or_else(|| pos.id.to_string());
    Ok(PosTarget {
        pos: pos.id.clone(),
        external_id: pos.mp_external_id.clone(),
        store,
        name,
        category,
        url,
    })
}

// ---- what differs ---------------------------------------------------------------

/// One field that differs between the configuration and MP, as shown to the
/// operator (urls masked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub field: &'static str,
    /// What the configuration says.
    pub ours: String,
    /// What Mercado Pago has.
    pub theirs: String,
}

fn shown(v: Option<&str>) -> String {
    v.map_or_else(|| "(none)".to_owned(), |s| format!("{s:?}"))
}

/// The fields of a POS at MP that differ from its target: name, category,
/// url, store, fixed_amount.
pub fn pos_changes(t: &PosTarget, mp: &MpPosState) -> Vec<Change> {
    let mut changes = Vec::new();
    if mp.name.as_deref() != Some(t.name.as_str()) {
        changes.push(Change {
            field: "name",
            ours: shown(Some(&t.name)),
            theirs: shown(mp.name.as_deref()),
        });
    }
    if mp.category.map(|c| c.0) != Some(u64::from(t.category)) {
        changes.push(Change {
            field: "category",
            ours: t.category.to_string(),
            theirs: mp
                .category
                .map_or_else(|| "(none)".to_owned(), |c| c.0.to_string()),
        });
    }
    if mp.url.as_deref() != t.url.as_deref() {
        changes.push(Change {
            field: "url",
            ours: shown(t.url.as_deref().map(mask_url).as_deref()),
            theirs: shown(mp.url.as_deref().map(mask_url).as_deref()),
        });
    }
    if mp.external_store_id.as_deref() != Some(t.store.as_str()) {
        changes.push(Change {
            field: "store",
            ours: shown(Some(&t.store)),
            theirs: shown(mp.external_store_id.as_deref()),
        });
    }
    if mp.fixed_amount != Some(true) {
        changes.push(Change {
            field: "fixed_amount",
            ours: "true".into(),
            theirs: mp
                .fixed_amount
                .map_or_else(|| "(none)".to_owned(), |b| b.to_string()),
        });
    }
    changes
}

/// The `PUT /pos/{id}` body that fixes `changes`: only the fields that
/// differ, and `fixed_amount: true` whenever a url is sent (MP refuses a url
/// without it: `FIXED_AMOUNT_FALSE`). An attended POS that has a url at MP
/// gets `"url": null` (MP documents no other way to remove it).
pub fn pos_update_body(t: &PosTarget, changes: &[Change]) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    for c in changes {
        match c.field {
            "name" => {
                body.insert("name".into(), t.name.clone().into());
            }
            "category" => {
                body.insert("category".into(), t.category.into());
            }
            "url" => {
                body.insert(
                    "url".into(),
                    t.url
                        .clone()
                        .map_or(serde_json::Value::Null, serde_json::Value::from),
                );
                if t.url.is_some() {
                    body.insert("fixed_amount".into(), true.into());
                }
            }
            "store" => {
                body.insert("external_store_id".into(), t.store.clone().into());
            }
            "fixed_amount" => {
                body.insert("fixed_amount".into(), true.into());
            }
            _ => {}
        }
    }
    serde_json::Value::Object(body)
}

/// Degrees within which two coordinates are the same place (about 10 cm).
const SAME_PLACE: f64 = 1e-6;

/// The fields of a store at MP that differ from `[[stores]]`. MP's reference
/// serves a location as `address_line` and coordinates, so a location field
/// MP does not send back is not compared (comparing it would update the store
/// on every run); a `reference` the configuration leaves out is not either.
pub fn store_changes(ours: &MpStore, mp: &MpStoreState) -> Vec<Change> {
    let mut changes = Vec::new();
    if mp.name.as_deref() != Some(ours.name.as_str()) {
        changes.push(Change {
            field: "name",
            ours: shown(Some(&ours.name)),
            theirs: shown(mp.name.as_deref()),
        });
    }
    let Some(loc) = &mp.location else {
        changes.push(Change {
            field: "location",
            ours: format!(
                "{} {}, {}, {}",
                ours.location.street_name,
                ours.location.street_number,
                ours.location.city_name,
                ours.location.state_name
            ),
            theirs: "(none)".into(),
        });
        return changes;
    };
    let l = &ours.location;
    for (field, o, t) in [
        ("street_name", &l.street_name, &loc.street_name),
        ("street_number", &l.street_number, &loc.street_number),
        ("city_name", &l.city_name, &loc.city_name),
        ("state_name", &l.state_name, &loc.state_name),
    ] {
        if let Some(t) = t {
            if t != o {
                changes.push(Change {
                    field,
                    ours: shown(Some(o)),
                    theirs: shown(Some(t)),
                });
            }
        }
    }
    for (field, o, t) in [
        ("latitude", l.latitude, loc.latitude),
        ("longitude", l.longitude, loc.longitude),
    ] {
        if t.is_none_or(|t| (t - o).abs() > SAME_PLACE) {
            changes.push(Change {
                field,
                ours: o.to_string(),
                theirs: t.map_or_else(|| "(none)".to_owned(), |t| t.to_string()),
            });
        }
    }
    if let Some(r) = &l.reference {
        if loc.reference.as_ref() != Some(r) {
            changes.push(Change {
                field: "reference",
                ours: shown(Some(r)),
                theirs: shown(loc.reference.as_deref()),
            });
        }
    }
    changes
}

// ---- what was done --------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Created,
    Updated(Vec<Change>),
    Unchanged,
    WouldCreate,
    WouldUpdate(Vec<Change>),
    /// A store not in `[[stores]]` that MP has: used as it is.
    Found,
    Failed(String),
}

impl Action {
    fn label(&self) -> String {
        let fields = |c: &[Change]| c.iter().map(|c| c.field).collect::<Vec<_>>().join(", ");
        match self {
            Action::Created => "created".into(),
            Action::Updated(c) => format!("updated ({})", fields(c)),
            Action::Unchanged => "unchanged".into(),
            Action::WouldCreate => "would create".into(),
            Action::WouldUpdate(c) => format!("would update ({})", fields(c)),
            Action::Found => "found (not in [[stores]]: used as is)".into(),
            Action::Failed(_) => "FAILED".into(),
        }
    }

    fn changes(&self) -> &[Change] {
        match self {
            Action::Updated(c) | Action::WouldUpdate(c) => c,
            _ => &[],
        }
    }

    fn is_failure(&self) -> bool {
        matches!(self, Action::Failed(_))
    }

    /// A dry run found something to do.
    fn is_pending(&self) -> bool {
        matches!(self, Action::WouldCreate | Action::WouldUpdate(_))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreOutcome {
    pub store: String,
    pub mp_id: Option<u64>,
    pub action: Action,
    /// MP had it although its create said otherwise (`External_id-already-used`).
    pub note: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PosOutcome {
    pub pos: PosId,
    pub external_id: String,
    pub store: Option<String>,
    pub mp_id: Option<u64>,
    /// The configured url, masked.
    pub url: Option<String>,
    pub attended: bool,
    pub qr: Option<QrLinks>,
    pub action: Action,
    /// MP had it although its create said otherwise (409).
    pub note: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub dry_run: bool,
    pub stores: Vec<StoreOutcome>,
    pub pos: Vec<PosOutcome>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.stores.iter().filter(|s| s.action.is_failure()).count()
            + self.pos.iter().filter(|p| p.action.is_failure()).count()
    }

    /// Something differs from the configuration (only a dry run says so).
    pub fn differs(&self) -> bool {
        self.stores.iter().any(|s| s.action.is_pending())
            || self.pos.iter().any(|p| p.action.is_pending())
    }

    /// What the POS that MP has now are, for the console.
    pub fn records(&self, at: i64) -> Vec<RegistrationRecord> {
        self.pos
            .iter()
            .filter_map(|p| {
                let action = match p.action {
                    Action::Created => "created",
                    Action::Updated(_) => "updated",
                    Action::Unchanged => "unchanged",
                    _ => return None,
                };
                let qr = p.qr.clone().unwrap_or_default();
                Some(RegistrationRecord {
                    pos: p.pos.to_string(),
                    mp_external_id: p.external_id.clone(),
                    store: p.store.clone().unwrap_or_default(),
                    mp_pos_id: p.mp_id?,
                    url: p.url.clone(),
                    qr_image: qr.image,
                    qr_template_document: qr.template_document,
                    qr_template_image: qr.template_image,
                    action: action.into(),
                    at,
                })
            })
            .collect()
    }

    /// `qrgate pos register`'s output.
    pub fn render_register(&self) -> String {
        let mut out = String::new();
        if self.dry_run {
            out.push_str("Dry run: nothing is created or changed at Mercado Pago.\n\n");
        }
        out.push_str("Stores\n");
        let mut rows = vec![row(["STORE", "MP ID", "ACTION"])];
        for s in &self.stores {
            rows.push(row([
                s.store.as_str(),
                &id_text(s.mp_id),
                &with_note(s.action.label(), s.note),
            ]));
        }
        out.push_str(&table(&rows));
        out.push_str("\nPOS\n");
        let mut rows = vec![row(["POS", "STORE", "MP ID", "ACTION", "URL"])];
        for p in &self.pos {
            rows.push(row([
                p.pos.as_str(),
                p.store.as_deref().unwrap_or("-"),
                &id_text(p.mp_id),
                &with_note(p.action.label(), p.note),
                &url_text(p),
            ]));
        }
        out.push_str(&table(&rows));
        let changes = self.change_lines();
        if !changes.is_empty() {
            out.push_str("\nChanges\n");
            out.push_str(&changes);
        }
        let qr: Vec<&PosOutcome> = self.pos.iter().filter(|p| p.qr.is_some()).collect();
        if !qr.is_empty() {
            out.push_str("\nQR codes (print them on each POS)\n");
            let mut rows = Vec::new();
            for p in qr {
                let q = p.qr.clone().unwrap_or_default();
                for (i, (what, link)) in [
                    ("image", q.image),
                    ("template (PDF)", q.template_document),
                    ("template (PNG)", q.template_image),
                ]
                .into_iter()
                .enumerate()
                {
                    let name = if i == 0 { p.pos.as_str() } else { "" };
                    rows.push(row([name, what, link.as_deref().unwrap_or("-")]));
                }
            }
            out.push_str(&table(&rows));
        }
        out.push_str(&self.error_lines());
        let _ = writeln!(out, "\n{}", self.summary());
        out
    }

    /// One line: how many of each action, stores and POS together.
    fn summary(&self) -> String {
        let actions = self
            .stores
            .iter()
            .map(|s| &s.action)
            .chain(self.pos.iter().map(|p| &p.action));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for a in actions {
            let key = match a {
                Action::Created => "created",
                Action::Updated(_) => "updated",
                Action::Unchanged | Action::Found => "unchanged",
                Action::WouldCreate => "to create",
                Action::WouldUpdate(_) => "to update",
                Action::Failed(_) => "failed",
            };
            *counts.entry(key).or_default() += 1;
        }
        let order = [
            "created",
            "updated",
            "to create",
            "to update",
            "unchanged",
            "failed",
        ];
        let parts: Vec<String> = order
            .iter()
            .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
            .collect();
        format!(
            "{} store(s), {} POS: {}",
            self.stores.len(),
            self.pos.len(),
            parts.join(", ")
        )
    }

    /// `qrgate pos list`'s output: each configured POS beside MP's.
    pub fn render_list(&self) -> String {
        let state = |a: &Action| match a {
            Action::Unchanged | Action::Found => "ok",
            Action::WouldCreate => "MISSING at Mercado Pago",
            Action::WouldUpdate(_) => "DIFFERS",
            Action::Failed(_) => "ERROR",
            Action::Created | Action::Updated(_) => "changed",
        };
        let mut out = String::from("Stores\n");
        let mut rows = vec![row(["STORE", "MP ID", "STATE"])];
        for s in &self.stores {
            let st = match s.action {
                Action::Found => "ok (not in [[stores]])",
                ref a => state(a),
            };
            rows.push(row([s.store.as_str(), &id_text(s.mp_id), st]));
        }
        out.push_str(&table(&rows));
        out.push_str("\nPOS\n");
        let mut rows = vec![row(["POS", "STORE", "MP ID", "URL", "STATE"])];
        for p in &self.pos {
            rows.push(row([
                p.pos.as_str(),
                p.store.as_deref().unwrap_or("-"),
                &id_text(p.mp_id),
                &url_text(p),
                state(&p.action),
            ]));
        }
        out.push_str(&table(&rows));
        let changes = self.change_lines();
        if !changes.is_empty() {
            out.push_str("\nDifferences (qrgate pos register fixes them)\n");
            out.push_str(&changes);
        }
        out.push_str(&self.error_lines());
        out
    }

    fn change_lines(&self) -> String {
        let mut out = String::new();
        let mut lines = |what: &str, action: &Action| {
            for c in action.changes() {
                let _ = writeln!(
                    out,
                    "  {what} {}: Mercado Pago has {}, configured {}",
                    c.field, c.theirs, c.ours
                );
            }
        };
        for s in &self.stores {
            lines(&format!("store {}", s.store), &s.action);
        }
        for p in &self.pos {
            lines(&format!("POS {}", p.pos), &p.action);
        }
        out
    }

    fn error_lines(&self) -> String {
        let mut out = String::new();
        for s in &self.stores {
            if let Action::Failed(why) = &s.action {
                let _ = writeln!(out, "  store {}: {why}", s.store);
            }
        }
        for p in &self.pos {
            if let Action::Failed(why) = &p.action {
                // Messages about the configuration name the POS already.
                if why.starts_with(&format!("POS {} ", p.pos)) {
                    let _ = writeln!(out, "  {why}");
                } else {
                    let _ = writeln!(out, "  POS {}: {why}", p.pos);
                }
            }
        }
        if out.is_empty() {
            out
        } else {
            format!("\nErrors\n{out}")
        }
    }
}

fn id_text(id: Option<u64>) -> String {
    id.map_or_else(|| "-".to_owned(), |i| i.to_string())
}

fn url_text(p: &PosOutcome) -> String {
    match (&p.url, p.attended) {
        (Some(url), _) => url.clone(),
        (None, true) => "(none: attended)".to_owned(),
        (None, false) => "-".to_owned(),
    }
}

fn with_note(label: String, note: Option<&str>) -> String {
    match note {
        Some(n) => format!("{label}, {n}"),
        None => label,
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (i, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < r.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Secrets shorter than this are not searched for in the output (a one-letter
/// test token would blank every such letter); `key=` values are masked
/// whatever their length.
const MIN_REDACTED: usize = 6;

/// Masks every `key=` value in `text`, then replaces each secret (the access
/// token, every poll key) by `***`: MP's error messages may echo a url back.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("key=") {
        let value = &rest[i + 4..];
        let end = value
            .find(|c: char| c.is_whitespace() || matches!(c, '&' | '"' | '\'' | ')' | ']' | ','))
            .unwrap_or(value.len());
        out.push_str(&rest[..i + 4]);
        if end > 0 && !value.starts_with("***") {
            out.push_str("***");
        } else {
            out.push_str(&value[..end]);
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    for s in secrets.iter().filter(|s| s.len() >= MIN_REDACTED) {
        out = out.replace(s.as_str(), "***");
        let encoded = percent_encode(s);
        if encoded != *s {
            out = out.replace(&encoded, "***");
        }
    }
    out
}

/// Every secret the output must not show.
pub fn secrets(config: &Config) -> Vec<String> {
    let keys = &config.http.poll_keys;
    let mut out: Vec<String> = keys
        .global
        .iter()
        .chain(keys.per_pos.values())
        .map(|s| s.expose().to_owned())
        .collect();
    if let Some(t) = &config.mercadopago.access_token {
        out.push(t.expose().to_owned());
    }
    // Longest first, so a key that contains another is replaced whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

// ---- errors, in the operator's words ------------------------------------------------

/// What failed call was about.
enum Subject<'a> {
    Store(&'a str),
    Pos(&'a PosTarget),
}

fn explain(e: &PosApiError, subject: Subject<'_>, collector_id: u64) -> String {
    let PosApiError::Status {
        status,
        code,
        message,
    } = e
    else {
        return e.to_string();
    };
    let code_is = |c: &str| code.eq_ignore_ascii_case(c);
    let raw = format!("Mercado Pago answered {status} {code}: {message}");
    let text = match (&subject, *status) {
        (_, 401) => "the access token was refused (401): check QRGATE_MP_ACCESS_TOKEN".to_owned(),
        (Subject::Pos(t), 403) if t.url.is_some() => {
            let host = t
                .url
                .as_deref()
                .and_then(|u| reqwest::Url::parse(u).ok())
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            format!(
                "Mercado Pago refused the POS url (403): it has not enabled the host {host} for this \
                 account. Ask your Mercado Pago technical advisor to enable it, then run this again"
            )
        }
        (_, 403) => format!(
            "Mercado Pago refused (403): the access token may not manage the stores and POS of \
             collector {collector_id} ([mercadopago] collector_id)"
        ),
        (Subject::Pos(_), _) if code_is("FIXED_AMOUNT_FALSE") => {
            "Mercado Pago requires fixed_amount = true for a POS with a url (FIXED_AMOUNT_FALSE)"
                .to_owned()
        }
        (Subject::Pos(t), _)
            if code_is("INVALID_EXTERNAL_ID") || code_is("EXTERNAL_ID_TOO_LONG") =>
        {
            format!(
                "Mercado Pago refused the POS external_id {:?} ({code}): it takes letters and \
                 digits only, fewer than 40; set [[pos]] mp_external_id",
                t.external_id
            )
        }
        (Subject::Pos(t), _) if code_is("URL_TOO_LONG") => format!(
            "Mercado Pago refused the url as too long ({code}, {} characters; it takes fewer \
             than {MAX_URL_CHARS}): shorten [http] public_url or the poll key",
            t.url.as_deref().map_or(0, |u| u.chars().count())
        ),
        (Subject::Pos(_), _) if code_is("INVALID_URL") => format!(
            "Mercado Pago refused the url ({code}): check [http] public_url (http:// or https:// \
             and a host)"
        ),
        (Subject::Pos(t), _)
            if code_is("UNKNOWN_MCC")
                || code_is("POS_UNKNOWN_MCC")
                || code_is("INVALID_CATEGORY")
                || code_is("invalid_category") =>
        {
            format!(
                "Mercado Pago does not know category {} for this account's site ({code}): set \
                 [[pos]] category to a merchant category code (MCC) of your site",
                t.category
            )
        }
        (Subject::Pos(_), _) if code_is("NAME_TOO_LONG") || code_is("INVALID_NAME") => {
            format!("Mercado Pago refused the POS name ({code}): set a shorter [[pos]] name")
        }
        (Subject::Pos(t), _)
            if code_is("INEXISTENT_EXTERNAL_STORE_ID")
                || code_is("EXTERNAL_STORE_ID_NOT_MATCH") =>
        {
            format!(
                "Mercado Pago does not have store {:?} for this POS ({code})",
                t.store
            )
        }
        (Subject::Store(s), _) if code_is("EXTERNAL_ID_TOO_LONG") => format!(
            "Mercado Pago refused the store external id {s:?} ({code}): at most 60 characters"
        ),
        _ => return raw,
    };
    format!("{text} [{raw}]")
}

// ---- the walk ---------------------------------------------------------------------

/// Finds, creates and updates every store and POS the configuration needs;
/// with `dry_run`, only finds them and says what it would do.
pub async fn sync(config: &Config, api: &PosApi, dry_run: bool) -> Report {
    let collector = config.mercadopago.collector_id;
    let configured: HashMap<&str, &MpStore> =
        config.stores.iter().map(|s| (s.id.as_str(), s)).collect();

    // What each POS should be; the stores the valid ones need, in order.
    let mut targets: Vec<Result<PosTarget, String>> = Vec::new();
    let mut needed: BTreeMap<String, Vec<PosId>> = BTreeMap::new();
    let mut store_order: Vec<String> = Vec::new();
    for pos in &config.pos {
        let t = target(config, pos);
        if let Ok(t) = &t {
            if !needed.contains_key(&t.store) {
                store_order.push(t.store.clone());
            }
            needed
                .entry(t.store.clone())
                .or_default()
                .push(t.pos.clone());
        }
        targets.push(t);
    }

    // Stores first: a POS is created in its store.
    let mut stores = Vec::new();
    for id in &store_order {
        let outcome = match configured.get(id.as_str()) {
            Some(ours) => ensure_store(api, ours, dry_run, collector).await,
            None => match api.find_store(id).await {
                Ok(Some(mp)) => StoreOutcome {
                    store: id.clone(),
                    mp_id: Some(mp.id.0),
                    action: Action::Found,
                    note: None,
                },
                Ok(None) => StoreOutcome {
                    store: id.clone(),
                    mp_id: None,
                    action: Action::Failed(format!(
                        "store {id:?} (of POS {}) is neither in [[stores]] nor at Mercado Pago: \
                         add it to [[stores]] with its name and location",
                        needed[id]
                            .iter()
                            .map(PosId::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    note: None,
                },
                Err(e) => StoreOutcome {
                    store: id.clone(),
                    mp_id: None,
                    action: Action::Failed(explain(&e, Subject::Store(id), collector)),
                    note: None,
                },
            },
        };
        stores.push(outcome);
    }
    let store_failed: HashMap<&str, bool> = stores
        .iter()
        .map(|s| (s.store.as_str(), s.action.is_failure()))
        .collect();

    // Then the POS, a few at a time.
    let mut pos: Vec<Option<PosOutcome>> = vec![None; config.pos.len()];
    let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (p, t)) in config.pos.iter().zip(targets).enumerate() {
        let failed = |why: String| PosOutcome {
            pos: p.id.clone(),
            external_id: p.mp_external_id.clone(),
            store: p.store.clone(),
            mp_id: None,
            url: None,
            attended: p.mode == PosMode::Attended,
            qr: None,
            action: Action::Failed(why),
            note: None,
        };
        let t = match t {
            Ok(t) => t,
            Err(why) => {
                pos[i] = Some(failed(why));
                continue;
            }
        };
        if store_failed.get(t.store.as_str()) == Some(&true) {
            pos[i] = Some(PosOutcome {
                url: t.url.as_deref().map(mask_url),
                ..failed(format!(
                    "not registered: its store {:?} failed (see the store's error)",
                    t.store
                ))
            });
            continue;
        }
        let api = api.clone();
        let limit = Arc::clone(&limit);
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, ensure_pos(&api, t, dry_run, collector).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((i, outcome)) => pos[i] = Some(outcome),
            // A panic in one POS's task: reported as that POS's failure below.
            Err(e) => tracing::error!(error = %e, "a POS registration task failed"),
        }
    }
    let pos = pos
        .into_iter()
        .zip(&config.pos)
        .map(|(o, p)| {
            o.unwrap_or_else(|| PosOutcome {
                pos: p.id.clone(),
                external_id: p.mp_external_id.clone(),
                store: p.store.clone(),
                mp_id: None,
                url: None,
                attended: p.mode == PosMode::Attended,
                qr: None,
                action: Action::Failed("internal error: the registration task stopped".into()),
                note: None,
            })
        })
        .collect();
    Report {
        dry_run,
        stores,
        pos,
    }
}

async fn ensure_store(api: &PosApi, ours: &MpStore, dry_run: bool, collector: u64) -> StoreOutcome {
    let outcome = |mp_id: Option<u64>, action: Action, note: Option<&'static str>| StoreOutcome {
        store: ours.id.clone(),
        mp_id,
        action,
        note,
    };
    let fail = |e: &PosApiError| {
        outcome(
            None,
            Action::Failed(explain(e, Subject::Store(&ours.id), collector)),
            None,
        )
    };
    let body = StoreBody {
        name: &ours.name,
        external_id: None,
        location: &ours.location,
    };
    let mut note = None;
    let found = match api.find_store(&ours.id).await {
        Ok(found) => found,
        Err(e) => return fail(&e),
    };
    let mp = match found {
        Some(mp) => mp,
        None if dry_run => return outcome(None, Action::WouldCreate, None),
        None => {
            let create = StoreBody {
                external_id: Some(&ours.id),
                ..body
            };
            match api.create_store(&create).await {
                Ok(mp) => return outcome(Some(mp.id.0), Action::Created, None),
                Err(e) if e.has_code("External_id-already-used") => {
                    match api.find_store(&ours.id).await {
                        Ok(Some(mp)) => {
                            note = Some("it existed (External_id-already-used)");
                            mp
                        }
                        Ok(None) => {
                            return outcome(
                                None,
                                Action::Failed(format!(
                                    "Mercado Pago says external id {:?} is already used, yet its \
                                     search does not find it (another account's store?) [{e}]",
                                    ours.id
                                )),
                                None,
                            )
                        }
                        Err(e) => return fail(&e),
                    }
                }
                Err(e) => return fail(&e),
            }
        }
    };
    let changes = store_changes(ours, &mp);
    if changes.is_empty() {
        return outcome(Some(mp.id.0), Action::Unchanged, note);
    }
    if dry_run {
        return outcome(Some(mp.id.0), Action::WouldUpdate(changes), note);
    }
    match api.update_store(mp.id.0, &body).await {
        Ok(_) => outcome(Some(mp.id.0), Action::Updated(changes), note),
        Err(e) => outcome(
            Some(mp.id.0),
            Action::Failed(explain(&e, Subject::Store(&ours.id), collector)),
            note,
        ),
    }
}

async fn ensure_pos(api: &PosApi, t: PosTarget, dry_run: bool, collector: u64) -> PosOutcome {
    let mut out = PosOutcome {
        pos: t.pos.clone(),
        external_id: t.external_id.clone(),
        store: Some(t.store.clone()),
        mp_id: None,
        url: t.url.as_deref().map(mask_url),
        attended: t.url.is_none(),
        qr: None,
        action: Action::Unchanged,
        note: None,
    };
    let fail = |mut out: PosOutcome, e: &PosApiError| {
        out.action = Action::Failed(explain(e, Subject::Pos(&t), collector));
        out
    };
    let found = match api.find_pos(&t.external_id).await {
        Ok(found) => found,
        Err(e) => return fail(out, &e),
    };
    let mp = match found {
        Some(mp) => mp,
        None if dry_run => {
            out.action = Action::WouldCreate;
            return out;
        }
        None => {
            let create = PosCreate {
                name: &t.name,
                fixed_amount: true,
                category: t.category,
                external_store_id: &t.store,
                external_id: &t.external_id,
                url: t.url.as_deref(),
            };
            match api.create_pos(&create).await {
                Ok(mp) => {
                    out.mp_id = Some(mp.id.0);
                    out.qr = mp.qr;
                    out.action = Action::Created;
                    return out;
                }
                // It exists after all (a retried create, or a search that lags).
                Err(e) if e.status() == Some(409) => match api.find_pos(&t.external_id).await {
                    Ok(Some(mp)) => {
                        out.note = Some("it existed (409)");
                        mp
                    }
                    Ok(None) => {
                        out.action = Action::Failed(format!(
                            "Mercado Pago says a POS with external_id {:?} exists (409), yet its \
                             search does not find it [{e}]",
                            t.external_id
                        ));
                        return out;
                    }
                    Err(e) => return fail(out, &e),
                },
                Err(e) => return fail(out, &e),
            }
        }
    };
    out.mp_id = Some(mp.id.0);
    out.qr = mp.qr.clone();
    let changes = pos_changes(&t, &mp);
    if changes.is_empty() {
        out.action = Action::Unchanged;
        return out;
    }
    if dry_run {
        out.action = Action::WouldUpdate(changes);
        return out;
    }
    match api
        .update_pos(mp.id.0, &pos_update_body(&t, &changes))
        .await
    {
        Ok(updated) => {
            if updated.qr.is_some() {
                out.qr = updated.qr;
            }
            out.action = Action::Updated(changes);
            out
        }
        Err(e) => fail(out, &e),
    }
}

/// Keeps what MP answered for each POS, for the console.
pub async fn record(store: &dyn Store, report: &Report, at: i64) -> Result<usize, StoreError> {
    let records = report.records(at);
    let n = records.len();
    for r in records {
        store.record_registration(r).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreLocation;
    use crate::mercadopago::wire::Id;

    fn t(url: Option<&str>) -> PosTarget {
        PosTarget {
            pos: PosId::parse("pump-1").unwrap(),
            external_id: "pump1".into(),
            store: "st01".into(),
            name: "Pump 1".into(),
            category: 473000,
            url: url.map(str::to_owned),
        }
    }

    fn mp_pos(url: Option<&str>) -> MpPosState {
        MpPosState {
            id: Id(3000001),
            name: Some("Pump 1".into()),
            fixed_amount: Some(true),
            category: Some(Id(473000)),
            store_id: Some(Id(40000001)),
            external_store_id: Some("st01".into()),
            external_id: Some("pump1".into()),
            url: url.map(str::to_owned),
            qr: None,
        }
    }

    const URL: &str = "https://s.example/mp/pos/pump-1?key=s3cret";

    fn fields(c: &[Change]) -> Vec<&str> {
        c.iter().map(|c| c.field).collect()
    }

    #[test]
    fn a_pos_that_matches_needs_nothing() {
        assert_eq!(pos_changes(&t(Some(URL)), &mp_pos(Some(URL))), vec![]);
        assert_eq!(pos_changes(&t(None), &mp_pos(None)), vec![]);
    }

    #[test]
    fn a_changed_url_is_put_back_with_fixed_amount_and_shown_masked() {
        let drifted = mp_pos(Some("https://evil.example/x?key=other"));
        let c = pos_changes(&t(Some(URL)), &drifted);
        assert_eq!(fields(&c), ["url"]);
        assert_eq!(c[0].ours, "\"https://s.example/mp/pos/pump-1?key=***\"");
        assert_eq!(c[0].theirs, "\"https://evil.example/x?key=***\"");
        let body = pos_update_body(&t(Some(URL)), &c);
        assert_eq!(body, serde_json::json!({"url": URL, "fixed_amount": true}));
    }

    #[test]
    fn an_attended_pos_with_a_url_at_mp_gets_it_removed() {
        let c = pos_changes(&t(None), &mp_pos(Some(URL)));
        assert_eq!(fields(&c), ["url"]);
        assert_eq!(
            pos_update_body(&t(None), &c),
            serde_json::json!({ "url": null })
        );
    }

    #[test]
    fn name_category_store_and_fixed_amount_differences_are_each_fixed() {
        let mp = MpPosState {
            name: Some("Old".into()),
            category: None,
            external_store_id: Some("st02".into()),
            fixed_amount: Some(false),
            ..mp_pos(Some(URL))
        };
        let c = pos_changes(&t(Some(URL)), &mp);
        assert_eq!(fields(&c), ["name", "category", "store", "fixed_amount"]);
        assert_eq!(
            pos_update_body(&t(Some(URL)), &c),
            serde_json::json!({"name": "Pump 1", "category": 473000, "external_store_id": "st01", "fixed_amount": true})
        );
    }

    fn store() -> MpStore {
        MpStore {
            id: "st01".into(),
            name: "Ruta 8".into(),
            location: StoreLocation {
                street_name: "Av. Siempre Viva".into(),
                street_number: "742".into(),
                city_name: "Pilar".into(),
                state_name: "Buenos Aires".into(),
                latitude: -34.45,
                longitude: -58.91,
                reference: None,
            },
        }
    }

    fn mp_store(json: serde_json::Value) -> MpStoreState {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_store_is_compared_on_what_mp_sends_back() {
        // MP's reference: address_line and coordinates only.
        let mp = mp_store(
            serde_json::json!({"id": 1, "name": "Ruta 8", "external_id": "st01",
            "location": {"address_line": "Av. Siempre Viva 742, Pilar, Buenos Aires",
                         "latitude": -34.4500000001, "longitude": -58.91, "reference": "x"}}),
        );
        assert_eq!(store_changes(&store(), &mp), vec![]);
        let mp = mp_store(
            serde_json::json!({"id": 1, "name": "Ruta 9", "external_id": "st01",
            "location": {"street_name": "Av. Siempre Viva", "street_number": "743", "city_name": "Pilar",
                         "state_name": "Buenos Aires", "latitude": -34.0, "longitude": -58.91}}),
        );
        assert_eq!(
            fields(&store_changes(&store(), &mp)),
            ["name", "street_number", "latitude"]
        );
        let mut with_ref = store();
        with_ref.location.reference = Some("near the church".into());
        let mp = mp_store(serde_json::json!({"id": 1, "name": "Ruta 8"}));
        assert_eq!(fields(&store_changes(&with_ref, &mp)), ["location"]);
    }

    #[test]
    fn poll_keys_are_encoded_in_the_url_and_masked_when_shown() {
        let id = PosId::parse("pump-1").unwrap();
        assert_eq!(
            pos_url("https://s.example", &id, None),
            "https://s.example/mp/pos/pump-1"
        );
        let url = pos_url("https://s.example", &id, Some("a b&c"));
        assert_eq!(url, "https://s.example/mp/pos/pump-1?key=a%20b%26c");
        assert_eq!(mask_url(&url), "https://s.example/mp/pos/pump-1?key=***");
        assert_eq!(
            mask_url("https://x/y?a=1&key=z&b=2"),
            "https://x/y?a=1&key=***&b=2"
        );
        assert_eq!(
            redact(
                "echo https://x?key=a%20b%26c and a b&cdef",
                &["a b&cdef".into()]
            ),
            "echo https://x?key=*** and ***"
        );
        assert_eq!(
            redact("url \"https://x/p?a=1&key=k&b=2\" key=*** x", &["x".into()]),
            "url \"https://x/p?a=1&key=***&b=2\" key=*** x"
        );
    }

    fn config(text: &str) -> Config {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        Config::load_with(Some(f.path()), &|_| None).unwrap()
    }

    #[test]
    fn targets_default_the_name_the_fuel_category_and_refuse_what_cannot_be_registered() {
        let c = config(
            "[http]\npublic_url = \"https://s.example/\"\npoll_key = \"k1\"\n[mercadopago]\nsite = \"MLB\"\n\
             [mqtt]\nallow_anonymous = true\n\
             [[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\nstore = \"st01\"\n\
             [[pos]]\nid = \"vend-1\"\nkind = \"vending\"\nstore = \"st01\"\n\
             [[pos]]\nid = \"vend-2\"\nkind = \"vending\"\nstore = \"st01\"\ncategory = 5499\nname = \"Snacks\"\nmode = \"attended\"\n\
             [[pos]]\nid = \"pump-2\"\nkind = \"fuel\"\n",
        );
        let p = target(&c, &c.pos[0]).unwrap();
        assert_eq!(p.category, 4731300, "MLB's gas-station MCC");
        assert_eq!(p.name, "pump-1");
        assert_eq!(
            p.url.as_deref(),
            Some("https://s.example/mp/pos/pump-1?key=k1")
        );
        let e = target(&c, &c.pos[1]).unwrap_err();
        assert!(e.contains("vend-1") && e.contains("category"), "{e}");
        let v = target(&c, &c.pos[2]).unwrap();
        assert_eq!((v.category, v.name.as_str(), v.url), (5499, "Snacks", None));
        let e = target(&c, &c.pos[3]).unwrap_err();
        assert!(e.contains("pump-2") && e.contains("no store"), "{e}");
        // No site: the currency's.
        let c = config("[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"p\"\nkind = \"fuel\"\ncurrency = \"MXN\"\nstore = \"s\"\n");
        assert_eq!(target(&c, &c.pos[0]).unwrap().category, 468419);
    }

    #[test]
    fn a_url_of_300_characters_or_more_is_refused_before_sending() {
        let long = format!("https://{}.example", "a".repeat(280));
        let c = config(&format!(
            "[http]\npublic_url = \"{long}\"\n[mqtt]\nallow_anonymous = true\n[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\nstore = \"s\"\n"
        ));
        let e = target(&c, &c.pos[0]).unwrap_err();
        assert!(e.contains("URL_TOO_LONG") && e.contains("pump-1"), "{e}");
    }

    #[test]
    fn mp_errors_are_explained_to_the_operator() {
        let status = |status: u16, code: &str| PosApiError::Status {
            status,
            code: code.into(),
            message: "m".into(),
        };
        let target = t(Some(URL));
        let e = explain(&status(403, "forbidden"), Subject::Pos(&target), 1);
        assert!(
            e.contains("s.example") && e.contains("technical advisor"),
            "{e}"
        );
        let e = explain(&status(400, "UNKNOWN_MCC"), Subject::Pos(&target), 1);
        assert!(
            e.contains("473000") && e.contains("[[pos]] category"),
            "{e}"
        );
        let e = explain(&status(400, "FIXED_AMOUNT_FALSE"), Subject::Pos(&target), 1);
        assert!(e.contains("fixed_amount"), "{e}");
        let e = explain(
            &status(400, "INVALID_EXTERNAL_ID"),
            Subject::Pos(&target),
            1,
        );
        assert!(e.contains("mp_external_id"), "{e}");
        let e = explain(&status(400, "URL_TOO_LONG"), Subject::Pos(&target), 1);
        assert!(e.contains("public_url"), "{e}");
        let e = explain(&status(400, "SOMETHING_NEW"), Subject::Store("st01"), 1);
        assert_eq!(e, "Mercado Pago answered 400 SOMETHING_NEW: m");
    }

    #[test]
    fn the_table_aligns_columns() {
        let t = table(&[row(["POS", "MP ID"]), row(["pump-10", "3"])]);
        assert_eq!(t, "  POS      MP ID\n  pump-10  3\n");
    }
}
