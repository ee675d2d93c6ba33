"""Test-only compute function that kills every Dask worker it lands on.

It is importable by scheduler and workers when ``tests/`` is on their ``PYTHONPATH``, and reachable
over HTTP only through ``create_app(registry={"fib": KILLER})``: production's registry never holds it.
"""

from __future__ import annotations

import os
from typing import Annotated

from distributed import get_worker
from lookalike import fib_like
from pydantic import Field

from service.tasks import fib


def fib_or_die(n: Annotated[int, Field(ge=0, le=90)]) -> int:
    """On a Dask worker: hard-exit the worker process. Anywhere else: fib(n)."""
    try:
        get_worker()
    except ValueError:
        # The API calibrates every registered task in its own process at start-up: survive that.
        return fib(n)
    os._exit(1)  # like a segfault or the OOM killer: no exception, no clean shutdown


KILLER = fib_like(fib_or_die)
