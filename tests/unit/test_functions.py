"""service.functions: declarations, bounds, validation, canonical arguments, the registry (no processes)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from service import tasks
from service.functions import (
    MARKER,
    DeclarationError,
    InvalidArguments,
    Registry,
    RegistryError,
    build,
    declare,
    timed,
)

Count = Annotated[int, Field(ge=1, le=100)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Items = Annotated[list[Annotated[int, Field(ge=0, le=9)]], Field(max_length=4)]


def work(n: Count, ratio: Ratio, mode: Literal["a", "b"] = "a", xs: Items = [1]) -> float:  # noqa: B006
    return n * ratio + sum(xs) + (mode == "b")


WORK = build(work, cost=lambda n, xs, **_: n * (1 + len(xs)), calibration={"n": 10, "ratio": 0.5},
             examples=[{"n": 2, "ratio": 0.25, "xs": [1, 2]}])


def test_declare_returns_the_function_itself_and_marks_it() -> None:
    def f(n: Count) -> int:
        return n

    assert declare(cost=lambda n: n, calibration={"n": 1})(f) is f
    assert getattr(f, MARKER).parameters == ("n",)
    # the built-ins: plain functions, shipped by reference
    assert tasks.REGISTRY["fib"].func is tasks.fib and tasks.fib(10) == 55


@pytest.mark.parametrize(("annotation", "why"), [
    (int, "needs both bounds"),
    (Annotated[int, Field(ge=0)], "needs both bounds"),
    (Annotated[float, Field(le=1)], "needs both bounds"),
    (str, "max_length"),
    (list[int], "max_length"),
    (Annotated[list[int], Field(max_length=3)], "its items"),
    (Annotated[tuple[int, int], Field(max_length=3)], "variable-length"),
    (dict, "not supported"),
    (bytes, "not supported"),
])
def test_every_parameter_must_be_bounded(annotation: object, why: str) -> None:
    def f(x):  # type: ignore[no-untyped-def]
        return x

    f.__annotations__ = {"x": annotation}
    with pytest.raises(DeclarationError, match=rf"parameter 'x' is unbounded: .*{why}"):
        build(f, cost=lambda x: 1, calibration={"x": 1})


def test_other_declaration_errors() -> None:
    def untyped(n):  # type: ignore[no-untyped-def]
        return n

    def star(*ns: Count) -> int:
        return 0

    def nothing() -> int:
        return 0

    for func, message in [(untyped, "no type annotation"), (star, r"\*args"), (nothing, "at least one")]:
        with pytest.raises(DeclarationError, match=message):
            build(func, cost=lambda **_: 1, calibration={})
    with pytest.raises(DeclarationError, match="calibration/example"):
        build(work, cost=lambda **_: 1, calibration={"n": 0, "ratio": 0.5})  # out of its own bounds


def test_validation_gives_canonical_hashable_arguments() -> None:
    args = WORK.validate({"n": "7", "ratio": "0.5", "mode": "b", "xs": ["1", "2"]})  # query strings convert
    assert args == (7, 0.5, "b", (1, 2)) and hash(args) is not None
    assert WORK.validate({"n": 7, "ratio": 0.5}) == (7, 0.5, "a", (1,))  # defaults filled in
    assert WORK.validate({"ratio": 0.5, "n": 7}) == WORK.validate({"n": 7.0, "ratio": 0.5})  # same key
    assert WORK.call(args) == 7 * 0.5 + 3 + 1
    assert WORK.kwargs(args) == {"n": 7, "ratio": 0.5, "mode": "b", "xs": (1, 2)}


@pytest.mark.parametrize(("raw", "parameters"), [
    ({"ratio": 0.5}, ["n"]),  # missing
    ({"n": 0, "ratio": 0.5}, ["n"]),  # below
    ({"n": 101, "ratio": 2}, ["n", "ratio"]),  # above, both named
    ({"n": 1, "ratio": "nan"}, ["ratio"]),
    ({"n": 1, "ratio": 0.5, "mode": "c"}, ["mode"]),
    ({"n": 1, "ratio": 0.5, "xs": [1] * 5}, ["xs"]),  # too long
    ({"n": 1, "ratio": 0.5, "xs": [10]}, ["xs"]),  # an item out of bounds
    ({"n": 1, "ratio": 0.5, "evil": 1}, ["evil"]),  # unknown
    ({"n": 1.5, "ratio": 0.5}, ["n"]),
    ({"n": "1e3", "ratio": 0.5}, ["n"]),
])
def test_invalid_arguments_name_the_parameter(raw: dict, parameters: list[str]) -> None:
    with pytest.raises(InvalidArguments) as caught:
        WORK.validate(raw)
    assert [p["parameter"] for p in caught.value.problems] == parameters
    assert all(p["message"] for p in caught.value.problems)


def test_caps_lower_a_bound_at_run_time() -> None:
    fib = tasks.REGISTRY["fib"]
    assert fib.validate({"n": 30}, {"n": 30}) == (30,)
    with pytest.raises(InvalidArguments, match="n: must be at most 30"):
        fib.validate({"n": 31}, {"n": 30})


def test_cost_model_and_calibration() -> None:
    assert WORK.relative_cost(WORK.validate({"n": 10, "ratio": 0, "xs": [1, 2, 3]})) == 40
    assert WORK.calibrate(repeat=1) > 0
    assert timed(tasks.fib, 10)[0] == 55


def test_schema_is_the_models() -> None:
    schema = WORK.json_schema()
    assert schema["required"] == ["n", "ratio"] and schema["additionalProperties"] is False
    assert schema["properties"]["xs"]["maxItems"] == 4 and schema["properties"]["n"]["maximum"] == 100
    assert WORK.is_list("xs") and not WORK.is_list("n") and not WORK.is_list("nope")


def write_module(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


@pytest.fixture
def on_path(tmp_path: Path):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        del sys.modules[name]


HEADER = """
    from typing import Annotated
    from pydantic import Field
    from service.functions import declare
    """


def test_registry_loads_user_modules(on_path: Path) -> None:
    name = write_module(on_path, "userfns_ok", HEADER + """
    @declare(cost=lambda x: x, calibration={"x": 1})
    def double(x: Annotated[int, Field(ge=0, le=10)]) -> int:
        return 2 * x
    """)
    registry = Registry.load(f" {name} ,")
    assert set(registry) == {"fib", "derive", "double"} and registry["double"].module == name
    assert set(Registry.load("")) == {"fib", "derive"}


@pytest.mark.parametrize(("body", "message"), [
    ("import not_a_module_anywhere\n", r"cannot import 'MOD': ModuleNotFoundError"),
    ("x = 1\n", "'MOD' declares no compute function"),
    (HEADER + """
    @declare(cost=lambda n: n, calibration={"n": 1})
    def fib(n: Annotated[int, Field(ge=0, le=10)]) -> int:
        return n
    """, "'fib' is declared twice: in service.tasks and in MOD"),
    (HEADER + """
    @declare(cost=lambda n: n, calibration={"n": 1})
    def big(n: int) -> int:
        return n
    """, "cannot import 'MOD': DeclarationError: .*parameter 'n' is unbounded"),
])
def test_registry_loading_errors_name_the_module(on_path: Path, body: str, message: str) -> None:
    name = write_module(on_path, f"userfns_{abs(hash(body))}", body)
    with pytest.raises(RegistryError, match=message.replace("MOD", name)):
        Registry.load(name)


def test_json_bodies_are_strictly_typed() -> None:
    assert WORK.validate_json(b'{"n": 7, "ratio": 1, "xs": [1, 2]}') == (7, 1.0, "a", (1, 2))
    assert WORK.validate_json(b'{"n": 7.0, "ratio": 1, "xs": [1.0]}') == (7, 1.0, "a", (1,))  # JSON Schema's integer
    for body, parameter in [(b'{"n": "7", "ratio": 0.5}', "n"), (b'{"n": true, "ratio": 0.5}', "n"),
                            (b'{"n": 7.5, "ratio": 0.5}', "n"),
                            (b'{"n": 7, "ratio": "0.5"}', "ratio"), (b"[7]", "(body)"), (b"{", "(body)"),
                            (b"[" * 10_000, "(body)"), (b"\xff", "(body)")]:
        with pytest.raises(InvalidArguments) as caught:
            WORK.validate_json(body)
        assert [p["parameter"] for p in caught.value.problems] == [parameter], body


def test_query_strings_are_read_as_json_would_spell_them() -> None:
    query = {"n": "7", "ratio": "5e-1", "mode": "b", "xs": ["1", "2"]}
    assert WORK.validate_query(query) == (7, 0.5, "b", (1, 2))
    assert WORK.validate_query({"n": "7", "ratio": "1", "xs": "3"}) == (7, 1.0, "a", (3,))  # one item
    assert WORK.validate_query({"n": "7.0", "ratio": "1"})[0] == 7  # an integer to JSON Schema
    for n in ("+7", "7.5", "1_0", "٣", " 7", "0x7", "true", ["7", "8"]):
        with pytest.raises(InvalidArguments) as caught:
            WORK.validate_query({"n": n, "ratio": "0.5"})
        assert [p["parameter"] for p in caught.value.problems] == ["n"], n
    for ratio in ("nan", "1e400", "inf", ".5"):
        with pytest.raises(InvalidArguments, match="ratio"):
            WORK.validate_query({"n": "7", "ratio": ratio})
