"""Load shapes chosen by name with ``--shape`` (the locustfile's ``NamedShape`` dispatches here).

Kept free of Locust imports (importing locust monkey-patches the process with gevent), so the
plans can be tested on their own. Every shape reads Locust's common options: ``--users`` is the
peak, ``--spawn-rate`` the ramp speed and ``--run-time`` the length of the whole shape, so one
mental model covers all of them and the web UI's fields keep working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Tick = tuple[int, float]
# (elapsed s, duration s, peak users, spawn rate, step count) -> users and spawn rate now
Plan = Callable[[float, float, int, float, int], Tick]


def _steady(elapsed: float, duration: float, peak: int, rate: float, steps: int) -> Tick:
    return peak, rate


def _step(elapsed: float, duration: float, peak: int, rate: float, steps: int) -> Tick:
    # Equal-length stages climbing to the peak: where latency bends shows the capacity.
    stage = min(int(elapsed / (duration / steps)), steps - 1)
    return max(1, math.ceil(peak * (stage + 1) / steps)), rate


def _spike(elapsed: float, duration: float, peak: int, rate: float, steps: int) -> Tick:
    # Baseline, then the whole peak within about a second, then back: admission control and the
    # autoscaler both see a burst they could not anticipate.
    baseline = max(1, peak // 5)
    if 0.4 * duration <= elapsed < 0.6 * duration:
        return peak, max(rate, float(peak))
    return baseline, max(rate, float(peak))


def _scaleout(elapsed: float, duration: float, peak: int, rate: float, steps: int) -> Tick:
    # Slow ramp (a quarter of the run), long hold (half) so the DaskAutoscaler (5 s polls, 15 s
    # cool-down) adds workers, then a quiet quarter to watch it retire them again.
    if elapsed < 0.25 * duration:
        return max(1, math.ceil(peak * elapsed / (0.25 * duration))), rate
    if elapsed < 0.75 * duration:
        return peak, rate
    return 1, rate


PLANS: dict[str, Plan] = {"steady": _steady, "step": _step, "spike": _spike, "scaleout": _scaleout}
# Length of each shape when --run-time is not given.
DEFAULT_DURATION_S: dict[str, float] = {"steady": 60, "step": 120, "spike": 90, "scaleout": 600}


def shape_tick(name: str, elapsed: float, options: Any) -> Tick | None:
    """Users and spawn rate for shape ``name`` after ``elapsed`` seconds; None once it is over.

    ``options`` are Locust's parsed options: ``--users`` is the peak, ``--spawn-rate`` the ramp
    speed, ``--run-time`` (or the shape's default length) the length of the whole shape.
    """
    duration = float(options.run_time or DEFAULT_DURATION_S[name])
    if elapsed >= duration:
        return None
    return PLANS[name](elapsed, duration, int(options.num_users or 1), float(options.spawn_rate or 1),
                       max(1, int(options.shape_steps)))
