//! The tenant SQL the checks need (`sql/rls.sql`), found, and installed or
//! upgraded by the daemon itself where its role may, as Supabase Realtime
//! migrates its tenant schema. Elsewhere an administrator applies it
//! (`walcast setup`); until then subscriptions to tables with row level
//! security are refused, saying so, rather than accepted and starved.

use deadpool_postgres::Pool;
use tokio_postgres::Client;
use tracing::{info, warn};

/// The version of `sql/rls.sql` this binary speaks (`walcast.sql_version()`).
pub const SQL_VERSION: i32 = 3;

/// Serializes installs (an active and a standby daemon starting together).
const INSTALL_LOCK: i64 = 0x7761_6c63_6173_7401;

/// What the database has of `sql/rls.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// [`SQL_VERSION`], callable by this role.
    Current,
    /// Nothing: `walcast.sql_version()` does not exist (never installed, or
    /// a version before it).
    Missing,
    /// Another version.
    Other(i32),
    /// The current version, but this role may not execute it.
    NotCallable,
}

impl Installed {
    /// Why RLS cannot be checked, for a log line or a refused subscription;
    /// `None` when it can.
    pub fn problem(&self) -> Option<String> {
        let fix = "apply sql/rls.sql with walcast setup --admin-url ... (or let walcast run install it as a role that may create the schema walcast)";
        match self {
            Installed::Current => None,
            Installed::Missing => Some(format!(
                "row level security cannot be checked: walcast.visible_rows (sql/rls.sql version {SQL_VERSION}) is not installed; {fix}"
            )),
            Installed::Other(found) => Some(format!(
                "row level security cannot be checked: sql/rls.sql version {found} is installed, this walcast needs version {SQL_VERSION}; {fix}"
            )),
            Installed::NotCallable => Some(format!(
                "row level security cannot be checked: this role may not execute walcast.visible_rows; {fix}"
            )),
        }
    }
}

/// What `client`'s database has of `sql/rls.sql`, as its role sees it.
pub async fn installed(client: &Client) -> Result<Installed, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT pg_catalog.to_regprocedure('walcast.sql_version()') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Installed::Missing);
    }
    let version: i32 = client
        .query_one("SELECT walcast.sql_version()", &[])
        .await?
        .try_get(0)?;
    if version != SQL_VERSION {
        return Ok(Installed::Other(version));
    }
    let callable: bool = client
        .query_one(
            "SELECT pg_catalog.has_function_privilege(\
               'walcast.visible_rows(text, text, text[], text[], text[], text[], integer[], text[], walcast.rls_subject[])', \
               'EXECUTE')",
            &[],
        )
        .await?
        .try_get(0)?;
    Ok(if callable {
        Installed::Current
    } else {
        Installed::NotCallable
    })
}

/// At start: installs `sql/rls.sql` (version [`SQL_VERSION`]) when it is
/// missing or of another version and this role may, and says what the
/// database has then. An install that fails (no privilege, another role
/// owns the functions) changes nothing and is logged; the answer is what
/// was there before.
pub async fn ensure(pool: &Pool) -> Result<Installed, super::Error> {
    let mut client = pool.get().await?;
    let before = installed(&client).await?;
    if before == Installed::Current {
        return Ok(before);
    }
    let attempt = async {
        let tx = client.transaction().await?;
        // Another daemon may be installing it too: one at a time (the SQL
        // is idempotent, so the second install changes nothing).
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            &[&INSTALL_LOCK],
        )
        .await?;
        tx.execute(
            "SELECT pg_catalog.set_config('walcast.role', current_user, true)",
            &[],
        )
        .await?;
        tx.batch_execute(super::INSTALL_SQL).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    match attempt.await {
        Ok(()) => {
            let after = installed(&client).await?;
            info!(version = SQL_VERSION, "installed sql/rls.sql");
            Ok(after)
        }
        Err(e) => {
            let reason = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned());
            warn!(
                found = ?before,
                error = %reason,
                "could not install sql/rls.sql as this role; {}",
                before.problem().unwrap_or_default()
            );
            Ok(before)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_version_has_no_problem() {
        assert_eq!(Installed::Current.problem(), None);
        for other in [
            Installed::Missing,
            Installed::Other(1),
            Installed::NotCallable,
        ] {
            let problem = other.problem().unwrap_or_default();
            assert!(problem.contains("walcast setup"), "{problem}");
        }
        assert!(
            Installed::Other(1)
                .problem()
                .unwrap_or_default()
                .contains("version 1 is installed, this walcast needs version 3")
        );
    }
}
