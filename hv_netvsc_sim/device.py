"""The netvsc device model: the driver's life cycle against a PoolClient and the host.

Figures from drivers/net/hyperv/hyperv_net.h and netvsc_drv.c:

- Receive buffer: `recv_sections` x 1728 bytes rounded up to pages; default
  NETVSC_DEFAULT_RX = 16 MiB // 1728 = 9709 sections -> 16,777,152 bytes -> 16 MiB
  (4096 pages); at most 31 MiB (18811 sections, rx_max_pending = 31 MiB // 1728).
- Send buffer: `send_sections` x 6144 bytes rounded up to pages; default
  NETVSC_DEFAULT_TX = 1 MiB // 6144 = 170 sections -> 1,044,480 bytes (255 pages);
  at most 15 MiB (2560 sections).
- ethtool -G clamps the requested counts to [10, max] (NETVSC_MIN_{RX,TX}_SECTIONS).
- One VMBus channel per queue (default 4 here: VRSS_CHANNEL_DEFAULT 8 limited by the
  vCPUs; at most VRSS_CHANNEL_MAX 64). Each channel has one ring buffer GPADL holding
  the send and the receive ring, each VMBUS_RING_SIZE(ring_size x 4 KiB) = payload
  plus one header page: 2 x (128 + 1) pages = 1032 KiB by default (ring_size 128).

Life cycle (netvsc_probe -> rndis_filter_device_add -> netvsc_device_add):
  attach: allocate the primary channel's ring, GPADL, open; NVSP init; allocate the
          receive buffer, GPADL, SEND_RECV_BUF (the host answers section size and
          count); the send buffer likewise; then the subchannels' rings.
  detach (netvsc_device_remove): revoke the receive and send buffers, close the
          channels (subchannels, then the primary; each ring's GPADL is torn down as
          part of the close), tear down the receive and send buffers' GPADLs, then free
          every buffer through the client (the strategy re-encrypts; when re-encryption
          fails the buffer is leaked, as the kernel does, and counted here).
Ring resize (ethtool -G), MTU change and channel-count change detach and re-attach with
the new settings; when the re-attach fails, the old settings are restored and attached
again (netvsc_set_ringparam, netvsc_set_channels, netvsc_change_mtu). VF failover only
switches the data path (NVSP_MSG4_TYPE_SWITCH_DATA_PATH): buffers stay.

A failed attach undoes what it did and leaves the device down, with the reason counted.
"""

from __future__ import annotations

import attrs

from hv_netvsc_sim.client import PoolClient, PoolError
from hv_netvsc_sim.host import (
    RECV_SECTION_SIZE,
    SEND_SECTION_SIZE,
    HostError,
    HyperVHost,
)
from pool.guest.units import PAGE_SIZE, MiB
from pool.strategy import Buffer

NETVSC_RECEIVE_BUFFER_SIZE = 31 * MiB
NETVSC_RECEIVE_BUFFER_DEFAULT = 16 * MiB
NETVSC_SEND_BUFFER_SIZE = 15 * MiB
NETVSC_SEND_BUFFER_DEFAULT = 1 * MiB
NETVSC_DEFAULT_RX = NETVSC_RECEIVE_BUFFER_DEFAULT // RECV_SECTION_SIZE  # 9709
NETVSC_DEFAULT_TX = NETVSC_SEND_BUFFER_DEFAULT // SEND_SECTION_SIZE  # 170
NETVSC_MIN_RX_SECTIONS = 10
NETVSC_MIN_TX_SECTIONS = 10
NETVSC_MAX_RX_SECTIONS = NETVSC_RECEIVE_BUFFER_SIZE // RECV_SECTION_SIZE  # 18811
NETVSC_MAX_TX_SECTIONS = NETVSC_SEND_BUFFER_SIZE // SEND_SECTION_SIZE  # 2560
VRSS_CHANNEL_MAX = 64
DEFAULT_CHANNELS = 4
DEFAULT_RING_PAGES = 128  # netvsc's ring_size module parameter (4 KiB pages per ring)
NETVSC_MTU_MIN = 68
NETVSC_MTU_MAX = 65535


def page_round(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


def clamp_rx(sections: int) -> int:
    return max(NETVSC_MIN_RX_SECTIONS, min(sections, NETVSC_MAX_RX_SECTIONS))


def clamp_tx(sections: int) -> int:
    return max(NETVSC_MIN_TX_SECTIONS, min(sections, NETVSC_MAX_TX_SECTIONS))


@attrs.frozen
class DeviceSettings:
    """netvsc_device_info: what the next attach will allocate."""

    recv_sections: int = NETVSC_DEFAULT_RX
    send_sections: int = NETVSC_DEFAULT_TX
    channels: int = DEFAULT_CHANNELS
    ring_pages: int = DEFAULT_RING_PAGES
    mtu: int = 1500

    def __attrs_post_init__(self) -> None:
        if not NETVSC_MIN_RX_SECTIONS <= self.recv_sections <= NETVSC_MAX_RX_SECTIONS:
            raise ValueError(
                f"recv_sections must be within [{NETVSC_MIN_RX_SECTIONS}, "
                f"{NETVSC_MAX_RX_SECTIONS}]: {self.recv_sections}"
            )
        if not NETVSC_MIN_TX_SECTIONS <= self.send_sections <= NETVSC_MAX_TX_SECTIONS:
            raise ValueError(
                f"send_sections must be within [{NETVSC_MIN_TX_SECTIONS}, "
                f"{NETVSC_MAX_TX_SECTIONS}]: {self.send_sections}"
            )
        if not 1 <= self.channels <= VRSS_CHANNEL_MAX:
            raise ValueError(f"channels must be within [1, {VRSS_CHANNEL_MAX}]: {self.channels}")
        if self.ring_pages < 1:
            raise ValueError(f"ring_pages must be positive: {self.ring_pages}")
        if not NETVSC_MTU_MIN <= self.mtu <= NETVSC_MTU_MAX:
            raise ValueError(f"mtu must be within [{NETVSC_MTU_MIN}, {NETVSC_MTU_MAX}]: {self.mtu}")

    @property
    def recv_buf_bytes(self) -> int:
        return page_round(self.recv_sections * RECV_SECTION_SIZE)

    @property
    def send_buf_bytes(self) -> int:
        return page_round(self.send_sections * SEND_SECTION_SIZE)

    @property
    def ring_bytes(self) -> int:
        """One channel's ring GPADL: send ring + receive ring, each with its header page."""
        return 2 * (self.ring_pages + 1) * PAGE_SIZE


class DeviceError(Exception):
    """An operation on the device failed; `reason` is the pool's or the host's word."""

    def __init__(self, reason: str, message: str, purpose: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.purpose = purpose  # the buffer concerned (ring, recv_buf, send_buf), if any


@attrs.define
class DriverStats:
    """Counters over every device of one driver instance."""

    probes: int = 0
    probe_failures: int = 0
    failure_reasons: dict[str, int] = attrs.Factory(dict)
    failures_by_purpose: dict[str, int] = attrs.Factory(dict)
    removes: int = 0
    attaches: int = 0
    detaches: int = 0
    ring_resizes: int = 0
    mtu_changes: int = 0
    channel_changes: int = 0
    restores: int = 0
    vf_switches: int = 0
    leaked_buffers: int = 0
    leaked_bytes: int = 0
    free_errors: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    vf_packets: int = 0
    corrupt_reads: int = 0

    def failed(self, reason: str, purpose: str = "") -> None:
        self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
        key = purpose or "other"
        self.failures_by_purpose[key] = self.failures_by_purpose.get(key, 0) + 1

    def as_json(self) -> dict[str, object]:
        out = attrs.asdict(self)
        out["failure_reasons"] = dict(sorted(self.failure_reasons.items()))
        out["failures_by_purpose"] = dict(sorted(self.failures_by_purpose.items()))
        return out


@attrs.define(eq=False)
class Attached:
    """A buffer the host knows: the pool's buffer and its GPADL handle."""

    buffer: Buffer
    handle: int


class NetvscDevice:
    """One synthetic NIC. `state`: "down" (never attached, removed, or a failed attach), "up"."""

    def __init__(
        self,
        name: str,
        client: PoolClient,
        host: HyperVHost,
        settings: DeviceSettings | None = None,
        stats: DriverStats | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.host = host
        self.settings = settings or DeviceSettings()
        self.stats = stats if stats is not None else DriverStats()
        self.state = "down"
        self.recv: Attached | None = None
        self.send: Attached | None = None
        self.rings: list[Attached] = []
        self.channels: list[int] = []  # host channel ids, primary first
        self.recv_section_count = 0
        self.send_section_count = 0
        self.on_vf = False
        self._rx_next = 0
        self._tx_next = 0
        self._unowned: list[Buffer] = []  # allocated, not yet behind a GPADL (attach in flight)

    # ---- life cycle --------------------------------------------------------------------

    async def probe(self) -> None:
        """netvsc_probe: attach with the current settings. Raises DeviceError on failure."""
        self.stats.probes += 1
        try:
            await self._attach()
        except DeviceError:
            self.stats.probe_failures += 1
            raise

    async def remove(self) -> None:
        """netvsc_remove (hot remove): detach; the device is gone afterwards."""
        self.stats.removes += 1
        if self.state == "up":
            await self._detach()

    async def _alloc(self, size: int, purpose: str) -> Buffer:
        try:
            buf = await self.client.allocate(size, f"{self.name}:{purpose}")
        except PoolError as exc:
            raise DeviceError(
                exc.reason,
                f"{self.name}: cannot allocate the {purpose} ({size} bytes): {exc}",
                purpose,
            ) from None
        self._unowned.append(buf)
        return buf

    def _gpadl(self, buf: Buffer) -> Attached:
        try:
            handle = self.host.establish_gpadl(buf)
        except HostError as exc:
            purpose = buf.purpose.rsplit(":", 1)[-1]
            raise DeviceError(exc.reason, f"{self.name}: {exc}", purpose) from None
        self._unowned.remove(buf)
        return Attached(buf, handle)

    async def _open_channel(self) -> None:
        ring = self._gpadl(await self._alloc(self.settings.ring_bytes, "ring"))
        self.rings.append(ring)
        self.channels.append(self.host.open_channel(ring.handle))

    async def _attach(self) -> None:
        if self.state == "up":
            raise DeviceError("busy", f"{self.name} is already attached")
        s = self.settings
        try:
            await self._open_channel()  # primary channel
            self.host.nvsp_init()
            self.recv = self._gpadl(await self._alloc(s.recv_buf_bytes, "recv_buf"))
            section, count = self.host.send_recv_buf(self.recv.handle)
            if section != RECV_SECTION_SIZE or count * section > self.recv.buffer.size:
                raise DeviceError("bad_nvsp", f"{self.name}: invalid recv section {section}")
            self.recv_section_count = count
            self.send = self._gpadl(await self._alloc(s.send_buf_bytes, "send_buf"))
            section = self.host.send_send_buf(self.send.handle)
            self.send_section_count = self.send.buffer.size // section
            for _ in range(1, s.channels):  # subchannels
                await self._open_channel()
        except DeviceError as exc:
            self.stats.failed(exc.reason, exc.purpose)
            await self._teardown()
            raise
        self.state = "up"
        self.stats.attaches += 1
        self._rx_next = self._tx_next = 0

    async def _detach(self) -> None:
        self.stats.detaches += 1
        await self._teardown()

    async def _teardown(self) -> None:
        """Revoke, close, tear down, free: the kernel's remove order. Also undoes a partial
        attach (whatever exists is released in the same order)."""
        host = self.host
        for att in (self.recv, self.send):
            if att is not None and host.gpadls[att.handle].role in ("recv", "send"):
                host.revoke(att.handle)
        for ch, ring in zip(reversed(self.channels), reversed(self.rings), strict=True):
            host.close_channel(ch)  # subchannels first, the primary last
            host.teardown_gpadl(ring.handle)  # vmbus_close -> the ring's GPADL
        for att in (self.recv, self.send):
            if att is not None:
                host.teardown_gpadl(att.handle)
        buffers = [a.buffer for a in self.rings]
        buffers += [a.buffer for a in (self.recv, self.send) if a is not None]
        buffers += self._unowned
        self.recv = self.send = None
        self.rings = []
        self.channels = []
        self._unowned = []
        self.on_vf = False
        self.state = "down"
        for buf in buffers:
            await self._free(buf)

    async def _free(self, buf: Buffer) -> None:
        try:
            leaked = await self.client.free(buf.id)
        except PoolError:
            self.stats.free_errors += 1
            return
        if leaked:
            self.stats.leaked_buffers += 1
            self.stats.leaked_bytes += buf.npages * PAGE_SIZE

    # ---- reconfiguration (detach + attach) ----------------------------------------------------

    async def _reconfigure(self, new: DeviceSettings) -> None:
        old = self.settings
        self.settings = new
        if self.state != "up":  # not attached: the next attach uses the new settings
            return
        await self._detach()
        try:
            await self._attach()
        except DeviceError:
            self.settings = old
            self.stats.restores += 1
            await self._attach()  # may fail again: the device stays down, counted

    async def set_ringparam(self, rx_pending: int, tx_pending: int) -> tuple[int, int]:
        """ethtool -G rx N tx M: sections clamped to [10, max]; returns what was applied."""
        rx, tx = clamp_rx(rx_pending), clamp_tx(tx_pending)
        self.stats.ring_resizes += 1
        if (rx, tx) != (self.settings.recv_sections, self.settings.send_sections):
            await self._reconfigure(attrs.evolve(self.settings, recv_sections=rx, send_sections=tx))
        return rx, tx

    async def change_mtu(self, mtu: int) -> None:
        """ip link set mtu: the buffers are freed and allocated again (same sizes)."""
        if not NETVSC_MTU_MIN <= mtu <= NETVSC_MTU_MAX:
            raise DeviceError(
                "invalid_mtu", f"mtu must be within [{NETVSC_MTU_MIN}, {NETVSC_MTU_MAX}]: {mtu}"
            )
        self.stats.mtu_changes += 1
        await self._reconfigure(attrs.evolve(self.settings, mtu=mtu))

    async def set_channels(self, count: int) -> None:
        """ethtool -L combined N: rings for the new channel count, buffers again."""
        if not 1 <= count <= VRSS_CHANNEL_MAX:
            raise DeviceError(
                "invalid_channels", f"channels must be within [1, {VRSS_CHANNEL_MAX}]: {count}"
            )
        self.stats.channel_changes += 1
        if count != self.settings.channels:
            await self._reconfigure(attrs.evolve(self.settings, channels=count))

    def switch_datapath(self, to_vf: bool) -> None:
        """VF failover: data path to the VF (and back). Buffers stay where they are."""
        if self.state != "up" or self.on_vf == to_vf:
            return
        self.host.switch_datapath(self.channels[0], to_vf)
        self.on_vf = to_vf
        self.stats.vf_switches += 1

    # ---- traffic ---------------------------------------------------------------------------

    def traffic(self, packets: int) -> None:
        """`packets` received and sent. On the synthetic path the host writes receive
        sections and the guest consumes them (checking it reads what the host wrote), and the
        guest fills send sections the host reads; on the VF path the buffers are idle."""
        if self.state != "up" or packets <= 0:
            return
        if self.on_vf:
            self.stats.vf_packets += packets
            return
        assert self.recv is not None and self.send is not None
        host = self.host
        guest = host.guest
        tag = self.recv.buffer.id
        left = packets
        while left:
            n = min(left, self.recv_section_count - self._rx_next)
            pfns = host.write_recv_sections(self.recv.handle, self._rx_next, n)
            if guest is not None and (guest.content[pfns] != tag).any():
                self.stats.corrupt_reads += 1
            self._rx_next = (self._rx_next + n) % self.recv_section_count
            left -= n
        self.stats.rx_packets += packets
        left = packets
        while left:
            n = min(left, self.send_section_count - self._tx_next)
            host.read_send_sections(self.send.handle, self._tx_next, n)
            self._tx_next = (self._tx_next + n) % self.send_section_count
            left -= n
        self.stats.tx_packets += packets

    def buffers(self) -> list[Buffer]:
        out = [a.buffer for a in self.rings]
        out += [a.buffer for a in (self.recv, self.send) if a is not None]
        return out
