//! Subscription requests from gateways, validated and answered over the bus.
//!
//! ```text
//! gateway ──HSET subscriptions, PUBLISH control──▶ control task ──validate (pool)──▶ Shared registry
//!    ▲                                                   │                              │ read per change
//!    └────────── PUBLISH gateway channel: subscribed {lsn} / rejected {message} ◀───────┘
//! ```
//!
//! The control task is independent of the replication session: it keeps
//! the registry while replication reconnects. On every (re)connection to
//! Redis it reads the gateways' registry hashes back, so subscriptions made
//! while the daemon was down or Redis was away are not lost; a gateway whose
//! lease key expired has its subscriptions dropped, and a live gateway's
//! subscriptions its hash no longer holds are withdrawn.
//!
//! Only the daemon that streams the slot answers ([`Shared::is_active`]).
//! A hot standby follows the same messages silently: it validates and
//! registers subscriptions, holds private channels without asking the
//! database, and leaves leases, hashes and write checks alone. When it
//! takes over it reads the registry back and answers all of it, as a
//! restarted daemon does, which also answers what its predecessor left
//! unanswered; its registry was complete all along, so it streams at once.

mod validate;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::FutureExt;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use validate::{Validator, Verdict};

use crate::bus::server::{Connection, Server};
use crate::bus::{
    self, Access, CHANNEL_FIELD_PREFIX, ChannelRegistration, Control, ControlOp, Names,
    PrivateChannel, Reply, Subscription, WriteCheck,
};
use crate::subscription::{PrivateMember, Shared};
use crate::{channels, messages, metrics};

/// How often the leases of known gateways are checked (the first check
/// after a (re)connection also compares their hashes with the daemon's
/// subscriptions).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long after (re)connecting the leases of gateways already known are
/// left unchecked. A Redis that restarted empty holds no lease until each
/// gateway has reconnected too (its backoff reaches 5 s); expiring them
/// before that would drop live subscriptions, and the `DEL` of a hash could
/// land after the gateway wrote it again, losing entries for the next
/// daemon restart.
const LEASE_GRACE: Duration = Duration::from_secs(15);

/// Why the control task lost its connection (it reconnects by itself).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis refused or went away.
    #[error("control: redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The control channel's subscription ended (Redis went away).
    #[error("control: the control channel subscription ended")]
    Disconnected,
}

/// Private channels asked about in one call at most.
const PROBES_PER_CALL: usize = 500;
/// Control messages handled together at most (the rest wait their turn).
const MAX_BATCH: usize = 256;
/// A probe that could not run: Supabase's reason.
const UNREACHABLE: &str = "Realtime was unable to connect to the project database";

/// A control message, or `None` (logged) when it is malformed or of
/// another bus version.
fn parse(payload: &[u8]) -> Option<Control> {
    match serde_json::from_slice::<Control>(payload) {
        Ok(control) if control.v == bus::VERSION => Some(control),
        Ok(control) => {
            warn!(v = control.v, gateway = %control.gateway, "ignoring a control message of another bus version");
            None
        }
        Err(e) => {
            warn!(error = %e, "ignoring a malformed control message");
            None
        }
    }
}

fn unreachable_database() -> Access {
    Access::Failed(UNREACHABLE.to_owned())
}

/// A read probe's outcome as the gateway is told it. A raising policy
/// reads as "may not" (Supabase logs it and answers Unauthorized).
fn read_outcome(outcome: channels::Outcome<channels::Read>, presence: bool) -> Access {
    match outcome {
        channels::Outcome::Decided(read) => Access::Read {
            broadcast: read.broadcast,
            presence: read.presence,
        },
        channels::Outcome::Failed { code, message } if code != "23514" => {
            debug!(%code, %message, "a read probe raised: unauthorized");
            Access::Read {
                broadcast: false,
                presence: presence.then_some(false),
            }
        }
        channels::Outcome::Failed { code, .. } => Access::Failed(probe_failure(&code)),
    }
}

/// Supabase's reason for a probe that raised `code`.
fn probe_failure(code: &str) -> String {
    match code {
        "23514" => {
            "MissingPartition: Realtime was unable to find the expected messages partition".into()
        }
        _ => UNREACHABLE.to_owned(),
    }
}

/// One field of a gateway's registry hash.
enum Registered {
    /// `<id>` → one subscription.
    One(Subscription),
    /// `channel:<id>` → one channel join's subscriptions.
    Channel(ChannelRegistration),
}

impl Registered {
    fn parse(field: &str, json: &str) -> Result<Registered, serde_json::Error> {
        if field.starts_with(CHANNEL_FIELD_PREFIX) {
            serde_json::from_str(json).map(Registered::Channel)
        } else {
            serde_json::from_str(json).map(Registered::One)
        }
    }
}

/// The control task's state.
pub struct ControlTask {
    server: Server,
    names: Names,
    validator: tokio::sync::Mutex<Validator>,
    shared: Arc<Shared>,
    /// Private channels' probes: the pool and their statement timeout.
    pool: deadpool_postgres::Pool,
    probe_timeout: Duration,
}

impl ControlTask {
    /// A control task for `names`' tenant; private channels' probes run on
    /// `pool` under `probe_timeout`.
    pub fn new(
        server: Server,
        names: Names,
        validator: Validator,
        shared: Arc<Shared>,
        pool: deadpool_postgres::Pool,
        probe_timeout: Duration,
    ) -> Self {
        ControlTask {
            server,
            names,
            validator: tokio::sync::Mutex::new(validator),
            shared,
            pool,
            probe_timeout,
        }
    }

    /// Serves until `cancel` fires, reconnecting to Redis with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let backoff = backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let mut delays = backoff.build();
        loop {
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                result = self.serve() => result,
            };
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            metrics::counter!(metrics::REDIS_ERRORS, metrics::TASK => metrics::TASK_CONTROL)
                .increment(1);
            metrics::counter!(metrics::REDIS_RECONNECTS, metrics::TASK => metrics::TASK_CONTROL)
                .increment(1);
            warn!(error = %result.err().map_or_else(String::new, |e| e.to_string()), retry_in = ?delay, "control task reconnecting");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn serve(&self) -> Result<(), Error> {
        let mut conn = self.server.connect().await?;
        let (mut sink, mut messages) = self.server.subscriber().await?;
        // Subscribe before reading the registry back: a request that lands
        // in between is then both in the hash and on the channel (handled
        // twice, harmlessly) rather than in neither.
        sink.subscribe(&self.names.control()).await?;
        let mut active = self.shared.watch_active();
        active.borrow_and_update();
        self.recover(&mut conn).await?;
        let mut leases = tokio::time::interval_at(
            tokio::time::Instant::now() + LEASE_GRACE,
            LEASE_CHECK_INTERVAL,
        );
        // Only the first check after a (re)connection compares hashes: an
        // `unsubscribe` is lost only while this connection is down.
        let mut compare_hashes = true;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { return Err(Error::Disconnected) };
                    // What else has arrived is handled with it, so that the
                    // private joins and writes among them are probed in one
                    // call (batched per subject).
                    let mut batch = vec![parse(&message.payload)];
                    let mut lost = false;
                    while batch.len() < MAX_BATCH {
                        match messages.next().now_or_never() {
                            Some(Some(message)) => batch.push(parse(&message.payload)),
                            // Lost among them: what came before is handled,
                            // then the connection starts over.
                            Some(None) => {
                                lost = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    self.handle_batch(&mut conn, batch).await?;
                    if lost {
                        return Err(Error::Disconnected);
                    }
                }
                _ = leases.tick() => {
                    // A standby drops dead gateways too (from its registry
                    // only: the daemon that answers keeps the hashes).
                    self.expire(&mut conn, std::mem::take(&mut compare_hashes)).await?;
                }
                changed = active.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if *active.borrow_and_update() {
                        // A standby that took over (or a daemon whose
                        // session came back): what it kept silently is
                        // answered now, as after a restart, with whatever
                        // its predecessor left unanswered.
                        info!("this daemon holds the slot: confirming the registry to the gateways");
                        self.recover(&mut conn).await?;
                    }
                }
            }
        }
    }

    /// Reads every live gateway's subscriptions back into the registry.
    async fn recover(&self, conn: &mut Connection) -> Result<(), Error> {
        let gateways: Vec<String> = conn.smembers(self.names.gateways()).await?;
        let mut recovered = 0usize;
        // Private channels are asked again, all in one call at the end.
        let mut private: Vec<(String, ChannelRegistration)> = Vec::new();
        for gateway in gateways {
            if !self.lease_alive(conn, &gateway).await? {
                self.drop_gateway(conn, &gateway).await?;
                continue;
            }
            let stored: Vec<(String, String)> =
                conn.hgetall(self.names.subscriptions(&gateway)).await?;
            for (field, json) in stored {
                match Registered::parse(&field, &json) {
                    Ok(Registered::One(subscription)) => {
                        self.subscribe(conn, &gateway, &subscription).await?;
                        recovered += 1;
                    }
                    Ok(Registered::Channel(channel)) if channel.private.is_some() => {
                        private.push((gateway.clone(), channel));
                    }
                    Ok(Registered::Channel(channel)) => {
                        for subscription in channel.expand() {
                            self.subscribe(conn, &gateway, &subscription).await?;
                            recovered += 1;
                        }
                    }
                    // A channel entry that cannot be read names no id to
                    // reject: its gateway's channel waits, as it would for
                    // a daemon that is away.
                    Err(e) if field.starts_with(CHANNEL_FIELD_PREFIX) => {
                        warn!(%gateway, field = %field, error = %e, "unreadable channel in the registry; skipping it");
                    }
                    Err(e) => {
                        warn!(%gateway, id = %field, error = %e, "unreadable subscription in the registry; rejecting it");
                        self.reply(
                            conn,
                            &gateway,
                            &Reply::Rejected {
                                v: bus::VERSION,
                                id: field,
                                message: format!("malformed subscription: {e}"),
                            },
                        )
                        .await?;
                    }
                }
            }
        }
        let joins: Vec<(&str, &ChannelRegistration)> =
            private.iter().map(|(g, c)| (g.as_str(), c)).collect();
        if !self.shared.is_active() {
            // A standby: held as they are, asked when it takes over.
            for (gateway, channel) in &joins {
                self.keep_private(conn, gateway, channel).await?;
                recovered += channel.subscriptions.len();
            }
            info!(
                subscriptions = recovered,
                private = private.len(),
                "registry read back from redis (standing by: not answering)"
            );
            self.shared.mark_recovered();
            return Ok(());
        }
        let access = self.read_access(&joins).await;
        for ((gateway, channel), access) in joins.into_iter().zip(access) {
            recovered += channel.subscriptions.len();
            // Authorized at its join: a database that cannot be asked now
            // does not close it. It is held as it was (its gateway still
            // gates what it may read) and asked again at the next restart.
            if access == unreachable_database() {
                self.keep_private(conn, gateway, channel).await?;
                continue;
            }
            // Replayed once, when the channel joined, not again.
            self.join_private(conn, gateway, channel, access, false)
                .await?;
        }
        info!(
            subscriptions = recovered,
            private = private.len(),
            "registry read back from redis"
        );
        self.shared.mark_recovered();
        Ok(())
    }

    /// Handles control messages in order; the private channels' read
    /// probes and the write checks among them are asked in one call each.
    async fn handle_batch(
        &self,
        conn: &mut Connection,
        batch: Vec<Option<Control>>,
    ) -> Result<(), Error> {
        let batch: Vec<Control> = batch.into_iter().flatten().collect();
        if !self.shared.is_active() {
            return self.follow(conn, batch).await;
        }
        let joins: Vec<(&str, &ChannelRegistration)> = batch
            .iter()
            .filter_map(|c| match &c.op {
                ControlOp::SubscribeChannel { channel } if channel.private.is_some() => {
                    Some((c.gateway.as_str(), channel))
                }
                _ => None,
            })
            .collect();
        let mut access = self.read_access(&joins).await.into_iter();
        let checks: Vec<&WriteCheck> = batch
            .iter()
            .filter_map(|c| match &c.op {
                ControlOp::Authorize { check } => Some(check),
                _ => None,
            })
            .collect();
        let mut writes = self.write_access(&checks).await.into_iter();
        for control in batch {
            let gateway = control.gateway;
            match control.op {
                ControlOp::SubscribeChannel { channel } if channel.private.is_some() => {
                    let access = access.next().unwrap_or_else(unreachable_database);
                    self.join_private(conn, &gateway, &channel, access, true)
                        .await?;
                }
                ControlOp::Authorize { check } => {
                    let (allowed, reason) = writes.next().unwrap_or((None, None));
                    let reply = Reply::Write {
                        v: bus::VERSION,
                        id: check.id,
                        allowed,
                        reason,
                    };
                    self.reply(conn, &gateway, &reply).await?;
                }
                op => self.handle(conn, gateway, op).await?,
            }
        }
        Ok(())
    }

    /// Registers a private channel that may read (its topic's messages
    /// reach it when it may read broadcasts; its bindings are validated as
    /// any), and tells its gateway what it may read; then, when it asked
    /// for a replay (and `replay`), the stored messages.
    async fn join_private(
        &self,
        conn: &mut Connection,
        gateway: &str,
        channel: &ChannelRegistration,
        mut access: Access,
        replay: bool,
    ) -> Result<(), Error> {
        let Some(private) = &channel.private else {
            return Ok(());
        };
        let replay = private.replay.filter(|_| replay);
        if replay.is_some()
            && matches!(
                access,
                Access::Read {
                    broadcast: false,
                    ..
                }
            )
        {
            // Supabase: no replay without broadcast read.
            access = Access::Read {
                broadcast: false,
                presence: None,
            };
        }
        let mut granted = match &access {
            Access::Read {
                broadcast,
                presence,
            } => (*broadcast || *presence == Some(true)).then_some(*broadcast),
            Access::Failed(_) => None,
        };
        if granted == Some(true) {
            self.hold_private(gateway, channel, private);
        }
        // After it is held: a message committed meanwhile reaches it live
        // (the gateway sends one copy of a message both live and replayed).
        let mut replayed = Vec::new();
        if let (Some(true), Some(replay)) = (granted, replay) {
            let claims = serde_json::to_string(&*channel.claims).unwrap_or_default();
            let subject = channels::Subject {
                role: &channel.role,
                claims: &claims,
                topic: &private.topic,
            };
            match channels::replay(
                &self.pool,
                self.probe_timeout,
                &subject,
                replay.since,
                replay.limit,
            )
            .await
            {
                Ok(stored) => replayed = stored,
                Err(e) => {
                    warn!(error = %e, topic = %private.topic, "could not replay messages");
                    access = Access::Failed(
                        "UnableToReplayMessages: Realtime was unable to replay messages".to_owned(),
                    );
                    granted = None;
                }
            }
        }
        if granted.is_none() {
            // Denied: nothing of it is held (a refreshed token that lost
            // the topic drops what the earlier one had).
            for id in channel.ids() {
                self.shared.remove(gateway, id);
            }
            self.count_subscriptions();
            debug!(%gateway, topic = %private.topic, ?access, "private channel refused");
        }
        let reply = Reply::Access {
            v: bus::VERSION,
            id: private.id.clone(),
            access,
        };
        self.reply(conn, gateway, &reply).await?;
        if granted.is_none() {
            return Ok(());
        }
        for stored in replayed {
            let message = messages::Message {
                id: stored.id,
                topic: private.topic.clone(),
                inserted_at: String::new(),
                event: stored.event,
                private: true,
                body: stored.body,
            };
            let bytes = messages::room_message(
                &message,
                vec![private.id.clone()],
                messages::Sent::Replayed,
            );
            let _: i64 = self
                .server
                .publish_cmd(&self.names.gateway(gateway), bytes)
                .query_async(conn)
                .await?;
        }
        for subscription in channel.expand() {
            self.subscribe(conn, gateway, &subscription).await?;
        }
        Ok(())
    }

    /// A standby's handling of control messages: the registry follows them
    /// (subscriptions validated, private channels held without asking the
    /// database), and nothing is answered or probed; write checks are
    /// left to the daemon that streams.
    async fn follow(&self, conn: &mut Connection, batch: Vec<Control>) -> Result<(), Error> {
        for control in batch {
            match control.op {
                ControlOp::SubscribeChannel { channel } if channel.private.is_some() => {
                    self.keep_private(conn, &control.gateway, &channel).await?;
                }
                ControlOp::Authorize { .. } => {}
                op => self.handle(conn, control.gateway, op).await?,
            }
        }
        Ok(())
    }

    /// Holds a private channel as it is, without asking the database (a
    /// standby, or a database that cannot be asked): each message of its
    /// topic is still decided for it, and its gateway gates what it reads.
    async fn keep_private(
        &self,
        conn: &mut Connection,
        gateway: &str,
        channel: &ChannelRegistration,
    ) -> Result<(), Error> {
        if let Some(private) = &channel.private {
            self.hold_private(gateway, channel, private);
        }
        for subscription in channel.expand() {
            self.subscribe(conn, gateway, &subscription).await?;
        }
        Ok(())
    }

    /// Holds a private channel that may read broadcasts: its topic's
    /// messages are asked about for it.
    fn hold_private(&self, gateway: &str, channel: &ChannelRegistration, private: &PrivateChannel) {
        self.shared.add_private(Arc::new(PrivateMember {
            gateway: Arc::from(gateway),
            id: Arc::from(private.id.as_str()),
            role: Arc::from(channel.role.as_str()),
            claims_text: Arc::from(serde_json::to_string(&*channel.claims).unwrap_or_default()),
            topic: Arc::from(private.topic.as_str()),
        }));
        self.count_subscriptions();
    }

    /// The read access of each private join, in one call.
    async fn read_access(&self, joins: &[(&str, &ChannelRegistration)]) -> Vec<Access> {
        if joins.is_empty() {
            return Vec::new();
        }
        // A role outside allowed_roles is refused without asking (its
        // token could name the table's owner, who bypasses the policies).
        let allowed: Vec<bool> = {
            let validator = self.validator.lock().await;
            joins
                .iter()
                .map(|(_, c)| validator.allows_role(&c.role))
                .collect()
        };
        if allowed.iter().any(|a| !a) {
            let asked: Vec<(&str, &ChannelRegistration)> = joins
                .iter()
                .zip(&allowed)
                .filter_map(|(join, &ok)| ok.then_some(*join))
                .collect();
            let mut answers = Box::pin(self.read_access(&asked)).await.into_iter();
            return joins
                .iter()
                .zip(allowed)
                .map(|((_, channel), ok)| {
                    if ok {
                        answers.next().unwrap_or_else(unreachable_database)
                    } else {
                        let presence = channel.private.as_ref().is_some_and(|p| p.presence);
                        Access::Read {
                            broadcast: false,
                            presence: presence.then_some(false),
                        }
                    }
                })
                .collect();
        }
        let claims: Vec<String> = joins
            .iter()
            .map(|(_, c)| serde_json::to_string(&*c.claims).unwrap_or_default())
            .collect();
        let mut subjects = Vec::with_capacity(joins.len());
        let mut presence = Vec::with_capacity(joins.len());
        for ((_, channel), claims) in joins.iter().zip(&claims) {
            let private = channel.private.as_ref();
            subjects.push(channels::Subject {
                role: &channel.role,
                claims,
                topic: private.map_or("", |p| p.topic.as_str()),
            });
            presence.push(private.is_some_and(|p| p.presence));
        }
        // In calls of at most PROBES_PER_CALL, so that a registry read back
        // with many private channels does not run into the timeout.
        let mut out = Vec::with_capacity(joins.len());
        for (subjects, presence) in subjects
            .chunks(PROBES_PER_CALL)
            .zip(presence.chunks(PROBES_PER_CALL))
        {
            match channels::access(&self.pool, self.probe_timeout, subjects, presence).await {
                Ok(outcomes) => out.extend(
                    outcomes
                        .into_iter()
                        .zip(presence)
                        .map(|(outcome, &presence)| read_outcome(outcome, presence)),
                ),
                Err(e) => {
                    warn!(error = %e, joins = subjects.len(), "could not authorize private channels");
                    out.extend(subjects.iter().map(|_| unreachable_database()));
                }
            }
        }
        out
    }

    /// The answer to each write check, in one call: allowed, or why it is
    /// unknown.
    async fn write_access(&self, checks: &[&WriteCheck]) -> Vec<(Option<bool>, Option<String>)> {
        if checks.is_empty() {
            return Vec::new();
        }
        // A role outside allowed_roles may not write (see read_access).
        let allowed: Vec<bool> = {
            let validator = self.validator.lock().await;
            checks
                .iter()
                .map(|c| validator.allows_role(&c.role))
                .collect()
        };
        if allowed.iter().any(|a| !a) {
            let asked: Vec<&WriteCheck> = checks
                .iter()
                .zip(&allowed)
                .filter_map(|(check, &ok)| ok.then_some(*check))
                .collect();
            let mut answers = Box::pin(self.write_access(&asked)).await.into_iter();
            return allowed
                .into_iter()
                .map(|ok| {
                    if ok {
                        answers
                            .next()
                            .unwrap_or((None, Some(UNREACHABLE.to_owned())))
                    } else {
                        (Some(false), None)
                    }
                })
                .collect();
        }
        let claims: Vec<String> = checks
            .iter()
            .map(|c| serde_json::to_string(&*c.claims).unwrap_or_default())
            .collect();
        let subjects: Vec<channels::Subject<'_>> = checks
            .iter()
            .zip(&claims)
            .map(|(c, claims)| channels::Subject {
                role: &c.role,
                claims,
                topic: &c.topic,
            })
            .collect();
        let extensions: Vec<&str> = checks.iter().map(|c| c.extension.as_str()).collect();
        match channels::write(&self.pool, self.probe_timeout, &subjects, &extensions).await {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    channels::Outcome::Decided(allowed) => (Some(allowed), None),
                    channels::Outcome::Failed { code, message } => {
                        debug!(%code, %message, "a write probe raised");
                        (None, Some(probe_failure(&code)))
                    }
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, checks = checks.len(), "could not check private writes");
                checks
                    .iter()
                    .map(|_| (None, Some(UNREACHABLE.to_owned())))
                    .collect()
            }
        }
    }

    async fn handle(
        &self,
        conn: &mut Connection,
        gateway: String,
        op: ControlOp,
    ) -> Result<(), Error> {
        match op {
            ControlOp::Subscribe { subscription } => {
                self.subscribe(conn, &gateway, &subscription).await
            }
            ControlOp::SubscribeChannel { channel } => {
                for subscription in channel.expand() {
                    self.subscribe(conn, &gateway, &subscription).await?;
                }
                Ok(())
            }
            // Batched by `handle_batch`.
            ControlOp::Authorize { .. } => Ok(()),
            ControlOp::Unsubscribe { id } => {
                let removed = self.shared.remove(&gateway, &id);
                self.count_subscriptions();
                debug!(%gateway, %id, removed, "unsubscribed");
                if removed {
                    self.dropped(conn, &gateway, vec![id]).await?;
                }
                Ok(())
            }
            ControlOp::Leave => {
                let removed = self.shared.remove_gateway(&gateway);
                self.count_subscriptions();
                info!(%gateway, removed = removed.len(), "gateway left");
                self.dropped(conn, &gateway, removed).await
            }
        }
    }

    async fn subscribe(
        &self,
        conn: &mut Connection,
        gateway: &str,
        subscription: &Subscription,
    ) -> Result<(), Error> {
        let id = subscription.id.clone();
        let verdict = self
            .validator
            .lock()
            .await
            .validate(gateway, subscription)
            .await;
        let reply = match verdict {
            Ok(Verdict::Accepted { entry, tables }) => {
                let lsn = self.shared.add(entry, tables);
                self.count_subscriptions();
                debug!(%gateway, %id, %lsn, "subscribed");
                Reply::Subscribed {
                    v: bus::VERSION,
                    id,
                    lsn: lsn.to_string(),
                }
            }
            Ok(Verdict::Rejected(message)) => {
                debug!(%gateway, %id, %message, "subscription rejected");
                Reply::Rejected {
                    v: bus::VERSION,
                    id,
                    message,
                }
            }
            Err(e) => {
                warn!(%gateway, %id, error = %e, "could not validate a subscription");
                Reply::Rejected {
                    v: bus::VERSION,
                    id,
                    message: format!("{{:error, \"{e}\"}}"),
                }
            }
        };
        self.reply(conn, gateway, &reply).await
    }

    /// Drops the subscriptions of gateways whose lease expired and, when
    /// `compare_hashes`, those of live gateways that their registry hash no
    /// longer holds.
    async fn expire(&self, conn: &mut Connection, compare_hashes: bool) -> Result<(), Error> {
        let gateways = self.shared.read().gateways();
        for gateway in gateways {
            if !self.lease_alive(conn, &gateway).await? {
                self.drop_gateway(conn, &gateway).await?;
            } else if compare_hashes {
                self.withdraw_unregistered(conn, &gateway).await?;
            }
        }
        if compare_hashes {
            debug!("compared the live gateways' registry hashes with their subscriptions");
        }
        Ok(())
    }

    /// Removes `gateway`'s subscriptions that are missing from its hash.
    ///
    /// A gateway writes a subscription to its hash before announcing it and
    /// deletes it before announcing the removal, so one the hash lacks is
    /// one the gateway let go of. Its `unsubscribe` is lost when this
    /// task's connection is down as it is published (a cut subscriber, or
    /// Redis restarting, empty or not): reading the hashes back only adds,
    /// so the daemon would deliver to, and check RLS for, a subscriber that
    /// is gone until its gateway leaves. Run once, at the end of the grace
    /// after each (re)connection: a live subscription caught between an
    /// empty restart and its gateway's rewrite of the hash is dropped and
    /// comes back with the rewrite's `subscribe`, and its channel, reset
    /// when the gateway lost Redis, waits for that `subscribed` anyway. Run
    /// at every check, it would also drop, silently, entries Redis lost
    /// while everyone stayed connected (eviction): see docs/bus.md.
    async fn withdraw_unregistered(
        &self,
        conn: &mut Connection,
        gateway: &str,
    ) -> Result<(), Error> {
        let stored: Vec<(String, String)> = conn.hgetall(self.names.subscriptions(gateway)).await?;
        let mut registered: HashSet<String> = HashSet::new();
        for (field, json) in stored {
            match Registered::parse(&field, &json) {
                Ok(Registered::Channel(channel)) => {
                    registered.extend(channel.ids().map(str::to_owned));
                }
                Ok(Registered::One(_)) | Err(_) => {
                    registered.insert(field);
                }
            }
        }
        let stale: Vec<Arc<str>> = self
            .shared
            .read()
            .ids_of(gateway)
            .into_iter()
            .filter(|id| !registered.contains(&**id))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        for id in &stale {
            self.shared.remove(gateway, id);
        }
        self.count_subscriptions();
        info!(%gateway, withdrawn = stale.len(), "withdrew subscriptions its registry hash no longer holds");
        self.dropped(conn, gateway, stale).await
    }

    async fn lease_alive(&self, conn: &mut Connection, gateway: &str) -> Result<bool, Error> {
        Ok(conn.exists(self.names.lease(gateway)).await?)
    }

    async fn drop_gateway(&self, conn: &mut Connection, gateway: &str) -> Result<(), Error> {
        let removed = self.shared.remove_gateway(gateway);
        self.count_subscriptions();
        if !self.shared.is_active() {
            // The daemon that answers keeps the registry hashes.
            return Ok(());
        }
        let _: () = conn.del(self.names.subscriptions(gateway)).await?;
        let _: () = conn.srem(self.names.gateways(), gateway).await?;
        info!(%gateway, removed = removed.len(), "gateway lease expired; its subscriptions are gone");
        // A gateway that was only stalled hears it and registers again.
        self.dropped(conn, gateway, removed).await
    }

    /// Tells `gateway` that the daemon no longer holds `ids`: a gateway
    /// that did not ask for it (a forged or duplicated `leave`, a lease
    /// that expired while it stalled) registers them again.
    async fn dropped(
        &self,
        conn: &mut Connection,
        gateway: &str,
        ids: Vec<impl AsRef<str>>,
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let reply = Reply::Dropped {
            v: bus::VERSION,
            ids: ids.iter().map(|id| id.as_ref().to_owned()).collect(),
        };
        self.reply(conn, gateway, &reply).await
    }

    /// Sets the subscriptions gauge from the registry.
    fn count_subscriptions(&self) {
        metrics::gauge!(metrics::SUBSCRIPTIONS).set(self.shared.read().len() as f64);
    }

    async fn reply(
        &self,
        conn: &mut Connection,
        gateway: &str,
        reply: &Reply,
    ) -> Result<(), Error> {
        // A standby is silent: gateways hear the daemon that streams.
        if !self.shared.is_active() {
            return Ok(());
        }
        let text = serde_json::to_string(reply).unwrap_or_default();
        let _: i64 = self
            .server
            .publish_cmd(&self.names.gateway(gateway), text)
            .query_async(conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_field_holds_a_channel_or_one_subscription() {
        let channel = r#"{"id":"3:2","role":"anon","claims":{"role":"anon","sub":"u"},"subscriptions":[{"id":"3:2:0","schema":"public","table":"a","event":"*","filter":null,"select":null},{"id":"3:2:1","schema":"public","table":"b"}]}"#;
        let Ok(Registered::Channel(parsed)) = Registered::parse("channel:3:2", channel) else {
            panic!("a channel field");
        };
        let expanded: Vec<Subscription> = parsed.expand().collect();
        assert_eq!(
            expanded
                .iter()
                .map(|s| (
                    s.id.as_str(),
                    s.table.as_str(),
                    s.event.as_str(),
                    s.role.as_str()
                ))
                .collect::<Vec<_>>(),
            [("3:2:0", "a", "*", "anon"), ("3:2:1", "b", "*", "anon")]
        );
        assert!(
            std::sync::Arc::ptr_eq(&expanded[0].claims, &expanded[1].claims),
            "one copy of the claims"
        );
        let one = r#"{"id":"s1","schema":"public","table":"a","claims":{},"role":"anon"}"#;
        assert!(matches!(Registered::parse("s1", one), Ok(Registered::One(s)) if s.id == "s1"));
        // A channel's text under a plain id, or the reverse, is refused.
        assert!(Registered::parse("s1", channel).is_err());
        assert!(Registered::parse("channel:s1", one).is_err());
    }
}
