"""numba kernels over the in-memory counter table.

The table is one int64 array of rows, one row per counter: [value, expires_at_ms, reserved, limit_no].
`limit_no` is -1 for a free row. The limits table holds [max_value, window_ms] per limit number, so a
reload that changes max_value updates one cell instead of every counter.

A decision covers a batch of requests. The counters of one kind of request (a *plan*) are
`rows[starts[p]:ends[p]]` with their `limit_nos`; request r uses plan `plans[r]`, so a batch of a
million requests over ten thousand users is one small int array, not a million row lists.
Requests are decided in order, each atomically, exactly as if they had come one after another.
A row of -1 is a counter that is not in the table yet (read-only checks never add one).
"""

from __future__ import annotations

import numpy as np
from numba import njit

VALUE, EXPIRES_AT, RESERVED, LIMIT_NO = 0, 1, 2, 3
ROW_WIDTH = 4
MAX_VALUE, WINDOW_MS = 0, 1

CHECK_AND_UPDATE, CHECK, UPDATE, RESERVE = 0, 1, 2, 3


@njit(cache=True, nogil=True)
def decide(
    table: np.ndarray,
    limits: np.ndarray,
    rows: np.ndarray,
    limit_nos: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    plans: np.ndarray,
    deltas: np.ndarray,
    mode: int,
    now_ms: int,
    first_limited: np.ndarray,
) -> None:
    """Decide every request; first_limited[r] is the index (within request r's plan) of the first
    counter that would exceed its limit, or -1. CHECK_AND_UPDATE and RESERVE change nothing for a
    limited request; UPDATE charges regardless; CHECK never changes anything."""
    for r in range(plans.shape[0]):
        start, end = starts[plans[r]], ends[plans[r]]
        delta = deltas[r]
        first = -1
        for i in range(start, end):
            row = rows[i]
            used = 0
            held = 0
            if row >= 0:
                if table[row, EXPIRES_AT] > now_ms:
                    used = table[row, VALUE]
                held = table[row, RESERVED]
            if used + held + delta > limits[limit_nos[i], MAX_VALUE]:
                first = i - start
                break
        first_limited[r] = first
        if mode == CHECK or (first >= 0 and mode != UPDATE):
            continue
        for i in range(start, end):
            row = rows[i]
            if mode == RESERVE:
                table[row, RESERVED] += delta
            elif delta > 0:
                if table[row, EXPIRES_AT] <= now_ms:
                    # A new window starts at the counter's first hit (Limitador's fixed window).
                    table[row, VALUE] = delta
                    table[row, EXPIRES_AT] = now_ms + limits[limit_nos[i], WINDOW_MS]
                else:
                    table[row, VALUE] += delta


@njit(cache=True, nogil=True)
def release(table: np.ndarray, rows: np.ndarray, amount: int) -> None:
    """Give back a reservation's hold on its rows."""
    for i in range(rows.shape[0]):
        table[rows[i], RESERVED] -= amount


@njit(cache=True, nogil=True)
def reclaimable_rows(table: np.ndarray, used: int, now_ms: int) -> tuple[np.ndarray, int]:
    """Rows whose window is over and that hold no reservation, and the earliest future expiry among
    the rest (so the caller knows when sweeping again could free anything)."""
    found = np.empty(used, dtype=np.int64)
    count = 0
    next_expiry = np.iinfo(np.int64).max
    for row in range(used):
        if table[row, LIMIT_NO] < 0:
            continue
        if table[row, EXPIRES_AT] <= now_ms and table[row, RESERVED] == 0:
            found[count] = row
            count += 1
        elif table[row, EXPIRES_AT] < next_expiry:
            next_expiry = table[row, EXPIRES_AT]
    return found[:count], next_expiry


@njit(cache=True, nogil=True)
def live_rows(table: np.ndarray, used: int, wanted_limits: np.ndarray, now_ms: int) -> np.ndarray:
    """Rows of the wanted limit numbers (a bool mask over limit numbers) whose window is running or
    that hold a reservation."""
    found = np.empty(used, dtype=np.int64)
    count = 0
    for row in range(used):
        limit_no = table[row, LIMIT_NO]
        if limit_no < 0 or limit_no >= wanted_limits.shape[0] or not wanted_limits[limit_no]:
            continue
        if table[row, EXPIRES_AT] > now_ms or table[row, RESERVED] > 0:
            found[count] = row
            count += 1
    return found[:count]


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, with the argument types the storage
    uses, so the first real decision does not take long enough to miss Envoy's RLS timeout."""
    table = np.zeros((1, ROW_WIDTH), dtype=np.int64)
    table[:, LIMIT_NO] = -1
    limits = np.zeros((1, 2), dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    one = np.zeros(1, dtype=np.int64)
    decide(table, limits, none, none, one, one, none, none, CHECK, 0, none)
    release(table, none, 0)
    reclaimable_rows(table, 1, 0)
    live_rows(table, 1, np.zeros(1, dtype=np.bool_), 0)
