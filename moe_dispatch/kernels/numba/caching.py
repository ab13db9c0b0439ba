"""numba.njit for the kernels: its on-disk compile cache treats a damaged file as a miss, and
an edit to any kernel module as a change to every kernel.

Every kernel is compiled with cache=True, into $NUMBA_CACHE_DIR or the __pycache__ next to its
source. Numba unpickles whatever the files hold (numba/core/caching.py: the index in
IndexDataCacheFile._load_index, a compiled overload in _load_data and CacheImpl.rebuild), so an
index or data file that a killed process or a full disk left truncated or garbled raises
(UnpicklingError, EOFError, ...) from every later call, in every later process. Here such a
load is a miss: one warning, the kernel compiles again, and saving it rewrites the broken files
(a garbled index reads as empty, so the save writes a new one; a garbled data file's entry is
overwritten in place).

Numba stamps a kernel's cache with its own source file's time and size, but a kernel compiles
the functions it calls from other modules into itself: an edit there left it running the old
code. The stamp here covers every module of this directory.

Processes that share a cache (the ranks of a job, a server's workers, the test suite and the
child that compiles ahead of it) may save overloads of one kernel at once. Numba's save reads
the index, picks the first free data file's name, writes the index and then the data: two saves
at once both took name 1, and the index could send one signature to the other's machine code.
Here a save holds an exclusive lock on a file beside the index (where fcntl exists: Linux,
macOS) and writes the data before the index, so that a loader never meets an entry without
its data.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings

try:
    import fcntl
except ImportError:  # Windows: saves stay as Numba makes them
    fcntl = None

import numba
from numba.core.caching import FunctionCache, IndexDataCacheFile

_warned: set[str] = set()


def _warn_once(path: str, exc: Exception) -> None:
    # A save after a failed load reads the same index again: one warning, not two.
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"moe_dispatch: Numba's compile cache {path} is damaged ({exc!r}); "
                      "compiling again and rewriting it", RuntimeWarning)


class _HealingCacheFile(IndexDataCacheFile):
    def _load_index(self) -> dict:
        try:
            overloads = super()._load_index()
            if not isinstance(overloads, dict):
                raise TypeError(f"the index holds a {type(overloads).__name__}, not a dict")
            return overloads
        except Exception as exc:  # noqa: BLE001 (a damaged file raises whatever unpickling it raises)
            _warn_once(self._index_path, exc)
            return {}

    def save(self, key, data):
        with self._locked():
            overloads = self._load_index()
            name = overloads.get(key)
            if name is None:
                taken = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            self._save_data(name, data)
            if overloads.get(key) != name:
                self._save_index({**overloads, key: name})

    @contextlib.contextmanager
    def _locked(self):
        if fcntl is None:
            yield
            return
        with open(self._index_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _kernels_stamp() -> tuple:
    """The time and size of every kernel module: what a compiled kernel may hold the code of."""
    here = os.path.dirname(os.path.abspath(__file__))
    stats = {name: os.stat(os.path.join(here, name)) for name in sorted(os.listdir(here)) if name.endswith(".py")}
    return tuple((name, stat.st_mtime, stat.st_size) for name, stat in stats.items())


class _HealingCache(FunctionCache):
    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _HealingCacheFile(self._cache_path, self._impl.filename_base, _kernels_stamp())

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as exc:  # noqa: BLE001 (a damaged data file: see the module docstring)
            _warn_once(f"{self._cache_path}/{self._impl.filename_base}.*.nbc", exc)
            return None


def njit(**options):
    """numba.njit(**options), with the cache above when options ask for one."""
    def decorate(fn):
        dispatcher = numba.njit(**options)(fn)
        # NUMBA_DISABLE_JIT=1 returns fn itself, which has no cache
        if isinstance(getattr(dispatcher, "_cache", None), FunctionCache):
            dispatcher._cache = _HealingCache(dispatcher.py_func)
        return dispatcher
    return decorate
