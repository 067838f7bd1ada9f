//! HTTP authentication as the PTS-2 web server does it: basic or digest
//! (DIP switch 2), one of the controller's users. Both sides are here: the
//! bridge answers the controller's challenge, the simulator checks answers.
//!
//! Digest is RFC 7616's MD5 with `qop="auth"`, the form the controller
//! offers; the bridge also answers a challenge without `qop` (RFC 2069).

use base64::Engine;
use md5::{Digest, Md5};

/// Which scheme the controller's DIP switch 2 selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Switch 2 ON.
    Basic,
    /// Switch 2 OFF (the controller's default).
    Digest,
}

/// A user of the controller.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

// Never print the password.
impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

/// `Authorization: Basic …`.
pub fn basic(login: &Login) -> String {
    let pair = format!("{}:{}", login.user, login.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// The parameters of a `WWW-Authenticate: Digest …` challenge or of an
/// `Authorization: Digest …` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses `Digest k=v, k="v", …`; `None` when it is not digest.
    pub fn parse_digest(header: &str) -> Option<Params> {
        let rest = header.trim();
        let (scheme, rest) = rest.split_at(rest.find(char::is_whitespace)?);
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let mut out = Vec::new();
        let mut chars = rest.trim().chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if key.is_empty() {
                break;
            }
            let value = if chars.peek() == Some(&'"') {
                chars.next();
                let mut v = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => v.extend(chars.next()),
                        '"' => break,
                        c => v.push(c),
                    }
                }
                v
            } else {
                chars
                    .by_ref()
                    .take_while(|c| *c != ',')
                    .collect::<String>()
                    .trim()
                    .to_owned()
            };
            out.push((key.trim().to_ascii_lowercase(), value));
        }
        Some(Params(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer to a digest challenge for one request.
pub fn digest(
    login: &Login,
    challenge: &Params,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let realm = challenge.get("realm").unwrap_or_default();
    let nonce = challenge.get("nonce").unwrap_or_default();
    let ha1 = md5_hex(&format!("{}:{realm}:{}", login.user, login.password));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    let qop_auth = challenge
        .get("qop")
        .is_some_and(|q| q.split(',').any(|q| q.trim() == "auth"));
    let nc = format!("{nc:08x}");
    let mut header = format!(
        r#"Digest username="{}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5"#,
        login.user
    );
    let response = if qop_auth {
        header.push_str(&format!(r#", qop=auth, nc={nc}, cnonce="{cnonce}""#));
        md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
    } else {
        md5_hex(&format!("{ha1}:{nonce}:{ha2}"))
    };
    header.push_str(&format!(r#", response="{response}""#));
    if let Some(opaque) = challenge.get("opaque") {
        header.push_str(&format!(r#", opaque="{opaque}""#));
    }
    header
}

/// The server's side: whose request `authorization` authenticates, if
/// anyone's. `nonce_ok` says whether a digest nonce is one the server gave.
pub fn verify<'a>(
    scheme: Scheme,
    authorization: Option<&str>,
    method: &str,
    realm: &str,
    users: &'a [Login],
    nonce_ok: impl Fn(&str) -> bool,
) -> Option<&'a Login> {
    let header = authorization?;
    match scheme {
        Scheme::Basic => users.iter().find(|u| header.trim() == basic(u)),
        Scheme::Digest => {
            let p = Params::parse_digest(header)?;
            let user = users
                .iter()
                .find(|u| Some(u.user.as_str()) == p.get("username"))?;
            let nonce = p.get("nonce")?;
            if p.get("realm") != Some(realm) || !nonce_ok(nonce) {
                return None;
            }
            let uri = p.get("uri")?;
            let ha1 = md5_hex(&format!("{}:{realm}:{}", user.user, user.password));
            let ha2 = md5_hex(&format!("{method}:{uri}"));
            let expected = match p.get("qop") {
                Some("auth") => md5_hex(&format!(
                    "{ha1}:{nonce}:{}:{}:auth:{ha2}",
                    p.get("nc")?,
                    p.get("cnonce")?
                )),
                Some(_) => return None,
                None => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
            };
            (p.get("response") == Some(expected.as_str())).then_some(user)
        }
    }
}

/// The server's challenge for `scheme`.
pub fn challenge(scheme: Scheme, realm: &str, nonce: &str) -> String {
    match scheme {
        Scheme::Basic => format!(r#"Basic realm="{realm}""#),
        Scheme::Digest => {
            format!(r#"Digest realm="{realm}", qop="auth", nonce="{nonce}", algorithm=MD5"#)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Login {
        Login {
            user: "Mufasa".into(),
            password: "Circle Of Life".into(),
        }
    }

    #[test]
    fn digest_answers_rfc_2617s_own_example() {
        // RFC 2617, section 3.5.
        let challenge = Params::parse_digest(
            r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        let header = digest(
            &login(),
            &challenge,
            "GET",
            "/dir/index.html",
            1,
            "0a4f113b",
        );
        assert!(
            header.contains(r#"response="6629fae49393a05397450978507c4ef1""#),
            "{header}"
        );
        assert!(header.contains(r#"opaque="5ccc069c403ebaf9f0171e9517f40e41""#));
        let answer = Params::parse_digest(&header).unwrap();
        assert_eq!(answer.get("nc"), Some("00000001"));
    }

    #[test]
    fn the_server_accepts_the_right_password_only_and_its_own_nonces() {
        let users = [login()];
        let realm = "PTS-2";
        let asked = Params::parse_digest(&challenge(Scheme::Digest, realm, "n1")).unwrap();
        let good = digest(&login(), &asked, "POST", "/jsonPTS", 1, "c");
        let ok = |h: &str| {
            verify(Scheme::Digest, Some(h), "POST", realm, &users, |n| {
                n == "n1"
            })
        };
        assert_eq!(ok(&good).map(|u| u.user.as_str()), Some("Mufasa"));
        let wrong = Login {
            password: "x".into(),
            ..login()
        };
        assert!(ok(&digest(&wrong, &asked, "POST", "/jsonPTS", 1, "c")).is_none());
        let stale = Params::parse_digest(&challenge(Scheme::Digest, realm, "n0")).unwrap();
        assert!(ok(&digest(&login(), &stale, "POST", "/jsonPTS", 1, "c")).is_none());
        assert!(ok(&basic(&login())).is_none());
        assert!(verify(Scheme::Digest, None, "POST", realm, &users, |_| true).is_none());

        assert!(verify(
            Scheme::Basic,
            Some(&basic(&login())),
            "POST",
            realm,
            &users,
            |_| false
        )
        .is_some());
        assert!(verify(
            Scheme::Basic,
            Some(&basic(&wrong)),
            "POST",
            realm,
            &users,
            |_| false
        )
        .is_none());
    }

    #[test]
    fn odd_headers_are_refused_not_panicked_on() {
        for h in [
            "",
            "Digest",
            "Digest ",
            "Digest =",
            r#"Digest a="unterminated"#,
            "Bearer x",
            "Digest ,,,",
        ] {
            let _ = Params::parse_digest(h);
            assert!(verify(Scheme::Digest, Some(h), "POST", "r", &[login()], |_| true).is_none());
        }
        assert!(!format!("{:?}", login()).contains("Circle"));
    }
}
