"""The files moe_dispatch writes and reads back: JSON objects under $MOE_DISPATCH_CACHE_DIR
(default ~/.cache/moe_dispatch), the roofline and the Triton autotuning results.

A cache saves time; it must never cost a call. A missing file is an empty cache. A file that
cannot be read, is truncated (a killed process, a full disk), holds JSON that is not an object,
or is stamped by another version of what it depends on is ignored with one warning, and the
next write replaces it. Writes go to a temporary file in the same folder, then os.replace: a
reader sees the old file or the new one, never half of either, even with two writers at once.
(Numba's compile cache is another matter: kernels/numba/caching.py.)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

CACHE_DIR_ENV = "MOE_DISPATCH_CACHE_DIR"

_warned: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "moe_dispatch")


def warn_once(path: Path, problem: str) -> None:
    """A warning per file and problem in a process: a broken file read on every call (a
    read-only one is never rewritten) says so once."""
    if (str(path), problem) not in _warned:
        _warned.add((str(path), problem))
        warnings.warn(f"moe_dispatch: cache file {path}: {problem}", RuntimeWarning, stacklevel=3)


def read_object(path: Path) -> dict:
    """The JSON object in path; {} when there is none or (with a warning) it is unusable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        warn_once(path, f"unreadable ({exc}); ignored, it will be rewritten")
        return {}
    if not isinstance(data, dict):
        warn_once(path, f"holds a JSON {type(data).__name__}, not an object; ignored, it will be rewritten")
        return {}
    return data


def read_stamped(path: Path, stamp: dict) -> dict:
    """The entries of a file written by write_stamped with this stamp; {} (with a warning) for a
    file stamped otherwise, written by another version of the package, say."""
    data = read_object(path)
    if not data:
        return {}
    if data.get("stamp") != stamp or not isinstance(data.get("entries"), dict):
        warn_once(path, f"written for {data.get('stamp')}, not {stamp}; ignored, it will be rewritten")
        return {}
    return data["entries"]


def write_object(path: Path, data: dict) -> None:
    """Write data to path atomically; a folder that cannot be written leaves the cache unwritten
    (with a warning), never fails the caller."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f"{path.name}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warn_once(path, f"cannot be written ({exc}); results are not cached")
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_stamped(path: Path, stamp: dict, entries: dict) -> None:
    write_object(path, {"stamp": stamp, "entries": entries})
