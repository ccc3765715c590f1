"""The exporter's collectors as extensions of the service's /metrics (`ratelimit serve --quota-metrics`,
`--model-catalog`). pyproject.toml declares them as entry points of the group
ratelimit.server.app.METRICS_EXTENSIONS, so the service finds them without importing the exporter."""

from __future__ import annotations

from exporter.service import install_model_catalog, install_quota_metrics
from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics
from ratelimit.server.app import ServiceConfig


def quota_metrics(metrics: Metrics, engine: RateLimiter, config: ServiceConfig) -> None:
    """Quota gauges over the engine's counters, labelled by the service's `-L` labels (and their reloads)."""
    install_quota_metrics(metrics, engine, metrics.custom_labels)


def model_catalog(metrics: Metrics, engine: RateLimiter, config: ServiceConfig) -> None:
    """`ratelimit_model_info` from the `--model-catalog` files; raises CatalogError when one is invalid."""
    install_model_catalog(metrics, config.model_catalog)
