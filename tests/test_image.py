"""The container image, built for real with podman (scripts/build-image.sh), and the chart's pods
run from it as real containers.

No Kubernetes API server can be had here, so the pods the chart and the operator would create run
in the cluster-in-a-box of tests/e2e (``e2e.runner``), the one translation of rendered pod specs
into podman that `make e2e` uses too: the chart's command (with Kubernetes' $(VAR) expansion), env,
securityContext (non-root, read-only root), volumes (/tmp, the TLS Secret), probes, and Service DNS
names as network aliases. Here with the values a user starts from: the defaults and TLS.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import distributed
import pytest
from _k8s_helpers import (
    BASE_NAMESPACE,
    BASE_RELEASE,
    CHART,
    REPO,
    SCRIPTS,
    built_image,
    helm_template,
    image_config,
    one,
    podman,
    require_tool,
    run,
)
from certificates import write_tls_secret
from dask_settings import project_settings, read_settings_script
from e2e.ingress import target_port
from e2e.runner import Cluster, Pod, build_helper_images, image_values, one_off
from sizing import fib_value

pytestmark = pytest.mark.container

UID = 10001
API_COMMAND = ["compute-api", "serve", "--host", "0.0.0.0", "--port", "8000"]


@pytest.fixture(scope="session")
def image() -> str:
    return built_image()


def chart(image: str, values: Path | None = None) -> list[dict[str, Any]]:
    """The chart as a user installs it (release and namespace compute-api, hooks included) running
    ``image``, with one API replica: a second one proves nothing here and two cores run everything."""
    return helm_template(values, release=BASE_RELEASE, namespace=BASE_NAMESPACE,
                         set_values=[*image_values(image), "api.replicas=1"])


@pytest.fixture
def new_cluster(image: str, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Makes clusters in a box from rendered documents; every one is removed after the test,
    whatever happens (its containers' logs are kept in the test's tmp_path)."""
    images = build_helper_images()
    clusters: list[Cluster] = []

    def make(documents: list[dict[str, Any]], secrets: dict[str, Path] | None = None) -> Cluster:
        workdir = tmp_path / f"cluster-{len(clusters)}"
        clusters.append(Cluster(documents, BASE_NAMESPACE, workdir, images.nginx, images.pause, secrets))
        return clusters[-1]

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()


def get_json(cluster: Cluster, path: str) -> Any:
    """GET ``path`` the way users reach the API: through the ingress, by its host name."""
    response = cluster.http.get(f"{cluster.ingress_url}{path}", headers={"Host": cluster.ingress_host}, timeout=60)
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return response.json()


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
    result = one_off(image, "sh", "-c", script)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"version {distributed.__version__}" in output, output
    assert f"tasks {distributed.__version__}" in output, output
    assert "/usr/bin/sleep" in output or "/bin/sleep" in output, output
    assert "COMPILER" not in output, output
    assert result.stdout.strip().splitlines()[-1] == str(UID)


def embedded_pod(cluster: Cluster) -> dict[str, Any]:
    """The chart's API pod with the image's default command and no scheduler address: the embedded
    mode `podman run IMAGE` gives, under the chart's securityContext, /tmp emptyDir and probes."""
    template = copy.deepcopy(cluster.api_deployment["spec"]["template"])
    container = template["spec"]["containers"][0]
    for key in ("command", "args", "envFrom"):
        container.pop(key, None)
    container["env"] = [{"name": "EMBEDDED_WORKERS", "value": "2"}]
    # The API pod's memory limit is sized for the API alone; here a scheduler and two workers share it.
    container.pop("resources", None)
    return template


def test_embedded_api_runs_read_only_as_non_root(new_cluster: Callable[..., Cluster], image: str) -> None:
    cluster = new_cluster(chart(image))
    cluster.create_network()
    pod = cluster.run_pod("embedded", "embedded", embedded_pod(cluster))
    cluster.wait_ready(pod, timeout=120)  # its startup, then readiness (/readyz) probe
    url = f"http://{cluster.ip(pod)}:{pod.spec.port('http')}"
    assert cluster.http.get(f"{url}/fib/10", timeout=30).json() == {"n": 10, "value": fib_value(10)}
    assert cluster.http.get(f"{url}/fast", timeout=5).json() == {"message": "Hello!"}
    # Every process (uvicorn and the embedded Dask scheduler/worker processes) runs as 10001.
    statuses = podman("exec", pod.container, "sh", "-c", "cat /proc/[0-9]*/status").stdout
    uids = {line.split()[1] for line in statuses.splitlines() if line.startswith("Uid:")}
    assert uids == {str(UID)}, uids
    write = podman("exec", pod.container, "touch", "/probe", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    # PID 1 handles SIGTERM itself (exec form, no shell): a graceful exit with status 0.
    podman("stop", "--time", "30", pod.container, timeout=60)
    state = json.loads(podman("inspect", pod.container).stdout)[0]["State"]
    assert state["ExitCode"] == 0, (state, cluster.logs(pod)[-3000:])


# --- the chart's pods, in containers -------------------------------------------------------------------


def run_helm_test(cluster: Cluster, documents: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """The chart's `helm test` hook Pod, run once on the cluster's network. Its URL names the API
    Service, which this box does not have: the name resolves to the API pod and the URL's port
    becomes the Service's target port on it."""
    hook = copy.deepcopy(one(documents, "Pod"))
    service = one(documents, "Service")
    (api,) = cluster.api_pods()
    port = service["spec"]["ports"][0]["port"]
    command = hook["spec"]["containers"][0]["command"]
    command[-1] = command[-1].replace(f":{port}", f":{api.spec.port(target_port(service, port))}")
    return cluster.run_to_completion(hook, hosts={service["metadata"]["name"]: cluster.ip(api)})


def test_chart_pods_run_the_remote_cluster(new_cluster: Callable[..., Cluster], image: str) -> None:
    """Scheduler, worker and API with the chart's default values: the API reaches the scheduler
    through its Service name, the worker registers under the operator's name, the scheduler's HTTP
    API (what the DaskAutoscaler polls), /health (its probes) and /metrics answer, and the chart's
    `helm test` hook passes. service/dask.yaml reaches the scheduler and worker containers (plain
    `dask scheduler|worker`) from the image, the chart repeating none of it; the API-only logging
    override does not: the scheduler logs a worker's arrival at INFO."""
    documents = chart(image)
    cluster = new_cluster(documents).start(workers=1)  # scheduler /health probed ready on the way
    assert get_json(cluster, "/readyz")["workers"] >= 1
    assert [w["name"] for w in cluster.scheduler_workers()] == [
        p.spec.env()["DASK_WORKER_NAME"] for p in cluster.worker_pods()
    ]
    assert get_json(cluster, "/fib/25") == {"n": 25, "value": fib_value(25)}
    assert cluster.dask_computations() >= 1  # computed on a worker, not inline in the API

    assert "workers" in cluster.scheduler_api("adaptive_target")
    assert "dask_scheduler_workers" in cluster.http.get(cluster.scheduler_url("/metrics")).text

    result = run_helm_test(cluster, documents)
    assert result.returncode == 0 and "ok:" in result.stdout, result.stdout + result.stderr

    for pod in (cluster.scheduler, *cluster.worker_pods()):
        seen = dask_settings_in(pod)
        assert seen["settings"] == project_settings() and seen["logging"] is None, (pod.name, seen)
    assert "Register worker" in cluster.logs(cluster.scheduler)


def dask_settings_in(pod: Pod) -> dict[str, Any]:
    """What a Dask process started in ``pod``'s container (its env, its image) reads."""
    script = read_settings_script(sorted(project_settings()))
    return json.loads(podman("exec", pod.container, "python3", "-c", script).stdout)


def readme_recipe() -> dict[str, str]:
    """The README's "Your own function" walk-through, as a user copies it: the Python file, the
    Dockerfile, the example request and the answer it promises."""
    section = (REPO / "README.md").read_text().split("## Your own function", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```(python|dockerfile)\n(.*?)```", section, flags=re.S))
    request, answer = re.search(r"`curl '[^']*?(/compute/[^']+)'` →\s*`(\{.*?\})`", section, flags=re.S).groups()
    return {**blocks, "request": request, "answer": answer}


def test_your_own_function_from_an_image_built_from_ours(new_cluster: Callable[..., Cluster], image: str,
                                                         tmp_path: Path) -> None:
    """The README's path without forking: its Python file in a package, its Dockerfile FROM this
    image, the chart with that image for every role and api.config.COMPUTE_TASKS; the function
    answers the README's request with the README's answer, computed on a worker."""
    recipe = readme_recipe()
    context = tmp_path / "context"
    (context / "mypackage").mkdir(parents=True)
    (context / "mypackage" / "__init__.py").write_text("")
    (context / "mypackage" / "tasks.py").write_text(recipe["python"])
    (context / "Dockerfile").write_text(re.sub(r"^FROM \S+", f"FROM {image}", recipe["dockerfile"], flags=re.M))
    mine = "localhost/compute-api-mine:test"
    podman("build", "--pull=never", "-t", mine, str(context), timeout=600)
    try:
        documents = helm_template(release=BASE_RELEASE, namespace=BASE_NAMESPACE, set_values=[
            *image_values(mine), "api.replicas=1", "api.config.COMPUTE_TASKS=mypackage.tasks",
            "api.config.INLINE_MAX_COST=0"])  # on a worker, not inline in the API
        cluster = new_cluster(documents).start(workers=1)
        assert get_json(cluster, recipe["request"]) == json.loads(recipe["answer"]), recipe
        assert cluster.dask_computations() >= 1
        assert "/compute/blend" in get_json(cluster, "/openapi.json")["paths"]
    finally:
        podman("rmi", "--force", mine, check=False)


def tls_secret(documents: list[dict[str, Any]], directory: Path) -> dict[str, Path]:
    """The Secret the TLS values mount, as cert-manager would issue it for the scheduler's Service
    names (distributed checks the chain, not host names), readable by the pods' fsGroup."""
    daskcluster = one(documents, "DaskCluster")
    scheduler = daskcluster["spec"]["scheduler"]["spec"]
    name = next(v["secret"]["secretName"] for v in scheduler["volumes"] if "secret" in v)
    service = f"{daskcluster['metadata']['name']}-scheduler"
    dns_names = [service, f"{service}.{BASE_NAMESPACE}.svc.cluster.local"]
    return {name: write_tls_secret(directory, dns_names, group_id=scheduler["securityContext"]["fsGroup"])}


def test_chart_pods_with_mutual_tls(new_cluster: Callable[..., Cluster], image: str, tmp_path: Path) -> None:
    """The TLS values: every hop is tls:// with certificates from the mounted Secret, and the
    scheduler refuses plain TCP (require-encryption)."""
    documents = chart(image, CHART / "ci" / "tls-values.yaml")
    cluster = new_cluster(documents, secrets=tls_secret(documents, tmp_path / "secret")).start(workers=1)
    (api,) = cluster.api_pods()
    assert api.spec.env()["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    assert get_json(cluster, "/fib/24") == {"n": 24, "value": fib_value(24)}
    assert cluster.dask_computations() >= 1
    workers = cluster.scheduler_workers()
    assert len(workers) == 1 and workers[0]["address"].startswith("tls://"), workers

    # A client without certificates cannot use the scheduler: plain TCP is refused.
    address = f"tcp://{cluster.scheduler_service_aliases[0]}:{cluster.scheduler.spec.port('tcp-comm')}"
    probe = (
        "import sys\nfrom distributed import Client\n"
        f"try:\n    Client('{address}', timeout=5)\n"
        "except Exception as exc:\n    print('refused', type(exc).__name__)\n"
        "else:\n    sys.exit('plain TCP accepted')\n"
    )
    result = one_off(image, "python3", "-c", probe, network=cluster.network)
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
