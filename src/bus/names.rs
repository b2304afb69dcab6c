//! Channel and key names. Everything of a tenant lives under
//! `walcast:{tenant}:`, so tenants can share one Redis.

/// The names of one tenant's channels and keys.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

/// The key of the room of `topic` (without `realtime:`): `public:<topic>`
/// or `private:<topic>`.
pub fn room_key(private: bool, topic: &str) -> String {
    let visibility = if private { "private" } else { "public" };
    format!("{visibility}:{topic}")
}

/// The topic (without `realtime:`) of a room key.
pub fn room_topic(key: &str) -> &str {
    key.strip_prefix("public:")
        .or_else(|| key.strip_prefix("private:"))
        .unwrap_or(key)
}

impl Names {
    /// Names for `tenant` (validated by the config: `[A-Za-z0-9_.-]`) on
    /// one Redis server: `walcast:<tenant>:…`.
    pub fn new(tenant: &str) -> Self {
        Names {
            prefix: format!("walcast:{tenant}:"),
        }
    }

    /// Names for `tenant` on a Redis Cluster: `walcast:{<tenant>}:…`, the
    /// tenant a hash tag, so that all of them hash to one slot (pipelines,
    /// scripts and sharded channels of a tenant meet on one shard).
    pub fn tagged(tenant: &str) -> Self {
        Names {
            prefix: format!("walcast:{{{tenant}}}:"),
        }
    }

    /// [`Self::tagged`] on a cluster, else [`Self::new`].
    pub fn on(server: &super::server::Server, tenant: &str) -> Self {
        if server.sharded() {
            Names::tagged(tenant)
        } else {
            Names::new(tenant)
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

    /// Channel: gateways ↔ gateways (and the daemon, for Broadcast from
    /// Database), the Broadcast and Presence messages ([`super::room`]) of
    /// a room: `room:public:<topic>` or `room:private:<topic>` (the key
    /// [`room_key`] makes); a public and a private channel of one topic
    /// are different rooms.
    pub fn room(&self, key: &str) -> String {
        format!("{}room:{key}", self.prefix)
    }

    /// Hash: the presences of a room (by its [`room_key`]), `<gateway>|<ref>` →
    /// [`super::room::Presence`] JSON. Each gateway writes its own sockets'.
    pub fn presences(&self, key: &str) -> String {
        format!("{}presence:{key}", self.prefix)
    }

    /// Set: the ids of gateways that hold presences, so that whoever
    /// finds one's lease expired removes them (from rooms nobody watches
    /// too).
    pub fn presence_gateways(&self) -> String {
        format!("{}presence:gateways", self.prefix)
    }

    /// Set: the rooms a gateway holds presences in, so that whoever
    /// finds its lease expired can remove them.
    pub fn presence_rooms(&self, gateway: &str) -> String {
        format!("{}gateway:{gateway}:presence", self.prefix)
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
        assert_eq!(
            n.room(&room_key(false, "a:b")),
            "walcast:t1:room:public:a:b"
        );
        assert_eq!(
            n.room(&room_key(true, "a:b")),
            "walcast:t1:room:private:a:b"
        );
        assert_eq!(
            n.presences(&room_key(false, "a:b")),
            "walcast:t1:presence:public:a:b"
        );
        assert_eq!(room_topic("private:public:x"), "public:x");
        assert_eq!(n.presence_rooms("g1"), "walcast:t1:gateway:g1:presence");
        assert_eq!(n.presence_gateways(), "walcast:t1:presence:gateways");
        let tagged = Names::tagged("t1");
        assert_eq!(tagged.firehose(), "walcast:{t1}:firehose");
        assert_eq!(tagged.lease("g1"), "walcast:{t1}:gateway:g1:lease");
    }
}
