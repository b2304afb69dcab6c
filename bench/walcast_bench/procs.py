"""Child processes: starting, stopping, and reading their CPU time and memory.

Every child runs in its own session, so a Ctrl-C in the terminal reaches
only `bench/run`, which then stops the children itself in order (daemon
before Redis, Redis before Postgres). Children also get a parent-death
signal, so they do not outlive a `bench/run` that was killed outright.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run that cannot go on; the message says what happened and what to look at."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int):
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig)

    return preexec


def as_postgres_user(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` user when we are root (Postgres refuses root).

    setpriv execs in place, so the pid we hold is the server's own.
    """
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd]


def spawn(
    cmd: list[str],
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen:
    """Starts `cmd` in its own session; stdout and stderr go to `log` unless
    `stdout` is given."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        return subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            env=env,
            cwd=cwd,
            bufsize=0,
            start_new_session=True,
            preexec_fn=_die_with_parent(death_signal),
        )
    except FileNotFoundError as e:
        raise BenchError(f"could not run {cmd[0]}: {e}") from e
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Sends `sig`, waits up to `timeout` seconds, then SIGKILLs."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/PID/stat utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class WalsenderCpu:
    """CPU seconds of the walsenders that run while the block runs.

    A reference consumer exits when it is done, and its walsender with it,
    so the walsender cannot be read afterwards: a thread samples every
    walsender child of the postmaster every 10 ms and keeps each one's last
    reading (a walsender's final 10 ms may be missed)."""

    def __init__(self, postmaster: int):
        self.postmaster = postmaster
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "WalsenderCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._read()

    def _read(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) != self.postmaster:
                    continue
                if b"walsender" not in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    continue
            except (OSError, ValueError):
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            self.seen[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a live process (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def wait_with_rusage(proc: subprocess.Popen) -> tuple[int, float]:
    """Waits for `proc`; returns (exit code, CPU seconds).

    Not its peak RSS: the kernel's `ru_maxrss` keeps the high-water mark of
    the image before `exec`, which is this Python process's (tens of MB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_until(what: str, check, timeout: float, interval: float = 0.05):
    """Calls `check()` until it returns something truthy; raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def build_example(name: str, debug: bool, log) -> Path:
    """Builds cargo example `name` (release unless `debug`); its binary."""
    import json

    root = Path(__file__).resolve().parent.parent.parent
    cmd = ["cargo", "build", "--locked", "--example", name, "--message-format=json-render-diagnostics"]
    if not debug:
        cmd.insert(2, "--release")
    log(f"building {name}: {' '.join(cmd[:-1])}")
    done = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise BenchError(f"cargo build of {name} failed (see above)")
    for line in done.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == name:
            return Path(msg["executable"])
    raise BenchError(f"cargo build did not report the {name} binary")


class LineClient:
    """A load client in its own process: commands on stdin, JSON lines on stdout."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.proc = spawn(argv, env=env, log=log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def line(self, timeout: float) -> dict:
        import json
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {}
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(5)
            raise BenchError(f"the {self.name} exited with {self.proc.returncode}:\n{tail(self.log)}")
        return json.loads(text)

    def wait_for(self, event: str, timeout: float, on_idle=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.line(0.25)
            if on_idle:
                on_idle()
            if line.get("event") == event:
                return line
        raise BenchError(f"the {self.name} did not report {event!r} within {timeout:.0f}s:\n{tail(self.log)}")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            stop(self.proc, timeout=5)

