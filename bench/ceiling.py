"""The ceiling: ``ProcessPoolExecutor(workers).map(fib, ...)`` with no HTTP, no event loop, no Dask."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.servers.common import fib


def measure(n: int, workers: int, tasks_per_worker: int) -> dict[str, Any]:
    tasks = tasks_per_worker * workers
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fib, [15] * workers))  # start the processes outside the measurement
        start = time.perf_counter()
        list(pool.map(fib, [n] * tasks))
        seconds = time.perf_counter() - start
    return {"n": n, "workers": workers, "tasks": tasks, "seconds": seconds, "fib_rate": tasks / seconds}
