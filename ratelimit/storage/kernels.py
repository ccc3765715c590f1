"""numba kernels over the counter table: one flat byte block, private or in shared memory.

Everything a decision needs lives in that block, so worker processes that map the same block
decide exactly as one process would. The block starts with a header of int64 words (the lock,
sizes, byte offsets of the regions below, free lists, refusal counts) followed by:

- rows          int64 [capacity, ROW_WIDTH]: value, expires_at_ms, reserved, limit_no, hash, key.
                `key` packs (first key block << 32) | key length; a free row has limit_no -1 and
                the next free row in `value`.
- index         int32 [index_slots]: open addressing, linear probing, row + 1 (0 = empty), deleted
                by backward shift (no tombstones). Slots are a power of two, at least 2x capacity.
- block_next    int32 [key_blocks]: the next block of a key (-1 = last), or the next free block.
- block_data    uint8 [key_blocks, BLOCK_BYTES]: the counter keys' bytes (the variable values),
                so listing recovers every key without a Python object per counter.
- limits        int64 [limit_slots, LIMIT_WIDTH]: a limit identity's 128-bit hash, its window,
                its state; open addressing on the hash, the slot number is the limit number.
- reservations  int64 [reservation_slots, RES_WIDTH]: tag (0 = free), amount, expiry, first hold.
- holds         int64 [hold_slots, 2]: the rows a reservation holds, as a chain.
- heap          int64 [heap_slots, 3]: reservation expiries, a binary min-heap with lazy deletion.

Every public kernel takes the lock word first and gives it back before returning; if another
holder keeps it past a bounded spin, the kernel returns BUSY and the caller retries (see memory.py),
so no kernel ever waits unboundedly with the lock held by a dead process.

Decisions are all-or-nothing over a request's counters: rows are found (or, when something will be
charged, added after making sure there is room for all of them), checked, then charged.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ratelimit.storage.atomics import compare_and_swap, load_acquire, store_release

# -- layout ----------------------------------------------------------------------------------------

MAGIC = 0x52_4C_54_41_42_4C_45_31  # "RLTABLE1"
HEADER_WORDS = 64
BLOCK_BYTES = 32
ROW_WIDTH = 6
VALUE, EXPIRES_AT, RESERVED, LIMIT_NO, HASH, KEY = range(ROW_WIDTH)
LIMIT_WIDTH = 5
ID_HIGH, ID_LOW, WINDOW_MS, STATE, RETIRED_UNTIL = range(LIMIT_WIDTH)
LIMIT_FREE, LIMIT_ACTIVE, LIMIT_RETIRED = 0, 1, 2
RES_WIDTH = 5
TAG, AMOUNT, RES_EXPIRES, FIRST_HOLD, NEXT_FREE = range(RES_WIDTH)
HOLD_ROW, HOLD_NEXT = 0, 1
HEAP_EXPIRES, HEAP_SLOT, HEAP_TAG = 0, 1, 2

# Header words.
H_MAGIC = 0
H_LOCK = 1
H_CAPACITY = 2
H_INDEX_SLOTS = 3
H_KEY_BLOCKS = 4
H_LIMIT_SLOTS = 5
H_RES_SLOTS = 6
H_HOLD_SLOTS = 7
H_HEAP_SLOTS = 8
H_OFF_ROWS = 9
H_OFF_INDEX = 10
H_OFF_BLOCK_NEXT = 11
H_OFF_BLOCK_DATA = 12
H_OFF_LIMITS = 13
H_OFF_RES = 14
H_OFF_HOLDS = 15
H_OFF_HEAP = 16
H_TOTAL_BYTES = 17
H_ROWS_USED = 18  # rows below this mark have been handed out at least once
H_FREE_ROW = 19
H_FREE_ROWS = 20
H_LIVE_ROWS = 21
H_BLOCKS_USED = 22
H_FREE_BLOCK = 23
H_FREE_BLOCKS = 24
H_RES_USED = 25
H_FREE_RES = 26
H_LIVE_RES = 27
H_HOLDS_USED = 28
H_FREE_HOLD = 29
H_FREE_HOLDS = 30
H_HEAP_COUNT = 31
H_SWEEP_CURSOR = 32
H_NEXT_RECLAIM = 33  # no row can be reclaimed before this time (a lower bound)
H_CYCLE_MIN = 34  # the earliest reclaim time seen by the sweep cycle under way
H_LIMITS_USED = 35
H_LOCK_BUSY = 36  # times a caller found the lock taken past its spin (contention)
H_LOCK_STOLEN = 37  # times the lock was taken over from a dead holder
H_REFUSED_ROWS = 40  # refusals by reason: no row for a new counter
H_REFUSED_KEY_BYTES = 41  # no key blocks left for a new counter's key
H_REFUSED_RESERVATIONS = 42  # no reservation slot or holds left
H_FREED_ROWS = 43  # rows reclaimed so far (expired, idle for a window)
REFUSAL_REASONS = {"rows": H_REFUSED_ROWS, "key_bytes": H_REFUSED_KEY_BYTES, "reservations": H_REFUSED_RESERVATIONS}

# Decision modes and result codes (result[0]: >= 0 is the index of the first counter without room).
CHECK_AND_UPDATE, CHECK, UPDATE, RESERVE, COMMIT = range(5)
WITHIN = -1
FULL_ROWS = -2
FULL_KEY_BYTES = -3
FULL_RESERVATIONS = -4
BUSY = -5
# result layout: code, reservation slot, reservation held (commit), rows freed (sweep)
R_CODE, R_SLOT, R_HELD, R_FREED = 0, 1, 2, 3
RESULT_WORDS = 4
# states (per counter of a decision): row, value in the running window, expires_at_ms, reserved
S_ROW, S_VALUE, S_EXPIRES, S_RESERVED = range(4)
STATE_WIDTH = 4

SPINS = 200_000  # about a millisecond of spinning before handing the wait back to Python
SWEEP_CHUNK = 1 << 16  # rows a decision scans at most when it needs room (well under a millisecond)
NEVER = np.iinfo(np.int64).max


@njit(cache=True, nogil=True, inline="always")
def _header(buf: np.ndarray) -> np.ndarray:
    return buf[: HEADER_WORDS * 8].view(np.int64)


@njit(cache=True, nogil=True)
def _views(buf: np.ndarray):  # type: ignore[no-untyped-def]
    header = buf[: HEADER_WORDS * 8].view(np.int64)
    capacity = header[H_CAPACITY]
    o = header[H_OFF_ROWS]
    rows = buf[o : o + capacity * ROW_WIDTH * 8].view(np.int64).reshape((capacity, ROW_WIDTH))
    o = header[H_OFF_INDEX]
    index = buf[o : o + header[H_INDEX_SLOTS] * 4].view(np.int32)
    o = header[H_OFF_BLOCK_NEXT]
    block_next = buf[o : o + header[H_KEY_BLOCKS] * 4].view(np.int32)
    o = header[H_OFF_BLOCK_DATA]
    block_data = buf[o : o + header[H_KEY_BLOCKS] * BLOCK_BYTES].reshape((header[H_KEY_BLOCKS], BLOCK_BYTES))
    o = header[H_OFF_LIMITS]
    limits = buf[o : o + header[H_LIMIT_SLOTS] * LIMIT_WIDTH * 8].view(np.int64).reshape(
        (header[H_LIMIT_SLOTS], LIMIT_WIDTH))
    o = header[H_OFF_RES]
    reservations = buf[o : o + header[H_RES_SLOTS] * RES_WIDTH * 8].view(np.int64).reshape(
        (header[H_RES_SLOTS], RES_WIDTH))
    o = header[H_OFF_HOLDS]
    holds = buf[o : o + header[H_HOLD_SLOTS] * 2 * 8].view(np.int64).reshape((header[H_HOLD_SLOTS], 2))
    o = header[H_OFF_HEAP]
    heap = buf[o : o + header[H_HEAP_SLOTS] * 3 * 8].view(np.int64).reshape((header[H_HEAP_SLOTS], 3))
    return header, rows, index, block_next, block_data, limits, reservations, holds, heap


# -- the lock --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _lock(header: np.ndarray, pid: int) -> bool:
    for _ in range(SPINS):
        if header[H_LOCK] == 0 and compare_and_swap(header, H_LOCK, 0, pid) == 0:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _unlock(header: np.ndarray) -> None:
    store_release(header, H_LOCK, 0)


@njit(cache=True, nogil=True)
def lock_holder(buf: np.ndarray) -> int:
    return load_acquire(_header(buf), H_LOCK)


@njit(cache=True, nogil=True)
def steal_lock(buf: np.ndarray, dead_pid: int, pid: int) -> bool:
    """Take the lock over from a holder that is known to be dead, then give it back."""
    header = _header(buf)
    if compare_and_swap(header, H_LOCK, dead_pid, pid) != dead_pid:
        return False
    header[H_LOCK_STOLEN] += 1
    _unlock(header)
    return True


@njit(cache=True, nogil=True)
def note_busy(buf: np.ndarray) -> None:
    """Count one wait for the lock (the caller retries); an approximate figure, so no lock."""
    header = _header(buf)
    header[H_LOCK_BUSY] += 1


# -- keys and the index ----------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def key_hash(limit_no: int, keys: np.ndarray, start: int, end: int) -> int:
    """FNV-1a over the key bytes, seeded with the limit number, through a splitmix64 finalizer."""
    h = np.uint64(0xCBF29CE484222325) ^ np.uint64(limit_no)
    prime = np.uint64(0x100000001B3)
    for i in range(start, end):
        h = (h ^ np.uint64(keys[i])) * prime
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return np.int64(h)


@njit(cache=True, nogil=True)
def _key_equals(rows, block_next, block_data, row, keys, start, end):  # type: ignore[no-untyped-def]
    packed = rows[row, KEY]
    length = packed & 0xFFFFFFFF
    if length != end - start:
        return False
    block = packed >> 32
    i = start
    while i < end:
        data = block_data[block]
        stop = min(end, i + BLOCK_BYTES)
        for j in range(i, stop):
            if data[j - i] != keys[j]:
                return False
        i = stop
        block = block_next[block]
    return True


@njit(cache=True, nogil=True)
def _find(rows, index, block_next, block_data, limit_no, h, keys, start, end):  # type: ignore[no-untyped-def]
    mask = index.shape[0] - 1
    slot = h & mask
    while True:
        entry = index[slot]
        if entry == 0:
            return -1
        row = entry - 1
        if (rows[row, HASH] == h and rows[row, LIMIT_NO] == limit_no
                and _key_equals(rows, block_next, block_data, row, keys, start, end)):
            return row
        slot = (slot + 1) & mask


@njit(cache=True, nogil=True)
def _index_insert(index, row, h):  # type: ignore[no-untyped-def]
    mask = index.shape[0] - 1
    slot = h & mask
    while index[slot] != 0:
        slot = (slot + 1) & mask
    index[slot] = row + 1


@njit(cache=True, nogil=True)
def _index_remove(index, rows, row):  # type: ignore[no-untyped-def]
    """Delete by backward shift: later entries of the probe run move up, so lookups need no tombstones."""
    mask = index.shape[0] - 1
    hole = rows[row, HASH] & mask
    while index[hole] != row + 1:
        hole = (hole + 1) & mask
    probe = hole
    while True:
        probe = (probe + 1) & mask
        entry = index[probe]
        if entry == 0:
            break
        home = rows[entry - 1, HASH] & mask
        # The entry may fill the hole unless its home lies cyclically in (hole, probe].
        if hole <= probe:
            stays = hole < home <= probe
        else:
            stays = home > hole or home <= probe
        if not stays:
            index[hole] = entry
            hole = probe
    index[hole] = 0


@njit(cache=True, nogil=True, inline="always")
def blocks_for(length: int) -> int:
    return (length + BLOCK_BYTES - 1) // BLOCK_BYTES


# -- rows ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _free_room(header):  # type: ignore[no-untyped-def]
    rows_free = header[H_CAPACITY] - header[H_ROWS_USED] + header[H_FREE_ROWS]
    blocks_free = header[H_KEY_BLOCKS] - header[H_BLOCKS_USED] + header[H_FREE_BLOCKS]
    return rows_free, blocks_free


@njit(cache=True, nogil=True)
def _allocate_row(header, rows, index, block_next, block_data, limit_no, h, keys, start, end):  # type: ignore[no-untyped-def]
    """A row for a new counter; the caller made sure there is room (rows and key blocks)."""
    if header[H_FREE_ROW] >= 0:
        row = header[H_FREE_ROW]
        header[H_FREE_ROW] = rows[row, VALUE]
        header[H_FREE_ROWS] -= 1
    else:
        row = header[H_ROWS_USED]
        header[H_ROWS_USED] += 1
    length = end - start
    first = -1
    previous = -1
    i = start
    while i < end:
        if header[H_FREE_BLOCK] >= 0:
            block = header[H_FREE_BLOCK]
            header[H_FREE_BLOCK] = block_next[block]
            header[H_FREE_BLOCKS] -= 1
        else:
            block = header[H_BLOCKS_USED]
            header[H_BLOCKS_USED] += 1
        stop = min(end, i + BLOCK_BYTES)
        data = block_data[block]
        for j in range(i, stop):
            data[j - i] = keys[j]
        block_next[block] = -1
        if previous >= 0:
            block_next[previous] = block
        else:
            first = block
        previous = block
        i = stop
    rows[row, VALUE] = 0
    rows[row, EXPIRES_AT] = 0
    rows[row, RESERVED] = 0
    rows[row, LIMIT_NO] = limit_no
    rows[row, HASH] = h
    rows[row, KEY] = (first << 32) | length
    _index_insert(index, row, h)
    header[H_LIVE_ROWS] += 1
    return row


@njit(cache=True, nogil=True)
def _free_row(header, rows, index, block_next, row):  # type: ignore[no-untyped-def]
    _index_remove(index, rows, row)
    block = rows[row, KEY] >> 32
    if (rows[row, KEY] & 0xFFFFFFFF) > 0:
        while block >= 0:
            following = block_next[block]
            block_next[block] = header[H_FREE_BLOCK]
            header[H_FREE_BLOCK] = block
            header[H_FREE_BLOCKS] += 1
            block = following
    rows[row, LIMIT_NO] = -1
    rows[row, EXPIRES_AT] = 0
    rows[row, RESERVED] = 0
    rows[row, HASH] = 0
    rows[row, KEY] = 0
    rows[row, VALUE] = header[H_FREE_ROW]
    header[H_FREE_ROW] = row
    header[H_FREE_ROWS] += 1
    header[H_LIVE_ROWS] -= 1
    header[H_FREED_ROWS] += 1


@njit(cache=True, nogil=True, inline="always")
def _reclaim_at(rows, limits, row):  # type: ignore[no-untyped-def]
    """When a new key may take this row: a counter keeps its row for one window after its window
    ends (so a returning user is never pushed out by new keys), and a held row is never taken."""
    if rows[row, RESERVED] > 0:
        return NEVER
    expires = rows[row, EXPIRES_AT]
    if expires == 0:
        return 0
    return expires + limits[rows[row, LIMIT_NO], WINDOW_MS]


@njit(cache=True, nogil=True, inline="always")
def _note_reclaim_time(header, when):  # type: ignore[no-untyped-def]
    """Keep H_NEXT_RECLAIM and the running cycle's minimum lower bounds of every row's reclaim time."""
    if when < header[H_NEXT_RECLAIM]:
        header[H_NEXT_RECLAIM] = when
    if when < header[H_CYCLE_MIN]:
        header[H_CYCLE_MIN] = when


@njit(cache=True, nogil=True)
def _sweep(header, rows, index, block_next, limits, budget, now):  # type: ignore[no-untyped-def]
    """Free reclaimable rows among the next `budget` rows of the sweep cycle; returns how many."""
    freed = 0
    used = header[H_ROWS_USED]
    cursor = header[H_SWEEP_CURSOR]
    budget = min(budget, used)
    for _ in range(budget):
        row = cursor
        cursor += 1
        if rows[row, LIMIT_NO] >= 0:
            when = _reclaim_at(rows, limits, row)
            if when <= now:
                _free_row(header, rows, index, block_next, row)
                freed += 1
            elif when < header[H_CYCLE_MIN]:
                header[H_CYCLE_MIN] = when
        if cursor >= used:
            # A whole cycle seen: nothing can be reclaimed before the earliest time it found.
            cursor = 0
            header[H_NEXT_RECLAIM] = header[H_CYCLE_MIN]
            header[H_CYCLE_MIN] = NEVER
    header[H_SWEEP_CURSOR] = cursor
    return freed


# -- reservations ----------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _heap_push(heap, header, expires, slot, tag):  # type: ignore[no-untyped-def]
    i = header[H_HEAP_COUNT]
    header[H_HEAP_COUNT] += 1
    while i > 0:
        parent = (i - 1) // 2
        if heap[parent, HEAP_EXPIRES] <= expires:
            break
        heap[i, 0], heap[i, 1], heap[i, 2] = heap[parent, 0], heap[parent, 1], heap[parent, 2]
        i = parent
    heap[i, HEAP_EXPIRES], heap[i, HEAP_SLOT], heap[i, HEAP_TAG] = expires, slot, tag


@njit(cache=True, nogil=True)
def _heap_pop(heap, header):  # type: ignore[no-untyped-def]
    count = header[H_HEAP_COUNT] - 1
    header[H_HEAP_COUNT] = count
    last0, last1, last2 = heap[count, 0], heap[count, 1], heap[count, 2]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= count:
            break
        if child + 1 < count and heap[child + 1, HEAP_EXPIRES] < heap[child, HEAP_EXPIRES]:
            child += 1
        if heap[child, HEAP_EXPIRES] >= last0:
            break
        heap[i, 0], heap[i, 1], heap[i, 2] = heap[child, 0], heap[child, 1], heap[child, 2]
        i = child
    if count > 0:
        heap[i, 0], heap[i, 1], heap[i, 2] = last0, last1, last2


@njit(cache=True, nogil=True)
def _release_reservation(header, rows, limits, reservations, holds, slot):  # type: ignore[no-untyped-def]
    amount = reservations[slot, AMOUNT]
    hold = reservations[slot, FIRST_HOLD]
    while hold >= 0:
        row = holds[hold, HOLD_ROW]
        rows[row, RESERVED] -= amount
        if rows[row, RESERVED] == 0:
            _note_reclaim_time(header, _reclaim_at(rows, limits, row))
        following = holds[hold, HOLD_NEXT]
        holds[hold, HOLD_NEXT] = header[H_FREE_HOLD]
        header[H_FREE_HOLD] = hold
        header[H_FREE_HOLDS] += 1
        hold = following
    reservations[slot, TAG] = 0
    reservations[slot, FIRST_HOLD] = -1
    reservations[slot, NEXT_FREE] = header[H_FREE_RES]
    header[H_FREE_RES] = slot
    header[H_LIVE_RES] -= 1


@njit(cache=True, nogil=True)
def _release_expired(header, rows, limits, reservations, holds, heap, now):  # type: ignore[no-untyped-def]
    while header[H_HEAP_COUNT] > 0 and heap[0, HEAP_EXPIRES] <= now:
        slot, tag = heap[0, HEAP_SLOT], heap[0, HEAP_TAG]
        _heap_pop(heap, header)
        if reservations[slot, TAG] == tag:  # not committed meanwhile (lazy deletion)
            _release_reservation(header, rows, limits, reservations, holds, slot)


@njit(cache=True, nogil=True)
def _reservation_room(header, holds_needed):  # type: ignore[no-untyped-def]
    slots_free = header[H_RES_SLOTS] - header[H_RES_USED] + (header[H_RES_USED] - header[H_LIVE_RES])
    holds_free = header[H_HOLD_SLOTS] - header[H_HOLDS_USED] + header[H_FREE_HOLDS]
    return slots_free > 0 and holds_free >= holds_needed


@njit(cache=True, nogil=True)
def _new_reservation(header, reservations, holds, heap, states, n, amount, expires, tag):  # type: ignore[no-untyped-def]
    if header[H_FREE_RES] >= 0:
        slot = header[H_FREE_RES]
        header[H_FREE_RES] = reservations[slot, NEXT_FREE]
    else:
        slot = header[H_RES_USED]
        header[H_RES_USED] += 1
    header[H_LIVE_RES] += 1
    reservations[slot, TAG] = tag
    reservations[slot, AMOUNT] = amount
    reservations[slot, RES_EXPIRES] = expires
    first = -1
    for i in range(n - 1, -1, -1):
        if header[H_FREE_HOLD] >= 0:
            hold = header[H_FREE_HOLD]
            header[H_FREE_HOLD] = holds[hold, HOLD_NEXT]
            header[H_FREE_HOLDS] -= 1
        else:
            hold = header[H_HOLDS_USED]
            header[H_HOLDS_USED] += 1
        holds[hold, HOLD_ROW] = states[i, S_ROW]
        holds[hold, HOLD_NEXT] = first
        first = hold
    reservations[slot, FIRST_HOLD] = first
    if header[H_HEAP_COUNT] >= header[H_HEAP_SLOTS]:
        # Entries of committed reservations pile up until their expiry: rebuild from the live ones.
        header[H_HEAP_COUNT] = 0
        for other in range(header[H_RES_USED]):
            if other != slot and reservations[other, TAG] != 0:
                _heap_push(heap, header, reservations[other, RES_EXPIRES], other, reservations[other, TAG])
    _heap_push(heap, header, expires, slot, tag)
    return slot


# -- decisions -------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _find_all(rows, index, block_next, block_data, plan, states, n):  # type: ignore[no-untyped-def]
    """Look every counter up; returns the rows and key blocks the missing ones would need."""
    keys = plan[1 + 3 * n :].view(np.uint8)
    missing_rows = 0
    missing_blocks = 0
    for i in range(n):
        limit_no = plan[1 + i]
        start, end = plan[1 + n + i], plan[1 + 2 * n + i]
        h = key_hash(limit_no, keys, start, end)
        row = _find(rows, index, block_next, block_data, limit_no, h, keys, start, end)
        states[i, S_ROW] = row
        states[i, S_VALUE] = h  # the hash, until the states are filled in
        if row < 0:
            missing_rows += 1
            missing_blocks += blocks_for(end - start)
    return missing_rows, missing_blocks


@njit(cache=True, nogil=True)
def decide(
    buf: np.ndarray,
    max_values: np.ndarray,
    plan: np.ndarray,
    mode: int,
    delta: int,
    now: int,
    pid: int,
    reservation_slot: int,
    reservation_tag: int,
    expires_at: int,
    states: np.ndarray,
    result: np.ndarray,
) -> None:
    """One decision over a request's counters, atomic across threads and processes.

    `plan` is int64: [n, limit_no x n, key start x n, key end x n, key bytes...] (see memory.py).
    CHECK_AND_UPDATE and RESERVE change nothing when a counter lacks room or the table is full;
    UPDATE charges regardless of room; CHECK changes nothing; COMMIT releases the reservation
    (slot, tag) if still held and charges `delta`. Writes result[R_CODE] (WITHIN, the index of the
    first counter without room, or FULL_* / BUSY), result[R_SLOT] / result[R_HELD], and each
    counter's state after the decision into `states`.
    """
    header = _header(buf)
    if not _lock(header, pid):
        result[R_CODE] = BUSY
        return
    header, rows, index, block_next, block_data, limits, reservations, holds, heap = _views(buf)
    _release_expired(header, rows, limits, reservations, holds, heap, now)
    n = plan[0]
    keys = plan[1 + 3 * n :].view(np.uint8)
    missing_rows, missing_blocks = _find_all(rows, index, block_next, block_data, plan, states, n)

    first = WITHIN
    if mode != UPDATE and mode != COMMIT:
        for i in range(n):
            row = states[i, S_ROW]
            used = 0
            held = 0
            if row >= 0:
                if rows[row, EXPIRES_AT] > now:
                    used = rows[row, VALUE]
                held = rows[row, RESERVED]
            if used + held + delta > max_values[plan[1 + i]]:
                first = i
                break
    code = first
    if mode == CHECK:
        write = False
    elif mode == RESERVE or mode == CHECK_AND_UPDATE:
        write = first == WITHIN and (delta > 0 or mode == RESERVE)
    else:
        write = delta > 0
    if write and missing_rows > 0:
        rows_free, blocks_free = _free_room(header)
        if (rows_free < missing_rows or blocks_free < missing_blocks) and now >= header[H_NEXT_RECLAIM]:
            if _sweep(header, rows, index, block_next, limits, SWEEP_CHUNK, now) > 0:
                # Rows this request found may have been reclaimed: look everything up again.
                missing_rows, missing_blocks = _find_all(rows, index, block_next, block_data, plan, states, n)
            rows_free, blocks_free = _free_room(header)
        if rows_free < missing_rows:
            code = FULL_ROWS
            header[H_REFUSED_ROWS] += 1
            write = False
        elif blocks_free < missing_blocks:
            code = FULL_KEY_BYTES
            header[H_REFUSED_KEY_BYTES] += 1
            write = False
    if write and mode == RESERVE and not _reservation_room(header, n):
        code = FULL_RESERVATIONS
        header[H_REFUSED_RESERVATIONS] += 1
        write = False
    if mode == COMMIT and code == WITHIN:
        held = (0 <= reservation_slot < header[H_RES_USED]
                and reservations[reservation_slot, TAG] == reservation_tag and reservation_tag != 0)
        if held:
            _release_reservation(header, rows, limits, reservations, holds, reservation_slot)
        result[R_HELD] = 1 if held else 0
    if write:
        for i in range(n):
            limit_no = plan[1 + i]
            row = states[i, S_ROW]
            if row < 0:
                row = _allocate_row(header, rows, index, block_next, block_data, limit_no, states[i, S_VALUE],
                                    keys, plan[1 + n + i], plan[1 + 2 * n + i])
                states[i, S_ROW] = row
            if mode == RESERVE:
                rows[row, RESERVED] += delta
            elif rows[row, EXPIRES_AT] <= now:
                # A new window starts at the counter's first hit (Limitador's fixed window).
                rows[row, VALUE] = delta
                rows[row, EXPIRES_AT] = now + limits[limit_no, WINDOW_MS]
                _note_reclaim_time(header, rows[row, EXPIRES_AT] + limits[limit_no, WINDOW_MS])
            else:
                rows[row, VALUE] += delta
        if mode == RESERVE:
            result[R_SLOT] = _new_reservation(header, reservations, holds, heap, states, n, delta, expires_at,
                                              reservation_tag)
    for i in range(n):
        row = states[i, S_ROW]
        if row < 0:
            states[i, S_VALUE] = 0
            states[i, S_EXPIRES] = 0
            states[i, S_RESERVED] = 0
        else:
            running = rows[row, EXPIRES_AT] > now
            states[i, S_VALUE] = rows[row, VALUE] if running else 0
            states[i, S_EXPIRES] = rows[row, EXPIRES_AT] if running else 0
            states[i, S_RESERVED] = rows[row, RESERVED]
    result[R_CODE] = code
    _unlock(header)


# -- control plane ---------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def sweep(buf: np.ndarray, budget: int, now: int, pid: int, result: np.ndarray) -> None:
    """Release expired reservations and reclaim rows among the next `budget` rows of the cycle."""
    header = _header(buf)
    if not _lock(header, pid):
        result[R_CODE] = BUSY
        return
    header, rows, index, block_next, block_data, limits, reservations, holds, heap = _views(buf)
    _release_expired(header, rows, limits, reservations, holds, heap, now)
    freed = 0
    if now >= header[H_NEXT_RECLAIM]:
        freed = _sweep(header, rows, index, block_next, limits, budget, now)
    result[R_CODE] = WITHIN
    result[R_FREED] = freed
    _unlock(header)


@njit(cache=True, nogil=True)
def _contains(data: np.ndarray, length: int, needle: np.ndarray) -> bool:
    m = needle.shape[0]
    if m == 0:
        return True
    for start in range(length - m + 1):
        for j in range(m):
            if data[start + j] != needle[j]:
                break
        else:
            return True
    return False


@njit(cache=True, nogil=True)
def list_rows(
    buf: np.ndarray,
    wanted: np.ndarray,
    needle: np.ndarray,
    cursor: int,
    max_scan: int,
    now: int,
    pid: int,
    out_rows: np.ndarray,
    out_keys: np.ndarray,
    out_ends: np.ndarray,
    result: np.ndarray,
) -> None:
    """Copy out live rows (window running or holding a reservation) of the wanted limit numbers
    whose key contains `needle`, from row `cursor` on, scanning at most `max_scan` rows.

    out_rows[k] = row, limit_no, value, expires_at, reserved; key k is out_keys[out_ends[k-1]:out_ends[k]].
    result[0] = how many, result[1] = the cursor to continue from (-1 when the table is done)."""
    header = _header(buf)
    if not _lock(header, pid):
        result[R_CODE] = BUSY
        return
    header, rows, index, block_next, block_data, limits, reservations, holds, heap = _views(buf)
    _release_expired(header, rows, limits, reservations, holds, heap, now)
    used = header[H_ROWS_USED]
    count = 0
    written = 0
    scratch = np.empty(out_keys.shape[0], dtype=np.uint8)
    row = cursor
    stop = min(used, cursor + max_scan)
    while row < stop and count < out_rows.shape[0]:
        limit_no = rows[row, LIMIT_NO]
        if (0 <= limit_no < wanted.shape[0] and wanted[limit_no]
                and (rows[row, EXPIRES_AT] > now or rows[row, RESERVED] > 0)):
            length = rows[row, KEY] & 0xFFFFFFFF
            if written + length > out_keys.shape[0]:
                break  # the key buffer is full: the caller continues from this row
            block = rows[row, KEY] >> 32
            i = 0
            while i < length:
                take = min(BLOCK_BYTES, length - i)
                scratch[i : i + take] = block_data[block, :take]
                i += take
                block = block_next[block]
            if _contains(scratch, length, needle):
                out_keys[written : written + length] = scratch[:length]
                written += length
                out_ends[count] = written
                out_rows[count, 0] = row
                out_rows[count, 1] = limit_no
                out_rows[count, 2] = rows[row, VALUE] if rows[row, EXPIRES_AT] > now else 0
                out_rows[count, 3] = rows[row, EXPIRES_AT] if rows[row, EXPIRES_AT] > now else 0
                out_rows[count, 4] = rows[row, RESERVED]
                count += 1
        row += 1
    result[0] = count
    result[1] = row if row < used else -1
    _unlock(header)


@njit(cache=True, nogil=True)
def register_limits(
    buf: np.ndarray, ids: np.ndarray, windows: np.ndarray, retire: np.ndarray, now: int, pid: int,
    out_nos: np.ndarray, result: np.ndarray,
) -> None:
    """Find or add each limit identity (ids[k] = 128-bit hash as two int64) and mark it active;
    mark the limit numbers in `retire` retired for one window. out_nos[k] = -1 when the registry is full."""
    header = _header(buf)
    if not _lock(header, pid):
        result[R_CODE] = BUSY
        return
    header, rows, index, block_next, block_data, limits, reservations, holds, heap = _views(buf)
    slots = limits.shape[0]
    for k in range(ids.shape[0]):
        high, low = ids[k, 0], ids[k, 1]
        slot = low & (slots - 1)
        out_nos[k] = -1
        for _ in range(slots):
            state = limits[slot, STATE]
            if state == LIMIT_FREE:
                if header[H_LIMITS_USED] * 4 >= slots * 3:
                    break  # keep probe runs short: three quarters full is full
                header[H_LIMITS_USED] += 1
                limits[slot, ID_HIGH] = high
                limits[slot, ID_LOW] = low
                limits[slot, WINDOW_MS] = windows[k]
                out_nos[k] = slot
                break
            if limits[slot, ID_HIGH] == high and limits[slot, ID_LOW] == low:
                out_nos[k] = slot
                break
            slot = (slot + 1) & (slots - 1)
        if out_nos[k] >= 0:
            limits[out_nos[k], STATE] = LIMIT_ACTIVE
            limits[out_nos[k], RETIRED_UNTIL] = 0
    for k in range(retire.shape[0]):
        no = retire[k]
        if limits[no, STATE] == LIMIT_ACTIVE:
            limits[no, STATE] = LIMIT_RETIRED
            limits[no, RETIRED_UNTIL] = now + limits[no, WINDOW_MS]
    result[R_CODE] = WITHIN
    _unlock(header)
