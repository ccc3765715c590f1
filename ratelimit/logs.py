"""One log pipeline for the service: ours, uvicorn's and Python warnings, in one format.

Limitador logs through `tracing-subscriber`: plain lines by default, JSON lines with
`--structured-logs`. Here every record, whatever library made it (uvicorn's `uvicorn.error` and
`uvicorn.access`, asyncio, numba's warnings), goes through the root logger's single handler, so
`--structured-logs` really means "only JSON lines". The JSON shape is tracing-subscriber's
(`timestamp`, `level`, `fields.message`, `target`), so log queries written for Limitador work.

Levels: Limitador's `-v` count (none: errors only, -v warn, -vv info, -vvv debug, -vvvv trace) or,
without `-v`, `RUST_LOG`'s most verbose level (its `max_level_hint`). Python has no TRACE level:
trace logs as DEBUG, plus uvicorn's access log.

Operator events log at INFO whatever the level (but `off`): the start (version, limits file,
addresses, settings the command line overrode; Limitador prints its version line with `eprintln!`),
every reload of the limits or labels file, and counter-storage state changes (Redis lost, back).
They are the loggers in `EVENT_LOGGERS`; their debug lines still need -vvv.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

LEVELS = ("off", "error", "warning", "info", "debug", "trace")
"""Level names, least verbose first: `-v` counts from "error" (index 1)."""

_PYTHON_LEVELS = {
    "off": logging.CRITICAL + 10, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
    "debug": logging.DEBUG, "trace": logging.DEBUG,
}

# RUST_LOG's level words (tracing's LevelFilter), case-insensitive.
_RUST_LEVELS = {"off": "off", "error": "error", "warn": "warning", "info": "info", "debug": "debug", "trace": "trace"}

# tracing-subscriber's level names.
_TRACING_LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}

STARTUP = logging.getLogger("ratelimit.startup")
"""Messages every operator should see once at start."""

EVENT_LOGGERS = (
    "ratelimit.startup", "ratelimit.server.app", "ratelimit.server.grpc", "ratelimit.sources.limits_file",
    "ratelimit.storage.redis", "ratelimit.storage.redis_cached",
)
"""Loggers whose INFO records are shown at any level but `off` (see the module's docstring)."""

# Fields of a LogRecord that are not extra fields given with `extra=` (uvicorn's `color_message` is
# its message again, with terminal colours).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def verbosity_level(count: int) -> str:
    """Limitador's `-v` count as a level name."""
    return LEVELS[min(1 + count, len(LEVELS) - 1)]


def rust_log_level(value: str) -> str:
    """The most verbose level an `RUST_LOG` / EnvFilter value enables, as tracing's `max_level_hint`
    computes it: directives are comma-separated `level`, `target=level` or a bare `target` (which
    enables everything for that target, i.e. trace). Raises ValueError naming a bad directive."""
    most = 0
    for directive in value.split(","):
        directive = directive.strip()
        if not directive:
            continue
        target, _, level = directive.rpartition("=")
        if not target and directive.lower() not in _RUST_LEVELS:
            # A bare word that is not a level is a target: `RUST_LOG=limitador` means trace for it.
            level = "trace"
        name = _RUST_LEVELS.get(level.strip().lower())
        if name is None:
            raise ValueError(
                f"directive {directive!r}: level must be one of {', '.join(_RUST_LEVELS)}, got {level!r}"
            )
        most = max(most, LEVELS.index(name))
    return LEVELS[most]


class TextFormatter(logging.Formatter):
    """`2026-12-01T22:10:00.123456Z  INFO ratelimit.server.app: message` (tracing-subscriber's layout)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {_level(record):>5} {record.name}: {record.getMessage()}"
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{key}={value}" for key, value in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with tracing-subscriber's JSON fields; an exception's traceback is
    a field, so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage(), **_extra_fields(record)}
        if record.exc_info:
            fields["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        entry = {"timestamp": _timestamp(record), "level": _level(record), "fields": fields, "target": record.name}
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, structured: bool = False, stream: IO[str] | None = None) -> None:
    """Route every logger through one handler on `stream` (stderr), at `level` (a LEVELS name).

    Called once, before any server starts. uvicorn must be given `log_config=None, log_level=None`
    so it adds no handler and sets no level of its own; its loggers then propagate here.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if structured else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(_PYTHON_LEVELS[level])
    for name in _library_loggers():
        library = logging.getLogger(name)
        for existing in list(library.handlers):
            library.removeHandler(existing)
        library.propagate = True
        library.setLevel(logging.NOTSET)
    # numba's debug output is its compiler's bytecode dumps: only its warnings concern an operator.
    logging.getLogger("numba").setLevel(logging.WARNING)
    # A request log line per request only at trace (-vvvv), as Limitador's per-request spans.
    logging.getLogger("uvicorn.access").setLevel(logging.DEBUG if level == "trace" else logging.CRITICAL + 10)
    for name in EVENT_LOGGERS:
        logging.getLogger(name).setLevel(min(logging.INFO, _PYTHON_LEVELS[level]) if level != "off" else logging.NOTSET)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    sys.excepthook = _log_uncaught


def _library_loggers() -> Iterator[str]:
    yield from ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "py.warnings", "numba", "grpc")


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    logging.getLogger("ratelimit").critical("uncaught exception", exc_info=(kind, value, tb))


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _level(record: logging.LogRecord) -> str:
    return _TRACING_LEVEL_NAMES.get(record.levelname, record.levelname)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS}
