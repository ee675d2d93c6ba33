"""Load for the scenarios: exact-count users on the project's one load driver (bench/driver.py), the
project's Locust run, and the summary (percentiles by bench.driver's one definition: nearest rank).

The driver counts every request it sends and every answer it gets (any HTTP status), so "requests
sent == requests answered" is a measured fact, not an assumption; a request without an answer
within ``answer_timeout`` counts as a hang. It runs on its own event loop in a thread so the test
can scale, kill and restart containers while the load goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import BIN, ROOT
from workload import KNOWN_FIB_VALUES  # locustfiles/ is on the tests' path (pyproject.toml)

from bench.driver import ERROR, TIMEOUT, Driver, percentile

LOCUSTFILE = ROOT / "locustfiles" / "locustfile.py"


@dataclass(frozen=True)
class Sample:
    route: str  # "/fast" or "/fib"
    started: float  # monotonic
    latency: float  # seconds; for an unanswered request, until it was given up
    status: int  # 0: no HTTP answer (connection error or hang)
    retry_after: bool  # the answer carried a Retry-After header
    correct: bool  # 200 with exactly the expected body
    error: str = ""


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    duration: float = 0.0

    def select(self, route: str | None = None, start: float | None = None, end: float | None = None) -> list[Sample]:
        return [s for s in self.samples if (route is None or s.route == route)
                and (start is None or s.started >= start) and (end is None or s.started < end)]

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if not s.correct]

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.samples:
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts


class LoadDriver:
    """Closed-loop users: ``fast_users`` GET /fast, ``fib_users`` GET /fib/{n} with n from ``fib_n``."""

    def __init__(self, url: str, host: str, *, fast_users: int = 2, fib_users: int = 4,
                 fib_n: tuple[int, int] = (20, 25), fast_think: float = 0.05, fib_think: float = 0.05,
                 answer_timeout: float = 45.0) -> None:
        self.url, self.host = url, host
        self.fast_users, self.fib_users = fast_users, fib_users
        self.fib_n, self.answer_timeout = fib_n, answer_timeout
        self.think = {"/fast": fast_think, "/fib": fib_think}
        self.results = Results()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> LoadDriver:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Results:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.answer_timeout + 30)
            assert not self._thread.is_alive(), "load driver did not stop"
            self._thread = None
            self.results.duration = time.monotonic() - self._started
        return self.results

    async def _main(self) -> None:
        async with Driver(self.url, default_timeout=self.answer_timeout, host_header=self.host) as driver:
            users = [self._user(driver, "/fast") for _ in range(self.fast_users)]
            users += [self._user(driver, "/fib") for _ in range(self.fib_users)]
            await asyncio.gather(*users)

    async def _user(self, driver: Driver, route: str) -> None:
        while not self._stop.is_set():
            if route == "/fast":
                path, expected = "/fast", {"message": "Hello!"}
            else:
                n = random.randint(*self.fib_n)
                path, expected = f"/fib/{n}", {"n": n, "value": KNOWN_FIB_VALUES[n]}
            await self._request(driver, route, path, expected)
            await asyncio.sleep(self.think[route])

    async def _request(self, driver: Driver, route: str, path: str, expected: dict) -> None:
        self.results.sent += 1
        started = time.monotonic()
        sample, raw = await driver.fetch(path)
        status, correct, error = max(sample.status, 0), False, ""
        if sample.status == TIMEOUT:
            error = f"no answer within {self.answer_timeout:g} s"
        elif sample.status == ERROR:
            error = "connection error or malformed answer"
        else:
            self.results.answered += 1
            try:
                body = json.loads(raw)
            except ValueError:  # e.g. the ingress's own error page
                body = raw.decode(errors="replace")
            correct = status == 200 and body == expected
            if not correct:
                error = f"HTTP {status}: {str(body)[:200]}"
        self.results.samples.append(Sample(route, started, time.monotonic() - started, status, sample.retry_after,
                                           correct, error))


# -- Locust ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocustRun:
    exit_code: int
    output: str
    stats: dict[str, dict[str, str]]  # request name -> the row of <prefix>_stats.csv


def _locust_command(host_url: str, resolve: tuple[str, str], csv_prefix: Path, *, users: int, spawn_rate: float,
                    run_time: str, extra: list[str]) -> list[str]:
    """The project's locustfile, headless, with its SLO gate. ``resolve`` = (ingress host, nginx IP):
    the ingress host resolves to nginx for the Locust process only (its own mount namespace with
    its own /etc/hosts, as a DNS record would point the host at the ingress's load balancer)."""
    host, address = resolve
    hosts_file = csv_prefix.parent / "hosts"
    hosts_file.write_text(f"127.0.0.1 localhost\n{address} {host}\n")
    locust = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", host_url,
              "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", run_time,
              "--csv", str(csv_prefix), "--only-summary", "--exit-code-on-error", "1", *extra]
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts_file), *locust]


def _locust_stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    stats_path = Path(f"{csv_prefix}_stats.csv")
    if not stats_path.exists():
        return {}
    with stats_path.open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def run_locust(host_url: str, resolve: tuple[str, str], csv_prefix: Path, *, users: int, spawn_rate: float,
               run_time: str, extra: list[str]) -> LocustRun:
    """A Locust swarm for ``run_time`` (see _locust_command)."""
    command = _locust_command(host_url, resolve, csv_prefix, users=users, spawn_rate=spawn_rate,
                              run_time=run_time, extra=extra)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return LocustRun(result.returncode, result.stdout + result.stderr, _locust_stats(csv_prefix))


@contextlib.contextmanager
def locust_swarm(host_url: str, resolve: tuple[str, str], csv_prefix: Path, *, users: int, spawn_rate: float,
                 extra: list[str]) -> Iterator[list[LocustRun]]:
    """A Locust swarm for as long as the ``with`` block lasts: stopped with SIGTERM, which Locust
    takes as a graceful stop (users finish, stats written). The run is appended to the yielded list."""
    command = _locust_command(host_url, resolve, csv_prefix, users=users, spawn_rate=spawn_rate,
                              run_time="30m", extra=extra)
    output = csv_prefix.parent / f"{csv_prefix.name}.log"
    runs: list[LocustRun] = []
    with output.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield runs
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    runs.append(LocustRun(process.returncode, output.read_text(), _locust_stats(csv_prefix)))


# -- the summary table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    scenario: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    throughput: float  # requests per second
    note: str = ""


SUMMARY: list[Row] = []


def record(scenario: str, results: Results, note: str = "") -> Row:
    latencies = sorted(s.latency * 1000 for s in results.samples)
    row = Row(scenario, len(results.samples), len(results.failures), percentile(latencies, 50),
              percentile(latencies, 95), len(results.samples) / results.duration if results.duration else 0.0,
              note)
    SUMMARY.append(row)
    return row


def summary_table() -> str:
    header = f"{'scenario':<34} {'requests':>8} {'failures':>8} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}  note"
    lines = [header, "-" * len(header)]
    for r in SUMMARY:
        lines.append(f"{r.scenario:<34} {r.requests:>8} {r.failures:>8} {r.p50_ms:>8.0f} {r.p95_ms:>8.0f} "
                     f"{r.throughput:>7.1f}  {r.note}")
    return "\n".join(lines)
