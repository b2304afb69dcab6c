//! A room's presences as this gateway knows them: every gateway's, read
//! from the room's hash when the room is first joined here and kept
//! current by the diffs on its channel. Applying a diff says what it
//! changed, and only that is told to the sockets: a diff that repeats
//! what the hash already showed (it was read after the diff was written)
//! changes nothing.

use std::collections::{BTreeMap, HashMap};

use crate::bus::room::{Presence, field_gateway, presence_field};

/// Presences by hash field (`<gateway>|<ref>`), in arrival order per key.
/// Joins, leaves and lookups cost O(log n) at most: a room of 10,000 does
/// not make each diff scan the room.
#[derive(Debug, Default)]
pub struct State {
    /// Field → (arrival number, presence).
    entries: HashMap<String, (u64, Presence)>,
    /// Fields by arrival number, so metas are listed oldest first.
    order: BTreeMap<u64, String>,
    arrivals: u64,
}

/// What a diff changed.
#[derive(Debug, Default)]
pub struct Changed {
    /// Presences that were not there.
    pub joins: Vec<Presence>,
    /// Presences that were there and are gone.
    pub leaves: Vec<Presence>,
}

impl Changed {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// The `presence_diff` payload: `{"joins":{key:{"metas":[…]}},"leaves":{…}}`.
    pub fn payload(&self) -> String {
        format!(
            r#"{{"joins":{},"leaves":{}}}"#,
            group(self.joins.iter()),
            group(self.leaves.iter())
        )
    }
}

impl State {
    /// Applies `gateway`'s diff: joins first, then leaves (an update's
    /// leave names the meta its join replaces).
    pub fn apply(&mut self, gateway: &str, joins: Vec<Presence>, leaves: Vec<Presence>) -> Changed {
        let mut changed = Changed::default();
        for presence in joins {
            let field = presence_field(gateway, &presence.reference);
            if !self.entries.contains_key(&field) {
                self.insert(field, presence.clone());
                changed.joins.push(presence);
            }
        }
        for presence in leaves {
            let field = presence_field(gateway, &presence.reference);
            if let Some((arrival, gone)) = self.entries.remove(&field) {
                self.order.remove(&arrival);
                changed.leaves.push(gone);
            }
        }
        changed
    }

    fn insert(&mut self, field: String, presence: Presence) {
        self.arrivals += 1;
        self.order.insert(self.arrivals, field.clone());
        self.entries.insert(field, (self.arrivals, presence));
    }

    /// Removes every presence of the gateways `dead` holds; what left.
    pub fn remove_gateways(&mut self, dead: impl Fn(&str) -> bool) -> Changed {
        let mut changed = Changed::default();
        let entries = &mut self.entries;
        self.order.retain(|_, field| {
            if !dead(field_gateway(field)) {
                return true;
            }
            if let Some((_, gone)) = entries.remove(field) {
                changed.leaves.push(gone);
            }
            false
        });
        changed
    }

    /// Becomes `new` (read again after a lost connection); what changed.
    pub fn replace(&mut self, new: State) -> Changed {
        let mut changed = Changed::default();
        for field in self.order.values() {
            if !new.entries.contains_key(field)
                && let Some((_, gone)) = self.entries.get(field)
            {
                changed.leaves.push(gone.clone());
            }
        }
        for field in new.order.values() {
            if !self.entries.contains_key(field)
                && let Some((_, came)) = new.entries.get(field)
            {
                changed.joins.push(came.clone());
            }
        }
        *self = new;
        changed
    }

    /// The gateways with presences here.
    pub fn gateways(&self) -> impl Iterator<Item = &str> {
        self.order.values().map(|f| field_gateway(f))
    }

    /// The `presence_state` payload: `{key:{"metas":[…]}}`.
    pub fn payload(&self) -> String {
        group(
            self.order
                .values()
                .filter_map(|f| self.entries.get(f).map(|(_, p)| p)),
        )
    }

    /// How many presences there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `{key:{"metas":[meta…]}}`, keys in order of first appearance.
fn group<'a>(presences: impl Iterator<Item = &'a Presence>) -> String {
    let mut keys: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for p in presences {
        match index.get(p.key.as_str()) {
            Some(&i) => keys[i].1.push(p.meta.get()),
            None => {
                index.insert(&p.key, keys.len());
                keys.push((&p.key, vec![p.meta.get()]));
            }
        }
    }
    let mut out = String::from("{");
    for (i, (key, metas)) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(*key).to_string());
        out.push_str(r#":{"metas":["#);
        out.push_str(&metas.join(","));
        out.push_str("]}");
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn presence(reference: &str, key: &str, meta: &str) -> Presence {
        Presence {
            reference: reference.into(),
            key: key.into(),
            meta: RawValue::from_string(meta.into()).unwrap(),
        }
    }

    #[test]
    fn diffs_change_the_state_once_and_say_what_changed() {
        let mut state = State::default();
        let a = presence("A", "alice", r#"{"phx_ref":"A","n":1}"#);
        let changed = state.apply("g1", vec![a.clone()], Vec::new());
        assert_eq!(
            changed.payload(),
            r#"{"joins":{"alice":{"metas":[{"phx_ref":"A","n":1}]}},"leaves":{}}"#
        );
        // Read from the hash already: a repeat changes nothing.
        assert!(state.apply("g1", vec![a.clone()], Vec::new()).is_empty());
        let b = presence("B", "alice", r#"{"phx_ref":"B","phx_ref_prev":"A","n":2}"#);
        let update = state.apply("g1", vec![b], vec![a.clone()]);
        assert_eq!(
            update.payload(),
            r#"{"joins":{"alice":{"metas":[{"phx_ref":"B","phx_ref_prev":"A","n":2}]}},"leaves":{"alice":{"metas":[{"phx_ref":"A","n":1}]}}}"#
        );
        state.apply(
            "g2",
            vec![presence("C", "bob", r#"{"phx_ref":"C"}"#)],
            Vec::new(),
        );
        assert_eq!(
            state.payload(),
            r#"{"alice":{"metas":[{"phx_ref":"B","phx_ref_prev":"A","n":2}]},"bob":{"metas":[{"phx_ref":"C"}]}}"#
        );
        assert!(state.apply("g1", Vec::new(), vec![a]).is_empty());
        let gone = state.remove_gateways(|g| g == "g2");
        assert_eq!(
            gone.payload(),
            r#"{"joins":{},"leaves":{"bob":{"metas":[{"phx_ref":"C"}]}}}"#
        );
        assert_eq!(state.len(), 1);
        assert_eq!(state.gateways().collect::<Vec<_>>(), ["g1"]);
    }
}
