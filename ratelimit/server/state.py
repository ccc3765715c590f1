"""What the servers share: one engine, the config status, the metrics and the service options.

The HTTP API and the gRPC servers are thin adapters over this object; they run on one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics
from ratelimit.sources.status import ConfigStatus


@dataclass
class ServiceOptions:
    rate_limit_headers: bool = False
    """Add draft-03 X-RateLimit-* headers (`-H DRAFT_VERSION_03`)."""
    openai_errors: bool = False
    """Answer OVER_LIMIT with an OpenAI-shaped JSON error and Retry-After (`--openai-errors`), which
    Envoy's rate-limit filter sends in its 429 (the ext_proc token meter always does)."""
    api_token: str | None = None
    """When set, every HTTP endpoint but /metrics, /status and /ready needs `Authorization: Bearer <token>`."""


@dataclass
class Service:
    engine: RateLimiter
    metrics: Metrics
    status: ConfigStatus
    options: ServiceOptions = field(default_factory=ServiceOptions)
