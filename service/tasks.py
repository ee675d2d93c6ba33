"""Compute functions: the one place to swap fib for your own work.

This module is imported by the API, the Dask scheduler (which unpickles task graphs) and every
Dask worker, from the same image. Keep it small and free of heavy imports.

Only functions listed in ``REGISTRY`` are ever submitted to the cluster, and only with an argument
the API has validated: the scheduler port executes whatever it is sent, so the API must never
become a way to ship arbitrary callables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Growth rate of naive fib's call tree: calls(n) ~ phi ** n.
PHI = (1 + math.sqrt(5)) / 2


def fib(n: int) -> int:
    """Naive recursive Fibonacci: deliberately exponential, a stand-in for model inference."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


def timed(func: Callable[[int], object], arg: int) -> tuple[object, float]:
    """Run ``func(arg)`` on a worker and report how long it took there.

    The backend learns from these durations how fast the workers really are (nice levels, CPU
    contention and different hardware all change it), and sizes admission control with that.
    """
    start = time.perf_counter()
    result = func(arg)
    return result, time.perf_counter() - start


def timed_batch(func: Callable[[int], object], args: list[int]) -> list[tuple[bool, object, float]]:
    """Run ``func`` on each argument of a batch (service.batching), one after another on one worker.

    Each item reports ``(ok, result or the exception it raised, seconds)``: one failing item fails
    only its own request, never its batch-mates.
    """
    outcomes: list[tuple[bool, object, float]] = []
    for arg in args:
        start = time.perf_counter()
        try:
            outcomes.append((True, func(arg), time.perf_counter() - start))
        except Exception as exc:  # reported to that item's requests only
            outcomes.append((False, exc, time.perf_counter() - start))
    return outcomes


@dataclass(frozen=True)
class Task:
    """A compute function and its cost model.

    ``relative_cost(arg)`` is proportional to the run time; ``calibrate`` turns it into seconds.
    The backend uses the estimate to run trivial work inline, to prioritise short jobs over long
    ones, and to reject work that cannot finish in time (admission control).
    """

    name: str
    func: Callable[[int], object]
    relative_cost: Callable[[int], float]
    calibration_arg: int

    def calibrate(self, repeat: int = 3) -> float:
        """Seconds per unit of relative cost, measured on this machine (best of ``repeat``)."""
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            self.func(self.calibration_arg)
            best = min(best, time.perf_counter() - start)
        return best / self.relative_cost(self.calibration_arg)


REGISTRY: dict[str, Task] = {
    "fib": Task(name="fib", func=fib, relative_cost=lambda n: PHI**n, calibration_arg=20),
}
