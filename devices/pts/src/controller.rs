//! One jsonPTS call to the controller: a message of requests out, the
//! answer's packets back in the requests' order. Two ways to reach it:
//!
//! - [`Http`]: `POST /jsonPTS` to the controller's web server, basic or
//!   digest, over HTTPS with its self-signed certificate pinned by its
//!   SHA-256 fingerprint (a certificate authority vouches for nothing here);
//! - [`Remote`]: the controller's own WebSocket to the bridge (remote mode),
//!   so the station needs no inbound port; the controller's uploads arrive
//!   on it too, and are confirmed there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::auth::{self, Login, Scheme};
use crate::jsonpts::{self, envelope, Message, Packet, PtsError, Request, Upload, WireError};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the controller could not be reached: {0}")]
    Unreachable(String),
    #[error("the controller refused the login of user {0:?} (HTTP 401): check the user and password, and DIP switch 2 (basic or digest)")]
    Unauthorized(String),
    #[error("user {0:?} lacks a permission on the controller (HTTP 403): it needs Control, and Payments for a payment form")]
    Forbidden(String),
    #[error("the controller answered HTTP {0}")]
    Status(u16),
    #[error("the controller's answer: {0}")]
    Wire(#[from] WireError),
    #[error("the controller refused the whole message: {0}")]
    Refused(PtsError),
    #[error("the controller's answer has no packet {0}")]
    Missing(u32),
}

/// The controller, however it is reached.
pub enum Controller {
    Http(Http),
    Remote(Remote),
}

impl Controller {
    /// Sends `requests` in one message; each answer packet, in order.
    pub async fn call(&self, requests: &[Request]) -> Result<Vec<Packet>, LinkError> {
        // Ids new to each call: a late answer to a call that timed out is
        // never taken for the next one's.
        let n = requests.len() as u32;
        let base = NEXT_ID.fetch_add(n.max(1), Ordering::SeqCst) % 1_000_000_000 + 1;
        let packets: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| r.packet(base + i as u32))
            .collect();
        let text = envelope(None, &packets);
        let answer = match self {
            Controller::Http(h) => h.post(text).await?,
            Controller::Remote(r) => r.call(text, packets.first().map_or(1, |p| p.id)).await?,
        };
        let message = Message::parse(&answer)?;
        if let Some(e) = message.error() {
            return Err(LinkError::Refused(e));
        }
        let mut by_id: HashMap<u32, Packet> =
            message.packets.into_iter().map(|p| (p.id.0, p)).collect();
        (base..base + n)
            .map(|id| by_id.remove(&id).ok_or(LinkError::Missing(id)))
            .collect()
    }

    /// One request; its answer packet.
    pub async fn one(&self, request: Request) -> Result<Packet, LinkError> {
        let mut packets = self.call(std::slice::from_ref(&request)).await?;
        packets.pop().ok_or(LinkError::Missing(1))
    }
}

// ---------------------------------------------------------------------------
// HTTP(S)

/// The controller's web server.
pub struct Http {
    client: reqwest::Client,
    url: String,
    login: Login,
    scheme: Scheme,
    /// The last digest challenge, answered again until the controller sends
    /// a new one.
    challenge: Mutex<Option<auth::Params>>,
    nc: AtomicU32,
}

impl Http {
    /// `pin`: the certificate's SHA-256 (hex, colons allowed), required for
    /// an `https` URL.
    pub fn new(url: &str, login: Login, scheme: Scheme, pin: Option<&str>) -> Result<Http, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CALL_TIMEOUT);
        if url.starts_with("https://") {
            let pin = pin.ok_or("an https controller needs its certificate's SHA-256 pinned")?;
            builder = builder.use_preconfigured_tls(pinned_tls(pin)?);
        }
        Ok(Http {
            client: builder.build().map_err(|e| e.to_string())?,
            url: url.to_owned(),
            login,
            scheme,
            challenge: Mutex::new(None),
            nc: AtomicU32::new(0),
        })
    }

    fn authorization(&self) -> Option<String> {
        match self.scheme {
            Scheme::Basic => Some(auth::basic(&self.login)),
            Scheme::Digest => {
                let challenge = self.challenge.lock().ok()?.clone()?;
                let nc = self.nc.fetch_add(1, Ordering::SeqCst) + 1;
                let cnonce = hex::encode(rand::random::<[u8; 8]>());
                let uri = reqwest::Url::parse(&self.url)
                    .map(|u| u.path().to_owned())
                    .unwrap_or_else(|_| jsonpts::PATH.to_owned());
                Some(auth::digest(
                    &self.login,
                    &challenge,
                    "POST",
                    &uri,
                    nc,
                    &cnonce,
                ))
            }
        }
    }

    async fn post(&self, body: String) -> Result<String, LinkError> {
        for attempt in 0..2 {
            let mut request = self
                .client
                .post(&self.url)
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.clone());
            if let Some(a) = self.authorization() {
                request = request.header("Authorization", a);
            }
            let response = request
                .send()
                .await
                .map_err(|e| LinkError::Unreachable(error_chain(&e)))?;
            match response.status().as_u16() {
                200 => {
                    return response
                        .text()
                        .await
                        .map_err(|e| LinkError::Unreachable(error_chain(&e)))
                }
                401 if attempt == 0 && self.scheme == Scheme::Digest => {
                    let challenge = response
                        .headers()
                        .get_all("WWW-Authenticate")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(auth::Params::parse_digest);
                    if challenge.is_none() {
                        return Err(LinkError::Unauthorized(self.login.user.clone()));
                    }
                    if let Ok(mut c) = self.challenge.lock() {
                        *c = challenge;
                    }
                    self.nc.store(0, Ordering::SeqCst);
                }
                401 => return Err(LinkError::Unauthorized(self.login.user.clone())),
                403 => return Err(LinkError::Forbidden(self.login.user.clone())),
                status => return Err(LinkError::Status(status)),
            }
        }
        Err(LinkError::Unauthorized(self.login.user.clone()))
    }
}

/// The error and its causes on one line (reqwest hides the TLS reason in
/// its sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A fingerprint as 32 bytes: hex, with or without colons.
pub fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let hexits: String = pin.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hexits.trim())
        .map_err(|_| format!("certificate_sha256 {pin:?} is not hexadecimal"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("certificate_sha256 has {} bytes, a SHA-256 has 32", b.len()))
}

fn pinned_tls(pin: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        pin: parse_pin(pin)?,
        provider: Arc::clone(&provider),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Trusts exactly one certificate, by its fingerprint: the controller's
/// is self-signed, so no chain or name can vouch for it, while a pin still
/// keeps a machine in the middle out.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the controller's certificate has SHA-256 {}, not the pinned one",
                hex::encode(seen)
            )))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Remote mode

type Waiter = (String, u32, oneshot::Sender<String>);

/// The bridge's end of the controller's WebSocket.
#[derive(Clone)]
pub struct Remote {
    link: Arc<Mutex<Option<mpsc::Sender<Waiter>>>>,
    /// The controller's id, from its `X-Pts-Id` header.
    pts_id: Arc<Mutex<Option<String>>>,
}

/// What the controller uploaded, with its `PtsId`.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub pts_id: Option<String>,
    pub upload: Upload,
}

impl Remote {
    /// Listens for the controller's WebSocket on `listener`. `login`, when
    /// set, is the user the controller must present (basic). Uploads go to
    /// `uploads`, each confirmed once passed on.
    pub fn listen(
        listener: TcpListener,
        login: Option<Login>,
        uploads: mpsc::Sender<Uploaded>,
    ) -> (Remote, tokio::task::JoinHandle<()>) {
        let remote = Remote {
            link: Arc::new(Mutex::new(None)),
            pts_id: Arc::new(Mutex::new(None)),
        };
        let r = remote.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let r = r.clone();
                let login = login.clone();
                let uploads = uploads.clone();
                tokio::spawn(async move {
                    if let Err(e) = r.serve(tcp, login, uploads).await {
                        tracing::warn!(%peer, "controller's WebSocket: {e}");
                    }
                });
            }
        });
        (remote, task)
    }

    /// The controller's id, once it connected.
    pub fn pts_id(&self) -> Option<String> {
        self.pts_id.lock().ok()?.clone()
    }

    async fn call(&self, text: String, first_id: u32) -> Result<String, LinkError> {
        let link = self.link.lock().ok().and_then(|l| l.clone());
        let Some(link) = link else {
            return Err(LinkError::Unreachable(
                "the controller has not connected its WebSocket".into(),
            ));
        };
        let (tx, rx) = oneshot::channel();
        link.send((text, first_id, tx))
            .await
            .map_err(|_| LinkError::Unreachable("the controller's WebSocket closed".into()))?;
        tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| LinkError::Unreachable("no answer on the controller's WebSocket".into()))?
            .map_err(|_| LinkError::Unreachable("the controller's WebSocket closed".into()))
    }

    async fn serve(
        &self,
        tcp: tokio::net::TcpStream,
        login: Option<Login>,
        uploads: mpsc::Sender<Uploaded>,
    ) -> Result<(), String> {
        let mut pts_id = None;
        // The callback's type is tungstenite's: its error is a whole response.
        #[allow(clippy::result_large_err)]
        let check = |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
            pts_id = req
                .headers()
                .get("X-Pts-Id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let given = req
                .headers()
                .get("Authorization")
                .and_then(|v| v.to_str().ok());
            let ok = login
                .as_ref()
                .is_none_or(|l| given == Some(auth::basic(l).as_str()));
            if ok {
                Ok(resp)
            } else {
                let mut refused = ErrorResponse::new(Some("unauthorized".into()));
                *refused.status_mut() =
                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                Err(refused)
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, check)
            .await
            .map_err(|e| format!("handshake refused: {e}"))?;
        tracing::info!(
            pts_id = pts_id.as_deref().unwrap_or("?"),
            "controller connected its WebSocket"
        );
        if let Ok(mut id) = self.pts_id.lock() {
            *id = pts_id.clone();
        }
        let (out_tx, mut out_rx) = mpsc::channel::<Waiter>(16);
        if let Ok(mut link) = self.link.lock() {
            *link = Some(out_tx);
        }
        let (mut tx, mut rx) = ws.split();
        let mut waiting: HashMap<u32, oneshot::Sender<String>> = HashMap::new();
        let outcome = loop {
            tokio::select! {
                out = out_rx.recv() => {
                    let Some((text, id, reply)) = out else { break Ok(()) };
                    waiting.retain(|_, w| !w.is_closed());
                    waiting.insert(id, reply);
                    if let Err(e) = tx.send(Frame::Text(text)).await {
                        break Err(e.to_string());
                    }
                }
                frame = rx.next() => {
                    let text = match frame {
                        Some(Ok(Frame::Text(t))) => t,
                        Some(Ok(Frame::Close(_))) | None => break Ok(()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => break Err(e.to_string()),
                    };
                    let Ok(message) = Message::parse(&text) else {
                        tracing::warn!("the controller sent a message that is not jsonPTS");
                        continue;
                    };
                    if message.packets.iter().any(|p| Upload::is_upload(&p.kind)) {
                        let mut confirmations = Vec::new();
                        for p in &message.packets {
                            match Upload::from_packet(p) {
                                Ok(upload) => {
                                    let passed = uploads
                                        .send(Uploaded { pts_id: message.pts_id.clone(), upload })
                                        .await;
                                    // Confirmed only once handed on: the
                                    // controller sends it again otherwise.
                                    if passed.is_ok() {
                                        confirmations.push(jsonpts::confirmation(p.id.0, &p.kind));
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!("unreadable upload from the controller: {e}");
                                    confirmations.push(jsonpts::error_packet(p.id.0, &p.kind, jsonpts::code::INVALID_JSON_REQUEST, None));
                                }
                            }
                        }
                        if let Err(e) = tx.send(Frame::Text(jsonpts::response(confirmations))).await {
                            break Err(e.to_string());
                        }
                    } else if let Some(first) = message.packets.first() {
                        if let Some(reply) = waiting.remove(&first.id.0) {
                            let _ = reply.send(text);
                        }
                    }
                }
            }
        };
        tracing::warn!(
            pts_id = pts_id.as_deref().unwrap_or("?"),
            "controller's WebSocket closed"
        );
        outcome
    }
}
