//! A broadcast as each socket gets it, rendered once per protocol version
//! for every socket of the room on this gateway (Supabase's table, "What
//! subscribers receive"):
//!
//! | bus message | vsn 2.0.0 socket | vsn 1.0.0 socket |
//! |---|---|---|
//! | Phoenix broadcast | `[null,null,topic,"broadcast",payload]` | `{"event":"broadcast","payload":payload,"ref":null,"topic":topic}` |
//! | user broadcast, JSON | binary kind 4, encoding 1 | `{"event":"broadcast","payload":{"event":e,"payload":p,"type":"broadcast"},…}` |
//! | user broadcast, binary | binary kind 4, encoding 0 | nothing (Supabase drops it) |
//!
//! A topic, event or metadata over 255 bytes cannot be said in a kind 4
//! frame: such a JSON user broadcast goes to vsn 2.0.0 sockets as the
//! Phoenix broadcast realtime-js hands its callbacks the same way; a
//! binary one is dropped.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Message;
use serde_json::Value;

use super::binary;
use crate::bus::room::Encoding;
use crate::gateway::frame::Vsn;

/// A user broadcast's own fields.
#[derive(Debug, Clone)]
pub struct User {
    /// The user event.
    pub event: String,
    /// How the body is encoded.
    pub encoding: Encoding,
    /// Metadata JSON (empty when none).
    pub meta: Vec<u8>,
}

/// One broadcast for the sockets of one room.
#[derive(Debug)]
pub struct Broadcast {
    /// `realtime:<room>`.
    pub topic: Arc<str>,
    /// The channel (on this gateway) that sent it and does not get it.
    pub from: Option<Arc<str>>,
    /// `None`: a Phoenix broadcast, `body` is its payload object.
    pub user: Option<User>,
    /// The payload bytes.
    pub body: Vec<u8>,
    v1: OnceLock<Option<Message>>,
    v2: OnceLock<Option<Message>>,
}

impl Broadcast {
    /// A broadcast of `body` to `topic`'s sockets, except `from`'s.
    pub fn new(
        topic: Arc<str>,
        from: Option<Arc<str>>,
        user: Option<User>,
        body: Vec<u8>,
    ) -> Broadcast {
        Broadcast {
            topic,
            from,
            user,
            body,
            v1: OnceLock::new(),
            v2: OnceLock::new(),
        }
    }

    /// The frame for a socket of `vsn` (`None`: it gets nothing), rendered
    /// on first use and shared after.
    pub fn frame(&self, vsn: Vsn) -> Option<Message> {
        let cell = match vsn {
            Vsn::V1 => &self.v1,
            Vsn::V2 => &self.v2,
        };
        cell.get_or_init(|| self.render(vsn)).clone()
    }

    fn render(&self, vsn: Vsn) -> Option<Message> {
        let topic = Value::from(&*self.topic).to_string();
        let text = |payload: &str| match vsn {
            Vsn::V1 => {
                format!(r#"{{"event":"broadcast","payload":{payload},"ref":null,"topic":{topic}}}"#)
            }
            Vsn::V2 => format!(r#"[null,null,{topic},"broadcast",{payload}]"#),
        };
        let Some(user) = &self.user else {
            let body = std::str::from_utf8(&self.body).ok()?;
            return Some(Message::Text(text(body).into()));
        };
        if vsn == Vsn::V2
            && let Some(frame) = binary::encode(
                &self.topic,
                &user.event,
                &user.meta,
                user.encoding,
                &self.body,
            )
        {
            return Some(Message::Binary(frame.into()));
        }
        if user.encoding == Encoding::Binary {
            return None;
        }
        // As Supabase converts a user broadcast for JSON: its keys sorted.
        let body = std::str::from_utf8(&self.body).ok()?;
        let event = Value::from(user.event.as_str()).to_string();
        let meta = match std::str::from_utf8(&user.meta) {
            Ok(meta) if !meta.is_empty() => format!(r#","meta":{meta}"#),
            _ => String::new(),
        };
        let payload = format!(r#"{{"event":{event}{meta},"payload":{body},"type":"broadcast"}}"#);
        Some(Message::Text(text(&payload).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: Option<Message>) -> String {
        match message {
            Some(Message::Text(t)) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn phoenix_broadcasts_are_forwarded_verbatim() {
        let b = Broadcast::new(
            Arc::from("realtime:r"),
            None,
            None,
            br#"{"type":"broadcast","event":"e","payload":{"x":1}}"#.to_vec(),
        );
        assert_eq!(
            text(b.frame(Vsn::V2)),
            r#"[null,null,"realtime:r","broadcast",{"type":"broadcast","event":"e","payload":{"x":1}}]"#
        );
        assert_eq!(
            text(b.frame(Vsn::V1)),
            r#"{"event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"x":1}},"ref":null,"topic":"realtime:r"}"#
        );
    }

    #[test]
    fn user_broadcasts_are_binary_for_v2_and_json_or_nothing_for_v1() {
        let user = |encoding| User {
            event: "cursor".into(),
            encoding,
            meta: Vec::new(),
        };
        let json = Broadcast::new(
            Arc::from("realtime:r"),
            None,
            Some(user(Encoding::Json)),
            br#"{"x":1}"#.to_vec(),
        );
        let mut kind4 = vec![4u8, 10, 6, 0, 1];
        kind4.extend_from_slice(br#"realtime:rcursor{"x":1}"#);
        assert_eq!(json.frame(Vsn::V2), Some(Message::Binary(kind4.into())));
        assert_eq!(
            text(json.frame(Vsn::V1)),
            r#"{"event":"broadcast","payload":{"event":"cursor","payload":{"x":1},"type":"broadcast"},"ref":null,"topic":"realtime:r"}"#
        );
        let bytes = Broadcast::new(
            Arc::from("realtime:r"),
            None,
            Some(user(Encoding::Binary)),
            vec![0, 1],
        );
        assert!(matches!(bytes.frame(Vsn::V2), Some(Message::Binary(_))));
        assert_eq!(bytes.frame(Vsn::V1), None);
        let long = Broadcast::new(
            Arc::from(format!("realtime:{}", "r".repeat(300))),
            None,
            Some(user(Encoding::Json)),
            b"1".to_vec(),
        );
        assert!(
            text(long.frame(Vsn::V2))
                .ends_with(r#""broadcast",{"event":"cursor","payload":1,"type":"broadcast"}]"#)
        );
    }
}
