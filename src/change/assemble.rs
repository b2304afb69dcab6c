//! Transaction assembly: pgoutput messages in, change events out.

use crate::lsn::Lsn;
use crate::pgoutput::{self, Message, Oid, OldTuple, TupleData, Value, Xid};

use super::{Change, ChangeKind, Datum, Described, OldRow, RelationCache, Row};

/// What one pgoutput message amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Nothing to pass on (origin, begin, logical messages).
    None,
    /// A relation to describe from the catalog and hand back with
    /// [`Assembler::add_relation`] before the next message.
    Relation(pgoutput::Relation),
    /// A type was announced: whatever is cached about it may be stale.
    Type(Oid),
    /// A row change.
    Change(Change),
    /// Several changes from one message (a TRUNCATE of several tables).
    Changes(Vec<Change>),
    /// The open transaction committed; `end_lsn` may be acknowledged once
    /// every change before it is published.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past it.
        end_lsn: Lsn,
    },
}

/// A message that cannot be placed. Each means the stream is not what
/// protocol 1 promises, so the session restarts from the acknowledged LSN.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A row message arrived outside a transaction.
    #[error("pgoutput {0} message outside a transaction")]
    OutsideTransaction(&'static str),
    /// `Begin` arrived while a transaction was open.
    #[error("pgoutput begin of xid {0} while xid {1} is open")]
    NestedBegin(Xid, Xid),
    /// A row message names a relation never described.
    #[error("pgoutput row for unknown relation oid {0}")]
    UnknownRelation(u32),
    /// A tuple's width does not match its relation's.
    #[error("pgoutput tuple for {table} has {got} columns, relation has {expected}")]
    Width {
        /// `schema.table`.
        table: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        expected: usize,
    },
    /// A tuple carried a binary value, which was never requested.
    #[error("pgoutput sent a binary value although text format was requested")]
    Binary,
    /// A streamed (protocol 2) message, which was never requested.
    #[error("pgoutput sent a streamed-transaction message although protocol 1 was requested")]
    Streaming,
}

#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    commit_lsn: Lsn,
    commit_time: i64,
    xid: Xid,
    next_seq: u32,
}

/// Turns a pgoutput message stream into change events.
#[derive(Debug, Default)]
pub struct Assembler {
    relations: RelationCache,
    open: Option<OpenTransaction>,
}

impl Assembler {
    /// An assembler with an empty relation cache, outside any transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a relation, described by the catalog.
    pub fn add_relation(&mut self, rel: pgoutput::Relation, described: Described) {
        self.relations.add(rel, described);
    }

    /// Whether a transaction is open (between `Begin` and `Commit`).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Applies one message.
    pub fn apply(&mut self, message: Message) -> Result<Event, Error> {
        match message {
            Message::Begin(begin) => {
                if let Some(open) = self.open {
                    return Err(Error::NestedBegin(begin.xid, open.xid));
                }
                self.open = Some(OpenTransaction {
                    commit_lsn: begin.final_lsn,
                    commit_time: begin.commit_time,
                    xid: begin.xid,
                    next_seq: 0,
                });
                Ok(Event::None)
            }
            Message::Commit(commit) => {
                self.open
                    .take()
                    .ok_or(Error::OutsideTransaction("commit"))?;
                Ok(Event::Commit {
                    commit_lsn: commit.commit_lsn,
                    end_lsn: commit.end_lsn,
                })
            }
            Message::Relation(rel) => Ok(Event::Relation(rel)),
            Message::Type(ty) => Ok(Event::Type(ty.id)),
            Message::Origin(_) | Message::Message(_) => Ok(Event::None),
            Message::Insert(insert) => {
                self.require_open("insert")?;
                let new = self.row(insert.relation_id, insert.new)?;
                self.change(insert.relation_id, ChangeKind::Insert { new }, "insert")
                    .map(Event::Change)
            }
            Message::Update(update) => {
                self.require_open("update")?;
                let old = update
                    .old
                    .map(|old| self.old_row(update.relation_id, old))
                    .transpose()?;
                let new = self.row(update.relation_id, update.new)?;
                self.change(
                    update.relation_id,
                    ChangeKind::Update { old, new },
                    "update",
                )
                .map(Event::Change)
            }
            Message::Delete(delete) => {
                self.require_open("delete")?;
                let old = self.old_row(delete.relation_id, delete.old)?;
                self.change(delete.relation_id, ChangeKind::Delete { old }, "delete")
                    .map(Event::Change)
            }
            Message::Truncate(truncate) => truncate
                .relation_ids
                .iter()
                .map(|&id| {
                    let kind = ChangeKind::Truncate {
                        cascade: truncate.cascade,
                        restart_identity: truncate.restart_identity,
                    };
                    self.change(id, kind, "truncate")
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Event::Changes),
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => Err(Error::Streaming),
        }
    }

    fn require_open(&self, what: &'static str) -> Result<(), Error> {
        match self.open {
            Some(_) => Ok(()),
            None => Err(Error::OutsideTransaction(what)),
        }
    }

    fn change(
        &mut self,
        relation_id: u32,
        kind: ChangeKind,
        what: &'static str,
    ) -> Result<Change, Error> {
        let open = self.open.as_mut().ok_or(Error::OutsideTransaction(what))?;
        let relation = self
            .relations
            .get(relation_id)
            .ok_or(Error::UnknownRelation(relation_id))?
            .clone();
        let seq = open.next_seq;
        open.next_seq += 1;
        Ok(Change {
            commit_lsn: open.commit_lsn,
            commit_time: open.commit_time,
            seq,
            xid: open.xid,
            relation,
            kind,
        })
    }

    fn old_row(&self, relation_id: u32, old: OldTuple) -> Result<OldRow, Error> {
        Ok(match old {
            OldTuple::Key(tuple) => OldRow::Key(self.row(relation_id, tuple)?),
            OldTuple::Full(tuple) => OldRow::Full(self.row(relation_id, tuple)?),
        })
    }

    fn row(&self, relation_id: u32, tuple: TupleData) -> Result<Row, Error> {
        let relation = self
            .relations
            .get(relation_id)
            .ok_or(Error::UnknownRelation(relation_id))?;
        if tuple.0.len() != relation.columns.len() {
            return Err(Error::Width {
                table: format!("{}.{}", relation.schema, relation.table),
                got: tuple.0.len(),
                expected: relation.columns.len(),
            });
        }
        tuple
            .0
            .into_iter()
            .map(|value| match value {
                Value::Null => Ok(Datum::Null),
                Value::UnchangedToast => Ok(Datum::UnchangedToast),
                Value::Text(text) => Ok(Datum::Text(text)),
                Value::Binary(_) => Err(Error::Binary),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::catalog::builtin;
    use crate::pgoutput::{Begin, Column, Commit, Insert, ReplicaIdentity, Update};

    fn add_relation(a: &mut Assembler) {
        let Ok(Event::Relation(rel)) = a.apply(relation()) else {
            panic!("no relation")
        };
        let types = rel
            .columns
            .iter()
            .map(|c| builtin(c.type_id).unwrap())
            .collect();
        a.add_relation(
            rel,
            Described {
                types,
                primary_key: vec!["id".into()],
                root: None,
            },
        );
    }

    fn relation() -> Message {
        Message::Relation(pgoutput::Relation {
            xid: None,
            id: 16384,
            namespace: "public".into(),
            name: "todos".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    is_key: true,
                    name: "id".into(),
                    type_id: 20,
                    type_modifier: -1,
                },
                Column {
                    is_key: false,
                    name: "body".into(),
                    type_id: 25,
                    type_modifier: -1,
                },
            ],
        })
    }

    fn begin(xid: Xid) -> Message {
        Message::Begin(Begin {
            final_lsn: Lsn(0x100),
            commit_time: 42,
            xid,
        })
    }

    fn text(s: &'static str) -> Value {
        Value::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn changes_carry_commit_position_and_sequence() {
        let mut a = Assembler::new();
        add_relation(&mut a);
        assert_eq!(a.apply(begin(7)), Ok(Event::None));
        assert!(a.in_transaction());
        let insert = Message::Insert(Insert {
            xid: None,
            relation_id: 16384,
            new: TupleData(vec![text("1"), text("a")]),
        });
        let Ok(Event::Change(first)) = a.apply(insert.clone()) else {
            panic!("no change")
        };
        let Ok(Event::Change(second)) = a.apply(insert) else {
            panic!("no change")
        };
        assert_eq!(
            (first.commit_lsn, first.commit_time, first.xid, first.seq),
            (Lsn(0x100), 42, 7, 0)
        );
        assert_eq!(second.seq, 1);
        assert_eq!(&*first.relation.columns[0].ty.name, "int8");
        assert_eq!(
            first.kind,
            ChangeKind::Insert {
                new: vec![
                    Datum::Text(Bytes::from_static(b"1")),
                    Datum::Text(Bytes::from_static(b"a"))
                ]
            }
        );
        let commit = Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x130),
            commit_time: 42,
        });
        assert_eq!(
            a.apply(commit),
            Ok(Event::Commit {
                commit_lsn: Lsn(0x100),
                end_lsn: Lsn(0x130)
            })
        );
        assert!(!a.in_transaction());
    }

    #[test]
    fn unchanged_toast_is_its_own_datum() {
        let mut a = Assembler::new();
        add_relation(&mut a);
        a.apply(begin(1)).unwrap();
        let update = Message::Update(Update {
            xid: None,
            relation_id: 16384,
            old: None,
            new: TupleData(vec![text("1"), Value::UnchangedToast]),
        });
        let Ok(Event::Change(change)) = a.apply(update) else {
            panic!("no change")
        };
        assert_eq!(
            change.kind,
            ChangeKind::Update {
                old: None,
                new: vec![Datum::Text(Bytes::from_static(b"1")), Datum::UnchangedToast]
            }
        );
    }

    #[test]
    fn inconsistent_streams_are_errors_not_guesses() {
        let mut a = Assembler::new();
        let insert = Message::Insert(Insert {
            xid: None,
            relation_id: 16384,
            new: TupleData(vec![text("1")]),
        });
        assert_eq!(
            a.apply(insert.clone()),
            Err(Error::OutsideTransaction("insert"))
        );
        a.apply(begin(1)).unwrap();
        assert_eq!(a.apply(insert.clone()), Err(Error::UnknownRelation(16384)));
        add_relation(&mut a);
        assert!(matches!(
            a.apply(insert),
            Err(Error::Width {
                got: 1,
                expected: 2,
                ..
            })
        ));
        assert_eq!(a.apply(begin(2)), Err(Error::NestedBegin(2, 1)));
    }
}
