"""The container image, built for real with podman (scripts/build-image.sh), and the chart's
rendered commands, environment and ports run in real containers from it.

No Kubernetes API server can be had here, so the pods the chart and the operator would create are
reproduced with podman: same image, same command (with Kubernetes' $(VAR) expansion), same env,
non-root, read-only root filesystem with a writable /tmp, and Service DNS names as network aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import httpx
import pytest
from _k8s_helpers import (
    BASE_NAMESPACE,
    CHART,
    SCRIPTS,
    built_image,
    env_of,
    expand,
    helm_template,
    image_config,
    one,
    operator_pods,
    podman,
    require_tool,
    run,
)
from certificates import write_tls_secret
from conftest import free_port, scrape, wait_until

pytestmark = pytest.mark.container

UID = 10001
API_COMMAND = ["compute-api", "serve", "--host", "0.0.0.0", "--port", "8000"]


@pytest.fixture(scope="session")
def image() -> str:
    return built_image()


class Pods:
    """Containers and networks started by one test, removed afterwards whatever happens."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.suffix = f"{os.getpid()}-{time.monotonic_ns() % 10**8}"
        self.containers: list[str] = []
        self.networks: list[str] = []

    def network(self) -> str:
        name = f"k8s-test-{self.suffix}"
        podman("network", "create", name)
        self.networks.append(name)
        return name

    def run(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        network: str | None = None,
        aliases: tuple[str, ...] = (),
        publish: dict[int, int] | None = None,
        volumes: tuple[str, ...] = (),
    ) -> str:
        """A detached container shaped like the pods: non-root, read-only root, /tmp writable."""
        container = f"{name}-{self.suffix}"
        args = [
            "run",
            "--detach",
            "--name",
            container,
            "--read-only",
            "--tmpfs",
            "/tmp:rw,mode=1777",
            "--user",
            f"{UID}:{UID}",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
        ]
        if network:
            args += ["--network", network]
        for alias in aliases:
            args += ["--network-alias", alias]
        for host_port, container_port in (publish or {}).items():
            args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        podman(*args, self.image, *command)
        self.containers.append(container)
        return container

    def logs(self) -> str:
        return "\n".join(
            f"--- {c}\n{podman('logs', c, check=False).stdout[-3000:]}{podman('logs', c, check=False).stderr[-3000:]}"
            for c in self.containers
        )

    def close(self) -> None:
        for container in reversed(self.containers):
            podman("rm", "--force", "--time", "5", container, check=False)
        for network in self.networks:
            podman("network", "rm", "--force", network, check=False)


@pytest.fixture
def pods(image: str) -> Iterator[Pods]:
    started = Pods(image)
    try:
        yield started
    finally:
        started.close()


def wait_http(url: str, timeout: float, pods: Pods) -> None:
    def ok() -> bool:
        return httpx.get(url, timeout=3).status_code == 200

    try:
        wait_until(ok, timeout, interval=0.5, what=url)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pods.logs()}") from None


# --- the image itself ------------------------------------------------------------------------------


def test_image_config(image: str) -> None:
    config = image_config(image)
    assert config["User"] == f"{UID}:{UID}", "numeric non-root user"
    assert config["Cmd"] == API_COMMAND, "exec-form default command"
    assert not config.get("Entrypoint"), "no shell wrapper: dask scheduler/worker run as given"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DASK_TEMPORARY_DIRECTORY"] == "/tmp" and env["HOME"] == "/tmp", "writable dirs on a read-only root"
    assert {"8000/tcp", "8786/tcp", "8787/tcp"} <= set(config["ExposedPorts"])


def test_image_serves_every_role_and_has_what_the_pods_call(image: str) -> None:
    """dask scheduler/worker (same dask as the project pins), sleep (the preStop hook), python3 (the
    helm test pod), the task module importable (the scheduler unpickles graphs), no compilers."""
    script = (
        "set -e; dask scheduler --version; dask worker --help >/dev/null; compute-api --version;"
        " sleep 0; command -v sleep;"
        " python3 -c 'import service.tasks, distributed; print(\"tasks\", distributed.__version__)';"
        " if command -v gcc || command -v cc || command -v make; then echo COMPILER; fi; id -u"
    )
    result = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", image, "sh", "-c", script, timeout=120)
    output = result.stdout + result.stderr
    assert f"version {distributed.__version__}" in output, output
    assert f"tasks {distributed.__version__}" in output, output
    assert "/usr/bin/sleep" in output or "/bin/sleep" in output, output
    assert "COMPILER" not in output, output
    assert result.stdout.strip().splitlines()[-1] == str(UID)


def test_embedded_api_runs_read_only_as_non_root(pods: Pods) -> None:
    port = free_port()
    container = pods.run("embedded", API_COMMAND, env={"EMBEDDED_WORKERS": "2"}, publish={port: 8000})
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", 120, pods)
    assert httpx.get(f"{url}/fib/10", timeout=30).json() == {"n": 10, "value": 55}
    assert httpx.get(f"{url}/fast", timeout=5).json() == {"message": "Hello!"}
    # Every process (uvicorn and the embedded Dask scheduler/worker processes) runs as 10001.
    statuses = podman("exec", container, "sh", "-c", "cat /proc/[0-9]*/status").stdout
    uids = {line.split()[1] for line in statuses.splitlines() if line.startswith("Uid:")}
    assert uids == {str(UID)}, uids
    # PID 1 handles SIGTERM itself (exec form, no shell): a graceful exit with status 0.
    podman("stop", "--time", "30", container, timeout=60)
    state = json.loads(podman("inspect", container).stdout)[0]["State"]
    assert state["ExitCode"] == 0, (state, pods.logs())


# --- the chart's pods, in containers -------------------------------------------------------------------


def chart_pods(values_file: Path | None = None) -> dict[str, Any]:
    """Command, env and ports of the API, scheduler and worker containers as the chart and the
    operator define them (release compute-api, namespace compute-api)."""
    documents = helm_template(values_file)
    cluster = one(documents, "DaskCluster")
    operator = operator_pods(cluster)
    api = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    scheduler = operator["scheduler"]["spec"]["containers"][0]
    worker = operator["worker"]["spec"]["containers"][0]
    service_name = f"{cluster['metadata']['name']}-scheduler"
    api_service = one(documents, "Service")
    return {
        "api": {"command": api["command"], "env": one(documents, "ConfigMap")["data"] | env_of(api)},
        "scheduler": {"command": scheduler["command"], "env": env_of(scheduler)},
        "worker": {"command": [expand(arg, env_of(worker)) for arg in worker["command"]], "env": env_of(worker)},
        # What cluster DNS would resolve: <svc> and <svc>.<ns>.svc.cluster.local.
        "scheduler_aliases": (service_name, f"{service_name}.{BASE_NAMESPACE}.svc.cluster.local"),
        "api_alias": api_service["metadata"]["name"],
        "api_service_port": api_service["spec"]["ports"][0]["port"],
        "helm_test": one(documents, "Pod")["spec"]["containers"][0]["command"],
        "worker_name": env_of(worker)["DASK_WORKER_NAME"],
    }


def start_cluster(pods: Pods, spec: dict[str, Any], volumes: tuple[str, ...] = ()) -> dict[str, str]:
    network = pods.network()
    dashboard, api_port = free_port(), free_port()
    pods.run(
        "scheduler",
        spec["scheduler"]["command"],
        env=spec["scheduler"]["env"],
        network=network,
        aliases=spec["scheduler_aliases"],
        publish={dashboard: 8787},
        volumes=volumes,
    )
    wait_http(f"http://127.0.0.1:{dashboard}/health", 60, pods)
    pods.run("worker", spec["worker"]["command"], env=spec["worker"]["env"], network=network, volumes=volumes)
    pods.run(
        "api",
        spec["api"]["command"],
        env=spec["api"]["env"],
        network=network,
        aliases=(spec["api_alias"],),
        publish={api_port: 8000},
        volumes=volumes,
    )
    urls = {"network": network, "dashboard": f"http://127.0.0.1:{dashboard}", "api": f"http://127.0.0.1:{api_port}"}

    # The worker has registered (under the operator's name) and the API is ready.
    def worker_registered() -> bool:
        workers = httpx.get(f"{urls['dashboard']}/api/v1/get_workers", timeout=3).json()["workers"]
        return [w["name"] for w in workers] == [spec["worker_name"]]

    try:
        wait_until(worker_registered, 90, interval=0.5, what="worker registered with the scheduler")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pods.logs()}") from None

    # ... and the API has seen it (it answers 503 "no workers" until its cached count refreshes).
    def api_sees_worker() -> bool:
        response = httpx.get(f"{urls['api']}/readyz", timeout=3)
        return response.status_code == 200 and response.json().get("workers", 0) >= 1

    try:
        wait_until(api_sees_worker, 120, interval=0.5, what="API ready with one worker")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pods.logs()}") from None
    return urls


def run_on_network(network: str, image: str, *command: str, user: str | None = None) -> Any:
    """A one-off read-only container on the cluster's network (``check=False``: callers inspect it)."""
    options = ["--user", user] if user else []
    return podman("run", "--rm", "--network", network, "--read-only", "--tmpfs", "/tmp", *options, image, *command,
                  timeout=120, check=False)


def computed_on_dask(api: str) -> float:
    """compute_api_computations_total{where="dask"}: proves a request went through the cluster
    (small n may be computed inline in the API process)."""
    return sum(
        value
        for name, value in scrape(api).items()
        if name.startswith("compute_api_computations_total") and 'where="dask"' in name
    )


def test_chart_pods_run_the_remote_cluster(pods: Pods) -> None:
    """Scheduler, worker and API with the chart's exact commands and env: the API reaches the
    scheduler through its Service name, the worker registers under the operator's name, and the
    scheduler's HTTP API (what the DaskAutoscaler polls) and /health (its probes) answer."""
    spec = chart_pods()
    urls = start_cluster(pods, spec)
    assert httpx.get(f"{urls['api']}/fib/25", timeout=60).json() == {"n": 25, "value": 75025}
    assert computed_on_dask(urls["api"]) >= 1

    target = httpx.get(f"{urls['dashboard']}/api/v1/adaptive_target", timeout=10)
    assert target.status_code == 200 and "workers" in target.json(), target.text
    assert "dask_scheduler_workers" in httpx.get(f"{urls['dashboard']}/metrics", timeout=10).text

    # The helm test hook, run as a pod on the same network. The Service maps its port to the
    # container's 8000; podman has no Service, so the URL goes straight to the target port.
    test_command = list(spec["helm_test"])
    test_command[-1] = test_command[-1].replace(f":{spec['api_service_port']}", ":8000")
    result = run_on_network(urls["network"], pods.image, *test_command, user=f"{UID}:{UID}")
    assert result.returncode == 0 and "ok:" in result.stdout, result.stdout + result.stderr + pods.logs()


def test_chart_pods_with_mutual_tls(pods: Pods, tmp_path: Path) -> None:
    """The TLS values: every hop is tls:// with certificates from the mounted Secret, and the
    scheduler refuses plain TCP (require-encryption)."""
    spec = chart_pods(CHART / "ci" / "tls-values.yaml")
    assert spec["api"]["env"]["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    # distributed checks the chain, not host names (mutual auth)
    secret = write_tls_secret(tmp_path / "secret", ["compute-api-dask"])
    urls = start_cluster(pods, spec, volumes=(f"{secret}:/etc/dask/tls:ro",))
    assert httpx.get(f"{urls['api']}/fib/24", timeout=60).json() == {"n": 24, "value": 46368}
    assert computed_on_dask(urls["api"]) >= 1
    workers = httpx.get(f"{urls['dashboard']}/api/v1/get_workers", timeout=10).json()["workers"]
    assert len(workers) == 1 and workers[0]["address"].startswith("tls://"), workers

    # A client without certificates cannot use the scheduler: plain TCP is refused.
    plain = spec["scheduler_aliases"][0]
    probe = (
        "import sys\nfrom distributed import Client\n"
        f"try:\n    Client('tcp://{plain}:8786', timeout=5)\n"
        "except Exception as exc:\n    print('refused', type(exc).__name__)\n"
        "else:\n    sys.exit('plain TCP accepted')\n"
    )
    result = run_on_network(urls["network"], pods.image, "python3", "-c", probe)
    assert "refused" in result.stdout, result.stdout + result.stderr


# --- scripts ----------------------------------------------------------------------------------------------


def test_scripts_pass_shellcheck() -> None:
    shellcheck = require_tool("shellcheck", "sudo scripts/install-test-tools.sh  (apt-get install -y shellcheck)")
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    assert scripts
    result = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_scripts_are_idempotent() -> None:
    """A second run finds everything installed and changes nothing (what `make test` relies on)."""
    for script in ("install-test-tools.sh", "install-podman.sh", "install-helm.sh", "base-image.sh"):
        result = run(
            [str(SCRIPTS / script)], timeout=300, env=os.environ | {"CONTAINERS_CONF": str(SCRIPTS / "containers.conf")}
        )
        assert "apt-get" not in result.stdout and "Setting up" not in result.stdout, (script, result.stdout)
