"""Work sized from this machine, not from a guess.

Tests that need a computation to still be running when something happens (a kill, a hang-up, a
SIGTERM) ask for one that lasts long enough *here*: fib's run time is measured once per test
process and n is chosen from it. A machine twice as fast gets an n one or two larger, and the
test's verdict does not change.

The one reference for fib's values is ``KNOWN_FIB_VALUES`` (locustfiles/workload.py, written out
by hand): tests, Locust and the load drivers all check answers against it.
"""

from __future__ import annotations

import functools
import math
import time

from workload import KNOWN_FIB_VALUES

from service.tasks import PHI, fib

CALIBRATION_N = 24


@functools.cache
def fib_seconds_per_call() -> float:
    """Seconds for one unit of fib's cost (PHI ** n) in this process: best of 3 runs of fib(24)."""
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fib(CALIBRATION_N)
        best = min(best, time.perf_counter() - start)
    return best / PHI**CALIBRATION_N


def fib_estimate(n: int) -> float:
    """Estimated seconds for fib(n) on an idle core of this machine."""
    return fib_seconds_per_call() * PHI**n


def fib_n_lasting(seconds: float, *, limit: int = len(KNOWN_FIB_VALUES) - 1) -> int:
    """The smallest n whose fib(n) lasts at least ``seconds`` here (workers are only slower: niced, shared)."""
    n = max(0, math.ceil(math.log(seconds / fib_seconds_per_call(), PHI)))
    if n > limit:
        raise ValueError(f"this machine needs fib({n}) to last {seconds} s, above the limit {limit}")
    return n


def fib_value(n: int) -> int:
    return KNOWN_FIB_VALUES[n]
