"""Abandoned requests: 1,000 clients hang up mid-flight; their tasks are released on the cluster and
the API process does not keep anything of them (no task left on the scheduler, no RSS growth).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import psutil
from conftest import DaskProcesses, ServerProcess, scrape, wait_until
from sizing import fib_n_lasting

WAVES = 10
PER_WAVE = 100  # 10 waves of 100 concurrent connections: 1,000 abandoned requests
N = fib_n_lasting(0.3)  # 0.3 s and more each on 2 workers: nearly all of a wave is still queued at the hang-up
RSS_GROWTH_LIMIT_MB = 16.0  # allocator noise; a leak of ~1,000 requests' state would show beyond it


def scheduler_tasks(cluster: DaskProcesses) -> int:
    return cluster.scheduler_call(lambda dask_scheduler: len(dask_scheduler.tasks))


def abandon_wave(server: ServerProcess, cluster: DaskProcesses) -> None:
    """Open PER_WAVE requests, wait until their computations are in flight, then drop every connection."""
    before = scrape(server.url).get("compute_api_computations_total{where=\"dask\"}", 0.0)
    sockets = []
    for _ in range(PER_WAVE):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"GET /fib/{N} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        sockets.append(sock)
    wait_until(lambda: scrape(server.url)["compute_api_computations_total{where=\"dask\"}"] - before == PER_WAVE,
               30, 0.05, f"{PER_WAVE} computations submitted")
    for sock in sockets:
        # RST rather than FIN: the harshest way a client can go away
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def test_abandoned_requests_release_their_tasks_and_memory(tmp_path: Path, dask_cluster_procs: DaskProcesses) -> None:
    cluster = dask_cluster_procs
    # Admission control would turn most of a wave away (that is test_overload's subject); here every
    # request must be admitted so that every one of them is abandoned mid-flight.
    env = {"DASK_SCHEDULER_ADDRESS": cluster.address, "COALESCE": "false", "FIB_MAX_N": "45",
           "MAX_QUEUE_WAIT": "3600", "REQUEST_TIMEOUT": "3600"}
    with ServerProcess(tmp_path, env=env) as server:
        assert server.proc is not None
        api = psutil.Process(server.proc.pid)

        def settled() -> bool:
            return scheduler_tasks(cluster) == 0 and scrape(server.url)["compute_api_computations_in_flight"] == 0

        abandon_wave(server, cluster)  # the first wave warms allocator pools, connection objects, caches
        wait_until(settled, 60, 0.2, "first wave released")
        warm_rss = api.memory_info().rss / 2**20
        t0 = time.perf_counter()
        for _ in range(WAVES - 1):
            abandon_wave(server, cluster)
        wait_until(settled, 60, 0.2, "every abandoned task released")
        took = time.perf_counter() - t0
        final_rss = api.memory_info().rss / 2**20
        samples = scrape(server.url)
        dropped = samples['compute_api_requests_total{method="GET",route="/fib/{n}",status="499"}']
        finished = samples.get('compute_api_requests_total{method="GET",route="/fib/{n}",status="200"}', 0.0)
        released = samples["compute_api_released_computations_total"]
        figure = (f"{WAVES * PER_WAVE} requests abandoned in {WAVES} waves ({took:.1f} s after the warm-up wave): "
                  f"{dropped:.0f} seen as client disconnects (499), {finished:.0f} finished before their client left, "
                  f"{released:.0f} computations cancelled on the cluster; scheduler tasks now "
                  f"{scheduler_tasks(cluster)}; API RSS {warm_rss:.1f} MB after the first wave -> {final_rss:.1f} MB "
                  f"after the last ({final_rss - warm_rss:+.1f} MB)")
        print(figure)
        assert dropped + finished == WAVES * PER_WAVE, figure
        assert dropped >= 0.95 * WAVES * PER_WAVE, figure
        # every dropped request released its computation, running or queued (the release of a running
        # one drops its result), and nothing else was released
        assert released == dropped, figure
        assert final_rss - warm_rss < RSS_GROWTH_LIMIT_MB, figure
        # and the service is fine afterwards
        assert scrape(server.url)["compute_api_scheduler_connected"] == 1
        assert httpx.get(f"{server.url}/fib/25").json() == {"n": 25, "value": 75025}
