//! Who may connect to the embedded broker, and under which client id.
//!
//! MQTT keeps one session per client id: a second connection with an id in
//! use disconnects the first (and, with `clean_session = false`, inherits its
//! subscriptions). rumqttd checks a login's password but not the id it comes
//! with, so a device logged in with its own password and qrgate's client id
//! cut qrgate off and received other POS's sales. So an id belongs to a login:
//!
//! - a device may use its username, or its username followed by `-` and
//!   anything (`pump-1`, `pump-1-display`), or an empty id (the broker then
//!   makes up a unique one);
//! - qrgate's client id (`[mqtt] client_id`), and the ids derived from it the
//!   same way, belong to qrgate's own login, made anew at every start;
//! - when an id derives from several logins' names (`pump-1-2` from `pump-1`
//!   and from `pump-1-2`), it belongs to the longest: the login whose name it
//!   is. Configuration refuses a device login named like qrgate's id or one
//!   derived from it, so qrgate's ids are never a device's.
//!
//! [`RefusalLog`] keeps a device that retries a refused login in a loop from
//! flooding the log: one line per login, then one per growing interval with
//! the number refused meanwhile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Who logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Qrgate,
    Device(String),
}

struct Login {
    who: Who,
    username: String,
    password: Secret,
    /// The name its client ids derive from.
    base: String,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such username, or the wrong password.
    BadLogin,
    /// A good login with a client id that belongs to another login (or to
    /// nobody: ids derive from the login's own name).
    ClientId { reserved_for_qrgate: bool },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadLogin => "bad_login",
            Refusal::ClientId {
                reserved_for_qrgate: true,
            } => "client_id_of_qrgate",
            Refusal::ClientId { .. } => "client_id_not_its_own",
        }
    }
}

/// The embedded broker's logins.
pub struct Logins {
    logins: Vec<Login>,
}

/// `id` is `base` or `base-…`.
fn derives(id: &str, base: &str) -> bool {
    id.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

impl Logins {
    /// `devices`: username and password of each device (and `[[mqtt.users]]`);
    /// `qrgate`: qrgate's own login and its client id.
    pub fn new(devices: Vec<(String, Secret)>, qrgate: Option<(String, Secret, String)>) -> Logins {
        let mut logins: Vec<Login> = devices
            .into_iter()
            .map(|(username, password)| Login {
                who: Who::Device(username.clone()),
                base: username.clone(),
                username,
                password,
            })
            .collect();
        if let Some((username, password, client_id)) = qrgate {
            logins.push(Login {
                who: Who::Qrgate,
                username,
                password,
                base: client_id,
            });
        }
        Logins { logins }
    }

    /// The login that owns `client_id`: the longest name it derives from
    /// (qrgate's first on a tie, which configuration rules out anyway).
    fn owner(&self, client_id: &str) -> Option<&Who> {
        self.logins
            .iter()
            .filter(|l| derives(client_id, &l.base))
            .max_by_key(|l| (l.base.len(), l.who == Who::Qrgate))
            .map(|l| &l.who)
    }

    /// Checks a CONNECT's login and client id.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> Result<(), Refusal> {
        // Every entry is compared, in constant time, whatever matches, and
        // each match is remembered by who it is, not by its name: a device
        // cannot become qrgate by sharing its login's name.
        let mut matched: Vec<&Who> = Vec::new();
        for l in &self.logins {
            let same = l.username.as_bytes().ct_eq(username.as_bytes())
                & l.password.expose().as_bytes().ct_eq(password.as_bytes());
            if bool::from(same) {
                matched.push(&l.who);
            }
        }
        if matched.is_empty() {
            return Err(Refusal::BadLogin);
        }
        // An empty id: the broker makes up a unique one, nobody's session.
        if client_id.is_empty() {
            return Ok(());
        }
        match self.owner(client_id) {
            Some(owner) if matched.contains(&owner) => Ok(()),
            owner => Err(Refusal::ClientId {
                reserved_for_qrgate: owner == Some(&Who::Qrgate),
            }),
        }
    }
}

/// When to log a refused login again: the first refusal of a username is
/// logged, then at most one line per interval (1 minute, doubling up to an
/// hour) with the number refused since. Memory is bounded: at most
/// `MAX_TRACKED` usernames, then the rest share one entry.
#[derive(Debug, Default)]
pub struct RefusalLog {
    by_user: HashMap<String, Backoff>,
}

#[derive(Debug)]
struct Backoff {
    next: Instant,
    every: Duration,
    /// Refused since the last line.
    since: u64,
}

const FIRST_INTERVAL: Duration = Duration::from_secs(60);
const LONGEST_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_TRACKED: usize = 1024;
/// The shared entry of usernames beyond `MAX_TRACKED`.
pub const OTHERS: &str = "(other usernames)";

impl RefusalLog {
    /// A refusal of `username` (already cut short) at `now`: `Some(n)` when a
    /// line is due, `n` being the refusals it covers (this one included).
    pub fn refused(&mut self, username: &str, now: Instant) -> Option<u64> {
        if !self.by_user.contains_key(username) && self.by_user.len() >= MAX_TRACKED {
            // Usernames whose interval ran out long ago say nothing more.
            self.by_user
                .retain(|_, b| now < b.next + LONGEST_INTERVAL || b.since > 0);
        }
        let key = if self.by_user.contains_key(username) || self.by_user.len() < MAX_TRACKED {
            username
        } else {
            OTHERS
        };
        match self.by_user.get_mut(key) {
            None => {
                self.by_user.insert(
                    key.to_owned(),
                    Backoff {
                        next: now + FIRST_INTERVAL,
                        every: FIRST_INTERVAL,
                        since: 0,
                    },
                );
                Some(1)
            }
            Some(b) => {
                b.since += 1;
                if now < b.next {
                    return None;
                }
                let n = b.since;
                b.since = 0;
                b.every = (b.every * 2).min(LONGEST_INTERVAL);
                b.next = now + b.every;
                Some(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins() -> Logins {
        Logins::new(
            vec![
                ("pump-1".into(), Secret::new("p1")),
                ("pump-1-2".into(), Secret::new("p12")),
                ("vending-1".into(), Secret::new("v1")),
            ],
            Some(("qrgate.internal".into(), Secret::new("q"), "qrgate".into())),
        )
    }

    #[test]
    fn a_device_uses_its_own_name_or_one_derived_from_it() {
        let l = logins();
        for id in ["pump-1", "pump-1-display", "pump-1-", ""] {
            assert_eq!(l.check(id, "pump-1", "p1"), Ok(()), "{id}");
        }
        // Another device's, or one derived from nobody.
        for id in [
            "vending-1",
            "device-pump-1",
            "pump-10",
            "pump-1-2",
            "pump-1-2-x",
            "x",
        ] {
            assert_eq!(
                l.check(id, "pump-1", "p1"),
                Err(Refusal::ClientId {
                    reserved_for_qrgate: false
                }),
                "{id}"
            );
        }
        // The longer name owns what derives from it.
        assert_eq!(l.check("pump-1-2-x", "pump-1-2", "p12"), Ok(()));
    }

    #[test]
    fn qrgates_id_is_qrgates_own_logins_alone() {
        let l = logins();
        for id in ["qrgate", "qrgate-probe"] {
            assert_eq!(l.check(id, "qrgate.internal", "q"), Ok(()));
            assert_eq!(
                l.check(id, "pump-1", "p1"),
                Err(Refusal::ClientId {
                    reserved_for_qrgate: true
                })
            );
        }
        // qrgate's login cannot take a device's id either.
        assert!(l.check("pump-1", "qrgate.internal", "q").is_err());
        // A wrong password is refused before the id is looked at.
        assert_eq!(
            l.check("qrgate", "qrgate.internal", "x"),
            Err(Refusal::BadLogin)
        );
        assert_eq!(l.check("pump-1", "pump-1", "v1"), Err(Refusal::BadLogin));
    }

    #[test]
    fn sharing_qrgates_login_name_does_not_make_a_device_qrgate() {
        let l = Logins::new(
            vec![("qrgate.internal".into(), Secret::new("device-pw"))],
            Some(("qrgate.internal".into(), Secret::new("q"), "qrgate".into())),
        );
        assert!(l.check("qrgate", "qrgate.internal", "device-pw").is_err());
        assert_eq!(l.check("qrgate", "qrgate.internal", "q"), Ok(()));
    }

    #[test]
    fn a_login_retrying_in_a_loop_is_logged_once_then_with_backoff() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(log.refused("pump-1", at(0)), Some(1));
        // A thousand retries in the first minute: silent.
        for i in 0..1000 {
            assert_eq!(log.refused("pump-1", at(i % 59)), None);
        }
        // Then one line for all of them, and the interval doubles.
        assert_eq!(log.refused("pump-1", at(60)), Some(1001));
        assert_eq!(log.refused("pump-1", at(179)), None);
        assert_eq!(log.refused("pump-1", at(180)), Some(2));
        // Each username its own.
        assert_eq!(log.refused("pump-2", at(180)), Some(1));
    }

    #[test]
    fn memory_is_bounded_whatever_usernames_are_tried() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..5000 {
            log.refused(&format!("u{i}"), t0);
        }
        assert!(log.by_user.len() <= MAX_TRACKED + 1);
        assert!(log.by_user.contains_key(OTHERS));
    }
}
