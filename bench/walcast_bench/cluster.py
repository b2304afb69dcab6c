"""The bus on a Redis Cluster next to one Redis (issue 18): broadcast
fan-out to N sockets over three gateways, the same load on each bus in
the same run.

`bench/run --only cluster`. One sender's realtime-js-style binary pushes
(as `--only broadcast`) reach every socket of one topic, the sockets
spread over three `walcast gateway` processes; the room's messages go
through the bus as `PUBLISH` on one Redis, as `SPUBLISH` on a cluster of
three masters with a replica each (all on this machine). burst = K sends
as fast as the sender writes, timed from the first send to the last
frame; paced = sends at ¼ of the burst's delivered rate. Every frame is
checked (none missing, none twice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import rooms
from .fanout import _raise_open_files
from .procs import build_example
from .redis import RedisCluster, RedisServer
from .report import table

GATEWAYS = 3

#           sockets  messages  paced seconds
PRESETS = {
    "default": (10_000, 1_000_000, 3),
    "quick": (2_000, 200_000, 2),
    "smoke": (30, 1_500, 1),
}


@dataclass
class Bus:
    name: str
    sockets: int
    joined_seconds: float
    phases: list[rooms.Phase] = field(default_factory=list)


def configure(args, preset: str) -> None:
    args.cluster_sockets, args.cluster_messages, args.cluster_seconds = PRESETS[preset]


def _one(name: str, bus, binary: Path, client_bin: Path, logs: Path, args, log) -> Bus:
    n = args.cluster_sockets
    key = name.replace(" ", "-")
    gateways = rooms.Gateways(binary, bus, logs, f"cluster-{key}", n, "30s", count=GATEWAYS)
    client = None
    try:
        log(f"cluster bench, {name}: {n:,} sockets over {GATEWAYS} gateways, connecting and joining")
        client = rooms._client(client_bin, gateways, "broadcast", n, logs / f"room-client-cluster-{key}.log")
        ready = client.wait_for("ready", 120 + n / 20)
        result = Bus(name, n, ready["joined_seconds"])
        sends = max(1, min(rooms.MAX_BURST, -(-args.cluster_messages // n)))
        bursts = []
        for _ in range(args.repeat):
            p = rooms._phase("burst", sends, 0, n, client, gateways, bus, log, args.smoke)
            bursts.append(p)
            log(f"cluster bench, {name}: burst {p.messages:,} messages in {p.seconds:.2f}s = {p.rate:,.0f}/s")
        burst = sorted(bursts, key=lambda b: b.rate)[len(bursts) // 2]
        result.phases.append(burst)
        per_second = max(1.0, burst.rate * 0.25 / n)
        count = max(1, round(per_second * args.cluster_seconds))
        p = rooms._phase("paced", count, per_second, n, client, gateways, bus, log, args.smoke)
        result.phases.append(p)
        log(f"cluster bench, {name}: paced {p.rate:,.0f} msgs/s, p50 {p.p50_ms:.1f} ms, p99 {p.p99_ms:.1f} ms")
        return result
    finally:
        if client is not None:
            client.close()
        gateways.stop()


def run(binary: Path, redis: RedisServer, logs: Path, args, log) -> list[Bus]:
    _raise_open_files([args.cluster_sockets])
    client_bin = build_example("room_client", args.debug, log)
    cluster = RedisCluster(logs / "redis-cluster")
    log("cluster bench: starting a Redis Cluster (3 masters, 3 replicas)")
    cluster.start()
    try:
        return [_one("one redis", redis, binary, client_bin, logs, args, log),
                _one("cluster", cluster, binary, client_bin, logs, args, log)]
    finally:
        cluster.stop()


def print_report(results: list[Bus], args) -> None:
    print()
    n = results[0].sockets
    print(f"Bus on a Redis Cluster (issue 18): broadcast fan-out to {n:,} sockets over {GATEWAYS} gateways, one")
    print("sender; the same load on one Redis (PUBLISH) and on a 3-master cluster (SPUBLISH), in this run.")
    print("redis CPU s = all nodes of the bus.")
    print()
    header = [["bus", "phase", "messages", "seconds", "delivered msgs/s", "p50 ms", "p99 ms", "max ms",
               "gateways CPU s", "client CPU s", "redis CPU s"]]
    rows = [[b.name, p.name, f"{p.messages:,}", f"{p.seconds:.2f}", f"{p.rate:,.0f}", f"{p.p50_ms:.1f}",
             f"{p.p99_ms:.1f}", f"{p.max_ms:.1f}", f"{p.gateway_cpu:.2f}", f"{p.client_cpu:.2f}",
             f"{p.redis_cpu:.2f}"]
            for b in results for p in b.phases]
    print(table(header, rows, left=2))
    print()
    single, cluster = results[0].phases[0], results[1].phases[0]
    if single.rate:
        print(f"Burst on the cluster = {cluster.rate / single.rate:.2f} × one Redis "
              f"({cluster.rate:,.0f} vs {single.rate:,.0f} msgs/s).")


def as_json(results: list[Bus] | None) -> list[dict] | None:
    return None if results is None else [asdict(b) for b in results]
