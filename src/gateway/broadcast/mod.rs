//! Broadcast: messages from a client (or `POST /api/broadcast`) to every
//! socket joined to the same topic, on any gateway, through the room's
//! Redis channel (`docs/bus.md`, "Rooms").
//!
//! What goes in, as Supabase takes it, and what goes on the bus:
//!
//! | from | bus message |
//! |---|---|
//! | a `broadcast` frame (vsn 1 object, vsn 2 array) | Phoenix broadcast: the payload object as sent |
//! | a kind 3 binary frame (realtime-js ≥ 2.91) | user broadcast: event, encoding, payload bytes |
//! | `POST /api/broadcast` | Phoenix broadcast `{"event","payload","type":"broadcast"}` |
//!
//! How each reaches a socket of each protocol version is [`event`]'s job.

pub mod binary;
pub mod event;
pub mod rest;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::bus::room::{self, BroadcastHeader, Encoding};

/// `config.broadcast` of a join.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `self`: the sender receives its own broadcasts too.
    pub echo: bool,
    /// `ack`: each broadcast is answered with a `phx_reply`.
    pub ack: bool,
    /// `replay`, as sent (`null` when absent): validated by the join.
    pub replay: Value,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default, rename = "self")]
    echo: Option<Value>,
    #[serde(default)]
    ack: Option<Value>,
    #[serde(default)]
    replay: Value,
}

impl Config {
    /// Reads `config.broadcast`; as on Supabase, a value that is not one
    /// of its booleans counts as `false` and does not fail the join.
    pub fn parse(raw: Option<&RawValue>) -> Config {
        let Some(Ok(raw)) = raw.map(|r| serde_json::from_str::<RawConfig>(r.get())) else {
            return Config::default();
        };
        Config {
            echo: raw.echo.as_ref().and_then(flexible_bool).unwrap_or(false),
            ack: raw.ack.as_ref().and_then(flexible_bool).unwrap_or(false),
            replay: raw.replay,
        }
    }
}

/// Supabase's `FlexibleBoolean`: `true`/`false`, or those words as
/// strings in any case; `None` for anything else.
pub fn flexible_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Why a client's broadcast was not sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Larger than `max_payload_size_in_kb`: answered (with `ack`) as
    /// Supabase answers, `{"status":"error","response":"payload_size_exceeded"}`.
    #[error("payload_size_exceeded")]
    TooLarge,
    /// Not a broadcast Supabase would forward.
    #[error("{0}")]
    Invalid(&'static str),
}

/// The bus message of a `broadcast` text frame: its payload object, as
/// sent (Supabase forwards any object, extra keys included). `from` is
/// the sending channel unless it asked for its own messages.
pub fn from_text(
    payload: &RawValue,
    from: Option<String>,
    max_bytes: usize,
) -> Result<Vec<u8>, Refused> {
    let text = payload.get();
    if !text.starts_with('{') {
        return Err(Refused::Invalid("a broadcast payload must be an object"));
    }
    if text.len() > max_bytes {
        return Err(Refused::TooLarge);
    }
    Ok(room::write_broadcast(
        &BroadcastHeader::phoenix(from),
        text.as_bytes(),
    ))
}

/// The bus message of a kind 3 push. Its metadata is dropped, as on
/// Supabase; a JSON payload must be JSON (a vsn 1 subscriber gets it
/// parsed into its frame).
pub fn from_push(
    push: &binary::Push<'_>,
    from: Option<String>,
    max_bytes: usize,
) -> Result<Vec<u8>, Refused> {
    if push.payload.len() + push.event.len() > max_bytes {
        return Err(Refused::TooLarge);
    }
    if push.encoding == Encoding::Json && !is_json(push.payload) {
        return Err(Refused::Invalid(
            "a broadcast with JSON encoding must carry JSON",
        ));
    }
    let header = BroadcastHeader::user(from, push.event.to_owned(), push.encoding);
    Ok(room::write_broadcast(&header, push.payload))
}

/// Whether `bytes` are JSON text: UTF-8 (serde skips the strings it
/// ignores unchecked) and JSON's grammar.
pub fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn config_takes_supabase_booleans_and_ignores_the_rest() {
        let parse = |text: &str| Config::parse(Some(&raw(text)));
        assert_eq!(
            parse(r#"{"self":true,"ack":"TRUE"}"#),
            Config {
                echo: true,
                ack: true,
                replay: serde_json::Value::Null,
            }
        );
        assert_eq!(parse(r#"{"self":"yes","ack":1}"#), Config::default());
        assert_eq!(parse("[]"), Config::default());
        assert_eq!(Config::parse(None), Config::default());
    }

    #[test]
    fn text_broadcasts_go_on_the_bus_verbatim_within_the_size() {
        let payload = raw(r#"{"type":"broadcast","event":"e","payload":{"é":[1]},"extra":1}"#);
        let message = from_text(&payload, Some("gw 1:1".into()), 1000).unwrap();
        let (header, body) = room::read(&message).unwrap();
        assert_eq!(body, payload.get().as_bytes());
        assert!(matches!(
            header,
            room::Header::Broadcast(BroadcastHeader { event: None, .. })
        ));
        assert_eq!(from_text(&payload, None, 10), Err(Refused::TooLarge));
        assert!(matches!(
            from_text(&raw("[1]"), None, 10),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn pushes_keep_their_bytes_and_json_must_be_json() {
        let push = |encoding, payload: &'static [u8]| binary::Push {
            join_ref: "1",
            reference: "2",
            topic: "realtime:r",
            event: "cursor",
            metadata: b"",
            encoding,
            payload,
        };
        let message = from_push(&push(Encoding::Binary, b"\x00\x01"), None, 100).unwrap();
        assert_eq!(room::read(&message).unwrap().1, b"\x00\x01");
        for not_json in [&b"{"[..], b"\"\xfc\""] {
            assert!(matches!(
                from_push(&push(Encoding::Json, not_json), None, 100),
                Err(Refused::Invalid(_))
            ));
        }
        assert_eq!(
            from_push(&push(Encoding::Json, b"[1,2,3]"), None, 8),
            Err(Refused::TooLarge)
        );
    }
}
