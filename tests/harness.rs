//! Tests of the test harness itself: the servers start, restart after every
//! kind of shutdown, authenticate as configured, and speak TLS.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::support::postgres::{connect, connect_tls};
use crate::support::{PgOptions, TestPostgres, TestRedis, eventually, free_port};

async fn show(pg: &TestPostgres, setting: &str) -> String {
    let client = pg.client("postgres").await;
    let row = client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap();
    row.get(0)
}

/// Creates a table with a row in it in database `postgres`.
async fn write_marker(pg: &TestPostgres) {
    pg.client("postgres")
        .await
        .batch_execute("CREATE TABLE marker (id int PRIMARY KEY, note text); INSERT INTO marker VALUES (1, 'before')")
        .await
        .unwrap();
}

/// The row written by `write_marker` survived.
async fn assert_marker(pg: &TestPostgres) {
    let row = pg
        .client("postgres")
        .await
        .query_one("SELECT note FROM marker WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "before");
}

#[tokio::test]
async fn postgres_starts_with_logical_wal_and_publication() {
    let started = Instant::now();
    let pg = TestPostgres::start();
    eprintln!("postgres cluster start took {:?}", started.elapsed());

    assert_eq!(show(&pg, "wal_level").await, "logical");
    assert_eq!(show(&pg, "port").await, pg.port().to_string());
    assert_eq!(show(&pg, "max_replication_slots").await, "20");
    assert_eq!(show(&pg, "fsync").await, "off");

    let app = pg.setup_test_db("app").await;
    app.batch_execute("CREATE TABLE items (id int PRIMARY KEY); ALTER PUBLICATION supabase_realtime ADD TABLE items")
        .await
        .unwrap();
    let row = app
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'supabase_realtime'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);

    // A logical slot can be created (wal_level and slot limits are right).
    app.batch_execute("SELECT pg_create_logical_replication_slot('harness_slot', 'pgoutput')")
        .await
        .unwrap();

    // The unix socket in the temp dir works as well.
    let (socket_client, connection) = pg
        .socket_config("postgres", "app")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = socket_client.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn postgres_stop_fast_then_start_again() {
    let mut pg = TestPostgres::start();
    write_marker(&pg).await;
    let port = pg.port();
    pg.stop_fast();
    assert!(!pg.is_running());
    pg.start_again();
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert_marker(&pg).await;
}

#[tokio::test]
async fn postgres_stop_immediate_then_start_again() {
    let mut pg = TestPostgres::start();
    write_marker(&pg).await;
    let client = pg.client("postgres").await;
    pg.stop_immediate();
    assert!(!pg.is_running());
    eventually(
        "old connection to notice the shutdown",
        Duration::from_secs(5),
        || async { client.is_closed() },
    )
    .await;
    pg.start_again();
    assert_marker(&pg).await;
}

#[tokio::test]
async fn postgres_kill_then_start_again() {
    let mut pg = TestPostgres::start();
    write_marker(&pg).await;
    // Keep a session and a replication slot around, like walcast would.
    let client = pg.client("postgres").await;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('kill_slot', 'pgoutput')")
        .await
        .unwrap();
    let old_pid = pg.pid().unwrap();
    pg.kill();
    assert!(!pg.is_running());
    assert!(!pg.data_dir().join("postmaster.pid").exists());
    eventually(
        "old connection to notice the crash",
        Duration::from_secs(5),
        || async { client.is_closed() },
    )
    .await;

    pg.start_again();
    assert_ne!(pg.pid().unwrap(), old_pid);
    assert_marker(&pg).await;
    let row = pg
        .client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kill_slot'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "slot survives a crash");

    // And a second crash/restart cycle works too.
    pg.kill();
    pg.start_again();
    assert_marker(&pg).await;
}

#[tokio::test]
async fn postgres_password_auth_md5_and_scram() {
    let pg = TestPostgres::start();
    pg.client("postgres")
        .await
        .batch_execute(
            "SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram:secret@/?';",
        )
        .await
        .unwrap();

    let rows = pg
        .client("postgres")
        .await
        .query(
            "SELECT rolname, left(rolpassword, 6) FROM pg_authid WHERE rolname IN ('md5_user', 'scram_user') ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let stored: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].0, "md5_user");
    assert!(stored[0].1.starts_with("md5"), "{stored:?}");
    assert_eq!(stored[1], ("scram_user".to_owned(), "SCRAM-".to_owned()));

    for (user, password) in [
        ("md5_user", "md5 secret"),
        ("scram_user", "scram:secret@/?"),
    ] {
        let client = connect(&pg.url_with_password(user, password, "postgres"))
            .await
            .unwrap_or_else(|e| panic!("{user} should log in: {e}"));
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);

        let err = connect(&pg.url_with_password(user, "wrong", "postgres"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} with a wrong password must be rejected"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err}"
        );

        let err = connect(&pg.url(user, "postgres"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} without a password must be rejected"));
        // tokio-postgres notices the password request it cannot answer.
        assert!(
            format!("{err:?}").contains("password missing"),
            "{user}: {err:?}"
        );
    }
}

#[tokio::test]
async fn postgres_tls() {
    let pg = TestPostgres::start_with(PgOptions {
        tls: true,
        ..PgOptions::default()
    });
    assert_eq!(show(&pg, "ssl").await, "on");
    assert!(pg.ca_cert_path().is_file());
    pg.client("postgres")
        .await
        .batch_execute("CREATE ROLE tls_user LOGIN REPLICATION PASSWORD 'tls secret'")
        .await
        .unwrap();

    // Over TLS, verified against the throw-away CA: by IP and by name.
    let by_ip = format!(
        "{}?sslmode=require",
        pg.url_with_password("tls_user", "tls secret", "postgres")
    );
    let by_name = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=tls_user password='tls secret' dbname=postgres sslmode=require",
        pg.port()
    );
    for url in [by_ip, by_name] {
        let client = connect_tls(&url, &pg.ca_cert_path())
            .await
            .unwrap_or_else(|e| panic!("TLS login with {url}: {e}\n{}", pg.log()));
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0));
    }

    // Without TLS, tls_user is rejected by pg_hba.conf.
    let plain = pg.url_with_password("tls_user", "tls secret", "postgres") + "?sslmode=disable";
    let err = connect(&plain)
        .await
        .expect_err("tls_user without TLS must be rejected");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}

#[tokio::test]
async fn postgres_options_wal_level_and_extra_conf() {
    let pg = TestPostgres::start_with(PgOptions {
        wal_level: "replica",
        extra_conf: vec!["wal_sender_timeout = '2s'".to_owned()],
        tls: false,
    });
    assert_eq!(show(&pg, "wal_level").await, "replica");
    assert_eq!(show(&pg, "wal_sender_timeout").await, "2s");
    assert_eq!(show(&pg, "ssl").await, "off");
}

#[tokio::test]
async fn redis_ping_kill_start_again() {
    use redis::AsyncCommands as _;

    let mut redis = TestRedis::start();
    let port = redis.port();
    let mut con = redis.connection().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let () = con.set("k", "v").await.unwrap();

    redis.kill();
    assert!(!redis.is_running());
    assert!(!redis.ping());
    redis.start_again();
    assert_eq!(redis.port(), port);
    let mut con = redis.connection().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let value: Option<String> = con.get("k").await.unwrap();
    assert_eq!(value, None, "no persistence");

    redis.stop();
    assert!(!redis.is_running());
    redis.start_again();
    assert!(redis.ping());
}

#[test]
fn free_ports_are_never_handed_out_twice() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let unique: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(unique.len(), ports.len());
    assert!(!unique.contains(&5432) && !unique.contains(&6379));
}
