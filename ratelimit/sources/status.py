"""The outcome of loading limits, as the sources record it and the servers show it (`/status`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


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
