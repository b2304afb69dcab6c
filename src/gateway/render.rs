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
/// Frames kept per change. Sockets on distinct topics (a channel name per
/// client) never share a frame, and a kept frame lives as long as the
/// slowest socket's queue holds the change: beyond this many, frames are
/// rendered per socket and freed once written, as without the cache.
const MAX_SHARED_FRAMES: usize = 64;

/// One change as the daemon sent it, with the frames rendered from it so
/// far.
#[derive(Debug)]
pub struct ChangeEvent {
    /// The change's `data`, JSON text.
    data: Box<str>,
    rendered: Mutex<Shared>,
    hasher: RandomState,
}

/// Rendered frames by a hash of (version, topic, binding ids); equal
/// hashes are told apart by comparing the parts.
#[derive(Debug, Default)]
struct Shared {
    by_key: HashMap<u64, Vec<Rendered>>,
    count: usize,
}

#[derive(Debug)]
struct Rendered {
    vsn: Vsn,
    topic: Box<str>,
    ids: Box<[u32]>,
    frame: Utf8Bytes,
}

impl Rendered {
    fn is(&self, vsn: Vsn, topic: &str, ids: &[u32]) -> bool {
        self.vsn == vsn && &*self.topic == topic && &*self.ids == ids
    }
}

impl ChangeEvent {
    /// A change whose `data` is `data` (JSON text), nothing rendered yet.
    pub fn new(data: &str) -> ChangeEvent {
        ChangeEvent {
            data: data.into(),
            rendered: Mutex::new(Shared::default()),
            hasher: RandomState::new(),
        }
    }

    /// The `postgres_changes` frame for a channel `topic` whose bindings
    /// `ids` (the client's integer ids) see this change, in `vsn`.
    pub fn frame(&self, vsn: Vsn, topic: &str, ids: &[u32]) -> Utf8Bytes {
        let key = self.key(vsn, topic, ids);
        if let Some(found) = self.find(key, vsn, topic, ids) {
            return found;
        }
        // Rendered without the lock, so that other sockets' lookups do not
        // wait on it; two sockets may render the same frame, one is kept.
        let frame = Utf8Bytes::from(render(vsn, topic, ids, &self.data));
        let mut shared = self.lock();
        if shared.count >= MAX_SHARED_FRAMES {
            return frame;
        }
        let entries = shared.by_key.entry(key).or_default();
        if let Some(found) = entries.iter().find(|r| r.is(vsn, topic, ids)) {
            return found.frame.clone();
        }
        entries.push(Rendered {
            vsn,
            topic: topic.into(),
            ids: ids.into(),
            frame: frame.clone(),
        });
        shared.count += 1;
        frame
    }

    fn find(&self, key: u64, vsn: Vsn, topic: &str, ids: &[u32]) -> Option<Utf8Bytes> {
        let shared = self.lock();
        let entries = shared.by_key.get(&key)?;
        entries
            .iter()
            .find(|r| r.is(vsn, topic, ids))
            .map(|r| r.frame.clone())
    }

    fn key(&self, vsn: Vsn, topic: &str, ids: &[u32]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        vsn.hash(&mut hasher);
        topic.hash(&mut hasher);
        ids.hash(&mut hasher);
        hasher.finish()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
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
        assert_eq!(event.lock().count, 4);
    }

    #[test]
    fn past_the_cap_frames_are_rendered_per_call_and_not_kept() {
        let event = ChangeEvent::new("{}");
        for i in 0..MAX_SHARED_FRAMES + 10 {
            let topic = format!("realtime:room{i}");
            assert_eq!(
                event.frame(Vsn::V2, &topic, &[1]).as_str(),
                format!(r#"[null,null,"{topic}","postgres_changes",{{"ids":[1],"data":{{}}}}]"#)
            );
        }
        assert_eq!(event.lock().count, MAX_SHARED_FRAMES);
        let late = event.frame(Vsn::V2, "realtime:late", &[1]);
        let again = event.frame(Vsn::V2, "realtime:late", &[1]);
        assert_ne!(late.as_str().as_ptr(), again.as_str().as_ptr(), "not kept");
        let kept = event.frame(Vsn::V2, "realtime:room0", &[1]);
        let kept_again = event.frame(Vsn::V2, "realtime:room0", &[1]);
        assert_eq!(kept.as_str().as_ptr(), kept_again.as_str().as_ptr());
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
