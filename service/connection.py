"""The thin Dask adapter: one ``distributed.Client``, kept connected, and the three calls the backend needs.

* ``capacity()``: connected, workers and threads, from the Client's cache (refreshed by distributed
  every ``distributed.client.scheduler-info-interval``), or from ``refresh()`` when a decision must
  not rest on a stale cache (no workers *seen*: ask the scheduler itself before refusing).
* ``submit()``: a registered function with validated arguments, ``pure=False`` (coalescing is the
  backend's, reference-counted; Dask's own key sharing would let one cancel hit every request).
* ``result()``: waits, maps Dask's failures onto ``service.errors``, and always releases the
  future when it returns or is cancelled: the scheduler forgets the task at once, not when the
  garbage collector gets round to a Future held by a reference cycle.
* ``workers`` and ``call()``: the running workers and their threads (asked of the scheduler every
  ``distributed.client.scheduler-info-interval``: the Client's own cache counts workers but does not
  list them), and a direct call to one of them past the scheduler (``service.direct``).

Reconnecting: after losing the scheduler, distributed retries for ``distributed.comm.timeouts.connect``
and then closes its Client for good. A supervisor task builds a new Client whenever that happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Future
from distributed.client import FutureCancelledError
from distributed.protocol import pickle

from service import direct
from service.errors import ComputeFailed, Unavailable
from service.inflight import Capacity

logger = logging.getLogger("compute_api.connection")

# Client states in which distributed will not reconnect by itself any more.
GONE = ("closed", "closing", "failed")


class DirectRefused(Exception):
    """A worker could not take a direct call: the computation runs as a Dask task instead. ``busy``:
    only for now (every thread of the worker runs a Dask task); else it is gone, retiring, or
    without ``service.direct``."""

    def __init__(self, message: str, *, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class SchedulerConnection:
    def __init__(
        self,
        address: str | None,
        *,
        connect_timeout: float,
        reconnect_interval: float,
        retry_after: int,
        on_connect: Callable[[Client], Awaitable[None]] | None = None,
        list_workers: bool = True,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self.retry_after = retry_after  # of the 503 for requests in flight when the scheduler is lost
        self.on_connect = on_connect  # e.g. register a worker plugin on every new Client
        self.client: Client | None = None
        self.list_workers = list_workers  # keep ``workers`` (for direct calls; a poll of the scheduler)
        self.workers: dict[str, int] = {}  # running workers -> threads, for direct calls
        self._supervisor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[Capacity] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """One attempt to build a running Client; replaces the old one only on success."""
        client = Client(
            self.address, asynchronous=True, timeout=self.connect_timeout, set_as_default=False, name="compute-api"
        )
        try:
            await client
            if self.on_connect is not None:
                await self.on_connect(client)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close(timeout=self.connect_timeout)
            raise
        old, self.client = self.client, client
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(timeout=self.connect_timeout)
        logger.info("connected to scheduler %s", self.address)

    def supervise(self) -> None:
        """Start replacing Clients that distributed has given up on."""
        self._supervisor = asyncio.create_task(self._supervise(), name="dask-supervisor")
        if self.list_workers:
            self._watcher = asyncio.create_task(self._watch_workers(), name="dask-workers")

    async def _supervise(self) -> None:
        # While a Client is merely "connecting", distributed is retrying by itself: interfering
        # then would only race it.
        while True:
            await asyncio.sleep(self.reconnect_interval)
            if self.client is not None and self.client.status not in GONE:
                continue
            try:
                await self.connect()
            except Exception as exc:
                logger.debug("reconnect to %s failed: %r", self.address, exc)

    async def _watch_workers(self) -> None:
        interval = parse_timedelta(dask.config.get("distributed.client.scheduler-info-interval"))
        while True:
            client = self.client
            try:
                # Running workers only: one that is retiring or paused takes no new direct call.
                self.workers = dict(await client.scheduler.ncores_running()) if self.connected else {}
            except Exception as exc:  # the scheduler is being lost: the supervisor deals with that
                logger.debug("workers of %s: %r", self.address, exc)
                self.workers = {}
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for task in (self._supervisor, self._watcher, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.client is not None:
            # Bounded: if the scheduler is already gone, do not wait out distributed's retries.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(timeout=self.connect_timeout), self.connect_timeout)
            self.client = None

    # -- capacity --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.status == "running"

    def capacity(self) -> Capacity:
        """From the Client's cache: cheap, may lag the scheduler by up to scheduler-info-interval."""
        if not self.connected:
            return Capacity(connected=False, scheduler=self.address)
        info = self.client.scheduler_info()  # type: ignore[union-attr]
        return Capacity(True, int(info.get("n_workers", 0)), int(info.get("total_threads", 0)), self.address)

    async def refresh(self) -> Capacity:
        """Ask the scheduler itself; concurrent callers share one round trip."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._identity())
        return await asyncio.shield(self._refreshing)

    async def _identity(self) -> Capacity:
        client = self.client
        if client is None or not self.connected:
            return self.capacity()
        try:
            identity = await asyncio.wait_for(client.scheduler.identity(), self.connect_timeout)
        except Exception as exc:
            logger.debug("scheduler identity from %s failed: %r", self.address, exc)
            return self.capacity()
        workers = identity.get("workers", {})
        threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
        return Capacity(True, len(workers), threads, self.address)

    # -- computations ----------------------------------------------------------------------

    def submit(self, func: Callable[..., Any], *args: Any, key: str, priority: int) -> Future:
        assert self.client is not None, "submit() after a capacity() that said connected"
        return self.client.submit(func, *args, key=key, pure=False, priority=priority)

    async def call(self, address: str, func: Callable[..., Any], arg: tuple[Any, ...]) -> tuple[Any, float]:
        """``(value, worker seconds)`` of ``func(*arg)`` run by the worker at ``address`` directly;
        ``DirectRefused`` when that worker cannot, ``ComputeFailed`` when the function raised."""
        client = self.client
        if client is None:
            raise DirectRefused("not connected")
        try:
            reply = await client.rpc(address).compute_api_call(function=pickle.dumps(func), args=pickle.dumps(arg))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the worker is gone or closing, or the comm failed
            raise DirectRefused(f"{address}: {exc!r}") from exc
        if not isinstance(reply, dict):  # a worker without service.direct replies None
            raise DirectRefused(f"{address} has no {direct.HANDLER} handler")
        if reply.get("busy"):
            raise DirectRefused(f"{address}: every thread runs a Dask task", busy=True)
        if not reply["ok"]:
            raise ComputeFailed(reply["error"])
        return pickle.loads(reply["result"])

    async def result(self, future: Future) -> Any:
        """The task's result; ``Unavailable`` if the scheduler was lost, ``ComputeFailed`` if it raised."""
        try:
            return await future
        except FutureCancelledError as exc:
            # Not our own cancel (that cancels this coroutine instead): the Client cancels every
            # pending future when it loses the scheduler.
            raise Unavailable("scheduler_lost", f"lost the Dask scheduler: {exc.reason}", self.retry_after) from None
        except OSError as exc:  # includes CommClosedError while gathering the result
            raise Unavailable("scheduler_lost", f"lost the Dask scheduler: {exc!r}", self.retry_after) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ComputeFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            # Whatever happened, this request's reference to the task is gone: the scheduler
            # releases a queued task now (a running one finishes and is dropped).
            future.release()
