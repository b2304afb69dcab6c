//! The bus on a Redis Cluster (issue 18): three masters with a replica
//! each, on loopback. Sharded pub/sub, every name under the tenant's hash
//! tag, and the same behaviour as on one Redis.

use std::time::Duration;

use serde_json::{Value, json};

use crate::check::{check, finding};
use crate::failover::frame;
use crate::gateway::{Client, FRAME_TIMEOUT, Gateway, SETUP, valid};
use crate::support::stack::DB;
use crate::support::{
    Daemon, PgOptions, TestPostgres, TestRedisCluster, eventually, free_port, tail,
};

/// Postgres with `todos` published and `sql/rls.sql`, a cluster, the
/// daemon streaming on it, and two gateways on it.
async fn start() -> (TestPostgres, TestRedisCluster, Daemon, Gateway, Gateway) {
    let pg = TestPostgres::start_with(PgOptions {
        extra_conf: vec!["track_commit_timestamp = on".into()],
        ..PgOptions::default()
    });
    let client = pg.setup_test_db(DB).await;
    client.batch_execute(SETUP).await.expect("setup");
    client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("install sql/rls.sql");
    let cluster = TestRedisCluster::start();
    let env = vec![
        ("WALCAST_DATABASE_URL", pg.url("postgres", DB)),
        ("WALCAST_REDIS_URL", cluster.urls()),
        ("WALCAST_REDIS_CLUSTER", "true".to_owned()),
        ("WALCAST_STATUS_INTERVAL", "100ms".to_owned()),
        ("WALCAST_RECONNECT_MAX_DELAY", "1s".to_owned()),
        ("WALCAST_LOG", "walcast=debug".to_owned()),
        ("WALCAST_ADMIN_ADDR", format!("127.0.0.1:{}", free_port())),
    ];
    let daemon = Daemon::spawn(&["run"], &env);
    eventually(
        &format!("the daemon streams\n{}", daemon.log()),
        Duration::from_secs(30),
        || async {
            matches!(
                client.query_opt("SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'walcast'", &[]).await,
                Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true)
            )
        },
    )
    .await;
    let gateway = |id: &'static str| {
        let urls = cluster.urls();
        async move {
            Gateway::spawn_with(
                &urls,
                &[
                    ("WALCAST_REDIS_CLUSTER", "true".to_owned()),
                    ("WALCAST_GATEWAY_ID", id.to_owned()),
                ],
            )
            .await
        }
    };
    let a = gateway("gw-a").await;
    let b = gateway("gw-b").await;
    (pg, cluster, daemon, a, b)
}

/// How many subscribers `channel` (a shard channel) has, all nodes
/// together.
pub(crate) fn shard_subscribers(cluster: &TestRedisCluster, channel: &str) -> usize {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let out = node.cli(&["PUBSUB", "SHARDNUMSUB", channel]);
            out.lines()
                .nth(1)
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Frames until one whose event is `event`; the others, in order.
async fn until(client: &mut Client, event: &str) -> (Value, Vec<String>) {
    let mut skipped = Vec::new();
    loop {
        let (got, payload) = tokio::time::timeout(FRAME_TIMEOUT, frame(client))
            .await
            .unwrap_or_else(|_| panic!("no {event} in time; had {skipped:?}"));
        if got == event {
            return (payload, skipped);
        }
        skipped.push(got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_broadcast_and_presence_cross_two_gateways_on_a_redis_cluster() {
    let (pg, cluster, daemon, a, b) = start().await;
    let topic = "realtime:mixed";
    let config = |key: &str| {
        json!({"broadcast": {"self": false, "ack": false}, "presence": {"key": key, "enabled": true},
               "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "todos"}], "private": false})
    };
    let token = valid("anon");
    let mut v2 = a.connect(Some("2.0.0")).await;
    let mut v1 = b.connect(Some("1.0.0")).await;
    v2.send(
        &json!(["1", "1", topic, "phx_join", {"config": config("a"), "access_token": token}])
            .to_string(),
    )
    .await;
    v1.send(
        &json!({"topic": topic, "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": config("b"), "access_token": token}})
        .to_string(),
    )
    .await;
    for socket in [&mut v2, &mut v1] {
        let (reply, _) = until(socket, "phx_reply").await;
        assert_eq!(reply["status"], "ok", "{reply}");
        // "Subscribed to PostgreSQL" (the daemon's answer, over the
        // cluster) and the presence state, in either order.
        let (system, before) = until(socket, "system").await;
        assert_eq!(system["message"], "Subscribed to PostgreSQL", "{system}");
        if !before.iter().any(|e| e == "presence_state") {
            until(socket, "presence_state").await;
        }
    }
    // Both gateways hold the room's shard channel, under the tenant's tag.
    let room = "walcast:{default}:room:public:mixed";
    eventually(
        "both gateways subscribed to the room",
        Duration::from_secs(20),
        || async { shard_subscribers(&cluster, room) == 2 },
    )
    .await;

    // A change reaches both gateways' sockets.
    pg.client(DB)
        .await
        .batch_execute("INSERT INTO todos VALUES (1, 'on a cluster', 'u1')")
        .await
        .expect("insert");
    for socket in [&mut v2, &mut v1] {
        let (change, skipped) = until(socket, "postgres_changes").await;
        assert_eq!(skipped, Vec::<String>::new());
        assert_eq!(
            change["data"]["record"],
            json!({"id": 1, "task": "on a cluster", "owner": "u1"}),
            "{}",
            daemon.log()
        );
    }
    // A broadcast from one gateway's socket reaches the other's.
    v1.send(
        &json!({"topic": topic, "event": "broadcast", "ref": "2", "join_ref": "1",
        "payload": {"type": "broadcast", "event": "hi", "payload": {"n": 1}}})
        .to_string(),
    )
    .await;
    let (broadcast, skipped) = until(&mut v2, "broadcast").await;
    assert_eq!(skipped, Vec::<String>::new());
    assert_eq!(
        broadcast,
        json!({"type": "broadcast", "event": "hi", "payload": {"n": 1}})
    );
    // A presence tracked on one gateway is in the other's diff.
    v2.send(&json!(["1", "3", topic, "presence", {"type": "presence", "event": "track", "payload": {"on": true}}]).to_string())
        .await;
    let (diff, _) = until(&mut v1, "presence_diff").await;
    assert_eq!(diff["joins"]["a"]["metas"][0]["on"], true, "{diff}");
    assert_eq!(diff["leaves"], json!({}));
    // The registry, like every key of the tenant, is under its hash tag.
    // (Only the master of its slot answers; the others redirect.)
    let answers: Vec<String> = cluster
        .nodes
        .iter()
        .map(|node| node.cli(&["HLEN", "walcast:{default}:gateway:gw-a:subscriptions"]))
        .filter(|out| out.trim().parse::<u64>().is_ok())
        .collect();
    assert_eq!(answers, ["1\n"], "{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_cluster_and_each_of_its_nodes() {
    let pg = TestPostgres::start();
    let client = pg.setup_test_db(DB).await;
    client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("install sql/rls.sql");
    let cluster = TestRedisCluster::start();
    let env = |url: String, cluster: bool| {
        vec![
            ("WALCAST_DATABASE_URL", pg.url("postgres", DB)),
            ("WALCAST_REDIS_URL", url),
            ("WALCAST_REDIS_CLUSTER", cluster.to_string()),
        ]
    };
    let (_, json) = check(&env(cluster.urls(), true));
    let found = finding(&json, "redis.cluster", None);
    assert_eq!(
        (&found["level"], &found["message"]),
        (
            &json!("ok"),
            &json!("the cluster is ok: 3 masters, 3 replicas, all 16384 slots assigned")
        ),
        "{json:#}"
    );
    // Every node's eviction policy, each named.
    let evictions: Vec<&Value> = json["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["check"] == "redis.eviction")
        .collect();
    assert_eq!(evictions.len(), 6, "{json:#}");
    assert!(
        evictions
            .iter()
            .all(|f| f["level"] == "ok" && f["subject"].is_string())
    );
    // One Redis taken for a cluster, and one node of the cluster taken
    // for one Redis: each refused, saying which.
    let single = crate::support::TestRedis::start();
    for (url, cluster_setting, message) in [
        (
            single.url(),
            true,
            "redis_cluster is true, but the bus's Redis is not a cluster node (cluster_enabled:0)",
        ),
        (
            cluster.nodes[0].url(),
            false,
            "the bus's Redis is a cluster node, but redis_cluster is false: commands for keys of other nodes' slots fail",
        ),
    ] {
        let (code, json) = check(&env(url, cluster_setting));
        assert_eq!(code, Some(1), "{json:#}");
        let found = finding(&json, "redis.cluster", None);
        assert_eq!(
            (&found["level"], &found["message"]),
            (&json!("error"), &json!(message))
        );
    }
}

/// The node that is master of the tenant's slot (`{default}`), by index.
fn tenant_master(cluster: &TestRedisCluster) -> usize {
    let slot: u16 = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", "walcast:{default}:x"])
        .trim()
        .parse()
        .expect("a slot");
    let nodes = cluster.nodes[0].cli(&["CLUSTER", "NODES"]);
    let owner = nodes
        .lines()
        .find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2).is_some_and(|f| f.contains("master"))
                && fields.iter().skip(8).any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
                })
        })
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|addr| addr.split('@').next())
        .expect("the slot's master")
        .to_owned();
    cluster
        .nodes
        .iter()
        .position(|n| format!("127.0.0.1:{}", n.port()) == owner)
        .expect("a node of ours")
}

/// A v2 socket on `gateway` joined to `topic` with INSERTs of `todos`,
/// once the daemon confirmed them.
async fn subscribed(gateway: &Gateway, topic: &str) -> Client {
    let mut socket = gateway.connect(Some("2.0.0")).await;
    socket
        .send(&json!(["1", "1", topic, "phx_join", {"config": {"broadcast": {"self": false, "ack": false},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "todos"}], "private": false},
            "access_token": valid("anon")}]).to_string())
        .await;
    let (reply, _) = until(&mut socket, "phx_reply").await;
    assert_eq!(reply["status"], "ok");
    let (system, _) = until(&mut socket, "system").await;
    assert_eq!(system["message"], "Subscribed to PostgreSQL");
    socket
}

/// After the bus lost the tenant's slot: the socket is told of the gap,
/// then (within the gateway's reconnection; a replica needs the node
/// timeout, 2 s here, to be promoted) subscribed again.
async fn told_of_the_gap_then_subscribed(
    socket: &mut Client,
    gateway: &Gateway,
    cluster: &TestRedisCluster,
) {
    let (gap, _) = until(socket, "system").await;
    assert_eq!(gap["status"], "error", "{gap}");
    let Ok((again, _)) =
        tokio::time::timeout(Duration::from_secs(18), until(socket, "system")).await
    else {
        panic!(
            "not subscribed again\n--- gateway ---\n{}\n{}",
            tail(&gateway.process.log(), 40),
            cluster.logs()
        )
    };
    assert_eq!(
        (&again["status"], &again["message"]),
        (&json!("ok"), &json!("Subscribed to PostgreSQL")),
        "{}",
        tail(&gateway.process.log(), 40)
    );
}

/// Row `id` inserted now reaches `socket`.
async fn a_new_row_arrives(
    client: &tokio_postgres::Client,
    socket: &mut Client,
    id: i64,
    daemon: &Daemon,
) {
    client
        .batch_execute(&format!("INSERT INTO todos VALUES ({id}, 'new', 'u1')"))
        .await
        .expect("insert");
    let (change, _) = until(socket, "postgres_changes").await;
    assert_eq!(
        change["data"]["record"]["id"],
        id,
        "{}",
        tail(&daemon.log(), 40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_sockets_are_told_of_the_gap_then_get_changes_again() {
    let (pg, mut cluster, daemon, a, _b) = start().await;
    let mut socket = subscribed(&a, "realtime:after").await;
    let client = pg.client(DB).await;
    client
        .batch_execute("INSERT INTO todos VALUES (1, 'before', 'u1')")
        .await
        .expect("insert");
    let (change, _) = until(&mut socket, "postgres_changes").await;
    assert_eq!(change["data"]["record"]["id"], 1);

    // The master of the tenant's slot dies; its replica takes over.
    let master = tenant_master(&cluster);
    cluster.nodes[master].kill();
    // The gateway's shard subscription went with it: its socket is told
    // of the gap, then subscribed again once the daemon confirms.
    told_of_the_gap_then_subscribed(&mut socket, &a, &cluster).await;
    assert_ne!(tenant_master(&cluster), master, "a replica was promoted");
    a_new_row_arrives(&client, &mut socket, 2, &daemon).await;
    // Postgres was told only what the new master holds: the slot's
    // confirmed position passes row 2's commit once it was published.
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    eventually("the slot confirms row 2", Duration::from_secs(30), || async {
        matches!(
            client.query_opt(&format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = 'walcast'"), &[]).await,
            Ok(Some(row)) if row.get::<_, Option<bool>>(0) == Some(true)
        )
    })
    .await;
}

/// The id and port of every master.
fn masters(cluster: &TestRedisCluster) -> Vec<(String, u16)> {
    cluster.nodes[0]
        .cli(&["CLUSTER", "NODES"])
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            let port = fields
                .get(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            Some((fields.first()?.to_string(), port))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_slot_migrated_to_another_master_ends_no_delivery_for_good() {
    let (pg, cluster, daemon, a, _b) = start().await;
    let mut socket = subscribed(&a, "realtime:moved").await;

    // Move the tenant's slot, keys and all, to another master, as
    // redis-cli --cluster reshard does for each slot.
    let slot = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", "walcast:{default}:x"])
        .trim()
        .to_owned();
    let from = tenant_master(&cluster);
    let from_port = cluster.nodes[from].port();
    let all = masters(&cluster);
    let from_id = all
        .iter()
        .find(|(_, p)| *p == from_port)
        .expect("source")
        .0
        .clone();
    let (to_id, to_port) = all
        .iter()
        .find(|(_, p)| *p != from_port)
        .expect("target")
        .clone();
    let to = cluster
        .nodes
        .iter()
        .position(|n| n.port() == to_port)
        .expect("target node");
    assert_eq!(
        cluster.nodes[to]
            .cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .trim(),
        "OK"
    );
    assert_eq!(
        cluster.nodes[from]
            .cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .trim(),
        "OK"
    );
    let keys = cluster.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
    let keys: Vec<&str> = keys
        .lines()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    assert!(
        !keys.is_empty(),
        "the tenant's registry and leases are in its slot"
    );
    let mut migrate = vec!["MIGRATE", "127.0.0.1", "", "", "0", "5000", "KEYS"];
    let port = to_port.to_string();
    migrate[2] = &port;
    migrate.extend(keys.iter().copied());
    assert_eq!(cluster.nodes[from].cli(&migrate).trim(), "OK");
    for (_, port) in &all {
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.port() == *port)
            .expect("master");
        assert_eq!(
            node.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
                .trim(),
            "OK"
        );
    }
    // The cluster ended the shard subscriptions: the socket is told of
    // the gap, then subscribed again on the slot's new master.
    told_of_the_gap_then_subscribed(&mut socket, &a, &cluster).await;
    assert!(
        a.process
            .log()
            .contains("redis cluster ended a shard subscription by itself"),
        "{}",
        tail(&a.process.log(), 30)
    );
    assert_eq!(tenant_master(&cluster), to);
    a_new_row_arrives(&pg.client(DB).await, &mut socket, 3, &daemon).await;
}
