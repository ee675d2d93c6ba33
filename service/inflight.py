"""The computations in flight and every decision about them, as a pure state machine.

No Dask, no asyncio, no clock: the backend feeds in what it knows (the request's key and estimated
cost, the cluster's capacity) and carries out the decision it gets back. This is how distributed's
own scheduler is built and tested: the decisions are unit-tested in milliseconds, including the
races that a real cluster reaches only by luck (the last waiter leaves as the result arrives, a
timeout and a disconnect at once, admission exactly at the limit).

A request meets the decisions in this order (``InFlight.decide``):

1. cheaper than a round trip to a worker -> ``Inline`` (computed in the API process);
2. an identical computation is in flight -> ``Join`` (coalescing, reference-counted);
3. no scheduler -> ``Reject("scheduler_unreachable")``;
4. no workers -> ``Admit`` while fewer than ``cold_start_queue`` computations wait for the
   autoscaler to start one (scale from zero), else ``Reject("no_workers")``;
5. ``max_in_flight`` distinct computations already -> ``Reject("overloaded")``;
6. the queue ahead, drained by the cluster's threads, plus this computation would not finish
   within ``min(max_queue_wait, request_timeout)`` -> ``Reject("overloaded")`` with the Retry-After
   after which it would;
7. otherwise ``Admit``: the caller submits it to Dask with ``Computation.priority`` (shortest job
   first) and must eventually call ``finish``.

A waiter that stops waiting (timeout, client disconnect) calls ``leave``; only the last one to
leave a computation that has not finished gets ``True``: release it on the cluster.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """The admission settings (from ``service.config.Settings``)."""

    inline_max_cost: float = 0.0005
    max_queue_wait: float = 10.0
    request_timeout: float = 30.0
    max_in_flight: int = 1000
    retry_after: int = 1
    coalesce: bool = True
    cold_start_queue: int = 0

    @property
    def queue_limit(self) -> float:
        """Seconds of estimated waiting plus computing that a request may be admitted with."""
        return min(self.max_queue_wait, self.request_timeout)


@dataclass(frozen=True)
class Capacity:
    """What the API knows of the cluster right now."""

    connected: bool
    workers: int = 0
    threads: int = 0
    scheduler: str | None = None  # for messages only


class Phase(enum.Enum):
    RUNNING = "running"  # submitted, somebody waits for it
    FINISHED = "finished"  # a result or an error arrived
    RELEASED = "released"  # the last waiter left before it finished


@dataclass(eq=False)
class Computation:
    """One distinct computation and the requests waiting for it."""

    key: Hashable
    cost: float  # estimated seconds of worker time
    waiters: int = 1
    phase: Phase = Phase.RUNNING
    # Whatever the backend uses to carry it out (its asyncio task): opaque here.
    handle: object = field(default=None, repr=False)

    @property
    def priority(self) -> int:
        """Dask priority (higher runs first): the cheapest queued computation runs first."""
        return -round(self.cost * 1e6)


@dataclass(frozen=True)
class Inline:
    """Compute it in the API process; nothing is tracked."""


@dataclass(frozen=True)
class Reject:
    reason: str  # the label of compute_api_rejected_requests_total
    detail: str
    retry_after: int


@dataclass(frozen=True)
class Admit:
    """A new computation: submit it."""

    computation: Computation


@dataclass(frozen=True)
class Join:
    """An identical computation is in flight: wait for it too."""

    computation: Computation


Decision = Inline | Reject | Admit | Join


class InFlight:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running: set[Computation] = set()
        self.queued_cost = 0.0  # estimated worker-seconds of everything running or queued
        self._by_key: dict[Hashable, Computation] = {}

    def __len__(self) -> int:
        return len(self.running)

    def __contains__(self, key: Hashable) -> bool:
        """An identical computation is in flight here (and would be joined)."""
        return key in self._by_key

    def serves(self, capacity: Capacity) -> bool:
        """Can a request be computed now (readiness)? With a cold-start queue, zero workers can."""
        return capacity.connected and (capacity.threads > 0 or self.limits.cold_start_queue > 0)

    def decide(self, key: Hashable, local_cost: float, cost: float, capacity: Capacity) -> Decision:
        """Decide for one request (see the module docstring for the order)."""
        limits = self.limits
        if local_cost <= limits.inline_max_cost:
            return Inline()
        if limits.coalesce and (joined := self._by_key.get(key)) is not None:
            joined.waiters += 1
            return Join(joined)
        if not capacity.connected:
            return Reject(
                "scheduler_unreachable", f"Dask scheduler {capacity.scheduler} is not reachable", limits.retry_after
            )
        if capacity.threads == 0:
            if len(self.running) >= limits.cold_start_queue:
                detail = "the Dask cluster has no workers"
                if limits.cold_start_queue:
                    detail += f" and {len(self.running)} computations already wait for one to start"
                return Reject("no_workers", detail, limits.retry_after)
            return self._admit(key, cost)
        if len(self.running) >= limits.max_in_flight:
            return Reject(
                "overloaded", f"{len(self.running)} computations in flight (MAX_IN_FLIGHT)", limits.retry_after
            )
        # The queue drains at `threads` worker-seconds per second. A computation that would not
        # finish in time is refused now rather than after making its client wait. An idle cluster
        # takes anything (FIB_MAX_N bounds what one request can ask for).
        wait = self.queued_cost / capacity.threads
        if self.running and wait + cost > limits.queue_limit:
            return Reject(
                "overloaded",
                f"estimated queue wait {wait:.1f}s exceeds {limits.queue_limit:.1f}s",
                max(limits.retry_after, math.ceil(wait + cost - limits.queue_limit)),
            )
        return self._admit(key, cost)

    def _admit(self, key: Hashable, cost: float) -> Admit:
        computation = Computation(key=key, cost=cost)
        self.running.add(computation)
        self.queued_cost += cost
        if self.limits.coalesce:
            self._by_key[key] = computation
        return Admit(computation)

    def finish(self, computation: Computation) -> None:
        """A result (or an error) arrived. Idempotent, and a no-op after ``leave`` released it."""
        if computation.phase is Phase.RUNNING:
            computation.phase = Phase.FINISHED
            self._forget(computation)

    def leave(self, computation: Computation) -> bool:
        """One waiter stops waiting. True: it was the last one and nothing finished, release it."""
        computation.waiters -= 1
        if computation.waiters > 0 or computation.phase is not Phase.RUNNING:
            return False
        computation.phase = Phase.RELEASED
        self._forget(computation)
        return True

    def transfer(self, computation: Computation, other: InFlight) -> None:
        """Move a running computation, its waiters and its cost, to another table (failover to
        another cell). Identical requests then join it there."""
        assert computation.phase is Phase.RUNNING and computation in self.running
        self._forget(computation)
        other.running.add(computation)
        other.queued_cost += computation.cost
        if other.limits.coalesce and computation.key not in other._by_key:
            other._by_key[computation.key] = computation

    def _forget(self, computation: Computation) -> None:
        self.running.discard(computation)
        self.queued_cost = max(0.0, self.queued_cost - computation.cost)
        if self._by_key.get(computation.key) is computation:
            del self._by_key[computation.key]
