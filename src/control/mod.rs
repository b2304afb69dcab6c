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

mod validate;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use validate::{Validator, Verdict};

use crate::bus::{
    self, CHANNEL_FIELD_PREFIX, ChannelRegistration, Control, ControlOp, Names, Reply, Subscription,
};
use crate::metrics;
use crate::subscription::Shared;

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
/// How long Redis may take to connect or answer.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

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
    redis_url: String,
    names: Names,
    validator: tokio::sync::Mutex<Validator>,
    shared: Arc<Shared>,
}

impl ControlTask {
    /// A control task for `names`' tenant.
    pub fn new(redis_url: String, names: Names, validator: Validator, shared: Arc<Shared>) -> Self {
        ControlTask {
            redis_url,
            names,
            validator: tokio::sync::Mutex::new(validator),
            shared,
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
        let client = redis::Client::open(self.redis_url.as_str())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut pubsub = client.get_async_pubsub().await?;
        // Subscribe before reading the registry back: a request that lands
        // in between is then both in the hash and on the channel (handled
        // twice, harmlessly) rather than in neither.
        pubsub.subscribe(self.names.control()).await?;
        self.recover(&mut conn).await?;
        let mut messages = pubsub.on_message();
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
                    let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                    self.handle(&mut conn, &payload).await?;
                }
                _ = leases.tick() => {
                    self.expire(&mut conn, std::mem::take(&mut compare_hashes)).await?;
                }
            }
        }
    }

    /// Reads every live gateway's subscriptions back into the registry.
    async fn recover(&self, conn: &mut MultiplexedConnection) -> Result<(), Error> {
        let gateways: Vec<String> = conn.smembers(self.names.gateways()).await?;
        let mut recovered = 0usize;
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
        info!(subscriptions = recovered, "registry read back from redis");
        Ok(())
    }

    async fn handle(&self, conn: &mut MultiplexedConnection, payload: &[u8]) -> Result<(), Error> {
        let control: Control = match serde_json::from_slice(payload) {
            Ok(control) => control,
            Err(e) => {
                warn!(error = %e, "ignoring a malformed control message");
                return Ok(());
            }
        };
        if control.v != bus::VERSION {
            warn!(v = control.v, gateway = %control.gateway, "ignoring a control message of another bus version");
            return Ok(());
        }
        let gateway = control.gateway;
        match control.op {
            ControlOp::Subscribe { subscription } => {
                self.subscribe(conn, &gateway, &subscription).await
            }
            ControlOp::SubscribeChannel { channel } => {
                for subscription in channel.expand() {
                    self.subscribe(conn, &gateway, &subscription).await?;
                }
                Ok(())
            }
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
        conn: &mut MultiplexedConnection,
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
    async fn expire(
        &self,
        conn: &mut MultiplexedConnection,
        compare_hashes: bool,
    ) -> Result<(), Error> {
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
        conn: &mut MultiplexedConnection,
        gateway: &str,
    ) -> Result<(), Error> {
        let stored: Vec<(String, String)> = conn.hgetall(self.names.subscriptions(gateway)).await?;
        let mut registered: HashSet<String> = HashSet::new();
        for (field, json) in stored {
            match Registered::parse(&field, &json) {
                Ok(Registered::Channel(channel)) => {
                    registered.extend(channel.subscriptions.into_iter().map(|b| b.id));
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

    async fn lease_alive(
        &self,
        conn: &mut MultiplexedConnection,
        gateway: &str,
    ) -> Result<bool, Error> {
        Ok(conn.exists(self.names.lease(gateway)).await?)
    }

    async fn drop_gateway(
        &self,
        conn: &mut MultiplexedConnection,
        gateway: &str,
    ) -> Result<(), Error> {
        let removed = self.shared.remove_gateway(gateway);
        self.count_subscriptions();
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
        conn: &mut MultiplexedConnection,
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
        conn: &mut MultiplexedConnection,
        gateway: &str,
        reply: &Reply,
    ) -> Result<(), Error> {
        let text = serde_json::to_string(reply).unwrap_or_default();
        let _: i64 = conn.publish(self.names.gateway(gateway), text).await?;
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
