//! Differential test of private-channel authorization (issue 17): random
//! policies on `realtime.messages` × topics × claims. walcast's batched
//! answers (`walcast::channels::access`, `write` and `readable`: many
//! subjects per call, each in its own subtransaction) must equal what
//! Postgres answers to the same question asked alone, as Supabase asks it
//! (a probe row inserted as the owner and selected as the role; an insert
//! as the role; a select of a stored message as the role). No leak, no
//! miss.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::json;
use tokio_postgres::Client;
use walcast::channels::{self, Outcome, Read, Row, Subject};

use crate::support::rng::Rng;
use crate::support::stack::{DB, Stack};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Policy sets tried, and subjects per set: 25 × 420 = 10,500 pairs.
const POLICY_SETS: usize = 25;
const SUBJECTS: usize = 420;

/// The pieces policies are made of: what Supabase's examples and users
/// write (topic, claims, extension, the probe row's defaults).
const TERMS: &[&str] = &[
    "realtime.topic() = 'room:1'",
    "realtime.topic() = 'room:2'",
    "realtime.topic() LIKE 'room:%'",
    "realtime.topic() LIKE 'team:%'",
    "split_part(realtime.topic(), ':', 2) = current_setting('request.jwt.claims', true)::jsonb ->> 'room'",
    "current_setting('request.jwt.claims', true)::jsonb ->> 'sub' = 'u1'",
    "current_setting('request.jwt.claims', true)::jsonb ->> 'sub' IN ('u2', 'u3')",
    "current_setting('request.jwt.claim.sub', true) = 'u3'",
    "coalesce((current_setting('request.jwt.claims', true)::jsonb ->> 'admin')::boolean, false)",
    "realtime.messages.extension = 'broadcast'",
    "realtime.messages.extension = 'presence'",
    "realtime.messages.private IS TRUE",
    "realtime.messages.event IS NULL",
    "realtime.messages.payload IS NULL",
    "true",
    "false",
];
const TOPICS: &[&str] = &["room:1", "room:2", "room:3", "team:1", "team:2", "other"];
const SUBS: &[&str] = &["u1", "u2", "u3", "u4"];
const ROLES: &[&str] = &["authenticated", "anon"];

fn expression(rng: &mut Rng) -> String {
    let terms = 1 + rng.below(3);
    let mut parts = Vec::new();
    for _ in 0..terms {
        let term = *rng.pick(TERMS);
        parts.push(if rng.chance(15) {
            format!("NOT ({term})")
        } else {
            format!("({term})")
        });
    }
    let joiner = if rng.chance(50) { " AND " } else { " OR " };
    parts.join(joiner)
}

/// A random set of policies: 1 to 4, permissive or restrictive, FOR
/// SELECT, INSERT or ALL, to a role or PUBLIC.
fn policies(rng: &mut Rng) -> Vec<String> {
    let n = 1 + rng.below(4);
    (0..n)
        .map(|i| {
            let kind = if rng.chance(25) { "RESTRICTIVE" } else { "PERMISSIVE" };
            let to = *rng.pick(&["authenticated", "anon", "PUBLIC"]);
            let command = *rng.pick(&["SELECT", "INSERT", "ALL", "SELECT"]);
            let using = expression(rng);
            let check = expression(rng);
            match command {
                "SELECT" => format!(
                    "CREATE POLICY p{i} ON realtime.messages AS {kind} FOR SELECT TO {to} USING ({using})"
                ),
                "INSERT" => format!(
                    "CREATE POLICY p{i} ON realtime.messages AS {kind} FOR INSERT TO {to} WITH CHECK ({check})"
                ),
                _ => format!(
                    "CREATE POLICY p{i} ON realtime.messages AS {kind} FOR ALL TO {to} USING ({using}) WITH CHECK ({check})"
                ),
            }
        })
        .collect()
}

/// A subject: role, claims JSON, topic.
fn subject(rng: &mut Rng) -> (String, String, String) {
    let role = (*rng.pick(ROLES)).to_owned();
    let mut claims = json!({"role": role, "sub": *rng.pick(SUBS)});
    if rng.chance(30) {
        claims["admin"] = json!(rng.chance(50));
    }
    if rng.chance(40) {
        claims["room"] = json!(rng.below(4).to_string());
    }
    (role, claims.to_string(), (*rng.pick(TOPICS)).to_owned())
}

/// Postgres alone: Supabase's read probe for one subject.
async fn probe_read(
    client: &mut Client,
    s: &(String, String, String),
    presence: bool,
) -> Result<Read, String> {
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let asked = async {
        tx.execute(
            "INSERT INTO realtime.messages (id, topic, extension) VALUES \
             ('00000000-0000-0000-0000-00000000000b', $1, 'broadcast')",
            &[&s.2],
        )
        .await?;
        if presence {
            tx.execute(
                "INSERT INTO realtime.messages (id, topic, extension) VALUES \
                 ('00000000-0000-0000-0000-00000000000c', $1, 'presence')",
                &[&s.2],
            )
            .await?;
        }
        set_subject(&tx, s).await?;
        let seen: Vec<String> = tx
            .query(
                "SELECT extension FROM realtime.messages WHERE id IN \
                 ('00000000-0000-0000-0000-00000000000b', '00000000-0000-0000-0000-00000000000c')",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok::<_, tokio_postgres::Error>(Read {
            broadcast: seen.iter().any(|e| e == "broadcast"),
            presence: presence.then(|| seen.iter().any(|e| e == "presence")),
        })
    };
    let result = asked.await.map_err(|e| e.to_string());
    let _ = tx.rollback().await;
    result
}

/// Postgres alone: Supabase's write probe for one subject.
async fn probe_write(
    client: &mut Client,
    s: &(String, String, String),
    extension: &str,
) -> Result<bool, String> {
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let result = async {
        set_subject(&tx, s).await?;
        tx.execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES ($1, $2)",
            &[&s.2, &extension],
        )
        .await
    }
    .await;
    let _ = tx.rollback().await;
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Ok(false)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Postgres alone: which stored messages one subject sees.
async fn probe_readable(
    client: &mut Client,
    s: &(String, String, String),
    ids: &[String],
    topics: &[String],
) -> Result<Vec<u32>, String> {
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let result = async {
        set_subject(&tx, s).await?;
        let mut visible = Vec::new();
        for (i, (id, topic)) in ids.iter().zip(topics).enumerate() {
            if *topic != s.2 {
                continue;
            }
            let found = tx
                .query_opt(
                    "SELECT 1 FROM realtime.messages WHERE id = $1::text::uuid",
                    &[id],
                )
                .await?;
            if found.is_some() {
                visible.push(i as u32);
            }
        }
        Ok::<_, tokio_postgres::Error>(visible)
    }
    .await;
    let _ = tx.rollback().await;
    result.map_err(|e| e.to_string())
}

async fn set_subject(
    tx: &tokio_postgres::Transaction<'_>,
    s: &(String, String, String),
) -> Result<(), tokio_postgres::Error> {
    let sub = serde_json::from_str::<serde_json::Value>(&s.1)
        .ok()
        .and_then(|c| c["sub"].as_str().map(str::to_owned))
        .unwrap_or_default();
    tx.execute(
        "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
                set_config('request.jwt.claim.sub', $3, true), set_config('request.jwt.claim.role', $1, true), \
                set_config('realtime.topic', $4, true)",
        &[&s.0, &s.1, &sub, &s.2],
    )
    .await?;
    Ok(())
}

fn pool(stack: &Stack) -> Pool {
    walcast::pool::build(
        &walcast::config::DatabaseUrl::parse(&stack.pg.url("walcast", DB)).expect("url"),
        1,
        None,
    )
    .expect("pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_channel_authorization_equals_postgres_asked_alone() {
    let stack = Stack::start().await;
    crate::db_broadcast::setup(&stack);
    stack
        .client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("rls.sql");
    let pool = pool(&stack);
    // Alone, as the owner inserts and then as each subject: a client as
    // walcast (a member of supabase_realtime_admin and of the roles).
    let mut alone = crate::support::postgres::connect(&stack.pg.url("walcast", DB))
        .await
        .expect("walcast client");
    alone
        .batch_execute("SET ROLE supabase_realtime_admin")
        .await
        .expect("owner");
    let mut rng = Rng::from_env("WALCAST_PRIVATE_RLS_SEED");
    let (mut pairs, mut allowed, mut denied, mut failed) = (0usize, 0usize, 0usize, 0usize);
    for set in 0..POLICY_SETS {
        let policies = policies(&mut rng);
        let mut ddl = String::from(
            "DO $$ DECLARE p record; BEGIN FOR p IN SELECT policyname FROM pg_policies \
             WHERE schemaname = 'realtime' AND tablename = 'messages' LOOP \
             EXECUTE format('DROP POLICY %I ON realtime.messages', p.policyname); END LOOP; END $$;",
        );
        for p in &policies {
            ddl.push_str(p);
            ddl.push(';');
        }
        stack.client.batch_execute(&ddl).await.expect("policies");
        // Stored messages for readability, one per topic and privacy.
        stack
            .client
            .batch_execute(
                "TRUNCATE realtime.messages;
                 INSERT INTO realtime.messages (topic, extension, event, payload, private)
                 SELECT t, 'broadcast', 'e', '{}', p FROM unnest(ARRAY['room:1','room:2','room:3','team:1','team:2','other']) t,
                   unnest(ARRAY[true, false]) p;",
            )
            .await
            .expect("messages");
        let stored = stack
            .client
            .query(
                "SELECT id::text, topic, inserted_at::text FROM realtime.messages ORDER BY random()",
                &[],
            )
            .await
            .expect("stored");
        let ids: Vec<String> = stored.iter().map(|r| r.get(0)).collect();
        let topics: Vec<String> = stored.iter().map(|r| r.get(1)).collect();
        let inserted: Vec<String> = stored.iter().map(|r| r.get(2)).collect();

        let subjects: Vec<(String, String, String)> =
            (0..SUBJECTS).map(|_| subject(&mut rng)).collect();
        let presence: Vec<bool> = (0..SUBJECTS).map(|_| rng.chance(50)).collect();
        let extensions: Vec<&str> = (0..SUBJECTS)
            .map(|_| *rng.pick(&["broadcast", "presence"]))
            .collect();
        let asked: Vec<Subject<'_>> = subjects
            .iter()
            .map(|(role, claims, topic)| Subject {
                role,
                claims,
                topic,
            })
            .collect();
        let reads = channels::access(&pool, TIMEOUT, &asked, &presence)
            .await
            .expect("access");
        let writes = channels::write(&pool, TIMEOUT, &asked, &extensions)
            .await
            .expect("write");
        // In no order: walcast sorts them by topic itself.
        let rows: Vec<Row<'_>> = (0..ids.len())
            .map(|i| Row {
                id: &ids[i],
                inserted_at: &inserted[i],
                topic: &topics[i],
            })
            .collect();
        let readable = channels::readable(&pool, TIMEOUT, &rows, &asked)
            .await
            .expect("readable");
        assert_eq!(reads.len(), SUBJECTS);
        for (i, s) in subjects.iter().enumerate() {
            let context = || format!("policy set {set} {policies:#?}\nsubject {s:?}");
            let want = probe_read(&mut alone, s, presence[i]).await;
            match (&reads[i], &want) {
                (Outcome::Decided(got), Ok(want)) => {
                    assert_eq!(got, want, "read: {}", context());
                    if got.any() { allowed += 1 } else { denied += 1 }
                }
                (Outcome::Failed { .. }, Err(_)) => failed += 1,
                (got, want) => panic!("read: walcast {got:?}, alone {want:?}: {}", context()),
            }
            let want = probe_write(&mut alone, s, extensions[i]).await;
            match (&writes[i], &want) {
                (Outcome::Decided(got), Ok(want)) => {
                    assert_eq!(got, want, "write {}: {}", extensions[i], context())
                }
                (Outcome::Failed { .. }, Err(_)) => failed += 1,
                (got, want) => panic!("write: walcast {got:?}, alone {want:?}: {}", context()),
            }
            let want = probe_readable(&mut alone, s, &ids, &topics).await;
            match (&readable[i], &want) {
                (Outcome::Decided(got), Ok(want)) => {
                    let mut got = got.clone();
                    got.sort_unstable();
                    assert_eq!(&got, want, "readable: {}", context());
                }
                (Outcome::Failed { .. }, Err(_)) => failed += 1,
                (got, want) => panic!("readable: walcast {got:?}, alone {want:?}: {}", context()),
            }
            pairs += 1;
        }
        // Back to the owner for the next set's probes.
        alone
            .batch_execute("RESET ROLE; SET ROLE supabase_realtime_admin")
            .await
            .expect("owner");
    }
    println!(
        "{pairs} (policy set, subject) pairs: {allowed} may read, {denied} may not, {failed} answers were errors on both sides"
    );
    assert!(pairs >= 10_000, "{pairs}");
    // The policies must exercise both answers, or the test proves nothing.
    assert!(
        allowed > 1000 && denied > 1000,
        "allowed {allowed}, denied {denied}"
    );
}
