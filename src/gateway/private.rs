//! Private channels (`config.private: true`) on the gateway: a join waits
//! for the daemon to say what the JWT may read of the topic (RLS on
//! `realtime.messages`, `crate::channels`); the first broadcast and the
//! first track wait for whether it may write, and later ones use that
//! answer until the channel's token changes. The gateway itself never
//! talks to Postgres.
//!
//! ```text
//! phx_join private ──register (bus)──▶ daemon: read probe ──access──▶ reply ok, or Unauthorized
//! broadcast / track ──authorize (bus)─▶ daemon: write probe ──write──▶ send, or drop silently
//! ```

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::auth::Verified;
use super::broadcast::Refused;
use super::bus::{Delivery, SocketHandle};
use super::channel::Channel;
use super::frame::Inbound;
use crate::bus::WriteCheck;

/// How long a private join waits for the daemon's answer before it is
/// refused as Supabase refuses a join it cannot authorize.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a write waits for its answer before the writes waiting are
/// dropped (and asked again at the next).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Writes that wait for one answer at most; later ones are dropped
/// (Supabase handles a channel's messages one at a time, waiting).
pub const MAX_WAITING: usize = 32;
/// Bytes of writes that wait for one answer at most (one largest
/// broadcast and then some): later ones are dropped.
pub const MAX_WAITING_BYTES: usize = 4 << 20;
/// Supabase's reason when the database could not be asked.
pub const UNREACHABLE: &str = "Realtime was unable to connect to the project database";

/// The join error when the policies do not let the JWT read the topic.
pub fn unauthorized(name: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {name}")
}

/// The `system` error when a new token cannot read what the old one could.
pub fn no_longer(name: &str) -> String {
    format!("You no longer have permission to read from this Channel topic: {name}")
}

/// The `system` error when a new token cannot read the topic at all.
pub fn no_permission(name: &str) -> String {
    format!("You do not have permissions to read from this Channel topic: {name}")
}

/// How long a REST broadcast to a private topic waits for its answer.
pub const REST_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the daemon, for a request that is not a socket (REST), whether
/// `verified` may write `extension` to `topic`: `Ok(allowed)`, or why it
/// could not be decided.
pub async fn may_write(
    ctx: &Context,
    verified: &Verified,
    topic: &str,
    extension: &str,
) -> Result<bool, String> {
    let id = ctx.sockets.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut answers) = mpsc::channel(1);
    let handle = SocketHandle::new(id, tx, CancellationToken::new());
    let check = WriteCheck {
        id: format!("rest{id}:w"),
        topic: topic.to_owned(),
        extension: extension.to_owned(),
        role: verified.role.clone(),
        claims: verified.claims.clone(),
    };
    let check_id = check.id.clone();
    // A check costs the database a probe: it counts against the events
    // rate like the message it is for, sent or not.
    ctx.events.add(1);
    ctx.bus.authorize(&handle, check);
    let answer = tokio::time::timeout(REST_TIMEOUT, async {
        while let Some(delivery) = answers.recv().await {
            if let Delivery::Write(_, allowed, reason) = delivery {
                return allowed.ok_or_else(|| reason.unwrap_or_else(|| UNREACHABLE.to_owned()));
            }
        }
        Err(UNREACHABLE.to_owned())
    })
    .await;
    match answer {
        Ok(answer) => answer,
        Err(_) => {
            ctx.bus.forget_check(&check_id);
            Err(UNREACHABLE.to_owned())
        }
    }
}

/// What a private channel may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Broadcasts.
    pub broadcast: bool,
    /// Presence, when enabled at join.
    pub presence: Option<bool>,
}

impl Read {
    /// What the daemon's answer grants; `None` when it could not say.
    pub fn of(access: &crate::bus::Access) -> Option<Read> {
        match access {
            crate::bus::Access::Read {
                broadcast,
                presence,
            } => Some(Read {
                broadcast: *broadcast,
                presence: *presence,
            }),
            crate::bus::Access::Failed(_) => None,
        }
    }

    /// Whether the channel may stay: it reads something.
    pub fn any(&self) -> bool {
        self.broadcast || self.presence == Some(true)
    }

    /// Whether `self` (new) lost a read `before` had.
    pub fn lost(&self, before: &Read) -> bool {
        (before.broadcast && !self.broadcast)
            || (before.presence == Some(true) && self.presence != Some(true))
    }
}

/// A private join waiting for the daemon.
#[derive(Debug)]
pub struct PendingJoin {
    /// The channel, registered on the bus, not yet in the session.
    pub channel: Channel,
    /// The join's reply, sent once access is granted.
    pub reply: String,
    /// The join's ref.
    pub reference: Value,
    /// When it was asked.
    pub since: Instant,
}

/// A write that waits for its permission.
#[derive(Debug)]
pub enum Waiting {
    /// A broadcast, its bus message made.
    Broadcast {
        /// The frame's join ref.
        join_ref: Value,
        /// The frame's ref.
        reference: Value,
        /// The bus message, or why there is none.
        message: Result<Vec<u8>, Refused>,
    },
    /// A presence frame.
    Presence(Inbound),
}

/// Whether a channel may write one extension.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Not known: the next write asks.
    #[default]
    Unknown,
    /// Asked, under this check id, at this instant.
    Asked(String, Instant),
    /// Allowed.
    Allowed,
    /// Denied.
    Denied,
}

/// What to do with a write.
#[derive(Debug)]
pub enum Admit {
    /// Send it.
    Go(Waiting),
    /// Refuse it (denied, or too many wait).
    Refuse(Waiting),
    /// It waits; ask the daemon (the first write while unknown).
    Ask,
    /// It waits; the daemon was asked.
    Wait,
}

/// One extension's permission and the writes waiting for it.
#[derive(Debug, Default)]
pub struct Write {
    /// What is known.
    pub permission: Permission,
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
}

impl Waiting {
    /// The bytes it holds.
    fn bytes(&self) -> usize {
        match self {
            Waiting::Broadcast { message, .. } => message.as_ref().map_or(0, Vec::len),
            Waiting::Presence(f) => f.payload.get().len(),
        }
    }
}

impl Write {
    /// What to do with `write` now.
    pub fn admit(&mut self, write: Waiting) -> Admit {
        let bytes = write.bytes();
        let full = self.waiting.len() >= MAX_WAITING
            || self.waiting_bytes.saturating_add(bytes) > MAX_WAITING_BYTES;
        match self.permission {
            Permission::Allowed => Admit::Go(write),
            Permission::Denied => Admit::Refuse(write),
            Permission::Unknown | Permission::Asked(..) if full => Admit::Refuse(write),
            Permission::Unknown => {
                self.waiting_bytes += bytes;
                self.waiting.push_back(write);
                Admit::Ask
            }
            Permission::Asked(..) => {
                self.waiting_bytes += bytes;
                self.waiting.push_back(write);
                Admit::Wait
            }
        }
    }

    /// Records that check `id` was sent.
    pub fn asked(&mut self, id: String, now: Instant) {
        self.permission = Permission::Asked(id, now);
    }

    /// Whether check `id` is the one this waits for.
    pub fn waits_for(&self, id: &str) -> bool {
        matches!(&self.permission, Permission::Asked(asked, _) if asked == id)
    }

    /// The answer came (`None`: it could not be decided, asked again at
    /// the next write): the writes that waited, to send when allowed and
    /// refuse otherwise.
    pub fn answer(&mut self, allowed: Option<bool>) -> (bool, Vec<Waiting>) {
        self.permission = match allowed {
            Some(true) => Permission::Allowed,
            Some(false) => Permission::Denied,
            None => Permission::Unknown,
        };
        self.waiting_bytes = 0;
        (allowed == Some(true), self.waiting.drain(..).collect())
    }

    /// The check was asked before `deadline`: it is given up on.
    pub fn overdue(&self, deadline: Instant) -> Option<String> {
        match &self.permission {
            Permission::Asked(id, since) if *since < deadline => Some(id.clone()),
            _ => None,
        }
    }

    /// A new token: what was known no longer holds.
    pub fn reset(&mut self) -> Vec<Waiting> {
        self.answer(None).1
    }
}

/// A private channel's write permissions.
#[derive(Debug, Default)]
pub struct Writes {
    /// Broadcasts.
    pub broadcast: Write,
    /// Presence (track).
    pub presence: Write,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broadcast() -> Waiting {
        Waiting::Broadcast {
            join_ref: Value::Null,
            reference: Value::Null,
            message: Ok(Vec::new()),
        }
    }

    #[test]
    fn the_first_write_asks_the_rest_wait_and_the_answer_releases_them() {
        let mut write = Write::default();
        assert!(matches!(write.admit(broadcast()), Admit::Ask));
        write.asked("c:w1".into(), Instant::now());
        assert!(matches!(write.admit(broadcast()), Admit::Wait));
        assert!(write.waits_for("c:w1"));
        assert!(!write.waits_for("c:w2"));
        let (allowed, waiting) = write.answer(Some(true));
        assert!(allowed);
        assert_eq!(waiting.len(), 2);
        assert!(matches!(write.admit(broadcast()), Admit::Go(_)));
        write.answer(Some(false));
        assert!(matches!(write.admit(broadcast()), Admit::Refuse(_)));
        // Undecided: asked again at the next write.
        write.answer(None);
        assert!(matches!(write.admit(broadcast()), Admit::Ask));
    }

    #[test]
    fn at_most_max_waiting_writes_wait() {
        let mut write = Write::default();
        for _ in 0..MAX_WAITING {
            assert!(!matches!(write.admit(broadcast()), Admit::Refuse(_)));
        }
        assert!(matches!(write.admit(broadcast()), Admit::Refuse(_)));
        assert_eq!(write.answer(Some(true)).1.len(), MAX_WAITING);
    }

    #[test]
    fn waiting_writes_are_bounded_in_bytes_too() {
        let mut write = Write::default();
        let big = || Waiting::Broadcast {
            join_ref: Value::Null,
            reference: Value::Null,
            message: Ok(vec![0; 3 << 20]),
        };
        assert!(matches!(write.admit(big()), Admit::Ask));
        write.asked("c:w1".into(), Instant::now());
        assert!(matches!(write.admit(big()), Admit::Refuse(_)));
        assert!(matches!(write.admit(broadcast()), Admit::Wait));
        let (_, waiting) = write.answer(Some(true));
        assert_eq!(waiting.len(), 2);
    }

    #[test]
    fn a_read_lost_is_told_apart_from_none_left() {
        let both = Read {
            broadcast: true,
            presence: Some(true),
        };
        let presence_only = Read {
            broadcast: false,
            presence: Some(true),
        };
        assert!(presence_only.lost(&both));
        assert!(presence_only.any());
        assert!(!both.lost(&presence_only));
        assert_eq!(
            unauthorized("room:1"),
            "Unauthorized: You do not have permissions to read from this Channel topic: room:1"
        );
    }
}
