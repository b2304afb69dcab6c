//! Broadcast and Presence on the wire (issue 16): two gateway processes
//! on one Redis (no Postgres: rooms never reach the daemon), frames
//! compared exactly with what Supabase sends
//! (`../shared/reference/broadcast-presence.md`).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::{Client, FRAME_TIMEOUT, Gateway};
use crate::support::TestRedis;

/// Two gateways, `gw-a` and `gw-b`, on one Redis; `extra` settings on both.
async fn two_gateways(redis: &TestRedis, extra: &[(&str, String)]) -> (Gateway, Gateway) {
    let with_id = |id: &str| {
        let mut env: Vec<(&str, String)> = extra.to_vec();
        env.push(("WALCAST_GATEWAY_ID", id.to_owned()));
        env
    };
    let a = Gateway::spawn_with(&redis.url(), &with_id("gw-a")).await;
    let b = Gateway::spawn_with(&redis.url(), &with_id("gw-b")).await;
    (a, b)
}

/// Waits until `gateways` gateways subscribe `room`'s channel (each does
/// when its first socket joins, just after the join reply).
pub(crate) async fn room_subscribed(redis: &TestRedis, room: &str, gateways: usize) {
    let conn = redis.connection().await;
    let channel = format!("walcast:default:room:public:{room}");
    crate::support::eventually(
        &format!("{gateways} gateways subscribed to {channel}"),
        FRAME_TIMEOUT,
        || {
            let (mut conn, channel) = (conn.clone(), channel.clone());
            async move {
                let (_, n): (String, usize) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                n == gateways
            }
        },
    )
    .await;
}

/// A v2 join of `topic` with `config`; returns once the reply is ok.
pub(crate) async fn join_v2(client: &mut Client, join_ref: &str, topic: &str, config: Value) {
    let frame = json!([join_ref, join_ref, topic, "phx_join", {"config": config}]);
    client.send(&frame.to_string()).await;
    let reply = client.recv().await;
    assert_eq!(
        reply,
        json!([join_ref, join_ref, topic, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
}

/// A v1 join, as realtime-py sends it.
pub(crate) async fn join_v1(client: &mut Client, reference: &str, topic: &str, config: Value) {
    let frame = json!({"topic": topic, "event": "phx_join", "payload": {"config": config}, "ref": reference, "join_ref": reference});
    client.send(&frame.to_string()).await;
    assert_eq!(
        client.recv().await,
        json!({"event": "phx_reply", "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": reference, "topic": topic})
    );
}

pub(crate) fn broadcast_config(echo: bool, ack: bool) -> Value {
    json!({"broadcast": {"self": echo, "ack": ack}, "presence": {"key": "", "enabled": false}, "postgres_changes": [], "private": false})
}

/// The next frame, text or binary.
pub(crate) async fn next(client: &mut Client) -> Message {
    loop {
        let frame = tokio::time::timeout(FRAME_TIMEOUT, client.ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .expect("a frame");
        match frame {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// No frame for a while (what was not to come did not).
pub(crate) async fn nothing(client: &mut Client) {
    if let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_millis(500), client.ws.next()).await
    {
        panic!("expected nothing, got {frame:?}");
    }
}

/// realtime-js's kind 3 push.
fn push(
    join_ref: &str,
    reference: &str,
    topic: &str,
    event: &str,
    encoding: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = vec![
        3,
        join_ref.len() as u8,
        reference.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        0,
        encoding,
    ];
    for part in [
        join_ref.as_bytes(),
        reference.as_bytes(),
        topic.as_bytes(),
        event.as_bytes(),
        payload,
    ] {
        frame.extend_from_slice(part);
    }
    frame
}

/// The server's kind 4 user broadcast.
fn user_broadcast(topic: &str, event: &str, encoding: u8, payload: &[u8]) -> Vec<u8> {
    user_broadcast_with_meta(topic, event, b"", encoding, payload)
}

/// The server's kind 4 user broadcast with metadata (Broadcast from
/// Database's `{"id":…}`).
pub(crate) fn user_broadcast_with_meta(
    topic: &str,
    event: &str,
    meta: &[u8],
    encoding: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = vec![
        4,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        encoding,
    ];
    for part in [topic.as_bytes(), event.as_bytes(), meta, payload] {
        frame.extend_from_slice(part);
    }
    frame
}

async fn send_binary(client: &mut Client, frame: Vec<u8>) {
    client
        .ws
        .send(Message::Binary(frame.into()))
        .await
        .expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_every_gateway_in_order_in_each_protocols_shape() {
    let redis = TestRedis::start();
    let (a, b) = two_gateways(&redis, &[]).await;
    let topic = "realtime:room:42";
    let mut sender = a.connect(Some("2.0.0")).await;
    let mut same_gateway = a.connect(Some("2.0.0")).await;
    let mut v2 = b.connect(Some("2.0.0")).await;
    let mut v1 = b.connect(Some("1.0.0")).await;
    join_v2(&mut sender, "1", topic, broadcast_config(false, true)).await;
    join_v2(
        &mut same_gateway,
        "1",
        topic,
        broadcast_config(false, false),
    )
    .await;
    join_v2(&mut v2, "1", topic, broadcast_config(false, false)).await;
    join_v1(&mut v1, "1", topic, broadcast_config(false, false)).await;
    room_subscribed(&redis, "room:42", 2).await;

    // A JSON array broadcast, acknowledged, reaches the others verbatim.
    let payload = json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1, "name": "Zoë 🦀", "nested": {"a": [1, {"b": null}]}}});
    sender
        .send(&json!(["1", "2", topic, "broadcast", payload]).to_string())
        .await;
    assert_eq!(
        sender.recv_text().await,
        r#"["1","2","realtime:room:42","phx_reply",{"status":"ok","response":{}}]"#
    );
    for client in [&mut same_gateway, &mut v2] {
        assert_eq!(
            client.recv().await,
            json!([null, null, topic, "broadcast", payload])
        );
    }
    assert_eq!(
        v1.recv().await,
        json!({"event": "broadcast", "payload": payload, "ref": null, "topic": topic})
    );

    // A binary push with JSON: kind 4 to v2, a JSON broadcast to v1.
    send_binary(
        &mut sender,
        push("1", "3", topic, "cursor", 1, br#"{"x":2}"#),
    )
    .await;
    assert_eq!(
        sender.recv_text().await,
        r#"["1","3","realtime:room:42","phx_reply",{"status":"ok","response":{}}]"#
    );
    for client in [&mut same_gateway, &mut v2] {
        assert_eq!(
            next(client).await,
            Message::Binary(user_broadcast(topic, "cursor", 1, br#"{"x":2}"#).into())
        );
    }
    assert_eq!(
        v1.recv_text().await,
        r#"{"event":"broadcast","payload":{"event":"cursor","payload":{"x":2},"type":"broadcast"},"ref":null,"topic":"realtime:room:42"}"#
    );

    // Binary bytes: kind 4 to v2; nothing to v1.
    send_binary(
        &mut sender,
        push("1", "4", topic, "bytes", 0, &[0, 159, 146, 150]),
    )
    .await;
    sender.recv().await;
    for client in [&mut same_gateway, &mut v2] {
        assert_eq!(
            next(client).await,
            Message::Binary(user_broadcast(topic, "bytes", 0, &[0, 159, 146, 150]).into())
        );
    }

    // 50 in a row arrive in order, on both gateways; v1 had nothing since.
    for i in 0..50 {
        send_binary(
            &mut sender,
            push(
                "1",
                &format!("n{i}"),
                topic,
                "seq",
                1,
                format!("{{\"i\":{i}}}").as_bytes(),
            ),
        )
        .await;
    }
    for i in 0..50 {
        assert_eq!(
            sender.recv().await[1],
            json!(format!("n{i}")),
            "acks in order"
        );
    }
    for client in [&mut same_gateway, &mut v2] {
        for i in 0..50 {
            assert_eq!(
                next(client).await,
                Message::Binary(
                    user_broadcast(topic, "seq", 1, format!("{{\"i\":{i}}}").as_bytes()).into()
                )
            );
        }
    }
    for i in 0..50 {
        assert_eq!(v1.recv().await["payload"]["payload"], json!({"i": i}));
    }
    // The sender never got its own.
    nothing(&mut sender).await;
    nothing(&mut v1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_broadcasts_come_back_and_v1_senders_reach_v2() {
    let redis = TestRedis::start();
    let (a, b) = two_gateways(&redis, &[]).await;
    let topic = "realtime:echo";
    let mut v1 = a.connect(Some("1.0.0")).await;
    let mut v2 = b.connect(Some("2.0.0")).await;
    join_v1(&mut v1, "1", topic, broadcast_config(true, false)).await;
    join_v2(&mut v2, "1", topic, broadcast_config(true, false)).await;
    room_subscribed(&redis, "echo", 2).await;
    let payload = json!({"type": "broadcast", "event": "hi", "payload": {"from": "py"}});
    v1.send(&json!({"topic": topic, "event": "broadcast", "payload": payload, "ref": "2", "join_ref": "1"}).to_string())
        .await;
    // No ack asked: no reply; the sender gets its own message (self).
    assert_eq!(
        v1.recv().await,
        json!({"event": "broadcast", "payload": payload, "ref": null, "topic": topic})
    );
    assert_eq!(
        v2.recv().await,
        json!([null, null, topic, "broadcast", payload])
    );
    send_binary(&mut v2, push("1", "2", topic, "hi", 1, br#"{"from":"js"}"#)).await;
    assert_eq!(
        next(&mut v2).await,
        Message::Binary(user_broadcast(topic, "hi", 1, br#"{"from":"js"}"#).into())
    );
    assert_eq!(v1.recv().await["payload"]["payload"], json!({"from": "js"}));
    nothing(&mut v1).await;
    nothing(&mut v2).await;
}

/// The presences a `presence_state` or diff half lists, as
/// `{key: [meta without phx_ref…]}`, with every phx_ref checked for shape.
fn metas(list: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (key, entry) in list.as_object().expect("an object of keys") {
        let metas = entry["metas"]
            .as_array()
            .expect("metas")
            .iter()
            .map(|meta| {
                let mut meta = meta.clone();
                let reference = meta
                    .as_object_mut()
                    .expect("a meta object")
                    .remove("phx_ref")
                    .expect("a phx_ref");
                assert_eq!(reference.as_str().map(str::len), Some(16), "{reference}");
                meta.as_object_mut().expect("object").remove("phx_ref_prev");
                meta
            });
        out.insert(key.clone(), Value::Array(metas.collect()));
    }
    Value::Object(out)
}

fn presence_config(key: &str) -> Value {
    json!({"broadcast": {"self": false, "ack": false}, "presence": {"key": key, "enabled": true}, "postgres_changes": [], "private": false})
}

async fn track(client: &mut Client, reference: &str, topic: &str, meta: Value) {
    client
        .send(&json!(["1", reference, topic, "presence", {"type": "presence", "event": "track", "payload": meta}]).to_string())
        .await;
}

/// The next frame must be `event` on `topic`; its payload.
async fn expect_push(client: &mut Client, topic: &str, event: &str) -> Value {
    let frame = client.recv().await;
    assert_eq!(
        (frame[2].as_str(), frame[3].as_str()),
        (Some(topic), Some(event)),
        "{frame}"
    );
    frame[4].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_shared_across_gateways_and_leaves_with_sockets_and_dead_gateways() {
    let redis = TestRedis::start();
    let lease = [("WALCAST_GATEWAY_LEASE", "6s".to_owned())];
    let (mut a, b) = two_gateways(&redis, &lease).await;
    let topic = "realtime:lobby";
    let mut alice = a.connect(Some("2.0.0")).await;
    join_v2(&mut alice, "1", topic, presence_config("alice")).await;
    assert_eq!(
        expect_push(&mut alice, topic, "presence_state").await,
        json!({})
    );
    track(
        &mut alice,
        "2",
        topic,
        json!({"name": "Alice", "status": "online"}),
    )
    .await;
    assert_eq!(
        alice.recv_text().await,
        r#"["1","2","realtime:lobby","phx_reply",{"status":"ok","response":{}}]"#
    );
    // The tracker gets its own join.
    let diff = expect_push(&mut alice, topic, "presence_diff").await;
    assert_eq!(
        metas(&diff["joins"]),
        json!({"alice": [{"name": "Alice", "status": "online"}]})
    );
    assert_eq!(diff["leaves"], json!({}));
    let alice_ref = diff["joins"]["alice"]["metas"][0]["phx_ref"].clone();

    // Bob joins on the other gateway: the whole state, alice included.
    let mut bob = b.connect(Some("1.0.0")).await;
    join_v1(&mut bob, "1", topic, presence_config("bob")).await;
    let state = bob.recv().await;
    assert_eq!(
        (state["event"].as_str(), state["ref"].clone()),
        (Some("presence_state"), Value::Null)
    );
    assert_eq!(state["payload"]["alice"]["metas"][0]["phx_ref"], alice_ref);
    assert_eq!(
        metas(&state["payload"]),
        json!({"alice": [{"name": "Alice", "status": "online"}]})
    );
    bob.send(&json!({"topic": topic, "event": "presence", "payload": {"event": "track", "payload": {"name": "Bob"}}, "ref": "2", "join_ref": "1"}).to_string())
        .await;
    assert_eq!(
        bob.recv().await["payload"],
        json!({"status": "ok", "response": {}})
    );
    let bob_joined = bob.recv().await;
    assert_eq!(bob_joined["event"], "presence_diff");
    assert_eq!(
        metas(&bob_joined["payload"]["joins"]),
        json!({"bob": [{"name": "Bob"}]})
    );
    let diff = expect_push(&mut alice, topic, "presence_diff").await;
    assert_eq!(metas(&diff["joins"]), json!({"bob": [{"name": "Bob"}]}));

    // An update: a join with phx_ref_prev and the leave of the old meta.
    track(
        &mut alice,
        "3",
        topic,
        json!({"name": "Alice", "status": "away"}),
    )
    .await;
    alice.recv().await;
    for diff in [
        expect_push(&mut alice, topic, "presence_diff").await,
        bob.recv().await["payload"].clone(),
    ] {
        let joined = &diff["joins"]["alice"]["metas"][0];
        assert_eq!(joined["phx_ref_prev"], alice_ref);
        assert_ne!(joined["phx_ref"], alice_ref);
        assert_eq!(
            metas(&diff["joins"]),
            json!({"alice": [{"name": "Alice", "status": "away"}]})
        );
        assert_eq!(diff["leaves"]["alice"]["metas"][0]["phx_ref"], alice_ref);
        assert_eq!(
            metas(&diff["leaves"]),
            json!({"alice": [{"name": "Alice", "status": "online"}]})
        );
    }
    // The same meta again changes nothing.
    track(
        &mut alice,
        "4",
        topic,
        json!({"name": "Alice", "status": "away"}),
    )
    .await;
    assert_eq!(alice.recv().await[1], "4");
    nothing(&mut bob).await;

    // Untrack: a leave.
    alice
        .send(
            &json!(["1", "5", topic, "presence", {"type": "presence", "event": "untrack"}])
                .to_string(),
        )
        .await;
    assert_eq!(alice.recv().await[1], "5");
    let left = bob.recv().await;
    assert_eq!(
        metas(&left["payload"]["leaves"]),
        json!({"alice": [{"name": "Alice", "status": "away"}]})
    );
    expect_push(&mut alice, topic, "presence_diff").await;

    // Carol tracks on gateway a; her socket closes: she leaves at once.
    let mut carol = a.connect(Some("2.0.0")).await;
    join_v2(&mut carol, "1", topic, presence_config("carol")).await;
    let state = expect_push(&mut carol, topic, "presence_state").await;
    assert_eq!(metas(&state), json!({"bob": [{"name": "Bob"}]}));
    track(&mut carol, "2", topic, json!({})).await;
    carol.recv().await;
    assert_eq!(
        metas(&bob.recv().await["payload"]["joins"]),
        json!({"carol": [{}]})
    );
    expect_push(&mut alice, topic, "presence_diff").await;
    drop(carol);
    assert_eq!(
        metas(&bob.recv().await["payload"]["leaves"]),
        json!({"carol": [{}]})
    );
    expect_push(&mut alice, topic, "presence_diff").await;

    // Alice tracks again, and also in a room no socket of gateway b is
    // in; then gateway a dies: bob sees her leave within the lease (6 s
    // here) and a check, and the other room is cleaned all the same.
    track(&mut alice, "6", topic, json!({"name": "Alice"})).await;
    alice.recv().await;
    expect_push(&mut alice, topic, "presence_diff").await;
    bob.recv().await;
    join_v2(
        &mut alice,
        "9",
        "realtime:elsewhere",
        presence_config("alice"),
    )
    .await;
    let mut conn = redis.connection().await;
    let elsewhere = "walcast:default:presence:public:elsewhere";
    alice
        .send(&json!(["9", "10", "realtime:elsewhere", "presence", {"event": "track", "payload": {}}]).to_string())
        .await;
    crate::support::eventually(
        "alice's presence elsewhere is stored",
        FRAME_TIMEOUT,
        || {
            let mut conn = conn.clone();
            async move {
                redis::AsyncCommands::hlen::<_, usize>(&mut conn, elsewhere)
                    .await
                    .unwrap_or(0)
                    == 1
            }
        },
    )
    .await;
    a.process.kill();
    let killed = std::time::Instant::now();
    let left = bob.recv().await;
    let waited = killed.elapsed();
    assert_eq!(
        metas(&left["payload"]["leaves"]),
        json!({"alice": [{"name": "Alice"}]})
    );
    assert!(waited <= Duration::from_secs(6 + 5 + 1), "{waited:?}");
    // The room's hash holds only bob then (its leaves are told before
    // the dead gateway's fields are deleted); the unwatched room is
    // empty, and gateway a is forgotten.
    let lobby = "walcast:default:presence:public:lobby";
    crate::support::eventually("the lobby holds only bob", FRAME_TIMEOUT, || {
        let mut conn = conn.clone();
        async move {
            let fields: Vec<String> = redis::AsyncCommands::hkeys(&mut conn, lobby)
                .await
                .unwrap_or_default();
            fields.len() == 1 && fields[0].starts_with("gw-b|")
        }
    })
    .await;
    let gateways = "walcast:default:presence:gateways";
    // The room's fields go first, the gateway's entry in the set last.
    crate::support::eventually(
        "the unwatched room is cleaned and gateway a forgotten",
        FRAME_TIMEOUT,
        || {
            let mut conn = conn.clone();
            async move {
                let left: usize = redis::AsyncCommands::hlen(&mut conn, elsewhere)
                    .await
                    .unwrap_or(1);
                let known: Vec<String> = redis::AsyncCommands::smembers(&mut conn, gateways)
                    .await
                    .unwrap_or_default();
                left == 0 && known == ["gw-b"]
            }
        },
    )
    .await;
    // A clean shutdown takes bob's presence with it at once.
    let mut b = b;
    b.process.terminate();
    let fields: Vec<String> = redis::AsyncCommands::hkeys(&mut conn, lobby)
        .await
        .expect("hkeys");
    assert_eq!(fields, Vec::<String>::new());
    let known: Vec<String> = redis::AsyncCommands::smembers(&mut conn, gateways)
        .await
        .expect("smembers");
    assert_eq!(known, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_starts_clean() {
    let redis = TestRedis::start();
    let (mut a, b) = two_gateways(&redis, &[]).await;
    let topic = "realtime:restart";
    let mut alice = a.connect(Some("2.0.0")).await;
    join_v2(&mut alice, "1", topic, presence_config("alice")).await;
    expect_push(&mut alice, topic, "presence_state").await;
    track(&mut alice, "2", topic, json!({"n": 1})).await;
    alice.recv().await;
    alice.recv().await;
    let mut bob = b.connect(Some("2.0.0")).await;
    join_v2(&mut bob, "1", topic, presence_config("bob")).await;
    assert_eq!(
        metas(&expect_push(&mut bob, topic, "presence_state").await),
        json!({"alice": [{"n": 1}]})
    );
    // Killed and started again with the same id at once (its lease never
    // expired): the new process removes what the old one left.
    a.process.kill();
    let a2 = Gateway::spawn_with(&redis.url(), &[("WALCAST_GATEWAY_ID", "gw-a".to_owned())]).await;
    let left = expect_push(&mut bob, topic, "presence_diff").await;
    assert_eq!(metas(&left["leaves"]), json!({"alice": [{"n": 1}]}));
    let mut carol = a2.connect(Some("2.0.0")).await;
    join_v2(&mut carol, "1", topic, presence_config("carol")).await;
    assert_eq!(
        expect_push(&mut carol, topic, "presence_state").await,
        json!({})
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_broadcasts_and_presence_calls_get_supabases_answers_and_harm_nobody() {
    let redis = TestRedis::start();
    let limits = [("WALCAST_MAX_PAYLOAD_SIZE_IN_KB", "1".to_owned())];
    let (a, _b) = two_gateways(&redis, &limits).await;
    let topic = "realtime:bad";
    let mut bystander = a.connect(Some("2.0.0")).await;
    join_v2(&mut bystander, "1", topic, broadcast_config(false, false)).await;
    let mut hostile = a.connect(Some("2.0.0")).await;
    join_v2(&mut hostile, "1", topic, broadcast_config(false, true)).await;
    room_subscribed(&redis, "bad", 1).await;

    // Malformed binary frames are dropped; the socket stays.
    let good = push("1", "2", topic, "e", 1, b"{}");
    let mut wrong_kind = good.clone();
    wrong_kind[0] = 0;
    let mut past_the_end = good.clone();
    past_the_end[3] = 200;
    let mut bad_encoding = good.clone();
    bad_encoding[6] = 9;
    for frame in [
        Vec::new(),
        wrong_kind,
        good[..5].to_vec(),
        past_the_end,
        bad_encoding,
    ] {
        send_binary(&mut hostile, frame).await;
    }
    // JSON encoding that is not JSON: refused with a reason.
    send_binary(&mut hostile, push("1", "3", topic, "e", 1, b"{nope")).await;
    assert_eq!(
        hostile.recv().await,
        json!(["1", "3", topic, "phx_reply", {"status": "error", "response": {"reason": "a broadcast with JSON encoding must carry JSON"}}])
    );
    // Over 1 KB (+500 bytes): Supabase's ack error, nothing delivered.
    let big = json!({"type": "broadcast", "event": "e", "payload": "x".repeat(1600)});
    hostile
        .send(&json!(["1", "4", topic, "broadcast", big]).to_string())
        .await;
    assert_eq!(
        hostile.recv_text().await,
        r#"["1","4","realtime:bad","phx_reply",{"status":"error","response":"payload_size_exceeded"}]"#
    );
    // A payload that is not an object.
    hostile
        .send(&json!(["1", "5", topic, "broadcast", [1, 2]]).to_string())
        .await;
    assert_eq!(hostile.recv().await[4]["status"], "error");
    // Presence: not a map, an unknown event, then the window (5 calls in
    // 30 s) and the channel is closed; the bystander is untouched.
    hostile
        .send(
            &json!(["1", "6", topic, "presence", {"event": "track", "payload": "me"}]).to_string(),
        )
        .await;
    assert_eq!(
        hostile.recv().await,
        json!(["1", "6", topic, "phx_reply", {"status": "error", "response": {"reason": "Presence track payload must be a map"}}])
    );
    hostile
        .send(&json!(["1", "7", topic, "presence", {"event": "dance"}]).to_string())
        .await;
    assert_eq!(
        hostile.recv().await,
        json!(["1", "7", topic, "phx_reply", {"status": "error", "response": {}}])
    );
    let big_meta = json!({"blob": "x".repeat(1600)});
    track(&mut hostile, "8", topic, big_meta).await;
    assert_eq!(
        hostile.recv().await,
        json!(["1", null, topic, "system", {"channel": "bad", "extension": "system", "message": "Track message size exceeded", "status": "error"}])
    );
    assert_eq!(
        hostile.recv().await,
        json!(["1", "1", topic, "phx_close", {}])
    );
    join_v2(&mut hostile, "2", topic, presence_config("h")).await;
    expect_push(&mut hostile, topic, "presence_state").await;
    for i in 0..5 {
        hostile
            .send(
                &json!(["2", format!("u{i}"), topic, "presence", {"event": "untrack"}]).to_string(),
            )
            .await;
        assert_eq!(hostile.recv().await[1], format!("u{i}"));
    }
    hostile
        .send(&json!(["2", "u5", topic, "presence", {"event": "untrack"}]).to_string())
        .await;
    assert_eq!(
        hostile.recv().await,
        json!(["2", null, topic, "system", {"channel": "bad", "extension": "system", "message": "Client presence rate limit exceeded", "status": "error"}])
    );
    assert_eq!(
        hostile.recv().await,
        json!(["2", "2", topic, "phx_close", {}])
    );
    // A private join waits for the daemon (there is none here): it is
    // never served as public meanwhile.
    hostile
        .send(
            &json!(["3", "3", "realtime:secret", "phx_join", {"config": {"private": true}}])
                .to_string(),
        )
        .await;
    nothing(&mut hostile).await;
    // The bystander got nothing of it, and still gets a good broadcast.
    nothing(&mut bystander).await;
    let mut other = a.connect(Some("2.0.0")).await;
    join_v2(&mut other, "1", topic, broadcast_config(false, false)).await;
    send_binary(&mut other, good).await;
    assert_eq!(
        next(&mut bystander).await,
        Message::Binary(user_broadcast(topic, "e", 1, b"{}").into())
    );
    hostile.sync(true, "hb").await;
}

/// `method path` with `headers` and `body` on `port`: status, body.
pub(crate) async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(FRAME_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8(response).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_broadcasts_reach_sockets_and_bad_requests_get_supabases_errors() {
    let redis = TestRedis::start();
    let (a, b) = two_gateways(&redis, &[]).await;
    let mut v2 = b.connect(Some("2.0.0")).await;
    let mut v1 = a.connect(Some("1.0.0")).await;
    join_v2(
        &mut v2,
        "1",
        "realtime:news",
        broadcast_config(false, false),
    )
    .await;
    join_v1(
        &mut v1,
        "1",
        "realtime:news",
        broadcast_config(false, false),
    )
    .await;
    room_subscribed(&redis, "news", 2).await;
    let bearer = format!("Bearer {}", crate::gateway::valid("service_role"));
    let json_type = ("Content-Type", "application/json");
    let body = json!({"messages": [
        {"topic": "news", "event": "headline", "payload": {"text": "ünïcode"}},
        {"topic": "news", "event": "update", "payload": {"n": 2}, "id": "006554ce-4a7b-4c4a-9a6e-0123456789ab", "private": false},
    ]})
    .to_string();
    // Through the API gateway's path, with the token as a bearer.
    let (status, answer) = http(
        a.port,
        "POST",
        "/realtime/v1/api/broadcast",
        &[json_type, ("Authorization", &bearer)],
        &body,
    )
    .await;
    assert_eq!((status, answer.as_str()), (202, ""));
    let first = json!({"event": "headline", "payload": {"text": "ünïcode"}, "type": "broadcast"});
    let second = json!({"event": "update", "meta": {"id": "006554ce-4a7b-4c4a-9a6e-0123456789ab"}, "payload": {"n": 2}, "type": "broadcast"});
    assert_eq!(
        v2.recv().await,
        json!([null, null, "realtime:news", "broadcast", first])
    );
    assert_eq!(
        v2.recv().await,
        json!([null, null, "realtime:news", "broadcast", second])
    );
    assert_eq!(v1.recv().await["payload"], first);
    assert_eq!(v1.recv().await["payload"], second);
    // The apikey header alone works too, on /api/broadcast.
    let apikey = crate::gateway::valid("anon");
    let one = json!({"messages": [{"topic": "news", "event": "e", "payload": {}}]}).to_string();
    let (status, _) = http(
        b.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", &apikey)],
        &one,
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(v2.recv().await[4]["event"], "e");
    v1.recv().await;

    // Refusals, exactly; none of them sends anything.
    let (status, answer) = http(a.port, "POST", "/api/broadcast", &[json_type], &one).await;
    assert_eq!(
        (status, answer.as_str()),
        (401, r#"{"message":"Unauthorized"}"#)
    );
    let (status, answer) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", "nope")],
        &one,
    )
    .await;
    assert_eq!(
        (status, answer.as_str()),
        (401, r#"{"message":"Unauthorized"}"#)
    );
    let bad = json!({"messages": [
        {"topic": "news", "event": "ok", "payload": {}},
        {"topic": "news"},
        {"topic": "news", "event": "e", "payload": {}, "private": "maybe"},
        {"topic": "news", "event": "e", "payload": {"x": "y".repeat(3_001_000)}},
    ]})
    .to_string();
    let (status, answer) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", &apikey)],
        &bad,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        serde_json::from_str::<Value>(&answer).expect("json"),
        json!({"errors": {"messages": [
            {},
            {"event": ["can't be blank"], "payload": ["can't be blank"]},
            {"private": ["is invalid"]},
            {"payload": ["Payload size exceeds tenant limit"]},
        ]}})
    );
    // More messages than the rate allows: refused before any is read.
    let many: Vec<Value> = (0..101).map(|_| json!({})).collect();
    let body = json!({ "messages": many }).to_string();
    let (status, answer) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", &apikey)],
        &body,
    )
    .await;
    assert_eq!(
        (status, answer.as_str()),
        (
            429,
            r#"{"message":"Too many messages to broadcast, please reduce the batch size"}"#
        )
    );
    let (status, answer) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", &apikey)],
        "{}",
    )
    .await;
    assert_eq!(
        (status, answer.as_str()),
        (422, r#"{"errors":{"messages":["can't be blank"]}}"#)
    );
    let (status, _) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[json_type, ("apikey", &apikey)],
        "{nope",
    )
    .await;
    assert_eq!(status, 400);
    // A browser's preflight.
    let (status, _) = http(
        a.port,
        "OPTIONS",
        "/api/broadcast",
        &[("Origin", "https://app.example")],
        "",
    )
    .await;
    assert_eq!(status, 204);
    nothing(&mut v2).await;
    nothing(&mut v1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_come_back_after_redis_restarts_empty() {
    let mut redis = TestRedis::start();
    let (a, b) = two_gateways(&redis, &[]).await;
    let topic = "realtime:again";
    let mut alice = a.connect(Some("2.0.0")).await;
    let mut bob = b.connect(Some("2.0.0")).await;
    join_v2(&mut alice, "1", topic, presence_config("alice")).await;
    expect_push(&mut alice, topic, "presence_state").await;
    join_v2(&mut bob, "1", topic, presence_config("bob")).await;
    expect_push(&mut bob, topic, "presence_state").await;
    track(&mut alice, "2", topic, json!({"n": 1})).await;
    alice.recv().await;
    expect_push(&mut alice, topic, "presence_diff").await;
    expect_push(&mut bob, topic, "presence_diff").await;
    // Redis restarts with nothing in it. Both gateways reconnect and
    // alice's gateway writes her presence again. (Bob may see her leave
    // and join again meanwhile, if his gateway reads the room first.)
    redis.stop();
    redis.start_again();
    let mut conn = redis.connection().await;
    crate::support::eventually("alice's presence written again", FRAME_TIMEOUT, || {
        let mut conn = conn.clone();
        async move {
            redis::AsyncCommands::hlen::<_, usize>(
                &mut conn,
                "walcast:default:presence:public:again",
            )
            .await
            .unwrap_or(0)
                == 1
        }
    })
    .await;
    // Broadcasts flow again between the gateways (once both have
    // subscribed the room anew).
    let payload = json!({"type": "broadcast", "event": "back", "payload": {}});
    let frame = json!(["1", "3", topic, "broadcast", payload]).to_string();
    let deadline = std::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        alice.send(&frame).await;
        let got = tokio::time::timeout(Duration::from_millis(500), bob.ws.next()).await;
        if matches!(got, Ok(Some(Ok(Message::Text(ref t)))) if t.contains(r#""event":"back""#)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no broadcast crossed the gateways after Redis restarted"
        );
    }
    // A later track reaches bob as an update of the presence he knows.
    track(&mut alice, "4", topic, json!({"n": 2})).await;
    let diff = loop {
        let frame = bob.recv().await;
        if frame[3] == "presence_diff" {
            break frame[4].clone();
        }
    };
    assert_eq!(metas(&diff["joins"]), json!({"alice": [{"n": 2}]}));
    assert_eq!(metas(&diff["leaves"]), json!({"alice": [{"n": 1}]}));
    let fields: Vec<String> =
        redis::AsyncCommands::hkeys(&mut conn, "walcast:default:presence:public:again")
            .await
            .expect("hkeys");
    assert_eq!(fields.len(), 1, "{fields:?}");
}

/// The frames `client` receives until one matches `done`, in order.
async fn frames_until(client: &mut Client, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = client.recv().await;
        let last = done(&frame);
        seen.push(frame);
        if last {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_mixes_postgres_changes_broadcast_and_presence_and_leaving_cleans_all_three() {
    let stack = crate::support::stack::Stack::start().await;
    stack
        .client
        .batch_execute(crate::gateway::SETUP)
        .await
        .expect("setup");
    let _daemon = stack.spawn_gateway_daemon().await;
    let gateway = Gateway::spawn(&stack.redis.url()).await;
    let topic = "realtime:mixed";
    let config = json!({"broadcast": {"self": true, "ack": true}, "presence": {"key": "me", "enabled": true},
                        "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "todos"}], "private": false});
    let mut client = gateway.connect(Some("2.0.0")).await;
    client
        .send(&json!(["1", "1", topic, "phx_join", {"config": config}]).to_string())
        .await;
    let reply = client.recv().await;
    assert_eq!(reply[4]["status"], "ok");
    let binding = reply[4]["response"]["postgres_changes"][0]["id"].clone();
    // presence_state and "Subscribed to PostgreSQL", in either order.
    let first = frames_until(&mut client, |f| f[3] == "system").await;
    if !first.iter().any(|f| f[3] == "presence_state") {
        assert_eq!(client.recv().await[3], "presence_state");
    }
    // Presence, broadcast and a change, each on the same channel.
    track(&mut client, "2", topic, json!({"on": true})).await;
    client
        .send(&json!(["1", "3", topic, "broadcast", {"type": "broadcast", "event": "hi", "payload": {}}]).to_string())
        .await;
    stack
        .client
        .batch_execute("INSERT INTO todos VALUES (1, 'mixed', 'u1')")
        .await
        .expect("insert");
    // The change (from the daemon) and the echoes of the broadcast and the
    // diff (from this gateway) come over different publishers: in any order.
    let mut frames = Vec::new();
    let seen = |frames: &Vec<Value>, event: &str| frames.iter().any(|f| f[3] == event);
    while !(seen(&frames, "postgres_changes")
        && seen(&frames, "broadcast")
        && seen(&frames, "presence_diff"))
    {
        frames.push(client.recv().await);
    }
    let change = frames
        .iter()
        .find(|f| f[3] == "postgres_changes")
        .expect("a change")
        .clone();
    let events: Vec<(Value, Value)> = frames
        .iter()
        .map(|f| (f[1].clone(), f[3].clone()))
        .collect();
    assert!(
        events.contains(&(json!("2"), json!("phx_reply"))),
        "{frames:?}"
    );
    assert!(
        events.contains(&(json!("3"), json!("phx_reply"))),
        "{frames:?}"
    );
    assert!(
        events.contains(&(Value::Null, json!("presence_diff"))),
        "{frames:?}"
    );
    assert!(
        events.contains(&(Value::Null, json!("broadcast"))),
        "{frames:?}"
    );
    assert_eq!(change[4]["ids"], json!([binding]));
    assert_eq!(change[4]["data"]["record"]["task"], "mixed");
    // Leaving: the subscription, the presence and the room channel go.
    client
        .send(&json!(["1", "4", topic, "phx_leave", {}]).to_string())
        .await;
    frames_until(&mut client, |f| f[3] == "phx_close").await;
    let conn = stack.redis.connection().await;
    crate::support::eventually(
        "everything of the channel is gone from Redis",
        FRAME_TIMEOUT,
        || {
            let mut conn = conn.clone();
            async move {
                let presences: usize =
                    redis::AsyncCommands::hlen(&mut conn, "walcast:default:presence:public:mixed")
                        .await
                        .unwrap_or(1);
                let registry: usize = redis::AsyncCommands::hlen(
                    &mut conn,
                    "walcast:default:gateway:gw-test:subscriptions",
                )
                .await
                .unwrap_or(1);
                let (_, listeners): (String, usize) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg("walcast:default:room:public:mixed")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                presences == 0 && registry == 0 && listeners == 0
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_presence_rate_a_join_with_presence_is_closed() {
    let redis = TestRedis::start();
    let limit = [("WALCAST_MAX_PRESENCE_EVENTS_PER_SECOND", "1".to_owned())];
    let (a, _b) = two_gateways(&redis, &limit).await;
    let topic = "realtime:busy";
    // 13 sockets track: 13 states, 13 tracks and 91 diffs delivered, more
    // than the 60 a minute at 1/s allows.
    let mut crowd = Vec::new();
    for i in 0..13 {
        let mut client = a.connect(Some("2.0.0")).await;
        join_v2(&mut client, "1", topic, presence_config(&format!("k{i}"))).await;
        track(&mut client, "2", topic, json!({})).await;
        crowd.push(client);
    }
    // At the next 5 s tick the average counts: a join with presence is
    // then answered, told and closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut late = a.connect(Some("2.0.0")).await;
        join_v2(&mut late, "1", topic, presence_config("late")).await;
        let next = late.recv().await;
        if next[3] == "system" {
            assert_eq!(
                next,
                json!(["1", null, topic, "system", {"channel": "busy", "extension": "system", "message": "Too many presence messages per second", "status": "error"}])
            );
            assert_eq!(late.recv().await, json!(["1", "1", topic, "phx_close", {}]));
            break;
        }
        assert_eq!(next[3], "presence_state", "{next}");
        assert!(
            std::time::Instant::now() < deadline,
            "the presence rate never counted"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_events_rate_broadcasting_channels_are_closed_and_rest_gets_429() {
    let redis = TestRedis::start();
    let limit = [("WALCAST_MAX_EVENTS_PER_SECOND", "1".to_owned())];
    let (a, _b) = two_gateways(&redis, &limit).await;
    let topic = "realtime:flood";
    let mut flooder = a.connect(Some("2.0.0")).await;
    join_v2(&mut flooder, "1", topic, broadcast_config(false, false)).await;
    // 61 broadcasts: more than a minute at 1/s allows.
    for i in 0..61 {
        let frame = json!(["1", format!("f{i}"), topic, "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]);
        flooder.send(&frame.to_string()).await;
    }
    // From the next 5 s tick on, the next broadcast closes its channel
    // (Supabase's rate is the tenant's: every channel of the gateway).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let frame = json!(["1", "last", topic, "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]);
        flooder.send(&frame.to_string()).await;
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(500), flooder.ws.next()).await
        {
            assert_eq!(
                serde_json::from_str::<Value>(text.as_str()).expect("json"),
                json!(["1", null, topic, "system", {"channel": "flood", "extension": "system", "message": "Too many messages per second", "status": "error"}])
            );
            assert_eq!(
                flooder.recv().await,
                json!(["1", "1", topic, "phx_close", {}])
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the events rate never counted"
        );
    }
    let one = json!({"messages": [{"topic": "flood", "event": "e", "payload": {}}]}).to_string();
    let apikey = crate::gateway::valid("anon");
    let (status, answer) = http(
        a.port,
        "POST",
        "/api/broadcast",
        &[("Content-Type", "application/json"), ("apikey", &apikey)],
        &one,
    )
    .await;
    assert_eq!(
        (status, answer.as_str()),
        (429, r#"{"message":"You have exceeded your rate limit"}"#)
    );
    // The socket itself stays: it still answers a heartbeat.
    flooder.sync(true, "hb").await;
}
