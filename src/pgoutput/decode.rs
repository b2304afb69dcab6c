//! The decoder: one `XLogData` payload in, one [`Message`] out.
//!
//! Every read goes through [`Cursor`], which checks lengths before touching
//! the buffer, so no input can make decoding panic, overflow or allocate more
//! than the frame could describe.

use bytes::{Buf, Bytes};

use super::error::Error;
use super::message::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, Lsn, Message, Oid, OldTuple, Origin,
    Relation, ReplicaIdentity, StreamAbort, StreamCommit, StreamStart, Truncate, TupleData, Type,
    Update, Value, Xid,
};

/// Message tags: the first byte of every pgoutput message.
mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
}

/// Markers that introduce a tuple inside Insert, Update and Delete.
mod tuple_marker {
    pub const NEW: u8 = b'N';
    pub const KEY: u8 = b'K';
    pub const OLD: u8 = b'O';
}

/// The kind byte before each column value of a tuple.
mod value_kind {
    pub const NULL: u8 = b'n';
    pub const UNCHANGED_TOAST: u8 = b'u';
    pub const TEXT: u8 = b't';
    pub const BINARY: u8 = b'b';
}

/// `pg_class.relreplident` values.
mod replica_identity {
    pub const DEFAULT: u8 = b'd';
    pub const NOTHING: u8 = b'n';
    pub const FULL: u8 = b'f';
    pub const INDEX: u8 = b'i';
}

/// Relation column flag: the column is part of the replica identity key.
const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bit: `CASCADE`.
const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: `RESTART IDENTITY`.
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Logical message flag: emitted transactionally.
const MESSAGE_TRANSACTIONAL: u8 = 1;
/// Smallest encoding of one relation column: flags, empty name, type oid, typmod.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// Encoding of one relation oid in a Truncate.
const OID_LEN: usize = 4;

/// Decodes pgoutput messages; stateful only in knowing whether it is inside a
/// streamed chunk (between `StreamStart` and `StreamStop`), where
/// row/relation/type/truncate/message messages carry an xid prefix.
///
/// A message that fails to decode leaves the state unchanged.
#[derive(Debug, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    /// A decoder outside any streamed chunk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one pgoutput message (the payload of one `XLogData` frame).
    ///
    /// Text and binary values and logical message content are slices of
    /// `frame`, not copies. The whole frame must be one message: leftover
    /// bytes are [`Error::Trailing`].
    ///
    /// # Errors
    ///
    /// Any malformed frame: [`Error::Truncated`] if it ends early,
    /// [`Error::UnknownTag`], [`Error::Invalid`] for a value the protocol does
    /// not allow, [`Error::Trailing`] for leftover bytes.
    pub fn decode(&mut self, frame: Bytes) -> Result<Message, Error> {
        let mut c = Cursor(frame);
        let tag = c.u8("message tag")?;
        // Inside a streamed chunk these messages start with the transaction's xid.
        let xid = match tag {
            tag::RELATION
            | tag::TYPE
            | tag::INSERT
            | tag::UPDATE
            | tag::DELETE
            | tag::TRUNCATE
            | tag::MESSAGE
                if self.in_stream =>
            {
                Some(c.u32("stream xid")?)
            }
            _ => None,
        };
        let message = match tag {
            tag::BEGIN => Message::Begin(begin(&mut c)?),
            tag::COMMIT => Message::Commit(commit(&mut c)?),
            tag::ORIGIN => Message::Origin(origin(&mut c)?),
            tag::RELATION => Message::Relation(relation(&mut c, xid)?),
            tag::TYPE => Message::Type(type_(&mut c, xid)?),
            tag::INSERT => Message::Insert(insert(&mut c, xid)?),
            tag::UPDATE => Message::Update(update(&mut c, xid)?),
            tag::DELETE => Message::Delete(delete(&mut c, xid)?),
            tag::TRUNCATE => Message::Truncate(truncate(&mut c, xid)?),
            tag::MESSAGE => Message::Message(logical_message(&mut c, xid)?),
            tag::STREAM_START => Message::StreamStart(stream_start(&mut c)?),
            tag::STREAM_STOP => Message::StreamStop,
            tag::STREAM_COMMIT => Message::StreamCommit(stream_commit(&mut c)?),
            tag::STREAM_ABORT => Message::StreamAbort(stream_abort(&mut c)?),
            other => return Err(Error::UnknownTag(other)),
        };
        c.finish()?;
        match message {
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }
}

fn begin(c: &mut Cursor) -> Result<Begin, Error> {
    Ok(Begin {
        final_lsn: c.lsn("begin final lsn")?,
        commit_time: c.i64("begin commit time")?,
        xid: c.u32("begin xid")?,
    })
}

fn commit(c: &mut Cursor) -> Result<Commit, Error> {
    Ok(Commit {
        flags: c.u8("commit flags")?,
        commit_lsn: c.lsn("commit lsn")?,
        end_lsn: c.lsn("commit end lsn")?,
        commit_time: c.i64("commit time")?,
    })
}

fn origin(c: &mut Cursor) -> Result<Origin, Error> {
    Ok(Origin {
        commit_lsn: c.lsn("origin commit lsn")?,
        name: c.cstring("origin name")?,
    })
}

fn relation(c: &mut Cursor, xid: Option<Xid>) -> Result<Relation, Error> {
    let id = c.u32("relation oid")?;
    let namespace = c.cstring("relation namespace")?;
    let name = c.cstring("relation name")?;
    let replica_identity = match c.u8("replica identity")? {
        replica_identity::DEFAULT => ReplicaIdentity::Default,
        replica_identity::NOTHING => ReplicaIdentity::Nothing,
        replica_identity::FULL => ReplicaIdentity::Full,
        replica_identity::INDEX => ReplicaIdentity::Index,
        other => {
            return Err(invalid(
                "replica identity",
                format!("unknown byte {other:#04x}"),
            ));
        }
    };
    let ncols = c.count_i16("relation column count")?;
    let mut columns = Vec::with_capacity(ncols.min(c.remaining() / MIN_COLUMN_LEN));
    for _ in 0..ncols {
        columns.push(Column {
            is_key: c.u8("column flags")? & COLUMN_FLAG_KEY != 0,
            name: c.cstring("column name")?,
            type_id: c.u32("column type oid")?,
            type_modifier: c.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        xid,
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn type_(c: &mut Cursor, xid: Option<Xid>) -> Result<Type, Error> {
    Ok(Type {
        xid,
        id: c.u32("type oid")?,
        namespace: c.cstring("type namespace")?,
        name: c.cstring("type name")?,
    })
}

fn insert(c: &mut Cursor, xid: Option<Xid>) -> Result<Insert, Error> {
    let relation_id = c.u32("insert relation oid")?;
    expect_marker(c, "insert new tuple marker", tuple_marker::NEW)?;
    Ok(Insert {
        xid,
        relation_id,
        new: tuple(c)?,
    })
}

fn update(c: &mut Cursor, xid: Option<Xid>) -> Result<Update, Error> {
    let relation_id = c.u32("update relation oid")?;
    let old = match c.peek_u8("update tuple marker")? {
        tuple_marker::KEY | tuple_marker::OLD => Some(old_tuple(c, "update old tuple marker")?),
        _ => None,
    };
    expect_marker(c, "update new tuple marker", tuple_marker::NEW)?;
    Ok(Update {
        xid,
        relation_id,
        old,
        new: tuple(c)?,
    })
}

fn delete(c: &mut Cursor, xid: Option<Xid>) -> Result<Delete, Error> {
    Ok(Delete {
        xid,
        relation_id: c.u32("delete relation oid")?,
        old: old_tuple(c, "delete old tuple marker")?,
    })
}

fn truncate(c: &mut Cursor, xid: Option<Xid>) -> Result<Truncate, Error> {
    let nrels = c.count_i32("truncate relation count")?;
    let options = c.u8("truncate options")?;
    let mut relation_ids: Vec<Oid> = Vec::with_capacity(nrels.min(c.remaining() / OID_LEN));
    for _ in 0..nrels {
        relation_ids.push(c.u32("truncate relation oid")?);
    }
    Ok(Truncate {
        xid,
        cascade: options & TRUNCATE_CASCADE != 0,
        restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
        relation_ids,
    })
}

fn logical_message(c: &mut Cursor, xid: Option<Xid>) -> Result<LogicalMessage, Error> {
    let flags = c.u8("message flags")?;
    let lsn = c.lsn("message lsn")?;
    let prefix = c.cstring("message prefix")?;
    let len = c.count_i32("message content length")?;
    Ok(LogicalMessage {
        xid,
        transactional: flags & MESSAGE_TRANSACTIONAL != 0,
        lsn,
        prefix,
        content: c.bytes(len, "message content")?,
    })
}

fn stream_start(c: &mut Cursor) -> Result<StreamStart, Error> {
    let xid = c.u32("stream start xid")?;
    let first_segment = match c.u8("stream start first segment")? {
        0 => false,
        1 => true,
        other => {
            return Err(invalid(
                "stream start first segment",
                format!("expected 0 or 1, got {other}"),
            ));
        }
    };
    Ok(StreamStart { xid, first_segment })
}

fn stream_commit(c: &mut Cursor) -> Result<StreamCommit, Error> {
    Ok(StreamCommit {
        xid: c.u32("stream commit xid")?,
        flags: c.u8("stream commit flags")?,
        commit_lsn: c.lsn("stream commit lsn")?,
        end_lsn: c.lsn("stream commit end lsn")?,
        commit_time: c.i64("stream commit time")?,
    })
}

fn stream_abort(c: &mut Cursor) -> Result<StreamAbort, Error> {
    Ok(StreamAbort {
        xid: c.u32("stream abort xid")?,
        subxid: c.u32("stream abort subxid")?,
    })
}

/// Reads a `K` or `O` marker and the tuple after it.
fn old_tuple(c: &mut Cursor, field: &'static str) -> Result<OldTuple, Error> {
    match c.u8(field)? {
        tuple_marker::KEY => Ok(OldTuple::Key(tuple(c)?)),
        tuple_marker::OLD => Ok(OldTuple::Full(tuple(c)?)),
        other => Err(invalid(
            field,
            format!("expected 'K' or 'O', got {other:#04x}"),
        )),
    }
}

fn expect_marker(c: &mut Cursor, field: &'static str, want: u8) -> Result<(), Error> {
    match c.u8(field)? {
        got if got == want => Ok(()),
        got => Err(invalid(
            field,
            format!("expected {:?}, got {got:#04x}", char::from(want)),
        )),
    }
}

fn tuple(c: &mut Cursor) -> Result<TupleData, Error> {
    let ncols = c.count_i16("tuple column count")?;
    // Every value takes at least its kind byte.
    let mut values = Vec::with_capacity(ncols.min(c.remaining()));
    for _ in 0..ncols {
        values.push(match c.u8("tuple value kind")? {
            value_kind::NULL => Value::Null,
            value_kind::UNCHANGED_TOAST => Value::UnchangedToast,
            value_kind::TEXT => {
                let len = c.count_i32("text value length")?;
                Value::Text(c.bytes(len, "text value")?)
            }
            value_kind::BINARY => {
                let len = c.count_i32("binary value length")?;
                Value::Binary(c.bytes(len, "binary value")?)
            }
            other => {
                return Err(invalid(
                    "tuple value kind",
                    format!("unknown byte {other:#04x}"),
                ));
            }
        });
    }
    Ok(TupleData(values))
}

fn invalid(field: &'static str, detail: String) -> Error {
    Error::Invalid { field, detail }
}

/// The unread rest of a frame; every read checks the length first.
struct Cursor(Bytes);

impl Cursor {
    fn remaining(&self) -> usize {
        self.0.len()
    }

    fn need(&self, n: usize, field: &'static str) -> Result<(), Error> {
        match n.checked_sub(self.0.len()) {
            Some(needed) if needed > 0 => Err(Error::Truncated { field, needed }),
            _ => Ok(()),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Error> {
        self.need(N, field)?;
        let mut out = [0; N];
        self.0.copy_to_slice(&mut out);
        Ok(out)
    }

    fn peek_u8(&self, field: &'static str) -> Result<u8, Error> {
        self.0
            .first()
            .copied()
            .ok_or(Error::Truncated { field, needed: 1 })
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        self.array::<1>(field).map(u8::from_be_bytes)
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, Error> {
        self.array(field).map(i16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Error> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, Error> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, Error> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, Error> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, Error> {
        self.u64(field).map(Lsn)
    }

    /// An `Int16` count or length; negative is invalid.
    fn count_i16(&mut self, field: &'static str) -> Result<usize, Error> {
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| invalid(field, format!("negative value {n}")))
    }

    /// An `Int32` count or length; negative is invalid.
    fn count_i32(&mut self, field: &'static str) -> Result<usize, Error> {
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| invalid(field, format!("negative value {n}")))
    }

    /// The next `n` bytes, as a slice of the frame.
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, Error> {
        self.need(n, field)?;
        Ok(self.0.split_to(n))
    }

    /// A NUL-terminated UTF-8 string; the NUL is consumed, not returned.
    fn cstring(&mut self, field: &'static str) -> Result<String, Error> {
        let Some(len) = self.0.iter().position(|&b| b == 0) else {
            return Err(Error::Truncated { field, needed: 1 });
        };
        let raw = self.0.split_to(len);
        self.0.advance(1); // the NUL found above, so this cannot run past the end
        String::from_utf8(raw.to_vec()).map_err(|e| invalid(field, format!("not utf-8: {e}")))
    }

    fn finish(self) -> Result<(), Error> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(Error::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// Test-only encoder: writes pgoutput wire bytes by hand.
    struct Frame(BytesMut);

    impl Frame {
        fn new(tag: u8) -> Self {
            Self(BytesMut::from(&[tag][..]))
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.put_u8(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.put_i16(v);
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.put_u32(v);
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.put_i32(v);
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.put_u64(v);
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.put_i64(v);
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.put_slice(v);
            self
        }
        fn cstr(self, s: &str) -> Self {
            self.raw(s.as_bytes()).u8(0)
        }
        fn len_prefixed(self, v: &[u8]) -> Self {
            self.i32(i32::try_from(v.len()).unwrap()).raw(v)
        }
        fn tuple(self, values: &[Value]) -> Self {
            let mut f = self.i16(i16::try_from(values.len()).unwrap());
            for v in values {
                f = match v {
                    Value::Null => f.u8(b'n'),
                    Value::UnchangedToast => f.u8(b'u'),
                    Value::Text(b) => f.u8(b't').len_prefixed(b),
                    Value::Binary(b) => f.u8(b'b').len_prefixed(b),
                };
            }
            f
        }
        fn xid(self, xid: Option<Xid>) -> Self {
            match xid {
                Some(x) => self.u32(x),
                None => self,
            }
        }
        fn build(self) -> Bytes {
            self.0.freeze()
        }
    }

    /// A frame and what it must decode to.
    struct Fixture {
        name: &'static str,
        /// Decode after a `StreamStart`, inside a streamed chunk.
        in_stream: bool,
        frame: Bytes,
        want: Message,
    }

    const STREAM_XID: Xid = 900;

    fn fixture(name: &'static str, xid: Option<Xid>, frame: Frame, want: Message) -> Fixture {
        Fixture {
            name,
            in_stream: xid.is_some(),
            frame: frame.build(),
            want,
        }
    }

    /// Decodes `frame` with a fresh decoder, first entering a streamed chunk if asked.
    fn decode(in_stream: bool, frame: Bytes) -> Result<Message, Error> {
        let mut decoder = Decoder::new();
        if in_stream {
            decoder.decode(stream_start().frame).unwrap();
        }
        decoder.decode(frame)
    }

    fn check(f: &Fixture) {
        assert_eq!(
            decode(f.in_stream, f.frame.clone()),
            Ok(f.want.clone()),
            "{}",
            f.name
        );
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row() -> Vec<Value> {
        vec![
            text("42"),
            Value::Null,
            Value::UnchangedToast,
            Value::Binary(Bytes::from_static(&[0, 0xff, 7])),
            text(""),
        ]
    }

    fn key() -> Vec<Value> {
        vec![
            text("42"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ]
    }

    fn begin() -> Fixture {
        fixture(
            "begin",
            None,
            Frame::new(b'B').u64(0x16_B374_D848).i64(-5).u32(771),
            Message::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time: -5,
                xid: 771,
            }),
        )
    }

    fn commit() -> Fixture {
        fixture(
            "commit",
            None,
            Frame::new(b'C')
                .u8(0)
                .u64(10)
                .u64(20)
                .i64(746_000_000_000_000),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time: 746_000_000_000_000,
            }),
        )
    }

    fn origin() -> Fixture {
        fixture(
            "origin",
            None,
            Frame::new(b'O').u64(33).cstr("upstream"),
            Message::Origin(Origin {
                commit_lsn: Lsn(33),
                name: "upstream".into(),
            }),
        )
    }

    fn relation(identity_byte: u8, replica_identity: ReplicaIdentity, xid: Option<Xid>) -> Fixture {
        let frame = Frame::new(b'R')
            .xid(xid)
            .u32(16_384)
            .cstr("public")
            .cstr("accounts")
            .u8(identity_byte)
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .u32(1043)
            .i32(68);
        let want = Message::Relation(Relation {
            xid,
            id: 16_384,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity,
            columns: vec![
                Column {
                    is_key: true,
                    name: "id".into(),
                    type_id: 23,
                    type_modifier: -1,
                },
                Column {
                    is_key: false,
                    name: "name".into(),
                    type_id: 1043,
                    type_modifier: 68,
                },
            ],
        });
        fixture("relation", xid, frame, want)
    }

    fn relation_in_pg_catalog() -> Fixture {
        fixture(
            "relation in pg_catalog",
            None,
            Frame::new(b'R')
                .u32(1259)
                .cstr("")
                .cstr("pg_class")
                .u8(b'n')
                .i16(0),
            Message::Relation(Relation {
                xid: None,
                id: 1259,
                namespace: String::new(),
                name: "pg_class".into(),
                replica_identity: ReplicaIdentity::Nothing,
                columns: vec![],
            }),
        )
    }

    fn type_msg(xid: Option<Xid>) -> Fixture {
        fixture(
            "type",
            xid,
            Frame::new(b'Y')
                .xid(xid)
                .u32(70_000)
                .cstr("app")
                .cstr("mood"),
            Message::Type(Type {
                xid,
                id: 70_000,
                namespace: "app".into(),
                name: "mood".into(),
            }),
        )
    }

    fn insert(xid: Option<Xid>) -> Fixture {
        fixture(
            "insert",
            xid,
            Frame::new(b'I').xid(xid).u32(16_384).u8(b'N').tuple(&row()),
            Message::Insert(Insert {
                xid,
                relation_id: 16_384,
                new: TupleData(row()),
            }),
        )
    }

    fn update_with_key(xid: Option<Xid>) -> Fixture {
        fixture(
            "update with key",
            xid,
            Frame::new(b'U')
                .xid(xid)
                .u32(5)
                .u8(b'K')
                .tuple(&key())
                .u8(b'N')
                .tuple(&row()),
            Message::Update(Update {
                xid,
                relation_id: 5,
                old: Some(OldTuple::Key(TupleData(key()))),
                new: TupleData(row()),
            }),
        )
    }

    fn update_with_old_row() -> Fixture {
        fixture(
            "update with old row",
            None,
            Frame::new(b'U')
                .u32(5)
                .u8(b'O')
                .tuple(&row())
                .u8(b'N')
                .tuple(&[text("43")]),
            Message::Update(Update {
                xid: None,
                relation_id: 5,
                old: Some(OldTuple::Full(TupleData(row()))),
                new: TupleData(vec![text("43")]),
            }),
        )
    }

    fn update_without_old() -> Fixture {
        fixture(
            "update without old",
            None,
            Frame::new(b'U').u32(5).u8(b'N').tuple(&row()),
            Message::Update(Update {
                xid: None,
                relation_id: 5,
                old: None,
                new: TupleData(row()),
            }),
        )
    }

    fn delete_with_key(xid: Option<Xid>) -> Fixture {
        fixture(
            "delete with key",
            xid,
            Frame::new(b'D').xid(xid).u32(6).u8(b'K').tuple(&key()),
            Message::Delete(Delete {
                xid,
                relation_id: 6,
                old: OldTuple::Key(TupleData(key())),
            }),
        )
    }

    fn delete_with_old_row() -> Fixture {
        fixture(
            "delete with old row",
            None,
            Frame::new(b'D').u32(6).u8(b'O').tuple(&row()),
            Message::Delete(Delete {
                xid: None,
                relation_id: 6,
                old: OldTuple::Full(TupleData(row())),
            }),
        )
    }

    fn truncate_msg(options: u8, xid: Option<Xid>) -> Fixture {
        fixture(
            "truncate",
            xid,
            Frame::new(b'T').xid(xid).i32(2).u8(options).u32(7).u32(8),
            Message::Truncate(Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids: vec![7, 8],
            }),
        )
    }

    fn message(flags: u8, xid: Option<Xid>) -> Fixture {
        fixture(
            "message",
            xid,
            Frame::new(b'M')
                .xid(xid)
                .u8(flags)
                .u64(99)
                .cstr("walcast")
                .len_prefixed(b"hi\0there"),
            Message::Message(LogicalMessage {
                xid,
                transactional: flags & 1 != 0,
                lsn: Lsn(99),
                prefix: "walcast".into(),
                content: Bytes::from_static(b"hi\0there"),
            }),
        )
    }

    fn stream_start() -> Fixture {
        fixture(
            "stream start",
            None,
            Frame::new(b'S').u32(STREAM_XID).u8(1),
            Message::StreamStart(StreamStart {
                xid: STREAM_XID,
                first_segment: true,
            }),
        )
    }

    fn stream_stop() -> Fixture {
        fixture(
            "stream stop",
            Some(STREAM_XID),
            Frame::new(b'E'),
            Message::StreamStop,
        )
    }

    fn stream_commit() -> Fixture {
        fixture(
            "stream commit",
            None,
            Frame::new(b'c')
                .u32(STREAM_XID)
                .u8(0)
                .u64(100)
                .u64(120)
                .i64(77),
            Message::StreamCommit(StreamCommit {
                xid: STREAM_XID,
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(120),
                commit_time: 77,
            }),
        )
    }

    fn stream_abort() -> Fixture {
        fixture(
            "stream abort",
            None,
            Frame::new(b'A').u32(STREAM_XID).u32(901),
            Message::StreamAbort(StreamAbort {
                xid: STREAM_XID,
                subxid: 901,
            }),
        )
    }

    const IDENTITIES: [(u8, ReplicaIdentity); 4] = [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ];

    fn all_fixtures() -> Vec<Fixture> {
        let mut all = vec![
            begin(),
            commit(),
            origin(),
            relation_in_pg_catalog(),
            update_with_old_row(),
            update_without_old(),
            delete_with_old_row(),
            stream_start(),
            stream_stop(),
            stream_commit(),
            stream_abort(),
        ];
        for (byte, identity) in IDENTITIES {
            all.push(relation(byte, identity, None));
        }
        for options in 0..4 {
            all.push(truncate_msg(options, None));
        }
        for xid in [None, Some(STREAM_XID)] {
            all.extend([
                relation(b'd', ReplicaIdentity::Default, xid),
                type_msg(xid),
                insert(xid),
                update_with_key(xid),
                delete_with_key(xid),
                truncate_msg(3, xid),
                message(0, xid),
                message(1, xid),
            ]);
        }
        all
    }

    #[test]
    fn begin_decodes_lsn_time_and_xid() {
        check(&begin());
    }

    #[test]
    fn commit_decodes_flags_lsns_and_time() {
        check(&commit());
    }

    #[test]
    fn origin_decodes_lsn_and_name() {
        check(&origin());
    }

    #[test]
    fn relation_decodes_key_and_non_key_columns_for_every_replica_identity() {
        for (byte, identity) in IDENTITIES {
            check(&relation(byte, identity, None));
        }
    }

    #[test]
    fn relation_keeps_empty_pg_catalog_namespace_as_sent() {
        check(&relation_in_pg_catalog());
    }

    #[test]
    fn type_decodes_oid_namespace_and_name() {
        check(&type_msg(None));
    }

    #[test]
    fn insert_decodes_null_toast_text_and_binary_values() {
        check(&insert(None));
    }

    #[test]
    fn update_with_key_old_tuple_decodes_key() {
        check(&update_with_key(None));
    }

    #[test]
    fn update_with_full_old_tuple_decodes_old_row() {
        check(&update_with_old_row());
    }

    #[test]
    fn update_without_old_tuple_decodes_new_row_only() {
        check(&update_without_old());
    }

    #[test]
    fn delete_with_key_old_tuple_decodes_key() {
        check(&delete_with_key(None));
    }

    #[test]
    fn delete_with_full_old_tuple_decodes_old_row() {
        check(&delete_with_old_row());
    }

    #[test]
    fn truncate_decodes_cascade_and_restart_identity_bits() {
        for options in 0..4 {
            check(&truncate_msg(options, None));
        }
        let Ok(Message::Truncate(t)) = decode(false, truncate_msg(3, None).frame) else {
            panic!("not a truncate");
        };
        assert!(t.cascade && t.restart_identity);
    }

    #[test]
    fn transactional_message_decodes_prefix_and_content() {
        check(&message(1, None));
    }

    #[test]
    fn non_transactional_message_decodes_as_non_transactional() {
        check(&message(0, None));
    }

    #[test]
    fn stream_start_stop_commit_and_abort_decode() {
        for f in [
            stream_start(),
            stream_stop(),
            stream_commit(),
            stream_abort(),
        ] {
            check(&f);
        }
        let not_first = Frame::new(b'S').u32(5).u8(0).build();
        let want = Message::StreamStart(StreamStart {
            xid: 5,
            first_segment: false,
        });
        assert_eq!(decode(false, not_first), Ok(want));
    }

    #[test]
    fn messages_in_a_stream_chunk_carry_xid_and_outside_do_not() {
        for xid in [None, Some(STREAM_XID)] {
            for f in [
                relation(b'f', ReplicaIdentity::Full, xid),
                type_msg(xid),
                insert(xid),
                update_with_key(xid),
                delete_with_key(xid),
                truncate_msg(1, xid),
                message(1, xid),
            ] {
                check(&f);
            }
        }

        // One decoder through a whole stream chunk and out again.
        let mut d = Decoder::new();
        assert_eq!(
            d.decode(relation(b'd', ReplicaIdentity::Default, None).frame),
            Ok(relation(b'd', ReplicaIdentity::Default, None).want)
        );
        assert_eq!(d.decode(stream_start().frame), Ok(stream_start().want));
        let inside = relation(b'd', ReplicaIdentity::Default, Some(STREAM_XID));
        assert_eq!(d.decode(inside.frame), Ok(inside.want));
        assert_eq!(
            d.decode(insert(Some(STREAM_XID)).frame),
            Ok(insert(Some(STREAM_XID)).want)
        );
        assert_eq!(d.decode(stream_stop().frame), Ok(Message::StreamStop));
        assert_eq!(d.decode(insert(None).frame), Ok(insert(None).want));
        assert_eq!(d.decode(stream_commit().frame), Ok(stream_commit().want));
    }

    #[test]
    fn failed_message_leaves_stream_state_unchanged() {
        let mut d = Decoder::new();
        d.decode(stream_start().frame).unwrap();
        let stop_with_junk = Frame::new(b'E').u8(0).build();
        assert_eq!(d.decode(stop_with_junk), Err(Error::Trailing(1)));
        let inside = insert(Some(STREAM_XID));
        assert_eq!(d.decode(inside.frame), Ok(inside.want));

        d.decode(stream_stop().frame).unwrap();
        assert!(d.decode(Frame::new(b'S').u32(1).build()).is_err());
        let outside = insert(None);
        assert_eq!(d.decode(outside.frame), Ok(outside.want));
    }

    #[test]
    fn every_strict_prefix_of_every_fixture_is_an_error() {
        for f in all_fixtures() {
            for n in 0..f.frame.len() {
                let got = decode(f.in_stream, f.frame.slice(..n));
                assert!(
                    got.is_err(),
                    "{} prefix of {n} bytes decoded: {got:?}",
                    f.name
                );
            }
        }
    }

    #[test]
    fn an_extra_trailing_byte_is_reported_as_trailing() {
        for f in all_fixtures() {
            let mut longer = BytesMut::from(&f.frame[..]);
            longer.put_u8(0);
            assert_eq!(
                decode(f.in_stream, longer.freeze()),
                Err(Error::Trailing(1)),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn values_and_message_content_are_slices_of_the_frame() {
        let f = insert(None);
        let range = f.frame.as_ptr_range();
        let Ok(Message::Insert(insert)) = decode(false, f.frame) else {
            panic!("not an insert");
        };
        for v in &insert.new.0 {
            if let Value::Text(b) | Value::Binary(b) = v {
                assert!(
                    b.is_empty() || range.contains(&b.as_ptr()),
                    "{v:?} was copied"
                );
            }
        }
        let m = message(1, None);
        let range = m.frame.as_ptr_range();
        let Ok(Message::Message(msg)) = decode(false, m.frame) else {
            panic!("not a message");
        };
        assert!(
            range.contains(&msg.content.as_ptr()),
            "message content was copied"
        );
    }

    #[test]
    fn huge_announced_counts_and_lengths_fail_fast() {
        let frames = [
            Frame::new(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .i16(i16::MAX),
            Frame::new(b'I').u32(1).u8(b'N').i16(i16::MAX).u8(b'n'),
            Frame::new(b'I')
                .u32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(i32::MAX)
                .raw(b"abc"),
            Frame::new(b'T').i32(i32::MAX).u8(0).u32(1),
            Frame::new(b'M').u8(1).u64(0).cstr("p").i32(i32::MAX),
        ];
        for frame in frames {
            let frame = frame.build();
            assert!(
                matches!(decode(false, frame.clone()), Err(Error::Truncated { .. })),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn negative_counts_and_lengths_are_invalid() {
        let frames = [
            Frame::new(b'R').u32(1).cstr("s").cstr("t").u8(b'd').i16(-1),
            Frame::new(b'I').u32(1).u8(b'N').i16(-3),
            Frame::new(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(-1),
            Frame::new(b'T').i32(i32::MIN).u8(0),
            Frame::new(b'M').u8(1).u64(0).cstr("p").i32(-1),
        ];
        for frame in frames {
            let frame = frame.build();
            assert!(
                matches!(decode(false, frame.clone()), Err(Error::Invalid { .. })),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn unknown_tag_is_reported() {
        assert_eq!(
            decode(false, Bytes::from_static(b"Z")),
            Err(Error::UnknownTag(b'Z'))
        );
    }

    #[test]
    fn empty_frame_is_truncated() {
        assert_eq!(
            decode(false, Bytes::new()),
            Err(Error::Truncated {
                field: "message tag",
                needed: 1
            })
        );
    }

    #[test]
    fn unknown_replica_identity_is_invalid() {
        let frame = Frame::new(b'R')
            .u32(1)
            .cstr("s")
            .cstr("t")
            .u8(b'x')
            .i16(0)
            .build();
        assert!(matches!(
            decode(false, frame),
            Err(Error::Invalid {
                field: "replica identity",
                ..
            })
        ));
    }

    #[test]
    fn unknown_tuple_value_kind_is_invalid() {
        let frame = Frame::new(b'I').u32(1).u8(b'N').i16(1).u8(b'x').build();
        assert!(matches!(
            decode(false, frame),
            Err(Error::Invalid {
                field: "tuple value kind",
                ..
            })
        ));
    }

    #[test]
    fn wrong_tuple_markers_are_invalid() {
        let frames = [
            Frame::new(b'I').u32(1).u8(b'K').i16(0),
            Frame::new(b'U').u32(1).u8(b'X').i16(0),
            Frame::new(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0),
            Frame::new(b'D').u32(1).u8(b'N').i16(0),
        ];
        for frame in frames {
            let frame = frame.build();
            assert!(
                matches!(decode(false, frame.clone()), Err(Error::Invalid { .. })),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn stream_start_first_segment_other_than_zero_or_one_is_invalid() {
        let frame = Frame::new(b'S').u32(1).u8(2).build();
        assert!(matches!(decode(false, frame), Err(Error::Invalid { .. })));
    }

    #[test]
    fn non_utf8_string_is_invalid() {
        let frame = Frame::new(b'O').u64(1).raw(&[0xff, 0xfe, 0]).build();
        assert!(matches!(
            decode(false, frame),
            Err(Error::Invalid {
                field: "origin name",
                ..
            })
        ));
    }

    #[test]
    fn missing_nul_terminator_is_truncated() {
        let frame = Frame::new(b'O').u64(1).raw(b"upstream").build();
        assert_eq!(
            decode(false, frame),
            Err(Error::Truncated {
                field: "origin name",
                needed: 1
            })
        );
    }

    #[test]
    fn truncated_fixed_field_reports_missing_bytes() {
        let frame = Frame::new(b'B').u64(1).u32(0).build();
        assert_eq!(
            decode(false, frame),
            Err(Error::Truncated {
                field: "begin commit time",
                needed: 4
            })
        );
    }

    #[test]
    fn error_messages_are_lowercase() {
        let frame = Frame::new(b'R')
            .u32(1)
            .cstr("s")
            .cstr("t")
            .u8(b'x')
            .i16(0)
            .build();
        let msg = decode(false, frame).unwrap_err().to_string();
        assert_eq!(msg, "invalid pgoutput replica identity: unknown byte 0x78");
    }
}
