//! Which matching subscriptions may see a change, and how: grouped so that
//! each distinct view of the change is encoded once.
//!
//! What each role may see: the columns it may select (and, with `select`,
//! only those plus the primary key); a primary key it may not select makes
//! the payload Supabase's `Error 401`. On a table with row level security,
//! a DELETE is not checked against policies (Supabase's rule) and shows
//! only the primary key. Rows of INSERT/UPDATE on such a table are checked
//! against the policies by [`crate::rls`]; until that check is wired into
//! delivery, they are delivered to no one — denying, never allowing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tracing::debug;

use super::{CompiledFilter, Entry, Verdict, evaluate_all, evaluate_on_server};
use crate::catalog::{self, Catalog};
use crate::change::{Change, ChangeKind, Datum, OldRow, Row};

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

/// Groups `candidates` (the subscriptions matching the change's table and
/// kind) by what they may see of `change`; those that may see nothing are
/// left out.
pub async fn deliveries(
    catalog: &mut Catalog,
    pool: &Pool,
    change: &Change,
    candidates: Vec<Arc<Entry>>,
) -> Result<Vec<Delivery>, Error> {
    let relation = &change.relation;
    let candidates = passing_filters(pool, change, candidates).await?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let row_security = catalog.row_security(relation.id).await?;
    if row_security
        && matches!(
            change.kind,
            ChangeKind::Insert { .. } | ChangeKind::Update { .. }
        )
    {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let mut groups: HashMap<Arc<[bool]>, Vec<Arc<Entry>>> = HashMap::new();
    let mut order: Vec<Arc<[bool]>> = Vec::new();
    for entry in candidates {
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
