//! One change, rendered once per way it is shown.
//!
//! A change reaches every socket subscribed to its table, and sockets on the
//! same channel with the same bindings show it as the same frame: same
//! topic, same binding ids, same data, same protocol version. With 10,000
//! sockets on one channel, formatting the ~800-byte frame per socket was
//! half of the gateway's CPU per frame. [`ChangeEvent`] formats each
//! distinct frame once; every socket that needs it gets a reference-counted
//! copy of the same bytes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;

use super::frame::{self, Outbound, Vsn};

/// The client event of every change frame.
const EVENT: &str = "postgres_changes";

/// One change as the daemon sent it, with the frames rendered from it so
/// far.
#[derive(Debug)]
pub struct ChangeEvent {
    /// The change's `data`, JSON text.
    data: Box<str>,
    /// Rendered frames by a hash of (version, topic, binding ids); equal
    /// hashes are told apart by comparing the parts.
    rendered: Mutex<HashMap<u64, Vec<Rendered>>>,
    hasher: RandomState,
}

#[derive(Debug)]
struct Rendered {
    vsn: Vsn,
    topic: Box<str>,
    ids: Box<[u32]>,
    frame: Utf8Bytes,
}

impl ChangeEvent {
    /// A change whose `data` is `data` (JSON text), nothing rendered yet.
    pub fn new(data: &str) -> ChangeEvent {
        ChangeEvent {
            data: data.into(),
            rendered: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }

    /// The change's `data`, JSON text.
    pub fn data(&self) -> &str {
        &self.data
    }

    /// The `postgres_changes` frame for a channel `topic` whose bindings
    /// `ids` (the client's integer ids) see this change, in `vsn`.
    pub fn frame(&self, vsn: Vsn, topic: &str, ids: &[u32]) -> Utf8Bytes {
        let key = self.key(vsn, topic, ids);
        let mut rendered = self.lock();
        let same = rendered.entry(key).or_default();
        if let Some(found) = same
            .iter()
            .find(|r| r.vsn == vsn && &*r.topic == topic && &*r.ids == ids)
        {
            return found.frame.clone();
        }
        let frame = Utf8Bytes::from(render(vsn, topic, ids, &self.data));
        same.push(Rendered {
            vsn,
            topic: topic.into(),
            ids: ids.into(),
            frame: frame.clone(),
        });
        frame
    }

    fn key(&self, vsn: Vsn, topic: &str, ids: &[u32]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        vsn.hash(&mut hasher);
        topic.hash(&mut hasher);
        ids.hash(&mut hasher);
        hasher.finish()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Vec<Rendered>>> {
        // A panic elsewhere while holding it leaves only complete entries.
        self.rendered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `{"ids":[…],"data":…}` in a `postgres_changes` frame (ref and join_ref
/// null).
fn render(vsn: Vsn, topic: &str, ids: &[u32], data: &str) -> String {
    let mut payload = String::with_capacity(data.len() + 16 + ids.len() * 11);
    payload.push_str(r#"{"ids":["#);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            payload.push(',');
        }
        payload.push_str(&id.to_string());
    }
    payload.push_str(r#"],"data":"#);
    payload.push_str(data);
    payload.push('}');
    frame::encode(
        vsn,
        Outbound {
            join_ref: &Value::Null,
            reference: &Value::Null,
            topic,
            event: EVENT,
            payload: &payload,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_distinct_frame_is_rendered_once_and_shared() {
        let event = ChangeEvent::new(r#"{"type":"INSERT"}"#);
        let a = event.frame(Vsn::V2, "realtime:room1", &[7, 9]);
        assert_eq!(
            a.as_str(),
            r#"[null,null,"realtime:room1","postgres_changes",{"ids":[7,9],"data":{"type":"INSERT"}}]"#
        );
        let again = event.frame(Vsn::V2, "realtime:room1", &[7, 9]);
        assert_eq!(again.as_str().as_ptr(), a.as_str().as_ptr(), "shared");
        assert_eq!(
            event.frame(Vsn::V1, "realtime:room1", &[7, 9]).as_str(),
            r#"{"event":"postgres_changes","payload":{"ids":[7,9],"data":{"type":"INSERT"}},"ref":null,"topic":"realtime:room1"}"#
        );
        assert_eq!(
            event.frame(Vsn::V2, "realtime:room2", &[7, 9]).as_str(),
            r#"[null,null,"realtime:room2","postgres_changes",{"ids":[7,9],"data":{"type":"INSERT"}}]"#
        );
        assert_eq!(
            event.frame(Vsn::V2, "realtime:room1", &[7]).as_str(),
            r#"[null,null,"realtime:room1","postgres_changes",{"ids":[7],"data":{"type":"INSERT"}}]"#
        );
        assert_eq!(event.lock().values().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    fn a_topic_that_needs_escaping_is_escaped() {
        let event = ChangeEvent::new("{}");
        assert_eq!(
            event.frame(Vsn::V2, "realtime:a\"b", &[1]).as_str(),
            r#"[null,null,"realtime:a\"b","postgres_changes",{"ids":[1],"data":{}}]"#
        );
    }
}
