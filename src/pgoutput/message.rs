//! The typed pgoutput messages.

use bytes::Bytes;

pub use crate::lsn::Lsn;

/// A Postgres object id (relation, type).
pub type Oid = u32;
/// A transaction id.
pub type Xid = u32;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `B`: a transaction starts; carries its commit position and time.
    Begin(Begin),
    /// `C`: the transaction of the last `Begin` committed.
    Commit(Commit),
    /// `O`: the transaction came from another origin (replicated in).
    Origin(Origin),
    /// `R`: describes a relation before its first row in a session.
    Relation(Relation),
    /// `Y`: names a non-built-in type used by a relation.
    Type(Type),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: relations were truncated.
    Truncate(Truncate),
    /// `M`: a `pg_logical_emit_message` payload.
    Message(LogicalMessage),
    /// `S`: a chunk of a large in-progress transaction starts (protocol 2).
    StreamStart(StreamStart),
    /// `E`: the current stream chunk ends (protocol 2).
    StreamStop,
    /// `c`: a streamed transaction committed (protocol 2).
    StreamCommit(StreamCommit),
    /// `A`: a streamed (sub)transaction aborted (protocol 2).
    StreamAbort(StreamAbort),
}

/// Start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record: the transaction's position in commit order.
    pub final_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: Xid,
}

/// End of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused by Postgres, always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: what a consumer acknowledges.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// Origin of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// Replica identity setting of a relation (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (if any).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

/// A relation's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Relation oid: the key later row messages refer to.
    pub id: Oid,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Which columns identify an old row.
    pub replica_identity: ReplicaIdentity,
    /// The published columns in attribute order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key (flag bit 1).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_id: Oid,
    /// Type modifier (`atttypmod`), -1 if none.
    pub type_modifier: i32,
}

/// A non-built-in type's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Type oid.
    pub id: Oid,
    /// Schema name.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that Postgres did not send.
    UnchangedToast,
    /// `t`: the type's text output.
    Text(Bytes),
    /// `b`: the type's binary send output.
    Binary(Bytes),
}

/// A row's column values, in relation column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<Value>);

/// The old row that an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns (others are NULL).
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

/// An inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Relation oid.
    pub relation_id: Oid,
    /// The new row.
    pub new: TupleData,
}

/// An updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Relation oid.
    pub relation_id: Oid,
    /// The old key or row, when the replica identity makes Postgres send it.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: TupleData,
}

/// A deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Relation oid.
    pub relation_id: Oid,
    /// The old key or row.
    pub old: OldTuple,
}

/// A TRUNCATE of one or more relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    /// The truncated relations.
    pub relation_ids: Vec<Oid>,
}

/// A logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Transaction id, only inside a streamed chunk (protocol 2).
    pub xid: Option<Xid>,
    /// Emitted inside a transaction (as opposed to immediately).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix the emitter chose.
    pub prefix: String,
    /// The payload.
    pub content: Bytes,
}

/// Start of a streamed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// Transaction id of the streamed transaction.
    pub xid: Xid,
    /// Whether this is the transaction's first chunk.
    pub first_segment: bool,
}

/// Commit of a streamed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    /// Transaction id.
    pub xid: Xid,
    /// Flags (currently unused, 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// Abort of a streamed (sub)transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    /// Transaction id of the top-level transaction.
    pub xid: Xid,
    /// Transaction id of the aborted subtransaction (equal to `xid` for the top level).
    pub subxid: Xid,
}
