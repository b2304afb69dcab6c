//! The Redis the bus runs on: one server, or a Redis Cluster (or Valkey).
//!
//! Everything else speaks to it through these types, whichever it is:
//! [`Connection`] runs commands and pipelines (it is a
//! [`redis::aio::ConnectionLike`]), [`Server::publish`] adds a publish to a
//! pipeline, and [`Server::subscriber`] gives a [`Sink`] to subscribe with
//! and the [`Messages`] that arrive.
//!
//! On one server the bus uses classic pub/sub (`PUBLISH`, `SUBSCRIBE`),
//! as it always has. On a cluster it uses sharded pub/sub (`SPUBLISH`,
//! `SSUBSCRIBE`): a channel lives on the shard of its slot, and every name
//! of a tenant carries the hash tag `{tenant}` ([`super::Names`]), so that
//! a tenant's keys, pipelines, scripts and channels share one slot.
//!
//! A cluster ends shard subscriptions by itself when their slot moves (a
//! failover, a resharding): the subscriber gets an `sunsubscribe` it did
//! not ask for, and messages published meanwhile are lost to it. The
//! client library would take that as a real unsubscribe. [`Messages`]
//! ends instead, with a log line, so that its owner reconnects and
//! subscribes again as after any lost connection (the gateway then tells
//! its sockets of the gap, and reads presences back).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink, PubSubStream};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, PushKind, RedisFuture, RedisResult, Value};
use tokio::sync::mpsc;
use tracing::warn;

/// How long Redis may take to connect or to answer.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the bus is: `redis_url` and `redis_cluster` of the settings.
#[derive(Clone)]
pub struct Server {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

/// A connection for commands and pipelines.
#[derive(Clone)]
pub enum Connection {
    /// To one server.
    Single(MultiplexedConnection),
    /// To a cluster: each command goes to the node of its slot.
    Cluster(ClusterConnection),
}

/// Unsubscriptions asked for and not yet confirmed, by channel: their
/// confirmations are not a lost subscription. Counted, not a set: a
/// leave, a join and the leave's late confirmation must not read as the
/// cluster ending the joined channel.
type Leaving = Arc<Mutex<HashMap<String, usize>>>;

/// Subscribes and unsubscribes; its [`Messages`] receive.
pub enum Sink {
    /// On one server.
    Single(PubSubSink),
    /// On a cluster.
    Cluster(ClusterConnection, Leaving),
}

/// What arrives on the channels of a [`Sink`]. Once [`Messages::next`]
/// said the subscription is lost, it says so at every call.
pub struct Messages {
    kind: MessagesKind,
    lost: bool,
}

enum MessagesKind {
    Single(PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>, Leaving),
}

/// One message: its channel and payload.
pub struct Message {
    /// The channel it was published on.
    pub channel: String,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Server {
    /// The bus at `url`: one server, or with `cluster` the seed nodes of a
    /// cluster, comma-separated (`redis://h1:7000,redis://h2:7000`).
    pub fn open(url: &str, cluster: bool) -> RedisResult<Server> {
        let kind = if cluster {
            Kind::Cluster(url.split(',').map(|u| u.trim().to_owned()).collect())
        } else {
            Kind::Single(Box::new(redis::Client::open(url)?))
        };
        Ok(Server { kind })
    }

    /// Whether it is a cluster (sharded pub/sub, hash-tagged names).
    pub fn sharded(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// A connection for commands.
    pub async fn connect(&self) -> RedisResult<Connection> {
        match &self.kind {
            Kind::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT));
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Kind::Cluster(nodes) => Ok(Connection::Cluster(
                cluster_builder(nodes)
                    .build()?
                    .get_async_connection()
                    .await?,
            )),
        }
    }

    /// A subscriber connection of its own.
    pub async fn subscriber(&self) -> RedisResult<(Sink, Messages)> {
        match &self.kind {
            Kind::Single(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((
                    Sink::Single(sink),
                    Messages::new(MessagesKind::Single(stream)),
                ))
            }
            Kind::Cluster(nodes) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client: ClusterClient = cluster_builder(nodes)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()?;
                let conn = client.get_async_connection().await?;
                let leaving = Leaving::default();
                Ok((
                    Sink::Cluster(conn, leaving.clone()),
                    Messages::new(MessagesKind::Cluster(rx, leaving)),
                ))
            }
        }
    }

    /// A publish of `payload` on `channel`: `PUBLISH`, or on a cluster
    /// `SPUBLISH`. Its reply is a receiver count (on a cluster, the
    /// node's own only): success whatever it is.
    pub fn publish_cmd(&self, channel: &str, payload: impl redis::ToRedisArgs) -> Cmd {
        let mut cmd = redis::cmd(match self.kind {
            Kind::Single(_) => "PUBLISH",
            Kind::Cluster(_) => "SPUBLISH",
        });
        cmd.arg(channel).arg(payload);
        cmd
    }

    /// Adds [`Self::publish_cmd`] to `pipe`.
    pub fn publish<'p>(
        &self,
        pipe: &'p mut Pipeline,
        channel: &str,
        payload: impl redis::ToRedisArgs,
    ) -> &'p mut Pipeline {
        pipe.add_command(self.publish_cmd(channel, payload))
    }
}

fn cluster_builder(nodes: &[String]) -> redis::cluster::ClusterClientBuilder {
    redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(REDIS_TIMEOUT)
        .response_timeout(REDIS_TIMEOUT)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Sink {
    /// Subscribes to `channel` (`SUBSCRIBE`, or `SSUBSCRIBE` on a cluster).
    pub async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.subscribe(channel).await,
            Sink::Cluster(conn, _) => conn.ssubscribe(channel).await,
        }
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.unsubscribe(channel).await,
            Sink::Cluster(conn, leaving) => {
                *lock(leaving).entry(channel.to_owned()).or_default() += 1;
                conn.sunsubscribe(channel).await
            }
        }
    }

    /// `PING` on the subscriber connection: one cut silently (a NAT's
    /// idle timeout) would otherwise look like a quiet stream forever.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.ping::<Value>().await.map(drop),
            Sink::Cluster(conn, _) => redis::cmd("PING")
                .query_async::<Value>(conn)
                .await
                .map(drop),
        }
    }
}

impl Messages {
    fn new(kind: MessagesKind) -> Messages {
        Messages { kind, lost: false }
    }

    /// The next message; `None` when the subscription is lost: the
    /// connection closed or, on a cluster, one of its shard subscriptions
    /// ended unasked (logged), after which messages may be missing.
    pub async fn next(&mut self) -> Option<Message> {
        if self.lost {
            return None;
        }
        let next = self.receive().await;
        self.lost = next.is_none();
        next
    }

    async fn receive(&mut self) -> Option<Message> {
        match &mut self.kind {
            MessagesKind::Single(stream) => {
                let message = stream.next().await?;
                Some(Message {
                    channel: message.get_channel_name().to_owned(),
                    payload: message.get_payload_bytes().to_vec(),
                })
            }
            MessagesKind::Cluster(rx, leaving) => loop {
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        let mut data = push.data.into_iter();
                        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                            continue;
                        };
                        let (Some(channel), Some(payload)) = (bytes(channel), bytes(payload))
                        else {
                            continue;
                        };
                        return Some(Message {
                            channel: String::from_utf8_lossy(&channel).into_owned(),
                            payload,
                        });
                    }
                    PushKind::SUnsubscribe => {
                        let channel = push
                            .data
                            .into_iter()
                            .next()
                            .and_then(bytes)
                            .map(|c| String::from_utf8_lossy(&c).into_owned())
                            .unwrap_or_default();
                        let mut leaving = lock(leaving);
                        match leaving.get(&channel).copied() {
                            Some(1) => {
                                leaving.remove(&channel);
                                continue;
                            }
                            Some(pending) if pending > 1 => {
                                leaving.insert(channel, pending - 1);
                                continue;
                            }
                            _ => {}
                        }
                        drop(leaving);
                        warn!(
                            channel = %crate::gateway::quiet::clip(&channel),
                            "redis cluster ended a shard subscription by itself (a failover or a slot migration); subscribing again"
                        );
                        return None;
                    }
                    PushKind::Disconnection => {
                        warn!("a redis cluster node's connection was lost; subscribing again");
                        return None;
                    }
                    _ => continue,
                }
            },
        }
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn lock(
    leaving: &Mutex<HashMap<String, usize>>,
) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
    leaving.lock().unwrap_or_else(|e| e.into_inner())
}
