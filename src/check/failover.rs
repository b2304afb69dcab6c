//! Does walcast's slot survive a database failover?
//!
//! PostgreSQL 17 keeps a copy of a *failover* slot on physical standby
//! servers that have `sync_replication_slots` on; a promoted standby then
//! streams on from it. The primary should list the standbys' physical
//! slots in `synchronized_standby_slots`, so that no change reaches walcast
//! before those standbys have it (else a promotion could leave walcast
//! ahead of the new primary). Before 17 there are no failover slots: the
//! slot is lost with its server (README, "Database failover").

use tokio_postgres::Client;

use super::{Finding, id};
use crate::config::{DatabaseUrl, Settings};

/// The slot's failover flag on 17+; `$1` is the slot name.
const FAILOVER: &str = "SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";

/// The standby's copy of the slot; `$1` is the slot name.
const STANDBY_SLOT: &str = "
SELECT synced AND NOT temporary, invalidation_reason, confirmed_flush_lsn::text, temporary
FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";

/// Appends the findings about the slot's failover on the primary
/// (`client`), and on `standby_database_url` when it is set.
pub(super) async fn check(
    client: &Client,
    settings: &Settings,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let slot = settings.slot.as_str();
    let version: i32 = client
        .query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::int",
            &[],
        )
        .await?
        .try_get(0)?;
    if version < 170000 {
        let major = version / 10000;
        let lost = format!(
            "PostgreSQL {major} has no failover slots: a database failover loses replication slot {slot}; walcast creates it again on the new primary, from where that server is, and what was committed in between is not streamed (README, \"Database failover\")"
        );
        out.push(if settings.slot_failover {
            Finding::warning(
                id::SLOT_FAILOVER,
                format!("slot_failover is set, but {lost}"),
            )
            .fix("upgrade to PostgreSQL 17 or later, or unset slot_failover")
        } else {
            Finding::info(id::SLOT_FAILOVER, lost)
        });
        return Ok(());
    }
    let failover: Option<bool> = match client.query_opt(FAILOVER, &[&slot]).await? {
        Some(row) => row.try_get(0)?,
        None => None,
    };
    if !settings.slot_failover {
        out.push(
            Finding::info(
                id::SLOT_FAILOVER,
                match failover {
                    Some(true) => format!("replication slot {slot} is a failover slot (slot_failover is off: walcast leaves it so)"),
                    _ => format!("replication slot {slot} is not a failover slot: a database failover loses it"),
                },
            )
            .fix("to keep it across a database failover: slot_failover = true, and a standby with sync_replication_slots = on"),
        );
        return Ok(());
    }
    match failover {
        None => out.push(Finding::info(
            id::SLOT_FAILOVER,
            format!("replication slot {slot} does not exist yet; walcast run creates it as a failover slot"),
        )),
        Some(false) => out.push(Finding::info(
            id::SLOT_FAILOVER,
            format!("replication slot {slot} is not a failover slot yet; walcast run makes it one when it starts"),
        )),
        Some(true) => {
            let standbys: String = client
                .query_one("SELECT pg_catalog.current_setting('synchronized_standby_slots')", &[])
                .await?
                .try_get(0)?;
            out.push(if standbys.trim().is_empty() {
                Finding::warning(
                    id::SLOT_FAILOVER,
                    format!("replication slot {slot} is a failover slot, but synchronized_standby_slots is empty: walcast may receive changes a standby does not have yet, and a promotion of that standby would leave walcast ahead of the new primary"),
                )
                .fix("ALTER SYSTEM SET synchronized_standby_slots = '<each standby''s physical slot>'; SELECT pg_reload_conf();")
            } else {
                Finding::ok(
                    id::SLOT_FAILOVER,
                    format!("replication slot {slot} is a failover slot; walcast receives changes once the standbys of synchronized_standby_slots ({standbys}) have them"),
                )
            });
        }
    }
    match &settings.standby_database_url {
        Some(url) => out.push(standby(url, slot).await),
        None => out.push(Finding::info(
            id::STANDBY_SLOT,
            "no standby_database_url: not checking that a standby holds the slot",
        )),
    }
    Ok(())
}

/// Whether the standby at `url` holds a synchronized copy of the slot.
async fn standby(url: &DatabaseUrl, slot: &str) -> Finding {
    let client = match super::connect(url).await {
        Ok(client) => client,
        Err(e) => {
            return Finding::error(
                id::STANDBY_SLOT,
                format!("cannot connect to the standby {url}: {e}"),
            )
            .fix("check standby_database_url");
        }
    };
    let found = async {
        let recovery: bool = client
            .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
            .await?
            .try_get(0)?;
        let sync: String = client
            .query_one(
                "SELECT pg_catalog.current_setting('sync_replication_slots')",
                &[],
            )
            .await?
            .try_get(0)?;
        let copy = match client.query_opt(STANDBY_SLOT, &[&slot]).await? {
            Some(row) => Some((
                row.try_get::<_, bool>(0)?,
                row.try_get::<_, Option<String>>(1)?,
                row.try_get::<_, Option<String>>(2)?,
                row.try_get::<_, bool>(3)?,
            )),
            None => None,
        };
        Ok::<_, tokio_postgres::Error>((recovery, sync, copy))
    }
    .await;
    let needs = "on the standby: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name set and dbname in primary_conninfo; on the primary: its physical slot in synchronized_standby_slots";
    match found {
        Err(e) => Finding::error(
            id::STANDBY_SLOT,
            format!("could not read the standby's slots: {}", super::describe(&e)),
        ),
        Ok((false, _, _)) => Finding::error(
            id::STANDBY_SLOT,
            format!("{url} is not a standby (it is not in recovery)"),
        )
        .fix("set standby_database_url to a physical standby of the database"),
        Ok((true, sync, _)) if sync != "on" => Finding::warning(
            id::STANDBY_SLOT,
            format!("the standby does not synchronize replication slots (sync_replication_slots is {sync})"),
        )
        .fix(needs),
        Ok((true, _, None)) => Finding::warning(
            id::STANDBY_SLOT,
            format!("the standby has no copy of replication slot {slot} yet"),
        )
        .fix(needs),
        Ok((true, _, Some((_, Some(reason), _, _)))) => Finding::error(
            id::STANDBY_SLOT,
            format!("the standby's copy of replication slot {slot} is invalidated ({reason}): a promotion would lose it"),
        )
        .fix("see the standby's log; the copy is made again once the primary's slot is usable and the standby keeps up"),
        Ok((true, _, Some((false, None, _, true)))) => Finding::warning(
            id::STANDBY_SLOT,
            format!("the standby's copy of replication slot {slot} is not kept yet (temporary: the standby has not caught up with it); a promotion now would drop it"),
        )
        .fix("wait: the slot sync worker keeps it once the standby has replayed past the primary's slot"),
        Ok((true, _, Some((false, None, _, false)))) => Finding::warning(
            id::STANDBY_SLOT,
            format!("the standby has a replication slot {slot} that is not a synchronized copy"),
        )
        .fix("drop it on the standby; the slot sync worker then copies the primary's"),
        Ok((true, _, Some((true, None, confirmed, _)))) => Finding::ok(
            id::STANDBY_SLOT,
            format!(
                "the standby holds replication slot {slot} synchronized (confirmed up to {}): a promoted standby streams on from it",
                confirmed.as_deref().unwrap_or("nothing yet")
            ),
        ),
    }
}
