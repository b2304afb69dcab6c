//! Making a filter ready for a column: the server casts its operand to
//! the column type (a value that does not cast is refused with the cast's
//! error, as Supabase does), prints it with the type's output function
//! (the canonical text the in-process comparison uses), and tries the
//! comparison once, so a filter the type cannot evaluate is refused when
//! the subscription is made, never when a change arrives (where Supabase
//! loses the whole batch). Then the in-process plan is chosen, only
//! where the type's comparison is exactly known:
//!
//! | base type | in-process operators |
//! |---|---|
//! | int2, int4, int8, numeric, float4, float8, bool, uuid, date, timestamp, timestamptz | eq neq lt lte gt gte in isdistinct |
//! | text, varchar, deterministic collation | eq neq in isdistinct (and lt lte gt gte under C/POSIX) |
//! | enums | eq neq in isdistinct |
//! | any non-composite | is.null; bool: is.true/false/unknown |
//!
//! Domains count as their base type. Date and time operands naming `now`,
//! `today`, `tomorrow` or `yesterday` stay on the server, which reads them
//! at each evaluation. Filter values are read as the column type *without*
//! its typmod, as Postgres reads a literal compared with the column: a
//! `char(5)` value is not cut to one character (Supabase's regtype cast
//! does that), a `numeric(10,2)` one not rounded.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use crate::catalog::{Encoding, Oid, TypeInfo, builtin};

use super::evaluate::{Canonical, CompiledFilter, Plan};
use super::filter::{Filter, IsTarget, Op, Operand};
use super::key::Scalar;

/// The column a filter applies to, as the catalog describes it:
///
/// ```sql
/// SELECT attnum, atttypid, pg_catalog.format_type(atttypid, -1), attcollation
/// FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    /// Its position among the relation's columns (an index into a
    /// [`Row`](crate::change::Row)).
    pub index: usize,
    /// Its type.
    pub ty: &'a Arc<TypeInfo>,
    /// Its type as `format_type(atttypid, -1)` spells it: quoted by the
    /// server, and without typmod (see the module documentation).
    pub sql_type: &'a str,
    /// Its collation (`attcollation`; 0 if the type has none).
    pub collation: Oid,
}

/// Why a filter cannot apply to its column. Every variant but `Query` is
/// the subscriber's to fix, with Supabase's text where it has one.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The value does not cast to the column type: Postgres's message
    /// (`invalid input syntax for type integer: "x"`), as Supabase shows.
    #[error("{0}")]
    Invalid(String),
    /// `is.true`, `is.false` or `is.unknown` on a non-boolean column.
    #[error("is {} filter requires a boolean column, got {sql_type}", .target.name())]
    IsNeedsBoolean {
        /// The keyword.
        target: IsTarget,
        /// The column type.
        sql_type: String,
    },
    /// `like`, `ilike`, `match` or `imatch` on a type without the operator.
    #[error("operator {} requires a text-compatible column type, got {sql_type}", .op.name())]
    NeedsText {
        /// The operator.
        op: Op,
        /// The column type.
        sql_type: String,
    },
    /// A `match` or `imatch` pattern that is not a regular expression.
    #[error("invalid regular expression for {} filter: {reason}", .op.name())]
    Regex {
        /// The operator.
        op: Op,
        /// Postgres's message.
        reason: String,
    },
    /// The type has no such comparison (`lt` on json, `in` on an array).
    #[error("operator {} is not supported for a column of type {sql_type}: {reason}", .op.name())]
    Unsupported {
        /// The operator.
        op: Op,
        /// The column type.
        sql_type: String,
        /// Postgres's message.
        reason: String,
    },
    /// The server could not be asked (connection lost, timeout).
    #[error("compiling a filter: {0}")]
    Query(#[source] tokio_postgres::Error),
}

impl CompileError {
    /// Whether asking again later may succeed; every other error is the
    /// filter's and will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, CompileError::Query(_))
    }
}

/// Checks `filter` against `column` on the server and prepares it, in
/// one round trip (one more for a column of a non-built-in type, one more
/// for a column with a collation; none for `is`): the operand is cast to the column type (a value that does
/// not cast is refused with the cast's error, as Supabase does) and
/// printed by the type's output function, the comparison is tried once
/// (an operator the type lacks is refused now, never at change time), and
/// the in-process plan is chosen where the type's comparison is exactly
/// known (see the module documentation).
pub async fn compile(
    client: &Client,
    filter: &Filter,
    column: &Column<'_>,
) -> Result<CompiledFilter, CompileError> {
    let sql_type = column.sql_type;
    let mut compiled = CompiledFilter {
        filter: filter.clone(),
        column: column.index,
        ty: column.ty.clone(),
        sql_type: Arc::from(sql_type),
        collation: None,
        canonical: Canonical::Value(String::new()),
        plan: Plan::Server,
    };
    match filter.operand {
        // No operand to cast, no collation involved: nothing to ask.
        Operand::Is(target) => {
            let composite = matches!(column.ty.encoding, Encoding::Composite(_));
            compiled.canonical = Canonical::Keyword(target);
            compiled.plan = match target {
                // A composite IS NULL when all its fields are.
                IsTarget::Null if composite => Plan::Server,
                IsTarget::Null => Plan::IsNull,
                _ if column.ty.encoding == Encoding::Bool => Plan::IsBool(target),
                _ => {
                    return Err(CompileError::IsNeedsBoolean {
                        target,
                        sql_type: sql_type.to_owned(),
                    });
                }
            };
            return Ok(compiled);
        }
        Operand::List(_) if column.ty.delimiter != b',' => {
            return Err(CompileError::Unsupported {
                op: Op::In,
                sql_type: sql_type.to_owned(),
                reason: "its array elements are not separated by commas".to_owned(),
            });
        }
        Operand::List(_) | Operand::Value(_) => {}
    }
    let (base, enumerated) = base_type(client, column.ty).await?;
    let collation = match column.collation {
        0 => None,
        oid => Some(
            collation(client, oid)
                .await?
                .ok_or_else(|| CompileError::Unsupported {
                    op: filter.op,
                    sql_type: sql_type.to_owned(),
                    reason: format!("the column's collation {oid} no longer exists"),
                })?,
        ),
    };
    compiled.collation = collation.as_ref().map(|c| c.name.clone());
    compiled.canonical = canonicalize(client, &compiled).await?;
    let scalar = scalar(base, enumerated, collation.as_ref(), filter);
    compiled.plan = match (scalar, &compiled.canonical) {
        (Some(scalar), Canonical::Value(v)) => match scalar.parse(v.as_bytes()) {
            Some(key) => Plan::Compare {
                scalar,
                operand: key.to_owned_key(),
            },
            None => Plan::Server,
        },
        (Some(scalar), Canonical::List(items)) => {
            let keys: Option<Vec<_>> = items
                .iter()
                .map(|item| match item {
                    None => Some(None),
                    Some(v) => scalar.parse(v.as_bytes()).map(|k| Some(k.to_owned_key())),
                })
                .collect();
            keys.map_or(Plan::Server, |list| Plan::In { scalar, list })
        }
        _ => Plan::Server,
    };
    Ok(compiled)
}

/// How values of the column are compared in-process for `filter`, if
/// exactly known.
fn scalar(
    base: Oid,
    enumerated: bool,
    collation: Option<&Collation>,
    filter: &Filter,
) -> Option<Scalar> {
    let ordered = match filter.op {
        Op::Eq | Op::Neq | Op::In | Op::IsDistinct => false,
        Op::Lt | Op::Lte | Op::Gt | Op::Gte => true,
        Op::Like | Op::Ilike | Op::Match | Op::Imatch | Op::Is => return None,
    };
    let scalar = match base {
        _ if enumerated => (!ordered).then_some(Scalar::Bytes)?,
        16 => Scalar::Bool,
        20 | 21 | 23 => Scalar::Int,
        700 | 701 => Scalar::Float,
        1700 => Scalar::Numeric,
        2950 => Scalar::Bytes,
        // text, varchar: equality is byte equality under a deterministic
        // collation; order is byte order only under C/POSIX.
        25 | 1043 => {
            let c = collation?;
            (c.deterministic && (!ordered || c.byte_order)).then_some(Scalar::Bytes)?
        }
        1082 | 1114 | 1184 => {
            // `now`, `today`... are read when cast; the server recasts at
            // each evaluation, the canonical text would freeze them.
            let volatile = |v: &str| {
                let v = v.to_ascii_lowercase();
                ["now", "today", "tomorrow", "yesterday"]
                    .iter()
                    .any(|w| v.contains(w))
            };
            let frozen = match &filter.operand {
                Operand::Value(v) => volatile(v),
                Operand::List(items) => items.iter().flatten().any(|v| volatile(v)),
                Operand::Is(_) => false,
            };
            if frozen {
                return None;
            }
            match base {
                1082 => Scalar::Date,
                1114 => Scalar::Timestamp,
                _ => Scalar::TimestampTz,
            }
        }
        _ => return None,
    };
    Some(scalar)
}

/// The base type of `ty` (through domains) and whether it is an enum.
async fn base_type(client: &Client, ty: &TypeInfo) -> Result<(Oid, bool), CompileError> {
    if builtin(ty.oid).is_some() {
        return Ok((ty.oid, false));
    }
    let row = client
        .query_opt(BASE_TYPE_SQL, &[&ty.oid])
        .await
        .map_err(CompileError::Query)?;
    let Some(row) = row else {
        // Dropped meanwhile: nothing is known, the server decides.
        return Ok((0, false));
    };
    let base: Oid = row.try_get(0).map_err(CompileError::Query)?;
    let typtype: String = row.try_get(1).map_err(CompileError::Query)?;
    Ok((base, typtype == "e"))
}

/// What the filter needs to know of a column's collation.
struct Collation {
    /// `schema.name`, quoted by the server.
    name: Arc<str>,
    /// Equal strings are equal bytes.
    deterministic: bool,
    /// Strings sort by their bytes (C or POSIX, libc).
    byte_order: bool,
}

async fn collation(client: &Client, oid: Oid) -> Result<Option<Collation>, CompileError> {
    let row = client
        .query_opt(COLLATION_SQL, &[&oid])
        .await
        .map_err(CompileError::Query)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let name: String = row.try_get(0).map_err(CompileError::Query)?;
    Ok(Some(Collation {
        name: Arc::from(name),
        deterministic: row.try_get(1).map_err(CompileError::Query)?,
        byte_order: row.try_get(2).map_err(CompileError::Query)?,
    }))
}

/// Casts the operand to the column type and prints it with the type's
/// output function (what pgoutput sends; `format('%s')` calls it, where a
/// cast to text may not: `true::text` is `true`, the output `t`), and
/// tries the comparison once, in one round trip.
async fn canonicalize(
    client: &Client,
    compiled: &CompiledFilter,
) -> Result<Canonical, CompileError> {
    let t = &*compiled.sql_type;
    let mut sql = String::new();
    let param: (&(dyn ToSql + Sync), Type) = match &compiled.filter.operand {
        Operand::List(items) => {
            let _ = write!(
                sql,
                "SELECT ARRAY(SELECT pg_catalog.format('%s', s.a[i]) \
                 FROM (SELECT $1::text[]::{t}[] AS a) s, pg_catalog.generate_subscripts(s.a, 1) AS i ORDER BY i), "
            );
            compiled.write_sql(&mut sql, None, 1);
            (items, Type::TEXT_ARRAY)
        }
        Operand::Value(value) => {
            let _ = write!(sql, "SELECT pg_catalog.format('%s', $1::text::{t}), ");
            compiled.write_sql(&mut sql, Some(1), 1);
            (value, Type::TEXT)
        }
        Operand::Is(target) => return Ok(Canonical::Keyword(*target)),
    };
    let row = client
        .query_typed_one(&sql, &[param])
        .await
        .map_err(|e| refusal(e, compiled))?;
    Ok(match &compiled.filter.operand {
        // A NULL element stays NULL (text never casts to NULL); format()
        // would have printed it as ''.
        Operand::List(items) => {
            let texts: Vec<String> = row.try_get(0).map_err(CompileError::Query)?;
            Canonical::List(
                items
                    .iter()
                    .zip(texts)
                    .map(|(item, text)| item.as_ref().map(|_| text))
                    .collect(),
            )
        }
        _ => Canonical::Value(row.try_get(0).map_err(CompileError::Query)?),
    })
}

/// A server error while compiling, as the subscriber's problem when it is.
fn refusal(error: tokio_postgres::Error, compiled: &CompiledFilter) -> CompileError {
    let Some(db) = error.as_db_error() else {
        return CompileError::Query(error);
    };
    let op = compiled.filter.op;
    let sql_type = compiled.sql_type.to_string();
    let code = db.code().code();
    let textual = matches!(op, Op::Like | Op::Ilike | Op::Match | Op::Imatch);
    match code {
        "2201B" if matches!(op, Op::Match | Op::Imatch) => CompileError::Regex {
            op,
            reason: db.message().to_owned(),
        },
        "42883" if textual => CompileError::NeedsText { op, sql_type },
        _ if code.starts_with("22") || code.starts_with("23") => {
            CompileError::Invalid(db.message().to_owned())
        }
        _ if code.starts_with("42") || code.starts_with("0A") => CompileError::Unsupported {
            op,
            sql_type,
            reason: db.message().to_owned(),
        },
        _ => CompileError::Query(error),
    }
}

/// The base type of a type (through domains) and its `typtype`.
const BASE_TYPE_SQL: &str = "\
WITH RECURSIVE chain(oid, typtype, typbasetype, depth) AS (
    SELECT t.oid, t.typtype, t.typbasetype, 0 FROM pg_catalog.pg_type t WHERE t.oid = $1
  UNION ALL
    SELECT t.oid, t.typtype, t.typbasetype, c.depth + 1
    FROM chain c JOIN pg_catalog.pg_type t ON t.oid = c.typbasetype
    WHERE c.typtype = 'd' AND c.depth < 32
)
SELECT oid, typtype::text FROM chain WHERE typtype <> 'd'";

/// A collation's quoted name, whether it is deterministic, and whether it
/// sorts by bytes (libc C or POSIX, itself or as the database default;
/// `datlocprovider` is read through to_jsonb, as PostgreSQL < 15 lacks it).
const COLLATION_SQL: &str = "\
SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.collname),
       c.collisdeterministic,
       CASE WHEN c.collprovider = 'd'
            THEN coalesce(pg_catalog.to_jsonb(d) ->> 'datlocprovider', 'c') = 'c'
                 AND d.datcollate::text IN ('C', 'POSIX')
            ELSE c.collprovider = 'c' AND c.collcollate::text IN ('C', 'POSIX')
       END
FROM pg_catalog.pg_collation c
JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace
JOIN pg_catalog.pg_database d ON d.datname = pg_catalog.current_database()
WHERE c.oid = $1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_read_like_supabase() {
        let e = CompileError::IsNeedsBoolean {
            target: IsTarget::True,
            sql_type: "integer".into(),
        };
        assert_eq!(
            e.to_string(),
            "is true filter requires a boolean column, got integer"
        );
        let e = CompileError::NeedsText {
            op: Op::Like,
            sql_type: "integer".into(),
        };
        assert_eq!(
            e.to_string(),
            "operator like requires a text-compatible column type, got integer"
        );
        assert!(!e.is_transient());
    }
}
