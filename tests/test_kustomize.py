"""The kustomize manifests (k8s/): the base is generated from the Helm chart (one source of truth)
and must not drift from it; every overlay renders with `kubectl kustomize` and validates like the
chart (Kubernetes 1.30/1.35 strict, operator CRDs, Pod Security "restricted")."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _k8s_helpers import (
    BASE_NAMESPACE,
    BASE_RELEASE,
    CHART,
    K8S,
    RECOMMENDED_LABELS,
    SCRIPTS,
    assert_restricted,
    by_kind,
    helm_template,
    kustomize,
    one,
    pod_templates,
    run,
    validate_all,
)

KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "kind", K8S / "locust"]
KUSTOMIZATION_IDS = [str(path.relative_to(K8S)) for path in KUSTOMIZATIONS]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def built(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(request.param)


def comparable(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Objects keyed by (kind, name), ignoring what kustomize adds (metadata.namespace, the Namespace
    object) and the managed-by label the generator rewrites."""
    result = {}
    for doc in documents:
        if doc["kind"] == "Namespace":
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"].pop("namespace", None)
        for metadata in _all_metadata(doc):
            if metadata.get("labels", {}).get("app.kubernetes.io/managed-by") in ("Helm", "kustomize"):
                metadata["labels"]["app.kubernetes.io/managed-by"] = "-"
        result[(doc["kind"], doc["metadata"]["name"])] = doc
    return result


def without_cluster_hash(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents with the DaskCluster's name (<base>-<hash of its spec>) replaced by its base:
    kustomize patches a cluster's spec but cannot rehash its name, so an overlay's cluster keeps the
    base's name where Helm, rendering the same spec, names it anew."""
    (cluster,) = [d for d in documents if d["kind"] == "DaskCluster"]
    name = cluster["metadata"]["name"]
    base = name.rsplit("-", 1)[0]
    return json.loads(json.dumps(documents).replace(name, base))


def _all_metadata(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = [doc["metadata"]]
    template = doc.get("spec", {}).get("template")
    if isinstance(template, dict) and "metadata" in template:
        found.append(template["metadata"])
    return found


def test_base_is_the_generated_chart_render(tmp_path: Path) -> None:
    """The committed base equals a fresh run of its generator, byte for byte."""
    fresh = tmp_path / "compute-api.yaml"
    run([str(SCRIPTS / "render-kustomize-base.sh"), str(fresh)])
    committed = K8S / "base" / "compute-api.yaml"
    assert fresh.read_text() == committed.read_text(), (
        "k8s/base is stale: run scripts/render-kustomize-base.sh and commit the result"
    )


def test_base_has_the_same_objects_as_the_chart_defaults() -> None:
    chart = comparable(helm_template(release=BASE_RELEASE, namespace=BASE_NAMESPACE, include_hooks=False))
    base = comparable(kustomize(K8S / "base"))
    assert base.keys() == chart.keys()
    for key in chart:
        assert base[key] == chart[key], key


def test_kind_overlay_matches_the_chart_with_kind_values() -> None:
    """The kind overlay and `helm install -f ci/kind-values.yaml` deploy the same objects, so the
    kind recipe can use either."""
    chart = comparable(without_cluster_hash(helm_template(CHART / "ci" / "kind-values.yaml", release=BASE_RELEASE,
                                                          namespace=BASE_NAMESPACE, include_hooks=False)))
    overlay = comparable(without_cluster_hash(kustomize(K8S / "overlays" / "kind")))
    assert overlay.keys() == chart.keys()
    for key in chart:
        assert overlay[key] == chart[key], key


def test_every_object_validates_strictly(built: list[dict[str, Any]]) -> None:
    validate_all(built)


def test_every_pod_is_pss_restricted(built: list[dict[str, Any]]) -> None:
    pods = pod_templates(built)
    assert pods
    for name, pod in pods.items():
        assert_restricted(name, pod["spec"])


def test_recommended_labels_on_every_object(built: list[dict[str, Any]]) -> None:
    for doc in built:
        labels = doc["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, (doc["kind"], doc["metadata"]["name"], missing)
    for name, pod in pod_templates(built).items():
        assert not [label for label in RECOMMENDED_LABELS if label not in pod["metadata"]["labels"]], name


def test_everything_lands_in_the_namespace_the_base_is_rendered_for(built: list[dict[str, Any]]) -> None:
    """The scheduler address embeds the namespace: the manifests only work in that namespace."""
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == BASE_NAMESPACE, (doc["kind"], doc["metadata"]["name"])


def test_namespace_enforces_restricted_pod_security() -> None:
    namespace = one(kustomize(K8S / "base"), "Namespace")
    assert namespace["metadata"]["name"] == BASE_NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kind_overlay_serves_on_localhost() -> None:
    documents = kustomize(K8S / "overlays" / "kind")
    ingress = one(documents, "Ingress")
    assert all("host" not in rule for rule in ingress["spec"]["rules"]), "kind publishes 127.0.0.1:80, any host"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert one(documents, "Deployment")["spec"]["replicas"] == 1
    assert by_kind(documents, "PodDisruptionBudget") == []
    assert one(documents, "DaskAutoscaler")["spec"]["maximum"] == 4


def test_kind_cluster_publishes_the_ingress() -> None:
    config = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    control_plane = next(node for node in config["nodes"] if node["role"] == "control-plane")
    mappings = {(m["containerPort"], m["hostPort"]) for m in control_plane["extraPortMappings"]}
    assert {(80, 80), (443, 443)} <= mappings
    assert all(m.get("listenAddress") == "127.0.0.1" for m in control_plane["extraPortMappings"])
    assert "ingress-ready=true" in "".join(control_plane["kubeadmConfigPatches"])
    assert sum(node["role"] == "worker" for node in config["nodes"]) >= 1


def test_locust_runs_the_project_locustfile_against_the_api() -> None:
    documents = kustomize(K8S / "locust")
    base = kustomize(K8S / "base")
    api_service = one(base, "Service")
    api_policy = next(p for p in by_kind(base, "NetworkPolicy") if p["metadata"]["name"].endswith("-api"))
    master_service = one(documents, "Service")
    deployments = {d["metadata"]["name"]: d for d in by_kind(documents, "Deployment")}
    master = deployments["compute-api-locust-master"]["spec"]["template"]
    worker = deployments["compute-api-locust-worker"]["spec"]["template"]
    for pod in (master, worker):
        container = pod["spec"]["containers"][0]
        command = container["command"]
        assert command[0] == "locust"
        locustfile = command[command.index("--locustfile") + 1]
        # The image copies locustfiles/ to /app/locustfiles (Dockerfile).
        assert locustfile == "/app/locustfiles/locustfile.py"
        assert (Path(__file__).resolve().parent.parent / "locustfiles" / "locustfile.py").exists()
        assert container["image"].endswith("-loadtest"), "the API image has no locust; the loadtest variant does"
    master_command = master["spec"]["containers"][0]["command"]
    assert "--master" in master_command
    assert master_command[master_command.index("--host") + 1] == (
        f"http://{api_service['metadata']['name']}.{BASE_NAMESPACE}.svc.cluster.local"
    )
    worker_command = worker["spec"]["containers"][0]["command"]
    assert "--worker" in worker_command
    assert worker_command[worker_command.index("--master-host") + 1] == master_service["metadata"]["name"]
    assert {p["targetPort"] for p in master_service["spec"]["ports"]} <= {
        p["name"] for p in master["spec"]["containers"][0]["ports"]}
    # Workers are admitted by the API's NetworkPolicy; the master never calls the API.
    client_peers = [peer["podSelector"]["matchLabels"] for rule in api_policy["spec"]["ingress"]
                    for peer in rule["from"] if "podSelector" in peer]
    assert any(labels.items() <= worker["metadata"]["labels"].items() for labels in client_peers)
