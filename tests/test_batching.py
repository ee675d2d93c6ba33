"""Adaptive micro-batching with real `dask scheduler` / `dask worker` processes and a real server.

The rules themselves (when to batch, when to send) are unit-tested in tests/unit/test_batcher.py;
these tests prove the wiring: batches form only while every worker thread is busy, every member gets
its own right answer or its own failure, and a member whose client hung up leaves its batch-mates
answered.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, DaskProcesses, ServerProcess, free_port, scrape, uvicorn_thread, wait_until
from failing import FAILING
from sizing import fib_estimate, fib_n_lasting, fib_value

from service.app import create_app
from service.config import Settings

# Cheap computations (a few ms here) and one that keeps the only worker thread busy meanwhile.
CHEAP_N = fib_n_lasting(0.003)
BLOCKER_N = fib_n_lasting(2.0)
LONG_BLOCKER_N = fib_n_lasting(4.0)  # outlasts the hang-ups of test_an_abandoned_member...
BURST = 40
# INLINE_MAX_COST=0: cheap work must go to the cluster. BATCH_MAX_COST is generous: the workers'
# real speed (niced, sharing 2 cores with the test) must not decide whether a batch forms.
# COALESCE=false: identical requests are distinct computations of identical cost.
SETTINGS = {"INLINE_MAX_COST": "0", "BATCH_MAX_COST": "2", "COALESCE": "false", "FIB_MAX_N": "45",
            "MAX_QUEUE_WAIT": "600", "REQUEST_TIMEOUT": "600"}


@pytest.fixture
def one_thread(tmp_path: Path) -> Iterator[DaskProcesses]:
    """A scheduler and one single-threaded worker (tests/ importable there: failing.py)."""
    cluster = DaskProcesses(tmp_path, env={
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    })
    cluster.start_scheduler()
    cluster.start_worker()
    cluster.wait_for_workers(1)
    yield cluster
    cluster.close()


def processing(cluster: DaskProcesses) -> int:
    return cluster.scheduler_call(lambda dask_scheduler: sum(len(ws.processing)
                                                             for ws in dask_scheduler.workers.values()))


def batched(url: str) -> tuple[float, float, float]:
    """Dask tasks submitted, batches sent, computations in those batches."""
    metrics = scrape(url)
    return (metrics["compute_api_dask_tasks_total"], metrics["compute_api_batch_size_count"],
            metrics["compute_api_batch_size_sum"])


async def burst(url: str, ns: list[int], blocker: int | None = None,
                cluster: DaskProcesses | None = None) -> list[httpx.Response]:
    """``ns`` at once; with ``blocker``, while fib(blocker) keeps the worker thread busy."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        held = None
        if blocker is not None:
            assert cluster is not None
            held = asyncio.ensure_future(client.get(f"/fib/{blocker}"))
            while processing(cluster) == 0:
                await asyncio.sleep(0.02)
        responses = list(await asyncio.gather(*(client.get(f"/fib/{n}") for n in ns)))
        if held is not None:
            responses.append(await held)
    return responses


def wrong(responses: list[httpx.Response], ns: list[int]) -> list[tuple[int, int, str]]:
    return [(n, r.status_code, r.text[:200]) for n, r in zip(ns, responses, strict=True)
            if r.status_code != 200 or r.json() != {"n": n, "value": fib_value(n)}]


def test_busy_workers_batch_cheap_work_and_every_answer_is_right(tmp_path: Path, one_thread: DaskProcesses) -> None:
    with ServerProcess(tmp_path, env={"DASK_SCHEDULER_ADDRESS": one_thread.address, **SETTINGS}) as server:
        ns = [CHEAP_N] * BURST
        responses = asyncio.run(burst(server.url, ns, blocker=BLOCKER_N, cluster=one_thread))
        assert not wrong(responses, [*ns, BLOCKER_N])
        tasks, batches, members = batched(server.url)
        figure = f"{BURST + 1} computations (fib({CHEAP_N}) x {BURST}, fib({BLOCKER_N})): " \
                 f"{tasks:g} Dask tasks, {batches:g} batches of {members:g} computations"
        print(figure)
        # The blocker runs alone; cheap ones that arrive while the only thread is busy wait in batches
        # (on a slow machine the last of the burst may find the thread free again and run alone).
        assert batches >= 1 and members >= 2, figure
        assert tasks == 1 + batches + (BURST - members) < BURST + 1, figure
        assert scrape(server.url)["compute_api_computations_in_flight"] == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct-calls", "no-direct-calls"])
def test_idle_workers_get_cheap_work_one_at_a_time(tmp_path: Path, dask_cluster_procs: DaskProcesses,
                                                   direct: bool) -> None:
    # Two idle threads, one request at a time: batching would only serialise work they can run. Each
    # goes straight to a worker (service.direct), or, with direct calls off, in a Dask task of its own.
    env = {"DASK_SCHEDULER_ADDRESS": dask_cluster_procs.address, **SETTINGS}
    if not direct:
        env["DIRECT_MAX_COST"] = "0"
    with ServerProcess(tmp_path, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(10):
                r = client.get(f"/fib/{CHEAP_N}")
                assert r.json() == {"n": CHEAP_N, "value": fib_value(CHEAP_N)}, r.text
        assert batched(server.url) == ((0, 0, 0) if direct else (10, 0, 0))
        assert scrape(server.url)['compute_api_direct_calls_total{outcome="answered"}'] == (10 if direct else 0)


def test_one_failing_item_fails_only_itself(tmp_path: Path, one_thread: DaskProcesses) -> None:
    even = CHEAP_N + CHEAP_N % 2
    odd = even + 1  # fib_or_fail raises for odd n on a worker
    settings = Settings.from_environ({"DASK_SCHEDULER_ADDRESS": one_thread.address, **SETTINGS})
    with uvicorn_thread(create_app(settings, registry={"fib": FAILING}), free_port()) as url:
        ns = [even, odd] * (BURST // 2)
        responses = asyncio.run(burst(url, ns, blocker=BLOCKER_N + BLOCKER_N % 2, cluster=one_thread))
        _, batches, members = batched(url)
        assert batches >= 1 and members >= 2, (batches, members)
        for n, r in zip(ns, responses, strict=False):
            if n == odd:
                assert r.status_code == 500 and r.json()["error"] == "compute_failed", r.text
                assert f"ValueError: odd argument {odd}" in r.json()["detail"], r.text
            else:
                assert r.json() == {"n": n, "value": fib_value(n)}, r.text
        assert responses[-1].status_code == 200  # the blocker


def test_an_abandoned_member_leaves_its_batch_mates_answered(tmp_path: Path, one_thread: DaskProcesses) -> None:
    with ServerProcess(tmp_path, env={"DASK_SCHEDULER_ADDRESS": one_thread.address, **SETTINGS}) as server:

        async def scenario() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                held = asyncio.ensure_future(client.get(f"/fib/{LONG_BLOCKER_N}"))
                while processing(one_thread) == 0:
                    await asyncio.sleep(0.02)
                # half the burst from clients that will hang up, half from clients that wait
                sockets = []
                for _ in range(BURST // 2):
                    sock = socket.create_connection(("127.0.0.1", server.port))
                    sock.sendall(f"GET /fib/{CHEAP_N} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
                    sockets.append(sock)
                waiting = [asyncio.ensure_future(client.get(f"/fib/{CHEAP_N}")) for _ in range(BURST // 2)]
                while scrape(server.url)['compute_api_computations_total{where="dask"}'] < BURST + 1:
                    await asyncio.sleep(0.02)
                for sock in sockets:  # RST while the blocker still holds the only thread
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.close()
                return [*await asyncio.gather(*waiting), await held]

        responses = asyncio.run(scenario())
        assert not wrong(responses, [CHEAP_N] * (BURST // 2) + [LONG_BLOCKER_N])
        wait_until(lambda: scrape(server.url)["compute_api_computations_in_flight"] == 0, 60, 0.1, "all settled")
        wait_until(lambda: one_thread.scheduler_call(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0,
                   60, 0.1, "no task left on the scheduler")
        metrics = scrape(server.url)
        print(f"released {metrics['compute_api_released_computations_total']:g}, batches "
              f"{metrics['compute_api_batch_size_count']:g} of {metrics['compute_api_batch_size_sum']:g}")
        assert metrics["compute_api_released_computations_total"] == BURST // 2
        assert metrics["compute_api_batch_size_count"] >= 1


def test_batched_computations_count_in_admission(tmp_path: Path, one_thread: DaskProcesses) -> None:
    # Three times more cheap work than MAX_QUEUE_WAIT lets queue: were batch members not counted in the
    # queued cost, every request would be admitted. Each refused one gets a fast 503 with Retry-After.
    max_queue_wait = 0.5
    n = fib_n_lasting(0.01)
    count = math.ceil(3 * max_queue_wait / fib_estimate(n))
    env = {"DASK_SCHEDULER_ADDRESS": one_thread.address, **SETTINGS, "MAX_QUEUE_WAIT": str(max_queue_wait)}
    with ServerProcess(tmp_path, env=env) as server:
        blocker = fib_n_lasting(0.2)
        *responses, held = asyncio.run(burst(server.url, [n] * count, blocker=blocker, cluster=one_thread))
        assert held.json() == {"n": blocker, "value": fib_value(blocker)}, held.text
        statuses = Counter(r.status_code for r in responses)
        _, batches, members = batched(server.url)
        figure = f"{count} x fib({n}) behind a busy thread: {dict(statuses)}; {batches:g} batches of {members:g}"
        print(figure)
        assert set(statuses) == {200, 503} and batches >= 1, figure
        for r in responses:
            if r.status_code == 503:
                assert "estimated queue wait" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1, r.text
            else:
                assert r.json() == {"n": n, "value": fib_value(n)}, r.text
        wait_until(lambda: scrape(server.url)["compute_api_computations_in_flight"] == 0, 60, 0.1, "all settled")
