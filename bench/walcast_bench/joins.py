"""Gateway memory under hostile joins (issue 15): what the largest joins
the limits allow cost the gateway and Redis, and whether the gateway gives
the memory back when their socket closes.

`bench/run --only joins`. A `walcast gateway` (no daemon: nothing confirms
the subscriptions, which stay registered as they are while pending) and
one socket with a token of `max_jwt_bytes` (16,384), whose claims every
subscription carries. Then:

- **refused**: the issue's probe, three joins of a 1 MB topic with 100
  bindings each; all refused (`TopicNameTooLong`).
- **maximal**: `max_channels_per_client` (100) joins, each with a topic of
  `max_topic_bytes` (1,024) and `max_bindings_per_channel` (100) bindings
  of `max_binding_bytes` (4,096): 10,000 subscriptions, every byte the
  limits allow.
- **closed**: the socket closes; the gateway unregisters everything;
  measured 20 s later, once RSS has held still for 3 s (jemalloc returns
  freed pages over its 10 s + 10 s decay; at most 40 s).

After each, read from /proc and Redis: the gateway's VmRSS, Redis's
`used_memory`, and the bytes the gateway's log grew by (`WALCAST_LOG=info`,
as deployed). Checked: every refused join is refused with the expected
reason, every maximal join is accepted, the registry hash holds one
entry per join (100, each with its 100 subscriptions and the claims once)
after them and none after the close.

A minimal WebSocket client (RFC 6455 text frames, masked) is written here
so the bench needs no client library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .procs import BenchError, free_port, spawn, stop, tail

SECRET = "walcast-bench-joins-secret-0123456789"
TENANT = "joins"
GATEWAY_ID = "joins-bench"
MAX_JWT_BYTES = 16_384
MAX_TOPIC_BYTES = 1_024
MAX_BINDINGS = 100
MAX_BINDING_BYTES = 4_096
MAX_CHANNELS = 100


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(length: int) -> str:
    """An HS256 anon token of exactly `length` bytes (padded in a claim)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    base = {"role": "anon", "exp": int(time.time()) + 3600, "sub": "bench", "pad": ""}

    def sign(claims: dict) -> str:
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(mac)}"

    pad = 0
    while True:
        t = sign(dict(base, pad="p" * pad))
        if len(t) >= length:
            return t
        # Base64 grows by 4 bytes per 3: step close, then one by one.
        pad += max(1, (length - len(t)) * 3 // 4 - 2)


class WebSocket:
    """Just enough of a WebSocket client to send joins and read replies."""

    def __init__(self, port: int, query: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /realtime/v1/websocket?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BenchError("joins: the gateway closed the connection during the upgrade")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise BenchError(f"joins: the upgrade was refused: {status[:200]!r}")
        self.buffer = rest

    def send(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.sock.sendall(header + mask + _mask(data, mask))

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise BenchError("joins: the gateway closed the socket")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv(self) -> str:
        """The next text frame (server frames are unmasked)."""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 1:
                return payload.decode()
            if opcode == 8:
                raise BenchError(f"joins: the gateway closed the socket: {payload[:100]!r}")

    def close(self) -> None:
        mask = os.urandom(4)
        self.sock.sendall(struct.pack("!BB", 0x88, 0x80) + mask)
        self.sock.settimeout(5)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        self.sock.close()


def _mask(data: bytes, mask: bytes) -> bytes:
    # XOR with the repeated mask, as one big integer: fast for megabytes.
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


def _redis(port: int, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args))
        data = b""
        while not data.endswith(b"\r\n"):
            data += s.recv(65536)
        if data.startswith(b"$"):
            length = int(data[1:data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + length + 2:
                data += s.recv(65536)
        return data


def _used_memory(port: int) -> int:
    info = _redis(port, "INFO", "memory").decode()
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise BenchError("joins: no used_memory in INFO memory")


def _registered(port: int) -> int:
    reply = _redis(port, "HLEN", f"walcast:{TENANT}:gateway:{GATEWAY_ID}:subscriptions")
    return int(reply[1:].split(b"\r\n")[0])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Step:
    name: str
    rss: int
    redis: int
    log_bytes: int
    registered: int


def _settle(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"joins: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def run(binary: Path, redis, logs: Path, log, smoke: bool) -> list[Step]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCAST_")}
    env.update(
        WALCAST_REDIS_URL=redis.url,
        WALCAST_TENANT=TENANT,
        WALCAST_JWT_SECRET=SECRET,
        WALCAST_GATEWAY_ADDR=f"127.0.0.1:{port}",
        WALCAST_GATEWAY_ID=GATEWAY_ID,
        # 103 joins in a second from one socket: the join rate is not what
        # is measured here.
        WALCAST_MAX_JOINS_PER_SECOND="1000",
        WALCAST_LOG="info",
    )
    gateway_log = logs / "gateway-joins.log"
    gateway = spawn([str(binary), "gateway"], env=env, log=gateway_log)
    steps: list[Step] = []
    try:
        lease = f"walcast:{TENANT}:gateway:{GATEWAY_ID}:lease"
        _settle("the gateway's registration", lambda: gateway.poll() is None
                and _redis(redis.port, "EXISTS", lease).startswith(b":1"), 30)
        time.sleep(0.5)

        def step(name: str) -> Step:
            s = Step(name, _rss(gateway.pid), _used_memory(redis.port), gateway_log.stat().st_size,
                     _registered(redis.port))
            steps.append(s)
            log(f"joins, {name}: gateway RSS {s.rss / 2**20:.1f} MiB, redis used_memory {s.redis / 2**20:.1f} MiB, "
                f"log {s.log_bytes:,} bytes, {s.registered:,} joins registered")
            return s

        step("baseline")
        ws = WebSocket(port, f"apikey={token(MAX_JWT_BYTES)}&vsn=2.0.0")
        bindings = ",".join([json.dumps({"event": "*", "schema": "public", "table": "t", "filter":
                                         "id=eq." + "9" * (MAX_BINDING_BYTES - 60)})] * MAX_BINDINGS)
        big_topic = "realtime:" + "t" * 1_000_000
        for n in range(3):
            ws.send(json.dumps([str(n), str(n), big_topic, "phx_join",
                                {"config": {"postgres_changes": json.loads(f"[{bindings}]")}}]))
            reply = json.loads(ws.recv())
            if not reply[4]["response"].get("reason", "").startswith("TopicNameTooLong"):
                raise BenchError(f"joins: a 1 MB topic was not refused: {json.dumps(reply)[:300]}")
        step("3 refused 1 MB-topic joins")
        channels = 3 if smoke else MAX_CHANNELS
        binding = json.dumps({"event": "*", "schema": "public", "table": "t", "filter": "id=eq."})
        binding = binding[:-2] + "9" * (MAX_BINDING_BYTES - len(binding)) + binding[-2:]
        assert len(binding) == MAX_BINDING_BYTES, len(binding)
        payload = f'{{"config":{{"postgres_changes":[{",".join([binding] * MAX_BINDINGS)}]}}}}'
        for n in range(channels):
            topic = f"realtime:{n:04d}" + "c" * (MAX_TOPIC_BYTES - len("realtime:") - 4)
            ws.send(f'["j{n}","j{n}",{json.dumps(topic)},"phx_join",{payload}]')
            reply = json.loads(ws.recv())
            if reply[4].get("status") != "ok":
                raise BenchError(f"joins: maximal join {n} was refused: {json.dumps(reply)[:300]}")
        # One registry field per join (its claims once), 100 subscriptions in each.
        _settle(f"{channels} channel joins registered", lambda: _registered(redis.port) == channels)
        step(f"{channels} maximal joins")
        ws.close()
        _settle("the registry emptied", lambda: _registered(redis.port) == 0)
        # jemalloc's background thread gives freed pages back over its
        # decay time (10 s dirty, then 10 s muzzy), starting a few seconds
        # after the free: read after 20 s, then until RSS holds still for
        # 3 s, at most 40 s.
        started = time.monotonic()
        deadline, last, still = started + (2 if smoke else 40), _rss(gateway.pid), 0
        while time.monotonic() < deadline and (still < 3 or time.monotonic() - started < 20 and not smoke):
            time.sleep(1.0)
            rss = _rss(gateway.pid)
            still = still + 1 if rss >= last else 0
            last = rss
        step("socket closed")
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - reported with the gateway's log
        raise BenchError(f"joins: {e}\n{tail(gateway_log)}") from e
    finally:
        stop(gateway)
    return steps


def print_report(steps: list[Step]) -> None:
    print()
    print("Gateway memory under the largest joins the limits allow (issue 15):")
    print(f"{'after':<32} {'gateway RSS':>12} {'redis used':>12} {'gateway log':>12} {'joins held':>11}")
    base = steps[0]
    for s in steps:
        print(f"{s.name:<32} {s.rss / 2**20:>9.1f} MiB {s.redis / 2**20:>8.1f} MiB "
              f"{s.log_bytes - base.log_bytes:>10,} B {s.registered:>11,}")


def as_json(steps: list[Step]) -> list[dict]:
    return [asdict(s) for s in steps]
