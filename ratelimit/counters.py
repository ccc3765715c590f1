"""Counters, and what a storage answers about them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def tightest(statuses: Iterable[CounterStatus]) -> CounterStatus | None:
    """The counter that binds first: least remaining; between equals, the one resetting last binds
    longest; then the first given."""
    return min(statuses, key=lambda status: (status.remaining, -status.expires_in), default=None)


def rate_limit_headers(statuses: Sequence[CounterStatus]) -> dict[str, str]:
    """Draft-03 `X-RateLimit-*` headers in Limitador's format: the tightest counter's figures, then
    every window, least remaining first."""
    binding = tightest(statuses)
    if binding is None:
        return {}
    windows = []
    for status in sorted(statuses, key=lambda status: status.remaining):
        entry = f"{status.limit.max_value};w={status.limit.seconds}"
        if status.limit.name:
            # A '"' would end the quoted string early; Limitador writes it as "'".
            entry += ';name="{}"'.format(status.limit.name.replace('"', "'"))
        windows.append(entry)
    return {
        "X-RateLimit-Limit": ", ".join([str(binding.limit.max_value), *windows]),
        "X-RateLimit-Remaining": str(binding.remaining),
        "X-RateLimit-Reset": str(int(binding.expires_in + 0.999)),
    }


@dataclass(slots=True)
class Decision:
    """The answer to one decision over all counters of a request, from the storage through the engine."""

    limited_by: Limit | None = None
    """The first limit whose counter lacks room, or None when the request is within limits."""
    counters: list[CounterStatus] = field(default_factory=list)
    """Every counter's state after the decision (empty unless the caller asked to load counters)."""

    @property
    def limited(self) -> bool:
        return self.limited_by is not None

    def rate_limit_headers(self) -> dict[str, str]:
        return rate_limit_headers(self.counters)


@dataclass(slots=True)
class Reservation(Decision):
    """reserve's answer: a decision, and when admitted the id that commit releases."""

    reservation_id: str | None = None


@dataclass(slots=True)
class Commit:
    """commit's answer: whether the reservation was still held (False when it had expired or was
    unknown: the amount is charged all the same), and the counters' states."""

    held: bool
    counters: list[CounterStatus] = field(default_factory=list)


class StorageError(RuntimeError):
    """The storage could not answer (unreachable, full, timed out). Servers map it to 5xx / UNAVAILABLE."""


class StorageFullError(StorageError):
    """The counter table is at its capacity and no expired counter can be reused."""
