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

# fib(25) is ~40 ms on a worker, so a fuzz run stays in seconds whatever n the fuzzer finds;
# one worker is enough to exercise the Dask path.
SETTINGS = Settings.from_environ({}, embedded_workers=1, fib_max_n=25)
EXAMPLES = 60  # per operation; the whole module runs in well under a minute on 2 cores
SCHEMA_PATH = "/openapi.json"
# The app's own route table, with Starlette's convertors ("{n:path}") spelled as OpenAPI does ("{n}").
ROUTES = {re.sub(r":\w+}", "}", route.path) for route in create_app(SETTINGS).routes}


@pytest.fixture(scope="module")
def api_schema() -> schemathesis.BaseSchema:
    # Loading the schema starts the app's lifespan (the cluster): done here, at test time, not at
    # import time during collection. schemathesis ends the lifespan when the test ends.
    return schemathesis.openapi.from_asgi(SCHEMA_PATH, create_app(SETTINGS))


def test_every_route_is_in_the_schema(api_schema: schemathesis.BaseSchema) -> None:
    documented = set(api_schema.raw_schema["paths"])
    fuzzed = {op.ok().path for op in api_schema.get_all_operations()}
    print(f"routes {sorted(ROUTES)}; documented {len(documented)}; fuzzed {sorted(fuzzed)}")
    assert documented == ROUTES
    # schemathesis leaves out the schema's own location; everything else is fuzzed
    assert fuzzed | {SCHEMA_PATH} == ROUTES


@pytest.mark.parametrize(
    ("path", "mode"),
    [(path, GenerationMode.POSITIVE) for path in sorted(ROUTES - {SCHEMA_PATH})]
    # only operations with parameters have invalid inputs to generate
    + [(path, GenerationMode.NEGATIVE) for path in sorted(ROUTES) if "{" in path],
    ids=lambda v: getattr(v, "value", v),
)
def test_api_conforms_to_its_schema(api_schema: schemathesis.BaseSchema, path: str, mode: GenerationMode) -> None:
    """Positive cases must be answered as documented; negative ones (malformed n, ...) with a 4xx."""
    calls: dict[int, int] = {}

    @hypothesis.given(case=api_schema[path]["GET"].as_strategy(generation_mode=mode))
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
    print(f"GET {path} ({mode.value}): {sum(calls.values())} fuzzed calls, 0 failures; statuses {statuses}")
