"""Which variant serves a request.

The logical model name (`model.name`) means "whatever is serving now": the champion, or — while an
experiment runs — the champion or the challenger, chosen by a stable hash of the routing unit (the
request's `user`, else its session header) salted with the experiment id, so one customer sees one
variant for the whole experiment and a new experiment draws afresh. A request with neither gets a
fresh draw (still a fair sample, just not sticky). A served variant's own name pins it, for keys
whose role may pin (`experiment.pin_min_role`).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass


class UnknownModel(LookupError):
    pass


class PinNotAllowed(PermissionError):
    pass


@dataclass(frozen=True)
class Split:
    """What the logical name routes to right now (replaced whole, never mutated, so a request
    reads one consistent split even while a promotion swaps it)."""

    champion: str = "base"
    challenger: str | None = None
    share: float = 0.0
    experiment_id: int | None = None


@dataclass(frozen=True)
class Route:
    variant: str
    experiment_id: int | None = None  # set when the A/B split chose the variant
    pinned: bool = False
    unit: str | None = None  # the routing unit's digest (salted by the experiment): the A/B rule counts customers


def _digest(salt: object, unit: str) -> bytes:
    return hashlib.sha256(f"{salt}\x00{unit}".encode()).digest()


def bucket(salt: object, unit: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, unit)."""
    return int.from_bytes(_digest(salt, unit)[:8], "big") / 2**64


def choose(split: Split, unit: str | None) -> Route:
    if split.challenger is None or split.experiment_id is None or split.share <= 0:
        return Route(split.champion)
    digest = _digest(split.experiment_id, unit if unit else uuid.uuid4().hex)
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return Route(split.challenger if draw < split.share else split.champion, split.experiment_id,
                 unit=digest[8:24].hex())


def resolve_variant(requested: str, logical_name: str, served: list[str], split: Split,
                    unit: str | None = None, may_pin: bool = True) -> Route:
    if requested == logical_name:
        return choose(split, unit)
    if requested in served:
        if not may_pin:
            raise PinNotAllowed(requested)
        return Route(requested, pinned=True)
    known = f"'{logical_name}' or one of: {', '.join(served)}" if may_pin else f"'{logical_name}'"
    raise UnknownModel(f"The model '{requested}' does not exist. Use {known}.")
