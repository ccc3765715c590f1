"""Plain helpers the tests share: the repository's paths and polling with a deadline.

Fixtures live in the `*_fixtures.py` modules beside this one, which tests/conftest.py loads for
every test through `pytest_plugins`; tests import classes and helpers from those modules and from
here, never from a conftest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

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
