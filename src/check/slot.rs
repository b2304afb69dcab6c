//! walcast's replication slot: does it exist and is it usable, who streams
//! from it, and how much WAL it holds back.
//!
//! A slot keeps every WAL segment its consumer has not acknowledged. A slot
//! nobody reads (walcast stopped, or removed without dropping its slot)
//! keeps WAL until the disk is full, unless `max_slot_wal_keep_size` caps
//! it, in which case the slot is invalidated (`wal_status = lost`) instead.

use tokio_postgres::Client;

use super::finding::bytes;
use super::{Finding, id};

/// The slot, the walsender streaming from it, and the WAL it retains; `$1`
/// is the slot name. On a standby the replay position stands in for the
/// current one.
const SLOT: &str = "
SELECT s.plugin, s.slot_type, s.database, (s.database = pg_catalog.current_database()),
       s.active, s.active_pid, r.application_name, pg_catalog.host(r.client_addr),
       pg_catalog.pg_wal_lsn_diff(
         CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
              ELSE pg_catalog.pg_current_wal_lsn() END,
         s.restart_lsn)::bigint,
       s.wal_status, s.safe_wal_size, s.confirmed_flush_lsn::text,
       pg_catalog.quote_literal($1)
FROM pg_catalog.pg_replication_slots s
LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = $1";

/// What [`SLOT`] returns.
struct Slot {
    plugin: Option<String>,
    kind: String,
    database: Option<String>,
    ours: Option<bool>,
    active: bool,
    active_pid: Option<i32>,
    application: Option<String>,
    client: Option<String>,
    retained: Option<i64>,
    wal_status: Option<String>,
    safe_wal_size: Option<i64>,
    confirmed_flush: Option<String>,
    /// The slot name as an SQL literal, for fixes.
    literal: String,
}

/// Appends the slot's findings.
pub(super) async fn check(
    client: &Client,
    slot: &str,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let Some(row) = client.query_opt(SLOT, &[&slot]).await? else {
        out.push(Finding::info(
            id::SLOT_EXISTS,
            format!(
                "replication slot {slot} does not exist yet; walcast run creates it on first start"
            ),
        ));
        return Ok(());
    };
    let found = Slot {
        plugin: row.try_get(0)?,
        kind: row.try_get(1)?,
        database: row.try_get(2)?,
        ours: row.try_get(3)?,
        active: row.try_get(4)?,
        active_pid: row.try_get(5)?,
        application: row.try_get(6)?,
        client: row.try_get(7)?,
        retained: row.try_get(8)?,
        wal_status: row.try_get(9)?,
        safe_wal_size: row.try_get(10)?,
        confirmed_flush: row.try_get(11)?,
        literal: row.try_get(12)?,
    };
    let usable = exists(&found, slot);
    let usable_level = usable.level;
    out.push(usable);
    if usable_level == super::Level::Error {
        return Ok(());
    }
    out.push(activity(&found, slot));
    out.push(wal_status(&found, slot));
    Ok(())
}

fn exists(found: &Slot, slot: &str) -> Finding {
    let drop = format!(
        "SELECT pg_drop_replication_slot({}); (only if nothing else uses it), or set another slot name (WALCAST_SLOT)",
        found.literal
    );
    let plugin = found.plugin.as_deref().unwrap_or("");
    if found.kind != "logical" {
        Finding::error(
            id::SLOT_EXISTS,
            format!(
                "replication slot {slot} is a {} slot; walcast needs a logical pgoutput slot",
                found.kind
            ),
        )
        .fix(drop)
    } else if plugin != "pgoutput" {
        Finding::error(
            id::SLOT_EXISTS,
            format!("replication slot {slot} uses plugin {plugin}; walcast needs pgoutput"),
        )
        .fix(drop)
    } else if found.ours != Some(true) {
        Finding::error(
            id::SLOT_EXISTS,
            format!(
                "replication slot {slot} belongs to database {}, not this one",
                found.database.as_deref().unwrap_or("?")
            ),
        )
        .fix("set another slot name (WALCAST_SLOT) for this database")
    } else {
        Finding::ok(
            id::SLOT_EXISTS,
            format!(
                "replication slot {slot} exists (pgoutput), confirmed up to {}",
                found.confirmed_flush.as_deref().unwrap_or("nothing yet")
            ),
        )
    }
}

fn activity(found: &Slot, slot: &str) -> Finding {
    let retained = found
        .retained
        .map_or_else(|| "no longer known".to_owned(), bytes);
    if found.active {
        let mut by = match found.active_pid {
            Some(pid) => format!("pid {pid}"),
            None => "a walsender".to_owned(),
        };
        if let Some(application) = &found.application {
            by.push_str(&format!(", application {application}"));
        }
        if let Some(client) = &found.client {
            by.push_str(&format!(", client {client}"));
        }
        return Finding::ok(
            id::SLOT_ACTIVE,
            format!("replication slot {slot} is active ({by}); retained WAL: {retained}"),
        );
    }
    match found.retained {
        Some(n) if n <= 0 => Finding::info(
            id::SLOT_ACTIVE,
            format!("replication slot {slot} is inactive and retains no WAL"),
        ),
        _ => Finding::warning(
            id::SLOT_ACTIVE,
            format!("replication slot {slot} is inactive and retains {retained} of WAL, growing with every write until a consumer returns"),
        )
        .fix(format!(
            "start walcast run; if walcast is gone for good, drop the slot: SELECT pg_drop_replication_slot({});",
            found.literal
        )),
    }
}

fn wal_status(found: &Slot, slot: &str) -> Finding {
    let Some(status) = found.wal_status.as_deref() else {
        return Finding::info(
            id::SLOT_WAL_STATUS,
            "wal_status is unavailable on this server (PostgreSQL 13 or later reports it)",
        );
    };
    let safe = found
        .safe_wal_size
        .map(|n| format!("; {} more before it is invalidated", bytes(n)))
        .unwrap_or_default();
    let drop = format!(
        "drop the slot (SELECT pg_drop_replication_slot({})) and restart walcast: it creates a new slot at the current position (changes in between are not streamed)",
        found.literal
    );
    match status {
        "reserved" => Finding::ok(
            id::SLOT_WAL_STATUS,
            format!("replication slot {slot}: wal_status reserved (its WAL is within max_wal_size){safe}"),
        ),
        "extended" => Finding::warning(
            id::SLOT_WAL_STATUS,
            format!("replication slot {slot}: wal_status extended (it retains more than max_wal_size){safe}"),
        )
        .fix("let walcast catch up (is it running and Redis reachable?); consider max_slot_wal_keep_size to cap retained WAL"),
        "unreserved" => Finding::warning(
            id::SLOT_WAL_STATUS,
            format!("replication slot {slot}: wal_status unreserved: WAL it needs will be removed at the next checkpoint"),
        )
        .fix("start walcast now, or the slot is lost"),
        "lost" => Finding::error(
            id::SLOT_WAL_STATUS,
            format!("replication slot {slot}: wal_status lost: WAL it needs was removed, so it can no longer stream"),
        )
        .fix(drop),
        other => Finding::info(
            id::SLOT_WAL_STATUS,
            format!("replication slot {slot}: wal_status {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    fn slot() -> Slot {
        Slot {
            plugin: Some("pgoutput".into()),
            kind: "logical".into(),
            database: Some("app".into()),
            ours: Some(true),
            active: false,
            active_pid: None,
            application: None,
            client: None,
            retained: Some(2048),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            confirmed_flush: Some("0/1A2B3C".into()),
            literal: "'walcast'".into(),
        }
    }

    #[test]
    fn an_inactive_slot_retaining_wal_is_a_warning_with_the_drop_command() {
        let finding = activity(&slot(), "walcast");
        assert_eq!(finding.level, Level::Warning);
        assert_eq!(
            finding.message,
            "replication slot walcast is inactive and retains 2048 bytes (2.0 KiB) of WAL, growing with every write until a consumer returns"
        );
        assert_eq!(
            finding.fix.as_deref(),
            Some(
                "start walcast run; if walcast is gone for good, drop the slot: SELECT pg_drop_replication_slot('walcast');"
            )
        );
    }

    #[test]
    fn an_active_slot_names_its_consumer() {
        let active = Slot {
            active: true,
            active_pid: Some(42),
            application: Some("walcast".into()),
            client: Some("127.0.0.1".into()),
            ..slot()
        };
        assert_eq!(
            activity(&active, "walcast").message,
            "replication slot walcast is active (pid 42, application walcast, client 127.0.0.1); retained WAL: 2048 bytes (2.0 KiB)"
        );
    }

    #[test]
    fn a_slot_of_another_plugin_or_database_is_unusable() {
        let other_plugin = Slot {
            plugin: Some("wal2json".into()),
            ..slot()
        };
        assert_eq!(exists(&other_plugin, "walcast").level, Level::Error);
        let other_db = Slot {
            ours: Some(false),
            ..slot()
        };
        assert_eq!(exists(&other_db, "walcast").level, Level::Error);
        assert_eq!(exists(&slot(), "walcast").level, Level::Ok);
    }

    #[test]
    fn a_lost_slot_is_an_error() {
        let lost = Slot {
            wal_status: Some("lost".into()),
            retained: None,
            ..slot()
        };
        assert_eq!(wal_status(&lost, "walcast").level, Level::Error);
    }
}
