"""Scenarios 1-6 and 8-11 of `make e2e` (7, mutual TLS, is test_tls.py): the chart's pods
(ci/e2e-values.yaml) in podman behind an nginx ingress, under load.

One cluster serves every scenario in this module, in order; each scenario leaves it with one worker
and two ready API pods. Figures go into the summary table printed at the end of the run.
"""

from __future__ import annotations

import json
import re
import time

import dask.utils
import pytest
import yaml
from _k8s_helpers import as_applied, by_kind, env_of, one, podman, retiring_clusters
from conftest import wait_until
from sizing import fib_n_lasting

from e2e.conftest import E2E_VALUES, NAMESPACE, RELEASE, render
from e2e.load import SUMMARY, LoadDriver, Results, Row, locust_swarm, record, run_locust
from e2e.prometheus import Prometheus, grafana_expression, scrape_configs
from e2e.runner import Cluster

# The first test also waits for the image builds (scripts/build-image.sh, nginx) and the cluster.
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

# /fast's latency objective through the ingress (the Locust SLO gate's default).
FAST_P95_MS = 500
SCHEDULER_OUTAGE_S = 45
RECOVERY_S = 10
ROLLOUT_MAX_FAILURE_RATIO = 0.001


def driver(cluster: Cluster, **kwargs) -> LoadDriver:
    return LoadDriver(cluster.ingress_url, cluster.ingress_host, **kwargs)


def assert_all_answered(results: Results) -> None:
    assert results.sent == results.answered == len(results.samples), (
        f"sent {results.sent}, answered {results.answered}: "
        f"{[s.error for s in results.samples if s.status == 0][:5]}")


def assert_no_failures(results: Results) -> None:
    assert_all_answered(results)
    failures = results.failures
    assert not failures, f"{len(failures)} of {len(results.samples)} failed: {[f.error for f in failures[:5]]}"


def test_0_containers_run_the_rendered_pods(cluster: Cluster) -> None:
    """What runs is what the manifests say: PID 1's argv, environment, user and read-only root, read
    back from inside each container; workers carry the operator's name and the chart's --name."""
    roles = {p.role for p in cluster.pods.values()}
    assert roles == {"scheduler", "worker", "api", "ingress"}, roles
    for pod in (p for p in cluster.pods.values() if p.spec is not None):
        argv = podman("exec", pod.container, "cat", "/proc/1/cmdline").stdout.split("\0")[:-1]
        entrypoint, args = pod.spec.command()
        expected = [*(entrypoint or []), *args]
        # A console script (dask, compute-api) runs as `python <script> ...`: compare from the script on.
        tail = argv[-len(expected):]
        assert tail[1:] == expected[1:] and tail[0].endswith(expected[0]), (argv, expected)
        lines = podman("exec", pod.container, "env").stdout.splitlines()
        env = dict(line.split("=", 1) for line in lines if "=" in line)
        assert pod.spec.env().items() <= env.items(), pod.name
        security = pod.spec.container["securityContext"]
        assert podman("exec", pod.container, "id", "-u").stdout.strip() == str(security["runAsUser"])
        write = podman("exec", pod.container, "touch", "/probe", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        podman("exec", pod.container, "touch", "/tmp/probe")  # the emptyDir stays writable
    for pod in cluster.worker_pods():
        env = pod.spec.env()
        assert env["DASK_WORKER_NAME"] == pod.name  # injected by the operator's own code
        assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{cluster.scheduler_service_aliases[1]}:8786"
        assert pod.name in {w["name"] for w in cluster.scheduler_workers()}
    # The scheduler's HTTP API (what the DaskAutoscaler and scale-down use) is switched on by the chart.
    routes = json.loads(cluster.scheduler.spec.env()["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"])
    assert "distributed.http.scheduler.api" in routes
    assert cluster.http.get(cluster.scheduler_url("/api/v1")).text == "API V1"


def test_1_locust_swarm_through_the_ingress(cluster: Cluster) -> None:
    """The project's locustfile, headless, mixed /fast + /fib for 30 s, with its SLO gate. /fib's n
    20..25 (about 1 to 8 ms here) is under DIRECT_MAX_COST: the API pods send it straight to the
    worker pods' comm port (the preload service.direct that the image declares), past the scheduler,
    and every worker takes those calls."""
    direct_before = cluster.direct_calls()
    csv_prefix = cluster.workdir / "locust" / "swarm"
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    nginx_ip = cluster.ip(cluster.pods["ingress"])
    run = run_locust(f"http://{cluster.ingress_host}", (cluster.ingress_host, nginx_ip), csv_prefix,
                     users=20, spawn_rate=10, run_time="30s",
                     extra=["--fib-n", "20..25", "--slo-fail-ratio", "0", "--slo-fast-p95-ms", str(FAST_P95_MS)])
    print(run.output[-2500:])
    total, fast = run.stats.get("Aggregated"), run.stats.get("/fast")
    assert total and fast, f"no Locust stats:\n{run.output[-3000:]}"
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    direct = cluster.direct_calls(since=direct_before)
    print(f"direct calls by outcome: {direct}")
    SUMMARY.append(Row("1 locust swarm 30s (20 users)", requests, failures, float(total["50%"]),
                       float(total["95%"]), float(total["Requests/s"]),
                       f"/fast p95 {fast['95%']} ms; direct calls {direct['answered']} answered, "
                       f"{direct['refused']} refused"))
    assert requests > 500, requests
    # Cheap /fib went straight to the workers, and no worker failed a direct call.
    assert direct["answered"] > 0 and direct["refused"] == 0, direct
    assert failures == 0, run.output[-3000:]
    assert float(fast["95%"]) <= FAST_P95_MS
    assert run.exit_code == 0, f"Locust's SLO gate failed:\n{run.output[-3000:]}"


def test_2_scale_workers_1_3_1_under_load(cluster: Cluster) -> None:
    """Scale up like the operator (new worker Deployments), down through /api/v1/retire_workers."""
    phase = 15.0

    def computations_per_second() -> float:
        # Counted by the API (distinct Dask computations): coalesced requests do not inflate it.
        before, started = cluster.dask_computations(), time.monotonic()
        time.sleep(phase)
        return (cluster.dask_computations() - before) / (time.monotonic() - started)

    with driver(cluster, fast_users=2, fib_users=6, fib_n=(27, 30), fib_think=0.0) as load:
        time.sleep(3)
        at_one = computations_per_second()
        cluster.scale_workers(3)
        time.sleep(2)
        at_three = computations_per_second()
        retired = cluster.scale_workers(1)
        time.sleep(5)
    results = load.results
    print(f"fib computations/s with 1 worker: {at_one:.1f}; with 3 workers: {at_three:.1f} "
          f"(2 cores, 1 CPU limit per worker); retired {retired}")
    record("2 scale workers 1->3->1", results, f"fib/s 1w {at_one:.1f}, 3w {at_three:.1f}")
    assert_no_failures(results)
    assert len(retired) == 2 and len(cluster.scheduler_workers()) == 1
    assert at_one > 0 and at_three > 0


def test_3_kill_a_worker_mid_load(cluster: Cluster) -> None:
    cluster.scale_workers(2)
    victim = cluster.worker_pods()[-1]
    with driver(cluster, fast_users=2, fib_users=4, fib_n=(27, 30), fib_think=0.0) as load:
        time.sleep(5)
        killed_at = time.monotonic()
        cluster.restart_container(victim)  # SIGKILL; the kubelet starts it again in the same pod
        time.sleep(15)
    results = load.results
    after_kill = results.select("/fib", start=killed_at)
    record("3 podman kill a worker", results, f"{len(after_kill)} fib after the kill")
    assert_no_failures(results)
    assert sum(s.correct for s in after_kill) > 0
    cluster.wait_for_workers(2)  # the restarted worker rejoined under its Deployment's name
    assert victim.name in {w["name"] for w in cluster.scheduler_workers()}
    cluster.scale_workers(1)


def test_4_scheduler_outage_is_answered(cluster: Cluster) -> None:
    """45 s without a scheduler: every request answered (503 + Retry-After), none hangs, the API pods
    stay alive (their liveness probes pass) and recover within 10 s of the scheduler's return."""
    api_before = {p.name: cluster.inspect_state(p) for p in cluster.api_pods()}
    with driver(cluster, fast_users=2, fib_users=4, fib_n=(20, 25), fast_think=0.1, fib_think=0.1) as load:
        time.sleep(5)
        stopped_at = time.monotonic()
        cluster.stop_scheduler()
        time.sleep(SCHEDULER_OUTAGE_S)
        restarted_at = time.monotonic()
        cluster.restart_scheduler()
        deadline = restarted_at + 30
        while not any(s.correct for s in load.results.select("/fib", start=restarted_at)):
            assert time.monotonic() < deadline, "no successful /fib within 30 s of the scheduler's restart"
            time.sleep(0.2)
        time.sleep(5)
    results = load.results
    outage = [s for s in results.samples if stopped_at <= s.started < restarted_at]
    first_success = min(s.started + s.latency for s in results.select("/fib", start=restarted_at) if s.correct)
    recovery = first_success - restarted_at
    refused = [s for s in results.samples if not s.correct]
    unready = {p.name: round(cluster.prober.unready_seconds(p.name, stopped_at, restarted_at), 1)
               for p in cluster.api_pods()}
    print(f"outage: {len(outage)} requests, statuses {results.statuses()}; first /fib success "
          f"{recovery:.1f} s after restart; API pods out of the endpoints (readiness) for {unready} s")
    record("4 scheduler stopped 45s", results, f"recovered in {recovery:.1f}s, {len(refused)} x 503")
    assert_all_answered(results)
    assert all(s.status == 503 and s.retry_after for s in refused), {(s.status, s.error[:80]) for s in refused}
    assert max(s.latency for s in outage) < 35, "a request waited past REQUEST_TIMEOUT during the outage"
    assert all(s.correct for s in results.select("/fast")), "/fast must not depend on the scheduler"
    assert recovery <= RECOVERY_S
    assert not [e for e in cluster.prober.events if e.what == "liveness-restart"], cluster.prober.events
    assert {p.name: cluster.inspect_state(p) for p in cluster.api_pods()} == api_before, "an API container restarted"
    cluster.wait_for_workers(1)


def test_5_rolling_restart_of_the_api(cluster: Cluster) -> None:
    """maxSurge 1 / maxUnavailable 0 behind the ingress, with the chart's preStop and grace period."""
    old = {p.name for p in cluster.api_pods()}
    with driver(cluster, fast_users=3, fib_users=3, fib_n=(20, 25), fast_think=0.02, fib_think=0.02) as load:
        time.sleep(3)
        timings = cluster.rolling_restart_api()
        time.sleep(3)
    results = load.results
    new = {p.name for p in cluster.api_pods()}
    ratio = len(results.failures) / len(results.samples)
    print(f"rollout: {timings}; failure ratio {ratio:.5f}; statuses {results.statuses()}")
    record("5 rolling restart of the API", results, f"failure ratio {ratio:.4f}")
    # The bar is the failure ratio, not "every request answered": a request unlucky enough
    # to hit a keep-alive connection as nginx reloads its upstreams (which stands in for
    # ingress-nginx's reload-free balancer here) is reset, and counts as one of the failures.
    assert len(results.samples) == results.sent
    assert not old & new and len(new) == len(old)
    grace = cluster.api_pods()[0].spec.grace_period()
    assert all(t["terminated_after_s"] < grace for t in timings), "a pod needed SIGKILL: it did not drain in time"
    assert ratio <= ROLLOUT_MAX_FAILURE_RATIO, [f.error for f in results.failures[:5]]


def test_6_adaptive_target_follows_the_load(cluster: Cluster) -> None:
    """What the DaskAutoscaler polls every 5 s: above the worker count under load, back down after."""
    workers = len(cluster.scheduler_workers())
    targets: list[int] = []
    # Many distinct n: identical requests share one computation (coalescing), which would hide the
    # queue from the scheduler. Each lasts 0.5 to 2 s here, sized from this machine's speed: enough
    # occupancy for the target to rise, little enough to stay under each API pod's admission limit.
    # Far above DIRECT_MAX_COST: Dask tasks, which the scheduler queues and counts, not direct calls
    # (service.direct; those count through the workers' heartbeats, tests/test_direct.py).
    low = fib_n_lasting(0.5)
    direct_before = cluster.direct_calls()
    with driver(cluster, fast_users=0, fib_users=24, fib_n=(low, low + 3), fib_think=0.0) as load:
        # The event: the target rises above the worker count; the deadline is generous, not a guess.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(targets) < 10 or max(targets) <= workers):
            targets.append(cluster.scheduler_api("adaptive_target")["workers"])
            time.sleep(1)
    peak = max(targets)
    after = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        after.append(cluster.scheduler_api("adaptive_target")["workers"])
        if after[-1] <= workers:
            break
        time.sleep(1)
    direct = cluster.direct_calls(since=direct_before)
    print(f"adaptive_target with {workers} worker(s): under load {targets}, after {after}; direct calls {direct}; "
          f"statuses {load.results.statuses()}")
    record("6 adaptive target under fib load", load.results, f"target peak {peak}, then {after[-1]}")
    assert direct["answered"] == 0, direct  # the work the target rose for went through the scheduler
    assert peak > workers
    assert after[-1] < peak and after[-1] <= workers


def test_8_prometheus_scrapes_every_pod_and_every_dashboard_query_has_data(cluster: Cluster, tmp_path) -> None:
    """A real Prometheus, configured from the rendered ServiceMonitor and PodMonitors as the Prometheus
    Operator would configure it, scrapes the API pods, the scheduler and every worker; under load,
    every query of the rendered Grafana dashboard (and of its variables) returns data."""
    cluster.scale_workers(2)
    pods = [(p.spec, p.name, cluster.ip(p)) for p in cluster.pods.values() if p.spec is not None]
    configs = scrape_configs(cluster.documents, pods, cluster.namespace)
    expected = {"api": len(cluster.api_pods()), "scheduler": 1, "worker": 2}
    board = json.loads(next(c["data"]["compute-api.json"] for c in by_kind(cluster.documents, "ConfigMap")
                            if c["metadata"]["name"].endswith("-dashboard")))
    interval = dask.utils.parse_timedelta(configs[0]["scrape_interval"])
    variables = {"namespace": cluster.namespace, "release": cluster.release, "datasource": ""}
    queries = {f"{panel['title']} [{target['refId']}]": grafana_expression(target["expr"], variables, interval)
               for panel in board["panels"] for target in panel["targets"]}
    prometheus = Prometheus(tmp_path)
    prometheus.configure(configs)
    with prometheus, driver(cluster, fast_users=2, fib_users=4, fib_n=(20, 24), fib_think=0.05) as load:
        started = time.monotonic()
        # The event: every target scraped successfully (generous deadline: several scrape intervals).
        deadline = started + 60
        while not (targets := prometheus.targets()) or any(t["health"] != "up" for t in targets):
            assert time.monotonic() < deadline, [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets]
            time.sleep(0.5)
        up = time.monotonic() - started
        roles = {}
        for target in targets:
            pod = cluster.pods[target["labels"]["pod"]]
            roles[pod.role] = roles.get(pod.role, 0) + 1
            assert target["labels"]["app_kubernetes_io_instance"] == cluster.release
        assert roles == expected, roles
        # The event: every dashboard query has data (rates need two scrapes inside their window).
        empty = dict(queries)
        deadline = time.monotonic() + 90
        while empty:
            empty = {title: expr for title, expr in empty.items() if not prometheus.query(expr)}
            assert time.monotonic() < deadline, f"dashboard queries without data after 90 s: {empty}"
            time.sleep(1)
        answered = time.monotonic() - started
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"]).groups()
                values = prometheus.label_values(label, metric.replace("$namespace", cluster.namespace))
                assert variables[variable["name"]] in values, (variable["name"], values)
        series = sum(len(prometheus.query(expr)) for expr in queries.values())
    record("8 prometheus + dashboard", load.results,
           f"{len(targets)} targets up in {up:.1f}s, {len(queries)} queries ({series} series) in {answered:.1f}s")
    assert_no_failures(load.results)
    cluster.scale_workers(1)


def test_9_upgrade_to_a_new_image_under_a_locust_swarm(cluster: Cluster, image: str) -> None:
    """`helm upgrade --set image.tag=NEW` under a Locust swarm: the DaskCluster, named after its spec,
    comes up anew beside the old one, the API rolls onto it, and the operator deletes the old
    cluster once its scheduler is idle. Every pod ends on the new image; at most 0.1 % fail."""
    new_image = f"{image}-next"  # the same build under a new tag: to the pods, a new release
    podman("tag", image, new_image)
    old_cluster = cluster.cluster_name
    documents = render(E2E_VALUES, new_image)
    idle_timeout = yaml.safe_load(E2E_VALUES.read_text())["dask"]["upgrade"]["retireAfterIdleSeconds"]
    # What Helm re-applies for the old cluster, from what its `lookup` returns in the namespace.
    retiring = retiring_clusters([as_applied(cluster.daskcluster, RELEASE, NAMESPACE)],
                                 [one(documents, "DaskCluster")["metadata"]["name"]], release=RELEASE,
                                 idle_timeout=idle_timeout)
    csv_prefix = cluster.workdir / "locust" / "upgrade"
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    nginx_ip = cluster.ip(cluster.pods["ingress"])
    swarm = locust_swarm(f"http://{cluster.ingress_host}", (cluster.ingress_host, nginx_ip), csv_prefix,
                         users=10, spawn_rate=10, extra=["--fib-n", "20..25"])
    with swarm as runs:
        # The event: the swarm's requests reach the API pods.
        deadline = time.monotonic() + 60
        while cluster.api_requests() < 50:
            assert time.monotonic() < deadline, "the Locust swarm sent nothing within 60 s"
            time.sleep(0.5)
        started = time.monotonic()
        timings = cluster.upgrade(documents, retiring)
        rolled = time.monotonic() - started
        retired = cluster.retire_idle_clusters()[old_cluster]
        assert cluster.api_requests() > 0  # still served after the old cluster is gone
    (run,) = runs
    total = run.stats.get("Aggregated")
    assert total, f"no Locust stats:\n{run.output[-3000:]}"
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    ratio = failures / requests
    SUMMARY.append(Row("9 helm upgrade (new image) under Locust", requests, failures, float(total["50%"]),
                       float(total["95%"]), float(total["Requests/s"]),
                       f"rolled in {rolled:.0f}s, old cluster deleted {retired:.0f}s later, failure ratio {ratio:.4f}"))
    print(f"rollout {timings}; old cluster {old_cluster} deleted {retired:.1f} s after the rollout")
    images = {pod.name: podman("inspect", "--format", "{{.ImageName}}", pod.container).stdout.strip()
              for pod in cluster.pods.values() if pod.spec is not None}
    assert set(images.values()) == {new_image}, images
    assert {pod.role for pod in cluster.pods.values() if pod.spec is not None} == {"api", "scheduler", "worker"}
    assert not [name for name in cluster.pods if name.startswith(f"{old_cluster}-")], "the old cluster is left"
    assert requests > 100 and ratio <= ROLLOUT_MAX_FAILURE_RATIO, run.output[-3000:]


def test_10_scale_to_zero_and_back(cluster: Cluster) -> None:
    """dask.autoscaler.minimum 0 under the operator's autoscaler logic: an idle cluster goes to no
    workers; requests that arrive then are held (COLD_START_QUEUE), the scheduler's adaptive target
    rises, a worker starts and every held request is answered; idle again, the cluster returns to 0."""
    assert one(cluster.documents, "DaskAutoscaler")["spec"]["minimum"] == 0
    n = fib_n_lasting(0.2)
    with cluster.autoscaler() as decisions:
        wait_until(lambda: not cluster.worker_pods(), 90, interval=0.5, what="the idle cluster to scale to zero")
        assert all(p.name in cluster.prober.ready for p in cluster.api_pods()), "ready: able to hold work"
        sent = time.monotonic()
        with driver(cluster, fast_users=1, fib_users=4, fib_n=(n, n + 2), fib_think=0.5) as load:
            wait_until(lambda: sum(s.correct for s in load.results.select("/fib")) >= 4, 120, interval=0.5,
                       what="held requests answered once a worker started")
        first_answer = min(s.started + s.latency for s in load.results.select("/fib") if s.correct) - sent
        wait_until(lambda: not cluster.worker_pods(), 120, interval=0.5, what="the cluster to return to zero when idle")
    steps = [(round(t - sent, 1), before, after) for t, before, after in decisions[cluster.cluster_name]]
    print(f"autoscaler decisions (s after the first request, from, to): {steps}")
    record("10 scale to zero and back", load.results,
           f"from 0 workers: first /fib in {first_answer:.1f}s; idle, back to 0 at {steps[-1][0]:.0f}s")
    assert_no_failures(load.results)
    assert [step[1:] for step in steps][-2:] == [(0, 1), (1, 0)], steps
    cluster.scale_workers(1)


def test_11_a_frozen_worker_is_replaced_promptly(cluster: Cluster) -> None:
    """A node stops answering: its worker freezes without closing a connection, and the Deployment
    controller starts a replacement pod, which keeps the worker's name. The scheduler refuses a name
    that is still registered until worker-ttl expires the old one: 30 s in the chart, not distributed's
    5 minutes. The scheduler checks every worker-ttl and then gives the frozen nanny 30 s to restart
    its worker (distributed's check_worker_ttl / restart_workers), so the replacement joins within
    2 x ttl + 30 s (about 1.5 minutes rather than up to 10.5) and serves."""
    scheduler_env = env_of(cluster.scheduler.spec.container)
    ttl = dask.utils.parse_timedelta(scheduler_env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"])
    (frozen,) = cluster.worker_pods()
    old_address = {w["name"]: w["address"] for w in cluster.scheduler_workers()}[frozen.name]
    cluster.freeze(frozen)
    frozen_at = time.monotonic()
    replacement = cluster.replace_frozen_worker(frozen)

    def replacement_registered() -> bool:
        addresses = {w["name"]: w["address"] for w in cluster.scheduler_workers()}
        return addresses.get(frozen.name, old_address) != old_address

    bound = 2 * ttl + 30
    wait_until(replacement_registered, bound + 60, interval=0.5, what="the replacement registered under its name")
    joined = time.monotonic() - frozen_at
    n = fib_n_lasting(0.1)
    with driver(cluster, fast_users=0, fib_users=2, fib_n=(n, n + 2)) as load:
        wait_until(lambda: sum(s.correct for s in load.results.select("/fib")) >= 5, 60, interval=0.5,
                   what="answers from the replacement")
    cluster.remove_frozen()
    record("11 frozen worker replaced", load.results,
           f"replacement joined {joined:.0f}s after the freeze (ttl {ttl:g}s)")
    print(f"replacement {replacement.name} joined {joined:.1f} s after the freeze; worker-ttl {ttl:g} s")
    assert_no_failures(load.results)
    assert joined <= bound + 30  # plus the replacement's registration retries

