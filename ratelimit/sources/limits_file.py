"""Hot reload of a Limitador limits file.

Limitador watches the file's directory with inotify events and misses a same-directory atomic
rename (`mv tmp limits.yaml`, issue #523). This watcher polls instead: every `interval` seconds it
stats the path (following symlinks) and resolves its real path. Any way of replacing the file
changes that fingerprint:

- an in-place write changes size / mtime / ctime;
- an atomic rename puts a new inode at the path;
- a Kubernetes ConfigMap update (`limits.yaml -> ..data/limits.yaml`, `..data -> ..<timestamp>`,
  swapped by renaming a new `..data_tmp` symlink over `..data`) changes the real path and inode.

A changed fingerprint only says "look again" (one poll later, once it has stopped changing, so a
write in progress is not read half-done): the limits are applied only when the content hash differs
from the last content seen, so a `touch` or a ConfigMap resync with the same data does not bump
`config_version`. A change is thus applied within about two intervals.

Polling costs one stat per interval, needs no extra dependency and also works where inotify does
not (NFS, some container overlays); kubelet itself only syncs ConfigMaps every minute or so, so a
one-second poll adds nothing noticeable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass

from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit, LimitsError, parse_limits
from ratelimit.server.state import ConfigStatus

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0

# A file modified this recently may be rewritten within the file system's timestamp granularity
# with the same size, leaving the fingerprint unchanged (git's "racily clean" problem). While the
# file is that fresh, its content is hashed on every poll instead of trusting the fingerprint.
_RACY_SECONDS = 2.0

# Stands for "no content" (missing or unreadable file), so that state is reported once, not per poll.
_MISSING_DIGEST = b"missing"


@dataclass(frozen=True)
class _Fingerprint:
    real_path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class _Missing:
    """The path cannot be stat'ed (deleted, dangling symlink): a state of its own, reported once."""

    reason: str


class LimitsFileWatcher:
    """Keeps a RateLimiter's limits in step with a limits file, recording each outcome in a ConfigStatus.

    Use `load()` once at startup (it raises LimitsError, so a bad file stops the service), then run
    the watcher with `async with watcher:` or `start()` / `await stop()`.
    """

    def __init__(
        self, path: str | os.PathLike[str], engine: RateLimiter, status: ConfigStatus, interval: float = DEFAULT_INTERVAL
    ) -> None:
        if interval <= 0:
            raise ValueError(f"reload interval must be positive, got {interval}")
        self.path = os.fspath(path)
        self.engine = engine
        self.status = status
        self.interval = interval
        self._fingerprint: _Fingerprint | _Missing | None = None
        self._settling = False
        self._digest: bytes | None = None
        """Hash of the last content tried (applied or rejected), so each version is handled once."""
        self._task: asyncio.Task[None] | None = None

    # -- loading ---------------------------------------------------------------------------------

    def load(self) -> list[Limit]:
        """Read, parse and apply the file now; raises LimitsError and leaves everything as it was."""
        self._fingerprint = self._stat()
        try:
            digest, limits = self._read()
        except _RejectedContent as rejected:
            raise rejected.error from None
        self._apply(digest, limits)
        return limits

    def poll(self) -> bool:
        """Look at the file once; apply it if its content changed. True when new limits were applied.

        A changed fingerprint is only acted on at the next poll, once it has stayed the same: an
        in-place write truncates before it writes, and reading in between would apply an empty
        file, dropping every limit and its counters. A bad or missing file keeps the current limits
        and is recorded in the status (once per distinct content) and logged with the LimitsError's
        file / line / field.
        """
        fingerprint = self._stat()
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._settling = True
            return False
        settled, self._settling = self._settling, False
        if not (settled or self._is_racy(fingerprint)):
            return False
        if isinstance(fingerprint, _Missing):
            return self._reject(_MISSING_DIGEST, LimitsError(self.path, fingerprint.reason))
        try:
            digest, limits = self._read()
        except _RejectedContent as rejected:
            return self._reject(rejected.digest, rejected.error)
        if digest == self._digest:
            if settled:
                logger.debug("limits file %s changed on disk, same content: nothing to apply", self.path)
            return False
        self._apply(digest, limits)
        return True

    def _stat(self) -> _Fingerprint | _Missing:
        try:
            stat = os.stat(self.path)  # follows the whole symlink chain, like reading does
            real_path = os.path.realpath(self.path)
        except OSError as exc:
            return _Missing(f"cannot read: {exc}")
        return _Fingerprint(real_path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    @staticmethod
    def _is_racy(fingerprint: _Fingerprint | _Missing) -> bool:
        return isinstance(fingerprint, _Fingerprint) and time.time() - fingerprint.mtime_ns / 1e9 < _RACY_SECONDS

    def _read(self) -> tuple[bytes, list[Limit]]:
        """The content's hash and limits. Reads once, so the hash is of exactly what was parsed."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise _RejectedContent(_MISSING_DIGEST, LimitsError(self.path, f"cannot read: {exc}")) from None
        digest = hashlib.sha256(data).digest()
        try:
            return digest, parse_limits(data.decode("utf-8"), self.path)
        except UnicodeDecodeError as exc:
            raise _RejectedContent(digest, LimitsError(self.path, f"not UTF-8: {exc}")) from None
        except LimitsError as exc:
            raise _RejectedContent(digest, exc) from None

    def _apply(self, digest: bytes, limits: list[Limit]) -> None:
        self.engine.configure_with(limits)
        self._digest = digest
        self.status.applied()
        logger.info(
            "applied %d limits from %s (config version %d)", len(limits), self.path, self.status.config_version
        )

    def _reject(self, digest: bytes, error: LimitsError) -> bool:
        if digest == self._digest:
            return False  # already reported this very content
        self._digest = digest
        self.status.failed(str(error))
        logger.error("limits file rejected, keeping the previous limits: %s", error)
        return False

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled. An unexpected error is logged and polling goes on: a watcher that
        dies silently would freeze the limits without anyone noticing."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:
                logger.exception("limits file watcher failed while checking %s", self.path)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"watch {self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> LimitsFileWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _RejectedContent(Exception):
    def __init__(self, digest: bytes, error: LimitsError) -> None:
        super().__init__(str(error))
        self.digest = digest
        self.error = error
