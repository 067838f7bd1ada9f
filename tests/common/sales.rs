//! Sales as the store tests write them, built field by field: the store
//! keeps whatever the rules decided, so its tests need no rules to run.

#![allow(dead_code)] // each test binary uses its own part of it

use qrgate::orders::ledger::Ledger;
use qrgate::orders::{ExternalReference, PosId, Sale, SaleId, SaleState};
use rust_decimal::Decimal;

/// A 10 ARS sale of `pos`, accepted and last changed at `at`.
pub fn sale(pos: &str, reference: &str, sale_id: &str, state: SaleState, at: i64) -> Sale {
    Sale {
        external_reference: ExternalReference::parse(reference).unwrap(),
        pos: PosId::parse(pos).unwrap(),
        sale_id: SaleId::parse(sale_id).unwrap(),
        currency: qrgate::money::Currency::Ars,
        state,
        lines: vec![],
        amount: Some(Decimal::from(10)),
        accepted_at: at,
        expires_at: None,
        served_at: None,
        settled: None,
        delivered_at: None,
        placed_at: None,
        mp_order: None,
        rejection: None,
        ledger: Ledger::default(),
        updated_at: at,
    }
}

/// Records a change decided on the POS's stored version, as a book that
/// just read it does: the new version.
pub async fn put(
    store: &(impl qrgate::store::Store + ?Sized),
    s: &Sale,
    event: &qrgate::orders::SaleEvent,
) -> Result<u64, qrgate::store::StoreError> {
    let seen = store.pos_head(s.pos.as_str()).await?.version;
    store.record(s, event, seen).await
}
