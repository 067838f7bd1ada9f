//! A book on its own over a store, as the app builds it (V1 polls,
//! collector 1, no attended desk, the system clock), with what it tells
//! devices: for tests of the book itself, without MQTT or HTTP.

use std::sync::Arc;

use qrgate::book::{Book, BookSettings, Tell};
use qrgate::mercadopago::poll_answer::MpAccount;
use qrgate::orders::{PollProtocol, PosConfig};
use qrgate::store::Store;
use tokio::sync::mpsc::UnboundedReceiver;

pub async fn book_on(
    store: Arc<dyn Store>,
    pos: Vec<PosConfig>,
) -> (Book, UnboundedReceiver<Tell>) {
    let (publish_tx, told) = tokio::sync::mpsc::unbounded_channel();
    // Nothing here is polled by Mercado Pago: what polls serve is dropped.
    let (served_tx, _) = tokio::sync::mpsc::unbounded_channel();
    let book = Book::load(
        pos,
        store,
        MpAccount {
            poll_protocol: PollProtocol::V1,
            collector_id: 1,
            sponsor_id: None,
            notification_url: "http://127.0.0.1:9/mp/notifications".into(),
        },
        BookSettings {
            collector_id: 1,
            auto_refund: false,
            poll_protocol: PollProtocol::V1,
            attended: None,
            clock: qrgate::clock::Clock::system(),
        },
        publish_tx,
        served_tx,
    )
    .await
    .unwrap();
    (book, told)
}
