"""What the three baselines share: the compute function and the command line.

The baselines deliberately do not import ``service``: they stand for code written without it.
``fib`` is kept identical to ``service.tasks.fib`` and to the notebook's, so every server does the
same work per request.
"""

from __future__ import annotations

import argparse
import os


def fib(n: int) -> int:
    """Naive recursive Fibonacci: deliberately exponential, a stand-in for model inference."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="compute processes (ignored by the blocking server)"
    )
    return parser.parse_args()
