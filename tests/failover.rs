//! The hot standby (issue 18): two daemons on one slot, the active one
//! killed (SIGKILL) three times while changes are committed. Every change
//! reaches the firehose and every subscribed socket, and each socket sees
//! each change exactly once, though each daemon that takes over streams
//! again from the last position Postgres confirmed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::check::{check, finding};
use crate::gateway::{Client, valid};
use crate::support::stack::{DB, Firehose, Stack};
use crate::support::{Daemon, PgOptions, TestPostgres, TestRedis, eventually, tail};

/// Rows committed, in transactions of [`ROWS_PER_COMMIT`].
const ROWS: i64 = 100_000;
const ROWS_PER_COMMIT: i64 = 100;
/// The active daemon is killed when this many rows are committed.
const KILLS_AT: [i64; 3] = [20_000, 45_000, 70_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_daemon_three_times_loses_nothing_and_sends_nothing_twice() {
    let (stack, gateway) = crate::gateway::start().await;
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let mut active = stack.spawn_daemon();
    stack.wait_streaming("walcast", &active).await;
    let mut standby = stack.spawn_daemon();
    wait_standing_by(&standby).await;

    // Both protocol versions, each joined while both daemons run.
    let mut v2 = gateway.connect(Some("2.0.0")).await;
    let mut v1 = gateway.connect(Some("1.0.0")).await;
    let bindings = json!([{"event": "INSERT", "schema": "public", "table": "todos"}]);
    let config = json!({"broadcast": {"self": false, "ack": false}, "presence": {"key": ""},
        "postgres_changes": bindings, "private": false});
    let token = valid("anon");
    v2.send(
        &json!(["1", "1", "realtime:all", "phx_join", {"config": config, "access_token": token}])
            .to_string(),
    )
    .await;
    v1.send(
        &json!({"topic": "realtime:all", "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": config, "access_token": token}})
        .to_string(),
    )
    .await;
    for socket in [&mut v2, &mut v1] {
        let (event, payload) = frame(socket).await;
        assert_eq!(
            (event.as_str(), &payload["status"]),
            ("phx_reply", &json!("ok"))
        );
        let (event, payload) = frame(socket).await;
        assert_eq!(
            (event.as_str(), &payload["message"]),
            ("system", &json!("Subscribed to PostgreSQL")),
            "{payload}"
        );
    }

    let writer = {
        let client = stack.pg.client(DB).await;
        tokio::spawn(async move {
            for first in (0..ROWS).step_by(ROWS_PER_COMMIT as usize) {
                client
                    .batch_execute(&format!(
                        "INSERT INTO todos SELECT g, 't', 'u' FROM generate_series({first}, {}) g",
                        first + ROWS_PER_COMMIT - 1
                    ))
                    .await
                    .expect("insert");
                // Paced (≤ 3,300 rows/s): the test's sockets, debug-built
                // JSON parsers, must keep up or the gateway closes them.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    // Both sockets read all along, so that neither falls behind.
    let readers =
        [(v2, true), (v1, false)].map(|(socket, vsn2)| tokio::spawn(read_changes(socket, vsn2)));

    let mut takeovers = Vec::new();
    let mut retired: Vec<Daemon> = Vec::new();
    for at in KILLS_AT {
        eventually(
            &format!("{at} rows committed"),
            Duration::from_secs(120),
            || async { committed(&stack).await >= at },
        )
        .await;
        let before = active_pid(&stack).await.expect("an active walsender");
        active.kill();
        let killed = Instant::now();
        eventually(
            &format!(
                "the standby takes over\n--- standby ---\n{}",
                tail(&standby.log(), 30)
            ),
            Duration::from_secs(60),
            || async { active_pid(&stack).await.is_some_and(|pid| pid != before) },
        )
        .await;
        takeovers.push(killed.elapsed());
        // The standby streams now; a new one stands by behind it.
        retired.push(std::mem::replace(&mut active, standby));
        standby = stack.spawn_daemon();
        wait_standing_by(&standby).await;
    }
    writer.await.expect("writer");
    assert_eq!(committed(&stack).await, ROWS);

    for (reader, name) in readers.into_iter().zip(["vsn 2.0.0", "vsn 1.0.0"]) {
        let ids = reader.await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ids.len(), ROWS as usize, "{name}");
    }
    // The firehose carries everything, repeats included (its consumers
    // drop what they had by (lsn, seq)).
    eventually(
        "every row on the firehose",
        Duration::from_secs(60),
        || async { firehose_ids(&firehose).len() == ROWS as usize },
    )
    .await;
    assert!(active.log().contains("taking over"), "{}", active.log());
    println!(
        "{ROWS} rows in commits of {ROWS_PER_COMMIT}, 3 SIGKILLs: takeovers {takeovers:?}, {} firehose messages",
        firehose.len()
    );
    drop(retired);
}

/// The rows each socket received, each once: a second frame for a row
/// fails the test; ends when every row arrived and a heartbeat's reply is
/// the next frame after them.
async fn read_changes(mut socket: Client, vsn2: bool) -> HashSet<i64> {
    let mut ids = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while ids.len() < ROWS as usize {
        let (event, payload) = tokio::time::timeout_at(deadline, frame(&mut socket))
            .await
            .unwrap_or_else(|_| panic!("{} of {ROWS} rows arrived", ids.len()));
        assert_eq!(event, "postgres_changes", "{payload}");
        let id = payload["data"]["record"]["id"].as_i64().expect("id");
        assert!(ids.insert(id), "row {id} arrived twice");
    }
    // A daemon that took over sent its repeats on the gateway's channel
    // before any newer row, so they came before the last one: nothing
    // else is queued, the heartbeat's reply is the next frame.
    socket.sync(vsn2, "hb").await;
    ids
}

/// The next frame's event and payload, in either protocol version
/// (heartbeat replies included).
pub(crate) async fn frame(socket: &mut Client) -> (String, Value) {
    let frame = socket.recv().await;
    match frame {
        Value::Array(mut parts) if parts.len() == 5 => {
            let payload = parts.pop().unwrap_or_default();
            let event = parts.pop().unwrap_or_default();
            (event.as_str().unwrap_or_default().to_owned(), payload)
        }
        Value::Object(mut object) => {
            let payload = object.remove("payload").unwrap_or_default();
            let event = object.remove("event").unwrap_or_default();
            (event.as_str().unwrap_or_default().to_owned(), payload)
        }
        other => panic!("not a phoenix frame: {other}"),
    }
}

async fn wait_standing_by(daemon: &Daemon) {
    eventually(
        &format!("a daemon standing by\n{}", daemon.log()),
        Duration::from_secs(30),
        || async { daemon.log().contains("standing by") },
    )
    .await;
}

async fn committed(stack: &Stack) -> i64 {
    stack
        .client
        .query_one("SELECT count(*) FROM todos", &[])
        .await
        .expect("count")
        .get(0)
}

/// The pid of the walsender streaming the slot, if one does.
async fn active_pid(stack: &Stack) -> Option<i32> {
    stack
        .client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walcast' AND active",
            &[],
        )
        .await
        .expect("pg_replication_slots")
        .and_then(|row| row.get(0))
}

/// The distinct rows on the firehose.
fn firehose_ids(firehose: &Firehose) -> HashSet<i64> {
    firehose
        .raw()
        .iter()
        .filter_map(|m| serde_json::from_str::<Value>(m).ok())
        .filter_map(|m| m["data"]["record"]["id"].as_i64())
        .collect()
}

/// `slot_failover`: on PostgreSQL 17 and later the slot becomes a failover
/// slot, a standby with `sync_replication_slots` keeps a synchronized copy
/// and `walcast check` says so; before 17 the daemon and `walcast check`
/// say that a database failover loses the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_is_kept_by_a_standby_from_postgres_17() {
    let mut pg = TestPostgres::start_with(PgOptions {
        extra_conf: vec!["wal_sender_timeout = '5s'".into()],
        ..PgOptions::default()
    });
    let client = pg.setup_test_db(DB).await;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .expect("version")
        .get(0);
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); ALTER PUBLICATION supabase_realtime ADD TABLE t;",
        )
        .await
        .expect("setup");
    drop(client);
    if version < 170000 {
        let stack = Stack {
            client: pg.client(DB).await,
            pg,
            redis: TestRedis::start(),
        };
        let mut env = stack.env();
        env.push(("WALCAST_SLOT_FAILOVER", "true".into()));
        let daemon = Daemon::spawn(&["run"], &env);
        stack.wait_streaming("walcast", &daemon).await;
        eventually(
            "the daemon says the slot cannot fail over",
            Duration::from_secs(10),
            || async {
                daemon
                    .log()
                    .contains("slot_failover needs PostgreSQL 17 or later")
            },
        )
        .await;
        let (code, json) = check(&env);
        assert_eq!(code, Some(0), "{json:#}");
        let found = finding(&json, "slot.failover", None);
        assert_eq!(found["level"], "warning", "{found:#}");
        assert_eq!(
            found["message"],
            format!(
                "slot_failover is set, but PostgreSQL {} has no failover slots: a database failover loses replication slot walcast; walcast creates it again on the new primary, from where that server is, and what was committed in between is not streamed (README, \"Database failover\")",
                version / 10000
            )
        );
        return;
    }
    // The standby first: it is a copy of the stopped primary.
    let standby = pg
        .start_standby(
            "walcast_standby",
            DB,
            &["sync_replication_slots = on", "hot_standby_feedback = on"],
        )
        .await;
    let stack = Stack {
        client: pg.client(DB).await,
        pg,
        redis: TestRedis::start(),
    };
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'walcast_standby'",
        "SELECT pg_reload_conf()",
    ] {
        stack.client.batch_execute(sql).await.expect(sql);
    }
    let failover = async || -> Option<bool> {
        stack
            .client
            .query_opt(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .expect("pg_replication_slots")
            .map(|row| row.get(0))
    };
    // Created without the setting: an ordinary slot.
    let mut daemon = stack.spawn_daemon();
    stack.wait_streaming("walcast", &daemon).await;
    assert_eq!(failover().await, Some(false));
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
    // With it, the daemon makes it a failover slot, and streams.
    let mut env = stack.env();
    env.push(("WALCAST_SLOT_FAILOVER", "true".into()));
    env.push(("WALCAST_STANDBY_DATABASE_URL", standby.url("postgres", DB)));
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    assert_eq!(failover().await, Some(true), "{}", daemon.log());
    stack
        .client
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("insert");
    let messages = firehose.wait_for(1, Duration::from_secs(30), &daemon).await;
    assert_eq!(messages[0]["data"]["record"]["id"], 1);
    // The standby's slot sync worker copies it, and keeps the copy
    // (no longer temporary) once the standby has replayed past it; the
    // worker naps up to 30 s while nothing changes.
    let standby_client = standby.client(DB).await;
    eventually(
        &format!("the standby holds a synchronized copy\n{}", tail(&standby.log(), 30)),
        Duration::from_secs(60),
        || async {
            matches!(
                standby_client
                    .query_opt("SELECT synced AND NOT temporary AND invalidation_reason IS NULL FROM pg_replication_slots WHERE slot_name = 'walcast'", &[])
                    .await,
                Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true)
            )
        },
    )
    .await;
    let (code, json) = check(&env);
    assert_eq!(code, Some(0), "{json:#}");
    let found = finding(&json, "slot.failover", None);
    assert_eq!(
        (&found["level"], &found["message"]),
        (
            &json!("ok"),
            &json!(
                "replication slot walcast is a failover slot; walcast receives changes once the standbys of synchronized_standby_slots (walcast_standby) have them"
            )
        ),
    );
    let found = finding(&json, "standby.slot", None);
    assert_eq!(found["level"], "ok", "{found:#}");
    assert!(
        found["message"].as_str().expect("message").starts_with(
            "the standby holds replication slot walcast synchronized (confirmed up to "
        ),
        "{found:#}"
    );
}
