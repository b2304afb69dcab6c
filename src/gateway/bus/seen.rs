//! Exactly once across daemon takeovers.
//!
//! A daemon that takes over the slot (the hot standby), or one that
//! restarts, streams again from the position Postgres last confirmed: the
//! events the previous one sent after that come a second time. Every
//! event from the daemon says where it stands in the database's stream:
//! the system identifier, the commit LSN of its transaction and its place
//! in it. One daemon publishes them in that order, so each subscription
//! remembers the last position it was handed and anything at or before it
//! was delivered already. A subscription gets at most one message per
//! change (its event or its error), which makes the mark per subscription
//! exact where a mark per socket or per gateway is not (one change can
//! bring a socket an event on one channel and an error on another).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::lsn::Lsn;

use super::{Id, Route};

/// Where an event stands in a database's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The database's system identifier and timeline (`sys`,
    /// `<id>.<timeline>`): other positions are not comparable. Another
    /// database's LSNs are unrelated; a promoted standby or a restored
    /// backup keeps the identifier but starts a timeline whose LSNs may
    /// be below what the old one reached.
    system: u64,
    timeline: u32,
    lsn: Lsn,
    seq: u32,
}

impl Position {
    /// The position of an event's `sys`, `lsn` and `seq`; `None` (no
    /// deduplication) when one is missing or malformed, as from a daemon
    /// older than this field.
    pub fn parse(system: Option<&str>, lsn: Option<&str>, seq: Option<u32>) -> Option<Position> {
        let (system, timeline) = system?.split_once('.')?;
        Some(Position {
            system: system.parse().ok()?,
            timeline: timeline.parse().ok()?,
            lsn: lsn?.parse().ok()?,
            seq: seq?,
        })
    }

    /// Whether `self` comes at or before `other` in one database's stream.
    pub fn not_after(&self, other: &Position) -> bool {
        (self.system, self.timeline) == (other.system, other.timeline)
            && (self.lsn, self.seq) <= (other.lsn, other.seq)
    }
}

/// The last position a subscription was handed. Shared by the ids of one
/// subscription across its channel's token refreshes, which rename it.
#[derive(Debug, Clone, Default)]
pub struct Mark(Arc<Mutex<Option<Position>>>);

impl Mark {
    fn get(&self) -> Option<Position> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, position: Position) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(position);
    }
}

/// The id a refreshed channel's subscription had before its last rename
/// (`<join>:<index>.<generation>`, generation 0 without the suffix), or
/// `None` for an id never renamed.
pub fn previous_generation(id: &str) -> Option<String> {
    let (base, generation) = id.rsplit_once('.')?;
    let generation: u32 = generation.parse().ok()?;
    match generation {
        0 => None,
        1 => Some(base.to_owned()),
        g => Some(format!("{base}.{}", g - 1)),
    }
}

/// The mark a route registered under `id` continues: its own when it is
/// registered again, its previous generation's when renamed, else a new one.
pub fn mark_for(routes: &HashMap<String, Route>, id: &str) -> Mark {
    routes
        .get(id)
        .or_else(|| previous_generation(id).and_then(|previous| routes.get(&previous)))
        .map(|route| route.mark.clone())
        .unwrap_or_default()
}

/// Keeps the ids not yet handed the event at `position` and marks them
/// handed it; returns how many were dropped as already delivered. Every id
/// is judged against the marks as they were before this event, so two ids
/// of one subscription (old and new name, while a refresh retires the
/// old) are both kept: the socket sends the frame once.
pub fn first_time<'a>(
    routes: &HashMap<String, Route>,
    ids: Vec<Id<'a>>,
    position: Option<Position>,
) -> (Vec<Id<'a>>, u64) {
    let Some(position) = position else {
        return (ids, 0);
    };
    let mut dropped = 0;
    let kept: Vec<Id<'a>> = ids
        .into_iter()
        .filter(|id| match routes.get(&*id.0) {
            Some(route) if route.mark.get().is_some_and(|m| position.not_after(&m)) => {
                dropped += 1;
                false
            }
            Some(_) => true,
            // Left meanwhile: not a duplicate, and nobody to hand it to.
            None => false,
        })
        .collect();
    for id in &kept {
        if let Some(route) = routes.get(&*id.0) {
            route.mark.set(position);
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(system: u64, lsn: u64, seq: u32) -> Position {
        Position {
            system,
            timeline: 1,
            lsn: Lsn(lsn),
            seq,
        }
    }

    #[test]
    fn positions_read_from_an_event() {
        assert_eq!(
            Position::parse(Some("7450.1"), Some("1/10"), Some(3)),
            Some(at(7450, 0x1_0000_0010, 3))
        );
        assert_eq!(Position::parse(None, Some("1/10"), Some(3)), None);
        assert_eq!(Position::parse(Some("7450"), Some("1/10"), Some(3)), None);
        assert_eq!(Position::parse(Some("x.1"), Some("1/10"), Some(3)), None);
        assert_eq!(Position::parse(Some("1.1"), Some("nope"), Some(3)), None);
        assert_eq!(Position::parse(Some("1.1"), Some("1/10"), None), None);
    }

    #[test]
    fn order_is_by_lsn_then_seq_within_one_database() {
        assert!(at(1, 5, 2).not_after(&at(1, 5, 2)));
        assert!(at(1, 5, 1).not_after(&at(1, 5, 2)));
        assert!(at(1, 4, 9).not_after(&at(1, 5, 0)));
        assert!(!at(1, 5, 3).not_after(&at(1, 5, 2)));
        assert!(!at(1, 6, 0).not_after(&at(1, 5, 9)));
        // Another database, or the same on another timeline (promoted,
        // restored): never a duplicate, however low.
        assert!(!at(2, 1, 0).not_after(&at(1, 5, 9)));
        let next_timeline = Position {
            timeline: 2,
            ..at(1, 1, 0)
        };
        assert!(!next_timeline.not_after(&at(1, 5, 9)));
    }

    #[test]
    fn a_renamed_id_names_its_previous_generation() {
        assert_eq!(previous_generation("j1:0"), None);
        assert_eq!(previous_generation("j1:0.1").as_deref(), Some("j1:0"));
        assert_eq!(previous_generation("j1:0.7").as_deref(), Some("j1:0.6"));
        assert_eq!(previous_generation("j1:p.2").as_deref(), Some("j1:p.1"));
        assert_eq!(previous_generation("j1:0.x"), None);
    }
}
