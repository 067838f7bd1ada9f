//! Where the PostgreSQL store is: `[store] url`, checked when the
//! configuration loads, and how to reach it (TLS included).
//!
//! The URL is libpq's (`postgres://user@host:port/dbname?sslmode=…`), with
//! two of libpq's TLS words that tokio-postgres does not know, handled here:
//! `sslmode=verify-full` (the server's certificate must chain to a trusted
//! root and name the host) and `sslrootcert=PATH` (the roots to trust, for a
//! managed PostgreSQL whose CA is its provider's own). `require` encrypts
//! without checking who answers, as libpq's does. TLS is rustls with ring,
//! like the rest of qrgate: no OpenSSL.
//!
//! A password never sits in the URL: it is a secret, read from
//! `QRGATE_STORE_PASSWORD` (or its file, or its credential) and added here.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// The environment variable that holds the PostgreSQL password.
pub const STORE_PASSWORD_ENV: &str = "QRGATE_STORE_PASSWORD";

/// How a connection to PostgreSQL is protected (`sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP (or a unix socket).
    Disable,
    /// Encrypted; the server's certificate is not checked.
    Require,
    /// Encrypted, the certificate chained to a trusted root and naming the
    /// host.
    VerifyFull,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// A checked `[store] url`.
#[derive(Clone)]
pub struct PgTarget {
    /// Everything but TLS and the password.
    config: tokio_postgres::Config,
    tls: TlsMode,
    root_cert: Option<PathBuf>,
    /// The URL as given (it holds no password), for logs and errors.
    shown: String,
}

/// How long a connection may take to open; a store that does not answer
/// within it is unavailable (readiness says so rather than hang).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl PgTarget {
    /// Checks a `[store] url`. The error says what is wrong without quoting
    /// the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let url = url.trim();
        let Some(rest) = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
        else {
            return Err(
                "must be a URL like postgres://qrgate@db.example.com:5432/qrgate?sslmode=verify-full"
                    .into(),
            );
        };
        let (head, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut tls = None;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => {
                    tls = Some(match value {
                        "disable" => TlsMode::Disable,
                        "require" => TlsMode::Require,
                        "verify-full" => TlsMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode={other:?} is not one of disable, require, verify-full"
                            ))
                        }
                    })
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(percent_decode(value)?)),
                "password" => return Err(password_in_url()),
                _ => kept.push(pair),
            }
        }
        let plain = if kept.is_empty() {
            format!("postgres://{head}")
        } else {
            format!("postgres://{head}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config =
            plain
                .parse()
                .map_err(|e| match std::error::Error::source(&e) {
                    Some(why) => format!("is not a PostgreSQL URL: {why}"),
                    None => format!("is not a PostgreSQL URL: {e}"),
                })?;
        if config.get_password().is_some() {
            return Err(password_in_url());
        }
        if config.get_user().is_none() {
            return Err("names no user (postgres://USER@host/dbname)".into());
        }
        if config.get_dbname().is_none() {
            return Err("names no database (postgres://user@host/DBNAME)".into());
        }
        let sockets_only = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        // A unix socket is local: PostgreSQL speaks no TLS on it.
        let tls = match (tls, sockets_only) {
            (None, true) => TlsMode::Disable,
            (None, false) => TlsMode::VerifyFull,
            (Some(TlsMode::Disable), _) => TlsMode::Disable,
            (Some(mode), true) => {
                return Err(format!(
                "sslmode={} over a unix socket: PostgreSQL uses no TLS there; use sslmode=disable",
                mode.as_str()
            ))
            }
            (Some(mode), false) => mode,
        };
        if root_cert.is_some() && tls != TlsMode::VerifyFull {
            return Err("sslrootcert is only read with sslmode=verify-full".into());
        }
        config.ssl_mode(if tls == TlsMode::Disable {
            tokio_postgres::config::SslMode::Disable
        } else {
            tokio_postgres::config::SslMode::Require
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A peer gone without a word (a host that vanished) is noticed
        // within a minute instead of the kernel's two hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("qrgate");
        }
        Ok(PgTarget {
            config,
            tls,
            root_cert,
            shown: url.to_owned(),
        })
    }

    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// The connection settings with the password, and the TLS connector
    /// `sslmode` asks for.
    pub fn connector(
        &self,
        password: Option<&str>,
    ) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
        let mut config = self.config.clone();
        if let Some(p) = password {
            config.password(p);
        }
        // A transaction left open by a qrgate that froze or lost the
        // network keeps its row locks (a POS's head, the leader's term)
        // until PostgreSQL ends it: within the leader's lease, not TCP's
        // hours, so that another instance can take over.
        let idle = super::leader::LEASE.as_millis();
        let options = config.get_options().unwrap_or_default();
        let options = format!("{options} -c idle_in_transaction_session_timeout={idle}");
        config.options(options.trim_start());
        let tls = client_config(self.tls, self.root_cert.as_deref())
            .map_err(|e| StoreError::Unavailable(format!("TLS for {self}: {e}")))?;
        Ok((config, MakeRustlsConnect::new(tls)))
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTarget({})", self.shown)
    }
}

fn password_in_url() -> String {
    format!(
        "holds a password; secrets are never read from the configuration file: set \
         {STORE_PASSWORD_ENV} (or {STORE_PASSWORD_ENV}_FILE, or the credential store_password)"
    )
}

/// `%XX` escapes of a URL value (a path with spaces, say).
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "sslrootcert has a bad %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "sslrootcert is not UTF-8".to_owned())
}

fn client_config(
    mode: TlsMode,
    root_cert: Option<&std::path::Path>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    Ok(match mode {
        TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyFull => builder
            .with_root_certificates(roots(root_cert)?)
            .with_no_client_auth(),
        // Never used: tokio-postgres does not start TLS with sslmode=disable.
        TlsMode::Disable => builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    })
}

/// The roots `verify-full` trusts: `sslrootcert` alone when given (as
/// libpq), else the system's and Mozilla's.
fn roots(root_cert: Option<&std::path::Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {}: no certificate in it",
                    path.display()
                ));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
    }
    Ok(roots)
}

/// `sslmode=require`: any certificate is taken (libpq's meaning), though
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_checked_with_its_tls_mode_and_never_quoted_back() {
        let t = PgTarget::parse("postgres://qrgate@db.example.com:5433/qrgate").unwrap();
        assert_eq!(t.tls(), TlsMode::VerifyFull, "verify-full by default");
        assert_eq!(t.config.get_ports(), [5433]);
        for (mode, tls) in [
            ("disable", TlsMode::Disable),
            ("require", TlsMode::Require),
            ("verify-full", TlsMode::VerifyFull),
        ] {
            let t = PgTarget::parse(&format!(
                "postgresql://qrgate@db/qrgate?sslmode={mode}&application_name=x"
            ))
            .unwrap();
            assert_eq!(t.tls(), tls);
            assert_eq!(t.config.get_application_name(), Some("x"));
        }
        let socket = PgTarget::parse("postgres://qrgate@%2Frun%2Fpostgresql/qrgate").unwrap();
        assert_eq!(socket.tls(), TlsMode::Disable);

        for (url, says) in [
            (
                "postgres://qrgate:hunter2@db/qrgate",
                "QRGATE_STORE_PASSWORD",
            ),
            (
                "postgres://qrgate@db/qrgate?password=hunter2",
                "QRGATE_STORE_PASSWORD",
            ),
            ("postgres://qrgate@db/qrgate?sslmode=prefer", "verify-full"),
            ("mysql://qrgate@db/qrgate", "postgres://"),
            ("postgres://db/qrgate", "no user"),
            ("postgres://qrgate@db", "no database"),
            (
                "postgres://qrgate@%2Ftmp/qrgate?sslmode=require",
                "unix socket",
            ),
            (
                "postgres://qrgate@db/qrgate?sslmode=require&sslrootcert=/ca.pem",
                "verify-full",
            ),
            ("postgres://qrgate@db/qrgate?colour=blue", "colour"),
        ] {
            let e = PgTarget::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn verify_full_trusts_sslrootcert_alone_and_says_when_it_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let t = PgTarget::parse(&format!(
            "postgres://qrgate@db/qrgate?sslmode=verify-full&sslrootcert={}",
            empty.display()
        ))
        .unwrap();
        let e = t.connector(None).err().expect("no roots");
        assert!(e.to_string().contains("no certificate"), "{e}");
        let missing = PgTarget::parse(
            "postgres://qrgate@db/qrgate?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap();
        let e = missing.connector(None).err().expect("unreadable");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
