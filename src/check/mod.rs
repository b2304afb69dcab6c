//! `walcast check`: is this database, its slot and Redis ready for walcast?
//!
//! Connects as the daemon does (same settings, same pool and replication
//! connection code) and reports [`Finding`]s, each with a fix when there is
//! something to do. An [`Level::Error`] means something blocks replication
//! (or makes Postgres reject writes to a published table); the exit code
//! is then 1.
//!
//! ```text
//! postgres ─ connect ─ server ─ role ─ replication connection ─ publication ─ tables ─ rls.sql ─ slot
//! redis ──── PING                                                      (concurrently)
//! ```
//!
//! Each group of checks has its file; queries take values only as
//! parameters, and every name shown in a fix is quoted by the server.

mod cluster;
mod failover;
mod finding;
mod messages;
mod publication;
mod redis;
mod replication;
mod report;
mod rls;
mod role;
mod server;
mod slot;

pub use finding::{Finding, Level, describe};
pub use report::{EXIT_ERROR, EXIT_OK, Report};

use crate::config::{DatabaseUrl, Settings};
use crate::pool;

/// The stable ids of the checks, as they appear in `check` of each finding.
pub mod id {
    /// The pooled SQL connection could be opened.
    pub const POSTGRES_CONNECT: &str = "postgres.connect";
    /// A catalog query failed (the message says which group).
    pub const POSTGRES_QUERY: &str = "postgres.query";
    /// A `replication=database` session starts (pg_hba, REPLICATION).
    pub const POSTGRES_REPLICATION: &str = "postgres.replication";
    /// The server version.
    pub const SERVER_VERSION: &str = "server.version";
    /// `wal_level` is `logical`.
    pub const SERVER_WAL_LEVEL: &str = "server.wal_level";
    /// A replication slot is free, or walcast's exists.
    pub const SERVER_REPLICATION_SLOTS: &str = "server.replication_slots";
    /// A WAL sender is free, or walcast's is streaming.
    pub const SERVER_WAL_SENDERS: &str = "server.wal_senders";
    /// Whether retained WAL is capped.
    pub const SERVER_MAX_SLOT_WAL_KEEP_SIZE: &str = "server.max_slot_wal_keep_size";
    /// The role may replicate and is not a superuser.
    pub const ROLE_PRIVILEGES: &str = "role.privileges";
    /// The role may `SET ROLE` to a subscriber role (subject: the role).
    pub const ROLE_SUBSCRIBER: &str = "role.subscriber";
    /// The publication exists.
    pub const PUBLICATION_EXISTS: &str = "publication.exists";
    /// The publication's tables.
    pub const PUBLICATION_TABLES: &str = "publication.tables";
    /// A published table's primary key / replica identity (subject: the table).
    pub const TABLE_REPLICA_IDENTITY: &str = "table.replica_identity";
    /// A published table's row level security (subject: the table).
    pub const TABLE_RLS: &str = "table.rls";
    /// `sql/rls.sql` is installed, of this walcast's version, callable.
    pub const RLS_SQL: &str = "rls.sql";
    /// `realtime.messages` exists and this role may keep its partitions.
    pub const MESSAGES_TABLE: &str = "messages.table";
    /// Today's partition of `realtime.messages` exists.
    pub const MESSAGES_PARTITIONS: &str = "messages.partitions";
    /// `realtime.messages` is published (the messages publication).
    pub const MESSAGES_PUBLICATION: &str = "messages.publication";
    /// The slot exists and is a pgoutput slot of this database.
    pub const SLOT_EXISTS: &str = "slot.exists";
    /// Who streams from the slot, or how much WAL it retains unread.
    pub const SLOT_ACTIVE: &str = "slot.active";
    /// The slot's `wal_status`.
    pub const SLOT_WAL_STATUS: &str = "slot.wal_status";
    /// Whether the slot survives a database failover (PostgreSQL 17+).
    pub const SLOT_FAILOVER: &str = "slot.failover";
    /// A standby (`standby_database_url`) holds the slot synchronized.
    pub const STANDBY_SLOT: &str = "standby.slot";
    /// Redis answers `PING`.
    pub const REDIS_PING: &str = "redis.ping";
    /// Redis keeps the bus's keys: no memory limit, or `noeviction`.
    pub const REDIS_EVICTION: &str = "redis.eviction";
    /// The bus's Redis is a cluster exactly when `redis_cluster` says so,
    /// and the cluster is whole.
    pub const REDIS_CLUSTER: &str = "redis.cluster";
    /// Redis refuses clients without a password.
    pub const REDIS_AUTH: &str = "redis.auth";
}

/// Runs every check against the database and Redis of `settings`.
pub async fn run(settings: &Settings) -> Report {
    let (mut findings, redis) = tokio::join!(postgres(settings), async {
        let mut out = Vec::new();
        redis::check(&settings.redis_url, settings.redis_cluster, &mut out).await;
        out
    });
    findings.extend(redis);
    Report { findings }
}

async fn postgres(settings: &Settings) -> Vec<Finding> {
    let url = &settings.database_url;
    let mut out = Vec::new();
    let client = match connect(url).await {
        Ok(client) => client,
        Err(e) => {
            out.push(
                Finding::error(id::POSTGRES_CONNECT, format!("cannot connect to {url}: {e}"))
                    .fix("check database_url (host, port, user, password, sslmode) and that pg_hba.conf allows the role for this database"),
            );
            return out;
        }
    };
    out.push(Finding::ok(
        id::POSTGRES_CONNECT,
        format!("connected to {url}"),
    ));
    if let Err(e) = server::check(&client, &settings.slot, &mut out).await {
        out.push(query_failed("the server settings", &e));
    }
    let may_replicate = match role::check(&client, &mut out).await {
        Ok(may) => may,
        Err(e) => {
            out.push(query_failed("the role's privileges", &e));
            true
        }
    };
    // Without REPLICATION the connection fails for the reason just reported.
    if may_replicate {
        replication::check(url, &mut out).await;
    }
    if let Err(e) = publication::check(&client, &settings.publication, &mut out).await {
        out.push(query_failed("the publication", &e));
    }
    if let Err(e) = rls::check(&client, &settings.publication, &mut out).await {
        out.push(query_failed("the RLS functions (sql/rls.sql)", &e));
    }
    if let Err(e) = messages::check(
        &client,
        &settings.messages_publication,
        &settings.publication,
        &mut out,
    )
    .await
    {
        out.push(query_failed("realtime.messages", &e));
    }
    if let Err(e) = slot::check(&client, &settings.slot, &mut out).await {
        out.push(query_failed("the replication slot", &e));
    }
    if let Err(e) = failover::check(&client, settings, &mut out).await {
        out.push(query_failed("the slot's failover", &e));
    }
    out
}

/// One pooled connection, built exactly as the daemon builds its pool.
async fn connect(url: &DatabaseUrl) -> Result<deadpool_postgres::Object, String> {
    let pool = pool::build(url, 1, None).map_err(|e| e.to_string())?;
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => describe(&e),
        other => other.to_string(),
    })
}

fn query_failed(what: &str, e: &tokio_postgres::Error) -> Finding {
    Finding::error(
        id::POSTGRES_QUERY,
        format!("could not read {what}: {}", describe(e)),
    )
    .fix("run walcast check as the role walcast uses; the queries read only pg_catalog views open to every role")
}
