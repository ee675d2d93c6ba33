"""Overload: open-loop arrivals at 2x and 10x the measured capacity against a real server.

Capacity is measured first (closed loop, enough clients to keep every worker busy); then a fixed
arrival rate that ignores the answers (what real users do) is offered for PHASE seconds. While it
runs, a paced /fast probe measures the cheap route and psutil samples the API process's RSS.

Figures are printed and repeated in every assertion message (run pytest with -s or -rA to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import psutil
import pytest
from conftest import ServerProcess, scrape
from sizing import fib_n_lasting

from bench.driver import Driver, Sample, latency_ms, percentile, status_counts

N = fib_n_lasting(0.2)  # 0.2 s of CPU and more here: the workers, not the HTTP path, are the bottleneck
WORKERS = 2
CAPACITY_SECONDS = 8.0
PHASE = 15.0  # seconds per overload level (the issue says 30; 15 keeps CI time down, same steady state)
FAST_INTERVAL = 0.05  # the /fast probe: one request per 50 ms
# The project's /fast SLO is p95 <= 500 ms (locustfiles/locust.conf); overload must not break it.
FAST_SLO_P95_MS = 500.0
REJECTION_P99_MS = 50.0
# Goodput is printed for every phase. The target (>= 90 % of peak) is measured by `make
# bench`, scenario (h), on an otherwise idle machine; here, with the load generator on the same 2
# cores and two noisy measurements in the ratio, the assertion guards against collapse (the
# pre-admission-control design fell to 4 %) rather than re-measuring the target.
GOODPUT_RATIO = 0.60
# The API process itself (not its workers) must stay small whatever the offered load.
RSS_LIMIT_MB = 400.0


@dataclass
class Phase:
    multiple: float
    rate: float
    fib: list[Sample]
    fast: list[Sample]
    peak_rss_mb: float
    start: float
    end: float

    def goodput(self) -> float:
        """Correct answers per second completed inside the phase's window."""
        ok = [s for s in self.fib if s.status == 200 and self.start <= s.done <= self.end]
        return len(ok) / (self.end - self.start)

    def rejections(self) -> list[Sample]:
        return [s for s in self.fib if s.status == 503]

    def summary(self, capacity: float) -> str:
        rej = latency_ms(self.rejections())
        fast = latency_ms(self.fast)
        return (
            f"{self.multiple:g}x ({self.rate:.1f} req/s for {PHASE:g} s): statuses {status_counts(self.fib)}; "
            f"goodput {self.goodput():.2f} req/s = {self.goodput() / capacity:.0%} of capacity {capacity:.2f}; "
            f"rejections p50 {rej.get('p50', float('nan')):.1f} p99 {rej.get('p99', float('nan')):.1f} ms; "
            f"/fast p95 {percentile(sorted(s.latency * 1000 for s in self.fast), 95):.1f} "
            f"p99 {fast['p99']:.1f} max {fast['max']:.1f} ms ({fast['count']} probes); "
            f"API peak RSS {self.peak_rss_mb:.0f} MB"
        )


def server_side_p99_bound(samples: dict[str, float], status: str) -> float:
    """Upper bound (histogram bucket) of the server-measured p99 latency of /fib answers with ``status``."""
    buckets = sorted(
        (float(key.split('le="')[1].split('"')[0]), count)
        for key, count in samples.items()
        if key.startswith("compute_api_request_duration_seconds_bucket{")
        and 'route="/fib/{n}"' in key and f'status="{status}"' in key
    )
    total = buckets[-1][1] if buckets else 0.0
    return next((le for le, count in buckets if count >= 0.99 * total), float("nan")) if total else float("nan")


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def fast_probe(driver: Driver, stop: asyncio.Event) -> list[Sample]:
    samples = []
    while not stop.is_set():
        samples.append(await driver.get("/fast", timeout=10))
        await asyncio.sleep(FAST_INTERVAL)
    return samples


async def overload(driver: Driver, pid: int, multiple: float, capacity: float) -> Phase:
    rate = multiple * capacity
    stop, peak = asyncio.Event(), [0.0]
    rss = asyncio.create_task(sample_rss(pid, peak, stop))
    probe = asyncio.create_task(fast_probe(driver, stop))
    start = driver.now()
    # Each request may wait up to REQUEST_TIMEOUT (30 s) server-side; the client waits a bit longer.
    fib = await driver.open_loop(f"/fib/{N}", rate, PHASE, timeout=40)
    end = start + PHASE
    stop.set()
    fast = await probe
    await rss
    # Probes sent after the arrivals stopped measure a draining server, not an overloaded one.
    fast = [s for s in fast if s.sent <= end]
    return Phase(multiple, rate, fib, fast, peak[0], start, end)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # COALESCE off: identical requests would otherwise share one computation and never overload anything.
    with ServerProcess(
        tmp_path_factory.mktemp("overload"),
        env={"EMBEDDED_WORKERS": str(WORKERS), "COALESCE": "false", "FIB_MAX_N": "45"},
    ) as s:
        yield s


def test_overload_2x_and_10x(server: ServerProcess) -> None:
    assert server.proc is not None

    async def scenario() -> tuple[float, list[Phase]]:
        async with Driver(server.url) as driver:
            await driver.burst(f"/fib/{N}", WORKERS)  # warm the workers and the connection pool
            # Peak: the best closed loop of one and of two clients per worker slot.
            capacity = 0.0
            for clients in (WORKERS, 2 * WORKERS):
                samples = await driver.closed_loop(f"/fib/{N}", clients=clients, duration=CAPACITY_SECONDS / 2)
                assert all(s.status == 200 for s in samples), status_counts(samples)
                capacity = max(capacity, len(samples) / (CAPACITY_SECONDS / 2))
            phases = []
            for multiple in (2, 10):
                phases.append(await overload(driver, server.proc.pid, multiple, capacity))
                # let the admitted queue drain so the next level starts from the same state
                deadline = time.monotonic() + 60
                while scrape(server.url)["compute_api_computations_in_flight"] > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
            return capacity, phases

    closed_loop, phases = asyncio.run(scenario())
    # The closed loop idles a worker for a round trip per request; an open loop at 2x keeps every
    # worker busy. Peak is the better of the two, so 10x is held to the highest throughput seen.
    capacity = max(closed_loop, phases[0].goodput())
    print(f"\npeak: closed loop ({WORKERS} or {2 * WORKERS} clients, fib({N})) {closed_loop:.2f} req/s, "
          f"2x open loop {phases[0].goodput():.2f} req/s -> {capacity:.2f} req/s")
    for phase in phases:
        report = phase.summary(capacity)
        print(report)
        assert server.proc.poll() is None, f"the server died under load: {report}\n{server.log()[-3000:]}"
        counts = status_counts(phase.fib)
        # Every request is answered: a result or a fast 503, never a 5xx of another kind, a hang or a reset.
        assert set(counts) <= {"200", "503"}, report
        assert all(s.retry_after for s in phase.rejections()), f"a 503 without Retry-After: {report}"
        assert phase.goodput() >= GOODPUT_RATIO * capacity, report
        if phase.rejections():
            # Client-side p99 includes this process's own event-loop lag (it generates the load on
            # the same 2 cores); the server's histogram is the rejection path itself.
            assert latency_ms(phase.rejections())["p50"] < REJECTION_P99_MS, report
        fast_p95 = percentile(sorted(s.latency * 1000 for s in phase.fast), 95)
        assert all(s.status == 200 for s in phase.fast) and fast_p95 <= FAST_SLO_P95_MS, report
        assert phase.peak_rss_mb < RSS_LIMIT_MB, report
    # At 10x there is far more work than the workers can do: admission control must have turned some away.
    assert phases[-1].rejections(), phases[-1].summary(capacity)
    samples = scrape(server.url)
    server_p99 = server_side_p99_bound(samples, "503")
    figure = f"server-side p99 of all {sum(len(p.rejections()) for p in phases)} rejections <= {server_p99 * 1000:g} ms"
    print(figure)
    assert server_p99 <= REJECTION_P99_MS / 1000, figure
    assert samples['compute_api_rejected_requests_total{reason="overloaded"}'] == sum(
        len(p.rejections()) for p in phases
    )
    assert samples["compute_api_computations_in_flight"] == 0
    # fib(N) costs far more than BATCH_MAX_COST: batching (on by default) never engages here, each
    # computation is a Dask task of its own (tests/test_batching.py overloads cheap, batched work).
    assert samples["compute_api_batch_size_count"] == 0
    assert samples["compute_api_dask_tasks_total"] == samples['compute_api_computations_total{where="dask"}']
