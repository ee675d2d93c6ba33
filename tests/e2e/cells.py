"""What the scenarios with several cells (`dask.cells: 2`) share: their cluster is the ``cells``
fixture (e2e/conftest.py); these read it per cell and predict where the API places a request."""

from __future__ import annotations

from typing import Any

import httpx
from _k8s_helpers import env_of

from e2e.runner import Cluster
from service import cells as placement

CELLS = 2


def per_cell(cluster: Cluster, series: str, cell: int) -> float:
    """A per-cell series summed over the API pods."""
    return cluster.api_metric(f'{series}{{cell="{cell}"}}')


def readyz(cluster: Cluster) -> list[httpx.Response]:
    """Every API pod's /readyz, asked directly (the ingress would pick one)."""
    return [cluster.http.get(f"http://{cluster.ip(p)}:{p.spec.port('http')}/readyz") for p in cluster.api_pods()]


def scheduler_addresses(api_deployment: dict[str, Any]) -> list[str]:
    """The API's SCHEDULER_ADDRESSES, in order: a cell's index in /metrics is its place here."""
    return env_of(api_deployment["spec"]["template"]["spec"]["containers"][0])["SCHEDULER_ADDRESSES"].split(",")


def cell_clusters(cluster: Cluster) -> list[str]:
    """The DaskCluster of each cell, by its index in SCHEDULER_ADDRESSES."""
    names = [address.split("//")[1].split("-scheduler.")[0] for address in scheduler_addresses(cluster.api_deployment)]
    assert sorted(names) == sorted(cluster.daskclusters), (names, list(cluster.daskclusters))
    return names


def preferred_cell(addresses: list[str], n: int) -> int:
    """The cell an API pod with these SCHEDULER_ADDRESSES prefers for fib(n): rendezvous hashing
    (service.cells.preferred_cell), the same in every API pod; as an index into ``addresses``."""
    return addresses.index(placement.preferred_cell("fib", (n,), addresses))


def fib_window(low: int, *addresses: list[str], width: int = 3) -> int:
    """The start of ``width`` consecutive n, nearest ``low``, that every cell is preferred for, under
    each of the given SCHEDULER_ADDRESSES (e.g. before and after an upgrade renames the cells): the
    API places fib(n) by rendezvous hashing, so a few keys could all prefer one cell, and another
    would get no load."""
    for start in sorted(range(max(1, low - 4), low + 5), key=lambda n: abs(n - low)):
        if all({preferred_cell(names, n) for n in range(start, start + width)} == set(range(len(names)))
               for names in addresses):
            return start
    raise AssertionError(f"no {width} consecutive n near {low} spread over the cells of {addresses}")
