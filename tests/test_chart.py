"""The Helm chart, verified offline: helm lint, strict schema validation (Kubernetes 1.30 and 1.35 and
the installed dask-kubernetes CRDs), and the contracts between the rendered objects, the operator
(its own pod-building code) and the real application.

No API server can be had here, so every rule that a live cluster would enforce is checked against
the same schemas or code the cluster and the operator use.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import dask.config
import dask.utils
import distributed  # noqa: F401  (registers distributed's defaults in dask.config)
import httpx
import pytest
import yaml
from _k8s_helpers import (
    CHART,
    CI_VALUES,
    RECOMMENDED_LABELS,
    as_applied,
    assert_restricted,
    by_kind,
    dask_pod_key,
    env_of,
    expand,
    helm,
    helm_template,
    helm_template_upgrading,
    network_allows,
    one,
    operator_pods,
    pod_templates,
    retiring_clusters,
    run,
    selector_matches,
    validate_all,
    validate_custom_resource,
    validate_kubernetes,
    var_references,
)
from dask_settings import project_settings, variable

from service.config import Settings

VALUES_IDS = [path.name for path in CI_VALUES]
NAMESPACE = "apps"
GATEWAY_VALUES = CHART / "ci" / "gateway-values.yaml"


@pytest.fixture(scope="module", params=CI_VALUES, ids=VALUES_IDS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return helm_template(request.param, release="compute-api", namespace=NAMESPACE)


@pytest.fixture(scope="module")
def default_render() -> list[dict[str, Any]]:
    return helm_template(release="compute-api", namespace=NAMESPACE)


def values(path: Path | None = None) -> dict[str, Any]:
    """Effective values: defaults overlaid with a ci values file (maps merge, lists replace, like helm)."""

    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = (
                merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
            )
        return merged

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(defaults, yaml.safe_load(path.read_text()) or {}) if path else defaults


def api_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def api_config_map(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The API's settings (the dashboard, when enabled, is a ConfigMap too)."""
    (config,) = [c for c in by_kind(documents, "ConfigMap")
                 if c["metadata"]["labels"].get("app.kubernetes.io/component") == "api"]
    return config


def daskclusters(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DaskClusters, one per cell, in the order the API lists their schedulers."""
    clusters = by_kind(documents, "DaskCluster")
    assert clusters, "no DaskCluster rendered"
    return clusters


def daskcluster(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The DaskCluster; with several cells, the first, once proved identical to the others except
    for its name (so what a test proves of it holds for every cell)."""
    first, *others = daskclusters(documents)

    def anonymous(cluster: dict[str, Any]) -> str:
        return json.dumps(cluster).replace(cluster["metadata"]["name"], "NAME")

    for other in others:
        assert anonymous(other) == anonymous(first), f"cells differ: {other['metadata']['name']}"
    return first


def scheduler_addresses(documents: list[dict[str, Any]]) -> list[str]:
    """Where the API sends work: DASK_SCHEDULER_ADDRESS (one cell) or SCHEDULER_ADDRESSES (cells)."""
    env = env_of(api_container(documents))
    if "SCHEDULER_ADDRESSES" in env:
        assert "DASK_SCHEDULER_ADDRESS" not in env, "the service refuses both"
        return env["SCHEDULER_ADDRESSES"].split(",")
    return [env["DASK_SCHEDULER_ADDRESS"]]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


# --- lint and schemas ---------------------------------------------------------------------------------


def test_helm_lint_strict_with_defaults() -> None:
    result = run([helm(), "lint", "--strict", str(CHART)])
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values_file", CI_VALUES, ids=VALUES_IDS)
def test_helm_lint_strict_with_ci_values(values_file: Path) -> None:
    result = run([helm(), "lint", "--strict", str(CHART), "--values", str(values_file)])
    assert "0 chart(s) failed" in result.stdout


def test_ci_values_cover_the_options() -> None:
    names = set(VALUES_IDS)
    expected = {
        "default-values.yaml",
        "tls-values.yaml",
        "hpa-ingress-values.yaml",
        "scale-to-zero-values.yaml",
        "gateway-values.yaml",
    }
    assert expected <= names, names


def test_every_object_validates_strictly(rendered: list[dict[str, Any]]) -> None:
    """Built-ins against Kubernetes 1.30 and 1.35 (strict); DaskCluster/DaskAutoscaler against the
    installed operator's CRDs, with the pod and service specs inside a DaskCluster also checked
    against the full Kubernetes schemas; HTTPRoute against the Gateway API CRD in tests/crds."""
    validate_all(rendered)
    assert by_kind(rendered, "DaskCluster"), "no DaskCluster rendered"


def test_schema_validation_rejects_mistakes(default_render: list[dict[str, Any]]) -> None:
    """The validators are not vacuous: an unknown field, a numeric targetPort in the DaskCluster's
    Service (string-typed in the CRD, dk#778) and a bad probe all fail."""
    cluster = copy.deepcopy(daskcluster(default_render))
    cluster["spec"]["worker"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolice"):
        validate_custom_resource(cluster)

    cluster = copy.deepcopy(daskcluster(default_render))
    cluster["spec"]["scheduler"]["service"]["ports"][0]["targetPort"] = 8786
    with pytest.raises(AssertionError, match="targetPort"):
        validate_custom_resource(cluster)

    deployment = copy.deepcopy(one(default_render, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(AssertionError, match="invalid for 1.30"):
        validate_kubernetes(deployment, "1.30")


def test_values_schema_rejects_typos() -> None:
    result = run([helm(), "template", "x", str(CHART), "--set", "api.replicaz=3"], check=False)
    assert result.returncode != 0 and "replicaz" in result.stderr, result.stderr
    result = run([helm(), "template", "x", str(CHART), "--set", "dask.tls.enabled=true"], check=False)
    assert result.returncode != 0, "TLS without a Secret must be refused"


# --- contracts with the application ---------------------------------------------------------------------


def test_probe_paths_are_routes_the_real_app_serves(default_render: list[dict[str, Any]], embedded_server) -> None:
    """Start the real app (conftest's embedded server) and call every probe path of the API pod."""
    container = api_container(default_render)
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"/healthz", "/readyz"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    for path in paths:
        response = httpx.get(embedded_server.url + path, timeout=10)
        assert response.status_code == 200, (path, response.status_code, response.text)


def test_api_command_and_config(rendered: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    container = api_container(rendered)
    command = container["command"]
    assert command[:2] == ["compute-api", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == str(
        next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    )
    graceful = command[command.index("--timeout-graceful-shutdown") + 1]
    config = api_config_map(rendered)["data"]
    assert config["GRACEFUL_SHUTDOWN_TIMEOUT"] == graceful
    effective = values(request.node.callspec.params["rendered"])
    for key, value in effective["api"]["config"].items():
        assert config[key] == str(value)
    # The config map is wired in, and the pods roll when it changes.
    assert container["envFrom"] == [{"configMapRef": {"name": api_config_map(rendered)["metadata"]["name"]}}]
    annotations = one(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64


def test_config_change_rolls_the_api_pods() -> None:
    before = one(helm_template(), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = one(helm_template(set_values=["api.config.FIB_MAX_N=30"]), "Deployment")
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_termination_grace_exceeds_prestop_plus_graceful_shutdown(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"  # present in the image: test_image checks it
    graceful = float(container["command"][container["command"].index("--timeout-graceful-shutdown") + 1])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + graceful


def test_keepalive_outlives_the_ingress(rendered: list[dict[str, Any]]) -> None:
    """ingress-nginx keeps upstream connections 60 s; uvicorn must keep them longer or 502s follow."""
    data = api_config_map(rendered)["data"]
    assert float(data.get("KEEPALIVE_TIMEOUT", Settings.from_environ({}).keepalive_timeout)) > 60


def _seconds(duration: str) -> float:
    """A Gateway API duration (GEP-2257: 40s, 1m30s, 500ms) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9]+)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(int(number) * units[unit] for number, unit in parts)


def test_routes_wait_longer_than_the_api(rendered: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    """A gateway that gives up first answers a bare 504 where the API would have answered with its
    own (REQUEST_TIMEOUT). Envoy-based gateways give up after 15 s unless the route says otherwise,
    so the Envoy Gateway scenario (ci/gateway-values.yaml) sets every rule's ("0s" would mean none)."""
    config = api_config_map(rendered)["data"]
    request_timeout = float(config.get("REQUEST_TIMEOUT", Settings.from_environ({}).request_timeout))
    for route in by_kind(rendered, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            if request.node.callspec.params["rendered"] == GATEWAY_VALUES:
                assert "request" in rule.get("timeouts", {}), rule
            for timeout in rule.get("timeouts", {}).values():
                assert _seconds(timeout) == 0 or _seconds(timeout) > request_timeout, rule


def test_api_config_accepts_exactly_the_services_settings() -> None:
    """values.schema.json lists the settings of service/config.py, except those the chart sets itself."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    accepted = schema["properties"]["api"]["properties"]["config"]["propertyNames"]["enum"]
    chart_managed = {"DASK_SCHEDULER_ADDRESS", "SCHEDULER_ADDRESSES", "HOST", "PORT", "GRACEFUL_SHUTDOWN_TIMEOUT"}
    assert set(accepted) == {Settings.env_name(name) for name in Settings.model_fields} - chart_managed


def test_api_config_refuses_an_unknown_setting() -> None:
    with pytest.raises(AssertionError, match="FIB_MAX"):
        helm_template(set_values=["api.config.FIB_MAX=30"])


# --- contracts with the dask-kubernetes operator --------------------------------------------------------


def test_scheduler_address_is_the_operator_service(rendered: list[dict[str, Any]]) -> None:
    """The API's scheduler address(es), one per cell, and each cell's workers', are the Services the
    operator creates for the DaskClusters."""
    daskcluster(rendered)  # the cells are identical but for their names
    tls = any(e["name"] == "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION" for e in api_container(rendered).get("env", []))
    expected = []
    for cluster in daskclusters(rendered):
        name = cluster["metadata"]["name"]
        assert len(name) <= 53
        service = cluster["spec"]["scheduler"]["service"]
        ports = {port["name"]: port for port in service["ports"]}
        assert set(ports) >= {"tcp-comm", "http-dashboard"}, "the operator looks these ports up by name"
        address = f"{'tls' if tls else 'tcp'}://{name}-scheduler.{NAMESPACE}.svc.cluster.local:{ports['tcp-comm']['port']}"
        # The operator's own injected address is always tcp://...:8786; ours must agree on host and port.
        assert ports["tcp-comm"]["port"] == 8786
        worker = operator_pods(cluster)["worker"]["spec"]["containers"][0]
        assert env_of(worker)["DASK_SCHEDULER_ADDRESS"] == address
        expected.append(address)
    assert scheduler_addresses(rendered) == expected
    Settings.from_environ(env_of(api_container(rendered)))  # and the service accepts them


def test_scheduler_service_selects_the_scheduler_pod(rendered: list[dict[str, Any]]) -> None:
    cluster = daskcluster(rendered)
    service = cluster["spec"]["scheduler"]["service"]
    pods = operator_pods(cluster)
    assert service["selector"], "the operator uses the Service spec verbatim: it needs a selector"
    assert selector_matches({"matchLabels": service["selector"]}, pods["scheduler"]["metadata"]["labels"])
    assert not selector_matches({"matchLabels": service["selector"]}, pods["worker"]["metadata"]["labels"])
    container_ports = {p["name"]: p["containerPort"] for p in pods["scheduler"]["spec"]["containers"][0]["ports"]}
    for port in service["ports"]:
        assert port["targetPort"] in container_ports, "named targetPort (int-or-string is a string in the CRD)"
        assert container_ports[port["targetPort"]] == port["port"]


def test_worker_command(rendered: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    worker = operator_pods(daskcluster(rendered))["worker"]["spec"]["containers"][0]
    command = worker["command"]
    assert command[:2] == ["dask", "worker"]
    # dask worker does not read DASK_WORKER_NAME itself (dk#855).
    assert command[command.index("--name") + 1] == "$(DASK_WORKER_NAME)"
    assert command[command.index("--nworkers") + 1] == "1"
    effective = values(request.node.callspec.params["rendered"])["dask"]["worker"]
    assert command[command.index("--nthreads") + 1] == str(effective["nthreads"])
    memory_limit = command[command.index("--memory-limit") + 1]
    assert memory_limit == (effective["memoryLimit"] or effective["resources"]["limits"]["memory"])
    assert dask.utils.parse_bytes(memory_limit) == dask.utils.parse_bytes(worker["resources"]["limits"]["memory"])
    # Every $(VAR) resolves once the operator has injected its variables.
    env = env_of(worker)
    assert var_references(command) <= set(env), var_references(command) - set(env)
    assert expand(command[command.index("--name") + 1], env) == env["DASK_WORKER_NAME"]
    # Ports named for the NetworkPolicy are the ones the worker listens on.
    ports = {p["name"]: str(p["containerPort"]) for p in worker["ports"]}
    assert command[command.index("--worker-port") + 1] == ports["tcp-worker"]
    assert command[command.index("--nanny-port") + 1] == ports["tcp-nanny"]
    assert command[command.index("--dashboard-address") + 1] == f":{ports['http-dashboard']}"


def test_scheduler_config(rendered: list[dict[str, Any]]) -> None:
    cluster = daskcluster(rendered)
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    env = env_of(scheduler)
    routes = ast.literal_eval(env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"])
    # The variable replaces the whole list: keep every default route (read from the installed
    # distributed, so a new default cannot be silently dropped) and add the HTTP API. Read from its
    # defaults file, not dask.config: a Scheduler started in this process without bokeh appends
    # "missing_bokeh" to the live config list in place (distributed/scheduler.py ~l.4004).
    config = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())
    defaults = config["distributed"]["scheduler"]["http"]["routes"]
    assert set(defaults) <= set(routes), set(defaults) - set(routes)
    assert "distributed.http.scheduler.api" in routes
    assert "distributed.http.health" in routes
    # dask.config reads the variables the way the scheduler process will.
    config = dask.config.update(
        copy.deepcopy(dask.config.config),
        dask.config.collect_env({key: value for key, value in env.items() if key.startswith("DASK_")}),
    )
    assert dask.config.get("distributed.scheduler.http.routes", config=config) == routes
    assert dask.utils.parse_timedelta(dask.config.get("distributed.adaptive.target-duration", config=config)) > 0
    no_workers = dask.config.get("distributed.scheduler.no-workers-timeout", config=config)
    assert no_workers and 0 < dask.utils.parse_timedelta(no_workers) <= 600
    # Probes hit /health, which the routes keep, on the dashboard port.
    for probe in ("readinessProbe", "livenessProbe"):
        assert scheduler[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}


def test_cluster_is_permanent_and_autoscaled(rendered: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    cluster = daskcluster(rendered)
    assert cluster["spec"]["idleTimeout"] == 0
    effective = values(request.node.callspec.params["rendered"])["dask"]["autoscaler"]
    autoscalers = by_kind(rendered, "DaskAutoscaler")
    if effective["enabled"]:  # one per cell
        assert [a["spec"] for a in autoscalers] == [
            {"cluster": c["metadata"]["name"], "minimum": effective["minimum"], "maximum": effective["maximum"]}
            for c in daskclusters(rendered)
        ]
        assert effective["minimum"] <= effective["maximum"]
    else:
        assert autoscalers == []
    for role in ("scheduler", "worker"):
        resources = cluster["spec"][role]["spec"]["containers"][0]["resources"]
        assert resources["requests"] and resources["limits"]["memory"]


def test_autoscaler_on_by_default(default_render: list[dict[str, Any]]) -> None:
    assert len(by_kind(default_render, "DaskAutoscaler")) == 1


def test_cluster_name_capped_at_53_characters() -> None:
    documents = helm_template(release="a-long-release-name-for-the-production-fib-service-x")
    name = daskcluster(documents)["metadata"]["name"]
    assert len(name) <= 53 and not name.endswith("-")
    assert env_of(api_container(documents))["DASK_SCHEDULER_ADDRESS"].startswith(f"tcp://{name}-scheduler.")
    validate_all(documents)


def test_tls_everywhere_when_enabled() -> None:
    documents = helm_template(CHART / "ci" / "tls-values.yaml", namespace=NAMESPACE)
    secret = values(CHART / "ci" / "tls-values.yaml")["dask"]["tls"]["secretName"]
    cluster = daskcluster(documents)
    pods = {"api": one(documents, "Deployment")["spec"]["template"], **operator_pods(cluster)}
    roles = {"api": "CLIENT", "scheduler": "SCHEDULER", "worker": "WORKER"}
    for name, pod in pods.items():
        container = pod["spec"]["containers"][0]
        env = env_of(container)
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", name
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mount = mounts["dask-tls"]
        assert mount["readOnly"] is True
        assert volumes["dask-tls"]["secret"]["secretName"] == secret
        for key in ("CA_FILE", f"{roles[name]}__CERT", f"{roles[name]}__KEY"):
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{key}"].startswith(mount["mountPath"] + "/"), (name, key)
    assert env_of(pods["api"]["spec"]["containers"][0])["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    scheduler_command = pods["scheduler"]["spec"]["containers"][0]["command"]
    assert scheduler_command[scheduler_command.index("--protocol") + 1] == "tls"
    worker = pods["worker"]["spec"]["containers"][0]
    assert worker["command"][worker["command"].index("--protocol") + 1] == "tls"
    assert env_of(worker)["DASK_SCHEDULER_ADDRESS"].startswith("tls://")


def test_no_tls_settings_without_tls(default_render: list[dict[str, Any]]) -> None:
    for name, pod in pod_templates(default_render).items():
        for container in containers(pod):
            assert not any(key.startswith("DASK_DISTRIBUTED__COMM__TLS") for key in env_of(container)), name


# --- security ------------------------------------------------------------------------------------------


def test_every_pod_is_pss_restricted(rendered: list[dict[str, Any]]) -> None:
    pods = pod_templates(rendered)
    assert {key.split("/")[0] for key in pods} >= {"Deployment", "DaskCluster", "Pod"}
    for name, pod in pods.items():
        assert_restricted(name, pod["spec"])


def test_service_account_has_no_token(default_render: list[dict[str, Any]]) -> None:
    account = one(default_render, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    pod = one(default_render, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_image_tag_defaults_to_app_version(default_render: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"] and chart["appVersion"]
    images = {c["image"] for pod in pod_templates(default_render).values() for c in containers(pod)}
    assert images == {f"{values()['image']['repository']}:{chart['appVersion']}"}, images


def test_one_image_for_all_roles(rendered: list[dict[str, Any]]) -> None:
    images = {c["image"] for pod in pod_templates(rendered).values() for c in containers(pod)}
    assert len(images) == 1, images


def test_your_own_image_runs_every_role_and_the_api_loads_your_functions() -> None:
    # README, "Your own function": an image FROM compute-api's with your package, then helm upgrade.
    documents = helm_template(release="compute-api", namespace=NAMESPACE, set_values=[
        "image.repository=registry.example.com/compute-api-mine", "image.tag=1.0",
        "api.config.COMPUTE_TASKS=mypackage.tasks", "dask.cells=2"])
    validate_all(documents)
    images = {c["image"] for pod in pod_templates(documents).values() for c in containers(pod)}
    assert images == {"registry.example.com/compute-api-mine:1.0"}, images
    (source,) = [s["configMapRef"]["name"] for s in api_container(documents)["envFrom"] if "configMapRef" in s]
    (config,) = [c for c in by_kind(documents, "ConfigMap") if c["metadata"]["name"] == source]
    assert config["data"]["COMPUTE_TASKS"] == "mypackage.tasks"
    with pytest.raises(AssertionError, match="COMPUTE_TASK"):  # a misspelt setting is refused, not ignored
        helm_template(set_values=["api.config.COMPUTE_TASK=mypackage.tasks"])


# --- NetworkPolicies -------------------------------------------------------------------------------------


def _policy(documents: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    (policy,) = [p for p in by_kind(documents, "NetworkPolicy") if p["metadata"]["name"].endswith(suffix)]
    return policy


def _peers_allow_pod(policy: dict[str, Any], port_name: str, labels: dict[str, str]) -> bool:
    """Whether a pod with these labels, in the policy's own namespace, may reach port_name."""
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p.get("port") == port_name for p in rule["ports"]):
            continue
        for peer in rule.get("from", []):
            if (
                "podSelector" in peer
                and "namespaceSelector" not in peer
                and selector_matches(peer["podSelector"], labels)
            ):
                return True
    return False


def _namespaces_allowed(policy: dict[str, Any], port_name: str) -> set[str]:
    allowed = set()
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p.get("port") == port_name for p in rule["ports"]):
            continue
        for peer in rule.get("from", []):
            if "namespaceSelector" in peer:
                allowed.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return allowed


def test_network_policies_select_the_pods_they_mean(default_render: list[dict[str, Any]]) -> None:
    pods = pod_templates(default_render)
    cell = daskcluster(default_render)["metadata"]["name"]
    api = pods["Deployment/compute-api"]["metadata"]["labels"]
    scheduler = pods[dask_pod_key(cell, "scheduler")]["metadata"]["labels"]
    worker = pods[dask_pod_key(cell, "worker")]["metadata"]["labels"]
    helm_test = pods["Pod/compute-api-test-api"]["metadata"]["labels"]
    everyone = {"api": api, "scheduler": scheduler, "worker": worker, "helm-test": helm_test}
    selects = {
        "-api": {"api"},
        "-scheduler": {"scheduler"},
        "-worker": {"worker"},
    }
    # the release-wide three, and the one cell's own two (_cellnetworkpolicy.tpl)
    assert len(by_kind(default_render, "NetworkPolicy")) == len(selects) + 2
    for suffix, expected in selects.items():
        policy = _policy(default_render, suffix)
        assert policy["spec"]["policyTypes"] == (["Ingress", "Egress"] if suffix == "-worker" else ["Ingress"])
        selected = {
            name for name, labels in everyone.items() if selector_matches(policy["spec"]["podSelector"], labels)
        }
        assert selected == expected, (suffix, selected)

    scheduler_policy = _policy(default_render, "-scheduler")
    # 8786 executes whatever it is sent: the release-wide policy admits nobody (each cell's own
    # policy admits the API and that cell's workers: test_cells_reach_only_their_own_scheduler).
    assert not any(_peers_allow_pod(scheduler_policy, "tcp-comm", labels) for labels in everyone.values())
    assert _namespaces_allowed(scheduler_policy, "tcp-comm") == set()
    # The dashboard / HTTP API: the operator's namespace only, never the ingress controller.
    assert _namespaces_allowed(scheduler_policy, "http-dashboard") == {"dask-operator"}
    assert not any(_peers_allow_pod(scheduler_policy, "http-dashboard", labels) for labels in everyone.values())

    worker_policy = _policy(default_render, "-worker")
    for port in ("tcp-worker", "tcp-nanny"):
        assert not any(_peers_allow_pod(worker_policy, port, labels) for labels in everyone.values())
        assert _namespaces_allowed(worker_policy, port) == set()

    api_policy = _policy(default_render, "-api")
    assert _namespaces_allowed(api_policy, "http") == {"ingress-nginx"}
    assert {n for n, labels in everyone.items() if _peers_allow_pod(api_policy, "http", labels)} == {"helm-test"}

    # Every port a policy names exists on the pods it selects.
    for suffix, role in (("-api", api), ("-scheduler", scheduler), ("-worker", worker)):
        pod = next(p for p in pods.values() if p["metadata"]["labels"] is role)
        names = {port["name"] for c in pod["spec"]["containers"] for port in c.get("ports", [])}
        own = [_policy(default_render, f"{suffix}-peers")] if suffix != "-api" else []  # a cell's own
        for policy in [_policy(default_render, suffix), *own]:
            for rule in policy["spec"]["ingress"]:
                assert {p["port"] for p in rule["ports"]} <= names, (suffix, rule["ports"], names)


def test_workers_reach_only_dns_the_scheduler_and_each_other(default_render: list[dict[str, Any]]) -> None:
    pods = pod_templates(default_render)
    cell = daskcluster(default_render)["metadata"]["name"]
    scheduler = pods[dask_pod_key(cell, "scheduler")]["metadata"]["labels"]
    worker = pods[dask_pod_key(cell, "worker")]["metadata"]["labels"]
    api = pods["Deployment/compute-api"]["metadata"]["labels"]
    (dns,) = _policy(default_render, "-worker")["spec"]["egress"]
    to_pods = _policy(default_render, "-worker-peers")["spec"]["egress"]
    assert "to" not in dns and {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    reachable = [(peer["podSelector"], {p["port"] for p in rule["ports"]}) for rule in to_pods for peer in rule["to"]]
    # every peer is a pod of this release: no ipBlock, so no cloud metadata address, no internet
    assert all(list(peer) == ["podSelector"] for rule in to_pods for peer in rule["to"])
    assert [ports for selector, ports in reachable if selector_matches(selector, scheduler)] == [{8786}]
    assert [ports for selector, ports in reachable if selector_matches(selector, worker)] == [{8788, 8789}]
    assert not [ports for selector, ports in reachable if selector_matches(selector, api)]
    # and it can be switched off
    off = helm_template(set_values=["networkPolicy.workerEgress.enabled=false"])
    for suffix in ("-worker", "-worker-peers"):
        spec = _policy(off, suffix)["spec"]
        assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec, suffix


def test_the_gateway_proxies_are_admitted_to_the_api_port_only() -> None:
    """networkPolicy.gatewayNamespace opens the port the HTTPRoute leads to (backendRef port ->
    Service port -> targetPort), as for the ingress controller, and nothing else."""
    rendered = helm_template(GATEWAY_VALUES)
    gateway = values(GATEWAY_VALUES)["networkPolicy"]["gatewayNamespace"]
    api_policy = _policy(rendered, "-api")
    service_ports = {port["port"]: port for port in one(rendered, "Service")["spec"]["ports"]}
    for rule in one(rendered, "HTTPRoute")["spec"]["rules"]:
        for backend in rule["backendRefs"]:
            target = service_ports[backend["port"]]["targetPort"]
            assert _namespaces_allowed(api_policy, target) == {"ingress-nginx", gateway}
    for suffix, ports in (("-scheduler", ("tcp-comm", "http-dashboard")), ("-worker", ("tcp-worker", "tcp-nanny"))):
        for port in ports:
            assert gateway not in _namespaces_allowed(_policy(rendered, suffix), port), (suffix, port)


def test_the_metrics_scraper_is_admitted_to_the_metrics_ports_only() -> None:
    rendered = helm_template(set_values=["networkPolicy.metricsScraperNamespace=monitoring"])
    for suffix, port in (("-api", "http"), ("-scheduler", "http-dashboard"), ("-worker", "http-dashboard")):
        policy = _policy(rendered, suffix)
        assert "monitoring" in _namespaces_allowed(policy, port), suffix
        others = {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} - {port}
        assert all("monitoring" not in _namespaces_allowed(policy, other) for other in others), suffix


def test_network_policies_can_be_disabled() -> None:
    assert by_kind(helm_template(CHART / "ci" / "hpa-ingress-values.yaml"), "NetworkPolicy") == []


# --- API objects ------------------------------------------------------------------------------------------


def test_ingress_routes_only_to_the_api(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service")
    for ingress in by_kind(rendered, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == service["metadata"]["name"]
                assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_ingress_options() -> None:
    documents = helm_template(CHART / "ci" / "hpa-ingress-values.yaml")
    ingress = one(documents, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "compute-example-tls", "hosts": ["compute.example.com"]}]
    assert ingress["spec"]["rules"][0]["host"] == "compute.example.com"
    assert ingress["metadata"]["annotations"]
    assert by_kind(helm_template(CHART / "ci" / "single-replica-values.yaml"), "Ingress") == []


def test_api_service_selects_only_api_pods(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service")
    matched = [
        name
        for name, pod in pod_templates(rendered).items()
        if selector_matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    ]
    assert matched == [f"Deployment/{one(rendered, 'Deployment')['metadata']['name']}"], matched


def test_hpa_and_pdb() -> None:
    default = helm_template()
    assert by_kind(default, "HorizontalPodAutoscaler") == [], "HPA is off by default"
    assert one(default, "Deployment")["spec"]["replicas"] == 2
    assert len(by_kind(default, "PodDisruptionBudget")) == 1

    single = helm_template(CHART / "ci" / "single-replica-values.yaml")
    assert by_kind(single, "PodDisruptionBudget") == [], "a PDB on one replica blocks node drains"

    scaled = helm_template(CHART / "ci" / "hpa-ingress-values.yaml")
    hpa = one(scaled, "HorizontalPodAutoscaler")
    deployment = one(scaled, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    pdb = one(scaled, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_helm_test_hook_calls_the_api(default_render: list[dict[str, Any]]) -> None:
    pod = one(default_render, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = "\n".join(pod["spec"]["containers"][0]["command"])
    assert '"/fast"' in script and '"/fib/10"' in script and "55" in script
    service = one(default_render, "Service")
    assert (
        pod["spec"]["containers"][0]["command"][-1]
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )


def test_recommended_labels_on_every_object(rendered: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for doc in rendered:
        labels = doc["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, (doc["kind"], doc["metadata"]["name"], missing)
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["helm.sh/chart"] == f"{chart['name']}-{chart['version']}"
    for name, pod in pod_templates(rendered).items():
        assert "app.kubernetes.io/component" in pod["metadata"]["labels"], name


def test_notes_explain_ingress_scaling_and_dashboard() -> None:
    result = run([helm(), "install", "compute-api", str(CHART), "--dry-run=client", "--namespace", NAMESPACE])
    notes = result.stdout.split("NOTES:", 1)[1]
    cluster = daskcluster(helm_template(release="compute-api", namespace=NAMESPACE))["metadata"]["name"]
    for expected in (
        "kubectl get ingress compute-api",
        f"kubectl scale daskworkergroup {cluster}-default",
        "port-forward",
        f"svc/{cluster}-scheduler 8787",
        "helm upgrade",
        "dask-kubernetes-operator",
    ):
        assert expected in notes, expected


# --- Gateway API ---------------------------------------------------------------------------------------------


def test_httproute_routes_only_to_the_api(rendered: list[dict[str, Any]]) -> None:
    """Every rule, additional ones included, sends to the API Service on a port it exposes."""
    service = one(rendered, "Service")
    ports = {port["port"] for port in service["spec"]["ports"]}
    for route in by_kind(rendered, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            assert rule["backendRefs"], rule
            for backend in rule["backendRefs"]:
                assert backend.get("group", "") == "" and backend.get("kind", "Service") == "Service"
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"] in ports, (backend, ports)


def test_httproute_options() -> None:
    documents = helm_template(GATEWAY_VALUES, namespace=NAMESPACE)
    effective = values(GATEWAY_VALUES)["httpRoute"]
    route = one(documents, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == effective["parentRefs"]
    assert route["spec"]["hostnames"] == effective["hostnames"]
    assert route["metadata"]["annotations"] == effective["annotations"]
    assert effective["labels"].items() <= route["metadata"]["labels"].items()
    *additional, api_rule = route["spec"]["rules"]
    assert len(additional) == len(effective["additionalRules"])
    assert additional[0]["backendRefs"][0]["name"] == one(documents, "Service")["metadata"]["name"], "tpl applied"
    assert api_rule["matches"] == effective["matches"]
    assert api_rule["filters"] == effective["filters"]
    assert api_rule["timeouts"] == effective["timeouts"]
    # A migration: the Ingress keeps serving the same host beside the route.
    assert one(documents, "Ingress")["spec"]["rules"][0]["host"] in route["spec"]["hostnames"]
    # Off by default; on its own, with a Gateway named and nothing else, it is a valid route.
    assert by_kind(helm_template(), "HTTPRoute") == []
    alone = helm_template(
        set_values=["ingress.enabled=false", "httpRoute.enabled=true", "httpRoute.parentRefs[0].name=eg"]
    )
    assert by_kind(alone, "Ingress") == []
    assert one(alone, "HTTPRoute")["spec"]["parentRefs"] == [{"name": "eg"}]
    validate_all(alone)


def test_httproute_validation_against_the_crd_is_not_vacuous() -> None:
    route = one(helm_template(GATEWAY_VALUES), "HTTPRoute")
    validate_custom_resource(route)
    mistakes = {
        "prot": lambda r: r["spec"]["rules"][-1]["backendRefs"][0].update(prot=80),
        "hostnames/1": lambda r: r["spec"]["hostnames"].append("Compute.example.com:443"),
        "timeouts/request": lambda r: r["spec"]["rules"][-1]["timeouts"].update(request="40 seconds"),
        "'name' is a required property": lambda r: r["spec"]["parentRefs"][0].pop("name"),
        "port": lambda r: r["spec"]["rules"][-1]["backendRefs"][0].update(port="http"),
    }
    for expected, mistake in mistakes.items():
        broken = copy.deepcopy(route)
        mistake(broken)
        with pytest.raises(AssertionError, match=re.escape(expected)):
            validate_custom_resource(broken)


@pytest.mark.parametrize(
    ("assignments", "refused"),
    [
        ([], "parentRefs"),
        (["httpRoute.parentRefs[0].name=eg", "httpRoute.parentRefs[0].namepsace=gateways"], "namepsace"),
        (["httpRoute.parentRefs[0].name=eg", "httpRoute.hostname[0]=compute.example.com"], "hostname"),
        (["httpRoute.parentRefs[0].name=eg", "httpRoute.hostnames[0]=compute.example.com:443"], "hostnames"),
        (["httpRoute.parentRefs[0].name=eg", "httpRoute.timeouts.request=40"], "request"),
    ],
    ids=["no Gateway", "typo in a parentRef", "typo in a key", "host with a port", "duration without a unit"],
)
def test_values_schema_refuses_a_broken_httproute(assignments: list[str], refused: str) -> None:
    cmd = [helm(), "template", "x", str(CHART), "--set", "httpRoute.enabled=true"]
    for assignment in assignments:
        cmd += ["--set", assignment]
    result = run(cmd, check=False)
    assert result.returncode != 0 and refused in result.stderr, result.stderr


def test_notes_explain_how_to_reach_the_gateway() -> None:
    def notes(*args: str) -> str:
        cmd = [helm(), "install", "compute-api", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *args]
        return run(cmd).stdout.split("NOTES:", 1)[1]

    gateway = notes("--values", str(GATEWAY_VALUES))
    assert "kubectl get gateway public -n gateway-system -o jsonpath='{.status.addresses[0].value}'" in gateway
    assert "kubectl get httproute compute-api" in gateway
    assert "WARNING" not in gateway
    # With the NetworkPolicies on and no Gateway namespace admitted, the route could not reach the API.
    unreachable = notes("--set", "httpRoute.enabled=true", "--set", "httpRoute.parentRefs[0].name=eg")
    assert "WARNING" in unreachable and "networkPolicy.gatewayNamespace" in unreachable


# --- scaling the workers: every documented way -------------------------------------------------------------


def test_every_way_to_scale_workers_is_wired() -> None:
    """DaskAutoscaler (default), `kubectl scale daskworkergroup <name>-default` (the CRD's scale
    subresource on the group the operator creates) and `helm upgrade --set dask.worker.replicas=N`
    (the operator propagates DaskCluster spec.worker.replicas to that group)."""
    import inspect

    from _k8s_helpers import crd_path
    from dask_kubernetes.operator.controller import controller

    documents = helm_template(set_values=["dask.worker.replicas=5", "dask.autoscaler.enabled=false"])
    cluster = daskcluster(documents)
    assert cluster["spec"]["worker"]["replicas"] == 5
    assert by_kind(documents, "DaskAutoscaler") == [], "a running autoscaler would override manual scaling"

    group = controller.build_default_worker_group_spec(cluster["metadata"]["name"], cluster["spec"]["worker"], {}, {})
    assert group["metadata"]["name"] == f"{cluster['metadata']['name']}-default"
    assert group["spec"]["worker"]["replicas"] == 5
    crd = yaml.safe_load(crd_path("DaskWorkerGroup").read_text())
    scale = next(v for v in crd["spec"]["versions"] if v["storage"])["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.worker.replicas"
    assert 'field="spec.worker.replicas"' in inspect.getsource(controller), "operator propagates replicas"
    autoscaler = one(helm_template(), "DaskAutoscaler")
    assert autoscaler["spec"]["cluster"] == daskcluster(helm_template())["metadata"]["name"]


@pytest.mark.parametrize(
    "assignments",
    [
        ["dask.worker.resources.limits.cpu=2", "dask.worker.resources.limits.memory=2147483648"],
        ["dask.scheduler.resources.requests.cpu=1", "dask.worker.resources.requests.cpu=0.5"],
    ],
    ids=["integers from --set", "whole and fractional cpus"],
)
def test_numeric_quantities_render_valid_for_the_crd(assignments: list[str]) -> None:
    """A quantity typed as a number is rendered as the string the DaskCluster CRD requires."""
    cluster = daskcluster(helm_template(set_values=assignments))
    validate_custom_resource(cluster)
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    for quantities in worker["resources"].values():
        assert all(isinstance(q, str) for q in quantities.values()), worker["resources"]


def test_numeric_quantities_from_a_values_file_have_no_exponent(tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text("dask:\n  worker:\n    resources:\n      limits:\n        memory: 2147483648\n")
    worker = daskcluster(helm_template(values_file))["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["memory"] == "2147483648"
    assert worker["command"][worker["command"].index("--memory-limit") + 1] == "2147483648"


def test_a_malformed_quantity_is_refused_by_the_schema() -> None:
    with pytest.raises(AssertionError, match="cpu"):
        helm_template(set_values=["dask.worker.resources.limits.cpu=two"])


def test_unready_api_pods_never_block_a_node_drain(rendered: list[dict[str, Any]]) -> None:
    pdbs = [d for d in rendered if d["kind"] == "PodDisruptionBudget"]
    assert all(pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow" for pdb in pdbs)


def test_cluster_domain_is_a_value() -> None:
    api = api_container(helm_template(set_values=["clusterDomain=corp.example"]))
    assert env_of(api)["DASK_SCHEDULER_ADDRESS"].endswith(".svc.corp.example:8786")


def test_chart_pods_take_the_project_dask_settings_from_the_image_and_the_scheduler_expires_silent_workers_promptly(
    rendered: list[dict[str, Any]],
) -> None:
    # service/dask.yaml is installed in the image (tests/test_image.py shows the pods read it): the
    # chart repeats none of it, so there is one declaration to change.
    spec = daskcluster(rendered)["spec"]
    worker_env = env_of(spec["worker"]["spec"]["containers"][0])
    scheduler_env = env_of(spec["scheduler"]["spec"]["containers"][0])
    project = {variable(key) for key in project_settings()}
    assert "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED" in project
    assert not project & (set(worker_env) | set(scheduler_env))
    assert dask.utils.parse_timedelta(scheduler_env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"]) <= 60


def test_scale_to_zero_makes_the_api_hold_requests_for_a_cold_start() -> None:
    config = api_config_map(helm_template(CHART / "ci" / "scale-to-zero-values.yaml"))["data"]
    assert config["COLD_START_QUEUE"] == "16"
    assert Settings.from_environ(config).cold_start_queue == 16  # a value the service accepts
    # with workers kept, nothing is held: no workers is a fast 503
    assert "COLD_START_QUEUE" not in api_config_map(helm_template())["data"]


def test_api_replicas_spread_over_nodes_by_default(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert selector_matches(spread["labelSelector"], pod["metadata"]["labels"])


def test_priority_class_and_pod_metadata_reach_every_role() -> None:
    rendered = helm_template(set_values=[
        *(f"{role}.priorityClassName=critical" for role in ("api", "dask.scheduler", "dask.worker")),
        *(f"{role}.podLabels.team=ml" for role in ("api", "dask.scheduler", "dask.worker")),
        "dask.worker.podAnnotations.note=x",
    ])
    pods = pod_templates(rendered)
    cell = daskcluster(rendered)["metadata"]["name"]
    for name in ("Deployment/compute-api", dask_pod_key(cell, "scheduler"), dask_pod_key(cell, "worker")):
        assert pods[name]["spec"]["priorityClassName"] == "critical", name
        assert pods[name]["metadata"]["labels"]["team"] == "ml", name
    assert pods[dask_pod_key(cell, "worker")]["metadata"]["annotations"] == {"note": "x"}
    validate_all(rendered)


def test_the_nanny_restarts_a_worker_before_the_kernel_kills_it(rendered: list[dict[str, Any]]) -> None:
    worker = daskcluster(rendered)["spec"]["worker"]["spec"]["containers"][0]
    assert float(env_of(worker)["DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE"]) < 0.95


# --- monitoring -------------------------------------------------------------------------------------


MONITORING = CHART / "ci" / "monitoring-values.yaml"


@pytest.fixture(scope="module")
def monitored() -> list[dict[str, Any]]:
    return helm_template(MONITORING, release="compute-api", namespace=NAMESPACE)


def scrape_targets(documents: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each monitor -> (the pod it selects, the container port it scrapes), resolved the way the
    Prometheus Operator resolves them: ServiceMonitor -> Service by labels -> Service port by name ->
    targetPort on the pods the Service selects; PodMonitor -> pods by labels -> container port by name."""
    pods = pod_templates(documents)
    services = by_kind(documents, "Service")
    targets = {}

    def selected(selector: dict[str, Any]) -> dict[str, Any]:
        (pod,) = [pod for pod in pods.values() if selector_matches(selector, pod["metadata"].get("labels", {}))]
        return pod

    def container_port(pod: dict[str, Any], name: str) -> dict[str, Any]:
        (port,) = [p for c in containers(pod) for p in c.get("ports", []) if p["name"] == name]
        return port

    for monitor in by_kind(documents, "ServiceMonitor"):
        (service,) = [s for s in services if selector_matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
        (endpoint,) = monitor["spec"]["endpoints"]
        (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        pod = selected({"matchLabels": service["spec"]["selector"]})
        targets[monitor["metadata"]["name"]] = (pod, container_port(pod, service_port["targetPort"]))
    for monitor in by_kind(documents, "PodMonitor"):
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        pod = selected(monitor["spec"]["selector"])
        targets[monitor["metadata"]["name"]] = (pod, container_port(pod, endpoint["port"]))
    return targets


def test_monitors_scrape_the_api_the_scheduler_and_the_workers(monitored: list[dict[str, Any]]) -> None:
    """Each monitor selects exactly one kind of pod (the operator's own pod builder makes the Dask
    ones) and a port that serves /metrics there: the API's 8000, distributed's dashboard 8787."""
    targets = scrape_targets(monitored)
    roles = {name: pod["metadata"]["labels"]["app.kubernetes.io/component"] for name, (pod, _) in targets.items()}
    assert roles == {"compute-api": "api", "compute-api-scheduler": "scheduler", "compute-api-worker": "worker"}
    assert {name: port["containerPort"] for name, (_, port) in targets.items()} == {
        "compute-api": 8000, "compute-api-scheduler": 8787, "compute-api-worker": 8787,
    }
    for monitor in by_kind(monitored, "ServiceMonitor") + by_kind(monitored, "PodMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what the Prometheus selects
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"].get("endpoints", []) + monitor["spec"].get("podMetricsEndpoints", [])
        assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
        assert endpoint["metricRelabelings"][0]["action"] == "drop"


def test_the_scheduler_serves_its_metrics_on_the_scraped_port(monitored: list[dict[str, Any]]) -> None:
    """distributed's Prometheus route is among the scheduler's HTTP routes the chart configures
    (setting the routes replaces the whole default list)."""
    scheduler = operator_pods(daskcluster(monitored))["scheduler"]
    env = env_of(scheduler["spec"]["containers"][0])
    assert "distributed.http.scheduler.prometheus" in ast.literal_eval(env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"])


def test_the_network_policies_admit_every_scrape(monitored: list[dict[str, Any]]) -> None:
    """The scraper's namespace reaches each monitored port, through the policies that select the pod."""
    prometheus = {"metadata": {"labels": {"app.kubernetes.io/name": "prometheus"}}}
    for name, (pod, port) in scrape_targets(monitored).items():
        assert _reach(monitored, prometheus, pod, port["containerPort"], src_namespace="monitoring"), name


def test_monitors_the_network_policies_would_block_are_refused() -> None:
    result = run([helm(), "template", "x", str(CHART), "--set", "monitoring.enabled=true"], check=False)
    assert result.returncode != 0
    assert "networkPolicy.metricsScraperNamespace" in result.stderr
    # without NetworkPolicies there is nothing to admit
    assert by_kind(helm_template(set_values=["monitoring.enabled=true", "networkPolicy.enabled=false"]), "PodMonitor")


@pytest.mark.parametrize(
    "assignment", ["monitoring.interval=30", "monitoring.scrapeTimeout=ten", "monitoring.interval=1m 2s"]
)
def test_the_schema_refuses_a_malformed_scrape_interval(assignment: str) -> None:
    result = run([helm(), "template", "x", str(CHART), "--set", assignment], check=False)
    assert result.returncode != 0 and assignment.split("=")[0].split(".")[-1] in result.stderr


def dashboard(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [c for c in by_kind(documents, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    return json.loads(config["data"]["compute-api.json"])


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def test_the_dashboard_is_for_grafanas_sidecar(monitored: list[dict[str, Any]]) -> None:
    (config,) = [c for c in by_kind(monitored, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["namespace"] == "monitoring"
    assert config["metadata"]["annotations"] == {"grafana_folder": "compute"}
    board = dashboard(monitored)
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for subject in ("requests per second", "latency", "503", "coalesced", "in flight", "workers", "queue",
                    "function", "micro-batched", "cells"):
        assert subject in titles
    assert not by_kind(helm_template(), "ConfigMap")[1:], "no dashboard by default"


def test_every_dashboard_query_reads_one_release(monitored: list[dict[str, Any]]) -> None:
    """Each query is scoped to the namespace and release picked at the top (the label the monitors
    copy from the pods), so several releases share one Prometheus and one dashboard."""
    board = dashboard(monitored)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "release"}
    for query in dashboard_queries(board):
        assert 'namespace="$namespace", app_kubernetes_io_instance="$release"' in query, query
    for monitor in by_kind(monitored, "ServiceMonitor") + by_kind(monitored, "PodMonitor"):
        assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]


# --- upgrades -----------------------------------------------------------------------------------------


def helm_owned(doc: dict[str, Any], release: str = "compute-api") -> dict[str, Any]:
    return as_applied(doc, release, NAMESPACE)


def test_a_changed_image_or_dask_pod_spec_is_a_new_cluster_and_the_api_follows() -> None:
    """The operator never rolls a changed DaskCluster spec out (it acts on creation and on
    spec.worker.replicas only), so the chart names the cluster after its spec: an upgrade that
    changes what the scheduler or workers run is a new cluster, and every reference follows it."""
    import inspect

    from dask_kubernetes.operator.controller import controller

    handlers = inspect.getsource(controller)
    assert '@kopf.on.create("daskcluster.kubernetes.dask.org")' in handlers
    spec_handler = r"@kopf\.on\.(update|field)\(\s*\"daskcluster[^)]*field=\"spec\.(scheduler|worker\.spec)"
    assert not re.search(spec_handler, handlers)

    before = helm_template(release="compute-api", namespace=NAMESPACE)
    name = daskcluster(before)["metadata"]["name"]
    assert re.fullmatch(r"compute-api-[0-9a-f]{8}", name)
    for change in (["image.tag=2.0.0"], ["dask.worker.nthreads=2"], ["dask.scheduler.workerTTL=60s"]):
        after = helm_template(release="compute-api", namespace=NAMESPACE, set_values=change)
        renamed = daskcluster(after)["metadata"]["name"]
        assert renamed != name, change
        assert env_of(api_container(after))["DASK_SCHEDULER_ADDRESS"].startswith(f"tcp://{renamed}-scheduler."), change
        autoscaler = one(after, "DaskAutoscaler")
        assert autoscaler["spec"]["cluster"] == renamed == autoscaler["metadata"]["name"]
    # What the operator does act on, and what only the API uses, keep the cluster.
    for change in (["dask.worker.replicas=4"], ["api.replicas=3"], ["dask.autoscaler.maximum=20"]):
        same = helm_template(release="compute-api", namespace=NAMESPACE, set_values=change)
        assert daskcluster(same)["metadata"]["name"] == name, change
    long = daskcluster(helm_template(release="a" * 53, namespace=NAMESPACE))["metadata"]["name"]
    assert len(long) <= 53  # the operator's limit (it appends -scheduler / -default)


def test_the_old_cluster_drains_and_the_operator_deletes_it_once_idle() -> None:
    """During an upgrade the release's older cluster is re-applied as it is, with idleTimeout, so
    Helm does not delete it under the old API pods' requests and the operator's autoshutdown timer
    does once its scheduler has been idle that long. Other releases' clusters, clusters already being
    deleted and the current one are left alone."""
    import inspect

    from dask_kubernetes.operator.controller import controller

    autoshutdown = inspect.getsource(controller.daskcluster_autoshutdown)
    assert 'spec.get("idleTimeout", 0)' in autoshutdown and "await cluster.delete()" in autoshutdown
    assert "/api/v1/check_idle" in inspect.getsource(controller.check_scheduler_idle)

    old = helm_owned(daskcluster(helm_template(release="compute-api", namespace=NAMESPACE)))
    current = daskcluster(helm_template(release="compute-api", namespace=NAMESPACE, set_values=["image.tag=2.0.0"]))
    other_release = helm_owned(daskcluster(helm_template(release="other", namespace=NAMESPACE)), release="other")
    deleting = helm_owned(daskcluster(helm_template(release="compute-api", namespace=NAMESPACE,
                                                    set_values=["image.tag=1.9.0"])))
    deleting["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    live = [old, helm_owned(current), other_release, deleting]

    (retiring,) = retiring_clusters(live, [current["metadata"]["name"]], idle_timeout=120)
    assert retiring["metadata"]["name"] == old["metadata"]["name"]
    assert retiring["spec"] == old["spec"] | {"idleTimeout": 120}
    assert retiring["metadata"]["labels"] == old["metadata"]["labels"] | {"compute-api/retiring": "true"}
    validate_custom_resource(retiring)
    # A rollback to a cluster that still exists makes it current again: nothing retires it.
    assert retiring_clusters([old], [old["metadata"]["name"]]) == []
    # helm template / --dry-run: no API server, no lookup, nothing extra rendered.
    assert len(by_kind(helm_template(), "DaskCluster")) == 1


def test_retirement_waits_longer_than_a_rollout() -> None:
    result = run([helm(), "template", "x", str(CHART), "--set", "dask.upgrade.retireAfterIdleSeconds=0"], check=False)
    assert result.returncode != 0 and "retireAfterIdleSeconds" in result.stderr


# --- cells --------------------------------------------------------------------------------------------


def test_cells_are_identical_clusters_the_api_places_requests_on() -> None:
    """dask.cells N: N DaskClusters (one hash, one index each), an autoscaler each, every scheduler
    in the API's SCHEDULER_ADDRESSES, and the release's NetworkPolicies covering every cell's pods."""
    documents = helm_template(CHART / "ci" / "cells-values.yaml", release="compute-api", namespace=NAMESPACE)
    names = [c["metadata"]["name"] for c in daskclusters(documents)]
    (digest,) = {name.rsplit("-", 1)[1] for name in names}
    assert names == [f"compute-api-c0-{digest}", f"compute-api-c1-{digest}"]
    daskcluster(documents)  # identical but for their names
    # every cell's pods, not only the last cell's (pod_templates keys them by cluster name too)
    assert {key for key in pod_templates(documents) if key.startswith("DaskCluster/")} == {
        dask_pod_key(name, role) for name in names for role in ("scheduler", "worker")}
    assert [a["spec"]["cluster"] for a in by_kind(documents, "DaskAutoscaler")] == names
    assert [a.split("//")[1].split("-scheduler.")[0] for a in scheduler_addresses(documents)] == names
    for cluster in daskclusters(documents):
        for role, pod in operator_pods(cluster).items():
            own = f"{cluster['metadata']['name']}-{role}-peers"
            for policy in (_policy(documents, f"-{role}"), _policy(documents, own)):
                assert selector_matches(policy["spec"]["podSelector"], pod["metadata"]["labels"]), (cluster, role)
    # the upgrade path retires every cell of the old revision, and none of the new
    upgraded = helm_template(CHART / "ci" / "cells-values.yaml", release="compute-api", namespace=NAMESPACE,
                             set_values=["image.tag=2.0.0"])
    new_names = [c["metadata"]["name"] for c in daskclusters(upgraded)]
    assert not set(new_names) & set(names)
    live = [helm_owned(c) for c in daskclusters(documents) + daskclusters(upgraded)]
    assert [c["metadata"]["name"] for c in retiring_clusters(live, new_names)] == names


# --- NetworkPolicies per cell -------------------------------------------------------------------------


def _cell_pods(documents: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per DaskCluster, its scheduler and worker pods as the operator builds them."""
    return {c["metadata"]["name"]: operator_pods(c) for c in by_kind(documents, "DaskCluster")}


def _named_ports(pod: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if "name" in p}


def _reach(documents: list[dict[str, Any]], src: dict[str, Any], dst: dict[str, Any], port: int,
           *, src_namespace: str | None = None) -> bool:
    return network_allows(documents, src["metadata"]["labels"], dst["metadata"]["labels"], port,
                          dst_named_ports=_named_ports(dst), namespace=NAMESPACE, src_namespace=src_namespace)


def assert_cells_isolated(documents: list[dict[str, Any]], cells: int) -> None:
    """Every pair of cells: a worker reaches its own scheduler (8786) and its own cell's workers
    (8788/8789), never another cell's; each scheduler reaches its own workers only; the API reaches
    every scheduler and every worker's comm port (it fetches results there), never a nanny; the
    operator reaches every scheduler's HTTP API, the ingress controller no scheduler."""
    pods = _cell_pods(documents)
    assert len(pods) == cells, list(pods)
    api = pod_templates(documents)[f"Deployment/{one(documents, 'Deployment')['metadata']['name']}"]
    operator = {"metadata": {"labels": {"app": "dask-kubernetes-operator"}}}
    for a, cell_a in pods.items():
        assert _reach(documents, api, cell_a["scheduler"], 8786), a
        assert _reach(documents, api, cell_a["worker"], 8788), a
        assert not _reach(documents, api, cell_a["worker"], 8789), a
        assert not _reach(documents, api, cell_a["worker"], 8787), a
        assert _reach(documents, operator, cell_a["scheduler"], 8787, src_namespace="dask-operator"), a
        assert not _reach(documents, operator, cell_a["scheduler"], 8786, src_namespace="dask-operator"), a
        assert not _reach(documents, api, cell_a["scheduler"], 8787, src_namespace="ingress-nginx"), a
        assert not _reach(documents, cell_a["worker"], api, 8000), a
        for b, cell_b in pods.items():
            same = a == b
            assert _reach(documents, cell_a["worker"], cell_b["scheduler"], 8786) is same, (a, b)
            for port in (8788, 8789):
                assert _reach(documents, cell_a["worker"], cell_b["worker"], port) is same, (a, b, port)
                assert _reach(documents, cell_a["scheduler"], cell_b["worker"], port) is same, (a, b, port)


@pytest.mark.parametrize("cells", [1, 3])
def test_cells_reach_only_their_own_scheduler(cells: int) -> None:
    documents = helm_template(release="compute-api", namespace=NAMESPACE, set_values=[f"dask.cells={cells}"])
    assert_cells_isolated(documents, cells)
    # per cell: exactly its two policies, selecting by the operator's own pod labels
    names = [c["metadata"]["name"] for c in daskclusters(documents)]
    per_cell = sorted(p["metadata"]["name"] for p in by_kind(documents, "NetworkPolicy")
                      if "dask.org/cluster-name" in p["metadata"]["labels"])
    assert per_cell == sorted(f"{n}-{role}-peers" for n in names for role in ("scheduler", "worker"))


def test_network_allows_follows_the_networkpolicy_api() -> None:
    """The offline checker against hand-made policies whose verdicts the Kubernetes docs state."""
    a, b = {"role": "a"}, {"role": "b"}
    assert network_allows([], a, b, 80)  # nothing isolates: all allowed
    deny_b = {"kind": "NetworkPolicy", "metadata": {"name": "x"},
              "spec": {"podSelector": {"matchLabels": b}, "policyTypes": ["Ingress"]}}
    assert not network_allows([deny_b], a, b, 80)
    assert network_allows([deny_b], b, a, 80)
    allow_a = {"kind": "NetworkPolicy", "metadata": {"name": "y"},
               "spec": {"podSelector": {"matchLabels": b},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": a}}], "ports": [{"port": "web"}]}]}}
    # policies add up; named ports resolve on the destination; UDP rules never admit TCP
    assert network_allows([deny_b, allow_a], a, b, 80, dst_named_ports={"web": 80})
    assert not network_allows([deny_b, allow_a], a, b, 81, dst_named_ports={"web": 80})
    assert not network_allows([allow_a], a, b, 80, dst_named_ports={"web": 80}, src_namespace="other")
    egress_only_dns = {"kind": "NetworkPolicy", "metadata": {"name": "z"},
                       "spec": {"podSelector": {"matchLabels": a}, "policyTypes": ["Egress"],
                                "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}}
    assert not network_allows([egress_only_dns], a, b, 53)


def test_retiring_cells_keep_their_policies_until_deleted() -> None:
    """During an upgrade every old cell still drains the old API pods' requests: its cluster and its
    two policies are re-applied (labelled retiring), so its workers still reach its scheduler, and the
    old and new cells stay apart."""
    cells = ["dask.cells=2"]
    old = helm_template(release="compute-api", namespace=NAMESPACE, set_values=cells)
    new = helm_template(release="compute-api", namespace=NAMESPACE, set_values=[*cells, "image.tag=2.0.0"])
    live = [helm_owned(c) for c in daskclusters(old) + daskclusters(new)]
    upgrading = helm_template_upgrading(live, namespace=NAMESPACE, set_values=[*cells, "image.tag=2.0.0"])
    old_names = [c["metadata"]["name"] for c in daskclusters(old)]
    retiring = [p["metadata"]["name"] for p in by_kind(upgrading, "NetworkPolicy")
                if p["metadata"]["labels"].get("compute-api/retiring") == "true"]
    assert sorted(retiring) == sorted(f"{n}-{role}-peers" for n in old_names for role in ("scheduler", "worker"))
    # the retiring policies are exactly the ones the old revision applied (Helm changes nothing)
    for name in retiring:
        (before,) = [p for p in by_kind(old, "NetworkPolicy") if p["metadata"]["name"] == name]
        (after,) = [p for p in by_kind(upgrading, "NetworkPolicy") if p["metadata"]["name"] == name]
        assert after["spec"] == before["spec"], name
    assert_cells_isolated(upgrading, 4)
    validate_all(by_kind(upgrading, "NetworkPolicy"))
    # with the policies off, a retiring cluster brings none either
    off = helm_template_upgrading(live, namespace=NAMESPACE,
                                  set_values=[*cells, "image.tag=2.0.0", "networkPolicy.enabled=false"])
    assert len(by_kind(off, "DaskCluster")) == 4 and by_kind(off, "NetworkPolicy") == []
