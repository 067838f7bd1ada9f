//! The controller's remote mode: it connects out to the remote server's
//! WebSocket (`/ptsWebSocket`), answers the server's requests on it, and
//! uploads each finished transaction, sending the same record again until
//! the server confirms it.

use std::sync::Weak;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Frame;

use super::{lock, Inner, Simulator};
use crate::auth;
use crate::jsonpts::{Message, Upload};

/// How long an upload waits for its confirmation before it is sent again.
const RESEND: Duration = Duration::from_millis(300);
const RECONNECT: Duration = Duration::from_millis(200);

pub(super) async fn run(sim: Weak<Inner>, url: String) {
    let mut packet_id: u32 = 1;
    loop {
        let Some(inner) = sim.upgrade() else { return };
        let sim_now = Simulator { inner };
        let Ok(mut request) = url.as_str().into_client_request() else {
            tracing::error!(%url, "not a WebSocket URL");
            return;
        };
        // The user the controller logs in with (`UserId`): the first one.
        let Some((login, perms)) = sim_now.inner.config.users.first().cloned() else {
            tracing::error!("the simulator has no user to connect with");
            return;
        };
        let headers = request.headers_mut();
        for (name, value) in [
            ("X-Pts-Id", sim_now.id()),
            (
                "X-Pts-Firmware-Version-DateTime",
                "2025-11-04T00:00:00".to_owned(),
            ),
            ("X-Pts-Configuration-Identifier", "5171ca7e".to_owned()),
            ("Authorization", auth::basic(&login)),
        ] {
            if let Ok(v) = value.parse() {
                headers.insert(name, v);
            }
        }
        drop(sim_now);
        let Ok((ws, _)) = tokio_tungstenite::connect_async(request).await else {
            tokio::time::sleep(RECONNECT).await;
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        let mut resend = tokio::time::interval(RESEND);
        loop {
            tokio::select! {
                frame = rx.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let Frame::Text(text) = frame else { continue };
                    let Some(inner) = sim.upgrade() else { return };
                    let sim_now = Simulator { inner };
                    let Ok(message) = Message::parse(&text) else { continue };
                    let confirms = message
                        .packets
                        .iter()
                        .any(|p| Upload::is_upload(&p.kind) && p.id.0 == packet_id && p.is_ok());
                    if confirms {
                        sim_now.forecourt().uploads.pop_front();
                        packet_id = if packet_id >= 65535 { 1 } else { packet_id + 1 };
                        continue;
                    }
                    if message.packets.iter().any(|p| Upload::is_upload(&p.kind)) {
                        // An upload's error answer: sent again at the next tick.
                        continue;
                    }
                    let answer = sim_now.forecourt().answer(&login.user, perms, &text);
                    let answer = answer.unwrap_or_else(|status| {
                        format!(r#"{{"Protocol":"jsonPTS","Error":true,"Code":6,"Message":"HTTP {status}"}}"#)
                    });
                    if tx.send(Frame::Text(answer)).await.is_err() {
                        break;
                    }
                }
                _ = resend.tick() => {
                    let Some(inner) = sim.upgrade() else { return };
                    let next = lock(&inner.forecourt).next_upload(packet_id);
                    if let Some(text) = next {
                        if tx.send(Frame::Text(text)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}
