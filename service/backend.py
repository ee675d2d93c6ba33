"""The backend: a request for ``name(arg)`` in, its value (or a precise failure) out.

It wires five parts, each in a module of its own: ``service.inflight`` decides admission and
coalescing (pure state machine), ``service.cells`` places each request on one of several
independent Dask clusters ("cells", one or more; pure), ``service.connection`` talks to one
scheduler, ``service.embedded`` runs ``make run``'s clusters. Cheap computations skip the
scheduler's per-task bookkeeping: ``service.direct`` sends one straight to a free worker thread
(pure choice of the worker), and ``service.batching`` decides when several share one Dask task
while every thread is busy (pure). Each stays a computation of its own here.

Failure model, in the order a request meets it (with several cells, each decision is a cell's; a
request is refused only when no cell can take it):

* the scheduler is unreachable (never connected, connection lost, or distributed gave up after
  ``distributed.comm.timeouts.connect`` and closed its Client for good) -> ``Unavailable`` at once;
  a supervisor task keeps building new Clients until the scheduler is back;
* the scheduler has no workers -> ``Unavailable`` at once (a queued task would wait for nothing),
  decided on the scheduler's own answer, not on the Client's cache that may predate the workers;
  with ``COLD_START_QUEUE`` a bounded number of computations is admitted instead and waits for the
  autoscaler to start a worker (scale from zero);
* the estimated queued work cannot finish in time -> ``Unavailable`` (admission control);
* a worker taking a direct call is lost, retiring or without ``service.direct`` -> the computation
  runs as a Dask task of the same cell instead, and that worker takes no direct call while listed;
* the scheduler is lost while the computation is in flight -> the computation runs again on another
  cell that can serve (compute functions are pure), else ``Unavailable`` at once;
* the computation takes longer than the request timeout -> ``ComputeTimeout``;
* the task itself fails (e.g. ``KilledWorker`` after ``allowed-failures``) -> ``ComputeFailed``;
* the client goes away -> ``Abandoned``.

Identical in-flight requests share one computation (reference-counted): a computation is released
on the cluster only when the last request waiting for it has gone away, never by one client's
disconnect.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import dask.config
import yaml
from distributed import Client

from service import functions, tasks
from service.batching import Batch, Batcher, BatchLimits
from service.cells import Cell, computation_key, failover, place
from service.config import Settings
from service.connection import DirectRefused, SchedulerConnection
from service.cost import CostModel
from service.direct import Lane
from service.embedded import START_TIMEOUT, EmbeddedCluster, LowerWorkerPriority
from service.errors import Abandoned, ComputeFailed, ComputeTimeout, Unavailable
from service.inflight import Admit, Capacity, Computation, InFlight, Inline, Join, Limits, Reject
from service.metrics import CellReadings, Metrics

__all__ = ["Abandoned", "Backend", "ComputeFailed", "ComputeTimeout", "Unavailable"]

logger = logging.getLogger("compute_api.backend")

# Every Dask process's settings, then the API's own (see each file for why each is there and where).
for _name in ("dask.yaml", "dask-api.yaml"):
    dask.config.update_defaults(yaml.safe_load(resources.files("service").joinpath(_name).read_text()))


@dataclass(eq=False)
class _Member:
    """A computation waiting in a batch, and where its own outcome arrives."""

    arg: functions.Args
    computation: Computation
    outcome: asyncio.Future[tuple[Any, float]]
    run: asyncio.Future[None] | None = None  # its batch's run, once sent
    mates: list[_Member] = field(default_factory=list)  # its batch's members, once sent


def _settle(members: list[_Member], exc: Exception) -> None:
    """The whole batch failed (e.g. its scheduler was lost): every member still waiting gets ``exc``
    and fails over, or fails, on its own."""
    for member in members:
        if not member.outcome.done():
            member.outcome.set_exception(exc)


def limits(settings: Settings) -> Limits:
    return Limits(
        inline_max_cost=settings.inline_max_cost,
        max_queue_wait=settings.max_queue_wait,
        request_timeout=settings.request_timeout,
        max_in_flight=settings.max_in_flight,
        retry_after=settings.retry_after,
        coalesce=settings.coalesce,
        cold_start_queue=settings.cold_start_queue,
    )


def task_label(arg: functions.Args) -> str:
    """The readable middle of a Dask key: small integer arguments as they are ("fib-25-<uuid>"),
    anything else (user text) as a short digest, so keys stay short and free of odd characters."""
    if all(type(a) is int for a in arg) and len(arg) <= 4:
        return "-".join(map(str, arg))
    return hashlib.blake2b(repr(arg).encode(), digest_size=8).hexdigest()


class Backend:
    def __init__(
        self, settings: Settings, metrics: Metrics, registry: Mapping[str, functions.Function] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # Only these functions can ever be submitted: the built-ins and COMPUTE_TASKS's (the app
        # loads them), or a test's own (e.g. a task that kills its worker).
        self.registry: Mapping[str, functions.Function] = tasks.REGISTRY if registry is None else registry
        self.costs: dict[str, CostModel] = {}
        addresses = settings.cell_addresses
        workers = max(1, settings.workers // len(addresses))  # embedded: the cores, shared by the cells
        self.embedded = [EmbeddedCluster(workers, settings.worker_nice) for _ in addresses] if settings.embedded else []
        self.connections = [
            SchedulerConnection(
                address,
                connect_timeout=settings.connect_timeout,
                reconnect_interval=settings.reconnect_interval,
                retry_after=settings.retry_after,
                on_connect=self._renice_workers if settings.embedded else None,
                list_workers=settings.direct_max_cost > 0,  # DIRECT_MAX_COST=0: nobody needs the poll
            )
            for address in addresses
        ]
        self.cells = [
            Cell(address or f"cell-{i}", InFlight(limits(settings)), Capacity(False, scheduler=address))
            for i, address in enumerate(addresses)
        ]
        self._cell_of: dict[Computation, int] = {}  # which cell's table holds a running computation
        self.batch_limits = BatchLimits(settings.batch_max_size, settings.batch_max_cost, settings.batch_linger)
        # Per cell, then per function: a task's end looks at its own cell's batchers only.
        self._batchers: list[dict[str, Batcher[_Member]]] = [{} for _ in addresses]
        self._lingers: dict[tuple[int, str], asyncio.TimerHandle] = {}
        self._tasks = [0] * len(addresses)  # Dask tasks in flight per cell (a batch is one)
        self.lanes = [Lane() for _ in addresses]  # direct calls in flight per cell
        self._batch_runs: set[asyncio.Future[None]] = set()
        metrics.bind([
            CellReadings(
                in_flight=lambda cell=cell: float(len(cell.inflight)),
                workers=lambda connection=connection: float(connection.capacity().workers),
                connected=lambda connection=connection: float(connection.connected),
            )
            for cell, connection in zip(self.cells, self.connections, strict=True)
        ])

    @property
    def address(self) -> str | None:
        """The first cell's scheduler (the only one, unless there are several cells)."""
        return self.connections[0].address

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.costs = {name: CostModel(task.relative_cost, self._calibrate(task))
                      for name, task in self.registry.items()}
        if self.embedded:
            await asyncio.gather(*(cluster.start() for cluster in self.embedded))
            for cell, connection, cluster in zip(self.cells, self.connections, self.embedded, strict=True):
                connection.address = cell.name = cluster.address
                await connection.connect()
                # Worker subprocesses register on their own schedule: be ready only once they have.
                client = connection.client
                assert client is not None
                await client.wait_for_workers(len(cluster.cluster.workers), timeout=START_TIMEOUT)
        else:
            for connection in self.connections:
                try:
                    await connection.connect()
                except Exception as exc:  # start anyway: /readyz says 503 until a scheduler appears
                    logger.warning("scheduler %s unreachable at start-up: %r", connection.address, exc)
        for connection in self.connections:
            connection.supervise()

    @staticmethod
    def _calibrate(task: functions.Function) -> float:
        try:
            return task.calibrate()
        except Exception as exc:  # a user's function that fails on its own calibration arguments
            raise functions.RegistryError(
                f"compute function {task.name!r} ({task.module}) raised while calibrating on "
                f"{dict(task.calibration)!r}: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        for cell in self.cells:
            for computation in list(cell.inflight.running):
                if isinstance(computation.handle, asyncio.Task):
                    computation.handle.cancel()
        for run in list(self._batch_runs):
            run.cancel()
        for timer in self._lingers.values():
            timer.cancel()
        await asyncio.gather(*(connection.close() for connection in self.connections))
        await asyncio.gather(*(cluster.close() for cluster in self.embedded))

    async def _renice_workers(self, client: Client) -> None:
        await client.register_plugin(LowerWorkerPriority(self.settings.worker_nice))

    async def readiness(self) -> tuple[bool, list[tuple[bool, Capacity]]]:
        """Able to serve a computation now, and each cell's answer? Ready when one cell can serve;
        a cell whose cached answer is no is asked itself (its Client's cache may lag)."""
        answers = []
        for cell, connection in zip(self.cells, self.connections, strict=True):
            capacity = connection.capacity()
            if capacity.connected and not cell.inflight.serves(capacity):
                capacity = await connection.refresh()
            answers.append((cell.inflight.serves(capacity), capacity))
        return any(ready for ready, _ in answers), answers

    # -- compute -----------------------------------------------------------------------------

    async def compute(
        self, name: str, arg: functions.Args, disconnected: Callable[[], Awaitable[Any]] | None = None
    ) -> Any:
        """``name(*arg)`` for a declared function and arguments its ``validate`` returned.

        ``disconnected`` returns when the client has gone away: a request nobody waits for any
        more must release its computation instead of occupying a worker.
        """
        try:
            return await self._compute(name, arg, disconnected)
        except Unavailable as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            raise

    async def _compute(
        self, name: str, arg: functions.Args, disconnected: Callable[[], Awaitable[Any]] | None
    ) -> Any:
        task = self.registry[name]  # KeyError: only registered functions can ever be submitted
        cost = self.costs[name]
        key = computation_key(name, arg)
        self._observe_capacities()
        index, decision = place(key, cost.local(arg), cost.estimate(arg), self.cells)
        if isinstance(decision, Reject) and decision.reason == "no_workers":
            # The Clients' caches may predate the workers (they refresh every 0.5 s): ask the schedulers.
            for cell, capacity in zip(self.cells, await asyncio.gather(*(c.refresh() for c in self.connections)),
                                      strict=True):
                cell.capacity = capacity
            index, decision = place(key, cost.local(arg), cost.estimate(arg), self.cells)
        match decision:
            case Inline():
                # Cheaper than the round trip to a worker: the event loop barely notices it.
                self.metrics.computed(name, "inline")
                try:
                    return task.call(arg)
                except Exception as exc:  # as a worker's failure is reported: type and message
                    raise ComputeFailed(f"{type(exc).__name__}: {exc}") from exc
            case Reject(reason, detail, retry_after):
                raise Unavailable(reason, detail, retry_after)
            case Admit(computation):
                self._cell_of[computation] = index
                computation.handle = asyncio.ensure_future(self._run(task, arg, computation))
                self.metrics.computed(name, "cluster")
            case Join(computation):
                self.metrics.coalesced.inc()
        return await self._wait(computation, disconnected)

    def _observe_capacities(self) -> None:
        """What each cell's Client knows of its cluster, for the next placement decision."""
        for cell, connection in zip(self.cells, self.connections, strict=True):
            cell.capacity = connection.capacity()

    async def _run(self, task: functions.Function, arg: functions.Args, computation: Computation) -> Any:
        """Carry out one admitted computation (one asyncio task per computation): on its cell, or,
        when that cell loses its scheduler, on the next cell that can serve."""
        tried: set[int] = set()
        try:
            while True:
                index = self._cell_of[computation]
                tried.add(index)
                self.metrics.cell_computations.labels(str(index)).inc()
                try:
                    value, seconds = await self._execute(index, task, arg, computation)
                    break
                except Unavailable:
                    self._observe_capacities()
                    target = failover(computation, index, self.cells, tried)
                    if target is None:
                        raise
                    logger.info("cell %s lost: %s moves to %s", self.cells[index].name, computation.key,
                                self.cells[target].name)
                    self._cell_of[computation] = target
                    self.metrics.failovers.inc()
        finally:
            self.cells[self._cell_of.pop(computation)].inflight.finish(computation)
        self.costs[task.name].learn(arg, seconds)
        return value

    # -- direct calls (service.direct) and Dask tasks: one per computation or per batch --------

    def _busy(self, index: int) -> int:
        """Worker threads of cell ``index`` taken by this process: its Dask tasks and direct calls."""
        return self._tasks[index] + self.lanes[index].in_flight

    async def _execute(
        self, index: int, task: functions.Function, arg: functions.Args, computation: Computation
    ) -> tuple[Any, float]:
        """``(value, worker seconds)`` of one computation on cell ``index``: straight to a free worker
        thread when it is cheap; else in a Dask task of its own, or in a batch with other cheap ones
        while every worker thread of the cell is busy."""
        if computation.cost <= self.settings.direct_max_cost:
            lane = self.lanes[index]
            address = lane.pick(self.connections[index].workers, self._tasks[index])
            if address is not None:
                lane.start(address)
                try:
                    outcome = await self.connections[index].call(address, task.func, arg)
                    self.metrics.direct_calls.labels("answered").inc()
                    return outcome
                except ComputeFailed:
                    self.metrics.direct_calls.labels("answered").inc()
                    raise
                except DirectRefused as exc:  # the worker could not: a Dask task takes it (below)
                    if exc.busy:
                        self.metrics.direct_calls.labels("busy").inc()
                    else:
                        logger.info("direct call refused, submitting a Dask task: %s", exc)
                        lane.refuse(address)
                        self.metrics.direct_calls.labels("refused").inc()
                finally:
                    lane.finish(address)
                    self._thread_freed(index)
        batcher = self._batcher(index, task)
        if not batcher.batches(computation.cost, self.cells[index].capacity.threads, self._busy(index)):
            return await self._single(index, task, arg, computation)
        loop = asyncio.get_running_loop()
        member = _Member(arg, computation, loop.create_future())
        self._send(index, task, batcher.add(member, computation.cost, loop.time()))
        self._arm_linger(index, task)
        try:
            return await member.outcome
        except asyncio.CancelledError:
            # Released (its last waiter left) or shutting down: a pending member leaves its batch;
            # a sent batch runs on for its other members unless none of them waits any more.
            if not batcher.remove(member) and member.run is not None and all(m.outcome.done() for m in member.mates):
                member.run.cancel()
            raise

    def _batcher(self, index: int, task: functions.Function) -> Batcher[_Member]:
        # One per cell and function: a batch is one function over several arguments.
        batchers = self._batchers[index]
        batcher = batchers.get(task.name)
        if batcher is None:
            batcher = batchers[task.name] = Batcher(self.batch_limits)
        return batcher

    def _submit(self, index: int, func: Callable[..., Any], *args: Any, key: str, priority: int) -> Any:
        try:
            future = self.connections[index].submit(func, *args, key=key, priority=priority)
        except Exception as exc:  # the Client closed between the capacity check and now
            raise Unavailable("scheduler_unreachable", f"cannot submit: {exc!r}", self.settings.retry_after) from exc
        self._tasks[index] += 1
        self.metrics.dask_tasks.inc()
        return future

    async def _single(
        self, index: int, task: functions.Function, arg: functions.Args, computation: Computation
    ) -> tuple[Any, float]:
        key = f"{task.name}-{task_label(arg)}-{uuid.uuid4().hex}"
        # The function travels by reference (module and name): workers import it.
        future = self._submit(index, functions.timed, task.func, *arg, key=key, priority=computation.priority)
        try:
            return await self.connections[index].result(future)
        finally:
            self._tasks[index] -= 1
            self._thread_freed(index)

    def _send(self, index: int, task: functions.Function, batches: list[Batch[_Member]]) -> None:
        for batch in batches:
            if not batch.members:
                continue
            run = asyncio.ensure_future(self._run_batch(index, task, batch.members))
            self._batch_runs.add(run)
            run.add_done_callback(self._batch_runs.discard)
            for member in batch.members:
                member.run, member.mates = run, batch.members

    async def _run_batch(self, index: int, task: functions.Function, members: list[_Member]) -> None:
        """One Dask task for several computations; each member gets its own outcome."""
        self.metrics.batch_size.observe(len(members))
        key = f"{task.name}-batch-{uuid.uuid4().hex}"
        priority = max(member.computation.priority for member in members)  # its cheapest member's
        try:
            future = self._submit(index, functions.timed_batch, task.func, [m.arg for m in members], key=key,
                                  priority=priority)
        except Unavailable as exc:
            _settle(members, exc)
            return
        try:
            outcomes = await self.connections[index].result(future)
        except (Unavailable, ComputeFailed) as exc:  # the whole task failed: each member fails over or fails
            _settle(members, exc)
            return
        finally:
            self._tasks[index] -= 1
            self._thread_freed(index)
        for member, (ok, value, seconds) in zip(members, outcomes, strict=True):
            if not member.outcome.done():
                if ok:
                    member.outcome.set_result((value, seconds))
                else:
                    member.outcome.set_exception(ComputeFailed(f"{type(value).__name__}: {value}"))

    def _thread_freed(self, index: int) -> None:
        """A Dask task or direct call of cell ``index`` ended: a freed thread takes the pending batches now."""
        threads = self.cells[index].capacity.threads
        for name, batcher in self._batchers[index].items():
            if (batch := batcher.freed(threads, self._busy(index))) is not None:
                self._send(index, self.registry[name], [batch])

    def _arm_linger(self, index: int, task: functions.Function) -> None:
        deadline = self._batcher(index, task).deadline()
        if deadline is not None and (index, task.name) not in self._lingers:
            loop = asyncio.get_running_loop()
            self._lingers[(index, task.name)] = loop.call_at(deadline, self._linger_over, index, task)

    def _linger_over(self, index: int, task: functions.Function) -> None:
        del self._lingers[(index, task.name)]
        batch = self._batcher(index, task).due(asyncio.get_running_loop().time())
        if batch is not None:
            self._send(index, task, [batch])
        self._arm_linger(index, task)  # a newer pending batch has a later deadline

    async def _wait(self, computation: Computation, disconnected: Callable[[], Awaitable[Any]] | None) -> Any:
        run = computation.handle
        assert isinstance(run, asyncio.Task)
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            watched = {run} if gone is None else {run, gone}
            await asyncio.wait(watched, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                if run.cancelled():  # the service is shutting down
                    raise Unavailable("shutting_down", "the service is shutting down", self.settings.retry_after)
                return run.result()
            if gone is not None and gone.done():
                raise Abandoned
            raise ComputeTimeout(f"no result within REQUEST_TIMEOUT={self.settings.request_timeout:g}s")
        finally:
            if gone is not None:
                gone.cancel()
            index = self._cell_of.get(computation)  # None: its run has ended (finished or released)
            if index is not None and self.cells[index].inflight.leave(computation):
                # The last waiter left before the result: cancelling the run releases its Dask
                # future (SchedulerConnection.result), which frees the queued task on the cluster.
                run.cancel()
                self.metrics.released.inc()
