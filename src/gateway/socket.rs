//! One WebSocket session: a `select!` over shutdown, the socket, the
//! deliveries the bus routes to it, and a housekeeping tick.
//!
//! Frames to the client are queued and written before the next input is
//! read. The bus never waits on a session: it `try_send`s into the bounded
//! delivery queue and kicks the session when that is full, so a client
//! that stops reading is closed (1013) instead of slowing anyone down.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Context;
use super::auth::{AuthError, unix_now};
use super::broadcast::{self, Refused, binary};
use super::bus::rooms::{Member, RoomEvent};
use super::bus::{Delivery, INTERRUPTED_MESSAGE, SocketHandle};
use super::channel::{self, Channel, JoinError, Refresh, Rejection};
use super::frame::{self, Inbound, Outbound, Vsn};
use super::presence::{self, Request};
use super::private::{self, Admit, PendingJoin, Read, Waiting};
use super::quiet::clip;
use crate::bus;
use crate::bus::room::Encoding;

/// A reply without content.
const OK_REPLY: &str = r#"{"status":"ok","response":{}}"#;
/// Message ids a replaying channel remembers at most (replays are at most
/// 25 and come right after the join).
const MAX_REPLAY_IDS: usize = 128;
/// Supabase's reply to a presence call it refuses without a reason.
const ERROR_REPLY: &str = r#"{"status":"error","response":{}}"#;
/// The `system` message of a channel closed for the broadcast rate.
const TOO_MANY_MESSAGES: &str = "Too many messages per second";
/// The `system` message of a channel closed for the presence rate.
const TOO_MANY_PRESENCE: &str = "Too many presence messages per second";

/// Deliveries a session may have queued before it counts as too slow.
pub const DELIVERY_QUEUE: usize = 1024;
/// Phoenix closes a socket that sent nothing (not even a heartbeat) this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idleness and channel tokens' expiry are checked.
const TICK: Duration = Duration::from_secs(5);
/// How long a close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Close code for a client that fell behind ("try again later").
const CLOSE_TOO_SLOW: u16 = 1013;
/// Close code on shutdown ("going away").
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a frame over the size limit ("message too big"), as
/// Cowboy closes Supabase's sockets.
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for an idle socket, and for one disconnected for joining
/// too fast (Phoenix's `disconnect` closes normally, without a reason).
const CLOSE_NORMAL: u16 = 1000;

/// Bytes of frames written to a socket before each flush, at most (one
/// frame more when a single frame is larger).
const WRITE_BATCH_BYTES: usize = 16 * 1024;
/// Deliveries taken from the socket's queue per wake-up, at most.
const DELIVERIES_PER_WAKE: usize = 64;

/// The payload length of a frame (for [`WRITE_BATCH_BYTES`]).
fn frame_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) => bytes.len(),
        _ => 0,
    }
}

/// How a session ends, and what its socket still owes the client.
enum End {
    /// The server closes: a close frame with this code and reason goes out.
    Close(u16, &'static str),
    /// The client sent a close frame: the answering one is still to go out.
    ///
    /// tungstenite queues that answer when it reads the client's frame but
    /// writes it only on a later read, write or flush, so the socket must
    /// be read on until its stream ends. Dropped at once, it cut the
    /// connection without the answer: clients saw 1006 (abnormal closure)
    /// instead of a clean close, and realtime-py took its own `close()` for
    /// a lost connection and started to reconnect.
    ClosedByClient,
    /// The connection is gone or failed: nothing more can be sent.
    Gone,
}

/// The state of one session.
struct Session {
    ctx: Arc<Context>,
    vsn: Vsn,
    token: String,
    handle: SocketHandle,
    channels: HashMap<String, Channel>,
    /// Private joins waiting for the daemon, by topic.
    pending_joins: HashMap<String, PendingJoin>,
    joins: u64,
    /// Write checks asked so far (their ids' suffix).
    checks: u64,
    out: VecDeque<Message>,
    /// Set when the session is to end once `out` is written.
    closing: Option<(u16, &'static str)>,
}

/// Serves one upgraded socket until it closes, falls behind or `cancel`
/// fires; its subscriptions are removed from the bus at the end.
pub async fn serve(
    mut ws: WebSocket,
    ctx: Arc<Context>,
    id: u64,
    vsn: Vsn,
    token: String,
    cancel: CancellationToken,
) {
    let (tx, mut deliveries) = mpsc::channel(DELIVERY_QUEUE);
    let kick = CancellationToken::new();
    let mut session = Session {
        ctx,
        vsn,
        token,
        handle: SocketHandle::new(id, tx, kick.clone()),
        channels: HashMap::new(),
        pending_joins: HashMap::new(),
        joins: 0,
        checks: 0,
        out: VecDeque::new(),
        closing: None,
    };
    debug!(socket = id, ?vsn, "socket connected");
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    // Made once and polled in every `select!` below: a fresh
    // `cancelled()` per loop registered and dropped a waiter under the
    // token's lock twice per token per delivery.
    let stopping = cancel.cancelled();
    let kicked = kick.cancelled();
    tokio::pin!(stopping, kicked);
    // Whether either has fired (a finished future is not polled again).
    let mut stop = false;
    let end = loop {
        if !session.out.is_empty() {
            let (out, metrics) = (&mut session.out, &session.ctx.metrics);
            // Frames are written out together and flushed once: one
            // `ws.send` (write + flush) per frame was a system call per
            // frame, a third of the gateway's time at 1,000 sockets.
            // Capped in bytes so that a burst does not grow each socket's
            // write buffer beyond a few pages.
            let written = async {
                let mut bytes = 0;
                while bytes < WRITE_BATCH_BYTES
                    && let Some(message) = out.pop_front()
                {
                    bytes += frame_len(&message);
                    ws.feed(message).await?;
                    metrics.frames_sent.increment(1);
                }
                ws.flush().await
            };
            let failed = tokio::select! {
                biased;
                () = &mut stopping, if !stop => { stop = true; false }
                () = &mut kicked, if !stop => { stop = true; false }
                written = written => written.is_err(),
            };
            if failed {
                session.out.clear();
            }
            if !session.out.is_empty() && !stop {
                continue;
            }
        }
        if stop {
            if cancel.is_cancelled() {
                break End::Close(CLOSE_GOING_AWAY, "server shutting down");
            }
            if session.ctx.may_warn("slow_socket") {
                warn!(socket = id, "closing a socket that fell behind");
            }
            session.ctx.metrics.slow_closes.increment(1);
            break End::Close(CLOSE_TOO_SLOW, "too slow: send queue full");
        }
        if let Some((code, reason)) = session.closing {
            break End::Close(code, reason);
        }
        tokio::select! {
            biased;
            () = &mut stopping, if !stop => stop = true,
            () = &mut kicked, if !stop => stop = true,
            received = ws.recv(), if !stop => match received {
                Some(Ok(message)) => {
                    last_seen = Instant::now();
                    match message {
                        Message::Text(text) => session.on_text(text.as_str()),
                        Message::Binary(bytes) => session.on_binary(&bytes),
                        Message::Close(_) => break End::ClosedByClient,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Some(Err(e)) => {
                    if too_big(e) {
                        debug!(socket = id, "closing a socket that sent a frame over the size limit");
                        break End::Close(CLOSE_TOO_BIG, "message too big");
                    }
                    break End::Gone;
                }
                None => break End::Gone,
            },
            delivery = deliveries.recv(), if !stop => {
                if let Some(delivery) = delivery {
                    session.on_delivery(delivery);
                    // Take what else is waiting, to write it in one go.
                    while session.out.len() < DELIVERIES_PER_WAKE
                        && let Ok(delivery) = deliveries.try_recv()
                    {
                        session.on_delivery(delivery);
                    }
                }
            }
            _ = tick.tick(), if !stop => {
                if last_seen.elapsed() > IDLE_TIMEOUT {
                    info!(socket = id, "closing an idle socket (no heartbeat for 60 s)");
                    break End::Close(CLOSE_NORMAL, "heartbeat timeout");
                }
                session.check_tokens();
                session.retire_due();
                session.expire_private();
            }
        }
    };
    for pending in session.pending_joins.values() {
        session.ctx.bus.unregister(&pending.channel.registration);
    }
    for channel in session.channels.values() {
        for registration in channel.registrations() {
            session.ctx.bus.unregister(registration);
        }
        session
            .ctx
            .bus
            .leave_room(&channel.room(), channel.id.clone());
    }
    session
        .ctx
        .metrics
        .channels
        .decrement(session.channels.len() as f64);
    match end {
        End::Close(code, reason) => {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }));
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.send(frame)).await;
        }
        // Reading on sends the answering close frame (see `End::ClosedByClient`).
        End::ClosedByClient => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Some(Ok(_)) = ws.recv().await {}
            })
            .await;
        }
        End::Gone => {}
    }
    debug!(socket = id, "socket closed");
}

/// A database message's id, from its broadcast metadata (`{"id":…}`).
fn message_id(meta: &[u8]) -> Option<String> {
    if meta.is_empty() {
        return None;
    }
    serde_json::from_slice::<Value>(meta)
        .ok()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

/// Whether a read failed because the client's frame or message was over
/// the size limit (the connection itself is still usable for a close).
fn too_big(e: axum::Error) -> bool {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => true,
        Some(other) => {
            debug!(error = %other, "socket read failed");
            false
        }
        None => {
            debug!(error = %inner, "socket read failed");
            false
        }
    }
}

impl Session {
    fn push(
        &mut self,
        join_ref: &Value,
        reference: &Value,
        topic: &str,
        event: &str,
        payload: &str,
    ) {
        let text = frame::encode(
            self.vsn,
            Outbound {
                join_ref,
                reference,
                topic,
                event,
                payload,
            },
        );
        self.out.push_back(Message::Text(text.into()));
    }

    fn reply_error(&mut self, join_ref: &Value, reference: &Value, topic: &str, reason: &str) {
        let payload = format!(
            r#"{{"status":"error","response":{{"reason":{}}}}}"#,
            Value::from(reason)
        );
        self.push(join_ref, reference, topic, "phx_reply", &payload);
    }

    fn on_text(&mut self, text: &str) {
        match frame::decode(self.vsn, text) {
            Ok(inbound) => self.on_frame(inbound),
            Err(malformed) => {
                debug!(socket = self.handle.id, error = %malformed, "malformed frame");
                if let Some(reference) = &malformed.reference {
                    let join_ref = malformed.join_ref.clone().unwrap_or(Value::Null);
                    let topic = malformed.topic.as_deref().unwrap_or("phoenix");
                    self.reply_error(&join_ref, reference, topic, &malformed.to_string());
                }
            }
        }
    }

    /// A binary frame: realtime-js's broadcast push (kind 3). Anything
    /// else is dropped and the socket stays, as on Supabase.
    fn on_binary(&mut self, bytes: &[u8]) {
        if self.vsn == Vsn::V1 {
            // Supabase's vsn 1.0.0 serializer reads text frames only.
            debug!(
                socket = self.handle.id,
                "ignoring a binary frame on a vsn 1.0.0 socket"
            );
            return;
        }
        let push = match binary::decode(bytes) {
            Ok(push) => push,
            Err(e) => {
                debug!(socket = self.handle.id, error = %e, "ignoring a binary frame");
                return;
            }
        };
        let Some(channel) = self.channels.get(push.topic) else {
            debug!(socket = self.handle.id, topic = %clip(push.topic), "ignoring a binary broadcast to a topic not joined");
            return;
        };
        let message = broadcast::from_push(
            &push,
            self.sender(channel),
            self.ctx.limits.max_payload_bytes(),
        );
        let (join_ref, reference) = (Value::from(push.join_ref), Value::from(push.reference));
        let topic = push.topic.to_owned();
        self.send_broadcast(&topic, &join_ref, &reference, message);
    }

    /// A `broadcast` text frame.
    fn on_broadcast(&mut self, f: Inbound) {
        let Some(channel) = self.channels.get(&f.topic) else {
            return;
        };
        let message = broadcast::from_text(
            &f.payload,
            self.sender(channel),
            self.ctx.limits.max_payload_bytes(),
        );
        self.send_broadcast(&f.topic, &f.join_ref, &f.reference, message);
    }

    /// Who a broadcast of `channel` is from, on the bus: `None` when it
    /// asked for its own (`self`), so that nobody is skipped.
    fn sender(&self, channel: &Channel) -> Option<String> {
        (!channel.broadcast.echo).then(|| format!("{} {}", self.ctx.gateway, channel.id))
    }

    /// Sends a client's broadcast to its room and answers it if the
    /// channel acks: `ok`, or Supabase's error for an oversized payload.
    /// Without ack a refused broadcast is dropped silently, as there.
    fn send_broadcast(
        &mut self,
        topic: &str,
        join_ref: &Value,
        reference: &Value,
        message: Result<Vec<u8>, Refused>,
    ) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        if !channel.private {
            self.publish_broadcast(topic, join_ref, reference, message);
            return;
        }
        // A private channel's sender must be allowed to write; without,
        // its broadcasts are dropped silently, ack or not, as Supabase.
        let waiting = Waiting::Broadcast {
            join_ref: join_ref.clone(),
            reference: reference.clone(),
            message,
        };
        match channel.writes.broadcast.admit(waiting) {
            Admit::Go(Waiting::Broadcast {
                join_ref,
                reference,
                message,
            }) => self.publish_broadcast(topic, &join_ref, &reference, message),
            Admit::Go(_) | Admit::Wait => {}
            Admit::Refuse(_) => self.ctx.metrics.broadcast("unauthorized"),
            Admit::Ask => self.ask_write(topic, "broadcast"),
        }
    }

    /// Sends a broadcast its channel may send (see [`Self::send_broadcast`]).
    fn publish_broadcast(
        &mut self,
        topic: &str,
        join_ref: &Value,
        reference: &Value,
        message: Result<Vec<u8>, Refused>,
    ) {
        let Some(channel) = self.channels.get(topic) else {
            return;
        };
        let (ack, room) = (channel.broadcast.ack, channel.room());
        // Counted in and checked here as well as on delivery: a sender
        // nobody hears would otherwise never be stopped.
        self.ctx.events.add(1);
        if self.ctx.events.triggered(Instant::now()) {
            self.ctx.metrics.broadcast("rate_limited");
            self.fail_channel(topic, TOO_MANY_MESSAGES);
            return;
        }
        let sent = message.and_then(|message| {
            if self.ctx.bus.broadcast(&room, message) {
                Ok(())
            } else {
                Err(Refused::Invalid(
                    "The broadcast was not sent: the gateway lost its connection to Redis",
                ))
            }
        });
        self.ctx.metrics.broadcast(match &sent {
            Ok(()) => "sent",
            Err(Refused::TooLarge) => "too_large",
            Err(Refused::Invalid(_)) => "refused",
        });
        if let Err(e) = &sent {
            debug!(socket = self.handle.id, topic = %clip(topic), error = %e, "broadcast not sent");
        }
        if !ack {
            return;
        }
        match sent {
            Ok(()) => self.push(join_ref, reference, topic, "phx_reply", OK_REPLY),
            Err(Refused::TooLarge) => self.push(
                join_ref,
                reference,
                topic,
                "phx_reply",
                r#"{"status":"error","response":"payload_size_exceeded"}"#,
            ),
            Err(Refused::Invalid(reason)) => self.reply_error(join_ref, reference, topic, reason),
        }
    }

    /// A `presence` frame: track or untrack, answered as Supabase
    /// answers; a channel over its call window, the tenant's presence
    /// rate or the meta size is closed.
    fn on_presence(&mut self, f: Inbound) {
        let max_bytes = self.ctx.limits.max_payload_bytes();
        let Some(channel) = self.channels.get_mut(&f.topic) else {
            return;
        };
        // A private channel's track needs write permission (untrack does
        // not, as on Supabase).
        let f = if channel.private && matches!(presence::request(&f.payload), Request::Track(_)) {
            let topic = f.topic.clone();
            match channel.writes.presence.admit(Waiting::Presence(f)) {
                Admit::Go(Waiting::Presence(f)) => f,
                Admit::Go(_) | Admit::Wait => return,
                Admit::Refuse(Waiting::Presence(f)) => {
                    self.ctx.metrics.presence("unauthorized");
                    self.push(
                        &f.join_ref,
                        &f.reference,
                        &f.topic,
                        "phx_reply",
                        ERROR_REPLY,
                    );
                    return;
                }
                Admit::Refuse(_) => return,
                Admit::Ask => {
                    self.ask_write(&topic, "presence");
                    return;
                }
            }
        } else {
            f
        };
        let Some(channel) = self.channels.get_mut(&f.topic) else {
            return;
        };
        // The window first: a flood costs a counter, not a parse each.
        if !channel.presence_window.allow(Instant::now()) {
            self.ctx.metrics.presence("rate_limited");
            self.fail_channel(&f.topic, "Client presence rate limit exceeded");
            return;
        }
        match presence::request(&f.payload) {
            Request::Nothing => {
                self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", OK_REPLY);
            }
            Request::Track(meta) => {
                let text = serde_json::to_string(&meta).unwrap_or_default();
                let hash = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default()
                    .hash_one(&text);
                if channel.tracked == Some(hash) {
                    self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", OK_REPLY);
                    return;
                }
                if text.len() > max_bytes {
                    self.ctx.metrics.presence("too_large");
                    self.fail_channel(&f.topic, "Track message size exceeded");
                    return;
                }
                self.ctx.presence_events.add(1);
                if self.ctx.presence_events.triggered(Instant::now()) {
                    self.ctx.metrics.presence("rate_limited");
                    self.fail_channel(&f.topic, TOO_MANY_PRESENCE);
                    return;
                }
                channel.tracked = Some(hash);
                self.ctx.bus.track(
                    &channel.room(),
                    channel.id.clone(),
                    channel.presence.key.clone(),
                    meta,
                );
                self.ctx.metrics.presence("track");
                self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", OK_REPLY);
            }
            Request::Untrack => {
                channel.tracked = None;
                self.ctx.bus.untrack(&channel.room(), channel.id.clone());
                self.ctx.metrics.presence("untrack");
                self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", OK_REPLY);
            }
            Request::NotAMap => self.reply_error(
                &f.join_ref,
                &f.reference,
                &f.topic,
                "Presence track payload must be a map",
            ),
            Request::Unknown => self.push(
                &f.join_ref,
                &f.reference,
                &f.topic,
                "phx_reply",
                ERROR_REPLY,
            ),
        }
    }

    fn on_frame(&mut self, f: Inbound) {
        match (f.topic.as_str(), f.event.as_str()) {
            ("phoenix", "heartbeat") => {
                let ok = r#"{"status":"ok","response":{}}"#;
                self.push(&Value::Null, &f.reference, "phoenix", "phx_reply", ok);
            }
            (_, "phx_join") => self.join(f),
            (topic, "phx_leave") if self.pending_joins.contains_key(topic) => {
                if let Some(pending) = self.pending_joins.remove(topic) {
                    self.ctx.bus.unregister(&pending.channel.registration);
                }
                self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", OK_REPLY);
            }
            (topic, _) if !self.channels.contains_key(topic) => {
                self.reply_error(&f.join_ref, &f.reference, &f.topic, "unmatched topic");
            }
            (_, "phx_leave") => self.leave(f),
            (_, "access_token") => self.refresh(f),
            (_, "broadcast") => self.on_broadcast(f),
            (_, "presence") => self.on_presence(f),
            (topic, event) => {
                debug!(socket = self.handle.id, topic = %clip(topic), event = %clip(event), "ignoring an unsupported event")
            }
        }
    }

    /// Supabase's order: the topic name, the join rate, the channel count,
    /// then (in [`Channel::join`]) the topic's length, the payload and the
    /// token.
    fn admit(&self, topic: &str) -> Result<(), JoinError> {
        channel::check_topic(topic)?;
        if !self.ctx.joins.try_join(Instant::now()) {
            return Err(JoinError::TooManyJoins);
        }
        if self.channels.len() + self.pending_joins.len() >= self.ctx.limits.max_channels_per_client
        {
            return Err(JoinError::TooManyChannels);
        }
        Ok(())
    }

    fn join(&mut self, f: Inbound) {
        // A second join of a joined topic replaces the channel (Phoenix
        // closes the old one first), so it does not count twice.
        if let Some(old) = self.channels.remove(&f.topic) {
            self.close_channel(old);
        }
        if let Some(old) = self.pending_joins.remove(&f.topic) {
            self.ctx.bus.unregister(&old.channel.registration);
        }
        self.joins += 1;
        let prefix = format!("{}:{}", self.handle.id, self.joins);
        let joined = self.admit(&f.topic).and_then(|()| {
            Channel::join(
                &f.topic,
                f.join_ref.clone(),
                &f.payload,
                &self.token,
                &self.ctx.verifier,
                &prefix,
                &self.ctx.limits,
            )
        });
        match joined {
            Ok((channel, reply)) if channel.private => {
                // Answered once the daemon says what it may read.
                self.ctx.bus.register(&self.handle, &channel.registration);
                let pending = PendingJoin {
                    channel,
                    reply,
                    reference: f.reference.clone(),
                    since: Instant::now(),
                };
                self.pending_joins.insert(f.topic.clone(), pending);
            }
            Ok((channel, reply)) => {
                self.ctx.bus.register(&self.handle, &channel.registration);
                self.open(channel, &f.reference, &reply);
            }
            Err(e) => {
                self.ctx.metrics.join_refused(e.code());
                let topic = clip(&f.topic);
                match &e {
                    JoinError::TooManyJoins | JoinError::TooManyChannels => {
                        if self.ctx.may_warn("join_refused") {
                            warn!(socket = self.handle.id, %topic, error = %e, "join refused");
                        }
                    }
                    JoinError::Auth(claim @ AuthError::Claim { .. }) => {
                        // The client is told only "Unknown Error on
                        // Channel", as by Supabase: say here which claim.
                        if self.ctx.may_warn("claim_refused") {
                            info!(socket = self.handle.id, %topic, error = %claim, "join refused");
                        }
                    }
                    _ => {
                        debug!(socket = self.handle.id, %topic, error = %e, "join refused")
                    }
                }
                self.reply_error(&f.join_ref, &f.reference, &f.topic, &e.reason());
                if matches!(e, JoinError::TooManyJoins) {
                    // Supabase disconnects the transport after this reply.
                    self.closing = Some((CLOSE_NORMAL, ""));
                }
            }
        }
    }

    /// Replies ok to `channel`'s join and puts it in its room.
    fn open(&mut self, channel: Channel, reference: &Value, reply: &str) {
        let topic = channel.topic.clone();
        self.push(&channel.join_ref, reference, &topic, "phx_reply", reply);
        self.ctx.bus.join_room(
            &channel.room(),
            Member::new(
                self.handle.clone(),
                channel.id.clone(),
                channel.presence.enabled,
            ),
        );
        debug!(socket = self.handle.id, topic = %clip(&topic), bindings = channel.bindings.len(), private = channel.private, "joined");
        self.ctx.metrics.channels.increment(1.0);
        let presence = channel.presence.enabled;
        self.channels.insert(topic.clone(), channel);
        // Supabase's sync after the join checks the presence rate
        // too: past it, the new channel is closed.
        if presence && self.ctx.presence_events.triggered(Instant::now()) {
            self.ctx.metrics.presence("rate_limited");
            self.fail_channel(&topic, TOO_MANY_PRESENCE);
        }
    }

    /// The daemon's answer about what private channel `id` may read: for
    /// a waiting join, its reply; for a joined channel (a new token, a
    /// daemon that restarted), whether it stays.
    fn on_access(&mut self, id: &str, access: &bus::Access) {
        let waiting = self
            .pending_joins
            .iter()
            .find(|(_, p)| {
                p.channel
                    .registration
                    .private
                    .as_ref()
                    .is_some_and(|p| p.id == id)
            })
            .map(|(topic, _)| topic.clone());
        if let Some(topic) = waiting
            && let Some(mut pending) = self.pending_joins.remove(&topic)
        {
            let refused = match (Read::of(access), access) {
                (Some(read), _) if read.any() => {
                    pending.channel.read = Some(read);
                    self.open(pending.channel, &pending.reference, &pending.reply);
                    return;
                }
                (Some(_), _) => private::unauthorized(pending.channel.name()),
                (None, bus::Access::Failed(reason)) => reason.clone(),
                (None, _) => private::UNREACHABLE.to_owned(),
            };
            self.ctx.metrics.join_refused("Unauthorized");
            debug!(socket = self.handle.id, topic = %clip(&topic), reason = %refused, "private join refused");
            self.ctx.bus.unregister(&pending.channel.registration);
            let join_ref = pending.channel.join_ref.clone();
            self.reply_error(&join_ref, &pending.reference, &topic, &refused);
            return;
        }
        let Some(channel) = self.channels.values_mut().find(|c| c.private && c.owns(id)) else {
            return;
        };
        let topic = channel.topic.clone();
        let failed = match (Read::of(access), access) {
            (Some(read), _) => {
                // Whatever comes now is a registration sent again: no replay.
                channel.replaying = false;
                let before = channel.read.replace(read);
                if before.is_some_and(|before| read.lost(&before)) {
                    Some(private::no_longer(channel.name()))
                } else if !read.any() {
                    Some(private::no_permission(channel.name()))
                } else {
                    None
                }
            }
            // Asked again (a reconnection, a daemon restart) while the
            // database could not answer: it stays as it was authorized.
            (None, _) => {
                debug!(socket = self.handle.id, topic = %clip(&topic), ?access, "a joined private channel could not be asked again; kept");
                None
            }
        };
        if let Some(message) = failed {
            self.fail_channel(&topic, &message);
        }
    }

    /// Asks the daemon whether private channel `topic` may write
    /// `extension`.
    fn ask_write(&mut self, topic: &str, extension: &str) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        self.checks += 1;
        let id = format!("{}:w{}", channel.id, self.checks);
        let check = bus::WriteCheck {
            id: id.clone(),
            topic: channel.name().to_owned(),
            extension: extension.to_owned(),
            // A refreshed token's, once sent (its permissions were reset).
            role: channel.latest_registration().role.clone(),
            claims: channel.latest_registration().claims.clone(),
        };
        self.ctx.bus.authorize(&self.handle, check);
        let write = match extension {
            "presence" => &mut channel.writes.presence,
            _ => &mut channel.writes.broadcast,
        };
        write.asked(id, Instant::now());
    }

    /// A write check's answer: the writes that waited go, or are refused
    /// (a broadcast silently, a track with an error reply, as Supabase).
    fn on_write(&mut self, id: &str, allowed: Option<bool>, reason: Option<&str>) {
        if let Some(reason) = reason {
            debug!(socket = self.handle.id, check = %clip(id), %reason, "a write check was not decided");
        }
        let Some(channel) = self
            .channels
            .values_mut()
            .find(|c| c.writes.broadcast.waits_for(id) || c.writes.presence.waits_for(id))
        else {
            return;
        };
        let topic = channel.topic.clone();
        let write = if channel.writes.broadcast.waits_for(id) {
            &mut channel.writes.broadcast
        } else {
            &mut channel.writes.presence
        };
        let (go, waiting) = write.answer(allowed);
        self.release_writes(&topic, go, waiting);
    }

    /// Sends (`go`) or refuses writes that waited for their permission.
    fn release_writes(&mut self, topic: &str, go: bool, waiting: Vec<Waiting>) {
        for write in waiting {
            match write {
                Waiting::Broadcast {
                    join_ref,
                    reference,
                    message,
                } if go => self.publish_broadcast(topic, &join_ref, &reference, message),
                Waiting::Broadcast { .. } => {
                    self.ctx.metrics.broadcast("unauthorized");
                }
                Waiting::Presence(f) if go => self.on_presence(f),
                Waiting::Presence(f) => {
                    self.ctx.metrics.presence("unauthorized");
                    self.push(
                        &f.join_ref,
                        &f.reference,
                        &f.topic,
                        "phx_reply",
                        ERROR_REPLY,
                    );
                }
            }
        }
    }

    /// Gives up on write checks and private joins the daemon did not
    /// answer in time.
    fn expire_private(&mut self) {
        let now = Instant::now();
        let late: Vec<String> = self
            .pending_joins
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) >= private::JOIN_TIMEOUT)
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in late {
            if let Some(pending) = self.pending_joins.remove(&topic) {
                self.ctx.bus.unregister(&pending.channel.registration);
                let join_ref = pending.channel.join_ref.clone();
                self.reply_error(&join_ref, &pending.reference, &topic, private::UNREACHABLE);
            }
        }
        let Some(deadline) = now.checked_sub(private::WRITE_TIMEOUT) else {
            return;
        };
        let mut released = Vec::new();
        for channel in self.channels.values_mut() {
            for write in [&mut channel.writes.broadcast, &mut channel.writes.presence] {
                if let Some(id) = write.overdue(deadline) {
                    self.ctx.bus.forget_check(&id);
                    let (_, waiting) = write.answer(None);
                    released.push((channel.topic.clone(), waiting));
                }
            }
        }
        for (topic, waiting) in released {
            self.release_writes(&topic, false, waiting);
        }
    }

    fn leave(&mut self, f: Inbound) {
        let Some(channel) = self.channels.remove(&f.topic) else {
            return;
        };
        let ok = r#"{"status":"ok","response":{}}"#;
        self.push(&f.join_ref, &f.reference, &f.topic, "phx_reply", ok);
        self.close_channel(channel);
    }

    /// Removes `channel`'s subscriptions and tells the client it is closed.
    fn close_channel(&mut self, channel: Channel) {
        self.ctx.metrics.channels.decrement(1.0);
        for registration in channel.registrations() {
            self.ctx.bus.unregister(registration);
        }
        self.ctx.bus.leave_room(&channel.room(), channel.id.clone());
        let join_ref = channel.join_ref.clone();
        self.push(&join_ref, &join_ref, &channel.topic, "phx_close", "{}");
    }

    /// A channel whose token failed: `system` error, then `phx_close`.
    fn fail_channel(&mut self, topic: &str, message: &str) {
        let Some(channel) = self.channels.remove(topic) else {
            return;
        };
        let payload = channel.system_error(message);
        let join_ref = channel.join_ref.clone();
        self.push(&join_ref, &Value::Null, topic, "system", &payload);
        self.close_channel(channel);
    }

    fn refresh(&mut self, f: Inbound) {
        let token = serde_json::from_str::<Value>(f.payload.get())
            .ok()
            .and_then(|p| p.get("access_token").cloned())
            .unwrap_or(Value::Null);
        let Some(channel) = self.channels.get_mut(&f.topic) else {
            return;
        };
        // A refresh registers the channel again, like a join: it is paid
        // from the join rate, so alternating tokens cannot churn the bus.
        if channel.is_new_token(&token) && !self.ctx.joins.try_join(Instant::now()) {
            self.ctx.metrics.join_refused("ClientJoinRateLimitReached");
            if self.ctx.may_warn("join_refused") {
                warn!(socket = self.handle.id, topic = %clip(&f.topic), "access_token ignored: the join rate is spent");
            }
            return;
        }
        match channel.refresh(&token, &self.ctx.verifier) {
            Ok(Refresh::Ignored) => {}
            Ok(Refresh::Register(registration, superseded)) => {
                if let Some(superseded) = &superseded {
                    self.ctx.bus.unregister(superseded);
                }
                for superseded in std::mem::take(&mut channel.superseded) {
                    self.ctx.bus.unregister(&superseded);
                }
                // What the old token could write no longer holds.
                for write in [&mut channel.writes.broadcast, &mut channel.writes.presence] {
                    if let private::Permission::Asked(id, _) = &write.permission {
                        self.ctx.bus.forget_check(id);
                    }
                    drop(write.reset());
                }
                self.ctx.bus.register(&self.handle, &registration);
                debug!(socket = self.handle.id, topic = %clip(&f.topic), "token refreshed");
            }
            Err(e) => {
                debug!(socket = self.handle.id, topic = %clip(&f.topic), error = %e, "token refresh refused");
                self.fail_channel(&f.topic, &e.system_message());
            }
        }
    }

    /// Unregisters the old subscriptions of refreshes that took over
    /// [`channel::RETIRE_AFTER`] ago.
    fn retire_due(&mut self) {
        let now = Instant::now();
        for channel in self.channels.values_mut() {
            for registration in channel.retire(now) {
                self.ctx.bus.unregister(&registration);
            }
        }
    }

    fn check_tokens(&mut self) {
        let now = unix_now();
        let failed: Vec<(String, String)> = self
            .channels
            .values()
            .filter_map(|c| {
                c.check_token(now)
                    .err()
                    .map(|e| (c.topic.clone(), e.system_message()))
            })
            .collect();
        for (topic, message) in failed {
            self.fail_channel(&topic, &message);
        }
    }

    /// A stored message replayed to channel `id` after its join: JSON as a
    /// text frame carrying the join ref, bytes as kind 4 (vsn 2.0.0 only),
    /// as Supabase sends them.
    fn on_replayed(&mut self, id: &str, event: &RoomEvent) {
        let RoomEvent::Broadcast(b) = event else {
            return;
        };
        let Some(channel) = self
            .channels
            .get_mut(event.topic())
            .filter(|c| &*c.id == id)
        else {
            return;
        };
        let Some(user) = &b.user else {
            return;
        };
        // Replays follow the join's answer only; a registration sent again
        // (a reconnection) must not replay again. One that came live first
        // is not sent twice.
        if !channel.replaying {
            return;
        }
        if let Some(message_id) = message_id(&user.meta)
            && !channel.replayed.insert(message_id)
        {
            return;
        }
        if user.encoding == Encoding::Binary {
            if let Some(frame) = b.frame(self.vsn) {
                self.out.push_back(frame);
            }
            return;
        }
        let (Ok(meta), Ok(body)) = (
            std::str::from_utf8(&user.meta),
            std::str::from_utf8(&b.body),
        ) else {
            return;
        };
        let payload = format!(
            r#"{{"event":{},"meta":{meta},"payload":{body},"type":"broadcast"}}"#,
            Value::from(user.event.as_str())
        );
        let (join_ref, topic) = (channel.join_ref.clone(), channel.topic.clone());
        self.push(&join_ref, &Value::Null, &topic, "broadcast", &payload);
    }

    /// A room's broadcast or presence diff for channel `id`.
    fn on_room(&mut self, id: &str, event: &RoomEvent) {
        let topic = event.topic();
        let Some(channel) = self.channels.get_mut(topic).filter(|c| &*c.id == id) else {
            return;
        };
        match event {
            RoomEvent::Broadcast(b) => {
                // A private channel gets broadcasts only if it may read them.
                if b.from.as_deref() == Some(id)
                    || (channel.private && !channel.read.is_some_and(|r| r.broadcast))
                {
                    return;
                }
                // Replayed already: not twice. While replays may still come,
                // a live one is remembered so that its replay is skipped.
                if channel.replaying
                    && let Some(user) = &b.user
                    && let Some(m) = message_id(&user.meta)
                {
                    let seen = channel.replayed.contains(&m);
                    if !seen && channel.replayed.len() < MAX_REPLAY_IDS {
                        channel.replayed.insert(m);
                    }
                    if seen {
                        return;
                    }
                }
                let Some(frame) = b.frame(self.vsn) else {
                    return;
                };
                self.ctx.events.add(1);
                if self.ctx.events.triggered(Instant::now()) {
                    let topic = channel.topic.clone();
                    self.fail_channel(&topic, TOO_MANY_MESSAGES);
                    return;
                }
                self.out.push_back(frame);
            }
            RoomEvent::PresenceDiff(diff) => {
                // A private channel sees presence only if it may read it.
                if channel.private && !channel.reads_presence() {
                    return;
                }
                self.ctx.presence_events.add(1);
                self.out.push_back(diff.frame(self.vsn));
            }
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        let bytes = delivery.bytes();
        if bytes > 0 {
            self.handle
                .queued_bytes
                .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
        }
        let mut frames: Vec<(Value, String, &'static str, String)> = Vec::new();
        match &delivery {
            Delivery::Room(id, event) => self.on_room(id, event),
            Delivery::Access(id, access) => self.on_access(id, access),
            Delivery::Replayed(id, event) => self.on_replayed(id, event),
            Delivery::Write(id, allowed, reason) => self.on_write(id, *allowed, reason.as_deref()),
            Delivery::PresenceState(id, topic, payload) => {
                if let Some(c) = self
                    .channels
                    .get(&**topic)
                    .filter(|c| c.id == *id && (!c.private || c.reads_presence()))
                {
                    self.ctx.presence_events.add(1);
                    frames.push((
                        c.join_ref.clone(),
                        c.topic.clone(),
                        "presence_state",
                        payload.to_string(),
                    ));
                }
            }
            Delivery::Subscribed(id) => {
                if let Some(c) = self.channels.values_mut().find(|c| c.owns(id)) {
                    let confirmed = c.confirm(id);
                    if let Some(payload) = confirmed.system {
                        frames.push((c.join_ref.clone(), c.topic.clone(), "system", payload));
                    }
                }
            }
            Delivery::Rejected(id, message) => {
                if let Some(c) = self.channels.values_mut().find(|c| c.owns(id)) {
                    match c.reject(id, message) {
                        Rejection::None => {}
                        Rejection::Binding(payload) => {
                            frames.push((c.join_ref.clone(), c.topic.clone(), "system", payload));
                        }
                        Rejection::Refresh(message) => {
                            let topic = c.topic.clone();
                            self.fail_channel(&topic, &message);
                        }
                    }
                }
            }
            Delivery::Error(ids, message) => {
                for c in self.channels.values() {
                    if let Some(payload) = c.error_payload(ids, message) {
                        frames.push((c.join_ref.clone(), c.topic.clone(), "system", payload));
                    }
                }
            }
            Delivery::Interrupted => {
                for c in self.channels.values_mut() {
                    // Only v2 sockets are told. realtime-py (v1 only) takes
                    // any `system` error for a channel error and rejoins;
                    // the rejoin closes the channel for good (Phoenix pushes
                    // `phx_close` for the replaced join, and a v1 client
                    // cannot tell it from its own), which is worse than the
                    // gap it would be told about. Its state is reset all
                    // the same: the daemon's new answers decide.
                    if let Some(payload) = c.interrupt(INTERRUPTED_MESSAGE)
                        && self.vsn == Vsn::V2
                    {
                        frames.push((c.join_ref.clone(), c.topic.clone(), "system", payload));
                    }
                }
            }
            Delivery::Dropped(ids) => {
                for c in self.channels.values_mut() {
                    // Told to v2 sockets only, as for a lost bus.
                    if let Some(payload) = c.dropped(ids, INTERRUPTED_MESSAGE)
                        && self.vsn == Vsn::V2
                    {
                        frames.push((c.join_ref.clone(), c.topic.clone(), "system", payload));
                    }
                }
            }
            Delivery::Change(ids, event) => {
                for c in self.channels.values() {
                    let bindings = c.binding_ids(ids);
                    if !bindings.is_empty() {
                        let frame = event.frame(self.vsn, &c.topic, &bindings);
                        self.out.push_back(Message::Text(frame));
                    }
                }
            }
        }
        for (join_ref, topic, event, payload) in frames {
            self.push(&join_ref, &Value::Null, &topic, event, &payload);
        }
    }
}
