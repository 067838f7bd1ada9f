//! Who may use the admin listener, once `edge` has let the request in
//! (docs/decisions.md, "The console's edge").
//!
//! - **No token configured** (loopback only, checked at start): no login and
//!   no session. A request with an `Origin` is the console's own page (`edge`
//!   refused any other origin); one without is a program on the station
//!   (browsers send `Origin` on every state-changing request).
//! - **With `QRGATE_ADMIN_TOKEN`**: a bearer header for programs, or a
//!   session from the login form for the page. Every token tried, right or
//!   wrong, through either door, goes through [`Guesses`]: per source, a few
//!   free mistakes, then a lock that doubles with each further one. Sessions
//!   live in memory (a restart logs the operator out), end after
//!   `[admin] session_idle_secs` without a request or at logout, and are at
//!   most `[admin] max_sessions` (a new login evicts the least recently
//!   used). A session's state-changing requests carry its CSRF token and an
//!   `Origin`.
//!
//! The token is compared in constant time and never logged.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::Clock;

use actix_web::http::header::{AUTHORIZATION, COOKIE, ORIGIN};
use actix_web::HttpRequest;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminConfig, Secret};
use crate::http::ApiError;

pub const COOKIE_NAME: &str = "qrgate_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Wrong tokens a source may send before it is locked out: typos.
pub const FREE_FAILURES: u32 = 5;
/// The first lock; each further wrong token doubles it.
pub const FIRST_LOCK: Duration = Duration::from_secs(1);
/// The longest lock: past this, a guess every five minutes.
pub const MAX_LOCK: Duration = Duration::from_secs(300);
/// A source's wrong tokens are forgotten this long after its last one.
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Sources remembered at most; past it, the quietest is forgotten.
const MAX_SOURCES: usize = 10_000;

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

/// Equal, compared in constant time.
pub fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold no invariant a panicking holder could break halfway.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A session the request carries.
pub struct Session {
    pub id: String,
    pub csrf: String,
}

struct Entry {
    csrf: String,
    last_seen: Instant,
    /// Cancelled when the session ends: its event streams close.
    ended: CancellationToken,
}

/// The login sessions, bounded, each ending after `idle` without use.
struct Sessions {
    by_id: HashMap<String, Entry>,
    idle: Duration,
    max: usize,
}

impl Sessions {
    fn remove(&mut self, id: &str) -> bool {
        self.by_id
            .remove(id)
            .inspect(|e| e.ended.cancel())
            .is_some()
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) >= self.idle
    }

    fn create(&mut self, now: Instant) -> (Session, usize) {
        let idle = self.idle;
        self.by_id.retain(|_, e| {
            let keep = now.saturating_duration_since(e.last_seen) < idle;
            if !keep {
                e.ended.cancel();
            }
            keep
        });
        let mut evicted = 0;
        while self.by_id.len() >= self.max {
            let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            self.remove(&oldest);
            evicted += 1;
        }
        let s = Session {
            id: random_hex(),
            csrf: random_hex(),
        };
        self.by_id.insert(
            s.id.clone(),
            Entry {
                csrf: s.csrf.clone(),
                last_seen: now,
                ended: CancellationToken::new(),
            },
        );
        (s, evicted)
    }

    /// The session `id`, used now (its idle time starts again).
    fn touch(&mut self, id: &str, now: Instant) -> Option<String> {
        let e = self.by_id.get(id)?;
        if self.expired(e, now) {
            self.remove(id);
            return None;
        }
        let e = self.by_id.get_mut(id)?;
        e.last_seen = now;
        Some(e.csrf.clone())
    }

    /// How long session `id` lasts if nothing uses it, without using it.
    fn time_left(&mut self, id: &str, now: Instant) -> Option<Duration> {
        let e = self.by_id.get(id)?;
        if self.expired(e, now) {
            self.remove(id);
            return None;
        }
        Some((e.last_seen + self.idle).saturating_duration_since(now))
    }
}

/// The source a guess is counted against: the peer's address, an IPv6
/// address by its /64 (one host usually holds a whole /64). Behind a proxy
/// every client is the proxy: `X-Forwarded-For` is not read, since anyone
/// could send one to escape the limit.
pub fn source(ip: Option<IpAddr>) -> IpAddr {
    match ip.map(super::edge::canonical) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        Some(v4) => v4,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

struct Source {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

/// Wrong tokens per source, and the locks they earn.
#[derive(Default)]
pub struct Guesses {
    sources: HashMap<IpAddr, Source>,
}

/// How long a source is locked after its `failures`-th wrong token.
pub fn lock_after(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_FAILURES + 1)?;
    let factor = 1u32.checked_shl(over.min(31)).unwrap_or(u32::MAX);
    Some(FIRST_LOCK.saturating_mul(factor).min(MAX_LOCK))
}

impl Guesses {
    /// How long `src` must still wait before a token it sends is looked at.
    pub fn locked(&mut self, src: IpAddr, now: Instant) -> Option<Duration> {
        let s = self.sources.get(&src)?;
        let left = s.locked_until?.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }

    /// Counts a wrong token from `src`: how many it has sent, and the lock
    /// it earned, if any.
    pub fn failed(&mut self, src: IpAddr, now: Instant) -> (u32, Option<Duration>) {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&src) {
            self.sources.retain(|_, s| {
                now.saturating_duration_since(s.last_failure) < FORGET_AFTER
                    || s.locked_until.is_some_and(|u| u > now)
            });
            if self.sources.len() >= MAX_SOURCES {
                let quietest = self
                    .sources
                    .iter()
                    .min_by_key(|(_, s)| s.last_failure)
                    .map(|(ip, _)| *ip);
                if let Some(ip) = quietest {
                    self.sources.remove(&ip);
                }
            }
        }
        let s = self.sources.entry(src).or_insert(Source {
            failures: 0,
            last_failure: now,
            locked_until: None,
        });
        if now.saturating_duration_since(s.last_failure) >= FORGET_AFTER {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.last_failure = now;
        let lock = lock_after(s.failures);
        s.locked_until = lock.map(|d| now + d);
        (s.failures, lock)
    }
}

/// What a token tried against the configured one came to.
pub enum Attempt {
    Right,
    /// Wrong; `lock` when this one locked the source out.
    Wrong {
        lock: Option<Duration>,
    },
    /// Not looked at: the source is locked out for `wait` more.
    Locked {
        wait: Duration,
    },
}

/// Seconds for a `Retry-After`, rounded up so a client never comes back early.
pub fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

pub struct Auth {
    token: Option<Secret>,
    sessions: Mutex<Sessions>,
    guesses: Mutex<Guesses>,
    secure_cookies: bool,
    /// Sessions' idle ends and lockouts are read on it (tests move it).
    clock: Clock,
}

impl Auth {
    pub fn new(cfg: &AdminConfig, clock: Clock) -> Auth {
        Auth {
            token: cfg.token.clone(),
            sessions: Mutex::new(Sessions {
                by_id: HashMap::new(),
                idle: cfg.session_idle,
                max: cfg.max_sessions.max(1),
            }),
            guesses: Mutex::new(Guesses::default()),
            secure_cookies: cfg.secure_cookies,
            clock,
        }
    }

    pub fn needs_login(&self) -> bool {
        self.token.is_some()
    }

    /// Tries `given` as the operator's token for the request's source.
    /// `door` names the way in for the log (`login`, `bearer`).
    pub fn attempt(&self, req: &HttpRequest, given: &str, door: &'static str) -> Attempt {
        let Some(token) = &self.token else {
            return Attempt::Wrong { lock: None };
        };
        let src = source(req.peer_addr().map(|a| a.ip()));
        let now = self.clock.instant();
        // Look, compare and count under one lock: parallel guesses cannot
        // all slip in before the first of them is counted.
        let mut guesses = lock(&self.guesses);
        if let Some(wait) = guesses.locked(src, now) {
            drop(guesses);
            // The lock's start was logged; one line per refused guess
            // would let a guesser flood the log.
            tracing::debug!(source = %src, door, wait_secs = whole_secs(wait),
                "operator token not checked: source locked out");
            return Attempt::Locked { wait };
        }
        if same(given, token.expose()) {
            return Attempt::Right;
        }
        let (failures, lock_for) = guesses.failed(src, now);
        drop(guesses);
        match lock_for {
            Some(d) => tracing::warn!(source = %src, door, failures, locked_secs = whole_secs(d),
                "wrong operator token: source locked out"),
            None => tracing::warn!(source = %src, door, failures, "wrong operator token"),
        }
        Attempt::Wrong { lock: lock_for }
    }

    /// A new login session (the token was right).
    pub fn new_session(&self) -> Session {
        let (s, evicted) = lock(&self.sessions).create(self.clock.instant());
        if evicted > 0 {
            tracing::info!(
                evicted,
                "console sessions at [admin] max_sessions: the least recently used ended"
            );
        }
        s
    }

    /// Ends session `id` (logout).
    pub fn end(&self, id: &str) -> bool {
        lock(&self.sessions).remove(id)
    }

    /// Whether the session cookie must be `Secure`: always with
    /// `[admin] secure_cookies`, else when a proxy says the browser came
    /// over HTTPS. Believing a forged `X-Forwarded-Proto` only adds the
    /// flag to the forger's own cookie, so it is safe; its absence never
    /// removes the flag the key sets.
    pub fn secure(&self, req: &HttpRequest) -> bool {
        if self.secure_cookies {
            return true;
        }
        let h = req.headers();
        let forwarded_proto = h
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
        let forwarded = h
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|first| {
                first.split(';').any(|kv| {
                    kv.trim().split_once('=').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("proto")
                            && v.trim_matches('"').eq_ignore_ascii_case("https")
                    })
                })
            });
        forwarded_proto || forwarded
    }

    pub fn cookie(&self, req: &HttpRequest, session: &Session) -> String {
        let secure = if self.secure(req) { "; Secure" } else { "" };
        format!(
            "{COOKIE_NAME}={}; HttpOnly; SameSite=Strict; Path=/{secure}",
            session.id
        )
    }

    /// The header that makes the browser forget its session cookie.
    pub fn cleared_cookie(&self, req: &HttpRequest) -> String {
        let secure = if self.secure(req) { "; Secure" } else { "" };
        format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}")
    }

    fn cookie_id(req: &HttpRequest) -> Option<String> {
        let header = req.headers().get(COOKIE)?.to_str().ok()?;
        header
            .split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE_NAME)
            .map(|(_, v)| v.to_owned())
    }

    /// The live session the request carries; using it restarts its idle
    /// time. Sessions exist only with a token.
    pub fn session(&self, req: &HttpRequest) -> Option<Session> {
        self.token.as_ref()?;
        let id = Self::cookie_id(req)?;
        let csrf = lock(&self.sessions).touch(&id, self.clock.instant())?;
        Some(Session { id, csrf })
    }

    /// The request's session as an event stream follows it: its id and the
    /// token cancelled when it ends.
    pub fn watch(&self, req: &HttpRequest) -> Option<(String, CancellationToken)> {
        self.token.as_ref()?;
        let id = Self::cookie_id(req)?;
        let ended = lock(&self.sessions).by_id.get(&id)?.ended.clone();
        Some((id, ended))
    }

    /// How long session `id` lasts if nothing uses it; `None` once it has
    /// ended.
    pub fn time_left(&self, id: &str) -> Option<Duration> {
        lock(&self.sessions).time_left(id, self.clock.instant())
    }

    /// Who is asking (`token`, `console`, `local`), or the answer that
    /// refuses them. `changes` marks a state-changing request. `edge` has
    /// checked `Host`, and `Origin` when there is one.
    pub fn check(&self, req: &HttpRequest, changes: bool) -> Result<&'static str, ApiError> {
        let bearer = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let has_origin = req.headers().contains_key(ORIGIN);
        if self.token.is_none() {
            // No token: loopback only. A browser's request carries an
            // Origin, which `edge` found to be the console's own page.
            return Ok(if has_origin { "console" } else { "local" });
        }
        if let Some(given) = bearer {
            // A bearer header is never sent by a browser on its own, so no
            // Origin is needed: it is not an ambient credential.
            return match self.attempt(req, given.trim(), "bearer") {
                Attempt::Right => Ok("token"),
                Attempt::Wrong { lock } => Err(unauthorized(lock)),
                Attempt::Locked { wait } => Err(rate_limited(wait)),
            };
        }
        let Some(session) = self.session(req) else {
            return Err(unauthorized(None));
        };
        if !changes {
            return Ok("console");
        }
        // The cookie comes with every request the browser makes: a change
        // needs both its page's CSRF token and the page's Origin (browsers
        // send one on every POST; a cookie without it is replayed).
        if !has_origin {
            return Err(ApiError::Origin(
                "a state-changing request with the console's session must carry its Origin".into(),
            ));
        }
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if same(given, &session.csrf) {
            return Ok("console");
        }
        Err(ApiError::Csrf(
            "a state-changing request from the console needs its CSRF token".into(),
        ))
    }
}

pub fn unauthorized(lock: Option<Duration>) -> ApiError {
    ApiError::TokenNeeded {
        retry_after: lock.map(whole_secs),
    }
}

pub fn rate_limited(wait: Duration) -> ApiError {
    ApiError::LockedOut {
        retry_after: whole_secs(wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_start_after_the_free_mistakes_and_double_up_to_the_cap() {
        assert_eq!(lock_after(FREE_FAILURES), None);
        assert_eq!(lock_after(FREE_FAILURES + 1), Some(FIRST_LOCK));
        assert_eq!(lock_after(FREE_FAILURES + 2), Some(FIRST_LOCK * 2));
        assert_eq!(lock_after(FREE_FAILURES + 3), Some(FIRST_LOCK * 4));
        assert_eq!(lock_after(FREE_FAILURES + 40), Some(MAX_LOCK));
        assert_eq!(lock_after(u32::MAX), Some(MAX_LOCK));
    }

    #[test]
    fn a_locked_source_waits_others_do_not_and_quiet_ones_are_forgiven() {
        let mut g = Guesses::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for n in 1..=FREE_FAILURES {
            assert_eq!(g.failed(a, t0), (n, None));
            assert_eq!(g.locked(a, t0), None);
        }
        assert_eq!(g.failed(a, t0), (FREE_FAILURES + 1, Some(FIRST_LOCK)));
        assert_eq!(g.locked(a, t0), Some(FIRST_LOCK));
        assert_eq!(g.locked(b, t0), None, "per source");
        let t1 = t0 + FIRST_LOCK;
        assert_eq!(g.locked(a, t1), None);
        assert_eq!(g.failed(a, t1).1, Some(FIRST_LOCK * 2));
        let later = t1 + FORGET_AFTER;
        assert_eq!(
            g.failed(a, later),
            (1, None),
            "forgotten after a quiet while"
        );
    }

    #[test]
    fn an_ipv6_source_is_its_64_and_a_mapped_ipv4_is_itself() {
        assert_eq!(
            source(Some("2001:db8:1:2:aaaa::1".parse().unwrap())),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source(Some("::ffff:10.0.0.1".parse().unwrap())),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    fn sessions(max: usize) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            idle: Duration::from_secs(10),
            max,
        }
    }

    #[test]
    fn sessions_end_when_idle_and_the_least_recently_used_makes_room() {
        let mut s = sessions(2);
        let t0 = Instant::now();
        let (a, _) = s.create(t0);
        let (b, _) = s.create(t0 + Duration::from_secs(1));
        // `a` used last: `b` is the least recently used.
        assert!(s.touch(&a.id, t0 + Duration::from_secs(2)).is_some());
        let ended = s.by_id[&b.id].ended.clone();
        let (c, evicted) = s.create(t0 + Duration::from_secs(3));
        assert_eq!(evicted, 1);
        assert!(ended.is_cancelled(), "its event streams close");
        assert!(s.touch(&b.id, t0 + Duration::from_secs(3)).is_none());
        assert!(s.touch(&c.id, t0 + Duration::from_secs(3)).is_some());
        assert_eq!(
            s.time_left(&a.id, t0 + Duration::from_secs(3)),
            Some(Duration::from_secs(9))
        );
        assert!(s.touch(&a.id, t0 + Duration::from_secs(12)).is_none());
        assert!(s.time_left(&a.id, t0 + Duration::from_secs(12)).is_none());
    }
}
