"""The built-in compute functions; your own live in your package (COMPUTE_TASKS, see the README).

This module is imported by the API, the Dask scheduler (which unpickles task graphs) and every
Dask worker, from the same image. Keep it small and free of heavy imports.

Only declared functions (``service.functions.declare``) are ever submitted to the cluster, and only
with arguments the API has validated against the declaration: the scheduler port executes whatever
it is sent, so the API must never become a way to ship arbitrary callables.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

from pydantic import Field

from service.functions import Function, Registry, declare, timed

__all__ = ["PHI", "REGISTRY", "Function", "Task", "derive", "fib", "timed"]

# Growth rate of naive fib's call tree: calls(n) ~ phi ** n.
PHI = (1 + math.sqrt(5)) / 2

# The old name of a declared function (tests and code written before service.functions).
Task = Function


@declare(cost=lambda n: PHI**n, calibration={"n": 20}, examples=[{"n": 20}, {"n": 25}])
def fib(n: Annotated[int, Field(ge=0, le=90, description="the index; at most FIB_MAX_N")]) -> int:
    """Naive recursive Fibonacci: deliberately exponential, a stand-in for model inference."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


# sha512's compression function processes twice the block size for roughly twice sha256's time.
HASH_COST = {"sha256": 1.0, "sha512": 2.0}


@declare(
    cost=lambda iterations, hash, **_: iterations * HASH_COST[hash],
    calibration={"text": "calibration", "salt": "salt", "iterations": 20_000},
    examples=[{"text": "correct horse", "salt": "battery staple", "iterations": 100_000},
              {"text": "hunter2", "salt": "pepper", "iterations": 50_000, "hash": "sha512", "length": 64}],
)
def derive(
    text: Annotated[str, Field(min_length=1, max_length=1024, description="the secret")],
    salt: Annotated[str, Field(min_length=1, max_length=256)],
    iterations: Annotated[int, Field(ge=1, le=500_000)] = 100_000,
    hash: Literal["sha256", "sha512"] = "sha256",  # noqa: A002 - the parameter's public name
    length: Annotated[int, Field(ge=16, le=64, description="bytes of key")] = 32,
) -> str:
    """PBKDF2-HMAC key derivation (hashlib releases the GIL: a worker's threads all compute)."""
    return hashlib.pbkdf2_hmac(hash, text.encode(), salt.encode(), iterations, dklen=length).hex()


REGISTRY: Registry = Registry.load()
