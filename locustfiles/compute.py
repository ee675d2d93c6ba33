"""Traffic for the declared compute functions (``/compute/{name}``): which, with what, expecting what.

Arguments are the function's own declared ``examples`` (or its calibration arguments), so every
request is valid by construction, and the expected answer is computed here, locally, by the very
function the server runs (imported from the same package: ``--compute-tasks`` / COMPUTE_TASKS).
A wrong value from the server is then a failure, not a silent pass.

``--functions`` spec: ``""`` = every declared function, weight 1; or ``"derive:3,fib"`` (a missing
weight means 1). No locust import here: the pure parts are tested in-process.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

from workload import SpecError, weighted_items

from service.functions import Function, Registry, RegistryError


@dataclass(frozen=True)
class Call:
    """One request to make and the body that must come back."""

    function: str
    arguments: Mapping[str, Any]  # JSON-ready, as sent in a POST body
    expected: Mapping[str, Any]

    @property
    def path(self) -> str:
        return f"/compute/{self.function}"

    def query(self) -> str:
        """The GET form: list arguments as repeated keys."""
        return self.path + "?" + urlencode(self.arguments, doseq=True)


@dataclass
class ComputePlan:
    """The declared functions to call, their weights, and a cache of expected answers."""

    functions: tuple[Function, ...]
    weights: tuple[float, ...]
    _expected: dict[tuple[str, tuple[Any, ...]], Any] = field(default_factory=dict, repr=False)

    def sample(self, rng: random.Random | None = None) -> Call:
        rng = rng or random
        function = rng.choices(self.functions, weights=self.weights)[0]
        return self.call(function, rng.choice(function.examples or (function.calibration,)))

    def call(self, function: Function, raw: Mapping[str, Any]) -> Call:
        args = function.validate(raw)
        key = (function.name, args)
        if key not in self._expected:  # computed once per distinct call, by the same function
            self._expected[key] = function.call(args)
        arguments = json.loads(json.dumps(function.kwargs(args)))  # tuples -> lists, as JSON has them
        return Call(function.name, arguments,
                    {"function": function.name, "arguments": arguments, "value": self._expected[key]})

    def describe(self) -> str:
        return ", ".join(f"{f.name}:{w:g}" for f, w in zip(self.functions, self.weights, strict=True))


@lru_cache(maxsize=8)
def parse_functions(spec: str, modules: str = "") -> ComputePlan:
    """The plan for a --functions spec over the built-ins plus ``modules`` (COMPUTE_TASKS)."""
    try:
        registry = Registry.load(modules)
    except RegistryError as error:
        raise SpecError(str(error)) from None
    if not spec.strip():
        return ComputePlan(tuple(registry.values()), (1.0,) * len(registry))
    functions, weights = [], []
    for name, weight in weighted_items(spec):
        if name not in registry:
            raise SpecError(f"--functions {spec!r}: {name!r} is not declared (declared: {', '.join(registry)})")
        functions.append(registry[name])
        weights.append(weight)
    return ComputePlan(tuple(functions), tuple(weights))
