"""`make run`'s embedded cluster as a user meets it: Ctrl+C, a killed API, nothing left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
from conftest import ServerProcess, wait_until


def family(server: ServerProcess) -> list[psutil.Process]:
    """The API and every process it started (scheduler, nannies, workers)."""
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def test_ctrl_c_exits_within_seconds_cleanly_and_leaves_no_process(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"EMBEDDED_WORKERS": "2"}) as server:
        assert httpx.get(f"{server.url}/fib/22").json() == {"n": 22, "value": 17711}
        processes = family(server)
        assert len(processes) >= 5, processes  # API, scheduler, 2 nannies, 2 workers
        assert server.proc is not None
        # A terminal sends SIGINT to its whole foreground process group.
        t0 = time.perf_counter()
        os.killpg(os.getpgid(server.proc.pid), signal.SIGINT)
        status = server.proc.wait(30)
        took = time.perf_counter() - t0
        wait_until(lambda: gone(processes), 10, 0.1, "every process of the embedded cluster gone")
        log = server.log()
        print(f"Ctrl+C: exit status {status} after {took:.1f} s; {len(processes)} processes, none left")
        assert status in (0, -signal.SIGINT), log[-3000:]
        assert took < 10, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


def test_a_killed_api_leaves_no_orphans(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, env={"EMBEDDED_WORKERS": "1"}) as server:
        processes = family(server)
        assert server.proc is not None
        server.proc.kill()  # SIGKILL: no shutdown code runs in the API
        server.proc.wait(10)
        t0 = time.perf_counter()
        wait_until(lambda: gone(processes[1:]), 30, 0.2, "the embedded cluster exits by itself")
        took = time.perf_counter() - t0
        print(f"API SIGKILLed: its {len(processes) - 1} cluster processes exited {took:.1f} s later")
