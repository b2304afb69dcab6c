"""Private channels and Broadcast from Database (issue 17): messages written
with `realtime.send` to private topics, end to end to sockets of distinct
claims, daemon → Redis → `walcast gateway`.

`bench/run --only private`. `walcast setup` creates the `realtime` schema
in the bench database; one policy lets an `authenticated` JWT read topic
`priv:<room>` when its `room` claim is `<room>`. N sockets (1,000 by
default) each join the private channel of their own topic with their own
token (`sub` `u<i>`, `room` `<i>`), through `examples/room_client.rs
--mode private` (Rust, vsn 2.0.0): every join is authorized by the daemon
(RLS probe), and every message is decided for its socket's (role, claims,
topic) on the committed row, one call per batch for all of them.

- **burst** (throughput): one transaction writes M messages (20,000 by
  default) round-robin over the N topics; msgs/s = M ÷ (last frame
  received − the commit returned). Beside it, the prompt reader (a
  replication client that only counts changes, `bench/prompt_reader.py`)
  drains the same WAL from a slot made before the burst: the reference of
  the same run.
- **paced** (latency): pgbench calls `realtime.send` at 1,000 messages/s
  (one per transaction, a random topic) for S seconds; latency = frame
  received − the row's insert time (`clock_timestamp()` in the payload),
  100 µs buckets.

CPU seconds of the daemon, the gateway, the client and Redis per phase.
Checked: the frames received equal the messages written (a shortfall or a
duplicate stops the run).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import consumers
from .consumers import drop_slot, slot_position
from .fanout import _raise_open_files, spawn_gateway
from .pg import Cluster
from .procs import BenchError, LineClient, build_example, cpu_seconds, free_port, spawn, stop, tail
from .redis import RedisServer
from .report import table

TENANT = "private"
SECRET = "walcast-private-bench-secret-0123456789"
TOPIC = "priv"
SLOT = "walcast_private"
REFERENCE_SLOT = "private_reference"
PUBLICATION = "supabase_realtime_messages_publication"
TARGET = (1_000, 10_000, 1_000, 50.0)  # issue 17: 1,000 sockets, ≥ 10,000 msgs/s, p99 ≤ 50 ms at 1,000/s

#           sockets  burst messages  paced rate  paced seconds
PRESETS = {
    "default": (1_000, 20_000, 1_000, 10),
    "quick": (1_000, 10_000, 1_000, 5),
    "smoke": (20, 200, 100, 2),
}

POLICY = """
CREATE POLICY bench_read ON realtime.messages FOR SELECT TO authenticated
  USING (realtime.topic() = 'priv:' || (current_setting('request.jwt.claims', true)::jsonb ->> 'room'))
"""
SEND = ("realtime.send(jsonb_build_object('t', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint), "
        "'b', 'priv:' || {topic}, true)")


@dataclass
class Phase:
    name: str
    messages: int
    received: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    offered_rate: float | None
    daemon_cpu: float
    gateway_cpu: float
    client_cpu: float
    redis_cpu: float

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Result:
    sockets: int
    joined_seconds: float
    phases: list[Phase]
    reference_seconds: float
    reference_messages: int

    @property
    def reference_rate(self) -> float:
        return self.reference_messages / self.reference_seconds if self.reference_seconds > 0 else 0.0


def configure(args, preset: str) -> None:
    args.private_sockets, args.private_messages, args.private_rate, args.private_seconds = PRESETS[preset]


def _setup(binary: Path, cluster: Cluster, logs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env["WALCAST_ADMIN_DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{cluster.port}/bench?sslmode=disable"
    done = subprocess.run([str(binary), "setup"], env=env, capture_output=True, text=True)
    (logs / "private-setup.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise BenchError(f"walcast setup failed:\n{done.stdout}{done.stderr}")
    with cluster.client() as c:
        c.query(POLICY)


def _cpu(procs: list[subprocess.Popen]) -> list[float]:
    return [cpu_seconds(p.pid) for p in procs]


def _phase(name: str, messages: int, client: LineClient, procs: list[subprocess.Popen], write, offered,
           log) -> Phase:
    client.send(f"phase {name}")
    client.wait_for("phase_started", 30)
    cpu0 = _cpu(procs)
    committed_us = write()
    client.send(f"total {messages}")
    got = client.wait_for("phase", 900)
    cpu1 = _cpu(procs)
    if not got["complete"]:
        raise BenchError(f"private {name}: {got['messages']:,} frames for {messages:,} messages "
                         f"({got['closed']} sockets closed)")
    start_us = committed_us if committed_us is not None else got["first_send_us"]
    seconds = (got["last_recv_us"] - start_us) / 1e6
    lat = got["latency_ms"]
    used = [b - a for a, b in zip(cpu0, cpu1)]
    return Phase(name, messages, got["messages"], seconds, lat["p50"], lat["p99"], lat["max"], offered, *used)


def _burst_write(cluster: Cluster, messages: int, topics: int):
    def write() -> int:
        with cluster.client() as c:
            c.query(f"DO $$ BEGIN FOR g IN 0..{messages - 1} LOOP PERFORM {SEND.format(topic=f'(g % {topics})')}; "
                    "END LOOP; END $$")
        return time.time_ns() // 1000
    return write


def _paced_write(cluster: Cluster, rate: float, seconds: int, topics: int):
    def write() -> None:
        script = f"\\set r random(0, {topics - 1})\nSELECT {SEND.format(topic=':r')};\n"
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
            f.write(script)
            f.flush()
            done = subprocess.run(
                [cluster.tool("pgbench"), "-n", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                 "-c", "1", "-j", "1", "-R", f"{rate:.3f}", "-t", str(int(rate * seconds)), "-f", f.name,
                 "bench"],
                capture_output=True, text=True,
            )
        if done.returncode != 0:
            raise BenchError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
        return None
    return write


def run(binary: Path, cluster: Cluster, redis: RedisServer, logs: Path, args, log) -> Result:
    n = args.private_sockets
    _raise_open_files([n])
    client_bin = build_example("room_client", args.debug, log)
    _setup(binary, cluster, logs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env.update(
        WALCAST_DATABASE_URL=f"postgres://postgres@127.0.0.1:{cluster.port}/bench?sslmode=disable",
        WALCAST_REDIS_URL=redis.url, WALCAST_SLOT=SLOT, WALCAST_TENANT=TENANT, WALCAST_FIREHOSE="false",
        WALCAST_ADMIN_ADDR=f"127.0.0.1:{free_port()}", WALCAST_LOG="warn",
    )
    env.update(getattr(args, "daemon_settings", {}))
    daemon_log = logs / "daemon-private.log"
    daemon = spawn([str(binary), "run"], env=env, log=daemon_log)
    gateway = client = None
    pg = cluster.client()
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(BenchError):  # the slot is not there yet
                if slot_position(pg, SLOT)[1]:
                    break
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"walcast did not start streaming:\n{tail(daemon_log)}")
            time.sleep(0.05)
        gateway_log = logs / "gateway-private.log"
        gateway, port = spawn_gateway(binary, redis, gateway_log, TENANT, SECRET, "private-0",
                                      WALCAST_MAX_CONCURRENT_USERS=str(n + 100),
                                      WALCAST_MAX_JOINS_PER_SECOND="1000000",
                                      WALCAST_MAX_EVENTS_PER_SECOND="1000000", WALCAST_LOG="warn")
        log(f"private {n:,} sockets on {n:,} private topics: connecting, joining (each authorized by the daemon)")
        client = LineClient("room client", [str(client_bin), "--addr", f"127.0.0.1:{port}", "--sockets", str(n),
                                            "--mode", "private", "--topics", str(n), "--topic", TOPIC,
                                            "--stall-seconds", "60"],
                            dict(os.environ, ROOM_JWT_SECRET=SECRET), logs / "room-client-private.log")
        ready = client.wait_for("ready", 120 + n / 20)
        log(f"private: {n:,} sockets joined in {ready['joined_seconds']:.1f}s")
        assert redis.proc is not None
        procs = [daemon, gateway, client.proc, redis.proc]
        pg.query(f"SELECT pg_create_logical_replication_slot('{REFERENCE_SLOT}', 'pgoutput')")
        phases = []
        m = args.private_messages
        burst = _phase("burst", m, client, procs, _burst_write(cluster, m, n), None, log)
        phases.append(burst)
        log(f"private burst: {m:,} messages delivered in {burst.seconds:.2f}s = {burst.rate:,.0f}/s")
        reference = consumers._scripted("prompt reader", [consumers.sys.executable,
                                                          str(consumers.HERE / "prompt_reader.py")],
                                        cluster, REFERENCE_SLOT, m, logs, publication=PUBLICATION)
        drop_slot(pg, REFERENCE_SLOT)
        log(f"private burst: the prompt reader drained the same {m:,} messages in {reference.seconds:.2f}s "
            f"= {m / reference.seconds:,.0f}/s")
        rate, seconds = args.private_rate, args.private_seconds
        total = int(rate * seconds)
        paced = _phase("paced", total, client, procs, _paced_write(cluster, rate, seconds, n), rate, log)
        phases.append(paced)
        log(f"private paced {rate:,.0f}/s: p50 {paced.p50_ms:.1f} ms, p99 {paced.p99_ms:.1f} ms, "
            f"max {paced.max_ms:.1f} ms")
        return Result(n, ready["joined_seconds"], phases, reference.seconds, m)
    finally:
        if client is not None:
            client.close()
        if gateway is not None:
            stop(gateway)
        stop(daemon)
        for slot in (SLOT, REFERENCE_SLOT):
            with contextlib.suppress(BenchError, OSError):
                drop_slot(pg, slot)
        pg.close()


def print_report(r: Result, args) -> None:
    print()
    print(f"Private channels (issue 17): {r.sockets:,} sockets, each on its own private topic with its own claims,")
    print("authorized by RLS on realtime.messages; realtime.send → WAL → daemon (per-message RLS for every")
    print("(role, claims, topic), one call per batch) → Redis → gateway. burst = one transaction of M messages,")
    print("from its commit to the last frame; paced = pgbench at a fixed rate; latency = frame − insert time.")
    print()
    header = [["phase", "messages", "offered msgs/s", "seconds", "delivered msgs/s", "p50 ms", "p99 ms", "max ms",
               "daemon CPU s", "gateway CPU s", "client CPU s", "redis CPU s"]]
    rows = [[p.name, f"{p.messages:,}", "-" if p.offered_rate is None else f"{p.offered_rate:,.0f}",
             f"{p.seconds:.2f}", f"{p.rate:,.0f}", f"{p.p50_ms:.1f}", f"{p.p99_ms:.1f}", f"{p.max_ms:.1f}",
             f"{p.daemon_cpu:.2f}", f"{p.gateway_cpu:.2f}", f"{p.client_cpu:.2f}", f"{p.redis_cpu:.2f}"]
            for p in r.phases]
    print(table(header, rows, left=1))
    print()
    burst = r.phases[0]
    print(f"The prompt reader drained the burst's WAL ({r.reference_messages:,} changes) at "
          f"{r.reference_rate:,.0f}/s: walcast end to end = {burst.rate / r.reference_rate:.2f} × it. "
          f"Joined in {r.joined_seconds:.1f}s.")
    if not args.smoke:
        sockets, rate, paced_rate, p99 = TARGET
        paced = r.phases[1]
        print(f"Issue 17's targets, {sockets:,} sockets: ≥ {rate:,} msgs/s: {burst.rate:,.0f}/s "
              f"({'met' if burst.rate >= rate else 'NOT MET'}); p99 ≤ {p99:.0f} ms at {paced_rate:,}/s: "
              f"{paced.p99_ms:.1f} ms ({'met' if paced.p99_ms <= p99 else 'NOT MET'}).")


def as_json(r: Result | None) -> dict | None:
    return None if r is None else {**asdict(r), "reference_rate": r.reference_rate}
