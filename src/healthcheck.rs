//! `qrgate health`: asks a running qrgate, over its own HTTP listener,
//! whether it can take sales (`/readyz`), for a container's `HEALTHCHECK`,
//! which has no shell and no curl. The service watchdog (`service`) asks the
//! same listener whether it still answers (`/healthz`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// How long `qrgate health` waits for the answer: a ready qrgate answers
/// in milliseconds; an orchestrator's own timeout is usually longer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where to reach a listener bound to `listen` from this host: a wildcard
/// address (`0.0.0.0`, `::`) is reached on loopback.
pub fn local_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// A plain-HTTP client for qrgate's own listener: no proxy from the
/// environment (an `HTTP_PROXY` must not take a loopback request elsewhere).
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Asks `GET {path}` of the listener at `addr`: `Ok` on 200, otherwise why
/// not, in one line (the reasons `/readyz` gives, or the connection error).
pub async fn ask(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let answer = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: no answer: {}", cause(&e)))?;
    let status = answer.status();
    if status == reqwest::StatusCode::OK {
        return Ok(());
    }
    let body = answer.text().await.unwrap_or_default();
    let reasons = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["reasons"].as_array().map(|r| {
                r.iter()
                    .filter_map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .filter(|r| !r.is_empty());
    Err(match reasons {
        Some(r) => format!("{url} answered {status}: {r}"),
        None => format!("{url} answered {status}"),
    })
}

/// reqwest's own message is "error sending request"; the cause under it
/// says what an operator can act on (connection refused, timed out).
fn cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// `qrgate health`: reads the configuration as `serve` does and asks the
/// running qrgate's `/readyz`. Exit status 0 when ready, 1 otherwise, with
/// one line saying why.
pub async fn run(path: Option<&Path>) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qrgate health: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = local_addr(config.http.listen);
    let answer = match client(TIMEOUT) {
        Ok(client) => ask(&client, addr, "/readyz").await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(()) => {
            println!("ready: http://{addr}/readyz answered 200");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback_and_any_other_address_as_it_is() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(local_addr(at("0.0.0.0:8080")), at("127.0.0.1:8080"));
        assert_eq!(local_addr(at("[::]:8080")), at("[::1]:8080"));
        assert_eq!(local_addr(at("10.1.2.3:8080")), at("10.1.2.3:8080"));
        assert_eq!(local_addr(at("[fd00::5]:81")), at("[fd00::5]:81"));
    }
}
