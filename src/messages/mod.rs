//! Broadcast from Database: rows inserted into `realtime.messages`
//! (by `realtime.send`, `realtime.send_binary`, `realtime.broadcast_changes`
//! or a plain INSERT) arrive on the daemon's own slot and leave as user
//! broadcasts on their topic's room, as Supabase Realtime sends them.
//!
//! Supabase streams the table over a temporary slot, so what is written
//! while it is away is lost; here the rows ride the daemon's durable slot
//! and its rule that nothing is acknowledged before Redis has it.
//!
//! | module | job |
//! |---|---|
//! | this one | which relation is the messages table; a row → [`Message`] |
//! | [`partitions`] | the daily partitions: created ahead, dropped past the retention |
//! | [`install`] | `sql/realtime.sql` installed by the daemon where its role may |

pub mod install;
pub mod partitions;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::bus::room::{self, BroadcastHeader, Encoding};

use crate::change::{Change, ChangeKind, Datum, Relation};

/// `sql/realtime.sql`: Supabase's `realtime` schema (messages, send,
/// broadcast_changes, topic, the messages publication) where it is
/// missing.
pub const INSTALL_SQL: &str = include_str!("../../sql/realtime.sql");

/// The schema of Supabase's messages table.
pub const SCHEMA: &str = "realtime";
/// The messages table (partitioned by day; its partitions are
/// `messages_YYYY_MM_DD`).
pub const TABLE: &str = "messages";
/// The publication Supabase Realtime streams the messages table with, which
/// the daemon streams beside its own (`sql/realtime.sql` creates it).
pub const PUBLICATION: &str = "supabase_realtime_messages_publication";

/// The largest payload sent, in bytes: Supabase's default
/// `max_payload_size_in_kb` (3000) as it measures it (× 1000 + 500). A
/// larger row is skipped, as Supabase skips it: whoever may insert into
/// the table must not be able to push unbounded frames to sockets.
pub const MAX_BODY_BYTES: usize = 3000 * 1000 + 500;

/// Whether `relation` is `realtime.messages` or one of its partitions (a
/// publication without `publish_via_partition_root`, like Supabase's,
/// sends each partition under its own name).
pub fn is_messages_table(relation: &Relation) -> bool {
    relation.schema == SCHEMA && is_messages_table_name(&relation.table)
}

/// Whether `name` (in schema `realtime`) is `messages` or may be one of its
/// partitions (`messages_…`).
pub fn is_messages_table_name(name: &str) -> bool {
    name == TABLE
        || name
            .strip_prefix(TABLE)
            .is_some_and(|rest| rest.starts_with('_'))
}

/// A broadcast written to the messages table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The row's `id` (a uuid), sent as `meta.id`.
    pub id: String,
    /// The topic (the channel's name without `realtime:`).
    pub topic: String,
    /// Its `inserted_at`, as the WAL carries it (timestamp text): with the
    /// id, the row's key.
    pub inserted_at: String,
    /// The user event.
    pub event: String,
    /// Whether only sockets authorized on the private channel get it.
    pub private: bool,
    /// The user payload.
    pub body: Body,
}

/// A message's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `payload` (jsonb), as JSON text; `null` when the row has none.
    Json(Bytes),
    /// `binary_payload` (bytea).
    Binary(Vec<u8>),
}

/// Why a row of the messages table is not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// A column the broadcast needs is NULL or missing (Supabase skips
    /// these rows too).
    #[error("realtime.messages row without {0}: not a broadcast")]
    Missing(&'static str),
    /// The payload is over [`MAX_BODY_BYTES`].
    #[error(
        "realtime.messages row {id}: payload of {bytes} bytes is over {MAX_BODY_BYTES}: not sent"
    )]
    TooLarge {
        /// The row's id.
        id: String,
        /// The payload's size.
        bytes: usize,
    },
    /// `binary_payload` is not bytea's text output.
    #[error("realtime.messages row {id}: binary_payload is not bytea text")]
    BadBytes {
        /// The row's id.
        id: String,
    },
}

/// The broadcast an INSERT into the messages table carries; `Ok(None)` for
/// any other change.
pub fn decode(change: &Change) -> Result<Option<Message>, Skip> {
    let ChangeKind::Insert { new } = &change.kind else {
        return Ok(None);
    };
    let relation = &change.relation;
    let column = |name: &str| -> Option<&Bytes> {
        let at = relation.columns.iter().position(|c| c.name == name)?;
        match new.get(at)? {
            Datum::Text(text) | Datum::Json(text) => Some(text),
            Datum::Null | Datum::UnchangedToast => None,
        }
    };
    let text = |name: &'static str| -> Result<String, Skip> {
        column(name)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or(Skip::Missing(name))
    };
    let id = text("id")?;
    let topic = text("topic")?;
    let event = text("event")?;
    let inserted_at = text("inserted_at")?;
    let private = match column("private").map(|b| &b[..]) {
        Some(b"t") => true,
        Some(b"f") => false,
        _ => return Err(Skip::Missing("private")),
    };
    let body = match column("binary_payload") {
        Some(bytes) => {
            Body::Binary(bytea_from_text(bytes).ok_or_else(|| Skip::BadBytes { id: id.clone() })?)
        }
        None => Body::Json(
            column("payload")
                .cloned()
                .unwrap_or_else(|| Bytes::from_static(b"null")),
        ),
    };
    let bytes = match &body {
        Body::Json(json) => json.len(),
        Body::Binary(bytes) => bytes.len(),
    };
    if bytes > MAX_BODY_BYTES {
        return Err(Skip::TooLarge { id, bytes });
    }
    Ok(Some(Message {
        id,
        topic,
        inserted_at,
        event,
        private,
        body,
    }))
}

/// How a message of the messages table reaches the bus.
#[derive(Debug, Clone, Copy)]
pub enum Sent<'a> {
    /// From the replication stream: the database's system identifier, the
    /// commit LSN of the row's transaction and its place in it.
    Streamed {
        /// `IDENTIFY_SYSTEM`'s system identifier.
        system: &'a str,
        /// The commit LSN.
        lsn: crate::lsn::Lsn,
        /// The place in the transaction.
        seq: u32,
    },
    /// Read back from the table for a Broadcast Replay.
    Replayed,
}

/// The room message of `message`: a user broadcast with `meta.id`, as
/// Supabase sends a row of the messages table (kind 4 with metadata to
/// vsn 2.0.0 sockets; JSON with `"meta":{"id":…}` to vsn 1.0.0 sockets,
/// which never get a binary payload).
///
/// `ids`: on a gateway's channel, the private channels it is for;
/// `sent`: streamed (where its row stands in the WAL) or replayed.
pub fn room_message(message: &Message, ids: Vec<String>, sent: Sent<'_>) -> Vec<u8> {
    let replayed = matches!(sent, Sent::Replayed);
    let (encoding, body) = match &message.body {
        Body::Json(json) => (Encoding::Json, &json[..]),
        Body::Binary(bytes) => (Encoding::Binary, &bytes[..]),
    };
    let mut header = BroadcastHeader::user(None, message.event.clone(), encoding);
    let meta = if replayed {
        serde_json::json!({ "id": message.id, "replayed": true })
    } else {
        serde_json::json!({ "id": message.id })
    };
    header.meta = RawValue::from_string(meta.to_string()).ok();
    header.ids = ids;
    header.replayed = replayed;
    if let Sent::Streamed { system, lsn, seq } = sent {
        header.sys = Some(system.to_owned());
        header.lsn = Some(lsn.to_string());
        header.seq = Some(seq);
    }
    room::write_broadcast(&header, body)
}

/// bytea's text output in either `bytea_output` format: `\x` and hex
/// digits, or the escape format (`\\`, `\ooo`, other bytes as they are).
fn bytea_from_text(text: &[u8]) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return None;
        }
        return hex
            .chunks_exact(2)
            .map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
            .collect();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&first, tail)) = rest.split_first() {
        if first != b'\\' {
            out.push(first);
            rest = tail;
        } else if let Some(tail) = tail.strip_prefix(b"\\") {
            out.push(b'\\');
            rest = tail;
        } else {
            let digits = tail.get(..3)?;
            let mut byte: u16 = 0;
            for &d in digits {
                if !(b'0'..=b'7').contains(&d) {
                    return None;
                }
                byte = byte * 8 + u16::from(d - b'0');
            }
            out.push(u8::try_from(byte).ok()?);
            rest = &tail[3..];
        }
    }
    Some(out)
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytea_text_in_both_formats() {
        assert_eq!(bytea_from_text(b"\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(bytea_from_text(b"\\x"), Some(vec![]));
        assert_eq!(bytea_from_text(b"\\x0"), None);
        assert_eq!(bytea_from_text(b"\\xzz"), None);
        assert_eq!(
            bytea_from_text(b"ab\\\\c\\000\\377"),
            Some(b"ab\\c\x00\xff".to_vec())
        );
        assert_eq!(bytea_from_text(b"\\400"), None);
        assert_eq!(bytea_from_text(b"\\12"), None);
    }
}
