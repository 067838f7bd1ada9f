//! The console's edge: which names and which pages may talk to the admin
//! listener at all, checked before any handler, every path included
//! (docs/decisions.md, "The console's edge").
//!
//! - **`Host`** must be one of the console's own names: a loopback name or
//!   address, the listen address (on a wildcard listen, the address the
//!   connection came in on), or one of `[admin] hosts`. A DNS-rebinding page
//!   reaches the listener under the attacker's name, so this is what keeps
//!   it out; the port is not compared, because an SSH tunnel
//!   (`ssh -L 8000:127.0.0.1:9090`) changes it and a rebinding attacker
//!   controls the name, not the port. Refused with 421 (the request was
//!   meant for another server).
//! - **`Origin`**, when a request carries one, must be the console's own
//!   origin: the request's `Host`, port included (another local web page on
//!   `localhost:3000` is another origin, though the same site for cookies).
//!   The scheme is not compared: TLS may end at a proxy, and one port
//!   serves one protocol. Refused with 403. Whether a request may come
//!   without one is the caller's to decide (`auth`).

use actix_web::ResponseError;
use std::net::{IpAddr, SocketAddr};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HOST, ORIGIN};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest};

use crate::http::ApiError;

/// The local address of a connection, recorded when it is accepted
/// (`HttpServer::on_connect`).
#[derive(Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

pub struct Edge {
    /// `[admin] hosts`, lowercase, IPv6 unbracketed.
    names: Vec<String>,
    /// The listen address's IP, unless it is a wildcard.
    listen: Option<IpAddr>,
}

/// A request's authority: its host name (lowercase, IPv6 unbracketed) and
/// port, if it names one.
#[derive(Debug, PartialEq, Eq)]
pub struct Authority {
    pub name: String,
    pub port: Option<u16>,
}

impl Authority {
    pub fn parse(text: &str) -> Option<Authority> {
        let (name, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (name, after) = rest.split_once(']')?;
                name.parse::<std::net::Ipv6Addr>().ok()?;
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':')?.parse().ok()?),
                };
                (name, port)
            }
            None => match text.rsplit_once(':') {
                Some((name, p)) => (name, Some(p.parse().ok()?)),
                None => (text, None),
            },
        };
        let fine = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':');
        (!name.is_empty() && name.len() <= 253 && name.bytes().all(fine)).then(|| Authority {
            name: name.to_ascii_lowercase(),
            port,
        })
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `origin` (`scheme://host[:port]`, as browsers send it) is the
/// origin `host` (the request's authority) is served at.
pub fn same_origin(origin: &str, host: &Authority) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let default = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return false;
    };
    let Some(o) = Authority::parse(rest) else {
        return false;
    };
    // A `Host` without a port was sent for the scheme's default port; the
    // scheme itself is the origin's (a TLS proxy forwards plain HTTP).
    o.name == host.name && o.port.unwrap_or(default) == host.port.unwrap_or(default)
}

fn header(headers: &HeaderMap, name: actix_web::http::header::HeaderName) -> Option<&str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// At most 100 characters of a header for a message or a log line.
fn shown(text: &str) -> String {
    text.chars().take(100).collect()
}

impl Edge {
    pub fn new(hosts: &[String], listen: SocketAddr) -> Edge {
        let ip = canonical(listen.ip());
        Edge {
            names: hosts.to_vec(),
            listen: (!ip.is_unspecified()).then_some(ip),
        }
    }

    /// Whether the console answers to `name` on a connection that came in on
    /// `local`.
    pub fn answers(&self, name: &str, local: Option<IpAddr>) -> bool {
        if name == "localhost" || self.names.iter().any(|n| n == name) {
            return true;
        }
        // An address is never a rebinding name: the page's origin is then
        // the console itself. Still, only the console's own addresses.
        match name.parse::<IpAddr>().map(canonical) {
            Ok(ip) => {
                ip.is_loopback() || Some(ip) == self.listen || Some(ip) == local.map(canonical)
            }
            Err(_) => false,
        }
    }

    /// The request's authority when the console answers to it, else the
    /// refusal. An absolute request target (`GET http://name/`) must name
    /// one of its names too.
    pub fn host(&self, req: &HttpRequest) -> Result<Authority, ApiError> {
        let local = req.conn_data::<LocalAddr>().map(|l| l.0.ip());
        let given = header(req.headers(), HOST);
        let target = req.uri().authority().map(|a| a.as_str());
        let Some(text) = given.or(target) else {
            return Err(misdirected("(none)"));
        };
        let mut found = None;
        for text in [given, target].into_iter().flatten() {
            match Authority::parse(text) {
                Some(a) if self.answers(&a.name, local) => found = found.or(Some(a)),
                _ => return Err(misdirected(text)),
            }
        }
        found.ok_or_else(|| misdirected(text))
    }

    /// Refuses a request whose `Origin` is present and another origin.
    pub fn origin(&self, req: &HttpRequest, host: &Authority) -> Result<(), ApiError> {
        match header(req.headers(), ORIGIN) {
            Some(o) if !same_origin(o, host) => {
                tracing::warn!(origin = %shown(o), path = %req.path(),
                    "console request from another origin refused");
                Err(ApiError::Origin(
                    "the console takes requests only from its own pages (Origin is another site)"
                        .into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

fn misdirected(host: &str) -> ApiError {
    tracing::warn!(host = %shown(host), "console request for another host name refused");
    ApiError::UnknownHost(format!(
        "this console answers only to its own names (loopback, its listen address and \
             [admin] hosts); {:?} is not one of them",
        shown(host)
    ))
}

/// The middleware: `Host`, then `Origin`, before anything else runs.
pub async fn guard<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let refused = match req.app_data::<web::Data<super::Admin>>() {
        Some(admin) => match admin.edge.host(req.request()) {
            Ok(host) => admin.edge.origin(req.request(), &host).err(),
            Err(r) => Some(r),
        },
        // Not reachable: the admin app always carries its state.
        None => Some(ApiError::Internal("internal error".into())),
    };
    match refused {
        Some(e) => Ok(req.into_response(e.error_response()).map_into_right_body()),
        None => next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, port: Option<u16>) -> Authority {
        Authority {
            name: name.into(),
            port,
        }
    }

    #[test]
    fn authorities_are_read_with_and_without_ports() {
        assert_eq!(
            Authority::parse("LocalHost:9090"),
            Some(a("localhost", Some(9090)))
        );
        assert_eq!(Authority::parse("[::1]:8000"), Some(a("::1", Some(8000))));
        assert_eq!(Authority::parse("[::1]"), Some(a("::1", None)));
        assert_eq!(
            Authority::parse("console.example.com"),
            Some(a("console.example.com", None))
        );
        for bad in [
            "",
            ":9090",
            "a:b",
            "[::1",
            "[nope]:1",
            "x/y",
            "user@host",
            "a b",
            "h:99999",
        ] {
            assert_eq!(Authority::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_console_answers_to_loopback_its_address_and_its_hosts_only() {
        let edge = Edge::new(
            &["console.example.com".into()],
            "10.0.0.5:9090".parse().unwrap(),
        );
        for ok in ["localhost", "127.0.0.1", "127.0.0.2", "::1", "10.0.0.5"] {
            assert!(edge.answers(ok, None), "{ok}");
        }
        assert!(edge.answers("console.example.com", None));
        for no in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.6",
            "0.0.0.0",
            "console.example.com.evil",
        ] {
            assert!(!edge.answers(no, None), "{no}");
        }
        // On a wildcard listen: the address the connection came in on.
        let any = Edge::new(&[], "0.0.0.0:9090".parse().unwrap());
        assert!(!any.answers("10.0.0.6", None));
        assert!(any.answers("10.0.0.6", Some("10.0.0.6".parse().unwrap())));
        assert!(any.answers(
            "10.0.0.6",
            Some("::ffff:10.0.0.6".parse::<IpAddr>().unwrap())
        ));
    }

    #[test]
    fn an_origin_is_the_console_s_own_when_name_and_port_match() {
        let host = a("localhost", Some(9090));
        assert!(same_origin("http://localhost:9090", &host));
        assert!(same_origin("https://localhost:9090", &host));
        assert!(same_origin("http://LOCALHOST:9090", &host));
        assert!(!same_origin("http://localhost:3000", &host));
        assert!(!same_origin("http://localhost", &host));
        assert!(!same_origin("http://evil.example:9090", &host));
        assert!(!same_origin("null", &host));
        assert!(!same_origin("file://localhost:9090", &host));
        assert!(!same_origin("http://localhost:9090/path", &host));
        // Default ports: the Host of a console behind a TLS proxy.
        let proxied = a("console.example.com", None);
        assert!(same_origin("https://console.example.com", &proxied));
        assert!(!same_origin("https://console.example.com:8443", &proxied));
    }
}
