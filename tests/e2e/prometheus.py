"""A real Prometheus (Debian's package) scraping the cluster in a box through the chart's monitors.

What the Prometheus Operator does with a ServiceMonitor or a PodMonitor is emulated, no more: select
the pods (a ServiceMonitor through the Service its selector picks), find the scraped port by name,
and label each target as the operator's generated relabelings do (job, namespace, pod, container,
endpoint, service, and the podTargetLabels with their names sanitised). Targets are static addresses
because the pods here are containers, not Kubernetes endpoints; everything else (path, interval,
timeout, metric relabelings) is taken from the monitor verbatim.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import yaml
from _k8s_helpers import selector_matches
from conftest import free_port

from e2e.pods import PodContainer


def sanitize(label: str) -> str:
    """A Kubernetes label name as a Prometheus label name (the operator's sanitizeLabelName)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def relabel_config(rule: dict[str, Any]) -> dict[str, Any]:
    """A monitor's RelabelConfig (camelCase, action in any case) as Prometheus configuration."""
    return {re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): (value.lower() if key == "action" else value)
            for key, value in rule.items()}


def scrape_configs(documents: list[dict[str, Any]], pods: Iterable[tuple[PodContainer, str, str]],
                   namespace: str) -> list[dict[str, Any]]:
    """Prometheus scrape configs for the rendered monitors. ``pods``: (pod, pod name, IP) of every
    running pod; a monitor selects them by the labels of their template, as the operator would."""
    pods = list(pods)
    services = [d for d in documents if d["kind"] == "Service"]
    configs = []
    for monitor in documents:
        if monitor["kind"] not in ("ServiceMonitor", "PodMonitor"):
            continue
        spec = monitor["spec"]
        name = monitor["metadata"]["name"]
        if monitor["kind"] == "ServiceMonitor":
            (endpoint,) = spec["endpoints"]
            (service,) = [s for s in services if selector_matches(spec["selector"], s["metadata"]["labels"])]
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            selector = {"matchLabels": service["spec"]["selector"]}
            container_port, job = port["targetPort"], service["metadata"]["name"]
            extra = {"service": service["metadata"]["name"]}
        else:
            (endpoint,) = spec["podMetricsEndpoints"]
            selector, container_port, job = spec["selector"], endpoint["port"], f"{namespace}/{name}"
            extra = {}
        targets = []
        for pod, pod_name, ip in pods:
            labels = pod.pod["metadata"].get("labels", {})
            if not selector_matches(selector, labels):
                continue
            target_labels = {"job": job, "namespace": namespace, "pod": pod_name,
                             "container": pod.container["name"], "endpoint": endpoint["port"], **extra}
            target_labels |= {sanitize(k): labels[k] for k in spec.get("podTargetLabels", []) if k in labels}
            targets.append({"targets": [f"{ip}:{pod.port(container_port)}"], "labels": target_labels})
        configs.append({
            "job_name": f"{monitor['kind'].lower()}/{namespace}/{name}/0",
            "metrics_path": endpoint.get("path", "/metrics"),
            "scrape_interval": endpoint["interval"],
            "scrape_timeout": endpoint["scrapeTimeout"],
            "honor_labels": endpoint.get("honorLabels", False),
            "static_configs": targets,
            "metric_relabel_configs": [relabel_config(rule) for rule in endpoint.get("metricRelabelings", [])],
        })
    return configs


def grafana_expression(expr: str, variables: dict[str, str], scrape_interval: float) -> str:
    """A dashboard query as Grafana sends it: template variables replaced, and $__rate_interval as
    Grafana computes it for a range query (four scrape intervals at least)."""
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr.replace("$__rate_interval", f"{int(4 * scrape_interval)}s")


class Prometheus:
    """`prometheus` on loopback with a scrape configuration that can be replaced while it runs."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is required: sudo scripts/install-test-tools.sh (Debian's prometheus)"
        self.binary = binary
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.process: subprocess.Popen[bytes] | None = None

    def configure(self, scrape_configs: list[dict[str, Any]]) -> None:
        self.config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1s"},
                                               "scrape_configs": scrape_configs}))
        if self.process is not None:
            assert self.http.post("/-/reload").status_code == 200

    def __enter__(self) -> Prometheus:
        self.log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, (self.workdir / "prometheus.log").read_text()[-3000:]
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready within 60 s"
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()
        self.http.close()

    def targets(self) -> list[dict[str, Any]]:
        return self.http.get("/api/v1/targets", params={"state": "active"}).json()["data"]["activeTargets"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        answer = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": match}).json()
        assert answer["status"] == "success", f"{label} {match}: {answer}"
        return answer["data"]
