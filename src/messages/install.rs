//! `sql/realtime.sql` installed by the daemon itself where its role may
//! (a superuser, say, in a local setup), as Supabase Realtime migrates its
//! tenant schema. Elsewhere `walcast setup` applies it; until then
//! Broadcast from Database and private channels are off, and the daemon
//! says so once.

use deadpool_postgres::Pool;
use tracing::info;

/// Serializes installs (an active and a standby daemon starting together).
const INSTALL_LOCK: i64 = 0x7761_6c63_6173_7402;

/// Whether `realtime.messages` exists now: found, or created from
/// `sql/realtime.sql` as this role. A role that may not create it leaves
/// it missing (logged); an unreachable database is an error.
pub async fn ensure(pool: &Pool) -> Result<bool, tokio_postgres::Error> {
    let Ok(mut client) = pool.get().await else {
        return Ok(false);
    };
    let exists = "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c \
                  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = 'realtime' AND c.relname = 'messages')";
    if client.query_one(exists, &[]).await?.get::<_, bool>(0) {
        return Ok(true);
    }
    let attempt = async {
        let tx = client.transaction().await?;
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
        tx.commit().await
    };
    match attempt.await {
        Ok(()) => {
            info!(
                "installed sql/realtime.sql: Broadcast from Database and private channels are on"
            );
            Ok(true)
        }
        Err(e) => {
            let reason = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned());
            info!(
                error = %reason,
                "realtime.messages is missing and this role may not create it: Broadcast from Database and private channels are off until walcast setup applies sql/realtime.sql"
            );
            Ok(false)
        }
    }
}
