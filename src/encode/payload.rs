//! A change → the Supabase `data` object.
//!
//! Key order follows Supabase's `changes.ex` (`columns`, `commit_timestamp`,
//! `errors`, `schema`, `table`, `old_record`, `record`, `type`); `record`
//! and `old_record` list columns in table order.

use super::{write_commit_timestamp, write_json_string, write_value};
use crate::change::{Change, ChangeKind, Column, Datum, OldRow, Row};

/// Writes the `data` object for `change`.
pub fn write_data(out: &mut Vec<u8>, change: &Change) {
    let relation = &change.relation;
    out.extend_from_slice(b"{\"columns\":[");
    for (i, column) in relation.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        write_json_string(out, column.name.as_bytes());
        out.extend_from_slice(b",\"type\":");
        match &column.type_name {
            Some(name) => write_json_string(out, name.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"commit_timestamp\":");
    write_commit_timestamp(out, change.commit_time);
    out.extend_from_slice(b",\"errors\":null,\"schema\":");
    write_json_string(out, relation.schema.as_bytes());
    out.extend_from_slice(b",\"table\":");
    write_json_string(out, relation.table.as_bytes());
    let columns = &relation.columns;
    match &change.kind {
        ChangeKind::Insert { new } => {
            out.extend_from_slice(b",\"record\":");
            write_record(out, columns, new, None);
        }
        ChangeKind::Update { old, new } => {
            out.extend_from_slice(b",\"old_record\":");
            match old {
                Some(OldRow::Full(row)) => write_record(out, columns, row, None),
                Some(OldRow::Key(row)) => write_key(out, columns, row),
                // The key did not change: it is in the new row.
                None => write_key(out, columns, new),
            }
            out.extend_from_slice(b",\"record\":");
            let fallback = match old {
                Some(OldRow::Full(row)) => Some(row),
                _ => None,
            };
            write_record(out, columns, new, fallback);
        }
        ChangeKind::Delete { old } => {
            out.extend_from_slice(b",\"old_record\":");
            match old {
                OldRow::Full(row) => write_record(out, columns, row, None),
                OldRow::Key(row) => write_key(out, columns, row),
            }
        }
        ChangeKind::Truncate { .. } => {}
    }
    out.extend_from_slice(b",\"type\":\"");
    out.extend_from_slice(change.kind.name().as_bytes());
    out.extend_from_slice(b"\"}");
}

/// All columns of `row`. An unchanged TOAST value is taken from `fallback`
/// (the old row under REPLICA IDENTITY FULL) or else left out: its value is
/// unknown, and an absent key is what Supabase clients expect.
fn write_record(out: &mut Vec<u8>, columns: &[Column], row: &Row, fallback: Option<&Row>) {
    write_object(
        out,
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
            }),
    );
}

/// Only the replica identity key columns of `row`.
fn write_key(out: &mut Vec<u8>, columns: &[Column], row: &Row) {
    write_object(
        out,
        columns
            .iter()
            .zip(row)
            .filter(|(column, datum)| column.is_key && !matches!(datum, Datum::UnchangedToast)),
    );
}

fn write_object<'a>(out: &mut Vec<u8>, fields: impl Iterator<Item = (&'a Column, &'a Datum)>) {
    out.push(b'{');
    for (i, (column, datum)) in fields.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(out, column.name.as_bytes());
        out.push(b':');
        match datum {
            Datum::Text(text) => write_value(out, column.type_id, text),
            Datum::Null | Datum::UnchangedToast => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::change::Relation;
    use crate::lsn::Lsn;
    use crate::pgoutput::ReplicaIdentity;

    fn column(name: &str, type_id: u32, type_name: &str, is_key: bool) -> Column {
        Column {
            name: name.into(),
            type_id,
            type_modifier: -1,
            is_key,
            type_name: Some(Arc::from(type_name)),
        }
    }

    fn change(kind: ChangeKind) -> Change {
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
                columns: vec![
                    column("id", 20, "int8", true),
                    column("body", 25, "text", false),
                    column("meta", 3802, "jsonb", false),
                ],
            }),
            kind,
        }
    }

    fn text(s: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(s.as_bytes()))
    }

    fn render(kind: ChangeKind) -> String {
        let mut out = Vec::new();
        write_data(&mut out, &change(kind));
        String::from_utf8(out).unwrap()
    }

    const PREFIX: &str = r#"{"columns":[{"name":"id","type":"int8"},{"name":"body","type":"text"},{"name":"meta","type":"jsonb"}],"commit_timestamp":"2000-01-01T00:00:00.000Z","errors":null,"schema":"public","table":"notes""#;

    #[test]
    fn update_without_old_tuple_sends_key_from_new_row_and_omits_unchanged_toast() {
        let json = render(ChangeKind::Update {
            old: None,
            new: vec![text("7"), text("hi"), Datum::UnchangedToast],
        });
        assert_eq!(
            json,
            format!(
                r#"{PREFIX},"old_record":{{"id":7}},"record":{{"id":7,"body":"hi"}},"type":"UPDATE"}}"#
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
                r#"{PREFIX},"old_record":{{"id":7,"body":"old","meta":{{"k": 1}}}},"record":{{"id":7,"body":"new","meta":{{"k": 1}}}},"type":"UPDATE"}}"#
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
            format!(r#"{PREFIX},"old_record":{{"id":7}},"type":"DELETE"}}"#)
        );
    }

    #[test]
    fn insert_and_truncate() {
        let json = render(ChangeKind::Insert {
            new: vec![text("1"), Datum::Null, text("[]")],
        });
        assert_eq!(
            json,
            format!(r#"{PREFIX},"record":{{"id":1,"body":null,"meta":[]}},"type":"INSERT"}}"#)
        );
        let json = render(ChangeKind::Truncate {
            cascade: false,
            restart_identity: false,
        });
        assert_eq!(json, format!(r#"{PREFIX},"type":"TRUNCATE"}}"#));
    }
}
