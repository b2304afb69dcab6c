"""A throw-away redis-server, and the subscriber process that counts what
walcast published."""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .procs import BenchError, cpu_seconds, free_port, spawn, stop, tail

PORT_ATTEMPTS = 8
HERE = Path(__file__).resolve().parent


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def publish_calls(port: int) -> int:
    """How many PUBLISH commands this redis-server has executed (INFO
    commandstats): Redis's own count of what it acknowledged."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        while not data.startswith(b"$") or b"\r\n" not in data or len(data) < _bulk_end(data):
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("redis closed the connection during INFO")
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_publish:"):
            fields = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].split(","))
            return int(fields["calls"])
    return 0


def _bulk_end(data: bytes) -> int:
    """Where a RESP bulk string (`$len\r\n...\r\n`) in `data` ends."""
    header, _, _ = data.partition(b"\r\n")
    return len(header) + 2 + int(header[1:]) + 2


class RedisServer:
    """redis-server on a free port, nothing on disk, and no output-buffer
    limit for subscribers (a slow subscriber must not be disconnected
    mid-run: it is there to count, not to be benchmarked)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "redis.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise BenchError("redis-server not found; install it (apt-get install redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.proc = spawn(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.root), "--protected-mode", "no",
                 "--client-output-buffer-limit", "pubsub 0 0 0", "--loglevel", "warning"],
                log=self.log,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                if ping(self.port):
                    return
                time.sleep(0.05)
            stop(self.proc)
        raise BenchError(f"redis-server did not start:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    cluster = False

    def cpu(self) -> float:
        """CPU seconds the server used so far."""
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def exists(self, key: str) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"*2\r\n$6\r\nEXISTS\r\n$%d\r\n%s\r\n" % (len(key), key.encode()))
            return s.recv(16).startswith(b":1")


class RedisCluster:
    """Six redis-server processes formed into a Redis Cluster (three
    masters, a replica each) with `redis-cli --cluster create`; nothing
    on disk, no output-buffer limit for subscribers (as RedisServer)."""

    cluster = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if not binary or not shutil.which("redis-cli"):
            raise BenchError("redis-server and redis-cli are needed (apt-get install redis-server)")
        for i in range(6):
            node = self.root / f"node-{i}"
            node.mkdir(parents=True, exist_ok=True)
            port, bus = free_port(), free_port()
            proc = spawn(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(node), "--protected-mode", "no", "--client-output-buffer-limit", "pubsub 0 0 0",
                 "--loglevel", "warning", "--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "2000",
                 "--repl-diskless-sync-delay", "0"],
                log=node / "redis.log",
            )
            self.procs.append(proc)
            self.ports.append(port)
            deadline = time.monotonic() + 20
            while not ping(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"a cluster node did not start:\n{tail(node / 'redis.log')}")
                time.sleep(0.05)
        done = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + 30
        while not all(self._whole(p) for p in self.ports):
            if time.monotonic() > deadline:
                raise BenchError("the Redis Cluster did not come up within 30 s")
            time.sleep(0.1)

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout

    def _whole(self, port: int) -> bool:
        replication = self._cli(port, "INFO", "replication")
        replicas = sum(1 for line in self._cli(port, "CLUSTER", "NODES").splitlines()
                       if "slave" in line.split()[2].split(","))
        return ("cluster_state:ok" in self._cli(port, "CLUSTER", "INFO") and replicas == 3
                and ("role:master" in replication or "master_link_status:up" in replication))

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc, timeout=10)

    @property
    def url(self) -> str:
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    @property
    def port(self) -> int:
        return self.ports[0]

    def cpu(self) -> float:
        """CPU seconds all nodes used so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs if p.poll() is None)

    def exists(self, key: str) -> bool:
        return self._cli(self.ports[0], "-c", "EXISTS", key).strip() == "1"


class Subscriber:
    """`subscriber.py` in its own process (so that counting does not share
    a core's GIL with the poller that times walcast).

    `expect(n)` blocks until it has counted `n` messages since the last
    `expect` and returns its report: count, payload bytes, and — for
    latency runs — commit→receive percentiles.
    """

    def __init__(self, port: int, channel: str, log: Path, latency: bool = False,
                 samples: Path | None = None) -> None:
        cmd = [sys.executable, "-B", str(HERE / "subscriber.py"), str(port), channel]
        if latency:
            cmd.append("--latency")
        if samples:
            cmd += ["--samples", str(samples)]
        self.proc = spawn(cmd, log=log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.log = log
        line = self._line(timeout=20)
        if line.get("ready") is not True:
            raise BenchError(f"subscriber did not start: {line}")

    def _line(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {}
        text = self.proc.stdout.readline()
        if not text:
            raise BenchError(f"the Redis subscriber exited:\n{tail(self.log)}")
        return json.loads(text)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, count: int, timeout: float) -> dict:
        """The report once `count` messages arrived; raises with the partial
        count if no new message arrives for `timeout` seconds."""
        self._send(f"target {count}")
        last, last_change = -1, time.monotonic()
        while True:
            line = self._line(2.0)
            if line.get("done"):
                return line
            progress = line.get("progress", last)
            if progress > last:
                last, last_change = progress, time.monotonic()
            elif time.monotonic() - last_change > timeout:
                self._send("report")
                partial: dict = {}
                for _ in range(5):
                    partial = self._line(10)
                    if "count" in partial:
                        break
                raise BenchError(
                    f"the Redis subscriber received {partial.get('count', '?')} of {count} "
                    f"messages (nothing more for {timeout:.0f}s)"
                )

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        stop(self.proc, timeout=5)
