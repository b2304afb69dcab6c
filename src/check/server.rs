//! The server: version, `wal_level`, room for walcast's slot and WAL
//! sender, and the cap on what a slot may retain.

use tokio_postgres::Client;

use super::{Finding, id};

/// One row of server facts; `$1` is the slot name.
const SERVER: &str = "
SELECT pg_catalog.current_setting('server_version'),
       pg_catalog.current_setting('server_version_num')::int,
       pg_catalog.current_setting('wal_level'),
       pg_catalog.current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int,
       pg_catalog.current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_catalog.pg_stat_replication)::int,
       EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = $1),
       EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active),
       pg_catalog.current_setting('max_slot_wal_keep_size', true)";

/// What [`SERVER`] returns.
struct Server {
    version: String,
    version_num: i32,
    wal_level: String,
    max_slots: i32,
    used_slots: i32,
    max_senders: i32,
    used_senders: i32,
    slot_exists: bool,
    slot_active: bool,
    max_slot_wal_keep_size: Option<String>,
}

/// Appends the server's findings.
pub(super) async fn check(
    client: &Client,
    slot: &str,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let row = client.query_one(SERVER, &[&slot]).await?;
    let server = Server {
        version: row.try_get(0)?,
        version_num: row.try_get(1)?,
        wal_level: row.try_get(2)?,
        max_slots: row.try_get(3)?,
        used_slots: row.try_get(4)?,
        max_senders: row.try_get(5)?,
        used_senders: row.try_get(6)?,
        slot_exists: row.try_get(7)?,
        slot_active: row.try_get(8)?,
        max_slot_wal_keep_size: row.try_get(9)?,
    };
    out.push(version(&server));
    out.push(wal_level(&server.wal_level));
    out.push(replication_slots(&server, slot));
    out.push(wal_senders(&server));
    out.push(max_slot_wal_keep_size(
        server.max_slot_wal_keep_size.as_deref(),
    ));
    Ok(())
}

fn version(server: &Server) -> Finding {
    let version = &server.version;
    if server.version_num < 140_000 {
        Finding::error(
            id::SERVER_VERSION,
            format!("PostgreSQL {version} is too old: walcast needs PostgreSQL 14 or later (its catalog queries read pg_type.typsubscript; it is tested on 14, 15 and 18)"),
        )
        .fix("upgrade PostgreSQL (14 or later)")
    } else {
        Finding::ok(id::SERVER_VERSION, format!("PostgreSQL {version}"))
    }
}

fn wal_level(level: &str) -> Finding {
    if level == "logical" {
        Finding::ok(id::SERVER_WAL_LEVEL, "wal_level is logical")
    } else {
        Finding::error(
            id::SERVER_WAL_LEVEL,
            format!("wal_level is {level}; logical decoding needs logical"),
        )
        .fix("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (on a managed service, set the provider's logical replication parameter)")
    }
}

fn replication_slots(server: &Server, slot: &str) -> Finding {
    let (used, max) = (server.used_slots, server.max_slots);
    if server.slot_exists {
        Finding::ok(
            id::SERVER_REPLICATION_SLOTS,
            format!("{used} of {max} replication slots in use, {slot} among them"),
        )
    } else if used < max {
        Finding::ok(
            id::SERVER_REPLICATION_SLOTS,
            format!("{used} of {max} replication slots in use; {slot} can be created"),
        )
    } else {
        Finding::error(
            id::SERVER_REPLICATION_SLOTS,
            format!("{used} of {max} replication slots in use; none is free for {slot}"),
        )
        .fix(format!("raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL), or drop a slot nobody uses (SELECT pg_drop_replication_slot('name'))", max + 1))
    }
}

fn wal_senders(server: &Server) -> Finding {
    let (used, max) = (server.used_senders, server.max_senders);
    if server.slot_active {
        Finding::ok(
            id::SERVER_WAL_SENDERS,
            format!("{used} of {max} WAL senders in use, walcast's among them"),
        )
    } else if used < max {
        Finding::ok(
            id::SERVER_WAL_SENDERS,
            format!("{used} of {max} WAL senders in use; one is free for walcast"),
        )
    } else {
        Finding::error(
            id::SERVER_WAL_SENDERS,
            format!("{used} of {max} WAL senders in use; none is free for walcast"),
        )
        .fix(format!(
            "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL)",
            max + 1
        ))
    }
}

fn max_slot_wal_keep_size(setting: Option<&str>) -> Finding {
    match setting {
        None => Finding::info(
            id::SERVER_MAX_SLOT_WAL_KEEP_SIZE,
            "this server has no max_slot_wal_keep_size (PostgreSQL 13 or later has it): a slot nobody reads keeps WAL until the disk is full",
        ),
        Some("-1") => Finding::info(
            id::SERVER_MAX_SLOT_WAL_KEEP_SIZE,
            "max_slot_wal_keep_size is -1 (unlimited): a slot nobody reads keeps WAL until the disk is full",
        )
        .fix("to cap it: ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (a slot past the cap is invalidated and walcast needs a new one)"),
        Some(size) => Finding::ok(
            id::SERVER_MAX_SLOT_WAL_KEEP_SIZE,
            format!("max_slot_wal_keep_size is {size}: a slot retaining more is invalidated"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    fn server() -> Server {
        Server {
            version: "15.8".into(),
            version_num: 150_008,
            wal_level: "logical".into(),
            max_slots: 10,
            used_slots: 10,
            max_senders: 10,
            used_senders: 10,
            slot_exists: false,
            slot_active: false,
            max_slot_wal_keep_size: Some("-1".into()),
        }
    }

    #[test]
    fn full_slots_block_only_a_slot_that_does_not_exist_yet() {
        let full = server();
        assert_eq!(replication_slots(&full, "walcast").level, Level::Error);
        let ours = Server {
            slot_exists: true,
            ..server()
        };
        assert_eq!(replication_slots(&ours, "walcast").level, Level::Ok);
    }

    #[test]
    fn full_wal_senders_block_only_when_walcast_is_not_streaming() {
        let full = server();
        let finding = wal_senders(&full);
        assert_eq!(finding.level, Level::Error);
        assert_eq!(
            finding.fix.as_deref(),
            Some(
                "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = 11; then restart PostgreSQL)"
            )
        );
        let streaming = Server {
            slot_active: true,
            ..server()
        };
        assert_eq!(wal_senders(&streaming).level, Level::Ok);
    }

    #[test]
    fn only_logical_wal_level_passes() {
        assert_eq!(wal_level("logical").level, Level::Ok);
        let finding = wal_level("replica");
        assert_eq!(finding.level, Level::Error);
        assert_eq!(
            finding.message,
            "wal_level is replica; logical decoding needs logical"
        );
    }
}
