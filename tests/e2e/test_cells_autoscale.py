"""Scenarios 13 and 14 of `make e2e`: two cells (`dask.cells: 2`, the ``cells`` fixture) through the
autoscaler and the upgrade path, which the issue requires of `dask.cells: N` ("works with the upgrade
path and scale to zero").

13: each cell's own DaskAutoscaler (minimum 0 in ci/e2e-values.yaml) takes its idle cell to no
workers; a /fib request then brings back the cell the API places it on, and only that one, and is
answered right; a request for the other cell brings that one back; under load over both cells
nothing is lost, and idle again both return to zero. What the API does with a zero-worker cell is
the product's: placement ranks the cells by the request's key alone (service/cells.py), and a cell
with no workers but a cold-start queue (COLD_START_QUEUE, set by the chart with minimum 0) "serves",
so the request waits there for that cell's autoscaler even while the other cell has a worker.

14: `helm upgrade --set image.tag=NEW` under load: both cells are renamed (their spec changed), the
new pair comes up beside the old, the API rolls onto it, and the operator deletes both old clusters
once idle. No request fails.
"""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from _k8s_helpers import as_applied, by_kind, podman, retiring_clusters
from conftest import wait_until
from sizing import fib_n_lasting, fib_value

from e2e.cells import CELLS, cell_clusters, fib_window, per_cell, preferred_cell, scheduler_addresses
from e2e.conftest import E2E_VALUES, NAMESPACE, RELEASE, render
from e2e.load import LoadDriver, Results, Sample, record
from e2e.runner import Cluster

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

COMPUTED = "compute_api_cell_computations_total"
# /fib answers to see under load over both cells (scenario 13) and through the upgrade (14).
LOAD_ANSWERS = 60


def driver(cluster: Cluster, **kwargs) -> LoadDriver:
    return LoadDriver(cluster.ingress_url, cluster.ingress_host, **kwargs)


def get_fib(cluster: Cluster, n: int, timeout: float = 60) -> Sample:
    """One GET /fib/n through the ingress, waited for (longer than the API's REQUEST_TIMEOUT)."""
    started = time.monotonic()
    try:
        answer = cluster.http.get(f"{cluster.ingress_url}/fib/{n}", headers={"Host": cluster.ingress_host},
                                  timeout=timeout)
    except httpx.HTTPError as exc:
        return Sample("/fib", started, time.monotonic() - started, 0, False, False, repr(exc))
    correct = answer.status_code == 200 and answer.json() == {"n": n, "value": fib_value(n)}
    return Sample("/fib", started, time.monotonic() - started, answer.status_code, "retry-after" in answer.headers,
                  correct, "" if correct else f"HTTP {answer.status_code}: {answer.text[:200]}")


def computed(cluster: Cluster) -> list[float]:
    """Computations each cell has run, summed over the API pods."""
    return [per_cell(cluster, COMPUTED, cell) for cell in range(CELLS)]


def brings_back(cluster: Cluster, decisions: dict[str, list[tuple[float, int, int]]], n: int, cell: int) -> Sample:
    """GET /fib/n while ``cell`` has no workers: answered right, computed in ``cell`` alone, whose
    autoscaler's last step was 0 -> 1."""
    before = computed(cluster)
    sample = get_fib(cluster, n)
    assert sample.correct, sample.error
    after = computed(cluster)
    added = [a - b for a, b in zip(after, before, strict=True)]
    assert added == [int(i == cell) for i in range(CELLS)], (before, after)
    assert decisions[cell_clusters(cluster)[cell]][-1][1:] == (0, 1), decisions
    return sample


def assert_no_failures(results: Results) -> None:
    assert results.sent == results.answered == len(results.samples), (
        f"sent {results.sent}, answered {results.answered}: {[s.error for s in results.samples if s.status == 0][:5]}")
    failures = results.failures
    assert not failures, f"{len(failures)} of {len(results.samples)} failed: {[f.error for f in failures[:5]]}"


def test_13_both_cells_scale_to_zero_and_a_request_brings_back_its_own(cells: Cluster) -> None:
    cluster = cells
    names = cell_clusters(cluster)  # by cell index
    autoscalers = by_kind(cluster.documents, "DaskAutoscaler")
    assert sorted(a["spec"]["cluster"] for a in autoscalers) == sorted(names), "a DaskAutoscaler per cell"
    assert all(a["spec"]["minimum"] == 0 for a in autoscalers)
    addresses = scheduler_addresses(cluster.api_deployment)
    n = fib_n_lasting(0.2)
    first = preferred_cell(addresses, n)
    second = 1 - first
    m = next(k for k in range(n + 1, n + 20) if preferred_cell(addresses, k) == second)
    low = fib_window(n, addresses)
    samples: list[Sample] = []
    with cluster.autoscaler() as decisions:
        # Both idle cells go to zero, each by its own autoscaler.
        wait_until(lambda: not any(cluster.worker_pods(name) for name in names), 120, interval=0.5,
                   what="both idle cells to scale to zero")
        for name in names:
            cluster.wait_for_workers(0, cluster=name)
            assert [step[1:] for step in decisions[name]] == [(1, 0)], decisions
        assert all(p.name in cluster.prober.ready for p in cluster.api_pods()), "ready: able to hold work"

        # One request: its cell, and only that one, comes back; the answer is right.
        samples.append(brings_back(cluster, decisions, n, first))
        assert not cluster.worker_pods(names[second]) and [step[1:] for step in decisions[names[second]]] == [(1, 0)]

        # A request the other cell is preferred for, sent at once (its first cell may still have its
        # worker): the API holds it on its own cold cell, whose autoscaler brings a worker back.
        warm_elsewhere = len(cluster.worker_pods(names[first]))
        samples.append(brings_back(cluster, decisions, m, second))
        first_back, second_back = (sample.latency for sample in samples)
        again = computed(cluster)

        # Load over both cells (whatever each one's worker count meanwhile): nothing is lost.
        with driver(cluster, fast_users=1, fib_users=4, fib_n=(low, low + 2), fib_think=0.3) as load:
            wait_until(lambda: sum(s.correct for s in load.results.select("/fib")) >= LOAD_ANSWERS, 180,
                       interval=0.5, what="/fib answered under load over both cells")
        loaded = computed(cluster)
        assert all(loaded[cell] > again[cell] for cell in range(CELLS)), (again, loaded)
        idle_from = time.monotonic()
        wait_until(lambda: not any(cluster.worker_pods(name) for name in names), 180, interval=0.5,
                   what="both cells to return to zero when idle")
        back_to_zero = time.monotonic() - idle_from
    steps = {name: [(round(t - samples[0].started, 1), a, b) for t, a, b in decisions[name]] for name in names}
    print(f"autoscaler decisions per cell (s after the first request, from, to): {steps}; first request "
          f"answered in {first_back:.1f} s by cell {first}, the other cell's in {second_back:.1f} s by cell "
          f"{second} (cell {first} had {warm_elsewhere} worker(s) then); idle, both at 0 {back_to_zero:.0f} s "
          f"after the load")
    results = load.results
    combined = Results(samples + results.samples, results.sent + 2, results.answered + 2,
                       time.monotonic() - samples[0].started)
    record("13 two cells: zero and back", combined,
           f"cell {first} from 0: {first_back:.1f}s; cell {second} from 0: {second_back:.1f}s "
           f"(other cell {warm_elsewhere} worker); both at 0 {back_to_zero:.0f}s after load")
    assert_no_failures(combined)
    for name in names:  # as every scenario leaves its cluster: a worker per cell
        cluster.scale_workers(1, cluster=name)


def test_14_upgrade_with_two_cells_under_load(cells: Cluster, image: str) -> None:
    cluster = cells
    new_image = f"{image}-next"  # the same build under a new tag: to the pods, a new release
    podman("tag", image, new_image)
    old = list(cluster.daskclusters)
    assert all(len(cluster.worker_pods(name)) == 1 for name in old)
    documents = render(E2E_VALUES, new_image, [f"dask.cells={CELLS}"])
    new = [c["metadata"]["name"] for c in by_kind(documents, "DaskCluster")]
    assert len(new) == CELLS and not set(new) & set(old), (old, new)
    idle_timeout = yaml.safe_load(E2E_VALUES.read_text())["dask"]["upgrade"]["retireAfterIdleSeconds"]
    # What Helm re-applies for the old clusters, from what its `lookup` returns in the namespace.
    retiring = retiring_clusters([as_applied(c, RELEASE, NAMESPACE) for c in cluster.daskclusters.values()], new,
                                 release=RELEASE, idle_timeout=idle_timeout)
    assert sorted(doc["metadata"]["name"] for doc in retiring) == sorted(old)
    new_api = next(d for d in by_kind(documents, "Deployment")
                   if d["metadata"]["labels"].get("app.kubernetes.io/component") == "api")
    # n that load every cell, the old ones before the rollout and the new ones after it.
    low = fib_window(fib_n_lasting(0.05), scheduler_addresses(cluster.api_deployment), scheduler_addresses(new_api))
    with driver(cluster, fast_users=2, fib_users=4, fib_n=(low, low + 2), fast_think=0.05, fib_think=0.05) as load:
        start = computed(cluster)
        wait_until(lambda: all(a > b for a, b in zip(computed(cluster), start, strict=True)), 120,
                   what="computations in both old cells")
        started = time.monotonic()
        timings = cluster.upgrade(documents, retiring)
        rolled = time.monotonic() - started
        # The new API pods (their /metrics count from 0) compute in both new cells.
        wait_until(lambda: all(count > 0 for count in computed(cluster)), 120, what="computations in both new cells")
        retired = cluster.retire_idle_clusters()
        after = time.monotonic()
        wait_until(lambda: sum(s.correct for s in load.results.select("/fib", start=after)) >= LOAD_ANSWERS, 120,
                   interval=0.5, what="/fib answered once the old cells are gone")
    results = load.results
    print(f"two-cell upgrade: rollout {timings}; rolled in {rolled:.1f} s; old clusters deleted {retired}; "
          f"statuses {results.statuses()}")
    record("14 two cells: helm upgrade under load", results,
           f"rolled in {rolled:.0f}s, old cells deleted {max(retired.values()):.0f}s later")
    assert sorted(retired) == sorted(old)
    assert sorted(cluster.daskclusters) == sorted(new)
    images = {pod.name: podman("inspect", "--format", "{{.ImageName}}", pod.container).stdout.strip()
              for pod in cluster.pods.values() if pod.spec is not None}
    assert set(images.values()) == {new_image}, images
    assert not [name for name in cluster.pods if any(name.startswith(f"{o}-") for o in old)], "an old cell is left"
    for name in new:
        assert len(cluster.scheduler_workers(name)) == 1, name
    assert_no_failures(results)
