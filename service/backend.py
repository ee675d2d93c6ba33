"""The only code that talks to Dask: cluster, client, submit, coalescing, admission, reconnect.

Failure model, in the order a request meets it:

* the scheduler is unreachable (never connected, connection lost, or distributed gave up after
  ``distributed.comm.timeouts.connect`` and closed its Client for good) -> ``Unavailable`` at once;
  a supervisor task keeps building new Clients until the scheduler is back;
* the scheduler has no workers -> ``Unavailable`` at once (a queued task would wait forever);
* the estimated queued work cannot finish in time -> ``Unavailable`` (admission control);
* the computation takes longer than the request timeout -> ``ComputeTimeout``;
* the task itself fails (e.g. ``KilledWorker`` after ``allowed-failures``) -> ``ComputeFailed``.

Identical in-flight requests share one computation (reference-counted): a computation is released
on the cluster only when the last request waiting for it has gone away, never by one client's
disconnect. Dask's own key sharing is not used for this (``pure=False``) because cancelling one
shared Dask future cancels it for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import dask.config
import yaml
from distributed import Client, Future, WorkerPlugin
from distributed.client import FutureCancelledError
from distributed.deploy.spec import SpecCluster
from distributed.deploy.subprocess import SubprocessCluster

from service import tasks
from service.config import Settings
from service.metrics import Metrics

logger = logging.getLogger("compute_api.backend")

dask.config.update_defaults(yaml.safe_load(resources.files("service").joinpath("dask.yaml").read_text()))

# Seconds for the embedded cluster's worker processes to start and register.
EMBEDDED_START_TIMEOUT = 60

# How much each finished task moves the estimate of how fast the workers really are.
SPEED_SMOOTHING = 0.3


class Unavailable(Exception):
    """The cluster cannot take this request now; answer 503 with Retry-After."""

    def __init__(self, reason: str, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class ComputeTimeout(Exception):
    """The computation did not finish within the request timeout."""


class ComputeFailed(Exception):
    """The task raised, or killed every worker it ran on."""


class Abandoned(Exception):
    """The request stopped waiting (its client went away)."""


class LowerWorkerPriority(WorkerPlugin):
    """Renice an embedded worker so the API's event loop wins the CPU when both want it.

    Linux applies niceness per thread, so every existing thread of the worker process is reniced;
    threads started later (the task executor) inherit it from the thread that creates them.
    """

    name = "compute-api-renice"

    def __init__(self, nice: int) -> None:
        self.nice = nice

    def setup(self, worker: Any) -> None:
        try:
            thread_ids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:  # not Linux: the whole process is the unit
            thread_ids = [0]
        for tid in thread_ids:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)


@dataclass(frozen=True)
class Done:
    """A result that needed no cluster (computed inline)."""

    value: Any


@dataclass(eq=False)
class Computation:
    """One Dask task and the requests waiting for it."""

    key: tuple[str, int]
    cost: float  # estimated seconds of worker time
    future: Future
    driver: asyncio.Task[Any] = field(init=False)
    waiters: int = 0


class Backend:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Mapping[str, tasks.Task] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        # Only these functions can ever be submitted. Tests inject their own (e.g. a task that
        # kills its worker); production always uses tasks.REGISTRY.
        self.registry: Mapping[str, tasks.Task] = tasks.REGISTRY if registry is None else registry
        self.cluster: SpecCluster | None = None
        self.address: str | None = settings.scheduler_address
        self._client: Client | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Seconds per unit of each task's relative cost in this process, measured at start-up,
        # and how much slower (or faster) the workers turn out to be, learnt from every task.
        self._unit_cost: dict[str, float] = {}
        self._worker_speed: dict[str, float] = {}
        # Coalescing table: (task name, argument) -> computation in flight.
        self._shared: dict[tuple[str, int], Computation] = {}
        self._running: set[Computation] = set()
        self._queued_cost = 0.0
        # Background cancellations, kept referenced until done (asyncio holds only weak refs).
        self._background: set[asyncio.Task[Any]] = set()
        metrics.bind(
            in_flight=lambda: len(self._running),
            workers=lambda: self.workers,
            connected=lambda: float(self.ready),
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._unit_cost = {name: task.calibrate() for name, task in self.registry.items()}
        self._worker_speed = {name: 1.0 for name in self.registry}
        if self.settings.embedded:
            self.cluster = await self._start_embedded_cluster()
            self.address = self.cluster.scheduler_address
            await self._connect()
            # Worker subprocesses register on their own schedule; be ready only once they have.
            await self._client.wait_for_workers(self.settings.workers, timeout=EMBEDDED_START_TIMEOUT)  # type: ignore[union-attr]
            while self.workers < self.settings.workers:  # the Client's cached count lags a little
                await asyncio.sleep(0.05)
        else:
            try:
                await self._connect()
            except Exception as exc:  # start anyway: /readyz says 503 until the scheduler appears
                logger.warning("scheduler %s unreachable at start-up: %r", self.address, exc)
        self._supervisor = asyncio.create_task(self._supervise(), name="dask-supervisor")

    async def _start_embedded_cluster(self) -> SpecCluster:
        """Scheduler and nannies in subprocesses of their own, on loopback only, without a dashboard.

        Not a LocalCluster: that runs the scheduler and the nannies in this process, where their
        periodic work (system and memory monitors) would share the event loop that serves HTTP.
        The scheduler port runs whatever pickles it receives, hence loopback only.
        """
        watchdog = ["service.watchdog"]  # they exit if this process dies without closing them
        # The subprocesses get this process's Dask configuration (service/dask.yaml + DASK_*), the
        # way distributed's SSHCluster hands it to remote processes.
        os.environ["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(dask.config.global_config)
        return await SubprocessCluster(
            host="127.0.0.1",
            n_workers=self.settings.workers,
            threads_per_worker=1,
            dashboard_address=None,
            # The scheduler always serves its HTTP routes (health, metrics); without an address
            # it would take port 8787 and collide with a real dashboard on the same machine.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "preload": watchdog},
            worker_kwargs={"preload_nanny": watchdog},
            asynchronous=True,
        )

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for computation in list(self._running):
            computation.driver.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.connect_timeout)
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None

    async def _connect(self) -> None:
        client = Client(
            self.address,
            asynchronous=True,
            timeout=self.settings.connect_timeout,
            set_as_default=False,
            name="compute-api",
        )
        try:
            await client
            if self.settings.embedded:
                await client.register_plugin(LowerWorkerPriority(self.settings.worker_nice))
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close(timeout=self.settings.connect_timeout)
            raise
        old, self._client = self._client, client
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(timeout=self.settings.connect_timeout)
        logger.info("connected to scheduler %s", self.address)

    async def _supervise(self) -> None:
        """Replace a Client that distributed has closed for good (outage > its connect timeout).

        While the Client is merely "connecting", distributed is retrying by itself; interfering
        then would only race it.
        """
        while True:
            await asyncio.sleep(self.settings.reconnect_interval)
            client = self._client
            if client is not None and client.status not in ("closed", "closing", "failed"):
                continue
            try:
                await self._connect()
            except Exception as exc:
                logger.debug("reconnect to %s failed: %r", self.address, exc)

    # -- state -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._client is not None and self._client.status == "running"

    def _scheduler_info(self, key: str) -> int:
        # The Client refreshes this cache every distributed.client.scheduler-info-interval.
        if not self.ready:
            return 0
        return int(self._client.scheduler_info().get(key, 0))  # type: ignore[union-attr]

    @property
    def workers(self) -> int:
        return self._scheduler_info("n_workers")

    @property
    def threads(self) -> int:
        return self._scheduler_info("total_threads")

    def estimate(self, name: str, arg: int) -> float:
        """Estimated seconds for ``name(arg)`` in this process."""
        return self.registry[name].relative_cost(arg) * self._unit_cost[name]

    # -- compute -----------------------------------------------------------------------------

    def submit(self, name: str, arg: int) -> Done | Computation:
        """Start ``name(arg)`` (a registered task, a validated argument) without waiting.

        Returns the result when it was cheap enough to compute inline, otherwise the computation
        (new or joined) that the caller must ``await wait(...)`` next: this registers the caller
        as a waiter. Raises ``Unavailable`` at once when the cluster cannot take the work, before
        anything was queued.
        """
        task = self.registry[name]  # KeyError: only registered functions can ever be submitted
        local_cost = self.estimate(name, arg)
        if local_cost <= self.settings.inline_max_cost:
            # Cheaper than the round trip to a worker: the event loop barely notices it.
            self.metrics.computations.labels("inline").inc()
            return Done(task.func(arg))
        computation = self._shared.get((name, arg)) if self.settings.coalesce else None
        if computation is None:
            computation = self._submit(task, arg, local_cost * self._worker_speed[name])
        else:
            self.metrics.coalesced.inc()
        computation.waiters += 1
        return computation

    def _unavailable(self, reason: str, detail: str, retry_after: int | None = None) -> Unavailable:
        self.metrics.rejected.labels(reason).inc()
        return Unavailable(reason, detail, retry_after or self.settings.retry_after)

    def _submit(self, task: tasks.Task, arg: int, cost: float) -> Computation:
        client = self._client
        if client is None or client.status != "running":
            raise self._unavailable("scheduler_unreachable", f"Dask scheduler {self.address} is not reachable")
        threads = self.threads
        if threads == 0:
            raise self._unavailable("no_workers", "the Dask cluster has no workers")
        if len(self._running) >= self.settings.max_in_flight:
            raise self._unavailable("overloaded", "too many computations in flight")
        # Admission control: the queue drains at `threads` worker-seconds per second. If this job
        # would not finish in time, say so now rather than after making the client wait.
        wait = self._queued_cost / threads
        limit = min(self.settings.max_queue_wait, self.settings.request_timeout)
        if self._running and wait + cost > limit:
            raise self._unavailable(
                "overloaded",
                f"estimated queue wait {wait:.1f}s exceeds {limit:.1f}s",
                retry_after=max(1, math.ceil(wait + cost - limit)),
            )
        key = (task.name, arg)
        future = client.submit(
            tasks.timed,
            task.func,
            arg,
            key=f"{task.name}-{arg}-{uuid.uuid4().hex}",
            pure=False,
            # Shortest job first: a cheap request never queues behind an expensive one.
            priority=-round(cost * 1e6),
        )
        computation = Computation(key=key, cost=cost, future=future)
        computation.driver = asyncio.ensure_future(self._drive(computation))
        self._running.add(computation)
        self._queued_cost += cost
        if self.settings.coalesce:
            self._shared[key] = computation
        self.metrics.computations.labels("dask").inc()
        return computation

    async def _drive(self, computation: Computation) -> Any:
        try:
            value, seconds = await computation.future
        except FutureCancelledError as exc:
            # Not our own cancel (that cancels this coroutine instead): the Client cancels every
            # pending future when it loses the scheduler.
            raise self._unavailable("scheduler_lost", f"lost the Dask scheduler: {exc.reason}") from None
        except OSError as exc:  # includes CommClosedError while gathering the result
            raise self._unavailable("scheduler_lost", f"lost the Dask scheduler: {exc!r}") from None
        except Exception as exc:
            raise ComputeFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._forget(computation)
        self._learn_speed(computation.key[0], computation.key[1], seconds)
        return value

    def _learn_speed(self, name: str, arg: int, seconds: float) -> None:
        ratio = min(50.0, max(0.02, seconds / self.estimate(name, arg)))
        self._worker_speed[name] += SPEED_SMOOTHING * (ratio - self._worker_speed[name])

    def _forget(self, computation: Computation) -> None:
        if computation in self._running:
            self._running.discard(computation)
            self._queued_cost = max(0.0, self._queued_cost - computation.cost)
        if self._shared.get(computation.key) is computation:
            del self._shared[computation.key]

    async def wait(self, computation: Computation, abandoned: asyncio.Future[Any] | None = None) -> Any:
        """Wait for a computation from ``submit``; give up on timeout or when ``abandoned`` resolves.

        The last waiter to give up releases the computation on the cluster.
        """
        watchers: set[asyncio.Future[Any]] = {computation.driver}
        if abandoned is not None:
            watchers.add(abandoned)
        try:
            await asyncio.wait(watchers, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            if computation.driver.done():
                return computation.driver.result()
            if abandoned is not None and abandoned.done():
                raise Abandoned
            raise ComputeTimeout(f"no result within REQUEST_TIMEOUT={self.settings.request_timeout:g}s")
        finally:
            computation.waiters -= 1
            if computation.waiters == 0 and not computation.driver.done():
                self._release(computation)

    def _release(self, computation: Computation) -> None:
        """Nobody waits any more (disconnect or timeout): free the worker slot it would take."""
        self._forget(computation)
        computation.driver.cancel()
        self.metrics.released.inc()
        if computation.future.done():  # finished meanwhile: nothing left to cancel on the cluster
            return
        cancel = asyncio.ensure_future(self._cancel(computation.future))
        self._background.add(cancel)
        cancel.add_done_callback(self._background.discard)

    async def _cancel(self, future: Future) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(future.cancel(reason="compute-api: no request waits"), self.settings.connect_timeout)
