"""Work the servers start without awaiting it (its own module: the gRPC server and the token meter share it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

_running: set[asyncio.Future[Any]] = set()


def run_in_background(work: Awaitable[Any]) -> None:
    """Run a coroutine without awaiting it, holding a reference so it is not collected midway."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
