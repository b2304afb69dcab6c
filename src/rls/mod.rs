//! Who may see which rows: batched Row Level Security checks over the pool,
//! decided on the rows as they were committed.
//!
//! For a table with RLS enabled, the candidate (subscriber, row) pairs of a
//! batch are grouped by (role, claims). [`check`] asks Postgres about all
//! groups of one table in **one call** of the server-side function
//! `walcast.visible_rows` (`sql/rls.sql`): the candidate rows' keys and
//! their committed new images travel once, each group names the rows it is
//! a candidate for (or all of them), and per group the function sets the
//! role and `request.jwt.claims` transaction-locally, decides its rows, and
//! puts role and claims back:
//!
//! ```text
//! daemon ── BEGIN READ ONLY, REPEATABLE READ; statement_timeout ───────────────▶ Postgres
//!        ── walcast.visible_rows(table, keys, images, [group, …]) ─────────────▶   (many unfiltered groups: which rows
//!                                                                                  the table still holds as committed)
//!                                                                                 for each group:
//!                                                                                   SET LOCAL ROLE, claims
//!                                                                                   rows held as committed: looked up
//!                                                                                   other rows: the role's policies
//!                                                                                     evaluated on their images
//!                                                                                   reset; an error fails this group only
//!        ◀── one row per group: visible positions, or SQLSTATE + message ───────
//! ```
//!
//! An event describes the row as committed, so the policies decide on that
//! row, not on whatever the table holds when the batch is checked (Supabase
//! looks the row up then, and loses the events of a row changed again in
//! the meantime). Where the table still holds the committed values the
//! policies read, a lookup gives the same answer and, with many groups,
//! costs less; where the WAL did not carry a value the policies read (an
//! unchanged TOASTed column, a generated column), the row is looked up: the
//! fallback, counted in [`crate::metrics::RLS_FALLBACK`].
//!
//! Supabase asks once per change per subscriber; round trips and planning
//! then dominate. Here a batch costs one round trip and one planned query
//! per group (measurements in `docs/rls.md`).
//!
//! The SQL comes from `sql/rls.sql`, versioned ([`install::SQL_VERSION`]);
//! the daemon installs or upgrades it at start where its role may
//! ([`install::ensure`]), and subscriptions to tables with RLS are refused,
//! saying what to run, while the database has another version or none.
//!
//! A check that fails or times out **denies**: [`check`] returns an
//! [`Error`] for the whole call (deny every group), or
//! [`GroupOutcome::Failed`] for one group (deny that group); neither ever
//! reads as visible.

mod check;
pub mod install;
mod param;

pub use check::{
    Answer, CheckOptions, Group, GroupOutcome, Images, Rows, SortedKeys, TableRef, check,
};

use std::time::Duration;

/// `sql/rls.sql`: the `walcast` schema, the `walcast.rls_subject` type and
/// the `walcast.visible_rows` function (with its loop,
/// `walcast.visible_rows_as`, and `walcast.unchanged_rows`), granted to the role named by the
/// setting `walcast.role` (default `walcast`). Idempotent; apply it as an
/// administrator, after `sql/role.sql`.
pub const INSTALL_SQL: &str = include_str!("../../sql/rls.sql");

/// Why an RLS check could not be answered. Every variant
/// means "deny": nothing is known to be visible.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be had from the pool.
    #[error("rls: no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A query failed (connection lost, server error).
    #[error("rls: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// The check took longer than its timeout (server-side
    /// `statement_timeout`, or the client-side backstop).
    #[error("rls check timed out after {0:?}")]
    Timeout(Duration),
    /// `walcast.visible_rows` is missing or the login role may not call it.
    #[error(
        "walcast.visible_rows is not installed or not callable ({0}); apply sql/rls.sql with walcast setup"
    )]
    NotInstalled(String),
    /// The table is not in the catalog (dropped or renamed since).
    #[error("table {schema}.{name} does not exist")]
    NoSuchTable {
        /// Schema name.
        schema: String,
        /// Table name.
        name: String,
    },
    /// A key column is not in the table (the key changed since).
    #[error("key column {0} does not exist")]
    NoSuchColumn(String),
    /// The role is not in the catalog.
    #[error("role {0} does not exist")]
    NoSuchRole(String),
    /// A candidate key has the wrong number of values for the table's key.
    #[error("candidate {candidate}: {got} key values, the key has {want} columns")]
    KeyArity {
        /// Position of the candidate in the keys (0-based).
        candidate: usize,
        /// Values given.
        got: usize,
        /// Key columns of the table.
        want: usize,
    },
    /// The images do not fit the keys or their own columns.
    #[error("rls check images: {0}")]
    Images(String),
    /// A group names a row the check has no key for.
    #[error("group {group} names row {row}, beyond the check's keys")]
    NoSuchRow {
        /// Position of the group (0-based).
        group: usize,
        /// The row it names (0-based).
        row: u32,
    },
    /// More groups or candidates than Postgres arrays hold.
    #[error("rls check too large: {0}")]
    TooLarge(&'static str),
    /// `walcast.visible_rows` answered something it never should.
    #[error("unexpected answer from walcast.visible_rows: {0}")]
    Answer(String),
}

impl Error {
    /// Whether asking again later may succeed: the database was unreachable,
    /// busy or slow. `false` when something must change first (the function
    /// is missing, the table or role is gone, the input is malformed).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Pool(_) | Error::Timeout(_) => true,
            Error::Query(e) => e
                .as_db_error()
                .is_none_or(|db| transient_sqlstate(db.code().code())),
            Error::NotInstalled(_)
            | Error::NoSuchTable { .. }
            | Error::NoSuchColumn(_)
            | Error::NoSuchRole(_)
            | Error::KeyArity { .. }
            | Error::NoSuchRow { .. }
            | Error::Images(_)
            | Error::TooLarge(_)
            | Error::Answer(_) => false,
        }
    }
}

/// SQLSTATE classes of a server going away, restarting or overloaded, and
/// of transactions rolled back by conflicts: worth retrying.
fn transient_sqlstate(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some(
            "08" /* connection */ | "40" /* rollback */ | "53" /* resources */ | "57" /* operator intervention */ | "58" /* system */
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_pool_errors_are_transient_bad_input_is_not() {
        assert!(Error::Timeout(Duration::from_secs(1)).is_transient());
        assert!(Error::Pool(deadpool_postgres::PoolError::Closed).is_transient());
        assert!(!Error::NotInstalled("x".into()).is_transient());
        assert!(!Error::NoSuchRole("x".into()).is_transient());
        assert!(
            !Error::KeyArity {
                candidate: 0,
                got: 1,
                want: 2
            }
            .is_transient()
        );
        assert!(transient_sqlstate("08006"));
        assert!(transient_sqlstate("57P01"));
        assert!(transient_sqlstate("40001"));
        assert!(!transient_sqlstate("42501"));
        assert!(!transient_sqlstate("42883"));
    }
}
