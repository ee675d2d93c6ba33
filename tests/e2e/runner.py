"""The chart's pods as podman containers: a cluster in a box.

``Cluster`` takes `helm template` output and plays the parts a real cluster would play, and only
those: the operator (scheduler and worker Deployments built by its own code, scale-up with fresh
worker names, scale-down through the scheduler's /api/v1/retire_workers), the kubelet (env and
`$(VAR)` resolution, securityContext, volumes, probes, restartPolicy, preStop + grace period), the
Deployment controller (maxSurge/maxUnavailable rollout), CoreDNS (network aliases for Service
names) and the ingress controller (nginx configured from the Ingress, endpoints = ready API pods).
Every DaskCluster the chart renders runs (``dask.cells``: one scheduler and its workers per cell);
methods that act on one take its name (``cluster=``), by default the first.
Commands, arguments, environment, ports and images are taken verbatim from the manifests.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _k8s_helpers import by_kind, one, operator_pods, podman, podman_env

from e2e.ingress import CONFIG_DIR, NGINX_CONTAINERFILE, nginx_config, routes, target_port
from e2e.pods import PodContainer, containers_of, operator_worker_pod, pod_name
from e2e.probes import Prober

RUN_LABEL = "compute-api-e2e"


PAUSE_CONTAINERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ENTRYPOINT ["sleep", "infinity"]
"""


def build_local_image(containerfile: str, base_image: str, name: str) -> str:
    """A helper image built FROM the local Debian base (nothing can be pulled here): nginx, and the
    pods' infra ("pause") container, which podman would otherwise build from catatonit. Tagged by
    content, so an edited Containerfile or a new base is rebuilt and an unchanged one is reused."""
    digest = hashlib.sha256(f"{base_image}\n{containerfile}".encode()).hexdigest()[:12]
    tag = f"{name}:{digest}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory() as context:  # the build needs no files
        build = subprocess.run(
            ["podman", "build", "--network", "host", "--volume", "/etc/ssl/certs:/etc/ssl/certs:ro",
             "--build-arg", f"BASE_IMAGE={base_image}", "--tag", tag, "--file", "-", context],
            input=containerfile, capture_output=True, text=True, timeout=900, env=podman_env(),
        )
    assert build.returncode == 0, f"building {tag} failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    return tag


def base_image() -> str:
    """The Debian base scripts/build-image.sh used: the official image if present, else the local one."""
    for candidate in ("docker.io/library/python:3.11-slim-bookworm", "localhost/python-base:bookworm"):
        if podman("image", "exists", candidate, check=False).returncode == 0:
            return candidate
    raise AssertionError("no Python base image: run scripts/build-image.sh (it builds localhost/python-base:bookworm)")


# -- what any test needs to run the chart's pods (tests/e2e, tests/test_image.py) --------------------


@dataclass(frozen=True)
class HelperImages:
    """The images a cluster runs besides the project's: the ingress controller and the pods' infra."""

    nginx: str
    pause: str


@functools.cache
def build_helper_images() -> HelperImages:
    """Built once per session, FROM the base the project's image was built on (so build that first:
    ``_k8s_helpers.built_image``); every test that runs the chart's pods shares them."""
    base = base_image()
    return HelperImages(
        nginx=build_local_image(NGINX_CONTAINERFILE, base, "localhost/compute-api-e2e-nginx"),
        pause=build_local_image(PAUSE_CONTAINERFILE, base, "localhost/compute-api-e2e-pause"),
    )


def image_values(image: str) -> list[str]:
    """``helm --set`` assignments that make the chart's pods run ``image``, the locally built tag."""
    repository, tag = image.rsplit(":", 1)
    return [f"image.repository={repository}", f"image.tag={tag}"]


def one_off(image: str, *command: str, network: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` run to completion in a throw-away container of ``image``: the image's own user,
    a read-only root with a writable /tmp (what every pod of the chart gets), optionally on a
    cluster's network (a client the chart does not define). ``check=False``: callers assert on the
    exit code and the output, which is what they are about."""
    options = ["--network", network] if network else []
    return podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", *options, image, *command,
                  timeout=timeout, check=False)


@dataclass
class Pod:
    role: str  # scheduler | worker | api | ingress
    name: str  # the pod's name (its hostname); for a worker, also its Deployment's name and DASK_WORKER_NAME
    container: str  # the podman container
    spec: PodContainer | None = None
    pod: str = ""  # the podman pod holding the network namespace
    started: float = field(default_factory=time.monotonic)


class Cluster:
    def __init__(self, documents: list[dict[str, Any]], namespace: str, workdir: Path, nginx_image: str,
                 pause_image: str, secrets: dict[str, Path] | None = None) -> None:
        self.documents = documents
        self.namespace = namespace
        self.workdir = workdir
        self.nginx_image = nginx_image
        self.secrets = secrets or {}
        self.prefix = f"e2e-{uuid.uuid4().hex[:6]}"
        self.network = self.prefix
        self.daskclusters = {c["metadata"]["name"]: c for c in by_kind(documents, "DaskCluster")}
        self.daskcluster = next(iter(self.daskclusters.values()))  # the first cell (the only one by default)
        self.cluster_name = self.daskcluster["metadata"]["name"]
        self.release = self.daskcluster["metadata"]["labels"]["app.kubernetes.io/instance"]
        self.retiring: dict[str, dict[str, Any]] = {}  # older DaskClusters draining after an upgrade
        self.api_deployment = next(d for d in by_kind(documents, "Deployment")
                                   if d["metadata"]["labels"].get("app.kubernetes.io/component") == "api")
        self.config_maps = {c["metadata"]["name"]: c["data"] for c in by_kind(documents, "ConfigMap")}
        self.services = {s["metadata"]["name"]: s for s in by_kind(documents, "Service")}
        self.routes = routes(one(documents, "Ingress"))
        self.pods: dict[str, Pod] = {}
        self.nginx_dir = workdir / "nginx"
        self.log_dir = workdir / "logs"
        self.pause_image = pause_image
        self.http = httpx.Client(timeout=10)
        self._ips: dict[str, str] = {}
        self.stopped: set[str] = set()  # pods whose container is deliberately stopped (no probes)
        self.terminating: set[str] = set()  # pods being deleted: out of the endpoints
        self._ingress_lock = threading.Lock()
        self.prober = Prober(self, self.configure_ingress)

    # -- podman --------------------------------------------------------------------------------------

    def _run_pod(self, role: str, name: str, pod: dict[str, Any], aliases: list[str] = (),
                 hostname: str | None = None) -> Pod:
        (container,) = containers_of(pod, self.config_maps, self.secrets)  # every pod here has one container
        pod_name = f"{self.prefix}-{name}"
        labels = {RUN_LABEL: self.prefix, "role": role}
        # The kubelet's truncatePodHostnameIfNeeded: a pod name longer than 63 becomes a 63-character
        # hostname without a trailing '-' or '.' (a worker's name is long: <cluster>-default-worker-...).
        hostname = (hostname or name)[:63].rstrip("-.")
        podman(*container.pod_args(pod_name, hostname, self.network, list(aliases), labels, self.pause_image))
        podman(*container.run_args(f"{pod_name}-{container.container['name']}", pod_name, labels))
        self.pods[name] = Pod(role, name, f"{pod_name}-{container.container['name']}", container, pod_name)
        return self.pods[name]

    def ip(self, pod: Pod) -> str:
        if pod.pod not in self._ips:  # a pod keeps its IP for its whole life, container restarts included
            infra = podman("pod", "inspect", pod.pod, "--format", "{{.InfraContainerID}}").stdout.strip()
            info = json.loads(podman("inspect", infra).stdout)[0]
            self._ips[pod.pod] = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        return self._ips[pod.pod]

    def inspect_state(self, pod: Pod) -> dict[str, Any]:
        info = json.loads(podman("inspect", pod.container).stdout)[0]
        return {"restarts": info["RestartCount"], "started": info["State"]["StartedAt"],
                "status": info["State"]["Status"]}

    def _probe_ok(self, pod: Pod, probe: dict[str, Any]) -> bool:
        get = probe["httpGet"]
        url = f"http://{self.ip(pod)}:{pod.spec.port(get['port'])}{get['path']}"
        try:
            return 200 <= self.http.get(url, timeout=probe.get("timeoutSeconds", 1)).status_code < 400
        except httpx.HTTPError:
            return False

    def wait_ready(self, pod: Pod, timeout: float = 90) -> None:
        """The kubelet's startup, then readiness probe (polled faster than periodSeconds: only the
        time to notice readiness differs)."""
        probes = [pod.spec.container[k] for k in ("startupProbe", "readinessProbe") if k in pod.spec.container]
        deadline = time.monotonic() + timeout
        for probe in probes:
            while not self._probe_ok(pod, probe):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{pod.name} not ready within {timeout}s\n{self.logs(pod)[-3000:]}")
                time.sleep(0.5)
        if pod.role == "api":
            self.prober.mark_ready(pod)

    def logs(self, pod: Pod) -> str:
        result = podman("logs", pod.container, check=False)
        return result.stdout + result.stderr

    def _delete_pod(self, pod: Pod, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after the grace period, like the kubelet deleting a pod."""
        if grace is None:
            grace = pod.spec.grace_period()
        podman("stop", "--time", str(max(0, int(grace))), pod.container, timeout=grace + 60)
        self._save_logs(pod)
        self.prober.forget(pod)
        self.pods.pop(pod.name, None)
        self.terminating.discard(pod.name)
        podman("pod", "rm", "--force", "--time", "0", pod.pod)

    def _save_logs(self, pod: Pod) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{pod.name}.log", "a") as log:
            log.write(self.logs(pod))

    # -- pods outside the controllers (tests/test_image.py): same kubelet, nobody manages them --------

    def create_network(self) -> None:
        """The cluster's network: ``start`` creates it; a test running only its own pods calls this."""
        podman("network", "create", "--label", f"{RUN_LABEL}={self.prefix}", self.network)

    def run_pod(self, role: str, name: str, pod: dict[str, Any]) -> Pod:
        """``pod`` (a pod template, e.g. a variant of one the chart renders) translated exactly like
        the cluster's own pods, but owned by no controller: not probed, not in the endpoints."""
        return self._run_pod(role, name, pod)

    def run_to_completion(self, pod: dict[str, Any], hosts: dict[str, str] | None = None,
                          timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A restartPolicy Never pod (the chart's `helm test` hook) run once on the cluster's network,
        as the kubelet runs it; ``hosts`` (name -> IP) stand in for Service names this box has no DNS
        for. ``check=False``: callers assert on the exit code and the output."""
        assert pod["spec"].get("restartPolicy") == "Never", "only a pod that runs once runs to completion"
        (container,) = containers_of(pod, self.config_maps, self.secrets)
        options = ["--network", self.network, "--label", f"{RUN_LABEL}={self.prefix}"]
        options += [f"--add-host={name}:{address}" for name, address in (hosts or {}).items()]
        return podman("run", "--rm", *options, *container.container_args(), timeout=timeout, check=False)

    # -- the whole cluster ---------------------------------------------------------------------------

    def start(self, workers: int | None = None) -> Cluster:
        self.create_network()
        for name, daskcluster in self.daskclusters.items():
            self.start_scheduler(daskcluster)
            for _ in range(daskcluster["spec"]["worker"]["replicas"] if workers is None else workers):
                self.add_worker(name)
        for name in self.daskclusters:
            self.wait_for_workers(len(self.worker_pods(name)), cluster=name)
        for _ in range(self.api_deployment["spec"]["replicas"]):
            self.wait_ready(self.start_api_pod())
        self.start_ingress()
        self.prober.start()
        return self

    def close(self) -> None:
        self.prober.stop()
        for pod in list(self.pods.values()):
            with contextlib.suppress(Exception):
                self._save_logs(pod)
        podman("rm", "--force", "--time", "0", "--filter", f"label={RUN_LABEL}={self.prefix}", check=False)
        for pod in list(self.pods.values()):
            podman("rm", "--force", "--time", "0", pod.container, check=False)
            if pod.pod:
                podman("pod", "rm", "--force", "--time", "0", pod.pod, check=False)
        podman("network", "rm", "--force", self.network, check=False)
        self.http.close()

    # -- scheduler (the operator's scheduler Deployment + Service) -----------------------------------

    @property
    def scheduler(self) -> Pod:
        return self.scheduler_of()

    def scheduler_of(self, cluster: str | None = None) -> Pod:
        """A cell's scheduler pod (by default the first cell's)."""
        return self.pods[f"{cluster or self.cluster_name}-scheduler"]

    @property
    def scheduler_service_aliases(self) -> list[str]:
        return self.service_aliases(self.cluster_name)

    def service_aliases(self, cluster: str) -> list[str]:
        service = f"{cluster}-scheduler"
        return [service, f"{service}.{self.namespace}.svc.cluster.local"]

    def start_scheduler(self, daskcluster: dict[str, Any] | None = None) -> Pod:
        daskcluster = daskcluster or self.daskcluster
        name = daskcluster["metadata"]["name"]
        pod = operator_pods(daskcluster)["scheduler"]
        # The Deployment is named <cluster>-scheduler; this container stands for its one pod.
        deployment = f"{name}-scheduler"
        scheduler = self._run_pod("scheduler", deployment, pod, self.service_aliases(name), pod_name(deployment))
        self.wait_ready(scheduler)
        return scheduler

    def scheduler_url(self, path: str, cluster: str | None = None) -> str:
        scheduler = self.scheduler_of(cluster)
        return f"http://{self.ip(scheduler)}:{scheduler.spec.port('http-dashboard')}{path}"

    def scheduler_api(self, path: str, body: dict[str, Any] | None = None, cluster: str | None = None) -> Any:
        url = self.scheduler_url(f"/api/v1/{path}", cluster)
        response = self.http.post(url, json=body, timeout=60) if body is not None else self.http.get(url)
        assert response.status_code == 200, f"{url}: HTTP {response.status_code} {response.text[:300]}"
        return response.json()

    def stop_scheduler(self, cluster: str | None = None) -> None:
        scheduler = self.scheduler_of(cluster)
        self.stopped.add(scheduler.name)
        podman("stop", "--time", str(scheduler.spec.grace_period()), scheduler.container, timeout=120)

    def kill_scheduler(self, cluster: str | None = None) -> None:
        """SIGKILL a cell's scheduler container, as a crash or an OOM kill would end it: no goodbye
        to its clients or workers, every task it held is lost. It stays down until
        restart_scheduler(cluster) (the kubelet's restart) and is not probed meanwhile."""
        scheduler = self.scheduler_of(cluster)
        self.stopped.add(scheduler.name)
        podman("kill", "--signal", "KILL", scheduler.container)
        podman("wait", scheduler.container, timeout=60)

    def restart_scheduler(self, cluster: str | None = None) -> None:
        scheduler = self.scheduler_of(cluster)
        podman("start", scheduler.container)
        scheduler.started = time.monotonic()
        self.stopped.discard(scheduler.name)
        self.wait_ready(scheduler)

    # -- workers (the operator's DaskWorkerGroup <cluster>-default) ----------------------------------

    def worker_pods(self, cluster: str | None = None) -> list[Pod]:
        """A current DaskCluster's workers, by default the first cell's (during an upgrade, the old
        cluster's still drain)."""
        prefix = f"{cluster or self.cluster_name}-default-"
        # a snapshot: each cell's autoscaler thread adds and deletes pods while others look
        return [p for p in list(self.pods.values()) if p.role == "worker" and p.name.startswith(prefix)]

    def add_worker(self, cluster: str | None = None) -> Pod:
        daskcluster = self.daskclusters[cluster] if cluster else self.daskcluster
        name, pod = operator_worker_pod(daskcluster, self.namespace)
        # The operator names the Deployment; the ReplicaSet controller names its pod (the hostname).
        return self._run_pod("worker", name, pod, hostname=pod_name(name))

    def scheduler_workers(self, cluster: str | None = None) -> list[dict[str, str]]:
        return self.scheduler_api("get_workers", cluster=cluster)["workers"]

    def wait_for_workers(self, n: int, timeout: float = 90, cluster: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                if len(self.scheduler_workers(cluster)) == n:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} workers on {cluster or self.cluster_name}'s scheduler "
                                     f"within {timeout}s")
            time.sleep(0.5)

    def scale_workers(self, replicas: int, cluster: str | None = None) -> list[str]:
        """`kubectl scale daskworkergroup <cluster>-default --replicas=N` (by default the first
        cell's), as the operator applies it (controller.py daskworkergroup_replica_update, l.645-737)."""
        needed = replicas - len(self.worker_pods(cluster))
        for _ in range(max(0, needed)):
            self.add_worker(cluster)
        retired: list[str] = []
        if needed < 0:
            # The operator's retire_workers() (l.446-467): the scheduler picks and retires them
            # gracefully, and the operator deletes the Deployments named after the retired workers.
            answer = self.scheduler_api("retire_workers", {"n": -needed}, cluster=cluster)
            retired = [info["name"] for info in answer.values()]
            assert len(retired) == -needed, answer
            for name in retired:
                self._delete_pod(self.pods[name])
        self.wait_for_workers(replicas, cluster=cluster)
        return retired

    def restart_container(self, pod: Pod) -> None:
        """SIGKILL the container's process; the kubelet starts it again in the same pod (same IP)."""
        podman("kill", "--signal", "KILL", pod.container)
        podman("start", pod.container)
        pod.started = time.monotonic()

    # -- API (the Deployment) and the ingress --------------------------------------------------------

    def api_metric(self, series: str) -> float:
        """The sum over the API pods of every /metrics sample whose line starts with ``series``."""
        total = 0.0
        for pod in self.api_pods():
            for line in self.http.get(f"http://{self.ip(pod)}:{pod.spec.port('http')}/metrics").text.splitlines():
                if line.startswith(series):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def dask_computations(self) -> float:
        """Distinct computations the API pods have submitted to the cluster, i.e. work the workers
        did, not counting requests that shared one computation (coalescing)."""
        return self.api_metric('compute_api_computations_total{where="dask"}')

    def direct_calls(self, since: dict[str, int] | None = None) -> dict[str, int]:
        """Cheap computations the API pods sent straight to a worker (service.direct), by outcome:
        answered, busy (every worker thread ran a Dask task) and refused (the call failed for the
        worker's sake: unreachable, TLS refused, no handler), summed over the API pods; with
        ``since`` (an earlier reading from the same pods), those made after it."""
        return {outcome: int(self.api_metric(f'compute_api_direct_calls_total{{outcome="{outcome}"}}'))
                - (since or {}).get(outcome, 0)
                for outcome in ("answered", "busy", "refused")}

    def api_requests(self) -> float:
        """HTTP requests the API pods have answered, all routes and statuses."""
        return self.api_metric("compute_api_requests_total{")

    def api_pods(self) -> list[Pod]:
        return [p for p in list(self.pods.values()) if p.role == "api"]

    def start_api_pod(self) -> Pod:
        template = self.api_deployment["spec"]["template"]
        return self._run_pod("api", pod_name(self.api_deployment["metadata"]["name"]), template)

    def endpoints(self) -> dict[str, list[str]]:
        """Upstream -> addresses of the ready, not terminating API pods (the endpoints controller)."""
        endpoints: dict[str, list[str]] = {}
        for route in self.routes:
            port = target_port(self.services[route.service], route.service_port)
            endpoints[route.upstream] = [
                f"{self.ip(p)}:{p.spec.port(port)}" for p in self.api_pods()
                if p.name in self.prober.ready and p.name not in self.terminating
            ]
        return endpoints

    def configure_ingress(self) -> None:
        with self._ingress_lock:  # the prober thread reconfigures too
            self.nginx_dir.mkdir(parents=True, exist_ok=True)
            (self.nginx_dir / "nginx.conf").write_text(nginx_config(self.routes, self.endpoints()))
            if "ingress" in self.pods:
                podman("exec", self.pods["ingress"].container, "nginx", "-c", f"{CONFIG_DIR}/nginx.conf",
                       "-s", "reload")
                time.sleep(0.5)  # the master re-reads the configuration asynchronously

    def start_ingress(self) -> None:
        self.configure_ingress()
        name = f"{self.prefix}-ingress-nginx"
        podman("run", "--detach", "--name", name, "--network", self.network, "--label", f"{RUN_LABEL}={self.prefix}",
               "--volume", f"{self.nginx_dir}:{CONFIG_DIR}:ro", self.nginx_image)
        self.pods["ingress"] = Pod("ingress", "ingress", name)
        info = json.loads(podman("inspect", name).stdout)[0]
        self._ips[""] = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        deadline = time.monotonic() + 30
        while not self._ingress_answers():
            assert time.monotonic() < deadline, f"nginx did not start:\n{self.logs(self.pods['ingress'])}"
            time.sleep(0.3)

    def _ingress_answers(self) -> bool:
        try:
            return self.http.get(f"{self.ingress_url}/fast", headers={"Host": self.ingress_host}).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def ingress_url(self) -> str:
        return f"http://{self.ip(self.pods['ingress'])}:80"

    @property
    def ingress_host(self) -> str:
        return next(r.host for r in self.routes if r.host)

    def rolling_restart_api(self) -> list[dict[str, float]]:
        """`kubectl rollout restart`: the Deployment's RollingUpdate with maxSurge 1, maxUnavailable 0,
        each old pod terminated as the kubelet does (out of the endpoints and preStop at once, then
        SIGTERM, SIGKILL at terminationGracePeriodSeconds)."""
        strategy = self.api_deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", strategy
        update = strategy["rollingUpdate"]
        assert (update["maxSurge"], update["maxUnavailable"]) == (1, 0), f"only maxSurge 1, maxUnavailable 0: {update}"
        timings = []
        for old in list(self.api_pods()):
            new = self.start_api_pod()
            self.wait_ready(new)
            self.configure_ingress()  # the new pod joins the endpoints once ready
            timings.append(self._terminate_api_pod(old))
        return timings

    def _terminate_api_pod(self, pod: Pod) -> dict[str, float]:
        started = time.monotonic()
        self.terminating.add(pod.name)
        self.configure_ingress()
        pre_stop = pod.spec.container["lifecycle"]["preStop"]["exec"]["command"]
        podman("exec", pod.container, *pre_stop, timeout=pod.spec.grace_period() + 10)
        pre_stop_s = time.monotonic() - started
        remaining = pod.spec.grace_period() - pre_stop_s
        self._delete_pod(pod, grace=remaining)
        return {"pre_stop_s": pre_stop_s, "terminated_after_s": time.monotonic() - started}

    # -- helm upgrade with a new image or Dask pod spec (the chart's upgrade path) -------------------

    def upgrade(self, documents: list[dict[str, Any]], retiring: list[dict[str, Any]]) -> list[dict[str, float]]:
        """`helm upgrade` as the cluster carries it out. Helm applies the new objects together: the
        operator's create handler builds each new DaskCluster's scheduler and workers (one per cell);
        the Deployment controller rolls the API onto its new template (readiness-gated: a new API
        pod takes traffic once it can compute on the new cells); the old DaskClusters, re-applied
        with idleTimeout (``retiring``), keep serving the old API pods until retire_idle_clusters()
        deletes them. Helm deletes the old DaskAutoscalers (the new revision renders none for the
        old clusters): autoscaler() stops their timers and starts the new ones'."""
        current = {c["metadata"]["name"]: c for c in by_kind(documents, "DaskCluster")}
        created = [name for name in current if name not in self.daskclusters]
        assert created, "this upgrade changes no Dask pod spec"
        # Every cell of the old revision that this one does not render is re-applied as retiring
        # (the chart's retiringClusters); one this revision renders again is left as it runs.
        assert sorted(doc["metadata"]["name"] for doc in retiring) == sorted(
            name for name in self.daskclusters if name not in current), retiring
        self.retiring = {doc["metadata"]["name"]: doc for doc in retiring}
        self.documents, self.daskclusters = documents, current
        self.daskcluster = next(iter(current.values()))
        self.cluster_name = self.daskcluster["metadata"]["name"]
        self.api_deployment = next(d for d in by_kind(documents, "Deployment")
                                   if d["metadata"]["labels"].get("app.kubernetes.io/component") == "api")
        self.config_maps = {c["metadata"]["name"]: c["data"] for c in by_kind(documents, "ConfigMap")}
        for name in created:  # the create handler, once per new DaskCluster (controller.py l.340-400)
            self.start_scheduler(current[name])
            for _ in range(current[name]["spec"]["worker"]["replicas"]):
                self.add_worker(name)
        for name in created:
            self.wait_for_workers(current[name]["spec"]["worker"]["replicas"], cluster=name)
        return self.rolling_restart_api()

    def retire_idle_clusters(self, timeout: float = 300) -> dict[str, float]:
        """The operator's autoshutdown timer (controller.py daskcluster_autoshutdown) for each retiring
        cluster, every 5 s like the timer: GET its scheduler's /api/v1/check_idle, and once
        idle_since + idleTimeout has passed, delete the DaskCluster; garbage collection deletes its
        Deployments, whose pods are terminated as the kubelet does. Returns name -> seconds taken."""
        started, deleted = time.monotonic(), {}
        retiring = self.retiring
        while retiring:
            for name, doc in list(retiring.items()):
                scheduler = self.pods[f"{name}-scheduler"]
                url = f"http://{self.ip(scheduler)}:{scheduler.spec.port('http-dashboard')}/api/v1/check_idle"
                idle_since = self.http.get(url).json()["idle_since"]
                if idle_since and time.time() > idle_since + doc["spec"]["idleTimeout"]:
                    for pod in [p for p in self.pods.values()
                                if p.role in ("scheduler", "worker") and p.name.startswith(f"{name}-")]:
                        self._delete_pod(pod)
                    del retiring[name]
                    deleted[name] = time.monotonic() - started
            assert time.monotonic() - started < timeout, f"still not idle after {timeout} s: {list(retiring)}"
            if retiring:
                time.sleep(5)  # the timer's interval
        return deleted

    # -- the DaskAutoscaler (the operator's daskautoscaler_adapt timer) ------------------------------

    @contextlib.contextmanager
    def autoscaler(self) -> Iterator[dict[str, list[tuple[float, int, int]]]]:
        """The operator's autoscaler timer (controller.py daskautoscaler_adapt, l.914-993) while the
        block runs: one per DaskAutoscaler that Helm has applied (one per cell), each every 5 s on
        its own (kopf runs a timer per object). Each skips a round while its scheduler is not ready
        (l.922-933) or in cooldown (l.944-953) or when the scheduler does not answer (l.956-962);
        otherwise it takes its own scheduler's adaptive target, clamped and stepped as adapt() does,
        and applies it to its own `<cluster>-default` worker group like `kubectl scale`
        (scale_workers), then cools down 15 s from the decision (l.978). A DaskAutoscaler that an
        upgrade drops stops; one it adds starts. Yields the decisions taken, per cluster: name ->
        [(time, from, to)]."""
        decisions: dict[str, list[tuple[float, int, int]]] = {}
        stop = threading.Event()
        errors: list[BaseException] = []
        timers: dict[str, threading.Thread] = {}

        def applied() -> dict[str, dict[str, Any]]:
            return {a["metadata"]["name"]: a for a in by_kind(self.documents, "DaskAutoscaler")}

        def timer(name: str) -> None:
            cooldown_until = 0.0
            while not stop.wait(5.0):
                autoscaler = applied().get(name)
                if autoscaler is None:
                    return  # deleted by an upgrade (its cluster retires without autoscaling)
                spec = autoscaler["spec"]
                cluster = spec["cluster"]
                try:
                    if f"{cluster}-scheduler" in self.stopped or time.monotonic() < cooldown_until:
                        continue
                    current = len(self.worker_pods(cluster))
                    try:
                        target = self.scheduler_api("adaptive_target", cluster=cluster)["workers"]
                    except httpx.HTTPError:
                        continue  # SchedulerCommError: this round is skipped
                    desired = adapt(current, target, spec["minimum"], spec["maximum"])
                    if desired != current:
                        decided = time.monotonic()
                        decisions[cluster].append((decided, current, desired))
                        self.scale_workers(desired, cluster=cluster)
                        cooldown_until = decided + 15
                except BaseException as exc:  # reported by the test, not lost in the thread
                    errors.append(exc)
                    return

        def start_timers() -> None:
            for name, autoscaler in applied().items():
                if name not in timers:
                    decisions.setdefault(autoscaler["spec"]["cluster"], [])
                    timers[name] = threading.Thread(target=timer, args=(name,), name=f"daskautoscaler-{name}",
                                                    daemon=True)
                    timers[name].start()

        def supervise() -> None:
            while not stop.wait(1.0):
                start_timers()

        start_timers()  # every applied cell's timer, and its list of decisions, from the start
        supervisor = threading.Thread(target=supervise, name="daskautoscalers", daemon=True)
        supervisor.start()
        try:
            yield decisions
        finally:
            stop.set()
            supervisor.join(timeout=10)
            for thread in list(timers.values()):
                thread.join(timeout=120)
        assert not errors, f"the autoscaler failed: {errors[0]!r}"

    # -- node failure -------------------------------------------------------------------------------

    def freeze(self, pod: Pod) -> None:
        """The pod's node stops answering: its processes are frozen (cgroup freezer), so no TCP
        connection is closed and the scheduler notices only when heartbeats stop (worker-ttl)."""
        podman("pause", pod.container)

    def replace_frozen_worker(self, frozen: Pod) -> Pod:
        """The Deployment controller's replacement for a pod on a lost node: the same template (so the
        same DASK_WORKER_NAME, the Deployment's name) in a new pod with a new name and IP, while the
        frozen pod stays frozen (its node is gone, not drained). remove_frozen() deletes it later,
        as the lost node's eviction finally would."""
        assert frozen.spec is not None
        self.pods.pop(frozen.name)
        self.pods[f"{frozen.name}-frozen"] = Pod("frozen", frozen.name, frozen.container, frozen.spec, frozen.pod)
        replacement = self._run_pod("worker", f"{frozen.name}-replacement", frozen.spec.pod,
                                    hostname=pod_name(frozen.name))
        self.pods.pop(replacement.name)
        self.pods[frozen.name] = Pod("worker", frozen.name, replacement.container, replacement.spec,
                                     replacement.pod)
        return self.pods[frozen.name]

    def remove_frozen(self) -> None:
        for key, pod in [(k, p) for k, p in self.pods.items() if p.role == "frozen"]:
            podman("unpause", pod.container, check=False)
            podman("rm", "--force", "--time", "0", pod.container, check=False)
            podman("pod", "rm", "--force", "--time", "0", pod.pod, check=False)
            del self.pods[key]

def adapt(current: int, target: int, minimum: int, maximum: int) -> int:
    """The operator's daskautoscaler_adapt arithmetic (controller.py ~l.960-972): the scheduler's
    target clamped to [minimum, maximum]; down by at most 25 % of the workers (at least one) a step."""
    desired = min(maximum, max(minimum, target))
    if current > 0:
        desired = max(current - max(1, int(current * 0.25)), desired)
    return desired
