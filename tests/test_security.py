"""Security of the Dask plane: what reaches the scheduler, mutual TLS, no dashboard, audited deps.

(The embedded cluster listening on loopback only is tests/test_server.py's.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import dask.config
import httpx
import hypothesis
import pytest
from certificates import generate
from conftest import BIN, ROOT, DaskProcesses, ServerProcess
from distributed import Client, Security
from hypothesis import HealthCheck
from hypothesis import strategies as st
from recorder import DirectCallRecorder, SubmissionRecorder, direct_calls, recorded
from sizing import fib_value
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.tasks import REGISTRY

MAX_N = 25
BURST = 16
KEY = re.compile(r"^(fib|derive)-(batch|[0-9a-f-]+)-[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def recorded_app() -> Iterator[tuple[TestClient, Client]]:
    # INLINE_MAX_COST=0: every valid request goes to the cluster, so every one is inspected there.
    # BATCH_MAX_COST generous: whatever the machine's speed, cheap requests that meet a busy worker
    # thread travel in micro-batches, which must carry nothing but validated arguments either.
    settings = Settings.from_environ({}, embedded_workers=1, fib_max_n=MAX_N, inline_max_cost=0.0,
                                     batch_max_cost=2.0)
    app = create_app(settings)
    # The embedded scheduler is a subprocess: it must be able to import the recorder plugin.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
        with TestClient(app) as client, Client(app.state.backend.address, set_as_default=False) as dask:
            dask.register_plugin(SubmissionRecorder())
            dask.register_plugin(DirectCallRecorder())
            yield client, dask


# What a hostile client might put where n goes: anything, numbers in and out of range, and spellings
# that int() or a careless parser would accept.
HOSTILE = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=0, max_value=MAX_N).map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["__import__('os').system('id')", "fib", "../../etc/passwd", "1;2", "1 ", "+1", "0x1f", "1e1",
                     "٣", "１", "²", "1_0", "0" * 11 + "1", "nan", "inf", "-0", "25/..", "%00", "{n}"]),
)


def test_only_registered_functions_with_validated_args_reach_the_cluster(
    recorded_app: tuple[TestClient, Client],
) -> None:
    client, dask = recorded_app
    statuses: dict[int, int] = {}

    @hypothesis.given(raw=HOSTILE)
    @hypothesis.settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])
    def fuzz(raw: str) -> None:
        r = client.get("/fib/" + quote(raw, safe=""))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        # 404: a line break in n matches no route (Starlette's path convertor is ".*" without DOTALL)
        assert r.status_code in (200, 404, 422), (raw, r.status_code, r.text)

    fuzz()
    for method in ("POST", "PUT", "DELETE", "PATCH"):  # no other way in
        assert client.request(method, "/fib/20").status_code == 405
    for n in (0, MAX_N):  # the edges of the valid range do reach the cluster
        assert client.get(f"/fib/{n}").status_code == 200
    submitted, direct = dask.run_on_scheduler(recorded), called(dask)
    print(f"{sum(statuses.values())} hostile values of n -> statuses {statuses}; {len(submitted)} tasks "
          f"reached the scheduler and {len(direct)} direct calls a worker, all of them service.tasks.fib(0..{MAX_N})")
    assert_declared_and_validated(submitted, direct)


def computations(submitted: list[tuple[str, object, tuple]]) -> list[tuple[str, object, tuple]]:
    """One ``(key, wrapper, (function, *arguments))`` per computation: a micro-batch
    (``service.functions.timed_batch``) carries the argument tuples of several."""
    out = []
    for key, func, args in submitted:
        if func == "service.functions.timed_batch":
            assert len(args) == 2 and isinstance(args[1], list) and args[1], (key, args)
            out += [(key, func, (args[0], *item)) for item in args[1]]
        else:
            out.append((key, func, args))
    return out


def called(dask: Client) -> list[tuple[object, tuple]]:
    """Every direct call the workers received (service.direct): ``(function, arguments)``."""
    return [call for calls in dask.run(direct_calls).values() for call in calls]


def assert_declared_and_validated(submitted: list[tuple[str, object, tuple]],
                                  direct: list[tuple[object, tuple]] = ()) -> None:
    """Every task that reached the scheduler is a declared function, run through a timing wrapper
    (one computation, or a micro-batch of them), and every direct call a worker received is a
    declared function, each with arguments its declaration accepts exactly as they are (the
    canonical form)."""
    assert submitted or direct, "nothing reached the cluster: the check would be vacuous"
    for key, func, args in computations(submitted):
        match = KEY.match(key)
        assert match, key
        wrapper = "service.functions.timed_batch" if match.group(2) == "batch" else "service.functions.timed"
        assert func == wrapper, (key, func)
        assert_validated(match.group(1), args[0], args[1:])
    for func, args in direct:
        name = str(func).removeprefix("service.tasks.")
        assert name in REGISTRY, func
        assert_validated(name, func, args)


def assert_validated(name: str, func: object, args: tuple) -> None:
    assert func == f"service.tasks.{name}", (name, func, args)
    declared = REGISTRY[name]
    assert declared.validate(declared.kwargs(args), {"n": MAX_N}) == args, (name, args)
    assert [type(a) for a in args] == [type(a) for a in declared.validate(declared.calibration)], (name, args)


# Hostile values for the declared parameters of /compute/{name}: HOSTILE's spellings plus JSON's own
# types; derive's iterations stay small when valid so that a run stays in seconds.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PARAMETERS = st.sampled_from(["n", "text", "salt", "iterations", "hash", "length", "evil", "__class__", ""])
DECLARED = st.sampled_from(["fib", "derive"])
FUNCTIONS = st.one_of(DECLARED, DECLARED, DECLARED, st.text(max_size=12))  # mostly declared names
# Arguments close to valid ones, so that many hostile calls do pass validation and are inspected.
NEAR_VALID = st.one_of(
    st.fixed_dictionaries({"n": HOSTILE | st.integers(-2, MAX_N + 2)}),
    st.fixed_dictionaries(
        {"text": HOSTILE, "salt": HOSTILE},
        optional={"iterations": st.integers(-1, 3000) | HOSTILE, "hash": st.sampled_from(["sha256", "sha512", "md5"]),
                  "length": st.integers(10, 70)},
    ),
)


def small(raw: dict) -> bool:
    """False for an iteration count that might validate and be large (the run is sized in seconds)."""
    try:
        return float(raw.get("iterations", 0)) <= 5000
    except (TypeError, ValueError, OverflowError):
        return True


def test_compute_routes_submit_only_declared_functions_with_validated_args(
    recorded_app: tuple[TestClient, Client],
) -> None:
    client, dask = recorded_app
    statuses: dict[tuple[str, int], int] = {}

    def count(method: str, status: int) -> None:
        statuses[method, status] = statuses.get((method, status), 0) + 1

    @hypothesis.given(name=FUNCTIONS, query=st.one_of(
        st.dictionaries(PARAMETERS, st.lists(HOSTILE, min_size=1, max_size=2), max_size=6),
        NEAR_VALID.map(lambda d: {k: [str(v)] for k, v in d.items()})))
    @hypothesis.settings(max_examples=250, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def fuzz_get(name: str, query: dict[str, list[str]]) -> None:
        hypothesis.assume(small({k: v[0] for k, v in query.items()}))
        r = client.get("/compute/" + quote(name, safe=""), params=[(k, v) for k, vs in query.items() for v in vs])
        count("GET", r.status_code)
        assert r.status_code in (200, 404, 422), (name, query, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", r.text

    @hypothesis.given(name=FUNCTIONS, body=st.one_of(
        st.dictionaries(PARAMETERS, JSON_VALUES | HOSTILE, max_size=6), JSON_VALUES, NEAR_VALID))
    @hypothesis.settings(max_examples=250, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def fuzz_post(name: str, body: object) -> None:
        hypothesis.assume(not isinstance(body, dict) or small(body))
        r = client.post("/compute/" + quote(name, safe=""), content=json.dumps(body))
        count("POST", r.status_code)
        assert r.status_code in (200, 404, 422), (name, body, r.status_code, r.text)
        assert "Traceback" not in r.text

    fuzz_get()
    fuzz_post()
    assert client.post("/compute/derive", content=b"{" * (64 * 1024 + 1)).status_code == 413
    for method in ("PUT", "DELETE", "PATCH"):
        assert client.request(method, "/compute/fib?n=1").status_code == 405
    # valid calls of each declared function do reach the cluster, by GET and by POST
    assert client.get("/compute/fib", params={"n": MAX_N}).status_code == 200
    assert client.post("/compute/derive", json={"text": "t" * 1024, "salt": "s", "iterations": 10,
                                                "hash": "sha512", "length": 64}).status_code == 200
    submitted, direct = dask.run_on_scheduler(recorded), called(dask)
    names = sorted({key.split("-")[0] for key, _, _ in submitted} | {str(f).split(".")[-1] for f, _ in direct})
    print(f"hostile /compute calls by (method, status): {dict(sorted(statuses.items()))}; "
          f"{len(submitted)} tasks reached the scheduler and {len(direct)} direct calls a worker, all declared "
          f"({names}) with validated arguments")
    assert names == ["derive", "fib"]
    assert_declared_and_validated(submitted, direct)


def test_micro_batches_carry_only_declared_functions_with_validated_args(
    recorded_app: tuple[TestClient, Client],
) -> None:
    client, dask = recorded_app
    before = len(dask.run_on_scheduler(recorded))
    # A long derive keeps the only worker thread busy (seen processing on the scheduler), so the
    # burst of cheap requests that follows meets a busy cell and travels in micro-batches.
    blocker = {"text": "hold", "salt": "the thread", "iterations": 500_000, "hash": "sha512"}
    ns = list(range(2, 2 + BURST))  # distinct: no coalescing
    with ThreadPoolExecutor(BURST + 1) as pool:
        held = pool.submit(client.post, "/compute/derive", json=blocker)
        deadline = time.monotonic() + 60
        # (a lambda travels by value: the scheduler cannot import this module)
        busy = lambda dask_scheduler: any(ws.processing for ws in dask_scheduler.workers.values())  # noqa: E731
        while not dask.run_on_scheduler(busy):
            assert time.monotonic() < deadline and not held.done(), "the blocker never seen on the worker"
            time.sleep(0.01)
        answers = list(pool.map(lambda n: client.get("/compute/fib", params={"n": n}), ns))
        assert held.result().status_code == 200, held.result().text
    assert [r.json()["value"] for r in answers] == [fib_value(n) for n in ns], [r.text for r in answers]
    submitted = dask.run_on_scheduler(recorded)[before:]
    batches = [s for s in submitted if s[1] == "service.functions.timed_batch"]
    print(f"{BURST} cheap requests behind a busy thread: {len(submitted)} tasks, {len(batches)} micro-batches "
          f"carrying {len(computations(batches))} computations, every one validated")
    assert batches, submitted
    assert_declared_and_validated(submitted)


DASHBOARD_PATHS = ["/status", "/workers", "/tasks", "/system", "/profile", "/graph", "/info/main/workers.html",
                   "/individual-plots.json", "/api/v1", "/api/v1/retire_workers", "/api/v1/adaptive_target",
                   "/statics/css/base.css", "/proxy/8787/127.0.0.1/status", "/sitemap.json", "/eventstream"]


@pytest.mark.parametrize("path", DASHBOARD_PATHS)
def test_api_never_serves_the_dask_dashboard(recorded_app: tuple[TestClient, SubmissionRecorder], path: str) -> None:
    client, _ = recorded_app
    for method in ("GET", "POST"):
        r = client.request(method, path)
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), (method, path, r.text)


# -- mutual TLS in remote mode --------------------------------------------------------------------


def client_refused(address: str, security: Security) -> str:
    """Try to connect as a Dask client; return why it failed (the test fails if it connects)."""
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
            with Client(address, security=security, timeout=3, set_as_default=False) as client:
                client.scheduler_info()
    except Exception as exc:  # OSError, TimeoutError, ssl errors: any refusal will do
        return f"{type(exc).__name__}: {exc}"[:200]
    raise AssertionError(f"a client with {security!r} connected to {address}")


def tls_without_certificate_refused(port: int, ca: Path) -> str:
    """A TLS client that trusts the CA but has no certificate of its own: the scheduler must hang up.

    (distributed's own Client will not even try without a certificate, so this speaks TLS directly.)
    """
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            try:
                # TLS 1.3: the server checks the client's (missing) certificate after the handshake
                conn.sendall(b"\0" * 8)
                data = conn.recv(1)
            except (ssl.SSLError, ConnectionError) as exc:
                return f"{type(exc).__name__}: {exc}"[:200]
    assert data == b"", f"the scheduler answered a client without a certificate: {data!r}"
    return "connection closed by the scheduler"


def test_dask_tls_end_to_end_and_refusals(tmp_path: Path) -> None:
    certs = generate(tmp_path)
    cluster = DaskProcesses(tmp_path, env=certs.dask_env())
    cluster.address = cluster.address.replace("tcp://", "tls://")
    cluster.start_scheduler()
    cluster.start_worker()
    try:
        with dask.config.set(certs.dask_config(("client",))):
            cluster.wait_for_workers(1)
            tls_workers = cluster.scheduler_call(lambda dask_scheduler: list(dask_scheduler.workers))
        assert tls_workers and all(a.startswith("tls://") for a in tls_workers), tls_workers
        # the API, with only the client certificate
        env = {**certs.dask_env(("client",)), "DASK_SCHEDULER_ADDRESS": cluster.address}
        with ServerProcess(tmp_path, env=env) as server:
            ready = httpx.get(f"{server.url}/readyz").json()
            assert ready["status"] == "ready" and ready["scheduler"].startswith("tls://"), ready
            assert httpx.get(f"{server.url}/fib/25").json() == {"n": 25, "value": 75025}
        plain = client_refused(cluster.address.replace("tls://", "tcp://"), Security(require_encryption=False))
        no_cert = tls_without_certificate_refused(cluster.port, certs.ca)
        (tmp_path / "rogue").mkdir()
        rogue_pairs = generate(tmp_path / "rogue", "rogue CA").pairs["client"]
        rogue = client_refused(cluster.address, Security(
            tls_ca_file=str(certs.ca), tls_client_cert=str(rogue_pairs.cert), tls_client_key=str(rogue_pairs.key),
            require_encryption=True))
        print(f"TLS cluster at {cluster.address}: the API (client certificate) served /fib/25 over mutual TLS; "
              f"refused: plain tcp:// client ({plain}); TLS client without a certificate ({no_cert}); "
              f"client certificate from another CA ({rogue})")
    finally:
        cluster.close()


# -- dependency audit -----------------------------------------------------------------------------

# Known vulnerabilities accepted on purpose: {"VULN-ID": "why it does not apply / when it goes away"}.
ACCEPTED_VULNERABILITIES: dict[str, str] = {}


def latest_release_vulnerabilities(name: str, version: str) -> list[str] | None:
    """Fallback when PyPI's per-release JSON is unavailable: the project JSON's ``vulnerabilities``
    describe its latest release, so they are exactly ours when we pin the latest release; None otherwise."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as response:
        data = json.load(response)
    if data["info"]["version"] != version:
        return None
    return [v["id"] for v in data.get("vulnerabilities", [])]


def audit(lock: Path, tmp_path: Path) -> tuple[dict[str, list[str]], list[str], int]:
    """pip-audit of a hashed lock file: ({package==version: [vuln ids]}, [unaudited packages], count)."""
    out = tmp_path / f"{lock.name}.json"
    done = subprocess.run(
        [str(BIN / "pip-audit"), "--requirement", str(lock), "--require-hashes", "--disable-pip",
         "--format", "json", "--output", str(out), "--progress-spinner", "off"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.exists(), f"pip-audit failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    found: dict[str, list[str]] = {}
    unaudited = []
    dependencies = json.loads(out.read_text())["dependencies"]
    for dep in dependencies:
        pinned = f"{dep['name']}=={dep.get('version', '?')}"
        if "skip_reason" in dep:
            # pip-audit asks https://pypi.org/pypi/NAME/VERSION/json; some mirrors only serve NAME/json
            version = re.search(r"\(([^)]+)\)$", dep["skip_reason"])
            ids = latest_release_vulnerabilities(dep["name"], version.group(1)) if version else None
            if ids is None:
                unaudited.append(f"{dep['name']} ({dep['skip_reason']})")
                continue
            pinned = f"{dep['name']}=={version.group(1)}"
        else:
            ids = [v["id"] for v in dep.get("vulns", [])]
        if ids:
            found[pinned] = ids
    return found, unaudited, len(dependencies)


@pytest.mark.parametrize("lock_name", ["requirements.lock", "requirements-dev.lock"])
def test_dependency_audit(lock_name: str, tmp_path: Path) -> None:
    found, unaudited, total = audit(ROOT / lock_name, tmp_path)
    unexplained = {pkg: [i for i in ids if i not in ACCEPTED_VULNERABILITIES] for pkg, ids in found.items()}
    unexplained = {pkg: ids for pkg, ids in unexplained.items() if ids}
    figure = (f"{lock_name}: {total} pinned packages, {total - len(unaudited)} audited, known vulnerabilities "
              f"{found or 'none'}, accepted {sorted(ACCEPTED_VULNERABILITIES) or 'none'}; unaudited {unaudited}")
    print(figure)
    assert not unexplained, figure
    if lock_name == "requirements.lock":
        # what ships in the image must be audited in full; an unaudited package is not a clean one
        assert not unaudited, figure
