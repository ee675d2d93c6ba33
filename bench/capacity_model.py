"""The capacity model: measured CPU per request -> requests/s per process, and a sizing for a load;
and a worker's efficiency against a bare loop.

Pure arithmetic over what ``python -m bench.capacity`` measures, so the model is re-measured rather
than remembered, and unit-tested in milliseconds (tests/unit/test_capacity_model.py).

Each process (an API pod, a cell's scheduler, a worker) is given one core and loaded to
``headroom`` of it (70 % by default): the rest absorbs bursts, garbage collection and the noise of
neighbours, and keeps queues (so latency) short. A scheduler also pays a fixed housekeeping cost per
second (heartbeats, the Clients' polls) whether requests come or not; it comes off its budget first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HEADROOM = 0.70  # share of each process's core the model plans to use


@dataclass(frozen=True)
class Profile:
    """CPU milliseconds one request of a size costs each process (measured at a fixed rate)."""

    api_ms: float  # the API process: HTTP, admission, the Dask Client
    scheduler_ms: float  # the cell's scheduler, its idle housekeeping excluded
    worker_ms: float  # the workers (nanny included): the computation and its comms
    scheduler_idle_ms_per_s: float = 0.0  # the scheduler's housekeeping, paid per second

    def __post_init__(self) -> None:
        for name in ("api_ms", "scheduler_ms", "worker_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive CPU time per request, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Rates:
    """Requests/s of one size that one process (one core at ``headroom``) sustains."""

    api_pod: float
    scheduler: float  # = one cell's, given enough workers
    worker: float
    workers_per_cell: int  # workers that keep up with one saturated scheduler


@dataclass(frozen=True)
class Sizing:
    """Processes a target load needs, each on one core at ``headroom``."""

    api_replicas: int
    cells: int
    workers: int  # in all cells together
    workers_per_cell: int
    api_cores: float  # the CPU the load costs, before headroom
    scheduler_cores: float
    worker_cores: float


def _ceil(x: float) -> int:
    # 9.8 / 0.7 is 14.000000000000002 in floating point: a whole number of processes is not one more.
    return math.ceil(round(x, 9))


def rates(profile: Profile, headroom: float = HEADROOM) -> Rates:
    budget_ms = 1000 * headroom  # CPU ms per second one process may spend
    scheduler = max(budget_ms - profile.scheduler_idle_ms_per_s, 0.0) / profile.scheduler_ms
    worker = budget_ms / profile.worker_ms
    return Rates(budget_ms / profile.api_ms, scheduler, worker, max(1, _ceil(scheduler / worker)))


def capacity_model(
    measurements: Mapping[str, Profile], load: Mapping[str, float] | None = None, headroom: float = HEADROOM
) -> tuple[dict[str, Rates], Sizing | None]:
    """Per size, what one API pod, one scheduler (one cell) and one worker sustain; with ``load``
    (requests/s per size, a mix), how many of each it needs.

    A mix adds up CPU, not rates: 2,000 cheap/s and 200 heavy/s need the sum of their CPU seconds
    per second in each role. Cells are sized by their schedulers, workers by their CPU, and workers
    spread evenly over the cells.
    """
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
    per_size = {name: rates(profile, headroom) for name, profile in measurements.items()}
    if load is None:
        return per_size, None
    unknown = set(load) - set(measurements)
    if unknown:
        raise ValueError(f"no measurement for {sorted(unknown)}")
    api = sum(rate * measurements[name].api_ms for name, rate in load.items()) / 1000
    scheduler = sum(rate * measurements[name].scheduler_ms for name, rate in load.items()) / 1000
    worker = sum(rate * measurements[name].worker_ms for name, rate in load.items()) / 1000
    idle = max((p.scheduler_idle_ms_per_s for p in measurements.values()), default=0.0) / 1000
    if idle >= headroom:
        raise ValueError("the schedulers' housekeeping alone exceeds the headroom")
    cells = max(1, _ceil(scheduler / (headroom - idle)))
    workers = max(1, _ceil(worker / headroom))
    per_cell = _ceil(workers / cells)
    return per_size, Sizing(
        api_replicas=max(1, _ceil(api / headroom)),
        cells=cells,
        workers=per_cell * cells,
        workers_per_cell=per_cell,
        api_cores=api,
        scheduler_cores=scheduler,
        worker_cores=worker,
    )


@dataclass(frozen=True)
class Efficiency:
    """A worker's completed fib/s as a share of a bare loop's on the same core, per pair of rounds."""

    ratios: tuple[float, ...]  # one per worker round, in the order run
    median: float
    low: float
    high: float


def worker_efficiency(bare: Sequence[float], worker: Sequence[float]) -> Efficiency:
    """Rates of interleaved rounds bare, worker, bare, worker, ... (optionally ending with a bare
    round): each worker round over the mean of the bare rounds either side of it, or the one before
    it for a last worker round. The machine's speed drifts (up to 2x between runs here): comparing
    neighbours cancels the drift to first order, and the median of the pairs ignores a round that a
    neighbour's burst spoiled."""
    if not worker or len(bare) not in (len(worker), len(worker) + 1):
        raise ValueError(f"need interleaved rounds, got {len(bare)} bare and {len(worker)} worker")
    if not all(rate > 0 for rate in bare):
        raise ValueError(f"bare rates must be positive, got {list(bare)}")
    ratios = tuple(rate / statistics.fmean(bare[i:i + 2]) for i, rate in enumerate(worker))
    return Efficiency(ratios, statistics.median(ratios), min(ratios), max(ratios))
