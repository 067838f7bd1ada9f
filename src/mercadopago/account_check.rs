//! Whether Mercado Pago takes qrgate's access token. A wrong, expired or
//! revoked token fails nothing visible by itself: polls are still answered
//! and customers still pay, but no payment can be verified, so no sale is
//! ever told `paid`. So the token is tried at start and then every
//! `[mercadopago] token_check_secs` with the cheapest call that needs it
//! (`GET /users/me`, the token's own account). A refusal (401, 403) is an
//! ERROR naming the variable to fix, shown on `/readyz` and the console.
//! An outage (timeout, 5xx, 429) says nothing about the token: it is
//! `unreachable`, never `token_refused`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::client::{MpClient, MpError, RetryPolicy};
use crate::config::ACCESS_TOKEN_ENV;
use crate::metrics::Metrics;

/// What the last check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Not checked yet.
    Unchecked,
    Accepted,
    /// 401 or 403: the token is wrong, expired or revoked.
    Refused,
    /// No answer, or one that says Mercado Pago is in trouble.
    Unreachable,
    /// An answer that says neither (another 4xx, an unreadable body).
    Unclear,
    /// No token is configured.
    NoToken,
}

const STATES: [TokenState; 6] = [
    TokenState::Unchecked,
    TokenState::Accepted,
    TokenState::Refused,
    TokenState::Unreachable,
    TokenState::Unclear,
    TokenState::NoToken,
];

impl TokenState {
    /// The stable word `/readyz` and the console show.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Unchecked => "unchecked",
            TokenState::Accepted => "ok",
            TokenState::Refused => "token_refused",
            TokenState::Unreachable => "unreachable",
            TokenState::Unclear => "check_failed",
            TokenState::NoToken => "no_token",
        }
    }

    /// What an answer to the check says about the token.
    pub fn of(result: &Result<serde_json::Value, MpError>) -> TokenState {
        match result {
            Ok(_) => TokenState::Accepted,
            Err(MpError::NoToken) => TokenState::NoToken,
            Err(MpError::Status {
                status: 401 | 403, ..
            }) => TokenState::Refused,
            Err(e) if e.is_transient() => TokenState::Unreachable,
            Err(_) => TokenState::Unclear,
        }
    }
}

/// The last check's verdict, shared with the health checks and the console.
#[derive(Debug, Default)]
pub struct TokenStatus(AtomicU8);

impl TokenStatus {
    pub fn get(&self) -> TokenState {
        STATES
            .get(usize::from(self.0.load(Ordering::Acquire)))
            .copied()
            .unwrap_or(TokenState::Unchecked)
    }

    fn set(&self, state: TokenState) -> TokenState {
        let index = STATES.iter().position(|s| *s == state).unwrap_or(0);
        let before = self.0.swap(index as u8, Ordering::AcqRel);
        STATES
            .get(usize::from(before))
            .copied()
            .unwrap_or(TokenState::Unchecked)
    }
}

/// One check: asks, records, and logs what changed (a refusal every time).
pub async fn check(client: &MpClient, status: &TokenStatus, metrics: &Metrics) -> TokenState {
    let result = client
        .send::<serde_json::Value>(reqwest::Method::GET, "/users/me", &[], None)
        .await;
    let now = TokenState::of(&result);
    let before = status.set(now);
    metrics
        .mp_token_refused
        .set(i64::from(now == TokenState::Refused));
    match (now, &result) {
        (TokenState::Refused, Err(e)) => tracing::error!(error = %e, variable = ACCESS_TOKEN_ENV,
            "Mercado Pago refused the access token: no payment can be verified and no sale \
             closes until {ACCESS_TOKEN_ENV} holds a valid production token of this account"),
        (TokenState::Unreachable | TokenState::Unclear, Err(e)) if before != now => {
            tracing::warn!(error = %e, "cannot check the access token with Mercado Pago")
        }
        (TokenState::Accepted, _) if before != now => {
            tracing::info!("Mercado Pago accepts the access token")
        }
        _ => {}
    }
    now
}

/// Checks at once, then every `every` (`None`: at start only), until
/// `shutdown`. One attempt per check: the next check is the retry.
pub async fn run(
    client: MpClient,
    status: Arc<TokenStatus>,
    metrics: Arc<Metrics>,
    every: Option<Duration>,
    shutdown: CancellationToken,
) {
    let client = client.with_retry(RetryPolicy {
        attempts: 1,
        ..RetryPolicy::default()
    });
    if check(&client, &status, &metrics).await == TokenState::NoToken {
        return;
    }
    let Some(every) = every else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        check(&client, &status, &metrics).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Result<serde_json::Value, MpError> {
        Err(MpError::Status {
            status: code,
            code: String::new(),
            message: String::new(),
        })
    }

    #[test]
    fn only_401_and_403_are_a_refused_token() {
        assert_eq!(TokenState::of(&status(401)), TokenState::Refused);
        assert_eq!(TokenState::of(&status(403)), TokenState::Refused);
        for outage in [
            status(500),
            status(503),
            Err(MpError::Timeout),
            Err(MpError::Transport("connection refused".into())),
            Err(MpError::RateLimited { retry_after: None }),
        ] {
            assert_eq!(TokenState::of(&outage), TokenState::Unreachable);
        }
        assert_eq!(TokenState::of(&status(404)), TokenState::Unclear);
        assert_eq!(TokenState::of(&Err(MpError::NoToken)), TokenState::NoToken);
        assert_eq!(
            TokenState::of(&Ok(serde_json::json!({"id": 1}))),
            TokenState::Accepted
        );
    }

    #[test]
    fn the_status_keeps_every_state() {
        let s = TokenStatus::default();
        assert_eq!(s.get(), TokenState::Unchecked);
        for state in STATES {
            s.set(state);
            assert_eq!(s.get(), state);
        }
    }
}
