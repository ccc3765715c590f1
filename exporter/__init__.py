"""Quota and model-catalog metrics for the rate limiter, in the service (`--quota-metrics`) or
standalone (`ratelimit-exporter`, reading the shared Redis once for all replicas).

Not part of the core: the engine and storages know nothing of this package.
"""
