"""Scheduler CPU per cheap request: direct calls, micro-batching, neither (``python -m bench.batching``).

Issue 12 wants the scheduler's CPU per cheap request small (<= 0.3 ms at >= 300 requests/s) without
a worse ``/fast`` p99. Two mechanisms spare the scheduler: direct calls (a computation estimated
under ``DIRECT_MAX_COST`` goes from the API straight to a worker thread's handler, past the
scheduler, while the cell has a free call slot) and adaptive micro-batching (several cheap
computations per Dask task when every thread is busy). This bench shows what each one buys.

A real ``dask scheduler`` and single-threaded ``dask worker`` processes, and ``compute-api serve``
pointed at them, three times on the same Dask processes:

* "direct + batching (defaults)": both mechanisms at their defaults;
* "batching only (DIRECT_MAX_COST=0)": no direct call, every computation a (batched) Dask task;
* "neither (DIRECT_MAX_COST=0, BATCH_MAX_SIZE=1)": one Dask task per computation.

Each run offers cheap ``/fib/{n}`` requests (about a millisecond of work, ``INLINE_MAX_COST=0`` so
none runs in the API) at a fixed open-loop rate, with a paced ``/fast`` probe alongside, reads the
CPU time of the scheduler and API processes from the OS, and reads the API's ``/metrics`` counters
before and after the load: Dask tasks submitted and direct calls by outcome (answered, busy,
refused). Per run it reports the share of answered requests a direct call answered, requests per
Dask task (of those a direct call did not answer; nan when no task was submitted), scheduler CPU
ms/request (and less the scheduler's idle housekeeping, measured just before), API CPU ms/request,
and the fib and ``/fast`` p99 (the one-percentile definition of ``bench.driver``). Prints figures;
never fails on a target (they are the issue's, measured here). ``fib(n)`` is sized from this
machine at each start, so a busy neighbour can shift n by one between invocations.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.driver import Driver, latency_ms, percentile, status_counts
from bench.processes import cpu_seconds, dask_cluster, fib_n_for, housekeeping, listening_pid, metric, remote_api
from bench.server import running

# The runs, each with its own API process on the same Dask processes: (label, settings beside the defaults).
RUNS: tuple[tuple[str, dict[str, str]], ...] = (
    ("direct + batching (defaults)", {}),
    ("batching only (DIRECT_MAX_COST=0)", {"DIRECT_MAX_COST": "0"}),
    ("neither (DIRECT_MAX_COST=0, BATCH_MAX_SIZE=1)", {"DIRECT_MAX_COST": "0", "BATCH_MAX_SIZE": "1"}),
)


def cheap_n(seconds: float = 0.001) -> int:
    """The smallest n whose fib(n) takes ``seconds`` here: cheap, yet above INLINE_MAX_COST's default."""
    return fib_n_for(seconds)


async def phase(url: str, scheduler_pid: int, api_pid: int, n: int, rate: float, seconds: float) -> dict[str, Any]:
    async with Driver(url) as driver:
        await driver.burst(f"/fib/{n}", 20)  # warm the connection pool, the cost model and the workers
        before_metrics = await driver.text("/metrics")
        stop = asyncio.Event()

        async def probe() -> list[Any]:
            samples = []
            while not stop.is_set():
                samples.append(await driver.get("/fast", timeout=10))
                await asyncio.sleep(0.01)
            return samples

        [idle] = await housekeeping([scheduler_pid], seconds)
        scheduler0, api0 = cpu_seconds(scheduler_pid), cpu_seconds(api_pid)
        fast = asyncio.create_task(probe())
        fib_samples = await driver.open_loop(f"/fib/{n}", rate, seconds, timeout=30)
        stop.set()
        fast_samples = await fast
        scheduler_cpu, api_cpu = cpu_seconds(scheduler_pid) - scheduler0, cpu_seconds(api_pid) - api0
        after_metrics = await driver.text("/metrics")
    ok = sum(s.status == 200 for s in fib_samples)

    def delta(name: str, **labels: str) -> float:
        return metric(after_metrics, name, **labels) - metric(before_metrics, name, **labels)

    tasks = delta("compute_api_dask_tasks_total")
    direct = {outcome: delta("compute_api_direct_calls_total", outcome=outcome)
              for outcome in ("answered", "busy", "refused")}
    fast_ms = sorted(s.latency * 1000 for s in fast_samples)
    return {
        "statuses": status_counts(fib_samples),
        "answered_per_s": ok / seconds,
        "direct_answered": direct["answered"],
        "direct_busy": direct["busy"],
        "direct_refused": direct["refused"],
        "direct_share": direct["answered"] / ok if ok else math.nan,
        "dask_tasks": tasks,
        "scheduler_ms_per_request": 1000 * scheduler_cpu / max(ok, 1),
        "scheduler_idle_ms_per_s": 1000 * idle,
        "scheduler_net_ms_per_request": 1000 * (scheduler_cpu - idle * seconds) / max(ok, 1),
        "api_ms_per_request": 1000 * api_cpu / max(ok, 1),
        # Requests that went through Dask (not answered by a direct call) per Dask task.
        "requests_per_task": (ok - direct["answered"]) / tasks if tasks else math.nan,
        "fib_p99_ms": latency_ms(fib_samples).get("p99", math.nan),
        "fast_p50_ms": percentile(fast_ms, 50),
        "fast_p99_ms": percentile(fast_ms, 99),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--rate", type=float, default=300.0, help="cheap requests per second (open loop)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per run")
    parser.add_argument("--workers", type=int, default=2, help="single-threaded Dask workers")
    parser.add_argument("--n", type=int, default=None, help="fib(n) per request (default: ~1 ms here)")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else cheap_n()
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp, dask_cluster(args.workers, Path(tmp)) as cluster:
        rows = {}
        for label, settings in RUNS:
            spec = remote_api(label, {"DASK_SCHEDULER_ADDRESS": cluster.address, **settings})
            with running(spec, args.workers, Path(tmp)) as url:
                rows[label] = asyncio.run(phase(url, cluster.scheduler_pid, listening_pid(url), n, args.rate,
                                                args.seconds))
            print(f"{label}: " + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[label].items()), flush=True)
    print(f"\nfib({n}) at {args.rate:g} req/s for {args.seconds:g} s, {args.workers} single-threaded workers, "
          f"{os.cpu_count()} cores")
    print("| run | answered/s | direct share | direct refused (busy) | requests/Dask task "
          "| scheduler CPU ms/request (less idle) | API CPU ms/request | fib p99 ms | /fast p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {r['answered_per_s']:.0f} | {100 * r['direct_share']:.1f} % "
              f"| {r['direct_refused']:.0f} ({r['direct_busy']:.0f}) | {r['requests_per_task']:.1f} "
              f"| {r['scheduler_ms_per_request']:.2f} ({r['scheduler_net_ms_per_request']:.2f}) "
              f"| {r['api_ms_per_request']:.2f} | {r['fib_p99_ms']:.1f} | {r['fast_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
