"""Counters, and what a storage answers about them."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ratelimit.limits import Limit


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter: a limit qualified by its resolved variable values (in `limit.variables` order)."""

    limit: Limit
    values: tuple[str, ...] = ()

    @property
    def set_variables(self) -> dict[str, str]:
        """Limitador's `set_variables`: variable source text -> resolved value."""
        return dict(zip(self.limit.variables, self.values))

    def qualifier(self) -> str:
        """The variable values as one unambiguous string, used in storage keys.

        One variable (the usual per-user case) is the value itself; several are a JSON list, which
        cannot be confused with a single value because the limit fixes how many variables there are.
        """
        if len(self.values) == 1:
            return self.values[0]
        return json.dumps(self.values, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def values_from_qualifier(limit: Limit, qualifier: str) -> tuple[str, ...]:
        if len(limit.variables) == 1:
            return (qualifier,)
        return tuple(json.loads(qualifier))


@dataclass(slots=True)
class CounterStatus:
    """A counter's state in its current window, as a storage reports it."""

    counter: Counter
    value: int
    """Hits charged in the current window; may exceed max_value after unconditional reports."""
    expires_in: float
    """Seconds until the window resets (0 when no window is running)."""
    reserved: int = 0
    """Amount held by outstanding reservations."""

    @property
    def limit(self) -> Limit:
        return self.counter.limit

    @property
    def remaining(self) -> int:
        """Budget left, clamped to [0, max_value]: never Limitador's wrapped u64."""
        return max(0, min(self.limit.max_value, self.limit.max_value - self.value - self.reserved))

    @property
    def overshoot(self) -> int:
        """How far unconditional reports pushed the counter past max_value."""
        return max(0, self.value - self.limit.max_value)

    def to_dict(self) -> dict[str, object]:
        """Limitador's `/counters` JSON shape, plus our `overshoot` and `reserved` fields."""
        return {
            "limit": self.limit.to_dict(),
            "set_variables": self.counter.set_variables,
            "remaining": self.remaining,
            "expires_in_seconds": int(self.expires_in + 0.999),
            "overshoot": self.overshoot,
            "reserved": self.reserved,
        }


@dataclass(slots=True)
class Authorization:
    """A storage's answer to one decision over all counters of a request."""

    limited_by: Counter | None
    """The first counter that would exceed its limit, or None when the request is within limits."""
    counters: list[CounterStatus]
    """Every counter's state after the decision (empty unless the caller asked to load counters)."""
    reservation_id: str | None = None

    @property
    def limited(self) -> bool:
        return self.limited_by is not None


class StorageError(RuntimeError):
    """The storage could not answer (unreachable, full, timed out). Servers map it to 5xx / UNAVAILABLE."""


class StorageFullError(StorageError):
    """The counter table is at its capacity and no expired counter can be reused."""
