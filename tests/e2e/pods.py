"""Rendered pod specs -> `podman run` arguments, doing what the kubelet would do with them.

Only the kubelet's part is supplied here (resolving envFrom, `$(VAR)` expansion, mapping
securityContext and volumes onto the container runtime); everything else comes verbatim from the
manifests. Anything this translator cannot honour faithfully (valueFrom, other volume types, probes
on exec) raises, so a chart change that the e2e run would silently ignore fails instead.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _k8s_helpers import expand

# Kubernetes quantities used by this chart's resources.
_MEMORY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
_QUANTITY = re.compile(r"^([0-9.]+)([A-Za-z]*)$")


def memory_bytes(quantity: str | int) -> int:
    number, suffix = _QUANTITY.match(str(quantity)).groups()  # type: ignore[union-attr]
    return int(float(number) * _MEMORY_SUFFIXES.get(suffix, 1))


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_name(deployment: str) -> str:
    """A name shaped like the ReplicaSet controller's: <deployment>-<template hash>-<5 chars>."""
    suffix = uuid.uuid4().hex
    return f"{deployment}-{suffix[:10]}-{suffix[10:15]}"


@dataclass
class PodContainer:
    """One container of a pod template, resolved the way the kubelet resolves it."""

    pod: dict[str, Any]  # the pod template: metadata + spec
    container: dict[str, Any]
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Path] = field(default_factory=dict)  # Secret name -> host directory with its keys

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod["spec"]

    def env(self) -> dict[str, str]:
        """envFrom first, then env (later wins); values may reference earlier ones with $(VAR)."""
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            if set(source) != {"configMapRef"}:
                raise NotImplementedError(f"envFrom source {source} is not emulated")
            env.update(self.config_maps[source["configMapRef"]["name"]])
        for item in self.container.get("env", []):
            if "value" not in item:
                raise NotImplementedError(f"env {item['name']}: valueFrom is not emulated")
            env[item["name"]] = expand(str(item["value"]), env)
        return env

    def command(self) -> tuple[list[str] | None, list[str]]:
        """(entrypoint override or None, arguments), with $(VAR) expanded from the container env."""
        env = self.env()
        command = self.container.get("command")
        args = self.container.get("args")
        return (
            [expand(str(a), env) for a in command] if command is not None else None,
            [expand(str(a), env) for a in args] if args is not None else [],
        )

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return int(name_or_number)
        for port in self.container.get("ports", []):
            if port.get("name") == name_or_number:
                return int(port["containerPort"])
        raise KeyError(f"container {self.container['name']} has no port named {name_or_number}")

    def security_args(self) -> list[str]:
        pod_security = self.spec.get("securityContext", {})
        security = {**pod_security, **self.container.get("securityContext", {})}
        args: list[str] = []
        uid, gid = security.get("runAsUser"), security.get("runAsGroup")
        if security.get("runAsNonRoot"):
            # The kubelet refuses to start a runAsNonRoot container whose user is root or unknown.
            assert uid not in (None, 0), f"{self.container['name']}: runAsNonRoot with runAsUser={uid}"
        if uid is not None:
            args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if "fsGroup" in pod_security:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            # Only the pod's own volumes are writable: no podman-provided tmpfs on /tmp, /run.
            args += ["--read-only", "--read-only-tmpfs=false"]
        capabilities = security.get("capabilities", {})
        args += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
        args += [f"--cap-add={c}" for c in capabilities.get("add", [])]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp != "RuntimeDefault":  # podman's default profile is the runtime default
            raise NotImplementedError(f"seccompProfile {seccomp} is not emulated")
        return args

    def resource_args(self) -> list[str]:
        limits = self.container.get("resources", {}).get("limits", {})
        args = []
        if "memory" in limits:
            args += ["--memory", str(memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", f"{cpu_cores(limits['cpu']):g}"]
        return args

    def volume_args(self) -> list[str]:
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        args = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            path = mount["mountPath"]
            if "emptyDir" in volume:
                # The kubelet makes emptyDirs world-writable; a tmpfs is the closest runtime equivalent.
                args += ["--mount", f"type=tmpfs,destination={path},tmpfs-mode=1777"]
            elif "secret" in volume:
                host_dir = self.secrets[volume["secret"]["secretName"]]
                args += ["--volume", f"{host_dir}:{path}:ro" if mount.get("readOnly") else f"{host_dir}:{path}"]
            else:
                raise NotImplementedError(f"volume {volume} is not emulated")
        return args

    def grace_period(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def pod_args(self, name: str, hostname: str, network: str, aliases: list[str], labels: Mapping[str, str],
                 infra_image: str) -> list[str]:
        """`podman pod create`: the pod's network namespace, which (as in Kubernetes) keeps its IP and
        its DNS names while the container in it stops and restarts."""
        args = ["pod", "create", "--name", name, "--hostname", hostname, "--network", network,
                "--infra-image", infra_image]
        for alias in aliases:
            args += ["--network-alias", alias]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        return args

    def run_args(self, name: str, pod: str, labels: Mapping[str, str]) -> list[str]:
        """`podman run -d` of this container in ``pod``: what the kubelet would set up for it."""
        run = [
            "run", "--detach", "--name", name, "--pod", pod,
            # restartPolicy Always (Deployment pods): a container that exits is started again.
            "--restart", "always",
            "--stop-timeout", str(self.grace_period()),
        ]
        for key, value in labels.items():
            run += ["--label", f"{key}={value}"]
        return [*run, *self.container_args()]

    def container_args(self) -> list[str]:
        """The end of a `podman run` of this container, whatever runs it (a Deployment's pod, a hook
        run once): env, securityContext, resources, volumes and entrypoint, then image and arguments."""
        entrypoint, args = self.command()
        run: list[str] = []
        for key, value in self.env().items():
            run += ["--env", f"{key}={value}"]
        run += self.security_args() + self.resource_args() + self.volume_args()
        if entrypoint is not None:
            run += ["--entrypoint", json.dumps(entrypoint)]
        return [*run, self.container["image"], *args]


def containers_of(pod: dict[str, Any], config_maps: Mapping[str, Mapping[str, str]],
                  secrets: Mapping[str, Path]) -> list[PodContainer]:
    spec = pod["spec"]
    if spec.get("initContainers"):
        raise NotImplementedError("initContainers are not emulated")
    return [PodContainer(pod, c, config_maps, secrets) for c in spec["containers"]]


def operator_worker_pod(daskcluster: dict[str, Any], namespace: str) -> tuple[str, dict[str, Any]]:
    """A worker Deployment's name and pod template, built by the operator's own code with a fresh
    uuid, exactly as `daskworkergroup_replica_update` does for each new worker."""
    from dask_kubernetes.operator.controller import controller

    name = daskcluster["metadata"]["name"]
    worker = daskcluster["spec"]["worker"]
    labels = dict(daskcluster["metadata"].get("labels", {})) | worker.get("metadata", {}).get("labels", {})
    deployment = controller.build_worker_deployment_spec(
        worker_group_name=f"{name}-default",
        namespace=namespace,
        cluster_name=name,
        uuid=uuid.uuid4().hex[:10],
        pod_spec=copy.deepcopy(worker["spec"]),
        annotations={},
        labels=labels,
    )
    return deployment["metadata"]["name"], deployment["spec"]["template"]
