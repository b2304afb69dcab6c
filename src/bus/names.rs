//! Channel and key names. Everything of a tenant lives under
//! `walcast:{tenant}:`, so tenants can share one Redis.

/// The names of one tenant's channels and keys.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names for `tenant` (validated by the config: `[A-Za-z0-9_.-]`).
    pub fn new(tenant: &str) -> Self {
        Names {
            prefix: format!("walcast:{tenant}:"),
        }
    }

    /// Channel: every change, unfiltered, for trusted consumers.
    pub fn firehose(&self) -> String {
        format!("{}firehose", self.prefix)
    }

    /// Channel: gateways → daemon, subscription requests ([`super::Control`]).
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// Channel: daemon → one gateway, replies and authorized events.
    pub fn gateway(&self, gateway: &str) -> String {
        format!("{}gateway:{gateway}", self.prefix)
    }

    /// Set: the ids of gateways that have registered subscriptions.
    pub fn gateways(&self) -> String {
        format!("{}gateways", self.prefix)
    }

    /// Hash: a gateway's subscriptions, id → [`super::Subscription`] JSON.
    /// The registry the daemon recovers from after a restart.
    pub fn subscriptions(&self, gateway: &str) -> String {
        format!("{}gateway:{gateway}:subscriptions", self.prefix)
    }

    /// String with a TTL: present while the gateway is alive.
    pub fn lease(&self, gateway: &str) -> String {
        format!("{}gateway:{gateway}:lease", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_under_the_tenant_prefix() {
        let n = Names::new("t1");
        assert_eq!(n.firehose(), "walcast:t1:firehose");
        assert_eq!(n.control(), "walcast:t1:control");
        assert_eq!(n.gateway("g1"), "walcast:t1:gateway:g1");
        assert_eq!(n.gateways(), "walcast:t1:gateways");
        assert_eq!(n.subscriptions("g1"), "walcast:t1:gateway:g1:subscriptions");
        assert_eq!(n.lease("g1"), "walcast:t1:gateway:g1:lease");
    }
}
