"""Embedded mode through a real uvicorn server (a subprocess on an ephemeral port)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil
import pytest
from conftest import ServerProcess, scrape, wait_until
from sizing import fib_n_lasting, fib_value


@pytest.mark.parametrize(("n", "value"), [(20, 6765), (0, 0), (1, 1)])
def test_fib(embedded_server: ServerProcess, n: int, value: int) -> None:
    r = httpx.get(f"{embedded_server.url}/fib/{n}")
    assert r.status_code == 200
    assert r.json() == {"n": n, "value": value}


def test_twenty_concurrent_distinct_requests_are_all_correct(embedded_server: ServerProcess) -> None:
    ns = [n % 26 for n in range(6, 26)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=embedded_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.get(f"/fib/{n}") for n in ns))

    responses = asyncio.run(run())
    for n, r in zip(ns, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json() == {"n": n, "value": fib_value(n)}


def in_flight(url: str) -> float:
    return scrape(url)["compute_api_computations_in_flight"]


def test_fast_is_not_blocked_by_a_running_fib(embedded_server: ServerProcess) -> None:
    """While a fib runs on a worker, /fast answers in under 10 % of that fib's duration."""
    n = fib_n_lasting(1.0)  # long enough here for many /fast samples, whatever this machine's speed

    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=embedded_server.url, timeout=60) as client:
            await client.get("/fast")  # warm the connection pool
            start = time.perf_counter()
            slow = asyncio.ensure_future(client.get(f"/fib/{n}"))
            await asyncio.to_thread(wait_until, lambda: in_flight(embedded_server.url) == 1, 30, 0.02, "fib in flight")
            fast_times = []
            while not slow.done():
                t0 = time.perf_counter()
                r = await client.get("/fast")
                fast_times.append(time.perf_counter() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.05)
            assert (await slow).json()["value"] == fib_value(n)
            return time.perf_counter() - start, fast_times

    fib_duration, fast_times = asyncio.run(run())
    worst = max(fast_times)
    print(
        f"fib({n}) took {fib_duration * 1000:.0f} ms; {len(fast_times)} /fast meanwhile, worst {worst * 1000:.1f} ms "
        f"({worst / fib_duration:.2%} of the fib)"
    )
    assert len(fast_times) >= 3
    assert worst < 0.10 * fib_duration


BAD_INPUTS = ["-1", "1.5", "abc", str(10**6), "9" * 500, "%D9%A3", "%C2%B3", "%EF%BC%91", "", "41", "1e3", "%20"]


@pytest.mark.parametrize("raw", BAD_INPUTS)
def test_bad_input_is_a_4xx_json_error(embedded_server: ServerProcess, raw: str) -> None:
    r = httpx.get(f"{embedded_server.url}/fib/{raw}")
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == "invalid_n" and body["detail"]


def test_service_is_healthy_after_bad_inputs(embedded_server: ServerProcess) -> None:
    for raw in BAD_INPUTS:
        httpx.get(f"{embedded_server.url}/fib/{raw}")
    assert httpx.get(f"{embedded_server.url}/healthz").status_code == 200
    assert httpx.get(f"{embedded_server.url}/readyz").status_code == 200
    assert httpx.get(f"{embedded_server.url}/fib/10").json()["value"] == 55
    metrics = httpx.get(f"{embedded_server.url}/metrics").text
    # a rejected input never starts a computation
    assert 'compute_api_requests_total{method="GET",route="/fib/{n}",status="500"}' not in metrics


def test_metrics_after_traffic(embedded_server: ServerProcess) -> None:
    httpx.get(f"{embedded_server.url}/fast")
    httpx.get(f"{embedded_server.url}/fib/23")
    httpx.get(f"{embedded_server.url}/fib/-5")
    samples = scrape(embedded_server.url)
    assert samples['compute_api_requests_total{method="GET",route="/fast",status="200"}'] >= 1
    assert samples['compute_api_requests_total{method="GET",route="/fib/{n}",status="200"}'] >= 1
    assert samples['compute_api_requests_total{method="GET",route="/fib/{n}",status="422"}'] >= 1
    assert samples['compute_api_request_duration_seconds_count{method="GET",route="/fib/{n}",status="200"}'] >= 1
    assert samples['compute_api_computations_total{where="dask"}'] >= 1
    assert samples["compute_api_dask_workers"] == 2
    assert samples["compute_api_computations_in_flight"] == 0
    assert samples["compute_api_scheduler_connected"] == 1
    assert samples["process_resident_memory_bytes"] > 0


def test_embedded_cluster_listens_on_loopback_only(embedded_server: ServerProcess) -> None:
    assert embedded_server.proc is not None
    root = psutil.Process(embedded_server.proc.pid)
    listening = [
        (proc.pid, conn.laddr)
        for proc in [root, *root.children(recursive=True)]
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert len(listening) >= 3  # the API, the scheduler (comm + HTTP), the workers
    assert all(addr.ip in {"127.0.0.1", "::1"} for _, addr in listening), listening


def test_sigterm_finishes_in_flight_requests(tmp_path) -> None:
    """Graceful shutdown: a request in flight when SIGTERM arrives still gets its answer."""
    server = ServerProcess(tmp_path, env={"EMBEDDED_WORKERS": "1", "FIB_MAX_N": "40"}).start()
    n = fib_n_lasting(1.0)
    try:

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                pending = asyncio.ensure_future(client.get(f"/fib/{n}"))
                await asyncio.to_thread(wait_until, lambda: in_flight(server.url) == 1, 30, 0.02, "fib in flight")
                assert server.proc is not None
                server.proc.terminate()
                return await pending

        r = asyncio.run(run())
        assert r.status_code == 200 and r.json()["value"] == fib_value(n)
        assert server.proc is not None
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status says "terminated"
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log()
    finally:
        server.stop()
