"""What the servers share: one engine, the config status, the metrics and the service options.

The HTTP API and the gRPC servers are thin adapters over this object; they run on one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class ConfigStatus:
    """Limitador's `/status` fields, plus the last reload error so operators see *why*."""

    source: str
    started_at: datetime = field(default_factory=_utcnow)
    config_applied_at: datetime | None = None
    config_version: int = 0
    """Goes up on every successful (re)load."""
    config_err_since: int = 0
    """Failed reloads since the last successful one (Limitador's counter)."""
    last_error: str | None = None

    def applied(self) -> None:
        self.config_applied_at = _utcnow()
        self.config_version += 1
        self.config_err_since = 0
        self.last_error = None

    def failed(self, error: str) -> None:
        self.config_err_since += 1
        self.last_error = error


@dataclass
class ServiceOptions:
    rate_limit_headers: bool = False
    """Add draft-03 X-RateLimit-* headers (`-H DRAFT_VERSION_03`)."""
    openai_errors: bool = False
    """Answer OVER_LIMIT with an OpenAI-shaped JSON error and Retry-After (`--openai-errors`), which
    Envoy's rate-limit filter sends in its 429 (the ext_proc token meter always does)."""
    api_token: str | None = None
    """When set, every HTTP endpoint but /metrics and /status needs `Authorization: Bearer <token>`."""


@dataclass
class Service:
    engine: RateLimiter
    metrics: Metrics
    status: ConfigStatus
    options: ServiceOptions = field(default_factory=ServiceOptions)
