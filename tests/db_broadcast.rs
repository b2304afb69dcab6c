//! Broadcast from Database (issue 17): `walcast setup` creates Supabase's
//! `realtime` schema on plain Postgres, and rows written by
//! `realtime.send`, `realtime.send_binary` and `realtime.broadcast_changes`
//! reach sockets through the daemon's slot, shaped as Supabase sends them
//! (`../shared/reference/broadcast-presence.md` §2.4, §5).

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::check::walcast;
use crate::gateway::Gateway;
use crate::rooms::{
    broadcast_config, join_v1, join_v2, next, nothing, room_subscribed, user_broadcast_with_meta,
};
use crate::support::stack::{DB, Stack};
use crate::support::{Daemon, eventually};

/// `walcast setup` on the stack's database (as its superuser); its output.
pub(crate) fn setup(stack: &Stack) -> String {
    let applied = walcast(
        &["setup"],
        &[("WALCAST_ADMIN_DATABASE_URL", stack.pg.url("postgres", DB))],
    );
    assert_eq!(applied.code, Some(0), "{}", applied.output);
    applied.output
}

/// The daemon's environment: no firehose, logged in as the `walcast` role
/// `walcast setup` created.
pub(crate) fn daemon_env(stack: &Stack) -> Vec<(&'static str, String)> {
    let mut env = stack.gateway_env();
    env.retain(|(k, _)| *k != "WALCAST_DATABASE_URL");
    env.push(("WALCAST_DATABASE_URL", stack.pg.url("walcast", DB)));
    env
}

/// A stack after `walcast setup` and `sql` (run as the superuser), a
/// streaming daemon as the `walcast` role, and a gateway.
pub(crate) async fn start_with(sql: &str) -> (Stack, Daemon, Gateway) {
    let stack = Stack::start().await;
    let output = setup(&stack);
    // Yesterday to three days ahead.
    assert_eq!(
        output
            .matches("created partition realtime.messages_")
            .count(),
        5,
        "{output}"
    );
    stack.client.batch_execute(sql).await.expect("sql");
    let daemon = Daemon::spawn(&["run"], &daemon_env(&stack));
    stack.wait_streaming("walcast", &daemon).await;
    let gateway = Gateway::spawn(&stack.redis.url()).await;
    (stack, daemon, gateway)
}

async fn start() -> (Stack, Daemon, Gateway) {
    start_with("").await
}

/// The `id` of the newest message of `topic`.
pub(crate) async fn last_id(stack: &Stack, topic: &str) -> String {
    stack
        .client
        .query_one(
            "SELECT id::text FROM realtime.messages WHERE topic = $1 ORDER BY inserted_at DESC LIMIT 1",
            &[&topic],
        )
        .await
        .expect("message id")
        .get(0)
}

/// A binary frame's bytes.
pub(crate) fn binary(frame: Message) -> Vec<u8> {
    match frame {
        Message::Binary(bytes) => bytes.to_vec(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// A text frame as JSON.
fn text(frame: Message) -> Value {
    match frame {
        Message::Text(text) => serde_json::from_str(&text).expect("JSON frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_broadcasts_reach_public_topics_as_supabase_sends_them() {
    let (stack, daemon, gateway) = start().await;
    let mut v2 = gateway.connect(Some("2.0.0")).await;
    let mut v1 = gateway.connect(Some("1.0.0")).await;
    join_v2(
        &mut v2,
        "1",
        "realtime:room1",
        broadcast_config(false, false),
    )
    .await;
    join_v1(
        &mut v1,
        "1",
        "realtime:room1",
        broadcast_config(false, false),
    )
    .await;
    room_subscribed(&stack.redis, "room1", 1).await;

    // realtime.send: JSON, with the row's id in the payload and in meta.
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"x": 1}', 'cursor', 'room1', false)"#)
        .await
        .expect("send");
    let id = last_id(&stack, "room1").await;
    let meta = format!(r#"{{"id":"{id}"}}"#);
    let payload = format!(r#"{{"x": 1, "id": "{id}"}}"#);
    assert_eq!(
        binary(next(&mut v2).await),
        user_broadcast_with_meta(
            "realtime:room1",
            "cursor",
            meta.as_bytes(),
            1,
            payload.as_bytes()
        )
    );
    assert_eq!(
        text(next(&mut v1).await),
        json!({"event": "broadcast", "payload": {"event": "cursor", "meta": {"id": id}, "payload": {"x": 1, "id": id}, "type": "broadcast"}, "ref": null, "topic": "realtime:room1"})
    );

    // realtime.send_binary: bytes to vsn 2.0.0 only; private messages not
    // to the public channel; then a JSON one that both get, in order.
    stack
        .client
        .batch_execute(
            r#"SELECT realtime.send_binary('\x00ff'::bytea, 'blob', 'room1', false);
               SELECT realtime.send('{"secret": true}', 'hidden', 'room1');
               SELECT realtime.send('{"n": 2}', 'after', 'room1', false);"#,
        )
        .await
        .expect("send");
    let ids: Vec<String> = stack
        .client
        .query(
            "SELECT id::text FROM realtime.messages WHERE topic = 'room1' AND NOT private ORDER BY inserted_at, event",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 3);
    // inserted_at is the transaction's start: the two of one statement
    // batch share it, ordered here by event name.
    let (after, blob) = (&ids[1], &ids[2]);
    assert_eq!(
        binary(next(&mut v2).await),
        user_broadcast_with_meta(
            "realtime:room1",
            "blob",
            format!(r#"{{"id":"{blob}"}}"#).as_bytes(),
            0,
            &[0, 255]
        )
    );
    let after_payload = format!(r#"{{"n": 2, "id": "{after}"}}"#);
    assert_eq!(
        binary(next(&mut v2).await),
        user_broadcast_with_meta(
            "realtime:room1",
            "after",
            format!(r#"{{"id":"{after}"}}"#).as_bytes(),
            1,
            after_payload.as_bytes()
        )
    );
    assert_eq!(
        text(next(&mut v1).await),
        json!({"event": "broadcast", "payload": {"event": "after", "meta": {"id": after}, "payload": {"n": 2, "id": after}, "type": "broadcast"}, "ref": null, "topic": "realtime:room1"})
    );
    nothing(&mut v1).await;
    nothing(&mut v2).await;

    // A payload over Supabase's limit is skipped, the next one is not.
    stack
        .client
        .batch_execute(
            r#"SELECT realtime.send(jsonb_build_object('big', repeat('x', 3000500)), 'big', 'room1', false);
               SELECT realtime.send('{"n": 3}', 'last', 'room1', false);"#,
        )
        .await
        .expect("send");
    assert_eq!(text(next(&mut v1).await)["payload"]["event"], json!("last"));
    assert!(
        daemon.log().contains("bytes is over 3000500: not sent"),
        "{}",
        daemon.log()
    );
}

/// `realtime.broadcast_changes` writes Supabase's payload, to a private
/// topic (its `send` defaults to private); sockets get it on a private
/// channel (tests of private channels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_changes_trigger_writes_each_row_change_as_supabase_does() {
    let stack = Stack::start().await;
    setup(&stack);
    stack
        .client
        .batch_execute(GAMES_TRIGGER)
        .await
        .expect("trigger");
    stack
        .client
        .batch_execute(
            "INSERT INTO games VALUES (7, 'chess');
             UPDATE games SET name = 'go' WHERE id = 7;
             DELETE FROM games WHERE id = 7;",
        )
        .await
        .expect("writes");
    let rows = stack
        .client
        .query(
            "SELECT id::text, topic, event, private, extension, payload::text FROM realtime.messages ORDER BY inserted_at",
            &[],
        )
        .await
        .expect("messages");
    let got: Vec<Value> = rows
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            let payload: Value = serde_json::from_str(r.get::<_, &str>(5)).expect("payload");
            assert_eq!(payload["id"], json!(id));
            json!([
                r.get::<_, &str>(1),
                r.get::<_, &str>(2),
                r.get::<_, bool>(3),
                r.get::<_, &str>(4),
                payload
            ])
        })
        .collect();
    let expected: Vec<Value> = [
        ("INSERT", json!({"id": 7, "name": "chess"}), Value::Null),
        (
            "UPDATE",
            json!({"id": 7, "name": "go"}),
            json!({"id": 7, "name": "chess"}),
        ),
        ("DELETE", Value::Null, json!({"id": 7, "name": "go"})),
    ]
    .into_iter()
    .zip(&got)
    .map(|((op, record, old), row)| {
        json!(["games:7", op, true, "broadcast", {
            "id": row[4]["id"], "operation": op, "table": "games", "schema": "public",
            "record": record, "old_record": old}])
    })
    .collect();
    assert_eq!(got, expected);
}

/// Supabase's documented trigger: every change of `games` as a broadcast
/// on `games:<id>`.
pub(crate) const GAMES_TRIGGER: &str = "CREATE TABLE games (id bigint PRIMARY KEY, name text);
     CREATE FUNCTION games_changed() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
     BEGIN
       PERFORM realtime.broadcast_changes('games:' || coalesce(NEW.id, OLD.id)::text,
         TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
       RETURN NULL;
     END $$;
     CREATE TRIGGER games_changed AFTER INSERT OR UPDATE OR DELETE ON games
       FOR EACH ROW EXECUTE FUNCTION games_changed();";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_partitions_ahead_and_drops_those_past_the_retention() {
    let stack = Stack::start().await;
    setup(&stack);
    // An old partition, one the daemon must not touch (not its name
    // pattern), and a missing one ahead.
    stack
        .client
        .batch_execute(
            "CREATE TABLE realtime.messages_2001_01_01 PARTITION OF realtime.messages
               FOR VALUES FROM ('2001-01-01') TO ('2001-01-02');
             ALTER TABLE realtime.messages_2001_01_01 OWNER TO supabase_realtime_admin;
             CREATE TABLE realtime.messages_archive PARTITION OF realtime.messages
               FOR VALUES FROM ('2000-01-01') TO ('2000-02-01');
             ALTER TABLE realtime.messages_archive OWNER TO supabase_realtime_admin;",
        )
        .await
        .expect("partitions");
    let ahead: String = stack
        .client
        .query_one(
            "SELECT 'messages_' || to_char((now() AT TIME ZONE 'UTC')::date + 3, 'YYYY_MM_DD')",
            &[],
        )
        .await
        .expect("name")
        .get(0);
    stack
        .client
        .batch_execute(&format!("DROP TABLE realtime.{ahead}"))
        .await
        .expect("drop");
    let daemon = Daemon::spawn(&["run"], &daemon_env(&stack));
    let partitions = || async {
        let rows = stack
            .client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'realtime.messages'::regclass ORDER BY 1",
                &[],
            )
            .await
            .expect("partitions");
        rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
    };
    eventually(
        "the janitor's first round",
        Duration::from_secs(20),
        || async {
            let now = partitions().await;
            now.contains(&ahead) && !now.iter().any(|p| p == "messages_2001_01_01")
        },
    )
    .await;
    let now = partitions().await;
    assert_eq!(now.len(), 6, "{now:?}\n{}", daemon.log());
    assert!(now.contains(&"messages_archive".to_owned()));
}

/// The messages publication created after the daemon made its slot (a
/// `walcast setup` run later; here dropped and made again, as the daemon,
/// a superuser, installs it itself at its first start): it is younger than
/// the slot's WAL, which Postgres before 18 cannot decode with it
/// ("publication does not exist"); the daemon must still stream, and
/// Broadcast from Database start once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_after_the_slot_exists_loses_no_change_and_broadcasts_start() {
    let stack = Stack::start().await;
    stack
        .client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY);
             ALTER PUBLICATION supabase_realtime ADD TABLE items;",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::spawn(&["run"], &stack.env());
    stack.wait_streaming("walcast", &daemon).await;
    daemon.terminate();
    stack
        .client
        .batch_execute(
            "DROP PUBLICATION supabase_realtime_messages_publication;
             INSERT INTO items VALUES (1);",
        )
        .await
        .expect("insert");
    stack
        .client
        .batch_execute(
            "CREATE PUBLICATION supabase_realtime_messages_publication FOR TABLE realtime.messages",
        )
        .await
        .expect("publication");
    stack
        .client
        .batch_execute("INSERT INTO items VALUES (2)")
        .await
        .expect("insert");
    let firehose = crate::support::stack::Firehose::subscribe(&stack.redis.url(), "default").await;
    let daemon = Daemon::spawn(&["run"], &stack.env());
    let got = firehose.wait_for(2, Duration::from_secs(20), &daemon).await;
    assert_eq!(
        crate::support::stack::inserted_ids(&got, "items"),
        [1, 2].into_iter().collect()
    );
    // Then the messages publication is streamed too.
    let gateway = Gateway::spawn(&stack.redis.url()).await;
    let mut v1 = gateway.connect(Some("1.0.0")).await;
    join_v1(
        &mut v1,
        "1",
        "realtime:late",
        broadcast_config(false, false),
    )
    .await;
    room_subscribed(&stack.redis, "late", 1).await;
    let version: i32 = stack
        .client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .expect("version")
        .get(0);
    // Postgres 18 skips a publication it cannot find yet; older ones fail
    // the stream, and the daemon streams without it, then with it.
    if version < 180000 {
        eventually(
            "the messages publication streamed",
            Duration::from_secs(20),
            || async { daemon.log().contains("streaming it too") },
        )
        .await;
    }
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 1}', 'e', 'late', false)"#)
        .await
        .expect("send");
    assert_eq!(text(next(&mut v1).await)["payload"]["event"], json!("e"));
}

/// Without `walcast setup`, a daemon whose role may (a superuser here, as
/// in a local setup) installs `sql/realtime.sql` itself and keeps its
/// partitions: Broadcast from Database works out of the box.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_may_installs_the_realtime_schema_itself() {
    let stack = Stack::start().await;
    let daemon = stack.spawn_gateway_daemon().await;
    let gateway = Gateway::spawn(&stack.redis.url()).await;
    let partitions: i64 = stack
        .client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('realtime.messages')",
            &[],
        )
        .await
        .expect("partitions")
        .get(0);
    assert_eq!(partitions, 5, "{}", daemon.log());
    let mut v1 = gateway.connect(Some("1.0.0")).await;
    join_v1(
        &mut v1,
        "1",
        "realtime:local",
        broadcast_config(false, false),
    )
    .await;
    room_subscribed(&stack.redis, "local", 1).await;
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 1}', 'local', 'local', false)"#)
        .await
        .expect("send");
    let frame = text(next(&mut v1).await);
    assert_eq!(
        frame["payload"]["event"],
        json!("local"),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("installed sql/realtime.sql"),
        "{}",
        daemon.log()
    );
}
