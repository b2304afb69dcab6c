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
use std::time::Instant;

use deadpool_postgres::Pool;
use futures_util::stream::{self, StreamExt};
use tracing::{debug, warn};

use super::{Candidates, CompiledFilter, Entry, Verdict, evaluate_all, evaluate_on_server};
use crate::catalog::{self, Catalog, PolicyColumns};
use crate::change::{Change, ChangeKind, Datum, OldRow, Row};
use crate::config::RlsSettings;
use crate::metrics;
use crate::rls::{self, Group, GroupOutcome, Rows, TableRef};

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

/// Candidate keys one check statement is given at most. A batch's groups
/// are split into checks of at most this size so that each statement's
/// work, and so its time against `rls_timeout`, stays bounded however many
/// subscribers there are (about a second of a 2-core server's time when
/// every candidate is probed). Each check also asks once which of its rows
/// the table still holds as committed, so checks are no smaller than
/// needed: the candidates are shared evenly by `rls_connections` checks,
/// and none is split below [`MIN_KEYS_PER_CHECK`].
const KEYS_PER_CHECK: usize = 1 << 19;

/// Below this many candidates a check is not split to run side by side:
/// a split check asks twice which rows the table still holds.
const MIN_KEYS_PER_CHECK: usize = 1 << 17;

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
/// change, then the RLS checks of the whole batch — per table, the keys of
/// its checked rows once and every (role, claims) group naming its
/// candidate rows — then the views. Returns, per change and in order, its
/// deliveries and its denials. Batching changes the number of round trips,
/// never the order of events.
pub async fn authorize(
    catalog: &mut Catalog,
    pool: &Pool,
    rls: &RlsSettings,
    batch: &mut [(&Change, Candidates)],
) -> Result<Vec<(Vec<Delivery>, Vec<Denial>)>, Error> {
    let mut passing = Vec::with_capacity(batch.len());
    let mut row_security = Vec::with_capacity(batch.len());
    let mut unfiltered = UnfilteredLists::default();
    // The candidates move on into `passing`; `batch` keeps the changes.
    for (change, candidates) in batch.iter_mut() {
        let candidates = std::mem::take(candidates);
        let entries = if candidates.is_empty() {
            candidates
        } else {
            passing_filters(pool, change, candidates, &mut unfiltered).await?
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
    // One check per table, and per description of it: a table's columns may
    // change within a batch, and a check's images share their columns.
    let mut tables: Vec<(u32, *const crate::change::Relation)> = checked
        .iter()
        .map(|&i| (batch[i].0.relation.id, Arc::as_ptr(&batch[i].0.relation)))
        .collect();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        let rows: Vec<usize> = checked
            .iter()
            .copied()
            .filter(|&i| (batch[i].0.relation.id, Arc::as_ptr(&batch[i].0.relation)) == table)
            .collect();
        let Some(&first) = rows.first() else { continue };
        let relation = &batch[first].0.relation;
        let policy = catalog
            .policy_columns(relation.id, &relation.schema, &relation.table)
            .await?;
        visible_rows(
            catalog,
            pool,
            rls,
            batch,
            &rows,
            &policy,
            &mut passing,
            &mut denials,
        )
        .await?;
    }
    let mut out = Vec::with_capacity(batch.len());
    for (((change, _), entries), (secured, denied)) in batch
        .iter()
        .zip(passing)
        .zip(row_security.into_iter().zip(denials))
    {
        out.push((views(catalog, change, &entries, secured).await?, denied));
    }
    Ok(out)
}

/// Groups `entries` (allowed to see `change`) by what they may see of it:
/// the columns their role may select and their `select`.
async fn views(
    catalog: &mut Catalog,
    change: &Change,
    entries: &Candidates,
    row_security: bool,
) -> Result<Vec<Delivery>, Error> {
    let relation = &change.relation;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    // Few roles, many subscribers: the catalog is asked once per role.
    let mut by_role: Vec<(Arc<str>, Arc<[bool]>)> = Vec::new();
    let mut groups: HashMap<Arc<[bool]>, Vec<Arc<Entry>>> = HashMap::new();
    let mut order: Vec<Arc<[bool]>> = Vec::new();
    for entry in entries.iter() {
        let selectable = match by_role.iter().find(|(role, _)| *role == entry.role) {
            Some((_, selectable)) => selectable.clone(),
            None => {
                let selectable = catalog.selectable(&entry.role, relation.id, &names).await?;
                by_role.push((entry.role.clone(), selectable.clone()));
                selectable
            }
        };
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
        match groups.get_mut(&visible) {
            Some(group) => group.push(entry.clone()),
            None => {
                order.push(visible.clone());
                groups.insert(visible, vec![entry.clone()]);
            }
        }
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

/// A subscriber group of one check: the entries' (role, claims) and the
/// rows (indexes into the check's keys, increasing) it is a candidate for.
struct Asking {
    /// An entry of the group, for its role and claims.
    first: Arc<Entry>,
    rows: Vec<u32>,
}

/// Which group each candidate of one check belongs to, found with as
/// little hashing as possible: once per shared candidate list (every
/// unfiltered subscriber of the table, the same list for every row), once
/// per other entry.
#[derive(Default)]
struct Grouping {
    asking: Vec<Asking>,
    /// (role, claims text) → group.
    by_identity: HashMap<(Arc<str>, Arc<str>), u32>,
    /// Entry address → group. (The entries live in the batch's candidate
    /// lists for as long as this does: addresses are not reused.)
    by_entry: HashMap<*const Entry, u32>,
    /// Shared list address → the group of each of its entries. (Likewise.)
    by_list: HashMap<*const Arc<Entry>, Arc<[u32]>>,
}

impl Grouping {
    fn group_of(&mut self, entry: &Arc<Entry>) -> u32 {
        if let Some(&g) = self.by_entry.get(&Arc::as_ptr(entry)) {
            return g;
        }
        let identity = (entry.role.clone(), entry.claims_text.clone());
        let g = match self.by_identity.get(&identity) {
            Some(&g) => g,
            None => {
                let g = u32::try_from(self.asking.len()).unwrap_or(u32::MAX);
                self.asking.push(Asking {
                    first: entry.clone(),
                    rows: Vec::new(),
                });
                self.by_identity.insert(identity, g);
                g
            }
        };
        self.by_entry.insert(Arc::as_ptr(entry), g);
        g
    }

    fn groups_of_list(&mut self, list: &Arc<[Arc<Entry>]>) -> Arc<[u32]> {
        if let Some(groups) = self.by_list.get(&list.as_ptr()) {
            return groups.clone();
        }
        let groups: Arc<[u32]> = list.iter().map(|e| self.group_of(e)).collect();
        self.by_list.insert(list.as_ptr(), groups.clone());
        groups
    }

    /// Records that group `g` is a candidate for `row` (rows come in
    /// increasing order; several entries of a group ask once).
    fn ask(&mut self, g: u32, row: u32) {
        if let Some(asking) = self.asking.get_mut(g as usize)
            && asking.rows.last() != Some(&row)
        {
            asking.rows.push(row);
        }
    }
}

/// Keeps, for each of `rows` (indexes into `batch`, all of one table and
/// one description of it), the candidates whose role, with their claims,
/// may see the change's new row as it was committed: the table's policies
/// decide on the row's image, or by a lookup when the table still holds
/// it (the same answer) or the image lacks a value they read (the
/// fallback). The rows' keys and images go once; each (role, claims) group
/// names the rows it is a candidate for, or all of them.
#[allow(clippy::too_many_arguments)]
async fn visible_rows(
    catalog: &mut Catalog,
    pool: &Pool,
    rls: &RlsSettings,
    batch: &[(&Change, Candidates)],
    rows: &[usize],
    policy: &PolicyColumns,
    passing: &mut [Candidates],
    denials: &mut [Vec<Denial>],
) -> Result<(), Error> {
    let Some(&first) = rows.first() else {
        return Ok(());
    };
    let relation = &batch[first].0.relation;
    let key_columns: Vec<&str> = relation
        .columns
        .iter()
        .filter(|c| c.is_primary_key)
        .map(|c| c.name.as_str())
        .collect();
    // A table's description may change within a batch; keys follow each
    // change's own columns.
    let keys: Vec<Vec<Option<&str>>> = rows
        .iter()
        .map(|&row| {
            let change = batch[row].0;
            let (ChangeKind::Insert { new } | ChangeKind::Update { new, .. }) = &change.kind else {
                return Vec::new();
            };
            change
                .relation
                .columns
                .iter()
                .zip(new)
                .filter(|(c, _)| c.is_primary_key)
                .map(|(_, datum)| match datum {
                    Datum::Text(text) => std::str::from_utf8(text).ok(),
                    _ => None,
                })
                .collect()
        })
        .collect();
    // Only the values the policies read travel (all of them when that is
    // not known); none when no image can decide.
    let selected: Vec<usize> = match policy {
        PolicyColumns::Columns(names) => relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| names.contains(&c.name))
            .map(|(i, _)| i)
            .collect(),
        PolicyColumns::Unknown => (0..relation.columns.len()).collect(),
        PolicyColumns::SystemColumns => Vec::new(),
    };
    let columns: Vec<&str> = selected
        .iter()
        .map(|&c| relation.columns[c].name.as_str())
        .collect();
    let mut unknown: Vec<(u32, u32)> = Vec::new();
    let images: Vec<Vec<Option<&str>>> = rows
        .iter()
        .enumerate()
        .map(|(i, &row)| {
            let (ChangeKind::Insert { new } | ChangeKind::Update { new, .. }) = &batch[row].0.kind
            else {
                return vec![None; columns.len()];
            };
            selected
                .iter()
                .enumerate()
                .map(|(at, &c)| match new.get(c) {
                    Some(Datum::Null) => None,
                    Some(Datum::Text(text)) => match std::str::from_utf8(text) {
                        Ok(text) => Some(text),
                        Err(_) => {
                            unknown.push((i as u32, at as u32));
                            None
                        }
                    },
                    Some(Datum::UnchangedToast | Datum::Json(_)) | None => {
                        unknown.push((i as u32, at as u32));
                        None
                    }
                })
                .collect()
        })
        .collect();
    let images = (*policy != PolicyColumns::SystemColumns).then_some(rls::Images {
        columns: &columns,
        rows: &images,
        unknown: &unknown,
    });
    let mut grouping = Grouping::default();
    // Per checked row: the group of each of its shared and indexed entries.
    let mut row_groups: Vec<(Arc<[u32]>, Vec<u32>)> = Vec::with_capacity(rows.len());
    for (i, &row) in rows.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        let shared = grouping.groups_of_list(&passing[row].shared);
        let indexed: Vec<u32> = passing[row]
            .indexed
            .iter()
            .map(|e| grouping.group_of(e))
            .collect();
        for &g in shared.iter().chain(&indexed) {
            grouping.ask(g, i);
        }
        row_groups.push((shared, indexed));
    }
    // A role that may not select the primary key is not checked against
    // the policies: it gets Supabase's `Error 401` payload (its view hides
    // the key), as on a table without row level security, decided from
    // its privileges alone (cached per role and table) rather than from a
    // permission error per change.
    let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let mut unauthorized = Vec::with_capacity(grouping.asking.len());
    for a in &grouping.asking {
        let selectable = catalog
            .selectable(&a.first.role, relation.id, &names)
            .await?;
        unauthorized.push(
            relation
                .columns
                .iter()
                .zip(selectable.iter())
                .any(|(c, &may)| c.is_primary_key && !may),
        );
    }
    let all = rows.len();
    // Group number → its place among the checked groups.
    let mut checked_as: Vec<Option<usize>> = Vec::with_capacity(grouping.asking.len());
    let mut groups: Vec<Group<'_>> = Vec::with_capacity(grouping.asking.len());
    for (a, &unauthorized) in grouping.asking.iter_mut().zip(&unauthorized) {
        if unauthorized {
            checked_as.push(None);
            continue;
        }
        checked_as.push(Some(groups.len()));
        groups.push(Group {
            role: &a.first.role,
            claims: &a.first.claims,
            rows: if a.rows.len() == all {
                Rows::All
            } else {
                Rows::Only(std::mem::take(&mut a.rows))
            },
        });
    }
    let table = TableRef {
        schema: &relation.schema,
        name: &relation.table,
        key_columns: &key_columns,
    };
    let outcomes = checked_in_chunks(pool, rls, &table, &keys, images.as_ref(), &groups).await;
    // What each group may see, row by row: rows come in increasing order,
    // so each group's position in its own candidates only moves forward.
    let mut cursor = vec![0usize; groups.len()];
    let mut denied_pairs = 0u64;
    for ((i, &row), (shared, indexed)) in rows.iter().enumerate().zip(row_groups) {
        let entries = std::mem::take(&mut passing[row]);
        let mut visible = Vec::new();
        let mut failed: Vec<(u32, Vec<Arc<Entry>>)> = Vec::new();
        for (entry, &g) in entries.iter().zip(shared.iter().chain(&indexed)) {
            let Some(gi) = checked_as.get(g as usize).copied() else {
                continue;
            };
            let Some(gi) = gi else {
                // Unauthorized: shown the 401 payload.
                visible.push(entry.clone());
                continue;
            };
            let (Some(group), Some(outcome)) = (groups.get(gi), outcomes.get(gi)) else {
                continue;
            };
            let flags = match outcome {
                Ok(GroupOutcome::Visible(flags)) => flags,
                Ok(GroupOutcome::Failed { .. }) | Err(_) => {
                    match failed.iter_mut().find(|(fg, _)| *fg == g) {
                        Some((_, list)) => list.push(entry.clone()),
                        None => failed.push((g, vec![entry.clone()])),
                    }
                    continue;
                }
            };
            let position = match &group.rows {
                Rows::All => Some(i),
                Rows::Only(candidates) => {
                    let at = &mut cursor[gi];
                    while candidates.get(*at).is_some_and(|&r| (r as usize) < i) {
                        *at += 1;
                    }
                    (candidates.get(*at) == Some(&(i as u32))).then_some(*at)
                }
            };
            if position.is_some_and(|p| flags.get(p).copied().unwrap_or(false)) {
                visible.push(entry.clone());
            } else {
                denied_pairs += 1;
            }
        }
        for (g, entries) in failed {
            let outcome = checked_as
                .get(g as usize)
                .copied()
                .flatten()
                .and_then(|gi| outcomes.get(gi));
            let message = match outcome {
                Some(Ok(GroupOutcome::Failed { code, message })) => {
                    debug!(%code, %message, "rls policy raised for a group; denied");
                    format!("RLS policy evaluation failed: {code}: {message}")
                }
                Some(Err(message)) => message.clone(),
                _ => "RLS policy evaluation failed".to_owned(),
            };
            denials[row].push(Denial { entries, message });
        }
        passing[row] = Candidates::from(visible);
    }
    metrics::counter!(metrics::RLS_DENIED).increment(denied_pairs);
    Ok(())
}

/// Checks `groups` in chunks of at most [`KEYS_PER_CHECK`] candidates, up to
/// `rls_connections` chunks at once, and answers one outcome per group, in
/// order: what Postgres said, or why nothing is known (the chunk's check
/// failed as a whole: every group in it is denied, the other chunks are not
/// affected).
async fn checked_in_chunks(
    pool: &Pool,
    rls: &RlsSettings,
    table: &TableRef<'_>,
    keys: &[Vec<Option<&str>>],
    images: Option<&rls::Images<'_>>,
    groups: &[Group<'_>],
) -> Vec<Result<GroupOutcome, String>> {
    let candidates_of = |g: &Group<'_>| {
        match &g.rows {
            Rows::All => keys.len(),
            Rows::Only(rows) => rows.len(),
        }
        .max(1)
    };
    let total: usize = groups.iter().map(candidates_of).sum();
    let per_check = total
        .div_ceil(rls.connections.max(1))
        .clamp(MIN_KEYS_PER_CHECK, KEYS_PER_CHECK);
    let mut chunks: Vec<&[Group<'_>]> = Vec::new();
    let mut rest = groups;
    while !rest.is_empty() {
        let mut candidates = 0;
        let size = rest
            .iter()
            .take_while(|g| {
                candidates += candidates_of(g);
                candidates <= per_check
            })
            .count()
            .max(1);
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk);
        rest = tail;
    }
    let answers: Vec<(usize, Result<rls::Answer, rls::Error>)> =
        stream::iter(chunks.iter().map(|chunk| async move {
            let started = Instant::now();
            let options = rls::CheckOptions {
                timeout: rls.timeout,
                sorted_keys: rls.sorted_keys,
            };
            let checked = rls::check(pool, table, keys, images, chunk, &options).await;
            metrics::counter!(metrics::RLS_CHECKS).increment(1);
            metrics::histogram!(metrics::RLS_CHECK_SECONDS).record(started.elapsed());
            (chunk.len(), checked)
        }))
        .buffered(rls.connections)
        .collect()
        .await;
    let mut out = Vec::with_capacity(groups.len());
    for (len, answer) in answers {
        match answer {
            Ok(answer) => {
                metrics::counter!(metrics::RLS_BY_IMAGE).increment(answer.by_image);
                metrics::counter!(metrics::RLS_FALLBACK).increment(answer.by_fallback);
                out.extend(answer.outcomes.into_iter().map(Ok));
            }
            Err(e) => {
                warn!(schema = %table.schema, table = %table.name, groups = len, error = %e, "rls check failed; denying these changes to their subscribers");
                let message = format!("RLS policy evaluation failed: {e}");
                out.extend((0..len).map(|_| Err(message.clone())));
            }
        }
    }
    out
}

/// Remembers, for each shared candidate list of a batch, whether none of
/// its subscriptions has a filter on the table: then every change keeps
/// the list as it is, and it is checked once, not once per change. Each
/// list is held while remembered, so its address cannot be reused by
/// another list meanwhile.
#[derive(Default)]
struct UnfilteredLists(HashMap<(*const Arc<Entry>, u32), (SharedList, bool)>);

/// A table's shared candidate list ([`Candidates::shared`]).
type SharedList = Arc<[Arc<Entry>]>;

impl UnfilteredLists {
    fn unfiltered(&mut self, list: &SharedList, table: u32) -> bool {
        self.0
            .entry((list.as_ptr(), table))
            .or_insert_with(|| {
                let unfiltered = list.iter().all(|e| e.filters_for(table).is_empty());
                (list.clone(), unfiltered)
            })
            .1
    }
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
/// the rest) otherwise. A filter the server cannot evaluate denies. A
/// shared list without filters stays shared.
async fn passing_filters(
    pool: &Pool,
    change: &Change,
    candidates: Candidates,
    unfiltered: &mut UnfilteredLists,
) -> Result<Candidates, Error> {
    let table = change.relation.id;
    let shared_unfiltered = unfiltered.unfiltered(&candidates.shared, table);
    if shared_unfiltered
        && candidates
            .indexed
            .iter()
            .all(|e| e.filters_for(table).is_empty())
    {
        return Ok(candidates);
    }
    let candidates: Vec<Arc<Entry>> = candidates.iter().cloned().collect();
    filtered(pool, change, candidates)
        .await
        .map(Candidates::from)
}

/// [`passing_filters`] for candidates of which some have filters.
async fn filtered(
    pool: &Pool,
    change: &Change,
    candidates: Vec<Arc<Entry>>,
) -> Result<Vec<Arc<Entry>>, Error> {
    let table = change.relation.id;
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
