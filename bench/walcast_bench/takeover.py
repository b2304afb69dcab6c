"""The hot standby (issue 18): how long a takeover takes.

`bench/run --only takeover`. Two `walcast run` daemons with the same
settings on one slot, firehose on; pgbench commits one-row inserts at a
fixed rate (1,000/s by default) while the streaming daemon is SIGKILLed K
times (10 by default), one every S seconds (3), a new standby started
after each. A takeover is timed two ways:

- **slot**: from the kill until `pg_replication_slots` shows the slot
  streamed by another walsender (polled every 5 ms);
- **firehose**: from the kill until the first firehose message of a row
  committed after the kill.

Checked: every committed row is on the firehose (a row missing stops the
run). Repeats (what a daemon that took over publishes again after the
last confirmed position) are counted; gateways drop them (tests/failover.rs).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .pg import Cluster
from .procs import BenchError, free_port, spawn, stop, tail
from .redis import RedisServer
from .report import table

SLOT = "walcast_takeover"
TENANT = "takeover"
TABLE = "takeover_rows"
ID = re.compile(rb'"record":\{"id":(\d+)')
TARGET = (2.0, 5.0)  # issue 18: takeover p50 ≤ 2 s, max ≤ 5 s

#           kills  seconds between  commits/s
PRESETS = {
    "default": (10, 3.0, 1_000),
    "quick": (5, 2.0, 1_000),
    "smoke": (2, 1.0, 200),
}


@dataclass
class Result:
    kills: int
    rate: int
    rows: int
    slot_seconds: list[float]
    firehose_seconds: list[float]
    messages: int

    @property
    def repeats(self) -> int:
        return self.messages - self.rows


def configure(args, preset: str) -> None:
    args.takeover_kills, args.takeover_every, args.takeover_rate = PRESETS[preset]


class _Firehose:
    """Subscribes to the tenant's firehose over raw RESP and keeps, for each
    row id, when it first arrived (monotonic seconds)."""

    def __init__(self, port: int) -> None:
        self.first: dict[int, float] = {}
        self.messages = 0
        self._sock = socket.create_connection(("127.0.0.1", port))
        channel = f"walcast:{TENANT}:firehose".encode()
        self._sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            buffer += data
            # Each row's payload names it once; a partial one waits for more.
            cut = buffer.rfind(b"\r\n")
            if cut < 0:
                continue
            complete, buffer = buffer[:cut], buffer[cut:]
            with self._lock:
                for match in ID.finditer(complete):
                    self.messages += 1
                    self.first.setdefault(int(match.group(1)), now)

    def first_after(self, ids: range, since: float) -> float | None:
        """When the first of `ids` arrived at `since` or later, if one did."""
        with self._lock:
            times = [self.first[i] for i in ids if i in self.first and self.first[i] >= since]
        return min(times) if times else None

    def missing(self, rows: int) -> list[int]:
        with self._lock:
            return [i for i in range(1, rows + 1) if i not in self.first]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _daemon(binary: Path, env: dict[str, str], logs: Path, n: int) -> subprocess.Popen:
    env = dict(env, WALCAST_ADMIN_ADDR=f"127.0.0.1:{free_port()}")
    return spawn([str(binary), "run"], env=env, log=logs / f"daemon-takeover-{n}.log")


def _streaming_pid(pg) -> int | None:
    row = pg.value(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND active")
    return int(row) if row else None


def _rows(pg) -> int:
    return int(pg.value(f"SELECT count(*) FROM {TABLE}") or 0)


def run(binary: Path, cluster: Cluster, redis: RedisServer, logs: Path, args, log) -> Result:
    kills, every, rate = args.takeover_kills, args.takeover_every, args.takeover_rate
    pg = cluster.client()
    pg.query(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
    pg.query(f"CREATE PUBLICATION walcast_takeover FOR TABLE {TABLE}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env.update(
        WALCAST_DATABASE_URL=f"postgres://postgres@127.0.0.1:{cluster.port}/bench?sslmode=disable",
        WALCAST_REDIS_URL=redis.url, WALCAST_SLOT=SLOT, WALCAST_TENANT=TENANT, WALCAST_FIREHOSE="true",
        WALCAST_PUBLICATION="walcast_takeover", WALCAST_LOG="info",
    )
    env.update(getattr(args, "daemon_settings", {}))
    firehose = _Firehose(redis.port)
    daemons: list[subprocess.Popen] = []
    writer = None
    try:
        spawned = 0
        active = _daemon(binary, env, logs, spawned)
        daemons.append(active)
        deadline = time.monotonic() + 60
        while _streaming_pid(pg) is None:
            if active.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"walcast did not start streaming:\n{tail(logs / 'daemon-takeover-0.log')}")
            time.sleep(0.05)
        spawned += 1
        standby = _daemon(binary, env, logs, spawned)
        daemons.append(standby)
        seconds = int(kills * every + every + 2)
        log(f"takeover: pgbench at {rate:,}/s for {seconds}s, the streaming daemon SIGKILLed {kills} times")
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(f"INSERT INTO {TABLE} DEFAULT VALUES;\n")
            script = f.name
        writer = subprocess.Popen(
            [cluster.tool("pgbench"), "-n", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
             "-c", "1", "-j", "1", "-R", str(rate), "-T", str(seconds), "-f", script, "bench"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(every)
        slot_times, firehose_times = [], []
        for k in range(kills):
            before = _streaming_pid(pg)
            active.kill()
            killed = time.monotonic()
            # Rows past this count were committed after the kill: only the
            # daemon that takes over can publish them.
            committed = _rows(pg)
            while True:
                pid = _streaming_pid(pg)
                if pid is not None and pid != before:
                    break
                if time.monotonic() - killed > 60:
                    raise BenchError(f"no takeover within 60 s after kill {k + 1}")
                time.sleep(0.005)
            slot_times.append(time.monotonic() - killed)
            # The first row committed after the kill on the firehose.
            deadline = time.monotonic() + 60
            after = None
            while after is None and time.monotonic() < deadline:
                after = firehose.first_after(range(committed + 1, committed + rate * 5), killed)
                time.sleep(0.005)
            if after is None:
                raise BenchError(f"nothing committed after kill {k + 1} reached the firehose within 60 s")
            firehose_times.append(after - killed)
            log(f"takeover {k + 1}: slot streamed again after {slot_times[-1] * 1000:.0f} ms, "
                f"the firehose after {firehose_times[-1] * 1000:.0f} ms")
            active = standby
            spawned += 1
            standby = _daemon(binary, env, logs, spawned)
            daemons.append(standby)
            time.sleep(every)
        out, _ = writer.communicate(timeout=seconds + 60)
        if writer.returncode != 0:
            raise BenchError(f"pgbench failed:\n{out}")
        rows = _rows(pg)
        deadline = time.monotonic() + 60
        while firehose.missing(rows) and time.monotonic() < deadline:
            time.sleep(0.1)
        missing = firehose.missing(rows)
        if missing:
            raise BenchError(f"{len(missing):,} of {rows:,} rows never reached the firehose, e.g. {missing[:5]}")
        return Result(kills, rate, rows, slot_times, firehose_times, firehose.messages)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        for daemon in daemons:
            stop(daemon)
        firehose.close()
        with contextlib.suppress(BenchError, OSError):
            pg.query(f"SELECT pg_drop_replication_slot('{SLOT}')")
        pg.close()


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def print_report(r: Result, args) -> None:
    print()
    print(f"Hot standby (issue 18): two daemons on one slot, firehose on, pgbench at {r.rate:,} commits/s;")
    print(f"the streaming daemon SIGKILLed {r.kills} times. slot = kill → another walsender streams the slot;")
    print("firehose = kill → the first row committed after the kill is on the firehose.")
    print()
    header = [["takeover", "p50 ms", "max ms", "each, ms"]]
    rows = [[name, f"{_ms(v, 0.5):.0f}", f"{max(v) * 1000:.0f}", ", ".join(f"{x * 1000:.0f}" for x in v)]
            for name, v in (("slot", r.slot_seconds), ("firehose", r.firehose_seconds))]
    print(table(header, rows, left=1))
    print()
    print(f"{r.rows:,} rows committed, all on the firehose; {r.messages:,} firehose messages "
          f"({r.repeats:,} published again by a daemon that took over).")
    if not args.smoke:
        p50, worst = TARGET
        fire = r.firehose_seconds
        met = _ms(fire, 0.5) <= p50 * 1000 and max(fire) <= worst
        print(f"Issue 18's target (firehose): p50 ≤ {p50:.0f} s, max ≤ {worst:.0f} s: p50 {_ms(fire, 0.5):.0f} ms, "
              f"max {max(fire) * 1000:.0f} ms ({'met' if met else 'NOT MET'}).")


def as_json(r: Result | None) -> dict | None:
    return None if r is None else {**asdict(r), "repeats": r.repeats}
