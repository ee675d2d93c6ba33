"""The thin Dask adapter against a real scheduler and workers in this process (distributed's own
test utilities: no subprocesses, no network beyond loopback)."""

from __future__ import annotations

import asyncio

import pytest
from distributed import Scheduler, Worker
from distributed.utils_test import gen_cluster, gen_test

from service.connection import SchedulerConnection
from service.errors import ComputeFailed, Unavailable
from service.tasks import fib


def connection(address: str) -> SchedulerConnection:
    return SchedulerConnection(address, connect_timeout=2, reconnect_interval=0.1, retry_after=1)


def boom(_: int) -> int:
    raise ZeroDivisionError("on purpose")


def slow(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@gen_cluster(client=False, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 2)])
async def test_capacity_reports_workers_and_threads(s: Scheduler, a: Worker, b: Worker) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        fresh = await conn.refresh()
        assert (fresh.connected, fresh.workers, fresh.threads) == (True, 2, 3)
    finally:
        await conn.close()


@gen_cluster(client=False, nthreads=[])
async def test_refresh_sees_a_worker_that_the_cache_has_not(s: Scheduler) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        assert conn.capacity().workers == 0
        async with Worker(s.address, nthreads=1):
            # The Client's cache refreshes every 0.5 s; the scheduler knows at once.
            assert (await conn.refresh()).workers == 1
    finally:
        await conn.close()


@gen_cluster(client=False, nthreads=[("127.0.0.1", 1)])
async def test_concurrent_refreshes_share_one_round_trip(s: Scheduler, a: Worker) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        calls = 0
        identity = conn.client.scheduler.identity  # type: ignore[union-attr]

        async def counted(*args: object, **kwargs: object) -> dict:
            nonlocal calls
            calls += 1
            return await identity(*args, **kwargs)

        conn.client.scheduler.identity = counted  # type: ignore[union-attr]
        results = await asyncio.gather(*(conn.refresh() for _ in range(10)))
        assert calls == 1 and {r.workers for r in results} == {1}
    finally:
        await conn.close()


@gen_cluster(client=False, nthreads=[("127.0.0.1", 1)])
async def test_a_result_releases_its_task_on_the_scheduler(s: Scheduler, a: Worker) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        future = conn.submit(fib, 20, key="fib-20-x", priority=0)
        assert await conn.result(future) == 6765
        # released at once, not when the garbage collector gets to the Future
        while s.tasks:
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


@gen_cluster(client=False, nthreads=[("127.0.0.1", 1)])
async def test_a_cancelled_wait_releases_the_queued_task(s: Scheduler, a: Worker) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        busy = conn.submit(slow, 0.5, key="busy", priority=0)
        queued = conn.submit(slow, 0.5, key="queued", priority=-1)
        waiter = asyncio.ensure_future(conn.result(queued))
        while "queued" not in s.tasks:
            await asyncio.sleep(0.01)
        waiter.cancel()
        while "queued" in s.tasks:
            await asyncio.sleep(0.01)
        assert await conn.result(busy) == 0.5  # the other computation is untouched
    finally:
        await conn.close()


@gen_cluster(client=False, nthreads=[("127.0.0.1", 1)])
async def test_a_task_that_raises_is_compute_failed_naming_the_exception(s: Scheduler, a: Worker) -> None:
    conn = connection(s.address)
    await conn.connect()
    try:
        with pytest.raises(ComputeFailed, match="ZeroDivisionError: on purpose"):
            await conn.result(conn.submit(boom, 1, key="boom", priority=0))
    finally:
        await conn.close()


@gen_test()
async def test_nothing_listening_means_not_connected() -> None:
    conn = SchedulerConnection("tcp://127.0.0.1:1", connect_timeout=0.5, reconnect_interval=0.1, retry_after=1)
    with pytest.raises(OSError):
        await conn.connect()
    capacity = conn.capacity()
    assert not capacity.connected and capacity.scheduler == "tcp://127.0.0.1:1"
    assert not (await conn.refresh()).connected
    await conn.close()


@gen_test()
async def test_losing_the_scheduler_mid_computation_is_unavailable_at_once() -> None:
    async with Scheduler(dashboard_address=":0") as s:
        worker = await Worker(s.address, nthreads=1)
        conn = connection(s.address)
        await conn.connect()
        future = conn.submit(slow, 5, key="long", priority=0)
        while not s.tasks or not any(ts.processing_on for ts in s.tasks.values()):
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(conn.result(future))
        await s.close()
        with pytest.raises(Unavailable) as lost:
            await asyncio.wait_for(waiting, 10)
        assert lost.value.reason == "scheduler_lost" and lost.value.retry_after == 1
        await conn.close()
        await worker.close()
