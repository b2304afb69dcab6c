//! RLS decided on the committed row (`walcast.visible_rows` with images)
//! against Postgres itself. Each round takes the rows' images, then changes
//! some rows again and deletes others, as later transactions would before
//! the daemon checks; the oracle is a `SELECT` as the role in a transaction
//! that puts the rows back as the images have them (rolled back). Random
//! policy sets (permissive and restrictive,
//! `FOR SELECT`/`ALL` and commands that do not apply to a `SELECT`, `TO`
//! several roles, role membership, claims, a subquery on a second table, a
//! whole-row function, enums, arrays, jsonb, a nondeterministic collation,
//! NULLs), `FORCE ROW LEVEL
//! SECURITY`, the table's owner and a `BYPASSRLS` role; random rows and
//! groups. Rounds alternate between deciding every row on its image and
//! (sorted keys on) looking up the rows the table still holds as committed.
//! Every (group, row) decision must equal what that `SELECT` as the role
//! with those claims sees. A copy of the function that ignores restrictive
//! policies must be caught by the same comparison.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_postgres::Client;
use walcast::config::DatabaseUrl;
use walcast::rls::{self, CheckOptions, Group, GroupOutcome, Images, Rows, SortedKeys, TableRef};

use crate::support::TestPostgres;
use crate::support::postgres::quote_ident;
use crate::support::rng::Rng;

/// The cluster's roles: run once.
const ROLES_SQL: &str = r#"
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE editor NOLOGIN IN ROLE authenticated;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE docs_owner NOLOGIN;
CREATE ROLE walcast LOGIN NOINHERIT;
GRANT anon, authenticated, editor, service_role, docs_owner TO walcast;
"#;

/// Each database's schema.
const SETUP: &str = r#"
CREATE TYPE mood AS ENUM ('draft', 'live', 'archived');
CREATE COLLATION case_insensitive (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE members (team int NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (team, user_id));
CREATE TABLE docs (
  id int PRIMARY KEY, owner uuid, team int, tags text[], meta jsonb, status mood,
  title text, score numeric, flag boolean, label text COLLATE case_insensitive);
ALTER TABLE docs OWNER TO docs_owner;
GRANT SELECT ON docs, members TO anon, authenticated, editor, service_role;
CREATE FUNCTION auth_uid() RETURNS uuid LANGUAGE sql STABLE
  AS $$ SELECT nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'sub', '')::uuid $$;
CREATE FUNCTION presentable(d docs) RETURNS boolean LANGUAGE sql STABLE
  AS $$ SELECT d.title IS NOT NULL AND d.flag IS NOT FALSE $$;
CREATE PUBLICATION docs_pub FOR TABLE docs;
"#;

/// Policy expressions the rounds draw from (the table is `docs`).
const EXPRESSIONS: &[&str] = &[
    "owner = auth_uid()",
    "EXISTS (SELECT 1 FROM members m WHERE m.team = docs.team AND m.user_id = auth_uid())",
    "status <> 'archived'",
    "'public' = ANY (tags)",
    "coalesce((meta ->> 'level')::int, 0) <= coalesce((current_setting('request.jwt.claims', true)::jsonb ->> 'level')::int, 0)",
    "presentable(docs)",
    "score > 10",
    "flag",
    "title LIKE 'a%'",
    "current_setting('request.jwt.claims', true)::jsonb ->> 'role' = 'admin'",
    // Equal only in the column's (case-insensitive) collation.
    "label = 'Apple'",
];

const ROLES: &[&str] = &[
    "anon",
    "authenticated",
    "editor",
    "service_role",
    "docs_owner",
];
const POLICY_ROLES: &[&str] = &["PUBLIC", "authenticated", "anon", "editor", "anon, editor"];
const COMMANDS: &[&str] = &["SELECT", "ALL", "SELECT", "ALL", "UPDATE", "DELETE"];
const COLUMNS: &[&str] = &[
    "id", "owner", "team", "tags", "meta", "status", "title", "score", "flag", "label",
];

fn uuid(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A cluster's database with the schema and `sql/rls.sql` (`install`, the
/// real one or a broken copy), the admin client and a pool as `walcast`.
async fn setup(pg: &TestPostgres, db: &str, install: &str) -> (Client, Pool) {
    pg.create_database(db).await;
    let admin = pg.client(db).await;
    if db == "image" {
        admin.batch_execute(ROLES_SQL).await.expect("roles");
    }
    admin.batch_execute(SETUP).await.expect("schema");
    admin
        .batch_execute("SET walcast.role = 'walcast'")
        .await
        .expect("walcast.role");
    admin.batch_execute(install).await.expect("sql/rls.sql");
    let url = DatabaseUrl::parse(&pg.url("walcast", db)).expect("url");
    (admin, walcast::pool::build(&url, 2, None).expect("pool"))
}

/// A new random policy set, table flags, members and rows.
async fn shuffle(admin: &Client, rng: &mut Rng) {
    let mut sql = String::from(
        "DO $$ DECLARE p record; BEGIN FOR p IN SELECT polname FROM pg_policy WHERE polrelid = 'docs'::regclass LOOP EXECUTE format('DROP POLICY %I ON docs', p.polname); END LOOP; END $$;
         TRUNCATE docs, members;",
    );
    for i in 0..1 + rng.below(5) {
        let kind = if rng.chance(35) {
            "RESTRICTIVE"
        } else {
            "PERMISSIVE"
        };
        sql.push_str(&format!(
            "CREATE POLICY p{i} ON docs AS {kind} FOR {} TO {} USING ({});",
            rng.pick(COMMANDS),
            rng.pick(POLICY_ROLES),
            rng.pick(EXPRESSIONS)
        ));
    }
    sql.push_str(if rng.chance(80) {
        "ALTER TABLE docs ENABLE ROW LEVEL SECURITY;"
    } else {
        "ALTER TABLE docs DISABLE ROW LEVEL SECURITY;"
    });
    sql.push_str(if rng.chance(30) {
        "ALTER TABLE docs FORCE ROW LEVEL SECURITY;"
    } else {
        "ALTER TABLE docs NO FORCE ROW LEVEL SECURITY;"
    });
    for team in 0..4 {
        for user in 0..6 {
            if rng.chance(30) {
                sql.push_str(&format!(
                    "INSERT INTO members VALUES ({team}, '{}');",
                    uuid(user)
                ));
            }
        }
    }
    for id in 0..40 {
        let values = [
            format!("'{}'", uuid(rng.below(6))),
            rng.below(4).to_string(),
            (*rng.pick(&[
                "'{public}'",
                "'{internal}'",
                "'{public,x}'",
                "'{}'",
                "'{NULL}'",
            ]))
            .to_owned(),
            format!("'{{\"level\": {}}}'", rng.below(4)),
            format!("'{}'", rng.pick(&["draft", "live", "archived"])),
            format!("'{}'", rng.pick(&["apple", "banana", "avocado", ""])),
            format!("{}.{}", rng.below(20), rng.below(100)),
            (*rng.pick(&["true", "false"])).to_owned(),
            format!("'{}'", rng.pick(&["apple", "APPLE", "Apple", "banana"])),
        ]
        .map(|value| {
            if rng.chance(15) {
                "NULL".to_owned()
            } else {
                value
            }
        });
        let values = [vec![id.to_string()], values.to_vec()].concat();
        sql.push_str(&format!("INSERT INTO docs VALUES ({});", values.join(", ")));
    }
    admin.batch_execute(&sql).await.expect("shuffle");
}

/// The rows as pgoutput would send them: each column's text output.
async fn images(admin: &Client) -> Vec<Vec<Option<String>>> {
    let select = COLUMNS
        .iter()
        .map(|c| format!("{c}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    admin
        .query(&format!("SELECT {select} FROM docs ORDER BY id"), &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| (0..COLUMNS.len()).map(|i| row.get(i)).collect())
        .collect()
}

/// After the images were taken: some rows changed again (other values,
/// another owner), some deleted, as later transactions would before the
/// daemon checks. `docs_copy` keeps the rows as the images have them.
async fn change_again(admin: &Client, rng: &mut Rng) {
    let mut sql = String::from(
        "DROP TABLE IF EXISTS docs_copy; CREATE TABLE docs_copy AS SELECT * FROM docs;",
    );
    for id in 0..40 {
        if rng.chance(10) {
            sql.push_str(&format!("DELETE FROM docs WHERE id = {id};"));
        } else if rng.chance(30) {
            sql.push_str(&format!(
                "UPDATE docs SET owner = '{}', team = {}, status = '{}', flag = NOT coalesce(flag, false), tags = '{}' WHERE id = {id};",
                uuid(rng.below(6)),
                rng.below(4),
                rng.pick(&["draft", "live", "archived"]),
                rng.pick(&["{public}", "{internal}"])
            ));
        }
    }
    admin.batch_execute(&sql).await.expect("change again");
}

/// The ids `role` with `claims` sees by a direct `SELECT` of the table as
/// the images have it: in a transaction that puts those rows back (and is
/// rolled back), so rows changed or deleted since are judged as committed.
async fn oracle(admin: &mut Client, role: &str, claims: &Value) -> Result<HashSet<String>, String> {
    let tx = admin.transaction().await.expect("begin");
    tx.batch_execute("DELETE FROM docs; INSERT INTO docs SELECT * FROM docs_copy;")
        .await
        .expect("the rows as the images have them");
    tx.batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(role)))
        .await
        .expect("set role");
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&claims.to_string()],
    )
    .await
    .expect("claims");
    let result = tx
        .query("SELECT id::text FROM docs", &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .map_err(|e| e.to_string());
    tx.rollback().await.expect("rollback");
    result
}

/// (pairs, mismatches, decided by image) over `rounds` rounds.
async fn compare(
    admin: &mut Client,
    pool: &Pool,
    rng: &mut Rng,
    rounds: usize,
) -> (usize, Vec<String>, u64) {
    let (mut pairs, mut mismatches, mut by_image) = (0, Vec::new(), 0);
    let table = TableRef {
        schema: "public",
        name: "docs",
        key_columns: &["id"],
    };
    for round in 0..rounds {
        shuffle(admin, rng).await;
        let rows = images(admin).await;
        change_again(admin, rng).await;
        let image_rows: Vec<Vec<Option<&str>>> = rows
            .iter()
            .map(|r| r.iter().map(|v| v.as_deref()).collect())
            .collect();
        let keys: Vec<Vec<Option<&str>>> = image_rows.iter().map(|r| vec![r[0]]).collect();
        let images = Images {
            columns: COLUMNS,
            rows: &image_rows,
            unknown: &[],
        };
        let identities: Vec<(&str, Value)> = (0..25)
            .map(|_| {
                let mut claims = json!({"level": rng.below(4)});
                if rng.chance(85) {
                    claims["sub"] = json!(uuid(rng.below(6)));
                }
                if rng.chance(20) {
                    claims["role"] = json!("admin");
                }
                (*rng.pick(ROLES), claims)
            })
            .collect();
        let groups: Vec<Group<'_>> = identities
            .iter()
            .map(|(role, claims)| Group {
                role,
                claims,
                rows: if rng.chance(70) {
                    Rows::All
                } else {
                    Rows::Only((0..keys.len() as u32).filter(|_| rng.chance(50)).collect())
                },
            })
            .collect();
        let options = CheckOptions {
            timeout: Duration::from_secs(20),
            // Off: every row decided on its image. On (with 8 or more
            // unfiltered groups, most rounds): rows the table still holds
            // as committed are looked up, the others decided on images.
            sorted_keys: if round % 2 == 0 {
                SortedKeys::Off
            } else {
                SortedKeys::On
            },
        };
        let answer = rls::check(pool, &table, &keys, Some(&images), &groups, &options)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        by_image += answer.by_image;
        for (group, outcome) in groups.iter().zip(&answer.outcomes) {
            let seen = oracle(admin, group.role, group.claims).await;
            let candidates: Vec<usize> = match &group.rows {
                Rows::All => (0..keys.len()).collect(),
                Rows::Only(only) => only.iter().map(|&r| r as usize).collect(),
            };
            for (index, &row) in candidates.iter().enumerate() {
                pairs += 1;
                let id = keys[row][0].unwrap_or_default();
                let want = match &seen {
                    Ok(ids) => Some(ids.contains(id)),
                    Err(_) => None,
                };
                let got = match outcome {
                    GroupOutcome::Visible(_) => Some(outcome.is_visible(index)),
                    GroupOutcome::Failed { .. } => None,
                };
                if want != got {
                    mismatches.push(format!(
                        "round {round}: {} {} row {id}: select {want:?}, image {got:?} ({outcome:?}, {seen:?})",
                        group.role, group.claims
                    ));
                }
            }
        }
    }
    (pairs, mismatches, by_image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_on_the_image_decide_as_a_select_of_the_row() {
    let pg = TestPostgres::start();
    let (mut admin, pool) = setup(&pg, "image", rls::INSTALL_SQL).await;
    let mut rng = Rng::from_env("WALCAST_RLS_IMAGE_SEED");
    let (pairs, mismatches, by_image) = compare(&mut admin, &pool, &mut rng, 28).await;
    println!(
        "image differential: {pairs} (group, row) pairs, {by_image} decided by image, {} mismatches",
        mismatches.len()
    );
    assert!(pairs >= 20_000, "only {pairs} pairs");
    // Every pair of the rounds without sorted keys is decided on its image;
    // in the others, only those of rows changed again or deleted.
    assert!(
        by_image as usize > pairs / 3 && (by_image as usize) < pairs * 19 / 20,
        "{by_image} of {pairs} decided by image: both ways should be taken"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );

    // The same comparison catches an evaluator that ignores restrictive
    // policies, one that compares in the type's collation, and a table that
    // is taken to hold every row as committed.
    for (db, from, to, what) in [
        (
            "ignores_restrictive",
            "' AND ' || restrictive",
            "''",
            "ignoring restrictive policies",
        ),
        (
            "no_collation",
            "CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation",
            "CASE WHEN false",
            "comparing in the type's collation rather than the column's",
        ),
        (
            "all_unchanged",
            "'SELECT ARRAY(SELECT (SELECT %s FROM %s t WHERE %s) IS TRUE '",
            "'SELECT ARRAY(SELECT (SELECT %s FROM %s t WHERE %s) IS NOT FALSE OR true '",
            "looking up rows changed since",
        ),
    ] {
        let broken = rls::INSTALL_SQL.replace(from, to);
        assert_ne!(broken, rls::INSTALL_SQL, "{what}: the SQL moved");
        let (mut admin, pool) = setup(&pg, db, &broken).await;
        let mut rng = Rng::seeded(7);
        let (_, mismatches, _) = compare(&mut admin, &pool, &mut rng, 25).await;
        assert!(!mismatches.is_empty(), "{what} went unnoticed");
    }
}
