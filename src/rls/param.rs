//! A check's parameters in Postgres's binary format: the candidate keys
//! once, as a two-dimensional `text[]` (one row per key column, one column
//! per candidate row), and the groups as a `walcast.rls_subject[]`, each a
//! composite `(role text, claims text, candidates integer[])` naming its
//! candidates by 1-based position in the keys, or NULL for all of them.
//! Everything travels as data: no SQL text, no literal to escape.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use postgres_protocol::IsNull as ProtocolIsNull;
use postgres_protocol::types::{ArrayDimension, array_to_sql, int4_to_sql, text_to_sql};
use tokio_postgres::types::{IsNull, Kind, ToSql, Type, to_sql_checked};

use super::check::Rows;

type BoxError = Box<dyn StdError + Sync + Send>;

/// The candidate keys of one check: `text[]`, key column × candidate.
#[derive(Debug)]
pub(crate) struct Keys<'a> {
    /// One tuple per candidate row; each has exactly `columns` values.
    pub keys: &'a [Vec<Option<&'a str>>],
    /// Number of key columns of the table.
    pub columns: usize,
}

impl ToSql for Keys<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        write_keys(self.keys, self.columns, out)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// 0-based row indexes, sent as 1-based positions: an `integer[]`.
#[derive(Debug)]
pub(crate) struct Positions(pub Vec<u32>);

impl ToSql for Positions {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        write_positions(&self.0, out)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INT4_ARRAY
    }

    to_sql_checked!();
}

/// One group as it goes on the wire.
#[derive(Debug)]
pub(crate) struct WireGroup<'a> {
    /// The role to check as.
    pub role: &'a str,
    /// The claims, as JSON text.
    pub claims: String,
    /// Which rows of the keys it is a candidate for.
    pub rows: &'a Rows,
}

/// `walcast.rls_subject[]`: every group of one check.
#[derive(Debug)]
pub(crate) struct Groups<'a> {
    /// The groups, in order.
    pub groups: Vec<WireGroup<'a>>,
}

impl Groups<'_> {
    /// Whether `ty` is an array of `(role text, claims text, candidates
    /// integer[])`: the shape this encoder writes.
    pub(crate) fn fits(ty: &Type) -> bool {
        let Kind::Array(member) = ty.kind() else {
            return false;
        };
        let Kind::Composite(fields) = member.kind() else {
            return false;
        };
        let shape: Vec<(&str, &Type)> = fields.iter().map(|f| (f.name(), f.type_())).collect();
        shape
            == [
                ("role", &Type::TEXT),
                ("claims", &Type::TEXT),
                ("candidates", &Type::INT4_ARRAY),
            ]
    }
}

impl ToSql for Groups<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let member = match ty.kind() {
            Kind::Array(member) if Self::fits(ty) => member,
            _ => return Err(format!("expected walcast.rls_subject[], got {ty}").into()),
        };
        array_to_sql(
            [dimension(self.groups.len())?],
            member.oid(),
            &self.groups,
            |group, buf| {
                write_group(group, buf)?;
                Ok(ProtocolIsNull::No)
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Array(member) if matches!(member.kind(), Kind::Composite(_)))
    }

    to_sql_checked!();
}

/// A record in binary form: field count, then per field its type oid and
/// its length-prefixed value (length -1: NULL).
fn write_group(group: &WireGroup<'_>, buf: &mut BytesMut) -> Result<(), BoxError> {
    buf.put_i32(3);
    buf.put_u32(Type::TEXT.oid());
    with_length(buf, |buf| {
        text_to_sql(group.role, buf);
        Ok(())
    })?;
    buf.put_u32(Type::TEXT.oid());
    with_length(buf, |buf| {
        text_to_sql(&group.claims, buf);
        Ok(())
    })?;
    buf.put_u32(Type::INT4_ARRAY.oid());
    match group.rows {
        Rows::All => {
            buf.put_i32(-1);
            Ok(())
        }
        Rows::Only(rows) => with_length(buf, |buf| write_positions(rows, buf)),
    }
}

/// 0-based row indexes as 1-based positions, an `integer[]`.
fn write_positions(rows: &[u32], buf: &mut BytesMut) -> Result<(), BoxError> {
    let dimensions = if rows.is_empty() {
        Vec::new()
    } else {
        vec![dimension(rows.len())?]
    };
    array_to_sql(
        dimensions,
        Type::INT4.oid(),
        rows.iter(),
        |&row, buf| {
            let position = i32::try_from(row)
                .ok()
                .and_then(|r| r.checked_add(1))
                .ok_or("candidate position beyond what an integer holds")?;
            int4_to_sql(position, buf);
            Ok(ProtocolIsNull::No)
        },
        buf,
    )
}

/// The keys as a `columns` × candidates text array, column-major: row `k`
/// holds key column `k` of every candidate. No candidates: an empty array.
fn write_keys(
    keys: &[Vec<Option<&str>>],
    columns: usize,
    buf: &mut BytesMut,
) -> Result<(), BoxError> {
    let dimensions = if keys.is_empty() || columns == 0 {
        Vec::new()
    } else {
        vec![dimension(columns)?, dimension(keys.len())?]
    };
    let values = (0..columns).flat_map(|k| {
        keys.iter()
            .map(move |tuple| tuple.get(k).copied().flatten())
    });
    array_to_sql(
        dimensions,
        Type::TEXT.oid(),
        values,
        |value, buf| match value {
            Some(text) => {
                text_to_sql(text, buf);
                Ok(ProtocolIsNull::No)
            }
            None => Ok(ProtocolIsNull::Yes),
        },
        buf,
    )
}

fn dimension(len: usize) -> Result<ArrayDimension, BoxError> {
    Ok(ArrayDimension {
        len: i32::try_from(len).map_err(|_| "array longer than Postgres allows")?,
        lower_bound: 1,
    })
}

/// Writes a 4-byte length, then what `write` writes, then patches the
/// length in.
fn with_length(
    buf: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), BoxError>,
) -> Result<(), BoxError> {
    let at = buf.len();
    buf.put_i32(0);
    write(buf)?;
    let len = i32::try_from(buf.len() - at - 4).map_err(|_| "value longer than Postgres allows")?;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::types::{array_from_sql, int4_from_sql, text_from_sql};
    use tokio_postgres::types::Field;

    fn subject_type() -> Type {
        let composite = Type::new(
            "rls_subject".into(),
            90_001,
            Kind::Composite(vec![
                Field::new("role".into(), Type::TEXT),
                Field::new("claims".into(), Type::TEXT),
                Field::new("candidates".into(), Type::INT4_ARRAY),
            ]),
            "walcast".into(),
        );
        Type::new(
            "_rls_subject".into(),
            90_002,
            Kind::Array(composite),
            "walcast".into(),
        )
    }

    fn read_i32(buf: &mut &[u8]) -> i32 {
        let (head, rest) = buf.split_at(4);
        *buf = rest;
        i32::from_be_bytes(head.try_into().unwrap())
    }

    /// Decodes one record back into (role, claims, candidates or NULL).
    fn decode_record(mut buf: &[u8]) -> (String, String, Option<Vec<i32>>) {
        assert_eq!(read_i32(&mut buf), 3);
        let mut texts = Vec::new();
        for oid in [Type::TEXT.oid(), Type::TEXT.oid()] {
            assert_eq!(read_i32(&mut buf) as u32, oid);
            let len = read_i32(&mut buf) as usize;
            texts.push(text_from_sql(&buf[..len]).unwrap().to_owned());
            buf = &buf[len..];
        }
        assert_eq!(read_i32(&mut buf) as u32, Type::INT4_ARRAY.oid());
        let len = read_i32(&mut buf);
        let candidates = (len >= 0).then(|| {
            assert_eq!(buf.len(), len as usize, "the candidates are the last field");
            let array = array_from_sql(buf).unwrap();
            array
                .values()
                .map(|v| Ok(int4_from_sql(v.unwrap()).unwrap()))
                .collect()
                .unwrap()
        });
        if len < 0 {
            assert!(buf.is_empty());
        }
        (texts[0].clone(), texts[1].clone(), candidates)
    }

    #[test]
    fn groups_encode_as_records_with_one_based_candidates_or_null() {
        let some = Rows::Only(vec![0, 2]);
        let none = Rows::Only(vec![]);
        let groups = Groups {
            groups: vec![
                WireGroup {
                    role: "authenticated",
                    claims: r#"{"sub":"a"}"#.into(),
                    rows: &Rows::All,
                },
                WireGroup {
                    role: "a\"; DROP TABLE x; --",
                    claims: "{}".into(),
                    rows: &some,
                },
                WireGroup {
                    role: "anon",
                    claims: "{}".into(),
                    rows: &none,
                },
            ],
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            groups.to_sql(&subject_type(), &mut buf).unwrap(),
            IsNull::No
        ));
        let outer = array_from_sql(&buf).unwrap();
        assert_eq!(outer.element_type(), 90_001);
        let records: Vec<Vec<u8>> = outer
            .values()
            .map(|v| Ok(v.unwrap().to_vec()))
            .collect()
            .unwrap();
        assert_eq!(
            records.iter().map(|r| decode_record(r)).collect::<Vec<_>>(),
            [
                ("authenticated".into(), r#"{"sub":"a"}"#.into(), None),
                (
                    "a\"; DROP TABLE x; --".into(),
                    "{}".into(),
                    Some(vec![1, 3])
                ),
                ("anon".into(), "{}".into(), Some(vec![])),
            ]
        );
    }

    #[test]
    fn keys_encode_column_major() {
        let keys = vec![vec![Some("1"), Some("x")], vec![Some("2"), None]];
        let mut buf = BytesMut::new();
        Keys {
            keys: &keys,
            columns: 2,
        }
        .to_sql(&Type::TEXT_ARRAY, &mut buf)
        .unwrap();
        let array = array_from_sql(&buf).unwrap();
        let dims: Vec<i32> = array.dimensions().map(|d| Ok(d.len)).collect().unwrap();
        assert_eq!(dims, vec![2, 2]);
        let values: Vec<Option<String>> = array
            .values()
            .map(|v| Ok(v.map(|b| text_from_sql(b).unwrap().to_owned())))
            .collect()
            .unwrap();
        assert_eq!(
            values,
            [Some("1".into()), Some("2".into()), Some("x".into()), None]
        );
    }

    #[test]
    fn a_type_of_another_shape_is_refused() {
        let groups = Groups { groups: Vec::new() };
        let mut buf = BytesMut::new();
        assert!(groups.to_sql(&Type::TEXT_ARRAY, &mut buf).is_err());
        let wrong = Type::new(
            "_g".into(),
            1,
            Kind::Array(Type::new(
                "g".into(),
                2,
                Kind::Composite(vec![Field::new("role".into(), Type::TEXT)]),
                "walcast".into(),
            )),
            "walcast".into(),
        );
        assert!(groups.to_sql(&wrong, &mut buf).is_err());
        assert!(!Groups::fits(&wrong) && !Groups::fits(&Type::TEXT_ARRAY));
        assert!(Groups::fits(&subject_type()));
    }
}
