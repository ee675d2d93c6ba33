"""Adaptive micro-batching: several cheap computations in one Dask task, as a pure state machine.

Every Dask task costs the scheduler the same bookkeeping (about 1 ms of its CPU here) whether it
computes for a millisecond or a minute. For cheap computations that bookkeeping, not the workers,
limits throughput; Ray Serve's ``@serve.batch`` and Triton's dynamic batching answer it by running
several requests in one call. A batch runs its members one after another on one worker thread, so
it is only worth forming when no thread would have run them in parallel anyway.

A computation is batched only when all of these hold (``Batcher.batches``):

* batching is on (``BATCH_MAX_SIZE`` > 1) and the cell has worker threads;
* it is cheap: twice its estimated cost fits in ``BATCH_MAX_COST`` (so a batch holds at least two);
* the cell's Dask tasks in flight are at least its worker threads: every thread is busy, so a
  separate task would only queue on the scheduler. With an idle thread it is submitted alone at
  once: batching must never serialise work that idle workers could run in parallel.

A pending batch is sent (``Batcher.add`` / ``freed`` / ``due`` return it) when it is full
(``BATCH_MAX_SIZE``), when one more member would exceed ``BATCH_MAX_COST`` seconds of work, when a
task of the cell finishes and leaves a thread free, or ``BATCH_LINGER`` seconds after its first
member arrived. Each member stays a computation of its own in ``service.inflight`` (admission,
coalescing and release are unchanged); ``remove`` takes back a member whose last waiter left
before the batch was sent.

No asyncio and no clock here: the backend passes ``now`` in and carries out what it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchLimits:
    """The batching settings (from ``service.config.Settings``)."""

    max_size: int = 16
    max_cost: float = 0.025  # seconds of estimated worker time in one batch
    linger: float = 0.02  # seconds the first member of a batch may wait for others


@dataclass
class Batch(Generic[T]):
    """Members waiting to be sent as one Dask task, and their summed estimated cost."""

    members: list[T] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    since: float = 0.0  # when the first member arrived

    @property
    def cost(self) -> float:
        return sum(self.costs)

    def __len__(self) -> int:
        return len(self.members)


class Batcher(Generic[T]):
    """One cell's pending batch; ``T`` is whatever the backend tracks a member by."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.pending: Batch[T] = Batch()

    def batches(self, cost: float, threads: int, tasks_in_flight: int) -> bool:
        """Should a computation of estimated ``cost`` seconds wait in a batch (see the module docstring)?"""
        limits = self.limits
        return (
            limits.max_size > 1
            and threads > 0
            and 2 * cost <= limits.max_cost
            and tasks_in_flight >= threads
        )

    def add(self, member: T, cost: float, now: float) -> list[Batch[T]]:
        """Add a member; the batches to send now (none, the pending one, or it and a full new one)."""
        ready: list[Batch[T]] = []
        if self.pending.members and self.pending.cost + cost > self.limits.max_cost:
            ready.append(self._take())
        if not self.pending.members:
            self.pending.since = now
        self.pending.members.append(member)
        self.pending.costs.append(cost)
        if len(self.pending) >= self.limits.max_size or self.pending.cost >= self.limits.max_cost:
            ready.append(self._take())
        return ready

    def remove(self, member: T) -> bool:
        """Take back a member not sent yet (its last waiter left). False if it was not pending."""
        for i, pending in enumerate(self.pending.members):
            if pending is member:
                del self.pending.members[i], self.pending.costs[i]
                return True
        return False

    def freed(self, threads: int, tasks_in_flight: int) -> Batch[T] | None:
        """A task of the cell finished: with a thread free, the pending batch goes now."""
        if self.pending.members and tasks_in_flight < threads:
            return self._take()
        return None

    def deadline(self) -> float | None:
        """When the pending batch must be sent at the latest (None: nothing pending)."""
        return self.pending.since + self.limits.linger if self.pending.members else None

    def due(self, now: float) -> Batch[T] | None:
        """The pending batch, if it has waited ``linger`` seconds."""
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            return self._take()
        return None

    def flush(self) -> Batch[T] | None:
        """Whatever is pending, now (e.g. the cell lost its workers)."""
        return self._take() if self.pending.members else None

    def _take(self) -> Batch[T]:
        batch, self.pending = self.pending, Batch()
        return batch
