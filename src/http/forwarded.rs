//! Who is asking, when a reverse proxy stands in front of qrgate. Behind a
//! proxy every request comes from the proxy's address, so a limit per
//! address would put Mercado Pago in one bucket with anybody who floods it.
//!
//! Only a peer inside `[http] trusted_proxies` is believed. For such a peer
//! the client is read from `X-Forwarded-For` (and `Forwarded`, RFC 7239,
//! `for=`): the right-most address that is not itself a trusted proxy. The
//! right end is what the trusted proxy appended; whatever lies left of the
//! first stranger was written by that stranger and proves nothing.
//!
//! A proxy appends to one of the two headers and passes the other on as the
//! client sent it. So when a request carries both and they name different
//! clients, one of them is forged and nothing says which: the peer is the
//! answer, never an address a client picked. A header that cannot be read
//! (`unknown`, an obfuscated `_name`, anything malformed) is also the peer.
//! From any other peer the headers are not looked at.
//!
//! The connection cap of `edge` stays per TCP peer: it is decided at accept,
//! before any header exists.

use std::net::{IpAddr, SocketAddr};

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

/// Hops read at most, from the right; a longer chain is not believed.
const MAX_HOPS: usize = 32;

/// `[http] trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// What one header says about the client.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Nothing,
    Client(IpAddr),
    /// Present, but not readable as a chain of addresses.
    Unusable,
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: `peer`, unless `peer` is a trusted proxy and
    /// its headers name someone (see the module's doc).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let xff = self.walk(headers, "x-forwarded-for", |list| {
            list.split(',').map(address).collect()
        });
        let fwd = self.walk(headers, "forwarded", forwarded_for);
        match (xff, fwd) {
            (Said::Client(a), Said::Nothing) | (Said::Nothing, Said::Client(a)) => a,
            (Said::Client(a), Said::Client(b)) if a == b => a,
            _ => peer,
        }
    }

    /// Reads the hops of header `name` (every line of it, in order) and
    /// walks them from the right.
    fn walk(
        &self,
        headers: &HeaderMap,
        name: &str,
        hops: impl Fn(&str) -> Vec<Option<IpAddr>>,
    ) -> Said {
        let mut lines = headers.get_all(name).peekable();
        if lines.peek().is_none() {
            return Said::Nothing;
        }
        let mut all = Vec::new();
        for line in lines {
            let Ok(text) = line.to_str() else {
                return Said::Unusable;
            };
            all.extend(hops(text));
            if all.len() > 4 * MAX_HOPS {
                return Said::Unusable;
            }
        }
        let hops = all.len();
        let mut last = None;
        for hop in all.into_iter().rev().take(MAX_HOPS) {
            let Some(ip) = hop.map(canonical) else {
                return Said::Unusable;
            };
            if !self.trusts(ip) {
                return Said::Client(ip);
            }
            last = Some(ip);
        }
        if hops > MAX_HOPS {
            return Said::Unusable;
        }
        // Every hop is a proxy of ours: the left-most is as far as it goes.
        last.map_or(Said::Unusable, Said::Client)
    }
}

/// One hop as proxies write it: an address, maybe bracketed, maybe with a
/// port.
fn address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The `for=` of each element of a `Forwarded` header; `None` for an
/// element without one, `unknown`, an obfuscated name, or anything else.
fn forwarded_for(text: &str) -> Vec<Option<IpAddr>> {
    split_unquoted(text, ',')
        .into_iter()
        .map(|element| {
            let value = split_unquoted(element, ';').into_iter().find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
            })?;
            let value = match value.strip_prefix('"') {
                Some(rest) => rest.strip_suffix('"')?,
                None => value,
            };
            address(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_stranger_is_the_client() {
        let t = proxies(&["127.0.0.0/8", "10.0.0.0/8"]);
        let local = ip("127.0.0.1");
        let forged_then_real = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.1.1")]);
        assert_eq!(t.client(local, &forged_then_real), ip("203.0.113.7"));
        // Two header lines are one list, in order.
        let lines = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(t.client(local, &lines), ip("203.0.113.8"));
        // Ports and brackets are what some proxies write.
        let port = headers(&[("x-forwarded-for", "[2001:db8::5]:4711")]);
        assert_eq!(t.client(local, &port), ip("2001:db8::5"));
        let v4port = headers(&[("x-forwarded-for", "203.0.113.9:80")]);
        assert_eq!(t.client(local, &v4port), ip("203.0.113.9"));
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(t.client(ip("::ffff:127.0.0.1"), &port), ip("2001:db8::5"));
        // Only proxies of ours: the left-most is as far as anyone knows.
        let all_ours = headers(&[("x-forwarded-for", "10.0.0.9, 10.0.0.8")]);
        assert_eq!(t.client(local, &all_ours), ip("10.0.0.9"));
    }

    #[test]
    fn forwarded_for_is_read_as_rfc_7239_writes_it() {
        let t = proxies(&["127.0.0.1/32"]);
        let local = ip("127.0.0.1");
        for (header, client) in [
            ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
            ("For=\"[2001:db8:cafe::17]:4711\"", "2001:db8:cafe::17"),
            ("for=\"192.0.2.43:47011\"", "192.0.2.43"),
            ("for=192.0.2.43, for=198.51.100.17", "198.51.100.17"),
            ("proto=https;for=\"[2001:db8::1]\";host=x", "2001:db8::1"),
            ("for=198.51.100.1, for=127.0.0.1", "198.51.100.1"),
        ] {
            assert_eq!(
                t.client(local, &headers(&[("forwarded", header)])),
                ip(client),
                "{header}"
            );
        }
    }

    #[test]
    fn what_cannot_be_read_or_disagrees_is_the_peer() {
        let t = proxies(&["127.0.0.1/32"]);
        let local = ip("127.0.0.1");
        for (name, value) in [
            ("forwarded", "for=unknown"),
            ("forwarded", "for=_hidden"),
            ("forwarded", "for=192.0.2.1, for=_proxy2"),
            ("forwarded", "proto=https"),
            ("forwarded", "for=\"[2001:db8::1\""),
            ("forwarded", "for=\"unterminated"),
            ("forwarded", ""),
            ("x-forwarded-for", ""),
            ("x-forwarded-for", "not an address"),
            ("x-forwarded-for", "203.0.113.1,,"),
            ("x-forwarded-for", "300.1.1.1"),
            ("x-forwarded-for", "[::1"),
        ] {
            assert_eq!(
                t.client(local, &headers(&[(name, value)])),
                local,
                "{name}: {value}"
            );
        }
        // Both headers, naming different clients: one is forged.
        let both = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("forwarded", "for=198.51.100.2"),
        ]);
        assert_eq!(t.client(local, &both), local);
        let agree = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("forwarded", "for=203.0.113.1;proto=https"),
        ]);
        assert_eq!(t.client(local, &agree), ip("203.0.113.1"));
        // Non-UTF-8 bytes.
        let mut raw = HeaderMap::new();
        raw.insert(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(t.client(local, &raw), local);
        // A chain longer than anyone's proxies.
        for n in [33, 200] {
            let long = vec!["127.0.0.1"; n].join(",");
            assert_eq!(
                t.client(local, &headers(&[("x-forwarded-for", &long)])),
                local
            );
        }
        let mut long = vec!["127.0.0.1"; 40];
        long[3] = "203.0.113.1";
        assert_eq!(
            t.client(local, &headers(&[("x-forwarded-for", &long.join(","))])),
            local,
            "a client past the 32nd hop is not believed either"
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("forwarded", "for=203.0.113.1"),
        ]);
        let stranger = ip("198.51.100.50");
        assert_eq!(proxies(&[]).client(stranger, &h), stranger);
        assert_eq!(proxies(&["127.0.0.1/32"]).client(stranger, &h), stranger);
        assert_eq!(
            proxies(&[]).client(ip("127.0.0.1"), &h),
            ip("127.0.0.1"),
            "no proxies configured: loopback too"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the headers, nothing panics, and the answer is the peer
        /// or an address the headers spelled out.
        #[test]
        fn no_header_panics_or_invents_an_address(
            xff in "[0-9a-f:.,\\[\\] ]{0,60}",
            fwd in "[a-zA-Z0-9:.,;=\"\\[\\]_ ]{0,60}",
        ) {
            let t = proxies(&["127.0.0.1/32", "::1/128"]);
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert(HeaderName::from_static("x-forwarded-for"), v);
            }
            if let Ok(v) = HeaderValue::from_str(&fwd) {
                h.insert(HeaderName::from_static("forwarded"), v);
            }
            let peer = ip("127.0.0.1");
            let got = t.client(peer, &h);
            let spelled: Vec<IpAddr> = xff
                .split(',')
                .map(address)
                .chain(forwarded_for(&fwd))
                .flatten()
                .map(canonical)
                .collect();
            prop_assert!(got == peer || spelled.contains(&got), "{got}");
        }
    }
}
