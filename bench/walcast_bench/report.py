"""The printed tables, and the issue's targets next to what was measured."""

from __future__ import annotations

from dataclasses import dataclass, field

from .consumers import Drain
from .latency import Latency
from .workloads import Workload

CONSUMERS = ("walcast", "pg_recvlogical", "postgres.js", "prompt reader")
REFERENCES = CONSUMERS[1:]
MB = 1_000_000


@dataclass
class Result:
    workload: Workload
    wal_bytes: int
    load_seconds: float
    drains: dict[str, Drain] = field(default_factory=dict)

    def rate(self, consumer: str) -> float:
        return self.workload.changes / self.drains[consumer].seconds

    def mb_per_s(self, consumer: str) -> float:
        return self.wal_bytes / MB / self.drains[consumer].seconds

    def ratio(self, reference: str) -> float:
        return self.rate("walcast") / self.rate(reference)


def table(header: list[list[str]], rows: list[list[str]], left: int = 1) -> str:
    """Columns aligned; the first `left` columns to the left, the rest right."""
    widths = [max(len(r[i]) for r in header + rows) for i in range(len(header[0]))]

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            out.append(cell.ljust(width) if i < left else cell.rjust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([*(line(h) for h in header), rule, *(line(r) for r in rows)])


def throughput(results: list[Result]) -> str:
    header = [
        ["", "", "WAL", *(h for c in CONSUMERS for h in (c, "")), *("walcast ÷" for _ in REFERENCES)],
        ["workload", "changes", "MB", *(h for _ in CONSUMERS for h in ("changes/s", "MB/s")), *REFERENCES],
    ]
    rows = []
    for r in results:
        row = [r.workload.title, f"{r.workload.changes:,}", f"{r.wal_bytes / MB:,.1f}"]
        for c in CONSUMERS:
            row += [f"{r.rate(c):,.0f}", f"{r.mb_per_s(c):,.1f}"]
        row += [f"{r.ratio(ref):.2f}×" for ref in REFERENCES]
        rows.append(row)
    return table(header, rows)


def daemon(results: list[Result]) -> str:
    header = [
        ["", "", "CPU", "CPU µs", "peak", "published", "JSON", "", "walsender", "redis", "subscriber"],
        ["workload", "seconds", "seconds", "/change", "RSS MB", "MB", "MB/s", "", "CPU s", "CPU s", "CPU s"],
    ]
    rows = []
    for r in results:
        d = r.drains["walcast"]
        published = d.extra.get("published_bytes") or 0
        rows.append([
            r.workload.title, f"{d.seconds:.2f}", f"{d.cpu_seconds:.2f}",
            f"{d.cpu_seconds / r.workload.changes * 1e6:.1f}", f"{d.peak_rss / (1 << 20):.1f}",
            f"{published / MB:,.1f}", f"{published / MB / d.seconds:,.1f}", "",
            _opt(d.extra.get("walsender_cpu")), _opt(d.extra.get("redis_cpu")),
            _opt(d.extra.get("subscriber_cpu")),
        ])
    return table(header, rows)


def references(results: list[Result]) -> str:
    header = [["workload", "consumer", "seconds", "CPU s", "peak RSS MB", "walsender CPU s"]]
    rows = []
    for r in results:
        for c in CONSUMERS:
            d = r.drains[c]
            rows.append([r.workload.title, c, f"{d.seconds:.2f}", f"{d.cpu_seconds:.2f}",
                         f"{d.peak_rss / (1 << 20):.1f}", _opt(d.extra.get("walsenders_cpu"))])
    return table(header, rows, left=2)


def latency(results: list[Latency]) -> str:
    header = [["target/s", "achieved/s", "messages", "p50 ms", "p99 ms", "max ms", "mean ms",
               "walcast CPU s", "walsender CPU s", "redis CPU s"]]
    rows = [
        [f"{x.target_rate:,}", f"{x.achieved_rate:,.0f}", f"{x.messages:,}", f"{x.p50_ms:.2f}",
         f"{x.p99_ms:.2f}", f"{x.max_ms:.2f}", f"{x.mean_ms:.2f}", f"{x.daemon_cpu:.2f}",
         _opt(x.walsender_cpu), f"{x.redis_cpu:.2f}"]
        for x in results
    ]
    return table(header, rows, left=0)


def targets(results: list[Result], latencies: list[Latency]) -> str:
    """Issue 6's targets for this 2-core machine next to this run."""
    by_key = {r.workload.key: r for r in results}
    rows = []

    def check(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    for key in ("single", "batch"):
        if r := by_key.get(key):
            for ref, goal in (("pg_recvlogical", 1.0), ("postgres.js", 0.9)):
                ratio = r.ratio(ref)
                rows.append([f"{r.workload.title}: walcast ≥ {goal:.1f}× {ref}", f"{ratio:.2f}×",
                             check(ratio >= goal)])
    for x in latencies:
        if x.target_rate == 1000:
            rows.append(["p99 commit→Redis ≤ 10 ms at 1k changes/s", f"{x.p99_ms:.2f} ms",
                         check(x.p99_ms <= 10)])
    if r := by_key.get("big"):
        rss = r.drains["walcast"].peak_rss / (1 << 20)
        rows.append([f"peak RSS ≤ 64 MB through {r.workload.title} (firehose; 10,000 subscriptions: --only rls)",
                     f"{rss:.1f} MB", check(rss <= 64)])
    if not rows:
        return ""
    return table([["target (issue 6)", "this run", ""]], rows)


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
