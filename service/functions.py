"""Compute functions as declarations: one decorated Python function is a whole endpoint.

``@declare(cost=..., calibration=..., examples=...)`` on a plain function whose parameters are typed
with ``typing.Annotated`` and pydantic constraints is all it takes::

    @declare(cost=lambda n, xs: n * len(xs), calibration={"n": 1000, "xs": [1, 2, 3]})
    def work(n: Annotated[int, Field(ge=1, le=10_000)], xs: Annotated[list[int], Field(max_length=8)]) -> int:
        ...

From the declaration follow the routes (``GET/POST /compute/{name}``), validation (422 naming the
parameter), the OpenAPI schema, metrics labels, coalescing (on the validated arguments) and
inline/priority/admission (from the calibrated cost model).

Why every parameter must be bounded: the scheduler port executes whatever it is sent and the cost
model must be able to refuse work, so an argument the API accepts has to have a known worst case.
The check runs at declaration (import) time, so an unbounded parameter never reaches production.

``declare`` returns the function itself, unchanged: workers receive it by reference (module and
name, as pickle does for any importable function) and import it from the same image.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

MARKER = "__compute_function__"

# Arguments in signature order, lists as tuples: hashable, so they key coalescing as they are.
Args = tuple[Any, ...]


class DeclarationError(TypeError):
    """A function cannot be declared as written (e.g. an unbounded parameter)."""


class RegistryError(ValueError):
    """The set of functions cannot be built (a module that fails to import, a name used twice)."""


class InvalidArguments(ValueError):
    """Arguments that do not validate: one ``{"parameter", "message"}`` per problem."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['parameter']}: {p['message']}" for p in problems))


def timed(func: Callable[..., object], *args: Any) -> tuple[object, float]:
    """Run ``func(*args)`` on a worker and report how long it took there.

    The backend learns from these durations how fast the workers really are (nice levels, CPU
    contention and different hardware all change it), and sizes admission control with that.
    """
    start = time.perf_counter()
    result = func(*args)
    return result, time.perf_counter() - start


def timed_batch(func: Callable[..., object], batch: list[Args]) -> list[tuple[bool, object, float]]:
    """Run ``func`` on each argument tuple of a batch (service.batching), one after another on one worker.

    Each item reports ``(ok, result or the exception it raised, seconds)``: one failing item fails
    only its own request, never its batch-mates.
    """
    outcomes: list[tuple[bool, object, float]] = []
    for args in batch:
        start = time.perf_counter()
        try:
            outcomes.append((True, func(*args), time.perf_counter() - start))
        except Exception as exc:  # reported to that item's requests only
            outcomes.append((False, exc, time.perf_counter() - start))
    return outcomes


# -- bounds ------------------------------------------------------------------------------------

def _split(annotation: Any) -> tuple[Any, list[Any]]:
    """(base type, constraints) of a possibly ``Annotated`` annotation."""
    info = FieldInfo.from_annotation(annotation)
    return info.annotation, list(info.metadata)


def _has(metadata: list[Any], *kinds: type) -> bool:
    return any(isinstance(m, kinds) for m in metadata)


def unbounded(annotation: Any) -> str | None:
    """Why values of ``annotation`` have no known worst case, or None when they do."""
    base, metadata = _split(annotation)
    origin = typing.get_origin(base)
    if base is bool:
        return None
    if origin is Literal:
        bad = [v for v in typing.get_args(base) if not isinstance(v, (str, int, bool))]
        return f"Literal values must be str, int or bool, got {bad!r}" if bad else None
    if base in (int, float):
        low = _has(metadata, annotated_types.Ge, annotated_types.Gt)
        high = _has(metadata, annotated_types.Le, annotated_types.Lt)
        if not (low and high):
            return f"{base.__name__} needs both bounds, e.g. Annotated[{base.__name__}, Field(ge=0, le=100)]"
        return None
    if base is str:
        if not _has(metadata, annotated_types.MaxLen):
            return "str needs max_length (Annotated[str, Field(max_length=100)]) or a Literal[...] set"
        return None
    if origin in (list, tuple):
        items = typing.get_args(base)
        if origin is tuple and not (len(items) == 2 and items[1] is Ellipsis):
            return "only variable-length tuple[X, ...] or list[X] are supported"
        if not _has(metadata, annotated_types.MaxLen):
            return f"{origin.__name__} needs max_length, e.g. Annotated[list[int], Field(max_length=10)]"
        if not items:
            return "a list needs an item type, e.g. list[int]"
        inner = unbounded(items[0])
        return f"its items: {inner}" if inner else None
    return f"type {getattr(base, '__name__', base)!r} is not supported (int, float, bool, str, Literal, list)"


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
    elif isinstance(value, (list, tuple)):
        return all(_encodable(v) for v in value)
    return True


INTEGER = re.compile(r"-?[0-9]{1,20}")
NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")


def _from_query(annotation: Any, value: str | list[str]) -> Any:
    """A query string as the JSON value it spells for ``annotation``; anything else stays a string
    (or a list of strings) for strict validation to refuse, naming the parameter."""
    if annotation is None:  # an unknown parameter: refused as such
        return value
    base, _ = _split(annotation)
    if typing.get_origin(base) in (list, tuple):
        items = value if isinstance(value, list) else [value]
        return [_from_query(typing.get_args(base)[0], item) for item in items]
    if isinstance(value, list):
        return value  # a scalar given twice
    kinds = {type(v) for v in typing.get_args(base)} if typing.get_origin(base) is Literal else {base}
    if kinds & {int, float} and INTEGER.fullmatch(value):
        return int(value)
    if kinds & {int, float} and NUMBER.fullmatch(value) and math.isfinite(number := float(value)):
        return int(number) if int in kinds and number.is_integer() else number  # JSON Schema: 4.0 is an integer
    if bool in kinds and value in ("true", "false"):
        return value == "true"
    return value


def _integral(annotation: Any, value: Any) -> Any:
    """``value`` with floats that are whole numbers (4.0) as ints where ``annotation`` takes ints."""
    if annotation is None:
        return value
    base, _ = _split(annotation)
    if typing.get_origin(base) in (list, tuple):
        return [_integral(typing.get_args(base)[0], v) for v in value] if isinstance(value, list) else value
    kinds = {type(v) for v in typing.get_args(base)} if typing.get_origin(base) is Literal else {base}
    if int in kinds and type(value) is float and value.is_integer():
        return int(value)
    return value


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- one declared function -------------------------------------------------------------------

@dataclass(frozen=True)
class Function:
    """A declared compute function: what the API needs to serve, validate, price and ship it."""

    name: str
    func: Callable[..., object]
    parameters: tuple[str, ...]
    model: type[BaseModel]
    cost: Callable[..., float]  # relative cost from the keyword arguments, proportional to run time
    calibration: Mapping[str, Any]  # arguments measured at start-up to turn cost into seconds
    examples: tuple[Mapping[str, Any], ...] = ()
    description: str = ""
    annotations: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def module(self) -> str:
        return self.func.__module__

    def validate(self, raw: Mapping[str, Any], caps: Mapping[str, float] | None = None) -> Args:
        """Canonical arguments from untrusted ``raw`` (Python values, lax: "7" is 7); ``InvalidArguments``
        otherwise. ``caps`` lowers a parameter's upper bound at run time (a setting such as FIB_MAX_N).
        """
        return self._canonical(lambda: self.model.model_validate(raw), caps)

    def validate_query(self, raw: Mapping[str, str | list[str]], caps: Mapping[str, float] | None = None) -> Args:
        """The same from query strings, spelled as JSON would spell them: ``7`` (or ``7.0``, an integer
        to JSON Schema) for an integer, not ``+7``, `` 7``, ``1_0`` or ``٣``; ``0.5`` or ``1e-3`` for a
        float; ``true`` for a bool; a list parameter's items as repeated keys. Then validated as
        strictly as a JSON body."""
        typed = {name: _from_query(self.annotations.get(name), value) for name, value in raw.items()}
        return self.validate_json(json.dumps(typed).encode(), caps)

    def validate_json(self, body: bytes, caps: Mapping[str, float] | None = None) -> Args:
        """The same from an untrusted JSON body, strictly typed: JSON has types, so ``"7"`` or
        ``true`` for an integer is refused rather than converted. Not JSON, or not an object, is a
        problem of the parameter ``(body)``."""
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidArguments([{"parameter": "(body)", "message": f"not JSON: {exc}"}]) from None
        if isinstance(raw, dict):  # JSON Schema's integer includes 4.0: so does ours
            raw = {name: _integral(self.annotations.get(name), value) for name, value in raw.items()}
        return self._canonical(lambda: self.model.model_validate_json(json.dumps(raw), strict=True), caps)

    def _canonical(self, parse: Callable[[], BaseModel], caps: Mapping[str, float] | None) -> Args:
        try:
            values = parse().model_dump()
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_url=False):
                loc = [str(part) for part in error["loc"]]
                parameter = loc[0] if loc else "(body)"
                where = f" (item {'.'.join(loc[1:])})" if len(loc) > 1 else ""
                message = "unknown parameter" if error["type"] == "extra_forbidden" else error["msg"]
                problems.append({"parameter": parameter, "message": message + where})
            raise InvalidArguments(problems) from None
        over = [
            {"parameter": name, "message": f"must be at most {cap:g}, got {values[name]!r}"}
            for name, cap in (caps or {}).items()
            if name in values and values[name] > cap
        ] + [
            # JSON's "\ud800" decodes to a lone surrogate, which no function can encode.
            {"parameter": name, "message": "is not valid Unicode (a lone surrogate)"}
            for name, value in values.items()
            if not _encodable(value)
        ]
        if over:
            raise InvalidArguments(over)
        return tuple(_hashable(values[name]) for name in self.parameters)

    def is_list(self, parameter: str) -> bool:
        """Does ``parameter`` take a list (repeated query keys)?"""
        annotation = self.annotations.get(parameter)
        return annotation is not None and typing.get_origin(_split(annotation)[0]) in (list, tuple)

    def kwargs(self, args: Args) -> dict[str, Any]:
        return dict(zip(self.parameters, args, strict=True))

    def call(self, args: Args) -> object:
        return self.func(*args)

    def relative_cost(self, args: Args) -> float:
        return float(self.cost(**self.kwargs(args)))

    def calibrate(self, repeat: int = 3) -> float:
        """Seconds per unit of relative cost, measured on this machine (best of ``repeat``)."""
        args = self.validate(self.calibration)
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            self.call(args)
            best = min(best, time.perf_counter() - start)
        return best / self.relative_cost(args)

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema (2020-12, as OpenAPI 3.1 embeds it) of the POST body."""
        return self.model.model_json_schema()


def build(
    func: Callable[..., object],
    *,
    cost: Callable[..., float],
    calibration: Mapping[str, Any],
    examples: Iterable[Mapping[str, Any]] = (),
    name: str | None = None,
) -> Function:
    """The ``Function`` for ``func`` (``declare`` without the marking); ``DeclarationError`` if it
    cannot be served safely."""
    name = name or func.__name__
    where = f"{func.__module__}.{func.__qualname__}"
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:
        raise DeclarationError(f"{where}: cannot resolve its annotations: {exc!r}") from None
    fields: dict[str, Any] = {}
    annotations: dict[str, Any] = {}
    for parameter in inspect.signature(func).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            raise DeclarationError(f"{where}: parameter {parameter.name!r}: *args, **kwargs and keyword-only "
                                   "parameters cannot be declared")
        if parameter.name not in hints:
            raise DeclarationError(f"{where}: parameter {parameter.name!r} has no type annotation")
        annotation = hints[parameter.name]
        if problem := unbounded(annotation):
            raise DeclarationError(f"{where}: parameter {parameter.name!r} is unbounded: {problem}")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
        annotations[parameter.name] = annotation
    if not fields:
        raise DeclarationError(f"{where}: a compute function needs at least one parameter")
    config = ConfigDict(extra="forbid", allow_inf_nan=False, title=name)
    model = create_model(f"{name}_arguments", __config__=config, **fields)
    function = Function(
        name=name, func=func, parameters=tuple(fields), model=model, cost=cost, calibration=dict(calibration),
        examples=tuple(dict(e) for e in examples), description=inspect.getdoc(func) or "",
        annotations=annotations,
    )
    for sample in (function.calibration, *function.examples):
        try:
            function.relative_cost(function.validate(sample))
        except Exception as exc:  # the declaration's own arguments must be valid and priceable
            raise DeclarationError(f"{where}: calibration/example {dict(sample)!r}: {exc}") from None
    return function


def declare(
    *, cost: Callable[..., float], calibration: Mapping[str, Any], examples: Iterable[Mapping[str, Any]] = (),
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a compute function (see the module docstring). Returns the function unchanged."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, MARKER, build(func, cost=cost, calibration=calibration, examples=examples, name=name))
        return func

    return mark


def declared_in(module: types.ModuleType) -> list[Function]:
    """The functions ``module`` itself declares (not those it merely imports)."""
    found = []
    for value in vars(module).values():
        function = getattr(value, MARKER, None)
        if isinstance(function, Function) and function.module == module.__name__:
            found.append(function)
    return found


# -- the registry ------------------------------------------------------------------------------

class Registry(Mapping[str, Function]):
    """The declared functions by name: the only ones that can ever reach the scheduler."""

    def __init__(self, functions: Iterable[Function] = ()) -> None:
        self._functions: dict[str, Function] = {}
        for function in functions:
            self.add(function)

    def add(self, function: Function) -> None:
        if (other := self._functions.get(function.name)) is not None and other is not function:
            raise RegistryError(f"compute function {function.name!r} is declared twice: in {other.module} "
                                f"and in {function.module} (pass name= to declare() to rename one)")
        self._functions[function.name] = function

    def __getitem__(self, name: str) -> Function:
        return self._functions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)

    @classmethod
    def load(cls, modules: str | Iterable[str] = "") -> Registry:
        """The built-ins (service.tasks) plus every function declared in ``modules`` (COMPUTE_TASKS:
        comma-separated module names). ``RegistryError`` names the module that cannot be used."""
        names = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules)
        registry = cls()
        for module_name in ["service.tasks", *(n for n in names if n and n != "service.tasks")]:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise RegistryError(f"COMPUTE_TASKS: cannot import {module_name!r}: "
                                    f"{type(exc).__name__}: {exc}") from None
            declared = declared_in(module)
            if not declared:
                raise RegistryError(f"COMPUTE_TASKS: module {module_name!r} declares no compute function "
                                    "(decorate them with service.functions.declare)")
            for function in declared:
                registry.add(function)
        return registry


__all__ = [
    "Annotated", "Args", "DeclarationError", "Field", "Function", "InvalidArguments", "Literal", "Registry",
    "RegistryError", "build", "declare", "declared_in", "timed",
]
