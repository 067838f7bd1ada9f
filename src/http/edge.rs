//! The public listener's edge: what a connection goes through before and
//! around actix-web, in one place. actix-web's `HttpServer` has no hook for
//! any of it, so the listener is built from its parts (actix-server, then
//! actix-http's HTTP/1 service over [`EdgeStream`], then the app):
//!
//! - **A cap per source.** A source (an IPv4 address, an IPv6 /64) holds at
//!   most `[http] max_connections_per_address` connections; one more is
//!   answered 503 and closed at accept. Counted once per connection, never per
//!   request. Each worker also stops accepting before the process runs out of
//!   file descriptors (new connections wait in the backlog instead of failing
//!   every accept), and `qrgate serve` raises its descriptor limit at start.
//! - **Whole requests in bounded time.** A request must arrive whole, head
//!   and body, within `[http] request_timeout_secs` of its first byte, or the
//!   connection is answered 408 and closed. actix-http only times out the
//!   first request's head: a body trickled a byte at a time, or a second head
//!   on a kept-alive connection, had no limit, and 500 of them held 500
//!   descriptors for ever. A response the client does not read within the
//!   same time closes the connection as well.
//! - **Protocol errors in JSON.** actix-http answers what it cannot parse
//!   (400, 431) and its own head timeout (408) itself, with an empty body,
//!   before any middleware runs. [`EdgeStream`] recognises those answers as
//!   they are written and sends our JSON error instead, and logs one
//!   rate-limited warning with the source (actix-http's own ERROR line for
//!   them is filtered out in `telemetry`).
//!
//! On a poll's path this costs a few `Cell` updates and one byte comparison
//! per response; no lock, no allocation per request.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Payload, Service};
use actix_web::{web, HttpMessage};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::ratelimit::WarnLimiter;
use super::State;
use crate::config::HttpConfig;

/// The key connections and warnings are counted under: an IPv4 address, or
/// an IPv6 address's /64 (one host usually holds a whole /64, so counting
/// single IPv6 addresses would count nothing).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::from(s)
            }
        },
    }
}

/// What every connection of the listener shares.
struct Edge {
    request_timeout: Duration,
    per_address: u32,
    open: DashMap<IpAddr, u32>,
    warnings: Arc<WarnLimiter>,
}

impl Edge {
    /// Takes a new connection in, or refuses it when its source holds its
    /// cap already.
    fn admit(
        self: &Arc<Edge>,
        io: TcpStream,
    ) -> Result<(EdgeStream, Option<SocketAddr>), actix_http::error::DispatchError> {
        let peer = io.peer_addr().ok();
        let mut counted = None;
        if let (Some(p), cap @ 1..) = (peer, self.per_address) {
            let key = source_key(p.ip());
            let mut n = self.open.entry(key).or_insert(0);
            if *n >= cap {
                drop(n);
                // Best effort: the socket is new, its buffer empty.
                last_words(&io, REFUSED);
                self.warn(
                    Some(p.ip()),
                    "connection_cap",
                    "a source over [http] max_connections_per_address: connection refused with 503",
                );
                return Err(actix_http::error::DispatchError::Io(io::Error::other(
                    "too many connections from one source",
                )));
            }
            *n += 1;
            counted = Some(key);
        }
        let conn = Rc::new(ConnState {
            phase: Cell::new(Phase::Idle),
            stalled_since: Cell::new(None),
            timeout: self.request_timeout,
        });
        let stream = EdgeStream {
            io,
            conn,
            edge: Arc::clone(self),
            counted,
            peer: peer.map(|p| p.ip()),
            timer: None,
            rewrite: None,
        };
        Ok((stream, peer))
    }

    fn warn(&self, peer: Option<IpAddr>, kind: &'static str, what: &'static str) {
        if let Some(suppressed) = self.warnings.allow(peer, kind, std::time::Instant::now()) {
            tracing::warn!(
                peer = peer.map(|p| p.to_string()),
                kind,
                suppressed,
                "{what}"
            );
        }
    }
}

/// Writes the edge's own last answer on a connection about to be dropped,
/// best effort, without blocking: then FIN, and what the client sent so far
/// taken off the socket, since closing a socket with unread bytes sends a
/// reset, which may make the client drop the answer. Straight to the socket
/// (it is non-blocking): tokio's `try_write` refuses a socket whose
/// readiness its reactor has not seen yet, as on a connection just accepted.
fn last_words(io: &TcpStream, answer: &[u8]) {
    let socket = socket2::SockRef::from(io);
    let _ = socket.send(answer);
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    for _ in 0..16 {
        if !matches!(socket.recv(&mut sink), Ok(1..)) {
            break;
        }
    }
}

/// Where a connection is in its current request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing of a request arrived since the last answer began.
    Idle,
    /// Part of a request arrived; all of it is due by this instant.
    Receiving(Instant),
    /// The app has the whole request; `true` once bytes of a next one came.
    Handling(bool),
}

/// A connection's clock, shared by its stream and (through the
/// connection's extensions) the middleware that says when a request is whole.
pub struct ConnState {
    phase: Cell<Phase>,
    /// Since when the client has not taken what we write.
    stalled_since: Cell<Option<Instant>>,
    timeout: Duration,
}

impl ConnState {
    fn bytes_in(&self) {
        match self.phase.get() {
            Phase::Idle => self
                .phase
                .set(Phase::Receiving(Instant::now() + self.timeout)),
            Phase::Handling(false) => self.phase.set(Phase::Handling(true)),
            Phase::Receiving(_) | Phase::Handling(true) => {}
        }
    }

    /// The app holds the whole request: the client owes nothing more.
    fn received(&self) {
        self.phase.set(Phase::Handling(false));
    }

    /// An answer is being written. Whatever arrives after it is the rest of
    /// a body nobody reads, or the next request: either way due in full
    /// within the timeout.
    fn answering(&self) {
        match self.phase.get() {
            Phase::Idle => {}
            Phase::Receiving(_) | Phase::Handling(false) => self.phase.set(Phase::Idle),
            Phase::Handling(true) => self
                .phase
                .set(Phase::Receiving(Instant::now() + self.timeout)),
        }
    }

    fn deadline(&self) -> Option<(Instant, Expired)> {
        let request = match self.phase.get() {
            Phase::Receiving(d) => Some((d, Expired::Request)),
            _ => None,
        };
        let reader = self
            .stalled_since
            .get()
            .map(|s| (s + self.timeout, Expired::Reader));
        match (request, reader) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expired {
    Request,
    Reader,
}

/// In the connection's extensions, for the middleware.
#[derive(Clone)]
struct ConnHint(Rc<ConnState>);

/// An answer of actix-http's own being replaced by ours.
struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// How much of actix-http's buffer it stands for.
    replaces: usize,
}

/// The TCP stream actix-http reads and writes, with the connection's clock,
/// its place in its source's count, and the rewriting of protocol errors.
pub struct EdgeStream {
    io: TcpStream,
    conn: Rc<ConnState>,
    edge: Arc<Edge>,
    counted: Option<IpAddr>,
    peer: Option<IpAddr>,
    timer: Option<Pin<Box<Sleep>>>,
    rewrite: Option<Rewrite>,
}

impl Drop for EdgeStream {
    fn drop(&mut self) {
        if let Some(key) = self.counted {
            if let Some(mut n) = self.edge.open.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
            self.edge.open.remove_if(&key, |_, n| *n == 0);
        }
    }
}

const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 82\r\n\
content-type: application/json\r\nconnection: close\r\n\r\n\
{\"code\":\"too_many_connections\",\"message\":\"too many connections from this address\"}";

const TIMED_OUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 64\r\n\
content-type: application/json\r\nconnection: close\r\n\r\n\
{\"code\":\"request_timeout\",\"message\":\"the request took too long\"}";

/// The answers actix-http writes by itself, as its encoder spells them
/// (status line, then `content-length: 0` first among the headers), and
/// the warning each deserves.
const OWN_ANSWERS: [(&[u8], u16, &str, &str); 4] = [
    (
        b"400 Bad Request\r\ncontent-length: 0\r\n",
        400,
        "malformed_request",
        "a request that is not HTTP answered 400",
    ),
    (
        b"408 Request Timeout\r\ncontent-length: 0\r\n",
        408,
        "slow_request",
        "no request head within [http] request_timeout_secs: answered 408 and closed",
    ),
    (
        b"431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
        431,
        "head_too_large",
        "a request head over 128 KiB answered 431",
    ),
    (
        b"500 Internal Server Error\r\ncontent-length: 0\r\n",
        500,
        "protocol_error",
        "a request actix-http could not follow answered 500",
    ),
];

/// Which of actix-http's own answers `buf` begins with, if any. Our own
/// answers always have a body (the JSON error handler sees to that), so an
/// error with `content-length: 0` is actix-http's.
fn own_answer(buf: &[u8]) -> Option<usize> {
    // One comparison for every 1xx, 2xx and 3xx answer.
    if buf.len() < 16 || !matches!(buf[9], b'4' | b'5') {
        return None;
    }
    if &buf[..9] != b"HTTP/1.1 " && &buf[..9] != b"HTTP/1.0 " {
        return None;
    }
    OWN_ANSWERS
        .iter()
        .position(|(prefix, ..)| buf[9..].starts_with(prefix))
}

/// Our JSON answer in place of actix-http's empty one at the start of
/// `buf`: its status line and headers, with a body. `None` when its head is
/// not whole in `buf` (then it goes out as it is).
fn rewrite(buf: &[u8], which: usize) -> Option<Rewrite> {
    let (prefix, status, ..) = OWN_ANSWERS[which];
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let status_line_end = 9 + prefix.iter().position(|&b| b == b'\r')?;
    let rest = buf.get(9 + prefix.len()..head_end)?;
    let status = actix_web::http::StatusCode::from_u16(status).ok()?;
    let body = super::ApiError::from_status(status).body();
    let mut bytes = Vec::with_capacity(head_end + body.len() + 64);
    bytes.extend_from_slice(&buf[..status_line_end]);
    bytes.extend_from_slice(
        format!(
            "\r\ncontent-length: {}\r\ncontent-type: application/json\r\n",
            body.len()
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(rest);
    bytes.extend_from_slice(&body);
    Some(Rewrite {
        bytes,
        written: 0,
        replaces: head_end,
    })
}

impl EdgeStream {
    /// Polls the connection's deadline, if it has one: `Some` error once it
    /// passed (the connection is then closed by actix-http).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let (deadline, why) = self.conn.deadline()?;
        loop {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            // A timer set for a later instant would wake too late. One set
            // for an earlier instant is left alone and moved when it fires:
            // a kept-alive connection then touches the timer wheel about once
            // per timeout, not once per request.
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return None,
                Poll::Ready(()) if Instant::now() >= deadline => return Some(self.expire(why)),
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
        }
    }

    fn expire(&mut self, why: Expired) -> io::Error {
        let secs = self.conn.timeout.as_secs();
        match why {
            Expired::Request => {
                // Nothing is being written for this request (the phase
                // would have moved on): the 408 cannot cut into an answer.
                if self.conn.stalled_since.get().is_none() && self.rewrite.is_none() {
                    last_words(&self.io, TIMED_OUT);
                }
                self.edge.warn(
                    self.peer,
                    "slow_request",
                    "a request did not arrive whole within [http] request_timeout_secs: answered 408 and closed",
                );
            }
            Expired::Reader => self.edge.warn(
                self.peer,
                "slow_reader",
                "an answer was not read within [http] request_timeout_secs: connection closed",
            ),
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing done within {secs} s"),
        )
    }

    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(r) = self.rewrite.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while r.written < r.bytes.len() {
            match Pin::new(&mut self.io).poll_write(cx, &r.bytes[r.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => r.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let replaces = r.replaces;
        self.rewrite = None;
        Poll::Ready(Ok(replaces))
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.bytes_in();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.poll_deadline(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // actix-http offers the same buffer again until we take it, so a
        // rewrite under way is finished before anything else.
        if this.rewrite.is_none() && !buf.is_empty() {
            this.conn.answering();
            if let Some(which) = own_answer(buf) {
                let (_, _, kind, what) = OWN_ANSWERS[which];
                this.edge.warn(this.peer, kind, what);
                this.rewrite = rewrite(buf, which);
            }
        }
        let result = if this.rewrite.is_some() {
            this.poll_rewrite(cx)
        } else {
            Pin::new(&mut this.io).poll_write(cx, buf)
        };
        match result {
            Poll::Pending => {
                if this.conn.stalled_since.get().is_none() {
                    this.conn.stalled_since.set(Some(Instant::now()));
                }
                match this.poll_deadline(cx) {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Pending,
                }
            }
            ready => {
                this.conn.stalled_since.set(None);
                ready
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that tells its connection when it has arrived whole.
struct BodyEnd {
    inner: Payload,
    conn: Option<Rc<ConnState>>,
}

impl Stream for BodyEnd {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(None) = next {
            if let Some(conn) = this.conn.take() {
                conn.received();
            }
        }
        next
    }
}

/// The middleware half of the clock: a request without a body is whole when
/// it reaches the app; one with a body when the body ends.
fn mark_received(req: &mut actix_web::dev::ServiceRequest) {
    let Some(conn) = req.conn_data::<ConnHint>().map(|h| Rc::clone(&h.0)) else {
        return;
    };
    match req.take_payload() {
        Payload::None => conn.received(),
        inner => req.set_payload(Payload::Stream {
            payload: Box::pin(BodyEnd {
                inner,
                conn: Some(conn),
            }),
        }),
    }
}

/// Descriptors kept for everything but public connections: the store, the
/// broker, the console, calls to Mercado Pago.
const RESERVED_FDS: u64 = 256;

/// Connections one worker takes at most, from the descriptor limit: past
/// it, actix-server stops accepting until some close (the kernel's backlog
/// holds the rest), instead of failing accepts with EMFILE, after which it
/// would stop accepting anything for half a second at a time.
fn connections_per_worker(workers: usize) -> usize {
    let limit = fd_limit().unwrap_or(u64::MAX);
    let usable = limit.saturating_sub(RESERVED_FDS).max(64);
    usize::try_from(usable / workers.max(1) as u64)
        .unwrap_or(usize::MAX)
        .clamp(16, 25_000)
}

/// The public listener: the app of [`super::routes`] behind the edge.
pub fn serve(
    listener: std::net::TcpListener,
    config: &HttpConfig,
    shared: web::Data<State>,
    workers: usize,
) -> io::Result<actix_server::Server> {
    let addr = listener.local_addr()?;
    let edge = Arc::new(Edge {
        request_timeout: config.request_timeout,
        per_address: config.max_connections_per_address,
        open: DashMap::new(),
        warnings: Arc::clone(&shared.warnings),
    });
    let per_worker = connections_per_worker(workers);
    tracing::info!(
        max_connections = per_worker * workers,
        max_connections_per_address = config.max_connections_per_address,
        request_timeout_secs = config.request_timeout.as_secs(),
        trusted_proxies = %config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "HTTP edge limits"
    );
    let request_timeout = config.request_timeout;
    let builder = actix_server::Server::build();
    let shutting_down = builder.graceful_shutdown_signal();
    let server = builder
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(5)
        .max_concurrent_connections(per_worker)
        .listen("qrgate-http", listener, move || {
            let edge = Arc::clone(&edge);
            let shutting_down = shutting_down.clone();
            let app = actix_web::App::new()
                .wrap(
                    actix_web::middleware::ErrorHandlers::new().default_handler(super::json_errors),
                )
                .wrap_fn(|mut req, srv| {
                    mark_received(&mut req);
                    srv.call(req)
                })
                .app_data(shared.clone())
                .app_data(shared.readiness.clone())
                .configure(super::routes);
            let http = HttpService::build()
                .keep_alive(KeepAlive::default())
                .client_request_timeout(request_timeout)
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                .graceful_shutdown_signal(move || {
                    let s = shutting_down.clone();
                    async move { s.notified().await }
                })
                .on_connect_ext(|io: &EdgeStream, ext| {
                    ext.insert(ConnHint(Rc::clone(&io.conn)));
                })
                .h1(map_config(
                    app.into_factory()
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ));
            fn_service(move |io: TcpStream| std::future::ready(edge.admit(io))).and_then(http)
        })?
        .run();
    Ok(server)
}

/// Reports every minute the warnings each source had suppressed, so a flood
/// that stopped is still counted in full, in at most 21 lines.
pub async fn report_suppressed(
    warnings: Arc<WarnLimiter>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    const LINES: usize = 20;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let mut all = warnings.drain(std::time::Instant::now());
        all.sort_by_key(|s| std::cmp::Reverse(s.count));
        for s in all.iter().take(LINES) {
            tracing::warn!(peer = %s.source, kind = s.kind, suppressed = s.count,
                "warnings from this source suppressed since it was last reported");
        }
        if let Some(rest) = all.get(LINES..).filter(|r| !r.is_empty()) {
            tracing::warn!(
                sources = rest.len(),
                suppressed = rest.iter().map(|s| s.count).sum::<u64>(),
                "warnings from other sources suppressed since they were last reported"
            );
        }
    }
}

/// `rlim_t` is `u64` on Linux but not on every unix.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)]
fn rlim(v: libc::rlim_t) -> u64 {
    v as u64
}

/// The soft limit on open file descriptors, where the platform has one.
pub fn fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
        ok.then_some(rlim(r.rlim_cur))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// What [`raise_fd_limit`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one: every public
/// connection holds a descriptor, and the usual soft default (1024) is a few
/// hundred slow clients away. `None` where there is no such limit; `now` is
/// `before` when the raise was refused.
pub fn raise_fd_limit() -> Option<FdLimit> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `fd_limit`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
            return None;
        }
        let before = rlim(r.rlim_cur);
        let hard = rlim(r.rlim_max);
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        }
        Some(FdLimit {
            before,
            now: fd_limit().unwrap_or(before),
            hard,
        })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(source_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let m: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_key(m), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source_key(v4), v4);
    }

    #[test]
    fn only_actix_https_own_empty_errors_are_rewritten() {
        let own = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n";
        let which = own_answer(own).unwrap();
        let r = rewrite(own, which).unwrap();
        assert_eq!(r.replaces, own.len());
        let text = String::from_utf8(r.bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 64\r\ncontent-type: application/json\r\n\
             connection: close\r\ndate: x"
        );
        assert_eq!(body.len(), 64);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "bad_request");
        let big =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let r = rewrite(big, own_answer(big).unwrap()).unwrap();
        assert!(String::from_utf8(r.bytes).unwrap().ends_with(
            r#""code":"request_header_fields_too_large","message":"the request head is too large"}"#
        ));
        // Our own answers, with bodies, pass as they are; so does a head
        // that is not whole in the buffer.
        for ours in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 72\r\n\r\n{}"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"short",
        ] {
            assert_eq!(own_answer(ours), None);
        }
        let cut = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate";
        assert!(rewrite(cut, own_answer(cut).unwrap()).is_none());
    }

    #[test]
    fn our_own_answers_say_their_length_right() {
        for answer in [REFUSED, TIMED_OUT] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("content-length: {}\r\n", body.len())),
                "{text}"
            );
            serde_json::from_str::<serde_json::Value>(body).unwrap();
        }
    }

    #[test]
    fn the_clock_runs_from_a_requests_first_byte_until_the_app_has_it_whole() {
        let c = ConnState {
            phase: Cell::new(Phase::Idle),
            stalled_since: Cell::new(None),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(
            c.deadline(),
            None,
            "an idle connection is actix-http's keep-alive"
        );
        c.bytes_in();
        let Some((due, Expired::Request)) = c.deadline() else {
            panic!("{:?}", c.phase.get())
        };
        c.bytes_in();
        assert_eq!(
            c.deadline(),
            Some((due, Expired::Request)),
            "more bytes do not extend it"
        );
        c.received();
        assert_eq!(c.deadline(), None, "our own work is not the client's delay");
        c.bytes_in();
        assert_eq!(c.deadline(), None, "a next request waits for the answer");
        c.answering();
        assert!(
            matches!(c.deadline(), Some((_, Expired::Request))),
            "then its clock runs"
        );
        c.received();
        c.answering();
        assert_eq!(c.deadline(), None);
        // A body the app never read, trickling after the answer, runs out.
        c.bytes_in();
        assert!(matches!(c.deadline(), Some((_, Expired::Request))));
        c.answering();
        c.stalled_since.set(Some(Instant::now()));
        assert!(matches!(c.deadline(), Some((_, Expired::Reader))));
    }
}
