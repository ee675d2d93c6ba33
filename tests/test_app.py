"""The app in-process with its real lifespan (an embedded cluster in subprocesses), through Starlette's TestClient."""

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from service.app import MAX_N_DIGITS, create_app, parse_n
from service.config import Settings
from service.errors import REASONS, Unavailable
from service.metrics import WHERE, Metrics


@pytest.mark.parametrize(("raw", "n"), [("0", 0), ("1", 1), ("35", 35), ("007", 7)])
def test_parse_n_accepts_ascii_integers_in_range(raw: str, n: int) -> None:
    assert parse_n(raw, 35) == n


@pytest.mark.parametrize(
    "raw",
    ["", "-1", "+1", "1.5", "1e3", "abc", " 1", "36", "1000000", "9" * 500, "٣", "³", "１２", "1/2", "0x10"],
)
def test_parse_n_rejects_everything_else(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_n(raw, 35)


def test_parse_n_never_parses_long_strings() -> None:
    # a digit string longer than MAX_N_DIGITS is refused on its length alone
    with pytest.raises(ValueError, match="0 to 35"):
        parse_n("1" * (MAX_N_DIGITS + 1), 35)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings.from_environ({}, embedded_workers=1, fib_max_n=30)
    with TestClient(create_app(settings)) as c:  # runs the lifespan: starts and stops the cluster
        yield c


def test_lifespan_starts_a_ready_embedded_cluster(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["workers"] == 1
    assert body["scheduler"].startswith("tcp://127.0.0.1:")


def test_routes(client: TestClient) -> None:
    assert client.get("/fast").json() == {"message": "Hello!"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/fib/20").json() == {"n": 20, "value": 6765}
    index = client.get("/").json()
    assert set(index["endpoints"]) >= {"/fast", "/fib/{n}", "/healthz", "/readyz", "/metrics", "/openapi.json"}


def test_every_503_reason_and_placement_is_a_series_from_the_first_scrape() -> None:
    """Dashboards and alerts read 0, not "no data", before the first 503 (absent is not zero)."""
    metrics = Metrics().render()[0].decode()
    for reason in REASONS:
        assert f'compute_api_rejected_requests_total{{reason="{reason}"}} 0.0' in metrics
    for where in WHERE:
        assert f'compute_api_computations_total{{where="{where}"}} 0.0' in metrics


def test_an_undeclared_503_reason_is_a_bug() -> None:
    with pytest.raises(ValueError, match="errors.REASONS"):
        Unavailable("tired", "detail", 1)


def test_fib_max_n_is_configurable(client: TestClient) -> None:
    r = client.get("/fib/31")
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_n"
    assert "30" in r.json()["detail"]


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    r = client.get("/nope")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = client.post("/fast")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert schema["openapi"] == "3.1.0"
    assert set(schema["paths"]) == {"/", "/fast", "/fib/{n}", "/healthz", "/readyz", "/metrics", "/openapi.json",
                                    "/compute/fib", "/compute/derive"}
    # a declared function's bound lowered by a setting is documented as it is enforced
    assert schema["paths"]["/compute/fib"]["get"]["parameters"][0]["schema"]["maximum"] == 30
    fib = schema["paths"]["/fib/{n}"]["get"]
    assert {"200", "422", "503", "504"} <= set(fib["responses"])


def test_compute_routes_serve_validate_and_count(client: TestClient) -> None:
    assert client.get("/compute/fib?n=20").json() == {"function": "fib", "arguments": {"n": 20}, "value": 6765}
    assert client.post("/compute/fib", json={"n": 20}).json()["value"] == 6765
    r = client.get("/compute/fib?n=31")  # FIB_MAX_N applies to /compute/fib as to /fib/{n}
    assert (r.status_code, r.json()["error"], r.json()["parameters"][0]["parameter"]) == (422, "invalid_argument", "n")
    for bad in (b"[1]", b"{", "{\"n\": \"\u0663\"}".encode(), b"[" * 60000, b"\xff",
                b'{"n": 1' + b"0" * 5000 + b"}"):
        r = client.post("/compute/fib", content=bad)
        assert (r.status_code, r.json()["error"]) == (422, "invalid_argument"), (bad, r.text)
    r = client.post("/compute/derive", content=b'{"text": "\\ud800", "salt": "s", "iterations": 1}')
    assert (r.status_code, r.json()["error"]) == (422, "invalid_argument"), r.text
    r = client.post("/compute/fib", json={"n": "20"})  # JSON has types: a string is not an integer
    assert (r.status_code, r.json()["parameters"][0]["parameter"]) == (422, "n"), r.text
    r = client.post("/compute/fib", content=b" " * (64 * 1024 + 1))
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")
    r = client.get("/compute/nope")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_function") and "fib" in r.json()["detail"]
    assert client.put("/compute/fib").status_code == 405
    metrics = client.get("/metrics").text
    assert 'compute_api_function_requests_total{function="fib",status="422"}' in metrics
    assert 'compute_api_function_computations_total{function="derive",where="cluster"} 0.0' in metrics
