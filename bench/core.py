"""Core benchmarks, side by side in one run: P1 (in-process decisions/s against the `limits` package),
P2 (the numba kernel alone) and P5 (memory per live counter at 1M counters).

    python -m bench.core [--quick] [--json PATH]

Prints the machine and a Markdown table (median, best, ratio to `limits`, target), and writes every
raw figure as JSON (default bench/results/core.json). Timings are reported, never asserted.
See bench/README.md for what each number means and why the comparison is fair.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import limits
import numba
import numpy as np
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage as LimitsMemoryStorage
from limits.strategies import FixedWindowRateLimiter

from bench.report import machine_facts, write_results
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage import kernels
from ratelimit.storage.memory import DEFAULT_CAPACITY, MemoryStorage
from ratelimit.storage.table import CounterTable

# -- the workload --------------------------------------------------------------------------------

NAMESPACE = "bench"
CONDITION = "descriptors[0]['model'] == 'gpt'"
VARIABLE = "descriptors[0]['user']"
Windows = tuple[tuple[int, str], ...]
"""(seconds, the same window in `limits`' notation: "N/<that>")."""
WINDOWS: Windows = ((60, "minute"), (3600, "hour"), (86400, "day"))  # 1m, 1h, 24h stacked on every user
P5_WINDOWS: Windows = ((3600, "hour"), (86400, "day"), (7 * 86400, "7 days"))
"""P5's stack (1h, 24h, 168h): no counter may expire while a million are being built, which can take
longer than a minute on a loaded machine (and `limits` drops expired keys in the background)."""
DAILY_CAP = 1_000_000_000
"""The 24h budget. The 1m and 1h windows allow twice as much, so only an exhausted daily cap ever
denies (the usual way a token quota runs out), and a denied request passes the first two windows."""
USERS = 10_000
SEED = 20_260_611
SETTLE_SECONDS = 0.05
"""Pause before each timed pass, so background work of the previous one (limits' 10 ms expiry timer)
is over before the clock starts."""
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "core.json"

Descriptors = list[dict[str, str]]
MakePass = Callable[[list[Descriptors]], Callable[[], int]]
"""A P1 contestant: given a pass's requests (built untimed), the pass, which returns how many it denied."""
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    mode: str
    p1_requests: int
    """Requests per timed pass (the same fixed-seed stream for every contestant)."""
    p1_repeats: int
    p2_requests: int
    p2_repeats: int
    p5_users: int
    """Users built for P5; each has 3 counters (one per window), so counters = 3 x users."""


FULL = Config("full", p1_requests=60_000, p1_repeats=5, p2_requests=2_000_000, p2_repeats=5, p5_users=333_334)
QUICK = Config("quick", p1_requests=20_000, p1_repeats=3, p2_requests=1_000_000, p2_repeats=3, p5_users=20_000)


def window_cap(seconds: int) -> int:
    return DAILY_CAP if seconds == 86400 else 2 * DAILY_CAP


def stacked_limits(windows: Windows = WINDOWS) -> list[Limit]:
    """Our limits: one per window, same condition, one variable (the user)."""
    return [
        Limit(NAMESPACE, window_cap(seconds), seconds, (CONDITION,), (VARIABLE,), name=f"tokens-{seconds}s")
        for seconds, unit in windows
    ]


def limits_items(windows: Windows = WINDOWS) -> list[RateLimitItem]:
    """The `limits` package's equivalent: `parse("N/minute")` and so on."""
    return [parse(f"{window_cap(seconds)}/{unit}") for seconds, unit in windows]


def user_name(user: int) -> str:
    return f"user-{user:07d}"


def request_stream(count: int) -> np.ndarray:
    """Which user sends each request: uniform over USERS, the same for every run and contestant."""
    return np.random.default_rng(SEED).integers(0, USERS, count)


def build_requests(users: Sequence[int] | np.ndarray) -> list[Descriptors]:
    """One RLS-style descriptor list per request, with fresh strings (as a server decodes them)."""
    return [[{"model": "gpt", "user": user_name(user)}] for user in np.asarray(users).tolist()]


PRECHARGED_USERS = range(0, USERS, 2)
"""Every other user is charged before timing, in both variants (the order in which counters are made
shapes the engine's memory layout, which alone moves throughput by some percent)."""


def precharge(deny_half: bool) -> int:
    """What each pre-charged user is charged on every window: the whole daily cap, so that ~half the
    requests are denied, or 1, so that none is."""
    return DAILY_CAP if deny_half else 1


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: list[float]
    operations: int
    denied: int
    """Denied decisions in the last timed pass."""

    @property
    def median_rate(self) -> float:
        return self.operations / statistics.median(self.seconds)

    @property
    def best_rate(self) -> float:
        return self.operations / min(self.seconds)

    @property
    def denied_fraction(self) -> float:
        return self.denied / self.operations


def measure_side_by_side(prepares: Sequence[Callable[[], Callable[[], T]]], count_denied: Callable[[T], int],
                         operations: int, repeats: int) -> list[Timing]:
    """Time every contestant `repeats` times, round-robin, after one warm-up pass each, so that load
    from elsewhere on the machine falls on all of them alike. `prepare` builds a pass's inputs
    (untimed) and returns the pass; `count_denied` reads the last pass's result after the clock stops."""
    for prepare in prepares:
        prepare()()  # warm-up: every counter exists, numba is compiled, the memo is filled
    seconds: list[list[float]] = [[] for _ in prepares]
    results: list[Any] = [None] * len(prepares)
    for _ in range(repeats):
        for i, prepare in enumerate(prepares):
            run = prepare()
            gc.collect()
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            results[i] = run()
            seconds[i].append(time.perf_counter() - start)
    return [Timing(s, operations, count_denied(r)) for s, r in zip(seconds, results, strict=True)]


# -- P1: in-process decisions/s ------------------------------------------------------------------


def limits_contestant(deny_half: bool) -> MakePass:
    """`limits` FixedWindow + memory: the condition in Python, then hit() on each window in order.
    Not atomic: a request denied by its 3rd window has already been charged on the first two."""
    limiter = FixedWindowRateLimiter(LimitsMemoryStorage())
    items = limits_items()
    for user in PRECHARGED_USERS:
        for item in items:
            limiter.hit(item, user_name(user), cost=precharge(deny_half))

    def make_pass(requests: list[Descriptors]) -> Callable[[], int]:
        def run() -> int:
            denied = 0
            for descriptors in requests:
                entries = descriptors[0]
                if entries["model"] != "gpt":
                    continue
                user = entries["user"]
                for item in items:
                    if not limiter.hit(item, user):
                        denied += 1
                        break
            return denied

        return run

    return make_pass


def our_engine(loop: asyncio.AbstractEventLoop, deny_half: bool) -> RateLimiter:
    """Our engine on the memory storage, with half the users pre-charged (their daily cap spent if
    `deny_half`)."""
    engine = RateLimiter(MemoryStorage(), stacked_limits())

    async def charge() -> None:
        for user in PRECHARGED_USERS:
            await engine.report(NAMESPACE, [{"model": "gpt", "user": user_name(user)}], precharge(deny_half))

    loop.run_until_complete(charge())
    return engine


def single_call_contestant(loop: asyncio.AbstractEventLoop, deny_half: bool) -> MakePass:
    """One `await engine.check_and_report(...)` per request: what a server pays per RLS call."""
    engine = our_engine(loop, deny_half)

    def make_pass(requests: list[Descriptors]) -> Callable[[], int]:
        async def decide_all() -> int:
            denied = 0
            for descriptors in requests:
                if (await engine.check_and_report(NAMESPACE, descriptors, 1)).limited:
                    denied += 1
            return denied

        return lambda: loop.run_until_complete(decide_all())

    return make_pass


def bench_p1(config: Config) -> list[Row]:
    users = request_stream(config.p1_requests)
    loop = asyncio.new_event_loop()
    try:
        variants = (False, True)
        contestants = [
            contestant
            for deny_half in variants
            for contestant in (limits_contestant(deny_half), single_call_contestant(loop, deny_half))
        ]
        prepares = [lambda make_pass=make_pass: make_pass(build_requests(users)) for make_pass in contestants]
        timings = measure_side_by_side(prepares, int, config.p1_requests, config.p1_repeats)
    finally:
        loop.close()
    rows = []
    for k in range(len(variants)):
        baseline, single = timings[2 * k : 2 * k + 2]
        rows.append(rate_row("P1", "limits FixedWindow + memory, 3 hit()/request", baseline, None, "baseline", None))
        ratio = single.median_rate / baseline.median_rate
        rows.append(rate_row("P1", "ours, await check_and_report() per request", single, ratio, ">= 10x limits",
                             ratio >= 10))
    return rows


# -- P2: the numba kernel alone ------------------------------------------------------------------


@numba.njit(nogil=True)  # not cached: numba's cache would keep an old kernels.decide inlined here
def decide_all(words: np.ndarray, max_values: np.ndarray, plans: np.ndarray, users: np.ndarray, now_ms: int,
               out: np.ndarray) -> int:
    """One kernels.decide call per request (each takes and gives back the table lock, hashes and
    looks up its 3 keys, checks, charges), from compiled code: the kernel without Python."""
    denied = 0
    pid = 1
    for r in range(users.shape[0]):
        kernels.decide(words, max_values, plans[users[r]], kernels.CHECK_AND_UPDATE, 1, now_ms, pid, -1, 0, 0, out)
        if out[0] >= 0:
            denied += 1
    return denied


def kernel_contestant(config: Config, deny_half: bool) -> Callable[[], Callable[[], int]]:
    """A table of USERS x 3 live counters built through the storage, one plan (limit numbers and
    key bytes, as MemoryStorage builds them) per user, and a pre-drawn stream of users."""
    loop = asyncio.new_event_loop()
    engine = our_engine(loop, deny_half)
    loop.close()
    storage = engine.storage
    assert isinstance(storage, MemoryStorage)
    plan_arrays = [storage._plan(engine.counters_for(NAMESPACE, [{"model": "gpt", "user": user_name(user)}]))[0]
                   for user in range(USERS)]
    plans = np.stack(plan_arrays)
    users = request_stream(config.p2_requests).astype(np.int64)
    out = np.zeros(kernels.RESULT_WORDS + len(WINDOWS) * kernels.STATE_WIDTH, dtype=np.int64)
    words, max_values = storage.table.words, storage._max_values

    def make_pass() -> Callable[[], int]:
        now_ms = _now_ms()
        return lambda: decide_all(words, max_values, plans, users, now_ms, out)

    return make_pass


def bench_p2(config: Config) -> list[Row]:
    prepares = [kernel_contestant(config, deny_half) for deny_half in (False, True)]
    timings = measure_side_by_side(prepares, int, config.p2_requests, config.p2_repeats)
    what = f"numba kernels.decide, one call per request (lock, 3 key look-ups), {config.p2_requests:,} requests"
    return [rate_row("P2", what, timing, None, ">= 10M/s", timing.median_rate >= 10e6) for timing in timings]


def _now_ms() -> int:
    return round(time.monotonic() * 1000)


# -- P5: memory per live counter, each measurement in a fresh process ----------------------------

P5_WARMUP_USERS = 1_000


def build_our_counters(users: int) -> tuple[object, int, int]:
    """users x 3 live counters through `engine.check_and_report`, one request at a time as a server
    makes them, on a shared-memory table of the default capacity (what `--workers` uses). The
    engine's descriptor memo is kept: it is part of what a real process holds. Returns what must
    stay alive, the live counters and the bytes of the table block that are resident."""
    table = CounterTable.create(DEFAULT_CAPACITY, shared=True)
    storage = MemoryStorage(table=table)
    engine = RateLimiter(storage, stacked_limits(P5_WINDOWS))

    async def build() -> None:
        for user in range(users):
            await engine.check_and_report(NAMESPACE, [{"model": "gpt", "user": user_name(user)}], 1)
            # A server's event loop turns between requests; the engine frees forgotten memo entries
            # a chunk per turn, so a loop that never turned would hold every one of them.
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(build())
    loop.close()
    assert table.name is not None
    resident = os.stat(os.path.join("/dev/shm", table.name)).st_blocks * 512
    table.unlink()  # the name only; this process keeps its mapping until it exits
    return (engine, table), storage.counter_count, resident


def build_limits_keys(users: int) -> tuple[object, int, int]:
    """users x 3 keys in `limits`' MemoryStorage, through hit() as in P1. Its background expiry timer
    is stopped before measuring, so the key list it copies on every sweep is not counted."""
    storage = LimitsMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    items = limits_items(P5_WINDOWS)
    for user in range(users):
        name = user_name(user)
        for item in items:
            limiter.hit(item, name)
    storage.timer.cancel()
    storage.timer.join()
    return storage, len(storage.storage), 0


BUILDERS: dict[str, Callable[[int], tuple[object, int, int]]] = {
    "ours": build_our_counters,
    "limits": build_limits_keys,
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(kind: str, users: int) -> dict[str, Any]:
    """Run in a fresh process: resident set growth while building `kind`'s counters. A small build
    first loads the kernels and warms every code path, so one-off costs are not counted."""
    BUILDERS[kind](P5_WARMUP_USERS)
    gc.collect()
    before = resident_bytes()
    start = time.perf_counter()
    kept, counters, table_bytes = BUILDERS[kind](users)
    gc.collect()
    held = resident_bytes() - before
    seconds = time.perf_counter() - start
    del kept
    return {"kind": kind, "method": "rss", "counters": counters, "bytes": held, "bytes_per_counter": held / counters,
            "table_bytes": table_bytes, "table_bytes_per_counter": table_bytes / counters, "build_seconds": seconds}


def bench_p5(config: Config) -> list[Row]:
    context = multiprocessing.get_context("spawn")
    # Two at a time (memory figures do not depend on the CPU), one fresh process per measurement.
    with ProcessPoolExecutor(max_workers=2, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {kind: pool.submit(measure_memory, kind, config.p5_users) for kind in ("ours", "limits")}
        ours, theirs = futures["ours"].result(), futures["limits"].result()
    per = ours["bytes_per_counter"]
    table_per = ours["table_bytes_per_counter"]
    return [
        Row("P5", f"ours, process RSS growth (engine + memo + shared table), {ours['counters']:,} counters",
            "B/counter", per, None, None, per / theirs["bytes_per_counter"], "<= 200 B/counter", per <= 200, ours),
        Row("P5", f"ours, shared table block resident (storage only), {ours['counters']:,} counters", "B/counter",
            table_per, None, None, table_per / theirs["bytes_per_counter"], "", None, ours),
        Row("P5", f"limits MemoryStorage, process RSS growth, {theirs['counters']:,} keys", "B/counter",
            theirs["bytes_per_counter"], None, None, None, "baseline", None, theirs),
    ]


# -- report --------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    what: str
    unit: str
    median: float
    best: float | None
    denied: float | None
    vs_limits: float | None
    """Ours / limits, on medians: decisions/s (higher is better) or bytes (lower is better)."""
    target: str
    met: bool | None
    detail: dict[str, Any] = field(default_factory=dict)


def rate_row(target_id: str, what: str, timing: Timing, vs_limits: float | None, target: str,
             met: bool | None) -> Row:
    return Row(target_id, what, "decisions/s", timing.median_rate, timing.best_rate, timing.denied_fraction,
               vs_limits, target, met, {"seconds": timing.seconds, "operations": timing.operations,
                                        "denied": timing.denied})


def machine() -> dict[str, Any]:
    return machine_facts(numba=numba.__version__, numpy=np.__version__, limits=limits.__version__)


def format_value(value: float, unit: str) -> str:
    if unit == "decisions/s":
        return f"{value / 1e6:.2f}M/s" if value >= 1e6 else f"{value / 1e3:.1f}k/s"
    return f"{value:.1f} B"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| id | measurement | denied | median | best | vs limits | target | met |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join([
            row.id,
            row.what,
            "" if row.denied is None else f"{row.denied:.1%}",
            format_value(row.median, row.unit),
            "" if row.best is None else format_value(row.best, row.unit),
            "" if row.vs_limits is None else f"{row.vs_limits:.2f}x",
            row.target,
            {True: "yes", False: "**no**", None: ""}[row.met],
        ]) + " |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in info["load_average_at_start"])
    return (f"machine: nproc={info['nproc']} (usable {info['usable_cpus']}), {info['cpu']}, load {load}; "
            f"Python {info['python']}, numba {info['numba']}, numpy {info['numpy']}, limits {info['limits']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run (~20 s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--only", default="P1,P2,P5",
                        help="which of P1,P2,P5 to run (the JSON keeps the other rows of its previous run)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    only = {name.strip() for name in args.only.split(",")}
    info = machine()
    print(machine_line(info), flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    for name, bench in (("P1", bench_p1), ("P2", bench_p2), ("P5", bench_p5)):
        if name not in only:
            continue
        section_start = time.perf_counter()
        rows += bench(config)
        print(f"{name} done in {time.perf_counter() - section_start:.1f} s", flush=True)
    total = time.perf_counter() - started
    print(f"\n{config.mode} run, {total:.0f} s; P1 {config.p1_requests:,} requests per pass over {USERS:,} users, "
          f"median and best of {config.p1_repeats}; P2 median and best of {config.p2_repeats}; "
          f"P5 at {3 * config.p5_users:,} counters\n")
    print(markdown_table(rows))
    results = [asdict(row) for row in rows]
    if only != {"P1", "P2", "P5"} and args.json.exists():
        kept = [row for row in json.loads(args.json.read_text())["results"] if row["id"] not in only]
        results = sorted(kept + results, key=lambda row: row["id"])
    write_results(args.json, {"machine": info, "config": asdict(config), "total_seconds": total,
                              "only": sorted(only), "results": results})


if __name__ == "__main__":
    main()
