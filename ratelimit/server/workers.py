"""`ratelimit serve --workers N`: N processes serving the same ports and one counter table.

One Python process decides on one core. With workers, a supervisor process (this module) creates
the memory storage's counter table in shared memory, then starts N worker processes; each runs the
whole service (`run_service`) on the shared table, its HTTP and gRPC sockets bound with
SO_REUSEPORT, so the kernel spreads connections over the workers. Decisions stay exact across
workers: every decision is one kernel call under the table's own cross-process lock word, so
stacked limits, reservations (reserve in one worker, commit in another), expiry and capacity are
shared exactly as in one process. Redis storages need nothing shared: each worker has its own
connections.

Every worker watches the limits file itself and applies the same content within a poll interval.
A worker that dies is logged and restarted (the count of restarts is in the log line); SIGTERM or
SIGINT to the supervisor is passed to every worker, which drains as a single service does.

Metrics: the supervisor gives the workers one prometheus_client multiprocess directory
(`PROMETHEUS_MULTIPROC_DIR`, a fresh temporary one, removed at exit); each worker writes its
values there and a scrape of any worker reports the sum (ratelimit.metrics). When a worker dies,
the supervisor marks it dead there (its live gauges go; its counters stay, so none are lost).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from ratelimit.server.app import GRACEFUL_SHUTDOWN_SECONDS, ServerError, ServiceConfig
from ratelimit.storage.memory import DEFAULT_CAPACITY
from ratelimit.storage.table import CounterTable, TableError

logger = logging.getLogger(__name__)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_PAUSE = 0.5  # seconds between restarts of one worker slot, so a crash loop does not spin


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def _check_port_free(host: str, port: int) -> None:
    """SO_REUSEPORT would let the workers share a port with an unrelated process silently."""
    if port == 0:
        raise ServerError("--workers needs fixed ports: with port 0 every worker would pick its own")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def _worker_main(config: ServiceConfig, index: int) -> None:
    import asyncio

    from ratelimit import logs
    from ratelimit.server.app import run_service

    logs.configure_logging(config.log_level, config.structured_logs)  # a spawned process starts bare
    _stop_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor passes signals on; ^C reaches all at once
    try:
        asyncio.run(run_service(config))
    except Exception:
        logger.exception("worker %d failed", index)
        raise SystemExit(1) from None


def _stop_with_parent() -> None:
    """Ask Linux for a SIGTERM when the supervisor dies (killed -9): no orphaned worker keeps the ports."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_workers(config: ServiceConfig, workers: int) -> int:
    """Supervise `workers` worker processes until a signal; returns the exit status."""
    _check_port_free(config.http_ip, config.http_port)
    _check_port_free(config.rls_ip, config.rls_port)
    try:
        metrics_dir = tempfile.mkdtemp(prefix="ratelimit-metrics-")
    except OSError as exc:
        raise ServerError(f"cannot start {workers} workers: no directory for their metrics files: {exc} "
                          "(set TMPDIR to a writable directory)") from None
    table = None
    if config.storage == "memory":
        try:
            table = CounterTable.create(config.cache_size or DEFAULT_CAPACITY, shared=True)
        except TableError as exc:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            raise ServerError(f"cannot start {workers} workers: {exc}") from None
    # Read by prometheus_client when a worker imports it: spawned workers inherit the environment.
    previous_dir = os.environ.get(_MULTIPROC_ENV)
    os.environ[_MULTIPROC_ENV] = metrics_dir
    worker_config = replace(config, workers=1, reuse_port=True, shared_table=table.name if table else None,
                            metrics_dir=metrics_dir)
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess | None] = [None] * workers
    restarts = 0
    stopping = False

    def start(index: int) -> BaseProcess:
        process = context.Process(target=_worker_main, args=(worker_config, index), name=f"worker-{index}")
        process.start()
        return process

    def on_signal(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        logger.warning("%s received, stopping %d workers", signal.Signals(signum).name, workers)
        stopping = True
        for process in processes:
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(workers):
            processes[index] = start(index)
        logger.info("started %d workers on HTTP %s:%d and gRPC %s:%d", workers, config.http_ip, config.http_port,
                    config.rls_ip, config.rls_port)
        while not stopping:
            time.sleep(0.2)
            for index, process in enumerate(processes):
                if process is None or process.is_alive() or stopping:
                    continue
                restarts += 1
                if process.pid is not None:
                    mark_process_dead(process.pid, metrics_dir)
                logger.error("worker %d (pid %s) exited with %s; restarting it (%d restarts so far)",
                             index, process.pid, process.exitcode, restarts)
                time.sleep(_RESTART_PAUSE)
                processes[index] = start(index)
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_SECONDS + 5
        for process in processes:
            if process is not None:
                process.join(max(0.1, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous_dir is None:
            os.environ.pop(_MULTIPROC_ENV, None)
        else:
            os.environ[_MULTIPROC_ENV] = previous_dir
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if table is not None:
            table.close()
            table.unlink()
    return 0
