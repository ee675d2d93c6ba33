"""The SLO gate: turns a finished run's aggregated stats into a pass/fail exit code.

Runs on the master (or the single local process) only, where the stats are the sum of all workers'.
Every failure counts, including 503 + Retry-After from admission control: a user who was turned
away did not get an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing locust monkey-patches the process; the gate only reads the stats
    from locust.stats import RequestStats

FAST_NAME = "/fast"
FIB_NAME = "/fib/[n]"
PERCENTILE = 0.95


@dataclass(frozen=True)
class Thresholds:
    fail_ratio: float
    fast_p95_ms: float  # 0 disables
    fib_p95_ms: float  # 0 disables

    @classmethod
    def from_options(cls, options: Any) -> Thresholds:
        return cls(options.slo_fail_ratio, options.slo_fast_p95_ms, options.slo_fib_p95_ms)

    def describe(self) -> str:
        def p95(name: str, limit: float) -> str:
            return f"{name} p95 <= {limit:g} ms" if limit > 0 else f"{name} p95 unchecked"

        return (f"failure ratio <= {self.fail_ratio:g}, {p95(FAST_NAME, self.fast_p95_ms)}, "
                f"{p95(FIB_NAME, self.fib_p95_ms)}")


@dataclass
class Verdict:
    checks: list[str] = field(default_factory=list)  # one line per check, for the report
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def check(self, ok: bool, line: str) -> None:
        """Record one check; ``line`` states the measured value and its limit."""
        self.checks.append(f"  [{'ok' if ok else 'FAIL'}] {line}")
        if not ok:
            self.violations.append(line)

    def report(self) -> str:
        head = "SLO gate: PASSED" if self.passed else f"SLO gate: FAILED ({len(self.violations)} violated)"
        return "\n".join([head, *self.checks])


def evaluate(stats: RequestStats, thresholds: Thresholds, unhandled_exceptions: int) -> Verdict:
    verdict = Verdict()
    total = stats.total
    verdict.check(total.num_requests > 0, f"requests made: {total.num_requests} (need at least 1)")
    verdict.check(
        total.fail_ratio <= thresholds.fail_ratio,
        f"failure ratio: {total.fail_ratio:.4f} = {total.num_failures} of {total.num_requests} "
        f"(limit {thresholds.fail_ratio:g})",
    )
    verdict.check(unhandled_exceptions == 0, f"locustfile exceptions: {unhandled_exceptions} (limit 0)")
    for name, limit in ((FAST_NAME, thresholds.fast_p95_ms), (FIB_NAME, thresholds.fib_p95_ms)):
        # entries.get, not stats.get: the latter would create an empty entry as a side effect.
        entry = stats.entries.get((name, "GET"))
        if limit <= 0:
            verdict.checks.append(f"  [skip] {name} p95: threshold disabled")
        elif entry is None or entry.num_requests == 0:
            # A route excluded on purpose (--tags, weight 0) has no latency to judge.
            verdict.checks.append(f"  [skip] {name} p95: no requests")
        else:
            p95 = entry.get_response_time_percentile(PERCENTILE)
            verdict.check(p95 <= limit, f"{name} p95: {p95:g} ms (limit {limit:g} ms)")
    return verdict
