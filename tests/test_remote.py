"""Remote mode: the API against real `dask scheduler` / `dask worker` processes, with faults."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
from conftest import DaskProcesses, ServerProcess, free_port, scrape, wait_until
from sizing import fib_n_lasting, fib_value

# Computations sized from this machine: LONG outlasts every step a test takes while it runs.
LONG = fib_n_lasting(3.0)
SHORT = fib_n_lasting(0.3)
CONNECT_TIMEOUT = 5  # distributed.comm.timeouts.connect for the outage test's API


def remote_server(tmp_path: Path, cluster: DaskProcesses, **env: str) -> ServerProcess:
    return ServerProcess(tmp_path, env={"DASK_SCHEDULER_ADDRESS": cluster.address, "FIB_MAX_N": "40", **env})


def metric(url: str, name: str) -> float:
    return scrape(url).get(name, 0.0)


def scheduler_keys(cluster: DaskProcesses) -> list[str]:
    return cluster.scheduler_call(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])


def drop_request(port: int, path: str) -> socket.socket:
    """Send a request and return the socket; closing it is the client going away."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return sock


def test_remote_mode_serves_and_reports_ready(tmp_path: Path, dask_cluster_procs: DaskProcesses) -> None:
    with remote_server(tmp_path, dask_cluster_procs) as server:
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready == {"status": "ready", "scheduler": dask_cluster_procs.address, "workers": 2, "cells": [
            {"scheduler": dask_cluster_procs.address, "connected": True, "workers": 2, "ready": True}]}
        assert httpx.get(f"{server.url}/fib/25").json() == {"n": 25, "value": 75025}


def test_results_come_from_the_workers_not_through_the_scheduler(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    """The scheduler only says where a result is; the API fetches it from that worker itself
    (direct-to-workers in service/dask.yaml), which spares the scheduler a relay per request."""

    def count_relays(dask_scheduler):  # wraps the scheduler's own handlers; nested: pickled by value
        counts = dask_scheduler.compute_api_test_counts = {"gather": 0, "who_has": 0}
        for name in counts:
            def counted(*args, _name=name, _handler=dask_scheduler.handlers[name], **kwargs):
                counts[_name] += 1
                return _handler(*args, **kwargs)
            dask_scheduler.handlers[name] = counted

    dask_cluster_procs.scheduler_call(count_relays)
    # DIRECT_MAX_COST=0: these cheap computations would otherwise skip the scheduler altogether.
    with remote_server(tmp_path, dask_cluster_procs, INLINE_MAX_COST="0", COALESCE="false",
                       DIRECT_MAX_COST="0") as server:
        for n in range(20, 26):
            assert httpx.get(f"{server.url}/fib/{n}").json() == {"n": n, "value": fib_value(n)}
        counts = dask_cluster_procs.scheduler_call(lambda dask_scheduler: dask_scheduler.compute_api_test_counts)
    assert counts["gather"] == 0, counts
    assert counts["who_has"] >= 1, counts


def test_scheduler_outage_longer_than_connect_timeout(tmp_path: Path, dask_cluster_procs: DaskProcesses) -> None:
    """Loss -> fast 503s; back after distributed's connect timeout (it has closed its Client for good)
    -> recovers unaided. The timeout is 5 s here instead of the default 30 s: the same path, sooner."""
    cluster = dask_cluster_procs
    with remote_server(tmp_path, cluster, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=f"{CONNECT_TIMEOUT}s") as server:

        async def in_flight_at_loss() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                pending = asyncio.ensure_future(client.get(f"/fib/{LONG}"))
                await asyncio.to_thread(wait_until, lambda: cluster.processing() == 1, 30, 0.05, "fib running")
                await asyncio.to_thread(cluster.stop_scheduler, kill=True)
                lost = time.perf_counter()
                r = await pending
                return r, time.perf_counter() - lost

        r, after = asyncio.run(in_flight_at_loss())
        print(f"in-flight request answered {r.status_code} {after * 1000:.0f} ms after the scheduler died")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "unavailable"
        assert after < 2.0

        outage_start = time.monotonic()
        for path in ("/fib/20", "/readyz"):
            t0 = time.perf_counter()
            r = httpx.get(server.url + path, timeout=10)
            took = time.perf_counter() - t0
            print(f"{path} during the outage: {r.status_code} in {took * 1000:.1f} ms")
            assert r.status_code == 503 and "retry-after" in r.headers
            assert took < 1.0
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # liveness ignores Dask

        # Outlast distributed.comm.timeouts.connect: the old Client is closed for good.
        while time.monotonic() - outage_start < CONNECT_TIMEOUT + 5:
            assert httpx.get(f"{server.url}/fib/20", timeout=10).status_code == 503
            time.sleep(1)
        cluster.start_scheduler()
        cluster.start_worker("worker-after-outage")
        t0 = time.monotonic()
        wait_until(lambda: httpx.get(f"{server.url}/fib/20").status_code == 200, 30, what="recovery")
        print(f"recovered {time.monotonic() - t0:.1f} s after the scheduler came back")
        assert httpx.get(f"{server.url}/fib/21").json()["value"] == 10946
        assert server.proc is not None and server.proc.poll() is None  # never restarted


def test_dropped_queued_request_releases_its_task(tmp_path: Path) -> None:
    cluster = DaskProcesses(tmp_path)
    cluster.start_scheduler()
    cluster.start_worker(nthreads=1)  # one slot: the second request has to queue
    cluster.wait_for_workers(1)
    try:
        with remote_server(tmp_path, cluster, COALESCE="false") as server:

            async def scenario() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                    busy = asyncio.ensure_future(client.get(f"/fib/{LONG}"))  # outlasts the steps below
                    await asyncio.to_thread(wait_until, lambda: cluster.processing() == 1, 30, 0.05, "busy")
                    dropped = await asyncio.to_thread(drop_request, server.port, f"/fib/{SHORT}")
                    await asyncio.to_thread(
                        wait_until,
                        lambda: any(k.startswith(f"fib-{SHORT}-") for k in scheduler_keys(cluster)),
                        10,
                        0.05,
                        "the second request queued",
                    )
                    dropped.close()
                    t0 = time.perf_counter()
                    await asyncio.to_thread(
                        wait_until,
                        lambda: not any(k.startswith(f"fib-{SHORT}-") for k in scheduler_keys(cluster)),
                        10,
                        0.05,
                        "the dropped request's task released",
                    )
                    print(f"dropped request's task released after {(time.perf_counter() - t0) * 1000:.0f} ms")
                    assert not busy.done(), "the release must not wait for the busy worker"
                    assert (await busy).json()["value"] == fib_value(LONG)

            asyncio.run(scenario())
            wait_until(lambda: scheduler_keys(cluster) == [], 10, what="no tasks left on the scheduler")
            assert metric(server.url, "compute_api_released_computations_total") == 1
            assert metric(server.url, "compute_api_computations_in_flight") == 0
    finally:
        cluster.close()


def test_coalesced_request_survives_another_clients_disconnect(
    tmp_path: Path, dask_cluster_procs: DaskProcesses
) -> None:
    with remote_server(tmp_path, dask_cluster_procs) as server:
        before = metric(server.url, 'compute_api_computations_total{where="dask"}')

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                # The kept request must find the dropped one's computation still running.
                dropped = await asyncio.to_thread(drop_request, server.port, f"/fib/{LONG}")
                await asyncio.to_thread(wait_until, lambda: metric(server.url, "compute_api_computations_in_flight")
                                        == 1, 30, 0.05, "the first request's computation")
                kept = asyncio.ensure_future(client.get(f"/fib/{LONG}"))
                await asyncio.to_thread(wait_until, lambda: metric(server.url, "compute_api_coalesced_requests_total")
                                        == 1, 30, 0.05, "the second request joined it")
                dropped.close()
                return await kept

        r = asyncio.run(scenario())
        assert r.json() == {"n": LONG, "value": fib_value(LONG)}
        assert metric(server.url, 'compute_api_computations_total{where="dask"}') == before + 1
        assert metric(server.url, "compute_api_coalesced_requests_total") == 1
        assert metric(server.url, "compute_api_released_computations_total") == 0


def test_no_workers_is_a_fast_503(tmp_path: Path) -> None:
    cluster = DaskProcesses(tmp_path)
    cluster.start_scheduler()
    try:
        with remote_server(tmp_path, cluster).start(wait="/healthz") as server:
            ready = httpx.get(f"{server.url}/readyz")  # ready means able to serve: not without workers
            assert ready.status_code == 503 and ready.json()["detail"] == "the Dask cluster has no workers"
            t0 = time.perf_counter()
            r = httpx.get(f"{server.url}/fib/25", timeout=10)
            took = time.perf_counter() - t0
            print(f"no workers: {r.status_code} in {took * 1000:.1f} ms")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "no workers" in r.json()["detail"]
            assert took < 1.0
            cluster.start_worker()
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, 30, what="worker joins")
            # the first request after readiness is served: no decision rests on a stale worker count
            assert httpx.get(f"{server.url}/fib/25").json() == {"n": 25, "value": 75025}
    finally:
        cluster.close()


def test_request_timeout_is_a_504(tmp_path: Path, dask_cluster_procs: DaskProcesses) -> None:
    with remote_server(tmp_path, dask_cluster_procs, REQUEST_TIMEOUT="0.5", MAX_QUEUE_WAIT="30") as server:
        t0 = time.perf_counter()
        r = httpx.get(f"{server.url}/fib/{LONG}", timeout=10)  # 3 s of work against a 0.5 s timeout
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert time.perf_counter() - t0 < 5
        # the abandoned computation is released, the service keeps serving
        wait_until(lambda: scheduler_keys(dask_cluster_procs) == [], 10, what="timed-out task released")
        assert httpx.get(f"{server.url}/fib/20").json()["value"] == 6765


def test_starts_before_its_scheduler(tmp_path: Path) -> None:
    cluster = DaskProcesses(tmp_path, port=free_port())
    server = remote_server(tmp_path, cluster).start(wait="/healthz")
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert httpx.get(f"{server.url}/fib/20").status_code == 503
        cluster.start_scheduler()
        cluster.start_worker()
        wait_until(lambda: httpx.get(f"{server.url}/fib/20").status_code == 200, 30, what="late scheduler")
    finally:
        server.stop()
        cluster.close()


def test_scale_from_zero_holds_requests_until_a_worker_starts(tmp_path: Path) -> None:
    """COLD_START_QUEUE: with no workers, a bounded number of computations is admitted and held; the
    scheduler's adaptive target (what the operator's autoscaler polls) rises; a worker starts; all held
    requests are answered. Beyond the bound: a fast 503 with Retry-After."""
    cluster = DaskProcesses(tmp_path)
    cluster.start_scheduler()
    try:
        with remote_server(tmp_path, cluster, COLD_START_QUEUE="2", REQUEST_TIMEOUT="120") as server:
            ready = httpx.get(f"{server.url}/readyz")
            assert ready.status_code == 200 and ready.json()["workers"] == 0, ready.text

            async def scenario() -> tuple[list[httpx.Response], httpx.Response, int, float]:
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                    held = [asyncio.ensure_future(client.get(f"/fib/{n}")) for n in (SHORT, SHORT + 1)]
                    await asyncio.to_thread(wait_until, lambda: metric(server.url, "compute_api_computations_in_flight")
                                            == 2, 30, 0.05, "2 computations held")
                    beyond = await client.get(f"/fib/{SHORT + 2}")
                    target = await asyncio.to_thread(
                        cluster.scheduler_call, lambda dask_scheduler: dask_scheduler.adaptive_target())
                    assert not any(h.done() for h in held)
                    t0 = time.perf_counter()
                    await asyncio.to_thread(cluster.start_worker)
                    answers = list(await asyncio.gather(*held))
                    return answers, beyond, target, time.perf_counter() - t0

            answers, beyond, target, took = asyncio.run(scenario())
            print(f"scale from zero: adaptive target {target} while 2 requests were held; beyond the queue "
                  f"{beyond.status_code}; held requests answered {took:.1f} s after a worker was started")
            assert target >= 1
            assert beyond.status_code == 503 and beyond.json()["error"] == "unavailable"
            assert "no workers" in beyond.json()["detail"] and beyond.headers["retry-after"] == "1"
            assert [r.json() for r in answers] == [{"n": n, "value": fib_value(n)} for n in (SHORT, SHORT + 1)]
            assert metric(server.url, 'compute_api_rejected_requests_total{reason="no_workers"}') == 1
    finally:
        cluster.close()
