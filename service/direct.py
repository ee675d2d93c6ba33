"""Direct calls: cheap computations sent from the API straight to a worker, past the scheduler.

Every Dask task costs its scheduler the same bookkeeping, 1.1 to 1.9 ms of CPU here (``python -m
bench.batching``: six messages and a dozen state transitions per task), whether it computes for a
millisecond or a minute. For a millisecond of work that bookkeeping is what limits a cell, and
micro-batching (``service.batching``) only helps once every worker thread is busy. Ray Serve routes
from its proxies straight to replicas for the same reason. Here:

* every scheduler and worker of the image loads this module as a Dask preload (``service/dask.yaml``,
  ``dask_setup``). A worker gains one handler, ``compute_api_call``: it runs a function in the
  worker's own thread pool, the one its Dask tasks run in, so direct calls and tasks share the
  threads instead of oversubscribing them. Each heartbeat reports how many threads direct calls
  kept busy (``BUSY``). The scheduler adds those threads to its adaptive target: the DaskAutoscaler
  (and ``Adaptive``) keep the workers that direct calls use, which the scheduler would otherwise
  see as idle and retire;
* the API (``service.backend``) calls a worker directly when the computation is cheap
  (``DIRECT_MAX_COST``) and the cell's threads have fewer than ``CALLS_PER_THREAD`` of its Dask
  tasks and direct calls each (``Lane.pick``: the worker with the most room, in turn). Otherwise it
  submits a Dask task (batched or not). Under saturation, cheap work therefore queues on the
  scheduler, which sees it and scales up;
* a worker whose every thread runs a Dask task answers "busy" at once instead of making a call
  wait behind them (the API does not know which worker runs its tasks); the computation goes to
  the scheduler, which queues it where a thread frees first;
* a direct call that fails for the worker's sake (the worker is gone or retiring, or it lacks the
  handler: a cluster without this preload) runs as a Dask task instead. That worker is skipped
  while the scheduler still lists it. The function itself raising is the request's answer, as
  from a task.

The function travels by reference (module and name) and its arguments pickled, as in a Dask task:
the worker's port already runs what its peers send it, so this handler adds no new power.
``Lane`` is the API's pure decision; the rest runs inside the Dask processes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from distributed import Scheduler, Worker
from distributed.protocol import pickle
from distributed.utils import run_in_executor_with_context
from distributed.worker import _worker_cvar  # what distributed.get_worker() reads

HANDLER = "compute_api_call"
BUSY = "compute_api_direct_busy"  # the worker metric: threads kept busy by direct calls since the last heartbeat

# Direct calls a worker thread may have waiting for it before more cheap work goes to the scheduler
# (as Ray Serve's max_ongoing_requests): one more keeps a thread fed while a reply travels back.
# `python -m bench.batching --rate 300`, fib(21) (~1 ms), 2 single-threaded workers: scheduler CPU
# per request 0.60 ms with 1 call per thread (most requests found both threads taken and became
# Dask tasks), 0.03 ms with 2, 0.02 ms with 3 (longer queues on the workers for nothing).
CALLS_PER_THREAD = 2

# The share of a worker's threads that direct calls may keep busy before the scheduler asks for
# more workers on their behalf: as Dask's own target keeps headroom for queued work.
TARGET_UTILISATION = 0.8


class Lane:
    """One cell's direct calls in flight, per worker, as seen by one API process."""

    def __init__(self, calls_per_thread: int = CALLS_PER_THREAD) -> None:
        self.calls_per_thread = calls_per_thread
        self.calls: Counter[str] = Counter()
        self.refused: set[str] = set()  # workers that failed a direct call, skipped while listed
        self._turn = 0  # rotates the first worker looked at, so ties spread over the workers

    @property
    def in_flight(self) -> int:
        return sum(self.calls.values())

    def pick(self, workers: Mapping[str, int], tasks_in_flight: int) -> str | None:
        """The worker for a direct call, given the cell's workers (address -> threads) and its Dask
        tasks in flight; None when the cell's threads have as many calls and tasks as they may take."""
        self.refused.intersection_update(workers)  # a worker that left and came back starts afresh
        per = self.calls_per_thread
        if tasks_in_flight + self.in_flight >= per * sum(workers.values()):
            return None
        best, most = None, 0
        addresses = list(workers)
        self._turn += 1
        for i in range(len(addresses)):
            address = addresses[(self._turn + i) % len(addresses)]
            free = per * workers[address] - self.calls[address]
            if free > most and address not in self.refused:
                best, most = address, free
        return best

    def start(self, address: str) -> None:
        self.calls[address] += 1

    def finish(self, address: str) -> None:
        self.calls[address] -= 1
        if self.calls[address] <= 0:
            del self.calls[address]

    def refuse(self, address: str) -> None:
        self.refused.add(address)


def demand(dask_target: int, busy: Iterable[float], threads: Iterable[int]) -> int:
    """The scheduler's adaptive target with the direct calls' workers in it: Dask's own target
    counts only its tasks, so a cell that serves all its work directly would scale to its minimum
    under full load. ``busy`` is each worker's threads kept busy by direct calls, ``threads`` each
    worker's threads."""
    busy, threads = list(busy), list(threads)
    if not threads or sum(busy) <= 0:
        return dask_target
    per_worker = sum(threads) / len(threads)
    return max(dask_target, math.ceil(sum(busy) / (per_worker * TARGET_UTILISATION)))


class DirectCalls:
    """A worker's side: runs direct calls and measures how busy they keep its threads."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.running: dict[int, float] = {}  # call id -> when a thread started it
        self.finished = 0.0  # busy seconds of calls finished since the last heartbeat
        self.since = time.monotonic()
        self._ids = 0
        # The pool's threads record when they start and end a call, the event loop reads: one lock.
        self._lock = threading.Lock()

    async def call(self, function: bytes, args: bytes) -> dict[str, Any]:
        from service.functions import timed  # noqa: PLC0415 - only once a call arrives (keeps the preload light)

        state = self.worker.state
        if len(state.executing) >= state.nthreads:  # every thread runs a Dask task: do not queue behind them
            return {"busy": True}
        func, arg = pickle.loads(function), pickle.loads(args)
        self._ids += 1
        call = self._ids

        def run() -> tuple[Any, float]:
            # Busy from when a thread takes the call, not from its arrival: up to CALLS_PER_THREAD
            # calls per thread wait in the pool, and a waiting call keeps no thread busy.
            with self._lock:
                self.running[call] = time.monotonic()
            try:
                return timed(func, *arg)
            finally:
                with self._lock:
                    start = self.running.pop(call)
                    self.finished += time.monotonic() - max(start, self.since)

        # The function sees the worker as in a task (distributed.get_worker()), as Worker.actor_execute sets it.
        token = _worker_cvar.set(self.worker)
        try:
            value, seconds = await run_in_executor_with_context(self.worker.executors["default"], run)
        except Exception as exc:  # the function raised: the request's answer, as from a task
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            _worker_cvar.reset(token)
        return {"ok": True, "result": pickle.dumps((value, seconds))}

    def busy(self, worker: Any = None) -> float:
        """Threads busy with direct calls on average since the last reading (each heartbeat reads it)."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.since
            seconds = self.finished + sum(now - max(start, self.since) for start in self.running.values())
            self.finished, self.since = 0.0, now
        return seconds / elapsed if elapsed > 0 else 0.0


def dask_setup(server: Any) -> None:
    """The Dask preload hook (``distributed.worker.preload`` / ``distributed.scheduler.preload``)."""
    if isinstance(server, Worker):
        calls = DirectCalls(server)
        server.handlers[HANDLER] = calls.call
        server.metrics[BUSY] = calls.busy
    elif isinstance(server, Scheduler):
        dask_target = server.adaptive_target

        def adaptive_target(target_duration: Any = None) -> int:
            workers = list(server.workers.values())
            return demand(dask_target(target_duration), (float(ws.metrics.get(BUSY, 0.0)) for ws in workers),
                          (ws.nthreads for ws in workers))

        # The HTTP API (the operator's autoscaler) calls the attribute, comm clients the handler.
        server.adaptive_target = adaptive_target
        server.handlers["adaptive_target"] = adaptive_target
