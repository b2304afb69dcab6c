//! The `Change` record: one row change of a committed transaction.

use std::sync::Arc;

use bytes::Bytes;

use super::Relation;
use crate::lsn::Lsn;
use crate::pgoutput::Xid;

/// One column value as Postgres sent it (text format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change; Postgres did not send it.
    /// It is not NULL and not empty: the value is simply unknown here.
    UnchangedToast,
    /// The type's text output, UTF-8.
    Text(Bytes),
    /// The value already as JSON, rendered by the server (for types whose
    /// JSON only the server knows: a user type's cast to json).
    Json(Bytes),
}

/// A row: one datum per column of the relation, in column order.
pub type Row = Vec<Datum>;

/// The old row an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldRow {
    /// Only the replica identity key columns are meaningful; the others are
    /// NULL placeholders (REPLICA IDENTITY DEFAULT or INDEX).
    Key(Row),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Row),
}

impl OldRow {
    /// The datums, whatever the kind.
    pub fn row(&self) -> &Row {
        match self {
            OldRow::Key(row) | OldRow::Full(row) => row,
        }
    }

    /// The datums, to replace some.
    pub fn row_mut(&mut self) -> &mut Row {
        match self {
            OldRow::Key(row) | OldRow::Full(row) => row,
        }
    }
}

/// What happened to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// A row was inserted.
    Insert {
        /// The new row.
        new: Row,
    },
    /// A row was updated.
    Update {
        /// The old row or key, when the replica identity makes Postgres send
        /// it: always under FULL, under DEFAULT only if the key changed.
        old: Option<OldRow>,
        /// The new row.
        new: Row,
    },
    /// A row was deleted.
    Delete {
        /// The old key or row.
        old: OldRow,
    },
    /// The table was truncated.
    Truncate {
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY`.
        restart_identity: bool,
    },
}

impl ChangeKind {
    /// The Supabase `type` name: `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`.
    pub fn name(&self) -> &'static str {
        match self {
            ChangeKind::Insert { .. } => "INSERT",
            ChangeKind::Update { .. } => "UPDATE",
            ChangeKind::Delete { .. } => "DELETE",
            ChangeKind::Truncate { .. } => "TRUNCATE",
        }
    }
}

/// One change of a committed transaction, with everything needed to
/// address and encode it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// LSN of the transaction's commit record: with `seq`, the change's
    /// unique, increasing position.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Position of the change within its transaction, from 0.
    pub seq: u32,
    /// Transaction id.
    pub xid: Xid,
    /// The table and its columns as they were when the change was made.
    pub relation: Arc<Relation>,
    /// What happened, with the row data.
    pub kind: ChangeKind,
}
