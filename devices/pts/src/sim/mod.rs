//! A PTS-2 controller to test the bridge against, from the jsonPTS
//! specification: `POST /jsonPTS` over HTTP or HTTPS (a self-signed
//! certificate, as the controller has), basic or digest authentication,
//! users with permissions, pumps that fill and wait to be closed, the error
//! table, and the remote mode's WebSocket client that uploads finished
//! transactions until they are confirmed.
//!
//! The control API is [`Simulator`]'s methods: lift a nozzle, fill, hang up,
//! pay in the shop, take a pump offline, make the controller unreachable.
//! [`forecourt`] holds the state and the answers; this module serves them.

pub mod forecourt;
mod remote;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth::{self, Login, Scheme};
use crate::jsonpts;
pub use forecourt::{Forecourt, Permissions, SimError, Transaction, SHOP_USER, SYSTEM_USER};

/// The realm the simulator's digest challenges name.
pub const REALM: &str = "PTS-2";

/// How the simulated controller is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The controller's unique identifier (24 hex digits on a real one).
    pub id: String,
    pub pumps: u16,
    pub grade: String,
    pub price: Decimal,
    /// DIP switch 2.
    pub scheme: Scheme,
    /// DIP switch 1 OFF: HTTPS with a self-signed certificate.
    pub tls: bool,
    pub users: Vec<(Login, Permissions)>,
}

impl SimConfig {
    /// Two pumps of "Super 95" at 798.00, digest, plain HTTP, one user
    /// `qrgate`/`secret` with every permission.
    pub fn new() -> SimConfig {
        SimConfig {
            id: "0041001C524E500420323442".into(),
            pumps: 2,
            grade: "Super 95".into(),
            price: Decimal::new(79800, 2),
            scheme: Scheme::Digest,
            tls: false,
            users: vec![(
                Login {
                    user: "qrgate".into(),
                    password: "secret".into(),
                },
                Permissions::all(),
            )],
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::new()
    }
}

struct Inner {
    forecourt: Mutex<Forecourt>,
    config: SimConfig,
    nonces: Mutex<HashSet<String>>,
    unreachable: AtomicBool,
    addr: SocketAddr,
    fingerprint: Option<String>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// A running simulated controller; clones share it. Dropping the last clone
/// stops it.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The controller's clock, as its statuses write it.
pub fn now() -> String {
    chrono::Local::now().format("%Y-%m-%dT%H:%M:%S").to_string()
}

impl Simulator {
    /// Serves on 127.0.0.1, on a port the OS picks.
    pub async fn start(config: SimConfig) -> std::io::Result<Simulator> {
        Simulator::start_on(TcpListener::bind("127.0.0.1:0").await?, config).await
    }

    /// Serves on a listener the caller bound.
    pub async fn start_on(listener: TcpListener, config: SimConfig) -> std::io::Result<Simulator> {
        let addr = listener.local_addr()?;
        let (acceptor, fingerprint) = if config.tls {
            let (a, f) = tls_acceptor()?;
            (Some(a), Some(f))
        } else {
            (None, None)
        };
        let forecourt = Forecourt::new(&config.id, config.pumps, &config.grade, config.price);
        let sim = Simulator {
            inner: Arc::new(Inner {
                forecourt: Mutex::new(forecourt),
                config,
                nonces: Mutex::new(HashSet::new()),
                unreachable: AtomicBool::new(false),
                addr,
                fingerprint,
                tasks: Mutex::new(Vec::new()),
            }),
        };
        let weak = Arc::downgrade(&sim.inner);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let Some(inner) = weak.upgrade() else { return };
                let sim = Simulator { inner };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let sim = sim.clone();
                        async move { Ok::<_, std::convert::Infallible>(sim.serve(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let io = hyper_util::rt::TokioIo::new(tls);
                                let _ = http.serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(tcp);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        lock(&sim.inner.tasks).push(task);
        tracing::info!(url = %sim.url(), "PTS-2 simulator listening");
        Ok(sim)
    }

    /// `http(s)://127.0.0.1:PORT/jsonPTS`.
    pub fn url(&self) -> String {
        let scheme = if self.inner.config.tls {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{}", self.inner.addr, jsonpts::PATH)
    }

    /// The SHA-256 fingerprint of the HTTPS certificate (hex), to pin.
    pub fn fingerprint(&self) -> Option<String> {
        self.inner.fingerprint.clone()
    }

    pub fn id(&self) -> String {
        self.inner.config.id.clone()
    }

    /// The state, for anything the methods below do not cover.
    pub fn forecourt(&self) -> MutexGuard<'_, Forecourt> {
        lock(&self.inner.forecourt)
    }

    pub fn lift_nozzle(&self, pump: u16, nozzle: u8) -> Result<(), SimError> {
        self.forecourt().lift_nozzle(pump, nozzle)
    }

    /// Dispenses `litres` (a decimal text) more; returns the transaction.
    pub fn fill(&self, pump: u16, litres: &str) -> Result<u32, SimError> {
        let litres: Decimal = litres.parse().map_err(|_| SimError::Refused {
            pump,
            what: format!("{litres:?} is not a volume"),
        })?;
        self.forecourt().fill(pump, litres, &now())
    }

    pub fn hang_up(&self, pump: u16) -> Result<(), SimError> {
        self.forecourt().hang_up(pump, &now())
    }

    /// The customer pays in the shop, which closes the transaction.
    pub fn pay_in_shop(&self, pump: u16) -> Result<u32, SimError> {
        self.forecourt().pay_in_shop(pump, true)
    }

    /// The shop records a payment and leaves the transaction open.
    pub fn mark_paid_in_shop(&self, pump: u16) -> Result<u32, SimError> {
        self.forecourt().pay_in_shop(pump, false)
    }

    pub fn set_offline(&self, pump: u16, offline: bool) -> Result<(), SimError> {
        self.forecourt().set_offline(pump, offline)
    }

    pub fn set_next_transaction(&self, pump: u16, number: u32) -> Result<(), SimError> {
        self.forecourt().set_next_transaction(pump, number)
    }

    /// The whole controller stops answering (503 to everything) or answers again.
    pub fn set_unreachable(&self, down: bool) {
        self.inner.unreachable.store(down, Ordering::SeqCst);
    }

    pub fn transaction(&self, pump: u16, number: u32) -> Option<Transaction> {
        self.forecourt().transaction(pump, number)
    }

    /// How many requests of type `kind` the controller answered.
    pub fn seen(&self, kind: &str) -> usize {
        self.forecourt().seen.iter().filter(|k| *k == kind).count()
    }

    /// Remote mode: the controller connects out to `url` (`ws://…`) and keeps
    /// the connection, answering requests on it and uploading finished
    /// transactions until each is confirmed.
    pub fn connect_remote(&self, url: &str) {
        let task = tokio::spawn(remote::run(Arc::downgrade(&self.inner), url.to_owned()));
        lock(&self.inner.tasks).push(task);
    }

    fn user(&self, login: &str) -> Option<(Login, Permissions)> {
        self.inner
            .config
            .users
            .iter()
            .find(|(l, _)| l.user == login)
            .cloned()
    }

    async fn serve(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.inner.unreachable.load(Ordering::SeqCst) {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "");
        }
        if req.uri().path() != jsonpts::PATH {
            return reply(StatusCode::NOT_FOUND, "");
        }
        if req.method() != hyper::Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        let logins: Vec<Login> = self
            .inner
            .config
            .users
            .iter()
            .map(|(l, _)| l.clone())
            .collect();
        let scheme = self.inner.config.scheme;
        let known = |n: &str| lock(&self.inner.nonces).contains(n);
        let Some(login) = auth::verify(scheme, header.as_deref(), "POST", REALM, &logins, known)
            .map(|l| l.user.clone())
        else {
            let nonce = hex::encode(rand::random::<[u8; 16]>());
            let mut nonces = lock(&self.inner.nonces);
            if nonces.len() > 1000 {
                nonces.clear();
            }
            nonces.insert(nonce.clone());
            let mut r = reply(StatusCode::UNAUTHORIZED, "");
            if let Ok(v) = auth::challenge(scheme, REALM, &nonce).parse() {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
            }
            return r;
        };
        let body = match Limited::new(req.into_body(), 4 * jsonpts::MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, ""),
        };
        let text = String::from_utf8_lossy(&body);
        let perms = self.user(&login).map(|(_, p)| p).unwrap_or_default();
        match self.forecourt().answer(&login, perms, &text) {
            Ok(answer) => reply(StatusCode::OK, &answer),
            Err(status) => reply(
                StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                "",
            ),
        }
    }
}

fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    if !body.is_empty() {
        if let Ok(v) = "application/json; charset=utf-8".parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
    }
    r
}

/// A self-signed certificate (TLS 1.2, as the controller speaks) and its
/// SHA-256 fingerprint.
fn tls_acceptor() -> std::io::Result<(tokio_rustls::TlsAcceptor, String)> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(std::io::Error::other)?;
    let der = cert.cert.der().clone();
    let fingerprint = hex::encode(Sha256::digest(der.as_ref()));
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .map_err(std::io::Error::other)?;
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        fingerprint,
    ))
}
