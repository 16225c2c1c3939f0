"""Every strategy behind the daemon, over real HTTP on a loopback socket: buffers of each
size class it can serve (and two sub-page ones, which swiotlb puts in one page), a
restart (from the snapshot, and from the journal alone), the invariants route, and the
very same buffers afterwards. And an oversized request gets the strategy's own reason,
the same in process and over the daemon."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from support.daemons import ADMIN_TOKEN, Checked, register, running_app, small_config

from daemon import keys
from daemon.config import Config
from daemon.engine import Service
from daemon.state import guest_config, pool_settings
from pool.guest.units import KiB, MiB
from pool.provision import Guests, provision
from pool.registry import STRATEGIES
from pool.strategy import AllocationError

MAX_BUFFER = 32 * MiB  # the daemon's pool.max_buffer below
# The largest buffer each strategy serves, by hand: swiotlb's maximum mapping size
# (128 slots of 2 KiB), the atomic pool's largest chunk (one order-10 block), else the
# configured pool.max_buffer (vmalloc itself has no limit below the memory there is).
LIMITS = {
    "pool": MAX_BUFFER,
    "pool-boot": MAX_BUFFER,
    "vmalloc-alias": MAX_BUFFER,
    "vmalloc-directmap": MAX_BUFFER,
    "swiotlb": 256 * KiB,
    "atomic-pool": 4 * MiB,
}
# The size classes of sharedpool_alloc_duration_seconds: the largest size of each class
# that the strategy can serve (a class entirely above its limit is skipped).
CLASSES = (64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)


def sizes_for(name: str) -> list[int]:
    """The largest first (the atomic pool serves 4 MiB only from a whole free chunk), then
    two sub-page buffers."""
    limit = LIMITS[name]
    out = []
    low = 0
    for top in CLASSES:
        if limit > low:
            out.append(min(top, limit))
        low = top
    return [*reversed(out), 1 * KiB, 1 * KiB]


def config_for(tmp: Path, name: str) -> Config:
    # A pristine guest of 2 GiB: pool-boot needs a whole free 1 GiB-aligned GiB. The atomic
    # pool starts at 128 KiB per GiB of RAM: 32 GiB for one whole 4 MiB chunk to begin with.
    return small_config(
        tmp / "state",
        guest__memory="32GiB" if name == "atomic-pool" else "2GiB",
        pool__strategy=name,
        pool__max="128MiB",
        pool__max_buffer=f"{MAX_BUFFER}",
    )


def test_sizes_cover_each_class_once() -> None:
    assert sizes_for("pool") == [32 * MiB, 16 * MiB, MiB, 64 * KiB, KiB, KiB]
    assert sizes_for("swiotlb") == [256 * KiB, 64 * KiB, KiB, KiB]
    assert sizes_for("atomic-pool") == [4 * MiB, MiB, 64 * KiB, KiB, KiB]
    assert set(LIMITS) == set(STRATEGIES)


async def _allocate_all(api: Checked, token: str, name: str) -> list[dict[str, Any]]:
    out = []
    for size in sizes_for(name):
        status, body, _ = await api(
            "POST", "/v1/buffers", token=token, json={"size": size, "purpose": name}
        )
        assert status == 201, (name, size, body)
        out.append(body)
    return out


async def _listing(api: Checked, token: str) -> list[dict[str, Any]]:
    status, body, _ = await api("GET", "/v1/buffers", token=token)
    assert status == 200
    return list(body)


async def _invariants(api: Checked) -> dict[str, Any]:
    status, body, _ = await api("GET", "/v1/debug/invariants", token=ADMIN_TOKEN)
    assert status == 200
    return dict(body)


@pytest.mark.parametrize("from_snapshot", [True, False], ids=["snapshot", "journal"])
@pytest.mark.parametrize("name", STRATEGIES)
async def test_every_strategy_survives_a_restart(
    tmp_path: Path, name: str, from_snapshot: bool
) -> None:
    config = config_for(tmp_path, name)
    async with running_app(config) as client:
        api = Checked(client)
        _cid, token = await register(client, "driver")
        made = await _allocate_all(api, token, name)
        small = [b["pfn_ranges"] for b in made[-2:]]
        if name == "swiotlb":
            assert small[0] == small[1]  # two 1 KiB buffers in one page: allowed there
        else:
            assert small[0] != small[1]
        before = await _listing(api, token)
        assert before == made
        inv = await _invariants(api)
        assert inv == {
            "ok": True,
            "buffers": len(made),
            "clients": 1,
            "pages": sum(b["npages"] for b in made),
        }
        service: Service = client.app[keys.SERVICE]
        if not from_snapshot:  # as after a crash: the journal alone
            service.close = functools.partial(Service.close, service, snapshot=False)  # type: ignore[method-assign]
    async with running_app(config) as client:
        api = Checked(client)
        service = client.app[keys.SERVICE]
        source = service.restore_info["source"]
        assert source.startswith("snapshot") if from_snapshot else source == "a fresh guest"
        assert await _listing(api, token) == before
        assert await _invariants(api) == inv


@pytest.mark.parametrize("name", STRATEGIES)
async def test_oversized_request_same_reason_in_process_and_over_the_daemon(
    tmp_path: Path, name: str
) -> None:
    config = config_for(tmp_path, name)
    size = LIMITS[name] + 1
    made = provision(name, Guests(guest_config(config), 0, keep=False), pool_settings(config))
    with pytest.raises(AllocationError) as err:
        made.strategy.allocate(size, "driver")
    assert err.value.reason == "too_large"
    async with running_app(config) as client:
        api = Checked(client)
        _cid, token = await register(client)
        status, body, _ = await api("POST", "/v1/buffers", token=token, json={"size": size})
        assert (status, body["reason"]) == (400, err.value.reason)
        assert body["type"].endswith("buffer-too-large")
        assert body["detail"] == str(err.value)
        status, body, _ = await api("POST", "/v1/buffers", token=token, json={"size": size - 1})
        assert status in (201, 503), body  # at the limit: served, or no memory right now
