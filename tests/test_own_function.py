"""Bring your own function: a package written at test time, served by the real server, unchanged.

Nothing in service/ knows the package: it is named by COMPUTE_TASKS and found on PYTHONPATH, as in
an image built FROM compute-api's. INLINE_MAX_COST=0 sends every computation to the embedded Dask
workers, so the test also proves that workers import the function by reference.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import BIN, ROOT, ServerProcess, scrape, wait_until

PACKAGE = "acme_compute"
MODULE = f"{PACKAGE}.tasks"
SOURCE = '''
"""A user's own compute functions: nothing here is part of compute-api."""

from typing import Annotated, Literal

from pydantic import Field

from service.functions import declare


@declare(cost=lambda count, values, **_: count * (1 + len(values)),
         calibration={"count": 100, "scale": 1.0},
         examples=[{"count": 3, "scale": 0.5, "mode": "max", "values": [4, 9]},
                   {"count": 7, "scale": 2.0, "values": [1, 2, 3, 4]}])
def blend(
    count: Annotated[int, Field(ge=1, le=1000)],
    scale: Annotated[float, Field(ge=0.0, le=10.0)],
    mode: Literal["sum", "max"] = "sum",
    values: Annotated[list[Annotated[int, Field(ge=-100, le=100)]], Field(max_length=8)] = (1, 2, 3),
) -> float:
    """A small weighted blend of a few integers."""
    base = sum(values) if mode == "sum" else max(values, default=0)
    return base * scale * count


@declare(cost=lambda code: 1.0, calibration={"code": "calibrate"})
def explode(code: Literal["calibrate", "boom", "set"]) -> object:
    """Raises on purpose (but not while the API calibrates it), or returns what JSON cannot carry."""
    if code == "boom":
        raise ValueError("the user's function gave up: boom")
    return {1, 2} if code == "set" else code
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("userpkg")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("")
    (root / PACKAGE / "tasks.py").write_text(textwrap.dedent(SOURCE))
    return root


def user_env(package: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH", "")) if p)
    return {"COMPUTE_TASKS": MODULE, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def server(package: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    env = {**user_env(package), "INLINE_MAX_COST": "0", "EMBEDDED_WORKERS": "1"}
    with ServerProcess(tmp_path_factory.mktemp("server"), env=env) as server:
        yield server


def test_served_by_get_and_post_with_the_right_values(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/compute/blend",
                  params=[("count", "3"), ("scale", "0.5"), ("mode", "max"), ("values", "4"), ("values", "9")])
    assert r.status_code == 200, r.text
    assert r.json() == {"function": "blend", "value": 13.5,
                        "arguments": {"count": 3, "scale": 0.5, "mode": "max", "values": [4, 9]}}
    r = httpx.post(f"{server.url}/compute/blend", json={"count": 7, "scale": 2.0, "values": [1, 2, 3, 4]})
    assert (r.status_code, r.json()["value"]) == (200, 140.0), r.text
    defaults = httpx.post(f"{server.url}/compute/blend", json={"count": 1, "scale": 1}).json()
    assert defaults["value"] == 6 and defaults["arguments"]["values"] == [1, 2, 3]
    # the built-ins are still there, /fib/{n} exactly as before
    assert httpx.get(f"{server.url}/fib/20").json() == {"n": 20, "value": 6765}


@pytest.mark.parametrize(("query", "body", "parameter"), [
    ({"count": "0", "scale": "1"}, {"count": 0, "scale": 1}, "count"),
    ({"count": "1", "scale": "10.5"}, {"count": 1, "scale": 10.5}, "scale"),
    ({"count": "1", "scale": "nan"}, {"count": 1, "scale": "1"}, "scale"),  # POST: a string is not a number
    ({"count": "1", "scale": "1", "mode": "mean"}, {"count": 1, "scale": 1, "mode": "mean"}, "mode"),
    ({"count": "1", "scale": "1", "values": [str(i) for i in range(9)]},
     {"count": 1, "scale": 1, "values": list(range(9))}, "values"),
    ({"count": "1", "scale": "1", "values": "101"}, {"count": 1, "scale": 1, "values": [101]}, "values"),
    ({"scale": "1"}, {"scale": 1}, "count"),
    ({"count": "1", "scale": "1", "shell": "rm -rf /"}, {"count": True, "scale": 1}, None),
])
def test_bad_arguments_are_422_naming_the_parameter(
    server: ServerProcess, query: dict, body: dict, parameter: str | None
) -> None:
    for r, named in ((httpx.get(f"{server.url}/compute/blend", params=query), parameter or "shell"),
                     (httpx.post(f"{server.url}/compute/blend", json=body), parameter or "count")):
        answer = r.json()
        assert (r.status_code, answer["error"]) == (422, "invalid_argument"), r.text
        assert [p["parameter"] for p in answer["parameters"]] == [named], answer


def test_unknown_function_and_failing_function(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/compute/blends")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_function")
    assert "blend" in r.json()["detail"]
    for r in (httpx.get(f"{server.url}/compute/explode", params={"code": "boom"}),
              httpx.post(f"{server.url}/compute/explode", json={"code": "boom"})):
        assert r.status_code == 500, r.text
        assert r.json() == {"error": "compute_failed", "detail": "ValueError: the user's function gave up: boom"}
        assert "Traceback" not in r.text and "File " not in r.text
    r = httpx.get(f"{server.url}/compute/explode", params={"code": "set"})
    assert (r.status_code, r.json()["error"]) == (500, "compute_failed") and r.json()["detail"].startswith("TypeError:")


def test_listed_in_openapi(server: ServerProcess) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["openapi"] == "3.1.0"
    blend = schema["paths"]["/compute/blend"]
    query = {p["name"]: p for p in blend["get"]["parameters"]}
    assert list(query) == ["count", "scale", "mode", "values"]
    assert query["count"]["required"] and query["count"]["schema"]["maximum"] == 1000
    assert query["mode"]["schema"]["enum"] == ["sum", "max"]
    assert query["values"]["schema"]["type"] == "array" and query["values"]["schema"]["maxItems"] == 8
    body = blend["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["count", "scale"] and body["additionalProperties"] is False
    assert "/compute/explode" in schema["paths"] and "/compute/derive" in schema["paths"]


def test_counted_in_metrics_by_function(server: ServerProcess) -> None:
    before = scrape(server.url)
    ok = 'compute_api_function_requests_total{function="blend",status="200"}'
    cluster = 'compute_api_function_computations_total{function="blend",where="cluster"}'
    for count in (11, 12, 13):  # distinct arguments: three computations, on the workers
        assert httpx.get(f"{server.url}/compute/blend", params={"count": count, "scale": 1}).status_code == 200
    after = scrape(server.url)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[cluster] - before.get(cluster, 0) == 3
    assert after['compute_api_function_requests_total{function="explode",status="500"}'] >= 2


def test_load_tested_by_locust(server: ServerProcess, package: Path, tmp_path: Path) -> None:
    before = scrape(server.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")} | user_env(package)
    command = [str(BIN / "locust"), "-f", str(ROOT / "locustfiles" / "locustfile.py"), "--headless",
               "--host", server.url, "-u", "3", "-r", "3", "-t", "8s", "--only-summary",
               "--fast-weight", "0", "--fib-weight", "0", "--compute-weight", "1", "--functions", "blend",
               "--compute-wait", "0.05..0.2", "--csv", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    print(done.stdout[-2000:], done.stderr[-1500:])
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    row = rows["/compute/blend"]
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    assert requests > 0 and failures == 0, row
    ok = 'compute_api_function_requests_total{function="blend",status="200"}'
    # every answer Locust counted was counted by the server too, for this function
    wait_until(lambda: scrape(server.url)[ok] - before.get(ok, 0) >= requests, 30, what="server-side count")


def test_a_module_that_cannot_be_served_fails_start_up_naming_it(package: Path, tmp_path: Path) -> None:
    (package / PACKAGE / "broken.py").write_text("import not_installed_anywhere\n")
    for modules, message in [(f"{PACKAGE}.missing", f"cannot import '{PACKAGE}.missing'"),
                             (f"{PACKAGE}.broken", f"cannot import '{PACKAGE}.broken': ModuleNotFoundError")]:
        env = {**os.environ, **user_env(package), "COMPUTE_TASKS": modules}
        done = subprocess.run([sys.executable, "-m", "service", "serve", "--port", "0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
