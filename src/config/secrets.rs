//! Where each secret comes from. A secret is never read from the
//! configuration file: it lives in the environment (`VAR`), in a file the
//! environment names (`VAR_FILE`, for Docker and Kubernetes secrets), or in
//! systemd's credentials directory (`$CREDENTIALS_DIRECTORY/<name>`, from
//! `LoadCredential=`), where `<name>` is the variable's name in lower case
//! without `QRGATE_` (`QRGATE_MP_ACCESS_TOKEN` -> `mp_access_token`).
//!
//! Any of the three may hold it; two that hold different values stop the
//! start, because an operator who rotated one and not the other would
//! otherwise run on a secret they did not choose. A `VAR_FILE` that cannot be
//! read stops it too: a path that was set means the secret was meant to be
//! there.

use std::path::{Path, PathBuf};

use super::Secret;

/// systemd's credentials directory (`LoadCredential=`, `SetCredential=`).
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";

/// The credential holding device passwords, `username:password` lines.
pub const DEVICE_PASSWORDS_CREDENTIAL: &str = "device_passwords";

/// The credential that may hold `var`.
pub fn credential_name(var: &str) -> String {
    var.strip_prefix("QRGATE_")
        .unwrap_or(var)
        .to_ascii_lowercase()
}

/// Where a secret was found, as the operator would name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Env(String),
    File { var: String, path: PathBuf },
    Credential { name: String, path: PathBuf },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "{var}"),
            Origin::File { var, path } => write!(f, "{var} ({})", path.display()),
            Origin::Credential { name, path } => {
                write!(f, "credential {name} ({})", path.display())
            }
        }
    }
}

/// The environment, as configuration loading sees it (tests pass their own).
pub struct Sources<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Sources<'a> {
    pub fn new(env: &'a dyn Fn(&str) -> Option<String>) -> Sources<'a> {
        Sources { env }
    }

    fn var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// `$CREDENTIALS_DIRECTORY/<name>`, when that file exists.
    pub fn credential(&self, name: &str) -> Option<PathBuf> {
        let path = Path::new(&self.var(CREDENTIALS_DIRECTORY_ENV)?).join(name);
        path.exists().then_some(path)
    }

    /// `var`'s secret from whichever sources hold it; `Ok(None)` when none
    /// does. The error names the variable (never the value).
    pub fn get(&self, var: &str) -> Result<Option<(Secret, Origin)>, String> {
        let mut found: Vec<(String, Origin)> = Vec::new();
        if let Some(v) = self.var(var) {
            found.push((v, Origin::Env(var.to_owned())));
        }
        let file_var = format!("{var}_FILE");
        if let Some(p) = self.var(&file_var) {
            let path = PathBuf::from(p);
            let origin = Origin::File {
                var: file_var,
                path: path.clone(),
            };
            found.push((read(&path, &origin)?, origin));
        }
        let name = credential_name(var);
        if let Some(path) = self.credential(&name) {
            let origin = Origin::Credential {
                name,
                path: path.clone(),
            };
            found.push((read(&path, &origin)?, origin));
        }
        if let Some((_, a)) = found.first() {
            if let Some((_, b)) = found.iter().find(|(v, _)| *v != found[0].0) {
                return Err(format!(
                    "{var}: {a} and {b} hold different values; keep one of them"
                ));
            }
        }
        Ok(found.into_iter().next().map(|(v, o)| (Secret::new(v), o)))
    }
}

/// A secret file's text, without its trailing line end.
pub fn read(path: &Path, origin: &Origin) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{origin}: cannot be read: {e}"))?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return Err(format!("{origin}: the file is empty"));
    }
    Ok(text.to_owned())
}

/// Device logins from a `username:password` file: one a line, `#` starts a
/// comment line, blank lines are skipped. A bad line is named by its number,
/// never quoted (it may hold a password).
pub fn device_passwords(text: &str, origin: &str) -> Result<Vec<(String, Secret)>, Vec<String>> {
    let mut logins: Vec<(String, Secret)> = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, pw))
                if !user.trim().is_empty()
                    && !user.contains(char::is_whitespace)
                    && !pw.is_empty() =>
            {
                if logins.iter().any(|(u, _)| u == user) {
                    errors.push(format!("{origin} line {n}: {user:?} is listed twice"));
                } else {
                    logins.push((user.to_owned(), Secret::new(pw)));
                }
            }
            _ => errors.push(format!(
                "{origin} line {n}: expected `username:password` (a username without spaces, a \
                 non-empty password)"
            )),
        }
    }
    if errors.is_empty() {
        Ok(logins)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: Vec<(String, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn credential_names_are_the_variables_in_lower_case_without_the_prefix() {
        assert_eq!(credential_name("QRGATE_MP_ACCESS_TOKEN"), "mp_access_token");
        assert_eq!(credential_name("PUMP1_PW"), "pump1_pw");
    }

    #[test]
    fn a_secret_comes_from_the_variable_its_file_or_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "APP_USR-1\n").unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("mp_access_token"), "APP_USR-1\r\n").unwrap();
        let var = "QRGATE_MP_ACCESS_TOKEN";
        let cases = [
            (vec![(var, "APP_USR-1")], "QRGATE_MP_ACCESS_TOKEN"),
            (
                vec![("QRGATE_MP_ACCESS_TOKEN_FILE", file.to_str().unwrap())],
                "QRGATE_MP_ACCESS_TOKEN_FILE",
            ),
            (
                vec![(CREDENTIALS_DIRECTORY_ENV, creds.to_str().unwrap())],
                "credential mp_access_token",
            ),
            // Agreeing sources are fine; the variable is named first.
            (
                vec![
                    (var, "APP_USR-1"),
                    ("QRGATE_MP_ACCESS_TOKEN_FILE", file.to_str().unwrap()),
                    (CREDENTIALS_DIRECTORY_ENV, creds.to_str().unwrap()),
                ],
                "QRGATE_MP_ACCESS_TOKEN",
            ),
        ];
        for (pairs, from) in cases {
            let env = env_of(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            let (secret, origin) = Sources::new(&env).get(var).unwrap().unwrap();
            assert_eq!(secret.expose(), "APP_USR-1", "{pairs:?}");
            assert!(
                origin.to_string().starts_with(from),
                "{origin} for {pairs:?}"
            );
        }
        let none = env_of(vec![]);
        assert!(Sources::new(&none).get(var).unwrap().is_none());
    }

    #[test]
    fn disagreeing_sources_and_unreadable_files_are_refused_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let var = "QRGATE_MQTT_PASSWORD";
        let env = env_of(vec![
            (var.into(), "from-env".into()),
            (format!("{var}_FILE"), file.display().to_string()),
        ]);
        let e = Sources::new(&env).get(var).unwrap_err();
        assert!(
            e.contains("QRGATE_MQTT_PASSWORD_FILE") && e.contains("different"),
            "{e}"
        );
        assert!(!e.contains("from-env") && !e.contains("from-file"), "{e}");

        let env = env_of(vec![(format!("{var}_FILE"), "/nonexistent/pw".into())]);
        let e = Sources::new(&env).get(var).unwrap_err();
        assert!(
            e.contains("QRGATE_MQTT_PASSWORD_FILE") && e.contains("/nonexistent/pw"),
            "{e}"
        );

        std::fs::write(&file, "\n").unwrap();
        let env = env_of(vec![(format!("{var}_FILE"), file.display().to_string())]);
        let e = Sources::new(&env).get(var).unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_device_password_file_takes_comments_and_blank_lines_and_names_bad_lines_by_number() {
        let ok = "# pumps\npump-1:s3cret:with:colons\n\n  vending-1:pw2  \n";
        let logins = device_passwords(ok, "f").unwrap();
        assert_eq!(logins.len(), 2);
        assert_eq!(logins[0].0, "pump-1");
        assert_eq!(logins[0].1.expose(), "s3cret:with:colons");
        assert_eq!(logins[1].0, "vending-1");
        let bad = "pump-1:hunter2\nno-password-hunter3\npump 2:hunter4\n:hunter5\npump-1:hunter6\npump-3:\n";
        let errors = device_passwords(bad, "devices.txt").unwrap_err();
        let text = errors.join("\n");
        for n in [2, 3, 4, 5, 6] {
            assert!(text.contains(&format!("devices.txt line {n}:")), "{text}");
        }
        assert!(!text.contains("line 1:"), "{text}");
        assert!(!text.contains("hunter"), "a password is printed: {text}");
    }
}
