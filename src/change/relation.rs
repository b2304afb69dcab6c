//! The relation cache: each published table as pgoutput last described it,
//! with its column types and primary key from the catalog.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::TypeInfo;
use crate::pgoutput::{self, Oid, ReplicaIdentity};

/// A published table.
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
    /// Whether the table has a primary key.
    pub has_primary_key: bool,
    /// The published columns, in attribute order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type modifier (`atttypmod`), -1 if none.
    pub type_modifier: i32,
    /// Part of the replica identity (all columns under FULL).
    pub is_key: bool,
    /// Part of the primary key.
    pub is_primary_key: bool,
    /// The column's type.
    pub ty: Arc<TypeInfo>,
}

/// What the catalog adds to a pgoutput `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// The type of each column, in order.
    pub types: Vec<Arc<TypeInfo>>,
    /// The names of the primary key columns.
    pub primary_key: Vec<String>,
    /// The partitioned table whose changes this partition's count as
    /// (its oid and name, same schema), if any.
    pub root: Option<(Oid, String)>,
}

/// Relations by oid.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<Oid, Arc<Relation>>,
}

impl RelationCache {
    /// Replaces a relation's description.
    pub fn add(&mut self, rel: pgoutput::Relation, described: Described) {
        let columns = rel
            .columns
            .into_iter()
            .zip(described.types)
            .map(|(c, ty)| Column {
                is_primary_key: described.primary_key.contains(&c.name),
                name: c.name,
                type_modifier: c.type_modifier,
                is_key: c.is_key,
                ty,
            })
            .collect();
        let (id, table) = described.root.unwrap_or((rel.id, rel.name));
        let relation = Relation {
            id,
            schema: rel.namespace,
            table,
            replica_identity: rel.replica_identity,
            has_primary_key: !described.primary_key.is_empty(),
            columns,
        };
        self.relations.insert(rel.id, Arc::new(relation));
    }

    /// The relation with this oid, if described.
    pub fn get(&self, id: Oid) -> Option<&Arc<Relation>> {
        self.relations.get(&id)
    }
}
