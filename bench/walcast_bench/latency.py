"""Commit → Redis latency at fixed commit rates.

pgbench commits single-row transactions at a target rate (`--rate`:
Poisson arrivals at that mean rate) while the daemon streams. Each row
carries `t_us`, Postgres's `clock_timestamp()` in microseconds taken as
the INSERT runs — a few microseconds before its commit, which is finer
than the payload's millisecond `commit_timestamp`. The subscriber records
receive time minus `t_us` per message (same host, same clock).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .consumers import CHANNEL, slot_position
from .pg import Cluster, format_lsn, parse_lsn
from .procs import BenchError, cpu_seconds, spawn, stop, tail
from .redis import RedisServer, Subscriber

SLOT = "bench_latency"


@dataclass
class Latency:
    target_rate: int
    achieved_rate: float
    messages: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    daemon_cpu: float
    walsender_cpu: float | None
    redis_cpu: float


def prepare(cluster: Cluster, rates: list[int]) -> None:
    """Tables for each rate; made before any slot, so no DDL is streamed."""
    with cluster.client() as client:
        for rate in rates:
            client.query(
                f"CREATE TABLE lat_{rate} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "t_us bigint NOT NULL, note text)"
            )


def measure(
    binary: Path, cluster: Cluster, redis: RedisServer, rates: list[int], seconds: int, logs: Path,
    samples: Path | None = None,
) -> list[Latency]:
    with cluster.client() as client:
        client.query(f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env.update(
        WALCAST_DATABASE_URL=f"postgres://postgres@127.0.0.1:{cluster.port}/bench?sslmode=disable",
        WALCAST_REDIS_URL=redis.url,
        WALCAST_SLOT=SLOT,
        WALCAST_FIREHOSE="true",
        WALCAST_LOG="warn",
    )
    log = logs / "walcast-latency.log"
    daemon = spawn([str(binary), "run"], env=env, log=log)
    results = []
    try:
        with cluster.client() as client:
            deadline = time.monotonic() + 30
            while slot_position(client, SLOT)[1] is None:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"walcast did not start streaming:\n{tail(log)}")
                time.sleep(0.05)
            time.sleep(0.5)
            for rate in rates:
                csv = samples / f"latency-{rate}.csv" if samples else None
                results.append(_one_rate(cluster, client, redis, daemon, rate, seconds, logs, csv))
        return results
    finally:
        stop(daemon)


def _one_rate(cluster, client, redis, daemon, rate: int, seconds: int, logs: Path,
              samples: Path | None) -> Latency:
    subscriber = Subscriber(redis.port, CHANNEL, logs / f"subscriber-latency-{rate}.log", latency=True,
                            samples=samples)
    try:
        cpu_before = cpu_seconds(daemon.pid)
        walsender = slot_position(client, SLOT)[1]
        walsender_before = _cpu_or_none(walsender)
        redis_before = cpu_seconds(redis.proc.pid)
        clients = 2 if rate <= 2000 else 4
        script = (
            f"INSERT INTO lat_{rate} (t_us, note) "
            "VALUES ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint, 'latency probe');\n"
        )
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
            f.write(script)
            f.flush()
            done = subprocess.run(
                [cluster.tool("pgbench"), "-n", "-h", "127.0.0.1", "-p", str(cluster.port),
                 "-U", "postgres", "-c", str(clients), "-j", str(min(clients, 2)),
                 "-R", str(rate), "-T", str(seconds), "-f", f.name, "bench"],
                capture_output=True, text=True,
            )
        if done.returncode != 0:
            raise BenchError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
        tps = re.search(r"tps = ([0-9.]+)", done.stdout)
        messages = int(client.value(f"SELECT count(*) FROM lat_{rate}") or 0)
        end = parse_lsn(client.value("SELECT pg_current_wal_lsn()") or "0/0")
        deadline = time.monotonic() + 60
        while slot_position(client, SLOT)[0] < end:
            if daemon.poll() is not None:
                raise BenchError(f"walcast exited with {daemon.returncode}")
            if time.monotonic() > deadline:
                raise BenchError(f"walcast did not confirm {format_lsn(end)} within 60s")
            time.sleep(0.01)
        report = subscriber.expect(messages, timeout=60)
        if report["count"] != messages:
            raise BenchError(f"latency: received {report['count']} messages, expected {messages}")
        stats = report["latency_us"]
        if stats.get("n") != messages:
            raise BenchError(f"latency: {stats.get('n')} of {messages} messages carried t_us")
        return Latency(
            target_rate=rate,
            achieved_rate=float(tps.group(1)) if tps else messages / seconds,
            messages=messages,
            p50_ms=stats["p50"] / 1000,
            p99_ms=stats["p99"] / 1000,
            max_ms=stats["max"] / 1000,
            mean_ms=stats["mean"] / 1000,
            daemon_cpu=cpu_seconds(daemon.pid) - cpu_before,
            walsender_cpu=_delta(_cpu_or_none(walsender), walsender_before),
            redis_cpu=cpu_seconds(redis.proc.pid) - redis_before,
        )
    finally:
        subscriber.close()


def _cpu_or_none(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before
