"""Direct calls (service.direct) with real `dask scheduler` / `dask worker` processes and a real server.

The Dask processes read service/dask.yaml as the image's do, so every scheduler and worker loads the
``service.direct`` preload; one test starts a worker without it. The decisions themselves (which
worker, the adaptive target's arithmetic, a worker's busy accounting) are unit-tested in
tests/unit/test_direct_calls.py; these tests prove the product: cheap work skips the scheduler and
is still right, expensive work and every failure fall back to Dask tasks, and the scheduler's
adaptive target sees the workers that direct calls keep busy.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import ROOT, DaskProcesses, ServerProcess, free_port, scrape, uvicorn_thread, wait_until
from failing import FAILING
from sizing import fib_n_lasting, fib_value

from service.app import create_app
from service.config import Settings
from service.direct import BUSY, CALLS_PER_THREAD, HANDLER, TARGET_UTILISATION

# Sized from this machine. CHEAP is well under DIRECT_MAX_COST's default (0.01 s) even on a worker
# three times slower than this process; EXPENSIVE well above it even on one three times faster.
CHEAP_N = fib_n_lasting(0.001)
EXPENSIVE_N = fib_n_lasting(0.2)
IN_FLIGHT_N = fib_n_lasting(1.0)  # outlasts the steps between "running" and the kill
BLOCKER_N = fib_n_lasting(3.0)  # a Dask task that outlasts a direct call's round trip many times over
LOAD_N = fib_n_lasting(0.2)  # keeps a worker thread busy while the API turns the previous call round
# INLINE_MAX_COST=0: nothing runs in the API process. COALESCE=false: identical requests are distinct
# computations. Generous admission and timeouts: the machine's speed must not refuse anything.
SETTINGS = {"INLINE_MAX_COST": "0", "COALESCE": "false", "FIB_MAX_N": "45", "MAX_QUEUE_WAIT": "600",
            "REQUEST_TIMEOUT": "600"}
ANSWERED = 'compute_api_direct_calls_total{outcome="answered"}'
REFUSED = 'compute_api_direct_calls_total{outcome="refused"}'
BUSY_REPLIES = 'compute_api_direct_calls_total{outcome="busy"}'
TASKS = "compute_api_dask_tasks_total"
HEARTBEAT = 0.5  # seconds between a worker's heartbeats (distributed, up to 10 workers): BUSY's interval


def remote_server(tmp_path: Path, cluster: DaskProcesses, **env: str) -> ServerProcess:
    return ServerProcess(tmp_path, env={"DASK_SCHEDULER_ADDRESS": cluster.address, **SETTINGS, **env})


def counters(url: str) -> dict[str, float]:
    metrics = scrape(url)
    return {name: metrics[name] for name in (ANSWERED, REFUSED, BUSY_REPLIES, TASKS)}


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def scheduler_tasks(cluster: DaskProcesses) -> int:
    return cluster.scheduler_call(lambda dask_scheduler: len(dask_scheduler.tasks))


def transitions(cluster: DaskProcesses) -> int:
    """Task state transitions since the scheduler started: unchanged = no task submitted, queued or run."""
    return cluster.scheduler_call(lambda dask_scheduler: dask_scheduler.transition_counter)


def on_workers(cluster: DaskProcesses, func: Callable[[Any], Any]) -> dict[str, Any]:
    """``func(dask_worker)`` on every worker, by worker name (a lambda: workers cannot import this module)."""
    from distributed import Client

    with Client(cluster.address, timeout=10, set_as_default=False) as client:
        return dict(client.run(lambda dask_worker: (str(dask_worker.name), func(dask_worker))).values())


def direct_calls_in_flight(cluster: DaskProcesses) -> dict[str, int]:
    """Direct calls each worker has received and not yet answered (running or waiting for its thread):
    the comms on which its ``Server`` is handling the call."""
    return on_workers(cluster, lambda dask_worker: sum(op == HANDLER for op in dask_worker._comms.values()))


def wait_for_direct_calls(url: str, n: int = CHEAP_N) -> None:
    """The API lists the cell's workers every scheduler-info-interval (0.5 s), and /readyz does not
    wait for that list: until it arrives, cheap work goes to the scheduler. Wait for a direct call."""
    def answered_directly() -> bool:
        assert httpx.get(f"{url}/fib/{n}", timeout=60).json() == {"n": n, "value": fib_value(n)}
        return scrape(url)[ANSWERED] >= 1
    wait_until(answered_directly, 30, 0.1, "a first direct call")


async def closed_loop(url: str, ns: list[int], concurrency: int) -> list[httpx.Response]:
    """``ns`` by ``concurrency`` clients, each sending its next request when its last one is answered."""
    responses: list[httpx.Response | None] = [None] * len(ns)
    todo = iter(range(len(ns)))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:
            responses[i] = await client.get(f"/fib/{ns[i]}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return responses  # type: ignore[return-value]


def wrong(responses: list[httpx.Response], ns: list[int]) -> list[tuple[int, int, str]]:
    return [(n, r.status_code, r.text[:200]) for n, r in zip(ns, responses, strict=True)
            if r.status_code != 200 or r.json() != {"n": n, "value": fib_value(n)}]


def test_cheap_requests_are_answered_by_direct_calls_and_the_scheduler_runs_no_task(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    cluster = dask_cluster_procs
    concurrency = CALLS_PER_THREAD * 2  # what the cell's 2 single-threaded workers take in direct calls
    with remote_server(tmp_path, cluster) as server:
        wait_for_direct_calls(server.url)
        wait_until(lambda: scheduler_tasks(cluster) == 0, 30, 0.1, "no task left from the warm-up")
        before, seen = counters(server.url), transitions(cluster)
        ns = [CHEAP_N] * 50
        responses = asyncio.run(closed_loop(server.url, ns, concurrency))
        assert not wrong(responses, ns)
        delta = grown(before, counters(server.url))
        print(f"50 x fib({CHEAP_N}), {concurrency} at a time: {delta}")
        assert delta == {ANSWERED: 50, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}
        assert transitions(cluster) == seen, "the scheduler saw a task"
        assert scheduler_tasks(cluster) == 0


def test_expensive_requests_go_through_the_scheduler_as_dask_tasks(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    cluster = dask_cluster_procs
    with remote_server(tmp_path, cluster) as server:  # DIRECT_MAX_COST at its default
        wait_for_direct_calls(server.url)
        wait_until(lambda: scheduler_tasks(cluster) == 0, 30, 0.1, "no task left from the warm-up")
        before, seen = counters(server.url), transitions(cluster)
        ns = [EXPENSIVE_N, CHEAP_N] * 3  # one after the other: the cost alone decides the path
        with httpx.Client(base_url=server.url, timeout=600) as client:
            responses = [client.get(f"/fib/{n}") for n in ns]
        assert not wrong(responses, ns)
        delta = grown(before, counters(server.url))
        print(f"fib({EXPENSIVE_N}) x 3 and fib({CHEAP_N}) x 3: {delta}, "
              f"{transitions(cluster) - seen} task transitions on the scheduler")
        assert delta == {ANSWERED: 3, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 3}
        assert transitions(cluster) >= seen + 3 * 3  # each task at least queued or waiting, processing, in memory


def test_a_worker_without_the_handler_refuses_once_and_its_request_runs_as_a_dask_task(tmp_path: Path) -> None:
    cluster = DaskProcesses(tmp_path)
    # Same scheduler, a worker that does not load service.direct (a cluster built without the preload).
    plain = DaskProcesses(tmp_path, env={"DASK_DISTRIBUTED__WORKER__PRELOAD": "[]"}, port=cluster.port)
    try:
        cluster.start_scheduler()
        cluster.start_worker("direct")
        plain.start_worker("plain")
        cluster.wait_for_workers(2)
        assert on_workers(cluster, lambda dask_worker: HANDLER in dask_worker.handlers) == {
            "direct": True, "plain": False}
        with remote_server(tmp_path, cluster) as server, httpx.Client(base_url=server.url, timeout=600) as client:
            # Until the plain worker's turn comes (the API takes idle workers in turn).
            for _ in range(40):
                before = counters(server.url)
                r = client.get(f"/fib/{CHEAP_N}")
                assert r.json() == {"n": CHEAP_N, "value": fib_value(CHEAP_N)}, r.text
                delta = grown(before, counters(server.url))
                if delta[REFUSED]:
                    break
            else:
                raise AssertionError(f"no direct call refused in 40 requests: {counters(server.url)}")
            # The refused call's request was answered by a Dask task.
            assert delta == {ANSWERED: 0, REFUSED: 1, BUSY_REPLIES: 0, TASKS: 1}, delta

            # The plain worker is still listed: it takes no direct call again, the other worker takes them all.
            before = counters(server.url)
            ns = [CHEAP_N] * 20
            responses = [client.get(f"/fib/{n}") for n in ns]
            assert not wrong(responses, ns)
            delta = grown(before, counters(server.url))
            print(f"after the refusal, 20 x fib({CHEAP_N}): {delta}")
            assert delta == {ANSWERED: 20, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}
            assert counters(server.url)[REFUSED] == 1
    finally:
        plain.close()
        cluster.close()


def test_requests_in_flight_on_a_killed_worker_are_answered_by_dask_tasks(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    cluster = dask_cluster_procs
    # DIRECT_MAX_COST at its maximum: calls long enough to be killed mid-way still go direct.
    with remote_server(tmp_path, cluster, DIRECT_MAX_COST="10") as server:
        wait_for_direct_calls(server.url)
        wait_until(lambda: scheduler_tasks(cluster) == 0, 30, 0.1, "no task left from the warm-up")
        before = counters(server.url)
        calls = CALLS_PER_THREAD * 2  # the cell full: two on each single-threaded worker

        async def scenario() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
                pending = [asyncio.ensure_future(client.get(f"/fib/{IN_FLIGHT_N}")) for _ in range(calls)]
                await asyncio.to_thread(
                    wait_until, lambda: direct_calls_in_flight(cluster) == {"worker-0": 2, "worker-1": 2}, 60, 0.05,
                    "two direct calls in flight on each worker")
                assert not any(p.done() for p in pending)
                await asyncio.to_thread(cluster.kill_worker, "worker-0")
                return list(await asyncio.gather(*pending))

        responses = asyncio.run(scenario())
        assert not wrong(responses, [IN_FLIGHT_N] * calls)
        delta = grown(before, counters(server.url))
        print(f"{calls} x fib({IN_FLIGHT_N}), worker-0 killed with 2 of them in flight: {delta}")
        # worker-1 answered its own two; worker-0's two ran again as Dask tasks (on worker-1)
        assert delta == {ANSWERED: 2, REFUSED: 2, BUSY_REPLIES: 0, TASKS: 2}
        assert scrape(server.url)["compute_api_computations_in_flight"] == 0


def test_the_adaptive_target_counts_the_workers_that_direct_calls_keep_busy(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    cluster = dask_cluster_procs
    workers, concurrency = 2, CALLS_PER_THREAD * 2

    def targets(dask_scheduler) -> dict[str, Any]:
        return {
            "target": dask_scheduler.adaptive_target(),  # what the autoscaler reads (service.direct's)
            "dask": type(dask_scheduler).adaptive_target(dask_scheduler),  # Dask's own, tasks only
            "tasks": len(dask_scheduler.tasks),
            "busy": {ws.name: ws.metrics.get(BUSY) for ws in dask_scheduler.workers.values()},
            "heard": min(ws.last_seen for ws in dask_scheduler.workers.values()),  # the oldest last heartbeat
        }

    def read() -> dict[str, Any]:
        return cluster.scheduler_call(targets)

    # DIRECT_MAX_COST above LOAD_N's cost: each call keeps a worker thread busy ~0.2 s.
    with remote_server(tmp_path, cluster, DIRECT_MAX_COST="5") as server:
        wait_for_direct_calls(server.url)
        warmed_up = time.time()  # the scheduler's clock (the same machine)

        def idle_again() -> bool:  # heartbeats well after the warm-up: its call reported, now all idle
            idle = read()
            return idle["heard"] > warmed_up + 2 * HEARTBEAT and not any(idle["busy"].values()) \
                and idle["tasks"] == 0
        wait_until(idle_again, 30, 0.2, "the warm-up's direct call reported and over")
        idle = read()
        assert idle["dask"] < workers, idle  # Dask's own target: idle workers may go
        before = counters(server.url)
        stop = asyncio.Event()
        readings: list[dict[str, Any]] = []

        async def load(client: httpx.AsyncClient) -> int:
            sent = 0
            while not stop.is_set():
                r = await client.get(f"/fib/{LOAD_N}")
                assert r.json() == {"n": LOAD_N, "value": fib_value(LOAD_N)}, r.text
                sent += 1
            return sent

        async def scenario() -> tuple[int, dict[str, Any]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=600,
                                         limits=httpx.Limits(max_connections=concurrency)) as client:
                loops = [asyncio.ensure_future(load(client)) for _ in range(concurrency)]

                def busy_enough() -> bool:
                    assert not any(loop.done() for loop in loops)  # a failed answer ends the test at once
                    readings.append(read())
                    return all(readings[-1]["busy"].values()) and readings[-1]["target"] >= workers

                def heard_twice_more() -> bool:  # two more heartbeats of every worker under the same load
                    assert not any(loop.done() for loop in loops)
                    readings.append(read())
                    return readings[-1]["heard"] > counted["heard"] + 2 * HEARTBEAT
                try:
                    await asyncio.to_thread(wait_until, busy_enough, 60, 0.2, "the target to count the busy workers")
                    counted = readings[-1]
                    await asyncio.to_thread(wait_until, heard_twice_more, 60, 0.2, "two more heartbeats")
                finally:
                    stop.set()
                return sum(await asyncio.gather(*loops)), counted

        sent, under_load = asyncio.run(scenario())
        print(f"idle: {idle}; under a closed loop of {concurrency} x fib({LOAD_N}): {under_load} "
              f"({len(readings)} readings, {sent} requests; the last: {readings[-1]})")
        # Every worker reported direct calls, the target counts them all, while Dask's own would let
        # them go: the scheduler has no task.
        assert under_load["tasks"] == 0 and under_load["dask"] == idle["dask"] < workers <= under_load["target"]
        # ... and never asks for more than the busy threads call for, even with calls waiting for a thread
        # (up to CALLS_PER_THREAD a thread), in the readings until then and in two more heartbeats' worth
        for reading in readings:
            assert reading["tasks"] == 0 and reading["target"] <= math.ceil(workers / TARGET_UTILISATION), \
                f"{workers} single-threaded workers: {reading}"
        delta = grown(before, counters(server.url))
        assert delta == {ANSWERED: sent, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}, delta

        # The load over: the next heartbeats report idle workers and the target falls back to Dask's.
        wait_until(lambda: (after := read())["target"] == after["dask"] == idle["dask"], 30, 0.2,
                   "the target back to Dask's own")


def test_a_worker_whose_threads_all_run_dask_tasks_answers_busy_and_the_request_queues_on_the_scheduler(
    tmp_path: Path
) -> None:
    cluster = DaskProcesses(tmp_path)
    try:
        cluster.start_scheduler()
        cluster.start_worker()  # one thread
        cluster.wait_for_workers(1)
        with remote_server(tmp_path, cluster) as server:
            wait_for_direct_calls(server.url)
            wait_until(lambda: scheduler_tasks(cluster) == 0, 30, 0.1, "no task left from the warm-up")
            before = counters(server.url)

            async def scenario() -> tuple[httpx.Response, httpx.Response, dict[str, float]]:
                async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                    blocker = asyncio.ensure_future(client.get(f"/fib/{BLOCKER_N}"))  # above DIRECT_MAX_COST
                    await asyncio.to_thread(
                        wait_until, lambda: on_workers(cluster, lambda w: len(w.state.executing)) == {"worker-0": 1},
                        60, 0.05, "the blocker running on the only thread")
                    cheap = asyncio.ensure_future(client.get(f"/fib/{CHEAP_N}"))
                    # The worker says so at once, not when its thread frees.
                    await asyncio.to_thread(
                        wait_until, lambda: counters(server.url)[BUSY_REPLIES] > before[BUSY_REPLIES], 60, 0.05,
                        "a busy reply")
                    assert not blocker.done()
                    return await cheap, await blocker, counters(server.url)

            cheap, blocker, after = asyncio.run(scenario())
            assert cheap.json() == {"n": CHEAP_N, "value": fib_value(CHEAP_N)}, cheap.text
            assert blocker.json() == {"n": BLOCKER_N, "value": fib_value(BLOCKER_N)}, blocker.text
            delta = grown(before, after)
            print(f"fib({CHEAP_N}) while fib({BLOCKER_N}) held the only thread: {delta}")
            # the blocker's task, and the cheap request's own (queued on the scheduler behind it)
            assert delta == {ANSWERED: 0, REFUSED: 0, BUSY_REPLIES: 1, TASKS: 2}

            # "Busy" was for then only: the worker takes direct calls again.
            r = httpx.get(f"{server.url}/fib/{CHEAP_N}", timeout=600)
            assert r.json() == {"n": CHEAP_N, "value": fib_value(CHEAP_N)}, r.text
            assert grown(after, counters(server.url)) == {ANSWERED: 1, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}
    finally:
        cluster.close()


def test_a_functions_error_in_a_direct_call_is_the_requests_answer(tmp_path: Path) -> None:
    # fib_or_fail raises for odd n on a worker (tests/failing.py): the workers import it from tests/.
    cluster = DaskProcesses(tmp_path, env={
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    })
    try:
        cluster.start_scheduler()
        cluster.start_worker()
        cluster.wait_for_workers(1)
        settings = Settings.from_environ({"DASK_SCHEDULER_ADDRESS": cluster.address, **SETTINGS})
        with uvicorn_thread(create_app(settings, registry={"fib": FAILING}), free_port()) as url:
            even = CHEAP_N + CHEAP_N % 2
            wait_for_direct_calls(url, even)
            before = counters(url)
            failed = httpx.get(f"{url}/fib/{even + 1}", timeout=600)
            assert failed.status_code == 500 and failed.json()["error"] == "compute_failed", failed.text
            assert f"ValueError: odd argument {even + 1}" in failed.json()["detail"], failed.text
            # answered by the worker, not taken for the worker's failure: no Dask task, no refusal
            assert grown(before, counters(url)) == {ANSWERED: 1, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}
            ok = httpx.get(f"{url}/fib/{even}", timeout=600)
            assert ok.json() == {"n": even, "value": fib_value(even)}, ok.text
            assert grown(before, counters(url)) == {ANSWERED: 2, REFUSED: 0, BUSY_REPLIES: 0, TASKS: 0}
    finally:
        cluster.close()
