"""The counter table's memory: one byte block laid out as kernels.py describes, either private to
this process or a named POSIX shared-memory block that worker processes attach to.

    table = CounterTable.create(capacity, shared=True)    # the supervisor, before starting workers
    worker = CounterTable.attach(table.name)               # each worker process, by name
    storage = MemoryStorage(table=worker)                  # decides against the shared counters
    ...
    worker.close(); table.close(); table.unlink()          # at shutdown (unlink once, by the creator)

Pages are only touched as rows, key blocks and index slots are used, so a large capacity costs
address space, not resident memory, until counters fill it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from ratelimit.storage import kernels as k

VERSION = 1
DEFAULT_KEY_BYTES_PER_COUNTER = 64
"""Key bytes (the variable values of a counter) the table has room for on average per counter."""
DEFAULT_LIMIT_SLOTS = 1 << 16
_ALIGN_WORDS = 8  # regions start on 64-byte cache lines
_SHM_DIR = "/dev/shm"
_LOCK_WAIT_BEFORE_CHECKING_HOLDER = 0.5  # seconds: past this, look whether the holder still lives


class TableError(RuntimeError):
    """A table block that cannot be created or attached (wrong name, not a counter table, too big)."""


@dataclass(frozen=True)
class Layout:
    capacity: int
    index_slots: int
    key_blocks: int
    limit_slots: int
    reservation_slots: int
    hold_slots: int
    heap_slots: int

    @classmethod
    def for_capacity(cls, capacity: int, key_bytes_per_counter: int = DEFAULT_KEY_BYTES_PER_COUNTER,
                     reservation_slots: int | None = None, limit_slots: int = DEFAULT_LIMIT_SLOTS) -> Layout:
        if capacity < 1:
            raise ValueError(f"memory storage capacity must be at least 1 counter, got {capacity}")
        if capacity >= 1 << 30:
            raise ValueError(f"memory storage capacity must be below {1 << 30} counters, got {capacity}")
        if key_bytes_per_counter < 1:
            raise ValueError(f"key bytes per counter must be at least 1, got {key_bytes_per_counter}")
        if limit_slots < 8 or limit_slots & (limit_slots - 1):
            raise ValueError(f"limit slots must be a power of two of at least 8, got {limit_slots}")
        reservations = reservation_slots if reservation_slots is not None else max(1024, min(capacity, 1 << 18))
        if reservations < 1:
            raise ValueError(f"reservation slots must be at least 1, got {reservations}")
        return cls(
            capacity=capacity,
            index_slots=max(8, 1 << (2 * capacity - 1).bit_length()),
            key_blocks=max(capacity, -(-capacity * key_bytes_per_counter // k.BLOCK_BYTES)),
            limit_slots=limit_slots,
            reservation_slots=reservations,
            hold_slots=4 * reservations,
            heap_slots=2 * reservations,
        )

    def offsets(self) -> tuple[list[int], int]:
        """Word offsets of rows, index, key blocks, limits, reservations, holds, heap; total words."""
        sizes = [
            self.capacity * k.ROW_WIDTH,
            self.index_slots // 2,  # two int32 slots per word
            self.key_blocks * k.BLOCK_WORDS,
            self.limit_slots * k.LIMIT_WIDTH,
            self.reservation_slots * k.RES_WIDTH,
            self.hold_slots * k.HOLD_WIDTH,
            self.heap_slots * k.HEAP_WIDTH,
        ]
        offsets = []
        position = k.HEADER_WORDS
        for size in sizes:
            position = -(-position // _ALIGN_WORDS) * _ALIGN_WORDS
            offsets.append(position)
            position += size
        return offsets, position


@dataclass(frozen=True)
class TableStats:
    capacity: int
    live_rows: int
    """Rows holding a counter (live, or kept for a window after their window ended)."""
    free_rows: int
    key_blocks: int
    free_key_blocks: int
    reservations: int
    reservation_slots: int
    limits: int
    """Limit slots taken (configured, or removed and still holding counters or within their window)."""
    limit_slots: int
    limits_freed: int
    """Slots of removed limits freed for new limits once their counters were gone."""
    refusals: dict[str, int]
    freed_rows: int
    lock_busy: int
    lock_stolen: int


MappedBlock = shared_memory.SharedMemory | mmap.mmap
"""What keeps a shared table mapped: the creator's SharedMemory, or an attached process's mmap."""


class CounterTable:
    """A table block and its name (None when private). Use `create` or `attach`."""

    def __init__(self, buf: np.ndarray, name: str | None, handle: MappedBlock | None) -> None:
        if len(buf) < 8 * k.HEADER_WORDS or len(buf) % 8:
            raise TableError(f"shared memory block {name!r} is {len(buf)} bytes: not a counter table")
        self.words = buf.view(np.int64)
        self.name = name
        self._handle = handle  # the SharedMemory or mmap keeping the block mapped
        if self.words[k.H_MAGIC] != k.MAGIC or self.words[k.H_TOTAL_WORDS] * 8 != len(buf):
            raise TableError(f"shared memory block {name!r} is not a counter table of this version")
        self.capacity = int(self.words[k.H_CAPACITY])
        self.limit_slots = int(self.words[k.H_LIMIT_SLOTS])

    @property
    def header(self) -> np.ndarray:
        return self.words[: k.HEADER_WORDS]

    @classmethod
    def create(cls, capacity: int, *, shared: bool = False, name: str | None = None,
               key_bytes_per_counter: int = DEFAULT_KEY_BYTES_PER_COUNTER,
               reservation_slots: int | None = None, limit_slots: int = DEFAULT_LIMIT_SLOTS) -> CounterTable:
        """A new, empty table. With `shared`, a named shared-memory block (`name`, or a fresh one)
        that other processes attach to with `CounterTable.attach(table.name)`."""
        layout = Layout.for_capacity(capacity, key_bytes_per_counter, reservation_slots, limit_slots)
        offsets, total_words = layout.offsets()
        total = 8 * total_words
        handle: MappedBlock | None = None
        if shared:
            name = name or f"ratelimit-{os.getpid()}-{secrets.token_hex(4)}"
            _check_shm_room(total, capacity)
            try:
                block = shared_memory.SharedMemory(name=name, create=True, size=total)
            except FileExistsError:
                raise TableError(f"shared memory block {name!r} already exists; pick another name") from None
            except OSError as exc:
                raise TableError(f"cannot create a {total:,}-byte shared memory block {name!r}: {exc}") from None
            assert block.buf is not None
            buf = np.ndarray((total,), dtype=np.uint8, buffer=block.buf)
            handle = block
        else:
            name = None
            buf = np.zeros(total, dtype=np.uint8)  # calloc'd: pages are zero until touched
        header = buf[: k.HEADER_WORDS * 8].view(np.int64)
        header[k.H_CAPACITY] = layout.capacity
        header[k.H_INDEX_SLOTS] = layout.index_slots
        header[k.H_KEY_BLOCKS] = layout.key_blocks
        header[k.H_LIMIT_SLOTS] = layout.limit_slots
        header[k.H_RES_SLOTS] = layout.reservation_slots
        header[k.H_HOLD_SLOTS] = layout.hold_slots
        header[k.H_HEAP_SLOTS] = layout.heap_slots
        for word, offset in zip((k.H_OFF_ROWS, k.H_OFF_INDEX, k.H_OFF_BLOCKS, k.H_OFF_LIMITS, k.H_OFF_RES,
                                 k.H_OFF_HOLDS, k.H_OFF_HEAP), offsets, strict=True):
            header[word] = offset
        header[k.H_TOTAL_WORDS] = total_words
        for word in (k.H_FREE_ROW, k.H_FREE_BLOCK, k.H_FREE_RES, k.H_FREE_HOLD):
            header[word] = -1
        header[k.H_CYCLE_MIN] = k.NEVER
        header[k.H_MAGIC] = k.MAGIC  # last: an attaching process sees a complete header or none
        return cls(buf, name, handle)

    @classmethod
    def attach(cls, name: str) -> CounterTable:
        """Map an existing shared table by name (from another process). The caller never unlinks it;
        the creator does. Python's SharedMemory is not used here because in Python < 3.13 it would
        register the block with this process's resource tracker, which unlinks it when this
        process exits (while the other processes still use it)."""
        if not name or "/" in name:
            raise TableError(f"not a shared memory block name: {name!r}")
        path = os.path.join(_SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TableError(f"cannot attach counter table {name!r}: {exc.strerror} ({path})") from None
        try:
            size = os.fstat(fd).st_size
            if size < k.HEADER_WORDS * 8:
                raise TableError(f"shared memory block {name!r} is {size} bytes: not a counter table")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        buf = np.frombuffer(mapping, dtype=np.uint8)
        return cls(buf, name, mapping)

    def close(self) -> None:
        """Unmap the block in this process (the storage using it must not decide afterwards)."""
        handle, self._handle = self._handle, None
        self.words = np.zeros(k.HEADER_WORDS, dtype=np.int64)
        if handle is None:
            return
        try:
            handle.close()
        except BufferError:
            pass  # arrays still view the block; it is unmapped when they are gone

    def unlink(self) -> None:
        """Remove the block's name (the creator, at shutdown); processes attached keep their mapping."""
        if self.name is None:
            return
        try:
            shared_memory.SharedMemory(name=self.name).unlink()
        except FileNotFoundError:
            pass

    # -- the lock, seen from Python ----------------------------------------------------------------

    def wait_for_lock(self, waited_since: float) -> None:
        """Called when a kernel found the lock taken past its spin: yield, and take the lock over if
        its holder has died (a worker killed in the middle of a decision)."""
        k.note_busy(self.words)
        if time.monotonic() - waited_since > _LOCK_WAIT_BEFORE_CHECKING_HOLDER:
            holder = int(k.lock_holder(self.words))
            if holder > 0 and holder != os.getpid() and not _alive(holder):
                k.steal_lock(self.words, holder, os.getpid())
        time.sleep(0)

    def stats(self) -> TableStats:
        header = self.header
        return TableStats(
            capacity=self.capacity,
            live_rows=int(header[k.H_LIVE_ROWS]),
            free_rows=int(header[k.H_CAPACITY] - header[k.H_ROWS_USED] + header[k.H_FREE_ROWS]),
            key_blocks=int(header[k.H_KEY_BLOCKS]),
            free_key_blocks=int(header[k.H_KEY_BLOCKS] - header[k.H_BLOCKS_USED] + header[k.H_FREE_BLOCKS]),
            reservations=int(header[k.H_LIVE_RES]),
            reservation_slots=int(header[k.H_RES_SLOTS]),
            limits=int(header[k.H_LIMITS_USED]),
            limit_slots=self.limit_slots,
            limits_freed=int(header[k.H_LIMITS_FREED]),
            refusals={reason: int(header[word]) for reason, word in k.REFUSAL_REASONS.items()},
            freed_rows=int(header[k.H_FREED_ROWS]),
            lock_busy=int(header[k.H_LOCK_BUSY]),
            lock_stolen=int(header[k.H_LOCK_STOLEN]),
        )


def shm_free_bytes() -> int | None:
    """Bytes free in /dev/shm (None when it cannot be told)."""
    try:
        stats = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _check_shm_room(total: int, capacity: int) -> None:
    """The block is sparse: creating it succeeds whatever its size, and a page that /dev/shm has no
    room for fails only when first touched, killing the process with SIGBUS under load. Refused at
    start instead, with the remedy (Docker gives a container a 64 MB /dev/shm by default)."""
    free = shm_free_bytes()
    if free is not None and total > free:
        raise TableError(
            f"the shared counter table for {capacity:,} counters needs {total / 2**20:,.0f} MiB of {_SHM_DIR}, "
            f"which has {free / 2**20:,.0f} MiB free (Docker gives a container 64 MB unless run with "
            "--shm-size; on Kubernetes mount an emptyDir with medium: Memory and a sizeLimit at /dev/shm); "
            "give it more room or ask for fewer counters (--cache N)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, on a tiny private table, so the first
    real decision does not take long enough to miss Envoy's RLS timeout."""
    global _warm
    if _warm:
        return
    table = CounterTable.create(4, reservation_slots=2, limit_slots=8)
    words = table.words
    out = np.zeros(k.RESULT_WORDS + k.STATE_WIDTH, dtype=np.int64)
    ids = np.array([[1, 2]], dtype=np.int64)
    numbers = np.zeros(1, dtype=np.int64)
    k.register_limits(words, ids, np.array([1000], dtype=np.int64), np.zeros(0, dtype=np.int64),
                      np.zeros((0, 2), dtype=np.int64), 0, 1, numbers, out)
    max_values = np.full(8, 10, dtype=np.int64)
    plan = np.array([1, numbers[0], 4, 0, int.from_bytes(b"warm", "little")], dtype=np.int64)
    for mode in (k.CHECK, k.CHECK_AND_UPDATE, k.UPDATE, k.RESERVE, k.COMMIT):
        k.decide(words, max_values, plan, mode, 1, 1, 1, int(out[k.R_SLOT]), 7, 5, out)
    k.list_rows(words, np.ones(8, dtype=np.bool_), np.zeros(0, dtype=np.uint8), -1, 0, 8, 1, 1,
                np.zeros((4, k.LISTED_WIDTH), dtype=np.int64), np.zeros(64, dtype=np.int64), out)
    k.add_up_rows(words, np.ones(8, dtype=np.bool_), max_values, np.ones(1), np.zeros(0, dtype=np.int64), 0, 8, 1, 1,
                  np.zeros(8, dtype=np.int64), np.zeros((1, 8), dtype=np.int64), np.zeros(8, dtype=np.int64),
                  np.zeros((3, 8), dtype=np.int64), np.full(8, np.inf), out)
    k.sweep(words, 8, 10_000, 1, out)
    k.lock_holder(words)
    k.steal_lock(words, -1, 1)
    k.note_busy(words)
    _warm = True
