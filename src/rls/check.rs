//! One batched check: every (role, claims) group of one table, one call of
//! `walcast.visible_rows` in one read-only, repeatable-read transaction
//! (what the table holds and what each group may see of it are read in one
//! snapshot). The candidate rows' keys and committed images travel once;
//! each group names the rows it is a candidate for.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::Error;
use super::param::{Groups, Keys, Positions, WireGroup};

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

/// The committed new rows (the changes' images) of a check's candidates, in
/// the order of its keys: what each group's policies are evaluated on when
/// the table no longer holds them.
#[derive(Debug, Clone, Copy)]
pub struct Images<'a> {
    /// The columns the images carry, by name, in the relation's order (as
    /// pgoutput describes it: generated columns and columns a publication
    /// leaves out are absent, and count as unknown).
    pub columns: &'a [&'a str],
    /// One per candidate row: per column its text, `None` for NULL.
    pub rows: &'a [Vec<Option<&'a str>>],
    /// (row, column) indexes of values the WAL did not carry (an unchanged
    /// TOASTed column): neither NULL nor known.
    pub unknown: &'a [(u32, u32)],
}

/// What one check answered: one outcome per group, and how its rows were
/// decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Per group, in order.
    pub outcomes: Vec<GroupOutcome>,
    /// (Group, candidate) pairs decided on the committed image.
    pub by_image: u64,
    /// (Group, candidate) pairs decided by a lookup because the image could
    /// not decide (see [`crate::metrics::RLS_FALLBACK`]).
    pub by_fallback: u64,
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

/// Which candidates of each group may see their row, asked in one call.
/// `keys` holds the candidate rows' keys: one tuple per row, one text value
/// per key column (the column's text output, as pgoutput sends it);
/// `images` their committed new rows. A row the table still holds as
/// committed (in the values the policies read) is looked up in the table as
/// the group's role; any other row is decided by the group's policies on its
/// image; a row whose image lacks a value the policies read is looked up
/// (the fallback). Without `images` every row is looked up.
///
/// One pooled connection, one `READ ONLY`, `REPEATABLE READ` transaction
/// with `statement_timeout` and `walcast.rls_sorted_keys` from `options`,
/// one call of `walcast.visible_rows`; the answer has one [`GroupOutcome`]
/// per group, in order. A group whose check raises is
/// [`GroupOutcome::Failed`] and does not affect the others. An `Err` means
/// nothing is known: deny every group. If the server does not answer within
/// `timeout` plus a grace period, the connection is closed rather than
/// returned to the pool.
pub async fn check(
    pool: &Pool,
    table: &TableRef<'_>,
    keys: &[Vec<Option<&str>>],
    images: Option<&Images<'_>>,
    groups: &[Group<'_>],
    options: &CheckOptions,
) -> Result<Answer, Error> {
    let timeout = options.timeout;
    if groups.is_empty() {
        return Ok(Answer {
            outcomes: Vec::new(),
            by_image: 0,
            by_fallback: 0,
        });
    }
    let (keys, wire) = wire_form(table, keys, groups)?;
    let images = images
        .map(|images| wire_images(images, keys.keys.len()))
        .transpose()?;
    let deadline = timeout + CLIENT_GRACE;
    // The pool wait counts against the deadline too.
    let mut client = tokio::time::timeout(deadline, pool.get())
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    match tokio::time::timeout(
        deadline,
        ask(&mut client, table, &keys, images.as_ref(), &wire, options),
    )
    .await
    {
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

/// The images in wire form, checked against the keys.
struct WireImages<'a> {
    columns: Vec<&'a str>,
    values: Keys<'a>,
    unknown_rows: Positions,
    unknown_columns: Vec<&'a str>,
}

fn wire_images<'a>(images: &Images<'a>, rows: usize) -> Result<WireImages<'a>, Error> {
    if images.rows.len() != rows {
        return Err(Error::Images(format!(
            "{} images for {rows} candidate rows",
            images.rows.len()
        )));
    }
    let width = images.columns.len();
    if let Some(row) = images.rows.iter().position(|r| r.len() != width) {
        return Err(Error::Images(format!(
            "image {row} has {} values for {width} columns",
            images.rows[row].len()
        )));
    }
    let mut unknown_rows = Vec::with_capacity(images.unknown.len());
    let mut unknown_columns = Vec::with_capacity(images.unknown.len());
    for &(row, column) in images.unknown {
        let name = images
            .columns
            .get(column as usize)
            .filter(|_| (row as usize) < rows)
            .ok_or_else(|| {
                Error::Images(format!(
                    "unknown value ({row}, {column}) is outside the images"
                ))
            })?;
        unknown_rows.push(row);
        unknown_columns.push(*name);
    }
    Ok(WireImages {
        columns: images.columns.to_vec(),
        values: Keys {
            keys: images.rows,
            columns: width,
        },
        unknown_rows: Positions(unknown_rows),
        unknown_columns,
    })
}

/// The rows of `walcast.visible_rows`: (group_no, visible, by_image,
/// by_fallback, code, message).
type Row = (
    i32,
    Option<Vec<i32>>,
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

async fn ask(
    client: &mut Object,
    table: &TableRef<'_>,
    keys: &Keys<'_>,
    images: Option<&WireImages<'_>>,
    groups: &Groups<'_>,
    options: &CheckOptions,
) -> Result<Vec<Row>, Error> {
    let timeout = options.timeout;
    let server = |e| classify(e, table, timeout);
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(server)?;
    let (set_options, visible_rows) = tokio::try_join!(
        tx.prepare_cached(include_str!("../../sql/rls_options.sql")),
        tx.prepare_cached(include_str!("../../sql/rls_check.sql")),
    )
    .map_err(server)?;
    // A foreign walcast.rls_subject would fail to encode: say so rather
    // than retry forever.
    if !visible_rows.params().get(8).is_some_and(Groups::fits) {
        return Err(Error::NotInstalled(
            "walcast.rls_subject is not (role text, claims text, candidates integer[])".into(),
        ));
    }
    let millis = format!("{}ms", timeout.as_millis().clamp(1, i32::MAX as u128));
    let key_columns: Vec<&str> = table.key_columns.to_vec();
    // Pipelined: the options are in force before the call starts.
    let sorted_keys = options.sorted_keys.as_str();
    let option_params: [&(dyn ToSql + Sync); 2] = [&millis, &sorted_keys];
    let no_columns: Option<Vec<&str>> = None;
    let no_values: Option<Keys<'_>> = None;
    let (columns, values, unknown_rows, unknown_columns): (
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
    ) = match images {
        Some(images) => (
            &images.columns,
            &images.values,
            &images.unknown_rows,
            &images.unknown_columns,
        ),
        None => (
            &no_columns,
            &no_values,
            &Positions(Vec::new()),
            &Vec::<&str>::new(),
        ),
    };
    let check_params: [&(dyn ToSql + Sync); 9] = [
        &table.schema,
        &table.name,
        &key_columns,
        keys,
        columns,
        values,
        unknown_rows,
        unknown_columns,
        groups,
    ];
    let (_, rows) = tokio::try_join!(
        tx.execute(&set_options, &option_params),
        tx.query(&visible_rows, &check_params),
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
                row.try_get(4)?,
                row.try_get(5)?,
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

/// One outcome per group, checked against what was asked. The server names
/// visible rows by their 1-based position in the keys; a group's flags
/// follow its own candidates.
fn outcomes(keys: usize, groups: &[Group<'_>], rows: Vec<Row>) -> Result<Answer, Error> {
    if rows.len() != groups.len() {
        return Err(Error::Answer(format!(
            "{} rows for {} groups",
            rows.len(),
            groups.len()
        )));
    }
    let mut answer = Answer {
        outcomes: Vec::with_capacity(groups.len()),
        by_image: 0,
        by_fallback: 0,
    };
    for (g, (group, (number, visible, by_image, by_fallback, code, message))) in
        groups.iter().zip(rows).enumerate()
    {
        if usize::try_from(number).ok() != Some(g + 1) {
            return Err(Error::Answer(format!(
                "group {number} where {} was due",
                g + 1
            )));
        }
        answer.by_image += by_image.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        answer.by_fallback += by_fallback.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        let outcome = match (visible, code) {
            (_, Some(code)) => GroupOutcome::Failed {
                code,
                message: message.unwrap_or_default(),
            },
            (Some(positions), None) => {
                let mut flags = vec![false; group.rows.count(keys)];
                let place = Place::of(&group.rows);
                for position in positions {
                    let row = usize::try_from(position)
                        .ok()
                        .and_then(|p| p.checked_sub(1))
                        .filter(|&row| row < keys);
                    let index = row.and_then(|row| place.index(row));
                    let slot = index.and_then(|i| flags.get_mut(i)).ok_or_else(|| {
                        Error::Answer(format!("group {number}: position {position}"))
                    })?;
                    *slot = true;
                }
                GroupOutcome::Visible(flags)
            }
            (None, None) => {
                return Err(Error::Answer(format!(
                    "group {number}: neither rows nor error"
                )));
            }
        };
        answer.outcomes.push(outcome);
    }
    Ok(answer)
}

/// Where a row of the keys is among a group's candidates: itself for
/// [`Rows::All`]; found by binary search when the candidates come in
/// increasing order (as [`crate::subscription`] lists them), by a linear
/// one otherwise. Decided once per group.
enum Place<'a> {
    All,
    Sorted(&'a [u32]),
    Unsorted(&'a [u32]),
}

impl<'a> Place<'a> {
    fn of(rows: &'a Rows) -> Place<'a> {
        match rows {
            Rows::All => Place::All,
            Rows::Only(only) if only.windows(2).all(|w| w[0] < w[1]) => Place::Sorted(only),
            Rows::Only(only) => Place::Unsorted(only),
        }
    }

    fn index(&self, row: usize) -> Option<usize> {
        let row32 = u32::try_from(row).ok()?;
        match self {
            Place::All => Some(row),
            Place::Sorted(only) => only.binary_search(&row32).ok(),
            Place::Unsorted(only) => only.iter().position(|&r| r == row32),
        }
    }
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
            (1, Some(vec![1, 3]), Some(2), Some(1), None, None),
            (
                2,
                None,
                None,
                None,
                Some("22P02".into()),
                Some("invalid input syntax for type uuid".into()),
            ),
            (3, Some(vec![]), Some(0), Some(0), None, None),
            (4, Some(vec![3]), Some(1), Some(0), None, None),
        ];
        let answer = outcomes(4, &groups, rows).unwrap();
        let out = &answer.outcomes;
        assert_eq!(
            out[0],
            GroupOutcome::Visible(vec![true, false, true, false])
        );
        assert!(!out[1].is_visible(0));
        assert_eq!(out[2], GroupOutcome::Visible(vec![]));
        assert_eq!(out[3], GroupOutcome::Visible(vec![false, true]));
        assert!(!out[0].is_visible(7));
        assert_eq!((answer.by_image, answer.by_fallback), (3, 1));
        // Candidates out of order are found too.
        let unsorted = [group(&claims, Rows::Only(vec![3, 1]))];
        let answer = outcomes(
            4,
            &unsorted,
            vec![(1, Some(vec![2]), None, None, None, None)],
        )
        .unwrap();
        assert_eq!(answer.outcomes[0], GroupOutcome::Visible(vec![false, true]));
    }

    #[test]
    fn an_answer_that_does_not_fit_the_question_is_an_error() {
        let claims = serde_json::json!({});
        let groups = [group(&claims, Rows::Only(vec![0]))];
        for rows in [
            vec![],
            vec![(2, Some(vec![]), None, None, None, None)],
            vec![(1, Some(vec![2]), None, None, None, None)],
            vec![(1, Some(vec![0]), None, None, None, None)],
            vec![(1, None, None, None, None, None)],
        ] {
            assert!(matches!(outcomes(1, &groups, rows), Err(Error::Answer(_))));
        }
        // A row of the keys that is not among the group's candidates.
        let groups = [group(&claims, Rows::Only(vec![1]))];
        assert!(matches!(
            outcomes(2, &groups, vec![(1, Some(vec![1]), None, None, None, None)]),
            Err(Error::Answer(_))
        ));
    }

    #[test]
    fn images_must_fit_the_keys_and_their_columns() {
        let columns = ["id", "owner"];
        let rows = vec![vec![Some("1"), None]];
        let fits = Images {
            columns: &columns,
            rows: &rows,
            unknown: &[(0, 1)],
        };
        let wire = wire_images(&fits, 1).unwrap();
        assert_eq!(wire.unknown_columns, ["owner"]);
        assert_eq!(wire.unknown_rows.0, [0]);
        assert!(matches!(wire_images(&fits, 2), Err(Error::Images(_))));
        let outside = Images {
            unknown: &[(0, 2)],
            ..fits
        };
        assert!(matches!(wire_images(&outside, 1), Err(Error::Images(_))));
        let narrow = vec![vec![Some("1")]];
        let short = Images {
            rows: &narrow,
            unknown: &[],
            ..fits
        };
        assert!(matches!(wire_images(&short, 1), Err(Error::Images(_))));
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
