#!/usr/bin/env python3
"""The prompt-reader reference for bench/run: a replication client that
does nothing with what it reads.

It streams pgoutput from a slot over its own protocol code, reads as soon
as anything arrives (as walcast and pg_recvlogical do), splits the stream
into messages to count the changes, and does nothing else: no decoding, no
output, no status updates except when the walsender asks for one. So
walcast ÷ prompt reader says whether walcast's own work slows its drain.
It is a reference, not a strict floor (the walsender's cost moves with a
reader's timing, and walcast has drained faster in some runs), and on
loopback TCP the walsender works harder for a prompt reader than for a
slow one: see "What the walsender's cost depends on" in
docs/benchmarks.md.

Environment: BENCH_PG_PORT, BENCH_PG_DATABASE, BENCH_SLOT,
BENCH_PUBLICATION, BENCH_EXPECTED (changes to wait for),
BENCH_STALL_SECONDS (give up when nothing arrives for that long).
Prints one JSON line: {"changes", "seconds", "cpu_seconds", "peak_rss"
(VmHWM, bytes)}; exits 1 on a stall or an error, with the reason in
"error".
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import time

PROTOCOL_3 = 196608
CHANGE_TAGS = frozenset(b"IUD")
# CopyData payload: 'w', wal_start, wal_end, send_time, then the message.
XLOG_HEADER = 1 + 8 * 3


class Failed(Exception):
    pass


def message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def error_text(body: bytes) -> str:
    fields = dict((f[:1], f[1:].decode(errors="replace")) for f in body.split(b"\0") if f)
    return fields.get(b"M", "error")


class Reader:
    def __init__(self, port: int, stall_seconds: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        # Keepalives keep arriving on an idle stream, so a stall is judged by
        # changes (see drain), not by silence on the socket.
        self.sock.settimeout(stall_seconds)
        self.buf = bytearray()
        self.pos = 0

    def next(self) -> tuple[int, bytes]:
        """The next backend message (tag, body), reading only when the
        buffer holds no whole one."""
        while True:
            avail = len(self.buf) - self.pos
            if avail >= 5:
                tag, length = struct.unpack_from("!BI", self.buf, self.pos)
                if avail >= length + 1:
                    start = self.pos + 5
                    self.pos += length + 1
                    return tag, bytes(self.buf[start : self.pos])
            del self.buf[: self.pos]
            self.pos = 0
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Failed("stalled: nothing arrived") from None
            if not data:
                raise Failed("the server closed the connection")
            self.buf += data

    def expect(self, wanted: int) -> None:
        """Reads until a message tagged `wanted`; an ErrorResponse, or a
        request for a password (the bench's cluster trusts), fails."""
        while True:
            tag, body = self.next()
            if tag == ord("E"):
                raise Failed(error_text(body))
            if tag == ord("R") and struct.unpack_from("!I", body)[0] != 0:
                raise Failed("the server asks for a password; the prompt reader supports trust only")
            if tag == wanted:
                return


def drain(env: dict[str, str]) -> int:
    slot = env.get("BENCH_SLOT", "")
    publication = env.get("BENCH_PUBLICATION", "")
    expected = int(env.get("BENCH_EXPECTED", "0"))
    if not re.fullmatch(r"[a-z0-9_]+", slot) or not re.fullmatch(r"[a-z0-9_]+", publication) or expected <= 0:
        raise Failed("BENCH_SLOT, BENCH_PUBLICATION and BENCH_EXPECTED must be set")
    stall_seconds = float(env.get("BENCH_STALL_SECONDS", "60"))
    reader = Reader(int(env["BENCH_PG_PORT"]), stall_seconds)
    params = b"".join(
        k + b"\0" + v.encode() + b"\0"
        for k, v in ((b"user", "postgres"), (b"database", env["BENCH_PG_DATABASE"]), (b"replication", "database"))
    ) + b"\0"
    reader.sock.sendall(struct.pack("!II", len(params) + 8, PROTOCOL_3) + params)
    reader.expect(ord("Z"))
    command = (f"START_REPLICATION SLOT {slot} LOGICAL 0/0 "
               f"(proto_version '1', publication_names '{publication}')")
    reader.sock.sendall(message(b"Q", command.encode() + b"\0"))
    reader.expect(ord("W"))
    changes = 0
    last_change = time.monotonic()
    while changes < expected:
        tag, body = reader.next()
        if tag == ord("d"):
            kind = body[0]
            if kind == ord("w"):
                if body[XLOG_HEADER] in CHANGE_TAGS:
                    changes += 1
                    last_change = time.monotonic()
            elif time.monotonic() - last_change > stall_seconds:
                raise Failed(f"no change for {stall_seconds:.0f}s after {changes} of {expected}")
            elif kind == ord("k") and body[17]:
                # Keepalive with a reply requested: confirm nothing, so the
                # walsender does not time us out.
                status = b"r" + struct.pack("!QQQqB", 0, 0, 0, 0, 0)
                reader.sock.sendall(message(b"d", status))
        elif tag == ord("E"):
            raise Failed(error_text(body))
    return changes


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        changes = drain(dict(os.environ))
    except (Failed, OSError, KeyError, ValueError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps({"changes": changes, "seconds": time.perf_counter() - t0,
                      "cpu_seconds": time.process_time() - cpu0, "peak_rss": peak_rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
