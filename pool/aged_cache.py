"""The aged-guest cache: age a guest once per configuration, not once per run.

Aging (pool.guest.workload: a million churn steps) is a pure function of the guest's state
before it (its page allocator and churn, themselves made from the configuration and seed, plus
whatever a strategy's boot reserved), the step count and the model's code. So the result is
cached on disk, keyed by a hash of exactly those: ``sha256(MODEL_VERSION, the hash of the
model's own source files, repr(GuestConfig), steps, the hash of the allocator's and churn's
state before aging)``. ``compare``, ``run``, the guest demo and the daemon's start-up then age
once per configuration.

Where: ``$XDG_CACHE_HOME/sharedpool/aged/`` (``~/.cache`` when unset), one file per key.
The directories are made 0700; a file is read only when it, and the directory holding it, are
owned by the user and writable by no one else (nothing is read from a place another user
can write), opened without following a symlink and checked on the open descriptor.

The file (a small explicit format, not a pickle: loading builds nothing the file names):
``MAGIC``, one line of JSON (the key, the sha256 of the payload, the arrays' names, type
codes and byte lengths, the scalars), then the payload: the arrays' raw bytes in order. On
load the magic, key, lengths and payload hash are verified; a file that fails any check
(corrupt, truncated, foreign, of another format or unsafe) is ignored with one warning and
the guest is aged again and the file rewritten. Writes go to a temporary file in the same
directory, then ``os.replace`` (atomic: a reader sees the old file or the new, never half).

``MODEL_VERSION`` and when to bump it: the hash of the model's Python sources (buddy, pcp,
migratetype, workload) already changes every key when any of them changes. Bump
``MODEL_VERSION`` for a change that alters what aging produces without touching them (the
compiled core alone, a numpy behaviour the model relies on) or a change of the cached state's
layout (which arrays and scalars are stored) — any change after which an old file would load
into a different guest than aging would build now.

``--no-cache`` (pool.guest.options, on every command that takes the guest options) or
``SHAREDPOOL_NO_CACHE=1`` turns the cache off for the process: every guest is aged.

Size: bounded by ``SHAREDPOOL_AGED_CACHE_MAX_BYTES`` (default 2 GiB): after each store the
least recently used files are deleted until the rest fit (the file just written stays, even
alone above the bound). A hit marks its file used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import stat
import tempfile
import warnings
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool.guest import Guest

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAGIC",
    "MAX_BYTES_ENV",
    "MODEL_VERSION",
    "NO_CACHE_ENV",
    "AgedCache",
    "age",
    "cache_dir",
    "default_cache",
    "disable",
]

MODEL_VERSION = 1
"""Bump when aging's result changes other than through the hashed sources (module docstring)."""

MAGIC = b"sharedpool-aged-guest 1\n"
_MAX_HEADER = 1 << 20  # the header line's end is looked for in this much (it is ~8 KB)
NO_CACHE_ENV = "SHAREDPOOL_NO_CACHE"
MAX_BYTES_ENV = "SHAREDPOOL_AGED_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
"""The cache's size bound: after a store, the least recently used files go until the rest
fit (a 16 GiB guest's file is ~48 MB, a 64 GiB one's ~180 MB; a sweep over seeds and sizes,
or every change to the model's sources, adds one per configuration)."""
_MODEL_MODULES = ("buddy.py", "pcp.py", "migratetype.py", "workload.py", "units.py")
_ALLOCATOR_ARRAYS = (
    "_state",
    "_mt",
    "_pageblock_mt",
    "_next",
    "_prev",
    "_nr_free",
    "_free_pages",
    "_counters",
    "_pcp_data",
)
_disabled = False


def disable() -> None:
    """Turn the cache off for this process (``--no-cache``)."""
    global _disabled
    _disabled = True


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sharedpool/aged`` (``~/.cache/sharedpool/aged`` when unset or not
    absolute, as the XDG base directory specification says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "sharedpool" / "aged"


def default_cache() -> AgedCache | None:
    """The cache commands use: None when turned off (``--no-cache``, SHAREDPOOL_NO_CACHE=1)."""
    if _disabled or os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return None
    return AgedCache(cache_dir(), max_bytes_from_env())


def max_bytes_from_env() -> int:
    """SHAREDPOOL_AGED_CACHE_MAX_BYTES (bytes, >= 0), or DEFAULT_MAX_BYTES when unset or not
    a number (one warning: a bad value must not stop a run)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        warnings.warn(
            f"{MAX_BYTES_ENV}={raw!r} is not a byte count >= 0; using {DEFAULT_MAX_BYTES}",
            RuntimeWarning,
            stacklevel=2,
        )
        return DEFAULT_MAX_BYTES
    return value


def _source_digest() -> str:
    guest_dir = Path(__file__).resolve().parent / "guest"
    h = hashlib.sha256()
    for name in _MODEL_MODULES:
        h.update(name.encode() + b"\0" + (guest_dir / name).read_bytes())
    return h.hexdigest()


def _state_arrays(guest: Guest) -> list[tuple[str, Any]]:
    """The state aging changes: the allocator's arrays and the churn's live allocations."""
    a = guest.allocator
    out: list[tuple[str, Any]] = [(name, getattr(a, name)) for name in _ALLOCATOR_ARRAYS]
    churn = guest.churn
    out += [("churn._short", churn._short), ("churn._long", churn._long)]
    return out


def _churn_scalars(guest: Guest) -> dict[str, Any]:
    c = guest.churn
    version, words, gauss = c._rng.getstate()
    return {
        "steps_done": c.steps_done,
        "allocations_made": c.allocations_made,
        "frees_made": c.frees_made,
        "short_pages": c._short_pages,
        "long_pages": c._long_pages,
        "cpu": c._cpu,
        "rng": [version, list(words), gauss],
    }


def _typecode(x: Any) -> str:
    return "B" if isinstance(x, bytearray) else str(x.typecode)


class AgedCache:
    """Aged guests on disk under ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._warned = False

    def key(self, guest: Guest, steps: int) -> str:
        """The key of ``guest`` aged ``steps`` steps from its present state."""
        h = hashlib.sha256()
        h.update(f"model {MODEL_VERSION}\n{_source_digest()}\n".encode())
        h.update(f"{guest.config!r}\nsteps {steps}\n".encode())
        for name, arr in _state_arrays(guest):
            h.update(f"{name} {_typecode(arr)} {len(arr)}\n".encode())
            h.update(memoryview(arr).cast("B"))
        h.update(json.dumps(_churn_scalars(guest), sort_keys=True).encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.aged"

    # ---- load -------------------------------------------------------------------------

    def load(self, guest: Guest, key: str) -> bool:
        """Put the cached aged state of ``key`` into ``guest`` (which must be in the state the
        key was computed from). False, guest untouched, when there is no usable file.

        The file is mapped, not read: its payload is hashed and copied into the guest's
        arrays straight from the page cache (reading it into a bytes object and slicing
        that cost two more copies of ~48 MB, and their page faults, on the 16 GiB default;
        the load is on compare's critical path). Only this user can write the file, and
        every writer replaces it with a new one (os.replace), so the mapped pages cannot
        change under the check."""
        path = self.path(key)
        try:
            mapped = self._map_safely(path)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, _Unusable) as exc:
            self._warn(f"ignoring aged-guest cache file {path}: {exc}; aging again")
            return False
        with mapped, memoryview(mapped) as data:
            try:
                arrays, scalars = self._parse(data, key, guest)
            except _Unusable as exc:
                self._warn(f"ignoring aged-guest cache file {path}: {exc}; aging again")
                return False
            try:
                self._apply(guest, arrays, scalars)
            finally:
                for view in arrays.values():
                    view.release()  # before the map closes
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruning takes the least recently used first
        return True

    def _map_safely(self, path: Path) -> mmap.mmap:
        self._check_dir(path.parent)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Unusable("not a regular file")
            if st.st_uid != os.getuid():
                raise _Unusable(f"owned by uid {st.st_uid}, not {os.getuid()}")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise _Unusable(f"writable by group or others (mode {st.st_mode & 0o777:o})")
            if st.st_size == 0:
                raise _Unusable("empty")
            return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the map keeps its own reference to the file

    @staticmethod
    def _check_dir(directory: Path) -> None:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise _Unusable(f"{directory} is not a directory")
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _Unusable(f"{directory} is not owned by this user alone")

    @staticmethod
    def _parse(
        data: memoryview, key: str, guest: Guest
    ) -> tuple[dict[str, memoryview], dict[str, Any]]:
        """Check the file; the arrays as views into `data` (released by the caller)."""
        if bytes(data[: len(MAGIC)]) != MAGIC:
            raise _Unusable("not an aged-guest file of this format")
        end = bytes(data[:_MAX_HEADER]).find(b"\n", len(MAGIC))
        if end < 0:
            raise _Unusable("truncated header")
        arrays: dict[str, memoryview] = {}
        try:
            header = json.loads(bytes(data[len(MAGIC) : end]))
            if header["key"] != key:
                raise _Unusable("its key is not the file's name")
            payload = data[end + 1 :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise _Unusable("content hash mismatch (corrupt or truncated)")
            expected = {name: (_typecode(arr), len(arr)) for name, arr in _state_arrays(guest)}
            at = 0
            for name, typecode, nbytes in header["arrays"]:
                if name not in expected or expected[name][0] != typecode:
                    raise _Unusable(f"unexpected array {name!r}")
                arrays[name] = payload[at : at + nbytes]
                at += nbytes
            if at != len(payload) or set(arrays) != set(expected):
                raise _Unusable("array table does not match the payload")
            for name in _ALLOCATOR_ARRAYS:
                item = 1 if expected[name][0] == "B" else array(expected[name][0]).itemsize
                if len(arrays[name]) != expected[name][1] * item:
                    raise _Unusable(f"array {name} has the wrong length")
            scalars = header["scalars"]
            if not isinstance(scalars, dict):
                raise _Unusable("bad scalars")
            return arrays, scalars
        except BaseException as exc:
            for view in arrays.values():
                view.release()  # the map closes when the caller's check fails
            if isinstance(exc, (KeyError, TypeError, ValueError)):
                raise _Unusable(f"malformed header ({exc})") from None
            raise

    @staticmethod
    def _apply(guest: Guest, arrays: dict[str, memoryview], scalars: dict[str, Any]) -> None:
        a = guest.allocator
        for name in _ALLOCATOR_ARRAYS:
            memoryview(getattr(a, name)).cast("B")[:] = arrays[name]  # in place: the core's views
        c = guest.churn
        c._short = array("q")
        c._short.frombytes(arrays["churn._short"])
        c._long = array("q")
        c._long.frombytes(arrays["churn._long"])
        c.steps_done = int(scalars["steps_done"])
        c.allocations_made = int(scalars["allocations_made"])
        c.frees_made = int(scalars["frees_made"])
        c._short_pages = int(scalars["short_pages"])
        c._long_pages = int(scalars["long_pages"])
        c._cpu = int(scalars["cpu"])
        version, words, gauss = scalars["rng"]
        c._rng.setstate((int(version), tuple(int(w) for w in words), gauss))

    # ---- store ------------------------------------------------------------------------

    def store(self, guest: Guest, key: str) -> None:
        """Write ``guest``'s aged state under ``key``, atomically. A directory that cannot be
        made or written is one warning; aging does not fail for want of a cache."""
        table = []
        payload = hashlib.sha256()
        blobs = []
        for name, arr in _state_arrays(guest):
            blob = memoryview(arr).cast("B")
            table.append([name, _typecode(arr), blob.nbytes])
            payload.update(blob)
            blobs.append(blob)
        header = {
            "key": key,
            "sha256": payload.hexdigest(),
            "arrays": table,
            "scalars": _churn_scalars(guest),
        }
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_dir(self.directory)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".aged")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC)
                    f.write(json.dumps(header).encode() + b"\n")
                    for blob in blobs:
                        f.write(blob)
                os.replace(tmp, self.path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except (OSError, _Unusable) as exc:
            self._warn(f"cannot write the aged-guest cache in {self.directory}: {exc}")
            return
        try:
            self.prune(keep=self.path(key))
        except (OSError, _Unusable) as exc:
            self._warn(f"cannot prune the aged-guest cache in {self.directory}: {exc}")

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used cache files (modification time: set at store and
        at each hit) until the others fit in ``max_bytes``; ``keep`` (the file just written)
        is never deleted. Only this cache's own files: regular ``*.aged`` files owned by the
        user, in a directory checked as for reading. Returns the files deleted."""
        self._check_dir(self.directory)
        files = []
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".aged") or entry.name.startswith("."):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                files.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        deleted = []
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                deleted.append(path)
            total -= size
        return deleted

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Unusable(Exception):
    """A cache file that must not be used (the message says why)."""


def age(
    guest: Guest,
    steps: int,
    progress: Callable[[int, int], None] | None = None,
    cache: AgedCache | None = None,
) -> bool:
    """``guest.age(steps, progress)``, from ``cache`` when it holds the result (True: a hit;
    ``progress`` then sees one final call). Stores the result on a miss."""
    if cache is None or steps == 0:
        guest.age(steps, progress)
        return False
    from pool.guest.machine import check_aging

    check_aging(guest.config.memory_bytes, steps, guest.config.reserved)
    key = cache.key(guest, steps)
    if cache.load(guest, key):
        if progress is not None:
            progress(steps, steps)
        return True
    cache.misses += 1
    guest.age(steps, progress)
    cache.store(guest, key)
    return False
