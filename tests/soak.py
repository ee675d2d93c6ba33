"""Soak: a long mixed load below capacity; prints error rate, p99 drift and RSS slope.

``python -m tests.soak --duration 600`` (``make soak``) from the repository root. It starts its own
server (``compute-api serve``, embedded cluster) unless ``--url`` points at a running one, offers a
fixed open-loop mix (/fast, inline fib, small and larger fib on Dask), samples the API process's RSS
from its /metrics (``process_resident_memory_bytes``) and prints one JSON line of figures last:

* error rate: answers other than 200, over all requests;
* p99 drift: p99 latency of the requests sent in the last 10 % of the run / that of the first 10 %;
* RSS slope: MB per minute, least squares over the samples after the first 10 % (start-up warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.driver import Driver, Sample, percentile, status_counts
from tests.conftest import ServerProcess

# (path, requests per second): well below the capacity of 2 workers, so no error is acceptable.
MIX: tuple[tuple[str, float], ...] = (
    ("/fast", 20.0),
    ("/fib/12", 5.0),  # inline in the API process
    ("/fib/22", 4.0),  # ~10 ms on a worker
    ("/fib/25", 2.0),  # ~40 ms on a worker
    ("/fib/27", 0.5),  # ~100 ms on a worker
)
RSS_INTERVAL = 2.0  # seconds between RSS samples
EDGE = 0.10  # the first / last 10 % of the run


def p99_ms(samples: Sequence[Sample]) -> float:
    return percentile(sorted(s.latency * 1000 for s in samples), 99)


def edges(samples: Sequence[Sample], start: float, duration: float) -> tuple[float, float]:
    """p99 (ms) of the requests sent in the first and in the last EDGE of the run."""
    first = [s for s in samples if s.sent < start + EDGE * duration]
    last = [s for s in samples if s.sent >= start + (1 - EDGE) * duration]
    return p99_ms(first), p99_ms(last)


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return 60 * cov / var if var else 0.0


async def rss_sampler(driver: Driver, stop: asyncio.Event, points: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        for line in (await driver.text("/metrics")).splitlines():
            if line.startswith("process_resident_memory_bytes "):
                points.append((driver.now(), float(line.split()[1]) / 2**20))
        try:
            await asyncio.wait_for(stop.wait(), RSS_INTERVAL)
        except TimeoutError:
            pass


async def soak(url: str, duration: float) -> dict[str, object]:
    async with Driver(url) as driver:
        stop, rss = asyncio.Event(), []
        sampler = asyncio.create_task(rss_sampler(driver, stop, rss))
        start = driver.now()
        runs = await asyncio.gather(*(driver.open_loop(path, rate, duration, timeout=30) for path, rate in MIX))
        stop.set()
        await sampler
    samples = [s for run in runs for s in run]
    errors = [s for s in samples if s.status != 200]
    first, last = edges(samples, start, duration)
    fast_first, fast_last = edges(runs[0], start, duration)
    settled = [(t, v) for t, v in rss if t >= start + EDGE * duration]
    per_route = {path: {"requests": len(run), "p99_ms": round(p99_ms(run), 1), "statuses": status_counts(run)}
                 for (path, _), run in zip(MIX, runs, strict=True)}
    return {
        "duration_s": duration,
        "requests": len(samples),
        "error_rate": len(errors) / len(samples),
        "statuses": status_counts(samples),
        "p99_first_ms": round(first, 1),
        "p99_last_ms": round(last, 1),
        "p99_drift": round(last / first, 2),
        "fast_p99_drift": round(fast_last / fast_first, 2),
        "rss_first_mb": round(rss[0][1], 1),
        "rss_last_mb": round(rss[-1][1], 1),
        "rss_slope_mb_per_min": round(slope_per_minute(settled), 2),
        "rss_samples": len(rss),
        "per_route": per_route,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--url", help="soak this running server instead of starting one")
    parser.add_argument("--workers", type=int, default=2, help="embedded workers of the server it starts")
    args = parser.parse_args(argv)
    if args.url:
        figures = asyncio.run(soak(args.url, args.duration))
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as logs:
            with ServerProcess(Path(logs), env={"EMBEDDED_WORKERS": str(args.workers)}) as server:
                figures = asyncio.run(soak(server.url, args.duration))
    print(f"soak {args.duration:g} s: {figures['requests']} requests, error rate {figures['error_rate']:.4%}, "
          f"p99 {figures['p99_first_ms']} -> {figures['p99_last_ms']} ms (drift x{figures['p99_drift']}), "
          f"RSS {figures['rss_first_mb']} -> {figures['rss_last_mb']} MB "
          f"(slope {figures['rss_slope_mb_per_min']} MB/min)", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
