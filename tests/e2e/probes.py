"""The kubelet's periodic probes, as the rendered pod specs declare them.

Readiness decides which API pods the ingress sends traffic to (the endpoints controller's job);
liveness restarts a container that stops answering. Both use the probe's own periodSeconds,
timeoutSeconds, failureThreshold and initialDelaySeconds, so a probe that would misbehave in a real
cluster (e.g. take every API pod out of the Service during a scheduler outage) misbehaves here too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from e2e.runner import Cluster, Pod


@dataclass
class _State:
    last: float = 0.0
    failures: int = 0


@dataclass(frozen=True)
class Event:
    at: float  # monotonic
    pod: str
    what: str  # "ready", "unready", "liveness-restart"


@dataclass
class Prober:
    cluster: Cluster
    on_readiness_change: Callable[[], None]
    events: list[Event] = field(default_factory=list)
    ready: set[str] = field(default_factory=set)
    _states: dict[tuple[str, str], _State] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubelet-probes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def mark_ready(self, pod: Pod) -> None:
        """A new pod passed its readiness probe (Cluster.wait_ready): it joins the endpoints."""
        self._states[(pod.name, "readinessProbe")] = _State(last=time.monotonic())
        self.ready.add(pod.name)
        self.events.append(Event(time.monotonic(), pod.name, "ready"))

    def forget(self, pod: Pod) -> None:
        self.ready.discard(pod.name)
        for kind in ("readinessProbe", "livenessProbe"):
            self._states.pop((pod.name, kind), None)

    def unready_seconds(self, pod: str, start: float, end: float) -> float:
        """How long ``pod`` was out of the endpoints between ``start`` and ``end``."""
        total, since = 0.0, None
        ready = True
        for event in self.events:
            if event.pod != pod or event.what not in ("ready", "unready"):
                continue
            if event.what == "unready" and ready:
                ready, since = False, event.at
            elif event.what == "ready" and not ready:
                ready = True
                total += max(0.0, min(event.at, end) - max(since, start))
        if not ready:
            total += max(0.0, end - max(since, start))
        return total

    def _loop(self) -> None:
        with httpx.Client() as http:
            while not self._stop.wait(0.2):
                changed = False
                for pod in list(self.cluster.pods.values()):
                    # a stopped container is not probed; a frozen pod's node is gone with its kubelet
                    if pod.spec is None or pod.name in self.cluster.stopped or pod.role == "frozen":
                        continue
                    with contextlib.suppress(Exception):  # the pod may be deleted under our feet
                        changed |= self._probe(http, pod, "readinessProbe")
                        self._probe(http, pod, "livenessProbe")
                if changed:
                    self.on_readiness_change()

    def _probe(self, http: httpx.Client, pod: Pod, kind: str) -> bool:
        """Run ``kind`` if due; True when the pod's readiness changed."""
        probe: dict[str, Any] | None = pod.spec.container.get(kind)
        # Readiness only matters for the pods behind the Service the ingress routes to (the API).
        if probe is None or (kind == "readinessProbe" and pod.role != "api"):
            return False
        now = time.monotonic()
        state = self._states.setdefault((pod.name, kind), _State())
        if now - pod.started < probe.get("initialDelaySeconds", 0) or now - state.last < probe.get("periodSeconds", 10):
            return False
        if kind == "readinessProbe" and state.last == 0.0:
            return False  # a new pod: Cluster.wait_ready probes it first, then mark_ready
        state.last = now
        get = probe["httpGet"]
        url = f"http://{self.cluster.ip(pod)}:{pod.spec.port(get['port'])}{get['path']}"
        try:
            ok = 200 <= http.get(url, timeout=probe.get("timeoutSeconds", 1)).status_code < 400
        except httpx.HTTPError:
            ok = False
        state.failures = 0 if ok else state.failures + 1
        if kind == "livenessProbe":
            if state.failures >= probe.get("failureThreshold", 3):
                self.events.append(Event(now, pod.name, "liveness-restart"))
                self.cluster.restart_container(pod)
                state.failures = 0
            return False
        if ok and pod.name not in self.ready:
            self.ready.add(pod.name)
            self.events.append(Event(now, pod.name, "ready"))
            return True
        if not ok and pod.name in self.ready and state.failures >= probe.get("failureThreshold", 3):
            self.ready.discard(pod.name)
            self.events.append(Event(now, pod.name, "unready"))
            return True
        return False
