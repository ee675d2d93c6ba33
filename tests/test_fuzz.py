"""Property-based fuzzing of every documented operation with schemathesis, in-process over ASGI.

schemathesis loads GET /openapi.json from the app itself and calls it through its ASGI transport,
which runs the app's lifespan (a real embedded cluster in subprocesses) on its own event loop; every case
goes through all of schemathesis's default checks (no 5xx, documented status codes, content types,
response headers, ...).
"""

from __future__ import annotations

import re

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from service.app import create_app
from service.config import Settings
from service.tasks import REGISTRY

# fib(25) is ~40 ms on a worker, so a fuzz run stays in seconds whatever n the fuzzer finds;
# one worker is enough to exercise the Dask path.
SETTINGS = Settings.from_environ({}, embedded_workers=1, fib_max_n=25)
EXAMPLES = 60  # per operation; the whole module runs in well under a minute on 2 cores
SCHEMA_PATH = "/openapi.json"
# The app's own route table, with Starlette's convertors ("{n:path}") spelled as OpenAPI does ("{n}"),
# and /compute/{name} documented as one path per declared function.
COMPUTE = "/compute/{name}"
ROUTES = {re.sub(r":\w+}", "}", route.path) for route in create_app(SETTINGS).routes} - {COMPUTE} \
    | {f"/compute/{name}" for name in REGISTRY}
# derive's worst case (500,000 sha512 iterations) is a second or more: the fuzzer explores its whole
# schema except that bound, lowered here so a run stays in seconds.
FUZZ_MAX_ITERATIONS = 2000


@pytest.fixture(scope="module")
def api_schema() -> schemathesis.BaseSchema:
    # Loading the schema starts the app's lifespan (the cluster): done here, at test time, not at
    # import time during collection. schemathesis ends the lifespan when the test ends.
    return schemathesis.openapi.from_asgi(SCHEMA_PATH, create_app(SETTINGS))


@pytest.fixture(scope="module")
def sized_schema() -> schemathesis.BaseSchema:
    """The schema with derive's iterations capped for positive cases (negative ones use the real
    bounds: a value above the cap is valid for the server)."""
    schema = schemathesis.openapi.from_asgi(SCHEMA_PATH, create_app(SETTINGS))
    derive = schema.raw_schema["paths"]["/compute/derive"]
    for parameter in derive["get"]["parameters"]:
        if parameter["name"] == "iterations":
            parameter["schema"]["maximum"] = FUZZ_MAX_ITERATIONS
    derive["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["iterations"]["maximum"] = \
        FUZZ_MAX_ITERATIONS
    return schema


def test_every_route_is_in_the_schema(api_schema: schemathesis.BaseSchema) -> None:
    documented = set(api_schema.raw_schema["paths"])
    fuzzed = {op.ok().path for op in api_schema.get_all_operations()}
    methods = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert {("POST", f"/compute/{name}") for name in REGISTRY} <= methods
    print(f"routes {sorted(ROUTES)}; documented {len(documented)}; fuzzed {sorted(fuzzed)}")
    assert documented == ROUTES
    # schemathesis leaves out the schema's own location; everything else is fuzzed
    assert fuzzed | {SCHEMA_PATH} == ROUTES


OPERATIONS = [("GET", path) for path in sorted(ROUTES - {SCHEMA_PATH})] \
    + [("POST", f"/compute/{name}") for name in sorted(REGISTRY)]


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS]
    # only operations with parameters have invalid inputs to generate
    + [(method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if "{" in path or "compute" in path],
    ids=lambda v: getattr(v, "value", v),
)
def test_api_conforms_to_its_schema(
    request: pytest.FixtureRequest, method: str, path: str, mode: GenerationMode
) -> None:
    """Positive cases must be answered as documented; negative ones (malformed n, ...) with a 4xx."""
    calls: dict[int, int] = {}
    api_schema = request.getfixturevalue("sized_schema" if mode is GenerationMode.POSITIVE else "api_schema")

    @hypothesis.given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,  # a cold worker or a loaded CI machine is not a bug
        suppress_health_check=[HealthCheck.too_slow],
        database=None,  # no .hypothesis/ directory in the work tree
    )
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate()  # all of schemathesis's default checks
        calls[response.status_code] = calls.get(response.status_code, 0) + 1
        # beyond the schema: every answer of this API is JSON except the Prometheus text
        if path != "/metrics":
            assert response.headers["content-type"] == ["application/json"], response.text

    fuzz()
    statuses = dict(sorted(calls.items()))
    print(f"{method} {path} ({mode.value}): {sum(calls.values())} fuzzed calls, 0 failures; statuses {statuses}")
