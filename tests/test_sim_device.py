"""End to end: every event kind of the netvsc device against the pool, in-process."""

from __future__ import annotations

import numpy as np
import pytest

from hv_netvsc_sim.client import InProcessClient, PoolError
from hv_netvsc_sim.device import (
    NETVSC_MAX_RX_SECTIONS,
    NETVSC_MAX_TX_SECTIONS,
    DeviceError,
    DeviceSettings,
    NetvscDevice,
)
from hv_netvsc_sim.host import HyperVHost
from pool import make_strategy
from pool.guest import PAGE_PRIVATE, PAGE_SHARED, PAGE_UNKNOWN, FaultPlan, Guest, GuestConfig
from pool.guest.units import MiB
from pool.strategy import Buffer


def _world(
    name: str = "pool", memory: int = 1024 * MiB, faults: FaultPlan | None = None, **options
):
    guest = Guest(GuestConfig(memory_bytes=memory, seed=5, faults=faults or FaultPlan()))
    strategy = make_strategy(name, guest, **options)
    strategy.boot()
    strategy.setup()
    client = InProcessClient(strategy)
    host = HyperVHost(guest, owns=client.owns)
    return guest, strategy, client, host


def _check_clean(guest, strategy, host) -> None:
    assert host.stats.use_after_free_writes == 0
    strategy.check_invariants()
    guest.check_invariants()


async def test_probe_traffic_remove():
    guest, strategy, client, host = _world()
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=3))
    await dev.probe()
    assert dev.state == "up"
    assert dev.recv_section_count == 9709 and dev.send_section_count == 170
    assert dev.recv.buffer.size == 16 * MiB and dev.send.buffer.size == 1_044_480
    assert len(dev.rings) == 3 and len(host.channels) == 3
    assert host.stats.gpadls_established == 5  # 3 rings + receive + send
    for buf in dev.buffers():
        assert (guest.platform.state[buf.pfns()] == PAGE_SHARED).all()
    dev.traffic(20_000)  # wraps around the 9709 receive sections
    assert dev.stats.rx_packets == 20_000 and dev.stats.corrupt_reads == 0
    assert host.stats.sections_written == 20_000 and host.stats.sections_read == 20_000
    recv_pfns = dev.recv.buffer.pfns()
    assert (guest.content[recv_pfns] == dev.recv.buffer.id).all()
    ids = [b.id for b in dev.buffers()]
    await dev.remove()
    assert dev.state == "down" and not host.gpadls and not host.channels
    assert host.stats.revokes == 2 and host.stats.gpadls_torn_down == 5
    assert strategy.buffers() == []
    for bid in ids:
        assert strategy.ledger.was_freed(bid)
    _check_clean(guest, strategy, host)


async def test_ring_resize_clamps_and_reallocates():
    guest, strategy, client, host = _world()
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=1))
    await dev.probe()
    old = {b.id for b in dev.buffers()}
    assert await dev.set_ringparam(5, 0) == (10, 10)  # clamped up to NETVSC_MIN_*
    assert dev.recv.buffer.size == 4096 * 5  # 10 x 1728 = 17,280 -> 5 pages
    assert dev.send.buffer.size == 15 * 4096  # 10 x 6144 = 61,440 = 15 pages
    assert dev.recv_section_count == 11  # the host answers size // 1728 of the page-rounded size
    assert not old & {b.id for b in dev.buffers()}
    assert await dev.set_ringparam(10**6, 10**6) == (NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS)
    assert dev.recv.buffer.size == 31 * MiB and dev.send.buffer.size == 15 * MiB
    assert dev.stats.ring_resizes == 2 and dev.stats.detaches == 2 and dev.stats.attaches == 3
    dev.traffic(100)
    # unchanged parameters: nothing to do
    before = host.stats.gpadls_established
    await dev.set_ringparam(NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS)
    assert host.stats.gpadls_established == before
    await dev.remove()
    _check_clean(guest, strategy, host)


async def test_mtu_change_and_channel_change_reattach():
    guest, strategy, client, host = _world()
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=2))
    await dev.probe()
    first = {b.id for b in dev.buffers()}
    await dev.change_mtu(9000)
    second = {b.id for b in dev.buffers()}
    assert dev.settings.mtu == 9000 and len(second) == 4 and not first & second
    await dev.set_channels(8)
    assert len(dev.rings) == 8 and len(host.channels) == 8
    assert len(dev.buffers()) == 10
    await dev.set_channels(1)
    assert len(host.channels) == 1 and len(strategy.buffers()) == 3
    with pytest.raises(DeviceError):
        await dev.set_channels(65)
    with pytest.raises(DeviceError):
        await dev.change_mtu(10)
    assert dev.stats.mtu_changes == 1 and dev.stats.channel_changes == 2
    await dev.remove()
    _check_clean(guest, strategy, host)


async def test_vf_failover_keeps_buffers():
    guest, strategy, client, host = _world()
    dev = NetvscDevice("eth0", client, host)
    await dev.probe()
    ids = [b.id for b in dev.buffers()]
    dev.switch_datapath(True)
    assert dev.on_vf and dev.channels[0] in host.on_vf
    dev.traffic(50)  # through the VF: the synthetic buffers are idle
    assert dev.stats.vf_packets == 50 and host.stats.sections_written == 0
    dev.switch_datapath(True)  # already there: nothing
    dev.switch_datapath(False)
    dev.traffic(50)
    assert host.stats.sections_written == 50
    assert [b.id for b in dev.buffers()] == ids
    assert dev.stats.vf_switches == 2 and host.stats.datapath_switches == 2
    await dev.remove()
    _check_clean(guest, strategy, host)


async def test_reconfigure_while_down_applies_at_next_attach():
    guest, strategy, client, host = _world()
    dev = NetvscDevice("eth0", client, host)
    await dev.set_ringparam(100, 100)
    assert dev.state == "down" and not strategy.buffers()
    await dev.probe()
    assert dev.recv_section_count == DeviceSettings(recv_sections=100).recv_buf_bytes // 1728
    await dev.remove()
    _check_clean(guest, strategy, host)


async def test_failed_reattach_restores_old_settings():
    # a pool capped at 40 MiB: 31 MiB + 15 MiB cannot fit, the default 16 + 1 MiB can
    guest, strategy, client, host = _world(initial_bytes=24 * MiB, max_bytes=40 * MiB)
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=1))
    await dev.probe()
    await dev.set_ringparam(NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS)
    assert dev.state == "up" and dev.stats.restores == 1
    assert dev.settings.recv_sections == DeviceSettings().recv_sections
    assert dev.recv.buffer.size == 16 * MiB
    assert dev.stats.failure_reasons == {"exhausted": 1}
    assert dev.stats.failures_by_purpose == {"send_buf": 1}
    await dev.remove()
    _check_clean(guest, strategy, host)


class _PrivatePageClient(InProcessClient):
    """Hands out the receive buffer with one page no longer shared: a broken strategy."""

    async def allocate(self, size: int, purpose: str) -> Buffer:
        buf = await super().allocate(size, purpose)
        if purpose.endswith("recv_buf"):
            self.victim = buf.ranges[0].start + 1
            self.strategy.guest.platform.state[self.victim] = PAGE_PRIVATE
        return buf


async def test_gpadl_with_a_private_page_is_refused():
    guest = Guest(GuestConfig(memory_bytes=1024 * MiB, seed=5))
    strategy = make_strategy("pool", guest)
    strategy.boot()
    strategy.setup()
    client = _PrivatePageClient(strategy)
    host = HyperVHost(guest, owns=client.owns)
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=2))
    with pytest.raises(DeviceError) as info:
        await dev.probe()
    assert info.value.reason == "gpadl_refused" and info.value.purpose == "recv_buf"
    assert host.stats.gpadls_refused == 1 and host.stats.refused_private_pages == 1
    assert dev.stats.probe_failures == 1 and dev.stats.failure_reasons == {"gpadl_refused": 1}
    # the failed attach undid itself: nothing established, everything freed
    assert dev.state == "down" and not host.gpadls and not host.channels
    assert strategy.buffers() == []
    guest.platform.state[client.victim] = PAGE_SHARED  # repair the page for the checks
    _check_clean(guest, strategy, host)


async def test_reencryption_failure_on_remove_leaks_vmalloc_buffers():
    # every re-encryption fails: each buffer freed on remove is leaked, as the kernel does
    faults = FaultPlan(failure_rate=1.0, direction="to_private")
    guest, strategy, client, host = _world("vmalloc-directmap", faults=faults)
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=1))
    await dev.probe()
    held = [b.pfns() for b in dev.buffers()]
    total = sum(len(p) for p in held) * 4096
    await dev.remove()
    assert dev.stats.leaked_buffers == 3 and dev.stats.leaked_bytes == total
    assert client.stats.leaked_buffers == 3 and client.stats.leaked_bytes == total
    assert strategy.stats().leaked_bytes == total
    leaked = np.concatenate(held)
    assert (guest.platform.state[leaked] == PAGE_UNKNOWN).any()
    # never reused: a new device gets other pages; the guest never gives them out again
    dev2 = NetvscDevice("eth1", client, host, DeviceSettings(channels=1))
    await dev2.probe()
    fresh = np.concatenate([b.pfns() for b in dev2.buffers()])
    assert not np.isin(fresh, leaked).any()
    for _ in range(200):
        pfn = guest.alloc_pages(0)
        assert pfn is not None and pfn not in set(leaked.tolist())
    assert host.stats.use_after_free_writes == 0
    strategy.check_invariants()


async def test_reencryption_failure_in_pool_shrink_after_remove():
    # the pool never re-encrypts on free; a remove gives the pages back to their chunks, and
    # the background shrink that follows re-encrypts them: that failure leaks the chunks.
    faults = FaultPlan(failure_rate=1.0, direction="to_private")
    guest, strategy, client, host = _world(
        faults=faults,
        initial_bytes=0,
        low_watermark_bytes=0,
        high_watermark_bytes=0,
        shrink_hysteresis_seconds=0.0,
        shrink_window_seconds=0.0,  # do not keep the peak just seen: return everything
    )
    dev = NetvscDevice("eth0", client, host, DeviceSettings(channels=1))
    await dev.probe()
    held = np.concatenate([b.pfns() for b in dev.buffers()])
    await dev.remove()
    assert dev.stats.leaked_buffers == 0  # the free itself leaked nothing
    client.maintain(1.0)  # shrink: re-encryption fails, the chunks are leaked
    st = strategy.stats()
    assert st.leaked_bytes > 0 and st.size_bytes == 0
    assert (guest.platform.state[held] == PAGE_UNKNOWN).all()
    await dev.probe()
    fresh = np.concatenate([b.pfns() for b in dev.buffers()])
    assert not np.isin(fresh, held).any()
    assert host.stats.use_after_free_writes == 0
    strategy.check_invariants()


async def test_pool_errors_map_to_one_exception():
    _guest, _strategy, client, _host = _world()
    with pytest.raises(PoolError) as info:
        await client.allocate(0, "x")
    assert info.value.reason == "invalid_size"
    with pytest.raises(PoolError) as info:
        await client.free(12345)
    assert info.value.reason == "unknown_buffer"
    assert client.stats.failures == 1 and client.stats.failure_reasons == {"invalid_size": 1}
