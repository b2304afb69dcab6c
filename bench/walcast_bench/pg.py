"""A throw-away Postgres cluster, and a minimal client for it.

The cluster is `initdb` into a temp dir, `wal_level=logical`, a free port on
127.0.0.1, trust authentication, run as the `postgres` user when we are
root — the same recipe as `tests/support/postgres.rs`. The client speaks
just enough of the wire protocol (startup with trust auth, simple query) to
run setup SQL and to poll a slot's `confirmed_flush_lsn` every few
milliseconds without starting a `psql` each time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from .procs import BenchError, as_postgres_user, free_port, spawn, stop, tail

PROTOCOL_3_0 = 196608
PORT_ATTEMPTS = 8


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin, or $WALCAST_PG_BINDIR."""
    if env := os.environ.get("WALCAST_PG_BINDIR"):
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.parent.name.split(".")],
    )
    if not candidates:
        raise BenchError(
            "no Postgres found under /usr/lib/postgresql/*/bin; "
            "install it (apt-get install postgresql postgresql-client) or set WALCAST_PG_BINDIR"
        )
    return candidates[-1]


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class PgError(BenchError):
    """An ErrorResponse from the server."""


class Client:
    """One connection; `query` runs a simple query and returns text rows."""

    def __init__(self, port: int, database: str, user: str = "postgres") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", database), ("application_name", "bench"))
        )
        body = struct.pack("!i", PROTOCOL_3_0) + params + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            tag, payload = self._read()
            if tag == b"R":
                (code,) = struct.unpack("!i", payload[:4])
                if code != 0:
                    raise BenchError(f"server asked for authentication method {code}; the bench cluster uses trust")
            elif tag == b"E":
                raise PgError(_error_text(payload))
            elif tag == b"Z":
                return

    def _read(self) -> tuple[bytes, bytes]:
        header = self.reader.read(5)
        if len(header) < 5:
            raise BenchError("postgres closed the connection")
        (length,) = struct.unpack("!i", header[1:])
        return header[:1], self.reader.read(length - 4)

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Runs `sql` (one or more statements) and returns the last result's rows."""
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)
        rows: list[tuple[str | None, ...]] = []
        error = None
        while True:
            tag, payload = self._read()
            if tag == b"T":
                rows = []
            elif tag == b"D":
                rows.append(_data_row(payload))
            elif tag == b"E":
                error = _error_text(payload)
            elif tag == b"Z":
                break
        if error:
            raise PgError(f"{error}\n  in: {sql.strip()[:300]}")
        return rows

    def value(self, sql: str) -> str | None:
        """The first column of the first row."""
        rows = self.query(sql)
        return rows[0][0] if rows else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        self.sock.close()


def _data_row(payload: bytes) -> tuple[str | None, ...]:
    (count,) = struct.unpack("!h", payload[:2])
    pos, out = 2, []
    for _ in range(count):
        (n,) = struct.unpack("!i", payload[pos : pos + 4])
        pos += 4
        if n < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + n].decode())
            pos += n
    return tuple(out)


def _error_text(payload: bytes) -> str:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')}"


class Cluster:
    """initdb + postgres as a child process in `root` (removed by the caller)."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.root = root
        self.bindir = bindir
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        initdb = as_postgres_user(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"]
        )
        done = subprocess.run(initdb, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise BenchError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        base = (self.data / "postgresql.conf").read_text()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = free_port()
            (self.data / "postgresql.conf").write_text(base + self._conf())
            if self._try_start():
                return
            if "could not bind" not in tail(self.log, 50) or attempt == PORT_ATTEMPTS:
                raise BenchError(f"postgres did not start:\n{tail(self.log)}")

    def _conf(self) -> str:
        # fsync off: loading is not what is measured, and no disk is that fast
        # anyway. Checkpoints and autovacuum are kept out of the measured runs.
        return f"""
# --- walcast bench ---
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.root}'
wal_level = logical
max_wal_senders = 30
max_replication_slots = 100
max_connections = 50
shared_buffers = 512MB
fsync = off
max_wal_size = 16GB
checkpoint_timeout = 1h
autovacuum = off
log_min_messages = warning
"""

    def _try_start(self) -> bool:
        self.proc = spawn(
            as_postgres_user([str(self.bindir / "postgres"), "-D", str(self.data)]),
            log=self.log,
            cwd=self.root,
            death_signal=signal.SIGQUIT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                Client(self.port, "postgres").close()
                return True
            except (OSError, BenchError):
                time.sleep(0.1)
        raise BenchError(f"postgres did not accept connections within 60s:\n{tail(self.log)}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then immediate, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            stop(self.proc, signal.SIGQUIT, timeout=10)

    def client(self, database: str = "bench") -> Client:
        return Client(self.port, database)

    def tool(self, name: str) -> str:
        return str(self.bindir / name)
