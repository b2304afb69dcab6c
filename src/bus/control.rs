//! Subscription requests (gateway → daemon) and the daemon's replies.
//!
//! A gateway writes each subscription into its registry hash
//! ([`super::Names::subscriptions`]) and then publishes a [`Control`]
//! message on [`super::Names::control`]; the daemon answers on the
//! gateway's channel with a [`Reply`]. The hash is what a restarted daemon
//! reads back, so a subscription survives a daemon restart without the
//! gateway doing anything.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One subscription: a channel binding of a client, after the gateway has
/// verified its JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Unique within its gateway; events name it in `ids`.
    pub id: String,
    /// Unused, and no longer sent: gateways keep a channel's topic
    /// themselves rather than copy it into every binding. Accepted (and
    /// ignored) from older gateways.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// Schema; `*` for every published schema.
    pub schema: String,
    /// Table; `*` for every published table of the schema.
    pub table: String,
    /// `INSERT`, `UPDATE`, `DELETE` or `*`.
    #[serde(default = "all_events")]
    pub event: String,
    /// Filter in Supabase's grammar (`owner_id=eq.7`), if any.
    #[serde(default)]
    pub filter: Option<String>,
    /// Columns to receive (the primary key is always included), if not all.
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// The verified JWT claims; set as `request.jwt.claims` for RLS.
    /// Shared: a gateway's bindings of one join hold one copy.
    pub claims: std::sync::Arc<Map<String, Value>>,
    /// The database role to check visibility as (the claims' `role`).
    pub role: String,
}

fn all_events() -> String {
    "*".to_owned()
}

/// The bindings of one client channel join, registered as one: the
/// claims (up to a JWT's worth) travel and are stored once, not once per
/// binding. A gateway stores it in its registry hash under
/// `channel:<id>` and announces it with [`ControlOp::SubscribeChannel`];
/// the daemon answers about each subscription by its own id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRegistration {
    /// Unique within its gateway (the registry field is `channel:<id>`).
    pub id: String,
    /// The database role of every subscription (the claims' `role`).
    pub role: String,
    /// The verified JWT claims of every subscription.
    pub claims: std::sync::Arc<Map<String, Value>>,
    /// The subscriptions, without role and claims.
    pub subscriptions: Vec<Binding>,
    /// Set for a private channel (`config.private: true`): the daemon
    /// decides its access first and answers [`Reply::Access`]; only a
    /// channel that may read is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<PrivateChannel>,
}

/// What makes a channel join private.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateChannel {
    /// The topic without `realtime:` (`realtime.topic()` for the policies).
    pub topic: String,
    /// Presence enabled at join: presence read is asked too.
    pub presence: bool,
    /// The id Broadcast from Database events of the topic name (a
    /// subscription to `realtime.messages` of this topic), unique within
    /// the gateway; [`Reply::Access`] names it too.
    pub id: String,
    /// `config.broadcast.replay`: the topic's stored messages to send
    /// first, once access is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
}

/// Broadcast Replay: the newest private broadcasts of the topic written
/// since `since`, at most `limit` (1 to 25), oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// Unix time in milliseconds.
    pub since: i64,
    /// How many at most (Supabase caps it at 25).
    pub limit: u32,
}

impl Replay {
    /// The most a replay sends.
    pub const MAX: u32 = 25;

    /// Supabase's reading of `config.broadcast.replay`: `since` an
    /// integer, `limit` an integer when present (default and cap 25, at
    /// least 1); `None` when they are not.
    pub fn parse(value: &Value) -> Option<Replay> {
        let since = value.get("since")?.as_i64()?;
        let limit = match value.get("limit") {
            None | Some(Value::Null) => i64::from(Replay::MAX),
            Some(limit) => limit.as_i64()?,
        };
        Some(Replay {
            since,
            limit: limit.clamp(1, i64::from(Replay::MAX)) as u32,
        })
    }
}

/// A first write to a private channel (a broadcast or a track), or a REST
/// broadcast to a private topic: may its sender write? Not stored; the
/// daemon answers [`Reply::Write`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteCheck {
    /// Unique within the gateway while it waits; the reply names it.
    pub id: String,
    /// The topic without `realtime:`.
    pub topic: String,
    /// `broadcast` or `presence`.
    pub extension: String,
    /// The JWT's role.
    pub role: String,
    /// The JWT's verified claims.
    pub claims: std::sync::Arc<Map<String, Value>>,
}

/// One subscription of a [`ChannelRegistration`]: a [`Subscription`]
/// without its role and claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Unique within its gateway; events name it in `ids`.
    pub id: String,
    /// Schema; `*` for every published schema.
    pub schema: String,
    /// Table; `*` for every published table of the schema.
    pub table: String,
    /// `INSERT`, `UPDATE`, `DELETE` or `*`.
    #[serde(default = "all_events")]
    pub event: String,
    /// Filter in Supabase's grammar, if any.
    #[serde(default)]
    pub filter: Option<String>,
    /// Columns to receive (the primary key always comes too), if not all.
    #[serde(default)]
    pub select: Option<Vec<String>>,
}

/// The registry hash field of channel `id`.
pub fn channel_field(id: &str) -> String {
    format!("{CHANNEL_FIELD_PREFIX}{id}")
}

/// What starts a registry field holding a [`ChannelRegistration`] (other
/// fields hold one [`Subscription`] each, under its id).
pub const CHANNEL_FIELD_PREFIX: &str = "channel:";

impl ChannelRegistration {
    /// Every id the daemon may hold for it: its subscriptions' and, for a
    /// private channel, its Broadcast from Database id.
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.subscriptions
            .iter()
            .map(|b| b.id.as_str())
            .chain(self.private.iter().map(|p| p.id.as_str()))
    }

    /// Its subscriptions in full, each sharing the claims.
    pub fn expand(&self) -> impl Iterator<Item = Subscription> + '_ {
        self.subscriptions.iter().map(|b| Subscription {
            id: b.id.clone(),
            topic: String::new(),
            schema: b.schema.clone(),
            table: b.table.clone(),
            event: b.event.clone(),
            filter: b.filter.clone(),
            select: b.select.clone(),
            claims: self.claims.clone(),
            role: self.role.clone(),
        })
    }
}

/// A message on the control channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// Format version: [`super::VERSION`].
    pub v: u32,
    /// The sending gateway's id.
    pub gateway: String,
    /// What it asks.
    #[serde(flatten)]
    pub op: ControlOp,
}

/// What a gateway asks of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlOp {
    /// Add (or replace, same id) a subscription.
    Subscribe {
        /// The subscription, as also stored in the gateway's registry hash.
        subscription: Subscription,
    },
    /// Add (or replace, same ids) the subscriptions of one channel join.
    SubscribeChannel {
        /// The channel, as also stored in the gateway's registry hash.
        channel: ChannelRegistration,
    },
    /// Remove a subscription.
    Unsubscribe {
        /// Its id.
        id: String,
    },
    /// The gateway is shutting down: remove all its subscriptions.
    Leave,
    /// May a private channel's sender write?
    Authorize {
        /// The question.
        check: WriteCheck,
    },
}

/// What the daemon says about a private channel's access (Supabase's
/// texts where the probe failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// The policies decided: may it read broadcasts, and presence (when
    /// asked)?
    Read {
        /// `broadcast.read`.
        broadcast: bool,
        /// `presence.read`, when presence is enabled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        presence: Option<bool>,
    },
    /// The probe failed: the join's error reason.
    Failed(String),
}

/// The daemon's answer about one subscription, on the gateway's channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The subscription is live: every change committed after `lsn` that
    /// it may see will be delivered.
    Subscribed {
        /// Format version.
        v: u32,
        /// The subscription.
        id: String,
        /// The WAL position from which it is live.
        lsn: String,
    },
    /// The subscription was refused; `message` is Supabase's text where
    /// Supabase has one.
    Rejected {
        /// Format version.
        v: u32,
        /// The subscription.
        id: String,
        /// Why.
        message: String,
    },
    /// The daemon no longer holds these subscriptions of the gateway: an
    /// `unsubscribe` or `leave` on the control channel (the gateway's own,
    /// or not), an expired lease, an entry its registry hash lost. A
    /// gateway that still serves one registers it again.
    Dropped {
        /// Format version.
        v: u32,
        /// The subscriptions.
        ids: Vec<String>,
    },
    /// A private channel's read access (for its join, a refreshed token,
    /// or a daemon that read the registry back).
    Access {
        /// Format version.
        v: u32,
        /// The channel's [`PrivateChannel::id`].
        id: String,
        /// What it may read, or why that is unknown.
        access: Access,
    },
    /// A write check's answer: `allowed`, or `None` when it could not be
    /// decided (`reason` says why).
    Write {
        /// Format version.
        v: u32,
        /// The [`WriteCheck::id`].
        id: String,
        /// Whether it may write.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allowed: Option<bool>,
        /// Why it could not be decided.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Visibility of a change could not be decided for these subscriptions
    /// (their RLS policy raised or timed out); they do not receive it.
    Error {
        /// Format version.
        v: u32,
        /// The subscriptions concerned.
        ids: Vec<String>,
        /// The database's system identifier (see
        /// [`super::write_gateway_event`]).
        #[serde(default)]
        sys: String,
        /// The change's commit LSN.
        lsn: String,
        /// The change's position in its transaction.
        seq: u32,
        /// What went wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {

    #[test]
    fn replay_params_as_supabase_reads_them() {
        let parse = |v: Value| Replay::parse(&v);
        assert_eq!(
            parse(serde_json::json!({"since": 5})),
            Some(Replay {
                since: 5,
                limit: 25
            })
        );
        assert_eq!(
            parse(serde_json::json!({"since": 5, "limit": 100})),
            Some(Replay {
                since: 5,
                limit: 25
            })
        );
        assert_eq!(
            parse(serde_json::json!({"since": 5, "limit": 0})),
            Some(Replay { since: 5, limit: 1 })
        );
        assert_eq!(parse(serde_json::json!({"limit": 3})), None);
        assert_eq!(parse(serde_json::json!({"since": "0"})), None);
        assert_eq!(parse(serde_json::json!({"since": 1.5})), None);
        assert_eq!(parse(serde_json::json!({"since": 1, "limit": "2"})), None);
    }

    use super::*;

    #[test]
    fn control_messages_round_trip_in_the_documented_shape() {
        let text = r#"{"v":1,"gateway":"g1","op":"subscribe","subscription":{"id":"s1","topic":"realtime:room1","schema":"public","table":"todos","event":"INSERT","filter":"id=eq.1","select":null,"claims":{"role":"authenticated","sub":"u1"},"role":"authenticated"}}"#;
        let control: Control = serde_json::from_str(text).unwrap();
        assert_eq!(control.gateway, "g1");
        let ControlOp::Subscribe { subscription } = &control.op else {
            panic!("not a subscribe")
        };
        assert_eq!(
            (subscription.id.as_str(), subscription.filter.as_deref()),
            ("s1", Some("id=eq.1"))
        );
        assert_eq!(serde_json::to_string(&control).unwrap(), text);
        let leave: Control =
            serde_json::from_str(r#"{"v":1,"gateway":"g1","op":"leave"}"#).unwrap();
        assert_eq!(leave.op, ControlOp::Leave);
    }

    #[test]
    fn replies_are_tagged_by_type() {
        let reply = Reply::Rejected {
            v: 1,
            id: "s1".into(),
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"type":"rejected","v":1,"id":"s1","message":"no"}"#
        );
    }

    #[test]
    fn malformed_control_messages_are_errors() {
        for bad in [
            "",
            "{}",
            r#"{"v":1,"gateway":"g","op":"fly"}"#,
            r#"{"v":1,"gateway":"g","op":"subscribe","subscription":{"id":"s"}}"#,
        ] {
            assert!(serde_json::from_str::<Control>(bad).is_err(), "{bad}");
        }
    }
}
