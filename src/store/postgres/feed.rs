//! What other instances store, heard as they commit. Every change to a
//! POS's sales notifies [`CHANNEL`] with `"<pos> <version>"` in its own
//! transaction, which PostgreSQL delivers at commit to every session
//! listening; every notification written to the inbox notifies
//! [`INBOX_CHANNEL`] with the entry, for the leader. Each instance keeps one
//! such session; while it has none it hears nothing, so every
//! (re)connection starts with [`Heard::Gap`], and the book catches up on
//! the versions the store holds (the leader reads the inbox again).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::pg;
use crate::store::{Heard, InboxEntry, StoreError};

/// The channel changes are notified on.
pub const CHANNEL: &str = "qrgate_pos";

/// The channel inbox entries are notified on.
pub const INBOX_CHANNEL: &str = "qrgate_inbox";

/// An inbox entry as notified: `"<topic> <id> <generation> <received_at>
/// <attempts> <next_at> <instance>"`, the instance that wrote it last (its
/// name may hold spaces: it is the rest).
pub fn inbox_payload(instance: &str, e: &InboxEntry) -> String {
    format!(
        "{} {} {} {} {} {} {instance}",
        e.topic, e.id, e.generation, e.received_at, e.attempts, e.next_at
    )
}

fn parse_inbox(payload: &str) -> Option<(String, InboxEntry)> {
    let mut p = payload.splitn(7, ' ');
    let entry = InboxEntry {
        topic: p.next()?.to_owned(),
        id: p.next()?.to_owned(),
        generation: p.next()?.parse().ok()?,
        received_at: p.next()?.parse().ok()?,
        attempts: p.next()?.parse().ok()?,
        next_at: p.next()?.parse().ok()?,
    };
    Some((p.next().unwrap_or_default().to_owned(), entry))
}

/// How often the listening session is asked whether it is alive: a
/// PostgreSQL that vanished without closing it would otherwise leave it
/// silent, and the instance deaf, for as long as TCP takes to notice.
const PROBE_EVERY: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens until `shutdown`, reconnecting with a backoff; what is heard
/// comes on the receiver.
pub fn spawn(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    me: String,
    shutdown: CancellationToken,
) -> mpsc::UnboundedReceiver<Heard> {
    let (heard, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let ended = tokio::select! {
                r = listen(&config, &tls, &me, &heard) => r,
                _ = shutdown.cancelled() => return,
            };
            match ended {
                // Nobody reads what is heard any more.
                Ok(()) => return,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures.is_power_of_two() {
                        tracing::warn!(error = %e, attempts = failures,
                            "not hearing other instances' changes: listening again; polls of a POS read the store when a change is heard");
                    }
                    let wait = Duration::from_millis(100)
                        .saturating_mul(1 << failures.min(6))
                        .min(Duration::from_secs(5));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    });
    rx
}

/// One listening session: `Ok` once nobody reads, an error when the
/// session failed.
async fn listen(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    me: &str,
    heard: &mpsc::UnboundedSender<Heard>,
) -> Result<(), StoreError> {
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(pg)?;
    let (messages, mut inbox) = mpsc::unbounded_channel();
    // The connection delivers notifications only while it is polled.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let inbox = n.channel() == INBOX_CHANNEL;
                    if messages.send(Ok((inbox, n.payload().to_owned()))).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = messages.send(Err(e));
                    return;
                }
                None => return,
            }
        }
    });
    let _driver = AbortOnDrop(driver);
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {INBOX_CHANNEL}"))
        .await
        .map_err(pg)?;
    tracing::info!("listening to other instances' changes");
    // What was stored before LISTEN took effect was not heard.
    if heard.send(Heard::Gap).is_err() {
        return Ok(());
    }
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.tick().await;
    loop {
        tokio::select! {
            m = inbox.recv() => match m {
                Some(Ok((false, payload))) => match parse(&payload) {
                    Some(change) => {
                        if heard.send(change).is_err() {
                            return Ok(());
                        }
                    }
                    None => tracing::warn!(payload = %payload.escape_debug(),
                        "a notification on {CHANNEL} that is not a change of a POS; ignored"),
                },
                Some(Ok((true, payload))) => match parse_inbox(&payload) {
                    // Its own entries the instance has already.
                    Some((by, _)) if by == me => {}
                    Some((_, entry)) => {
                        if heard.send(Heard::Inbox(entry)).is_err() {
                            return Ok(());
                        }
                    }
                    None => tracing::warn!(payload = %payload.escape_debug(),
                        "a notification on {INBOX_CHANNEL} that is not an inbox entry; ignored"),
                },
                Some(Err(e)) => return Err(pg(e)),
                None => return Err(StoreError::Unavailable("the listening session ended".into())),
            },
            _ = probe.tick() => {
                match tokio::time::timeout(PROBE_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(pg(e)),
                    Err(_) => return Err(StoreError::Unavailable("the listening session stopped answering".into())),
                }
            }
        }
    }
}

/// `"<pos> <version>"`.
fn parse(payload: &str) -> Option<Heard> {
    let (pos, version) = payload.rsplit_once(' ')?;
    Some(Heard::Change {
        pos: pos.to_owned(),
        version: version.parse().ok()?,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reads_as_its_pos_and_version_and_anything_else_as_nothing() {
        assert_eq!(
            parse("pump-1 42"),
            Some(Heard::Change {
                pos: "pump-1".into(),
                version: 42
            })
        );
        assert_eq!(parse("pump-1"), None);
        assert_eq!(parse("pump-1 x"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn an_inbox_entry_reads_back_as_written_with_its_writer() {
        let e = InboxEntry {
            topic: "merchant_order".into(),
            id: "123".into(),
            received_at: 1_700_000_000_000,
            generation: 3,
            attempts: 0,
            next_at: 1_700_000_000_500,
        };
        assert_eq!(
            parse_inbox(&inbox_payload("qrgate a", &e)),
            Some(("qrgate a".to_owned(), e))
        );
        assert_eq!(parse_inbox("merchant_order 123 x"), None);
    }
}
