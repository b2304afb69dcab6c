//! Room messages: what gateways tell each other about one topic
//! (Broadcast and Presence), on the room's channel.
//!
//! A message is one line of JSON (the header), a newline, then the body:
//! a broadcast's payload bytes as the sender gave them (JSON text or
//! binary), never re-encoded; empty for a presence diff. Serialized JSON
//! never contains a raw newline, so the first one ends the header.
//!
//! ```text
//! {"v":1,"type":"broadcast","from":"gw-1 7:2","event":"cursor","encoding":"json"}\n{"x":1}
//! {"v":1,"type":"broadcast"}\n{"event":"cursor","payload":{"x":1},"type":"broadcast"}
//! {"v":1,"type":"presence","gateway":"gw-1","joins":[{"ref":"F…","key":"alice","meta":{"phx_ref":"F…","name":"alice"}}],"leaves":[]}\n
//! ```

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::VERSION;

/// How a broadcast's body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// JSON text.
    Json,
    /// Opaque bytes (sent only to vsn 2.0.0 sockets).
    Binary,
}

/// One presence as the room's hash stores it and diffs carry it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Presence {
    /// Its `phx_ref`, unique within the tenant.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The presence key (`config.presence.key`).
    pub key: String,
    /// The tracked map with `phx_ref` (and, after an update,
    /// `phx_ref_prev`) in it, as clients see it.
    pub meta: Box<RawValue>,
}

/// The header of a room message.
#[derive(Debug)]
pub enum Header {
    /// A broadcast.
    Broadcast(BroadcastHeader),
    /// Presences that joined and left the room, all of one gateway.
    Presence(PresenceHeader),
}

/// A broadcast's header. With `event`, a user broadcast (realtime-js's
/// binary push, REST's single message): the body is the user payload in
/// `encoding`. Without, a Phoenix broadcast: the body is the whole payload
/// object (`{"type":"broadcast","event":…,"payload":…}`).
#[derive(Debug, Serialize, Deserialize)]
pub struct BroadcastHeader {
    /// `"broadcast"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// [`VERSION`].
    pub v: u32,
    /// `"<gateway> <channel>"`: the sending channel, which does not
    /// receive it. Absent when the sender asked for its own messages
    /// (`config.broadcast.self`) or is not a channel (REST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The user event of a user broadcast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// How a user broadcast's body is encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// A user broadcast's metadata object (e.g. `{"id":…}`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Box<RawValue>>,
    /// On a gateway's channel (Broadcast from Database to a private
    /// topic): the private channels of that gateway that may read it, by
    /// their `PrivateChannel::id`. Empty on a room's channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// A replayed message (Broadcast Replay), for the channels in `ids`
    /// only: sent once, right after their join.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// Broadcast from Database, live: the row's database system
    /// identifier, as in change events, with [`Self::lsn`] and
    /// [`Self::seq`]: a gateway hands it on once when a daemon that took
    /// over sends it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sys: Option<String>,
    /// The commit LSN of the row's transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// The row's place in its transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
}

impl BroadcastHeader {
    /// A Phoenix broadcast's header (`from`: see the field).
    pub fn phoenix(from: Option<String>) -> BroadcastHeader {
        BroadcastHeader {
            kind: "broadcast".to_owned(),
            v: VERSION,
            from,
            event: None,
            encoding: None,
            meta: None,
            ids: Vec::new(),
            replayed: false,
            sys: None,
            lsn: None,
            seq: None,
        }
    }

    /// A user broadcast's header.
    pub fn user(from: Option<String>, event: String, encoding: Encoding) -> BroadcastHeader {
        BroadcastHeader {
            event: Some(event),
            encoding: Some(encoding),
            ..BroadcastHeader::phoenix(from)
        }
    }
}

/// A presence diff's header: one gateway's presences that joined and
/// left (an update is a join with `phx_ref_prev` plus the leave of the
/// meta it replaces).
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceHeader {
    /// `"presence"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// [`VERSION`].
    pub v: u32,
    /// The gateway whose sockets' presences these are.
    pub gateway: String,
    /// New presences.
    #[serde(default)]
    pub joins: Vec<Presence>,
    /// Presences gone.
    #[serde(default)]
    pub leaves: Vec<Presence>,
}

/// The fields every header has. (Read first: serde's tagged enums buffer
/// their content and cannot hold the raw JSON of metas.)
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    v: u32,
}

/// Why a room message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No newline: not a room message.
    #[error("room message without a header line")]
    NoHeader,
    /// The header is not one of the documented ones.
    #[error("room message header: {0}")]
    Header(#[from] serde_json::Error),
    /// Another bus version.
    #[error("room message of bus version {0} (this is {VERSION})")]
    Version(u32),
    /// An unknown type.
    #[error("room message of unknown type {0:?}")]
    Type(String),
}

/// Writes a broadcast: `header`, a newline, `body`.
pub fn write_broadcast(header: &BroadcastHeader, body: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// A presence diff's message (no body).
pub fn presence_diff(gateway: &str, joins: Vec<Presence>, leaves: Vec<Presence>) -> Vec<u8> {
    let header = PresenceHeader {
        kind: "presence".to_owned(),
        v: VERSION,
        gateway: gateway.to_owned(),
        joins,
        leaves,
    };
    let mut out = serde_json::to_vec(&header).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Reads a message into its header and body.
pub fn read(message: &[u8]) -> Result<(Header, &[u8]), Error> {
    let at = message
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Error::NoHeader)?;
    let (text, body) = (&message[..at], &message[at + 1..]);
    let tag: Tag<'_> = serde_json::from_slice(text)?;
    if tag.v != VERSION {
        return Err(Error::Version(tag.v));
    }
    let header = match &*tag.kind {
        "broadcast" => Header::Broadcast(serde_json::from_slice(text)?),
        "presence" => Header::Presence(serde_json::from_slice(text)?),
        other => return Err(Error::Type(other.chars().take(64).collect())),
    };
    Ok((header, body))
}

/// The hash field of a presence: `<gateway>|<ref>`. Gateway ids have no
/// `|` (the config allows `[A-Za-z0-9_.:-]`).
pub fn presence_field(gateway: &str, reference: &str) -> String {
    format!("{gateway}|{reference}")
}

/// The gateway of a presence field.
pub fn field_gateway(field: &str) -> &str {
    field.split_once('|').map_or(field, |(gateway, _)| gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_raw_bodies() {
        let header =
            BroadcastHeader::user(Some("gw 1:2".into()), "cursor".into(), Encoding::Binary);
        let body = [0u8, b'\n', 255];
        let message = write_broadcast(&header, &body);
        assert_eq!(
            message.split(|&b| b == b'\n').next().unwrap(),
            br#"{"type":"broadcast","v":1,"from":"gw 1:2","event":"cursor","encoding":"binary"}"#
        );
        let (read_header, read_body) = read(&message).unwrap();
        assert_eq!(read_body, body);
        assert!(matches!(
            read_header,
            Header::Broadcast(BroadcastHeader { from: Some(f), encoding: Some(Encoding::Binary), .. }) if f == "gw 1:2"
        ));
        let meta = RawValue::from_string(r#"{"phx_ref":"R","n":[1]}"#.to_owned()).unwrap();
        let p = Presence {
            reference: "R".into(),
            key: "k".into(),
            meta,
        };
        let diff = presence_diff("gw", vec![p], Vec::new());
        assert_eq!(
            std::str::from_utf8(&diff).unwrap(),
            "{\"type\":\"presence\",\"v\":1,\"gateway\":\"gw\",\"joins\":[{\"ref\":\"R\",\"key\":\"k\",\"meta\":{\"phx_ref\":\"R\",\"n\":[1]}}],\"leaves\":[]}\n"
        );
        match read(&diff).unwrap().0 {
            Header::Presence(p) => assert_eq!(p.joins[0].meta.get(), r#"{"phx_ref":"R","n":[1]}"#),
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"no newline"[..],
            b"{}\n",
            b"{\"type\":\"other\",\"v\":1}\nx",
            b"{\"type\":\"broadcast\",\"v\":2}\n",
        ] {
            assert!(read(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            field_gateway(&presence_field("h:4000:ab", "F1")),
            "h:4000:ab"
        );
    }
}
