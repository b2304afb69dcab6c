//! The replication connection itself, opened as the daemon opens it: the
//! only way to learn whether `pg_hba.conf` lets the role in on a
//! `replication` line.

use super::{Finding, id};
use crate::config::DatabaseUrl;
use crate::replication::{Connection, Error};

/// Appends whether a `replication=database` session starts and answers
/// `IDENTIFY_SYSTEM`.
pub(super) async fn check(url: &DatabaseUrl, out: &mut Vec<Finding>) {
    let result = async {
        let mut conn = Connection::connect(url).await?;
        conn.identify_system().await
    }
    .await;
    out.push(match result {
        Ok(system) => Finding::ok(
            id::POSTGRES_REPLICATION,
            format!(
                "replication connection as {} works (system {}, timeline {}, WAL at {})",
                url.user, system.system_id, system.timeline, system.xlog_pos
            ),
        ),
        Err(e) => {
            let finding = Finding::error(
                id::POSTGRES_REPLICATION,
                format!("replication connection as {} failed: {e}", url.user),
            );
            match fix(&e, &url.user) {
                Some(fix) => finding.fix(fix),
                None => finding,
            }
        }
    });
}

/// What to do about the failures operators meet most.
fn fix(error: &Error, user: &str) -> Option<String> {
    let Error::Db(db) = error else {
        return None;
    };
    match db.code.as_str() {
        "28000" if db.message.contains("pg_hba.conf") => Some(format!(
            "allow the role on a replication line of pg_hba.conf, e.g. `hostssl replication {user} 10.0.0.0/8 scram-sha-256`, then SELECT pg_reload_conf();"
        )),
        "42501" => Some("give the role REPLICATION: see the role.privileges finding".to_owned()),
        "53300" => Some("raise max_wal_senders, or stop a client holding a WAL sender".to_owned()),
        "28P01" => Some("check the password in database_url".to_owned()),
        _ => None,
    }
}
