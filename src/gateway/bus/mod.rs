//! The gateway's side of the bus (`docs/bus.md`): one Redis task per
//! gateway. It holds the lease, writes subscriptions to the registry hash
//! and announces them on the control channel, and routes what the daemon
//! sends on the gateway's channel to the sockets by subscription id. It
//! also keeps the [`rooms`] (Broadcast and Presence) this gateway's
//! sockets are in.
//!
//! ```text
//! sockets ──register/unregister──▶ Bus (routes) ──commands──▶ bus task ──HSET, PUBLISH control──▶ Redis
//!    ▲                                                          │
//!    └──try_send Delivery (full: the socket is kicked) ◀── route ◀── SUBSCRIBE walcast:{tenant}:gateway:{id}
//!                                                       ◀── rooms ◀── SUBSCRIBE walcast:{tenant}:room:public:{room}
//! ```
//!
//! Routing never waits on a socket: a socket whose queue is full is too
//! slow and is closed, so one slow client cannot delay the others.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bus::server::{Connection, Server, Sink};
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub mod rooms;
mod seen;

use serde_json::{Map, Value};

use self::rooms::{Member, RoomEvent, Rooms};
use self::seen::{Mark, Position};
use super::render::ChangeEvent;
use crate::bus::room::{self, Encoding};
use crate::bus::{self, ChannelRegistration, Control, ControlOp, Names, WriteCheck};
use crate::gateway::broadcast::event::{Broadcast, User};

/// Lease lifetime by default: the daemon drops the gateway's
/// subscriptions, and other gateways its presences, this long after the
/// gateway stops refreshing it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How often other gateways' leases are checked for their presences.
const PRESENCE_CHECK: Duration = Duration::from_secs(5);
/// Bytes of broadcasts queued for Redis at most; more are refused (the
/// bus is away or slower than its senders).
const MAX_QUEUED_BROADCAST_BYTES: usize = 64 * 1024 * 1024;
/// How long Redis may take to connect or answer.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between reconnection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// What the daemon said that concerns one socket.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The subscription is live.
    Subscribed(String),
    /// The subscription was refused, with Supabase's message.
    Rejected(String, String),
    /// These subscriptions were denied a change whose visibility could not
    /// be decided.
    Error(Vec<Arc<str>>, String),
    /// A change these subscriptions may see, shared by every socket it
    /// goes to (each distinct frame is rendered once).
    Change(Vec<Arc<str>>, Arc<ChangeEvent>),
    /// The bus lost Redis: what the daemon published until it is back is
    /// lost for this socket (Redis pub/sub keeps nothing for an absent
    /// subscriber). The daemon confirms its subscriptions again then.
    Interrupted,
    /// The daemon dropped these subscriptions though the socket still
    /// holds them (a `leave` or `unsubscribe` the gateway did not send, a
    /// lease that expired while it stalled): changes were missed, and the
    /// gateway has registered them again, to be confirmed anew.
    Dropped(Vec<Arc<str>>),
    /// A broadcast or presence diff for the channel (by id) of a room.
    Room(Arc<str>, Arc<RoomEvent>),
    /// `presence_state` for the channel (by id) of a topic: the payload.
    PresenceState(Arc<str>, Arc<str>, Arc<str>),
    /// What a private channel (by its `PrivateChannel::id`) may read.
    Access(String, bus::Access),
    /// A stored message replayed to the channel (by id) that joined asking
    /// for it (Broadcast Replay).
    Replayed(Arc<str>, Arc<RoomEvent>),
    /// A write check's answer (by its id): allowed, or why it is unknown.
    Write(String, Option<bool>, Option<String>),
}

/// What a live channel is told when the gateway loses the bus.
pub const INTERRUPTED_MESSAGE: &str = "Lost the connection to the change stream: changes may be missed until this channel is subscribed to PostgreSQL again";

/// Where a socket receives its deliveries.
#[derive(Debug, Clone)]
pub struct SocketHandle {
    /// Unique within the gateway.
    pub id: u64,
    /// The socket's bounded queue.
    pub deliveries: mpsc::Sender<Delivery>,
    /// Cancelled when the socket falls behind (its queue is full).
    pub kick: CancellationToken,
    /// Bytes of room payloads in its queue (see [`Delivery::bytes`]).
    pub queued_bytes: Arc<AtomicUsize>,
}

impl SocketHandle {
    /// A handle for socket `id` whose queue is `deliveries`.
    pub fn new(
        id: u64,
        deliveries: mpsc::Sender<Delivery>,
        kick: CancellationToken,
    ) -> SocketHandle {
        SocketHandle {
            id,
            deliveries,
            kick,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Bytes of room payloads one socket may have queued: a socket that does
/// not read its large broadcasts is closed before it pins more than this.
pub const MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;

impl Delivery {
    /// The payload bytes it holds that a slow socket would pin (rooms'
    /// broadcasts and presence; change events count by number).
    pub fn bytes(&self) -> usize {
        match self {
            Delivery::Room(_, event) => match &**event {
                RoomEvent::Broadcast(b) => b.body.len(),
                RoomEvent::PresenceDiff(d) => d.payload.len(),
            },
            Delivery::PresenceState(_, _, payload) => payload.len(),
            Delivery::Replayed(_, event) => match &**event {
                RoomEvent::Broadcast(b) => b.body.len(),
                RoomEvent::PresenceDiff(d) => d.payload.len(),
            },
            _ => 0,
        }
    }
}

struct Route {
    socket: SocketHandle,
    /// The channel registration it belongs to.
    channel: Arc<ChannelRegistration>,
    /// The subscription id, shared with every delivery that names it.
    id: Arc<str>,
    /// The last event it was handed ([`seen`]).
    mark: Mark,
}

/// What the bus task writes to Redis, in order.
enum Command {
    /// A channel join's registration: written to the registry under
    /// `channel:<id>` and announced, its claims once. Serialized only
    /// then, so a queued command holds no copy.
    Subscribe(Arc<ChannelRegistration>),
    /// Its withdrawal: the registry field deleted, each id unsubscribed.
    Unsubscribe(Arc<ChannelRegistration>),
    /// A channel joins a room.
    JoinRoom(String, Member),
    /// A channel leaves a room (and its presence with it).
    LeaveRoom(String, Arc<str>),
    /// A broadcast message for a room's channel.
    Broadcast(String, Vec<u8>),
    /// A channel tracks its presence: room, channel, key, meta.
    Track(String, Arc<str>, String, Map<String, Value>),
    /// A channel untracks its presence.
    Untrack(String, Arc<str>),
    /// A private channel's write check, for the daemon.
    Authorize(WriteCheck),
}

/// Why the bus task lost Redis (it reconnects by itself).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis refused or went away.
    #[error("gateway bus: redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The subscription to the gateway's channel ended.
    #[error("gateway bus: the gateway channel subscription ended")]
    Disconnected,
    /// The subscriber connection did not answer a ping in time.
    #[error("gateway bus: the subscriber connection did not answer a ping within 10 s")]
    Unresponsive,
}

/// A cheap handle for sockets: register and unregister subscriptions.
#[derive(Clone)]
pub struct Bus {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    checks: Checks,
    commands: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
    /// Bytes of broadcasts queued and not yet published.
    queued: Arc<AtomicUsize>,
}

/// The bus task, to be run once: [`BusTask::run`].
pub struct BusTask {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    checks: Checks,
    commands: mpsc::UnboundedReceiver<Command>,
    server: Server,
    names: Names,
    gateway: String,
    connected: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
    rooms: Rooms,
    lease: Duration,
    reconnects: metrics::Counter,
    restored: metrics::Counter,
    duplicates: metrics::Counter,
}

/// A handle and its task for gateway `gateway` of the tenant of `names`;
/// `reconnects` counts the times the connection comes back after a loss,
/// `restored` the subscriptions registered again after the daemon dropped
/// them unasked, `duplicates` the events a subscription was handed again
/// by a daemon that took over, and not delivered.
///
/// Commands are queued unbounded so a socket never waits on Redis; their
/// number is bounded by the sockets' joins.
pub fn new(
    server: Server,
    names: Names,
    gateway: String,
    reconnects: metrics::Counter,
    restored: metrics::Counter,
    duplicates: metrics::Counter,
) -> (Bus, BusTask) {
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let checks = Checks::default();
    let connected = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Bus {
            routes: routes.clone(),
            checks: checks.clone(),
            commands: tx,
            connected: connected.clone(),
            queued: queued.clone(),
        },
        BusTask {
            routes,
            checks,
            commands: rx,
            rooms: Rooms::new(server.clone(), names.clone(), gateway.clone()),
            server,
            names,
            gateway,
            connected,
            queued,
            lease: DEFAULT_LEASE,
            reconnects,
            restored,
            duplicates,
        },
    )
}

/// Write checks waiting for the daemon: who asked, and when.
type Checks = Arc<Mutex<HashMap<String, (SocketHandle, Instant)>>>;

/// How long a write check's asker is remembered: answers later than this
/// are dropped (the asker gave up after 15 s).
const CHECK_MEMORY: Duration = Duration::from_secs(60);

fn lock_checks(
    checks: &Mutex<HashMap<String, (SocketHandle, Instant)>>,
) -> MutexGuard<'_, HashMap<String, (SocketHandle, Instant)>> {
    checks.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock(routes: &Mutex<HashMap<String, Route>>) -> MutexGuard<'_, HashMap<String, Route>> {
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// Whether the bus task is registered on Redis and listening now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Registers (or registers again, same ids) `channel`'s subscriptions
    /// for `socket`.
    pub fn register(&self, socket: &SocketHandle, channel: &Arc<ChannelRegistration>) {
        if channel.subscriptions.is_empty() && channel.private.is_none() {
            return;
        }
        let mut routes = lock(&self.routes);
        for id in channel.ids() {
            let mark = seen::mark_for(&routes, id);
            routes.insert(
                id.to_owned(),
                Route {
                    socket: socket.clone(),
                    channel: channel.clone(),
                    id: Arc::from(id),
                    mark,
                },
            );
        }
        let _ = self.commands.send(Command::Subscribe(channel.clone()));
    }

    /// Withdraws `channel`'s subscriptions.
    pub fn unregister(&self, channel: &Arc<ChannelRegistration>) {
        let mut routes = lock(&self.routes);
        let mut held = false;
        for id in channel.ids() {
            held |= routes.remove(id).is_some();
        }
        if held {
            let _ = self.commands.send(Command::Unsubscribe(channel.clone()));
        }
    }

    /// Asks the daemon whether a private channel may write; the answer
    /// comes to `socket` as [`Delivery::Write`].
    pub fn authorize(&self, socket: &SocketHandle, check: WriteCheck) {
        lock_checks(&self.checks).insert(check.id.clone(), (socket.clone(), Instant::now()));
        let _ = self.commands.send(Command::Authorize(check));
    }

    /// Forgets a write check nobody waits for any more.
    pub fn forget_check(&self, id: &str) {
        lock_checks(&self.checks).remove(id);
    }

    /// Puts `member` in `room` (the topic without `realtime:`).
    pub fn join_room(&self, room: &str, member: Member) {
        let _ = self
            .commands
            .send(Command::JoinRoom(room.to_owned(), member));
    }

    /// Takes `channel` out of `room`; its presence there leaves.
    pub fn leave_room(&self, room: &str, channel: Arc<str>) {
        let _ = self
            .commands
            .send(Command::LeaveRoom(room.to_owned(), channel));
    }

    /// Queues a broadcast message for `room`; false (nothing queued) while
    /// the bus is away or too far behind.
    pub fn broadcast(&self, room: &str, message: Vec<u8>) -> bool {
        if !self.connected() {
            return false;
        }
        let bytes = message.len();
        if self.queued.fetch_add(bytes, Ordering::AcqRel) + bytes > MAX_QUEUED_BROADCAST_BYTES {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        let _ = self
            .commands
            .send(Command::Broadcast(room.to_owned(), message));
        true
    }

    /// Tracks (or updates) `channel`'s presence in `room`.
    pub fn track(&self, room: &str, channel: Arc<str>, key: String, meta: Map<String, Value>) {
        let _ = self
            .commands
            .send(Command::Track(room.to_owned(), channel, key, meta));
    }

    /// Untracks `channel`'s presence in `room`.
    pub fn untrack(&self, room: &str, channel: Arc<str>) {
        let _ = self
            .commands
            .send(Command::Untrack(room.to_owned(), channel));
    }
}

/// A message on the gateway's channel; `data` stays raw JSON.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    v: u32,
    #[serde(default)]
    id: Option<String>,
    /// An event names every subscription it goes to, 10,000 for 10,000
    /// sockets: they are borrowed from the message where they can be.
    #[serde(default, borrow)]
    ids: Vec<Id<'a>>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    /// An `access` reply's answer.
    #[serde(default)]
    access: Option<bus::Access>,
    /// A `write` reply's answer.
    #[serde(default)]
    allowed: Option<bool>,
    /// Why a `write` reply has no answer.
    #[serde(default)]
    reason: Option<String>,
    /// A change's or an error's database ([`seen`]).
    #[serde(default, borrow)]
    sys: Option<&'a str>,
    /// A change's or an error's commit LSN.
    #[serde(default, borrow)]
    lsn: Option<&'a str>,
    /// A change's or an error's place in its transaction.
    #[serde(default)]
    seq: Option<u32>,
}

/// A subscription id in a gateway message, borrowed unless an escape in
/// the JSON forces a copy (serde borrows a `Cow` only as a field of its
/// own, never as an element of a `Vec`).
#[derive(Deserialize)]
struct Id<'a>(#[serde(borrow)] Cow<'a, str>);

impl BusTask {
    /// Serves until `cancel` fires, then leaves the bus (deletes the
    /// registry, the lease and the set entry, publishes `leave`).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        // Whether the bus was ever up: coming up after that is a reconnect.
        let mut was_up = false;
        loop {
            let result = self.serve(&cancel, was_up).await;
            if self.connected.swap(false, Ordering::AcqRel) {
                was_up = true;
                if result.is_err() {
                    self.interrupt();
                }
                // A new loss starts the backoff over.
                delay = Duration::from_millis(100);
            }
            match result {
                Ok(()) => return,
                Err(e) => warn!(error = %e, retry_in = ?delay, "gateway bus reconnecting"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// One connection's life; `again` when an earlier one came up and was lost.
    async fn serve(&mut self, cancel: &CancellationToken, again: bool) -> Result<(), Error> {
        let mut conn = self.server.connect().await?;
        let (mut listener, mut messages) = self.server.subscriber().await?;
        // Rooms on a connection of their own: Redis closes a subscriber
        // whose output buffer outgrows `client-output-buffer-limit
        // pubsub`, and a burst of large broadcasts must not take the
        // daemon's events with it.
        let (mut room_listener, mut room_messages) = self.server.subscriber().await?;
        let gateway_channel = self.names.gateway(&self.gateway);
        listener.subscribe(&gateway_channel).await?;
        self.refresh_lease(&mut conn).await?;
        self.resync(&mut conn, again).await?;
        if again {
            self.rooms.resync(&mut conn, &mut room_listener).await?;
        } else {
            // A configured id may be an earlier process's: its presences
            // leave before this one's are written.
            self.rooms.remove_gateway(&mut conn, &self.gateway).await?;
        }
        info!(gateway = %self.gateway, "gateway registered on the bus");
        self.connected.store(true, Ordering::Release);
        if again {
            self.reconnects.increment(1);
        }
        let mut lease = tokio::time::interval(self.lease / 3);
        lease.tick().await; // the lease was just set
        // Other gateways' leases are judged only once they had a lease's
        // time to write theirs again (Redis may have restarted empty).
        let mut presence_check =
            tokio::time::interval_at(tokio::time::Instant::now() + self.lease, PRESENCE_CHECK);
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    self.leave(&mut conn).await?;
                    return Ok(());
                }
                message = messages.next() => {
                    let Some(message) = message else { return Err(Error::Disconnected) };
                    for command in self.route(&message.payload) {
                        self.execute(&mut conn, &mut room_listener, command).await?;
                    }
                }
                message = room_messages.next() => {
                    let Some(message) = message else { return Err(Error::Disconnected) };
                    // The commands queued before it first: a channel whose
                    // join was answered before this message was published
                    // is in the room when it is handed out (its JoinRoom is
                    // among them). Only those already queued: a flood of
                    // new ones cannot hold the message back.
                    for _ in 0..self.commands.len() {
                        let Ok(command) = self.commands.try_recv() else { break };
                        self.execute(&mut conn, &mut room_listener, command).await?;
                    }
                    if let Some(room) = self.rooms.room_of(&message.channel) {
                        let room = room.to_owned();
                        self.rooms.on_message(&room, &message.payload);
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { continue };
                    self.execute(&mut conn, &mut room_listener, command).await?;
                }
                _ = lease.tick() => {
                    // Checks whose asker left without an answer (a closed
                    // channel, a REST request that timed out) go.
                    lock_checks(&self.checks).retain(|_, (_, asked)| asked.elapsed() < CHECK_MEMORY);
                    if self.refresh_lease(&mut conn).await? {
                        // It lapsed (this task stalled past it): the other
                        // gateways have removed this one's presences.
                        warn!(gateway = %self.gateway, "the gateway's lease had lapsed; writing its presences again");
                        self.rooms.rewrite_own(&mut conn).await?;
                    }
                    // The subscriber connections only ever read: without a
                    // ping, one cut silently (a NAT's idle timeout) would
                    // look like a quiet stream forever.
                    for sink in [&mut listener, &mut room_listener] {
                        tokio::time::timeout(REDIS_TIMEOUT, sink.ping())
                            .await
                            .map_err(|_| Error::Unresponsive)??;
                    }
                }
                _ = presence_check.tick() => {
                    self.rooms.check_leases(&mut conn).await?;
                }
            }
        }
    }

    /// Sets how long the gateway's lease lives (refreshed every third of
    /// it); the presences of a gateway that died leave at most this plus
    /// 5 s later.
    pub fn with_lease(mut self, lease: Duration) -> BusTask {
        self.lease = lease;
        self
    }

    /// Sets the lease; whether it had lapsed (it was not there).
    async fn refresh_lease(&self, conn: &mut Connection) -> Result<bool, Error> {
        let previous: Option<String> = redis::cmd("SET")
            .arg(self.names.lease(&self.gateway))
            .arg("1")
            .arg("EX")
            .arg(self.lease.as_secs().max(1))
            .arg("GET")
            .query_async(conn)
            .await?;
        let _: () = conn.sadd(self.names.gateways(), &self.gateway).await?;
        Ok(previous.is_none())
    }

    /// Writes every current subscription again (Redis may have restarted
    /// empty) and announces each; the daemon answers `subscribed` again.
    /// Commands still queued run after this: duplicates are harmless.
    async fn resync(&mut self, conn: &mut Connection, again: bool) -> Result<(), Error> {
        let current = self.channels();
        let hash = self.names.subscriptions(&self.gateway);
        if again {
            // Not a leave: a daemon reading the registry back at this
            // moment could confirm a subscription, then handle the leave
            // and drop it until its subscribe message came — a gap after
            // "Subscribed to PostgreSQL". Only what this process no longer
            // holds is withdrawn; the rest is replaced in place.
            let stored: Vec<(String, String)> = conn.hgetall(&hash).await?;
            let held: HashSet<String> = current.iter().map(|c| bus::channel_field(&c.id)).collect();
            let mut pipe = redis::pipe();
            let mut stale = 0;
            for (field, json) in stored {
                if held.contains(&field) {
                    continue;
                }
                stale += 1;
                pipe.hdel(&hash, &field).ignore();
                // A channel's subscriptions by their own ids; another
                // field is one subscription's id.
                let ids = match serde_json::from_str::<ChannelRegistration>(&json) {
                    Ok(channel) if field.starts_with(bus::CHANNEL_FIELD_PREFIX) => {
                        channel.ids().map(str::to_owned).collect()
                    }
                    _ => vec![field],
                };
                for id in ids {
                    pipe.add_command(self.server.publish_cmd(
                        &self.names.control(),
                        self.control(ControlOp::Unsubscribe { id }),
                    ))
                    .ignore();
                }
            }
            if stale > 0 {
                pipe.query_async::<()>(conn).await?;
            }
        } else {
            // A leave first: the daemon forgets whatever an earlier process
            // with this id registered.
            redis::pipe()
                .del(&hash)
                .ignore()
                .add_command(
                    self.server
                        .publish_cmd(&self.names.control(), self.control(ControlOp::Leave)),
                )
                .ignore()
                .query_async::<()>(conn)
                .await?;
        }
        for channel in current {
            self.subscribe(conn, &channel).await?;
        }
        Ok(())
    }

    /// Every channel registration some route holds, once each.
    fn channels(&self) -> Vec<Arc<ChannelRegistration>> {
        let routes = lock(&self.routes);
        let mut seen = HashSet::new();
        routes
            .values()
            .filter(|r| seen.insert(Arc::as_ptr(&r.channel)))
            .map(|r| r.channel.clone())
            .collect()
    }

    async fn execute(
        &mut self,
        conn: &mut Connection,
        sink: &mut Sink,
        command: Command,
    ) -> Result<(), Error> {
        let hash = self.names.subscriptions(&self.gateway);
        match command {
            Command::Subscribe(channel) => self.subscribe(conn, &channel).await?,
            Command::JoinRoom(room, member) => self.rooms.join(conn, sink, room, member).await?,
            Command::LeaveRoom(room, channel) => {
                self.rooms.leave(conn, sink, room, channel).await?;
            }
            Command::Broadcast(room, message) => {
                let bytes = message.len();
                let sent = self.rooms.broadcast(conn, &room, message).await;
                self.queued.fetch_sub(bytes, Ordering::AcqRel);
                sent?;
            }
            Command::Track(room, channel, key, meta) => {
                self.rooms.track(conn, room, channel, key, meta).await?;
            }
            Command::Untrack(room, channel) => self.rooms.untrack(conn, room, channel).await?,
            Command::Authorize(check) => {
                let control = self.control(ControlOp::Authorize { check });
                let _: () = self
                    .server
                    .publish_cmd(&self.names.control(), control)
                    .query_async(conn)
                    .await?;
            }
            Command::Unsubscribe(channel) => {
                let mut pipe = redis::pipe();
                pipe.hdel(&hash, bus::channel_field(&channel.id)).ignore();
                for id in channel.ids() {
                    let control = self.control(ControlOp::Unsubscribe { id: id.to_owned() });
                    pipe.add_command(self.server.publish_cmd(&self.names.control(), control))
                        .ignore();
                }
                pipe.query_async::<()>(conn).await?;
                debug!(channel = %channel.id, "channel withdrawn");
            }
        }
        Ok(())
    }

    /// Writes a channel registration to the registry and announces it.
    async fn subscribe(
        &self,
        conn: &mut Connection,
        channel: &ChannelRegistration,
    ) -> Result<(), Error> {
        let hash = self.names.subscriptions(&self.gateway);
        let json = match serde_json::to_string(channel) {
            Ok(json) => json,
            Err(e) => {
                warn!(channel = %channel.id, error = %e, "cannot serialize a channel registration; not registered");
                return Ok(());
            }
        };
        // The control message embeds the same text: no second
        // serialization, no clone of the registration.
        let control = format!(
            r#"{{"v":{},"gateway":{},"op":"subscribe_channel","channel":{json}}}"#,
            bus::VERSION,
            serde_json::Value::from(self.gateway.as_str())
        );
        redis::pipe()
            .hset(&hash, bus::channel_field(&channel.id), &json)
            .ignore()
            .add_command(self.server.publish_cmd(&self.names.control(), control))
            .ignore()
            .query_async::<()>(conn)
            .await?;
        debug!(channel = %channel.id, subscriptions = channel.subscriptions.len(), "channel registered");
        Ok(())
    }

    async fn leave(&self, conn: &mut Connection) -> Result<(), Error> {
        // Presences first, while the lease still says this gateway lives.
        self.rooms.remove_gateway(conn, &self.gateway).await?;
        redis::pipe()
            .del(self.names.subscriptions(&self.gateway))
            .ignore()
            .del(self.names.lease(&self.gateway))
            .ignore()
            .srem(self.names.gateways(), &self.gateway)
            .ignore()
            .add_command(
                self.server
                    .publish_cmd(&self.names.control(), self.control(ControlOp::Leave)),
            )
            .ignore()
            .query_async::<()>(conn)
            .await?;
        info!(gateway = %self.gateway, "gateway left the bus");
        Ok(())
    }

    fn control(&self, op: ControlOp) -> String {
        let control = Control {
            v: bus::VERSION,
            gateway: self.gateway.clone(),
            op,
        };
        serde_json::to_string(&control).unwrap_or_default()
    }

    /// Tells every socket with a subscription that the bus was lost.
    fn interrupt(&self) {
        let routes = lock(&self.routes);
        let mut told = HashSet::new();
        for route in routes.values() {
            if told.insert(route.socket.id) {
                deliver(&route.socket, Delivery::Interrupted);
            }
        }
    }

    /// Hands one daemon message to the sockets it concerns; returns the
    /// subscriptions to register again (those the daemon dropped unasked).
    fn route(&self, payload: &[u8]) -> Vec<Command> {
        // A header line and a body: Broadcast from Database to private
        // channels (JSON messages never hold a raw newline).
        if payload.contains(&b'\n') {
            self.route_broadcast(payload);
            return Vec::new();
        }
        let envelope: Envelope<'_> = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "ignoring a malformed message on the gateway channel");
                return Vec::new();
            }
        };
        if envelope.v != bus::VERSION {
            warn!(
                v = envelope.v,
                "ignoring a gateway message of another bus version"
            );
            return Vec::new();
        }
        let message = envelope.message.unwrap_or_default();
        let routes = lock(&self.routes);
        let position = Position::parse(envelope.sys, envelope.lsn, envelope.seq);
        match (envelope.kind, envelope.id) {
            ("subscribed", Some(id)) => {
                if let Some(route) = routes.get(&id) {
                    deliver(&route.socket, Delivery::Subscribed(id));
                }
            }
            ("rejected", Some(id)) => {
                if let Some(route) = routes.get(&id) {
                    deliver(&route.socket, Delivery::Rejected(id, message));
                }
            }
            ("error", _) => {
                let ids = self.first_time(&routes, envelope.ids, position);
                for (socket, ids) in by_socket(&routes, &ids) {
                    deliver(socket, Delivery::Error(ids, message.clone()));
                }
            }
            ("change", _) => {
                let Some(data) = envelope.data else {
                    warn!("ignoring a change without data");
                    return Vec::new();
                };
                let ids = self.first_time(&routes, envelope.ids, position);
                if ids.is_empty() {
                    return Vec::new();
                }
                let event = Arc::new(ChangeEvent::new(data.get()));
                for (socket, ids) in by_socket(&routes, &ids) {
                    deliver(socket, Delivery::Change(ids, event.clone()));
                }
            }
            ("access", Some(id)) => {
                let Some(access) = envelope.access else {
                    warn!("ignoring an access reply without access");
                    return Vec::new();
                };
                if let Some(route) = routes.get(&id) {
                    deliver(&route.socket, Delivery::Access(id, access));
                }
            }
            ("write", Some(id)) => {
                let waiting = lock_checks(&self.checks).remove(&id);
                if let Some((socket, _)) = waiting {
                    deliver(
                        &socket,
                        Delivery::Write(id, envelope.allowed, envelope.reason),
                    );
                }
            }
            ("dropped", _) => {
                // Ids this gateway let go of have no route any more: only
                // those it still serves were dropped unasked.
                let mut again: Vec<Arc<ChannelRegistration>> = Vec::new();
                let mut restored = 0u64;
                for (socket, ids) in by_socket(&routes, &envelope.ids) {
                    for id in &ids {
                        if let Some(route) = routes.get(&**id) {
                            restored += 1;
                            if !again.iter().any(|c| Arc::ptr_eq(c, &route.channel)) {
                                again.push(route.channel.clone());
                            }
                        }
                    }
                    deliver(socket, Delivery::Dropped(ids));
                }
                if restored > 0 {
                    warn!(
                        gateway = %self.gateway,
                        subscriptions = restored,
                        "the daemon dropped subscriptions this gateway still serves (a leave or unsubscribe it did not send, or its lease expired); registering them again"
                    );
                    self.restored.increment(restored);
                }
                return again.into_iter().map(Command::Subscribe).collect();
            }
            (kind, _) => {
                debug!(kind = %crate::gateway::quiet::clip(kind), "ignoring an unknown gateway message")
            }
        }
        Vec::new()
    }
}

impl BusTask {
    /// `ids` less those already handed the event at `position` (a daemon
    /// that took over sends again what its predecessor sent), counted.
    fn first_time<'a>(
        &self,
        routes: &HashMap<String, Route>,
        ids: Vec<Id<'a>>,
        position: Option<Position>,
    ) -> Vec<Id<'a>> {
        let (ids, dropped) = seen::first_time(routes, ids, position);
        if dropped > 0 {
            debug!(
                subscriptions = dropped,
                "dropping an event these subscriptions were handed already (a daemon took over)"
            );
            self.duplicates.increment(dropped);
        }
        ids
    }

    /// A message of a private topic for some of this gateway's private
    /// channels: to each, as a broadcast of its room.
    fn route_broadcast(&self, payload: &[u8]) {
        let (header, body) = match room::read(payload) {
            Ok((room::Header::Broadcast(header), body)) => (header, body),
            Ok(_) => {
                warn!("ignoring a gateway message that is not a broadcast");
                return;
            }
            Err(e) => {
                warn!(error = %e, "ignoring a malformed broadcast on the gateway channel");
                return;
            }
        };
        let routes = lock(&self.routes);
        let position = Position::parse(header.sys.as_deref(), header.lsn.as_deref(), header.seq);
        let ids = header
            .ids
            .iter()
            .map(|id| Id(Cow::Borrowed(id.as_str())))
            .collect();
        // A replayed message has no position: it passes, and marks nothing.
        let ids = self.first_time(&routes, ids, position);
        let user = header.event.map(|event| User {
            event,
            encoding: header.encoding.unwrap_or(Encoding::Json),
            meta: header
                .meta
                .map(|m| m.get().as_bytes().to_vec())
                .unwrap_or_default(),
        });
        // One event per topic (the ids are of one topic's channels).
        let mut events: Vec<(Arc<str>, Arc<RoomEvent>)> = Vec::new();
        // A channel whose token was refreshed is held under two ids a
        // while (the old is retired later): it gets the message once.
        let mut sent: Vec<(u64, &str)> = Vec::new();
        for id in &ids {
            let Some(route) = routes.get(&*id.0) else {
                continue;
            };
            let Some(private) = &route.channel.private else {
                continue;
            };
            let topic = format!("realtime:{}", private.topic);
            let event = match events.iter().find(|(t, _)| **t == *topic) {
                Some((_, event)) => event.clone(),
                None => {
                    let event = Arc::new(RoomEvent::Broadcast(Broadcast::new(
                        Arc::from(topic.as_str()),
                        None,
                        user.clone(),
                        body.to_vec(),
                    )));
                    events.push((Arc::from(topic.as_str()), event.clone()));
                    event
                }
            };
            let channel = route
                .channel
                .id
                .split('.')
                .next()
                .unwrap_or(&route.channel.id);
            if sent.contains(&(route.socket.id, channel)) {
                continue;
            }
            sent.push((route.socket.id, channel));
            let channel = Arc::from(channel);
            deliver(
                &route.socket,
                if header.replayed {
                    Delivery::Replayed(channel, event)
                } else {
                    Delivery::Room(channel, event)
                },
            );
        }
    }
}

/// Groups subscription ids by the socket that holds them (ids of no
/// route are dropped: the subscription left meanwhile). The handles borrow
/// from the routes, so the routes stay locked while an event is handed
/// out: joins and leaves wait that long (`try_send` never waits; about
/// 0.2 µs per socket in the 10,000-socket fan-out profile).
fn by_socket<'r>(
    routes: &'r HashMap<String, Route>,
    ids: &[Id<'_>],
) -> Vec<(&'r SocketHandle, Vec<Arc<str>>)> {
    let mut found: Vec<&Route> = ids.iter().filter_map(|id| routes.get(&*id.0)).collect();
    // Sorting groups a socket's ids together; cheaper than a map keyed by
    // socket when, as usual, nearly every socket has one id.
    found.sort_unstable_by_key(|route| route.socket.id);
    let mut out: Vec<(&SocketHandle, Vec<Arc<str>>)> = Vec::new();
    for route in found {
        match out.last_mut() {
            Some((socket, ids)) if socket.id == route.socket.id => ids.push(route.id.clone()),
            _ => out.push((&route.socket, vec![route.id.clone()])),
        }
    }
    out
}

/// Queues `delivery` without waiting; a full queue (by number, or by
/// bytes of room payloads) kicks the socket.
fn deliver(socket: &SocketHandle, delivery: Delivery) {
    let bytes = delivery.bytes();
    if bytes > 0
        && socket.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > MAX_QUEUED_BYTES
    {
        socket.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        if !socket.kick.is_cancelled() {
            debug!(
                socket = socket.id,
                "socket falls behind: its queued payloads passed MAX_QUEUED_BYTES; closing it"
            );
            socket.kick.cancel();
        }
        return;
    }
    match socket.deliveries.try_send(delivery) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            socket.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            if !socket.kick.is_cancelled() {
                // The session logs the close (rate-limited: a client
                // chooses to fall behind).
                debug!(
                    socket = socket.id,
                    "socket falls behind: its send queue is full; closing it"
                );
                socket.kick.cancel();
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            socket.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(socket: &SocketHandle, id: &str) -> (String, Route) {
        let route = Route {
            socket: socket.clone(),
            channel: Arc::new(ChannelRegistration {
                id: "c".to_owned(),
                role: "anon".to_owned(),
                claims: Arc::default(),
                subscriptions: Vec::new(),
                private: None,
            }),
            id: Arc::from(id),
            mark: Mark::default(),
        };
        (id.to_owned(), route)
    }

    fn socket(id: u64) -> SocketHandle {
        SocketHandle::new(id, mpsc::channel(1).0, CancellationToken::new())
    }

    #[test]
    fn ids_are_grouped_by_socket_and_unknown_ids_dropped() {
        let (one, two) = (socket(1), socket(2));
        let routes: HashMap<String, Route> = [route(&two, "b"), route(&one, "a"), route(&one, "c")]
            .into_iter()
            .collect();
        let ids = ["c", "b", "gone", "a"].map(|id| Id(Cow::from(id)));
        let mut grouped: Vec<(u64, Vec<String>)> = by_socket(&routes, &ids)
            .into_iter()
            .map(|(socket, ids)| (socket.id, ids.iter().map(|id| id.to_string()).collect()))
            .collect();
        for (_, ids) in &mut grouped {
            ids.sort_unstable();
        }
        assert_eq!(
            grouped,
            [
                (1, vec!["a".to_owned(), "c".to_owned()]),
                (2, vec!["b".to_owned()])
            ]
        );
        assert!(by_socket(&routes, &[]).is_empty());
    }

    #[test]
    fn a_subscription_is_handed_each_position_once_across_renames() {
        let one = socket(1);
        let mut routes: HashMap<String, Route> = [route(&one, "j:0"), route(&one, "j:1")]
            .into_iter()
            .collect();
        let ids = |names: &[&'static str]| names.iter().map(|id| Id(Cow::from(*id))).collect();
        let names = |ids: Vec<Id<'_>>| ids.iter().map(|id| id.0.to_string()).collect::<Vec<_>>();
        let at = |lsn: &str, seq| Position::parse(Some("7450.1"), Some(lsn), Some(seq));
        let (kept, dropped) =
            seen::first_time(&routes, ids(&["j:0", "j:1", "gone"]), at("0/20", 1));
        assert_eq!(
            (names(kept), dropped),
            (vec!["j:0".to_owned(), "j:1".to_owned()], 0)
        );
        // The same event again (a daemon took over), and an older one.
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0", "j:1"]), at("0/20", 1));
        assert_eq!((names(kept), dropped), (Vec::<String>::new(), 2));
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0"]), at("0/20", 0));
        assert_eq!((names(kept), dropped), (Vec::<String>::new(), 1));
        // A later one, to one of them.
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:1"]), at("0/20", 2));
        assert_eq!((names(kept), dropped), (vec!["j:1".to_owned()], 0));
        // Renamed by a token refresh: the new id continues the old's mark,
        // and both names in one event are both kept.
        let mark = seen::mark_for(&routes, "j:0.1");
        let (_, mut renamed) = route(&one, "j:0.1");
        renamed.mark = mark;
        routes.insert("j:0.1".to_owned(), renamed);
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0.1"]), at("0/20", 1));
        assert_eq!((names(kept), dropped), (Vec::<String>::new(), 1));
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0", "j:0.1"]), at("0/30", 0));
        assert_eq!(
            (names(kept), dropped),
            (vec!["j:0".to_owned(), "j:0.1".to_owned()], 0)
        );
        // Without a position (an older daemon), nothing is dropped.
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0"]), None);
        assert_eq!((names(kept), dropped), (vec!["j:0".to_owned()], 0));
        // Another database's events are never taken for duplicates.
        let other = Position::parse(Some("1.1"), Some("0/1"), Some(0));
        let (kept, dropped) = seen::first_time(&routes, ids(&["j:0"]), other);
        assert_eq!((names(kept), dropped), (vec!["j:0".to_owned()], 0));
    }

    #[test]
    fn an_event_borrows_its_ids_unless_escaped() {
        let envelope: Envelope<'_> =
            serde_json::from_str(r#"{"type":"change","v":1,"ids":["s1","s\u0032"]}"#).unwrap();
        assert!(matches!(envelope.ids[0].0, Cow::Borrowed("s1")));
        assert!(matches!(&envelope.ids[1].0, Cow::Owned(id) if id == "s2"));
    }
}
