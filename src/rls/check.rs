//! One batched check: every (role, claims) group of one table, one call of
//! `walcast.visible_keys` in one read-only transaction. The candidate rows'
//! keys travel once; each group names the rows it is a candidate for.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::Error;
use super::param::{Groups, Keys, WireGroup};

/// How much longer than the server's `statement_timeout` the client waits
/// before giving up on the connection itself (a server that does not answer
/// at all: network gone, machine frozen).
const CLIENT_GRACE: Duration = Duration::from_secs(2);

/// Whether unfiltered groups may search the call's keys, sorted once, for
/// the rows they can see instead of probing every candidate per group
/// (`sql/rls.sql`, "Many groups"): the `rls_sorted_keys` setting, sent as
/// `walcast.rls_sorted_keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortedKeys {
    /// With 8 or more unfiltered groups, per role, when the planner
    /// estimates the search cheaper.
    #[default]
    Auto,
    /// Whenever the key type can be searched so: fixed width, a default
    /// btree order, its type's own collation (for tests and for a planner
    /// that misjudges).
    On,
    /// Never: every group probes its candidates.
    Off,
}

impl SortedKeys {
    /// The setting's text, as `walcast.rls_sorted_keys` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SortedKeys::Auto => "auto",
            SortedKeys::On => "on",
            SortedKeys::Off => "off",
        }
    }

    /// Parses `auto`, `on` or `off`.
    pub fn parse(text: &str) -> Option<SortedKeys> {
        [SortedKeys::Auto, SortedKeys::On, SortedKeys::Off]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// How one check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// The longest the check statement may run (`statement_timeout`); the
    /// client gives up on the connection a little after that.
    pub timeout: Duration,
    /// Whether unfiltered groups may search the sorted keys.
    pub sorted_keys: SortedKeys,
}

/// The table a check is about, and its key columns (the primary key, or the
/// replica identity index) by name. Their types are not needed: the
/// function reads them from the catalog, so they can be neither stale nor
/// spliced from outside.
#[derive(Debug, Clone, Copy)]
pub struct TableRef<'a> {
    /// Schema name, as in the catalog (not quoted).
    pub schema: &'a str,
    /// Table name, as in the catalog (not quoted).
    pub name: &'a str,
    /// Key column names, in key order.
    pub key_columns: &'a [&'a str],
}

/// Subscribers sharing a role and claims, and the rows they are candidates
/// for.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    /// The role to check as (`SET ROLE`); the login role must be a member.
    pub role: &'a str,
    /// The JWT claims, set as `request.jwt.claims` (its JSON text).
    pub claims: &'a serde_json::Value,
    /// Which of the check's rows (its keys) the group is a candidate for.
    pub rows: Rows,
}

/// Rows of a check a group is a candidate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    /// Every row (an unfiltered subscriber): nothing per group on the wire.
    All,
    /// These rows, by index into the check's keys.
    Only(Vec<u32>),
}

impl Rows {
    /// How many candidates, of a check with `rows` rows.
    fn count(&self, rows: usize) -> usize {
        match self {
            Rows::All => rows,
            Rows::Only(only) => only.len(),
        }
    }
}

/// What Postgres answered for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    /// One flag per candidate, in the group's order (for [`Rows::All`], the
    /// keys' order): whether the role, with these claims, sees that row now.
    Visible(Vec<bool>),
    /// The group's check raised (a policy error, a role that does not exist
    /// or may not be assumed, a missing privilege): deny the whole group.
    Failed {
        /// SQLSTATE, e.g. `22P02` for a claim that is not a valid uuid.
        code: String,
        /// Postgres's message.
        message: String,
    },
}

impl GroupOutcome {
    /// Whether candidate `index` may be delivered: `false` for a failed
    /// group and for an index out of range.
    pub fn is_visible(&self, index: usize) -> bool {
        match self {
            GroupOutcome::Visible(flags) => flags.get(index).copied().unwrap_or(false),
            GroupOutcome::Failed { .. } => false,
        }
    }
}

/// Which candidates of each group are visible in `table`, asked in one call.
/// `keys` holds the candidate rows' keys: one tuple per row, one text value
/// per key column (the column's text output, as pgoutput sends it).
///
/// One pooled connection, one `READ ONLY` transaction with
/// `statement_timeout` and `walcast.rls_sorted_keys` from `options`, one call of
/// `walcast.visible_keys`;
/// the answer has one [`GroupOutcome`] per group, in order. A group whose
/// check raises is [`GroupOutcome::Failed`] and does not affect the others.
/// An `Err` means nothing is known: deny every group. If the server does
/// not answer within `timeout` plus a grace period, the connection is
/// closed rather than returned to the pool.
pub async fn check(
    pool: &Pool,
    table: &TableRef<'_>,
    keys: &[Vec<Option<&str>>],
    groups: &[Group<'_>],
    options: &CheckOptions,
) -> Result<Vec<GroupOutcome>, Error> {
    let timeout = options.timeout;
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let (keys, wire) = wire_form(table, keys, groups)?;
    let deadline = timeout + CLIENT_GRACE;
    // The pool wait counts against the deadline too.
    let mut client = tokio::time::timeout(deadline, pool.get())
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    match tokio::time::timeout(deadline, ask(&mut client, table, &keys, &wire, options)).await {
        Ok(answer) => outcomes(keys.keys.len(), groups, answer?),
        Err(_) => {
            // The transaction's drop queued a ROLLBACK, but a server this
            // slow may still be running our statement: close the connection.
            drop(Object::take(client));
            Err(Error::Timeout(timeout))
        }
    }
}

/// Checks the shape of the input and puts it in wire form.
fn wire_form<'a>(
    table: &TableRef<'_>,
    keys: &'a [Vec<Option<&'a str>>],
    groups: &'a [Group<'a>],
) -> Result<(Keys<'a>, Groups<'a>), Error> {
    let want = table.key_columns.len();
    if want == 0 {
        return Err(Error::NoSuchColumn("(none given)".into()));
    }
    if i32::try_from(groups.len()).is_err()
        || i32::try_from(keys.len().saturating_mul(want)).is_err()
    {
        return Err(Error::TooLarge("more groups or keys than an array holds"));
    }
    if let Some((candidate, tuple)) = keys.iter().enumerate().find(|(_, t)| t.len() != want) {
        return Err(Error::KeyArity {
            candidate,
            got: tuple.len(),
            want,
        });
    }
    let mut wire = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        if let Rows::Only(rows) = &group.rows
            && let Some(&row) = rows.iter().find(|&&r| r as usize >= keys.len())
        {
            return Err(Error::NoSuchRow { group: g, row });
        }
        wire.push(WireGroup {
            role: group.role,
            claims: group.claims.to_string(),
            rows: &group.rows,
        });
    }
    Ok((
        Keys {
            keys,
            columns: want,
        },
        Groups { groups: wire },
    ))
}

/// The rows of `walcast.visible_keys`: (group_no, visible, code, message).
type Row = (i32, Option<Vec<i32>>, Option<String>, Option<String>);

async fn ask(
    client: &mut Object,
    table: &TableRef<'_>,
    keys: &Keys<'_>,
    groups: &Groups<'_>,
    options: &CheckOptions,
) -> Result<Vec<Row>, Error> {
    let timeout = options.timeout;
    let server = |e| classify(e, table, timeout);
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(server)?;
    let (set_options, visible_keys) = tokio::try_join!(
        tx.prepare_cached(include_str!("../../sql/rls_options.sql")),
        tx.prepare_cached(include_str!("../../sql/rls_check.sql")),
    )
    .map_err(server)?;
    // A foreign walcast.rls_subject would fail to encode: say so rather
    // than retry forever.
    if !visible_keys.params().get(4).is_some_and(Groups::fits) {
        return Err(Error::NotInstalled(
            "walcast.rls_subject is not (role text, claims text, candidates integer[])".into(),
        ));
    }
    let millis = format!("{}ms", timeout.as_millis().clamp(1, i32::MAX as u128));
    let key_columns: Vec<&str> = table.key_columns.to_vec();
    // Pipelined: the options are in force before the call starts.
    let sorted_keys = options.sorted_keys.as_str();
    let option_params: [&(dyn ToSql + Sync); 2] = [&millis, &sorted_keys];
    let check_params: [&(dyn ToSql + Sync); 5] =
        [&table.schema, &table.name, &key_columns, keys, groups];
    let (_, rows) = tokio::try_join!(
        tx.execute(&set_options, &option_params),
        tx.query(&visible_keys, &check_params),
    )
    .map_err(server)?;
    // Read only: nothing to keep. Ending the transaction also ends every
    // transaction-local setting, should any have survived.
    tx.rollback().await.map_err(server)?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| Error::Answer(e.to_string()))
}

/// Turns the server's whole-call errors into what they mean for walcast.
fn classify(error: tokio_postgres::Error, table: &TableRef<'_>, timeout: Duration) -> Error {
    let Some(db) = error.as_db_error() else {
        return Error::Query(error);
    };
    let code = db.code();
    if *code == SqlState::QUERY_CANCELED {
        Error::Timeout(timeout)
    } else if [
        SqlState::UNDEFINED_FUNCTION,
        SqlState::INVALID_SCHEMA_NAME,
        SqlState::UNDEFINED_OBJECT,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ]
    .contains(code)
    {
        Error::NotInstalled(db.message().to_owned())
    } else if *code == SqlState::UNDEFINED_TABLE {
        Error::NoSuchTable {
            schema: table.schema.to_owned(),
            name: table.name.to_owned(),
        }
    } else if *code == SqlState::UNDEFINED_COLUMN {
        Error::NoSuchColumn(db.message().to_owned())
    } else {
        Error::Query(error)
    }
}

/// One outcome per group, checked against what was asked.
fn outcomes(keys: usize, groups: &[Group<'_>], rows: Vec<Row>) -> Result<Vec<GroupOutcome>, Error> {
    if rows.len() != groups.len() {
        return Err(Error::Answer(format!(
            "{} rows for {} groups",
            rows.len(),
            groups.len()
        )));
    }
    groups
        .iter()
        .zip(rows)
        .enumerate()
        .map(|(g, (group, (number, visible, code, message)))| {
            if usize::try_from(number).ok() != Some(g + 1) {
                return Err(Error::Answer(format!(
                    "group {number} where {} was due",
                    g + 1
                )));
            }
            match (visible, code) {
                (_, Some(code)) => Ok(GroupOutcome::Failed {
                    code,
                    message: message.unwrap_or_default(),
                }),
                (Some(positions), None) => {
                    let mut flags = vec![false; group.rows.count(keys)];
                    for position in positions {
                        let slot = usize::try_from(position)
                            .ok()
                            .and_then(|p| p.checked_sub(1))
                            .and_then(|i| flags.get_mut(i))
                            .ok_or_else(|| {
                                Error::Answer(format!("group {number}: position {position}"))
                            })?;
                        *slot = true;
                    }
                    Ok(GroupOutcome::Visible(flags))
                }
                (None, None) => Err(Error::Answer(format!(
                    "group {number}: neither rows nor error"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn group(claims: &serde_json::Value, rows: Rows) -> Group<'_> {
        Group {
            role: "authenticated",
            claims,
            rows,
        }
    }

    #[test]
    fn positions_become_flags_and_errors_deny() {
        let claims = serde_json::json!({});
        let groups = [
            group(&claims, Rows::All),
            group(&claims, Rows::Only(vec![3])),
            group(&claims, Rows::Only(vec![])),
            group(&claims, Rows::Only(vec![1, 2])),
        ];
        let rows = vec![
            (1, Some(vec![1, 3]), None, None),
            (
                2,
                None,
                Some("22P02".into()),
                Some("invalid input syntax for type uuid".into()),
            ),
            (3, Some(vec![]), None, None),
            (4, Some(vec![2]), None, None),
        ];
        let out = outcomes(4, &groups, rows).unwrap();
        assert_eq!(
            out[0],
            GroupOutcome::Visible(vec![true, false, true, false])
        );
        assert!(!out[1].is_visible(0));
        assert_eq!(out[2], GroupOutcome::Visible(vec![]));
        assert_eq!(out[3], GroupOutcome::Visible(vec![false, true]));
        assert!(!out[0].is_visible(7));
    }

    #[test]
    fn an_answer_that_does_not_fit_the_question_is_an_error() {
        let claims = serde_json::json!({});
        let groups = [group(&claims, Rows::Only(vec![0]))];
        for rows in [
            vec![],
            vec![(2, Some(vec![]), None, None)],
            vec![(1, Some(vec![2]), None, None)],
            vec![(1, Some(vec![0]), None, None)],
            vec![(1, None, None, None)],
        ] {
            assert!(matches!(outcomes(1, &groups, rows), Err(Error::Answer(_))));
        }
    }

    #[test]
    fn key_tuples_must_match_the_key_columns_and_rows_the_keys() {
        let claims = serde_json::json!({});
        let keys = vec![vec![Some("1")], vec![Some("2"), Some("x")]];
        let groups = [group(&claims, Rows::All)];
        let table = TableRef {
            schema: "public",
            name: "t",
            key_columns: &["id"],
        };
        assert!(matches!(
            wire_form(&table, &keys, &groups),
            Err(Error::KeyArity {
                candidate: 1,
                got: 2,
                want: 1
            })
        ));
        let no_key = TableRef {
            key_columns: &[],
            ..table
        };
        assert!(matches!(
            wire_form(&no_key, &keys, &groups),
            Err(Error::NoSuchColumn(_))
        ));
        let keys = vec![vec![Some("1")]];
        let beyond = [
            group(&claims, Rows::All),
            group(&claims, Rows::Only(vec![0, 1])),
        ];
        assert!(matches!(
            wire_form(&table, &keys, &beyond),
            Err(Error::NoSuchRow { group: 1, row: 1 })
        ));
    }
}
