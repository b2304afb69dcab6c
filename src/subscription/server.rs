//! The verdicts the process cannot compute, decided by the server: one
//! statement for a batch of (filter, value) pairs, each pair a test such
//! as `($1::text::integer = $2::text::integer)`.
//!
//! Values always travel as parameters; the only text spliced into SQL is
//! the column's type and collation, both quoted by Postgres itself
//! (`format_type`, `quote_ident`).

use std::fmt::Write as _;

use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};
use tracing::warn;

use crate::change::Datum;

use super::evaluate::{CompiledFilter, Verdict};
use super::filter::{IsTarget, Op, Operand};

/// Items per statement: two parameters each, under Postgres's 65,535.
const MAX_ITEMS_PER_STATEMENT: usize = 10_000;

/// Why the server could not decide one item of a batch (or, on a timeout,
/// a statement's worth of them). The item's subscription is not matched;
/// the rest of the batch is unaffected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FilterFailure {
    /// The value is rendered JSON (`Datum::Json`), not the type's text:
    /// filters must run before values are rendered.
    #[error("filter on column {0}: the value is rendered JSON, not the type's text output")]
    NotText(usize),
    /// The server raised an error for this item alone.
    #[error("filter on column {column}: {message}")]
    Server {
        /// The column index.
        column: usize,
        /// Postgres's message.
        message: String,
    },
}

impl CompiledFilter {
    /// Appends the SQL test of the value in `$value` (text; `None`: NULL)
    /// against the operand in `$operand` (text, or text[] for `in`).
    pub(super) fn write_sql(&self, out: &mut String, value: Option<usize>, operand: usize) {
        let t = &*self.sql_type;
        if self.filter.negated {
            out.push_str("NOT ");
        }
        out.push('(');
        match value {
            Some(n) => {
                let _ = write!(out, "${n}::text::{t}");
            }
            None => {
                let _ = write!(out, "NULL::text::{t}");
            }
        }
        if let Some(collation) = &self.collation {
            let _ = write!(out, " COLLATE {collation}");
        }
        let infix = match self.filter.op {
            Op::Eq => "=",
            Op::Neq => "<>",
            Op::Lt => "<",
            Op::Lte => "<=",
            Op::Gt => ">",
            Op::Gte => ">=",
            Op::Like => "~~",
            Op::Ilike => "~~*",
            Op::Match => "~",
            Op::Imatch => "~*",
            Op::IsDistinct => "IS DISTINCT FROM",
            Op::In => {
                let _ = write!(out, " = ANY(${operand}::text[]::{t}[]))");
                return;
            }
            Op::Is => {
                let target = match &self.filter.operand {
                    Operand::Is(target) => *target,
                    _ => IsTarget::Null,
                };
                let _ = write!(out, " IS {})", target.name().to_ascii_uppercase());
                return;
            }
        };
        let _ = write!(out, " {infix} ${operand}::text::{t})");
    }

    /// The operand as a parameter for [`write_sql`](Self::write_sql): the
    /// value as written (the server recasts it, as Supabase does at each
    /// change), `None` for `is`.
    fn operand_param(&self) -> Option<(&(dyn ToSql + Sync), Type)> {
        match &self.filter.operand {
            Operand::Value(value) => Some((value, Type::TEXT)),
            Operand::List(items) => Some((items, Type::TEXT_ARRAY)),
            Operand::Is(_) => None,
        }
    }
}

/// The verdicts of `items` (filter, the column's datum), decided by the
/// server in one round trip (one per 10,000 items), values only as
/// parameters. An absent value (unchanged TOAST) is `Null` without asking.
///
/// The outer error is the connection's or the server's (transient: a
/// timeout, a restart). Should the batch fail because of an item (a value
/// that no longer casts, say), it is asked again in halves until the
/// failing items stand alone, so one failing filter costs only its own
/// item a [`FilterFailure`] and the batch a few more round trips.
pub async fn evaluate_on_server(
    client: &Client,
    items: &[(&CompiledFilter, &Datum)],
) -> Result<Vec<Result<Verdict, FilterFailure>>, tokio_postgres::Error> {
    let mut results: Vec<Result<Verdict, FilterFailure>> = Vec::with_capacity(items.len());
    let mut asked = Vec::new();
    for (n, (filter, value)) in items.iter().enumerate() {
        results.push(match value {
            Datum::UnchangedToast => Ok(Verdict::Null),
            Datum::Json(_) => Err(FilterFailure::NotText(filter.column)),
            Datum::Text(text) if std::str::from_utf8(text).is_err() => {
                Err(FilterFailure::NotText(filter.column))
            }
            Datum::Null | Datum::Text(_) => {
                asked.push(n);
                Ok(Verdict::Null)
            }
        });
    }
    // Parts still to ask; a part the server refuses is split in halves
    // until the failing items stand alone.
    let mut parts: Vec<&[usize]> = asked.chunks(MAX_ITEMS_PER_STATEMENT).rev().collect();
    while let Some(part) = parts.pop() {
        let error = match ask(client, items, part).await {
            Ok(verdicts) => {
                for (&n, verdict) in part.iter().zip(verdicts) {
                    results[n] = Ok(verdict);
                }
                continue;
            }
            Err(e) => e,
        };
        match error.as_db_error() {
            // The pool's statement_timeout (`rls_timeout`): splitting would
            // wait that long again per half, so the whole part is denied,
            // as an RLS check that times out denies its groups.
            Some(db) if db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED => {
                warn!(items = part.len(), error = %db.message(), "server-side filters timed out; their subscriptions do not receive this change");
                for &n in part {
                    results[n] = Err(FilterFailure::Server {
                        column: items[n].0.column,
                        message: db.message().to_owned(),
                    });
                }
            }
            Some(db) if is_items_fault(db) => match part {
                [n] => {
                    let column = items[*n].0.column;
                    warn!(column, error = %db.message(), "filter failed on the server");
                    results[*n] = Err(FilterFailure::Server {
                        column,
                        message: db.message().to_owned(),
                    });
                }
                _ => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
            },
            _ => return Err(error),
        }
    }
    Ok(results)
}

/// Whether a server error comes from the values or filters of the
/// statement (a value that no longer casts, an operator gone with an
/// altered type), rather than from the session or the server (timeouts,
/// shutdown, resources: asking again later may succeed).
fn is_items_fault(db: &tokio_postgres::error::DbError) -> bool {
    let code = db.code().code();
    ["22", "23", "42", "0A"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// One statement, `SELECT ARRAY[(test 1), (test 2), ...]` (an array, as a
/// select list holds at most 1,664 columns), for the items at `indices`
/// (whose text is valid UTF-8).
async fn ask(
    client: &Client,
    items: &[(&CompiledFilter, &Datum)],
    indices: &[usize],
) -> Result<Vec<Verdict>, tokio_postgres::Error> {
    let values: Vec<Option<&str>> = indices
        .iter()
        .map(|&n| match items[n].1 {
            Datum::Text(text) => std::str::from_utf8(text).ok(),
            _ => None,
        })
        .collect();
    let mut sql = String::from("SELECT ARRAY[");
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::with_capacity(indices.len() * 2);
    for (i, &n) in indices.iter().enumerate() {
        let filter = items[n].0;
        if i > 0 {
            sql.push_str(", ");
        }
        params.push((&values[i], Type::TEXT));
        let value = params.len();
        let operand = match filter.operand_param() {
            Some(param) => {
                params.push(param);
                params.len()
            }
            None => 0,
        };
        filter.write_sql(&mut sql, Some(value), operand);
    }
    sql.push_str("]::pg_catalog.bool[]");
    let row = client.query_typed_one(&sql, &params).await?;
    let verdicts: Vec<Option<bool>> = row.try_get(0)?;
    Ok(verdicts.into_iter().map(Verdict::from_sql).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::evaluate::{Canonical, Plan};
    use super::super::filter::parse;
    use super::*;
    use crate::catalog::builtin;

    fn compiled(text: &str, collation: Option<&str>) -> CompiledFilter {
        CompiledFilter {
            filter: parse(text).unwrap().remove(0),
            column: 0,
            ty: builtin(23).unwrap(),
            sql_type: Arc::from("integer"),
            collation: collation.map(Arc::from),
            canonical: Canonical::Value(String::new()),
            plan: Plan::Server,
        }
    }

    fn sql(text: &str, collation: Option<&str>, value: Option<usize>) -> String {
        let mut out = String::new();
        compiled(text, collation).write_sql(&mut out, value, 2);
        out
    }

    #[test]
    fn sql_takes_values_only_as_parameters() {
        assert_eq!(
            sql("c=eq.1); DROP TABLE t; --", None, Some(1)),
            "($1::text::integer = $2::text::integer)"
        );
        assert_eq!(
            sql("c=not.lt.1", None, Some(1)),
            "NOT ($1::text::integer < $2::text::integer)"
        );
        assert_eq!(
            sql("c=in.(1,2)", None, None),
            "(NULL::text::integer = ANY($2::text[]::integer[]))"
        );
        assert_eq!(
            sql("c=not.is.unknown", None, Some(3)),
            "NOT ($3::text::integer IS UNKNOWN)"
        );
        assert_eq!(
            sql("c=ilike.%'--", Some("pg_catalog.\"default\""), Some(1)),
            "($1::text::integer COLLATE pg_catalog.\"default\" ~~* $2::text::integer)"
        );
        assert_eq!(
            sql("c=isdistinct.x", None, Some(1)),
            "($1::text::integer IS DISTINCT FROM $2::text::integer)"
        );
    }
}
