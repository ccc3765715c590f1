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
import multiprocessing
import os
import statistics
import time
import tracemalloc
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
from ratelimit.storage.memory import MemoryStorage

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
    p5_batch: int = 50_000


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


# -- P5: memory per live counter, each measurement in a fresh process ----------------------------

TRACEMALLOC, RSS = "tracemalloc", "rss"
P5_WARMUP_USERS = 1_000


def build_our_counters(users: int, batch: int) -> tuple[object, int]:
    """users x 3 live counters through the engine, then the descriptor memo forgotten (a reload
    with the same limits keeps every counter), so only the storage is left."""
    engine = RateLimiter(MemoryStorage(), stacked_limits(P5_WINDOWS))
    loop = asyncio.new_event_loop()

    async def charge(requests: list[Descriptors]) -> None:
        for descriptors in requests:
            await engine.check_and_report(NAMESPACE, descriptors, 1)

    for start in range(0, users, batch):
        loop.run_until_complete(charge(build_requests(range(start, min(users, start + batch)))))
    loop.close()
    engine.configure_with(engine.all_limits())
    storage = engine.storage
    assert isinstance(storage, MemoryStorage)
    return engine, storage.counter_count


def build_limits_keys(users: int, batch: int) -> tuple[object, int]:
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
    return storage, len(storage.storage)


BUILDERS: dict[str, Callable[[int, int], tuple[object, int]]] = {
    "ours": build_our_counters,
    "limits": build_limits_keys,
}


def memory_now(method: str) -> int:
    if method == TRACEMALLOC:
        return tracemalloc.get_traced_memory()[0]
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(kind: str, method: str, users: int, batch: int) -> dict[str, Any]:
    """Run in a fresh process: memory held after building `kind`'s counters, as the difference of
    traced Python + numpy allocations (tracemalloc) or of the resident set size (RSS). A small
    build first loads the kernels and warms every code path, so one-off costs are not counted."""
    BUILDERS[kind](P5_WARMUP_USERS, batch)
    gc.collect()
    if method == TRACEMALLOC:
        tracemalloc.start()
    before = memory_now(method)
    start = time.perf_counter()
    kept, counters = BUILDERS[kind](users, batch)
    gc.collect()
    held = memory_now(method) - before
    seconds = time.perf_counter() - start
    del kept
    return {"kind": kind, "method": method, "counters": counters, "bytes": held,
            "bytes_per_counter": held / counters, "build_seconds": seconds}


def bench_p5(config: Config) -> list[Row]:
    jobs = [("ours", TRACEMALLOC), ("limits", TRACEMALLOC), ("ours", RSS), ("limits", RSS)]  # longest first
    context = multiprocessing.get_context("spawn")
    # Two at a time (memory figures do not depend on the CPU), one fresh process per measurement.
    with ProcessPoolExecutor(max_workers=2, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(measure_memory, kind, method, config.p5_users, config.p5_batch) for kind, method in jobs]
        results = {(r["kind"], r["method"]): r for r in (future.result() for future in futures)}
    rows = []
    for method in (TRACEMALLOC, RSS):
        ours, theirs = results[("ours", method)], results[("limits", method)]
        ratio = ours["bytes_per_counter"] / theirs["bytes_per_counter"]
        per = ours["bytes_per_counter"]
        target, met = ("<= 200 B/counter", per <= 200) if method == TRACEMALLOC else ("(allocator slack incl.)", None)
        rows.append(Row("P5", f"ours MemoryStorage, {method} delta, {ours['counters']:,} counters", "B/counter",
                        per, None, None, ratio, target, met, ours))
        rows.append(Row("P5", f"limits MemoryStorage, {method} delta, {theirs['counters']:,} keys", "B/counter",
                        theirs["bytes_per_counter"], None, None, None, "baseline", None, theirs))
    return rows


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
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    info = machine()
    print(machine_line(info), flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    # P2 (the numba kernel alone) timed the batch kernel, which is gone with the batch path; it comes
    # back as a bench of the per-request kernel.
    for name, bench in (("P1", bench_p1), ("P5", bench_p5)):
        section_start = time.perf_counter()
        rows += bench(config)
        print(f"{name} done in {time.perf_counter() - section_start:.1f} s", flush=True)
    total = time.perf_counter() - started
    print(f"\n{config.mode} run, {total:.0f} s; P1 {config.p1_requests:,} requests per pass over {USERS:,} users, "
          f"median and best of {config.p1_repeats}; "
          f"P5 at {3 * config.p5_users:,} counters\n")
    print(markdown_table(rows))
    write_results(args.json, {"machine": info, "config": asdict(config), "total_seconds": total,
                              "results": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
