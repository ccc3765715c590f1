"""Plain helpers the tests share: the repository's paths and polling with a deadline.

Async tests are plain `async def test_...` functions, run by anyio's pytest plugin
(`anyio_mode = "auto"` in pyproject.toml), one event loop per test. The exceptions say why: `OwnLoop`
below, for hypothesis state machines, whose rules cannot be coroutines; a test that counts every task
of its loop, which runs on a loop of its own; and worker threads and processes, which run their own.

Fixtures live in the `*_fixtures.py` modules beside this one, which tests/conftest.py loads for
every test through `pytest_plugins`; tests import classes and helpers from those modules and from
here, never from a conftest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ratelimit.storage.table import Layout, shm_free_bytes

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(interval)


class OwnLoop:
    """An event loop kept across synchronous calls, for a hypothesis state machine: its rules are
    plain methods that each await one storage call, and the storage's connections and background
    tasks must stay on one loop from rule to rule (a fresh loop per call, as asyncio.run makes, would
    strand them). Close it in the machine's teardown."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.loop.close()


def capacity_dev_shm_has_no_room_for() -> int:
    """A memory-table capacity whose shared block is bigger than what /dev/shm has free (skips the
    test when even the largest table would fit)."""
    free = shm_free_bytes()
    assert free is not None
    capacity = 1 << 16
    while Layout.for_capacity(capacity).offsets()[1] * 8 <= free and capacity < 1 << 29:
        capacity *= 2
    if Layout.for_capacity(capacity).offsets()[1] * 8 <= free:
        pytest.skip(f"/dev/shm has {free:,} bytes free: more than the largest table")
    return capacity
