# Before anything here imports numba: its cache directory must be writable (numba_cache.py).
from ratelimit.storage.numba_cache import ensure_cache_dir

ensure_cache_dir()
