//! Replication commands: identify the system, check the publication, make
//! sure the slot exists, start streaming.

use std::time::Duration;

use super::{Connection, Error, ReplicationStream};
use crate::lsn::Lsn;

/// The first key of the slot's advisory lock (`pg_locks.classid`), the
/// second being `hashtext(<slot>)`: "walc" in ASCII, so that walcast's
/// locks do not meet an application's one-key locks.
pub const SLOT_LOCK_CLASS: i32 = 0x7761_6c63;
/// How long one wait for the slot's lock lasts before it is asked again.
const LOCK_ROUND: Duration = Duration::from_secs(5);

/// What `IDENTIFY_SYSTEM` says about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's unique system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlog_pos: Lsn,
    /// The connected database.
    pub dbname: Option<String>,
}

/// The slot as [`Connection::ensure_slot`] found or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// walcast created it just now.
    pub created: bool,
    /// Everything before this position was acknowledged by an earlier run
    /// (the consistent point of a new slot).
    pub confirmed_flush: Lsn,
    /// Whether it is a failover slot; `None` before PostgreSQL 17.
    pub failover: Option<bool>,
}

impl Connection {
    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemId, Error> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let xlog_pos = field(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Protocol("IDENTIFY_SYSTEM returned no xlogpos".into()))?;
        Ok(SystemId {
            system_id: field(0).unwrap_or_default(),
            timeline: field(1).and_then(|s| s.parse().ok()).unwrap_or_default(),
            xlog_pos,
            dbname: field(3),
        })
    }

    /// Fails with a fix-it message unless `wal_level` is `logical`.
    pub async fn check_wal_level(&mut self) -> Result<(), Error> {
        let rows = self.simple_query("SHOW wal_level").await?;
        let level = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default();
        if level == "logical" {
            Ok(())
        } else {
            Err(Error::WalLevel(level))
        }
    }

    /// Fails with a fix-it message unless the publication exists.
    pub async fn check_publication(&mut self, publication: &str) -> Result<(), Error> {
        if self.publication_exists(publication).await? {
            Ok(())
        } else {
            Err(Error::PublicationMissing(publication.to_owned()))
        }
    }

    /// Whether the publication exists.
    pub async fn publication_exists(&mut self, publication: &str) -> Result<bool, Error> {
        let sql = format!(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
            quote_literal(publication)
        );
        Ok(!self.simple_query(&sql).await?.is_empty())
    }

    /// Takes the slot's advisory lock on this connection, waiting while
    /// another daemon holds it: the hot standby. Postgres lets one process
    /// stream a slot and answers a second at once (55006); waiting on a
    /// lock instead wakes the standby the moment the active daemon's
    /// connection ends (a kill, a crash, a shutdown), with no polling and
    /// no backoff to sit out. The lock lives as long as this connection.
    ///
    /// Waits in rounds of 5 s (`lock_timeout`), so that a
    /// standby that is stopped mid-wait leaves no backend waiting behind
    /// it for longer than a round. `waiting` is called once, when the lock
    /// is found taken.
    pub async fn lock_slot(&mut self, slot: &str, waiting: impl FnOnce()) -> Result<(), Error> {
        let key = format!(
            "{SLOT_LOCK_CLASS}, pg_catalog.hashtext({})",
            quote_literal(slot)
        );
        let rows = self
            .simple_query(&format!("SELECT pg_catalog.pg_try_advisory_lock({key})"))
            .await?;
        if rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref()
            == Some("t")
        {
            return Ok(());
        }
        waiting();
        self.simple_query(&format!(
            "SET lock_timeout = '{}ms'",
            LOCK_ROUND.as_millis()
        ))
        .await?;
        loop {
            // A server that went away mid-wait answers nothing: the round
            // is bounded here too.
            let round = tokio::time::timeout(
                LOCK_ROUND + LOCK_ROUND,
                self.simple_query(&format!("SELECT pg_catalog.pg_advisory_lock({key})")),
            )
            .await
            .map_err(|_| {
                Error::Timeout("waiting for the slot's lock: the server stopped answering")
            })?;
            match round {
                Ok(_) => break,
                // lock_not_available: a round ended; wait another.
                Err(Error::Db(db)) if db.code == "55P03" => continue,
                Err(e) => return Err(e),
            }
        }
        // Creating a slot waits for running transactions: no timeout there.
        self.simple_query("SET lock_timeout = 0").await?;
        Ok(())
    }

    /// The server's major version (`server_version` as reported at
    /// startup: `15.20 (Debian …)`, `18.4`, `17beta1`), if it reads.
    pub fn server_major(&self) -> Option<u32> {
        let version = self.parameters.get("server_version")?;
        let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Creates the permanent pgoutput slot unless it exists; an existing slot
    /// of another plugin or database is an error.
    ///
    /// With `failover` on PostgreSQL 17 or later, the slot is created as a
    /// failover slot, or an existing one is made one (`ALTER_REPLICATION_SLOT`):
    /// standby servers with `sync_replication_slots` keep a copy that a
    /// promoted standby streams on from. Older servers have no such slots
    /// ([`Slot::failover`] says what the slot is).
    pub async fn ensure_slot(&mut self, slot: &str, failover: bool) -> Result<Slot, Error> {
        let failover_slots = self.server_major().is_some_and(|major| major >= 17);
        let sql = format!(
            "SELECT plugin, database, confirmed_flush_lsn, {}, active FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            if failover_slots { "failover" } else { "NULL" },
            quote_literal(slot)
        );
        if let Some(row) = self.simple_query(&sql).await?.first() {
            let plugin = row.first().cloned().flatten().unwrap_or_default();
            let database = row.get(1).cloned().flatten().unwrap_or_default();
            let ours = self.parameters.get("database").cloned();
            if plugin != "pgoutput" {
                return Err(Error::Protocol(format!(
                    "replication slot {slot:?} exists with plugin {plugin:?}, not pgoutput; drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another slot name"
                )));
            }
            if let Some(ours) = ours.filter(|ours| *ours != database) {
                return Err(Error::Protocol(format!(
                    "replication slot {slot:?} belongs to database {database:?}, not {ours:?}; choose another slot name"
                )));
            }
            let confirmed_flush = row
                .get(2)
                .cloned()
                .flatten()
                .and_then(|l| l.parse().ok())
                .unwrap_or(Lsn::ZERO);
            let mut is_failover = row.get(3).cloned().flatten().map(|f| f == "t");
            // Altering waits for a slot in use (by something that does not
            // take the lock): left to START_REPLICATION, which refuses it.
            let in_use = row.get(4).cloned().flatten().as_deref() == Some("t");
            if failover && is_failover == Some(false) && !in_use {
                self.simple_query(&format!(
                    "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
                    quote_ident(slot)
                ))
                .await?;
                is_failover = Some(true);
            }
            return Ok(Slot {
                created: false,
                confirmed_flush,
                failover: is_failover,
            });
        }
        let create = if failover && failover_slots {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput ( SNAPSHOT 'nothing', FAILOVER true )",
                quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(slot)
            )
        };
        match self.simple_query(&create).await {
            // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
            Ok(rows) => Ok(Slot {
                created: true,
                confirmed_flush: rows
                    .first()
                    .and_then(|r| r.get(1).cloned().flatten())
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(Lsn::ZERO),
                failover: failover_slots.then_some(failover),
            }),
            // Another walcast created it between our check and our create:
            // look again.
            Err(Error::Db(db)) if db.code == "42710" => {
                Box::pin(self.ensure_slot(slot, failover)).await
            }
            Err(e) => Err(e),
        }
    }

    /// `START_REPLICATION` with pgoutput protocol 1; the server resumes from
    /// the later of `from` and the slot's confirmed position.
    pub async fn start_replication(
        mut self,
        slot: &str,
        from: Lsn,
        publications: &[&str],
    ) -> Result<ReplicationStream, Error> {
        let names: Vec<String> = publications.iter().map(|p| quote_ident(p)).collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&names.join(",")),
        );
        match self.start_copy_both(&sql).await {
            Ok(()) => Ok(ReplicationStream::new(self)),
            Err(Error::Db(db)) if db.code == "55006" => Err(Error::SlotInUse {
                slot: slot.to_owned(),
                detail: db.message,
            }),
            Err(e) => Err(e),
        }
    }
}

/// Quotes an SQL string literal (standard_conforming_strings is always on in
/// supported versions).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("My \"Pub\""), "\"My \"\"Pub\"\"\"");
        assert_eq!(
            quote_literal(&quote_ident("supabase_realtime")),
            "'\"supabase_realtime\"'"
        );
    }
}
