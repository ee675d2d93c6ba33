"""Test-only stand-ins for fib: the same endpoint, price and calibration, with another body.

A test that swaps fib for a function that fails or kills its worker wants everything else unchanged:
the API must validate, price, place, batch and calibrate it exactly as the real fib, so the test
sees only what the new body does. Importable by the workers when ``tests/`` is on their
``PYTHONPATH`` (it imports nothing from tests/ or locustfiles/).
"""

from __future__ import annotations

from collections.abc import Callable

from service.functions import Function, build
from service.tasks import REGISTRY

FIB = REGISTRY["fib"]


def fib_like(func: Callable[[int], int]) -> Function:
    """``func`` served as "fib", priced and calibrated by fib's own declaration (its examples aside:
    they would be computed with ``func``)."""
    return build(func, name=FIB.name, cost=FIB.cost, calibration=FIB.calibration)
