//! The relation cache: what pgoutput told us about each table and type.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pgoutput::{self, Oid, ReplicaIdentity};

/// A published table as pgoutput last described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation oid.
    pub id: Oid,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Replica identity.
    pub replica_identity: ReplicaIdentity,
    /// The published columns, in attribute order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_id: Oid,
    /// Type modifier (`atttypmod`), -1 if none.
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub is_key: bool,
    /// The type's name (`int4`, `_text`, `mood`), as the Supabase payload
    /// shows it; `None` if the type is neither built in nor announced.
    pub type_name: Option<Arc<str>>,
}

/// Relations and non-built-in types by oid, as announced on the stream.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<Oid, Arc<Relation>>,
    types: HashMap<Oid, Arc<str>>,
}

impl RelationCache {
    /// Remembers a type's name from a `Type` message.
    pub fn add_type(&mut self, ty: &pgoutput::Type) {
        self.types.insert(ty.id, Arc::from(ty.name.as_str()));
    }

    /// Replaces a relation's description from a `Relation` message.
    pub fn add_relation(&mut self, rel: pgoutput::Relation) {
        let columns = rel
            .columns
            .into_iter()
            .map(|c| Column {
                type_name: self
                    .types
                    .get(&c.type_id)
                    .cloned()
                    .or_else(|| crate::catalog::builtin_type_name(c.type_id).map(Arc::from)),
                name: c.name,
                type_id: c.type_id,
                type_modifier: c.type_modifier,
                is_key: c.is_key,
            })
            .collect();
        let relation = Relation {
            id: rel.id,
            schema: rel.namespace,
            table: rel.name,
            replica_identity: rel.replica_identity,
            columns,
        };
        self.relations.insert(rel.id, Arc::new(relation));
    }

    /// The relation with this oid, if announced.
    pub fn get(&self, id: Oid) -> Option<&Arc<Relation>> {
        self.relations.get(&id)
    }
}
