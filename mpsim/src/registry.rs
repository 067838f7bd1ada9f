//! Stores and POS as MP registers them: `GET/POST/PUT /users/{collector}/stores…`, `GET /stores/{id}`,
//! `GET/POST /pos`, `GET/PUT/DELETE /pos/{id}`, with MP's error codes from its API reference
//! (`FIXED_AMOUNT_FALSE`, `INVALID_EXTERNAL_ID`, `URL_TOO_LONG`, `UNKNOWN_MCC`, …), the 403 of a url
//! whose host MP has not enabled, and the 409 of a POS `external_id` already used.
//!
//! Stores and POS are kept as the JSON objects the API serves, so a test can change a field behind
//! qrgate's back ([`Simulator::set_pos_field`]) and see whether qrgate puts it back.

use serde_json::{Map, Value};

use super::*;

const FIRST_STORE_ID: u64 = 40_000_001;
const FIRST_POS_ID: u64 = 3_000_001;
const PAGE_LIMIT: usize = 50;
/// MP: "can contain up to 60 characters".
const MAX_STORE_EXTERNAL_ID: usize = 60;
/// MP: "must be less than 40 characters".
const MAX_POS_EXTERNAL_ID: usize = 40;
/// MP: "must be less than 45 characters".
const MAX_POS_NAME: usize = 45;
/// MP: "The URL must be less than 300 characters".
const MAX_POS_URL: usize = 300;
const QR_BASE: &str = "https://www.mercadopago.com/instore/merchant/qr/";

/// The gas-station MCC of each site (MP's `category` for a fuel POS).
pub const GAS_STATION_MCC: &[(&str, u32)] = &[
    ("MLA", 473000),
    ("MLB", 4731300),
    ("MLM", 468419),
    ("MCO", 4731),
    ("MPE", 5050),
    ("MLU", 47300),
    ("MLC", 473001),
];

/// Categories the simulator accepts on every site besides the site's gas-station code: food, kiosk and
/// vending codes (MP publishes no complete list; these are plausible ones).
pub const GENERIC_MCC_CATEGORIES: &[u32] = &[
    621102,  // gastronomy (MP's QR examples)
    5611203, // kiosks, convenience
    5411,    // groceries
    5441,    // candy
    5462,    // bakeries
    5499,    // miscellaneous food stores, vending
    5812,    // restaurants
    5814,    // fast food
    5999,    // miscellaneous retail
];

/// The gas-station MCC MP expects for a site (`MLA` → 473000).
pub fn gas_station_mcc(site: &str) -> Option<u32> {
    GAS_STATION_MCC
        .iter()
        .find(|(s, _)| *s == site)
        .map(|(_, code)| *code)
}

pub(super) struct Registry {
    next_store_id: u64,
    next_pos_id: u64,
    stores: BTreeMap<u64, Map<String, Value>>,
    pos: BTreeMap<u64, Map<String, Value>>,
    /// `None`: every url host is enabled.
    allowed_hosts: Option<Vec<String>>,
    /// `None`: the site's gas-station code and [`GENERIC_MCC_CATEGORIES`]; `Some(None)`: any number.
    categories: Option<Option<Vec<u32>>>,
}

impl Registry {
    pub(super) fn new() -> Self {
        Registry {
            next_store_id: FIRST_STORE_ID,
            next_pos_id: FIRST_POS_ID,
            stores: BTreeMap::new(),
            pos: BTreeMap::new(),
            allowed_hosts: None,
            categories: None,
        }
    }

    fn category_known(&self, category: u64, config: &SimulatorConfig) -> bool {
        match &self.categories {
            Some(None) => true,
            Some(Some(list)) => list.iter().any(|c| u64::from(*c) == category),
            None => {
                gas_station_mcc(site_id(&config.site_currency)).map(u64::from) == Some(category)
                    || GENERIC_MCC_CATEGORIES
                        .iter()
                        .any(|c| u64::from(*c) == category)
            }
        }
    }

    fn store_by_external_id(&self, external_id: &str) -> Option<u64> {
        self.stores
            .iter()
            .find(|(_, s)| s.get("external_id").and_then(Value::as_str) == Some(external_id))
            .map(|(id, _)| *id)
    }

    /// Whether a POS with this external_id is registered: `Some(its external_store_id)`.
    pub(super) fn pos_fields(&self, external_id: &str) -> Option<Option<String>> {
        let id = self.pos_by_external_id(external_id)?;
        Some(PosFields::of(self.pos.get(&id)?).external_store_id)
    }

    fn pos_by_external_id(&self, external_id: &str) -> Option<u64> {
        self.pos
            .iter()
            .find(|(_, p)| p.get("external_id").and_then(Value::as_str) == Some(external_id))
            .map(|(id, _)| *id)
    }
}

// ---------------------------------------------------------------------------------------------
// Test levers.

impl Simulator {
    /// `None` (the default): every url host is enabled. `Some(hosts)`: a POS `url` whose host is not
    /// in the list is refused with 403, as MP does until its technical advisor enables the host.
    pub fn set_allowed_url_hosts(&self, hosts: Option<Vec<String>>) {
        self.inner.shared.lock().registry.allowed_hosts =
            hosts.map(|list| list.into_iter().map(|h| h.to_ascii_lowercase()).collect());
    }

    /// `Some(list)`: exactly these POS categories are known. `None`: any number is. The default is the
    /// site's gas-station code ([`GAS_STATION_MCC`]) plus [`GENERIC_MCC_CATEGORIES`].
    pub fn set_known_categories(&self, categories: Option<Vec<u32>>) {
        self.inner.shared.lock().registry.categories = Some(categories);
    }

    /// Every store, as `GET /stores/{id}` serves it, in creation order.
    pub fn stores(&self) -> Vec<serde_json::Value> {
        let state = self.inner.shared.lock();
        state
            .registry
            .stores
            .values()
            .map(|s| Value::Object(s.clone()))
            .collect()
    }

    /// Every POS, as `GET /pos/{id}` serves it, in creation order.
    pub fn pos_list(&self) -> Vec<serde_json::Value> {
        let state = self.inner.shared.lock();
        state
            .registry
            .pos
            .values()
            .map(|p| Value::Object(p.clone()))
            .collect()
    }

    pub fn pos_by_external_id(&self, external_id: &str) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let id = state.registry.pos_by_external_id(external_id)?;
        state.registry.pos.get(&id).cloned().map(Value::Object)
    }

    pub fn store_by_external_id(&self, external_id: &str) -> Option<serde_json::Value> {
        let state = self.inner.shared.lock();
        let id = state.registry.store_by_external_id(external_id)?;
        state.registry.stores.get(&id).cloned().map(Value::Object)
    }

    /// Someone changed the POS at MP (drift): sets `field` to `value` as served, without any check;
    /// `Value::Null` removes the field.
    pub fn set_pos_field(
        &self,
        external_id: &str,
        field: &str,
        value: serde_json::Value,
    ) -> Result<(), SimError> {
        let mut state = self.inner.shared.lock();
        let id = state
            .registry
            .pos_by_external_id(external_id)
            .ok_or_else(|| SimError::UnknownPos(external_id.to_owned()))?;
        if let Some(pos) = state.registry.pos.get_mut(&id) {
            set_field(pos, field, value);
        }
        Ok(())
    }

    /// Someone changed the store at MP: as [`Simulator::set_pos_field`], for the store with this
    /// `external_id` (`"location"` replaces the whole location object).
    pub fn set_store_field(
        &self,
        external_id: &str,
        field: &str,
        value: serde_json::Value,
    ) -> Result<(), SimError> {
        let mut state = self.inner.shared.lock();
        let id = state
            .registry
            .store_by_external_id(external_id)
            .ok_or_else(|| SimError::UnknownStore(external_id.to_owned()))?;
        if let Some(store) = state.registry.stores.get_mut(&id) {
            set_field(store, field, value);
        }
        Ok(())
    }

    /// A customer scans the QR of the POS registered with this `external_id`: [`Simulator::scan`] of
    /// its registered `url`, whatever that is now.
    pub async fn scan_pos(&self, external_id: &str) -> Result<Scan, SimError> {
        let url = {
            let state = self.inner.shared.lock();
            let id = state
                .registry
                .pos_by_external_id(external_id)
                .ok_or_else(|| SimError::UnknownPos(external_id.to_owned()))?;
            state
                .registry
                .pos
                .get(&id)
                .and_then(|p| p.get("url"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| SimError::PosWithoutUrl(external_id.to_owned()))?
        };
        self.scan(&url).await
    }
}

fn set_field(object: &mut Map<String, Value>, field: &str, value: Value) {
    if value.is_null() {
        object.remove(field);
    } else {
        object.insert(field.to_owned(), value);
    }
}

// ---------------------------------------------------------------------------------------------
// The API.

/// Routes the registration calls; `None` when the path is not one of them.
pub(super) fn route(
    shared: &Shared,
    method: &str,
    segments: &[&str],
    query: &str,
    body: &[u8],
) -> Option<HttpResponse> {
    let response = match (method, segments) {
        ("GET", ["users", user, "stores", "search"]) => {
            with_collector(shared, user, || search_stores(shared, query))
        }
        ("POST", ["users", user, "stores"]) => {
            with_collector(shared, user, || create_store(shared, body))
        }
        ("PUT", ["users", user, "stores", id]) => {
            with_collector(shared, user, || update_store(shared, id, body))
        }
        ("GET", ["users", user, "stores", id]) => {
            with_collector(shared, user, || get_store(shared, id))
        }
        ("GET", ["stores", id]) => get_store(shared, id),
        ("GET", ["pos"]) => search_pos(shared, query),
        ("POST", ["pos"]) => create_pos(shared, body),
        ("GET", ["pos", id]) => get_pos(shared, id),
        ("PUT", ["pos", id]) => update_pos(shared, id, body),
        ("DELETE", ["pos", id]) => delete_pos(shared, id),
        _ => return None,
    };
    Some(response)
}

fn with_collector(
    shared: &Shared,
    user: &str,
    then: impl FnOnce() -> HttpResponse,
) -> HttpResponse {
    if user.parse::<u64>().is_err() {
        return mp_error(400, "USER_ID must be number.", "INVALID_USER_ID");
    }
    if !is_collector(shared, user) {
        return collector_mismatch();
    }
    then()
}

fn query_params(query: &str) -> HashMap<String, String> {
    web::Query::<HashMap<String, String>>::from_query(query)
        .map(web::Query::into_inner)
        .unwrap_or_default()
}

/// (offset, limit) of a search, or MP's error.
fn paging(params: &HashMap<String, String>) -> Result<(usize, usize), MpError> {
    let offset = match params.get("offset").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => {
            return Err(MpError::new(
                400,
                "OFFSET must be numeric.",
                "INVALID_OFFSET",
            ))
        }
    };
    let limit = match params.get("limit").map(|v| v.parse::<usize>()) {
        None => PAGE_LIMIT,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return Err(MpError::new(400, "LIMIT must be numeric.", "INVALID_LIMIT")),
    };
    Ok((offset, limit))
}

fn page(found: Vec<Value>, offset: usize, limit: usize) -> HttpResponse {
    let total = found.len();
    let results: Vec<Value> = found.into_iter().skip(offset).take(limit).collect();
    let body = serde_json::json!({
        "paging": { "total": total, "offset": offset, "limit": limit },
        "results": results,
    });
    json_response(StatusCode::OK, body.to_string())
}

/// The body as a JSON object; MP's `MISSING_BODY` when empty.
fn object_body(body: &[u8], what: &str) -> Result<Map<String, Value>, MpError> {
    let text = std::str::from_utf8(body).unwrap_or("").trim();
    if text.is_empty() {
        return Err(MpError::new(
            400,
            &format!("HTTP body is required to {what}."),
            "MISSING_BODY",
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(MpError::new(
            400,
            "the body is not a JSON object",
            "bad_request",
        )),
    }
}

fn unknown_field(object: &Map<String, Value>, allowed: &[&str], code: &str) -> Result<(), MpError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(MpError::new(
            400,
            &format!("The indicated field is not allowed for this operation or is unknown: {key}"),
            code,
        )),
        None => Ok(()),
    }
}

// ----- Stores.

const STORE_FIELDS: &[&str] = &["name", "business_hours", "external_id", "location"];
const LOCATION_TEXT_FIELDS: &[(&str, &str)] = &[
    ("street_name", "INVALID_STREET_NAME"),
    ("street_number", "INVALID_STREET_NUMBER"),
    ("city_name", "INVALID_CITY_NAME"),
    ("state_name", "INVALID_STATE_NAME"),
];

fn search_stores(shared: &Shared, query: &str) -> HttpResponse {
    let params = query_params(query);
    let (offset, limit) = match paging(&params) {
        Ok(paging) => paging,
        Err(error) => return error.response(),
    };
    let state = shared.lock();
    let found = state
        .registry
        .stores
        .values()
        .filter(|s| {
            params.get("external_id").is_none_or(|wanted| {
                s.get("external_id").and_then(Value::as_str) == Some(wanted.as_str())
            })
        })
        .map(|s| Value::Object(s.clone()))
        .collect();
    page(found, offset, limit)
}

fn get_store(shared: &Shared, id: &str) -> HttpResponse {
    let state = shared.lock();
    match id
        .parse()
        .ok()
        .and_then(|id: u64| state.registry.stores.get(&id))
    {
        Some(store) => json_response(StatusCode::OK, Value::Object(store.clone()).to_string()),
        None => mp_error(404, "Store not found", "not_found"),
    }
}

fn create_store(shared: &Shared, body: &[u8]) -> HttpResponse {
    let body = match object_body(body, "create store") {
        Ok(body) => body,
        Err(error) => return error.response(),
    };
    let mut state = shared.lock();
    let id = state.registry.next_store_id;
    let now = mp_time(Utc::now());
    let mut store = Map::new();
    store.insert("id".to_owned(), Value::from(id));
    store.insert("date_creation".to_owned(), Value::from(now));
    match apply_store(&state.registry, &mut store, &body, None) {
        Ok(()) => {}
        Err(error) => return error.response(),
    }
    state.registry.next_store_id += 1;
    tracing::info!(store = id, external_id = ?store.get("external_id"), "simulated store created");
    let text = Value::Object(store.clone()).to_string();
    state.registry.stores.insert(id, store);
    json_response(StatusCode::CREATED, text)
}

fn update_store(shared: &Shared, id: &str, body: &[u8]) -> HttpResponse {
    let Ok(id) = id.parse::<u64>() else {
        return mp_error(400, "Invalid store_id.", "INVALID_STORE_ID");
    };
    let body = match object_body(body, "update store") {
        Ok(body) => body,
        Err(error) => return error.response(),
    };
    let mut state = shared.lock();
    let Some(mut store) = state.registry.stores.get(&id).cloned() else {
        return mp_error(404, "Store not found", "not_found");
    };
    if let Err(error) = apply_store(&state.registry, &mut store, &body, Some(id)) {
        return error.response();
    }
    let text = Value::Object(store.clone()).to_string();
    state.registry.stores.insert(id, store);
    json_response(StatusCode::OK, text)
}

/// Checks `body` and writes it onto `store` (fields given replace; location fields merge).
fn apply_store(
    registry: &Registry,
    store: &mut Map<String, Value>,
    body: &Map<String, Value>,
    self_id: Option<u64>,
) -> Result<(), MpError> {
    unknown_field(body, STORE_FIELDS, "UNKNOWN_FIELD")?;
    let creating = self_id.is_none();
    match body.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => {
            store.insert("name".to_owned(), Value::from(name.clone()));
        }
        None if !creating => {}
        _ => return Err(MpError::new(400, "Name must be string.", "INVALID_NAME")),
    }
    match body.get("business_hours") {
        None => {}
        Some(hours @ Value::Object(_)) => {
            store.insert("business_hours".to_owned(), hours.clone());
        }
        Some(_) => {
            return Err(MpError::new(
                400,
                "BUSINESS_HOURS must be json_object.",
                "INVALID_BUSINESS_HOURS",
            ))
        }
    }
    match body.get("external_id") {
        None => {}
        Some(Value::String(external_id)) => {
            if external_id.chars().count() > MAX_STORE_EXTERNAL_ID {
                return Err(MpError::new(
                    400,
                    &format!(
                        "EXTERNAL_ID can contain up to {MAX_STORE_EXTERNAL_ID} characters: {external_id}"
                    ),
                    "EXTERNAL_ID_TOO_LONG",
                ));
            }
            if let Some(other) = registry.store_by_external_id(external_id) {
                if Some(other) != self_id {
                    return Err(MpError::new(
                        400,
                        &format!("External_id-already-used-: {external_id}"),
                        "External_id-already-used",
                    ));
                }
            }
            store.insert("external_id".to_owned(), Value::from(external_id.clone()));
        }
        Some(_) => {
            return Err(MpError::new(
                400,
                "EXTERNAL_ID must be string.",
                "INVALID_EXTERNAL_ID",
            ))
        }
    }
    let mut location = match store.get("location") {
        Some(Value::Object(location)) => location.clone(),
        _ => Map::new(),
    };
    match body.get("location") {
        None if !creating => {}
        Some(Value::Object(given)) => {
            for (key, value) in given {
                location.insert(key.clone(), value.clone());
            }
        }
        _ => {
            return Err(MpError::new(
                400,
                "LOCATION must be json_object.",
                "INVALID_LOCATION",
            ))
        }
    }
    let mut parts = Vec::new();
    for (field, code) in LOCATION_TEXT_FIELDS {
        match location.get(*field) {
            Some(Value::String(text)) if !text.trim().is_empty() => parts.push(text.clone()),
            _ => {
                return Err(MpError::new(
                    400,
                    &format!("{} must be string.", field.to_ascii_uppercase()),
                    code,
                ))
            }
        }
    }
    for (field, code, bound) in [
        ("latitude", "INVALID_LATITUDE", 90.0),
        ("longitude", "INVALID_LONGITUDE", 180.0),
    ] {
        match location.get(field).and_then(Value::as_f64) {
            Some(coordinate) if coordinate.abs() <= bound => {}
            _ => {
                return Err(MpError::new(
                    400,
                    &format!("{} must be number.", field.to_ascii_uppercase()),
                    code,
                ))
            }
        }
    }
    for (field, code) in [
        ("reference", "INVALID_REFERENCE"),
        ("zip_code", "INVALID_ZIP_CODE"),
    ] {
        if location.get(field).is_some_and(|v| !v.is_string()) {
            return Err(MpError::new(
                400,
                &format!("{} must be string.", field.to_ascii_uppercase()),
                code,
            ));
        }
    }
    // street_name street_number, city_name, state_name
    let address_line = format!("{} {}, {}, {}", parts[0], parts[1], parts[2], parts[3]);
    location.insert("address_line".to_owned(), Value::from(address_line));
    store.insert("location".to_owned(), Value::Object(location));
    Ok(())
}

// ----- POS.

const POS_FIELDS: &[&str] = &[
    "name",
    "fixed_amount",
    "category",
    "store_id",
    "external_store_id",
    "external_id",
    "url",
];

/// The fields of a POS that the checks look at.
#[derive(Default)]
struct PosFields {
    name: Option<String>,
    fixed_amount: bool,
    category: Option<u64>,
    store_id: Option<u64>,
    external_store_id: Option<String>,
    external_id: Option<String>,
    url: Option<String>,
}

impl PosFields {
    /// What a stored POS says (drifted values of the wrong type read as absent).
    fn of(pos: &Map<String, Value>) -> PosFields {
        let text = |key: &str| pos.get(key).and_then(Value::as_str).map(str::to_owned);
        PosFields {
            name: text("name"),
            fixed_amount: pos
                .get("fixed_amount")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            category: pos.get("category").and_then(Value::as_u64),
            store_id: pos.get("store_id").and_then(json_id),
            external_store_id: text("external_store_id"),
            external_id: text("external_id"),
            url: text("url"),
        }
    }
}

fn search_pos(shared: &Shared, query: &str) -> HttpResponse {
    let params = query_params(query);
    let (offset, limit) = match paging(&params) {
        Ok(paging) => paging,
        Err(error) => return error.response(),
    };
    if let Some(external_id) = params.get("external_id") {
        if let Err(error) = check_pos_external_id(external_id) {
            return error.response();
        }
    }
    let store_id = match params.get("store_id").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return mp_error(400, "STORE_ID must be numeric.", "INVALID_STORE_ID"),
    };
    let category = match params.get("category").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(category)) => Some(category),
        Some(Err(_)) => return mp_error(400, "CATEGORY must be numeric.", "INVALID_CATEGORY"),
    };
    let state = shared.lock();
    if let Some(external_store_id) = params.get("external_store_id") {
        if state
            .registry
            .store_by_external_id(external_store_id)
            .is_none()
        {
            return inexistent_store(external_store_id).response();
        }
    }
    let found = state
        .registry
        .pos
        .values()
        .filter(|pos| {
            let fields = PosFields::of(pos);
            params
                .get("external_id")
                .is_none_or(|wanted| fields.external_id.as_deref() == Some(wanted.as_str()))
                && params.get("external_store_id").is_none_or(|wanted| {
                    fields.external_store_id.as_deref() == Some(wanted.as_str())
                })
                && store_id.is_none_or(|wanted| fields.store_id == Some(wanted))
                && category.is_none_or(|wanted| fields.category == Some(wanted))
        })
        .map(|pos| Value::Object(pos.clone()))
        .collect();
    page(found, offset, limit)
}

fn get_pos(shared: &Shared, id: &str) -> HttpResponse {
    let Ok(id) = id.parse::<u64>() else {
        return invalid_pos_id();
    };
    let state = shared.lock();
    match state.registry.pos.get(&id) {
        Some(pos) => json_response(StatusCode::OK, Value::Object(pos.clone()).to_string()),
        None => pos_not_found(id),
    }
}

fn delete_pos(shared: &Shared, id: &str) -> HttpResponse {
    let Ok(id) = id.parse::<u64>() else {
        return invalid_pos_id();
    };
    match shared.lock().registry.pos.remove(&id) {
        Some(_) => HttpResponse::NoContent().finish(),
        None => pos_not_found(id),
    }
}

fn create_pos(shared: &Shared, body: &[u8]) -> HttpResponse {
    let body = match object_body(body, "create pos") {
        Ok(body) => body,
        Err(error) => return error.response(),
    };
    let mut state = shared.lock();
    let fields = match checked_pos(
        &state.registry,
        &shared.config,
        PosFields::default(),
        &body,
        None,
    ) {
        Ok(fields) => fields,
        Err(error) => return error.response(),
    };
    let id = state.registry.next_pos_id;
    state.registry.next_pos_id += 1;
    let now = mp_time(Utc::now());
    let uuid = format!("{:032x}", rand::thread_rng().gen::<u128>());
    let hash = format!(
        "{:032x}{:032x}",
        rand::thread_rng().gen::<u128>(),
        rand::thread_rng().gen::<u128>()
    );
    let mut pos = Map::new();
    pos.insert("id".to_owned(), Value::from(id));
    pos.insert(
        "qr".to_owned(),
        serde_json::json!({
            "image": format!("{QR_BASE}{id}/{hash}.png"),
            "template_document": format!("{QR_BASE}{id}/template_{hash}.pdf"),
            "template_image": format!("{QR_BASE}{id}/template_{hash}.png"),
        }),
    );
    pos.insert("status".to_owned(), Value::from("active"));
    pos.insert("date_created".to_owned(), Value::from(now));
    pos.insert("uuid".to_owned(), Value::from(uuid));
    pos.insert(
        "user_id".to_owned(),
        Value::from(shared.config.collector_id),
    );
    write_pos(&mut pos, &fields);
    tracing::info!(pos = id, external_id = ?fields.external_id, "simulated POS created");
    let text = Value::Object(pos.clone()).to_string();
    state.registry.pos.insert(id, pos);
    json_response(StatusCode::CREATED, text)
}

fn update_pos(shared: &Shared, id: &str, body: &[u8]) -> HttpResponse {
    let Ok(id) = id.parse::<u64>() else {
        return invalid_pos_id();
    };
    let body = match object_body(body, "modify pos") {
        Ok(body) => body,
        Err(error) => return error.response(),
    };
    let mut state = shared.lock();
    let Some(mut pos) = state.registry.pos.get(&id).cloned() else {
        return pos_not_found(id);
    };
    let fields = match checked_pos(
        &state.registry,
        &shared.config,
        PosFields::of(&pos),
        &body,
        Some(id),
    ) {
        Ok(fields) => fields,
        Err(error) => return error.response(),
    };
    write_pos(&mut pos, &fields);
    let text = Value::Object(pos.clone()).to_string();
    state.registry.pos.insert(id, pos);
    json_response(StatusCode::OK, text)
}

fn write_pos(pos: &mut Map<String, Value>, fields: &PosFields) {
    let text = |value: &Option<String>| value.clone().map_or(Value::Null, Value::from);
    pos.insert(
        "date_last_updated".to_owned(),
        Value::from(mp_time(Utc::now())),
    );
    pos.insert("name".to_owned(), text(&fields.name));
    pos.insert("fixed_amount".to_owned(), Value::from(fields.fixed_amount));
    pos.insert(
        "category".to_owned(),
        fields.category.map_or(Value::Null, Value::from),
    );
    pos.insert(
        "store_id".to_owned(),
        fields.store_id.map_or(Value::Null, Value::from),
    );
    pos.insert(
        "external_store_id".to_owned(),
        text(&fields.external_store_id),
    );
    pos.insert("external_id".to_owned(), text(&fields.external_id));
    match &fields.url {
        Some(url) => pos.insert("url".to_owned(), Value::from(url.clone())),
        None => pos.remove("url"),
    };
}

/// Applies `body` onto `fields` (the stored POS for a PUT, empty for a POST) and runs MP's checks in
/// this order: unknown fields, each field's type and shape, the name, external_id, store and
/// fixed_amount rules, the category, the url's host (403), then external_id uniqueness (409).
fn checked_pos(
    registry: &Registry,
    config: &SimulatorConfig,
    mut fields: PosFields,
    body: &Map<String, Value>,
    self_id: Option<u64>,
) -> Result<PosFields, MpError> {
    let creating = self_id.is_none();
    unknown_field(body, POS_FIELDS, "UNKNOWN_FIELD_EXCEPTION")?;
    if let Some(name) = body.get("name") {
        let Some(name) = name.as_str() else {
            return Err(MpError::new(400, "NAME must be string.", "INVALID_NAME"));
        };
        if name.chars().count() >= MAX_POS_NAME {
            return Err(MpError::new(
                400,
                &format!("The NAME must be less than {MAX_POS_NAME} characters."),
                "NAME_TOO_LONG",
            ));
        }
        fields.name = Some(name.to_owned());
    }
    if let Some(fixed) = body.get("fixed_amount") {
        let Some(fixed) = fixed.as_bool() else {
            return Err(MpError::new(
                400,
                "FIXED_AMOUNT must be boolean.",
                "INVALID_FIXED_AMOUNT",
            ));
        };
        fields.fixed_amount = fixed;
    }
    if let Some(category) = body.get("category") {
        let Some(category) = category.as_u64() else {
            return Err(MpError::new(
                400,
                "CATEGORY must be numeric.",
                "INVALID_CATEGORY",
            ));
        };
        fields.category = Some(category);
    }
    let given_store_id = match body.get("store_id") {
        None => None,
        Some(raw) => match json_id(raw) {
            Some(id) => Some(id),
            None => {
                let code = if creating {
                    "INVALID_STORE_ID"
                } else {
                    "POS_INVALID_STORE_ID"
                };
                return Err(MpError::new(400, "STORE_ID must be numeric.", code));
            }
        },
    };
    let given_external_store_id = match body.get("external_store_id") {
        None => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            return Err(MpError::new(
                400,
                "EXTERNAL_STORE_ID must be string.",
                "INVALID_EXTERNAL_STORE_ID",
            ))
        }
    };
    if let Some(external_id) = body.get("external_id") {
        let Some(external_id) = external_id.as_str() else {
            return Err(invalid_external_id("EXTERNAL_ID must be string."));
        };
        check_pos_external_id(external_id)?;
        fields.external_id = Some(external_id.to_owned());
    }
    match body.get("url") {
        None => {}
        Some(Value::Null) => fields.url = None,
        Some(Value::String(url)) => {
            if url.chars().count() >= MAX_POS_URL {
                return Err(MpError::new(
                    400,
                    &format!("The URL must be less than {MAX_POS_URL} characters."),
                    "URL_TOO_LONG",
                ));
            }
            url_host(url)?;
            fields.url = Some(url.clone());
        }
        Some(_) => return Err(invalid_url("The URL must be string")),
    }

    if creating && fields.name.as_deref().is_none_or(|n| n.trim().is_empty()) {
        return Err(MpError::new(400, "NAME must be string.", "INVALID_NAME"));
    }
    if fields.external_id.is_none() {
        return Err(invalid_external_id("EXTERNAL_ID is required."));
    }
    // The store: what the body names wins over what the POS had; both names must agree.
    let by_external = match &given_external_store_id {
        None => None,
        Some(external) => match registry.store_by_external_id(external) {
            Some(id) => Some(id),
            None => return Err(inexistent_store(external)),
        },
    };
    let store_id = match (given_store_id, by_external) {
        (Some(id), Some(found)) if id != found => {
            return Err(MpError::new(
                400,
                "The EXTERNAL_STORE_ID does not refer to the indicated STORE_ID.",
                "EXTERNAL_STORE_ID_NOT_MATCH",
            ))
        }
        (Some(id), _) | (None, Some(id)) => Some(id),
        (None, None) => None,
    };
    match store_id {
        Some(store_id) => {
            let Some(store) = registry.stores.get(&store_id) else {
                let code = if creating {
                    "INVALID_STORE_ID"
                } else {
                    "POS_INVALID_STORE_ID"
                };
                return Err(MpError::new(
                    400,
                    &format!("no store has id {store_id}"),
                    code,
                ));
            };
            fields.store_id = Some(store_id);
            fields.external_store_id = store
                .get("external_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        None if creating => {
            return Err(MpError::new(
                400,
                "EXTERNAL_STORE_ID (or STORE_ID) is required.",
                "INVALID_EXTERNAL_STORE_ID",
            ))
        }
        None => {}
    }
    if fields.url.is_some() && !fields.fixed_amount {
        return Err(MpError::new(
            400,
            "If the URL field is indicated, the FIXED_AMOUNT field must be true.",
            "FIXED_AMOUNT_FALSE",
        ));
    }
    if let Some(category) = fields.category {
        if body.contains_key("category") && !registry.category_known(category, config) {
            let code = if creating {
                "UNKNOWN_MCC"
            } else {
                "POS_UNKNOWN_MCC"
            };
            return Err(MpError::new(
                400,
                &format!(
                    "The CATEGORY must be valid for the user's site ({}): {category}",
                    site_id(&config.site_currency)
                ),
                code,
            ));
        }
    }
    if let (Some(url), Some(allowed)) = (
        body.get("url").and_then(Value::as_str),
        &registry.allowed_hosts,
    ) {
        let host = url_host(url)?;
        if !allowed.contains(&host) {
            return Err(MpError::new(
                403,
                &format!(
                    "the url's host {host} is not enabled for this account: ask your Mercado Pago technical advisor to enable it"
                ),
                "forbidden",
            ));
        }
    }
    if let Some(external_id) = &fields.external_id {
        if let Some(other) = registry.pos_by_external_id(external_id) {
            if Some(other) != self_id {
                return Err(MpError::new(
                    409,
                    &format!("A pos with external_id {external_id} already exists (id {other})."),
                    "pos_already_exists",
                ));
            }
        }
    }
    Ok(fields)
}

fn check_pos_external_id(external_id: &str) -> Result<(), MpError> {
    if external_id.is_empty() || !external_id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid_external_id(&format!(
            "The EXTERNAL_ID field must be alphanumeric, only letters and numbers. No spaces or hyphens, or special characters: {external_id}"
        )));
    }
    if external_id.chars().count() >= MAX_POS_EXTERNAL_ID {
        return Err(MpError::new(
            400,
            &format!("The EXTERNAL_ID must be less than {MAX_POS_EXTERNAL_ID} characters."),
            "EXTERNAL_ID_TOO_LONG",
        ));
    }
    Ok(())
}

/// The url's host, lower case, or MP's `INVALID_URL`.
fn url_host(url: &str) -> Result<String, MpError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| {
        invalid_url(&format!(
            "The URL must have the format of a valid url: {url}"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid_url(&format!(
            "The URL must be http or https: {url}"
        )));
    }
    parsed
        .host_str()
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| invalid_url(&format!("The URL has no host: {url}")))
}

fn invalid_url(message: &str) -> MpError {
    MpError::new(400, message, "INVALID_URL")
}

fn invalid_external_id(message: &str) -> MpError {
    MpError::new(400, message, "INVALID_EXTERNAL_ID")
}

fn inexistent_store(external_store_id: &str) -> MpError {
    MpError::new(
        400,
        &format!("The EXTERNAL_STORE_ID does not refer to any existing store: {external_store_id}"),
        "INEXISTENT_EXTERNAL_STORE_ID",
    )
}

fn invalid_pos_id() -> HttpResponse {
    mp_error(
        400,
        "The ID of the pos is invalid, it must be numeric.",
        "INVALID_POS_ID",
    )
}

fn pos_not_found(id: u64) -> HttpResponse {
    mp_error(404, &format!("Point of sale {id} not found"), "not_found")
}

#[cfg(test)]
mod tests {
    use super::super::tests::{call, send, start, Pos};
    use super::*;
    use reqwest::Method;

    const STORES: &str = "/users/178106235/stores";

    fn store_body(external_id: &str) -> String {
        serde_json::json!({
            "name": "Estación Centro",
            "external_id": external_id,
            "business_hours": {"monday": [{"open": "08:00", "close": "22:00"}]},
            "location": {
                "street_number": "3039",
                "street_name": "Caseros",
                "city_name": "Belgrano",
                "state_name": "Capital Federal",
                "latitude": -32.8897322,
                "longitude": -68.8443275,
                "reference": "Near the square"
            }
        })
        .to_string()
    }

    fn pos_body(external_id: &str, url: Option<&str>) -> serde_json::Value {
        let mut body = serde_json::json!({
            "name": "Pump 3",
            "fixed_amount": true,
            "category": 473000,
            "external_store_id": "st01",
            "external_id": external_id,
        });
        if let Some(url) = url {
            body["url"] = Value::from(url);
        }
        body
    }

    async fn with_store() -> (Simulator, Pos) {
        let (sim, pos) = start().await;
        let (status, _) = send(&sim, Method::POST, STORES, &store_body("st01")).await;
        assert_eq!(status, 201);
        (sim, pos)
    }

    async fn create_pos(sim: &Simulator, body: &Value) -> (u16, Value) {
        send(sim, Method::POST, "/pos", &body.to_string()).await
    }

    #[tokio::test]
    async fn a_store_is_searched_created_found_and_updated() {
        let (sim, _pos) = start().await;
        let search = format!("{STORES}/search?external_id=st01");
        let (status, empty) = send(&sim, Method::GET, &search, "").await;
        assert_eq!(status, 200);
        assert_eq!(
            empty,
            serde_json::json!({"paging": {"total": 0, "offset": 0, "limit": 50}, "results": []})
        );

        let (status, store) = send(&sim, Method::POST, STORES, &store_body("st01")).await;
        assert_eq!(status, 201, "{store}");
        assert_eq!(store["id"], FIRST_STORE_ID);
        assert_eq!(store["name"], "Estación Centro");
        assert_eq!(store["external_id"], "st01");
        assert!(store["date_creation"].as_str().unwrap().ends_with("-03:00"));
        let location = &store["location"];
        assert_eq!(
            location["address_line"],
            "Caseros 3039, Belgrano, Capital Federal"
        );
        assert_eq!(location["street_name"], "Caseros");
        assert_eq!(location["street_number"], "3039");
        assert_eq!(location["city_name"], "Belgrano");
        assert_eq!(location["state_name"], "Capital Federal");
        assert_eq!(location["reference"], "Near the square");
        assert_eq!(location["latitude"], -32.8897322);
        assert_eq!(location["longitude"], -68.8443275);

        let (status, found) = send(&sim, Method::GET, &search, "").await;
        assert_eq!(status, 200);
        assert_eq!(found["paging"]["total"], 1);
        assert_eq!(found["results"][0], store);
        let (_, all) = send(&sim, Method::GET, &format!("{STORES}/search"), "").await;
        assert_eq!(all["paging"]["total"], 1);
        let (status, by_id) =
            send(&sim, Method::GET, &format!("/stores/{FIRST_STORE_ID}"), "").await;
        assert_eq!((status, &by_id), (200, &store));

        let update = r#"{"name": "Estación Norte", "location": {"street_number": "3100"}}"#;
        let path = format!("{STORES}/{FIRST_STORE_ID}");
        let (status, updated) = send(&sim, Method::PUT, &path, update).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["name"], "Estación Norte");
        assert_eq!(updated["id"], FIRST_STORE_ID);
        assert_eq!(
            updated["location"]["address_line"],
            "Caseros 3100, Belgrano, Capital Federal"
        );
        assert_eq!(updated["location"]["city_name"], "Belgrano");
        assert_eq!(sim.stores(), std::slice::from_ref(&updated));
        assert_eq!(sim.store_by_external_id("st01").unwrap(), updated);

        let (status, missing) = send(&sim, Method::PUT, &format!("{STORES}/1"), update).await;
        assert_eq!((status, missing["status"].as_u64()), (404, Some(404)));
        assert_eq!(send(&sim, Method::GET, "/stores/1", "").await.0, 404);
    }

    #[tokio::test]
    async fn mp_refuses_stores_it_would_not_register() {
        let (sim, _pos) = start().await;
        assert_eq!(
            send(&sim, Method::POST, STORES, &store_body("st01"))
                .await
                .0,
            201
        );
        let valid: Value = serde_json::from_str(&store_body("st02")).unwrap();
        let with = |pointer: &str, value: Value| {
            let mut body = valid.clone();
            *body.pointer_mut(pointer).unwrap() = value;
            body.to_string()
        };
        let without_name = {
            let mut body = valid.clone();
            body.as_object_mut().unwrap().remove("name");
            body.to_string()
        };
        let cases = [
            (
                with("/external_id", Value::from("x".repeat(61))),
                400,
                "EXTERNAL_ID_TOO_LONG",
            ),
            (
                with("/external_id", Value::from("st01")),
                400,
                "External_id-already-used",
            ),
            (
                with("/location/latitude", Value::from("-32.8")),
                400,
                "INVALID_LATITUDE",
            ),
            (
                with("/location/longitude", Value::from(200)),
                400,
                "INVALID_LONGITUDE",
            ),
            (
                with("/location/street_number", Value::from(3039)),
                400,
                "INVALID_STREET_NUMBER",
            ),
            (
                with("/location/city_name", Value::Null),
                400,
                "INVALID_CITY_NAME",
            ),
            (
                with("/location", Value::from("Caseros 3039")),
                400,
                "INVALID_LOCATION",
            ),
            (
                with("/business_hours", Value::from("always")),
                400,
                "INVALID_BUSINESS_HOURS",
            ),
            (without_name, 400, "INVALID_NAME"),
            (
                valid.to_string().replacen('{', r#"{"country_id":"AR","#, 1),
                400,
                "UNKNOWN_FIELD",
            ),
            (String::new(), 400, "MISSING_BODY"),
        ];
        for (body, status, error) in cases {
            let (got, answer) = send(&sim, Method::POST, STORES, &body).await;
            assert_eq!(
                (got, answer["error"].as_str()),
                (status, Some(error)),
                "{body}"
            );
            assert_eq!(answer["status"], status);
            assert!(answer["cause"].is_array());
        }
        // Exactly 60 characters is allowed.
        let sixty = with("/external_id", Value::from("x".repeat(60)));
        assert_eq!(send(&sim, Method::POST, STORES, &sixty).await.0, 201);
        assert_eq!(sim.stores().len(), 2);

        let foreign = "/users/999/stores";
        assert_eq!(
            send(&sim, Method::POST, foreign, &store_body("st03"))
                .await
                .0,
            403
        );
        let (status, answer) = send(
            &sim,
            Method::GET,
            "/users/abc/stores/search?external_id=st01",
            "",
        )
        .await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("INVALID_USER_ID"))
        );
        let update = format!("{STORES}/{}", FIRST_STORE_ID + 1);
        let (status, answer) = send(&sim, Method::PUT, &update, r#"{"external_id":"st01"}"#).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("External_id-already-used"))
        );
        let (status, _) = send(
            &sim,
            Method::PUT,
            &format!("{STORES}/{FIRST_STORE_ID}"),
            r#"{"external_id":"st01"}"#,
        )
        .await;
        assert_eq!(status, 200, "a store keeps its own external_id");
    }

    #[tokio::test]
    async fn a_pos_is_registered_with_its_url_and_its_qr() {
        let (sim, pos) = with_store().await;
        let (status, empty) = send(&sim, Method::GET, "/pos?external_id=st01p03", "").await;
        assert_eq!(status, 200);
        assert_eq!(empty["paging"]["total"], 0);
        assert_eq!(empty["results"], serde_json::json!([]));

        let (status, created) = create_pos(&sim, &pos_body("st01p03", Some(&pos.url))).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["id"], FIRST_POS_ID);
        let qr = &created["qr"];
        for (key, ending) in [
            ("image", ".png"),
            ("template_document", ".pdf"),
            ("template_image", ".png"),
        ] {
            let link = qr[key].as_str().unwrap();
            assert!(
                link.starts_with(&format!("{QR_BASE}{FIRST_POS_ID}/")) && link.ends_with(ending),
                "{link}"
            );
        }
        assert_eq!(created["status"], "active");
        assert!(created["date_created"].is_string());
        assert!(created["date_last_updated"].is_string());
        assert_eq!(created["uuid"].as_str().unwrap().len(), 32);
        assert_eq!(created["user_id"], 178_106_235);
        assert_eq!(created["name"], "Pump 3");
        assert_eq!(created["fixed_amount"], true);
        assert_eq!(created["category"], 473000);
        assert_eq!(created["store_id"], FIRST_STORE_ID);
        assert_eq!(created["external_store_id"], "st01");
        assert_eq!(created["external_id"], "st01p03");
        assert_eq!(created["url"], pos.url.as_str());

        let (status, found) = send(&sim, Method::GET, "/pos?external_id=st01p03", "").await;
        assert_eq!(status, 200);
        assert_eq!(
            found["paging"],
            serde_json::json!({"total": 1, "offset": 0, "limit": 50})
        );
        assert_eq!(found["results"][0], created);
        let (status, by_id) = send(&sim, Method::GET, &format!("/pos/{FIRST_POS_ID}"), "").await;
        assert_eq!((status, &by_id), (200, &created));
        assert_eq!(sim.pos_by_external_id("st01p03").unwrap(), created);
        assert_eq!(sim.pos_list(), [created]);

        // Without a url (attended POS) the field is left out.
        let mut attended = pos_body("st01p04", None);
        attended["fixed_amount"] = Value::from(false);
        let (status, created) = create_pos(&sim, &attended).await;
        assert_eq!(status, 201, "{created}");
        assert!(created.get("url").is_none());
        let (_, in_store) = send(&sim, Method::GET, "/pos?external_store_id=st01", "").await;
        assert_eq!(in_store["paging"]["total"], 2);
        let (_, by_store) = send(
            &sim,
            Method::GET,
            &format!("/pos?store_id={FIRST_STORE_ID}&category=473000"),
            "",
        )
        .await;
        assert_eq!(by_store["paging"]["total"], 2);

        // The QR scanned reaches the registered url.
        pos.order("100");
        assert!(matches!(sim.scan_pos("st01p03").await, Ok(Scan::Order(_))));
        assert_eq!(
            sim.scan_pos("st01p04").await,
            Err(SimError::PosWithoutUrl("st01p04".to_owned()))
        );
        assert_eq!(
            sim.scan_pos("nope").await,
            Err(SimError::UnknownPos("nope".to_owned()))
        );
        let methods: Vec<String> = sim.api_calls().iter().map(|c| c.method.clone()).collect();
        assert_eq!(methods.iter().filter(|m| *m == "POST").count(), 3);
    }

    #[tokio::test]
    async fn mp_refuses_pos_it_would_not_register_with_its_own_codes() {
        let (sim, pos) = with_store().await;
        let url = pos.url.as_str();
        assert_eq!(
            create_pos(&sim, &pos_body("st01p01", Some(url))).await.0,
            201
        );
        let with = |key: &str, value: Value| {
            let mut body = pos_body("st01p02", Some(url));
            if value.is_null() {
                body.as_object_mut().unwrap().remove(key);
            } else {
                body[key] = value;
            }
            body
        };
        let long_url = format!("http://127.0.0.1/{}", "a".repeat(300 - 17));
        assert_eq!(long_url.len(), 300);
        let cases = [
            (
                with("fixed_amount", Value::from(false)),
                400,
                "FIXED_AMOUNT_FALSE",
            ),
            (with("fixed_amount", Value::Null), 400, "FIXED_AMOUNT_FALSE"),
            (
                with("fixed_amount", Value::from("true")),
                400,
                "INVALID_FIXED_AMOUNT",
            ),
            (
                with("external_id", Value::from("st01-p02")),
                400,
                "INVALID_EXTERNAL_ID",
            ),
            (
                with("external_id", Value::from("st01 p02")),
                400,
                "INVALID_EXTERNAL_ID",
            ),
            (
                with("external_id", Value::from("p".repeat(40))),
                400,
                "EXTERNAL_ID_TOO_LONG",
            ),
            (with("external_id", Value::Null), 400, "INVALID_EXTERNAL_ID"),
            (with("url", Value::from(long_url)), 400, "URL_TOO_LONG"),
            (with("url", Value::from("not a url")), 400, "INVALID_URL"),
            (
                with("url", Value::from("ftp://example.com/pos")),
                400,
                "INVALID_URL",
            ),
            (with("url", Value::from(42)), 400, "INVALID_URL"),
            (with("category", Value::from(1234)), 400, "UNKNOWN_MCC"),
            (
                with("category", Value::from("473000")),
                400,
                "INVALID_CATEGORY",
            ),
            (
                with("external_store_id", Value::from("st99")),
                400,
                "INEXISTENT_EXTERNAL_STORE_ID",
            ),
            (
                with("external_store_id", Value::from(1)),
                400,
                "INVALID_EXTERNAL_STORE_ID",
            ),
            (
                with("external_store_id", Value::Null),
                400,
                "INVALID_EXTERNAL_STORE_ID",
            ),
            (
                with("store_id", Value::from(1)),
                400,
                "EXTERNAL_STORE_ID_NOT_MATCH",
            ),
            (
                with("store_id", Value::from("abc")),
                400,
                "INVALID_STORE_ID",
            ),
            (
                with("name", Value::from("n".repeat(45))),
                400,
                "NAME_TOO_LONG",
            ),
            (with("name", Value::Null), 400, "INVALID_NAME"),
            (
                with("sponsor_id", Value::from(1)),
                400,
                "UNKNOWN_FIELD_EXCEPTION",
            ),
            (pos_body("st01p01", Some(url)), 409, "pos_already_exists"),
        ];
        for (body, status, error) in cases {
            let (got, answer) = create_pos(&sim, &body).await;
            assert_eq!(
                (got, answer["error"].as_str()),
                (status, Some(error)),
                "{body}"
            );
            assert_eq!(answer["status"], status);
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let (status, answer) = send(&sim, Method::POST, "/pos", "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("MISSING_BODY"))
        );
        assert_eq!(sim.pos_list().len(), 1, "no refused POS was created");

        // 299 characters pass; a store named by store_id alone works.
        let url_299 = format!("http://127.0.0.1/{}", "a".repeat(299 - 17));
        let (status, created) = create_pos(&sim, &with("url", Value::from(url_299))).await;
        assert_eq!(status, 201, "{created}");
        let mut by_store_id = pos_body("st01p05", None);
        by_store_id
            .as_object_mut()
            .unwrap()
            .remove("external_store_id");
        by_store_id["store_id"] = Value::from(FIRST_STORE_ID.to_string());
        let (status, created) = create_pos(&sim, &by_store_id).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["external_store_id"], "st01");
    }

    #[tokio::test]
    async fn a_url_whose_host_mp_has_not_enabled_is_forbidden() {
        let (sim, pos) = with_store().await;
        sim.set_allowed_url_hosts(Some(vec!["station.example.com".to_owned()]));
        let (status, answer) = create_pos(&sim, &pos_body("st01p03", Some(&pos.url))).await;
        assert_eq!(status, 403);
        assert_eq!(answer["error"], "forbidden");
        assert!(
            answer["message"].as_str().unwrap().contains("127.0.0.1"),
            "{answer}"
        );
        assert!(sim.pos_list().is_empty());
        let allowed = pos_body("st01p03", Some("https://Station.Example.com/mp/pos/p03"));
        assert_eq!(create_pos(&sim, &allowed).await.0, 201);
        let put = format!("/pos/{FIRST_POS_ID}");
        let moved = serde_json::json!({"url": pos.url}).to_string();
        assert_eq!(send(&sim, Method::PUT, &put, &moved).await.0, 403);
        sim.set_allowed_url_hosts(None);
        assert_eq!(send(&sim, Method::PUT, &put, &moved).await.0, 200);
    }

    #[tokio::test]
    async fn a_pos_is_updated_with_the_same_checks() {
        let (sim, pos) = with_store().await;
        let (_, created) =
            create_pos(&sim, &pos_body("st01p03", Some("http://old.example/pos"))).await;
        let path = format!("/pos/{FIRST_POS_ID}");
        let update = serde_json::json!({"url": pos.url, "name": "Pump three", "category": 5499});
        let (status, updated) = send(&sim, Method::PUT, &path, &update.to_string()).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["url"], pos.url.as_str());
        assert_eq!(updated["name"], "Pump three");
        assert_eq!(updated["category"], 5499);
        assert_eq!(updated["id"], created["id"]);
        assert_eq!(updated["qr"], created["qr"]);
        assert_eq!(updated["uuid"], created["uuid"]);
        assert_eq!(updated["date_created"], created["date_created"]);
        assert_eq!(updated["external_id"], "st01p03");
        assert_eq!(sim.pos_by_external_id("st01p03").unwrap(), updated);

        let cases = [
            (r#"{"fixed_amount": false}"#, 400, "FIXED_AMOUNT_FALSE"),
            (r#"{"category": 1}"#, 400, "POS_UNKNOWN_MCC"),
            (r#"{"store_id": "x"}"#, 400, "POS_INVALID_STORE_ID"),
            (
                r#"{"external_store_id": "st99"}"#,
                400,
                "INEXISTENT_EXTERNAL_STORE_ID",
            ),
            (r#"{"url": "http://127.0.0.1/x"}"#, 200, ""),
            (r#"{"qr": {}}"#, 400, "UNKNOWN_FIELD_EXCEPTION"),
            ("", 400, "MISSING_BODY"),
        ];
        for (body, status, error) in cases {
            let (got, answer) = send(&sim, Method::PUT, &path, body).await;
            assert_eq!(got, status, "{body}: {answer}");
            if status != 200 {
                assert_eq!(answer["error"], error, "{body}");
            }
        }
        // Removing the url allows fixed_amount false again.
        let (status, open) = send(
            &sim,
            Method::PUT,
            &path,
            r#"{"url": null, "fixed_amount": false}"#,
        )
        .await;
        assert_eq!(status, 200, "{open}");
        assert!(open.get("url").is_none());

        assert_eq!(create_pos(&sim, &pos_body("st01p04", None)).await.0, 201);
        let (status, answer) =
            send(&sim, Method::PUT, &path, r#"{"external_id": "st01p04"}"#).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (409, Some("pos_already_exists"))
        );
        let (status, answer) = send(&sim, Method::PUT, "/pos/1", r#"{"name": "x"}"#).await;
        assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));
        let (status, answer) = send(&sim, Method::PUT, "/pos/abc", r#"{"name": "x"}"#).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("INVALID_POS_ID"))
        );
        assert_eq!(send(&sim, Method::GET, "/pos/1", "").await.0, 404);
        assert_eq!(send(&sim, Method::GET, "/pos/abc", "").await.0, 400);
    }

    #[tokio::test]
    async fn the_pos_search_checks_its_filters() {
        let (sim, _pos) = with_store().await;
        for (query, error) in [
            ("external_id=st01-p03", "INVALID_EXTERNAL_ID"),
            ("external_store_id=st99", "INEXISTENT_EXTERNAL_STORE_ID"),
            ("store_id=x", "INVALID_STORE_ID"),
            ("category=fuel", "INVALID_CATEGORY"),
            ("limit=x", "INVALID_LIMIT"),
        ] {
            let (status, answer) = send(&sim, Method::GET, &format!("/pos?{query}"), "").await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(error)),
                "{query}"
            );
        }
        for n in 1..=3 {
            let body = pos_body(&format!("p{n}"), None);
            assert_eq!(create_pos(&sim, &body).await.0, 201);
        }
        let (_, paged) = send(&sim, Method::GET, "/pos?offset=1&limit=1", "").await;
        assert_eq!(
            paged["paging"],
            serde_json::json!({"total": 3, "offset": 1, "limit": 1})
        );
        assert_eq!(paged["results"][0]["external_id"], "p2");
        assert_eq!(
            send(&sim, Method::DELETE, &format!("/pos/{FIRST_POS_ID}"), "")
                .await
                .0,
            204
        );
        assert_eq!(
            send(&sim, Method::DELETE, &format!("/pos/{FIRST_POS_ID}"), "")
                .await
                .0,
            404
        );
        assert_eq!(sim.pos_list().len(), 2);
    }

    #[tokio::test]
    async fn drift_at_mp_shows_in_the_api_and_in_scans() {
        let (sim, pos) = with_store().await;
        let registered = pos_body("st01p03", Some(&pos.url));
        assert_eq!(create_pos(&sim, &registered).await.0, 201);
        sim.set_pos_field(
            "st01p03",
            "url",
            Value::from("http://127.0.0.1:1/elsewhere"),
        )
        .unwrap();
        sim.set_pos_field("st01p03", "name", Value::from("Renamed at MP"))
            .unwrap();
        let (_, found) = send(&sim, Method::GET, "/pos?external_id=st01p03", "").await;
        assert_eq!(found["results"][0]["url"], "http://127.0.0.1:1/elsewhere");
        assert_eq!(found["results"][0]["name"], "Renamed at MP");
        assert!(matches!(
            sim.scan_pos("st01p03").await,
            Err(SimError::Http(_))
        ));
        sim.set_pos_field("st01p03", "url", Value::Null).unwrap();
        assert!(sim
            .pos_by_external_id("st01p03")
            .unwrap()
            .get("url")
            .is_none());
        assert_eq!(
            sim.set_pos_field("nope", "url", Value::Null),
            Err(SimError::UnknownPos("nope".to_owned()))
        );
        sim.set_store_field("st01", "name", Value::from("Renamed store"))
            .unwrap();
        assert_eq!(sim.stores()[0]["name"], "Renamed store");
        assert_eq!(
            sim.set_store_field("st99", "name", Value::Null),
            Err(SimError::UnknownStore("st99".to_owned()))
        );
        // Putting it back is a PUT like any other.
        let put = serde_json::json!({"url": pos.url, "name": "Pump 3"}).to_string();
        assert_eq!(
            send(&sim, Method::PUT, &format!("/pos/{FIRST_POS_ID}"), &put)
                .await
                .0,
            200
        );
        pos.order("100");
        assert!(matches!(sim.scan_pos("st01p03").await, Ok(Scan::Order(_))));
    }

    #[tokio::test]
    async fn categories_are_the_sites_unless_a_test_says_otherwise() {
        let sim = Simulator::start(SimulatorConfig {
            site_currency: "BRL".to_owned(),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        assert_eq!(
            send(&sim, Method::POST, STORES, &store_body("st01"))
                .await
                .0,
            201
        );
        let mut body = pos_body("p1", None);
        body["fixed_amount"] = Value::from(false);
        let (status, answer) = create_pos(&sim, &body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("UNKNOWN_MCC")),
            "473000 is Argentina's"
        );
        body["category"] = Value::from(gas_station_mcc("MLB").unwrap());
        assert_eq!(create_pos(&sim, &body).await.0, 201);
        body["external_id"] = Value::from("p2");
        body["category"] = Value::from(5499);
        assert_eq!(create_pos(&sim, &body).await.0, 201);

        sim.set_known_categories(Some(vec![1]));
        body["external_id"] = Value::from("p3");
        assert_eq!(create_pos(&sim, &body).await.0, 400);
        body["category"] = Value::from(1);
        assert_eq!(create_pos(&sim, &body).await.0, 201);
        sim.set_known_categories(None);
        body["external_id"] = Value::from("p4");
        body["category"] = Value::from(987_654);
        assert_eq!(create_pos(&sim, &body).await.0, 201);
        body.as_object_mut().unwrap().remove("category");
        body["external_id"] = Value::from("p5");
        let (status, created) = create_pos(&sim, &body).await;
        assert_eq!(status, 201);
        assert!(created["category"].is_null());
        assert_eq!(gas_station_mcc("MCO"), Some(4731));
        assert_eq!(gas_station_mcc("XXX"), None);
    }

    #[tokio::test]
    async fn registration_wants_the_token_and_the_collector() {
        let (sim, _pos) = start().await;
        let (status, _, _) = call(&sim, Method::POST, "/pos", None, &[], "{}").await;
        assert_eq!(status, 401);
        let (status, answer) = send(&sim, Method::GET, "/users/1/stores/search", "").await;
        assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    }
}
