//! What the daemon counts, by name, and the Prometheus recorder that the
//! admin server renders at `/metrics`.
//!
//! ```text
//! StreamLoop ─┐ counter!/gauge!/histogram! (the `metrics` facade)
//! Publisher ──┼──────────────────────────────▶ PrometheusRecorder ──render()──▶ GET /metrics
//! control ────┘                                  (installed once)
//! retained_wal: pool ──pg_wal_lsn_diff──▶ gauge, warn! past retained_wal_warn_bytes
//! ```
//!
//! Call sites use the facade's macros with the names below, one line each
//! (`metrics::counter!(metrics::TRANSACTIONS).increment(1)`). Before
//! [`install`] runs, and in processes that never call it (`walcast check`,
//! unit tests), those calls do nothing. Counter names carry their `_total`
//! suffix and units are spelled in the names, so what is rendered is
//! exactly these constants.

mod retained_wal;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub use retained_wal::{Crossing, Threshold, watch_retained_wal};

/// The facade's macros, so that `use crate::metrics;` gives both them and
/// the names: `metrics::counter!(metrics::TRANSACTIONS).increment(1)`.
pub use ::metrics::{counter, gauge, histogram};

/// Changes read from the replication stream, by `kind` (`INSERT`,
/// `UPDATE`, `DELETE`, `TRUNCATE`), whether or not anyone receives them.
pub const CHANGES_RECEIVED: &str = "walcast_changes_received_total";
/// Changes that produced at least one bus message, counted once Redis has
/// accepted those messages (again after a reconnect: at least once).
pub const CHANGES_PUBLISHED: &str = "walcast_changes_published_total";
/// Messages Redis accepted (PUBLISH commands answered).
pub const MESSAGES_PUBLISHED: &str = "walcast_messages_published_total";
/// Payload bytes of the messages Redis accepted.
pub const PUBLISHED_BYTES: &str = "walcast_published_bytes_total";
/// Transactions (commits) read from the replication stream.
pub const TRANSACTIONS: &str = "walcast_transactions_total";
/// Row level security checks: one query per table per batch of changes,
/// whatever the number of (role, claims) groups and rows.
pub const RLS_CHECKS: &str = "walcast_rls_checks_total";
/// How long one RLS check took, pool wait included.
pub const RLS_CHECK_SECONDS: &str = "walcast_rls_check_duration_seconds";
/// Deliveries withheld because the subscriber's policies hide the row
/// (one per subscription and change).
pub const RLS_DENIED: &str = "walcast_rls_denied_total";
/// Deliveries denied because the check failed (a policy raised, a
/// timeout, no connection); the gateway is sent an error instead.
pub const RLS_ERRORS: &str = "walcast_rls_errors_total";
/// (Group, row) pairs decided by the group's policies on the committed row
/// (the change's new image), because the table no longer holds it.
pub const RLS_BY_IMAGE: &str = "walcast_rls_decided_by_image_total";
/// (Group, row) pairs decided by looking the row up in the table because
/// its image could not decide: a value the policies read was not in the
/// WAL (an unchanged TOASTed column, a generated column), or a policy
/// reads a system column. Exact while the row is unchanged since.
pub const RLS_FALLBACK: &str = "walcast_rls_fallback_total";
/// Rows inserted into `realtime.messages` (Broadcast from Database), by
/// `result`: `public` and `private` (sent to their room), `skipped` (a
/// row missing what a broadcast needs).
pub const DATABASE_BROADCASTS: &str = "walcast_database_broadcasts_total";
/// Sessions that started streaming after waiting for the slot's lock:
/// this daemon was the hot standby and took over.
pub const TAKEOVERS: &str = "walcast_takeovers_total";
/// Subscriptions in the registry.
pub const SUBSCRIPTIONS: &str = "walcast_subscriptions";
/// The acknowledged LSN (everything before it is in Redis), as a number.
pub const ACKNOWLEDGED_LSN: &str = "walcast_acknowledged_lsn";
/// The furthest server WAL end the stream reported, as a number.
pub const RECEIVED_LSN: &str = "walcast_received_lsn";
/// Server WAL end minus the acknowledged LSN, in bytes.
pub const LAG_BYTES: &str = "walcast_replication_lag_bytes";
/// When a change was published: now minus its commit time, in seconds.
pub const LAG_SECONDS: &str = "walcast_replication_lag_seconds";
/// WAL the slot keeps on the server (current WAL position minus the
/// slot's `restart_lsn`), in bytes.
pub const RETAINED_WAL_BYTES: &str = "walcast_slot_retained_wal_bytes";
/// Redis failures, by `task` (`publisher`, `control`).
pub const REDIS_ERRORS: &str = "walcast_redis_errors_total";
/// Reconnections to Redis after a failure, by `task`.
pub const REDIS_RECONNECTS: &str = "walcast_redis_reconnects_total";
/// How long Redis took to answer one publishing pipeline.
pub const PUBLISH_SECONDS: &str = "walcast_publish_duration_seconds";

/// Label of [`CHANGES_RECEIVED`]: the change's kind.
pub const KIND: &str = "kind";
/// Label of [`DATABASE_BROADCASTS`]: what became of the row.
pub const RESULT: &str = "result";
/// Label of [`REDIS_ERRORS`] and [`REDIS_RECONNECTS`]: which connection.
pub const TASK: &str = "task";
/// [`TASK`] of the publishing connection.
pub const TASK_PUBLISHER: &str = "publisher";
/// [`TASK`] of the control task's connection.
pub const TASK_CONTROL: &str = "control";

/// How often histogram samples are folded into their buckets when nobody
/// scrapes (a scrape folds them too).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Bucket bounds, in seconds, of an RLS check (timeout 5 s).
const RLS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds, in seconds, of a publishing pipeline (timeout 10 s).
const PUBLISH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution, rendered with buckets.
    Histogram,
}

/// One metric: name, type, unit and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The name, prefixed `walcast_`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Type,
    /// What it counts.
    pub unit: Unit,
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn metric(name: &'static str, kind: Type, unit: Unit, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        unit,
        help,
    }
}

/// Every metric, in documentation order.
pub const ALL: &[Metric] = &[
    metric(
        CHANGES_RECEIVED,
        Type::Counter,
        Unit::Count,
        "changes read from the replication stream, by kind",
    ),
    metric(
        CHANGES_PUBLISHED,
        Type::Counter,
        Unit::Count,
        "changes whose bus messages redis accepted",
    ),
    metric(
        MESSAGES_PUBLISHED,
        Type::Counter,
        Unit::Count,
        "messages redis accepted",
    ),
    metric(
        PUBLISHED_BYTES,
        Type::Counter,
        Unit::Bytes,
        "payload bytes of the messages redis accepted",
    ),
    metric(
        TRANSACTIONS,
        Type::Counter,
        Unit::Count,
        "transactions read from the replication stream",
    ),
    metric(
        RLS_CHECKS,
        Type::Counter,
        Unit::Count,
        "batched row level security checks",
    ),
    metric(
        RLS_CHECK_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "duration of a row level security check",
    ),
    metric(
        RLS_DENIED,
        Type::Counter,
        Unit::Count,
        "deliveries withheld because row level security hides the row",
    ),
    metric(
        RLS_ERRORS,
        Type::Counter,
        Unit::Count,
        "deliveries denied because the row level security check failed",
    ),
    metric(
        RLS_BY_IMAGE,
        Type::Counter,
        Unit::Count,
        "(group, row) pairs decided by the policies on the committed row",
    ),
    metric(
        RLS_FALLBACK,
        Type::Counter,
        Unit::Count,
        "(group, row) pairs decided by a table lookup because the committed row lacked a value the policies read",
    ),
    metric(
        DATABASE_BROADCASTS,
        Type::Counter,
        Unit::Count,
        "rows inserted into realtime.messages, by result: public or private (sent to the topic's room), skipped (not a broadcast)",
    ),
    metric(
        TAKEOVERS,
        Type::Counter,
        Unit::Count,
        "sessions that streamed after waiting as the hot standby for the slot's lock",
    ),
    metric(
        SUBSCRIPTIONS,
        Type::Gauge,
        Unit::Count,
        "subscriptions in the registry",
    ),
    metric(
        ACKNOWLEDGED_LSN,
        Type::Gauge,
        Unit::Count,
        "acknowledged lsn: everything before it is in redis",
    ),
    metric(
        RECEIVED_LSN,
        Type::Gauge,
        Unit::Count,
        "furthest server wal end reported by the replication stream",
    ),
    metric(
        LAG_BYTES,
        Type::Gauge,
        Unit::Bytes,
        "server wal end minus the acknowledged lsn",
    ),
    metric(
        LAG_SECONDS,
        Type::Gauge,
        Unit::Seconds,
        "commit to publish delay of the last published change",
    ),
    metric(
        RETAINED_WAL_BYTES,
        Type::Gauge,
        Unit::Bytes,
        "wal the replication slot keeps on the server",
    ),
    metric(
        REDIS_ERRORS,
        Type::Counter,
        Unit::Count,
        "redis failures, by task",
    ),
    metric(
        REDIS_RECONNECTS,
        Type::Counter,
        Unit::Count,
        "reconnections to redis after a failure, by task",
    ),
    metric(
        PUBLISH_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "time redis took to answer one publishing pipeline",
    ),
];

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The exporter refused its configuration, or another recorder is
    /// already installed in this process.
    #[error("installing the metrics recorder: {0}")]
    Install(#[from] BuildError),
    /// No pooled connection to read the slot with.
    #[error("reading the slot's retained wal: no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The slot query failed.
    #[error("reading the slot's retained wal: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// The handle of the process's recorder, once installed.
static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder for this process (once; later calls
/// return the same handle), describes every metric and registers the
/// counters and histograms, so a first scrape lists them at zero.
pub fn install() -> Result<PrometheusHandle, Error> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(RLS_CHECK_SECONDS.to_owned()), RLS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(PUBLISH_SECONDS.to_owned()), PUBLISH_BUCKETS)?
        .install_recorder()?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

fn describe() {
    for m in ALL {
        match m.kind {
            Type::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            Type::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            Type::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
    for kind in ["INSERT", "UPDATE", "DELETE", "TRUNCATE"] {
        metrics::counter!(CHANGES_RECEIVED, KIND => kind).increment(0);
    }
    for task in [TASK_PUBLISHER, TASK_CONTROL] {
        metrics::counter!(REDIS_ERRORS, TASK => task).increment(0);
        metrics::counter!(REDIS_RECONNECTS, TASK => task).increment(0);
    }
    for name in [
        CHANGES_PUBLISHED,
        MESSAGES_PUBLISHED,
        PUBLISHED_BYTES,
        TRANSACTIONS,
        RLS_CHECKS,
        RLS_DENIED,
        RLS_ERRORS,
        RLS_BY_IMAGE,
        RLS_FALLBACK,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(SUBSCRIPTIONS).set(0.0);
    for name in [RLS_CHECK_SECONDS, PUBLISH_SECONDS] {
        // Registered, so that they are listed (empty) before the first sample.
        let _ = metrics::histogram!(name);
    }
}

/// Folds histogram samples into their buckets every few seconds, so memory
/// stays bounded between scrapes. Runs until aborted.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Seconds from a commit time (microseconds since 2000-01-01 UTC, as
/// pgoutput sends it) to now; 0 when the database's clock is ahead.
pub fn seconds_since_commit(commit_time: i64) -> f64 {
    /// 2000-01-01 in Unix seconds.
    const POSTGRES_EPOCH: i64 = 946_684_800;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let micros = now
        .saturating_sub(POSTGRES_EPOCH * 1_000_000)
        .saturating_sub(commit_time);
    (micros.max(0) as f64) / 1e6
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_prefixed_unique_and_counters_end_in_total() {
        let mut seen = HashSet::new();
        for m in ALL {
            assert!(m.name.starts_with("walcast_"), "{}", m.name);
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert_eq!(
                m.kind == Type::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Type::Histogram,
                m.name.ends_with("_seconds") && m.name.contains("duration"),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn every_metric_is_in_the_readme() {
        let readme = include_str!("../../README.md");
        for m in ALL {
            assert!(
                readme.contains(&format!("`{}`", m.name)),
                "{} is not documented in README.md",
                m.name
            );
        }
    }

    #[test]
    fn install_twice_returns_the_same_recorder_and_renders_every_counter() {
        let first = install().unwrap();
        let second = install().unwrap();
        metrics::counter!(TRANSACTIONS).increment(3);
        metrics::histogram!(PUBLISH_SECONDS).record(Duration::from_millis(2));
        second.run_upkeep();
        let text = first.render();
        assert!(
            text.contains("# TYPE walcast_rls_check_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE walcast_transactions_total counter"),
            "{text}"
        );
        assert!(text.contains("walcast_transactions_total 3"), "{text}");
        assert!(
            text.contains("walcast_changes_received_total{kind=\"INSERT\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("walcast_publish_duration_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn commit_lag_is_never_negative() {
        assert_eq!(seconds_since_commit(i64::MAX), 0.0);
        // 2000-01-01 was more than 20 years ago.
        assert!(seconds_since_commit(0) > 20.0 * 365.0 * 86_400.0);
    }
}
