"""Limitador-compatible Prometheus metrics.

Limitador exports `authorized_calls`, `authorized_hits` and `limited_calls` as counters *without*
the `_total` suffix (metrics-exporter-prometheus does not add one), and dashboards and alerts
written for Limitador query those exact names. prometheus_client always renders counters as
`<name>_total`, so the three counters are kept here and exposed through a small collector, and the
Prometheus text format is written by `render` for counter and gauge families; any other family
registered later (histograms, summaries) is rendered by prometheus_client itself.

Label values come from requests (the namespace), so every family keeps at most `MAX_SERIES` label
sets; later ones are folded into one `OVERFLOW_LABEL` series instead of growing without bound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.utils import floatToGoString

from ratelimit.limits import Limit

NAMESPACE_LABEL = "limitador_namespace"
LIMIT_NAME_LABEL = "limit_name"
MAX_SERIES = 10_000
OVERFLOW_LABEL = "__overflow__"

Descriptors = Sequence[Mapping[str, str]]


@dataclass
class _CounterFamily:
    """One counter family: label values -> count. Callers hold `Metrics._lock`."""

    name: str
    documentation: str
    label_names: tuple[str, ...]
    values: dict[tuple[str, ...], int] = field(default_factory=dict)

    def inc(self, label_values: tuple[str, ...], amount: int) -> None:
        if label_values not in self.values and len(self.values) >= MAX_SERIES:
            label_values = (OVERFLOW_LABEL,) * len(label_values)
        self.values[label_values] = self.values.get(label_values, 0) + amount

    def snapshot(self) -> Metric:
        metric = Metric(self.name, self.documentation, "counter")
        for label_values, value in self.values.items():
            metric.add_sample(self.name, dict(zip(self.label_names, label_values)), value)
        return metric


class Metrics:
    """The service's metrics registry, shared by the HTTP and gRPC servers (thread-safe)."""

    def __init__(self, limit_name_in_labels: bool = False) -> None:
        self.limit_name_in_labels = limit_name_in_labels
        self._lock = threading.Lock()
        self._authorized_calls = _CounterFamily("authorized_calls", "Authorized calls", (NAMESPACE_LABEL,))
        self._authorized_hits = _CounterFamily("authorized_hits", "Authorized hits", (NAMESPACE_LABEL,))
        limited_labels = (NAMESPACE_LABEL, LIMIT_NAME_LABEL) if limit_name_in_labels else (NAMESPACE_LABEL,)
        self._limited_calls = _CounterFamily("limited_calls", "Limited calls", limited_labels)
        self._families = (self._authorized_calls, self._authorized_hits, self._limited_calls)
        self.registry = CollectorRegistry(auto_describe=True)
        """Other parts of the service may register their own collectors here."""
        self.registry.register(self)
        Gauge("limitador_up", "Limitador is running", registry=self.registry).set(1)

    # -- recording -------------------------------------------------------------------------------

    def record_authorized(self, namespace: str, descriptors: Descriptors, hits: int) -> None:
        """An admitted check-and-report (or ShouldRateLimit / CheckRateLimit) call."""
        labels = self._labels(namespace, descriptors)
        with self._lock:
            self._authorized_calls.inc(labels, 1)
            self._authorized_hits.inc(labels, hits)

    def record_reported(self, namespace: str, descriptors: Descriptors, hits: int) -> None:
        """A Kuadrant Report: hits were charged, but no call was decided."""
        labels = self._labels(namespace, descriptors)
        with self._lock:
            self._authorized_hits.inc(labels, hits)

    def record_limited(self, namespace: str, descriptors: Descriptors, limit: Limit | None) -> None:
        """A limited call; `limit` is the first limit that refused it (Limitador names only that one)."""
        labels = self._labels(namespace, descriptors)
        if self.limit_name_in_labels:
            labels = (*labels, (limit.name if limit is not None else None) or "")
        with self._lock:
            self._limited_calls.inc(labels, 1)

    def _labels(self, namespace: str, descriptors: Descriptors) -> tuple[str, ...]:
        """Label values shared by every family; custom labels from the descriptors will join here."""
        return (namespace,)

    # -- exposition ------------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """Family names without samples, so the registry rejects a later collector reusing them."""
        return [Metric(family.name, family.documentation, "counter") for family in self._families]

    def collect(self) -> list[Metric]:
        with self._lock:
            return [family.snapshot() for family in self._families]

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text format (0.0.4) and its content type."""
        parts = []
        for metric in self.registry.collect():
            if metric.type in ("counter", "gauge"):
                parts.append("".join(_render_simple(metric)).encode("utf-8"))
            else:
                parts.append(generate_latest(_Single(metric)))
        return b"".join(parts), CONTENT_TYPE_PLAIN_0_0_4


@dataclass
class _Single:
    """A one-family collector, to let prometheus_client render the families it renders correctly."""

    metric: Metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def _render_simple(metric: Metric) -> Iterator[str]:
    """A counter or gauge family under its own name (no `_total`), values as Limitador prints them."""
    yield f"# HELP {metric.name} {_escape_help(metric.documentation)}\n"
    yield f"# TYPE {metric.name} {metric.type}\n"
    for sample in metric.samples:
        labels = ",".join(f'{name}="{_escape_label(value)}"' for name, value in sorted(sample.labels.items()))
        label_text = "{" + labels + "}" if labels else ""
        yield f"{sample.name}{label_text} {_format_value(sample.value)}\n"


def _format_value(value: float) -> str:
    """Whole numbers without a trailing `.0` (`limitador_up 1`), anything else as Go would print it."""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return floatToGoString(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
