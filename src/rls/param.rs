//! The groups of a check as one binary parameter: a `walcast.rls_group[]`.
//!
//! Each group is a composite `(role text, claims text, keys text[])` whose
//! `keys` is two-dimensional, one row per key column and one column per
//! candidate, so every group carries its own number of candidates and the
//! function can take each row whole (`keys[k:k]`). Everything travels as
//! data in Postgres's binary format: no SQL text, no literal to escape.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use postgres_protocol::IsNull as ProtocolIsNull;
use postgres_protocol::types::{ArrayDimension, array_to_sql, text_to_sql};
use tokio_postgres::types::{IsNull, Kind, ToSql, Type, to_sql_checked};

type BoxError = Box<dyn StdError + Sync + Send>;

/// One group as it goes on the wire.
#[derive(Debug)]
pub(crate) struct WireGroup<'a> {
    /// The role to check as.
    pub role: &'a str,
    /// The claims, as JSON text.
    pub claims: String,
    /// Candidate key tuples; each has exactly `columns` values.
    pub keys: &'a [Vec<Option<&'a str>>],
}

/// `walcast.rls_group[]`: every group of one check.
#[derive(Debug)]
pub(crate) struct Groups<'a> {
    /// The groups, in order.
    pub groups: Vec<WireGroup<'a>>,
    /// Number of key columns of the table.
    pub columns: usize,
}

impl Groups<'_> {
    /// Whether `ty` is an array of `(role text, claims text, keys text[])`:
    /// the shape this encoder writes.
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
                ("keys", &Type::TEXT_ARRAY),
            ]
    }
}

impl ToSql for Groups<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let member = match ty.kind() {
            Kind::Array(member) if Self::fits(ty) => member,
            _ => return Err(format!("expected walcast.rls_group[], got {ty}").into()),
        };
        array_to_sql(
            [dimension(self.groups.len())?],
            member.oid(),
            &self.groups,
            |group, buf| {
                write_group(group, self.columns, buf)?;
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
/// its length-prefixed value.
fn write_group(group: &WireGroup<'_>, columns: usize, buf: &mut BytesMut) -> Result<(), BoxError> {
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
    buf.put_u32(Type::TEXT_ARRAY.oid());
    with_length(buf, |buf| write_keys(group.keys, columns, buf))
}

/// The keys as a `columns` × candidates text array, column-major: row `k`
/// holds key column `k` of every candidate. No candidates: an empty array.
fn write_keys(
    keys: &[Vec<Option<&str>>],
    columns: usize,
    buf: &mut BytesMut,
) -> Result<(), BoxError> {
    let dimensions = if keys.is_empty() {
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
    use postgres_protocol::types::{array_from_sql, text_from_sql};
    use tokio_postgres::types::Field;

    fn group_type() -> Type {
        let composite = Type::new(
            "rls_group".into(),
            90_001,
            Kind::Composite(vec![
                Field::new("role".into(), Type::TEXT),
                Field::new("claims".into(), Type::TEXT),
                Field::new("keys".into(), Type::TEXT_ARRAY),
            ]),
            "walcast".into(),
        );
        Type::new(
            "_rls_group".into(),
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

    /// Decodes one record back into (role, claims, [(dims), values]).
    fn decode_record(mut buf: &[u8]) -> (String, String, Vec<i32>, Vec<Option<String>>) {
        assert_eq!(read_i32(&mut buf), 3);
        let mut texts = Vec::new();
        for oid in [Type::TEXT.oid(), Type::TEXT.oid()] {
            assert_eq!(read_i32(&mut buf) as u32, oid);
            let len = read_i32(&mut buf) as usize;
            texts.push(text_from_sql(&buf[..len]).unwrap().to_owned());
            buf = &buf[len..];
        }
        assert_eq!(read_i32(&mut buf) as u32, Type::TEXT_ARRAY.oid());
        let len = read_i32(&mut buf) as usize;
        assert_eq!(buf.len(), len, "the keys are the record's last field");
        let array = array_from_sql(buf).unwrap();
        use fallible_iterator::FallibleIterator;
        let dims: Vec<i32> = array.dimensions().map(|d| Ok(d.len)).collect().unwrap();
        let values = array
            .values()
            .map(|v| Ok(v.map(|b| text_from_sql(b).unwrap().to_owned())))
            .collect()
            .unwrap();
        (texts[0].clone(), texts[1].clone(), dims, values)
    }

    #[test]
    fn groups_encode_as_records_with_column_major_keys() {
        let keys_a = vec![vec![Some("1"), Some("x")], vec![Some("2"), None]];
        let keys_b: Vec<Vec<Option<&str>>> = Vec::new();
        let groups = Groups {
            groups: vec![
                WireGroup {
                    role: "authenticated",
                    claims: r#"{"sub":"a"}"#.into(),
                    keys: &keys_a,
                },
                WireGroup {
                    role: "a\"; DROP TABLE x; --",
                    claims: "{}".into(),
                    keys: &keys_b,
                },
            ],
            columns: 2,
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            groups.to_sql(&group_type(), &mut buf).unwrap(),
            IsNull::No
        ));
        let outer = array_from_sql(&buf).unwrap();
        assert_eq!(outer.element_type(), 90_001);
        use fallible_iterator::FallibleIterator;
        let records: Vec<Vec<u8>> = outer
            .values()
            .map(|v| Ok(v.unwrap().to_vec()))
            .collect()
            .unwrap();
        assert_eq!(records.len(), 2);

        let (role, claims, dims, values) = decode_record(&records[0]);
        assert_eq!(
            (role.as_str(), claims.as_str()),
            ("authenticated", r#"{"sub":"a"}"#)
        );
        assert_eq!(dims, vec![2, 2]);
        let values: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
        assert_eq!(values, vec![Some("1"), Some("2"), Some("x"), None]);

        let (role, _, dims, values) = decode_record(&records[1]);
        assert_eq!(role, "a\"; DROP TABLE x; --");
        assert!(dims.is_empty() && values.is_empty());
    }

    #[test]
    fn a_type_of_another_shape_is_refused() {
        let groups = Groups {
            groups: Vec::new(),
            columns: 1,
        };
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
        assert!(Groups::fits(&group_type()));
    }
}
