//! A change → the Supabase `data` object, following Supabase Realtime's
//! payload rules (see `docs/bus.md`).
//!
//! Key order follows Supabase's `changes.ex` (`columns`, `commit_timestamp`,
//! `errors`, `schema`, `table`, `old_record`, `record`, `type`); `record`
//! and `old_record` list columns in table order.

use std::collections::HashMap;
use std::sync::Arc;

use super::{write_commit_timestamp, write_json_string, write_value};
use crate::change::{Change, ChangeKind, Column, Datum, OldRow, Relation, Row};
use crate::pgoutput::Oid;

/// Supabase's error for INSERT/UPDATE on a table without a primary key.
pub const NO_PRIMARY_KEY: &str = "Error 400: Bad Request, no primary key";
/// Supabase's error for a change whose records exceed `max_record_bytes`.
pub const PAYLOAD_TOO_LARGE: &str = "Error 413: Payload Too Large";
/// In an oversized change, values whose JSON is longer than this are dropped.
const LARGE_VALUE_BYTES: usize = 64;

/// Supabase's error when a role may not select a table's primary key.
pub const UNAUTHORIZED: &str = "Error 401: Unauthorized";

/// What one group of subscribers may see of a change.
#[derive(Debug, Clone, Copy, Default)]
pub struct View<'a> {
    /// Per column (in relation order): whether it may be sent — the role's
    /// SELECT privilege and the subscription's `select`. `None`: all.
    pub visible: Option<&'a [bool]>,
    /// Send only the primary key as a DELETE's `old_record`: Supabase's
    /// rule under RLS, which does not check deletes against policies.
    pub old_record_primary_key_only: bool,
}

impl View<'_> {
    fn shows(&self, index: usize) -> bool {
        self.visible
            .is_none_or(|v| v.get(index).copied().unwrap_or(false))
    }
}

/// What every change of a relation writes the same way, rendered once per
/// relation description: each column's `"name":` key and its `columns`
/// entry, the whole `columns` array, and the schema and table names.
#[derive(Debug)]
struct Rendered {
    /// The description these were rendered from.
    relation: Arc<Relation>,
    /// Per column: `"name":`.
    keys: Vec<Vec<u8>>,
    /// Per column: `{"name":…,"type":…}`.
    entries: Vec<Vec<u8>>,
    /// `[` + all entries + `]`.
    all_columns: Vec<u8>,
    /// `,"schema":…,"table":…`.
    names: Vec<u8>,
}

impl Rendered {
    fn new(relation: &Arc<Relation>) -> Self {
        let keys = relation
            .columns
            .iter()
            .map(|c| {
                let mut key = Vec::with_capacity(c.name.len() + 3);
                write_json_string(&mut key, c.name.as_bytes());
                key.push(b':');
                key
            })
            .collect();
        let entries: Vec<Vec<u8>> = relation
            .columns
            .iter()
            .map(|c| {
                let mut entry = b"{\"name\":".to_vec();
                write_json_string(&mut entry, c.name.as_bytes());
                entry.extend_from_slice(b",\"type\":");
                write_json_string(&mut entry, c.ty.name.as_bytes());
                entry.push(b'}');
                entry
            })
            .collect();
        let mut all_columns = vec![b'['];
        all_columns.extend_from_slice(&entries.join(&b',')[..]);
        all_columns.push(b']');
        let mut names = b",\"schema\":".to_vec();
        write_json_string(&mut names, relation.schema.as_bytes());
        names.extend_from_slice(b",\"table\":");
        write_json_string(&mut names, relation.table.as_bytes());
        Rendered {
            relation: relation.clone(),
            keys,
            entries,
            all_columns,
            names,
        }
    }
}

/// Writes `data` objects, reusing its buffers from change to change.
#[derive(Debug)]
pub struct PayloadEncoder {
    max_record_bytes: usize,
    old_record: Vec<u8>,
    record: Vec<u8>,
    rendered: HashMap<Oid, Rendered>,
}

impl PayloadEncoder {
    /// An encoder that applies the 413 rule above `max_record_bytes` of
    /// `record` plus `old_record` JSON.
    pub fn new(max_record_bytes: usize) -> Self {
        PayloadEncoder {
            max_record_bytes,
            old_record: Vec::new(),
            record: Vec::new(),
            rendered: HashMap::new(),
        }
    }

    /// Writes the `data` object for `change` with every column.
    pub fn write_data(&mut self, out: &mut Vec<u8>, change: &Change) {
        self.write_view(out, change, View::default());
    }

    /// Writes the `data` object for `change` as `view` lets its readers see it.
    pub fn write_view(&mut self, out: &mut Vec<u8>, change: &Change, view: View<'_>) {
        let relation = &change.relation;
        let inserts_or_updates = matches!(
            change.kind,
            ChangeKind::Insert { .. } | ChangeKind::Update { .. }
        );
        if inserts_or_updates && !relation.has_primary_key {
            return write_error_payload(out, change, NO_PRIMARY_KEY);
        }
        let key_hidden = relation
            .columns
            .iter()
            .enumerate()
            .any(|(i, c)| c.is_primary_key && !view.shows(i));
        if inserts_or_updates && key_hidden {
            return write_error_payload(out, change, UNAUTHORIZED);
        }
        let stale = self
            .rendered
            .get(&relation.id)
            .is_none_or(|r| !Arc::ptr_eq(&r.relation, relation));
        if stale {
            self.rendered.insert(relation.id, Rendered::new(relation));
        }
        let too_large = self.records(change, usize::MAX, view);
        if too_large {
            self.records(change, LARGE_VALUE_BYTES, view);
        }
        let Some(rendered) = self.rendered.get(&relation.id) else {
            return;
        };
        out.extend_from_slice(b"{\"columns\":");
        if view.visible.is_none() {
            out.extend_from_slice(&rendered.all_columns);
        } else {
            out.push(b'[');
            let shown = rendered
                .entries
                .iter()
                .enumerate()
                .filter(|(i, _)| view.shows(*i));
            for (n, (_, entry)) in shown.enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(entry);
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"commit_timestamp\":");
        write_commit_timestamp(out, change.commit_time);
        out.extend_from_slice(b",\"errors\":");
        if too_large {
            out.extend_from_slice(b"[\"");
            out.extend_from_slice(PAYLOAD_TOO_LARGE.as_bytes());
            out.extend_from_slice(b"\"]");
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(&rendered.names);
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
    /// out values longer than `value_limit` and columns `view` hides;
    /// returns whether together they exceed `max_record_bytes`.
    fn records(&mut self, change: &Change, value_limit: usize, view: View<'_>) -> bool {
        self.old_record.clear();
        self.record.clear();
        let Some(rendered) = self.rendered.get(&change.relation.id) else {
            return false;
        };
        let fields = Fields {
            columns: &change.relation.columns,
            keys: &rendered.keys,
            value_limit,
            view,
        };
        match &change.kind {
            ChangeKind::Insert { new } => fields.record(&mut self.record, new, None),
            ChangeKind::Update { old, new } => {
                match old {
                    Some(OldRow::Full(row)) => fields.record(&mut self.old_record, row, None),
                    Some(OldRow::Key(row)) => fields.identity(&mut self.old_record, row),
                    // The key did not change: it is in the new row.
                    None => fields.identity(&mut self.old_record, new),
                }
                let fallback = match old {
                    Some(OldRow::Full(row)) => Some(row),
                    _ => None,
                };
                fields.record(&mut self.record, new, fallback);
            }
            ChangeKind::Delete { old } if view.old_record_primary_key_only => {
                fields.primary_key(&mut self.old_record, old.row());
            }
            ChangeKind::Delete { old } => match old {
                OldRow::Full(row) => fields.record(&mut self.old_record, row, None),
                OldRow::Key(row) => fields.identity(&mut self.old_record, row),
            },
            ChangeKind::Truncate { .. } => {}
        }
        self.old_record.len() + self.record.len() > self.max_record_bytes
    }
}

/// The shape Supabase sends when it cannot show a change: no columns, no
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

/// Writes rows as JSON objects: the columns a view shows, values up to a
/// size limit.
struct Fields<'a> {
    columns: &'a [Column],
    /// Per column: `"name":`, already rendered.
    keys: &'a [Vec<u8>],
    value_limit: usize,
    view: View<'a>,
}

impl Fields<'_> {
    /// All shown columns of `row`. An unchanged TOAST value is taken from
    /// `fallback` (the old row under REPLICA IDENTITY FULL) or else left
    /// out: its value is unknown, and an absent key is what Supabase
    /// clients expect.
    fn record(&self, out: &mut Vec<u8>, row: &Row, fallback: Option<&Row>) {
        self.object(out, row, |_, _| true, fallback);
    }

    /// Only the replica identity key columns of `row`.
    fn identity(&self, out: &mut Vec<u8>, row: &Row) {
        self.object(out, row, |column, _| column.is_key, None);
    }

    /// Only the primary key columns of `row`.
    fn primary_key(&self, out: &mut Vec<u8>, row: &Row) {
        self.object(out, row, |column, _| column.is_primary_key, None);
    }

    fn object(
        &self,
        out: &mut Vec<u8>,
        row: &Row,
        wanted: impl Fn(&Column, &Datum) -> bool,
        fallback: Option<&Row>,
    ) {
        out.push(b'{');
        let mut first = true;
        for (i, (column, datum)) in self.columns.iter().zip(row).enumerate() {
            if !self.view.shows(i) || !wanted(column, datum) {
                continue;
            }
            let datum = match datum {
                Datum::UnchangedToast => match fallback.and_then(|old| old.get(i)) {
                    Some(old) if !matches!(old, Datum::UnchangedToast) => old,
                    _ => continue,
                },
                other => other,
            };
            let field_start = out.len();
            if !first {
                out.push(b',');
            }
            match self.keys.get(i) {
                Some(key) => out.extend_from_slice(key),
                None => {
                    write_json_string(out, column.name.as_bytes());
                    out.push(b':');
                }
            }
            let value_start = out.len();
            match datum {
                Datum::Text(text) => write_value(out, &column.ty, text),
                Datum::Json(json) => out.extend_from_slice(json),
                Datum::Null | Datum::UnchangedToast => out.extend_from_slice(b"null"),
            }
            if out.len() - value_start > self.value_limit {
                out.truncate(field_start);
            } else {
                first = false;
            }
        }
        out.push(b'}');
    }
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
    fn a_view_hides_columns_and_a_hidden_key_is_401() {
        let mut out = Vec::new();
        let change = change_of(
            ChangeKind::Insert {
                new: vec![text("1"), text("secret"), text("{}")],
            },
            true,
        );
        let visible = [true, false, true];
        let view = View {
            visible: Some(&visible),
            old_record_primary_key_only: false,
        };
        PayloadEncoder::new(1 << 20).write_view(&mut out, &change, view);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                r#"{{"columns":[{{"name":"id","type":"int8"}},{{"name":"meta","type":"jsonb"}}],"commit_timestamp":"2000-01-01T00:00:00.000Z","errors":null,{NAMES},"record":{{"id":1,"meta":{{}}}},"type":"INSERT"}}"#
            )
        );
        let mut out = Vec::new();
        let visible = [false, true, true];
        let view = View {
            visible: Some(&visible),
            old_record_primary_key_only: false,
        };
        PayloadEncoder::new(1 << 20).write_view(&mut out, &change, view);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                r#"{{"columns":[],"commit_timestamp":null,"errors":["Error 401: Unauthorized"],{NAMES},"record":{{}},"type":"INSERT"}}"#
            )
        );
    }

    #[test]
    fn under_rls_a_delete_shows_only_the_primary_key() {
        let mut out = Vec::new();
        let change = change_of(
            ChangeKind::Delete {
                old: OldRow::Full(vec![text("1"), text("gone"), Datum::Null]),
            },
            true,
        );
        let view = View {
            visible: None,
            old_record_primary_key_only: true,
        };
        PayloadEncoder::new(1 << 20).write_view(&mut out, &change, view);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(r#"{COLUMNS},"errors":null,{NAMES},"old_record":{{"id":1}},"type":"DELETE"}}"#)
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
