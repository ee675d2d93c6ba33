"""How long a computation will take on a worker: calibrated here, corrected by what workers report.

The API measures each compute function once at start-up (seconds per unit of its relative cost,
in this process), then learns from every finished task how much slower or faster the workers
really are: nice levels, CPU contention and different hardware all change it. The estimate drives
three decisions in ``service.inflight``: run trivial work inline, shortest job first, and refuse
work that cannot finish in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# How much one finished task moves the learnt speed: a few tasks follow a real change (a worker
# now shares its core), one outlier (a GC pause, a page fault storm) does not swing admission.
SPEED_SMOOTHING = 0.3

# A single measurement is believed only within these ratios of the local estimate: a task that
# took 0 s (clock granularity) or 1,000x (the worker was suspended) must not poison the model.
MIN_SPEED_RATIO = 0.02
MAX_SPEED_RATIO = 50.0


@dataclass
class CostModel:
    """Seconds of worker time for one compute function's argument."""

    relative_cost: Callable[[Any], float]  # proportional to the run time
    unit: float  # seconds per unit of relative cost in this process (calibrated)
    speed: float = 1.0  # worker seconds per local second, learnt

    def local(self, arg: Any) -> float:
        """Estimated seconds in this process (the inline decision: is it cheaper than a round trip?)."""
        return self.relative_cost(arg) * self.unit

    def estimate(self, arg: Any) -> float:
        """Estimated seconds on a worker (priority and admission)."""
        return self.local(arg) * self.speed

    def learn(self, arg: Any, seconds: float) -> None:
        """A worker reports that ``arg`` took ``seconds``."""
        local = self.local(arg)
        if local <= 0:
            return
        ratio = min(MAX_SPEED_RATIO, max(MIN_SPEED_RATIO, seconds / local))
        self.speed += SPEED_SMOOTHING * (ratio - self.speed)
