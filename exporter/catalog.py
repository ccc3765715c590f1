"""The model catalog: `ratelimit_model_info{limitador_namespace, model, kind, provider} 1`.

Dashboards join on this series to tell external models from GPU-served ones, instead of matching
route names (`maas-<name>`, `<name>`, `*-kserve-route` all occur upstream). It is read from the
Kubernetes objects that define the routes, or from a small models file, by the MaaS route-naming
rules of `ratelimit.sources.maas_naming`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from ratelimit.sources.maas_naming import ModelEntry


class CatalogCollector:
    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self.entries = list(entries)

    def collect(self) -> list[Metric]:
        metric = Metric("ratelimit_model_info", "Models behind each rate-limited route (1 per model)", "gauge")
        for entry in self.entries:
            metric.add_sample(metric.name, {"limitador_namespace": entry.limitador_namespace, "model": entry.model,
                                            "kind": entry.kind, "provider": entry.provider}, 1)
        return [metric]
