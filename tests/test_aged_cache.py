"""The aged-guest cache (pool.aged_cache): a hit is the guest aging would have built.

Every test uses its own cache directory under the session's temporary XDG_CACHE_HOME
(tests/conftest.py), never ~/.cache.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from support.allocator_state import allocator_state

from pool import aged_cache
from pool.aged_cache import AgedCache, age, cache_dir
from pool.guest import Guest, GuestConfig
from pool.guest.units import MiB
from pool.provision import Guests, provision

CONFIG = GuestConfig(memory_bytes=256 * MiB, seed=3)
STEPS = 3_000


def full_state(g: Guest) -> tuple[object, ...]:
    a, c = g.allocator, g.churn
    return (
        a.buddyinfo(),
        allocator_state(a),
        list(c.allocations()),
        c.steps_done,
        c.allocations_made,
        c.frees_made,
        c._cpu,
        c._rng.getstate(),
        g.direct_map.bytes_by_size(),
        g.direct_map.attr.tobytes(),
        g.hazards(),
        g.report(),
    )


def aged_without_cache(config: GuestConfig = CONFIG, steps: int = STEPS) -> Guest:
    g = Guest(config)
    g.age(steps)
    return g


def test_the_session_cache_is_not_the_users() -> None:
    assert str(cache_dir()).startswith(os.environ["XDG_CACHE_HOME"])
    assert not str(cache_dir()).startswith(str(Path.home() / ".cache"))


def test_a_hit_gives_the_guest_aging_builds(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path / "aged")
    first = Guest(CONFIG)
    assert age(first, STEPS, None, cache) is False  # a miss: aged, then stored
    assert cache.misses == 1 and len(list((tmp_path / "aged").glob("*.aged"))) == 1
    second = Guest(CONFIG)
    calls: list[tuple[int, int]] = []
    assert age(second, STEPS, lambda d, t: calls.append((d, t)), cache) is True
    assert cache.hits == 1 and calls == [(STEPS, STEPS)]
    reference = aged_without_cache()
    assert full_state(second) == full_state(first) == full_state(reference)
    second.check_invariants()
    # The loaded guest goes on as the aged one does: same allocations, same churn.
    for g in (second, reference):
        g.background(500)
    assert full_state(second) == full_state(reference)
    assert np.array_equal(second.vmalloc_pages(300), reference.vmalloc_pages(300))


def test_the_key_follows_config_steps_and_state(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path)
    base = cache.key(Guest(CONFIG), STEPS)
    assert cache.key(Guest(CONFIG), STEPS) == base
    assert cache.key(Guest(CONFIG), STEPS + 1) != base
    assert cache.key(Guest(GuestConfig(memory_bytes=256 * MiB, seed=4)), STEPS) != base
    assert cache.key(Guest(GuestConfig(memory_bytes=260 * MiB, seed=3)), STEPS) != base
    assert cache.key(Guest(GuestConfig(memory_bytes=256 * MiB, seed=3, cpus=2)), STEPS) != base
    booted = Guest(CONFIG)
    assert booted.claim_range(40_000, 512)  # a boot reservation changes the state aged from
    assert cache.key(booted, STEPS) != base


def test_a_corrupt_file_is_ignored_with_one_warning_and_rebuilt(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path)
    age(Guest(CONFIG), STEPS, None, cache)
    (path,) = tmp_path.glob("*.aged")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    g = Guest(CONFIG)
    with pytest.warns(RuntimeWarning, match="content hash mismatch") as record:
        assert age(g, STEPS, None, cache) is False
    assert len(record) == 1
    assert full_state(g) == full_state(aged_without_cache())
    # rebuilt: the next guest loads the rewritten file
    fresh = AgedCache(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert age(Guest(CONFIG), STEPS, None, fresh) is True


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not a cache file\n"),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(aged_cache.MAGIC + b"{]\n"),
        lambda p: p.write_bytes(b""),  # a file that cannot be mapped
        lambda p: p.write_bytes(
            aged_cache.MAGIC + p.read_bytes()[len(aged_cache.MAGIC) :].replace(b"\n", b" ", 1)
        ),  # the header line runs into the payload
    ],
    ids=["foreign", "truncated", "bad-header", "empty", "header-without-end"],
)
def test_foreign_and_truncated_files_are_rebuilt(tmp_path: Path, damage: object) -> None:
    cache = AgedCache(tmp_path)
    age(Guest(CONFIG), STEPS, None, cache)
    (path,) = tmp_path.glob("*.aged")
    damage(path)  # type: ignore[operator]
    g = Guest(CONFIG)
    with pytest.warns(RuntimeWarning, match="ignoring aged-guest cache file"):
        assert age(g, STEPS, None, cache) is False
    assert full_state(g) == full_state(aged_without_cache())


def test_a_file_others_may_write_is_never_read(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path)
    age(Guest(CONFIG), STEPS, None, cache)
    (path,) = tmp_path.glob("*.aged")
    path.chmod(0o666)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert age(Guest(CONFIG), STEPS, None, cache) is False
    # aging again rewrote it, 0600 (mkstemp) and renamed over the unsafe one
    assert path.stat().st_mode & 0o777 == 0o600
    tmp_path.chmod(0o777)  # a directory others may write into
    with pytest.warns(RuntimeWarning, match="not owned by this user alone"):
        assert age(Guest(CONFIG), STEPS, None, AgedCache(tmp_path)) is False
    tmp_path.chmod(0o700)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path / "aged")
    age(Guest(CONFIG), STEPS, None, cache)
    (path,) = (tmp_path / "aged").glob("*.aged")
    real = tmp_path / "elsewhere"
    path.rename(real)
    path.symlink_to(real)
    with pytest.warns(RuntimeWarning, match="ignoring aged-guest cache file"):
        assert age(Guest(CONFIG), STEPS, None, cache) is False


def test_guests_age_once_per_configuration_across_instances(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path)
    one = Guests(CONFIG, STEPS, cache=cache)
    a = provision("vmalloc-directmap", one, setup=False).guest
    two = Guests(CONFIG, STEPS, cache=cache)
    b = provision("vmalloc-directmap", two, setup=False).guest
    assert (cache.misses, cache.hits) == (1, 1)
    assert full_state(a) == full_state(b)
    assert Guests(CONFIG, STEPS, cache=False).cache is None


def test_aging_the_kept_pristine_guest_itself_changes_nothing_but_the_copy(
    tmp_path: Path,
) -> None:
    cache = AgedCache(tmp_path)
    copied = Guests(CONFIG, STEPS, cache=cache)
    copied.pristine_kept()
    taken = Guests(CONFIG, STEPS, cache=cache)
    kept = taken.pristine_kept()
    assert taken.prepare(take_pristine=True) is kept  # no copy
    assert full_state(kept) == full_state(copied.prepare())
    assert full_state(taken.pristine()) == full_state(Guest(CONFIG))  # built anew, pristine


def test_no_cache_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aged_cache, "_disabled", False)
    assert aged_cache.default_cache() is not None
    monkeypatch.setenv(aged_cache.NO_CACHE_ENV, "1")
    assert aged_cache.default_cache() is None
    monkeypatch.delenv(aged_cache.NO_CACHE_ENV)
    import argparse

    from pool.guest.options import add_guest_arguments

    parser = argparse.ArgumentParser()
    add_guest_arguments(parser, memory="256MiB", age_steps=10)
    assert parser.parse_args([]).no_cache is False
    assert aged_cache.default_cache() is not None
    assert parser.parse_args(["--no-cache"]).no_cache is True
    assert aged_cache.default_cache() is None
    assert Guests(CONFIG, STEPS).cache is None


def _store_aged(cache: AgedCache, seed: int) -> Path:
    g = Guest(GuestConfig(memory_bytes=256 * MiB, seed=seed))
    key = cache.key(g, 200)
    g.age(200)
    cache.store(g, key)
    return cache.path(key)


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    directory = tmp_path / "aged"
    probe = AgedCache(directory, max_bytes=1 << 40)
    first = _store_aged(probe, 11)
    size = first.stat().st_size
    cache = AgedCache(directory, max_bytes=2 * size + size // 2)  # room for two files
    os.utime(first, (1_000_000, 1_000_000))  # the oldest...
    second = _store_aged(cache, 12)
    os.utime(second, (2_000_000, 2_000_000))
    # ...but used since: a hit marks it, so the untouched `second` is the one to go
    assert age(Guest(GuestConfig(memory_bytes=256 * MiB, seed=11)), 200, None, cache) is True
    foreign = directory / "notes.txt"
    foreign.write_text("not a cache file")
    third = _store_aged(cache, 13)
    assert first.exists() and third.exists() and not second.exists()
    assert foreign.exists()  # only the cache's own *.aged files are pruned
    assert sum(p.stat().st_size for p in directory.glob("*.aged")) <= cache.max_bytes


def test_the_file_just_written_stays_even_above_the_bound(tmp_path: Path) -> None:
    cache = AgedCache(tmp_path / "aged", max_bytes=0)
    kept = _store_aged(cache, 21)
    assert kept.exists()
    newer = _store_aged(cache, 22)
    assert newer.exists() and not kept.exists()


def test_the_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aged_cache.MAX_BYTES_ENV, "12345")
    assert aged_cache.max_bytes_from_env() == 12345
    monkeypatch.setenv(aged_cache.MAX_BYTES_ENV, "2GiB")
    with pytest.warns(RuntimeWarning, match="not a byte count"):
        assert aged_cache.max_bytes_from_env() == aged_cache.DEFAULT_MAX_BYTES
    monkeypatch.delenv(aged_cache.MAX_BYTES_ENV)
    assert aged_cache.max_bytes_from_env() == aged_cache.DEFAULT_MAX_BYTES
