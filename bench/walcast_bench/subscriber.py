"""Counts the messages walcast publishes on a Redis channel (its own process).

Usage: subscriber.py PORT CHANNEL [--latency [--samples CSV]]

Talks RESP over a raw socket (no client library) and parses just the push
frames of one channel: `*3 $7 message $N channel $M payload`, skipping each
payload by its length. With --latency it also reads the `"t_us":<µs>` that
the latency writer stores in each row and records receive time minus that;
--samples writes each (receive µs, latency µs) to a CSV when it reports.

Counting is not what is timed (walcast is timed by its slot's confirmed
position), so without --latency the subscriber reads lazily: after a short
read it sleeps a few milliseconds, letting Redis gather more per read. That
keeps its CPU, which shares the machine's two cores with walcast, the
walsender and Redis, to a fraction of what one read per message costs.

Protocol with bench/run, one JSON object per line:
  out  {"ready": true}                       subscribed
  in   target N                              report when N messages arrived
  out  {"progress": n}                       every second until then
  out  {"done": true, "count": ..., ...}     N (or more) messages arrived
  in   report                                report now, whatever the count
  EOF on stdin                               exit
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import selectors
import socket
import sys
import time

T_US = re.compile(rb'"t_us":(\d+)')
LAZY_BELOW = 256 << 10  # bytes: a read shorter than this means Redis had little queued
LAZY_SLEEP = 0.005  # seconds


def emit(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    index = math.ceil(q * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, index))]


def main() -> int:
    port, channel = int(sys.argv[1]), sys.argv[2].encode()
    latency = "--latency" in sys.argv[3:]
    samples_csv = sys.argv[sys.argv.index("--samples") + 1] if "--samples" in sys.argv else None
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel))
    ack = b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)
    buf = bytearray()
    while len(buf) < len(ack):
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("redis closed the connection while subscribing")
        buf += chunk
    if not buf.startswith(ack):
        raise SystemExit(f"unexpected reply to SUBSCRIBE: {bytes(buf[:200])!r}")
    del buf[: len(ack)]
    emit({"ready": True})

    prefix = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$" % (len(channel), channel)
    plen = len(prefix)
    count = 0
    nbytes = 0
    first = last = 0.0
    samples: list[int] = []
    received: list[int] = []
    target: int | None = None
    reported = False
    next_progress = 0.0

    def report(done: bool) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {
            "done": done,
            "count": count,
            "bytes": nbytes,
            "first": first,
            "last": last,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }
        if samples_csv:
            with open(samples_csv, "w") as f:
                f.write("received_us,latency_us\n")
                f.writelines(f"{r},{v}\n" for r, v in zip(received, samples, strict=True))
        if latency:
            values = sorted(samples)
            out["latency_us"] = (
                {
                    "n": len(values),
                    "p50": percentile(values, 0.50),
                    "p99": percentile(values, 0.99),
                    "max": values[-1],
                    "mean": sum(values) / len(values),
                }
                if values
                else {"n": 0}
            )
        emit(out)

    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "redis")
    selector.register(0, selectors.EVENT_READ, "stdin")
    pending = b""
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "redis":
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise SystemExit("redis closed the connection")
                now = time.time()
                now_us = time.time_ns() // 1000
                buf += chunk
                pos = 0
                end = len(buf)
                while True:
                    if end - pos < plen:
                        if prefix.startswith(bytes(buf[pos:end])):
                            break
                        raise SystemExit(f"unexpected frame: {bytes(buf[pos : pos + 200])!r}")
                    if not buf.startswith(prefix, pos):
                        raise SystemExit(f"unexpected frame: {bytes(buf[pos : pos + 200])!r}")
                    crlf = buf.find(b"\r\n", pos + plen)
                    if crlf < 0:
                        break
                    size = int(buf[pos + plen : crlf])
                    stop = crlf + 2 + size + 2
                    if stop > end:
                        break
                    if latency:
                        match = T_US.search(buf, crlf + 2, crlf + 2 + size)
                        if match:
                            samples.append(now_us - int(match.group(1)))
                            received.append(now_us)
                    if count == 0:
                        first = now
                    count += 1
                    nbytes += size
                    pos = stop
                last = now if pos else last
                del buf[:pos]
                if not latency and len(chunk) < LAZY_BELOW:
                    time.sleep(LAZY_SLEEP)
            else:
                data = os.read(0, 4096)
                if not data:
                    return 0
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["target"]:
                        target, reported = int(words[1]), False
                    elif words[:1] == ["report"]:
                        report(done=False)
        if target is not None and not reported:
            if count >= target:
                report(done=True)
                reported = True
            elif time.monotonic() >= next_progress:
                emit({"progress": count})
                next_progress = time.monotonic() + 1.0


if __name__ == "__main__":
    sys.exit(main())
