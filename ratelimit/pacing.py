"""Pacing of control-plane work that shares the event loop with decisions.

Listing counters, summarizing them for quota gauges and the like run in chunks of about a
millisecond. Yielding between chunks with `sleep(0)` is not enough: a walk that starts its next
chunk at once keeps the loop ~100% busy, and a decision, which needs several turns of the loop
(the gRPC read, the handler, the reply), waits behind one chunk at every turn; at a few hundred
decisions a second they queue up for hundreds of milliseconds. A `Pace` rests after each chunk
for as long as the chunk worked (scaled by `share`), so control-plane work takes at most its
share of the loop and decisions always find it free most of the time.
"""

from __future__ import annotations

import asyncio
import time

CONTROL_PLANE_SHARE = 0.5
"""At most this fraction of the event loop's time goes to one control-plane walk."""
SLICE_SECONDS = 0.0003
"""How long work that can stop anywhere (one item at a time) runs before it rests: a decision
that arrives meanwhile waits at most this long at each of its turns of the loop."""


class Pace:
    """`await pace.rest()` between chunks of one piece of work (a page walk, a summary)."""

    def __init__(self, share: float = CONTROL_PLANE_SHARE) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._rest_per_work = (1 - share) / share
        self._since = time.perf_counter()

    def worked_a_slice(self) -> bool:
        """For work done item by item: has it run SLICE_SECONDS since it last rested?"""
        return time.perf_counter() - self._since >= SLICE_SECONDS

    def begin(self) -> None:
        """Work starts now (for work resumed by a callback, not by `rest`)."""
        self._since = time.perf_counter()

    def rest_seconds(self) -> float:
        """How long to rest after the work since the last rest (or `begin`)."""
        return (time.perf_counter() - self._since) * self._rest_per_work

    async def rest(self) -> None:
        await asyncio.sleep(self.rest_seconds())
        self.begin()
