//! The bus task's rooms: one per topic with a socket joined on this
//! gateway. A room's Redis channel is subscribed while it has a member
//! and not longer; its presences ([`State`]) are read from the room's
//! hash when it is first joined (and again after a lost connection) and
//! kept by the diffs that come on its channel.
//!
//! ```text
//! socket ──JoinRoom/Broadcast/Track──▶ bus task ──SUBSCRIBE, PUBLISH, HSET──▶ Redis room channel and hash
//!    ▲                                    │
//!    └──Delivery::Room (try_send) ◀── on_message ◀── room channel (every gateway's messages, ours too)
//! ```
//!
//! Everything here runs on the bus task, in command order: a socket's
//! broadcasts reach Redis in the order it sent them, and a member gets its
//! `presence_state` before any diff that follows it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::bus::server::{Connection, Server, Sink};
use redis::AsyncCommands;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use super::seen::Position;
use super::{Delivery, Error, SocketHandle, deliver};
use crate::bus::room::{
    self, BroadcastHeader, Encoding, Header, Presence, PresenceHeader, field_gateway,
    presence_field,
};
use crate::bus::{self, Names};
use crate::gateway::broadcast::event::{Broadcast, User};
use crate::gateway::presence::state::{Changed, State};
use crate::gateway::presence::{Diff, References};
use crate::gateway::quiet::clip;

/// What a room sends a socket.
#[derive(Debug)]
pub enum RoomEvent {
    /// A broadcast.
    Broadcast(Broadcast),
    /// A presence diff.
    PresenceDiff(Diff),
}

impl RoomEvent {
    /// `realtime:<room>`.
    pub fn topic(&self) -> &str {
        match self {
            RoomEvent::Broadcast(b) => &b.topic,
            RoomEvent::PresenceDiff(d) => &d.topic,
        }
    }
}

/// A channel in a room.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its socket.
    pub socket: SocketHandle,
    /// The channel's id on this gateway (its join's).
    pub channel: Arc<str>,
    /// Presence enabled at join: it gets `presence_state`.
    pub presence: bool,
    /// `presence_state` was sent.
    state_sent: bool,
}

impl Member {
    /// `channel` of `socket`; `presence`: send it `presence_state`.
    pub fn new(socket: SocketHandle, channel: Arc<str>, presence: bool) -> Member {
        Member {
            socket,
            channel,
            presence,
            state_sent: false,
        }
    }
}

struct Room {
    topic: Arc<str>,
    members: Vec<Member>,
    state: State,
    /// The last database broadcast handed to its members ([`super::seen`]).
    streamed: Option<Position>,
}

/// Deletes `ARGV` (fields of `KEYS[2]`, a room's presences) only while
/// `KEYS[1]` (their gateway's lease) is absent: a gateway that renewed
/// its lease meanwhile (back after a stall, or Redis restarted) keeps
/// what it wrote again.
const HDEL_IF_DEAD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('HDEL', KEYS[2], unpack(ARGV))
";
/// Fields per `HDEL_IF_DEAD` call (Lua's `unpack` has a stack limit).
const HDEL_CHUNK: usize = 1000;

/// The rooms of this gateway and its own presences.
///
/// Local state changes before any Redis command of the same operation:
/// a command that fails (the connection is lost) is not retried, and what
/// it meant is restored from the local state when the bus reconnects
/// ([`Rooms::resync`]).
pub struct Rooms {
    /// The bus: how a room's messages are published.
    server: Server,
    names: Names,
    gateway: String,
    /// The room channels' common prefix (`names.room("")`).
    prefix: String,
    rooms: HashMap<String, Room>,
    /// This gateway's presences, by room and channel.
    own: HashMap<(String, Arc<str>), Presence>,
    /// How many of them each room has.
    own_per_room: HashMap<String, usize>,
    refs: References,
}

impl Rooms {
    /// No rooms yet, for `gateway`, on the bus of `server`.
    pub fn new(server: Server, names: Names, gateway: String) -> Rooms {
        Rooms {
            server,
            prefix: names.room(""),
            names,
            gateway,
            rooms: HashMap::new(),
            own: HashMap::new(),
            own_per_room: HashMap::new(),
            refs: References::default(),
        }
    }

    /// The room a channel name is of, if it is a room channel.
    pub fn room_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(&self.prefix)
    }

    /// Adds `member` to `room`, subscribing its channel and reading its
    /// presences when it is the room's first.
    pub async fn join(
        &mut self,
        conn: &mut Connection,
        sink: &mut Sink,
        room: String,
        member: Member,
    ) -> Result<(), Error> {
        if let Some(r) = self.rooms.get_mut(&room) {
            r.members.retain(|m| m.channel != member.channel);
            r.members.push(member);
            send_states(r);
            return Ok(());
        }
        self.rooms.insert(
            room.clone(),
            Room {
                topic: Arc::from(format!("realtime:{}", bus::room_topic(&room))),
                members: vec![member],
                state: State::default(),
                streamed: None,
            },
        );
        sink.subscribe(&self.names.room(&room)).await?;
        let state = self.load(conn, &room).await?;
        if let Some(r) = self.rooms.get_mut(&room) {
            r.state = state;
            send_states(r);
        }
        debug!(room = %clip(&room), "room subscribed");
        Ok(())
    }

    /// Removes `channel` from `room` (its presence leaves); the room's
    /// channel is unsubscribed when no member is left.
    pub async fn leave(
        &mut self,
        conn: &mut Connection,
        sink: &mut Sink,
        room: String,
        channel: Arc<str>,
    ) -> Result<(), Error> {
        let previous = self.forget_own(&room, &channel);
        let mut last = false;
        if let Some(r) = self.rooms.get_mut(&room) {
            r.members.retain(|m| m.channel != channel);
            if r.members.is_empty() {
                self.rooms.remove(&room);
                last = true;
            }
        }
        if let Some(previous) = previous {
            self.publish_leave(conn, &room, previous).await?;
        }
        if last {
            sink.unsubscribe(&self.names.room(&room)).await?;
            debug!(room = %clip(&room), "room unsubscribed");
        }
        Ok(())
    }

    /// Publishes a broadcast message on `room`'s channel.
    pub async fn broadcast(
        &self,
        conn: &mut Connection,
        room: &str,
        message: Vec<u8>,
    ) -> Result<(), Error> {
        let _: () = self
            .server
            .publish_cmd(&self.names.room(room), message)
            .query_async(conn)
            .await?;
        Ok(())
    }

    /// Tracks `channel`'s presence in `room` under `key` with `meta`: a
    /// join, or an update of the one it tracked (a join carrying
    /// `phx_ref_prev` and the leave of the old meta, in one diff).
    pub async fn track(
        &mut self,
        conn: &mut Connection,
        room: String,
        channel: Arc<str>,
        key: String,
        mut meta: Map<String, Value>,
    ) -> Result<(), Error> {
        let reference = self.refs.next();
        let slot = (room.clone(), channel);
        let previous = self.own.get(&slot).cloned();
        meta.insert("phx_ref".to_owned(), Value::from(reference.as_str()));
        if let Some(previous) = &previous {
            meta.insert(
                "phx_ref_prev".to_owned(),
                Value::from(previous.reference.as_str()),
            );
        }
        // A map with string keys always serializes.
        let meta =
            serde_json::value::to_raw_value(&meta).unwrap_or_else(|_| RawValue::NULL.to_owned());
        let presence = Presence {
            reference,
            key,
            meta,
        };
        if previous.is_none() {
            *self.own_per_room.entry(room.clone()).or_default() += 1;
        }
        self.own.insert(slot, presence.clone());
        let hash = self.names.presences(&room);
        let mut pipe = redis::pipe();
        pipe.hset(
            &hash,
            presence_field(&self.gateway, &presence.reference),
            to_json(&presence),
        )
        .ignore()
        .sadd(self.names.presence_rooms(&self.gateway), &room)
        .ignore()
        .sadd(self.names.presence_gateways(), &self.gateway)
        .ignore();
        if let Some(previous) = &previous {
            pipe.hdel(&hash, presence_field(&self.gateway, &previous.reference))
                .ignore();
        }
        pipe.add_command(self.server.publish_cmd(
            &self.names.room(&room),
            room::presence_diff(
                &self.gateway,
                vec![presence],
                previous.into_iter().collect(),
            ),
        ))
        .ignore();
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Untracks `channel`'s presence in `room`, if it has one.
    pub async fn untrack(
        &mut self,
        conn: &mut Connection,
        room: String,
        channel: Arc<str>,
    ) -> Result<(), Error> {
        match self.forget_own(&room, &channel) {
            Some(previous) => self.publish_leave(conn, &room, previous).await,
            None => Ok(()),
        }
    }

    /// Takes `channel`'s presence in `room` out of this gateway's own.
    fn forget_own(&mut self, room: &str, channel: &Arc<str>) -> Option<Presence> {
        let previous = self.own.remove(&(room.to_owned(), channel.clone()))?;
        if let Some(n) = self.own_per_room.get_mut(room) {
            *n -= 1;
            if *n == 0 {
                self.own_per_room.remove(room);
            }
        }
        Some(previous)
    }

    /// Removes an own presence from `room`'s hash and announces its leave.
    async fn publish_leave(
        &self,
        conn: &mut Connection,
        room: &str,
        previous: Presence,
    ) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        pipe.hdel(
            self.names.presences(room),
            presence_field(&self.gateway, &previous.reference),
        )
        .ignore()
        .add_command(self.server.publish_cmd(
            &self.names.room(room),
            room::presence_diff(&self.gateway, Vec::new(), vec![previous]),
        ))
        .ignore();
        if !self.own_per_room.contains_key(room) {
            pipe.srem(self.names.presence_rooms(&self.gateway), room)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Hands a message of `room`'s channel to its members.
    pub fn on_message(&mut self, room: &str, message: &[u8]) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let (header, body) = match room::read(message) {
            Ok(read) => read,
            Err(e) => {
                warn!(room = %clip(room), error = %e, "ignoring a malformed room message");
                return;
            }
        };
        match header {
            Header::Broadcast(BroadcastHeader {
                from,
                event,
                encoding,
                meta,
                sys,
                lsn,
                seq,
                ..
            }) => {
                let position = Position::parse(sys.as_deref(), lsn.as_deref(), seq);
                if let Some(position) = position {
                    // A database broadcast the daemon that took over sends
                    // again: the members had it.
                    if r.streamed.is_some_and(|s| position.not_after(&s)) {
                        debug!(room = %clip(room), "dropping a database broadcast this room was handed already (a daemon took over)");
                        return;
                    }
                    r.streamed = Some(position);
                }
                // Only a channel of this gateway can be the sender.
                let from = from.and_then(|f| {
                    f.strip_prefix(&self.gateway)
                        .and_then(|rest| rest.strip_prefix(' '))
                        .map(Arc::from)
                });
                let user = event.map(|event| User {
                    event,
                    encoding: encoding.unwrap_or(Encoding::Json),
                    meta: meta
                        .map(|m| m.get().as_bytes().to_vec())
                        .unwrap_or_default(),
                });
                let event = Arc::new(RoomEvent::Broadcast(Broadcast::new(
                    r.topic.clone(),
                    from,
                    user,
                    body.to_vec(),
                )));
                for member in &r.members {
                    deliver(
                        &member.socket,
                        Delivery::Room(member.channel.clone(), event.clone()),
                    );
                }
            }
            Header::Presence(PresenceHeader {
                gateway,
                joins,
                leaves,
                ..
            }) => {
                let changed = r.state.apply(&gateway, joins, leaves);
                tell(r, &changed);
            }
        }
    }

    /// Reads `room`'s presences from its hash. Those of gateways whose
    /// lease is gone are dropped (and deleted, unless the gateway came
    /// back meanwhile); so are this gateway's own that it no longer holds
    /// (an untrack whose command was lost, an earlier process with the
    /// same id), whose leaves it announces.
    async fn load(&self, conn: &mut Connection, room: &str) -> Result<State, Error> {
        let hash = self.names.presences(room);
        let stored: Vec<(String, String)> = conn.hgetall(&hash).await?;
        let others: Vec<&str> = {
            let mut seen = HashSet::new();
            stored
                .iter()
                .map(|(field, _)| field_gateway(field))
                .filter(|g| *g != self.gateway && seen.insert(*g))
                .collect()
        };
        let alive = self.alive(conn, &others).await?;
        let mine: HashSet<&str> = self.own.values().map(|p| p.reference.as_str()).collect();
        let mut state = State::default();
        let mut dead: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut lost: Vec<Presence> = Vec::new();
        for (field, json) in &stored {
            let gateway = field_gateway(field);
            let presence = serde_json::from_str::<Presence>(json).ok();
            if gateway == self.gateway {
                match presence {
                    Some(p) if mine.contains(p.reference.as_str()) => {
                        state.apply(gateway, vec![p], Vec::new());
                    }
                    Some(p) => lost.push(p),
                    None => lost.push(Presence {
                        reference: field.split_once('|').map_or("", |(_, r)| r).to_owned(),
                        key: String::new(),
                        meta: RawValue::NULL.to_owned(),
                    }),
                }
            } else if let Some(p) = presence.filter(|_| alive.contains(gateway)) {
                state.apply(gateway, vec![p], Vec::new());
            } else {
                dead.entry(gateway).or_default().push(field);
            }
        }
        for (gateway, fields) in dead {
            self.hdel_if_dead(conn, gateway, &hash, &fields).await?;
        }
        if !lost.is_empty() {
            let fields: Vec<String> = lost
                .iter()
                .map(|p| presence_field(&self.gateway, &p.reference))
                .collect();
            let leaves: Vec<Presence> = lost.into_iter().filter(|p| !p.key.is_empty()).collect();
            let mut pipe = redis::pipe();
            pipe.hdel(&hash, fields).ignore();
            if !leaves.is_empty() {
                pipe.add_command(self.server.publish_cmd(
                    &self.names.room(room),
                    room::presence_diff(&self.gateway, Vec::new(), leaves),
                ))
                .ignore();
            }
            pipe.query_async::<()>(conn).await?;
        }
        Ok(state)
    }

    /// `HDEL hash fields` of `gateway`, only while its lease is absent.
    async fn hdel_if_dead(
        &self,
        conn: &mut Connection,
        gateway: &str,
        hash: &str,
        fields: &[&str],
    ) -> Result<(), Error> {
        let lease = self.names.lease(gateway);
        for chunk in fields.chunks(HDEL_CHUNK) {
            // EVAL, not EVALSHA: the script is small and needs no feature.
            let _: i64 = redis::cmd("EVAL")
                .arg(HDEL_IF_DEAD)
                .arg(2)
                .arg(&lease)
                .arg(hash)
                .arg(chunk)
                .query_async(conn)
                .await?;
        }
        Ok(())
    }

    /// Which of `gateways` hold a lease.
    async fn alive<'g>(
        &self,
        conn: &mut Connection,
        gateways: &[&'g str],
    ) -> Result<HashSet<&'g str>, Error> {
        if gateways.is_empty() {
            return Ok(HashSet::new());
        }
        let mut pipe = redis::pipe();
        for g in gateways {
            pipe.exists(self.names.lease(g));
        }
        let exists: Vec<bool> = pipe.query_async(conn).await?;
        Ok(gateways
            .iter()
            .zip(exists)
            .filter_map(|(g, alive)| alive.then_some(*g))
            .collect())
    }

    /// The presences of gateways with no lease leave: every room here
    /// tells its members, and the dead gateways' entries are removed from
    /// every room they were in (found through the tenant's set of
    /// gateways with presences, so that rooms nobody joins again are
    /// cleaned too).
    pub async fn check_leases(&mut self, conn: &mut Connection) -> Result<(), Error> {
        let registered: Vec<String> = conn.smembers(self.names.presence_gateways()).await?;
        let others: Vec<String> = {
            let mut seen = HashSet::new();
            self.rooms
                .values()
                .flat_map(|r| r.state.gateways())
                .chain(registered.iter().map(String::as_str))
                .filter(|g| *g != self.gateway && seen.insert(*g))
                .map(str::to_owned)
                .collect()
        };
        let refs: Vec<&str> = others.iter().map(String::as_str).collect();
        let alive = self.alive(conn, &refs).await?;
        let dead: Vec<&str> = refs
            .iter()
            .copied()
            .filter(|g| !alive.contains(g))
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        let mut left = 0;
        for r in self.rooms.values_mut() {
            let changed = r.state.remove_gateways(|g| dead.contains(&g));
            left += changed.leaves.len();
            tell(r, &changed);
        }
        for gateway in &dead {
            self.remove_gateway(conn, gateway).await?;
        }
        if left > 0 {
            info!(gateways = ?dead, presences = left, "gateway leases expired; their presences left");
        }
        Ok(())
    }

    /// Removes `gateway`'s presences from every room it was in. When it
    /// is this gateway (a start with a configured id, a clean shutdown)
    /// their leaves are announced too, since nobody else will; another
    /// gateway's are deleted only while its lease is still absent.
    pub async fn remove_gateway(&self, conn: &mut Connection, gateway: &str) -> Result<(), Error> {
        let ours = gateway == self.gateway;
        let index = self.names.presence_rooms(gateway);
        let rooms: Vec<String> = conn.smembers(&index).await?;
        for room in &rooms {
            let hash = self.names.presences(room);
            let stored: Vec<(String, String)> = conn.hgetall(&hash).await?;
            let theirs: Vec<(&str, &str)> = stored
                .iter()
                .filter(|(field, _)| field_gateway(field) == gateway)
                .map(|(f, j)| (f.as_str(), j.as_str()))
                .collect();
            if theirs.is_empty() {
                continue;
            }
            let fields: Vec<&str> = theirs.iter().map(|(f, _)| *f).collect();
            if !ours {
                self.hdel_if_dead(conn, gateway, &hash, &fields).await?;
                continue;
            }
            let leaves = theirs
                .iter()
                .filter_map(|(_, json)| serde_json::from_str::<Presence>(json).ok())
                .collect();
            redis::pipe()
                .hdel(&hash, fields)
                .ignore()
                .add_command(self.server.publish_cmd(
                    &self.names.room(room),
                    room::presence_diff(gateway, Vec::new(), leaves),
                ))
                .ignore()
                .query_async::<()>(conn)
                .await?;
        }
        let mut pipe = redis::pipe();
        if ours || !self.alive(conn, &[gateway]).await?.contains(gateway) {
            pipe.del(&index)
                .ignore()
                .srem(self.names.presence_gateways(), gateway)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }

    /// This gateway's presences written and announced again: after a
    /// lost connection (Redis may have restarted empty) or a lease that
    /// lapsed (the others removed them).
    pub async fn rewrite_own(&self, conn: &mut Connection) -> Result<(), Error> {
        let mut by_room: HashMap<&str, Vec<Presence>> = HashMap::new();
        for ((room, _), presence) in &self.own {
            by_room.entry(room).or_default().push(presence.clone());
        }
        for (room, joins) in by_room {
            let hash = self.names.presences(room);
            let mut pipe = redis::pipe();
            for p in &joins {
                pipe.hset(
                    &hash,
                    presence_field(&self.gateway, &p.reference),
                    to_json(p),
                )
                .ignore();
            }
            pipe.sadd(self.names.presence_rooms(&self.gateway), room)
                .ignore()
                .sadd(self.names.presence_gateways(), &self.gateway)
                .ignore()
                .add_command(self.server.publish_cmd(
                    &self.names.room(room),
                    room::presence_diff(&self.gateway, joins, Vec::new()),
                ))
                .ignore();
            pipe.query_async::<()>(conn).await?;
        }
        Ok(())
    }

    /// After a lost connection: this gateway's presences written again,
    /// every room subscribed and read again, and its members told what
    /// changed meanwhile.
    pub async fn resync(&mut self, conn: &mut Connection, sink: &mut Sink) -> Result<(), Error> {
        self.rewrite_own(conn).await?;
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            sink.subscribe(&self.names.room(&room)).await?;
            let state = self.load(conn, &room).await?;
            if let Some(r) = self.rooms.get_mut(&room) {
                let changed = r.state.replace(state);
                tell(r, &changed);
                send_states(r);
            }
        }
        Ok(())
    }
}

/// Sends `presence_state` to the members that want it and have not had it.
fn send_states(room: &mut Room) {
    let mut payload: Option<Arc<str>> = None;
    for member in room
        .members
        .iter_mut()
        .filter(|m| m.presence && !m.state_sent)
    {
        member.state_sent = true;
        let payload = payload
            .get_or_insert_with(|| Arc::from(room.state.payload()))
            .clone();
        deliver(
            &member.socket,
            Delivery::PresenceState(member.channel.clone(), room.topic.clone(), payload),
        );
    }
}

/// Tells every member of `room` what changed, if anything.
fn tell(room: &Room, changed: &Changed) {
    if changed.is_empty() {
        return;
    }
    let event = Arc::new(RoomEvent::PresenceDiff(Diff::new(
        room.topic.clone(),
        changed.payload(),
    )));
    for member in &room.members {
        deliver(
            &member.socket,
            Delivery::Room(member.channel.clone(), event.clone()),
        );
    }
}

fn to_json(presence: &Presence) -> String {
    serde_json::to_string(presence).unwrap_or_default()
}
