"""How much a stale update counts in buffered asynchronous aggregation (FedBuff).

An update's staleness `s` is how many head versions were published after the one it trained
from (0: trained from the current head). Its delta is multiplied by `weight(s)` before the
strategy aggregates the buffer, so a stale update moves the head less:

- `poly:A` (default `poly:0.5`): `(1 + s) ** -A`, the polynomial weight of FedAsync (Xie et al.
  2019) and FedBuff (Nguyen et al. 2022);
- `const`: 1 for every update (FedBuff without discounting);
- `hinge:A,B`: 1 while `s <= B`, then `1 / (A * (s - B) + 1)` (FedAsync's hinge).
"""

from __future__ import annotations

from dataclasses import dataclass

STALENESS_KINDS = ("poly", "const", "hinge")


@dataclass(frozen=True)
class StalenessWeight:
    """A parsed staleness function; call it with a staleness to get the update's weight."""

    kind: str
    a: float = 0.5
    b: float = 0.0

    def __call__(self, staleness: int) -> float:
        """Return the weight of an update `staleness` versions old (1.0 when fresh)."""
        s = max(0, staleness)
        if self.kind == "const":
            return 1.0
        if self.kind == "poly":
            return float((1.0 + s) ** -self.a)
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)

    def __str__(self) -> str:
        if self.kind == "const":
            return "const"
        if self.kind == "poly":
            return f"poly:{self.a:g}"
        return f"hinge:{self.a:g},{self.b:g}"


def parse_staleness(text: str) -> StalenessWeight:
    """Parse `poly:A`, `const` or `hinge:A,B` (see the module docstring).

    Raises:
        ValueError: an unknown kind, a missing or non-numeric parameter, or a negative one.
    """
    kind, _, params = text.strip().partition(":")
    kind = kind.lower()
    if kind not in STALENESS_KINDS:
        raise ValueError(
            f"staleness {text!r} is not one of poly:A, const, hinge:A,B (e.g. poly:0.5)"
        )
    try:
        values = [float(p) for p in params.split(",")] if params else []
    except ValueError:
        raise ValueError(f"staleness {text!r}: parameters must be numbers") from None
    wanted = {"poly": 1, "const": 0, "hinge": 2}[kind]
    if len(values) != wanted:
        form = {"poly": "poly:A", "const": "const", "hinge": "hinge:A,B"}[kind]
        raise ValueError(f"staleness {text!r} must look like {form}")
    if any(not v >= 0 for v in values):
        raise ValueError(f"staleness {text!r}: parameters must not be negative")
    return StalenessWeight(kind, *values)
