//! A change → the Supabase `data` object, following Supabase Realtime's
//! payload rules (see `docs/bus.md`).
//!
//! Key order follows Supabase's `changes.ex` (`columns`, `commit_timestamp`,
//! `errors`, `schema`, `table`, `old_record`, `record`, `type`); `record`
//! and `old_record` list columns in table order.

use super::{write_commit_timestamp, write_json_string, write_value};
use crate::change::{Change, ChangeKind, Column, Datum, OldRow, Row};

/// Supabase's error for INSERT/UPDATE on a table without a primary key.
pub const NO_PRIMARY_KEY: &str = "Error 400: Bad Request, no primary key";
/// Supabase's error for a change whose records exceed `max_record_bytes`.
pub const PAYLOAD_TOO_LARGE: &str = "Error 413: Payload Too Large";
/// In an oversized change, values whose JSON is longer than this are dropped.
const LARGE_VALUE_BYTES: usize = 64;

/// Writes `data` objects, reusing its buffers from change to change.
#[derive(Debug)]
pub struct PayloadEncoder {
    max_record_bytes: usize,
    old_record: Vec<u8>,
    record: Vec<u8>,
}

impl PayloadEncoder {
    /// An encoder that applies the 413 rule above `max_record_bytes` of
    /// `record` plus `old_record` JSON.
    pub fn new(max_record_bytes: usize) -> Self {
        PayloadEncoder {
            max_record_bytes,
            old_record: Vec::new(),
            record: Vec::new(),
        }
    }

    /// Writes the `data` object for `change`.
    pub fn write_data(&mut self, out: &mut Vec<u8>, change: &Change) {
        let relation = &change.relation;
        let inserts_or_updates = matches!(
            change.kind,
            ChangeKind::Insert { .. } | ChangeKind::Update { .. }
        );
        if inserts_or_updates && !relation.has_primary_key {
            return write_error_payload(out, change, NO_PRIMARY_KEY);
        }
        let too_large = self.records(change, usize::MAX);
        if too_large {
            self.records(change, LARGE_VALUE_BYTES);
        }
        out.extend_from_slice(b"{\"columns\":[");
        for (i, column) in relation.columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"name\":");
            write_json_string(out, column.name.as_bytes());
            out.extend_from_slice(b",\"type\":");
            write_json_string(out, column.ty.name.as_bytes());
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"commit_timestamp\":");
        write_commit_timestamp(out, change.commit_time);
        out.extend_from_slice(b",\"errors\":");
        if too_large {
            out.extend_from_slice(b"[\"");
            out.extend_from_slice(PAYLOAD_TOO_LARGE.as_bytes());
            out.extend_from_slice(b"\"]");
        } else {
            out.extend_from_slice(b"null");
        }
        write_names(out, change);
        if matches!(
            change.kind,
            ChangeKind::Update { .. } | ChangeKind::Delete { .. }
        ) {
            out.extend_from_slice(b",\"old_record\":");
            out.extend_from_slice(&self.old_record);
        }
        if inserts_or_updates {
            out.extend_from_slice(b",\"record\":");
            out.extend_from_slice(&self.record);
        }
        write_type(out, change);
    }

    /// Renders `old_record` and `record` into the scratch buffers, leaving
    /// out values longer than `value_limit`; returns whether together they
    /// exceed `max_record_bytes`.
    fn records(&mut self, change: &Change, value_limit: usize) -> bool {
        self.old_record.clear();
        self.record.clear();
        let columns = &change.relation.columns;
        match &change.kind {
            ChangeKind::Insert { new } => {
                write_record(&mut self.record, columns, new, None, value_limit)
            }
            ChangeKind::Update { old, new } => {
                match old {
                    Some(OldRow::Full(row)) => {
                        write_record(&mut self.old_record, columns, row, None, value_limit)
                    }
                    Some(OldRow::Key(row)) => {
                        write_key(&mut self.old_record, columns, row, value_limit)
                    }
                    // The key did not change: it is in the new row.
                    None => write_key(&mut self.old_record, columns, new, value_limit),
                }
                let fallback = match old {
                    Some(OldRow::Full(row)) => Some(row),
                    _ => None,
                };
                write_record(&mut self.record, columns, new, fallback, value_limit);
            }
            ChangeKind::Delete { old } => match old {
                OldRow::Full(row) => {
                    write_record(&mut self.old_record, columns, row, None, value_limit)
                }
                OldRow::Key(row) => write_key(&mut self.old_record, columns, row, value_limit),
            },
            ChangeKind::Truncate { .. } => {}
        }
        self.old_record.len() + self.record.len() > self.max_record_bytes
    }
}

/// The shape Supabase sends when it cannot check a change: no columns, no
/// commit time, empty records, one error.
fn write_error_payload(out: &mut Vec<u8>, change: &Change, error: &str) {
    out.extend_from_slice(b"{\"columns\":[],\"commit_timestamp\":null,\"errors\":[");
    write_json_string(out, error.as_bytes());
    out.push(b']');
    write_names(out, change);
    if matches!(change.kind, ChangeKind::Update { .. }) {
        out.extend_from_slice(b",\"old_record\":{}");
    }
    out.extend_from_slice(b",\"record\":{}");
    write_type(out, change);
}

fn write_names(out: &mut Vec<u8>, change: &Change) {
    out.extend_from_slice(b",\"schema\":");
    write_json_string(out, change.relation.schema.as_bytes());
    out.extend_from_slice(b",\"table\":");
    write_json_string(out, change.relation.table.as_bytes());
}

fn write_type(out: &mut Vec<u8>, change: &Change) {
    out.extend_from_slice(b",\"type\":\"");
    out.extend_from_slice(change.kind.name().as_bytes());
    out.extend_from_slice(b"\"}");
}

/// All columns of `row`. An unchanged TOAST value is taken from `fallback`
/// (the old row under REPLICA IDENTITY FULL) or else left out: its value is
/// unknown, and an absent key is what Supabase clients expect.
fn write_record(
    out: &mut Vec<u8>,
    columns: &[Column],
    row: &Row,
    fallback: Option<&Row>,
    value_limit: usize,
) {
    let fields =
        columns
            .iter()
            .zip(row)
            .enumerate()
            .filter_map(|(i, (column, datum))| match datum {
                Datum::UnchangedToast => fallback
                    .and_then(|old| old.get(i))
                    .filter(|d| !matches!(d, Datum::UnchangedToast))
                    .map(|d| (column, d)),
                _ => Some((column, datum)),
            });
    write_object(out, fields, value_limit);
}

/// Only the replica identity key columns of `row`.
fn write_key(out: &mut Vec<u8>, columns: &[Column], row: &Row, value_limit: usize) {
    let fields = columns
        .iter()
        .zip(row)
        .filter(|(column, datum)| column.is_key && !matches!(datum, Datum::UnchangedToast));
    write_object(out, fields, value_limit);
}

fn write_object<'a>(
    out: &mut Vec<u8>,
    fields: impl Iterator<Item = (&'a Column, &'a Datum)>,
    value_limit: usize,
) {
    out.push(b'{');
    let mut first = true;
    for (column, datum) in fields {
        let field_start = out.len();
        if !first {
            out.push(b',');
        }
        write_json_string(out, column.name.as_bytes());
        out.push(b':');
        let value_start = out.len();
        match datum {
            Datum::Text(text) => write_value(out, &column.ty, text),
            Datum::Json(json) => out.extend_from_slice(json),
            Datum::Null | Datum::UnchangedToast => out.extend_from_slice(b"null"),
        }
        if out.len() - value_start > value_limit {
            out.truncate(field_start);
        } else {
            first = false;
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::catalog::builtin;
    use crate::change::Relation;
    use crate::lsn::Lsn;
    use crate::pgoutput::ReplicaIdentity;

    fn column(name: &str, oid: u32, is_key: bool) -> Column {
        Column {
            name: name.into(),
            type_modifier: -1,
            is_key,
            is_primary_key: is_key,
            ty: builtin(oid).unwrap(),
        }
    }

    fn change_of(kind: ChangeKind, has_primary_key: bool) -> Change {
        Change {
            commit_lsn: Lsn(1),
            commit_time: 0,
            seq: 0,
            xid: 1,
            relation: Arc::new(Relation {
                id: 1,
                schema: "public".into(),
                table: "notes".into(),
                replica_identity: ReplicaIdentity::Default,
                has_primary_key,
                columns: vec![
                    column("id", 20, true),
                    column("body", 25, false),
                    column("meta", 3802, false),
                ],
            }),
            kind,
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn render_with(max: usize, kind: ChangeKind, has_primary_key: bool) -> String {
        let mut out = Vec::new();
        PayloadEncoder::new(max).write_data(&mut out, &change_of(kind, has_primary_key));
        String::from_utf8(out).unwrap()
    }

    fn render(kind: ChangeKind) -> String {
        render_with(1 << 20, kind, true)
    }

    const COLUMNS: &str = r#"{"columns":[{"name":"id","type":"int8"},{"name":"body","type":"text"},{"name":"meta","type":"jsonb"}],"commit_timestamp":"2000-01-01T00:00:00.000Z""#;
    const NAMES: &str = r#""schema":"public","table":"notes""#;

    #[test]
    fn update_without_old_tuple_sends_key_from_new_row_and_omits_unchanged_toast() {
        let json = render(ChangeKind::Update {
            old: None,
            new: vec![text("7"), text("hi"), Datum::UnchangedToast],
        });
        assert_eq!(
            json,
            format!(
                r#"{COLUMNS},"errors":null,{NAMES},"old_record":{{"id":7}},"record":{{"id":7,"body":"hi"}},"type":"UPDATE"}}"#
            )
        );
    }

    #[test]
    fn update_under_full_identity_fills_unchanged_toast_from_old_row() {
        let json = render(ChangeKind::Update {
            old: Some(OldRow::Full(vec![
                text("7"),
                text("old"),
                text("{\"k\": 1}"),
            ])),
            new: vec![text("7"), text("new"), Datum::UnchangedToast],
        });
        assert_eq!(
            json,
            format!(
                r#"{COLUMNS},"errors":null,{NAMES},"old_record":{{"id":7,"body":"old","meta":{{"k": 1}}}},"record":{{"id":7,"body":"new","meta":{{"k": 1}}}},"type":"UPDATE"}}"#
            )
        );
    }

    #[test]
    fn delete_with_key_lists_only_key_columns() {
        let json = render(ChangeKind::Delete {
            old: OldRow::Key(vec![text("7"), Datum::Null, Datum::Null]),
        });
        assert_eq!(
            json,
            format!(r#"{COLUMNS},"errors":null,{NAMES},"old_record":{{"id":7}},"type":"DELETE"}}"#)
        );
    }

    #[test]
    fn insert_and_truncate() {
        let json = render(ChangeKind::Insert {
            new: vec![text("1"), Datum::Null, text("[]")],
        });
        assert_eq!(
            json,
            format!(
                r#"{COLUMNS},"errors":null,{NAMES},"record":{{"id":1,"body":null,"meta":[]}},"type":"INSERT"}}"#
            )
        );
        let json = render(ChangeKind::Truncate {
            cascade: false,
            restart_identity: false,
        });
        assert_eq!(
            json,
            format!(r#"{COLUMNS},"errors":null,{NAMES},"type":"TRUNCATE"}}"#)
        );
    }

    #[test]
    fn no_primary_key_gives_the_400_shape_for_inserts_and_updates_only() {
        let insert = render_with(
            1 << 20,
            ChangeKind::Insert {
                new: vec![text("1"), text("x"), Datum::Null],
            },
            false,
        );
        assert_eq!(
            insert,
            format!(
                r#"{{"columns":[],"commit_timestamp":null,"errors":["Error 400: Bad Request, no primary key"],{NAMES},"record":{{}},"type":"INSERT"}}"#
            )
        );
        let update = render_with(
            1 << 20,
            ChangeKind::Update {
                old: None,
                new: vec![text("1"), text("x"), Datum::Null],
            },
            false,
        );
        assert_eq!(
            update,
            format!(
                r#"{{"columns":[],"commit_timestamp":null,"errors":["Error 400: Bad Request, no primary key"],{NAMES},"old_record":{{}},"record":{{}},"type":"UPDATE"}}"#
            )
        );
        let delete = render_with(
            1 << 20,
            ChangeKind::Delete {
                old: OldRow::Full(vec![text("1"), text("x"), Datum::Null]),
            },
            false,
        );
        assert_eq!(
            delete,
            format!(
                r#"{COLUMNS},"errors":null,{NAMES},"old_record":{{"id":1,"body":"x","meta":null}},"type":"DELETE"}}"#
            )
        );
    }

    #[test]
    fn oversized_records_keep_only_values_of_at_most_64_bytes() {
        let long = "x".repeat(63); // 65 bytes of JSON with its quotes
        let short = "y".repeat(62); // 64 bytes
        let kind = || ChangeKind::Update {
            old: Some(OldRow::Full(vec![text("1"), text(&long), Datum::Null])),
            new: vec![text("1"), text(&short), text("{\"a\": 1}")],
        };
        let json = render_with(100, kind(), true);
        assert_eq!(
            json,
            format!(
                r#"{COLUMNS},"errors":["Error 413: Payload Too Large"],{NAMES},"old_record":{{"id":1,"meta":null}},"record":{{"id":1,"body":"{short}","meta":{{"a": 1}}}},"type":"UPDATE"}}"#
            )
        );
        // Under the limit nothing is dropped.
        assert!(render_with(1 << 20, kind(), true).contains(&long));
    }
}
