//! Presence: who is in a room, as Phoenix.Presence shows it to Supabase's
//! clients, across gateways through Redis (`docs/bus.md`, "Rooms").
//!
//! Each gateway is the authority for its own sockets' presences: it
//! writes them to the room's hash (`<gateway>|<phx_ref>` → presence) and
//! announces each change as a diff on the room's channel. Every gateway
//! with sockets in the room keeps the room's [`state::State`] from the
//! hash and the diffs, sends `presence_state` from it to a socket that
//! joins, and passes each diff on to its sockets (the tracker's included).
//! A socket's presences leave when its channel does; a gateway whose
//! lease expired (it died) has its presences removed, and their leaves
//! told, by every other gateway at its next lease check.
//!
//! This module holds what one channel decides by itself: its
//! `config.presence`, what a `presence` frame asks, the per-channel call
//! window, and fresh `phx_ref`s.

pub mod state;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use axum::extract::ws::Message;

use super::broadcast::flexible_bool;
use super::frame::{self, Outbound, Vsn};

/// A `presence_diff` for the sockets of one room, rendered once per
/// protocol version. Sent as Supabase's fastlane sends it: no join_ref.
#[derive(Debug)]
pub struct Diff {
    /// `realtime:<room>`.
    pub topic: Arc<str>,
    /// `{"joins":…,"leaves":…}`.
    pub payload: String,
    v1: OnceLock<Message>,
    v2: OnceLock<Message>,
}

impl Diff {
    /// The diff `payload` for `topic`'s sockets.
    pub fn new(topic: Arc<str>, payload: String) -> Diff {
        Diff {
            topic,
            payload,
            v1: OnceLock::new(),
            v2: OnceLock::new(),
        }
    }

    /// The frame for a socket of `vsn`.
    pub fn frame(&self, vsn: Vsn) -> Message {
        let cell = match vsn {
            Vsn::V1 => &self.v1,
            Vsn::V2 => &self.v2,
        };
        cell.get_or_init(|| {
            let text = frame::encode(
                vsn,
                Outbound {
                    join_ref: &Value::Null,
                    reference: &Value::Null,
                    topic: &self.topic,
                    event: "presence_diff",
                    payload: &self.payload,
                },
            );
            Message::Text(text.into())
        })
        .clone()
    }
}

/// `config.presence` of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `enabled`: `presence_state` follows the join.
    pub enabled: bool,
    /// `key`: the key this channel's presence is listed under.
    pub key: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    enabled: Option<Value>,
    #[serde(default)]
    key: Option<Value>,
}

impl Config {
    /// Reads `config.presence`. An empty or absent key becomes a fresh
    /// UUID, as Supabase makes one per join; a key that is not a string
    /// is listed as its JSON text.
    pub fn parse(raw: Option<&RawValue>) -> Config {
        let parsed = raw.and_then(|r| serde_json::from_str::<RawConfig>(r.get()).ok());
        let enabled = parsed
            .as_ref()
            .and_then(|c| c.enabled.as_ref())
            .and_then(flexible_bool)
            .unwrap_or(false);
        let key = match parsed.and_then(|c| c.key) {
            None | Some(Value::Null) => new_key(),
            Some(Value::String(s)) if s.is_empty() => new_key(),
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
        };
        Config { enabled, key }
    }
}

/// A random UUID (version 4 form) for a join without a presence key.
fn new_key() -> String {
    let state = RandomState::new();
    let a = state.hash_one(1u8);
    let b = state.hash_one(2u8);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&b.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// What a `presence` frame asks.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// No `event`: answered ok, nothing done (as Supabase does).
    Nothing,
    /// `track` with this map (`{}` when the payload has none).
    Track(Map<String, Value>),
    /// `track` whose `payload` is not a map.
    NotAMap,
    /// `untrack`.
    Untrack,
    /// Another event: answered `{"status":"error","response":{}}`.
    Unknown,
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    event: Option<Value>,
    #[serde(default)]
    payload: Option<Value>,
}

/// Reads a `presence` frame's payload (`{"type":"presence","event":"track","payload":{…}}`;
/// realtime-py sends no `type`). The event is case-insensitive.
pub fn request(payload: &RawValue) -> Request {
    if !payload.get().starts_with('{') {
        return Request::Unknown;
    }
    let Ok(raw) = serde_json::from_str::<RawRequest>(payload.get()) else {
        return Request::Unknown;
    };
    let event = match raw.event {
        None | Some(Value::Null) => return Request::Nothing,
        Some(Value::String(event)) => event.to_ascii_lowercase(),
        Some(_) => return Request::Unknown,
    };
    match event.as_str() {
        "track" => match raw.payload {
            None | Some(Value::Null) => Request::Track(Map::new()),
            Some(Value::Object(meta)) => Request::Track(meta),
            Some(_) => Request::NotAMap,
        },
        "untrack" => Request::Untrack,
        _ => Request::Unknown,
    }
}

/// Supabase's per-channel presence call limit: `max` calls (track or
/// untrack) in a fixed window that starts at the first call.
#[derive(Debug)]
pub struct Window {
    max: u32,
    length: Duration,
    started: Option<Instant>,
    calls: u32,
}

impl Window {
    /// `max` calls per `length`.
    pub fn new(max: u32, length: Duration) -> Window {
        Window {
            max,
            length,
            started: None,
            calls: 0,
        }
    }

    /// Counts a call at `now`; false when it is one too many.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.started {
            Some(start) if now.saturating_duration_since(start) < self.length => {}
            _ => {
                self.started = Some(now);
                self.calls = 0;
            }
        }
        self.calls += 1;
        self.calls <= self.max
    }
}

/// Makes `phx_ref`s as Phoenix.Tracker does: 12 bytes (the time in
/// nanoseconds, then a counter that starts at random), URL-safe base64,
/// 16 characters, unique per track and update.
#[derive(Debug)]
pub struct References {
    counter: AtomicU32,
}

impl Default for References {
    fn default() -> References {
        References {
            counter: AtomicU32::new(RandomState::new().hash_one(0u8) as u32),
        }
    }
}

impl References {
    /// A fresh `phx_ref`.
    pub fn next(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&nanos.to_be_bytes());
        bytes[8..].copy_from_slice(&count.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn config_keys_are_kept_or_made() {
        let c = Config::parse(Some(&raw(r#"{"enabled":"True","key":"alice"}"#)));
        assert_eq!(
            c,
            Config {
                enabled: true,
                key: "alice".into()
            }
        );
        assert_eq!(Config::parse(Some(&raw(r#"{"key":7}"#))).key, "7");
        let (a, b) = (
            Config::parse(None),
            Config::parse(Some(&raw(r#"{"key":""}"#))),
        );
        assert!(!a.enabled);
        assert_eq!((a.key.len(), &a.key[14..15]), (36, "4"));
        assert_ne!(a.key, b.key);
    }

    #[test]
    fn requests_are_read_as_supabase_reads_them() {
        let meta: Map<String, Value> = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(
            request(&raw(
                r#"{"type":"presence","event":"TRACK","payload":{"name":"a"}}"#
            )),
            Request::Track(meta)
        );
        assert_eq!(
            request(&raw(r#"{"event":"track"}"#)),
            Request::Track(Map::new())
        );
        assert_eq!(
            request(&raw(r#"{"event":"track","payload":[1]}"#)),
            Request::NotAMap
        );
        assert_eq!(request(&raw(r#"{"event":"untrack"}"#)), Request::Untrack);
        assert_eq!(request(&raw(r#"{"type":"presence"}"#)), Request::Nothing);
        assert_eq!(request(&raw(r#"{"event":"dance"}"#)), Request::Unknown);
        assert_eq!(request(&raw("[]")), Request::Unknown);
    }

    #[test]
    fn the_window_allows_max_calls_per_length() {
        let mut w = Window::new(2, Duration::from_secs(30));
        let t = Instant::now();
        assert!(w.allow(t) && w.allow(t));
        assert!(!w.allow(t + Duration::from_secs(29)));
        assert!(w.allow(t + Duration::from_secs(30)));
    }

    #[test]
    fn references_are_distinct_and_sixteen_url_safe_characters() {
        let refs = References::default();
        let (a, b) = (refs.next(), refs.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
