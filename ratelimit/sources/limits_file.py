"""Hot reload of a Limitador limits file, or of a directory of YAML files (`serve --maas DIR`).

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

A directory is watched the same way, file by file: its YAML files' fingerprints together are the
directory's, and the content hash covers every file, so adding, removing or changing any of them
is a change. What the content means is the loader's business: by default a Limitador limits file,
for `--maas` the MaaS custom resources translated (ratelimit.sources.maas). What is configured
with the result is the target's: the engine by default, the metrics' `-L` labels for a labels file.

Polling costs one stat per file per interval, needs no extra dependency and also works where inotify does
not (NFS, some container overlays); kubelet itself only syncs ConfigMaps every minute or so, so a
one-second poll adds nothing noticeable.

A running service parses what changed in a child process (`poll_off_loop`, ratelimit.sources.
parser_process: one per service, started with it, niced, ~55 MB): libyaml builds a whole
document in one C call that holds the interpreter lock (0.3 s for 2,000 limits), and validating
compiles every CEL text; in a thread either would stall every decision that long. The child sends
the limits back pickled one by one; they are rebuilt here in slices on the event loop (paced,
ratelimit.pacing), from the compile cache (ratelimit.cel) for texts seen before, and a limit whose
pickled bytes are those of a limit already in use is that limit, not rebuilt: a reload costs the
decision process about the work of the limits that really changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ratelimit.counters import StorageError
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit, LimitsError, parse_limits
from ratelimit.pacing import Pace
from ratelimit.sources.parser_process import ParserProcess, ParserProcessDied
from ratelimit.sources.status import ConfigStatus

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0

# A file modified this recently may be rewritten within the file system's timestamp granularity
# with the same size, leaving the fingerprint unchanged (git's "racily clean" problem). While the
# file is that fresh, its content is hashed on every poll instead of trusting the fingerprint.
_RACY_SECONDS = 2.0

# Stands for "no content" (missing or unreadable file), so that state is reported once, not per poll.
_MISSING_DIGEST = b"missing"

YAML_SUFFIXES = (".yaml", ".yml")

Loader = Callable[[Mapping[str, bytes]], Any]
"""What the target is configured with (limits, by default), from the watched files' contents
(path -> bytes); raises LimitsError."""


class Configurable(Protocol):
    """What a watcher keeps configured: a RateLimiter, or anything else with `configure_with`."""

    def configure_with(self, config: Any, /) -> object: ...


def single_file_text(files: Mapping[str, bytes]) -> tuple[str, str]:
    """(path, text) of a watched single file; LimitsError when it is not UTF-8."""
    [(source, data)] = files.items()
    try:
        return source, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LimitsError(source, f"not UTF-8: {exc}") from None


def load_limits_file_contents(files: Mapping[str, bytes]) -> list[Limit]:
    """The default loader: one Limitador limits file."""
    source, text = single_file_text(files)
    return parse_limits(text, source)


def yaml_files(path: str | os.PathLike[str]) -> list[str]:
    """A file itself, or a directory's *.yaml / *.yml files (recursively, sorted). Hidden entries are
    skipped: a ConfigMap volume holds its files twice, under `..<timestamp>/` and through `..data`."""
    root = Path(path)
    if not root.is_dir():
        return [os.fspath(path)]
    return sorted(
        str(p) for p in root.rglob("*")
        if p.suffix in YAML_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


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
    """Keeps a RateLimiter's limits in step with a limits file (or a directory read by `loader`),
    recording each outcome in a ConfigStatus.

    Use `load()` once at startup (it raises LimitsError, so a bad file stops the service), then run
    the watcher with `async with watcher:` or `start()` / `await stop()`.
    """

    def __init__(
        self, path: str | os.PathLike[str], engine: RateLimiter | Configurable, status: ConfigStatus,
        interval: float = DEFAULT_INTERVAL, loader: Loader = load_limits_file_contents, what: str = "limits",
        parser: ParserProcess | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"reload interval must be positive, got {interval}")
        self.path = os.fspath(path)
        self.engine = engine
        self.status = status
        self.interval = interval
        self.loader = loader
        self.what = what
        """What the file holds, for the log: "limits", "custom metric labels"."""
        self._fingerprint: tuple[_Fingerprint, ...] | _Missing | None = None
        self._settling = False
        self._digest: bytes | None = None
        """Hash of the last content tried (applied or rejected), so each version is handled once."""
        self._task: asyncio.Task[None] | None = None
        self._parser = parser or ParserProcess()
        """The child process that parses reloads, started with the watcher (`__aenter__`); one the
        caller passes is the caller's to stop (a service shares one among its watchers)."""
        self._owns_parser = parser is None
        self._rebuilt: dict[bytes, Any] = {}
        """The items (limits) of the last content parsed, by their pickled bytes: a reload keeps an
        unchanged limit as the object it already is instead of rebuilding it."""

    # -- loading ---------------------------------------------------------------------------------

    def load(self) -> Any:
        """Read, parse and apply the file now; raises LimitsError and leaves everything as it was."""
        self._fingerprint = self._stat()
        try:
            content = self._read()
        except _RejectedContent as rejected:
            raise rejected.error from None
        outcome = self._parse(content)
        if isinstance(outcome, _RejectedContent):
            raise outcome.error
        assert outcome is not None
        self._apply(*outcome)
        if isinstance(outcome[1], list):  # at start-up, before any decision: pickling costs nothing
            self._rebuilt = {pickle.dumps(item): item for item in outcome[1]}
        return outcome[1]

    def poll(self) -> bool:
        """Look at the file once; apply it if its content changed. True when new limits were applied.

        A changed fingerprint is only acted on at the next poll, once it has stayed the same: an
        in-place write truncates before it writes, and reading in between would apply an empty
        file, dropping every limit and its counters. A bad or missing file keeps the current limits
        and is recorded in the status (once per distinct content) and logged with the LimitsError's
        file / line / field.
        """
        return self._conclude(self._examine())

    async def poll_off_loop(self) -> bool:
        """`poll`, with stat and read in a thread and parsing and validating (seconds for thousands
        of limits) in a child process, so the event loop keeps deciding; only applying the result
        runs on the loop."""
        outcome = await asyncio.to_thread(self._examine)
        if isinstance(outcome, _Content):
            outcome = await self._parse_in_child(outcome)
        return self._conclude(outcome)

    async def _parse_in_child(self, content: _Content) -> _Outcome:
        try:
            pickled, error = await self._parser.call(_parse_pickled, self.loader, content.files)
        except ParserProcessDied:
            # The child died (killed, out of memory): parse here this once, start a new child next time.
            logger.error("the %s parser process died; parsing %s in the service process", self.what, self.path)
            return self._parse(content)
        if error is not None:
            return _RejectedContent(content.digest, error)
        if isinstance(pickled, bytes):
            return content.digest, pickle.loads(pickled)
        items = await _unpickle_paced(pickled, self._rebuilt)
        self._rebuilt = dict(zip(pickled, items, strict=True))
        return content.digest, items

    def _parse(self, content: _Content) -> _Outcome:
        parsed, error = _parse(self.loader, content.files)
        return _RejectedContent(content.digest, error) if error is not None else (content.digest, parsed)

    def _examine(self) -> _Outcome | _Content:
        """Everything but applying: stat, and when due, read and parse. Touches only the watcher's
        own fingerprint state, never the engine, so it may run in a thread."""
        fingerprint = self._stat()
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._settling = True
            return None
        settled, self._settling = self._settling, False
        if not (settled or self._is_racy(fingerprint)):
            return None
        if isinstance(fingerprint, _Missing):
            return _RejectedContent(_MISSING_DIGEST, LimitsError(self.path, fingerprint.reason))
        try:
            content = self._read()
        except _RejectedContent as rejected:
            return rejected
        if content.digest == self._digest:
            if settled:
                logger.debug("limits file %s changed on disk, same content: nothing to apply", self.path)
            return None
        return content

    def _conclude(self, outcome: _Outcome | _Content) -> bool:
        if isinstance(outcome, _Content):
            outcome = self._parse(outcome)
        if outcome is None:
            return False
        if isinstance(outcome, _RejectedContent):
            return self._reject(outcome.digest, outcome.error)
        try:
            self._apply(*outcome)
        except StorageError as exc:
            # The storage cannot take these limits (the memory table's limit registry is full): the
            # old limits stay, and like a bad file it is reported once, in the log and /status, until
            # the content changes (not a traceback every poll).
            return self._reject(outcome[0], LimitsError(self.path, f"cannot apply these limits: {exc}"))
        return True

    def _stat(self) -> tuple[_Fingerprint, ...] | _Missing:
        fingerprints = []
        try:
            for path in yaml_files(self.path):
                stat = os.stat(path)  # follows the whole symlink chain, like reading does
                real_path = os.path.realpath(path)
                fingerprints.append(
                    _Fingerprint(real_path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                )
        except OSError as exc:
            return _Missing(f"cannot read: {exc}")
        return tuple(fingerprints)

    @staticmethod
    def _is_racy(fingerprint: tuple[_Fingerprint, ...] | _Missing) -> bool:
        return isinstance(fingerprint, tuple) and any(
            time.time() - file.mtime_ns / 1e9 < _RACY_SECONDS for file in fingerprint
        )

    def _read(self) -> _Content:
        """The files' content and its hash. Read once, so the hash is of exactly what is parsed."""
        files: dict[str, bytes] = {}
        digest = hashlib.sha256()
        try:
            for path in yaml_files(self.path):
                with open(path, "rb") as handle:
                    files[path] = handle.read()
                # Name and length delimit each file, so moving bytes between files is a change.
                digest.update(f"{path}\0{len(files[path])}\0".encode() + files[path])
        except OSError as exc:
            raise _RejectedContent(_MISSING_DIGEST, LimitsError(self.path, f"cannot read: {exc}")) from None
        empty = [path for path, data in files.items() if not data]
        if empty:
            # Nobody means "no limits" by a 0-byte file (that is `[]`): it is a write caught half-done
            # (truncated, not yet written) or a full disk. Applying it would drop every limit.
            raise _RejectedContent(digest.digest(), LimitsError(
                empty[0], "the file is empty (0 bytes), probably a partial write; write `[]` to remove all limits"
            ))
        return _Content(digest.digest(), files)

    def _apply(self, digest: bytes, limits: Any) -> None:
        # Only an engine has limits to lose; another target (the -L labels) has no such warning.
        before = len(self.engine.all_limits()) if isinstance(self.engine, RateLimiter) else 0
        self.engine.configure_with(limits)
        self._digest = digest
        self.status.applied()
        if not limits and before:
            # An explicit `[]` or a file of comments is a legal way to lift every limit, and also what
            # a botched template renders: say loudly what it did.
            logger.warning(
                "limits file %s has no limits: removed all %d limits (config version %d)",
                self.path, before, self.status.config_version,
            )
            return
        logger.info(
            "applied %d %s from %s (config version %d)", len(limits), self.what, self.path, self.status.config_version
        )

    def _reject(self, digest: bytes, error: LimitsError) -> bool:
        if digest == self._digest:
            return False  # already reported this very content
        self._digest = digest
        self.status.failed(str(error))
        logger.error("%s file rejected, keeping the previous %s: %s", self.what, self.what, error)
        return False

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled. An unexpected error is logged and polling goes on: a watcher that
        dies silently would freeze the limits without anyone noticing."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_off_loop()
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
        if self._owns_parser:
            await self._parser.stop()

    async def __aenter__(self) -> LimitsFileWatcher:
        await self._parser.start()
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _RejectedContent(Exception):
    def __init__(self, digest: bytes, error: LimitsError) -> None:
        super().__init__(str(error))
        self.digest = digest
        self.error = error


@dataclass(frozen=True)
class _Content:
    """Files read, not yet parsed."""

    digest: bytes
    files: dict[str, bytes]


def _parse(loader: Loader, files: Mapping[str, bytes]) -> tuple[Any, LimitsError | None]:
    """(the loader's result, None) or (None, the LimitsError): what a parser process sends back."""
    try:
        return loader(files), None
    except LimitsError as exc:
        return None, exc


def _parse_pickled(loader: Loader, files: Mapping[str, bytes]) -> tuple[list[bytes] | bytes, LimitsError | None]:
    """`_parse` in a parser process, the result pickled here item by item (a list) or whole: so
    that the service rebuilds it in paced slices on its event loop, not in one long unpickling
    (which would hold the interpreter lock against every decision)."""
    parsed, error = _parse(loader, files)
    if isinstance(parsed, list):
        return [pickle.dumps(item) for item in parsed], error
    return pickle.dumps(parsed), error


async def _unpickle_paced(pickled: list[bytes], known: Mapping[bytes, Any]) -> list[Any]:
    """The items, each rebuilt from its bytes unless `known` has it already, in paced slices."""
    pace = Pace()
    items: list[Any] = []
    for item in pickled:
        found = known.get(item)
        items.append(pickle.loads(item) if found is None else found)
        if pace.worked_a_slice():
            await pace.rest()
    return items


_Outcome = tuple[bytes, Any] | _RejectedContent | None
"""What one look at the file found: content to apply (hash, limits), content to reject, or nothing new."""
