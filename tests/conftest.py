"""Loads the shared fixtures for every test (the modules named in `pytest_plugins`), runs the async
tests on asyncio, and keeps each phase's report on the test item so fixtures can tell whether their
test failed.

Helpers are imported from those modules and from tests/support.py, never from this file.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

pytest_plugins = [
    "tests.service_fixtures",
    "tests.redis_fixtures",
    "tests.envoy_fixtures",
    "tests.prometheus_fixtures",
]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """`async def` tests (anyio_mode = "auto" in pyproject.toml) run on asyncio, as the service does;
    anyio's own default would run each once more on trio wherever trio is installed."""
    return "asyncio"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
