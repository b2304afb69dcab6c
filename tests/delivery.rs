//! The whole pipeline's delivery decision against Postgres itself: random
//! writes to three tables under three kinds of policy, many subscribers
//! (filtered and not, several sessions per user, anon and authenticated),
//! and for every (subscriber, change) pair walcast's decision — delivered
//! or not — must equal what a direct `SELECT` as that role with those
//! claims sees right after the commit. Zero leaks, zero misses.
//!
//! Each round is one transaction touching every row at most once, followed
//! by a marker row on an unsecured table: when the marker's event arrives,
//! every event of the round has (events of a tenant arrive in commit
//! order), and as nothing is written in between, the state the daemon
//! checked is the state the oracle reads.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::support::eventually;
use crate::support::rng::Rng;
use crate::support::stack::Stack;

const SETUP: &str = "
    CREATE ROLE anon NOLOGIN;
    CREATE ROLE authenticated NOLOGIN;
    CREATE TABLE members (team int, user_id text, PRIMARY KEY (team, user_id));
    CREATE TABLE owned (id int PRIMARY KEY, owner text NOT NULL, n int NOT NULL);
    CREATE TABLE team_docs (id int PRIMARY KEY, team int NOT NULL, n int NOT NULL);
    CREATE TABLE posts (id int PRIMARY KEY, owner text NOT NULL, public boolean NOT NULL, n int NOT NULL);
    CREATE TABLE markers (id int PRIMARY KEY);
    ALTER TABLE owned ENABLE ROW LEVEL SECURITY;
    ALTER TABLE team_docs ENABLE ROW LEVEL SECURITY;
    ALTER TABLE posts ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON owned FOR SELECT TO authenticated
      USING (owner = current_setting('request.jwt.claims', true)::jsonb->>'sub');
    CREATE POLICY team ON team_docs FOR SELECT TO authenticated
      USING (team IN (SELECT m.team FROM members m
                      WHERE m.user_id = current_setting('request.jwt.claims', true)::jsonb->>'sub'));
    CREATE POLICY public_posts ON posts FOR SELECT TO anon USING (public);
    CREATE POLICY public_or_own ON posts FOR SELECT TO authenticated
      USING (public OR owner = current_setting('request.jwt.claims', true)::jsonb->>'sub');
    GRANT SELECT ON owned, team_docs, posts, members, markers TO authenticated;
    GRANT SELECT ON posts, markers TO anon;
    ALTER PUBLICATION supabase_realtime ADD TABLE owned, team_docs, posts, markers;
";

const TABLES: [&str; 3] = ["owned", "team_docs", "posts"];
const USERS: [&str; 6] = ["u0", "u1", "u2", "u3", "u4", "u5"];
const TEAMS: i32 = 3;
/// Row ids per table: rows come and go within this range.
const IDS: i32 = 60;
const ROUNDS: usize = 40;
const CHANGES_PER_ROUND: usize = 30;

/// One subscription and what the oracle needs to know about it.
struct Sub {
    id: String,
    table: &'static str,
    role: &'static str,
    claims: Value,
    event: &'static str,
    filter: Option<Filter>,
}

/// The filters used here, each with its Supabase text and its SQL.
#[derive(Clone, Copy)]
enum Filter {
    /// `id=gt.N`: on the key, so it also decides DELETEs.
    IdAbove(i32),
    /// `n=lt.N`: not on the key, so a DELETE (key only) never passes.
    NBelow(i32),
    /// `owner=eq.u`: an indexed equality filter.
    Owner(&'static str),
}

impl Filter {
    fn supabase(self) -> String {
        match self {
            Filter::IdAbove(n) => format!("id=gt.{n}"),
            Filter::NBelow(n) => format!("n=lt.{n}"),
            Filter::Owner(u) => format!("owner=eq.{u}"),
        }
    }

    fn sql(self) -> String {
        match self {
            Filter::IdAbove(n) => format!("id > {n}"),
            Filter::NBelow(n) => format!("n < {n}"),
            Filter::Owner(u) => format!("owner = '{u}'"),
        }
    }

    /// Whether a DELETE of row `id` (identity: the key only) passes.
    fn passes_delete(self, id: i32) -> bool {
        match self {
            Filter::IdAbove(n) => id > n,
            Filter::NBelow(_) | Filter::Owner(_) => false,
        }
    }
}

impl Sub {
    fn wants(&self, kind: &str) -> bool {
        self.event == "*" || self.event == kind
    }

    fn registration(&self) -> Value {
        json!({
            "id": self.id, "topic": format!("realtime:{}", self.id), "schema": "public",
            "table": self.table, "event": self.event,
            "filter": self.filter.map(Filter::supabase), "select": null,
            "claims": self.claims, "role": self.role,
        })
    }
}

fn subscriptions(rng: &mut Rng) -> Vec<Sub> {
    let mut subs = Vec::new();
    for table in TABLES {
        for user in USERS {
            // Two sessions of the same user: same sub, different claims.
            for session in 0..2 {
                let filter = match rng.below(5) {
                    0 => Some(Filter::IdAbove(rng.below(IDS as usize) as i32)),
                    1 => Some(Filter::NBelow(rng.below(100) as i32)),
                    2 if table != "team_docs" => Some(Filter::Owner(USERS[rng.below(USERS.len())])),
                    _ => None,
                };
                let event = *rng.pick(&["*", "*", "*", "INSERT", "UPDATE", "DELETE"]);
                subs.push(Sub {
                    id: format!("{table}-{user}-{session}"),
                    table,
                    role: "authenticated",
                    claims: json!({"sub": user, "role": "authenticated", "session_id": format!("{user}-{session}")}),
                    event,
                    filter,
                });
            }
        }
    }
    for session in 0..2 {
        subs.push(Sub {
            id: format!("posts-anon-{session}"),
            table: "posts",
            role: "anon",
            claims: json!({"role": "anon", "session_id": format!("anon-{session}")}),
            event: "*",
            filter: (session == 1).then_some(Filter::NBelow(50)),
        });
    }
    subs
}

/// One change of a round: table, kind, row id.
type Change = (&'static str, &'static str, i32);

/// Writes one round in one transaction: every touched row at most once,
/// membership changes included. Returns the changes in order.
async fn write_round(client: &mut Client, rng: &mut Rng) -> Vec<Change> {
    let mut existing: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for table in TABLES {
        let rows = client
            .query(&format!("SELECT id FROM {table}"), &[])
            .await
            .expect("ids");
        existing.insert(table, rows.iter().map(|r| r.get(0)).collect());
    }
    let tx = client.transaction().await.expect("begin");
    for _ in 0..2 {
        if rng.chance(50) {
            let (team, user) = (1 + rng.below(TEAMS as usize) as i32, *rng.pick(&USERS));
            let sql = if rng.chance(50) {
                "INSERT INTO members VALUES ($1, $2) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM members WHERE team = $1 AND user_id = $2"
            };
            tx.execute(sql, &[&team, &user]).await.expect("members");
        }
    }
    let mut touched: Vec<(&'static str, i32)> = Vec::new();
    let mut changes = Vec::new();
    while changes.len() < CHANGES_PER_ROUND {
        let table = *rng.pick(&TABLES);
        let id = 1 + rng.below(IDS as usize) as i32;
        if touched.contains(&(table, id)) {
            continue;
        }
        touched.push((table, id));
        let owner = *rng.pick(&USERS);
        let n = rng.below(100) as i32;
        let team = 1 + rng.below(TEAMS as usize) as i32;
        let public = rng.chance(30);
        let exists = existing[table].contains(&id);
        let kind = if !exists {
            "INSERT"
        } else if rng.chance(30) {
            "DELETE"
        } else {
            "UPDATE"
        };
        match (table, kind) {
            (_, "DELETE") => {
                tx.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
                    .await
                    .expect("delete");
            }
            ("owned", "INSERT") => {
                tx.execute("INSERT INTO owned VALUES ($1, $2, $3)", &[&id, &owner, &n])
                    .await
                    .expect("insert");
            }
            ("owned", _) => {
                tx.execute(
                    "UPDATE owned SET owner = $2, n = $3 WHERE id = $1",
                    &[&id, &owner, &n],
                )
                .await
                .expect("update");
            }
            ("team_docs", "INSERT") => {
                tx.execute(
                    "INSERT INTO team_docs VALUES ($1, $2, $3)",
                    &[&id, &team, &n],
                )
                .await
                .expect("insert");
            }
            ("team_docs", _) => {
                tx.execute(
                    "UPDATE team_docs SET team = $2, n = $3 WHERE id = $1",
                    &[&id, &team, &n],
                )
                .await
                .expect("update");
            }
            (_, "INSERT") => {
                tx.execute(
                    "INSERT INTO posts VALUES ($1, $2, $3, $4)",
                    &[&id, &owner, &public, &n],
                )
                .await
                .expect("insert");
            }
            _ => {
                tx.execute(
                    "UPDATE posts SET owner = $2, public = $3, n = $4 WHERE id = $1",
                    &[&id, &owner, &public, &n],
                )
                .await
                .expect("update");
            }
        }
        changes.push((table, kind, id));
    }
    tx.commit().await.expect("commit");
    changes
}

/// The rows of `ids` in `table` that `sub`'s role, with its claims, sees
/// now and that pass its filter.
async fn oracle(client: &mut Client, sub: &Sub, ids: &[i32]) -> Vec<i32> {
    let filter = sub.filter.map_or("true".to_owned(), Filter::sql);
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
        &[&sub.role, &sub.claims.to_string()],
    )
    .await
    .expect("role and claims");
    let rows = tx
        .query(
            &format!(
                "SELECT id FROM {} WHERE id = ANY($1) AND ({filter})",
                sub.table
            ),
            &[&ids],
        )
        .await
        .expect("oracle select");
    tx.rollback().await.expect("rollback");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_exactly_what_a_direct_select_as_it_sees() {
    let (stack, daemon, mut gateway) = Stack::with_bus_gateway(SETUP).await;

    let mut rng = Rng::from_env("WALCAST_DELIVERY_SEED");
    let subs = subscriptions(&mut rng);
    for sub in &subs {
        gateway.subscribe(sub.registration()).await;
    }
    gateway
        .subscribe(json!({
            "id": "marker", "topic": "realtime:marker", "schema": "public", "table": "markers",
            "event": "INSERT", "filter": null, "select": null,
            "claims": {"role": "authenticated"}, "role": "authenticated",
        }))
        .await;
    for sub in &subs {
        let reply = gateway.reply(&sub.id, 0).await;
        assert_eq!(reply["type"], "subscribed", "{}: {reply}", sub.id);
    }
    assert_eq!(gateway.reply("marker", 0).await["type"], "subscribed");

    let mut client = stack.pg.client(crate::support::stack::DB).await;
    let (mut pairs, mut delivered) = (0usize, 0usize);
    let (mut leaks, mut misses) = (Vec::new(), Vec::new());
    let mut seen = 0usize;
    for round in 0..ROUNDS {
        let changes = write_round(&mut client, &mut rng).await;
        let marker = i32::try_from(round).expect("round");
        client
            .execute("INSERT INTO markers VALUES ($1)", &[&marker])
            .await
            .expect("marker");
        eventually(
            &format!("round {round}'s marker"),
            Duration::from_secs(60),
            || async {
                gateway.events().iter().any(|e| {
                    e["data"]["table"] == "markers" && e["data"]["record"]["id"] == json!(marker)
                })
            },
        )
        .await;
        let events = gateway.events();
        let round_events = &events[seen..];
        seen = events.len();
        assert!(
            round_events.iter().all(|e| e["data"]["errors"].is_null()),
            "round {round}: an event with errors: {round_events:?}"
        );
        // What arrived: (subscription, table, kind, id).
        let mut got: Vec<(String, String, String, i64)> = Vec::new();
        for e in round_events {
            let data = &e["data"];
            let table = data["table"].as_str().expect("table").to_owned();
            if table == "markers" {
                continue;
            }
            let kind = data["type"].as_str().expect("type").to_owned();
            let row = if kind == "DELETE" {
                &data["old_record"]
            } else {
                &data["record"]
            };
            let id = row["id"].as_i64().expect("id");
            for sub in e["ids"].as_array().expect("ids") {
                let sub = sub.as_str().expect("id").to_owned();
                got.push((sub, table.clone(), kind.clone(), id));
            }
        }
        // What Postgres says should have.
        let mut want = Vec::new();
        for sub in &subs {
            let upserted: Vec<i32> = changes
                .iter()
                .filter(|(t, k, _)| *t == sub.table && *k != "DELETE" && sub.wants(k))
                .map(|(_, _, id)| *id)
                .collect();
            let visible = if upserted.is_empty() {
                Vec::new()
            } else {
                oracle(&mut client, sub, &upserted).await
            };
            for &(table, kind, id) in &changes {
                if table != sub.table || !sub.wants(kind) {
                    continue;
                }
                pairs += 1;
                let passes = if kind == "DELETE" {
                    sub.filter.is_none_or(|f| f.passes_delete(id))
                } else {
                    visible.contains(&id)
                };
                if passes {
                    want.push((
                        sub.id.clone(),
                        table.to_owned(),
                        kind.to_owned(),
                        i64::from(id),
                    ));
                }
            }
        }
        got.sort();
        want.sort();
        let mut distinct = got.clone();
        distinct.dedup();
        assert_eq!(distinct, got, "round {round}: a pair delivered twice");
        delivered += want.len();
        for w in &want {
            if !got.contains(w) {
                misses.push(format!("round {round}: {w:?}"));
            }
        }
        for g in &got {
            if !want.contains(g) {
                leaks.push(format!("round {round}: {g:?}"));
            }
        }
    }
    println!(
        "delivery differential: {pairs} (subscriber, change) pairs, {delivered} delivered, {} leaks, {} misses",
        leaks.len(),
        misses.len()
    );
    assert!(pairs >= 10_000, "only {pairs} pairs");
    assert!(
        delivered > pairs / 20 && delivered < pairs * 19 / 20,
        "too one-sided: {delivered} of {pairs}"
    );
    assert!(
        leaks.is_empty() && misses.is_empty(),
        "{} leaks {:?}, {} misses {:?}\n{}",
        leaks.len(),
        &leaks[..leaks.len().min(5)],
        misses.len(),
        &misses[..misses.len().min(5)],
        daemon.log()
    );
}
