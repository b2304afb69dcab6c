//! The registry of live subscriptions, indexed by table so that matching a
//! change costs what its table's subscriptions cost, not what all cost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};

use super::{CompiledFilter, EqualityKey};
use crate::change::{Change, ChangeKind, OldRow};
use crate::lsn::Lsn;
use crate::pgoutput::Oid;

/// Which change kinds a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    /// `*`: inserts, updates and deletes.
    All,
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
}

impl Events {
    /// Supabase's rule: `*` stays, the rest is upper-cased, and anything
    /// that is not INSERT, UPDATE or DELETE means `*`.
    pub fn parse(event: &str) -> Events {
        match event.to_ascii_uppercase().as_str() {
            "INSERT" => Events::Insert,
            "UPDATE" => Events::Update,
            "DELETE" => Events::Delete,
            _ => Events::All,
        }
    }

    /// Whether a change of `kind` is wanted. TRUNCATE never is (Supabase
    /// never delivers it).
    pub fn wants(self, kind: &ChangeKind) -> bool {
        matches!(
            (self, kind),
            (Events::All | Events::Insert, ChangeKind::Insert { .. })
                | (Events::All | Events::Update, ChangeKind::Update { .. })
                | (Events::All | Events::Delete, ChangeKind::Delete { .. })
        )
    }
}

/// One accepted subscription, ready to match.
#[derive(Debug)]
pub struct Entry {
    /// The owning gateway.
    pub gateway: Arc<str>,
    /// The subscription id (unique within the gateway).
    pub id: Arc<str>,
    /// Which kinds of change it wants.
    pub events: Events,
    /// The role to check visibility as.
    pub role: Arc<str>,
    /// The verified JWT claims, set as `request.jwt.claims` for RLS
    /// (shared by the entries of one channel join).
    pub claims: Arc<serde_json::Value>,
    /// The claims as JSON text: with `role`, what RLS checks group by.
    pub claims_text: Arc<str>,
    /// Columns to send besides the primary key; `None` for all.
    pub select: Option<Vec<String>>,
    /// Its filters (ANDed), compiled for each table it covers.
    pub filters: Vec<(Oid, Vec<CompiledFilter>)>,
}

impl Entry {
    /// The filters that apply in `table` (none: every row passes).
    pub fn filters_for(&self, table: Oid) -> &[CompiledFilter] {
        self.filters
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(&[], |(_, filters)| filters.as_slice())
    }
}

/// Live subscriptions by table, and the private channels by topic.
#[derive(Debug, Default)]
pub struct Registry {
    by_table: HashMap<Oid, TableEntries>,
    /// Every subscription (a private channel's with no table), so that
    /// removing one, or a gateway's, is one path for both kinds.
    tables_of: HashMap<(Arc<str>, Arc<str>), Vec<Oid>>,
    /// Private channels by topic: who is asked about each message of it.
    private: HashMap<Arc<str>, Vec<Arc<PrivateMember>>>,
    private_of: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
}

/// A private channel joined to a topic whose broadcasts it may read: the
/// messages written to the topic (Broadcast from Database) reach it when
/// its role and claims may SELECT them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateMember {
    /// The owning gateway.
    pub gateway: Arc<str>,
    /// Its id there (the channel's `PrivateChannel::id`).
    pub id: Arc<str>,
    /// The JWT's role.
    pub role: Arc<str>,
    /// The JWT's claims, as JSON text.
    pub claims_text: Arc<str>,
    /// The topic, without `realtime:`.
    pub topic: Arc<str>,
}

/// The subscriptions that may want one change.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    /// Those of the table without an indexed filter that want this kind of
    /// change: one list shared by every change of that kind until the
    /// subscriptions change, so a batch of thousands of changes holds it
    /// once, not once per change.
    pub shared: Arc<[Arc<Entry>]>,
    /// Those an index on the row's values selected.
    pub indexed: Vec<Arc<Entry>>,
}

impl Candidates {
    /// Every candidate: the shared ones, then the indexed ones.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.shared.iter().chain(&self.indexed)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.shared.len() + self.indexed.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.indexed.is_empty()
    }
}

impl From<Vec<Arc<Entry>>> for Candidates {
    fn from(indexed: Vec<Arc<Entry>>) -> Candidates {
        Candidates {
            shared: Arc::default(),
            indexed,
        }
    }
}

/// One table's subscriptions: those with an `eq`/`in` filter decided
/// in-process are indexed by the value it needs, so a change finds them
/// with one hash lookup per indexed column; the rest are scanned.
#[derive(Debug, Default)]
struct TableEntries {
    scan: Vec<Arc<Entry>>,
    /// `scan` narrowed to the subscriptions wanting INSERT, UPDATE, DELETE
    /// and TRUNCATE, made when first asked for and dropped on every change
    /// of `scan` (registering 10,000 subscriptions must not rebuild it
    /// 10,000 times).
    scan_by_kind: [OnceLock<Arc<[Arc<Entry>]>>; 4],
    columns: Vec<ColumnIndex>,
}

/// Subscriptions keyed by the value of one column their filter requires.
#[derive(Debug)]
struct ColumnIndex {
    column: usize,
    /// A filter on this column, to turn a row's value into a key.
    probe: CompiledFilter,
    by_key: HashMap<EqualityKey, Vec<Arc<Entry>>>,
}

impl TableEntries {
    fn add(&mut self, entry: Arc<Entry>, table: Oid) {
        let indexable = entry.filters_for(table).iter().find_map(|f| {
            f.equality_keys()
                .filter(|k| !k.is_empty())
                .map(|keys| (f, keys))
        });
        let Some((filter, keys)) = indexable else {
            self.scan.push(entry);
            self.scan_by_kind = Default::default();
            return;
        };
        let column = filter.column_index();
        let index = match self.columns.iter().position(|c| c.column == column) {
            Some(i) => i,
            None => {
                self.columns.push(ColumnIndex {
                    column,
                    probe: filter.clone(),
                    by_key: HashMap::new(),
                });
                self.columns.len() - 1
            }
        };
        let mut keys = keys;
        keys.dedup();
        for key in keys {
            self.columns[index]
                .by_key
                .entry(key)
                .or_default()
                .push(entry.clone());
        }
    }

    fn remove(&mut self, gateway: &str, id: &str) {
        let other = |e: &Arc<Entry>| !(&*e.gateway == gateway && &*e.id == id);
        self.scan.retain(other);
        self.scan_by_kind = Default::default();
        for index in &mut self.columns {
            index.by_key.retain(|_, entries| {
                entries.retain(other);
                !entries.is_empty()
            });
        }
        self.columns.retain(|c| !c.by_key.is_empty());
    }

    fn is_empty(&self) -> bool {
        self.scan.is_empty() && self.columns.is_empty()
    }

    /// The scanned subscriptions that want `kind`.
    fn scan_wanting(&self, kind: &ChangeKind) -> Arc<[Arc<Entry>]> {
        let slot = match kind {
            ChangeKind::Insert { .. } => 0,
            ChangeKind::Update { .. } => 1,
            ChangeKind::Delete { .. } => 2,
            ChangeKind::Truncate { .. } => 3,
        };
        self.scan_by_kind[slot]
            .get_or_init(|| {
                self.scan
                    .iter()
                    .filter(|e| e.events.wants(kind))
                    .cloned()
                    .collect()
            })
            .clone()
    }
}

impl Registry {
    /// Adds `entry` for `tables`, replacing a subscription with the same
    /// gateway and id.
    pub fn add(&mut self, entry: Arc<Entry>, tables: Vec<Oid>) {
        self.remove(&entry.gateway, &entry.id);
        for table in &tables {
            self.by_table
                .entry(*table)
                .or_default()
                .add(entry.clone(), *table);
        }
        self.tables_of
            .insert((entry.gateway.clone(), entry.id.clone()), tables);
    }

    /// Adds a private channel, replacing a subscription with the same
    /// gateway and id.
    pub fn add_private(&mut self, member: Arc<PrivateMember>) {
        self.remove(&member.gateway, &member.id);
        let key = (member.gateway.clone(), member.id.clone());
        self.tables_of.insert(key.clone(), Vec::new());
        self.private_of.insert(key, member.topic.clone());
        self.private
            .entry(member.topic.clone())
            .or_default()
            .push(member);
    }

    /// The private channels joined to `topic`.
    pub fn private_members(&self, topic: &str) -> &[Arc<PrivateMember>] {
        self.private.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Removes one subscription; whether it existed.
    pub fn remove(&mut self, gateway: &str, id: &str) -> bool {
        let key: (Arc<str>, Arc<str>) = (Arc::from(gateway), Arc::from(id));
        let Some(tables) = self.tables_of.remove(&key) else {
            return false;
        };
        if let Some(topic) = self.private_of.remove(&key)
            && let Some(members) = self.private.get_mut(&topic)
        {
            members.retain(|m| !(&*m.gateway == gateway && &*m.id == id));
            if members.is_empty() {
                self.private.remove(&topic);
            }
        }
        for table in tables {
            if let Some(entries) = self.by_table.get_mut(&table) {
                entries.remove(gateway, id);
                if entries.is_empty() {
                    self.by_table.remove(&table);
                }
            }
        }
        true
    }

    /// Removes every subscription of `gateway`; their ids.
    pub fn remove_gateway(&mut self, gateway: &str) -> Vec<Arc<str>> {
        let mut ids = self.ids_of(gateway);
        ids.retain(|id| self.remove(gateway, id));
        ids
    }

    /// The subscriptions that may want `change`: those of its table that
    /// want its kind, except indexed ones whose required value the row does
    /// not have. Their filters still decide (exactly) afterwards.
    pub fn candidates(&self, change: &Change) -> Candidates {
        let Some(table) = self.by_table.get(&change.relation.id) else {
            return Candidates::default();
        };
        let kind = &change.kind;
        let mut out = Candidates {
            shared: table.scan_wanting(kind),
            indexed: Vec::new(),
        };
        if table.columns.is_empty() {
            return out;
        }
        // The row filters look at: the new one, or a DELETE's identity (in
        // which only key columns are present).
        let (row, key_only) = match kind {
            ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => (new, false),
            ChangeKind::Delete { old } => (old.row(), matches!(old, OldRow::Key(_))),
            ChangeKind::Truncate { .. } => return out,
        };
        for index in &table.columns {
            let present = !key_only
                || change
                    .relation
                    .columns
                    .get(index.column)
                    .is_some_and(|c| c.is_key);
            let key = row
                .get(index.column)
                .filter(|_| present)
                .and_then(|datum| index.probe.equality_key_of(datum));
            if let Some(entries) = key.and_then(|key| index.by_key.get(&key)) {
                out.indexed
                    .extend(entries.iter().filter(|e| e.events.wants(kind)).cloned());
            }
        }
        out
    }

    /// The gateways that hold subscriptions.
    pub fn gateways(&self) -> Vec<Arc<str>> {
        let mut gateways: Vec<Arc<str>> = self.tables_of.keys().map(|(g, _)| g.clone()).collect();
        gateways.sort();
        gateways.dedup();
        gateways
    }

    /// The ids of `gateway`'s subscriptions.
    pub fn ids_of(&self, gateway: &str) -> Vec<Arc<str>> {
        self.tables_of
            .keys()
            .filter(|(g, _)| &**g == gateway)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// How many subscriptions are live.
    pub fn len(&self) -> usize {
        self.tables_of.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.tables_of.is_empty()
    }
}

/// The registry as the control task (writer) and the replication loop
/// (reader) share it, with the loop's position in the stream.
///
/// The position is the commit LSN of the transaction the loop is reading.
/// A subscription added at some instant is matched against every change
/// read after that instant, so every transaction committed after the
/// position read at that instant reaches it whole: that position is what
/// "live from" means.
#[derive(Debug, Default)]
pub struct Shared {
    registry: RwLock<Registry>,
    position: AtomicU64,
    /// The gateways' registry hashes were read back once: changes read
    /// before that would miss subscriptions that existed all along.
    recovered: AtomicBool,
    recovered_notify: tokio::sync::Notify,
    /// This daemon holds the slot's lock (streams, or is about to): it
    /// answers the gateways. A hot standby keeps the registry and stays
    /// silent, so that gateways hear one daemon.
    active: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Says the registry was read back from Redis (the first time matters).
    pub fn mark_recovered(&self) {
        self.recovered.store(true, Ordering::SeqCst);
        self.recovered_notify.notify_waiters();
    }

    /// Waits until the registry was read back once.
    pub async fn recovered(&self) {
        loop {
            let notified = self.recovered_notify.notified();
            if self.recovered.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Says whether this daemon holds the slot's lock.
    pub fn set_active(&self, active: bool) {
        self.active
            .send_if_modified(|now| std::mem::replace(now, active) != active);
    }

    /// Whether this daemon holds the slot's lock and so answers gateways.
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Follows [`Self::is_active`]: a receiver that sees each change.
    pub fn watch_active(&self) -> tokio::sync::watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Adds a subscription; returns the position from which it is live.
    pub fn add(&self, entry: Arc<Entry>, tables: Vec<Oid>) -> Lsn {
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registry.add(entry, tables);
        Lsn(self.position.load(Ordering::SeqCst))
    }

    /// Removes one subscription; whether it existed.
    pub fn remove(&self, gateway: &str, id: &str) -> bool {
        self.write().remove(gateway, id)
    }

    /// Adds a private channel; returns the position from which its topic's
    /// messages reach it.
    pub fn add_private(&self, member: Arc<PrivateMember>) -> Lsn {
        self.write().add_private(member);
        Lsn(self.position.load(Ordering::SeqCst))
    }

    /// Removes every subscription of a gateway; their ids.
    pub fn remove_gateway(&self, gateway: &str) -> Vec<Arc<str>> {
        self.write().remove_gateway(gateway)
    }

    /// Read access for matching. Never held across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The loop entered the transaction that commits at `lsn`.
    pub fn set_position(&self, lsn: Lsn) {
        self.position.store(lsn.0, Ordering::SeqCst);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(gateway: &str, id: &str, events: Events) -> Arc<Entry> {
        Arc::new(Entry {
            gateway: gateway.into(),
            id: id.into(),
            events,
            role: "anon".into(),
            claims: Arc::new(serde_json::json!({})),
            claims_text: "{}".into(),
            select: None,
            filters: Vec::new(),
        })
    }

    fn ids(candidates: Candidates) -> Vec<String> {
        candidates
            .iter()
            .map(|e| format!("{}/{}", e.gateway, e.id))
            .collect()
    }

    fn change(table: Oid, kind: ChangeKind) -> crate::change::Change {
        crate::change::Change {
            commit_lsn: crate::lsn::Lsn(1),
            commit_time: 0,
            seq: 0,
            xid: 1,
            relation: Arc::new(crate::change::Relation {
                id: table,
                schema: "public".into(),
                table: "t".into(),
                replica_identity: crate::pgoutput::ReplicaIdentity::Default,
                has_primary_key: true,
                columns: vec![],
            }),
            kind,
        }
    }

    #[test]
    fn matches_by_table_and_event_and_forgets_removed_ones() {
        let mut r = Registry::default();
        r.add(entry("g1", "a", Events::All), vec![1, 2]);
        r.add(entry("g1", "b", Events::Delete), vec![1]);
        r.add(entry("g2", "a", Events::Insert), vec![2]);
        let insert = |t| change(t, ChangeKind::Insert { new: vec![] });
        let delete = |t| {
            change(
                t,
                ChangeKind::Delete {
                    old: OldRow::Key(vec![]),
                },
            )
        };
        assert_eq!(ids(r.candidates(&insert(1))), ["g1/a"]);
        assert_eq!(ids(r.candidates(&delete(1))), ["g1/a", "g1/b"]);
        assert_eq!(ids(r.candidates(&insert(2))), ["g1/a", "g2/a"]);
        assert_eq!(ids(r.candidates(&insert(3))), Vec::<String>::new());
        // Same id again replaces.
        r.add(entry("g1", "a", Events::Delete), vec![2]);
        assert_eq!(ids(r.candidates(&insert(1))), Vec::<String>::new());
        assert_eq!(r.len(), 3);
        assert!(r.remove("g2", "a"));
        assert!(!r.remove("g2", "a"));
        assert_eq!(r.remove_gateway("g1").len(), 2);
        assert!(r.is_empty());
    }

    #[test]
    fn event_names_follow_supabase() {
        assert_eq!(Events::parse("insert"), Events::Insert);
        assert_eq!(Events::parse("*"), Events::All);
        assert_eq!(Events::parse("TRUNCATE"), Events::All);
        let truncate = ChangeKind::Truncate {
            cascade: false,
            restart_identity: false,
        };
        assert!(!Events::All.wants(&truncate));
    }
}
