"""The `-L` custom metric labels file as a file watcher loads it (ratelimit.sources.limits_file).

A module of its own, apart from the server: the watcher's parser process imports what the loader
needs, and this needs only the metrics' label parser, not the service (grpc, numba, FastAPI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ratelimit.limits import LimitsError
from ratelimit.metrics import MetricLabelsError, parse_custom_labels
from ratelimit.sources.limits_file import single_file_text


def load_custom_labels_contents(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The labels of a one-file `-L` content; LimitsError (file, what is wrong) when invalid."""
    source, text = single_file_text(files)
    try:
        return parse_custom_labels(text, source)
    except MetricLabelsError as exc:
        message = str(exc)
        raise LimitsError(source, message.removeprefix(f"{source}: ")) from None
