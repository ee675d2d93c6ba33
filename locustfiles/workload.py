"""What the simulated users ask for: which n, how long they think, and the answers to expect.

Specs are plain strings so they survive Locust's config file, LOCUST_* variables, the web UI form
and the master-to-worker hand-over (parsed options travel as msgpack, so no custom objects):

* n distribution: ``"25"`` (fixed), ``"20..30"`` (uniform, inclusive) or ``"20:3,25:1,30"``
  (weighted list; a missing weight means 1).
* wait time in seconds: ``"0.5"`` (constant) or ``"0.1..0.5"`` (uniform).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

# fib(0) .. fib(40), written out rather than computed so a bug in a shared helper cannot make the
# expected values agree with a wrong service. Past the service's default FIB_MAX_N (35) so a server
# with a raised limit can still be checked.
KNOWN_FIB_VALUES: tuple[int, ...] = (
    0, 1, 1, 2, 3, 5, 8, 13, 21, 34,
    55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181,
    6765, 10946, 17711, 28657, 46368, 75025, 121393, 196418, 317811, 514229,
    832040, 1346269, 2178309, 3524578, 5702887, 9227465, 14930352, 24157817, 39088169, 63245986,
    102334155,
)  # fmt: skip

RANGE_SEPARATOR = ".."


class SpecError(ValueError):
    """A workload spec string that cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class NDistribution:
    """A discrete distribution over n: the values and their relative weights."""

    values: tuple[int, ...]
    weights: tuple[float, ...]

    def sample(self, rng: random.Random | None = None) -> int:
        rng = rng or random
        if len(self.values) == 1:
            return self.values[0]
        return rng.choices(self.values, weights=self.weights)[0]

    def describe(self) -> str:
        if len(self.values) == 1:
            return f"n={self.values[0]}"
        if len(set(self.weights)) == 1 and self.values == tuple(range(self.values[0], self.values[-1] + 1)):
            return f"n uniform in {self.values[0]}..{self.values[-1]}"
        return "n weighted " + ", ".join(f"{v}:{w:g}" for v, w in zip(self.values, self.weights, strict=True))


@dataclass(frozen=True)
class WaitRange:
    """Think time between a user's requests, uniform in [low, high] seconds."""

    low: float
    high: float

    def sample(self, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(self.low, self.high)


def _int(text: str, spec: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SpecError(f"{spec!r}: {text.strip()!r} is not an integer") from None


def weighted_items(spec: str) -> list[tuple[str, float]]:
    """``"a:3, b"`` -> ``[("a", 3.0), ("b", 1.0)]``: a missing weight means 1, weights are positive."""
    items = []
    for item in spec.split(","):
        value_text, _, weight_text = item.partition(":")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise SpecError(f"{spec!r}: weight {weight_text.strip()!r} is not a number") from None
        if weight <= 0:
            raise SpecError(f"{spec!r}: weights must be positive")
        items.append((value_text.strip(), weight))
    return items


@lru_cache(maxsize=32)
def parse_n_distribution(spec: str) -> NDistribution:
    """Parse a --fib-n spec; only n with a known expected value are accepted (no accidental 422s)."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty n spec: use e.g. 25, 20..30 or 20:3,25:1")
    if RANGE_SEPARATOR in spec:
        low_text, high_text = spec.split(RANGE_SEPARATOR, 1)
        low, high = _int(low_text, spec), _int(high_text, spec)
        if low > high:
            raise SpecError(f"{spec!r}: range start {low} is above its end {high}")
        values, weights = tuple(range(low, high + 1)), (1.0,) * (high - low + 1)
    else:
        pairs = [(_int(value_text, spec), weight) for value_text, weight in weighted_items(spec)]
        values, weights = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    limit = len(KNOWN_FIB_VALUES) - 1
    out_of_table = [v for v in values if not 0 <= v <= limit]
    if out_of_table:
        raise SpecError(f"{spec!r}: n must be within 0..{limit} (no known value for {out_of_table[0]})")
    return NDistribution(values, weights)


@lru_cache(maxsize=32)
def parse_wait_range(spec: str) -> WaitRange:
    """Parse a wait spec in seconds: "0.5" or "0.1..0.5"."""
    low_text, _, high_text = spec.strip().partition(RANGE_SEPARATOR)
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise SpecError(f"wait spec {spec!r}: use seconds like 0.5 or 0.1..0.5") from None
    if not 0 <= low <= high:
        raise SpecError(f"wait spec {spec!r}: need 0 <= low <= high")
    return WaitRange(low, high)
