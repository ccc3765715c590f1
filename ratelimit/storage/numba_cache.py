"""Where numba keeps its compiled kernels: a directory that can be written, or a temporary one.

numba caches `@njit(cache=True)` kernels in `NUMBA_CACHE_DIR`, else beside the code in
`__pycache__`. In a container neither may be writable: a non-root user (OpenShift runs images
under a random UID) cannot write the installed package, and a read-only root file system may not
have the `NUMBA_CACHE_DIR` the image sets. numba then refuses to compile at import and every
command, even `ratelimit validate`, crashes. `ensure_cache_dir()` runs before numba is imported
(`ratelimit/storage/__init__.py`) and, when the chosen directory cannot be written, points
`NUMBA_CACHE_DIR` at a per-user directory under the temporary directory instead, and says so on
stderr once. Only the cache is affected: an unwritable cache costs a compile at each start.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

_KERNELS_DIR = Path(__file__).resolve().parent


def writable(directory: Path) -> bool:
    """True when `directory` exists or can be made, and a file can be created in it (os.access is
    not enough: it says yes to root on a read-only file system)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def fallback_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"ratelimit-numba-cache-{os.getuid()}"


def ensure_cache_dir(env: MutableMapping[str, str] = os.environ, kernels_dir: Path = _KERNELS_DIR) -> Path | None:
    """Point NUMBA_CACHE_DIR at a writable directory if numba's own choice is not; returns the new
    directory, or None when numba's choice was fine (or nothing writable was found)."""
    configured = env.get("NUMBA_CACHE_DIR", "")
    chosen = Path(configured) if configured else kernels_dir / "__pycache__"
    if writable(chosen):
        return None
    fallback = fallback_dir()
    if not writable(fallback):
        return None  # nothing better to offer: numba reports its own error
    env["NUMBA_CACHE_DIR"] = str(fallback)
    what = f"NUMBA_CACHE_DIR={configured}" if configured else f"{chosen}"
    print(f"ratelimit: numba cache {what} is not writable; compiled kernels are cached in {fallback}",
          file=sys.stderr)
    return fallback
