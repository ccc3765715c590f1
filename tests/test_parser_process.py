"""The parser child: idle between and early in calls, boosted when a call is long; a cancelled
call costs the child, never the next call's answer."""

from __future__ import annotations

import asyncio
import operator
import os
import resource
import subprocess
import sys
import time

import pytest

from ratelimit.sources import parser_process
from ratelimit.sources.limits_file import load_limits_file_contents
from ratelimit.sources.parser_process import NICENESS, ParserProcess, idle_policy, idle_policy_allowed

idle_scheduling = pytest.mark.skipif(idle_policy(NICENESS) is None,
                                     reason="SCHED_IDLE is Linux's, and leaving it needs root or RLIMIT_NICE")


@idle_scheduling
async def test_the_parser_child_runs_idle_and_is_boosted_while_a_call_takes_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between calls and for the first BOOST_AFTER_SECONDS of a call the child runs SCHED_IDLE (a
    service thread that wakes up on its core takes the core at once). A call still unanswered then
    runs under the normal policy, still niced (a saturated service must still apply its reloads),
    and once it has answered the child is idle again."""
    monkeypatch.setattr(parser_process, "BOOST_AFTER_SECONDS", 0.2)
    policies: list[int | None] = []
    set_policy = parser_process._set_policy

    def recorded(pid: int, policy: int | None) -> None:
        policies.append(policy)
        set_policy(pid, policy)

    monkeypatch.setattr(parser_process, "_set_policy", recorded)
    parser = ParserProcess()
    try:
        await parser.call(time.sleep, 0)  # started (importing may take long enough for a boost)
        policies.clear()
        pid = parser.pid
        assert pid is not None
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, pid) == NICENESS
        await parser.call(time.sleep, 0.05)  # answered in time: never boosted
        assert policies == [] and os.sched_getscheduler(pid) == os.SCHED_IDLE
        long_call = asyncio.ensure_future(parser.call(time.sleep, 1.0))
        await asyncio.sleep(0.6)
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, pid) == NICENESS
        assert await long_call is None
        assert policies == [os.SCHED_OTHER, os.SCHED_IDLE] and os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        await parser.stop()


def test_idle_scheduling_only_where_the_child_can_be_boosted_out_of_it() -> None:
    """An unprivileged service (the image runs as uid 10001) may not move a child out of
    SCHED_IDLE unless RLIMIT_NICE allows the child's niceness: it keeps the child only niced."""
    assert idle_policy_allowed(10, euid=0, nice_limit=0)
    assert not idle_policy_allowed(10, euid=10001, nice_limit=0)
    assert not idle_policy_allowed(10, euid=10001, nice_limit=9)
    assert idle_policy_allowed(10, euid=10001, nice_limit=10)
    assert idle_policy_allowed(10, euid=10001, nice_limit=resource.RLIM_INFINITY)


async def test_a_cancelled_call_never_hands_its_answer_to_the_next_call() -> None:
    """The watcher's poll is cancelled (the service stops, a reload times out) while the child
    parses: that child would still answer. The next call gets its own answer, from a new child."""
    parser = ParserProcess()
    try:
        await parser.call(time.sleep, 0)
        first = parser.pid
        abandoned = asyncio.ensure_future(parser.call(operator.add, "abandoned", ""))
        await asyncio.sleep(0)  # sent
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert await parser.call(operator.add, 1, 2) == 3
        assert parser.pid != first
    finally:
        await parser.stop()


def _limits_file(count: int) -> dict[str, bytes]:
    text = "".join(f"- {{namespace: ns-{i % 50}, name: limit-{i}, max_value: {100 + i}, seconds: 60,"
                   f" conditions: [\"descriptors[0]['tier'] == 't{i}'\"], variables: [\"descriptors[0]['user']\"]}}\n"
                   for i in range(count))
    return {"limits.yaml": text.encode()}


@idle_scheduling
async def test_a_reload_is_parsed_while_every_core_is_busy() -> None:
    """The fault SCHED_IDLE invites: a service saturating every core. Under SCHED_IDLE alone the
    child would get next to no CPU (a 2,000-limit parse took minutes); boosted after
    BOOST_AFTER_SECONDS it parses at its niced share, and the reload is applied within seconds."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    parser = ParserProcess()
    try:
        await parser.call(time.sleep, 0)  # started before the cores are taken
        limits = await asyncio.wait_for(parser.call(load_limits_file_contents, _limits_file(2000)), timeout=60)
        assert len(limits) == 2000
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        await parser.stop()
