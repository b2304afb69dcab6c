//! Broadcast from Database and private channels: does `realtime.messages`
//! exist, is it streamed (its publication), does today have a partition,
//! and may walcast's role keep the partitions.

use tokio_postgres::Client;

use super::{Finding, id};

/// The table, whether the role may manage it (as its owner or a member
/// of it), its owner, and whether today (UTC) has a partition.
const TABLE: &str = "
SELECT pg_catalog.quote_ident(o.rolname),
       pg_catalog.pg_has_role(current_user, c.relowner, 'MEMBER'),
       EXISTS (SELECT FROM pg_catalog.pg_inherits i
                 JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid
                WHERE i.inhparent = c.oid
                  AND p.relname = 'messages_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM_DD'))
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
WHERE n.nspname = 'realtime' AND c.relname = 'messages'";

/// Which of the two publications stream the messages table (or its
/// partitions): `$1` the messages publication, `$2` walcast's own.
const STREAMED: &str = "
SELECT pg_catalog.quote_ident($1),
       EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = $1),
       EXISTS (SELECT FROM pg_catalog.pg_publication_tables
                WHERE pubname IN ($1, $2) AND schemaname = 'realtime'
                  AND (tablename = 'messages' OR tablename LIKE 'messages\\_%'))";

/// Appends the findings about the messages table.
pub(super) async fn check(
    client: &Client,
    messages_publication: &str,
    publication: &str,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let Some(table) = client.query_opt(TABLE, &[]).await? else {
        out.push(
            Finding::info(
                id::MESSAGES_TABLE,
                "realtime.messages does not exist: Broadcast from Database and private channels are off",
            )
            .fix("walcast setup (sql/realtime.sql creates Supabase's realtime schema where it is missing)"),
        );
        return Ok(());
    };
    let (owner, may_manage, today): (String, bool, bool) =
        (table.try_get(0)?, table.try_get(1)?, table.try_get(2)?);
    out.push(if may_manage {
        Finding::ok(
            id::MESSAGES_TABLE,
            format!("realtime.messages exists; this role may keep its partitions (as {owner})"),
        )
    } else {
        Finding::warning(
            id::MESSAGES_TABLE,
            format!("realtime.messages exists, owned by {owner}, and this role may not create or drop its partitions"),
        )
        .fix(format!("GRANT {owner} TO <walcast's role>; (walcast setup does)"))
    });
    out.push(if today {
        Finding::ok(id::MESSAGES_PARTITIONS, "today's partition of realtime.messages exists")
    } else {
        Finding::warning(
            id::MESSAGES_PARTITIONS,
            "today's partition of realtime.messages is missing: realtime.send only warns and nothing is sent",
        )
        .fix("start walcast run (it creates partitions hourly) or run walcast setup")
    });
    let row = client
        .query_one(STREAMED, &[&messages_publication, &publication])
        .await?;
    let (quoted, exists, streamed): (String, bool, bool) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    out.push(if streamed {
        Finding::ok(
            id::MESSAGES_PUBLICATION,
            "realtime.messages is published: Broadcast from Database rides the slot",
        )
    } else if exists {
        Finding::warning(
            id::MESSAGES_PUBLICATION,
            format!("publication {quoted} does not publish realtime.messages: Broadcast from Database is off"),
        )
        .fix(format!("ALTER PUBLICATION {quoted} ADD TABLE realtime.messages;"))
    } else {
        Finding::warning(
            id::MESSAGES_PUBLICATION,
            format!("publication {quoted} does not exist: Broadcast from Database is off"),
        )
        .fix(format!(
            "walcast setup, or CREATE PUBLICATION {quoted} FOR TABLE realtime.messages;"
        ))
    });
    Ok(())
}
