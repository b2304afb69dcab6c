//! The admin server of `walcast run`, end to end: `/metrics` moves as
//! changes flow, `/health` answers while the process runs, `/ready`
//! follows the replication stream and Redis.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use walcast::lsn::Lsn;

use crate::support::gateway::BusGateway;
use crate::support::stack::{Firehose, Stack};
use crate::support::{Daemon, free_port};

const WAIT: Duration = Duration::from_secs(60);
/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on 127.0.0.1:`port`: the status code and body, or `None`
/// when nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let request = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .ok()
        .flatten()
}

/// The `/metrics` text; panics if it does not answer 200.
async fn scrape(port: u16) -> String {
    match get(port, "/metrics").await {
        Some((200, body)) => body,
        other => panic!("GET /metrics: {other:?}"),
    }
}

/// The value of `series` (a name, with its labels if it has any).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Like [`value`], panicking with the scrape when the series is missing.
fn must(metrics: &str, series: &str) -> f64 {
    value(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// `walcast run` with the stack's environment and the admin server on a
/// free port, streaming a published table `items`.
async fn start() -> (Stack, Daemon, u16) {
    start_with(
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         ALTER PUBLICATION supabase_realtime ADD TABLE items;",
        true,
    )
    .await
}

/// `walcast run` after `setup`, with the admin server on a free port.
async fn start_with(setup: &str, firehose: bool) -> (Stack, Daemon, u16) {
    let stack = Stack::start().await;
    stack.client.batch_execute(setup).await.expect("setup sql");
    let port = free_port();
    let mut env = stack.env();
    env.retain(|(k, _)| firehose || *k != "WALCAST_FIREHOSE");
    env.push(("WALCAST_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    (stack, daemon, port)
}

/// Polls `f` every 50 ms until it returns `true`; panics after [`WAIT`]
/// with `what` and the daemon's log as it is then, without its status
/// update lines.
async fn until<F, Fut>(what: &str, daemon: &Daemon, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        if Instant::now() >= deadline {
            let log = daemon.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("status update"))
                .collect();
            panic!(
                "timed out after {WAIT:?} waiting for: {what}\n--- daemon log, without status updates ---\n{}",
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/ready` answers `status`; returns its body.
async fn wait_ready(port: u16, status: u16, daemon: &Daemon) -> String {
    let last = Mutex::new(None);
    until(&format!("/ready answers {status}"), daemon, || async {
        let answer = get(port, "/ready").await;
        let done = matches!(&answer, Some((s, _)) if *s == status);
        *last.lock().expect("lock") = answer;
        done
    })
    .await;
    let last = last.into_inner().expect("lock");
    last.map(|(_, body)| body).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_changes_flow() {
    const TRANSACTIONS: i32 = 5;
    const ROWS_EACH: i32 = 4;
    const ROWS: i32 = TRANSACTIONS * ROWS_EACH;
    let (stack, mut daemon, port) = start().await;
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    wait_ready(port, 200, &daemon).await;
    // The first status update sets the acknowledged position.
    until("an acknowledged lsn", &daemon, || async {
        value(&scrape(port).await, "walcast_acknowledged_lsn").is_some()
    })
    .await;
    let before = scrape(port).await;
    for m in [
        "walcast_changes_published_total",
        "walcast_messages_published_total",
        "walcast_published_bytes_total",
        "walcast_transactions_total",
        "walcast_rls_checks_total",
        "walcast_subscriptions",
        "walcast_redis_errors_total{task=\"publisher\"}",
    ] {
        must(&before, m);
    }
    assert!(before.contains("# TYPE walcast_publish_duration_seconds histogram"));
    assert!(before.contains("# HELP walcast_changes_received_total "));

    for t in 0..TRANSACTIONS {
        let first = t * ROWS_EACH;
        stack
            .client
            .batch_execute(&format!(
                "INSERT INTO items SELECT g, 'row ' || g FROM generate_series({}, {}) g",
                first,
                first + ROWS_EACH - 1
            ))
            .await
            .expect("insert");
    }
    let written = stack.current_wal().await;
    firehose.wait_for(ROWS as usize, WAIT, &daemon).await;

    let grew = |after: &str, series: &str| must(after, series) - must(&before, series);
    until(
        &format!("{ROWS} more changes published and the inserts acknowledged"),
        &daemon,
        || async {
            let after = scrape(port).await;
            let acked = Lsn(must(&after, "walcast_acknowledged_lsn") as u64);
            grew(&after, "walcast_changes_published_total") >= f64::from(ROWS) && acked >= written
        },
    )
    .await;
    let after = scrape(port).await;
    assert_eq!(
        grew(&after, "walcast_changes_published_total"),
        f64::from(ROWS),
        "{after}"
    );
    assert_eq!(
        grew(&after, "walcast_changes_received_total{kind=\"INSERT\"}"),
        f64::from(ROWS)
    );
    assert_eq!(
        grew(&after, "walcast_changes_received_total{kind=\"DELETE\"}"),
        0.0
    );
    // Firehose only, no subscriptions: one message per change.
    assert_eq!(
        grew(&after, "walcast_messages_published_total"),
        f64::from(ROWS)
    );
    let bytes: usize = firehose.raw().iter().map(String::len).sum();
    assert_eq!(grew(&after, "walcast_published_bytes_total"), bytes as f64);
    assert!(grew(&after, "walcast_transactions_total") >= f64::from(TRANSACTIONS));
    assert!(grew(&after, "walcast_acknowledged_lsn") > 0.0);
    assert!(must(&after, "walcast_received_lsn") >= must(&after, "walcast_acknowledged_lsn"));
    assert!(must(&after, "walcast_publish_duration_seconds_count") >= 1.0);
    let lag = must(&after, "walcast_replication_lag_seconds");
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    must(&after, "walcast_replication_lag_bytes");
    assert_eq!(must(&after, "walcast_subscriptions"), 0.0);
    assert_eq!(grew(&after, "walcast_rls_checks_total"), 0.0);
    // Read through the pool every 10 s, the first time at start (perhaps
    // before the slot existed).
    until("the slot's retained wal", &daemon, || async {
        value(&scrape(port).await, "walcast_slot_retained_wal_bytes").is_some_and(|b| b >= 0.0)
    })
    .await;

    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_redis_is_down_and_health_stays_200() {
    let (mut stack, mut daemon, port) = start().await;
    assert_eq!(wait_ready(port, 200, &daemon).await, "ready\n");
    assert_eq!(get(port, "/health").await, Some((200, "ok\n".to_owned())));

    stack.redis.stop();
    let body = wait_ready(port, 503, &daemon).await;
    assert!(body.contains("redis does not answer"), "{body}");
    assert_eq!(get(port, "/health").await.map(|(s, _)| s), Some(200));
    // The control task lost its subscription to the control channel.
    until("a redis error counted", &daemon, || async {
        value(
            &scrape(port).await,
            "walcast_redis_errors_total{task=\"control\"}",
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;

    stack.redis.start_again();
    assert_eq!(wait_ready(port, 200, &daemon).await, "ready\n");

    // The admin server does not keep the process alive.
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
    assert_eq!(get(port, "/health").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_is_retried_while_replication_goes_on() {
    let stack = Stack::start().await;
    let port = free_port();
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the admin port");
    let mut env = stack.env();
    env.push(("WALCAST_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    let mut daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    until("the daemon says the port is taken", &daemon, || async {
        daemon.log().contains("admin server cannot listen")
    })
    .await;
    drop(taken);
    until("/health once the port is free", &daemon, || async {
        get(port, "/health").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_checks_denials_errors_and_subscriptions_are_counted() {
    const OWNER: &str = "8d0c1b6e-2f4a-4c2e-9f0e-0a1b2c3d4e5f";
    const STRANGER: &str = "00000000-0000-4000-8000-000000000000";
    let setup = format!(
        "CREATE ROLE authenticated NOLOGIN;
         CREATE TABLE secure (id int PRIMARY KEY, owner_id uuid);
         ALTER TABLE secure ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON secure FOR SELECT
           USING (owner_id = (current_setting('request.jwt.claims', true)::jsonb->>'sub')::uuid);
         GRANT SELECT ON secure TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE secure;
         {}",
        walcast::rls::INSTALL_SQL
    );
    let (stack, mut daemon, port) = start_with(&setup, false).await;
    let mut gateway = BusGateway::start(&stack.redis.url(), "default", "g1").await;
    // Sees the rows; may not see them; its claim breaks the policy.
    for (id, sub) in [
        ("owner", OWNER),
        ("stranger", STRANGER),
        ("broken", "not-a-uuid"),
    ] {
        gateway
            .subscribe(json!({
                "id": id, "topic": format!("realtime:{id}"), "schema": "public", "table": "secure",
                "event": "*", "filter": null, "select": null,
                "claims": {"sub": sub, "role": "authenticated"}, "role": "authenticated",
            }))
            .await;
        assert_eq!(
            gateway.reply(id, 0).await["type"],
            "subscribed",
            "{}",
            daemon.log()
        );
    }
    wait_ready(port, 200, &daemon).await;
    let before = scrape(port).await;
    assert_eq!(must(&before, "walcast_subscriptions"), 3.0, "{before}");

    // One at a time, so that each change gets its own check.
    for id in 1..=2 {
        stack
            .client
            .batch_execute(&format!("INSERT INTO secure VALUES ({id}, '{OWNER}')"))
            .await
            .expect("insert");
        until(&format!("change event {id}"), &daemon, || async {
            gateway.events().len() >= id
        })
        .await;
    }
    let grew = |after: &str, series: &str| must(after, series) - must(&before, series);
    until("two changes published", &daemon, || async {
        grew(&scrape(port).await, "walcast_changes_published_total") >= 2.0
    })
    .await;
    let after = scrape(port).await;
    // One check per change, for the three subscribers at once.
    assert_eq!(grew(&after, "walcast_rls_checks_total"), 2.0, "{after}");
    assert_eq!(
        grew(&after, "walcast_rls_check_duration_seconds_count"),
        2.0
    );
    assert_eq!(grew(&after, "walcast_rls_denied_total"), 2.0);
    assert_eq!(grew(&after, "walcast_rls_errors_total"), 2.0);
    assert_eq!(grew(&after, "walcast_changes_published_total"), 2.0);
    // Per change: the owner's event and the broken subscription's error.
    assert_eq!(grew(&after, "walcast_messages_published_total"), 4.0);

    gateway.unsubscribe("stranger").await;
    until(
        "the subscriptions gauge follows an unsubscribe",
        &daemon,
        || async { value(&scrape(port).await, "walcast_subscriptions") == Some(2.0) },
    )
    .await;
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
}
