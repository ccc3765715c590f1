"""The parser child's scheduling: idle between and early in calls, boosted when a call is long."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from ratelimit.sources import parser_process
from ratelimit.sources.parser_process import NICENESS, ParserProcess

pytestmark = pytest.mark.skipif(parser_process.IDLE_POLICY is None, reason="SCHED_IDLE is Linux's")


async def test_the_parser_child_runs_idle_and_is_boosted_while_a_call_takes_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between calls and for the first BOOST_AFTER_SECONDS of a call the child runs SCHED_IDLE (a
    service thread that wakes up on its core takes the core at once). A call still unanswered then
    runs under the normal policy, still niced (a saturated service must still apply its reloads),
    and once it has answered the child is idle again."""
    monkeypatch.setattr(parser_process, "BOOST_AFTER_SECONDS", 0.2)
    parser = ParserProcess()
    try:
        await parser.call(time.sleep, 0)  # started, its policy set
        pid = parser.pid
        assert pid is not None
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, pid) == NICENESS
        await parser.call(time.sleep, 0.05)  # answered in time: never boosted
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        long_call = asyncio.ensure_future(parser.call(time.sleep, 1.0))
        await asyncio.sleep(0.6)
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, pid) == NICENESS
        assert await long_call is None
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        await parser.stop()
