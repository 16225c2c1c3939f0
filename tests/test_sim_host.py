"""The simulated Hyper-V host: GPADL rules, NVSP answers, the use-after-free detector."""

from __future__ import annotations

import numpy as np
import pytest

from hv_netvsc_sim.client import InProcessClient
from hv_netvsc_sim.device import (
    NETVSC_DEFAULT_RX,
    NETVSC_DEFAULT_TX,
    NETVSC_MAX_RX_SECTIONS,
    NETVSC_MAX_TX_SECTIONS,
    DeviceSettings,
)
from hv_netvsc_sim.host import GpadlRefused, HostError, HyperVHost
from pool import make_strategy
from pool.guest import PAGE_PRIVATE, Guest, GuestConfig
from pool.guest.units import MiB
from pool.strategy import Buffer, PfnRange, pfns_of


@pytest.fixture
def guest() -> Guest:
    return Guest(GuestConfig(memory_bytes=512 * MiB, seed=3))


@pytest.fixture
def pool(guest: Guest):
    strategy = make_strategy("pool", guest, initial_bytes=64 * MiB)
    strategy.boot()
    strategy.setup()
    return strategy


def test_kernel_figures():
    d = DeviceSettings()
    assert NETVSC_DEFAULT_RX == 9709 and NETVSC_DEFAULT_TX == 170
    assert d.recv_buf_bytes == 16 * MiB  # 9709 x 1728 = 16,777,152 -> rounded up to pages
    assert d.send_buf_bytes == 255 * 4096  # 170 x 6144 = 1,044,480 = 255 pages
    assert d.ring_bytes == 2 * 129 * 4096  # send + receive ring, each with a header page
    assert NETVSC_MAX_RX_SECTIONS == 18811 and NETVSC_MAX_TX_SECTIONS == 2560
    assert DeviceSettings(recv_sections=NETVSC_MAX_RX_SECTIONS).recv_buf_bytes == 31 * MiB
    assert DeviceSettings(send_sections=NETVSC_MAX_TX_SECTIONS).send_buf_bytes == 15 * MiB


def test_pfns_of_matches_buffer_pfns():
    ranges = (PfnRange(100, 3), PfnRange(7, 1), PfnRange(50, 2))
    buf = Buffer(1, 6 * 4096, "o", "", ranges, 0)
    assert pfns_of(ranges).tolist() == buf.pfns().tolist() == [100, 101, 102, 7, 50, 51]
    singles = tuple(PfnRange(p, 1) for p in (9, 3, 5))
    assert pfns_of(singles).tolist() == [9, 3, 5]


def test_gpadl_messages_and_nvsp_answers(guest, pool):
    host = HyperVHost(guest)
    recv = pool.allocate(16 * MiB, "t", "recv")
    send = pool.allocate(DeviceSettings().send_buf_bytes, "t", "send")
    h = host.establish_gpadl(recv)
    assert host.stats.gpadl_messages == 147  # 26 PFNs, then 146 x 28 for 4096 pages
    assert host.send_recv_buf(h) == (1728, 9709)
    h2 = host.establish_gpadl(send)
    assert host.stats.gpadl_messages == 147 + 1 + -(-(255 - 26) // 28)
    assert host.send_send_buf(h2) == 6144
    assert send.size // 6144 == 170
    host.teardown_gpadl(h)
    host.teardown_gpadl(h2)
    assert host.stats.gpadls_torn_down == 2 and not host.gpadls
    with pytest.raises(HostError):
        host.teardown_gpadl(h)


def test_private_page_refused_visibly(guest, pool):
    host = HyperVHost(guest)
    buf = pool.allocate(64 * 4096, "t", "x")
    victim = buf.ranges[0].start + 5
    guest.platform.state[victim] = PAGE_PRIVATE  # one page no longer shared with the host
    with pytest.raises(GpadlRefused) as info:
        host.establish_gpadl(buf)
    assert info.value.reason == "gpadl_refused"
    assert "1 of 64 pages" in str(info.value)
    assert host.stats.gpadls_refused == 1 and host.stats.refused_private_pages == 1
    assert host.stats.gpadls_established == 0 and not host.gpadls


def test_private_pages_fine_without_encryption():
    guest = Guest(GuestConfig(memory_bytes=256 * MiB, platform="none"))
    pfn = guest.alloc_pages(4)
    buf = Buffer(1, 16 * 4096, "t", "x", (PfnRange(pfn, 16),), 0)
    HyperVHost(guest).establish_gpadl(buf)  # no CoCo: every page is usable by the host


def test_overlapping_gpadl_refused(guest, pool):
    host = HyperVHost(guest)
    buf = pool.allocate(8 * 4096, "t", "x")
    host.establish_gpadl(buf)
    alias = Buffer(999, 4096, "t", "alias", (PfnRange(buf.ranges[0].start + 2, 1),), 0)
    with pytest.raises(GpadlRefused):
        host.establish_gpadl(alias)
    assert host.stats.refused_overlapping_pages == 1


def test_use_after_free_write_is_detected(guest, pool):
    client = InProcessClient(pool)
    host = HyperVHost(guest, owns=client.owns)
    buf = pool.allocate(16 * MiB, client.owner, "recv")
    h = host.establish_gpadl(buf)
    host.send_recv_buf(h)
    pfns = host.write_recv_sections(h, 0, 10)
    assert host.stats.use_after_free_writes == 0
    assert (guest.content[pfns] == buf.id).all()
    pool.free(buf.id, client.owner)  # the bug: freed while the host still holds the GPADL
    host.write_recv_sections(h, 10, 3)
    assert host.stats.use_after_free_writes == 1
    # reused by someone else: still detected from the GPADL's point of view
    other = pool.allocate(16 * MiB, client.owner, "other")
    host.write_recv_sections(h, 20, 1)
    assert host.stats.use_after_free_writes == 2
    assert other.id != buf.id


def test_no_write_after_revoke_or_teardown(guest, pool):
    host = HyperVHost(guest)
    buf = pool.allocate(1 * MiB, "t", "recv")
    h = host.establish_gpadl(buf)
    host.send_recv_buf(h)
    host.revoke(h)
    with pytest.raises(HostError):
        host.write_recv_sections(h, 0, 1)
    host.teardown_gpadl(h)
    with pytest.raises(HostError):
        host.write_recv_sections(h, 0, 1)
    assert host.stats.writes_refused == 2


def test_remote_host_grows_its_page_table():
    host = HyperVHost(None)  # against the daemon: PFN lists only
    far = Buffer(1, 2 * 4096, "t", "x", (PfnRange((1 << 22) + 7, 2),), 0)
    h = host.establish_gpadl(far)
    assert h in host.gpadls
    assert np.count_nonzero(host._owner) == 2
