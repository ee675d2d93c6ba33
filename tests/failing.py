"""Test-only compute function that fails for odd arguments on a Dask worker.

Importable by the workers when ``tests/`` is on their ``PYTHONPATH``, and reachable over HTTP only
through ``create_app(registry={"fib": FAILING})``: production's registry never holds it.
"""

from __future__ import annotations

from typing import Annotated

from distributed import get_worker
from lookalike import fib_like
from pydantic import Field

from service.tasks import fib


def fib_or_fail(n: Annotated[int, Field(ge=0, le=90)]) -> int:
    """On a Dask worker: fib(n) for even n, ValueError for odd n. Anywhere else (calibration): fib(n)."""
    try:
        get_worker()
    except ValueError:
        return fib(n)
    if n % 2:
        raise ValueError(f"odd argument {n}")
    return fib(n)


FAILING = fib_like(fib_or_fail)
