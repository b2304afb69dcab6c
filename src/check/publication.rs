//! The publication: does it exist, what does it publish, and can Postgres
//! write to each of its tables (replica identity) — plus each table's RLS.
//!
//! A published table whose replica identity is missing (no primary key
//! under `REPLICA IDENTITY DEFAULT`, `NOTHING`, or a dropped identity index)
//! does not break replication: Postgres rejects `UPDATE` and `DELETE` on the
//! table itself, which is worse, so it is an error.

use tokio_postgres::Client;

use super::{Finding, id};

/// The publication's options; `$1` is its name. The second column is the
/// name quoted for the fixes we print.
const PUBLICATION: &str = "
SELECT p.pubname IS NOT NULL, pg_catalog.quote_ident($1),
       p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate
FROM (SELECT 1) AS one
LEFT JOIN pg_catalog.pg_publication p ON p.pubname = $1";

/// Each published table, quoted by the server, with its primary key,
/// replica identity and row level security.
const TABLES: &str = "
SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname),
       c.relreplident::text,
       (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', '
                 ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum))
          FROM pg_catalog.pg_index i
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT i.indexrelid::regclass::text
          FROM pg_catalog.pg_index i
         WHERE i.indrelid = c.oid AND i.indisreplident),
       c.relrowsecurity,
       c.relforcerowsecurity
FROM pg_catalog.pg_publication_tables pt
JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
WHERE pt.pubname = $1
ORDER BY n.nspname, c.relname";

/// A published table as [`TABLES`] describes it.
struct Table {
    /// `schema.table`, quoted where needed.
    name: String,
    /// `pg_class.relreplident`: `d`efault, `n`othing, `f`ull, `i`ndex.
    identity: String,
    /// The primary key's columns, quoted, comma-separated.
    primary_key: Option<String>,
    /// The index named by `REPLICA IDENTITY USING INDEX`, if it still exists.
    identity_index: Option<String>,
    rls: bool,
    rls_forced: bool,
}

/// Appends the publication's findings.
pub(super) async fn check(
    client: &Client,
    publication: &str,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let row = client.query_one(PUBLICATION, &[&publication]).await?;
    let quoted: String = row.try_get(1)?;
    if !row.try_get::<_, bool>(0)? {
        out.push(
            Finding::error(
                id::PUBLICATION_EXISTS,
                format!("publication {quoted} does not exist in this database; walcast cannot stream"),
            )
            .fix(format!("walcast setup (or psql -f sql/publication.sql), or CREATE PUBLICATION {quoted}; then ALTER PUBLICATION {quoted} ADD TABLE ...")),
        );
        return Ok(());
    }
    let all_tables: bool = row.try_get(2)?;
    let actions: Vec<&str> = [
        ("INSERT", row.try_get::<_, bool>(3)?),
        ("UPDATE", row.try_get(4)?),
        ("DELETE", row.try_get(5)?),
        ("TRUNCATE", row.try_get(6)?),
    ]
    .into_iter()
    .filter_map(|(action, on)| on.then_some(action))
    .collect();
    let updates_or_deletes = actions.contains(&"UPDATE") || actions.contains(&"DELETE");
    out.push(Finding::ok(
        id::PUBLICATION_EXISTS,
        format!(
            "publication {quoted} exists{}, publishing {}",
            if all_tables { " (FOR ALL TABLES)" } else { "" },
            if actions.is_empty() {
                "nothing".to_owned()
            } else {
                actions.join(", ")
            }
        ),
    ));

    let mut tables = Vec::new();
    for row in client.query(TABLES, &[&publication]).await? {
        tables.push(Table {
            name: row.try_get(0)?,
            identity: row.try_get(1)?,
            primary_key: row.try_get(2)?,
            identity_index: row.try_get(3)?,
            rls: row.try_get(4)?,
            rls_forced: row.try_get(5)?,
        });
    }
    if tables.is_empty() {
        out.push(
            Finding::warning(
                id::PUBLICATION_TABLES,
                format!("publication {quoted} has no tables; nothing will be streamed"),
            )
            .fix(format!(
                "ALTER PUBLICATION {quoted} ADD TABLE schema.table;"
            )),
        );
        return Ok(());
    }
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    out.push(Finding::ok(
        id::PUBLICATION_TABLES,
        format!(
            "publication {quoted} has {} table{}: {}",
            tables.len(),
            if tables.len() == 1 { "" } else { "s" },
            names.join(", ")
        ),
    ));
    for table in &tables {
        out.push(replica_identity(table, updates_or_deletes).subject(&table.name));
        out.push(row_level_security(table).subject(&table.name));
    }
    Ok(())
}

fn replica_identity(table: &Table, updates_or_deletes: bool) -> Finding {
    let name = &table.name;
    let missing = match (
        table.identity.as_str(),
        &table.primary_key,
        &table.identity_index,
    ) {
        ("f", ..) => {
            return Finding::ok(
                id::TABLE_REPLICA_IDENTITY,
                format!(
                    "{name}: replica identity full; old_record carries every column (at the cost of bigger WAL)"
                ),
            );
        }
        ("d", Some(key), _) => {
            return Finding::ok(
                id::TABLE_REPLICA_IDENTITY,
                format!("{name}: primary key ({key}); old_record carries the key"),
            );
        }
        ("i", _, Some(index)) => {
            return Finding::ok(
                id::TABLE_REPLICA_IDENTITY,
                format!("{name}: replica identity index {index}; old_record carries its columns"),
            );
        }
        ("d", None, _) => "has no primary key and REPLICA IDENTITY DEFAULT",
        ("i", _, None) => "has REPLICA IDENTITY USING INDEX but the index is gone",
        _ => "has REPLICA IDENTITY NOTHING",
    };
    let fix = format!(
        "ALTER TABLE {name} REPLICA IDENTITY FULL; or add a primary key (ALTER TABLE {name} ADD PRIMARY KEY (column, ...);)"
    );
    if updates_or_deletes {
        Finding::error(
            id::TABLE_REPLICA_IDENTITY,
            format!(
                "{name} {missing}: PostgreSQL rejects UPDATE and DELETE on it while it is published"
            ),
        )
        .fix(fix)
    } else {
        Finding::info(
            id::TABLE_REPLICA_IDENTITY,
            format!(
                "{name} {missing}; fine while the publication publishes neither UPDATE nor DELETE"
            ),
        )
        .fix(fix)
    }
}

fn row_level_security(table: &Table) -> Finding {
    let name = &table.name;
    let message = match (table.rls, table.rls_forced) {
        (true, true) => format!("{name}: row level security enabled and forced"),
        (true, false) => format!("{name}: row level security enabled"),
        (false, _) => format!(
            "{name}: row level security disabled; every subscriber allowed to SELECT from it sees every row"
        ),
    };
    Finding::info(id::TABLE_RLS, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    fn table(identity: &str, primary_key: Option<&str>, identity_index: Option<&str>) -> Table {
        Table {
            name: "public.t".into(),
            identity: identity.into(),
            primary_key: primary_key.map(Into::into),
            identity_index: identity_index.map(Into::into),
            rls: false,
            rls_forced: false,
        }
    }

    #[test]
    fn a_table_without_identity_is_an_error_only_when_updates_or_deletes_are_published() {
        for t in [
            table("d", None, None),
            table("n", Some("id"), None),
            table("i", Some("id"), None),
        ] {
            assert_eq!(
                replica_identity(&t, true).level,
                Level::Error,
                "{}",
                t.identity
            );
            assert_eq!(
                replica_identity(&t, false).level,
                Level::Info,
                "{}",
                t.identity
            );
        }
        let finding = replica_identity(&table("d", None, None), true);
        assert_eq!(
            finding.message,
            "public.t has no primary key and REPLICA IDENTITY DEFAULT: PostgreSQL rejects UPDATE and DELETE on it while it is published"
        );
        assert_eq!(
            finding.fix.as_deref(),
            Some(
                "ALTER TABLE public.t REPLICA IDENTITY FULL; or add a primary key (ALTER TABLE public.t ADD PRIMARY KEY (column, ...);)"
            )
        );
    }

    #[test]
    fn a_key_full_identity_or_identity_index_is_ok() {
        for t in [
            table("d", Some("id"), None),
            table("f", None, None),
            table("i", None, Some("t_code_key")),
        ] {
            assert_eq!(
                replica_identity(&t, true).level,
                Level::Ok,
                "{}",
                t.identity
            );
        }
    }
}
