"""The four consumers, each draining its own copy of a workload's slot.

- walcast: the daemon with the firehose on, timed from its start until the
  slot's `confirmed_flush_lsn` reaches the workload's end LSN (walcast
  confirms only what Redis has accepted); a Redis subscriber then proves
  every message arrived.
- pg_recvlogical: Postgres's own client, pgoutput protocol 1 to /dev/null,
  timed from its start until it exits at `--endpos`.
- postgres.js: `sql.subscribe('*', ...)`, decode only, timed by the script
  from just before `subscribe` until its callback has seen every change.
- prompt reader: `bench/prompt_reader.py`, a replication client that reads
  as soon as data arrives and only counts changes; timed by the script from
  before it connects until it has counted every change: an eager reference
  that does no work per change, as walcast's drain would be if its own work
  cost nothing.

None of them may stop short: each is checked against the workload's change
count or end LSN, and a shortfall stops the bench with a message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .pg import Client, Cluster, format_lsn, parse_lsn
from .procs import BenchError, cpu_seconds, free_port, peak_rss_bytes, spawn, stop, tail, wait_with_rusage
from .redis import RedisServer, Subscriber, publish_calls

PUBLICATION = "supabase_realtime"
CHANNEL = "walcast:default:firehose"
POLL_SECONDS = 0.005
HERE = Path(__file__).resolve().parent.parent


@dataclass
class Drain:
    """One consumer's run over one workload."""

    consumer: str
    seconds: float
    cpu_seconds: float
    peak_rss: int
    extra: dict = field(default_factory=dict)


def slot_position(client: Client, slot: str) -> tuple[int, int | None]:
    """(confirmed_flush_lsn, active_pid) of `slot`."""
    rows = client.query(
        "SELECT confirmed_flush_lsn, active_pid FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}'"
    )
    if not rows:
        raise BenchError(f"replication slot {slot} is gone")
    lsn, pid = rows[0]
    return parse_lsn(lsn or "0/0"), int(pid) if pid else None


def drop_slot(client: Client, slot: str) -> None:
    """Drops `slot` once its consumer's walsender has noticed it is gone."""
    deadline = time.monotonic() + 30
    while slot_position(client, slot)[1] is not None:
        if time.monotonic() > deadline:
            client.query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                f"WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
            )
            deadline += 30
        time.sleep(0.01)
    client.query(f"SELECT pg_drop_replication_slot('{slot}')")


def deadline_for(changes: int) -> float:
    """Generous: no consumer here is slower than 1,000 changes/s."""
    return 120 + changes / 1000


def pg_recvlogical(cluster: Cluster, slot: str, end_lsn: int, changes: int, logs: Path) -> Drain:
    log = logs / f"pg_recvlogical-{slot}.log"
    cmd = [
        cluster.tool("pg_recvlogical"), "-h", "127.0.0.1", "-p", str(cluster.port),
        "-U", "postgres", "-d", "bench", "-S", slot, "--start", "--no-loop",
        "-E", format_lsn(end_lsn), "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
        "-f", "/dev/null", "-F", "0",
    ]
    started = time.perf_counter()
    proc = spawn(cmd, log=log)
    # Sampled while it runs: its rusage would report the bench's own RSS
    # from before exec (see procs.wait_with_rusage).
    rss = 0
    try:
        deadline = started + deadline_for(changes)
        while True:
            try:
                rss = max(rss, peak_rss_bytes(proc.pid))
            except (OSError, BenchError):
                pass  # exiting: the last reading stands
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"pg_recvlogical did not reach {format_lsn(end_lsn)} in time:\n{tail(log)}")
            time.sleep(POLL_SECONDS / 5)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            stop(proc, signal.SIGKILL)
    if proc.returncode != 0:
        raise BenchError(f"pg_recvlogical exited with {proc.returncode}:\n{tail(log)}")
    with cluster.client() as client:
        confirmed, _ = slot_position(client, slot)
    if confirmed < end_lsn:
        raise BenchError(
            f"pg_recvlogical stopped at {format_lsn(confirmed)}, before the end {format_lsn(end_lsn)}"
        )
    return Drain("pg_recvlogical", seconds, usage.ru_utime + usage.ru_stime, rss)


def postgres_js(cluster: Cluster, slot: str, changes: int, logs: Path) -> Drain:
    return _scripted("postgres.js", ["node", str(HERE / "postgres_js_drain.mjs")], cluster, slot, changes, logs)


def prompt_reader(cluster: Cluster, slot: str, changes: int, logs: Path) -> Drain:
    return _scripted("prompt reader", [sys.executable, str(HERE / "prompt_reader.py")], cluster, slot,
                     changes, logs)


def _scripted(name: str, cmd: list[str], cluster: Cluster, slot: str, changes: int, logs: Path,
              publication: str = PUBLICATION) -> Drain:
    """A reference that times itself and prints one JSON line: changes,
    seconds, cpu_seconds, peak_rss (its own VmHWM, read as it finishes), or
    error."""
    log = logs / f"{name.replace(' ', '_').replace('.', '_')}-{slot}.log"
    env = dict(
        os.environ,
        BENCH_PG_PORT=str(cluster.port),
        BENCH_PG_DATABASE="bench",
        BENCH_SLOT=slot,
        BENCH_PUBLICATION=publication,
        BENCH_EXPECTED=str(changes),
        BENCH_STALL_SECONDS="60",
    )
    proc = spawn(cmd, env=env, log=log, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    # The scripts give up on their own when changes stop coming; this is the
    # backstop if one hangs anyway (its output then ends and the count is short).
    watchdog = threading.Timer(deadline_for(changes), proc.kill)
    watchdog.start()
    try:
        out = proc.stdout.read().decode()
        code, cpu = wait_with_rusage(proc)
    finally:
        watchdog.cancel()
        if proc.returncode is None:
            stop(proc, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if code != 0 or result.get("changes") != changes:
        raise BenchError(
            f"{name} drained {result.get('changes', '?')} of {changes} changes "
            f"(exit {code}): {result.get('error', '')}\n{tail(log)}"
        )
    return Drain(name, result["seconds"], cpu, result.get("peak_rss", 0),
                 {"cpu_in_script": result.get("cpu_seconds")})


def walcast(
    binary: Path,
    cluster: Cluster,
    redis: RedisServer,
    slot: str,
    end_lsn: int,
    changes: int,
    logs: Path,
    status_interval: str = "10ms",
    redis_subscriber: bool = False,
) -> Drain:
    """walcast with the firehose on, timed until the slot confirmed the end.

    Nothing subscribes by default (the issue's "no subscribers"): that
    Redis acknowledged exactly one PUBLISH per change is checked with
    Redis's own count. With `redis_subscriber`, a subscriber process also
    receives and counts every message, and takes its share of the cores."""
    log = logs / f"walcast-{slot}.log"
    subscriber = (
        Subscriber(redis.port, CHANNEL, logs / f"subscriber-{slot}.log") if redis_subscriber else None
    )
    publishes_before = publish_calls(redis.port)
    admin_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env.update(
        WALCAST_DATABASE_URL=f"postgres://postgres@127.0.0.1:{cluster.port}/bench?sslmode=disable",
        WALCAST_REDIS_URL=redis.url,
        WALCAST_SLOT=slot,
        WALCAST_FIREHOSE="true",
        # Confirmations every 10 ms, so the end of the run is seen within
        # 10 ms (the default 1s would add up to a second to every figure).
        WALCAST_STATUS_INTERVAL=status_interval,
        WALCAST_LOG="warn",
        WALCAST_ADMIN_ADDR=f"127.0.0.1:{admin_port}",
    )
    assert redis.proc is not None
    redis_cpu = cpu_seconds(redis.proc.pid)
    client = cluster.client()
    proc = None
    try:
        started = time.perf_counter()
        proc = spawn([str(binary), "run"], env=env, log=log)
        deadline = started + deadline_for(changes)
        walsender = None
        while True:
            confirmed, active = slot_position(client, slot)
            walsender = active or walsender
            if confirmed >= end_lsn:
                seconds = time.perf_counter() - started
                break
            if proc.poll() is not None:
                raise BenchError(f"walcast exited with {proc.returncode}:\n{tail(log)}")
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"walcast confirmed only {format_lsn(confirmed)} of {format_lsn(end_lsn)} in time:\n{tail(log)}"
                )
            time.sleep(POLL_SECONDS)
        cpu = cpu_seconds(proc.pid)
        rss = peak_rss_bytes(proc.pid)
        extra = {"redis_cpu": cpu_seconds(redis.proc.pid) - redis_cpu}
        if walsender:
            try:
                extra["walsender_cpu"] = cpu_seconds(walsender)
            except OSError:
                pass
        published = publish_calls(redis.port) - publishes_before
        if published != changes:
            raise BenchError(f"redis executed {published} PUBLISH commands, expected {changes}")
        extra["published_bytes"] = walcast_metrics(admin_port, ("walcast_published_bytes_total",)).get(
            "walcast_published_bytes_total")
        if subscriber is not None:
            report = subscriber.expect(changes, timeout=60)
            extra.update(published_bytes=report["bytes"], subscriber_cpu=report["cpu_seconds"])
            if report["count"] != changes:
                raise BenchError(f"the Redis subscriber received {report['count']} messages, expected {changes}")
        stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"walcast exited with {proc.returncode} on SIGTERM:\n{tail(log)}")
        return Drain("walcast", seconds, cpu, rss, extra)
    finally:
        client.close()
        if proc is not None:
            stop(proc)
        if subscriber is not None:
            subscriber.close()


def walcast_metrics(admin_port: int, names: tuple[str, ...]) -> dict[str, float]:
    """These counters from walcast's /metrics (summed over no labels: the
    first sample of each); absent ones, or all if it cannot be read, are
    left out."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for name in names:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
        if m:
            out[name] = float(m.group(1))
    return out
