//! Connecting: authentication, TLS, and the errors an operator must be able
//! to act on. None of them may panic.

use std::time::Duration;

use crate::support::stack::{DB, Firehose, Stack};
use crate::support::{Daemon, PgOptions, eventually, tail};

/// Runs the daemon with `env` and expects it to exit with `code`, its log
/// containing `expected`.
fn expect_exit(env: &[(&str, String)], code: i32, expected: &str) -> String {
    let mut daemon = Daemon::spawn(&["run"], env);
    let status = daemon
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("daemon did not exit\n{}", daemon.log()));
    let log = daemon.log();
    assert_eq!(status.code(), Some(code), "exit code\n{log}");
    assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    log
}

fn env_for(stack: &Stack, database_url: String) -> Vec<(&'static str, String)> {
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_DATABASE_URL");
    env.push(("WALCAST_DATABASE_URL", database_url));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publication_stops_with_a_fix() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute("DROP PUBLICATION supabase_realtime")
        .await
        .expect("drop");
    expect_exit(
        &stack.env(),
        1,
        "publication \"supabase_realtime\" does not exist in this database: create it with CREATE PUBLICATION supabase_realtime",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_stops_with_a_fix() {
    let stack = Stack::start_with(PgOptions {
        wal_level: "replica",
        ..PgOptions::default()
    })
    .await;
    expect_exit(
        &stack.env(),
        1,
        "wal_level is \"replica\" but logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart postgres",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_naming_the_role() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'right'")
        .await
        .expect("role");
    let url = stack.pg.url_with_password("scram_user", "wrong", DB);
    expect_exit(
        &env_for(&stack, url),
        1,
        "password authentication failed for user \"scram_user\"",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_retried_not_fatal() {
    let stack = Stack::start().await;
    let port = crate::support::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{DB}?sslmode=disable");
    let mut daemon = Daemon::spawn(&["run"], &env_for(&stack, url));
    eventually(
        "two connection attempts",
        Duration::from_secs(20),
        || async {
            daemon
                .log()
                .matches("could not connect to 127.0.0.1")
                .count()
                >= 2
        },
    )
    .await;
    assert!(
        daemon.try_wait().is_none(),
        "the daemon keeps trying\n{}",
        daemon.log()
    );
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(!daemon.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_settings_name_the_key_and_exit_2() {
    let stack = Stack::start().await;
    let mut env = stack.env();
    env.push(("WALCAST_FIREHOSE", "maybe".into()));
    expect_exit(
        &env,
        2,
        "invalid value for `firehose` (from environment variable WALCAST_FIREHOSE): expected true or false, got \"maybe\"",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walcast.toml");
    std::fs::write(&path, "status_interval = \"often\"\n").expect("write config");
    let mut env = stack.env();
    // The environment would win over the file.
    env.retain(|(k, _)| *k != "WALCAST_STATUS_INTERVAL");
    env.push(("WALCAST_CONFIG", path.display().to_string()));
    expect_exit(
        &env,
        2,
        "invalid value for `status_interval` (from config file",
    );
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_DATABASE_URL");
    env.push(("WALCAST_DATABASE_URL", "mysql://nope".into()));
    expect_exit(
        &env,
        2,
        "invalid value for `database_url` (from environment variable WALCAST_DATABASE_URL): database url must start with postgres://",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_stands_by_and_takes_over() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); ALTER PUBLICATION supabase_realtime ADD TABLE t;",
        )
        .await
        .expect("setup");
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let mut first = stack.spawn_daemon();
    stack.wait_streaming("walcast", &first).await;
    let second = stack.spawn_daemon();
    eventually(
        "second daemon stands by",
        Duration::from_secs(20),
        || async { second.log().contains("standing by") },
    )
    .await;
    stack
        .client
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("insert");
    firehose.wait_for(1, Duration::from_secs(30), &first).await;
    assert_eq!(first.terminate().code(), Some(0), "{}", first.log());
    stack
        .client
        .execute("INSERT INTO t VALUES (2)", &[])
        .await
        .expect("insert");
    let messages = firehose.wait_for(2, Duration::from_secs(30), &second).await;
    let ids: Vec<i64> = messages
        .iter()
        .map(|m| m["data"]["record"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, vec![1, 2], "{}", tail(&second.log(), 30));
    assert!(second.log().contains("streaming"));
}

/// The daemon authenticates with `user` and streams one insert.
async fn streams_as(stack: &Stack, url: String) {
    stack
        .client
        .batch_execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY); ALTER PUBLICATION supabase_realtime SET TABLE t; DELETE FROM t;")
        .await
        .expect("setup");
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let mut daemon = Daemon::spawn(&["run"], &env_for(stack, url));
    stack.wait_streaming("walcast", &daemon).await;
    stack
        .client
        .execute("INSERT INTO t VALUES (7)", &[])
        .await
        .expect("insert");
    let messages = firehose.wait_for(1, Duration::from_secs(30), &daemon).await;
    assert_eq!(messages[0]["data"]["record"]["id"], 7);
    assert_eq!(daemon.terminate().code(), Some(0));
    // The walsender exits a moment after its client: wait until the slot is
    // released before dropping it for the next case.
    eventually("the slot is released", Duration::from_secs(30), || async {
        matches!(
            stack.client.query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = 'walcast'", &[]).await,
            Ok(Some(row)) if !row.get::<_, bool>(0)
        )
    })
    .await;
    stack
        .client
        .execute("SELECT pg_drop_replication_slot('walcast')", &[])
        .await
        .expect("drop slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_scram_authentication() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'pw m';
             SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'pw s';",
        )
        .await
        .expect("roles");
    let md5 = format!(
        "postgres://md5_user:pw%20m@127.0.0.1:{}/{DB}?sslmode=disable",
        stack.pg.port()
    );
    streams_as(&stack, md5).await;
    let scram = format!(
        "postgres://scram_user:pw%20s@127.0.0.1:{}/{DB}?sslmode=disable",
        stack.pg.port()
    );
    streams_as(&stack, scram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_follow_libpq() {
    let stack = Stack::start_with(PgOptions {
        tls: true,
        ..PgOptions::default()
    })
    .await;
    stack
        .client
        .batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE tls_user LOGIN REPLICATION PASSWORD 'pw'")
        .await
        .expect("role");
    let ca = stack.pg.ca_cert_path();
    // `hostaddr` connects to 127.0.0.1 whatever name `host` gives the server.
    let url = |host: &str, mode: &str| {
        format!(
            "postgres://tls_user:pw@{host}:{}/{DB}?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
            stack.pg.port(),
            ca.display()
        )
    };
    // tls_user may only connect over TLS (hostssl), so each of these proves TLS.
    streams_as(&stack, url("127.0.0.1", "require")).await;
    streams_as(&stack, url("localhost", "verify-full")).await;
    streams_as(&stack, url("127.0.0.1", "prefer")).await;
    // The certificate names localhost and 127.0.0.1, not this:
    let wrong_name = url("db.example.com", "verify-full");
    let log = expect_exit(
        &env_for(&stack, wrong_name.clone()),
        1,
        "tls: handshake with 127.0.0.1",
    );
    assert!(log.contains("certificate"), "{log}");
    // verify-ca checks only the chain, so the name does not matter.
    streams_as(&stack, url("db.example.com", "verify-ca")).await;
    // Without TLS the server's pg_hba rejects tls_user: a definite error.
    expect_exit(&env_for(&stack, url("127.0.0.1", "disable")), 1, "28000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_a_last_status_update_and_exits_zero() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); ALTER PUBLICATION supabase_realtime ADD TABLE t;",
        )
        .await
        .expect("setup");
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    // With an hour between periodic updates, only the final one can
    // acknowledge the insert within this test.
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_STATUS_INTERVAL");
    env.push(("WALCAST_STATUS_INTERVAL", "1h".into()));
    let mut daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let before = stack.confirmed_flush("walcast").await.expect("slot");
    stack
        .client
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("insert");
    let after_insert = stack.current_wal().await;
    firehose.wait_for(1, Duration::from_secs(30), &daemon).await;
    assert_eq!(
        stack.confirmed_flush("walcast").await,
        Some(before),
        "no periodic update yet"
    );
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
    let confirmed = stack.confirmed_flush("walcast").await.expect("slot");
    assert!(
        confirmed >= after_insert,
        "final update acknowledged {confirmed}, the insert ended at {after_insert}"
    );
    assert!(
        daemon.log().contains("replication stopped"),
        "{}",
        daemon.log()
    );
}
