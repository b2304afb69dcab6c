//! Which matching subscriptions may see a change, and how: grouped so that
//! each distinct view of the change is encoded once.
//!
//! What each role may see: the columns it may select (and, with `select`,
//! only those plus the primary key); a primary key it may not select makes
//! the payload Supabase's `Error 401`. On a table with row level security,
//! a DELETE is not checked against policies (Supabase's rule) and shows
//! only the primary key. Rows of INSERT/UPDATE on such a table are checked
//! against the policies by [`crate::rls`], all subscribers of a change in
//! one call, grouped by (role, claims); a group whose check fails is denied
//! and told so, the others go on.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tracing::{debug, warn};

use super::{CompiledFilter, Entry, Verdict, evaluate_all, evaluate_on_server};
use crate::catalog::{self, Catalog};
use crate::change::{Change, ChangeKind, Datum, OldRow, Row};
use crate::metrics;
use crate::rls::{self, Group, GroupOutcome, TableRef};

/// Why visibility could not be decided (the database is unreachable); the
/// session restarts and the change is decided again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    /// No connection for server-side filters.
    #[error("evaluating filters: no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Server-side filters failed as a whole.
    #[error("evaluating filters: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Catalog(e) => e.is_transient(),
            Error::Pool(_) | Error::Query(_) => true,
        }
    }
}

/// How long one RLS check may take before its groups are denied.
const RLS_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscriptions that may not see a change because their visibility could
/// not be decided (a policy raised, the check timed out).
#[derive(Debug)]
pub struct Denial {
    /// The subscriptions.
    pub entries: Vec<Arc<Entry>>,
    /// Why, for the error event and the log.
    pub message: String,
}

/// A group of subscriptions that see a change the same way.
#[derive(Debug)]
pub struct Delivery {
    /// Per column, whether it is shown; `None` when all are.
    pub visible: Option<Arc<[bool]>>,
    /// A DELETE under RLS: `old_record` holds only the primary key.
    pub old_record_primary_key_only: bool,
    /// The subscriptions, in registry order.
    pub entries: Vec<Arc<Entry>>,
}

/// Decides, for a batch of changes in WAL order with the subscriptions
/// matching each one's table and kind, who may see what: filters per
/// change, then the RLS checks of the whole batch — one call per table,
/// every (role, claims) group with the keys of all its candidate rows —
/// then the views. Returns, per change and in order, its deliveries and
/// its denials. Batching changes the number of round trips, never the
/// order of events.
pub async fn authorize(
    catalog: &mut Catalog,
    pool: &Pool,
    batch: &mut [(&Change, Vec<Arc<Entry>>)],
) -> Result<Vec<(Vec<Delivery>, Vec<Denial>)>, Error> {
    let mut passing = Vec::with_capacity(batch.len());
    let mut row_security = Vec::with_capacity(batch.len());
    // The candidates move on into `passing`; `batch` keeps the changes.
    for (change, candidates) in batch.iter_mut() {
        let candidates = std::mem::take(candidates);
        let entries = if candidates.is_empty() {
            Vec::new()
        } else {
            passing_filters(pool, change, candidates).await?
        };
        let secured = !entries.is_empty() && catalog.row_security(change.relation.id).await?;
        row_security.push(secured);
        passing.push(entries);
    }
    let mut denials: Vec<Vec<Denial>> = batch.iter().map(|_| Vec::new()).collect();
    let checked: Vec<usize> = batch
        .iter()
        .enumerate()
        .filter(|(i, (change, _))| {
            row_security[*i]
                && change.relation.has_primary_key
                && matches!(
                    change.kind,
                    ChangeKind::Insert { .. } | ChangeKind::Update { .. }
                )
        })
        .map(|(i, _)| i)
        .collect();
    let mut tables: Vec<u32> = checked.iter().map(|&i| batch[i].0.relation.id).collect();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        let rows: Vec<usize> = checked
            .iter()
            .copied()
            .filter(|&i| batch[i].0.relation.id == table)
            .collect();
        visible_rows(pool, batch, &rows, &mut passing, &mut denials).await;
    }
    let mut out = Vec::with_capacity(batch.len());
    for (((change, _), entries), (secured, denied)) in batch
        .iter()
        .zip(passing)
        .zip(row_security.into_iter().zip(denials))
    {
        out.push((views(catalog, change, entries, secured).await?, denied));
    }
    Ok(out)
}

/// Groups `entries` (allowed to see `change`) by what they may see of it:
/// the columns their role may select and their `select`.
async fn views(
    catalog: &mut Catalog,
    change: &Change,
    entries: Vec<Arc<Entry>>,
    row_security: bool,
) -> Result<Vec<Delivery>, Error> {
    let relation = &change.relation;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let mut groups: HashMap<Arc<[bool]>, Vec<Arc<Entry>>> = HashMap::new();
    let mut order: Vec<Arc<[bool]>> = Vec::new();
    for entry in entries {
        let selectable = catalog.selectable(&entry.role, relation.id, &names).await?;
        let visible: Arc<[bool]> = match &entry.select {
            None => selectable,
            Some(select) => relation
                .columns
                .iter()
                .zip(selectable.iter())
                .map(|(column, &may)| {
                    may && (column.is_primary_key || select.contains(&column.name))
                })
                .collect(),
        };
        if !groups.contains_key(&visible) {
            order.push(visible.clone());
        }
        groups.entry(visible).or_default().push(entry);
    }
    Ok(order
        .into_iter()
        .filter_map(|visible| {
            let entries = groups.remove(&visible)?;
            let all = visible.iter().all(|&v| v);
            Some(Delivery {
                visible: (!all).then_some(visible),
                old_record_primary_key_only: row_security,
                entries,
            })
        })
        .collect())
}

/// Keeps, for each of `rows` (indexes into `batch`, all of one table), the
/// candidates whose role, with their claims, sees the change's new row in
/// the table now (Supabase's rule: a lookup by primary key as the
/// subscriber). One call for all of them: one group per (role, claims),
/// holding the keys of every row that group is a candidate for.
async fn visible_rows(
    pool: &Pool,
    batch: &[(&Change, Vec<Arc<Entry>>)],
    rows: &[usize],
    passing: &mut [Vec<Arc<Entry>>],
    denials: &mut [Vec<Denial>],
) {
    let Some(&first) = rows.first() else { return };
    let relation = &batch[first].0.relation;
    let key_columns: Vec<&str> = relation
        .columns
        .iter()
        .filter(|c| c.is_primary_key)
        .map(|c| c.name.as_str())
        .collect();
    // (role, claims) → (the rows asked, and per row the entries asking).
    struct Asking<'a> {
        role: Arc<str>,
        claims: serde_json::Value,
        keys: Vec<Vec<Option<&'a str>>>,
        askers: Vec<(usize, Vec<Arc<Entry>>)>,
    }
    let mut asking: Vec<Asking<'_>> = Vec::new();
    // (role, claims text) → index in `asking`: grouping costs one hash
    // lookup per candidate, however many subscribers there are.
    let mut group_of: HashMap<(Arc<str>, Arc<str>), usize> = HashMap::new();
    for &row in rows {
        let (change, _) = &batch[row];
        let (ChangeKind::Insert { new } | ChangeKind::Update { new, .. }) = &change.kind else {
            continue;
        };
        // A table's description may change within a batch; keys follow
        // this change's own columns.
        let key: Vec<Option<&str>> = change
            .relation
            .columns
            .iter()
            .zip(new)
            .filter(|(c, _)| c.is_primary_key)
            .map(|(_, datum)| match datum {
                Datum::Text(text) => std::str::from_utf8(text).ok(),
                _ => None,
            })
            .collect();
        for entry in std::mem::take(&mut passing[row]) {
            let group = *group_of
                .entry((entry.role.clone(), entry.claims_text.clone()))
                .or_insert_with(|| {
                    asking.push(Asking {
                        role: entry.role.clone(),
                        claims: entry.claims.clone(),
                        keys: Vec::new(),
                        askers: Vec::new(),
                    });
                    asking.len() - 1
                });
            let a = &mut asking[group];
            if a.askers.last().is_some_and(|(r, _)| *r == row) {
                if let Some((_, entries)) = a.askers.last_mut() {
                    entries.push(entry);
                }
            } else {
                a.keys.push(key.clone());
                a.askers.push((row, vec![entry]));
            }
        }
    }
    let groups: Vec<Group<'_>> = asking
        .iter()
        .map(|a| Group {
            role: &a.role,
            claims: &a.claims,
            keys: a.keys.clone(),
        })
        .collect();
    let table = TableRef {
        schema: &relation.schema,
        name: &relation.table,
        key_columns: &key_columns,
    };
    let started = Instant::now();
    let checked = rls::check(pool, &table, &groups, RLS_TIMEOUT).await;
    metrics::counter!(metrics::RLS_CHECKS).increment(1);
    metrics::histogram!(metrics::RLS_CHECK_SECONDS).record(started.elapsed());
    drop(groups);
    let outcomes = match checked {
        Ok(outcomes) => outcomes,
        Err(e) => {
            warn!(schema = %relation.schema, table = %relation.table, error = %e, "rls check failed; denying these changes to their subscribers");
            let message = format!("RLS policy evaluation failed: {e}");
            for a in asking {
                for (row, entries) in a.askers {
                    denials[row].push(Denial {
                        entries,
                        message: message.clone(),
                    });
                }
            }
            return;
        }
    };
    for (a, outcome) in asking.into_iter().zip(outcomes) {
        match outcome {
            GroupOutcome::Visible(_) => {
                for (n, (row, entries)) in a.askers.into_iter().enumerate() {
                    if outcome.is_visible(n) {
                        passing[row].extend(entries);
                    } else {
                        metrics::counter!(metrics::RLS_DENIED).increment(entries.len() as u64);
                    }
                }
            }
            GroupOutcome::Failed { code, message } => {
                debug!(%code, %message, "rls policy raised for a group; denied");
                let message = format!("RLS policy evaluation failed: {code}: {message}");
                for (row, entries) in a.askers {
                    denials[row].push(Denial {
                        entries,
                        message: message.clone(),
                    });
                }
            }
        }
    }
    // Entries come back grouped, not in registry order; order within a
    // change does not matter to anyone (ids of one event).
}

/// The row filters are evaluated on: the new row of an INSERT or UPDATE
/// (Supabase filters updates on the new row only), the identity of a
/// DELETE. In a key-only old row the other columns are absent, not NULL:
/// a filter on them does not hold (not even `is.null`).
fn filter_row(kind: &ChangeKind) -> Option<Cow<'_, Row>> {
    match kind {
        ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => Some(Cow::Borrowed(new)),
        ChangeKind::Delete {
            old: OldRow::Full(row),
        } => Some(Cow::Borrowed(row)),
        ChangeKind::Delete {
            old: OldRow::Key(row),
        } => Some(Cow::Owned(row.clone())),
        ChangeKind::Truncate { .. } => None,
    }
}

/// The candidates whose filters hold for `change`: decided in-process where
/// the comparison is exactly known, by the server (one round trip for all
/// the rest) otherwise. A filter the server cannot evaluate denies.
async fn passing_filters(
    pool: &Pool,
    change: &Change,
    candidates: Vec<Arc<Entry>>,
) -> Result<Vec<Arc<Entry>>, Error> {
    let table = change.relation.id;
    if candidates.iter().all(|e| e.filters_for(table).is_empty()) {
        return Ok(candidates);
    }
    let Some(mut row) = filter_row(&change.kind) else {
        return Ok(Vec::new());
    };
    if let ChangeKind::Delete {
        old: OldRow::Key(_),
    } = &change.kind
    {
        for (datum, column) in row.to_mut().iter_mut().zip(&change.relation.columns) {
            if !column.is_key {
                *datum = Datum::UnchangedToast;
            }
        }
    }
    let mut passing = Vec::with_capacity(candidates.len());
    let mut undecided = Vec::new();
    for entry in candidates {
        match evaluate_all(entry.filters_for(table), &row) {
            Some(true) => passing.push(entry),
            Some(false) => {}
            None => undecided.push(entry),
        }
    }
    if undecided.is_empty() {
        return Ok(passing);
    }
    let items: Vec<(&CompiledFilter, &Datum)> = undecided
        .iter()
        .flat_map(|entry| entry.filters_for(table))
        .filter_map(|f| row.get(f.column_index()).map(|datum| (f, datum)))
        .collect();
    let client = pool.get().await?;
    let verdicts = evaluate_on_server(&client, &items).await?;
    let mut verdicts = verdicts.into_iter();
    for entry in undecided {
        let mut holds = true;
        for filter in entry.filters_for(table) {
            if row.get(filter.column_index()).is_none() {
                holds = false;
                continue;
            }
            match verdicts.next() {
                Some(Ok(Verdict::True)) => {}
                Some(Ok(_)) => holds = false,
                Some(Err(failure)) => {
                    debug!(gateway = %entry.gateway, id = %entry.id, %failure, "filter failed on the server; not delivered");
                    holds = false;
                }
                None => holds = false,
            }
        }
        if holds {
            passing.push(entry);
        }
    }
    Ok(passing)
}
