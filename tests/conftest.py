"""Shared test helpers: real servers and real Dask processes, started as subprocesses.

Nothing here is mocked: ``ServerProcess`` runs ``python -m service serve`` (uvicorn, the real
lifespan), and ``DaskProcesses`` runs ``dask scheduler`` / ``dask worker`` exactly as a user would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn

from bench.processes import DASK_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {'name{labels}': value}."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class ServerProcess:
    """``python -m service serve`` on an ephemeral loopback port, logs in ``log_path``."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, args: list[str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LOG_LEVEL": "info", **(env or {})}
        self.args = args or []
        self.log_path = log_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: str | None = "/readyz", timeout: float = 60) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,  # own process group: its Dask workers die with it
        )
        if wait:
            def up() -> bool:
                assert self.proc is not None and self.proc.poll() is None, self.log()
                return httpx.get(self.url + wait, timeout=2).status_code == 200
            try:
                wait_until(up, timeout, what=f"{self.url}{wait} -> 200")
            except BaseException:
                self.stop()  # a server that never became ready must not outlive the test
                raise TimeoutError(f"{self.url}{wait} never answered 200; log:\n{self.log()[-3000:]}") from None
        return self

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is not None:
            _stop(self.proc, timeout)
            return self.proc.returncode
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()  # already started: .start(wait=...)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DaskProcesses:
    """A real ``dask scheduler`` and ``dask worker`` processes on loopback, reading the project's Dask
    settings as the image's do (``DASK_CONFIG``: service/dask.yaml, with its ``service.direct`` preload)."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.env = {**os.environ, "DASK_CONFIG": str(DASK_SETTINGS), **(env or {})}
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        return subprocess.Popen([str(BIN / "dask"), *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn(
            f"scheduler-{self.port}",
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
        )
        wait_until(self._scheduler_listening, 30, what=f"scheduler on {self.address}")

    def _scheduler_listening(self) -> bool:
        """Our scheduler process listens on the port: a connection alone could reach another process
        that took the port first (free_port() only found it free a moment ago)."""
        assert self.scheduler is not None
        if self.scheduler.poll() is not None:
            raise RuntimeError(f"the scheduler for {self.address} exited with {self.scheduler.returncode}")
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                   for c in psutil.Process(self.scheduler.pid).net_connections("tcp"))

    def stop_scheduler(self, kill: bool = False) -> None:
        if self.scheduler is not None:
            if kill:
                os.killpg(self.scheduler.pid, signal.SIGKILL)
                self.scheduler.wait()
            else:
                _stop(self.scheduler)
            self.scheduler = None

    def start_worker(self, name: str | None = None, nthreads: int = 1) -> str:
        name = name or f"worker-{len(self.workers)}"
        self.workers[name] = self._spawn(
            f"{name}-{self.port}",
            ["worker", self.address, "--name", name, "--nthreads", str(nthreads), "--nworkers", "1",
             "--no-dashboard", "--host", "127.0.0.1"],
        )
        return name

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def scheduler_call(self, func, timeout: float = 10):
        """Run ``func(dask_scheduler)`` on the scheduler from a separate, short-lived client."""
        from distributed import Client

        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            return client.run_on_scheduler(func)

    def processing(self) -> int:
        """Tasks running (or assigned to run) on a worker right now."""
        # A lambda, not a module function: the scheduler cannot import this test module.
        return self.scheduler_call(
            lambda dask_scheduler: sum(len(ws.processing) for ws in dask_scheduler.workers.values())
        )

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        wait_until(lambda: self.scheduler_call(lambda dask_scheduler: len(dask_scheduler.workers)) >= n,
                   timeout, interval=0.5, what=f"{n} workers on {self.address}")

    def close(self) -> None:
        for name in list(self.workers):
            proc = self.workers.pop(name)
            _stop(proc, 10)
        self.stop_scheduler()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def embedded_server(log_dir: Path) -> Iterator[ServerProcess]:
    """One embedded-mode server (2 worker processes) shared by every test that only reads it."""
    # FIB_MAX_N 40: tests size n from this machine's speed, and a fast machine needs a larger one.
    server = ServerProcess(log_dir, env={"EMBEDDED_WORKERS": "2", "FIB_MAX_N": "40"})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dask_cluster_procs(tmp_path: Path) -> Iterator[DaskProcesses]:
    """A fresh scheduler with two single-threaded workers."""
    cluster = DaskProcesses(tmp_path)
    cluster.start_scheduler()
    cluster.start_worker()
    cluster.start_worker()
    cluster.wait_for_workers(2)
    yield cluster
    cluster.close()


@contextlib.contextmanager
def uvicorn_thread(app, port: int) -> Iterator[str]:
    """A real uvicorn server for an app built in this process (here: with a test-only registry)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, what=f"{url}/readyz")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not shut down"
