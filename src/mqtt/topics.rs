//! Topic names of the device contract (devices/README.md).

/// What a device publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    Sale,
    Progress,
    Cancel,
    Status,
    Delivered,
}

impl DeviceTopic {
    pub const ALL: [DeviceTopic; 5] = [
        DeviceTopic::Sale,
        DeviceTopic::Progress,
        DeviceTopic::Cancel,
        DeviceTopic::Status,
        DeviceTopic::Delivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceTopic::Sale => "sale",
            DeviceTopic::Progress => "progress",
            DeviceTopic::Cancel => "cancel",
            DeviceTopic::Status => "status",
            DeviceTopic::Delivered => "delivered",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
        }
    }

    /// The filters qrgate subscribes to.
    pub fn subscriptions(&self) -> Vec<String> {
        DeviceTopic::ALL
            .iter()
            .map(|t| format!("{}/pos/+/{}", self.prefix, t.as_str()))
            .collect()
    }

    /// Where an instance marks the end of what its session kept for it
    /// while it was away (`mqtt::connection`).
    pub fn mark(&self, instance: &str) -> String {
        format!("{}/instances/{instance}/mark", self.prefix)
    }

    pub fn state(&self, pos: &str) -> String {
        format!("{}/pos/{}/state", self.prefix, pos)
    }

    /// Splits `{prefix}/pos/{pos}/{kind}`; `None` for anything else.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, Option<DeviceTopic>)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/pos/")?;
        let (pos, kind) = rest.split_once('/')?;
        let kind = DeviceTopic::ALL.into_iter().find(|t| t.as_str() == kind);
        Some((pos, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_split_into_pos_and_kind() {
        let t = Topics::new("qrgate");
        assert_eq!(
            t.parse("qrgate/pos/pump-1/sale"),
            Some(("pump-1", Some(DeviceTopic::Sale)))
        );
        assert_eq!(t.parse("qrgate/pos/pump-1/other"), Some(("pump-1", None)));
        assert_eq!(t.parse("other/pos/pump-1/sale"), None);
        assert_eq!(t.state("pump-1"), "qrgate/pos/pump-1/state");
        assert_eq!(t.subscriptions().len(), 5);
    }
}
