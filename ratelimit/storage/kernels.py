"""numba kernels over the counter table: one flat block of int64 words, private or in shared memory.

Everything a decision needs lives in that block, so worker processes that map the same block
decide exactly as one process would. Kernels take the block as one int64 array and address its
regions by word offsets kept in the header (making array views inside a kernel costs more than
the decision itself). The block starts with a header (the lock, sizes, region offsets, free lists,
refusal counts), then:

- rows          capacity x ROW_WIDTH (64 bytes, one cache line): value, expires_at_ms, reserved,
                limit_no, hash, key, and INLINE_WORDS words of key bytes. `key` packs
                (first key block << 32) | key length in bytes; a key of at most INLINE_BYTES lives
                in the row itself (the usual user id: one cache line per counter), a longer one in
                key blocks. A free row has limit_no -1 and the next free row in `value`.
- index         index_slots int32 halves of words: open addressing, linear probing, row + 1
                (0 = empty), deleted by backward shift (no tombstones); a power of two >= 2 x capacity.
- key blocks    key_blocks x BLOCK_WORDS: the next block (-1 = last, or the next free block), then
                BLOCK_PAYLOAD_WORDS words of the key's bytes (the counter's variable values), so
                listing recovers every key without a Python object per counter.
- limits        limit_slots x LIMIT_WIDTH: a limit identity's 128-bit hash, its window, its state;
                the slot number is the limit number. Looked up only by register_limits (a reload),
                in one pass over all slots, so any free slot can take a new limit. A limit a reload
                removed is retired (its counters stay for its window, so it resumes if it comes
                back); once no row holds its number any more, its slot is freed for a new limit.
- reservations  reservation_slots x RES_WIDTH: tag (0 = free), amount, expiry, first hold.
- holds         hold_slots x 2: the rows a reservation holds, as a chain.
- heap          heap_slots x 3: reservation expiries, a binary min-heap with lazy deletion.

Keys are handed to kernels as little-endian int64 words, zero-padded, so keys are hashed, compared
and copied a word at a time (equal length and equal words mean equal bytes).

Every public kernel takes the lock word first and gives it back before returning; if another holder
keeps it past a bounded spin, the kernel returns BUSY and the caller retries from Python (table.py),
where a holder that died is detected, so no kernel waits unboundedly.

Decisions are all-or-nothing over a request's counters: rows are found (or, when something will be
charged, added after making sure there is room for all of them), checked, then charged.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ratelimit.storage.atomics import compare_and_swap, load_acquire, store_release
from ratelimit.storage.base import Operation

# -- layout ----------------------------------------------------------------------------------------

MAGIC = 0x52_4C_54_41_42_4C_45_33  # "RLTABLE3"
HEADER_WORDS = 64
BLOCK_WORDS = 4
BLOCK_PAYLOAD_WORDS = BLOCK_WORDS - 1
BLOCK_BYTES = 8 * BLOCK_PAYLOAD_WORDS
ROW_WIDTH = 8
VALUE, EXPIRES_AT, RESERVED, LIMIT_NO, HASH, KEY, INLINE = range(7)
INLINE_WORDS = ROW_WIDTH - INLINE
INLINE_BYTES = 8 * INLINE_WORDS
LIMIT_WIDTH = 5
ID_HIGH, ID_LOW, WINDOW_MS, STATE, RETIRED_UNTIL = range(LIMIT_WIDTH)
LIMIT_FREE, LIMIT_ACTIVE, LIMIT_RETIRED = 0, 1, 2
REUSE_GRACE_MS = 600_000
"""A retired limit number is reused at the earliest this long after its window ran out: every
worker has applied the reload that removed it by then (each polls the limits file every second or
so), so no worker still charges counters under the old number."""
RES_WIDTH = 5
TAG, AMOUNT, RES_EXPIRES, FIRST_HOLD, NEXT_FREE = range(RES_WIDTH)
HOLD_WIDTH = 2
HOLD_ROW, HOLD_NEXT = 0, 1
HEAP_WIDTH = 3
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
H_OFF_ROWS = 9  # region offsets, in words
H_OFF_INDEX = 10
H_OFF_BLOCKS = 11
H_OFF_LIMITS = 12
H_OFF_RES = 13
H_OFF_HOLDS = 14
H_OFF_HEAP = 15
H_TOTAL_WORDS = 16
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
H_LIMITS_USED = 35  # limit slots not free (active or retired)
H_LOCK_BUSY = 36  # times a caller found the lock taken past its spin (contention)
H_LOCK_STOLEN = 37  # times the lock was taken over from a dead holder
H_REFUSED_ROWS = 40  # refusals by reason: no row for a new counter
H_REFUSED_KEY_BYTES = 41  # no key blocks left for a new counter's key
H_REFUSED_RESERVATIONS = 42  # no reservation slot or holds left
H_FREED_ROWS = 43  # rows reclaimed so far (idle for a window after their window ended)
H_LIMITS_FREED = 44  # limit slots freed for new limits after their removed limit's counters were gone
REFUSAL_REASONS = {"rows": H_REFUSED_ROWS, "key_bytes": H_REFUSED_KEY_BYTES, "reservations": H_REFUSED_RESERVATIONS}

# Decision modes: Operation's numbers as plain ints, which numba folds into the kernels as constants
# (an IntEnum member passed in would be typed, and compiled for, as an enum of its own).
CHECK_AND_UPDATE = int(Operation.CHECK_AND_UPDATE)
CHECK = int(Operation.CHECK)
UPDATE = int(Operation.UPDATE)
RESERVE = int(Operation.RESERVE)
COMMIT = int(Operation.COMMIT)
# Result codes.
WITHIN = -1
FULL_ROWS = -2
FULL_KEY_BYTES = -3
FULL_RESERVATIONS = -4
BUSY = -5
# A kernel's `out` array starts with RESULT_WORDS: code (WITHIN, the index of the first counter
# without room, FULL_* or BUSY), reservation slot, the commit's reservation state, rows freed (sweep).
R_CODE, R_SLOT, R_HELD, R_FREED = 0, 1, 2, 3
NOT_HELD, HELD, COMMITTED = 0, 1, 2
RESULT_WORDS = 4
# decide's `out` continues with STATE_WIDTH words per counter, its state after the decision.
S_ROW, S_VALUE, S_EXPIRES, S_RESERVED = range(4)
STATE_WIDTH = 4
LISTED_WIDTH = 7  # list_rows: row, limit_no, value, expires_at, reserved, key length, first key word

# A plan (one per memoized descriptor set, built by memory.py):
# [n, limit_no x n, key length x n, first key word x n, key words...]
P_COUNT = 0

SPINS = 200_000  # about a millisecond of spinning before handing the wait back to Python
SWEEP_CHUNK = 1 << 16  # rows a decision scans at most when it needs room (well under a millisecond)
NEVER = np.iinfo(np.int64).max
_LOW32 = 0xFFFFFFFF


# -- the lock --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _lock(words: np.ndarray, pid: int) -> bool:
    for _ in range(SPINS):
        if words[H_LOCK] == 0 and compare_and_swap(words, H_LOCK, 0, pid) == 0:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _unlock(words: np.ndarray) -> None:
    store_release(words, H_LOCK, 0)


@njit(cache=True, nogil=True)
def lock_holder(words: np.ndarray) -> int:
    return load_acquire(words, H_LOCK)


@njit(cache=True, nogil=True)
def steal_lock(words: np.ndarray, dead_pid: int, pid: int) -> bool:
    """Take the lock over from a holder that is known to be dead, then give it back."""
    if compare_and_swap(words, H_LOCK, dead_pid, pid) != dead_pid:
        return False
    words[H_LOCK_STOLEN] += 1
    _unlock(words)
    return True


@njit(cache=True, nogil=True)
def note_busy(words: np.ndarray) -> None:
    """Count one wait for the lock (the caller retries); an approximate figure, so no lock."""
    words[H_LOCK_BUSY] += 1


# -- keys and the index ----------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def key_words(length: int) -> int:
    return (length + 7) // 8


@njit(cache=True, nogil=True, inline="always")
def blocks_for(length: int) -> int:
    """Key blocks a key of `length` bytes takes (none when it fits in its row)."""
    if length <= INLINE_BYTES:
        return 0
    return (key_words(length) + BLOCK_PAYLOAD_WORDS - 1) // BLOCK_PAYLOAD_WORDS


@njit(cache=True, nogil=True)
def key_hash(limit_no: int, length: int, plan: np.ndarray, start: int) -> int:
    """FNV-1a over the key's words, seeded with the limit number and the length, through a
    splitmix64 finalizer."""
    h = np.uint64(0xCBF29CE484222325) ^ np.uint64(limit_no) ^ (np.uint64(length) << np.uint64(40))
    prime = np.uint64(0x100000001B3)
    for i in range(start, start + key_words(length)):
        h = (h ^ np.uint64(plan[i])) * prime
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return np.int64(h)


@njit(cache=True, nogil=True, inline="always")
def _slot(words: np.ndarray, index: int, slot: int) -> int:
    word = words[index + (slot >> 1)]
    return int((word >> 32) & _LOW32 if slot & 1 else word & _LOW32)


@njit(cache=True, nogil=True, inline="always")
def _set_slot(words: np.ndarray, index: int, slot: int, entry: int) -> None:
    at = index + (slot >> 1)
    if slot & 1:
        words[at] = (words[at] & _LOW32) | (entry << 32)
    else:
        words[at] = (words[at] & ~_LOW32) | entry


@njit(cache=True, nogil=True)
def _key_equals(words: np.ndarray, row_at: int, plan: np.ndarray, length: int, start: int) -> bool:
    packed = words[row_at + KEY]
    if packed & _LOW32 != length:
        return False
    count = key_words(length)
    if length <= INLINE_BYTES:
        for j in range(count):
            if words[row_at + INLINE + j] != plan[start + j]:
                return False
        return True
    block = packed >> 32
    blocks = words[H_OFF_BLOCKS]
    i = 0
    while i < count:
        at = blocks + block * BLOCK_WORDS
        for j in range(min(BLOCK_PAYLOAD_WORDS, count - i)):
            if words[at + 1 + j] != plan[start + i + j]:
                return False
        i += BLOCK_PAYLOAD_WORDS
        block = words[at]
    return True


@njit(cache=True, nogil=True)
def _find(words: np.ndarray, limit_no: int, h: int, plan: np.ndarray, length: int, start: int) -> int:
    index = words[H_OFF_INDEX]
    rows = words[H_OFF_ROWS]
    mask = words[H_INDEX_SLOTS] - 1
    slot = h & mask
    while True:
        entry = _slot(words, index, slot)
        if entry == 0:
            return -1
        row_at = rows + (entry - 1) * ROW_WIDTH
        if (words[row_at + HASH] == h and words[row_at + LIMIT_NO] == limit_no
                and _key_equals(words, row_at, plan, length, start)):
            return entry - 1
        slot = (slot + 1) & mask


@njit(cache=True, nogil=True)
def _index_insert(words: np.ndarray, row: int, h: int) -> None:
    index = words[H_OFF_INDEX]
    mask = words[H_INDEX_SLOTS] - 1
    slot = h & mask
    while _slot(words, index, slot) != 0:
        slot = (slot + 1) & mask
    _set_slot(words, index, slot, row + 1)


@njit(cache=True, nogil=True)
def _index_remove(words: np.ndarray, row: int) -> None:
    """Delete by backward shift: later entries of the probe run move up, so lookups need no tombstones."""
    index = words[H_OFF_INDEX]
    rows = words[H_OFF_ROWS]
    mask = words[H_INDEX_SLOTS] - 1
    hole = words[rows + row * ROW_WIDTH + HASH] & mask
    while _slot(words, index, hole) != row + 1:
        hole = (hole + 1) & mask
    probe = hole
    while True:
        probe = (probe + 1) & mask
        entry = _slot(words, index, probe)
        if entry == 0:
            break
        home = words[rows + (entry - 1) * ROW_WIDTH + HASH] & mask
        # The entry may fill the hole unless its home lies cyclically in (hole, probe].
        if hole <= probe:
            stays = hole < home <= probe
        else:
            stays = home > hole or home <= probe
        if not stays:
            _set_slot(words, index, hole, entry)
            hole = probe
    _set_slot(words, index, hole, 0)


# -- free lists ------------------------------------------------------------------------------------
# Rows, key blocks, reservation slots and holds are each handed out from a free list (its first
# entry in a header word, and in each free entry one word linking to the next) or, when that is
# empty, from the region's never-used end. `link_at` is the table offset of entry 0's link word.

UNCOUNTED = -1  # reservation slots count the live ones (H_LIVE_RES), not the free ones


@njit(cache=True, nogil=True, inline="always")
def _take(words: np.ndarray, head: int, free_count: int, used: int, link_at: int, width: int) -> int:
    """An entry for new use: the free list's first, else the first never used (header word `used`)."""
    entry = words[head]
    if entry >= 0:
        words[head] = words[link_at + entry * width]
        if free_count != UNCOUNTED:
            words[free_count] -= 1
    else:
        entry = words[used]
        words[used] += 1
    return int(entry)


@njit(cache=True, nogil=True, inline="always")
def _give_back(words: np.ndarray, head: int, free_count: int, link_at: int, width: int, entry: int) -> None:
    words[link_at + entry * width] = words[head]
    words[head] = entry
    if free_count != UNCOUNTED:
        words[free_count] += 1


# -- rows ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _rows_free(words: np.ndarray) -> int:
    return int(words[H_CAPACITY] - words[H_ROWS_USED] + words[H_FREE_ROWS])


@njit(cache=True, nogil=True, inline="always")
def _blocks_free(words: np.ndarray) -> int:
    return int(words[H_KEY_BLOCKS] - words[H_BLOCKS_USED] + words[H_FREE_BLOCKS])


@njit(cache=True, nogil=True)
def _allocate_row(words: np.ndarray, limit_no: int, h: int, plan: np.ndarray, length: int, start: int) -> int:
    """A row for a new counter; the caller made sure there is room (rows and key blocks)."""
    rows = words[H_OFF_ROWS]
    row = _take(words, H_FREE_ROW, H_FREE_ROWS, H_ROWS_USED, rows + VALUE, ROW_WIDTH)
    blocks = words[H_OFF_BLOCKS]
    count = key_words(length) if length > INLINE_BYTES else 0
    first = 0
    previous = -1
    i = 0
    while i < count:
        block = _take(words, H_FREE_BLOCK, H_FREE_BLOCKS, H_BLOCKS_USED, blocks, BLOCK_WORDS)
        at = blocks + block * BLOCK_WORDS
        words[at] = -1
        for j in range(BLOCK_PAYLOAD_WORDS):
            words[at + 1 + j] = plan[start + i + j] if i + j < count else 0
        if previous >= 0:
            words[blocks + previous * BLOCK_WORDS] = block
        else:
            first = block
        previous = block
        i += BLOCK_PAYLOAD_WORDS
    at = rows + row * ROW_WIDTH
    words[at + VALUE] = 0
    words[at + EXPIRES_AT] = 0
    words[at + RESERVED] = 0
    words[at + LIMIT_NO] = limit_no
    words[at + HASH] = h
    words[at + KEY] = (first << 32) | length
    for j in range(INLINE_WORDS):
        words[at + INLINE + j] = plan[start + j] if length <= INLINE_BYTES and j < key_words(length) else 0
    _index_insert(words, row, h)
    words[H_LIVE_ROWS] += 1
    return row


@njit(cache=True, nogil=True)
def _free_row(words: np.ndarray, row: int) -> None:
    _index_remove(words, row)
    rows = words[H_OFF_ROWS]
    at = rows + row * ROW_WIDTH
    blocks = words[H_OFF_BLOCKS]
    if words[at + KEY] & _LOW32 > INLINE_BYTES:
        block = words[at + KEY] >> 32
        while block >= 0:
            following = words[blocks + block * BLOCK_WORDS]
            _give_back(words, H_FREE_BLOCK, H_FREE_BLOCKS, blocks, BLOCK_WORDS, block)
            block = following
    words[at + LIMIT_NO] = -1
    words[at + EXPIRES_AT] = 0
    words[at + RESERVED] = 0
    words[at + HASH] = 0
    words[at + KEY] = 0
    _give_back(words, H_FREE_ROW, H_FREE_ROWS, rows + VALUE, ROW_WIDTH, row)
    words[H_LIVE_ROWS] -= 1
    words[H_FREED_ROWS] += 1


@njit(cache=True, nogil=True, inline="always")
def _window_ms(words: np.ndarray, limit_no: int) -> int:
    return int(words[words[H_OFF_LIMITS] + limit_no * LIMIT_WIDTH + WINDOW_MS])


@njit(cache=True, nogil=True, inline="always")
def _reclaim_at(words: np.ndarray, at: int) -> int:
    """When a new key may take the row at word `at`: a counter keeps its row for one window after
    its window ends (so a returning user is never pushed out by new keys), a held row is never taken."""
    if words[at + RESERVED] > 0:
        return NEVER
    expires = words[at + EXPIRES_AT]
    if expires == 0:
        return 0
    return int(expires + _window_ms(words, words[at + LIMIT_NO]))


@njit(cache=True, nogil=True, inline="always")
def _note_reclaim_time(words: np.ndarray, when: int) -> None:
    """Keep H_NEXT_RECLAIM and the running cycle's minimum lower bounds of every row's reclaim time."""
    if when < words[H_NEXT_RECLAIM]:
        words[H_NEXT_RECLAIM] = when
    if when < words[H_CYCLE_MIN]:
        words[H_CYCLE_MIN] = when


@njit(cache=True, nogil=True)
def _sweep(words: np.ndarray, budget: int, now: int) -> int:
    """Free reclaimable rows among the next `budget` rows of the sweep cycle; returns how many."""
    freed = 0
    used = words[H_ROWS_USED]
    rows = words[H_OFF_ROWS]
    cursor = words[H_SWEEP_CURSOR]
    for _ in range(min(budget, used)):
        row = cursor
        cursor += 1
        at = rows + row * ROW_WIDTH
        if words[at + LIMIT_NO] >= 0:
            when = _reclaim_at(words, at)
            if when <= now:
                _free_row(words, row)
                freed += 1
            elif when < words[H_CYCLE_MIN]:
                words[H_CYCLE_MIN] = when
        if cursor >= used:
            # A whole cycle seen: nothing can be reclaimed before the earliest time it found.
            cursor = 0
            words[H_NEXT_RECLAIM] = words[H_CYCLE_MIN]
            words[H_CYCLE_MIN] = NEVER
    words[H_SWEEP_CURSOR] = cursor
    return freed


# -- reservations ----------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _heap_move(words: np.ndarray, heap: int, to: int, source: int) -> None:
    """Entry `source` of the heap (at word `heap`) moves to place `to`."""
    for j in range(HEAP_WIDTH):
        words[heap + to * HEAP_WIDTH + j] = words[heap + source * HEAP_WIDTH + j]


@njit(cache=True, nogil=True, inline="always")
def _heap_set(words: np.ndarray, heap: int, i: int, expires: int, slot: int, tag: int) -> None:
    at = heap + i * HEAP_WIDTH
    words[at + HEAP_EXPIRES] = expires
    words[at + HEAP_SLOT] = slot
    words[at + HEAP_TAG] = tag


@njit(cache=True, nogil=True)
def _heap_push(words: np.ndarray, expires: int, slot: int, tag: int) -> None:
    heap = words[H_OFF_HEAP]
    i = words[H_HEAP_COUNT]
    words[H_HEAP_COUNT] += 1
    while i > 0:
        parent = (i - 1) // 2
        if words[heap + parent * HEAP_WIDTH + HEAP_EXPIRES] <= expires:
            break
        _heap_move(words, heap, i, parent)
        i = parent
    _heap_set(words, heap, i, expires, slot, tag)


@njit(cache=True, nogil=True)
def _heap_pop(words: np.ndarray) -> None:
    heap = words[H_OFF_HEAP]
    count = words[H_HEAP_COUNT] - 1
    words[H_HEAP_COUNT] = count
    last_at = heap + count * HEAP_WIDTH
    last_expires = words[last_at + HEAP_EXPIRES]
    last_slot, last_tag = words[last_at + HEAP_SLOT], words[last_at + HEAP_TAG]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= count:
            break
        if (child + 1 < count and words[heap + (child + 1) * HEAP_WIDTH + HEAP_EXPIRES]
                < words[heap + child * HEAP_WIDTH + HEAP_EXPIRES]):
            child += 1
        if words[heap + child * HEAP_WIDTH + HEAP_EXPIRES] >= last_expires:
            break
        _heap_move(words, heap, i, child)
        i = child
    if count > 0:
        _heap_set(words, heap, i, last_expires, last_slot, last_tag)


@njit(cache=True, nogil=True)
def _release_reservation(words: np.ndarray, slot: int) -> None:
    """Give back a reservation's holds and its slot (it expired)."""
    _release_holds(words, slot)
    reservations = words[H_OFF_RES]
    words[reservations + slot * RES_WIDTH + TAG] = 0
    _give_back(words, H_FREE_RES, UNCOUNTED, reservations + NEXT_FREE, RES_WIDTH, slot)
    words[H_LIVE_RES] -= 1


@njit(cache=True, nogil=True)
def _release_holds(words: np.ndarray, slot: int) -> None:
    res_at = words[H_OFF_RES] + slot * RES_WIDTH
    holds = words[H_OFF_HOLDS]
    rows = words[H_OFF_ROWS]
    amount = words[res_at + AMOUNT]
    hold = words[res_at + FIRST_HOLD]
    while hold >= 0:
        hold_at = holds + hold * HOLD_WIDTH
        row_at = rows + words[hold_at + HOLD_ROW] * ROW_WIDTH
        words[row_at + RESERVED] -= amount
        if words[row_at + RESERVED] == 0:
            _note_reclaim_time(words, _reclaim_at(words, row_at))
        following = words[hold_at + HOLD_NEXT]
        _give_back(words, H_FREE_HOLD, H_FREE_HOLDS, holds + HOLD_NEXT, HOLD_WIDTH, hold)
        hold = following
    words[res_at + FIRST_HOLD] = -1


@njit(cache=True, nogil=True)
def _release_expired(words: np.ndarray, now: int) -> None:
    heap = words[H_OFF_HEAP]
    while words[H_HEAP_COUNT] > 0 and words[heap + HEAP_EXPIRES] <= now:
        slot, tag = words[heap + HEAP_SLOT], words[heap + HEAP_TAG]
        _heap_pop(words)
        if words[words[H_OFF_RES] + slot * RES_WIDTH + TAG] == tag:  # not committed meanwhile
            _release_reservation(words, slot)


@njit(cache=True, nogil=True, inline="always")
def _enter(words: np.ndarray, pid: int, now: int, out: np.ndarray) -> bool:
    """What a kernel that reads or writes counters does first: take the lock, then release the
    reservations expired by `now`. False, with BUSY in `out`, when another holder kept the lock."""
    if not _lock(words, pid):
        out[R_CODE] = BUSY
        return False
    _release_expired(words, now)
    return True


@njit(cache=True, nogil=True)
def _reservation_room(words: np.ndarray, holds_needed: int) -> bool:
    slots_free = words[H_RES_SLOTS] - words[H_LIVE_RES]
    holds_free = words[H_HOLD_SLOTS] - words[H_HOLDS_USED] + words[H_FREE_HOLDS]
    return bool(slots_free > 0 and holds_free >= holds_needed)


@njit(cache=True, nogil=True)
def _new_reservation(words: np.ndarray, out: np.ndarray, n: int, amount: int, expires: int, tag: int) -> int:
    reservations = words[H_OFF_RES]
    holds = words[H_OFF_HOLDS]
    slot = _take(words, H_FREE_RES, UNCOUNTED, H_RES_USED, reservations + NEXT_FREE, RES_WIDTH)
    words[H_LIVE_RES] += 1
    res_at = reservations + slot * RES_WIDTH
    words[res_at + TAG] = tag
    words[res_at + AMOUNT] = amount
    words[res_at + RES_EXPIRES] = expires
    first = -1
    for i in range(n - 1, -1, -1):
        hold = _take(words, H_FREE_HOLD, H_FREE_HOLDS, H_HOLDS_USED, holds + HOLD_NEXT, HOLD_WIDTH)
        words[holds + hold * HOLD_WIDTH + HOLD_ROW] = out[RESULT_WORDS + i * STATE_WIDTH + S_ROW]
        words[holds + hold * HOLD_WIDTH + HOLD_NEXT] = first
        first = hold
    words[res_at + FIRST_HOLD] = first
    if words[H_HEAP_COUNT] >= words[H_HEAP_SLOTS]:
        # Entries of committed reservations pile up until their expiry: rebuild from the live ones.
        words[H_HEAP_COUNT] = 0
        for other in range(words[H_RES_USED]):
            other_at = reservations + other * RES_WIDTH
            if other != slot and words[other_at + TAG] != 0:
                _heap_push(words, words[other_at + RES_EXPIRES], other, words[other_at + TAG])
    _heap_push(words, expires, slot, tag)
    return slot


# -- decisions -------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _find_all(words: np.ndarray, plan: np.ndarray, out: np.ndarray, n: int) -> tuple[int, int]:
    """Look every counter up (its row, and its hash while the state is not filled in); returns the
    rows and key blocks the missing ones would need."""
    missing_rows = 0
    missing_blocks = 0
    keys = 1 + 3 * n
    for i in range(n):
        limit_no, length, start = plan[1 + i], plan[1 + n + i], keys + plan[1 + 2 * n + i]
        h = key_hash(limit_no, length, plan, start)
        row = _find(words, limit_no, h, plan, length, start)
        state = RESULT_WORDS + i * STATE_WIDTH
        out[state + S_ROW] = row
        out[state + S_VALUE] = h
        if row < 0:
            missing_rows += 1
            missing_blocks += blocks_for(length)
    return missing_rows, missing_blocks


@njit(cache=True, nogil=True)
def decide(words: np.ndarray, max_values: np.ndarray, plan: np.ndarray, mode: int, delta: int, now: int,
           pid: int, reservation_slot: int, reservation_tag: int, expires_at: int, out: np.ndarray) -> None:
    """One decision over a request's counters (`plan`), atomic across threads and processes.

    CHECK_AND_UPDATE and RESERVE change nothing when a counter lacks room or the table is full;
    UPDATE charges regardless of room; CHECK changes nothing; COMMIT releases the reservation
    (slot, tag) if still held and charges `delta`, unless that reservation was committed already
    (a retried commit charges once). Writes the result words and each counter's
    state after the decision into `out`.
    """
    if not _enter(words, pid, now, out):
        return
    n = plan[P_COUNT]
    rows = words[H_OFF_ROWS]
    missing_rows, missing_blocks = _find_all(words, plan, out, n)

    first = WITHIN
    if mode != UPDATE and mode != COMMIT:
        for i in range(n):
            row = out[RESULT_WORDS + i * STATE_WIDTH + S_ROW]
            used = 0
            held = 0
            if row >= 0:
                at = rows + row * ROW_WIDTH
                if words[at + EXPIRES_AT] > now:
                    used = words[at + VALUE]
                held = words[at + RESERVED]
            if used + held + delta > max_values[plan[1 + i]]:
                first = i
                break
    code = first
    # A commit's reservation: NOT_HELD (unknown, or expired and released), HELD, or COMMITTED
    # (its slot is kept until its expiry, so a retried commit charges nothing a second time).
    commit_state = NOT_HELD
    res_at = words[H_OFF_RES] + reservation_slot * RES_WIDTH
    if (mode == COMMIT and 0 <= reservation_slot < words[H_RES_USED] and reservation_tag != 0
            and words[res_at + TAG] == reservation_tag):
        commit_state = COMMITTED if words[res_at + AMOUNT] < 0 else HELD
    if mode == CHECK:
        write = False
    elif mode == RESERVE or mode == CHECK_AND_UPDATE:
        write = first == WITHIN and (delta > 0 or mode == RESERVE)
    else:
        write = delta > 0 and commit_state != COMMITTED
    if write and missing_rows > 0:
        if ((_rows_free(words) < missing_rows or _blocks_free(words) < missing_blocks)
                and now >= words[H_NEXT_RECLAIM]):
            if _sweep(words, SWEEP_CHUNK, now) > 0:
                # Rows this request found may have been reclaimed: look everything up again.
                missing_rows, missing_blocks = _find_all(words, plan, out, n)
        if _rows_free(words) < missing_rows:
            code = FULL_ROWS
            words[H_REFUSED_ROWS] += 1
            write = False
        elif _blocks_free(words) < missing_blocks:
            code = FULL_KEY_BYTES
            words[H_REFUSED_KEY_BYTES] += 1
            write = False
    if write and mode == RESERVE and not _reservation_room(words, n):
        code = FULL_RESERVATIONS
        words[H_REFUSED_RESERVATIONS] += 1
        write = False
    if mode == COMMIT and code == WITHIN:
        if commit_state == HELD:
            _release_holds(words, reservation_slot)
            words[res_at + AMOUNT] = -1  # committed: the slot stays until its expiry
        out[R_HELD] = commit_state
    if write:
        keys = 1 + 3 * n
        for i in range(n):
            limit_no = plan[1 + i]
            state = RESULT_WORDS + i * STATE_WIDTH
            row = out[state + S_ROW]
            if row < 0:
                row = _allocate_row(words, limit_no, out[state + S_VALUE], plan, plan[1 + n + i],
                                    keys + plan[1 + 2 * n + i])
                out[state + S_ROW] = row
            at = rows + row * ROW_WIDTH
            if mode == RESERVE:
                words[at + RESERVED] += delta
            elif words[at + EXPIRES_AT] <= now:
                # A new window starts at the counter's first hit (Limitador's fixed window).
                window = _window_ms(words, limit_no)
                words[at + VALUE] = delta
                words[at + EXPIRES_AT] = now + window
                _note_reclaim_time(words, now + 2 * window)
            else:
                words[at + VALUE] += delta
        if mode == RESERVE:
            out[R_SLOT] = _new_reservation(words, out, n, delta, expires_at, reservation_tag)
    for i in range(n):
        state = RESULT_WORDS + i * STATE_WIDTH
        row = out[state + S_ROW]
        if row < 0:
            out[state + S_VALUE] = 0
            out[state + S_EXPIRES] = 0
            out[state + S_RESERVED] = 0
        else:
            at = rows + row * ROW_WIDTH
            running = words[at + EXPIRES_AT] > now
            out[state + S_VALUE] = words[at + VALUE] if running else 0
            out[state + S_EXPIRES] = words[at + EXPIRES_AT] if running else 0
            out[state + S_RESERVED] = words[at + RESERVED]
    out[R_CODE] = code
    _unlock(words)


# -- control plane ---------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def sweep(words: np.ndarray, budget: int, now: int, pid: int, out: np.ndarray) -> None:
    """Release expired reservations and reclaim rows among the next `budget` rows of the cycle."""
    if not _enter(words, pid, now, out):
        return
    freed = 0
    if now >= words[H_NEXT_RECLAIM]:
        freed = _sweep(words, budget, now)
    out[R_CODE] = WITHIN
    out[R_FREED] = freed
    _unlock(words)


@njit(cache=True, nogil=True)
def _key_contains(
    words: np.ndarray, row_at: int, length: int, needle: np.ndarray, needle_length: int, scratch: np.ndarray
) -> bool:
    """Copy the key's words into `scratch`; whether its bytes contain the needle's."""
    blocks = words[H_OFF_BLOCKS]
    count = key_words(length)
    block = words[row_at + KEY] >> 32
    i = 0
    if length <= INLINE_BYTES:
        for j in range(count):
            scratch[j] = words[row_at + INLINE + j]
        i = count
    while i < count:
        at = blocks + block * BLOCK_WORDS
        for j in range(min(BLOCK_PAYLOAD_WORDS, count - i)):
            scratch[i + j] = words[at + 1 + j]
        i += BLOCK_PAYLOAD_WORDS
        block = words[at]
    if needle_length == 0:
        return True
    for start in range(length - needle_length + 1):
        for j in range(needle_length):
            k = start + j
            if (scratch[k >> 3] >> ((k & 7) * 8)) & 0xFF != needle[j]:
                break
        else:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _used_if_live(words: np.ndarray, at: int, now: int) -> int:
    """What a live row uses as admission counts it (its value while its window runs, plus what is
    reserved), or -1 for a row that is not live (no window running, nothing reserved): listings and
    summaries see live rows only."""
    reserved = words[at + RESERVED]
    if words[at + EXPIRES_AT] > now:
        return int(words[at + VALUE] + reserved)
    return int(reserved) if reserved > 0 else -1


@njit(cache=True, nogil=True)
def list_rows(words: np.ndarray, wanted: np.ndarray, needle: np.ndarray, min_used: int, cursor: int, max_scan: int,
              now: int, pid: int, listed: np.ndarray, listed_keys: np.ndarray, out: np.ndarray) -> None:
    """Copy out live rows (window running or holding a reservation) of the wanted limit numbers
    whose key bytes contain `needle` and that use more than `min_used` (value + reserved; -1 for
    every row), from row `cursor` on, scanning at most `max_scan` rows.

    listed[k] = (row, limit_no, value, expires_at, reserved, key length, first word in listed_keys).
    out[0] = how many, out[1] = the cursor to continue from (-1 when the table is done), out[2] =
    the key words needed when the key buffer filled up (0 otherwise)."""
    if not _enter(words, pid, now, out):
        return
    used = words[H_ROWS_USED]
    rows = words[H_OFF_ROWS]
    count = 0
    written = 0
    out[2] = 0
    row = cursor
    stop = min(used, cursor + max_scan)
    while row < stop and count < listed.shape[0]:
        at = rows + row * ROW_WIDTH
        limit_no = words[at + LIMIT_NO]
        if 0 <= limit_no < wanted.shape[0] and wanted[limit_no] and _used_if_live(words, at, now) > min_used:
            length = words[at + KEY] & _LOW32
            if written + key_words(length) + BLOCK_PAYLOAD_WORDS > listed_keys.shape[0]:
                out[2] = key_words(length) + BLOCK_PAYLOAD_WORDS  # the key buffer is full: continue
                break  # from this row (with a bigger buffer if not even one key fitted)
            if _key_contains(words, at, length, needle, needle.shape[0],
                             listed_keys[written:]):
                running = words[at + EXPIRES_AT] > now
                listed[count, 0] = row
                listed[count, 1] = limit_no
                listed[count, 2] = words[at + VALUE] if running else 0
                listed[count, 3] = words[at + EXPIRES_AT] if running else 0
                listed[count, 4] = words[at + RESERVED]
                listed[count, 5] = length
                listed[count, 6] = written
                written += key_words(length)
                count += 1
        row += 1
    out[0] = count
    out[1] = row if row < used else -1
    _unlock(words)


@njit(cache=True, nogil=True)
def add_up_rows(words: np.ndarray, wanted: np.ndarray, max_values: np.ndarray, thresholds: np.ndarray,
                skipped: np.ndarray, cursor: int, max_scan: int, now: int, pid: int, counts: np.ndarray,
                reached: np.ndarray, others: np.ndarray, sums: np.ndarray, soonest: np.ndarray,
                out: np.ndarray) -> None:
    """Add the live rows of the wanted limit numbers, from row `cursor` on (at most `max_scan`
    rows), to per-limit-number totals (a quota summary). Every row: counts[no] += 1, reached[k, no]
    += 1 when used / max_value >= thresholds[k] (1.0 for a limit of 0). Rows not in `skipped`
    (ascending; the busiest, which have series of their own) also: others[no] += 1, sums[0, no],
    sums[1, no], sums[2, no] += max_value, used, remaining (max_value - used clamped to [0,
    max_value]), soonest[no] = min(soonest[no], seconds until the window ends, 0.0 when none runs).
    out[1] = the cursor to continue from (-1 when the table is done)."""
    if not _enter(words, pid, now, out):
        return
    used_rows = words[H_ROWS_USED]
    rows = words[H_OFF_ROWS]
    stop = min(used_rows, cursor + max_scan)
    s = np.searchsorted(skipped, cursor)
    for row in range(cursor, stop):
        at = rows + row * ROW_WIDTH
        no = words[at + LIMIT_NO]
        if not (0 <= no < wanted.shape[0] and wanted[no]):
            continue
        used = _used_if_live(words, at, now)
        if used < 0:
            continue
        max_value = max_values[no]
        ratio = used / max_value if max_value > 0 else 1.0
        counts[no] += 1
        for k in range(thresholds.shape[0]):
            if ratio >= thresholds[k]:
                reached[k, no] += 1
        while s < skipped.shape[0] and skipped[s] < row:
            s += 1
        if s < skipped.shape[0] and skipped[s] == row:
            continue
        others[no] += 1
        sums[0, no] += max_value
        sums[1, no] += used
        sums[2, no] += min(max(max_value - used, 0), max_value)
        expires = words[at + EXPIRES_AT]
        soonest[no] = min(soonest[no], (expires - now) / 1000 if expires > now else 0.0)
    out[1] = stop if stop < used_rows else -1
    _unlock(words)


@njit(cache=True, nogil=True)
def _free_limit_numbers(words: np.ndarray, now: int) -> None:
    """Free the slots of retired limits whose counters are gone (when a reload needs room).

    One pass over the rows: a row of a retired limit whose window has ended and that holds nothing
    is freed (it could only resume a limit that came back, as an empty counter); any other row keeps
    its limit number. A retired limit past its window and REUSE_GRACE_MS with no row left is freed."""
    _release_expired(words, now)
    limits = words[H_OFF_LIMITS]
    slots = words[H_LIMIT_SLOTS]
    rows = words[H_OFF_ROWS]
    held = np.zeros(slots, dtype=np.bool_)
    for row in range(words[H_ROWS_USED]):
        at = rows + row * ROW_WIDTH
        no = words[at + LIMIT_NO]
        if no < 0:
            continue
        if (words[limits + no * LIMIT_WIDTH + STATE] == LIMIT_RETIRED and words[at + EXPIRES_AT] <= now
                and words[at + RESERVED] == 0):
            _free_row(words, row)
        else:
            held[no] = True
    for no in range(slots):
        at = limits + no * LIMIT_WIDTH
        if (words[at + STATE] == LIMIT_RETIRED and not held[no]
                and now >= words[at + RETIRED_UNTIL] + REUSE_GRACE_MS):
            for j in range(LIMIT_WIDTH):
                words[at + j] = 0  # LIMIT_FREE
            words[H_LIMITS_USED] -= 1
            words[H_LIMITS_FREED] += 1


@njit(cache=True, nogil=True)
def _free_slots(words: np.ndarray, wanted: int, into: np.ndarray) -> int:
    """The first `wanted` free limit slots, into `into`; how many there were."""
    limits = words[H_OFF_LIMITS]
    found = 0
    for slot in range(words[H_LIMIT_SLOTS]):
        if found == wanted:
            break
        if words[limits + slot * LIMIT_WIDTH + STATE] == LIMIT_FREE:
            into[found] = slot
            found += 1
    return found


@njit(cache=True, nogil=True)
def register_limits(words: np.ndarray, ids: np.ndarray, windows: np.ndarray, retire: np.ndarray,
                    retire_ids: np.ndarray, now: int, pid: int, numbers: np.ndarray, out: np.ndarray) -> None:
    """Find or add each limit identity (ids[k] = its 128-bit hash as two int64) and mark it active;
    mark the limit numbers in `retire` retired for one window, each only if it still holds the
    identity `retire_ids` names (another worker may have given the number to a new limit since).

    One pass over the slots finds the known identities (a binary search among the sorted new ones
    per slot: about a millisecond for 65,536 slots); new ones take free slots. All or nothing: when
    there are not enough free slots even after freeing those of removed limits whose counters are
    gone, nothing is registered and every numbers[k] is -1."""
    if not _lock(words, pid):
        out[R_CODE] = BUSY
        return
    limits = words[H_OFF_LIMITS]
    n = ids.shape[0]
    order = np.argsort(ids[:, 0])
    highs = np.empty(n, dtype=np.int64)
    for i in range(n):
        highs[i] = ids[order[i], 0]
    numbers[:] = -1
    for slot in range(words[H_LIMIT_SLOTS]):
        at = limits + slot * LIMIT_WIDTH
        if words[at + STATE] == LIMIT_FREE:
            continue
        i = np.searchsorted(highs, words[at + ID_HIGH])
        while i < n and highs[i] == words[at + ID_HIGH]:
            if ids[order[i], 1] == words[at + ID_LOW]:
                numbers[order[i]] = slot
            i += 1
    missing = 0
    for k in range(n):
        if numbers[k] < 0:
            missing += 1
    free = np.empty(missing, dtype=np.int64)
    if missing and _free_slots(words, missing, free) < missing:
        _free_limit_numbers(words, now)
        if _free_slots(words, missing, free) < missing:
            numbers[:] = -1
            out[R_CODE] = WITHIN
            _unlock(words)
            return
    taken = 0
    for k in range(n):
        if numbers[k] < 0:
            numbers[k] = free[taken]
            taken += 1
            at = limits + numbers[k] * LIMIT_WIDTH
            words[at + ID_HIGH] = ids[k, 0]
            words[at + ID_LOW] = ids[k, 1]
            words[at + WINDOW_MS] = windows[k]
            words[H_LIMITS_USED] += 1
        at = limits + numbers[k] * LIMIT_WIDTH
        words[at + STATE] = LIMIT_ACTIVE
        words[at + RETIRED_UNTIL] = 0
    for k in range(retire.shape[0]):
        at = limits + retire[k] * LIMIT_WIDTH
        if (words[at + STATE] == LIMIT_ACTIVE and words[at + ID_HIGH] == retire_ids[k, 0]
                and words[at + ID_LOW] == retire_ids[k, 1]):
            words[at + STATE] = LIMIT_RETIRED
            words[at + RETIRED_UNTIL] = now + words[at + WINDOW_MS]
    out[R_CODE] = WITHIN
    _unlock(words)
