"""Does a compute function use a worker's threads? ``python -m bench.threads`` (prints, never fails).

One Dask worker process with 1, then 2 threads, each given the same batch of distinct tasks:
derive (PBKDF2 in hashlib, which releases the GIL) should scale with the threads, naive fib (pure
Python, holds the GIL) should not. This is why the worker's thread count is worth tuning per
function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from distributed import Client, LocalCluster

from service.tasks import derive, fib

BATCH = 12
WORK: dict[str, tuple[Callable[..., Any], Callable[[int], tuple[Any, ...]]]] = {
    "derive(200000 iterations)": (derive, lambda i: (f"text-{i}", "salt", 200_000)),
    "fib(27)": (fib, lambda i: (27,)),
}


def rate(client: Client, func: Callable[..., Any], args: Callable[[int], tuple[Any, ...]]) -> float:
    """Tasks per second, best of two batches."""
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        client.gather([client.submit(func, *args(i), pure=False) for i in range(BATCH)])
        best = max(best, BATCH / (time.perf_counter() - start))
    return best


def main() -> None:
    # Two threads can only scale on two free cores: say how busy the machine already is.
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    for threads in (1, 2):
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            for name, (func, args) in WORK.items():
                print(f"1 worker x {threads} thread(s): {rate(client, func, args):.1f} {name}/s", flush=True)


if __name__ == "__main__":
    main()
