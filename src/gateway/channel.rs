//! One joined channel and its `postgres_changes` bindings, without I/O:
//! the join payload in, bus subscriptions and client payloads out.
//!
//! Each binding becomes one bus subscription (id `<prefix>:<index>`,
//! unique within the gateway) and gets an integer id for the client, a
//! hash of the binding so a rejoin gets the same number. The `system`
//! "Subscribed to PostgreSQL" message is due only once the daemon has
//! answered `subscribed` for every binding.
//!
//! A token refresh (`access_token`) changes nothing until the daemon has
//! accepted the new identity: the bindings are registered again under new
//! ids (`<prefix>:<index>.<generation>`) and the old ones stay in force —
//! their events, their token's expiry — until every new one is confirmed;
//! then the old ones are retired, after [`RETIRE_AFTER`]: changes
//! committed before the new ones were confirmed may still be on their way
//! under the old ids. A refused new one ends the channel (unless its old
//! twin was refused too: then it is that binding's error again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::auth::{AuthError, Verifier};
use super::limits::Limits;
use super::quiet::clip;
use super::{broadcast, presence};
use crate::bus::{self, ChannelRegistration};
use crate::gateway::private::{Read, Writes};

/// The payload of `phx_join`; other keys are ignored.
#[derive(Debug, Deserialize)]
struct JoinPayload<'a> {
    #[serde(default, borrow)]
    config: Option<JoinConfig<'a>>,
    #[serde(default)]
    access_token: Option<Value>,
    #[serde(default)]
    user_token: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct JoinConfig<'a> {
    #[serde(default, borrow)]
    postgres_changes: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow)]
    broadcast: Option<&'a RawValue>,
    #[serde(default, borrow)]
    presence: Option<&'a RawValue>,
    #[serde(default)]
    private: Option<Value>,
}

/// The fields of a binding walcast reads.
#[derive(Debug, Deserialize)]
struct BindingFields {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    select: Option<Select>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Select {
    List(Vec<String>),
    Text(String),
}

/// Why a join was refused; [`reason`](JoinError::reason) goes to the client.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The topic is not `realtime:<name>` (Supabase routes no other):
    /// Phoenix's answer for a topic no channel serves.
    #[error("unmatched topic")]
    UnmatchedTopic,
    /// The topic is `realtime:` alone.
    #[error("TopicNameRequired: You must provide a topic name")]
    TopicNameRequired,
    /// The topic is longer than `max_topic_bytes`.
    #[error("TopicNameTooLong: Topic names are limited to {max} bytes (this one has {bytes})")]
    TopicTooLong {
        /// The topic's length.
        bytes: usize,
        /// `max_topic_bytes`.
        max: usize,
    },
    /// The payload is not what a join carries.
    #[error("InvalidJoinPayload: {0}")]
    InvalidPayload(String),
    /// More `postgres_changes` bindings than `max_bindings_per_channel`.
    #[error(
        "InvalidJoinPayload: A channel may have at most {max} postgres_changes bindings (this join has {count})"
    )]
    TooManyBindings {
        /// The join's bindings.
        count: usize,
        /// `max_bindings_per_channel`.
        max: usize,
    },
    /// A binding's JSON text is longer than `max_binding_bytes`.
    #[error(
        "InvalidJoinPayload: A postgres_changes binding may have at most {max} bytes (binding {index} has {bytes})"
    )]
    BindingTooLarge {
        /// The binding's position in the join, from 0.
        index: usize,
        /// Its length.
        bytes: usize,
        /// `max_binding_bytes`.
        max: usize,
    },
    /// The token was refused.
    #[error("{}", .0.reason())]
    Auth(#[from] AuthError),
    /// The socket has `max_channels_per_client` channels joined.
    #[error("ChannelRateLimitReached: Too many channels")]
    TooManyChannels,
    /// The gateway's `max_joins_per_second` is reached; the socket is
    /// disconnected after the reply, as Supabase does.
    #[error("ClientJoinRateLimitReached: Too many joins per second")]
    TooManyJoins,
    /// `config.broadcast.replay` on a public channel, or not Supabase's
    /// shape.
    #[error("UnableToReplayMessages: {0}")]
    Replay(&'static str),
}

impl JoinError {
    /// The `reason` of the error reply.
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// Supabase's error code (the `reason` label of refused joins).
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::UnmatchedTopic => "UnmatchedTopic",
            JoinError::TopicNameRequired => "TopicNameRequired",
            JoinError::TopicTooLong { .. } => "TopicNameTooLong",
            JoinError::InvalidPayload(_)
            | JoinError::TooManyBindings { .. }
            | JoinError::BindingTooLarge { .. } => "InvalidJoinPayload",
            JoinError::Auth(e) => e.code(),
            JoinError::TooManyChannels => "ChannelRateLimitReached",
            JoinError::TooManyJoins => "ClientJoinRateLimitReached",
            JoinError::Replay(_) => "UnableToReplayMessages",
        }
    }
}

/// Refuses a topic Supabase serves no channel for (anything not
/// `realtime:*`, `phoenix` and `""` included) and `realtime:` alone, which
/// it rejects before anything else (limits included).
pub fn check_topic(topic: &str) -> Result<(), JoinError> {
    match topic.strip_prefix("realtime:") {
        None => Err(JoinError::UnmatchedTopic),
        Some("") => Err(JoinError::TopicNameRequired),
        Some(_) => Ok(()),
    }
}

/// Refuses a topic longer than `max` bytes (checked after the join rate,
/// so that a flood of them is disconnected like any other).
pub fn check_topic_length(topic: &str, max: usize) -> Result<(), JoinError> {
    if topic.len() > max {
        return Err(JoinError::TopicTooLong {
            bytes: topic.len(),
            max,
        });
    }
    Ok(())
}

/// How long a refresh's old subscriptions stay routed after the new ones
/// took over: the daemon confirms from its control task while changes
/// committed earlier may still be in an RLS check (up to `rls_timeout`)
/// or queued for Redis, naming the old ids only.
pub const RETIRE_AFTER: Duration = Duration::from_secs(15);

/// One binding of a joined channel.
#[derive(Debug)]
pub struct Binding {
    /// The client's integer id for it.
    pub id: u32,
    /// Its bus subscription's id.
    pub subscription_id: String,
    confirmed: bool,
    /// The daemon refused it.
    rejected: bool,
}

/// A token refresh the daemon has not yet accepted for every binding.
#[derive(Debug)]
struct Pending {
    token: String,
    exp: i64,
    /// The new identity's registration.
    registration: Arc<ChannelRegistration>,
    /// The bindings again, in order, under new subscription ids.
    bindings: Vec<Binding>,
}

/// What the daemon's `subscribed` changed.
#[derive(Debug, Default, PartialEq)]
pub struct Confirmed {
    /// The `system` payload to send ("Subscribed to PostgreSQL"), if due.
    /// (A registration a completed refresh replaced is withdrawn later,
    /// by [`Channel::retire`].)
    pub system: Option<String>,
}

/// What the daemon's `rejected` means for the channel.
#[derive(Debug, PartialEq)]
pub enum Rejection {
    /// Nothing to tell (not this channel's, or already told).
    None,
    /// A binding was refused: the `postgres_changes` `system` error
    /// payload; the channel stays.
    Binding(String),
    /// A refreshed token's binding was refused: the channel ends (system
    /// error with this message, then `phx_close`), and every subscription
    /// of it, old and new, is withdrawn.
    Refresh(String),
}

/// What an `access_token` asks.
#[derive(Debug, PartialEq)]
pub enum Refresh {
    /// Nothing: not a string, `sb_`-prefixed, or the latest token.
    Ignored,
    /// Register this (the new identity) and unregister that (an earlier
    /// refresh still pending, now superseded).
    Register(Arc<ChannelRegistration>, Option<Arc<ChannelRegistration>>),
}

/// A joined channel.
#[derive(Debug)]
pub struct Channel {
    /// Its id on this gateway: the join's prefix, also its room
    /// membership's and the sender id of its broadcasts.
    pub id: Arc<str>,
    /// `realtime:<name>`.
    pub topic: String,
    /// `config.private`: authorized by RLS on `realtime.messages`.
    pub private: bool,
    /// What a private channel may read (known once the daemon answered).
    pub read: Option<Read>,
    /// What a private channel may write, and the writes waiting for it.
    pub writes: Writes,
    /// Registrations a refresh replaced that hold no bindings to retire
    /// (a private channel's): to unregister at once.
    pub superseded: Vec<Arc<ChannelRegistration>>,
    /// The ids of the messages replayed to it, and of live ones while
    /// replays may still come: no message is sent twice (Supabase's
    /// `already_replayed?`).
    pub replayed: std::collections::HashSet<String>,
    /// It joined asking for a replay, and the replays may still come.
    pub replaying: bool,
    /// `config.broadcast`.
    pub broadcast: broadcast::Config,
    /// `config.presence`.
    pub presence: presence::Config,
    /// Presence calls in the current window.
    pub presence_window: presence::Window,
    /// A hash of the meta last tracked: tracking it again does nothing.
    pub tracked: Option<u64>,
    /// The join's `join_ref` (`null` when the client sent none).
    pub join_ref: Value,
    /// The token in force.
    token: String,
    /// When that token expires (its `exp`, Unix seconds).
    exp: i64,
    /// The bindings in force, in request order.
    pub bindings: Vec<Binding>,
    /// Their bus registration (one per join: the claims once).
    pub registration: Arc<ChannelRegistration>,
    /// A refresh waiting for the daemon.
    pending: Option<Pending>,
    /// Registrations a completed refresh replaced, still routed until
    /// [`RETIRE_AFTER`] has passed since: their bindings and when.
    retiring: Vec<(Arc<ChannelRegistration>, Vec<Binding>, Instant)>,
    /// Refreshes so far: the suffix of the next one's subscription ids.
    generation: u32,
    /// A binding was rejected: the channel will not report itself live.
    failed: bool,
    /// "Subscribed to PostgreSQL" was sent for the current registration.
    live: bool,
    /// The client was last told "Subscribed to PostgreSQL", not an error:
    /// it counts on changes flowing (even while a token refresh is being
    /// confirmed), so a lost bus must be reported.
    announced: bool,
}

/// Which token authorizes a join: `access_token` when a string not
/// starting with `sb_`, else `user_token`, else the socket's.
fn join_token<'a>(payload: &'a JoinPayload<'_>, socket_token: &'a str) -> &'a str {
    let usable = |v: &'a Option<Value>| match v {
        Some(Value::String(s)) if !s.starts_with("sb_") => Some(s.as_str()),
        _ => None,
    };
    usable(&payload.access_token)
        .or_else(|| usable(&payload.user_token))
        .unwrap_or(socket_token)
}

impl Channel {
    /// Joins `topic` with `payload` within `limits`; subscription ids are
    /// `<prefix>:<i>`. Returns the channel and the join reply's payload:
    /// every binding as received, plus its id (built here and not kept,
    /// so a binding's text is held once, in the registration).
    pub fn join(
        topic: &str,
        join_ref: Value,
        payload: &RawValue,
        socket_token: &str,
        verifier: &Verifier,
        prefix: &str,
        limits: &Limits,
    ) -> Result<(Channel, String), JoinError> {
        check_topic(topic)?;
        check_topic_length(topic, limits.max_topic_bytes)?;
        let parsed: JoinPayload<'_> = if payload.get() == "null" {
            JoinPayload {
                config: None,
                access_token: None,
                user_token: None,
            }
        } else if payload.get().starts_with('{') {
            // serde's messages quote the offending value: clipped.
            serde_json::from_str(payload.get()).map_err(|e| {
                JoinError::InvalidPayload(format!("join payload: {}", clip(&e.to_string())))
            })?
        } else {
            return Err(JoinError::InvalidPayload(
                "the join payload must be an object".to_owned(),
            ));
        };
        let config = parsed.config.as_ref();
        // Supabase's `private?`: true, "true", and their like.
        let private = config
            .and_then(|c| c.private.as_ref())
            .and_then(broadcast::flexible_bool)
            .unwrap_or(false);
        let raw = config
            .and_then(|c| c.postgres_changes.as_deref())
            .unwrap_or_default();
        // Sizes first: they are cheap, a signature may not be.
        if raw.len() > limits.max_bindings_per_channel {
            return Err(JoinError::TooManyBindings {
                count: raw.len(),
                max: limits.max_bindings_per_channel,
            });
        }
        if let Some((index, binding)) = raw
            .iter()
            .enumerate()
            .find(|(_, b)| b.get().len() > limits.max_binding_bytes)
        {
            return Err(JoinError::BindingTooLarge {
                index,
                bytes: binding.get().len(),
                max: limits.max_binding_bytes,
            });
        }
        let token = join_token(&parsed, socket_token).to_owned();
        let verified = verifier.verify(&token)?;
        let mut bindings = Vec::with_capacity(raw.len());
        let mut subscriptions = Vec::with_capacity(raw.len());
        let mut reply = String::from(r#"{"status":"ok","response":{"postgres_changes":["#);
        for (index, binding) in raw.iter().enumerate() {
            if index > 0 {
                reply.push(',');
            }
            let (binding, subscription) =
                binding_of(binding, &format!("{prefix}:{index}"), &mut reply)?;
            bindings.push(binding);
            subscriptions.push(subscription);
        }
        reply.push_str("]}}");
        let presence = presence::Config::parse(config.and_then(|c| c.presence));
        let broadcast = broadcast::Config::parse(config.and_then(|c| c.broadcast));
        let replay = match (&broadcast.replay, private) {
            (Value::Null, _) => None,
            (_, false) => {
                return Err(JoinError::Replay(
                    "Replay is not allowed for public channels",
                ));
            }
            (replay, true) => Some(
                bus::Replay::parse(replay)
                    .ok_or(JoinError::Replay("Replay params are not valid"))?,
            ),
        };
        let name = topic.strip_prefix("realtime:").unwrap_or(topic);
        let registration = Arc::new(ChannelRegistration {
            id: prefix.to_owned(),
            role: verified.role.clone(),
            claims: verified.claims.clone(),
            subscriptions,
            private: private.then(|| bus::PrivateChannel {
                topic: name.to_owned(),
                presence: presence.enabled,
                id: format!("{prefix}:p"),
                replay,
            }),
        });
        let channel = Channel {
            id: Arc::from(prefix),
            topic: topic.to_owned(),
            private,
            read: None,
            writes: Writes::default(),
            superseded: Vec::new(),
            replayed: std::collections::HashSet::new(),
            replaying: replay.is_some(),
            broadcast,
            presence,
            presence_window: presence::Window::new(
                limits.max_client_presence_events_per_window,
                limits.client_presence_window,
            ),
            tracked: None,
            join_ref,
            token,
            exp: verified.exp,
            bindings,
            registration,
            pending: None,
            retiring: Vec::new(),
            generation: 0,
            failed: false,
            live: false,
            announced: false,
        };
        Ok((channel, reply))
    }

    /// The sub-topic: the topic without `realtime:`.
    pub fn name(&self) -> &str {
        self.topic.strip_prefix("realtime:").unwrap_or(&self.topic)
    }

    /// Whether a private channel may read its room's presence (the daemon
    /// said so at join; presence must have been enabled).
    pub fn reads_presence(&self) -> bool {
        self.read.is_some_and(|r| r.presence == Some(true))
    }

    /// The registration a new request of the channel speaks for: a
    /// refreshed token's once it is sent, though not yet confirmed.
    pub fn latest_registration(&self) -> &Arc<ChannelRegistration> {
        self.pending
            .as_ref()
            .map_or(&self.registration, |p| &p.registration)
    }

    /// The key of its room: a private channel's room is not the public
    /// one of the same name.
    pub fn room(&self) -> String {
        crate::bus::room_key(self.private, self.name())
    }

    /// The daemon confirmed `subscription_id`: the `system` payload when
    /// that completes the channel (or a refresh), and what a completed
    /// refresh retired.
    pub fn confirm(&mut self, subscription_id: &str) -> Confirmed {
        if let Some(pending) = &mut self.pending {
            if let Some(b) = pending
                .bindings
                .iter_mut()
                .find(|b| b.subscription_id == subscription_id)
            {
                b.confirmed = true;
            }
            if pending.bindings.iter().all(|b| b.confirmed || b.rejected) {
                return self.switch();
            }
        }
        let Some(binding) = self
            .bindings
            .iter_mut()
            .find(|b| b.subscription_id == subscription_id)
        else {
            return Confirmed::default();
        };
        binding.confirmed = true;
        if self.failed || self.live || !self.bindings.iter().all(|b| b.confirmed) {
            return Confirmed::default();
        }
        self.live = true;
        self.announced = true;
        Confirmed {
            system: Some(self.postgres_system("ok", "Subscribed to PostgreSQL")),
        }
    }

    /// The pending refresh is accepted: its token and bindings take over
    /// (Supabase says "Subscribed to PostgreSQL" again after a refresh).
    fn switch(&mut self) -> Confirmed {
        let Some(pending) = self.pending.take() else {
            return Confirmed::default();
        };
        let old = std::mem::replace(&mut self.bindings, pending.bindings);
        let retired = std::mem::replace(&mut self.registration, pending.registration);
        if !old.is_empty() {
            self.retiring.push((retired, old, Instant::now()));
        } else if retired.private.is_some() {
            // Its topic's messages would come twice meanwhile.
            self.superseded.push(retired);
        }
        self.token = pending.token;
        self.exp = pending.exp;
        // A binding refused under the old token and again under the new
        // one keeps the channel from being live, as it did before.
        self.failed = self.bindings.iter().any(|b| b.rejected);
        let system = (!self.bindings.is_empty() && !self.failed).then(|| {
            self.live = true;
            self.announced = true;
            self.postgres_system("ok", "Subscribed to PostgreSQL")
        });
        Confirmed { system }
    }

    /// The daemon rejected `subscription_id`: for a binding in force, the
    /// `system` error payload, once per channel (the daemon rejects again
    /// whenever it reads the registry back, after a restart or a lost
    /// bus); for a refreshed one, the end of the channel.
    pub fn reject(&mut self, subscription_id: &str, message: &str) -> Rejection {
        let refreshed = self.pending.as_mut().and_then(|p| {
            p.bindings
                .iter_mut()
                .position(|b| b.subscription_id == subscription_id)
                .map(|at| (p, at))
        });
        if let Some((pending, at)) = refreshed {
            // Its twin in force was refused too (a filter on a column that
            // does not exist): the same answer again, not a refused
            // identity; the refresh goes on without it.
            let twin_refused = self.bindings.get(at).is_some_and(|b| b.rejected);
            if !twin_refused {
                return Rejection::Refresh(message.to_owned());
            }
            pending.bindings[at].rejected = true;
            let done = pending.bindings.iter().all(|b| b.confirmed || b.rejected);
            let payload = self.postgres_system("error", message);
            if done {
                self.switch();
            }
            return Rejection::Binding(payload);
        }
        let Some(binding) = self
            .bindings
            .iter_mut()
            .find(|b| b.subscription_id == subscription_id)
        else {
            return Rejection::None;
        };
        binding.rejected = true;
        if self.failed {
            return Rejection::None;
        }
        self.failed = true;
        self.announced = false;
        Rejection::Binding(self.postgres_system("error", message))
    }

    /// The gateway lost the bus: changes published meanwhile never reach
    /// it, and the daemon answers every binding again once the bus is
    /// back. A channel the client counts on gets the `system` error
    /// payload now (and "Subscribed to PostgreSQL" again on the new
    /// confirmations); one still waiting was promised nothing and hears
    /// nothing. A rejection is forgotten too: it may have been transient
    /// (the database away), and the daemon's new answer decides. (The
    /// socket sends the payload to v2 clients only.)
    pub fn interrupt(&mut self, message: &str) -> Option<String> {
        let pending = self.pending.iter_mut().flat_map(|p| p.bindings.iter_mut());
        for b in self.bindings.iter_mut().chain(pending) {
            b.confirmed = false;
            b.rejected = false;
        }
        self.live = false;
        self.failed = false;
        std::mem::replace(&mut self.announced, false)
            .then(|| self.postgres_system("error", message))
    }

    /// The daemon dropped `subscription_ids` unasked and the gateway has
    /// registered them again: those of this channel wait for their new
    /// confirmation, and a channel the client counts on gets the `system`
    /// error payload of a gap (as for a lost bus) now, "Subscribed to
    /// PostgreSQL" again once they are confirmed. Its other bindings are
    /// untouched: the daemon still holds them.
    pub fn dropped(&mut self, subscription_ids: &[Arc<str>], message: &str) -> Option<String> {
        let mut in_force = false;
        for b in &mut self.bindings {
            if names(subscription_ids, &b.subscription_id) {
                b.confirmed = false;
                b.rejected = false;
                in_force = true;
            }
        }
        for b in self.pending.iter_mut().flat_map(|p| p.bindings.iter_mut()) {
            if names(subscription_ids, &b.subscription_id) {
                b.confirmed = false;
                b.rejected = false;
            }
        }
        if !in_force {
            return None;
        }
        self.live = false;
        self.failed = false;
        std::mem::replace(&mut self.announced, false)
            .then(|| self.postgres_system("error", message))
    }

    /// Whether `subscription_id` is one of this channel's join (in force,
    /// pending or superseded: [`Channel::confirm`] and [`Channel::reject`]
    /// tell them apart). Decided by the id's join prefix, without looking
    /// through the bindings: a socket may hold 100 channels of 100
    /// bindings, and every answer of the daemon is routed this way.
    pub fn owns(&self, subscription_id: &str) -> bool {
        let base = self
            .registration
            .id
            .split('.')
            .next()
            .unwrap_or(&self.registration.id);
        // `<join>:<index>[.<generation>]` → `<join>`.
        subscription_id
            .rsplit_once(':')
            .is_some_and(|(join, _)| join == base)
    }

    /// Its registrations, in force and pending: what leaving withdraws.
    pub fn registrations(&self) -> impl Iterator<Item = &Arc<ChannelRegistration>> {
        std::iter::once(&self.registration)
            .chain(self.pending.iter().map(|p| &p.registration))
            .chain(self.retiring.iter().map(|(r, _, _)| r))
    }

    /// The retiring registrations whose [`RETIRE_AFTER`] has passed at
    /// `now`: to unregister.
    pub fn retire(&mut self, now: Instant) -> Vec<Arc<ChannelRegistration>> {
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|(_, _, since)| now.saturating_duration_since(*since) >= RETIRE_AFTER);
        self.retiring = kept;
        due.into_iter().map(|(r, _, _)| r).collect()
    }

    /// Every subscription of the channel, in force and pending.
    pub fn subscription_ids(&self) -> impl Iterator<Item = &str> {
        let pending = self.pending.iter().flat_map(|p| p.bindings.iter());
        self.bindings
            .iter()
            .chain(pending)
            .map(|b| b.subscription_id.as_str())
    }

    /// The client's ids of this channel's bindings among
    /// `subscription_ids`, in binding order; empty when none is this
    /// channel's.
    pub fn binding_ids(&self, subscription_ids: &[Arc<str>]) -> Vec<u32> {
        // A retiring binding stands for its successor (same client id): a
        // change committed before the refresh took over arrives under the
        // old id, a later one under both (listed once).
        let retiring = self.retiring.iter().flat_map(|(_, bindings, _)| bindings);
        let mut ids: Vec<u32> = Vec::new();
        for b in self.bindings.iter().chain(retiring) {
            if names(subscription_ids, &b.subscription_id) && !ids.contains(&b.id) {
                ids.push(b.id);
            }
        }
        ids
    }

    /// A `postgres_changes` `system` error for the bindings among
    /// `subscription_ids` (their visibility could not be decided).
    pub fn error_payload(&self, subscription_ids: &[Arc<str>], message: &str) -> Option<String> {
        self.bindings
            .iter()
            .any(|b| names(subscription_ids, &b.subscription_id))
            .then(|| self.postgres_system("error", message))
    }

    /// Whether an `access_token` value would be acted on: a string, not
    /// `sb_`-prefixed, not the latest token (pending, else in force).
    pub fn is_new_token(&self, token: &Value) -> bool {
        let latest = self.pending.as_ref().map_or(&self.token, |p| &p.token);
        token
            .as_str()
            .is_some_and(|t| !t.starts_with("sb_") && t != latest)
    }

    /// `access_token`: a verified new token is registered under new
    /// subscription ids and waits for the daemon ([`Channel::confirm`],
    /// [`Channel::reject`]); until then the current identity stays in
    /// force. A channel without bindings switches at once.
    pub fn refresh(&mut self, token: &Value, verifier: &Verifier) -> Result<Refresh, AuthError> {
        if !self.is_new_token(token) {
            return Ok(Refresh::Ignored);
        }
        let Some(token) = token.as_str() else {
            return Ok(Refresh::Ignored);
        };
        let verified = verifier.verify(token)?;
        let superseded = self.pending.take().map(|p| p.registration);
        self.generation += 1;
        let generation = self.generation;
        let renamed = |id: &str| format!("{}.{generation}", id.split('.').next().unwrap_or(id));
        let registration = Arc::new(ChannelRegistration {
            id: renamed(&self.registration.id),
            role: verified.role.clone(),
            claims: verified.claims.clone(),
            subscriptions: self
                .registration
                .subscriptions
                .iter()
                .map(|b| bus::Binding {
                    id: renamed(&b.id),
                    ..b.clone()
                })
                .collect(),
            private: self
                .registration
                .private
                .as_ref()
                .map(|p| bus::PrivateChannel {
                    id: renamed(&p.id),
                    // Replayed once, at the join.
                    replay: None,
                    ..p.clone()
                }),
        });
        let bindings: Vec<Binding> = self
            .bindings
            .iter()
            .map(|b| Binding {
                id: b.id,
                subscription_id: renamed(&b.subscription_id),
                confirmed: false,
                rejected: false,
            })
            .collect();
        self.pending = Some(Pending {
            token: token.to_owned(),
            exp: verified.exp,
            registration: registration.clone(),
            bindings,
        });
        if self.bindings.is_empty() {
            self.switch();
        }
        Ok(Refresh::Register(registration, superseded))
    }

    /// Whether the channel's token is still unexpired at `now` (Unix
    /// seconds). Only `exp` can change its verdict: the token and the keys
    /// are fixed, so the signature (costly for RSA) is not checked again.
    pub fn check_token(&self, now: i64) -> Result<(), AuthError> {
        if self.exp <= now {
            return Err(AuthError::Expired(now.saturating_sub(self.exp)));
        }
        Ok(())
    }

    /// A channel-level `system` error (always followed by `phx_close`).
    pub fn system_error(&self, message: &str) -> String {
        json!({"channel": self.name(), "extension": "system", "message": message, "status": "error"})
            .to_string()
    }

    fn postgres_system(&self, status: &str, message: &str) -> String {
        json!({"channel": self.name(), "extension": "postgres_changes", "message": message, "status": status})
            .to_string()
    }
}

/// Whether `id` is among `ids`.
fn names(ids: &[Arc<str>], id: &str) -> bool {
    ids.iter().any(|i| &**i == id)
}

/// A binding of the join payload: the channel's side, the bus's side, and
/// its entry of the join reply appended to `reply` (the binding as
/// received, byte for byte, with `id` added).
fn binding_of(
    raw: &RawValue,
    subscription_id: &str,
    reply: &mut String,
) -> Result<(Binding, bus::Binding), JoinError> {
    let text = raw.get();
    let fields: BindingFields = serde_json::from_str(text).map_err(|e| {
        JoinError::InvalidPayload(format!(
            "a postgres_changes binding must be an object of event, schema, table, filter: {}",
            clip(&e.to_string())
        ))
    })?;
    let id = binding_id(text);
    match text.strip_suffix('}') {
        Some(open) if open.trim_end().ends_with('{') => {
            reply.push_str(open);
            reply.push_str(&format!("\"id\":{id}}}"));
        }
        Some(open) => {
            reply.push_str(open);
            reply.push_str(&format!(",\"id\":{id}}}"));
        }
        None => {
            return Err(JoinError::InvalidPayload(
                "a postgres_changes binding must be an object".to_owned(),
            ));
        }
    }
    let select = fields.select.map(|s| match s {
        Select::List(list) => list,
        Select::Text(text) => text
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect(),
    });
    Ok((
        Binding {
            id,
            subscription_id: subscription_id.to_owned(),
            confirmed: false,
            rejected: false,
        },
        bus::Binding {
            id: subscription_id.to_owned(),
            schema: fields.schema.unwrap_or_else(|| "public".to_owned()),
            table: fields.table.unwrap_or_else(|| "*".to_owned()),
            event: fields.event.unwrap_or_else(|| "*".to_owned()),
            filter: fields.filter,
            select,
        },
    ))
}

/// A binding's client id: FNV-1a of its JSON text, in `[1, 2^27)` like
/// Supabase's `phash2`, so the same binding gets the same id on a rejoin.
fn binding_id(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % ((1 << 27) - 1)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    fn token(role: &str) -> String {
        let claims = json!({"role": role, "exp": 4_000_000_000_i64, "sub": "u1"});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap()
    }

    /// The `postgres_changes` error payload of a binding's rejection.
    fn binding_error(rejection: Rejection) -> Option<String> {
        match rejection {
            Rejection::Binding(payload) => Some(payload),
            Rejection::None => None,
            Rejection::Refresh(m) => panic!("a refresh was rejected: {m}"),
        }
    }

    fn join(payload: &str) -> Result<Channel, JoinError> {
        joined(payload).map(|(c, _)| c)
    }

    /// `payload` joined to `topic` with an anon socket token, default limits.
    fn join_raw(topic: &str, raw: &RawValue) -> Result<(Channel, String), JoinError> {
        Channel::join(
            topic,
            Value::Null,
            raw,
            &token("anon"),
            &Verifier::new(b"s"),
            "p",
            &Limits::default(),
        )
    }

    /// The channel and its join reply.
    fn joined(payload: &str) -> Result<(Channel, String), JoinError> {
        let raw = RawValue::from_string(payload.to_owned()).unwrap();
        Channel::join(
            "realtime:room1",
            json!("6"),
            &raw,
            &token("anon"),
            &Verifier::new(b"s"),
            "x:1",
            &Limits::default(),
        )
    }

    #[test]
    fn the_reply_echoes_bindings_byte_for_byte_with_integer_ids() {
        let (c, reply_text) = joined(r#"{"config":{"broadcast":{"self":false},"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"owner_id=eq.\u00e9"},{ "table" : "t" },{}]}}"#).unwrap();
        let reply: Value = serde_json::from_str(&reply_text).unwrap();
        let ids: Vec<u32> = c.bindings.iter().map(|b| b.id).collect();
        assert!(ids.iter().all(|id| *id > 0 && *id < 1 << 27));
        assert_eq!(
            reply_text,
            format!(
                r#"{{"status":"ok","response":{{"postgres_changes":[{{"event":"INSERT","schema":"public","table":"todos","filter":"owner_id=eq.\u00e9","id":{}}},{{ "table" : "t" ,"id":{}}},{{"id":{}}}]}}}}"#,
                ids[0], ids[1], ids[2]
            )
        );
        assert_eq!(reply["response"]["postgres_changes"][1]["table"], "t");
        let r = &c.registration;
        assert_eq!(
            (
                r.id.as_str(),
                r.role.as_str(),
                r.subscriptions[0].id.as_str(),
                r.subscriptions[0].event.as_str()
            ),
            ("x:1", "anon", "x:1:0", "INSERT")
        );
        assert_eq!(r.subscriptions[1].schema, "public");
        assert_eq!(c.bindings[1].subscription_id, "x:1:1");
    }

    #[test]
    fn system_ok_only_after_every_binding_is_confirmed() {
        let mut c = join(r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"a"},{"event":"*","schema":"public","table":"b"}]}}"#).unwrap();
        assert_eq!(c.confirm("x:1:0").system, None);
        assert_eq!(c.confirm("nope").system, None);
        assert_eq!(
            c.confirm("x:1:1").system.as_deref(),
            Some(
                r#"{"channel":"room1","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}"#
            )
        );
        assert_eq!(
            c.confirm("x:1:1").system,
            None,
            "a duplicate reply is harmless"
        );
        assert_eq!(
            c.binding_ids(&[Arc::from("x:1:1"), Arc::from("other")]),
            [c.bindings[1].id]
        );
        assert_eq!(c.binding_ids(&[Arc::from("other")]), Vec::<u32>::new());
    }

    #[test]
    fn a_bus_loss_errors_a_live_channel_once_and_the_new_confirmations_make_it_live_again() {
        let mut c = join(r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"a"},{"event":"*","schema":"public","table":"b"}]}}"#).unwrap();
        assert_eq!(c.interrupt("lost"), None, "nothing was promised yet");
        c.confirm("x:1:0");
        assert!(c.confirm("x:1:1").system.is_some());
        assert_eq!(
            c.interrupt("lost").as_deref(),
            Some(
                r#"{"channel":"room1","extension":"postgres_changes","message":"lost","status":"error"}"#
            )
        );
        assert_eq!(c.interrupt("lost"), None, "one error per loss");
        assert_eq!(c.confirm("x:1:0").system, None, "every binding again");
        assert_eq!(
            c.confirm("x:1:1").system.as_deref(),
            Some(
                r#"{"channel":"room1","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}"#
            )
        );
    }

    #[test]
    fn a_bus_loss_is_reported_during_a_token_refresh_and_forgets_a_rejection() {
        let v = Verifier::new(b"s");
        let mut c = join(
            r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"a"}]}}"#,
        )
        .unwrap();
        assert!(c.confirm("x:1:0").system.is_some());
        assert!(matches!(
            c.refresh(&json!(token("authenticated")), &v),
            Ok(Refresh::Register(..))
        ));
        assert!(
            c.interrupt("lost").is_some(),
            "the client still counts on the channel while the new token is confirmed"
        );
        assert!(
            c.confirm("x:1:0").system.is_some(),
            "the identity in force is live again"
        );
        let done = c.confirm("x:1:0.1");
        assert_eq!(
            done.system.as_deref(),
            Some(
                r#"{"channel":"room1","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}"#
            ),
            "then the refresh completes"
        );
        assert_eq!(c.retire(Instant::now()), Vec::new(), "not yet");
        let later = Instant::now() + RETIRE_AFTER;
        assert_eq!(
            c.retire(later)
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["x:1"]
        );
        assert!(binding_error(c.reject("x:1:0.1", "database away")).is_some());
        assert_eq!(
            c.interrupt("lost"),
            None,
            "the client was told of the rejection"
        );
        assert!(
            c.confirm("x:1:0.1").system.is_some(),
            "after a loss the daemon's new answer decides"
        );
    }

    #[test]
    fn a_rejection_is_a_postgres_changes_error_and_no_ok_follows() {
        let mut c = join(r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"a"},{"event":"*","schema":"public","table":"b"}]}}"#).unwrap();
        assert_eq!(
            binding_error(c.reject("x:1:0", "no such table")).as_deref(),
            Some(
                r#"{"channel":"room1","extension":"postgres_changes","message":"no such table","status":"error"}"#
            )
        );
        assert_eq!(c.confirm("x:1:1").system, None);
        assert_eq!(
            binding_error(c.reject("x:1:0", "no such table")),
            None,
            "said once"
        );
        assert_eq!(
            binding_error(c.reject("x:1:1", "no such table")),
            None,
            "said once"
        );
    }

    #[test]
    fn token_precedence_and_refusals() {
        let raw = RawValue::from_string(format!(
            r#"{{"access_token":"{}"}}"#,
            token("authenticated")
        ))
        .unwrap();
        let c = join_raw("realtime:r", &raw).unwrap();
        assert_eq!(c.0.token, token("authenticated"));
        let raw = RawValue::from_string(r#"{"access_token":null}"#.to_owned()).unwrap();
        let c = join_raw("realtime:r", &raw).unwrap();
        assert_eq!(c.0.token, token("anon"));
        let raw = RawValue::from_string(r#"{"access_token":"garbage"}"#.to_owned()).unwrap();
        let e = join_raw("realtime:r", &raw).unwrap_err();
        assert_eq!(
            e.reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
        let e = join_raw("realtime:", &raw).unwrap_err();
        assert!(e.reason().starts_with("TopicNameRequired"));
        assert!(join(r#"{"config":{"postgres_changes":[1]}}"#).is_err());
        assert!(join(r#"[]"#).is_err());
        assert!(join("null").is_ok());
    }

    #[test]
    fn topics_bindings_and_their_sizes_are_bounded() {
        let v = Verifier::new(b"s");
        let limits = Limits {
            max_topic_bytes: 16,
            max_bindings_per_channel: 2,
            max_binding_bytes: 40,
            ..Limits::default()
        };
        let attempt = |topic: &str, payload: &str| {
            let raw = RawValue::from_string(payload.to_owned()).unwrap();
            Channel::join(topic, Value::Null, &raw, &token("anon"), &v, "p", &limits)
                .map(|(c, _)| c.bindings.len())
                .map_err(|e| e.reason())
        };
        for topic in ["", "phoenix", "room1", "Realtime:room1"] {
            assert_eq!(attempt(topic, "{}"), Err("unmatched topic".to_owned()));
        }
        assert_eq!(attempt("realtime:sixteen", "{}"), Ok(0));
        assert_eq!(
            attempt("realtime:seventeen", "{}"),
            Err(
                "TopicNameTooLong: Topic names are limited to 16 bytes (this one has 18)"
                    .to_owned()
            )
        );
        assert_eq!(attempt("realtime:r", "{}"), Ok(0));
        let binding = r#"{"table":"t"}"#;
        assert_eq!(
            attempt(
                "realtime:r",
                &format!(r#"{{"config":{{"postgres_changes":[{binding},{binding}]}}}}"#)
            ),
            Ok(2)
        );
        assert_eq!(
            attempt(
                "realtime:r",
                &format!(r#"{{"config":{{"postgres_changes":[{binding},{binding},{binding}]}}}}"#)
            ),
            Err("InvalidJoinPayload: A channel may have at most 2 postgres_changes bindings (this join has 3)".to_owned())
        );
        let large = format!(r#"{{"table":"t","filter":"id=eq.{}"}}"#, "9".repeat(20));
        assert_eq!(
            attempt(
                "realtime:r",
                &format!(r#"{{"config":{{"postgres_changes":[{binding},{large}]}}}}"#)
            ),
            Err(format!(
                "InvalidJoinPayload: A postgres_changes binding may have at most 40 bytes (binding 1 has {})",
                large.len()
            ))
        );
        // serde quotes what it refuses: the reply keeps a clip of it.
        let huge = "x".repeat(100_000);
        let reason = attempt("realtime:r", &format!(r#"{{"config":"{huge}"}}"#)).unwrap_err();
        assert!(
            reason.starts_with("InvalidJoinPayload: join payload: invalid type: string \"xxx")
                && reason.contains("bytes)")
                && reason.len() < 200,
            "{reason}"
        );
    }

    fn token_until(role: &str, exp: i64) -> String {
        let claims = json!({"role": role, "exp": exp, "sub": "u1"});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap()
    }

    #[test]
    fn a_refresh_takes_over_only_once_the_daemon_confirmed_every_binding() {
        let v = Verifier::new(b"s");
        let mut c = join(
            r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"a"},{"event":"*","schema":"public","table":"b"}]}}"#,
        )
        .unwrap();
        let ids: Vec<u32> = c.bindings.iter().map(|b| b.id).collect();
        c.confirm("x:1:0");
        assert!(c.confirm("x:1:1").system.is_some());
        assert_eq!(c.refresh(&json!(token("anon")), &v), Ok(Refresh::Ignored));
        assert_eq!(c.refresh(&Value::Null, &v), Ok(Refresh::Ignored));
        assert_eq!(
            c.refresh(&json!("sb_publishable_x"), &v),
            Ok(Refresh::Ignored)
        );
        let later = token_until("authenticated", 5_000_000_000);
        let Ok(Refresh::Register(first, superseded)) = c.refresh(&json!(later), &v) else {
            panic!("a new token registers");
        };
        assert_eq!(superseded, None);
        assert_eq!(
            (first.id.as_str(), first.role.as_str()),
            ("x:1.1", "authenticated")
        );
        assert_eq!(
            first
                .subscriptions
                .iter()
                .map(|b| (b.id.as_str(), b.table.as_str()))
                .collect::<Vec<_>>(),
            [("x:1:0.1", "a"), ("x:1:1.1", "b")]
        );
        // Until the daemon accepts it, the old identity is in force: its
        // events, its expiry.
        assert_eq!(c.binding_ids(&[Arc::from("x:1:0.1")]), Vec::<u32>::new());
        assert_eq!(c.binding_ids(&[Arc::from("x:1:0")]), [ids[0]]);
        assert_eq!(c.check_token(4_000_000_005), Err(AuthError::Expired(5)));
        // A second refresh supersedes the first.
        let Ok(Refresh::Register(second, superseded)) =
            c.refresh(&json!(token("authenticated")), &v)
        else {
            panic!("a newer token registers");
        };
        assert_eq!(superseded.map(|r| r.id.clone()).as_deref(), Some("x:1.1"));
        assert_eq!(second.subscriptions[1].id, "x:1:1.2");
        assert_eq!(
            c.refresh(&json!(token("authenticated")), &v),
            Ok(Refresh::Ignored),
            "the pending token is the latest"
        );
        assert_eq!(c.confirm("x:1:0.1"), Confirmed::default(), "superseded");
        assert_eq!(c.confirm("x:1:0.2"), Confirmed::default());
        let done = c.confirm("x:1:1.2");
        assert!(done.system.is_some());
        assert_eq!(c.registration.id, "x:1.2");
        // Changes committed before the switch may still come under the
        // old ids: they reach the same bindings until the old ones retire.
        assert_eq!(
            c.binding_ids(&[Arc::from("x:1:1"), Arc::from("x:1:1.2")]),
            [ids[1]],
            "once, under either id"
        );
        let retired = c.retire(Instant::now() + RETIRE_AFTER);
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].subscriptions.len(), 2, "the join's registration");
        assert!(c.owns("x:1:0.2") && c.owns("x:1:1") && c.owns("x:1:0.1"));
        assert!(!c.owns("x:10:0") && !c.owns("x:1") && !c.owns("y:1:0"));
        assert_eq!(c.binding_ids(&[Arc::from("x:1:1.2")]), [ids[1]]);
        assert_eq!(
            c.binding_ids(&[Arc::from("x:1:1")]),
            Vec::<u32>::new(),
            "retired"
        );
        // A refresh the daemon refuses ends the channel.
        let Ok(Refresh::Register(..)) = c.refresh(&json!(later), &v) else {
            panic!("registers");
        };
        assert_eq!(
            c.reject("x:1:0.3", "invalid column for filter owner_id"),
            Rejection::Refresh("invalid column for filter owner_id".to_owned())
        );
        assert_eq!(
            c.subscription_ids().collect::<Vec<_>>(),
            ["x:1:0.2", "x:1:1.2", "x:1:0.3", "x:1:1.3"],
            "what closing the channel withdraws"
        );
        assert!(c.refresh(&json!("bad"), &v).is_err());
    }

    #[test]
    fn a_binding_refused_before_and_after_a_refresh_does_not_end_the_channel() {
        let v = Verifier::new(b"s");
        let mut c =
            join(r#"{"config":{"postgres_changes":[{"table":"a"},{"table":"nope"}]}}"#).unwrap();
        assert_eq!(c.confirm("x:1:0"), Confirmed::default());
        assert!(binding_error(c.reject("x:1:1", "no such table")).is_some());
        let Ok(Refresh::Register(..)) = c.refresh(&json!(token("authenticated")), &v) else {
            panic!("registers");
        };
        assert_eq!(c.confirm("x:1:0.1"), Confirmed::default());
        assert_eq!(
            c.reject("x:1:1.1", "no such table"),
            Rejection::Binding(
                r#"{"channel":"room1","extension":"postgres_changes","message":"no such table","status":"error"}"#.to_owned()
            ),
            "its error again, the channel stays"
        );
        assert_eq!(c.registration.id, "x:1.1", "the refresh took over");
        assert_eq!(c.binding_ids(&[Arc::from("x:1:0.1")]), [c.bindings[0].id]);
        // A binding that worked before and is refused now ends the channel.
        let Ok(Refresh::Register(..)) = c.refresh(&json!(token("anon")), &v) else {
            panic!("registers");
        };
        assert_eq!(
            c.reject("x:1:0.2", "invalid column for filter owner"),
            Rejection::Refresh("invalid column for filter owner".to_owned())
        );
    }

    #[test]
    fn a_channel_without_bindings_takes_a_new_token_at_once() {
        let v = Verifier::new(b"s");
        let mut c = join("{}").unwrap();
        let later = token_until("authenticated", 5_000_000_000);
        let Ok(Refresh::Register(registration, None)) = c.refresh(&json!(later), &v) else {
            panic!("registers nothing to wait for");
        };
        assert!(registration.subscriptions.is_empty());
        assert_eq!(c.check_token(4_000_000_005), Ok(()));
        assert_eq!(c.registration.role, "authenticated");
    }

    #[test]
    fn the_token_check_is_its_expiry() {
        let c = join("{}").unwrap();
        assert_eq!(c.check_token(3_999_999_999), Ok(()));
        assert_eq!(
            c.check_token(4_000_000_005),
            Err(AuthError::Expired(5)),
            "exp is 4_000_000_000"
        );
    }
}
