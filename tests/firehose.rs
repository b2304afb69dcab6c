//! The exact bus messages for each kind of change, end to end: real
//! Postgres, the walcast binary, real Redis.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use crate::support::stack::{Firehose, Stack, check_order_and_duplicates};
use crate::support::{Daemon, TestRedis};

const WAIT: Duration = Duration::from_secs(60);

/// What Postgres says about a committed transaction.
struct Committed {
    xid: u32,
    /// `commit_timestamp` as the payload must show it.
    timestamp: String,
}

async fn commit(client: &mut Client, sql: &str) -> Committed {
    let tx = client.transaction().await.expect("begin");
    let xid: String = tx
        .query_one("SELECT txid_current()::text", &[])
        .await
        .expect("txid")
        .get(0);
    tx.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    tx.commit().await.expect("commit");
    let row = client
        .query_one(
            "SELECT to_char(pg_xact_commit_timestamp($1::text::xid) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            &[&xid],
        )
        .await
        .expect("commit timestamp");
    Committed {
        xid: xid.parse().expect("xid"),
        timestamp: row.get(0),
    }
}

/// A running daemon with a subscriber, after `setup` SQL.
async fn start(setup: &str) -> (Stack, Firehose, Daemon) {
    let stack = Stack::start().await;
    stack.client.batch_execute(setup).await.expect("setup sql");
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let daemon = stack.spawn_daemon();
    stack.wait_streaming("walcast", &daemon).await;
    (stack, firehose, daemon)
}

/// The expected message text; `lsn` is taken from what arrived (it is
/// checked separately: equal within a transaction, increasing across them).
fn message(lsn: &str, seq: u32, committed: &Committed, data: &str) -> String {
    let data = data.replace("$TS", &committed.timestamp);
    format!(
        r#"{{"v":1,"lsn":"{lsn}","seq":{seq},"xid":{},"data":{data}}}"#,
        committed.xid
    )
}

fn lsns(raw: &[String]) -> Vec<String> {
    raw.iter()
        .map(|m| {
            let v: Value = serde_json::from_str(m).expect("json");
            v["lsn"].as_str().expect("lsn").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_under_default_identity() {
    let (mut stack, firehose, daemon) = start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric, tags jsonb, ok bool, score float8);
         ALTER PUBLICATION supabase_realtime ADD TABLE items;",
    )
    .await;
    let c = &mut stack.client;
    let t1 = commit(c, r#"INSERT INTO items VALUES (1, 'say "hi"\', 1.50, '{"b": [1, 2], "a": null}', true, 'NaN')"#).await;
    let t2 = commit(c, "UPDATE items SET name = 'b', score = -0.5 WHERE id = 1").await;
    let t3 = commit(c, "UPDATE items SET id = 2 WHERE id = 1").await;
    let t4 = commit(c, "DELETE FROM items WHERE id = 2").await;
    firehose.wait_for(4, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    let columns = r#"{"columns":[{"name":"id","type":"int8"},{"name":"name","type":"text"},{"name":"price","type":"numeric"},{"name":"tags","type":"jsonb"},{"name":"ok","type":"bool"},{"name":"score","type":"float8"}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"items""#;
    assert_eq!(
        raw,
        vec![
            message(
                &lsn[0],
                0,
                &t1,
                &format!(
                    r#"{columns},"record":{{"id":1,"name":"say \"hi\"\\","price":1.50,"tags":{{"a": null, "b": [1, 2]}},"ok":true,"score":"NaN"}},"type":"INSERT"}}"#
                )
            ),
            message(
                &lsn[1],
                0,
                &t2,
                &format!(
                    r#"{columns},"old_record":{{"id":1}},"record":{{"id":1,"name":"b","price":1.50,"tags":{{"a": null, "b": [1, 2]}},"ok":true,"score":-0.5}},"type":"UPDATE"}}"#
                )
            ),
            message(
                &lsn[2],
                0,
                &t3,
                &format!(
                    r#"{columns},"old_record":{{"id":1}},"record":{{"id":2,"name":"b","price":1.50,"tags":{{"a": null, "b": [1, 2]}},"ok":true,"score":-0.5}},"type":"UPDATE"}}"#
                )
            ),
            message(
                &lsn[3],
                0,
                &t4,
                &format!(r#"{columns},"old_record":{{"id":2}},"type":"DELETE"}}"#)
            ),
        ]
    );
    check_order_and_duplicates(&raw);
}

/// A value big and random enough to be stored out of line (TOAST).
const TOASTED: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) i)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_absent_under_default_and_filled_under_full() {
    let (mut stack, firehose, daemon) = start(
        "CREATE TABLE docs_default (id int PRIMARY KEY, title text, body text);
         CREATE TABLE docs_full (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;
         ALTER PUBLICATION supabase_realtime ADD TABLE docs_default, docs_full;",
    )
    .await;
    let body: String = stack
        .client
        .query_one(&format!("SELECT {TOASTED}"), &[])
        .await
        .expect("body")
        .get(0);
    let c = &mut stack.client;
    let t1 = commit(c, &format!("INSERT INTO docs_default VALUES (1, 'a', {TOASTED}); INSERT INTO docs_full VALUES (1, 'a', {TOASTED});")).await;
    let t2 = commit(c, "UPDATE docs_default SET title = 'b' WHERE id = 1; UPDATE docs_full SET title = 'b' WHERE id = 1;").await;
    let t3 = commit(c, "DELETE FROM docs_full WHERE id = 1").await;
    firehose.wait_for(5, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    let columns = |table: &str| {
        format!(
            r#"{{"columns":[{{"name":"id","type":"int4"}},{{"name":"title","type":"text"}},{{"name":"body","type":"text"}}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"{table}""#
        )
    };
    let (d, f) = (columns("docs_default"), columns("docs_full"));
    assert_eq!(
        raw,
        vec![
            message(
                &lsn[0],
                0,
                &t1,
                &format!(
                    r#"{d},"record":{{"id":1,"title":"a","body":"{body}"}},"type":"INSERT"}}"#
                )
            ),
            message(
                &lsn[1],
                1,
                &t1,
                &format!(
                    r#"{f},"record":{{"id":1,"title":"a","body":"{body}"}},"type":"INSERT"}}"#
                )
            ),
            // DEFAULT: the unchanged TOASTed body is not in the WAL, so it is absent.
            message(
                &lsn[2],
                0,
                &t2,
                &format!(
                    r#"{d},"old_record":{{"id":1}},"record":{{"id":1,"title":"b"}},"type":"UPDATE"}}"#
                )
            ),
            // FULL: the old row supplies it.
            message(
                &lsn[3],
                1,
                &t2,
                &format!(
                    r#"{f},"old_record":{{"id":1,"title":"a","body":"{body}"}},"record":{{"id":1,"title":"b","body":"{body}"}},"type":"UPDATE"}}"#
                )
            ),
            message(
                &lsn[4],
                0,
                &t3,
                &format!(
                    r#"{f},"old_record":{{"id":1,"title":"b","body":"{body}"}},"type":"DELETE"}}"#
                )
            ),
        ]
    );
    assert_eq!(
        (lsn[0] == lsn[1], lsn[2] == lsn[3]),
        (true, true),
        "one lsn per transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_primary_key_and_truncate() {
    let (mut stack, firehose, daemon) = start(
        "CREATE TABLE logs (at int, msg text);
         CREATE TABLE audit (at int, msg text);
         ALTER TABLE audit REPLICA IDENTITY FULL;
         CREATE TABLE other (id int PRIMARY KEY);
         ALTER PUBLICATION supabase_realtime ADD TABLE logs, audit, other;",
    )
    .await;
    let c = &mut stack.client;
    let t1 = commit(
        c,
        "INSERT INTO logs VALUES (1, 'x'); INSERT INTO audit VALUES (1, 'y');",
    )
    .await;
    let t2 = commit(c, "UPDATE audit SET msg = 'z'; DELETE FROM audit;").await;
    let t3 = commit(c, "TRUNCATE logs, other").await;
    firehose.wait_for(6, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    let cols = |table: &str| {
        format!(
            r#"{{"columns":[{{"name":"at","type":"int4"}},{{"name":"msg","type":"text"}}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"{table}""#
        )
    };
    let other = r#"{"columns":[{"name":"id","type":"int4"}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"other""#;
    // Without a primary key, INSERT and UPDATE carry Supabase's 400 error
    // instead of the row; DELETE (possible only under FULL) is delivered.
    let no_pk = |table: &str, kind: &str| {
        let old = if kind == "UPDATE" {
            r#","old_record":{}"#
        } else {
            ""
        };
        format!(
            r#"{{"columns":[],"commit_timestamp":null,"errors":["Error 400: Bad Request, no primary key"],"schema":"public","table":"{table}"{old},"record":{{}},"type":"{kind}"}}"#
        )
    };
    assert_eq!(
        raw,
        vec![
            message(&lsn[0], 0, &t1, &no_pk("logs", "INSERT")),
            message(&lsn[1], 1, &t1, &no_pk("audit", "INSERT")),
            message(&lsn[2], 0, &t2, &no_pk("audit", "UPDATE")),
            message(
                &lsn[3],
                1,
                &t2,
                &format!(
                    r#"{},"old_record":{{"at":1,"msg":"z"}},"type":"DELETE"}}"#,
                    cols("audit")
                )
            ),
            message(
                &lsn[4],
                0,
                &t3,
                &format!(r#"{},"type":"TRUNCATE"}}"#, cols("logs"))
            ),
            message(&lsn[5], 1, &t3, &format!(r#"{other},"type":"TRUNCATE"}}"#)),
        ]
    );
    check_order_and_duplicates(&raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_several_tables_keeps_wal_order() {
    let (mut stack, firehose, daemon) = start(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         CREATE TABLE unpublished (id int PRIMARY KEY);
         ALTER PUBLICATION supabase_realtime ADD TABLE a, b;",
    )
    .await;
    let c = &mut stack.client;
    let t = commit(
        c,
        "INSERT INTO a VALUES (1, 'a1'); INSERT INTO unpublished VALUES (1); INSERT INTO b VALUES (1, 'b1');
         UPDATE a SET v = 'a2' WHERE id = 1; DELETE FROM b WHERE id = 1;",
    )
    .await;
    firehose.wait_for(4, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    assert!(lsn.iter().all(|l| *l == lsn[0]), "one commit lsn: {lsn:?}");
    let cols = |table: &str| {
        format!(
            r#"{{"columns":[{{"name":"id","type":"int4"}},{{"name":"v","type":"text"}}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"{table}""#
        )
    };
    assert_eq!(
        raw,
        vec![
            message(
                &lsn[0],
                0,
                &t,
                &format!(
                    r#"{},"record":{{"id":1,"v":"a1"}},"type":"INSERT"}}"#,
                    cols("a")
                )
            ),
            message(
                &lsn[0],
                1,
                &t,
                &format!(
                    r#"{},"record":{{"id":1,"v":"b1"}},"type":"INSERT"}}"#,
                    cols("b")
                )
            ),
            message(
                &lsn[0],
                2,
                &t,
                &format!(
                    r#"{},"old_record":{{"id":1}},"record":{{"id":1,"v":"a2"}},"type":"UPDATE"}}"#,
                    cols("a")
                )
            ),
            message(
                &lsn[0],
                3,
                &t,
                &format!(r#"{},"old_record":{{"id":1}},"type":"DELETE"}}"#, cols("b"))
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_row_transaction_arrives_whole_and_in_order() {
    const ROWS: usize = 100_000;
    let (mut stack, firehose, daemon) = start(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         ALTER PUBLICATION supabase_realtime ADD TABLE big;",
    )
    .await;
    let t = commit(
        &mut stack.client,
        &format!("INSERT INTO big SELECT i, 'row ' || i FROM generate_series(1, {ROWS}) i"),
    )
    .await;
    firehose
        .wait_for(ROWS, Duration::from_secs(300), &daemon)
        .await;
    let raw = firehose.raw();
    assert_eq!(raw.len(), ROWS, "no duplicates without a restart");
    let lsn = lsns(&raw[..1])[0].clone();
    let cols = r#"{"columns":[{"name":"id","type":"int4"},{"name":"v","type":"text"}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"big""#;
    for (i, text) in raw.iter().enumerate() {
        let expected = message(
            &lsn,
            i as u32,
            &t,
            &format!(
                r#"{cols},"record":{{"id":{},"v":"row {}"}},"type":"INSERT"}}"#,
                i + 1,
                i + 1
            ),
        );
        assert_eq!(*text, expected, "message {i}");
    }
    // Once everything is published, the slot acknowledges past the commit.
    let end = stack.current_wal().await;
    crate::support::eventually(
        "confirmed_flush_lsn reaches the end of the transaction",
        WAIT,
        || async {
            stack
                .confirmed_flush("walcast")
                .await
                .is_some_and(|l| l >= end)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_types_are_looked_up_in_the_catalog() {
    let (mut stack, firehose, daemon) = start(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TYPE pair AS (a int, b text);
         CREATE TYPE weather AS ENUM ('sun', 'rain');
         CREATE FUNCTION weather_json(weather) RETURNS json LANGUAGE sql IMMUTABLE AS $$ SELECT json_build_object('weather', $1::text) $$;
         CREATE CAST (weather AS json) WITH FUNCTION weather_json(weather);
         CREATE TABLE typed (id posint PRIMARY KEY, m mood, moods mood[], p pair, ps pair[], at timestamptz, f float8, ch char(3), w weather);
         ALTER PUBLICATION supabase_realtime ADD TABLE typed;",
    )
    .await;
    let t = commit(
        &mut stack.client,
        r#"INSERT INTO typed VALUES (1, 'happy', '{sad,happy}', '(1,"x y")', ARRAY['(2,)'::pair], '2024-01-02 03:04:05.5+02', 1e20, 'ab', 'rain')"#,
    )
    .await;
    firehose.wait_for(1, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    assert_eq!(
        raw,
        vec![message(
            &lsn[0],
            0,
            &t,
            r#"{"columns":[{"name":"id","type":"posint"},{"name":"m","type":"mood"},{"name":"moods","type":"_mood"},{"name":"p","type":"pair"},{"name":"ps","type":"_pair"},{"name":"at","type":"timestamptz"},{"name":"f","type":"float8"},{"name":"ch","type":"bpchar"},{"name":"w","type":"weather"}],"commit_timestamp":"$TS","errors":null,"schema":"public","table":"typed","record":{"id":1,"m":"happy","moods":["sad","happy"],"p":{"a":1,"b":"x y"},"ps":[{"a":2,"b":null}],"at":"2024-01-02T01:04:05.5+00:00","f":100000000000000000000,"ch":"ab ","w":{"weather": "rain"}},"type":"INSERT"}"#
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_keep_only_small_values_and_say_413() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, owner text, body text); ALTER PUBLICATION supabase_realtime ADD TABLE notes;")
        .await
        .expect("setup");
    let firehose = Firehose::subscribe(&stack.redis.url(), "default").await;
    let mut env = stack.env();
    env.push(("WALCAST_MAX_RECORD_BYTES", "200".into()));
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let mut client = stack.pg.client(crate::support::stack::DB).await;
    let small = commit(&mut client, "INSERT INTO notes VALUES (1, 'u1', 'short')").await;
    let large = commit(
        &mut client,
        "INSERT INTO notes VALUES (2, 'u1', repeat('x', 300))",
    )
    .await;
    firehose.wait_for(2, WAIT, &daemon).await;
    let raw = firehose.raw();
    let lsn = lsns(&raw);
    let cols = r#"{"columns":[{"name":"id","type":"int4"},{"name":"owner","type":"text"},{"name":"body","type":"text"}],"commit_timestamp":"$TS""#;
    assert_eq!(
        raw,
        vec![
            message(
                &lsn[0],
                0,
                &small,
                &format!(
                    r#"{cols},"errors":null,"schema":"public","table":"notes","record":{{"id":1,"owner":"u1","body":"short"}},"type":"INSERT"}}"#
                )
            ),
            message(
                &lsn[1],
                0,
                &large,
                &format!(
                    r#"{cols},"errors":["Error 413: Payload Too Large"],"schema":"public","table":"notes","record":{{"id":2,"owner":"u1"}},"type":"INSERT"}}"#
                )
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firehose_reaches_a_redis_that_speaks_only_tls_to_walcast() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text); ALTER PUBLICATION supabase_realtime ADD TABLE notes;")
        .await
        .expect("setup sql");
    let tls = TestRedis::start_tls();
    // The subscriber listens on the same server's plain port.
    let firehose = Firehose::subscribe(&tls.url(), "default").await;
    let mut env = stack.env();
    env.retain(|(k, _)| *k != "WALCAST_REDIS_URL");
    env.push(("WALCAST_REDIS_URL", tls.tls_url()));
    // The test CA, as an operator points rustls at a private CA.
    env.push(("SSL_CERT_FILE", tls.ca_file().display().to_string()));
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (1, 'over tls')")
        .await
        .expect("insert");
    let events = firehose.wait_for(1, WAIT, &daemon).await;
    assert_eq!(
        events[0]["data"]["record"],
        serde_json::json!({"id": 1, "body": "over tls"}),
        "{}",
        daemon.log()
    );
}
