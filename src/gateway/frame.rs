//! Phoenix Channels frames: bytes ↔ values, no I/O.
//!
//! v1.0.0 frames are JSON objects (`topic`, `event`, `payload`, `ref`,
//! `join_ref`); the server sends exactly `event`, `payload`, `ref` and
//! `topic`, never `join_ref`. v2.0.0 frames are arrays
//! `[join_ref, ref, topic, event, payload]` both ways. Payloads stay raw
//! JSON text so bindings can be echoed byte for byte. Nothing here panics
//! on input.

use serde_json::Value;
use serde_json::value::RawValue;

use super::quiet::clip;

/// The protocol version a socket negotiated with `vsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `1.0.0`: JSON objects (the default when `vsn` is absent).
    V1,
    /// `2.0.0`: JSON arrays.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query parameter; `None` means absent (→ v1).
    pub fn parse(vsn: Option<&str>) -> Option<Vsn> {
        match vsn {
            None | Some("1.0.0") => Some(Vsn::V1),
            Some("2.0.0") => Some(Vsn::V2),
            Some(_) => None,
        }
    }
}

/// A frame from a client. Refs are kept as JSON values (normally strings,
/// `null` allowed) and echoed verbatim.
#[derive(Debug)]
pub struct Inbound {
    /// The join the frame belongs to (`null` when absent).
    pub join_ref: Value,
    /// The request's ref (`null` when absent).
    pub reference: Value,
    /// The topic, e.g. `realtime:room1` or `phoenix`.
    pub topic: String,
    /// The event, e.g. `phx_join`.
    pub event: String,
    /// The payload, as received (`null` when absent).
    pub payload: Box<RawValue>,
}

/// A frame that could not be read, with whatever could be read of it so
/// that an error can be answered to the right ref and topic.
#[derive(Debug, thiserror::Error)]
#[error("malformed frame: {reason}")]
pub struct Malformed {
    /// The request's ref, if one could be read.
    pub reference: Option<Value>,
    /// The join ref, if one could be read.
    pub join_ref: Option<Value>,
    /// The topic, if one could be read.
    pub topic: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl Malformed {
    fn new(reason: impl Into<String>) -> Malformed {
        Malformed {
            reference: None,
            join_ref: None,
            topic: None,
            reason: reason.into(),
        }
    }
}

/// Reads one text frame of version `vsn`.
pub fn decode(vsn: Vsn, text: &str) -> Result<Inbound, Malformed> {
    match vsn {
        Vsn::V1 => decode_object(text),
        Vsn::V2 => decode_array(text),
    }
}

fn decode_object(text: &str) -> Result<Inbound, Malformed> {
    let fields: std::collections::HashMap<&str, &RawValue> =
        serde_json::from_str(text).map_err(|e| {
            Malformed::new(format!(
                "expected a JSON object (vsn 1.0.0): {}",
                clip(&e.to_string())
            ))
        })?;
    let raw = |name: &str| fields.get(name).copied();
    let mut partial = Malformed::new("");
    partial.reference = raw("ref").and_then(|r| reference(r).ok());
    partial.join_ref = raw("join_ref").and_then(|r| reference(r).ok());
    partial.topic = raw("topic").and_then(|r| serde_json::from_str(r.get()).ok());
    assemble(
        partial,
        raw("join_ref"),
        raw("ref"),
        raw("topic"),
        raw("event"),
        raw("payload"),
    )
}

fn decode_array(text: &str) -> Result<Inbound, Malformed> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        Malformed::new(format!(
            "expected a JSON array [join_ref, ref, topic, event, payload] (vsn 2.0.0): {}",
            clip(&e.to_string())
        ))
    })?;
    let mut partial = Malformed::new("");
    partial.join_ref = items.first().and_then(|r| reference(r).ok());
    partial.reference = items.get(1).and_then(|r| reference(r).ok());
    partial.topic = items
        .get(2)
        .and_then(|r| serde_json::from_str(r.get()).ok());
    if items.len() != 5 {
        partial.reason = format!(
            "expected 5 elements [join_ref, ref, topic, event, payload], got {}",
            items.len()
        );
        return Err(partial);
    }
    assemble(
        partial,
        items.first().copied(),
        items.get(1).copied(),
        items.get(2).copied(),
        items.get(3).copied(),
        items.get(4).copied(),
    )
}

fn assemble(
    mut partial: Malformed,
    join_ref: Option<&RawValue>,
    request_ref: Option<&RawValue>,
    topic: Option<&RawValue>,
    event: Option<&RawValue>,
    payload: Option<&RawValue>,
) -> Result<Inbound, Malformed> {
    let mut fail = |reason: &str| {
        partial.reason = reason.to_owned();
        Err(std::mem::replace(&mut partial, Malformed::new("")))
    };
    let join_ref = match join_ref.map(reference).transpose() {
        Ok(r) => r.unwrap_or(Value::Null),
        Err(()) => return fail("join_ref must be a string, a number or null"),
    };
    let reference_value = match request_ref.map(reference).transpose() {
        Ok(r) => r.unwrap_or(Value::Null),
        Err(()) => return fail("ref must be a string, a number or null"),
    };
    let Some(Ok(topic)) = topic.map(|t| serde_json::from_str::<String>(t.get())) else {
        return fail("topic must be a string");
    };
    let Some(Ok(event)) = event.map(|e| serde_json::from_str::<String>(e.get())) else {
        return fail("event must be a string");
    };
    let payload = match payload {
        Some(p) => p.to_owned(),
        None => RawValue::NULL.to_owned(),
    };
    Ok(Inbound {
        join_ref,
        reference: reference_value,
        topic,
        event,
        payload,
    })
}

/// A ref: a string, a number or null.
fn reference(raw: &RawValue) -> Result<Value, ()> {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Ok(v),
        _ => Err(()),
    }
}

/// A frame to a client; `payload` is JSON text.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    /// v2 only: the join it belongs to (`null` for events and heartbeats).
    pub join_ref: &'a Value,
    /// The ref it answers (`null` for pushes).
    pub reference: &'a Value,
    /// The topic.
    pub topic: &'a str,
    /// The event.
    pub event: &'a str,
    /// The payload, already JSON.
    pub payload: &'a str,
}

/// Writes `frame` as version `vsn` text.
pub fn encode(vsn: Vsn, frame: Outbound<'_>) -> String {
    let topic = Value::from(frame.topic).to_string();
    let event = Value::from(frame.event).to_string();
    let reference = frame.reference.to_string();
    match vsn {
        Vsn::V1 => format!(
            "{{\"event\":{event},\"payload\":{},\"ref\":{reference},\"topic\":{topic}}}",
            frame.payload
        ),
        Vsn::V2 => format!(
            "[{},{reference},{topic},{event},{}]",
            frame.join_ref, frame.payload
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_objects_decode_and_refs_are_kept() {
        let f = decode(
            Vsn::V1,
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#,
        )
        .unwrap();
        assert_eq!(
            (f.topic.as_str(), f.event.as_str()),
            ("phoenix", "heartbeat")
        );
        assert_eq!((f.reference, f.join_ref), (json!("7"), Value::Null));
        assert_eq!(f.payload.get(), "{}");
    }

    #[test]
    fn v2_arrays_decode_with_raw_payloads() {
        let f = decode(
            Vsn::V2,
            r#"["6","6","realtime:room1","phx_join",{"config":{"postgres_changes":[{"event":"*","filter":"a=eq.\u00e9"}]}}]"#,
        )
        .unwrap();
        assert_eq!(f.join_ref, json!("6"));
        assert!(f.payload.get().contains(r#""a=eq.\u00e9""#));
    }

    #[test]
    fn server_frames_have_exactly_the_documented_shape() {
        let frame = Outbound {
            join_ref: &json!("6"),
            reference: &Value::Null,
            topic: "realtime:room1",
            event: "system",
            payload: r#"{"status":"ok"}"#,
        };
        assert_eq!(
            encode(Vsn::V1, frame),
            r#"{"event":"system","payload":{"status":"ok"},"ref":null,"topic":"realtime:room1"}"#
        );
        assert_eq!(
            encode(Vsn::V2, frame),
            r#"["6",null,"realtime:room1","system",{"status":"ok"}]"#
        );
    }

    #[test]
    fn malformed_frames_keep_what_could_be_read() {
        let e = decode(Vsn::V1, r#"{"topic":"realtime:a","ref":"3","payload":{}}"#).unwrap_err();
        assert_eq!(e.reference, Some(json!("3")));
        assert_eq!(e.topic.as_deref(), Some("realtime:a"));
        assert_eq!(e.to_string(), "malformed frame: event must be a string");
        let e = decode(Vsn::V2, r#"["1","2","t"]"#).unwrap_err();
        assert_eq!(e.reference, Some(json!("2")));
        for bad in [
            "",
            "nope",
            "[]",
            "{}",
            "[1,2,3,4,5]",
            r#"{"topic":1}"#,
            "null",
            "\"x\"",
        ] {
            assert!(decode(Vsn::V1, bad).is_err(), "{bad}");
            assert!(decode(Vsn::V2, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_truncated_prefix_is_an_error_not_a_panic() {
        let v1 = r#"{"topic":"realtime:r","event":"phx_join","payload":{"a":[1,"é"]},"ref":"1","join_ref":"1"}"#;
        let v2 = r#"["1","1","realtime:r","phx_join",{"a":[1,"é"]}]"#;
        for (vsn, text) in [(Vsn::V1, v1), (Vsn::V2, v2)] {
            assert!(decode(vsn, text).is_ok());
            for end in 0..text.len() {
                if let Some(prefix) = text.get(..end) {
                    assert!(decode(vsn, prefix).is_err(), "{prefix}");
                }
            }
        }
    }

    #[test]
    fn vsn_defaults_to_one() {
        assert_eq!(Vsn::parse(None), Some(Vsn::V1));
        assert_eq!(Vsn::parse(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::parse(Some("3.0.0")), None);
    }
}
