"""Cells: the API over several independent Dask clusters, with real `dask scheduler` and `dask worker`
processes. Placement itself (rendezvous hashing, overflow, failover order) is unit-tested in
tests/unit/test_placement.py; these tests prove the wiring, and that no scheduler is a single point of
failure any more."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import DaskProcesses, ServerProcess, scrape, wait_until
from sizing import fib_n_lasting, fib_value


@pytest.fixture
def two_cells(tmp_path: Path) -> Iterator[list[DaskProcesses]]:
    cells: list[DaskProcesses] = []
    try:
        for _ in range(2):  # one after the other: each picks its port while the previous one holds its own
            cells.append(DaskProcesses(tmp_path))
            cells[-1].start_scheduler()
            cells[-1].start_worker()
        for cell in cells:
            cell.wait_for_workers(1)
        yield cells
    finally:
        for cell in cells:
            cell.close()


def server_for(tmp_path: Path, cells: list[DaskProcesses], **env: str) -> ServerProcess:
    return ServerProcess(tmp_path, env={"SCHEDULER_ADDRESSES": ",".join(cell.address for cell in cells),
                                        "FIB_MAX_N": "40", "INLINE_MAX_COST": "0", **env})


def computed(url: str, cells: int = 2) -> list[float]:
    """Computations the API has submitted to each cell."""
    metrics = scrape(url)
    return [metrics[f'compute_api_cell_computations_total{{cell="{i}"}}'] for i in range(cells)]


async def fetch_all(url: str, ns: list[int], timeout: float = 120) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        return list(await asyncio.gather(*(client.get(f"/fib/{n}") for n in ns)))


def assert_right(responses: list[httpx.Response], ns: list[int]) -> None:
    wrong = [(n, r.status_code, r.text[:200]) for n, r in zip(ns, responses, strict=True)
             if r.status_code != 200 or r.json() != {"n": n, "value": fib_value(n)}]
    assert not wrong, wrong


def test_requests_spread_over_the_cells_and_readiness_shows_each(tmp_path: Path,
                                                                two_cells: list[DaskProcesses]) -> None:
    with server_for(tmp_path, two_cells) as server:
        body = httpx.get(f"{server.url}/readyz").json()
        assert body["status"] == "ready" and body["workers"] == 2
        assert [(c["scheduler"], c["ready"], c["workers"]) for c in body["cells"]] == [
            (cell.address, True, 1) for cell in two_cells
        ]
        ns = list(range(5, 25))  # distinct keys, each cheap: rendezvous hashing spreads them
        assert_right(asyncio.run(fetch_all(server.url, ns)), ns)
        per_cell = computed(server.url)
        print(f"{len(ns)} distinct requests over 2 cells: {per_cell} computations")
        # (the cells' names hold random ports, so the split varies; both empty-handed is a 2e-6 chance)
        assert sum(per_cell) == len(ns) and min(per_cell) >= 1, per_cell
        # identical requests meet in one cell and share one computation
        n = fib_n_lasting(0.5)
        before = computed(server.url)
        assert_right(asyncio.run(fetch_all(server.url, [n] * 20)), [n] * 20)
        after = computed(server.url)
        assert sum(after) - sum(before) == 1, (before, after)
        metrics = scrape(server.url)
        assert {metrics[f'compute_api_cell_dask_workers{{cell="{i}"}}'] for i in range(2)} == {1.0}


def test_a_cells_scheduler_lost_under_load_loses_no_request(tmp_path: Path, two_cells: list[DaskProcesses]) -> None:
    """SIGKILL one cell's scheduler with 30 requests in flight: every one is answered 200 with the
    right value (its computation runs again on the other cell), and new requests avoid the lost cell."""
    n = fib_n_lasting(0.3)
    ns = [n + i % 3 for i in range(30)]
    env = {"COALESCE": "false", "MAX_QUEUE_WAIT": "600", "REQUEST_TIMEOUT": "600"}
    with server_for(tmp_path, two_cells, **env) as server:

        async def scenario() -> tuple[list[httpx.Response], int]:
            pending = asyncio.ensure_future(fetch_all(server.url, ns, timeout=600))
            # the event: all 30 submitted, and the victim is computing some of them
            await asyncio.to_thread(wait_until, lambda: scrape(server.url)[
                'compute_api_computations_total{where="dask"}'] == len(ns), 60, 0.05, "all submitted")
            metrics = scrape(server.url)
            victim = max(range(2), key=lambda i: metrics[f'compute_api_cell_computations_in_flight{{cell="{i}"}}'])
            await asyncio.to_thread(wait_until, lambda: two_cells[victim].processing() > 0, 60, 0.05, "processing")
            await asyncio.to_thread(two_cells[victim].stop_scheduler, kill=True)
            return await pending, victim

        responses, victim = asyncio.run(scenario())
        assert_right(responses, ns)
        metrics = scrape(server.url)
        moved = metrics["compute_api_failovers_total"]
        print(f"30 in flight, cell {victim}'s scheduler SIGKILLed: all 200; {moved:.0f} computations moved")
        assert moved > 0
        body = httpx.get(f"{server.url}/readyz").json()
        assert body["status"] == "ready" and not body["cells"][victim]["connected"]
        later = list(range(10, 30))
        assert_right(asyncio.run(fetch_all(server.url, later)), later)


def test_embedded_cells_share_the_workers(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"EMBEDDED_CELLS": "2", "EMBEDDED_WORKERS": "2"}) as server:
        body = httpx.get(f"{server.url}/readyz").json()
        assert body["status"] == "ready"
        assert [(c["ready"], c["workers"]) for c in body["cells"]] == [(True, 1), (True, 1)]
        assert len({c["scheduler"] for c in body["cells"]}) == 2
        ns = list(range(18, 26))
        assert_right(asyncio.run(fetch_all(server.url, ns)), ns)


def test_identical_requests_over_two_replicas_and_two_cells_cost_at_most_two_computations(
        tmp_path: Path, two_cells: list[DaskProcesses]) -> None:
    """Each API replica coalesces what it receives, and both rank the cells alike: 100 identical
    requests spread over 2 replicas meet in one cell as at most one computation per replica."""
    n = fib_n_lasting(1.0)  # long enough for every request to arrive while it runs
    with server_for(tmp_path, two_cells) as first, server_for(tmp_path, two_cells) as second:

        async def both() -> list[list[httpx.Response]]:
            return list(await asyncio.gather(fetch_all(first.url, [n] * 50), fetch_all(second.url, [n] * 50)))

        for responses in asyncio.run(both()):
            assert_right(responses, [n] * 50)
        per_replica = [scrape(s.url)['compute_api_computations_total{where="dask"}'] for s in (first, second)]
        per_cell = [sum(c) for c in zip(computed(first.url), computed(second.url), strict=True)]
    print(f"100 identical requests over 2 replicas and 2 cells: {per_replica} computations per replica, "
          f"{per_cell} per cell")
    assert sum(per_replica) <= 2 and sorted(per_cell)[0] == 0, (per_replica, per_cell)
