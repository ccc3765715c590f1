"""Limitador-compatible Prometheus metrics.

Limitador exports `authorized_calls`, `authorized_hits` and `limited_calls` as counters *without*
the `_total` suffix (metrics-exporter-prometheus does not add one), and dashboards and alerts
written for Limitador query those exact names. prometheus_client always renders counters as
`<name>_total`, so the three counters are kept here and exposed through a small collector, and the
Prometheus text format is written by `render` for counter and gauge families; any other family
registered later (histograms, summaries) is rendered by prometheus_client itself. Pipelines that
append `_total` themselves (an OpenTelemetry receiver) are matched by `total_suffix=True`.

Labels: `limitador_namespace`, then the custom labels of Limitador's `-L` file (label -> CEL over
`descriptors`), then `limit_name` with `-l`. Label values come from requests, so every family keeps
at most `MAX_SERIES` label sets; later ones are folded into one `OVERFLOW_LABEL` series instead of
growing without bound, and a value longer than `MAX_LABEL_VALUE_LENGTH` is shown as `TOO_LONG_LABEL`.

`datastore_latency` (a histogram, seconds) is timed by `TimedStorage`, a decorator around the
engine's storage built here rather than in `ratelimit.storage`, so the core never imports metrics.

Across worker processes (`serve --workers N`, `Metrics(multiprocess_dir=...)`), every per-process
value is also written to prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set by
the supervisor before the workers start), and a scrape, whichever worker takes it, reads them all
with the library's `MultiProcessCollector`: counters and histograms are summed over every process
that ever wrote them (a dead worker's file stays, so its counts are neither lost nor, under a new
pid, counted twice), gauges are merged per their multiprocess mode. Families that are the same in
every worker because they read the shared table (the quota gauges) or files (the model catalog) are
not written there: the answering worker reports them once.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from ratelimit.cel import CelError, Expression, MapExpression, compile_expression, compile_map_expression
from ratelimit.limits import Limit
from ratelimit.pacing import Pace
from ratelimit.storage.base import Storage, StorageWrapper

NAMESPACE_LABEL = "limitador_namespace"
LIMIT_NAME_LABEL = "limit_name"
MAX_SERIES = 10_000
OVERFLOW_LABEL = "__overflow__"
MAX_LABEL_VALUE_LENGTH = 512
"""Longer label values (they come from requests) are replaced by TOO_LONG_LABEL: 10,000 series of
4 KiB values would hold 40 MiB per family and make every scrape megabytes long."""
TOO_LONG_LABEL = "__too_long__"
# Seconds. A Redis decision (one Lua script) takes ~0.1-2 ms on a LAN; the upper buckets catch a
# slow or unreachable Redis up to and past the default --response-timeout.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Custom labels see no limit (they label the call, not one of its counters), as in Limitador.
_NO_LIMIT: Mapping[str, str | None] = {"name": None, "id": None}

Descriptors = Sequence[Mapping[str, str]]
LimitsOf = Callable[[str, Descriptors], Sequence[Limit]]
"""The limits that apply to a call: names `limit_name` on authorized calls and hits."""


class MetricLabelsError(ValueError):
    """The `-L` custom labels file is unreadable or invalid."""


def parse_custom_labels(text: str, source: str = "<labels>") -> dict[str, Expression]:
    """Limitador's `-L` file: a YAML map of label name -> CEL expression over `descriptors`."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetricLabelsError(f"{source}: not YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise MetricLabelsError(f"{source}: expected a map of label name to CEL expression")
    labels: dict[str, Expression] = {}
    for name, source_text in document.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise MetricLabelsError(f"{source}: {name!r} is not a Prometheus label name")
        if name in (NAMESPACE_LABEL, LIMIT_NAME_LABEL):
            raise MetricLabelsError(f"{source}: {name!r} is set by the service itself")
        if not isinstance(source_text, str):
            raise MetricLabelsError(f"{source}: label {name!r}: the expression must be a string")
        try:
            labels[name] = compile_expression(source_text)
        except CelError as exc:
            raise MetricLabelsError(f"{source}: label {name!r}: {exc}") from None
    return labels


def parse_default_labels(source: str) -> MapExpression:
    """`--metric-labels-default`: a CEL expression over `descriptors` that gives a map of labels."""
    try:
        return compile_map_expression(source)
    except CelError as exc:
        raise MetricLabelsError(f"--metric-labels-default: {exc}") from None


def load_custom_labels(path: str | Path) -> dict[str, Expression]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricLabelsError(f"cannot read custom metric labels {path}: {exc}") from None
    return parse_custom_labels(text, str(path))


LabelSet = tuple[tuple[str, str], ...]
"""A series' labels as sorted (name, value) pairs: the label names may differ from call to call
(`--metric-labels-default` yields a map, and `-L` is reloaded), as in Limitador's exporter."""


@dataclass
class _CounterFamily:
    """One counter family: label set -> count. Callers hold `Metrics._lock`.

    With `shared`, each count is also written through a prometheus_client Counter child to this
    process's multiprocess file (one Counter per set of label names: the names vary from call to
    call, and the multiprocess files key each series by its own labels anyway)."""

    name: str
    documentation: str
    shared: bool = False
    values: dict[LabelSet, int] = field(default_factory=dict)
    _children: dict[LabelSet, Counter] = field(default_factory=dict)
    _parents: dict[tuple[str, ...], Counter] = field(default_factory=dict)

    def inc(self, labels: LabelSet, amount: int) -> None:
        if labels not in self.values and len(self.values) >= MAX_SERIES:
            labels = tuple((name, OVERFLOW_LABEL) for name, _ in labels)
        self.values[labels] = self.values.get(labels, 0) + amount
        if self.shared:
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = self._child(labels)
            child.inc(amount)

    def _child(self, labels: LabelSet) -> Counter:
        present = [(name, value) for name, value in labels if value != ""]
        names = tuple(name for name, _ in present)
        parent = self._parents.get(names)
        if parent is None:
            parent = self._parents[names] = Counter(self.name, self.documentation, names, registry=None)
        return parent.labels(*(value for _, value in present)) if names else parent

    def snapshot(self, values: Mapping[LabelSet, int]) -> Metric:
        """The family as a Metric, from a copy of `values` (formatting runs outside the lock)."""
        metric = Metric(self.name, self.documentation, "counter")
        for labels, value in values.items():
            # An empty value is how Prometheus spells "no such label": leave it out, as Limitador
            # drops a custom label whose CEL does not resolve.
            metric.add_sample(self.name, {name: value for name, value in labels if value != ""}, value)
        return metric


def _check_multiprocess_mode(directory: str) -> None:
    """prometheus_client picks its value class once, when imported: the environment must have named
    the directory before that, or every value would stay in this process."""
    if not getattr(values.ValueClass, "_multiprocess", False) or os.environ.get("PROMETHEUS_MULTIPROC_DIR") != directory:
        raise RuntimeError(
            f"metrics across processes need PROMETHEUS_MULTIPROC_DIR={directory} in the environment before "
            "prometheus_client is imported (the worker supervisor sets it)")
    if not os.path.isdir(directory):
        raise RuntimeError(f"metrics directory {directory} does not exist")


class Metrics:
    """The service's metrics registry, shared by the HTTP and gRPC servers (thread-safe)."""

    def __init__(
        self,
        limit_name_in_labels: bool = False,
        custom_labels: Mapping[str, Expression] | None = None,
        total_suffix: bool = False,
        limits_of: LimitsOf | None = None,
        default_labels: MapExpression | None = None,
        multiprocess_dir: str | None = None,
    ) -> None:
        if multiprocess_dir is not None:
            _check_multiprocess_mode(multiprocess_dir)
        self.multiprocess_dir = multiprocess_dir
        """Where every worker writes its values (prometheus_client's multiprocess mode); None: one process."""
        shared = multiprocess_dir is not None
        self.limit_name_in_labels = limit_name_in_labels
        self.custom_labels: dict[str, Expression] = {}
        self.default_labels = default_labels
        """`--metric-labels-default`: CEL giving a map of label -> value; `-L` labels win over it."""
        self.total_suffix = total_suffix
        self._limits_of = limits_of
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self._publishers: list[Callable[[], None]] = []
        self._label_listeners: list[Callable[[Mapping[str, Expression]], None]] = []
        self._lock = threading.Lock()
        self.set_custom_labels(custom_labels or {})
        self._authorized_calls = _CounterFamily("authorized_calls", "Authorized calls", shared)
        self._authorized_hits = _CounterFamily("authorized_hits", "Authorized hits", shared)
        self._limited_calls = _CounterFamily("limited_calls", "Limited calls", shared)
        self._families = (self._authorized_calls, self._authorized_hits, self._limited_calls)
        self.registry = CollectorRegistry(auto_describe=True)
        """Other parts of the service may register their own collectors here."""
        self.registry.register(self)
        # Across workers, the highest value of the live workers: 1 as in one process (a sum would
        # say N), and a dead worker's file is dropped (mark_process_dead) rather than kept.
        Gauge("limitador_up", "Limitador is running", registry=self.registry, multiprocess_mode="livemax").set(1)

    def set_custom_labels(self, labels: Mapping[str, Expression]) -> None:
        """Replace the `-L` labels (a reload). Series counted so far keep their labels: a counter's
        label set is its identity, so they stay as they were and new calls start new series."""
        self.custom_labels = dict(sorted(labels.items()))
        for listener in self._label_listeners:
            listener(self.custom_labels)

    def on_custom_labels(self, listener: Callable[[Mapping[str, Expression]], None]) -> None:
        """Call `listener` with the new `-L` labels on every reload (the quota gauges use them too)."""
        self._label_listeners.append(listener)

    def add_refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """An async step run before each scrape: collectors are synchronous, but reading counters
        from a storage (Redis) is not, so such collectors fetch their snapshot here."""
        self._refreshers.append(refresh)

    async def refresh(self) -> None:
        for refresh in self._refreshers:
            await refresh()

    def add_publisher(self, publish: Callable[[], None]) -> None:
        """A step that writes values a collector holds only in this process to the multiprocess
        files (`StorageHealth.publish`); run by `publish`, before each scrape and periodically."""
        self._publishers.append(publish)

    def publish(self) -> None:
        for publish in self._publishers:
            publish()

    # -- recording -------------------------------------------------------------------------------

    def record_authorized(self, namespace: str, descriptors: Descriptors, hits: int) -> None:
        """An admitted check-and-report (or ShouldRateLimit / CheckRateLimit) call."""
        labels = self._labels(namespace, descriptors, self._applicable_names(namespace, descriptors))
        with self._lock:
            self._authorized_calls.inc(labels, 1)
            self._authorized_hits.inc(labels, hits)

    def record_reported(self, namespace: str, descriptors: Descriptors, hits: int) -> None:
        """A Kuadrant Report: hits were charged, but no call was decided."""
        labels = self._labels(namespace, descriptors, self._applicable_names(namespace, descriptors))
        with self._lock:
            self._authorized_hits.inc(labels, hits)

    def record_limited(self, namespace: str, descriptors: Descriptors, limit: Limit | None) -> None:
        """A limited call; `limit` is the first limit that refused it (Limitador names only that one)."""
        labels = self._labels(namespace, descriptors, (limit.name if limit is not None else None) or "")
        with self._lock:
            self._limited_calls.inc(labels, 1)

    def _applicable_names(self, namespace: str, descriptors: Descriptors) -> str:
        """`limit_name` of an admitted call: the names of every limit that counted it, joined by ","
        (one name for a MaaS subscription, whose windows share it), so `sum` never counts a call twice."""
        if not self.limit_name_in_labels or self._limits_of is None:
            return ""
        try:
            limits = self._limits_of(namespace, descriptors)
        except ValueError:  # descriptors the engine refused: the call was not counted by any limit
            return ""
        return ",".join(sorted({limit.name for limit in limits if limit.name}))

    def _labels(self, namespace: str, descriptors: Descriptors, limit_name: str) -> LabelSet:
        """The call's labels: the default map, then the `-L` labels over it, then the namespace and
        limit name, which neither may override (Limitador appends them last too). Values longer
        than MAX_LABEL_VALUE_LENGTH show as TOO_LONG_LABEL."""
        labels: dict[str, str] = {}
        if self.default_labels is not None:
            defaults = self.default_labels.evaluate_map(descriptors, _NO_LIMIT)
            labels.update((name, _bounded(value)) for name, value in defaults.items()
                          if _LABEL_NAME.match(name) and not name.startswith("__"))
        for name, expression in self.custom_labels.items():
            try:
                value = expression.evaluate(descriptors, _NO_LIMIT)
            except Exception:
                value = None
            labels[name] = _bounded(value or "")
        labels[NAMESPACE_LABEL] = _bounded(namespace)
        if self.limit_name_in_labels:
            labels[LIMIT_NAME_LABEL] = limit_name
        # Without the default map the names come in one fixed order, so the pairs are canonical as
        # they are; a map's keys can come in any order and are sorted.
        return tuple(sorted(labels.items())) if self.default_labels is not None else tuple(labels.items())

    # -- exposition ------------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """Family names without samples, so the registry rejects a later collector reusing them."""
        return [Metric(family.name, family.documentation, "counter") for family in self._families]

    def collect(self) -> list[Metric]:
        # Copying the dicts is all the lock covers: decisions record under it.
        with self._lock:
            copies = [dict(family.values) for family in self._families]
        return [family.snapshot(values) for family, values in zip(self._families, copies)]

    def families(self) -> list[Metric]:
        """Every family to expose. Across workers, a family found in the multiprocess files (the
        sum over every worker) replaces this process's own family of that name."""
        own = list(self.registry.collect())
        if self.multiprocess_dir is None:
            return own
        self.publish()
        merged = {metric.name: metric for metric in MultiProcessCollector(None, self.multiprocess_dir).collect()}
        families = []
        for metric in own:
            shared = merged.pop(metric.name, None)
            families.append(metric if shared is None else _bare_counter_samples(shared))
        families.extend(_bare_counter_samples(metric) for metric in merged.values())
        return families

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text format (0.0.4) and its content type."""
        return b"".join(self._rendered_parts()), CONTENT_TYPE_PLAIN_0_0_4

    async def render_paced(self) -> tuple[bytes, str]:
        """`render` on the event loop in slices (ratelimit.pacing): quota gauges are thousands of
        series, ~10 ms to format. In a thread instead, that thread held the interpreter lock for
        milliseconds at a time against every decision."""
        pace = Pace()
        parts = []
        for part in self._rendered_parts():
            parts.append(part)
            if pace.worked_a_slice():
                await pace.rest()
        return b"".join(parts), CONTENT_TYPE_PLAIN_0_0_4

    def _rendered_parts(self) -> Iterator[bytes]:
        """The exposition a piece at a time: a family, or RENDER_LINES lines of one."""
        for metric in self.families():
            if metric.type in ("counter", "gauge"):
                lines = _render_simple(metric, self.total_suffix)
                while chunk := list(itertools.islice(lines, RENDER_LINES)):
                    yield "".join(chunk).encode("utf-8")
            else:
                # Without prometheus_client's `<name>_created` gauges: Limitador has none.
                metric.samples = [s for s in metric.samples if s.name != metric.name + "_created"]
                yield generate_latest(_Single(metric))


RENDER_LINES = 100
"""Lines of one family formatted at a time by `render_paced` (~0.1 ms)."""


_BARE_COUNTERS = frozenset({
    "authorized_calls", "authorized_hits", "limited_calls",
    "datastore_errors", "datastore_counters_lost", "datastore_listing_failures", "datastore_unwritten_hits",
})
"""Counters this module renders under their bare names (Limitador's), whose multiprocess samples
prometheus_client names `<name>_total`."""


def _bare_counter_samples(metric: Metric) -> Metric:
    if metric.type == "counter" and metric.name in _BARE_COUNTERS:
        metric.samples = [sample._replace(name=metric.name) for sample in metric.samples]
    return metric


def _bounded(value: str) -> str:
    return value if len(value) <= MAX_LABEL_VALUE_LENGTH else TOO_LONG_LABEL


@dataclass
class _Single:
    """A one-family collector, to let prometheus_client render the families it renders correctly."""

    metric: Metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def _render_simple(metric: Metric, total_suffix: bool = False) -> Iterator[str]:
    """A counter or gauge family under its own name (no `_total`, unless asked: then named as
    prometheus_client and OpenTelemetry name counters), values as Limitador prints them."""
    suffix = "_total" if total_suffix and metric.type == "counter" else ""
    name = metric.name + suffix
    yield f"# HELP {name} {_escape_help(metric.documentation)}\n"
    yield f"# TYPE {name} {metric.type}\n"
    for sample in metric.samples:
        labels = ",".join(f'{label}="{_escape_label(value)}"' for label, value in sorted(sample.labels.items()))
        label_text = "{" + labels + "}" if labels else ""
        yield f"{sample.name}{suffix}{label_text} {_format_value(sample.value)}\n"


def _format_value(value: float) -> str:
    """Whole numbers without a trailing `.0` (`limitador_up 1`), anything else as Go would print it."""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return floatToGoString(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


T = TypeVar("T")


class TimedStorage(StorageWrapper):
    """Any storage, with each decision's wall time observed into `latency` (`datastore_latency`,
    register it on `Metrics.registry`). One observation per call to the wrapped storage.
    Failures and timeouts are observed too: a slow or
    unreachable Redis is what the histogram is for. Listing counters is not a decision and is
    not timed (a quota scrape would otherwise skew it).

    The service wraps only Redis storages, as Limitador times only its datastore: a memory
    decision is one numba call, where timing would cost as much as the decision and show nothing.
    """

    def __init__(self, storage: Storage, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(storage)
        # Unregistered: the service adds it to its Metrics.registry once that exists.
        self.latency = Histogram("datastore_latency", "Latency to the underlying counter datastore (seconds)",
                                 buckets=buckets, registry=None)

    async def around(self, decision: Awaitable[T]) -> T:
        # The coroutine does nothing until awaited, so the clock starts with the work.
        start = time.perf_counter()
        try:
            return await decision
        finally:
            self.latency.observe(time.perf_counter() - start)


class StorageHealth:
    """A /metrics collector over a storage's plain-data `status` (ratelimit.storage.base.StorageStatus):

    - `datastore_partitioned` (gauge, Limitador's name): 1 while the storage cannot reach Redis;
    - `datastore_errors`: decisions the storage could not answer, answered per --on-storage-error;
    - `datastore_counters_lost`: Redis restarts that came back without the counters (no persistence);
    - `datastore_listing_failures`: counter listings (/counters pages, quota scrapes) that failed;
    - `datastore_unwritten_hits`: hits redis_cached could not write back (full while partitioned, or shutdown).
    A storage without a backend (memory) shows 0 everywhere.

    With `shared` (workers), `publish` writes this process's values to the multiprocess files, so
    a scrape sums the counters over the workers (each has its own Redis connections) and shows
    `datastore_partitioned` 1 while any live worker cannot reach Redis (mode `livemax`: the worst
    worker, and a dead worker's value is dropped, not kept)."""

    _COUNTERS = (
        ("datastore_errors", "Decisions the counter storage could not answer"),
        ("datastore_counters_lost", "Redis restarts that lost every counter (no persistence)"),
        ("datastore_listing_failures", "Counter listings (/counters, quota) that failed"),
        ("datastore_unwritten_hits", "Hits the write-behind cache could not write back to Redis"),
    )

    def __init__(self, storage: Storage, shared: bool = False) -> None:
        self.storage = storage
        self._shared: tuple[Gauge, dict[str, Counter]] | None = None
        self._published: dict[str, int] = {}
        if shared:
            partitioned = Gauge("datastore_partitioned", "1 while the counter storage cannot reach Redis",
                                registry=None, multiprocess_mode="livemax")
            self._shared = partitioned, {name: Counter(name, help_text, registry=None) for name, help_text in self._COUNTERS}
            self.publish()

    def _values(self) -> tuple[int, dict[str, int]]:
        status = self.storage.status
        return 0 if status.reachable else 1, {
            "datastore_errors": status.decision_errors,
            "datastore_counters_lost": status.counters_lost,
            "datastore_listing_failures": status.listing_failures,
            "datastore_unwritten_hits": status.unwritten_hits,
        }

    def publish(self) -> None:
        """Write the values to this process's multiprocess files (a counter by what it grew since)."""
        if self._shared is None:
            return
        partitioned, counters = self._shared
        gauge, values = self._values()
        partitioned.set(gauge)
        for name, value in values.items():
            grown = value - self._published.get(name, 0)
            if grown > 0:
                counters[name].inc(grown)
                self._published[name] = value

    def collect(self) -> list[Metric]:
        gauge, values = self._values()
        partitioned = Metric("datastore_partitioned", "1 while the counter storage cannot reach Redis", "gauge")
        partitioned.add_sample("datastore_partitioned", {}, gauge)
        families = [partitioned]
        for name, help_text in self._COUNTERS:
            family = Metric(name, help_text, "counter")
            family.add_sample(name, {}, values[name])
            families.append(family)
        return families
