"""Broadcast and Presence (issue 16): sockets on one topic spread over two
`walcast gateway` processes sharing one Redis; no Postgres, no daemon.

`bench/run --only broadcast,presence`. The load client is
`examples/room_client.rs` (Rust, built here), one process for all sockets
(vsn 2.0.0, as realtime-js), alternating between the two gateways.

**broadcast**: N sockets (10,000 by default) join `realtime:room`; one
more socket on the first gateway sends broadcasts as realtime-js ≥ 2.91
does (binary kind 3, JSON payload `{"t": send time µs}`); every socket
receives each as binary kind 4. Phases, each counted afresh:

- *burst* (throughput, `--repeat` times, median shown): K messages sent as
  fast as the sender writes (K × N ≈ 1,000,000 deliveries, K ≤ 500: each
  socket's queue holds 1,024 deliveries). msgs/s delivered = K × N ÷ (last
  receive − first send).
- *paced* (latency) at a quarter and a half of the burst's rate: K/s = rate
  ÷ N sends per second for S seconds (10 by default), evenly spaced.
  Latency = receive time − send time, 100 µs buckets.

**presence**: M sockets (1,000 by default) join the topic with presence
on (key `s<i>`), then all track at once: time until every socket's state
(from `presence_state` and each `presence_diff`) holds all M keys. Then
the second gateway is killed (SIGKILL): time until every socket of the
first gateway shows only its own gateway's M/2 keys (bounded by the
gateway lease, 30 s, plus the 5 s check). Gateway RSS per tracking
socket: both gateways' RSS with the sockets tracking, minus before any
socket, ÷ M.

CPU seconds of both gateways, the client and Redis are read per phase:
the client shares the machine's cores with the gateways, and its share
is shown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .fanout import _raise_open_files, _rss, spawn_gateway
from .procs import BenchError, LineClient, build_example, cpu_seconds, stop, tail
from .redis import RedisServer
from .report import table

TENANT = "rooms"
SECRET = "walcast-rooms-bench-secret-0123456789"
TOPIC = "room"
MAX_BURST = 500  # sends per burst: below each socket's queue of 1,024 deliveries
TARGET = (10_000, 200_000, 50.0)  # issue 16: 10,000 sockets, ≥ 200,000 msgs/s delivered, p99 ≤ 50 ms
PRESENCE_TARGET = 5.0  # issue 16: every state holds all 1,000 keys within 5 s

#           broadcast sockets  deliveries per burst  paced seconds  presence sockets  lease
PRESETS = {
    "default": (10_000, 1_000_000, 10, 1_000, "30s"),
    "quick": (10_000, 300_000, 5, 1_000, "30s"),
    "smoke": (40, 2_000, 2, 20, "3s"),
}


@dataclass
class Phase:
    name: str
    sends: int
    expected: int
    messages: int
    seconds: float
    complete: bool
    p50_ms: float
    p99_ms: float
    max_ms: float
    offered_rate: float | None
    gateway_cpu: float
    client_cpu: float
    redis_cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BroadcastResult:
    sockets: int
    joined_seconds: float
    rss_none: int
    rss_idle: int
    phases: list[Phase] = field(default_factory=list)
    burst_rates: list[float] = field(default_factory=list)


@dataclass
class PresenceResult:
    sockets: int
    joined_seconds: float
    all_keys_seconds: float
    leaves_seconds: float
    lease: str
    rss_none: int
    rss_tracking: int
    gateway_cpu: float
    client_cpu: float
    redis_cpu: float

    @property
    def per_socket(self) -> float:
        return (self.rss_tracking - self.rss_none) / self.sockets


class Gateways:
    """`count` gateway processes (two by default) on one Redis or a cluster."""

    def __init__(self, binary: Path, redis: RedisServer, logs: Path, name: str, sockets: int, lease: str,
                 count: int = 2) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        for i in range(count):
            log = logs / f"gateway-{name}-{i}.log"
            # Admission and rate limits are not what is measured.
            gateway, port = spawn_gateway(
                binary, redis, log, TENANT, SECRET, f"{name}-{i}",
                WALCAST_MAX_CONCURRENT_USERS=str(sockets + 100), WALCAST_MAX_JOINS_PER_SECOND="1000000",
                WALCAST_MAX_EVENTS_PER_SECOND="1000000", WALCAST_MAX_PRESENCE_EVENTS_PER_SECOND="1000000",
                WALCAST_GATEWAY_LEASE=lease, WALCAST_LOG="warn")
            self.procs.append(gateway)
            self.ports.append(port)
            self.logs.append(log)

    def addrs(self) -> list[str]:
        args = []
        for port in self.ports:
            args += ["--addr", f"127.0.0.1:{port}"]
        return args

    def rss(self) -> int:
        return sum(_rss(p.pid) for p in self.procs if p.poll() is None)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.poll() is None)

    def stop(self) -> None:
        for p in self.procs:
            stop(p)


def _client(binary: Path, gateways: Gateways, mode: str, sockets: int, log: Path) -> LineClient:
    env = dict(os.environ, ROOM_JWT_SECRET=SECRET)
    return LineClient("room client", [str(binary), *gateways.addrs(), "--sockets", str(sockets), "--mode", mode,
                                      "--topic", TOPIC, "--stall-seconds", "90"], env, log)


def _phase(name: str, sends: int, rate: float, n: int, client: LineClient, gateways: Gateways,
           redis: RedisServer, log, strict: bool) -> Phase:
    client.send(f"phase {name}")
    client.wait_for("phase_started", 30)
    cpu0 = (gateways.cpu(), cpu_seconds(client.proc.pid), redis.cpu())
    client.send(f"send {sends} {rate:.3f}")
    client.wait_for("sent", 60 + (sends / rate if rate else 0))
    client.send(f"expect {sends}")
    got = client.wait_for("phase", 600)
    cpu1 = (gateways.cpu(), cpu_seconds(client.proc.pid), redis.cpu())
    if got["messages"] > got["expected"] or got["max_per_socket"] > sends:
        raise BenchError(f"broadcast {name}: {got['messages']:,} frames for {got['expected']:,}: duplicates")
    if not got["complete"] and (strict or not got["closed"]):
        raise BenchError(f"broadcast {name}: {got['messages']:,} of {got['expected']:,} frames arrived, "
                         f"{got['closed']} sockets closed; the gateways' logs end:\n"
                         + "\n".join(tail(p) for p in gateways.logs))
    seconds = (got["last_recv_us"] - got["first_send_us"]) / 1e6 if got["first_send_us"] else 0.0
    lat = got["latency_ms"]
    return Phase(name=name, sends=sends, expected=got["expected"], messages=got["messages"], seconds=seconds,
                 complete=got["complete"], p50_ms=lat["p50"], p99_ms=lat["p99"], max_ms=lat["max"],
                 offered_rate=rate * n if rate else None, gateway_cpu=cpu1[0] - cpu0[0],
                 client_cpu=cpu1[1] - cpu0[1], redis_cpu=cpu1[2] - cpu0[2])


def _broadcast(binary: Path, client_bin: Path, redis: RedisServer, logs: Path, args, log) -> BroadcastResult:
    n = args.broadcast_sockets
    gateways = Gateways(binary, redis, logs, "broadcast", n, "30s")
    client = None
    try:
        time.sleep(0.5)
        rss_none = gateways.rss()
        log(f"broadcast {n:,} sockets over 2 gateways: connecting and joining")
        client = _client(client_bin, gateways, "broadcast", n, logs / "room-client-broadcast.log")
        ready = client.wait_for("ready", 120 + n / 20)
        time.sleep(1.0)  # the gateways subscribe the room just after the join replies
        result = BroadcastResult(n, ready["joined_seconds"], rss_none, gateways.rss())
        sends = max(1, min(MAX_BURST, -(-args.broadcast_messages // n)))
        bursts = []
        for i in range(args.repeat):
            p = _phase("burst", sends, 0, n, client, gateways, redis, log, args.smoke)
            bursts.append(p)
            log(f"broadcast {n:,} sockets, burst {i + 1}: {p.messages:,} messages in {p.seconds:.2f}s = "
                f"{p.rate:,.0f}/s, p99 {p.p99_ms:.1f} ms")
        result.burst_rates = [b.rate for b in bursts]
        burst = sorted(bursts, key=lambda b: b.rate)[len(bursts) // 2]
        result.phases.append(burst)
        for fraction in (0.25, 0.5):
            per_second = max(1.0, burst.rate * fraction / n)
            count = max(1, round(per_second * args.broadcast_seconds))
            p = _phase("paced", count, per_second, n, client, gateways, redis, log, args.smoke)
            result.phases.append(p)
            log(f"broadcast {n:,} sockets, paced {per_second:,.1f} sends/s: {p.rate:,.0f} msgs/s, "
                f"p50 {p.p50_ms:.1f} ms, p99 {p.p99_ms:.1f} ms, max {p.max_ms:.1f} ms")
        return result
    finally:
        if client is not None:
            client.close()
        gateways.stop()


def _presence(binary: Path, client_bin: Path, redis: RedisServer, logs: Path, args, log) -> PresenceResult:
    n = args.presence_sockets
    gateways = Gateways(binary, redis, logs, "presence", n, args.presence_lease)
    client = None
    try:
        time.sleep(0.5)
        rss_none = gateways.rss()
        log(f"presence {n:,} sockets over 2 gateways: connecting and joining")
        client = _client(client_bin, gateways, "presence", n, logs / "room-client-presence.log")
        ready = client.wait_for("ready", 120 + n / 20)
        client.send("keys 0")
        client.wait_for("keys", 60)
        assert redis.proc is not None
        cpu0 = (gateways.cpu(), cpu_seconds(client.proc.pid), cpu_seconds(redis.proc.pid))
        client.send("track")
        client.wait_for("tracking", 30)
        client.send(f"keys {n}")
        got = client.wait_for("keys", 600)
        cpu1 = (gateways.cpu(), cpu_seconds(client.proc.pid), cpu_seconds(redis.proc.pid))
        if not got["complete"]:
            raise BenchError(f"presence: after tracking, sockets hold {got['min']}..{got['max']} of {n} keys")
        log(f"presence {n:,} sockets: every state holds all {n:,} keys after {got['seconds']:.2f}s")
        time.sleep(1.0)
        rss_tracking = gateways.rss()
        killed = gateways.procs[1]
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        t0 = time.monotonic()
        client.send(f"keys {(n + 1) // 2}")
        left = client.wait_for("keys", 600)
        leaves_seconds = time.monotonic() - t0
        if not left["complete"]:
            raise BenchError(f"presence: after the kill, sockets hold {left['min']}..{left['max']} keys, "
                             f"not {(n + 1) // 2}")
        log(f"presence: the killed gateway's {n // 2:,} presences left after {leaves_seconds:.1f}s")
        return PresenceResult(n, ready["joined_seconds"], got["seconds"], leaves_seconds, args.presence_lease,
                              rss_none, rss_tracking, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], cpu1[2] - cpu0[2])
    finally:
        if client is not None:
            client.close()
        gateways.stop()


def configure(args, preset: str) -> None:
    sockets, messages, seconds, presence, lease = PRESETS[preset]
    args.broadcast_sockets = sockets
    args.broadcast_messages = messages
    args.broadcast_seconds = seconds
    args.presence_sockets = presence
    args.presence_lease = lease


def run(binary: Path, redis: RedisServer, logs: Path, args, log) -> dict:
    _raise_open_files([args.broadcast_sockets if args.broadcast else 0, args.presence_sockets])
    client_bin = build_example("room_client", args.debug, log)
    out = {}
    if args.broadcast:
        out["broadcast"] = _broadcast(binary, client_bin, redis, logs, args, log)
    if args.presence:
        out["presence"] = _presence(binary, client_bin, redis, logs, args, log)
    return out


def print_report(results: dict, args) -> None:
    b = results.get("broadcast")
    if b:
        print()
        print(f"Broadcast (issue 16): {b.sockets:,} sockets on one topic over 2 gateways on one Redis, one sender (a")
        print("realtime-js-style binary push each), kind 4 frames to every socket; latency = receive − send time.")
        print("burst = K sends as fast as the sender writes, timed from the first send to the last frame received;")
        print("paced = evenly spaced sends at ¼ and ½ of the burst's delivered rate. CPU s of both gateways, the")
        print("client (every socket, one process sharing the 2 cores) and Redis during the phase.")
        print()
        header = [["", "sends", "messages", "offered msgs/s", "seconds", "delivered msgs/s", "p50 ms", "p99 ms",
                   "max ms", "gateways CPU s", "client CPU s", "client share", "redis CPU s"]]
        rows = []
        for p in b.phases:
            busy = p.gateway_cpu + p.client_cpu + p.redis_cpu
            rows.append([p.name, f"{p.sends:,}", f"{p.messages:,}",
                         "-" if p.offered_rate is None else f"{p.offered_rate:,.0f}", f"{p.seconds:.2f}",
                         f"{p.rate:,.0f}", f"{p.p50_ms:.1f}", f"{p.p99_ms:.1f}", f"{p.max_ms:.1f}",
                         f"{p.gateway_cpu:.2f}", f"{p.client_cpu:.2f}",
                         f"{p.client_cpu / busy:.0%}" if busy else "-", f"{p.redis_cpu:.2f}"])
        print(table(header, rows, left=1))
        print()
        print("Every burst, msgs/s in run order: " + ", ".join(f"{x:,.0f}" for x in b.burst_rates) + f". Joined in "
              f"{b.joined_seconds:.1f}s; gateways' RSS {b.rss_none / 2**20:.1f} MB before any socket, "
              f"{b.rss_idle / 2**20:.1f} MB with them ({(b.rss_idle - b.rss_none) / b.sockets / 1024:.1f} KB/socket).")
        if not args.smoke:
            sockets, rate, p99 = TARGET
            half = [p for p in b.phases if p.name == "paced"][-1:]
            burst = b.phases[0].rate
            print(f"Issue 16's target, {sockets:,} sockets: ≥ {rate:,} msgs/s delivered: {burst:,.0f}/s "
                  f"({'met' if burst >= rate else 'NOT MET'}); p99 ≤ {p99:.0f} ms at half the maximum: "
                  + (f"{half[0].p99_ms:.1f} ms ({'met' if half[0].p99_ms <= p99 else 'NOT MET'})" if half else "-")
                  + ".")
    p = results.get("presence")
    if p:
        print()
        print(f"Presence (issue 16): {p.sockets:,} sockets on one topic over 2 gateways, all tracking at once; then")
        print(f"one gateway killed (SIGKILL, gateway_lease {p.lease}).")
        print()
        header = [["sockets", "joined s", "all keys s", "leaves s", "RSS none MB", "RSS tracking MB", "KB/socket",
                   "gateways CPU s", "client CPU s", "redis CPU s"]]
        rows = [[f"{p.sockets:,}", f"{p.joined_seconds:.1f}", f"{p.all_keys_seconds:.2f}", f"{p.leaves_seconds:.1f}",
                 f"{p.rss_none / 2**20:.1f}", f"{p.rss_tracking / 2**20:.1f}", f"{p.per_socket / 1024:.1f}",
                 f"{p.gateway_cpu:.2f}", f"{p.client_cpu:.2f}", f"{p.redis_cpu:.2f}"]]
        print(table(header, rows))
        if not args.smoke:
            print(f"Issue 16's targets: every state holds all keys within {PRESENCE_TARGET:.0f} s: "
                  f"{p.all_keys_seconds:.2f}s ({'met' if p.all_keys_seconds <= PRESENCE_TARGET else 'NOT MET'}); "
                  f"leaves within the lease + 5 s: {p.leaves_seconds:.1f}s.")


def as_json(results: dict) -> dict:
    return {k: asdict(v) for k, v in results.items()}


def checks(results: dict) -> int:
    b = results.get("broadcast")
    return (len(b.phases) if b else 0) + (1 if results.get("presence") else 0)
