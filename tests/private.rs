//! Private channels (issue 17): joins, writes and Broadcast from Database
//! decided by the RLS policies on `realtime.messages`, asked of the daemon
//! over the bus, with Supabase's texts
//! (`../shared/reference/broadcast-presence.md` §4, §5).

use std::time::Duration;

use serde_json::{Value, json};

use crate::db_broadcast::{binary, daemon_env, last_id, start_with};
use crate::gateway::{Client, Gateway, now, token_with};
use crate::rooms::{next, nothing, user_broadcast_with_meta};
use crate::support::stack::{DB, Stack};
use crate::support::{Daemon, eventually};

/// Policies of the tests: `authenticated` reads `room:*` topics when its
/// `sub` is `alice` (broadcast) or it has `presence` (presence only), and
/// writes `room:1` when its claims say `"w": true`.
pub(crate) const POLICIES: &str = "
    CREATE POLICY read_rooms ON realtime.messages FOR SELECT TO authenticated
      USING (realtime.topic() LIKE 'room:%' AND (
        (realtime.messages.extension = 'broadcast'
           AND current_setting('request.jwt.claims', true)::jsonb ->> 'sub' = 'alice')
        OR (realtime.messages.extension = 'presence'
           AND coalesce((current_setting('request.jwt.claims', true)::jsonb ->> 'presence')::boolean, false))));
    CREATE POLICY write_room_1 ON realtime.messages FOR INSERT TO authenticated
      WITH CHECK (realtime.topic() = 'room:1'
        AND coalesce((current_setting('request.jwt.claims', true)::jsonb ->> 'w')::boolean, false));
";

/// A stack after `walcast setup` with [`POLICIES`], a daemon logged in as
/// the `walcast` role, and a gateway.
pub(crate) async fn start() -> (Stack, Daemon, Gateway) {
    start_with(POLICIES).await
}

/// An `authenticated` token for `sub` with `extra` claims.
pub(crate) fn user(sub: &str, extra: Value) -> String {
    let mut claims = json!({"role": "authenticated", "exp": now() + 3600, "sub": sub});
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    token_with(&claims)
}

fn private_config(presence: bool, ack: bool) -> Value {
    json!({"broadcast": {"self": false, "ack": ack}, "presence": {"key": "", "enabled": presence}, "postgres_changes": [], "private": true})
}

/// A v2 private join of `topic` with `token`; its reply.
async fn join(
    client: &mut Client,
    join_ref: &str,
    topic: &str,
    token: &str,
    presence: bool,
) -> Value {
    let frame = json!([join_ref, join_ref, topic, "phx_join", {"config": private_config(presence, true), "access_token": token}]);
    client.send(&frame.to_string()).await;
    loop {
        let reply = client.recv().await;
        if reply[3] == "phx_reply" {
            return reply;
        }
    }
}

fn ok_reply(join_ref: &str, topic: &str) -> Value {
    json!([join_ref, join_ref, topic, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_joins_writes_and_database_broadcasts_follow_the_policies() {
    let (stack, daemon, gateway) = start().await;
    let topic = "realtime:room:1";
    // Read allowed: the join is answered ok once the daemon said so.
    let mut alice = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(&mut alice, "1", topic, &user("alice", json!({})), false).await,
        ok_reply("1", topic)
    );
    // Refused by policy, with Supabase's text.
    let mut bob = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(&mut bob, "1", topic, &user("bob", json!({})), false).await,
        json!(["1", "1", topic, "phx_reply", {"status": "error", "response": {"reason": "Unauthorized: You do not have permissions to read from this Channel topic: room:1"}}])
    );
    // A token naming a role outside allowed_roles (here the table's
    // owner, who bypasses the policies) is refused before any probe.
    let mut owner = gateway.connect(Some("2.0.0")).await;
    let as_owner = token_with(
        &json!({"role": "supabase_realtime_admin", "exp": now() + 3600, "sub": "alice"}),
    );
    assert_eq!(
        join(&mut owner, "1", topic, &as_owner, false).await,
        json!(["1", "1", topic, "phx_reply", {"status": "error", "response": {"reason": "Unauthorized: You do not have permissions to read from this Channel topic: room:1"}}])
    );
    // Presence read alone lets a join with presence in.
    let mut carol = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(
            &mut carol,
            "1",
            topic,
            &user("carol", json!({"presence": true})),
            true
        )
        .await,
        ok_reply("1", topic)
    );
    assert_eq!(
        carol.recv().await,
        json!(["1", null, topic, "presence_state", {}])
    );
    // Presence enabled but not readable: no presence_state, no diffs.
    let mut dave = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(&mut dave, "1", topic, &user("alice", json!({})), true).await,
        ok_reply("1", topic)
    );
    nothing(&mut dave).await;
    drop(dave);
    // A public channel of the same name is another room.
    let mut public = gateway.connect(Some("2.0.0")).await;
    public
        .send(&json!(["1", "1", topic, "phx_join", {"config": {"broadcast": {"self": false}, "private": false}}]).to_string())
        .await;
    assert_eq!(public.recv().await[4]["status"], "ok");
    crate::rooms::room_subscribed(&stack.redis, "room:1", 1).await;

    // realtime.send to the private topic: alice only (carol may not read
    // broadcasts); to the public topic: the public channel only.
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 1}', 'secret', 'room:1', true)"#)
        .await
        .expect("send");
    let id = last_id(&stack, "room:1").await;
    assert_eq!(
        binary(next(&mut alice).await),
        user_broadcast_with_meta(
            topic,
            "secret",
            format!(r#"{{"id":"{id}"}}"#).as_bytes(),
            1,
            format!(r#"{{"n": 1, "id": "{id}"}}"#).as_bytes()
        )
    );
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 2}', 'open', 'room:1', false)"#)
        .await
        .expect("send");
    let open = last_id(&stack, "room:1").await;
    assert_eq!(
        binary(next(&mut public).await),
        user_broadcast_with_meta(
            topic,
            "open",
            format!(r#"{{"id":"{open}"}}"#).as_bytes(),
            1,
            format!(r#"{{"n": 2, "id": "{open}"}}"#).as_bytes()
        )
    );
    nothing(&mut alice).await;
    nothing(&mut carol).await;

    // Writing: alice may read but not write (no "w" claim): her ack'd
    // broadcast is dropped silently. A writer's reaches alice, not the
    // public channel.
    alice
        .send(&json!(["1", "2", topic, "broadcast", {"type": "broadcast", "event": "hi", "payload": {"from": "alice"}}]).to_string())
        .await;
    let mut writer = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(
            &mut writer,
            "1",
            topic,
            &user("alice", json!({"w": true})),
            false
        )
        .await,
        ok_reply("1", topic)
    );
    writer
        .send(&json!(["1", "2", topic, "broadcast", {"type": "broadcast", "event": "hi", "payload": {"from": "writer"}}]).to_string())
        .await;
    assert_eq!(
        writer.recv().await,
        json!(["1", "2", topic, "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        alice.recv().await,
        json!([null, null, topic, "broadcast", {"type": "broadcast", "event": "hi", "payload": {"from": "writer"}}])
    );
    nothing(&mut alice).await;
    nothing(&mut public).await;
    // A track needs write permission too: carol has none.
    carol
        .send(&json!(["1", "3", topic, "presence", {"type": "presence", "event": "track", "payload": {"x": 1}}]).to_string())
        .await;
    let refused = loop {
        let frame = carol.recv().await;
        if frame[3] == "phx_reply" {
            break frame;
        }
    };
    assert_eq!(
        refused,
        json!(["1", "3", topic, "phx_reply", {"status": "error", "response": {}}])
    );

    // A token that loses the read closes the channel with Supabase's text.
    alice
        .send(
            &json!(["1", "4", topic, "access_token", {"access_token": user("bob", json!({}))}])
                .to_string(),
        )
        .await;
    assert_eq!(
        alice.recv().await,
        json!(["1", null, topic, "system", {"channel": "room:1", "extension": "system", "message": "You no longer have permission to read from this Channel topic: room:1", "status": "error"}])
    );
    assert_eq!(
        alice.recv().await,
        json!(["1", "1", topic, "phx_close", {}])
    );
    // Gone from the daemon: a message now reaches the writer only.
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 3}', 'later', 'room:1', true)"#)
        .await
        .expect("send");
    let frame = binary(next(&mut writer).await);
    assert_eq!(frame[0], 4);
    nothing(&mut alice).await;
    eventually(
        "no error in the daemon's log",
        Duration::from_secs(1),
        || async { !daemon.log().contains(" ERROR ") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_while_messages_are_sent_loses_none_of_them() {
    let (stack, mut daemon, gateway) = start().await;
    let topic = "realtime:room:1";
    // realtime-py's shape (vsn 1.0.0): JSON frames.
    let mut alice = gateway.connect(Some("1.0.0")).await;
    let join = json!({"topic": topic, "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": private_config(false, false), "access_token": user("alice", json!({}))}});
    alice.send(&join.to_string()).await;
    assert_eq!(alice.recv().await["payload"]["status"], "ok");

    const SENT: i64 = 1000;
    let writer = {
        let client = stack.pg.client(DB).await;
        tokio::spawn(async move {
            for i in 0..SENT {
                client
                    .batch_execute(&format!(
                        r#"SELECT realtime.send('{{"i": {i}}}', 'n', 'room:1', true)"#
                    ))
                    .await
                    .expect("send");
            }
        })
    };
    let count = async || -> i64 {
        stack
            .client
            .query_one(
                "SELECT count(*) FROM realtime.messages WHERE topic = 'room:1'",
                &[],
            )
            .await
            .expect("count")
            .get(0)
    };
    eventually(
        "a third of the messages written",
        Duration::from_secs(30),
        || async { count().await >= SENT / 3 },
    )
    .await;
    daemon.kill();
    let at_kill = count().await;
    assert!(
        at_kill < SENT,
        "the kill must come while messages are written"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let daemon = Daemon::spawn(&["run"], &daemon_env(&stack));
    writer.await.expect("writer");
    let written: Vec<(String, i64)> = stack
        .client
        .query(
            "SELECT id::text, (payload ->> 'i')::bigint FROM realtime.messages WHERE topic = 'room:1'",
            &[],
        )
        .await
        .expect("written")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(written.len(), SENT as usize);
    // Every committed message arrives, once.
    let mut got: std::collections::HashMap<i64, String> = std::collections::HashMap::new();
    let mut frames = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < SENT as usize {
        let frame = tokio::time::timeout_at(deadline, alice.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{} of {SENT} messages arrived\n{}", got.len(), daemon.log())
            });
        if frame["event"] != "broadcast" {
            continue;
        }
        frames += 1;
        let payload = &frame["payload"];
        let id = payload["meta"]["id"].as_str().expect("meta.id").to_owned();
        let i = payload["payload"]["i"].as_i64().expect("i");
        assert_eq!(payload["payload"]["id"], json!(id));
        // The restarted daemon streams again from the last confirmed
        // position: the gateway hands on what it had delivered once.
        assert!(got.insert(i, id).is_none(), "message {i} arrived twice");
    }
    for (id, i) in &written {
        assert_eq!(got.get(i), Some(id), "message {i}");
    }
    assert_eq!(frames, SENT);
    println!("{SENT} messages, killed at {at_kill}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_broadcasts_to_private_topics_go_where_the_token_may_write() {
    let (_stack, _daemon, gateway) = start().await;
    let topic = "realtime:room:1";
    let mut alice = gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        join(&mut alice, "1", topic, &user("alice", json!({})), false).await,
        ok_reply("1", topic)
    );
    let json_type = ("content-type", "application/json");
    let writer = user("w", json!({"w": true}));
    let bearer = format!("Bearer {writer}");
    // A batch: the topic the token may write goes, the other is skipped
    // silently (202 all the same), as Supabase does.
    let batch = json!({"messages": [
        {"topic": "room:2", "event": "no", "payload": {"n": 0}, "private": true},
        {"topic": "room:1", "event": "yes", "payload": {"n": 1}, "private": true},
    ]})
    .to_string();
    let (status, body) = crate::rooms::http(
        gateway.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("authorization", &bearer)],
        &batch,
    )
    .await;
    assert_eq!((status, body.as_str()), (202, ""));
    assert_eq!(
        alice.recv().await,
        json!([null, null, topic, "broadcast", {"event": "yes", "payload": {"n": 1}, "type": "broadcast"}])
    );
    // A single message: 403 where the token may not write.
    let reader = format!("Bearer {}", user("alice", json!({})));
    let (status, body) = crate::rooms::http(
        gateway.port,
        "POST",
        "/api/broadcast/room:1/events/single?private=true",
        &[json_type, ("authorization", &reader)],
        r#"{"n": 2}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"message":"Unauthorized"}"#)
    );
    let (status, _) = crate::rooms::http(
        gateway.port,
        "POST",
        "/api/broadcast/room:1/events/single?private=true",
        &[json_type, ("authorization", &bearer)],
        r#"{"n": 3}"#,
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        binary(next(&mut alice).await),
        crate::rooms::user_broadcast_with_meta(topic, "single", b"", 1, br#"{"n": 3}"#)
    );
    nothing(&mut alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_the_newest_stored_messages_once_after_the_join() {
    let (stack, _daemon, gateway) = start().await;
    // A hot standby beside it keeps its registry but answers nothing: one
    // reply, one replay.
    let standby = Daemon::spawn(&["run"], &daemon_env(&stack));
    eventually(
        &format!("a daemon standing by\n{}", standby.log()),
        Duration::from_secs(30),
        || async { standby.log().contains("standing by") },
    )
    .await;
    let topic = "realtime:room:1";
    // 27 private messages (each its own transaction, so inserted_at
    // orders them), one public.
    for n in 0..27 {
        stack
            .client
            .batch_execute(&format!(
                r#"SELECT realtime.send('{{"n": {n}}}', 'stored', 'room:1', true)"#
            ))
            .await
            .expect("send");
    }
    stack
        .client
        .batch_execute(r#"SELECT realtime.send('{"n": 99}', 'public', 'room:1', false)"#)
        .await
        .expect("send");
    // The newest, but too large to be broadcast: not replayed either.
    stack
        .client
        .batch_execute(
            "SELECT realtime.send(jsonb_build_object('big', repeat('x', 3000500)), 'big', 'room:1', true)",
        )
        .await
        .expect("send");
    let ids: Vec<String> = stack
        .client
        .query(
            "SELECT id::text FROM realtime.messages WHERE private ORDER BY inserted_at",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let replay_join = |join_ref: &str, replay: Value| {
        let mut config = private_config(false, false);
        config["broadcast"]["replay"] = replay;
        json!([join_ref, join_ref, topic, "phx_join", {"config": config, "access_token": user("alice", json!({}))}]).to_string()
    };
    let replayed = |join_ref: &str, n: usize| {
        let id = &ids[n];
        json!([join_ref, null, topic, "broadcast", {"event": "stored", "meta": {"id": id, "replayed": true}, "payload": {"n": n, "id": id}, "type": "broadcast"}])
    };
    // limit 2: the two newest, oldest first, after the join's reply.
    let mut alice = gateway.connect(Some("2.0.0")).await;
    alice
        .send(&replay_join("1", json!({"since": 0, "limit": 2})))
        .await;
    assert_eq!(alice.recv().await, ok_reply("1", topic));
    assert_eq!(alice.recv().await, replayed("1", 25));
    assert_eq!(alice.recv().await, replayed("1", 26));
    nothing(&mut alice).await;
    // No limit, or one over 25: 25.
    let mut many = gateway.connect(Some("2.0.0")).await;
    many.send(&replay_join("1", json!({"since": 0, "limit": 100})))
        .await;
    assert_eq!(many.recv().await, ok_reply("1", topic));
    for n in 2..27 {
        assert_eq!(many.recv().await, replayed("1", n));
    }
    nothing(&mut many).await;
    // Since now: nothing to replay.
    let mut late = gateway.connect(Some("2.0.0")).await;
    late.send(&replay_join("1", json!({"since": now() * 1000 + 60_000})))
        .await;
    assert_eq!(late.recv().await, ok_reply("1", topic));
    nothing(&mut late).await;
    // Supabase's refusals.
    let mut bad = gateway.connect(Some("2.0.0")).await;
    bad.send(&replay_join("1", json!({"since": "yesterday"})))
        .await;
    assert_eq!(
        bad.recv().await,
        json!(["1", "1", topic, "phx_reply", {"status": "error", "response": {"reason": "UnableToReplayMessages: Replay params are not valid"}}])
    );
    let public = json!(["2", "2", topic, "phx_join", {"config": {"broadcast": {"replay": {"since": 0}}, "private": false}}]);
    bad.send(&public.to_string()).await;
    assert_eq!(
        bad.recv().await,
        json!(["2", "2", topic, "phx_reply", {"status": "error", "response": {"reason": "UnableToReplayMessages: Replay is not allowed for public channels"}}])
    );
}
