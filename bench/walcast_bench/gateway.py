"""A stand-in gateway: registers subscriptions over the bus and counts the
`change` events walcast sends for them (its own process).

Usage: gateway.py PORT SPEC.json

SPEC: {"tenant": "...", "lease_ttl": 30,
       "subscriptions": [{"gateway": "g0", "id": "s0", "user": "user-0",
                          "subscription": {...the bus's subscription object...}}, ...]}

It does what docs/bus.md asks of a gateway, over raw RESP sockets (no
client library): SUBSCRIBE to its own channel(s) first, then the lease
(`SET …:lease 1 EX ttl`, refreshed every ttl/3 seconds), `SADD …:gateways`,
`HSET …:subscriptions id json`, and one `PUBLISH …:control` per
subscription, pipelined; then it waits for a `subscribed` reply for every
id (a `rejected` one ends it with an error).

Each `change` event lists the subscription ids that see it; the gateway
counts deliveries per id, and checks that the row's `owner` is the user
of every id the event lists (a leak shows up even when counts happen to
match). An `error` event is counted too (the bench fails on any).

Reading is lazy once registered, as in subscriber.py: counting is not
what is timed.

Protocol with bench/run, one JSON object per line:
  out  {"registered": n, "seconds": s, "lsn_min": "...", "lsn_max": "..."}
  out  {"rejected": {...}}                   and exit 1
  in   target N                              report when N deliveries arrived
  out  {"progress": n}                       every second until then
  out  {"done": true, "deliveries": ..., "per_id": {...}, ...}
  in   report                                report now, whatever the count
  EOF on stdin                               leave: PUBLISH leave, delete the keys, exit
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import sys
import time
from pathlib import Path

OWNER = re.compile(rb'"owner":"([^"]*)"')
LAZY_BELOW = 256 << 10
LAZY_SLEEP = 0.005
PIPELINE = 1000  # commands per pipelined write
HEAD = b"*3\r\n$7\r\nmessage\r\n$"  # a pushed message: *3 $7 message $n channel $m payload


def emit(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def resp(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Commands:
    """A plain request/reply connection (pipelined writes, replies read back)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("redis closed the command connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self) -> bytes:
        line = self._line()
        if line[:1] == b"-":
            raise SystemExit(f"redis error: {line.decode(errors='replace')}")
        if line[:1] == b"$":
            n = int(line[1:])
            if n >= 0:
                while len(self.buf) < n + 2:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise SystemExit("redis closed the command connection")
                    self.buf += chunk
                value, self.buf = self.buf[:n], self.buf[n + 2 :]
                return value
        return line

    def pipeline(self, commands: list[bytes]) -> None:
        for i in range(0, len(commands), PIPELINE):
            part = commands[i : i + PIPELINE]
            self.sock.sendall(b"".join(part))
            for _ in part:
                self._reply()


def main() -> int:
    port = int(sys.argv[1])
    spec = json.loads(Path(sys.argv[2]).read_text())
    tenant = spec["tenant"]
    ttl = int(spec.get("lease_ttl", 30))
    subs = spec["subscriptions"]
    user_of = {s["id"]: s["user"].encode() for s in subs}
    gateways = sorted({s["gateway"] for s in subs})
    prefix = f"walcast:{tenant}"
    channels = {f"{prefix}:gateway:{g}".encode(): g for g in gateways}

    # Subscribe first: replies published before we listen would be lost.
    sub = socket.create_connection(("127.0.0.1", port))
    sub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sub.sendall(resp("SUBSCRIBE", *channels))
    buf = bytearray()
    acks = 0
    while acks < len(channels):
        chunk = sub.recv(65536)
        if not chunk:
            raise SystemExit("redis closed the connection while subscribing")
        buf += chunk
        while True:
            m = re.match(rb"\*3\r\n\$9\r\nsubscribe\r\n\$\d+\r\n[^\r]*\r\n:\d+\r\n", bytes(buf[:512]))
            if not m:
                break
            del buf[: m.end()]
            acks += 1

    cmd = Commands(port)
    started = time.monotonic()

    def lease() -> None:
        cmd.pipeline([resp("SET", f"{prefix}:gateway:{g}:lease", "1", "EX", str(ttl)) for g in gateways])

    lease()
    next_lease = time.monotonic() + ttl / 3
    cmd.pipeline([resp("SADD", f"{prefix}:gateways", *gateways)])
    writes = []
    controls = []
    for s in subs:
        body = json.dumps(s["subscription"], separators=(",", ":"))
        writes.append(resp("HSET", f"{prefix}:gateway:{s['gateway']}:subscriptions", s["id"], body))
        controls.append(resp("PUBLISH", f"{prefix}:control",
                             f'{{"v":1,"gateway":"{s["gateway"]}","op":"subscribe","subscription":{body}}}'))
    cmd.pipeline(writes)
    cmd.pipeline(controls)

    counts: dict[str, int] = {}
    pending_ids = set(user_of)
    lsns: list[str] = []
    deliveries = 0
    messages = 0
    nbytes = 0
    errors = 0
    first_error = None
    leaks = 0
    first_leak = None
    other = 0
    target: int | None = None
    reported = False
    next_progress = 0.0
    cpu_at_registered = 0.0

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    def report(done: bool) -> None:
        emit({
            "done": done,
            "deliveries": deliveries,
            "messages": messages,
            "bytes": nbytes,
            "errors": errors,
            "first_error": first_error,
            "leaks": leaks,
            "first_leak": first_leak,
            "other": other,
            "cpu_seconds": cpu() - cpu_at_registered,
            "per_id": {k: v for k, v in counts.items() if v},
        })

    def handle(channel: bytes, payload: bytes) -> None:
        nonlocal deliveries, messages, nbytes, errors, first_error, leaks, first_leak, other, cpu_at_registered
        if payload.startswith(b'{"v":1,"type":"change","ids":['):
            messages += 1
            nbytes += len(payload)
            end = payload.index(b"]", 30)
            ids = payload[30:end].decode()[1:-1].split('","')
            owner = OWNER.search(payload, end)
            for i in ids:
                counts[i] = counts.get(i, 0) + 1
                if owner is None or user_of.get(i) != owner.group(1):
                    leaks += 1
                    if first_leak is None:
                        first_leak = f"id {i} (user {user_of.get(i)!r}) got {payload[:300]!r}"
            deliveries += len(ids)
            return
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "subscribed":
            if msg["id"] in pending_ids:
                pending_ids.discard(msg["id"])
                lsns.append(msg["lsn"])
                if not pending_ids:
                    cpu_at_registered = cpu()
                    lsn_sorted = sorted(lsns, key=lambda t: tuple(int(x, 16) for x in t.split("/")))
                    emit({"registered": len(lsns), "seconds": time.monotonic() - started,
                          "lsn_min": lsn_sorted[0], "lsn_max": lsn_sorted[-1]})
        elif kind == "rejected":
            emit({"rejected": msg})
            raise SystemExit(1)
        elif kind == "error":
            errors += len(msg.get("ids", [])) or 1
            if first_error is None:
                first_error = msg
        else:
            other += 1

    selector = selectors.DefaultSelector()
    selector.register(sub, selectors.EVENT_READ, "redis")
    selector.register(0, selectors.EVENT_READ, "stdin")
    pending = b""
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "redis":
                chunk = sub.recv(1 << 20)
                if not chunk:
                    raise SystemExit("redis closed the connection")
                buf += chunk
                pos, end = 0, len(buf)
                # *3 $7 message $n channel $m payload
                while True:
                    if end - pos < len(HEAD):
                        if HEAD.startswith(bytes(buf[pos:end])):
                            break
                        raise SystemExit(f"unexpected frame: {bytes(buf[pos : pos + 200])!r}")
                    if not buf.startswith(HEAD, pos):
                        raise SystemExit(f"unexpected frame: {bytes(buf[pos : pos + 200])!r}")
                    p = pos + len(HEAD)
                    crlf = buf.find(b"\r\n", p)
                    if crlf < 0:
                        break
                    clen = int(buf[p:crlf])
                    channel_end = crlf + 2 + clen
                    if channel_end + 3 > end:
                        break
                    channel = bytes(buf[crlf + 2 : channel_end])
                    crlf2 = buf.find(b"\r\n", channel_end + 3)
                    if crlf2 < 0:
                        break
                    size = int(buf[channel_end + 3 : crlf2])
                    stop = crlf2 + 2 + size + 2
                    if stop > end:
                        break
                    handle(channel, bytes(buf[crlf2 + 2 : crlf2 + 2 + size]))
                    pos = stop
                del buf[:pos]
                if not pending_ids and len(chunk) < LAZY_BELOW:
                    time.sleep(LAZY_SLEEP)
            else:
                data = os.read(0, 4096)
                if not data:
                    leave = [resp("PUBLISH", f"{prefix}:control", f'{{"v":1,"gateway":"{g}","op":"leave"}}')
                             for g in gateways]
                    leave += [resp("DEL", f"{prefix}:gateway:{g}:subscriptions", f"{prefix}:gateway:{g}:lease")
                              for g in gateways]
                    leave.append(resp("SREM", f"{prefix}:gateways", *gateways))
                    cmd.pipeline(leave)
                    return 0
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["target"]:
                        target, reported = int(words[1]), False
                    elif words[:1] == ["report"]:
                        report(done=False)
        now = time.monotonic()
        if now >= next_lease:
            lease()
            next_lease = now + ttl / 3
        if target is not None and not reported:
            if deliveries >= target:
                report(done=True)
                reported = True
            elif now >= next_progress:
                emit({"progress": deliveries})
                next_progress = now + 1.0


if __name__ == "__main__":
    sys.exit(main())
