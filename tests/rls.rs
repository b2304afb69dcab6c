//! Batched RLS checks (`walcast::rls`) against a real Postgres: every answer
//! equals what a direct `SELECT` as the subscriber's role with its claims
//! sees; a raising policy fails its group only; no role or claims survive a
//! check on a pooled connection; hostile names and claims stay data.
//!
//! The pool logs in as `walcast` (LOGIN NOINHERIT, not a superuser, member
//! of `anon`, `authenticated` and `service_role`), as `sql/role.sql` makes
//! it; the oracle is a separate connection as `postgres`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_postgres::Client;
use walcast::config::DatabaseUrl;
use walcast::rls::{self, CheckOptions, Group, GroupOutcome, Rows, SortedKeys, TableRef};

use crate::support::TestPostgres;
use crate::support::postgres::quote_ident;
use crate::support::rng::Rng;

const OPTIONS: CheckOptions = within(Duration::from_secs(10));

/// A check without images: every row is looked up in the table as the
/// group's role (the fallback, and what a row the table still holds as
/// committed is decided by). `tests/rls_image.rs` checks the images.
async fn lookup(
    pool: &Pool,
    table: &TableRef<'_>,
    keys: &[Vec<Option<&str>>],
    groups: &[Group<'_>],
    options: &CheckOptions,
) -> Result<Vec<GroupOutcome>, rls::Error> {
    rls::check(pool, table, keys, None, groups, options)
        .await
        .map(|answer| answer.outcomes)
}

/// Check options with `timeout` and the default choice of sorted keys.
const fn within(timeout: Duration) -> CheckOptions {
    CheckOptions {
        timeout,
        sorted_keys: SortedKeys::Auto,
    }
}

/// Roles and the walcast function; run as `postgres`.
const ROLES: &str = r#"
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE outsider NOLOGIN;
CREATE ROLE walcast LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO walcast;
"#;

/// Three kinds of policy: owner = the claim's `sub`; team membership
/// through a subquery (with a two-column key); a public flag OR owner.
const SCHEMA: &str = r#"
CREATE TABLE members (team_id uuid NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (team_id, user_id));
GRANT SELECT ON members TO anon, authenticated;

CREATE TABLE owned (id bigint PRIMARY KEY, owner uuid NOT NULL, body text);
CREATE INDEX ON owned (owner);
ALTER TABLE owned ENABLE ROW LEVEL SECURITY;
CREATE POLICY owned_by_sub ON owned FOR SELECT TO authenticated
  USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid);
GRANT SELECT ON owned TO anon, authenticated, service_role;

CREATE TABLE team_docs (team_id uuid NOT NULL, doc_no integer NOT NULL, body text, PRIMARY KEY (team_id, doc_no));
ALTER TABLE team_docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY team_member ON team_docs FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM members m WHERE m.team_id = team_docs.team_id
                 AND m.user_id = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid));
GRANT SELECT ON team_docs TO anon, authenticated, service_role;

CREATE TABLE posts (id bigint PRIMARY KEY, owner uuid NOT NULL, public boolean NOT NULL);
ALTER TABLE posts ENABLE ROW LEVEL SECURITY;
CREATE POLICY public_posts ON posts FOR SELECT TO anon USING (public);
CREATE POLICY public_or_own ON posts FOR SELECT TO authenticated
  USING (public OR owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid);
GRANT SELECT ON posts TO anon, authenticated, service_role;
"#;

/// A cluster with the roles, `sql/rls.sql` and the schema in database
/// `db`; the admin client (as `postgres`) and a pool as `walcast`.
async fn setup(pg: &TestPostgres, db: &str, pool_size: usize) -> (Client, Pool) {
    pg.create_database(db).await;
    let admin = pg.client(db).await;
    admin.batch_execute(ROLES).await.expect("roles");
    admin
        .batch_execute("SET walcast.role = 'walcast'")
        .await
        .expect("walcast.role");
    admin
        .batch_execute(rls::INSTALL_SQL)
        .await
        .expect("sql/rls.sql");
    // Idempotent: a second run changes nothing and fails on nothing.
    admin
        .batch_execute(rls::INSTALL_SQL)
        .await
        .expect("sql/rls.sql again");
    admin.batch_execute(SCHEMA).await.expect("schema");
    let url = DatabaseUrl::parse(&pg.url("walcast", db)).expect("url");
    let pool = walcast::pool::build(&url, pool_size, None).expect("pool");
    (admin, pool)
}

/// Every key `role` with `claims` sees in `table`: a direct `SELECT`, with
/// `SET LOCAL ROLE` and `set_config`, on the admin connection. `Err` with
/// the server's message when the policy raises.
async fn oracle(
    admin: &mut Client,
    role: &str,
    claims: &Value,
    table: &str,
    key_sql: &str,
) -> Result<HashSet<Vec<String>>, String> {
    let tx = admin.transaction().await.expect("begin");
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
        .query(&format!("SELECT {key_sql} FROM {table}"), &[])
        .await
        .map(|rows| {
            rows.iter()
                .map(|row| (0..row.len()).map(|i| row.get::<_, String>(i)).collect())
                .collect()
        })
        .map_err(|e| {
            e.as_db_error()
                .map_or(e.to_string(), |db| db.message().to_owned())
        });
    tx.rollback().await.expect("rollback");
    result
}

/// What a pooled connection looks like after a check: (current_user,
/// request.jwt.claims, role).
async fn session_state(pool: &Pool) -> (String, Option<String>, String) {
    let client = pool.get().await.expect("pool");
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('request.jwt.claims', true), current_setting('role')",
            &[],
        )
        .await
        .expect("state");
    (row.get(0), row.get(1), row.get(2))
}

fn assert_clean(state: (String, Option<String>, String)) {
    assert_eq!(state.0, "walcast", "back to the login role");
    assert!(
        state.1.as_deref().unwrap_or("").is_empty(),
        "claims left behind: {:?}",
        state.1
    );
    assert_eq!(state.2, "none", "a role left set");
}

/// One table of the differential test.
struct Subject {
    table: &'static str,
    key_columns: &'static [&'static str],
    key_sql: &'static str,
}

const SUBJECTS: [Subject; 3] = [
    Subject {
        table: "owned",
        key_columns: &["id"],
        key_sql: "id::text",
    },
    Subject {
        table: "team_docs",
        key_columns: &["team_id", "doc_no"],
        key_sql: "team_id::text, doc_no::text",
    },
    Subject {
        table: "posts",
        key_columns: &["id"],
        key_sql: "id::text",
    },
];

/// Random inserts, updates (key changes included) and deletes on every
/// table, and membership changes.
async fn mutate(admin: &Client, rng: &mut Rng, users: &[String], teams: &[String]) {
    for _ in 0..60 {
        let id = (1 + rng.below(300)) as i64;
        let owner = rng.pick(users).as_str();
        match rng.below(3) {
            0 => admin
                .execute(
                    "INSERT INTO owned VALUES ($1, $2::text::uuid, 'x') \
                     ON CONFLICT (id) DO UPDATE SET owner = excluded.owner",
                    &[&id, &owner],
                )
                .await
                .map(drop),
            1 => admin
                .execute(
                    "UPDATE owned SET owner = $2::text::uuid WHERE id = $1",
                    &[&id, &owner],
                )
                .await
                .map(drop),
            _ => admin
                .execute("DELETE FROM owned WHERE id = $1", &[&id])
                .await
                .map(drop),
        }
        .expect("owned");

        let public = rng.chance(30);
        match rng.below(3) {
            0 => admin
                .execute(
                    "INSERT INTO posts VALUES ($1, $2::text::uuid, $3) \
                     ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, public = excluded.public",
                    &[&id, &owner, &public],
                )
                .await
                .map(drop),
            1 => admin
                .execute("UPDATE posts SET public = $2 WHERE id = $1", &[&id, &public])
                .await
                .map(drop),
            _ => admin
                .execute("DELETE FROM posts WHERE id = $1", &[&id])
                .await
                .map(drop),
        }
        .expect("posts");

        let team = rng.pick(teams).as_str();
        let doc = (1 + rng.below(60)) as i32;
        match rng.below(3) {
            0 => admin
                .execute(
                    "INSERT INTO team_docs VALUES ($1::text::uuid, $2, 'x') ON CONFLICT DO NOTHING",
                    &[&team, &doc],
                )
                .await
                .map(drop),
            1 => {
                // Moves a document to another team: its key changes.
                let to = rng.pick(teams).as_str();
                admin
                    .execute(
                        "UPDATE team_docs SET team_id = $3::text::uuid \
                         WHERE team_id = $1::text::uuid AND doc_no = $2 \
                         AND NOT EXISTS (SELECT 1 FROM team_docs WHERE team_id = $3::text::uuid AND doc_no = $2)",
                        &[&team, &doc, &to],
                    )
                    .await
                    .map(drop)
            }
            _ => admin
                .execute(
                    "DELETE FROM team_docs WHERE team_id = $1::text::uuid AND doc_no = $2",
                    &[&team, &doc],
                )
                .await
                .map(drop),
        }
        .expect("team_docs");
    }
    for _ in 0..5 {
        let (team, user) = (rng.pick(teams).as_str(), rng.pick(users).as_str());
        let sql = if rng.chance(50) {
            "INSERT INTO members VALUES ($1::text::uuid, $2::text::uuid) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM members WHERE team_id = $1::text::uuid AND user_id = $2::text::uuid"
        };
        admin.execute(sql, &[&team, &user]).await.expect("members");
    }
}

/// Random candidate keys of `subject`: existing, deleted and never-seen
/// keys alike.
fn candidates(rng: &mut Rng, subject: &Subject, teams: &[String]) -> Vec<Vec<String>> {
    let n = 1 + rng.below(80);
    (0..n)
        .map(|_| {
            if subject.key_columns.len() == 2 {
                vec![rng.pick(teams).clone(), (1 + rng.below(60)).to_string()]
            } else {
                vec![(1 + rng.below(320)).to_string()]
            }
        })
        .collect()
}

/// Random subscriber groups: authenticated users, users without `sub`,
/// anon, and a role that bypasses RLS; claims are distinct per group.
fn subscribers(rng: &mut Rng, users: &[String]) -> Vec<(&'static str, Value)> {
    (0..14)
        .map(|session| match rng.below(10) {
            0 => ("anon", json!({"role": "anon", "session": session})),
            1 => (
                "service_role",
                json!({"role": "service_role", "session": session}),
            ),
            2 => (
                "authenticated",
                json!({"role": "authenticated", "session": session}),
            ),
            _ => (
                "authenticated",
                json!({"sub": rng.pick(users), "role": "authenticated", "session": session}),
            ),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_checks_equal_a_direct_select_as_the_subscriber() {
    let pg = TestPostgres::start();
    let (mut admin, pool) = setup(&pg, "rls_diff", 2).await;
    let mut rng = Rng::from_env("WALCAST_RLS_SEED");
    let users: Vec<String> = (0..12)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    let teams: Vec<String> = (0..4)
        .map(|i| format!("10000000-0000-4000-8000-{i:012}"))
        .collect();

    let (mut pairs, mut visible, mut failed_groups) = (0usize, 0usize, 0usize);
    let (mut leaks, mut misses) = (Vec::new(), Vec::new());
    for round in 0..12 {
        mutate(&admin, &mut rng, &users, &teams).await;
        for subject in &SUBJECTS {
            let subs = subscribers(&mut rng, &users);
            let keys: Vec<Vec<Vec<String>>> = subs
                .iter()
                .map(|_| candidates(&mut rng, subject, &teams))
                .collect();
            // The keys of every group go once. Some groups are candidates
            // for all of them (unfiltered subscribers), the others for
            // their own: every fourth group with sorted keys off, then
            // forced on; all but every fourth with the planner choosing
            // (enough unfiltered groups for a search to be considered).
            let flat: Vec<Vec<Option<&str>>> = keys
                .iter()
                .flatten()
                .map(|k| k.iter().map(|v| Some(v.as_str())).collect())
                .collect();
            let mut start = 0u32;
            let groups: Vec<Group<'_>> = subs
                .iter()
                .zip(&keys)
                .enumerate()
                .map(|(g, ((role, claims), own))| {
                    let end = start + own.len() as u32;
                    let unfiltered = match round % 3 {
                        2 => g % 4 != 0,
                        _ => g % 4 == 3,
                    };
                    let rows = if unfiltered {
                        Rows::All
                    } else {
                        Rows::Only((start..end).collect())
                    };
                    start = end;
                    Group { role, claims, rows }
                })
                .collect();
            let table = TableRef {
                schema: "public",
                name: subject.table,
                key_columns: subject.key_columns,
            };
            let options = CheckOptions {
                sorted_keys: [SortedKeys::Off, SortedKeys::On, SortedKeys::Auto][round % 3],
                ..OPTIONS
            };
            let outcomes = lookup(&pool, &table, &flat, &groups, &options)
                .await
                .unwrap_or_else(|e| panic!("round {round}, {}: {e}", subject.table));
            assert_eq!(outcomes.len(), groups.len());
            let all_keys: Vec<Vec<String>> = keys.iter().flatten().cloned().collect();
            for (((role, claims), group), outcome) in subs.iter().zip(&groups).zip(&outcomes) {
                let keys: Vec<&Vec<String>> = match &group.rows {
                    Rows::All => all_keys.iter().collect(),
                    Rows::Only(rows) => rows.iter().map(|&r| &all_keys[r as usize]).collect(),
                };
                let expected =
                    oracle(&mut admin, role, claims, subject.table, subject.key_sql).await;
                let seen = match (outcome, expected) {
                    (GroupOutcome::Visible(flags), Ok(seen)) => {
                        assert_eq!(flags.len(), keys.len());
                        seen
                    }
                    (GroupOutcome::Failed { message, .. }, Err(oracle_message)) => {
                        assert_eq!(*message, oracle_message);
                        failed_groups += 1;
                        continue;
                    }
                    (outcome, expected) => panic!(
                        "{} as {role} {claims}: check gave {outcome:?}, direct SELECT {expected:?}",
                        subject.table
                    ),
                };
                for (i, key) in keys.iter().enumerate() {
                    pairs += 1;
                    let ours = outcome.is_visible(i);
                    let theirs = seen.contains(*key);
                    visible += usize::from(ours);
                    let what = format!("{}{key:?} as {role} {claims}", subject.table);
                    match (ours, theirs) {
                        (true, false) => leaks.push(what),
                        (false, true) => misses.push(what),
                        _ => {}
                    }
                }
            }
        }
    }
    println!(
        "rls differential: {pairs} (subscriber, row) pairs, {visible} visible, {} hidden, \
         {failed_groups} failed groups, {} leaks, {} misses",
        pairs - visible,
        leaks.len(),
        misses.len()
    );
    assert!(pairs >= 10_000, "only {pairs} pairs");
    assert!(
        visible > pairs / 20 && visible < pairs * 19 / 20,
        "too one-sided: {visible} of {pairs}"
    );
    assert!(
        leaks.is_empty(),
        "{} leaks, e.g. {:?}",
        leaks.len(),
        &leaks[..leaks.len().min(5)]
    );
    assert!(
        misses.is_empty(),
        "{} misses, e.g. {:?}",
        misses.len(),
        &misses[..misses.len().min(5)]
    );
    assert_clean(session_state(&pool).await);
}

/// One key type of the sorted-keys test: the column type, the stored keys,
/// and candidates spelt otherwise or absent.
struct KeyType {
    sql: &'static str,
    stored: &'static [&'static str],
    other_candidates: &'static [&'static str],
}

const KEY_TYPES: [KeyType; 17] = [
    KeyType {
        sql: "smallint",
        stored: &["-32768", "-1", "0", "1", "2", "3", "7", "32767"],
        other_candidates: &["4", "-2"],
    },
    KeyType {
        sql: "integer",
        stored: &["-2147483648", "0", "1", "2", "3", "10", "11", "2147483647"],
        other_candidates: &["12", "2147483646"],
    },
    KeyType {
        sql: "bigint",
        stored: &[
            "-9223372036854775808",
            "1",
            "2",
            "3",
            "5",
            "9223372036854775807",
        ],
        other_candidates: &["4", "9223372036854775806"],
    },
    KeyType {
        sql: "numeric",
        stored: &["1.5", "2", "-0.001", "1e20", "3.14159"],
        other_candidates: &["1.500", "2.0000", "1.51", "NaN"],
    },
    KeyType {
        sql: "double precision",
        stored: &["0", "NaN", "-Infinity", "1e-300", "2.5"],
        other_candidates: &["-0", "nan", "2.50", "1e-301"],
    },
    KeyType {
        sql: "positive_id",
        stored: &["1", "2", "9223372036854775807"],
        other_candidates: &["3", "02"],
    },
    KeyType {
        sql: "name",
        stored: &["abc", "ABC", "b"],
        other_candidates: &["Abc", "bb"],
    },
    KeyType {
        sql: "date",
        stored: &[
            "2024-02-29",
            "1999-12-31",
            "infinity",
            "-infinity",
            "2000-01-01",
        ],
        other_candidates: &["2024-03-01", "1999-12-31 BC"],
    },
    KeyType {
        sql: "timestamp",
        stored: &[
            "2024-02-29 12:00:00",
            "2024-02-29 12:00:00.000001",
            "infinity",
            "1970-01-01 00:00:00",
        ],
        other_candidates: &["2024-02-29T12:00:00.000000", "2024-02-29 12:00:01"],
    },
    KeyType {
        sql: "timestamptz",
        stored: &[
            "2024-02-29 12:00:00+00",
            "2024-02-29 12:00:00.5+00",
            "-infinity",
        ],
        other_candidates: &["2024-02-29 14:00:00+02", "2024-02-29 12:00:00+01"],
    },
    KeyType {
        sql: "uuid",
        stored: &[
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "0e5a4c3b-1d2f-4a5b-8c6d-7e8f9a0b1c2d",
        ],
        other_candidates: &[
            "0E5A4C3B-1D2F-4A5B-8C6D-7E8F9A0B1C2D",
            "0e5a4c3b-1d2f-4a5b-8c6d-7e8f9a0b1c2e",
        ],
    },
    KeyType {
        sql: "text",
        stored: &["a", "A", "a ", "", "ä", "a\u{301}", "zz", "b"],
        other_candidates: &["á", "aa", "B"],
    },
    KeyType {
        sql: "varchar(8)",
        stored: &["a", "A", "a ", "ä", "b", "c"],
        other_candidates: &["á", "C"],
    },
    // Fixed width, but not a multiple of its alignment (width_bucket would
    // step through the array at the wrong places): always probed.
    KeyType {
        sql: "time with time zone",
        stored: &["01:00+00", "02:00+00", "03:00+00", "04:00+00", "05:00+02"],
        other_candidates: &["03:00:00+00", "03:00+01", "06:00+00"],
    },
    KeyType {
        sql: "macaddr",
        stored: &[
            "08:00:2b:01:02:01",
            "08:00:2b:01:02:02",
            "08:00:2b:01:02:03",
            "08:00:2b:01:02:04",
        ],
        other_candidates: &["08-00-2B-01-02-03", "08:00:2b:01:02:05"],
    },
    // Variable width (text, varchar, numeric, bytea): always probed. A
    // nondeterministic collation ('abc' = 'ABC') among them.
    KeyType {
        sql: "text COLLATE case_insensitive",
        stored: &["ABC", "b", "Straße"],
        other_candidates: &["abc", "B", "strasse", "x"],
    },
    KeyType {
        sql: "bytea",
        stored: &["\\x00", "\\xff", "\\x"],
        other_candidates: &["\\x0000"],
    },
];

/// Sorted keys (sql/rls.sql, "Many groups") give what a direct SELECT gives,
/// for every key type that has them (and those that do not), with keys
/// spelt otherwise than stored, duplicates and absent keys, off, forced on
/// and chosen by the planner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_keys_answer_as_a_direct_select_for_every_key_type() {
    let pg = TestPostgres::start();
    let (mut admin, pool) = setup(&pg, "rls_sorted_keys", 1).await;
    let users: Vec<String> = (0..9)
        .map(|i| format!("20000000-0000-4000-8000-{i:012}"))
        .collect();
    let mut claims: Vec<Value> = users.iter().map(|u| json!({"sub": u})).collect();
    claims.push(json!({"role": "anon"}));
    admin
        .batch_execute(
            "CREATE COLLATION case_insensitive \
               (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE DOMAIN positive_id AS bigint CHECK (VALUE > 0);",
        )
        .await
        .expect("collation");
    let (mut pairs, mut seen_visible) = (0usize, 0usize);
    for (t, key) in KEY_TYPES.iter().enumerate() {
        let table = format!("keyed_{t}");
        admin
            .batch_execute(&format!(
                "CREATE TABLE {table} (id {ty} PRIMARY KEY, owner uuid NOT NULL);
                 CREATE INDEX ON {table} (owner);
                 ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY own ON {table} FOR SELECT TO authenticated
                   USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid);
                 GRANT SELECT ON {table} TO anon, authenticated;",
                ty = key.sql
            ))
            .await
            .expect("table");
        for (i, stored) in key.stored.iter().enumerate() {
            admin
                .execute(
                    &format!(
                        "INSERT INTO {table} VALUES ($1::text::{}, $2::text::uuid)",
                        key.sql
                    ),
                    &[stored, &users[i % 3]],
                )
                .await
                .expect("row");
        }
        // Every stored key twice, then the other spellings and absent keys.
        let candidates: Vec<&str> = key
            .stored
            .iter()
            .chain(key.stored)
            .chain(key.other_candidates)
            .copied()
            .collect();
        let keys: Vec<Vec<Option<&str>>> = candidates.iter().map(|k| vec![Some(*k)]).collect();
        let mut groups: Vec<Group<'_>> = claims
            .iter()
            .map(|c| Group {
                role: if c.get("sub").is_some() {
                    "authenticated"
                } else {
                    "anon"
                },
                claims: c,
                rows: Rows::All,
            })
            .collect();
        groups.push(Group {
            role: "authenticated",
            claims: &claims[0],
            rows: Rows::Only(vec![0, 3, candidates.len() as u32 - 1]),
        });
        let table_ref = TableRef {
            schema: "public",
            name: &table,
            key_columns: &["id"],
        };
        for mode in [SortedKeys::Off, SortedKeys::On, SortedKeys::Auto] {
            let options = CheckOptions {
                sorted_keys: mode,
                ..OPTIONS
            };
            let out = lookup(&pool, &table_ref, &keys, &groups, &options)
                .await
                .unwrap_or_else(|e| panic!("{} with sorted keys {mode:?}: {e}", key.sql));
            for (group, outcome) in groups.iter().zip(&out) {
                let visible = oracle(&mut admin, group.role, group.claims, &table, "id::text")
                    .await
                    .expect("oracle");
                let positions: Vec<usize> = match &group.rows {
                    Rows::All => (0..candidates.len()).collect(),
                    Rows::Only(rows) => rows.iter().map(|&r| r as usize).collect(),
                };
                // Which candidates equal a visible key, by the type's own
                // equality (1.500 = 1.5, 14:00+02 = 12:00+00).
                let visible: Vec<String> = visible.into_iter().flatten().collect();
                let asked: Vec<&str> = positions.iter().map(|&p| candidates[p]).collect();
                let equal: Vec<bool> = admin
                    .query_one(
                        &format!(
                            "SELECT array_agg(c.k::{ty} IN (SELECT v::{ty} FROM unnest($2::text[]) v) ORDER BY c.i) \
                             FROM unnest($1::text[]) WITH ORDINALITY AS c(k, i)",
                            ty = key.sql
                        ),
                        &[&asked, &visible],
                    )
                    .await
                    .expect("equal keys")
                    .get(0);
                let expected = equal;
                pairs += expected.len();
                seen_visible += expected.iter().filter(|v| **v).count();
                assert_eq!(
                    *outcome,
                    GroupOutcome::Visible(expected),
                    "{} as {} {} with sorted keys {mode:?}",
                    key.sql,
                    group.role,
                    group.claims
                );
            }
        }
        assert_clean(session_state(&pool).await);
    }
    println!(
        "key sorted_keys: {pairs} (group, candidate) pairs over {} key types, {seen_visible} visible",
        KEY_TYPES.len()
    );
    assert!(seen_visible > 0 && seen_visible < pairs);
}

/// The search reads every row a role can see, not only the
/// candidates: a policy that raises on a row that is no candidate must not
/// fail the group, which then gets its candidates' answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_raising_outside_the_candidates_does_not_fail_the_search() {
    let pg = TestPostgres::start();
    let (admin, pool) = setup(&pg, "rls_fragile", 1).await;
    let owner = "30000000-0000-4000-8000-000000000001";
    admin
        .batch_execute(&format!(
            "CREATE TABLE fragile (id bigint PRIMARY KEY, owner uuid NOT NULL);
             INSERT INTO fragile SELECT g, '{owner}' FROM generate_series(1, 20) g;
             INSERT INTO fragile VALUES (1000, '{owner}');
             ALTER TABLE fragile ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON fragile FOR SELECT TO authenticated
               USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid
                      AND 1 / (1000 - id) >= 0);
             GRANT SELECT ON fragile TO authenticated;"
        ))
        .await
        .expect("table");
    let claims: Vec<Value> = (0..9)
        .map(|s| json!({"sub": owner, "session": s}))
        .collect();
    let groups: Vec<Group<'_>> = claims
        .iter()
        .map(|claims| Group {
            role: "authenticated",
            claims,
            rows: Rows::All,
        })
        .collect();
    let keys = ids(&["1", "2", "21", "5"]);
    let table = TableRef {
        schema: "public",
        name: "fragile",
        key_columns: &["id"],
    };
    for mode in [SortedKeys::Off, SortedKeys::On, SortedKeys::Auto] {
        let out = lookup(
            &pool,
            &table,
            &keys,
            &groups,
            &CheckOptions {
                sorted_keys: mode,
                ..OPTIONS
            },
        )
        .await
        .expect("check");
        for outcome in &out {
            assert_eq!(
                *outcome,
                GroupOutcome::Visible(vec![true, true, false, true]),
                "sorted keys {mode:?}"
            );
        }
    }
    // The row itself, as a candidate, still fails its group.
    let out = lookup(&pool, &table, &ids(&["1", "1000"]), &groups, &OPTIONS)
        .await
        .expect("check");
    assert!(
        matches!(&out[0], GroupOutcome::Failed { code, .. } if code == "22012"),
        "{:?}",
        out[0]
    );
    assert_clean(session_state(&pool).await);
}

/// Users A and B each own rows 1..=3 and 4..=6 of `owned`.
async fn two_owners(admin: &Client) -> (String, String) {
    let (a, b) = (
        "00000000-0000-4000-8000-00000000000a".to_owned(),
        "00000000-0000-4000-8000-00000000000b".to_owned(),
    );
    admin
        .execute(
            "INSERT INTO owned SELECT g, CASE WHEN g <= 3 THEN $1::text::uuid ELSE $2::text::uuid END, 'x' \
             FROM generate_series(1, 6) g",
            &[&a, &b],
        )
        .await
        .expect("rows");
    (a, b)
}

fn ids(keys: &[&'static str]) -> Vec<Vec<Option<&'static str>>> {
    keys.iter().map(|k| vec![Some(*k)]).collect()
}

const OWNED: TableRef<'static> = TableRef {
    schema: "public",
    name: "owned",
    key_columns: &["id"],
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raising_policy_fails_its_group_only() {
    let pg = TestPostgres::start();
    let (admin, pool) = setup(&pg, "rls_isolation", 1).await;
    let (a, b) = two_owners(&admin).await;
    let claims_a = json!({"sub": a});
    let not_uuid = json!({"sub": "not-a-uuid"});
    let claims_b = json!({"sub": b});
    let injection = json!({"sub": "'; DROP TABLE owned; --"});
    let candidates = ["1", "2", "4", "5", "99"];
    let groups = [
        Group {
            role: "authenticated",
            claims: &claims_a,
            rows: Rows::All,
        },
        Group {
            role: "authenticated",
            claims: &not_uuid,
            rows: Rows::All,
        },
        Group {
            role: "authenticated",
            claims: &claims_b,
            rows: Rows::All,
        },
        Group {
            role: "authenticated",
            claims: &injection,
            rows: Rows::All,
        },
        Group {
            role: "service_role",
            claims: &not_uuid,
            rows: Rows::All,
        },
        Group {
            role: "anon",
            claims: &claims_a,
            rows: Rows::All,
        },
    ];
    let out = lookup(&pool, &OWNED, &ids(&candidates), &groups, &OPTIONS)
        .await
        .expect("check");
    let flags = |v: &[bool]| GroupOutcome::Visible(v.to_vec());
    assert_eq!(out[0], flags(&[true, true, false, false, false]));
    assert_eq!(out[2], flags(&[false, false, true, true, false]));
    for failed in [&out[1], &out[3]] {
        let GroupOutcome::Failed { code, message } = failed else {
            panic!("expected a failed group, got {failed:?}");
        };
        assert_eq!(code, "22P02");
        assert!(
            message.starts_with("invalid input syntax for type uuid"),
            "{message}"
        );
    }
    // service_role bypasses RLS: the policy (and its cast) never runs.
    assert_eq!(out[4], flags(&[true, true, true, true, false]));
    // anon has the privilege but no policy: nothing.
    assert_eq!(out[5], flags(&[false; 5]));
    let count: i64 = admin
        .query_one("SELECT count(*) FROM owned", &[])
        .await
        .expect("table still there")
        .get(0);
    assert_eq!(count, 6);
    assert_clean(session_state(&pool).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_roles_fail_their_group_and_execute_nothing() {
    let pg = TestPostgres::start();
    let (admin, pool) = setup(&pg, "rls_hostile", 1).await;
    let (a, _) = two_owners(&admin).await;
    let claims_a = json!({"sub": a});
    let quoted =
        json!({"sub": a, "note": "it's \"quoted\"; DROP TABLE owned; --", "role": "postgres"});
    let cases: [(&str, &str, &str); 7] = [
        ("nobody", "22023", "role \"nobody\" does not exist"),
        (
            "authenticated\"; DROP TABLE owned; --",
            "22023",
            "does not exist",
        ),
        ("x'); DROP TABLE owned; --", "22023", "does not exist"),
        // The login role is not a member: SET ROLE is refused.
        (
            "outsider",
            "42501",
            "permission denied to set role \"outsider\"",
        ),
        // Claims naming a superuser change nothing; the role itself is refused.
        (
            "postgres",
            "42501",
            "permission denied to set role \"postgres\"",
        ),
        // "none" and "" would mean "no role": the login role's own view.
        ("none", "22023", "is not a subscriber role"),
        ("", "22023", "does not exist"),
    ];
    let mut groups = vec![Group {
        role: "authenticated",
        claims: &quoted,
        rows: Rows::All,
    }];
    groups.extend(cases.iter().map(|(role, _, _)| Group {
        role,
        claims: &claims_a,
        rows: Rows::All,
    }));
    groups.push(Group {
        role: "authenticated",
        claims: &claims_a,
        rows: Rows::All,
    });
    let one_and_four = ids(&["1", "4"]);
    let out = lookup(&pool, &OWNED, &one_and_four, &groups, &OPTIONS)
        .await
        .expect("check");
    assert_eq!(
        out[0],
        GroupOutcome::Visible(vec![true, false]),
        "quotes in claims are data"
    );
    for ((role, code, message), outcome) in cases.iter().zip(&out[1..]) {
        match outcome {
            GroupOutcome::Failed {
                code: c,
                message: m,
            } => {
                assert_eq!(c, code, "{role:?}: {m}");
                assert!(m.contains(message), "{role:?}: {m}");
            }
            other => panic!("{role:?}: expected a failure, got {other:?}"),
        }
    }
    assert_eq!(
        *out.last().expect("last"),
        GroupOutcome::Visible(vec![true, false])
    );

    // Hostile table and column names are looked up, never spliced.
    let bad_table = TableRef {
        name: "owned\"; DROP TABLE owned; --",
        ..OWNED
    };
    let err = lookup(&pool, &bad_table, &one_and_four, &groups[..1], &OPTIONS)
        .await
        .expect_err("no such table");
    assert!(matches!(err, rls::Error::NoSuchTable { .. }), "{err}");
    assert!(!err.is_transient());
    let bad_column = TableRef {
        key_columns: &["id\" = id OR true; --"],
        ..OWNED
    };
    let err = lookup(&pool, &bad_column, &one_and_four, &groups[..1], &OPTIONS)
        .await
        .expect_err("no such column");
    assert!(matches!(err, rls::Error::NoSuchColumn(_)), "{err}");
    // Key values are data too: a value that is not a bigint is cast once
    // for the whole call, before any role is taken, and fails it whole.
    let bad_key = [Group {
        role: "authenticated",
        claims: &claims_a,
        rows: Rows::All,
    }];
    let err = lookup(&pool, &OWNED, &ids(&["1) OR (true"]), &bad_key, &OPTIONS)
        .await
        .expect_err("not a bigint");
    let code = match &err {
        rls::Error::Query(e) => e.as_db_error().map(|db| db.code().code().to_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some("22P02"), "{err}");
    assert!(!err.is_transient());

    let count: i64 = admin
        .query_one("SELECT count(*) FROM owned", &[])
        .await
        .expect("table still there")
        .get(0);
    assert_eq!(count, 6);
    assert_clean(session_state(&pool).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_or_claims_survive_a_check_on_the_pooled_connection() {
    let pg = TestPostgres::start();
    // One connection: every check and every probe shares it.
    let (admin, pool) = setup(&pg, "rls_leak", 1).await;
    let (a, _) = two_owners(&admin).await;
    let claims_a = json!({"sub": a});
    let bad = json!({"sub": "nope"});
    let groups = [
        Group {
            role: "authenticated",
            claims: &claims_a,
            rows: Rows::All,
        },
        Group {
            role: "authenticated",
            claims: &bad,
            rows: Rows::All,
        },
    ];

    // After a check whose last group succeeded, and one whose last failed.
    let one = ids(&["1"]);
    lookup(&pool, &OWNED, &one, &groups, &OPTIONS)
        .await
        .expect("check");
    assert_clean(session_state(&pool).await);
    lookup(&pool, &OWNED, &one, &groups[..1], &OPTIONS)
        .await
        .expect("check");
    assert_clean(session_state(&pool).await);

    // A policy slow enough to hit the statement timeout while the role and
    // claims are set: the whole call is denied, and the connection is clean.
    admin
        .batch_execute(
            "CREATE TABLE slow (id bigint PRIMARY KEY);
             INSERT INTO slow SELECT generate_series(1, 50);
             ALTER TABLE slow ENABLE ROW LEVEL SECURITY;
             CREATE POLICY sleepy ON slow FOR SELECT TO authenticated USING (pg_sleep(0.05) IS NOT NULL);
             GRANT SELECT ON slow TO authenticated;",
        )
        .await
        .expect("slow table");
    let slow = TableRef {
        name: "slow",
        ..OWNED
    };
    let many: Vec<&'static str> = vec!["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    let slow_groups = [Group {
        role: "authenticated",
        claims: &claims_a,
        rows: Rows::All,
    }];
    let started = Instant::now();
    let err = lookup(
        &pool,
        &slow,
        &ids(&many),
        &slow_groups,
        &within(Duration::from_millis(150)),
    )
    .await
    .expect_err("timeout");
    assert!(matches!(err, rls::Error::Timeout(_)), "{err}");
    assert!(err.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_clean(session_state(&pool).await);

    // A check dropped half-way (its caller gave up): the transaction is
    // rolled back and the pool's Clean recycling resets the session.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        lookup(
            &pool,
            &slow,
            &ids(&many),
            &slow_groups,
            &within(Duration::from_secs(5)),
        ),
    )
    .await;
    assert!(dropped.is_err(), "the check should still have been running");
    assert_clean(session_state(&pool).await);
    lookup(&pool, &OWNED, &one, &groups[..1], &OPTIONS)
        .await
        .expect("pool still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_function_is_a_definite_error() {
    let pg = TestPostgres::start();
    let (admin, pool) = setup(&pg, "rls_missing", 1).await;
    admin
        .batch_execute("DROP SCHEMA walcast CASCADE")
        .await
        .expect("drop");
    let claims = json!({});
    let groups = [Group {
        role: "anon",
        claims: &claims,
        rows: Rows::All,
    }];
    let err = lookup(&pool, &OWNED, &ids(&["1"]), &groups, &OPTIONS)
        .await
        .expect_err("missing");
    assert!(matches!(err, rls::Error::NotInstalled(_)), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("walcast setup"), "{err}");
}

/// One measured approach: seconds, and whether extrapolated from a sample.
fn cell(seconds: f64, extrapolated: bool) -> String {
    format!("{}{seconds:.3} s", if extrapolated { "~" } else { "" })
}

type Boxed<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The reference's client-side shape: one transaction per group
/// (`BEGIN`, role and claims, one `= ANY` lookup, `ROLLBACK`), every group
/// pipelined on one connection.
async fn pipelined_per_group(pool: &Pool, groups: &[(String, String, Vec<i64>)]) -> usize {
    let client = pool.get().await.expect("pool");
    let begin = client.prepare("BEGIN READ ONLY").await.expect("prepare");
    let set = client
        .prepare("SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)")
        .await
        .expect("prepare");
    let lookup = client
        .prepare("SELECT id FROM items WHERE id = ANY($1::bigint[])")
        .await
        .expect("prepare");
    let rollback = client.prepare("ROLLBACK").await.expect("prepare");
    let visible = std::sync::atomic::AtomicUsize::new(0);
    let mut futures: Vec<Boxed<'_>> = Vec::new();
    for (role, claims, ids) in groups {
        futures.push(Box::pin(async {
            client.execute(&begin, &[]).await.expect("begin");
        }));
        futures.push(Box::pin(async {
            client.execute(&set, &[role, claims]).await.expect("set");
        }));
        let visible = &visible;
        let lookup = &lookup;
        let client = &client;
        futures.push(Box::pin(async move {
            let rows = client.query(lookup, &[ids]).await.expect("lookup");
            visible.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        }));
        futures.push(Box::pin(async {
            client.execute(&rollback, &[]).await.expect("rollback");
        }));
    }
    futures_util::future::join_all(futures).await;
    visible.into_inner()
}

/// Supabase's shape: per change, per subscriber, role and claims then
/// `SELECT EXISTS (... WHERE pk = value)`; one pipelined transaction per
/// change. `pairs[c]` lists the (role, claims) of the subscribers change `c`
/// is checked for.
async fn naive_per_change(pool: &Pool, changes: &[(i64, Vec<(String, String)>)]) -> usize {
    let client = pool.get().await.expect("pool");
    let begin = client.prepare("BEGIN READ ONLY").await.expect("prepare");
    let set = client
        .prepare("SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)")
        .await
        .expect("prepare");
    let exists = client
        .prepare("SELECT EXISTS (SELECT 1 FROM items WHERE id = $1)")
        .await
        .expect("prepare");
    let rollback = client.prepare("ROLLBACK").await.expect("prepare");
    let mut visible = 0;
    for (id, subscribers) in changes {
        let mut futures: Vec<
            std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>,
        > = Vec::new();
        futures.push(Box::pin(async {
            client.execute(&begin, &[]).await.expect("begin") > 0
        }));
        for (role, claims) in subscribers {
            futures.push(Box::pin(async {
                client.execute(&set, &[role, claims]).await.expect("set");
                false
            }));
            futures.push(Box::pin(async {
                client
                    .query_one(&exists, &[id])
                    .await
                    .expect("exists")
                    .get::<_, bool>(0)
            }));
        }
        futures.push(Box::pin(async {
            client.execute(&rollback, &[]).await.expect("rollback");
            false
        }));
        let results = futures_util::future::join_all(futures).await;
        visible += results[1..results.len() - 1].iter().filter(|v| **v).count();
    }
    visible
}

/// Not a test: prints how long one batch of 1,000 changed rows takes to
/// check for 1, 10, 100 and 1,000 subscriber groups on a 100k-row table with
/// an `owner = claims.sub` policy, batched (one function call; two calls
/// over two connections), pipelined per group, and naive per change per
/// subscriber. `cargo test --release --test main rls::measure -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it by name"]
async fn measure_batched_rls_against_naive() {
    let pg = TestPostgres::start();
    let (admin, pool) = setup(&pg, "rls_measure", 4).await;
    admin
        .batch_execute(
            "CREATE TABLE users AS SELECT g AS n, gen_random_uuid() AS id FROM generate_series(0, 99) g;
             CREATE TABLE items (id bigint PRIMARY KEY, owner uuid NOT NULL, body text);
             INSERT INTO items SELECT g, (SELECT id FROM users WHERE n = g % 100), 'x' FROM generate_series(1, 100000) g;
             CREATE INDEX ON items (owner);
             ALTER TABLE items ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON items FOR SELECT TO authenticated
               USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid);
             GRANT SELECT ON items TO authenticated;",
        )
        .await
        .expect("data");
    admin
        .batch_execute("VACUUM ANALYZE items")
        .await
        .expect("vacuum");
    let users: Vec<String> = admin
        .query("SELECT id::text FROM users ORDER BY n", &[])
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut rng = Rng::seeded(0x5eed);
    // A batch: 1,000 changed rows. 1,000 subscribers: 10 sessions per user,
    // so each owns ~1% of the rows.
    let mut changed: Vec<i64> = Vec::new();
    while changed.len() < 1000 {
        let id = 1 + rng.below(100_000) as i64;
        if !changed.contains(&id) {
            changed.push(id);
        }
    }
    let owner_of = |id: i64| users[(id % 100) as usize].as_str();
    let changed_text: Vec<String> = changed.iter().map(i64::to_string).collect();
    let subscribers: Vec<(String, Value)> = (0..1000)
        .map(|s| {
            let sub = &users[s % 100];
            (
                "authenticated".to_owned(),
                json!({"sub": sub, "session": s}),
            )
        })
        .collect();
    let table = TableRef {
        schema: "public",
        name: "items",
        key_columns: &["id"],
    };
    let all_keys: Vec<Vec<Option<&str>>> = changed_text
        .iter()
        .map(|k| vec![Some(k.as_str())])
        .collect();
    let own_rows = |sub: &str| -> Vec<u32> {
        changed
            .iter()
            .enumerate()
            .filter(|(_, id)| owner_of(**id) == sub)
            .map(|(row, _)| row as u32)
            .collect()
    };
    let groups_for = |n: usize, filtered: bool| -> Vec<Group<'_>> {
        subscribers[..n]
            .iter()
            .map(|(role, claims)| Group {
                role,
                claims,
                rows: if filtered {
                    Rows::Only(own_rows(claims["sub"].as_str().expect("sub")))
                } else {
                    Rows::All
                },
            })
            .collect()
    };
    let long = &within(Duration::from_secs(120));
    // Warm up caches and the connections.
    lookup(&pool, &table, &all_keys, &groups_for(10, false), long)
        .await
        .expect("warm-up");

    println!();
    println!(
        "rls check of one batch of 1,000 changed rows (100k-row table, owner = claims.sub, 100 users x 10 sessions)"
    );
    println!(
        "| groups | candidates | batched: 1 call | batched: 2 calls, 2 connections | pipelined txn per group | naive per change per subscriber | visible |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for filtered in [false, true] {
        for n in [1usize, 10, 100, 1000] {
            let groups = groups_for(n, filtered);
            let candidates: usize = groups
                .iter()
                .map(|g| match &g.rows {
                    Rows::All => all_keys.len(),
                    Rows::Only(rows) => rows.len(),
                })
                .sum();

            let started = Instant::now();
            let outcomes = lookup(&pool, &table, &all_keys, &groups, long)
                .await
                .expect("check");
            let batched = started.elapsed().as_secs_f64();
            let visible: usize = outcomes
                .iter()
                .map(|o| match o {
                    GroupOutcome::Visible(flags) => flags.iter().filter(|v| **v).count(),
                    GroupOutcome::Failed { message, .. } => panic!("{message}"),
                })
                .sum();

            let split = if n >= 2 {
                let (left, right) = groups.split_at(n / 2);
                let started = Instant::now();
                let (a, b) = tokio::join!(
                    lookup(&pool, &table, &all_keys, left, long),
                    lookup(&pool, &table, &all_keys, right, long)
                );
                a.expect("left");
                b.expect("right");
                cell(started.elapsed().as_secs_f64(), false)
            } else {
                "-".to_owned()
            };

            let per_group: Vec<(String, String, Vec<i64>)> = groups
                .iter()
                .map(|g| {
                    let ids = match &g.rows {
                        Rows::All => changed.clone(),
                        Rows::Only(rows) => rows.iter().map(|&r| changed[r as usize]).collect(),
                    };
                    (g.role.to_owned(), g.claims.to_string(), ids)
                })
                .collect();
            let started = Instant::now();
            let pipelined_visible = pipelined_per_group(&pool, &per_group).await;
            let pipelined = started.elapsed().as_secs_f64();
            assert_eq!(pipelined_visible, visible, "pipelined disagrees");

            // Naive: per change, the subscribers it is a candidate for.
            let mut changes: Vec<(i64, Vec<(String, String)>)> =
                changed.iter().map(|id| (*id, Vec::new())).collect();
            for (role, claims, ids) in &per_group {
                for (change, id) in changes.iter_mut().zip(&changed) {
                    if !filtered || ids.contains(id) {
                        change.1.push((role.clone(), claims.clone()));
                    }
                }
            }
            // Sample at most ~20,000 pairs and scale up.
            let sample = (20_000 / n.max(1)).clamp(10, changes.len());
            let sample = if filtered { changes.len() } else { sample };
            let started = Instant::now();
            let naive_visible = naive_per_change(&pool, &changes[..sample]).await;
            let scale = changes.len() as f64 / sample as f64;
            let naive = cell(
                started.elapsed().as_secs_f64() * scale,
                sample < changes.len(),
            );
            if sample == changes.len() {
                assert_eq!(naive_visible, visible, "naive disagrees");
            }

            println!(
                "| {n}{} | {candidates} | {} | {split} | {} | {naive} | {visible} |",
                if filtered { " (filtered)" } else { "" },
                cell(batched, false),
                cell(pipelined, false),
            );
        }
    }
}
