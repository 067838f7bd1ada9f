use std::fmt;

/// How to reach the broker and which POS to play.
///
/// Build it with [`DeviceConfig::new`] and the chained setters; the fields are
/// public so tests can also tweak them directly.
#[derive(Clone)]
pub struct DeviceConfig {
    /// Broker host, e.g. `"127.0.0.1"`.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix shared with qrgate (default `"qrgate"`); topics are `{prefix}/pos/{pos_id}/...`.
    pub topic_prefix: String,
    /// The POS this device plays.
    pub pos_id: String,
    /// MQTT client id; `None` means the username when there is one (a broker
    /// may accept only client ids derived from the login's username: README,
    /// "Client ids"), else `device-{pos_id}`.
    pub client_id: Option<String>,
    /// Broker user name, if the broker requires one.
    pub username: Option<String>,
    /// Broker password, if the broker requires one.
    pub password: Option<String>,
    /// Whether to announce presence: last will `offline` (retained) and a
    /// retained `online` after every (re)connect. Default `true`.
    pub announce_presence: bool,
}

impl DeviceConfig {
    /// A config with the default prefix `qrgate`, no credentials and presence on.
    pub fn new(host: impl Into<String>, port: u16, pos_id: impl Into<String>) -> Self {
        DeviceConfig {
            host: host.into(),
            port,
            topic_prefix: "qrgate".to_string(),
            pos_id: pos_id.into(),
            client_id: None,
            username: None,
            password: None,
            announce_presence: true,
        }
    }

    /// Use another topic prefix (must match qrgate's).
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Authenticate with a user name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Use an explicit MQTT client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Neither set a last will nor publish `online`: plays a device that never
    /// speaks presence (qrgate then treats it as online), or an observer that
    /// must not touch the POS's status topic.
    pub fn without_presence(mut self) -> Self {
        self.announce_presence = false;
        self
    }

    /// The client id actually used.
    pub fn effective_client_id(&self) -> String {
        self.client_id
            .clone()
            .or_else(|| self.username.clone())
            .unwrap_or_else(|| format!("device-{}", self.pos_id))
    }

    /// `{prefix}/pos/{pos_id}/{subtopic}`.
    pub fn topic(&self, subtopic: &str) -> String {
        format!(
            "{}/pos/{}/{}",
            self.topic_prefix.trim_end_matches('/'),
            self.pos_id,
            subtopic
        )
    }
}

// Hand-written so that logging a config never leaks the broker password.
impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("topic_prefix", &self.topic_prefix)
            .field("pos_id", &self.pos_id)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("announce_presence", &self.announce_presence)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_setters() {
        let cfg = DeviceConfig::new("h", 1, "pump-1");
        assert_eq!(cfg.topic_prefix, "qrgate");
        assert!(cfg.announce_presence);
        assert_eq!(cfg.effective_client_id(), "device-pump-1");
        assert_eq!(cfg.topic("sale"), "qrgate/pos/pump-1/sale");

        let cfg = cfg
            .topic_prefix("site7/")
            .client_id("c1")
            .credentials("u", "secret")
            .without_presence();
        assert_eq!(cfg.topic("state"), "site7/pos/pump-1/state");
        assert_eq!(cfg.effective_client_id(), "c1");
        assert!(!cfg.announce_presence);
        assert!(!format!("{cfg:?}").contains("secret"));
    }

    #[test]
    fn with_a_login_the_client_id_is_the_username_unless_set() {
        let cfg = DeviceConfig::new("h", 1, "pump-1").credentials("pump-1", "pw");
        assert_eq!(cfg.effective_client_id(), "pump-1");
        assert_eq!(cfg.client_id("pump-1-b").effective_client_id(), "pump-1-b");
    }
}
