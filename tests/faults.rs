//! Nothing committed is lost: the daemon killed, Redis stopped, Postgres
//! restarted, all in the middle of a load from concurrent writers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use walcast::lsn::Lsn;

use crate::support::load::{LOAD_TABLE, Load, LoadShape};
use crate::support::stack::{
    DB, Firehose, Stack, check_order_and_duplicates, inserted_ids, position,
};
use crate::support::{Daemon, PgOptions, eventually, tail};

/// Sets up the load table, a subscriber and a streaming daemon.
async fn start(stack: &Stack) -> (Firehose, Daemon) {
    stack
        .client
        .batch_execute(&format!(
            "{LOAD_TABLE}; ALTER PUBLICATION supabase_realtime ADD TABLE load;"
        ))
        .await
        .expect("setup");
    let firehose = Firehose::subscribe(&unix_url(stack), "default").await;
    let daemon = stack.spawn_daemon();
    stack.wait_streaming("walcast", &daemon).await;
    (firehose, daemon)
}

/// The subscriber talks to Redis over its unix socket, so a test can let it
/// resubscribe after a Redis restart before the daemon can reach Redis again.
fn unix_url(stack: &Stack) -> String {
    format!("unix://{}", stack.redis.socket_path().display())
}

/// Every committed row arrived (at least once, in commit order, duplicates
/// identical) and nothing else did.
async fn assert_complete(stack: &Stack, firehose: &Firehose, daemon: &Daemon) {
    let rows = stack
        .client
        .query("SELECT id FROM load", &[])
        .await
        .expect("select ids");
    let committed: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let distinct = check_order_and_duplicates(&firehose.raw());
        let received = inserted_ids(&distinct, "load");
        if received == committed {
            return;
        }
        let missing = committed.difference(&received).count();
        let extra = received.difference(&committed).count();
        assert_eq!(extra, 0, "changes that were never committed arrived");
        assert!(
            Instant::now() < deadline,
            "{missing} of {} committed rows never arrived\n--- daemon log ---\n{}",
            committed.len(),
            tail(&daemon.log(), 80)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A small deterministic generator, so a failing run can be repeated.
fn fractions(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed | 1;
    let mut out: Vec<f64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            0.05 + 0.85 * (x % 10_000) as f64 / 10_000.0
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_at_random_moments_loses_nothing() {
    let stack = Stack::start().await;
    let (firehose, mut daemon) = start(&stack).await;
    let load = Load::start(
        stack.pg.url("postgres", DB),
        LoadShape {
            writers: 4,
            rows: 50_000,
            max_batch: 20,
            pause: Duration::from_millis(2),
        },
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let kills = fractions(seed, 5);
    eprintln!("seed {seed}: killing the daemon at {kills:?} of the load");
    let mut killed_during_load = 0;
    for at in &kills {
        eventually("load progress", Duration::from_secs(120), || async {
            load.progress() >= *at
        })
        .await;
        killed_during_load += usize::from(load.progress() < 1.0);
        daemon.kill();
        daemon = stack.spawn_daemon();
    }
    assert_eq!(
        killed_during_load, 5,
        "every kill must happen while writers are writing"
    );
    load.finish().await;
    assert_complete(&stack, &firehose, &daemon).await;
    let raw = firehose.raw();
    eprintln!(
        "{} messages for {} rows",
        raw.len(),
        check_order_and_duplicates(&raw).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_ten_seconds_holds_the_slot_and_loses_nothing() {
    let mut stack = Stack::start().await;
    let (firehose, daemon) = start(&stack).await;
    let load = Load::start(
        stack.pg.url("postgres", DB),
        LoadShape {
            writers: 2,
            rows: 20_000,
            max_batch: 10,
            pause: Duration::from_millis(10),
        },
    );
    eventually("load progress", Duration::from_secs(60), || async {
        load.progress() >= 0.1
    })
    .await;
    stack.redis.stop();
    let received_before_stop = firehose.raw();
    // An answer Redis gave just before it stopped may still be reported on
    // the next status tick (100 ms); after that nothing may move.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let held = stack.confirmed_flush("walcast").await.expect("slot");
    let outage_start = Instant::now();
    while outage_start.elapsed() < Duration::from_secs(10) {
        let now = stack.confirmed_flush("walcast").await.expect("slot");
        assert_eq!(now, held, "confirmed_flush_lsn moved while Redis was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        load.progress() < 1.0,
        "the load must still be writing during the outage"
    );
    // Everything acknowledged must be what Redis had accepted before it stopped.
    stack.redis.start_again_unix_only();
    firehose.wait_subscribed(2).await;
    stack.redis.open_tcp();
    load.finish().await;
    assert_complete(&stack, &firehose, &daemon).await;
    let before: HashSet<(Lsn, u64)> = received_before_stop
        .iter()
        .map(|m| position(&serde_json::from_str(m).expect("json")))
        .collect();
    for message in check_order_and_duplicates(&firehose.raw()) {
        let (lsn, seq) = position(&message);
        if lsn < held {
            assert!(
                before.contains(&(lsn, seq)),
                "({lsn}, {seq}) was acknowledged before Redis had it"
            );
        }
    }
    assert!(
        daemon.log().contains("session ended; reconnecting"),
        "the outage was noticed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_lose_nothing() {
    let mut stack = Stack::start_with(PgOptions::default()).await;
    let (firehose, daemon) = start(&stack).await;
    let load = Load::start(
        stack.pg.url("postgres", DB),
        LoadShape {
            writers: 3,
            rows: 15_000,
            max_batch: 10,
            pause: Duration::from_millis(5),
        },
    );
    eventually("load progress", Duration::from_secs(60), || async {
        load.progress() >= 0.2
    })
    .await;
    stack.pg.stop_fast();
    stack.pg.start_again();
    eventually("load progress", Duration::from_secs(60), || async {
        load.progress() >= 0.5
    })
    .await;
    assert!(load.progress() < 1.0);
    stack.pg.stop_immediate();
    stack.pg.start_again();
    assert!(
        load.progress() < 1.0,
        "the restarts must happen during the load"
    );
    // The test's own client died with the server.
    stack.client = stack.pg.client(DB).await;
    load.finish().await;
    assert_complete(&stack, &firehose, &daemon).await;
    let log = daemon.log();
    assert!(
        log.matches(" streaming slot=").count() >= 3,
        "started streaming three times (two restarts):\n{}",
        tail(&log, 40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_or_unpublished_only_database_still_advances_the_slot() {
    let stack = Stack::start_with(PgOptions {
        extra_conf: vec!["wal_sender_timeout = '2s'".into()],
        ..PgOptions::default()
    })
    .await;
    stack
        .client
        .batch_execute("CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE private (id int PRIMARY KEY, v text); ALTER PUBLICATION supabase_realtime ADD TABLE published;")
        .await
        .expect("setup");
    let daemon = stack.spawn_daemon();
    stack.wait_streaming("walcast", &daemon).await;
    // Quiet: the slot catches up with the WAL as it is.
    let end = stack.current_wal().await;
    eventually(
        "slot catches up on a quiet database",
        Duration::from_secs(30),
        || async {
            stack
                .confirmed_flush("walcast")
                .await
                .is_some_and(|l| l >= end)
        },
    )
    .await;
    // Writes only to a table outside the publication: nothing is published,
    // and still the slot follows the WAL.
    for i in 0..200 {
        stack
            .client
            .execute("INSERT INTO private VALUES ($1, repeat('x', 500))", &[&i])
            .await
            .expect("insert");
    }
    let end = stack.current_wal().await;
    eventually(
        &format!(
            "slot passes {end} with only unpublished writes\n{}",
            tail(&daemon.log(), 30)
        ),
        Duration::from_secs(30),
        || async {
            stack
                .confirmed_flush("walcast")
                .await
                .is_some_and(|l| l >= end)
        },
    )
    .await;
}
