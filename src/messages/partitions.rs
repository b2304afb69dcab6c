//! The daily partitions of `realtime.messages`, kept as Supabase's janitor
//! keeps them: yesterday to three days ahead exist, and those whose day is
//! older than the retention (72 hours by default) are dropped, messages and
//! all. An INSERT with no partition for its day fails (`realtime.send` then
//! only warns), so this runs at setup, when the daemon starts, and hourly.
//!
//! Days are UTC days. Partitions are named `messages_YYYY_MM_DD` and only
//! partitions so named are ever dropped. The work runs as the table's owner
//! (`SET LOCAL ROLE`, which the login role may as a member of it: `sql/realtime.sql`
//! grants `supabase_realtime_admin`); names come from the catalog or from
//! Postgres's own date formatting and reach SQL only quoted.

use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::replication::{quote_ident, quote_literal};

/// How often the daemon checks the partitions.
pub const INTERVAL: Duration = Duration::from_secs(3600);
/// Bounds the locks creating or dropping a partition takes on the table, so
/// that maintenance waits for busy writers rather than queueing them.
const LOCK_TIMEOUT: &str = "5s";

/// What one maintenance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintained {
    /// Partitions created.
    pub created: Vec<String>,
    /// Partitions dropped.
    pub dropped: Vec<String>,
}

/// Why maintenance could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// There is no `realtime.messages`.
    #[error(
        "realtime.messages does not exist: run walcast setup (sql/realtime.sql) for Broadcast from Database and private channels"
    )]
    NoTable,
    /// This role is neither the table's owner nor a member of it.
    #[error(
        "role {role} may not manage the partitions of realtime.messages, owned by {owner}: GRANT {owner} TO {role} (walcast setup does)"
    )]
    NotOwner {
        /// The login role.
        role: String,
        /// The table's owner.
        owner: String,
    },
    /// A statement failed.
    #[error("realtime.messages partitions: {}", crate::check::describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// Creates the missing partitions from yesterday to three days ahead, and
/// drops those of days before `now - retention`; in one transaction.
pub async fn maintain(
    client: &mut tokio_postgres::Client,
    retention: Duration,
) -> Result<Maintained, Error> {
    let tx = client.transaction().await?;
    let owner = tx
        .query_opt(
            "SELECT o.rolname::text, o.rolname = current_user, \
                    pg_catalog.pg_has_role(current_user, c.relowner, 'MEMBER'), current_user::text \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles o ON o.oid = c.relowner \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'realtime' AND c.relname = 'messages'",
            &[],
        )
        .await?
        .ok_or(Error::NoTable)?;
    let (name, is_owner, is_member, role): (String, bool, bool, String) =
        (owner.get(0), owner.get(1), owner.get(2), owner.get(3));
    if !is_owner {
        if !is_member {
            return Err(Error::NotOwner { role, owner: name });
        }
        tx.batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&name)))
            .await?;
    }
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let done = run(&tx, retention).await?;
    tx.commit().await?;
    Ok(done)
}

/// The daemon's janitor: [`maintain`] every [`INTERVAL`] until cancelled,
/// after a first [`round`] the caller ran (before the first replication
/// session: a slot being created waits for running transactions).
/// Says once when the table is missing (Broadcast from Database is then
/// off), and warns on every other failure.
pub async fn keep(
    pool: deadpool_postgres::Pool,
    retention: Duration,
    mut said_missing: bool,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => {}
        }
        round(&pool, retention, &mut said_missing).await;
    }
}

/// One round of [`keep`]: [`maintain`], logged.
pub async fn round(pool: &deadpool_postgres::Pool, retention: Duration, said_missing: &mut bool) {
    {
        let outcome = match pool.get().await {
            Ok(mut client) => maintain(&mut client, retention).await,
            Err(e) => {
                warn!(error = %e, "realtime.messages partitions: no connection");
                Ok(Maintained::default())
            }
        };
        match outcome {
            Ok(done) => {
                if !done.created.is_empty() || !done.dropped.is_empty() {
                    info!(created = ?done.created, dropped = ?done.dropped, "realtime.messages partitions");
                }
            }
            Err(Error::NoTable) if *said_missing => {}
            Err(e @ Error::NoTable) => {
                *said_missing = true;
                info!("Broadcast from Database is off: {e}");
            }
            Err(e) => warn!("{e}"),
        }
    }
}

async fn run(client: &impl GenericClient, retention: Duration) -> Result<Maintained, Error> {
    let mut done = Maintained::default();
    let existing: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_inherits i \
             JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'realtime.messages'::regclass",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let wanted = client
        .query(
            "SELECT 'messages_' || to_char(d, 'YYYY_MM_DD'), d::text, (d + 1)::text \
             FROM generate_series(-1, 3) n, \
                  LATERAL (SELECT (now() AT TIME ZONE 'UTC')::date + n AS d) day",
            &[],
        )
        .await?;
    for row in wanted {
        let (name, from, to): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if existing.contains(&name) {
            continue;
        }
        client
            .batch_execute(&format!(
                "CREATE TABLE realtime.{} PARTITION OF realtime.messages FOR VALUES FROM ({}) TO ({})",
                quote_ident(&name),
                quote_literal(&from),
                quote_literal(&to),
            ))
            .await?;
        done.created.push(name);
    }
    let retention_seconds = retention.as_secs_f64();
    let old = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_inherits i \
             JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'realtime.messages'::regclass \
               AND c.relname ~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$' \
               AND to_date(substr(c.relname, 10), 'YYYY_MM_DD') \
                   < ((now() AT TIME ZONE 'UTC') - make_interval(secs => $1))::date \
             ORDER BY 1",
            &[&retention_seconds],
        )
        .await?;
    for row in old {
        let name: String = row.get(0);
        client
            .batch_execute(&format!("DROP TABLE realtime.{}", quote_ident(&name)))
            .await?;
        done.dropped.push(name);
    }
    Ok(done)
}
