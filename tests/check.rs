//! `walcast check` and `walcast setup` against real servers: each problem
//! an operator meets gives the exact finding and exit code, `sql/` applies
//! twice, and the daemon streams as the role `sql/role.sql` creates.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::gateway::BusGateway;
use crate::support::stack::{DB, Firehose, Stack};
use crate::support::{Daemon, PgOptions, TestPostgres, free_port};

const WAIT: Duration = Duration::from_secs(60);

/// What a finished `walcast` command left behind.
pub(crate) struct Outcome {
    pub(crate) code: Option<i32>,
    /// stdout and stderr, interleaved.
    pub(crate) output: String,
}

/// Runs `walcast ARGS` with `env` to completion.
pub(crate) fn walcast(args: &[&str], env: &[(&str, String)]) -> Outcome {
    let mut process = Daemon::spawn(args, env);
    let status = process
        .wait_timeout(WAIT)
        .unwrap_or_else(|| panic!("walcast {args:?} did not exit\n{}", process.log()));
    Outcome {
        code: status.code(),
        output: process.log(),
    }
}

/// `walcast check --json`: its exit code and the parsed document.
pub(crate) fn check(env: &[(&str, String)]) -> (Option<i32>, Value) {
    let outcome = walcast(&["check", "--json"], env);
    let json = serde_json::from_str(&outcome.output)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}):\n{}", outcome.output));
    (outcome.code, json)
}

/// The finding of `check` (about `subject`, when given); panics with the
/// whole document if there is not exactly one.
pub(crate) fn finding<'a>(json: &'a Value, check: &str, subject: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = findings(json)
        .iter()
        .filter(|f| f["check"] == check && subject.is_none_or(|s| f["subject"] == s))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {check} {subject:?} finding in\n{json:#}"
    );
    found[0]
}

fn findings(json: &Value) -> &Vec<Value> {
    json["findings"].as_array().expect("findings array")
}

/// `check` ids (with subjects) of the findings at `level`, in order.
fn at_level(json: &Value, level: &str) -> Vec<String> {
    findings(json)
        .iter()
        .filter(|f| f["level"] == level)
        .map(|f| match f["subject"].as_str() {
            Some(subject) => format!("{} {subject}", f["check"].as_str().expect("check")),
            None => f["check"].as_str().expect("check").to_owned(),
        })
        .collect()
}

/// Asserts a finding's level, message and fix exactly.
fn assert_finding(
    json: &Value,
    check: &str,
    subject: Option<&str>,
    level: &str,
    message: &str,
    fix: Option<&str>,
) {
    let f = finding(json, check, subject);
    assert_eq!(f["level"], level, "{check}: {f:#}");
    assert_eq!(f["message"], message, "{check}: {f:#}");
    assert_eq!(f["fix"].as_str(), fix, "{check}: {f:#}");
}

/// The daemon's environment with another database url.
fn env_with_url(stack: &Stack, url: String) -> Vec<(&'static str, String)> {
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_DATABASE_URL");
    env.push(("WALCAST_DATABASE_URL", url));
    env
}

fn setup(admin_url: String, extra: &[&str]) -> Outcome {
    let mut args = vec!["setup"];
    args.extend_from_slice(extra);
    walcast(&args, &[("WALCAST_ADMIN_DATABASE_URL", admin_url)])
}

const MAX_SLOT_WAL_KEEP_SIZE_FIX: &str = "to cap it: ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (a slot past the cap is invalidated and walcast needs a new one)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_database_with_walcast_streaming() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text);
             ALTER TABLE items ENABLE ROW LEVEL SECURITY;
             ALTER PUBLICATION supabase_realtime ADD TABLE items;",
        )
        .await
        .expect("schema");
    let applied = setup(stack.pg.url("postgres", DB), &[]);
    assert_eq!(applied.code, Some(0), "{}", applied.output);
    let env = env_with_url(&stack, stack.pg.url("walcast", DB));
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let pid: i32 = stack
        .client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .expect("active_pid")
        .get(0);
    // A healthy bus needs a password: connections already open (the
    // daemon's) stay authenticated, new ones give it.
    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("bus-secret")
        .query_async(&mut redis)
        .await
        .expect("requirepass");
    let mut env = env;
    env.retain(|(k, _)| *k != "WALCAST_REDIS_URL");
    let redis_url = stack
        .redis
        .url()
        .replacen("redis://", "redis://:bus-secret@", 1);
    env.push(("WALCAST_REDIS_URL", redis_url));
    let shown = stack.redis.url().replacen("redis://", "redis://:***@", 1);

    let (code, json) = check(&env);

    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(json["ok"], true);
    assert_eq!(at_level(&json, "error"), Vec::<String>::new(), "{json:#}");
    assert_eq!(at_level(&json, "warning"), Vec::<String>::new(), "{json:#}");
    // slot.failover: before 17 no failover slots, from 17 not one (the
    // setting is off); a_failover_slot_is_kept_by_a_standby_from_postgres_17
    // checks both texts.
    assert_eq!(
        at_level(&json, "info"),
        [
            "server.max_slot_wal_keep_size",
            "table.rls public.items",
            "slot.failover"
        ]
    );
    let port = stack.pg.port();
    assert_finding(
        &json,
        "messages.table",
        None,
        "ok",
        "realtime.messages exists; this role may keep its partitions (as supabase_realtime_admin)",
        None,
    );
    assert_finding(
        &json,
        "messages.publication",
        None,
        "ok",
        "realtime.messages is published: Broadcast from Database rides the slot",
        None,
    );
    assert_finding(
        &json,
        "postgres.connect",
        None,
        "ok",
        &format!("connected to postgres://walcast@127.0.0.1:{port}/{DB}"),
        None,
    );
    assert_finding(
        &json,
        "server.wal_level",
        None,
        "ok",
        "wal_level is logical",
        None,
    );
    assert_finding(
        &json,
        "server.replication_slots",
        None,
        "ok",
        "1 of 20 replication slots in use, walcast among them",
        None,
    );
    assert_finding(
        &json,
        "server.wal_senders",
        None,
        "ok",
        "1 of 20 WAL senders in use, walcast's among them",
        None,
    );
    assert_finding(
        &json,
        "server.max_slot_wal_keep_size",
        None,
        "info",
        "max_slot_wal_keep_size is -1 (unlimited): a slot nobody reads keeps WAL until the disk is full",
        Some(MAX_SLOT_WAL_KEEP_SIZE_FIX),
    );
    assert_finding(
        &json,
        "role.privileges",
        None,
        "ok",
        "role walcast has REPLICATION and is not a superuser",
        None,
    );
    assert_finding(
        &json,
        "role.subscriber",
        Some("anon"),
        "ok",
        "walcast may SET ROLE anon",
        None,
    );
    assert_finding(
        &json,
        "role.subscriber",
        Some("authenticated"),
        "ok",
        "walcast may SET ROLE authenticated",
        None,
    );
    let replication = finding(&json, "postgres.replication", None);
    assert_eq!(replication["level"], "ok");
    assert!(
        replication["message"]
            .as_str()
            .unwrap()
            .starts_with("replication connection as walcast works (system "),
        "{replication:#}"
    );
    assert_finding(
        &json,
        "publication.exists",
        None,
        "ok",
        "publication supabase_realtime exists, publishing INSERT, UPDATE, DELETE, TRUNCATE",
        None,
    );
    assert_finding(
        &json,
        "publication.tables",
        None,
        "ok",
        "publication supabase_realtime has 1 table: public.items",
        None,
    );
    assert_finding(
        &json,
        "table.replica_identity",
        Some("public.items"),
        "ok",
        "public.items: primary key (id); old_record carries the key",
        None,
    );
    assert_finding(
        &json,
        "table.rls",
        Some("public.items"),
        "info",
        "public.items: row level security enabled",
        None,
    );
    assert_finding(
        &json,
        "rls.sql",
        None,
        "ok",
        "sql/rls.sql version 3 is installed and this role may call walcast.visible_rows",
        None,
    );
    let exists = finding(&json, "slot.exists", None);
    assert_eq!(exists["level"], "ok");
    assert!(
        exists["message"]
            .as_str()
            .unwrap()
            .starts_with("replication slot walcast exists (pgoutput), confirmed up to "),
        "{exists:#}"
    );
    let active = finding(&json, "slot.active", None);
    assert_eq!(active["level"], "ok");
    let expected = format!(
        "replication slot walcast is active (pid {pid}, application walcast, client 127.0.0.1); retained WAL: "
    );
    assert!(
        active["message"].as_str().unwrap().starts_with(&expected),
        "{active:#}"
    );
    assert_finding(
        &json,
        "slot.wal_status",
        None,
        "ok",
        "replication slot walcast: wal_status reserved (its WAL is within max_wal_size)",
        None,
    );
    assert_finding(
        &json,
        "redis.ping",
        None,
        "ok",
        &format!("redis at {shown} answers PING"),
        None,
    );
    assert_finding(
        &json,
        "redis.auth",
        None,
        "ok",
        &format!("redis at {shown} refuses commands without a password"),
        None,
    );
    assert_finding(
        &json,
        "redis.eviction",
        None,
        "ok",
        "redis has no memory limit (maxmemory 0, maxmemory-policy noeviction): it evicts nothing",
        None,
    );

    // The same findings as text: one line each, then the summary.
    let text = walcast(&["check"], &env);
    assert_eq!(text.code, Some(0), "{}", text.output);
    let lines: Vec<&str> = text.output.lines().collect();
    assert_eq!(lines.len(), findings(&json).len() + 1, "{}", text.output);
    assert!(
        lines.contains(&"ok      server.wal_level               wal_level is logical"),
        "{}",
        text.output
    );
    assert_eq!(
        lines.last().copied(),
        Some(
            format!(
                "0 error(s), 0 warning(s), 3 info, {} ok: nothing blocks replication",
                findings(&json).len() - 3
            )
            .as_str()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_wal_level_is_replica() {
    let stack = Stack::start_with(PgOptions {
        wal_level: "replica",
        ..PgOptions::default()
    })
    .await;

    let (code, json) = check(&stack.env());

    assert_eq!(code, Some(1), "{json:#}");
    assert_eq!(json["ok"], false);
    assert_eq!(at_level(&json, "error"), ["server.wal_level"], "{json:#}");
    assert_finding(
        &json,
        "server.wal_level",
        None,
        "error",
        "wal_level is replica; logical decoding needs logical",
        Some(
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (on a managed service, set the provider's logical replication parameter)",
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_publication_is_missing() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute("DROP PUBLICATION supabase_realtime")
        .await
        .expect("drop publication");

    let (code, json) = check(&stack.env());

    assert_eq!(code, Some(1), "{json:#}");
    assert_eq!(at_level(&json, "error"), ["publication.exists"], "{json:#}");
    assert_finding(
        &json,
        "publication.exists",
        None,
        "error",
        "publication supabase_realtime does not exist in this database; walcast cannot stream",
        Some(
            "walcast setup (or psql -f sql/publication.sql), or CREATE PUBLICATION supabase_realtime; then ALTER PUBLICATION supabase_realtime ADD TABLE ...",
        ),
    );

    // A name that needs quoting is quoted in the fix.
    let mut env = stack.env();
    env.push(("WALCAST_PUBLICATION", "Missing Pub".into()));
    let (code, json) = check(&env);
    assert_eq!(code, Some(1), "{json:#}");
    assert_finding(
        &json,
        "publication.exists",
        None,
        "error",
        "publication \"Missing Pub\" does not exist in this database; walcast cannot stream",
        Some(
            "walcast setup (or psql -f sql/publication.sql), or CREATE PUBLICATION \"Missing Pub\"; then ALTER PUBLICATION \"Missing Pub\" ADD TABLE ...",
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_published_table_without_a_primary_key() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            r#"CREATE TABLE items (id bigint PRIMARY KEY);
               CREATE TABLE nopk (a int, b text);
               CREATE TABLE "Odd Name" (a int);
               ALTER PUBLICATION supabase_realtime ADD TABLE items, nopk, "Odd Name";"#,
        )
        .await
        .expect("schema");

    let (code, json) = check(&stack.env());

    assert_eq!(code, Some(1), "{json:#}");
    assert_eq!(
        at_level(&json, "error"),
        [
            "table.replica_identity public.\"Odd Name\"",
            "table.replica_identity public.nopk"
        ],
        "{json:#}"
    );
    assert_finding(
        &json,
        "table.replica_identity",
        Some("public.nopk"),
        "error",
        "public.nopk has no primary key and REPLICA IDENTITY DEFAULT: PostgreSQL rejects UPDATE and DELETE on it while it is published",
        Some(
            "ALTER TABLE public.nopk REPLICA IDENTITY FULL; or add a primary key (ALTER TABLE public.nopk ADD PRIMARY KEY (column, ...);)",
        ),
    );
    assert_finding(
        &json,
        "table.replica_identity",
        Some("public.\"Odd Name\""),
        "error",
        "public.\"Odd Name\" has no primary key and REPLICA IDENTITY DEFAULT: PostgreSQL rejects UPDATE and DELETE on it while it is published",
        Some(
            "ALTER TABLE public.\"Odd Name\" REPLICA IDENTITY FULL; or add a primary key (ALTER TABLE public.\"Odd Name\" ADD PRIMARY KEY (column, ...);)",
        ),
    );
    assert_finding(
        &json,
        "table.replica_identity",
        Some("public.items"),
        "ok",
        "public.items: primary key (id); old_record carries the key",
        None,
    );
    // The finding is right: Postgres does reject the update.
    let err = stack
        .client
        .batch_execute("UPDATE nopk SET b = 'x'")
        .await
        .expect_err("update without replica identity");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("does not have a replica identity"),
        "{err:?}"
    );

    // Applying the fix clears the error.
    stack
        .client
        .batch_execute(
            r#"ALTER TABLE nopk REPLICA IDENTITY FULL;
               ALTER TABLE "Odd Name" REPLICA IDENTITY FULL;"#,
        )
        .await
        .expect("replica identity full");
    let (code, json) = check(&stack.env());
    assert_eq!(code, Some(0), "{json:#}");
    assert_finding(
        &json,
        "table.replica_identity",
        Some("public.nopk"),
        "ok",
        "public.nopk: replica identity full; old_record carries every column (at the cost of bigger WAL)",
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_an_inactive_slot_retaining_wal() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('walcast', 'pgoutput');
             CREATE TABLE filler (id int, pad text);
             INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g;",
        )
        .await
        .expect("slot and WAL");
    let retained = async || -> i64 {
        stack
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .expect("retained wal")
            .get(0)
    };
    let before = retained().await;
    assert!(before > 1_000_000, "the inserts wrote WAL: {before}");

    let (code, json) = check(&stack.env());
    let after = retained().await;

    // A warning, not an error: the slot works, it just holds WAL back.
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(at_level(&json, "error"), Vec::<String>::new(), "{json:#}");
    assert_eq!(
        at_level(&json, "warning"),
        [
            "role.privileges",
            "role.subscriber anon",
            "role.subscriber authenticated",
            "publication.tables",
            // No sql/rls.sql, and no table with row level security yet.
            "rls.sql",
            "slot.active",
            "redis.auth"
        ],
        "{json:#}"
    );
    let active = finding(&json, "slot.active", None);
    assert_eq!(active["level"], "warning");
    assert_eq!(
        active["fix"],
        "start walcast run; if walcast is gone for good, drop the slot: SELECT pg_drop_replication_slot('walcast');"
    );
    let message = active["message"].as_str().unwrap();
    let bytes: i64 = message
        .strip_prefix("replication slot walcast is inactive and retains ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("retained bytes in {message:?}"));
    assert!(
        (before..=after).contains(&bytes),
        "{bytes} not in {before}..={after}"
    );
    assert!(
        message.ends_with(" of WAL, growing with every write until a consumer returns"),
        "{message}"
    );
    assert_finding(
        &json,
        "slot.wal_status",
        None,
        "ok",
        "replication slot walcast: wal_status reserved (its WAL is within max_wal_size)",
        None,
    );
    assert_finding(
        &json,
        "server.wal_senders",
        None,
        "ok",
        "0 of 20 WAL senders in use; one is free for walcast",
        None,
    );
    assert_finding(
        &json,
        "role.privileges",
        None,
        "warning",
        "walcast runs as superuser postgres; use the least-privileged role from sql/role.sql",
        Some(
            "walcast setup --role walcast (or psql -f sql/role.sql), ALTER ROLE walcast PASSWORD '...', and connect as walcast",
        ),
    );
    assert_finding(
        &json,
        "role.subscriber",
        Some("anon"),
        "warning",
        "role anon does not exist; walcast checks row level security as anon",
        Some("walcast setup (sql/role.sql creates anon and authenticated)"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_redis_may_evict_the_bus_keys() {
    let stack = Stack::start().await;
    let mut redis = stack.redis.connection().await;
    let set = |name: &'static str, value: &'static str| {
        redis::cmd("CONFIG").arg("SET").arg(name).arg(value).clone()
    };
    let _: () = set("maxmemory", "104857600")
        .query_async(&mut redis)
        .await
        .expect("maxmemory");
    let _: () = set("maxmemory-policy", "allkeys-lru")
        .query_async(&mut redis)
        .await
        .expect("policy");

    let (code, json) = check(&stack.env());

    assert_eq!(
        code,
        Some(0),
        "a warning does not block replication: {json:#}"
    );
    assert_finding(
        &json,
        "redis.eviction",
        None,
        "warning",
        "redis may evict keys when it reaches maxmemory 104857600 (maxmemory-policy allkeys-lru): an evicted subscription or gateway lease drops live subscriptions without telling their clients",
        Some(
            "CONFIG SET maxmemory-policy noeviction, and set it in redis.conf (or the provider's parameter group)",
        ),
    );

    let _: () = set("maxmemory-policy", "noeviction")
        .query_async(&mut redis)
        .await
        .expect("policy");
    let (_, json) = check(&stack.env());
    assert_finding(
        &json,
        "redis.eviction",
        None,
        "ok",
        "redis evicts nothing (maxmemory-policy noeviction)",
        None,
    );

    // A managed Redis that refuses CONFIG: walcast cannot tell, and says so.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-config",
        ])
        .query_async(&mut redis)
        .await
        .expect("acl");
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_REDIS_URL");
    let limited = stack
        .redis
        .url()
        .replacen("redis://", "redis://limited:pw@", 1);
    env.push(("WALCAST_REDIS_URL", limited));
    let (code, json) = check(&env);
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(
        finding(&json, "redis.ping", None)["level"],
        "ok",
        "{json:#}"
    );
    let eviction = finding(&json, "redis.eviction", None);
    assert_eq!(eviction["level"], "info", "{eviction:#}");
    let message = eviction["message"].as_str().expect("message");
    assert!(
        message.starts_with("could not read redis's maxmemory settings (")
            && message.contains("no permissions to run the 'config|get' command")
            && message.ends_with("); make sure its maxmemory-policy is noeviction"),
        "{eviction:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_redis_is_unreachable() {
    let pg = TestPostgres::start();
    pg.setup_test_db(DB).await;
    let redis_url = format!("redis://127.0.0.1:{}", free_port());
    let env = [
        ("WALCAST_DATABASE_URL", pg.url("postgres", DB)),
        ("WALCAST_REDIS_URL", redis_url.clone()),
    ];

    let (code, json) = check(&env);

    assert_eq!(code, Some(1), "{json:#}");
    assert_eq!(at_level(&json, "error"), ["redis.ping"], "{json:#}");
    let ping = finding(&json, "redis.ping", None);
    assert!(
        ping["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("redis at {redis_url} is unreachable: ")),
        "{ping:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_2_on_invalid_settings() {
    let missing = walcast(&["check", "--json"], &[]);
    assert_eq!(missing.code, Some(2), "{}", missing.output);
    assert_eq!(
        missing.output,
        "walcast: `database_url` is required: set WALCAST_DATABASE_URL, pass --database-url, or put `database_url = ...` in the config file\n"
    );
    let invalid = walcast(
        &["check", "--firehose", "maybe"],
        &[("WALCAST_DATABASE_URL", "postgres://u@127.0.0.1:1/d".into())],
    );
    assert_eq!(invalid.code, Some(2), "{}", invalid.output);
    assert_eq!(
        invalid.output,
        "walcast: invalid value for `firehose` (from flag --firehose): expected true or false, got \"maybe\"\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_applies_twice_and_walcast_streams_as_the_role_it_creates() {
    let stack = Stack::start().await;
    stack.pg.create_database("fresh").await;
    let admin = stack.pg.url("postgres", "fresh");
    // scram_user: the harness makes this role authenticate with a password.
    let args = ["--role", "scram_user", "--auth-helpers"];

    let first = setup(admin.clone(), &args);
    assert_eq!(first.code, Some(0), "{}", first.output);
    // Yesterday to three days ahead, UTC.
    let partitions: String = stack
        .client
        .query(
            "SELECT 'realtime.messages partitions: created partition realtime.messages_'
                    || to_char((now() AT TIME ZONE 'UTC')::date + n, 'YYYY_MM_DD') || E'\\n'
             FROM generate_series(-1, 3) n ORDER BY n",
            &[],
        )
        .await
        .expect("partition names")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    assert_eq!(
        first.output,
        format!("sql/publication.sql: created publication supabase_realtime (empty: add tables with ALTER PUBLICATION supabase_realtime ADD TABLE ...)
sql/role.sql: created role scram_user (LOGIN REPLICATION NOINHERIT; set its password: ALTER ROLE scram_user PASSWORD ...)
sql/role.sql: created role anon (NOLOGIN NOINHERIT)
sql/role.sql: granted anon to scram_user (it may SET ROLE anon)
sql/role.sql: created role authenticated (NOLOGIN NOINHERIT)
sql/role.sql: granted authenticated to scram_user (it may SET ROLE authenticated)
sql/role.sql: role scram_user may connect to database fresh
sql/rls.sql: created type walcast.rls_subject
sql/rls.sql: role scram_user may call walcast.visible_rows
sql/realtime.sql: created role supabase_realtime_admin (NOLOGIN NOINHERIT; owns realtime.messages)
sql/realtime.sql: granted supabase_realtime_admin to scram_user (for partitions and authorization probes)
sql/realtime.sql: created schema realtime
sql/realtime.sql: granted usage on schema realtime to anon, authenticated
sql/realtime.sql: created table realtime.messages (partitioned by day, row level security enabled, no policies yet: private channels are refused until you add some)
sql/realtime.sql: granted select, insert, update on realtime.messages to anon, authenticated
sql/realtime.sql: created function realtime.topic()
sql/realtime.sql: created function realtime.send(payload, event, topic, private)
sql/realtime.sql: created function realtime.send_binary(payload, event, topic, private)
sql/realtime.sql: created function realtime.broadcast_changes(...)
sql/realtime.sql: created publication supabase_realtime_messages_publication for table realtime.messages
sql/auth_helpers.sql: created schema auth
sql/auth_helpers.sql: created function auth.uid()
sql/auth_helpers.sql: created function auth.role()
sql/auth_helpers.sql: created function auth.jwt()
{partitions}done. next: give role \"scram_user\" a password (psql: \\password scram_user), allow it in pg_hba.conf for this database and for replication, put it in database_url, and run walcast check
")
    );
    let second = setup(admin, &args);
    assert_eq!(second.code, Some(0), "{}", second.output);
    assert_eq!(
        second.output,
        "sql/publication.sql: publication supabase_realtime exists; left unchanged
sql/role.sql: role scram_user exists with LOGIN REPLICATION; left unchanged
sql/role.sql: role scram_user is already a member of anon
sql/role.sql: role scram_user is already a member of authenticated
sql/role.sql: role scram_user may connect to database fresh
sql/rls.sql: schema \"walcast\" already exists, skipping
sql/rls.sql: type walcast.rls_subject exists; left unchanged
sql/rls.sql: role scram_user may call walcast.visible_rows
sql/realtime.sql: role supabase_realtime_admin exists
sql/realtime.sql: role scram_user is a member of supabase_realtime_admin
sql/realtime.sql: schema realtime exists
sql/realtime.sql: granted usage on schema realtime to anon, authenticated
sql/realtime.sql: table realtime.messages exists; left unchanged
sql/realtime.sql: granted select, insert, update on realtime.messages to anon, authenticated
sql/realtime.sql: function realtime.topic() exists; left unchanged
sql/realtime.sql: function realtime.send(jsonb, text, text, boolean) exists; left unchanged
sql/realtime.sql: function realtime.send_binary(bytea, text, text, boolean) exists; left unchanged
sql/realtime.sql: function realtime.broadcast_changes(...) exists; left unchanged
sql/realtime.sql: publication supabase_realtime_messages_publication exists; left unchanged
sql/auth_helpers.sql: schema auth exists
sql/auth_helpers.sql: function auth.uid() exists; left unchanged
sql/auth_helpers.sql: function auth.role() exists; left unchanged
sql/auth_helpers.sql: function auth.jwt() exists; left unchanged
done. next: give role \"scram_user\" a password (psql: \\password scram_user), allow it in pg_hba.conf for this database and for replication, put it in database_url, and run walcast check
"
    );

    let fresh = stack.pg.client("fresh").await;
    let role = fresh
        .query_one(
            "SELECT rolsuper, rolreplication, rolcanlogin, rolinherit, rolbypassrls,
                    ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                          WHERE m.member = r.oid ORDER BY 1)
             FROM pg_roles r WHERE rolname = 'scram_user'",
            &[],
        )
        .await
        .expect("role");
    assert_eq!(
        (
            role.get::<_, bool>(0),
            role.get::<_, bool>(1),
            role.get::<_, bool>(2),
            role.get::<_, bool>(3),
            role.get::<_, bool>(4),
            role.get::<_, Vec<String>>(5)
        ),
        (
            false,
            true,
            true,
            false,
            false,
            vec![
                "anon".to_owned(),
                "authenticated".to_owned(),
                // Partitions and authorization probes (sql/realtime.sql).
                "supabase_realtime_admin".to_owned()
            ]
        )
    );
    let claims = fresh
        .query_one(
            r#"SELECT set_config('request.jwt.claims', '{"sub": "8d0fd2b8-8f3c-4a3b-9a1e-4b1b6c9b2d11", "role": "authenticated"}', false),
                      auth.uid()::text, auth.role(), auth.jwt() ->> 'sub'"#,
            &[],
        )
        .await
        .expect("auth helpers");
    assert_eq!(
        (
            claims.get::<_, String>(1),
            claims.get::<_, String>(2),
            claims.get::<_, String>(3)
        ),
        (
            "8d0fd2b8-8f3c-4a3b-9a1e-4b1b6c9b2d11".to_owned(),
            "authenticated".to_owned(),
            "8d0fd2b8-8f3c-4a3b-9a1e-4b1b6c9b2d11".to_owned()
        )
    );

    fresh
        .batch_execute(
            "ALTER ROLE scram_user PASSWORD 'correct horse';
             CREATE TABLE items (id bigint PRIMARY KEY, name text);
             ALTER PUBLICATION supabase_realtime ADD TABLE items;",
        )
        .await
        .expect("password and table");
    let env = env_with_url(
        &stack,
        stack
            .pg
            .url_with_password("scram_user", "correct horse", "fresh"),
    );
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    // The slot is active a moment before its walsender shows in
    // pg_stat_replication (seen once on PostgreSQL 14 in CI).
    let mut walsender = None;
    for _ in 0..100 {
        walsender = stack
            .client
            .query_opt(
                "SELECT r.usename::text, s.database::text FROM pg_stat_replication r
                 JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = 'walcast'",
                &[],
            )
            .await
            .expect("pg_stat_replication");
        if walsender.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let walsender = walsender.expect("the walsender in pg_stat_replication within 10 s");
    assert_eq!(
        (walsender.get::<_, String>(0), walsender.get::<_, String>(1)),
        ("scram_user".to_owned(), "fresh".to_owned())
    );

    fresh
        .batch_execute("INSERT INTO items VALUES (1, 'as scram_user')")
        .await
        .expect("insert");
    let messages = firehose.wait_for(1, WAIT, &daemon).await;
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0]["data"]["type"], "INSERT");
    assert_eq!(messages[0]["data"]["table"], "items");
    assert_eq!(
        messages[0]["data"]["record"],
        serde_json::json!({"id": 1, "name": "as scram_user"})
    );

    // check agrees, as the same role; a wrong password is reported as such.
    // (The test Redis has no password.)
    let (code, json) = check(&env);
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(at_level(&json, "warning"), ["redis.auth"], "{json:#}");
    assert_finding(
        &json,
        "role.privileges",
        None,
        "ok",
        "role scram_user has REPLICATION and is not a superuser",
        None,
    );
    let wrong = env_with_url(
        &stack,
        stack.pg.url_with_password("scram_user", "wrong", "fresh"),
    );
    let (code, json) = check(&wrong);
    assert_eq!(code, Some(1), "{json:#}");
    let connect = finding(&json, "postgres.connect", None);
    assert_eq!(connect["level"], "error");
    assert!(
        connect["message"]
            .as_str()
            .unwrap()
            .ends_with("FATAL: password authentication failed for user \"scram_user\""),
        "{connect:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_a_superuser_role_and_changes_nothing() {
    let pg = TestPostgres::start();
    pg.create_database("fresh").await;

    let refused = setup(pg.url("postgres", "fresh"), &["--role", "postgres"]);

    assert_eq!(refused.code, Some(1), "{}", refused.output);
    assert_eq!(
        refused.output,
        "walcast: sql/role.sql failed, nothing was changed: ERROR: role postgres is a superuser; walcast must not run as one (hint: choose another role name (walcast setup --role NAME), or ALTER ROLE ... NOSUPERUSER yourself)\n"
    );
    let fresh = pg.client("fresh").await;
    let row = fresh
        .query_one(
            "SELECT (SELECT count(*) FROM pg_publication), (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated')), (SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres')",
            &[],
        )
        .await
        .expect("catalog");
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, bool>(2)
        ),
        (0, 0, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_helpers_never_replace_existing_functions() {
    let pg = TestPostgres::start();
    pg.create_database("supabase_like").await;
    let client = pg.client("supabase_like").await;
    client
        .batch_execute(
            "CREATE SCHEMA auth;
             CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
               AS $$ SELECT '00000000-0000-0000-0000-000000000001'::uuid $$;",
        )
        .await
        .expect("existing auth.uid()");

    let applied = setup(pg.url("postgres", "supabase_like"), &["--auth-helpers"]);

    assert_eq!(applied.code, Some(0), "{}", applied.output);
    let helpers: Vec<&str> = applied
        .output
        .lines()
        .filter(|l| l.starts_with("sql/auth_helpers.sql: "))
        .collect();
    assert_eq!(
        helpers,
        [
            "sql/auth_helpers.sql: schema auth exists",
            "sql/auth_helpers.sql: function auth.uid() exists; left unchanged",
            "sql/auth_helpers.sql: created function auth.role()",
            "sql/auth_helpers.sql: created function auth.jwt()",
        ]
    );
    let uid: String = client
        .query_one(
            r#"SELECT set_config('request.jwt.claims', '{"sub": "8d0fd2b8-8f3c-4a3b-9a1e-4b1b6c9b2d11"}', false), auth.uid()::text"#,
            &[],
        )
        .await
        .expect("auth.uid()")
        .get(1);
    assert_eq!(uid, "00000000-0000-0000-0000-000000000001");
}

#[test]
fn example_configs_are_valid_settings() {
    use walcast::config::{Layer, LogFormat, Settings, SslMode};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");

    let dev = Layer::from_toml_file(&dir.join("dev.toml")).expect("config/dev.toml");
    let dev = Settings::resolve(&[dev]).expect("dev settings");
    assert_eq!(
        dev.database_url.to_string(),
        "postgres://postgres@127.0.0.1:54329/postgres"
    );
    assert_eq!(dev.database_url.ssl_mode, SslMode::Disable);
    assert_eq!(dev.redis_url, "redis://127.0.0.1:63799");
    assert!(dev.firehose);
    assert_eq!(dev.log_format, LogFormat::Text);

    // The sidecar's secrets come from the environment, as documented in it.
    let sidecar = Layer::from_toml_file(&dir.join("sidecar.toml")).expect("config/sidecar.toml");
    let env = Layer::from_env(|name| {
        (name == "WALCAST_DATABASE_URL").then(|| {
            "postgres://walcast:secret@db.internal:5432/postgres?sslmode=verify-full&sslrootcert=/etc/walcast/db-ca.pem".to_owned()
        })
    });
    let sidecar = Settings::resolve(&[sidecar, env]).expect("sidecar settings");
    assert_eq!(sidecar.database_url.ssl_mode, SslMode::VerifyFull);
    assert_eq!(sidecar.database_url.user, "walcast");
    assert_eq!(sidecar.tenant, "tenant-a");
    assert!(!sidecar.firehose);
    assert_eq!(sidecar.log_format, LogFormat::Json);
}

const RLS_SQL_MISSING: &str = "row level security cannot be checked: walcast.visible_rows (sql/rls.sql version 3) is not installed; apply sql/rls.sql with walcast setup --admin-url ... (or let walcast run install it as a role that may create the schema walcast)";

/// Without `sql/rls.sql`, and run as a role that may not install it, the
/// daemon refuses subscriptions to a table with row level security (saying
/// what to run) and accepts the others; `check` reports an error. Once an
/// administrator applies it, the same subscription is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_rls_sql_subscriptions_to_rls_tables_are_refused_and_check_says_so() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, owner text);
             ALTER TABLE items ENABLE ROW LEVEL SECURITY;
             CREATE TABLE open_items (id bigint PRIMARY KEY, owner text);
             ALTER PUBLICATION supabase_realtime ADD TABLE items, open_items;",
        )
        .await
        .expect("schema");
    let applied = setup(stack.pg.url("postgres", DB), &[]);
    assert_eq!(applied.code, Some(0), "{}", applied.output);
    stack
        .client
        .batch_execute(
            "DROP SCHEMA walcast CASCADE; GRANT SELECT ON items, open_items TO authenticated",
        )
        .await
        .expect("drop the rls sql");
    let mut env = env_with_url(&stack, stack.pg.url("walcast", DB));
    env.retain(|(k, _)| *k != "WALCAST_FIREHOSE");

    let (code, json) = check(&env);
    assert_eq!(code, Some(1), "{json:#}");
    assert_finding(
        &json,
        "rls.sql",
        None,
        "error",
        &format!(
            "{RLS_SQL_MISSING}; subscriptions to published tables with row level security are refused until then"
        ),
        Some(
            "walcast setup --admin-url 'postgres://ADMIN@HOST/DB' (applies sql/rls.sql), or psql -f sql/rls.sql as an administrator",
        ),
    );

    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let mut gateway = BusGateway::start(&stack.redis.url(), "default", "g1").await;
    let subscribe = |id: &str, table: &str| {
        json!({
            "id": id, "topic": format!("realtime:{id}"), "schema": "public", "table": table,
            "event": "*", "filter": null, "select": null,
            "claims": {"sub": "u1", "role": "authenticated"}, "role": "authenticated",
        })
    };
    gateway.subscribe(subscribe("secured", "items")).await;
    gateway.subscribe(subscribe("open", "open_items")).await;
    let refused = gateway.reply("secured", 0).await;
    assert_eq!(
        (refused["type"].as_str(), refused["message"].as_str()),
        (Some("rejected"), Some(RLS_SQL_MISSING)),
        "{refused}\n{}",
        daemon.log()
    );
    assert_eq!(gateway.reply("open", 0).await["type"], "subscribed");
    assert!(
        daemon
            .log()
            .contains("could not install sql/rls.sql as this role"),
        "{}",
        daemon.log()
    );

    let applied = setup(stack.pg.url("postgres", DB), &[]);
    assert_eq!(applied.code, Some(0), "{}", applied.output);
    // The daemon reads the catalog afresh after at most a couple of
    // seconds: subscribe again until it accepts.
    let mut answer = Value::Null;
    for attempt in 1..=10 {
        gateway.subscribe(subscribe("secured", "items")).await;
        answer = gateway.reply("secured", attempt).await;
        if answer["type"] == "subscribed" {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(answer["type"], "subscribed", "{answer}\n{}", daemon.log());
}

/// A daemon whose role may create the schema installs `sql/rls.sql`
/// itself at start, and checks RLS with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_installs_the_rls_sql_itself_where_its_role_may() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE ROLE authenticated NOLOGIN;
             CREATE TABLE items (id bigint PRIMARY KEY, owner text);
             ALTER TABLE items ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON items FOR SELECT USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
             GRANT SELECT ON items TO authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE items;",
        )
        .await
        .expect("schema");
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_FIREHOSE");
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let version: i32 = stack
        .client
        .query_one("SELECT walcast.sql_version()", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()))
        .get(0);
    assert_eq!(version, walcast::rls::install::SQL_VERSION);
    assert!(
        daemon.log().contains("installed sql/rls.sql"),
        "{}",
        daemon.log()
    );
    let mut gateway = BusGateway::start(&stack.redis.url(), "default", "g1").await;
    gateway
        .subscribe(json!({
            "id": "u1", "topic": "realtime:u1", "schema": "public", "table": "items",
            "event": "INSERT", "filter": null, "select": null,
            "claims": {"sub": "u1", "role": "authenticated"}, "role": "authenticated",
        }))
        .await;
    assert_eq!(gateway.reply("u1", 0).await["type"], "subscribed");
    stack
        .client
        .batch_execute("INSERT INTO items VALUES (1, 'u2'), (2, 'u1')")
        .await
        .expect("insert");
    let events = gateway.wait_events(1).await;
    assert_eq!(events[0]["data"]["record"], json!({"id": 2, "owner": "u1"}));
}
