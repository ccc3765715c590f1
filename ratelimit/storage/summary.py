"""A summary of every counter of some limits: the busiest counters, and per limit what the rest add up to.

Quota gauges (the exporter's) need one series per busy counter and totals for the others, over
hundreds of thousands of counters. `summarize` is the plain definition, over counter statuses (any
storage: it is what `Storage.counter_summary` does by default, from listing pages). The memory
storage computes the same summary in its table (a kernel adds the counters up), without a Python
object per counter but the busiest, so a scrape does not hold the interpreter (and every decision)
for seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ratelimit.counters import CounterStatus
from ratelimit.limits import Limit


@dataclass(slots=True)
class LimitSummary:
    """One limit's counters: all of them counted, and the ones not among the busiest added up."""

    counters: int = 0
    """Counters of the limit (the busiest included)."""
    at_or_above: list[int] = field(default_factory=list)
    """Per threshold (in the order asked), counters whose used / max_value is at least it."""
    others: int = 0
    """Counters not among the busiest; the fields below add them up."""
    others_max_value: int = 0
    others_used: int = 0
    """value + reserved: what admission counts against the limit."""
    others_remaining: int = 0
    others_reset: float = 0.0
    """The soonest expires_in among them (0.0 when there are none)."""


@dataclass(slots=True)
class CounterSummary:
    busiest: list[CounterStatus]
    """The `top_n` counters using the most (value + reserved); among equals, listing order."""
    limits: dict[Limit, LimitSummary]
    """Per limit with at least one counter."""


def used(status: CounterStatus) -> int:
    """What admission counts against the limit, so used + remaining == max_value until overshoot."""
    return status.value + status.reserved


def utilisation(used_amount: int, max_value: int) -> float:
    """used / max_value; a limit of 0 admits nothing, so its counters are exhausted from the start."""
    return used_amount / max_value if max_value > 0 else 1.0


def summarize(statuses: Iterable[CounterStatus], top_n: int, thresholds: Sequence[float]) -> CounterSummary:
    """The summary, by definition (the reference the memory storage's version is tested against)."""
    listed = list(statuses)
    order = sorted(range(len(listed)), key=lambda i: -used(listed[i]))  # sorted() is stable: ties in order
    chosen = set(order[:top_n])
    limits: dict[Limit, LimitSummary] = {}
    for i, status in enumerate(listed):
        summary = limits.get(status.limit)
        if summary is None:
            summary = limits[status.limit] = LimitSummary(at_or_above=[0] * len(thresholds))
        summary.counters += 1
        ratio = utilisation(used(status), status.limit.max_value)
        for k, threshold in enumerate(thresholds):
            summary.at_or_above[k] += ratio >= threshold
        if i in chosen:
            continue
        summary.others_reset = status.expires_in if not summary.others else min(summary.others_reset, status.expires_in)
        summary.others += 1
        summary.others_max_value += status.limit.max_value
        summary.others_used += used(status)
        summary.others_remaining += status.remaining
    return CounterSummary([listed[i] for i in order[:top_n]], limits)
