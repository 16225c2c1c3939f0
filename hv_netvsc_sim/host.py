"""The simulated Hyper-V host: GPADLs, channels, the NVSP answers, and traffic.

GPADL (drivers/hv/channel.c, __vmbus_establish_gpadl): the guest hands the host the
PFNs of a buffer, 26 in the first message and 28 in each following one (16 MiB:
4096 PFNs, 1 + 146 = 147 messages; pool.strategy.gpadl_messages). The host accepts a
GPADL only if every page in it is shared with it: on a confidential guest the host
cannot use a private page, and a real host fails the call. Here a private (or
unknown-state) page makes `establish_gpadl` raise `GpadlRefused` and count the
refusal and the offending pages: visibly, never silently. A page already in another
live GPADL is refused the same way (two live buffers never share a page).

NVSP (drivers/net/hyperv/netvsc.c, netvsc_init_buf): after the receive buffer's GPADL
the guest sends NVSP_MSG1_TYPE_SEND_RECV_BUF and the host answers one section of
1728-byte sub-allocations, count = buffer size // 1728 (the default 16 MiB buffer:
9709 sections, NETVSC_DEFAULT_RX); after the send buffer's GPADL it answers the
section size, 6144 bytes, and the guest derives count = size // 6144 (170 for the
default, NETVSC_DEFAULT_TX).

Traffic: the host writes receive sections into the receive buffer's pages (the model
of contents: guest.write with the buffer id as the tag) and reads send sections the
guest wrote. Before every write it checks that the pages still belong to that live,
unrevoked GPADL; in-process it also asks the guest side whether the buffer is still
owned as handed out (live in the strategy, same pages) and whether every page is
still shared. A write into a page the guest no longer owns is a use after free: it
is counted in `use_after_free_writes` (it must stay 0 in a correct run) and, like
the real host, still performed.

Limitation against the daemon: the host then has no Guest, only the PFN lists the
daemon returned. It checks GPADL consistency (pages unique across live GPADLs, no
write to a torn-down or revoked GPADL), but cannot see page states or whether the
daemon has handed a page to someone else: those checks need the in-process mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest import PAGE_SHARED, Guest
from pool.guest.units import PAGE_SHIFT
from pool.strategy import Buffer, PageRuns, Ranges, gpadl_messages

RECV_SECTION_SIZE = 1728  # NETVSC_RECV_SECTION_SIZE
SEND_SECTION_SIZE = 6144  # NETVSC_SEND_SECTION_SIZE
NVSP_PROTOCOL_VERSION_61 = 0x60001  # the newest NVSP version; the host answers it


class HostError(Exception):
    """The host failed a call. `reason` is a stable word."""

    reason = "host_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class GpadlRefused(HostError):
    """The host refused a GPADL: a page is not shared with it, or is in another GPADL."""

    reason = "gpadl_refused"


FEW_RANGES = 8  # up to this many PFN ranges, work on slices; beyond, on a page array


@attrs.define(eq=False)
class Gpadl:
    handle: int
    buffer: Buffer
    role: str = ""  # "recv", "send" or "ring", once the guest says what it is for
    revoked: bool = False
    _pfns: npt.NDArray[np.int64] | None = None

    @property
    def pfns(self) -> npt.NDArray[np.int64]:
        """The pages in GPADL order (built on first use: traffic needs them, set-up does not)."""
        if self._pfns is None:
            self._pfns = self.buffer.pfns()
        return self._pfns


def _by_page_array(ranges: Ranges) -> bool:
    """Whether to work on the buffer's page array rather than on its ranges' slices: a page
    list's (its PageRuns has the array, and no runs are computed to count them) or beyond
    FEW_RANGES ranges."""
    return isinstance(ranges, PageRuns) or len(ranges) > FEW_RANGES


@attrs.define
class HostStats:
    gpadls_established: int = 0
    gpadl_messages: int = 0
    gpadl_pages: int = 0
    gpadls_refused: int = 0
    refused_private_pages: int = 0
    refused_overlapping_pages: int = 0
    gpadls_torn_down: int = 0
    channels_opened: int = 0
    channels_closed: int = 0
    nvsp_handshakes: int = 0
    recv_buffers: int = 0
    send_buffers: int = 0
    revokes: int = 0
    datapath_switches: int = 0
    sections_written: int = 0
    sections_read: int = 0
    use_after_free_writes: int = 0
    writes_refused: int = 0

    def as_json(self) -> dict[str, int]:
        return attrs.asdict(self)


class HyperVHost:
    """The host side of every simulated device on one guest.

    guest: the Guest in-process (page states, contents), or None against the daemon.
    owns: the guest side's "is this buffer still mine, as handed out?" (InProcessClient.owns);
      None when unknown.
    """

    def __init__(
        self, guest: Guest | None = None, owns: Callable[[Buffer], bool] | None = None
    ) -> None:
        self.guest = guest
        self.owns = owns
        self.stats = HostStats()
        self.gpadls: dict[int, Gpadl] = {}
        self.channels: dict[int, int] = {}  # channel id -> ring GPADL handle
        self.on_vf: set[int] = set()  # primary channel ids whose data path is the VF
        self._next_handle = 0xE1E10
        self._next_channel = 1
        size = guest.end_pfn if guest is not None else 1 << 20
        self._owner = np.zeros(size, dtype=np.int32)  # pfn -> live GPADL handle (0: none)

    # ---- GPADLs ------------------------------------------------------------------------

    def _ensure_owner(self, top: int) -> None:
        if top > len(self._owner):  # remote: PFNs beyond what we have seen so far
            grown = np.zeros(max(top, 2 * len(self._owner)), dtype=np.int32)
            grown[: len(self._owner)] = self._owner
            self._owner = grown

    def _count(
        self,
        array: npt.NDArray[Any],
        ranges: Ranges,
        pfns: npt.NDArray[np.int64] | None,
        value: int,
    ) -> int:
        """Pages of `ranges` whose entry in `array` differs from `value`."""
        count = np.count_nonzero
        if pfns is not None:
            view = array[pfns]
            return int(count(view) if value == 0 else count(view != value))
        n = 0
        for r in ranges:
            view = array[r.start : r.start + r.npages]
            n += int(count(view) if value == 0 else count(view != value))
        return n

    def _mark(self, ranges: Ranges, pfns: npt.NDArray[np.int64] | None, value: int) -> None:
        if pfns is not None:
            self._owner[pfns] = value
        else:
            for r in ranges:
                self._owner[r.start : r.start + r.npages] = value

    def establish_gpadl(self, buffer: Buffer) -> int:
        """vmbus_establish_gpadl: take the buffer's PFN list; refuse private pages."""
        ranges = buffer.ranges
        npages = buffer.npages
        pfns = buffer.pfns() if _by_page_array(ranges) else None
        self.stats.gpadl_messages += gpadl_messages(npages)
        guest = self.guest
        if guest is not None and guest.platform.encrypts:
            bad = self._count(guest.platform.state, ranges, pfns, PAGE_SHARED)
            if bad:
                self.stats.gpadls_refused += 1
                self.stats.refused_private_pages += bad
                raise GpadlRefused(
                    f"GPADL for buffer {buffer.id} ({buffer.purpose}) refused: "
                    f"{bad} of {npages} pages are not shared with the host"
                )
        top = int(pfns.max()) + 1 if pfns is not None else max(r.start + r.npages for r in ranges)
        self._ensure_owner(top)
        taken = self._count(self._owner, ranges, pfns, 0)  # pages in another GPADL
        if taken:
            self.stats.gpadls_refused += 1
            self.stats.refused_overlapping_pages += taken
            raise GpadlRefused(
                f"GPADL for buffer {buffer.id} refused: {taken} pages are already "
                "in another live GPADL"
            )
        handle = self._next_handle
        self._next_handle += 1
        self._mark(ranges, pfns, handle)
        self.gpadls[handle] = Gpadl(handle, buffer, pfns=pfns)
        self.stats.gpadls_established += 1
        self.stats.gpadl_pages += npages
        return handle

    def teardown_gpadl(self, handle: int) -> None:
        """vmbus_teardown_gpadl: the host lets go of the pages."""
        gpadl = self.gpadls.pop(handle, None)
        if gpadl is None:
            raise HostError(f"no GPADL with handle {handle:#x}", "unknown_gpadl")
        ranges = gpadl.buffer.ranges
        self._mark(ranges, gpadl.pfns if _by_page_array(ranges) else None, 0)
        self.stats.gpadls_torn_down += 1

    # ---- channels and NVSP ---------------------------------------------------------------

    def open_channel(self, ring_handle: int) -> int:
        """vmbus_open: the channel's ring buffer (one GPADL: send ring + receive ring)."""
        gpadl = self._gpadl(ring_handle)
        gpadl.role = "ring"
        channel = self._next_channel
        self._next_channel += 1
        self.channels[channel] = ring_handle
        self.stats.channels_opened += 1
        return channel

    def close_channel(self, channel: int) -> None:
        if self.channels.pop(channel, None) is None:
            raise HostError(f"channel {channel} is not open", "unknown_channel")
        self.on_vf.discard(channel)
        self.stats.channels_closed += 1

    def nvsp_init(self, version: int = NVSP_PROTOCOL_VERSION_61) -> int:
        """NVSP_MSG_TYPE_INIT: the host answers the version it speaks (the newest)."""
        self.stats.nvsp_handshakes += 1
        return min(version, NVSP_PROTOCOL_VERSION_61)

    def send_recv_buf(self, handle: int) -> tuple[int, int]:
        """NVSP_MSG1_TYPE_SEND_RECV_BUF: one section of 1728-byte sub-allocations;
        answers (sub_alloc_size, num_sub_allocs)."""
        gpadl = self._gpadl(handle)
        gpadl.role = "recv"
        self.stats.recv_buffers += 1
        return RECV_SECTION_SIZE, gpadl.buffer.size // RECV_SECTION_SIZE

    def send_send_buf(self, handle: int) -> int:
        """NVSP_MSG1_TYPE_SEND_SEND_BUF: answers the section size (the guest divides)."""
        gpadl = self._gpadl(handle)
        gpadl.role = "send"
        self.stats.send_buffers += 1
        return SEND_SECTION_SIZE

    def revoke(self, handle: int) -> None:
        """NVSP_MSG1_TYPE_REVOKE_{RECV,SEND}_BUF: the host stops using the buffer."""
        self._gpadl(handle).revoked = True
        self.stats.revokes += 1

    def switch_datapath(self, channel: int, to_vf: bool) -> None:
        """NVSP_MSG4_TYPE_SWITCH_DATA_PATH: traffic through the VF, or back to synthetic."""
        if channel not in self.channels:
            raise HostError(f"channel {channel} is not open", "unknown_channel")
        if to_vf:
            self.on_vf.add(channel)
        else:
            self.on_vf.discard(channel)
        self.stats.datapath_switches += 1

    def _gpadl(self, handle: int) -> Gpadl:
        gpadl = self.gpadls.get(handle)
        if gpadl is None:
            raise HostError(f"no GPADL with handle {handle:#x}", "unknown_gpadl")
        return gpadl

    # ---- traffic --------------------------------------------------------------------------

    def _section_pfns(
        self, gpadl: Gpadl, first: int, count: int, section_size: int
    ) -> npt.NDArray[np.int64]:
        lo = (first * section_size) >> PAGE_SHIFT
        hi = (((first + count) * section_size) - 1 >> PAGE_SHIFT) + 1
        return gpadl.pfns[lo:hi]

    def _uaf(self, gpadl: Gpadl, pfns: npt.NDArray[np.int64]) -> bool:
        """Whether writing `pfns` of `gpadl` would land in memory the guest no longer owns."""
        if (self._owner[pfns] != gpadl.handle).any():
            return True
        if self.owns is not None and not self.owns(gpadl.buffer):
            return True
        guest = self.guest
        return bool(
            guest is not None
            and guest.platform.encrypts
            and (guest.platform.state[pfns] != PAGE_SHARED).any()
        )

    def write_recv_sections(self, handle: int, first: int, count: int) -> npt.NDArray[np.int64]:
        """Write receive sections [first, first+count) (no wrap: the caller splits) and return
        the pages written. A torn-down or revoked GPADL is refused (the host never writes
        there); a page the guest no longer owns is counted as a use after free."""
        gpadl = self.gpadls.get(handle)
        if gpadl is None or gpadl.revoked or gpadl.role != "recv":
            self.stats.writes_refused += 1
            raise HostError(f"no live receive buffer behind GPADL {handle:#x}", "bad_write")
        pfns = self._section_pfns(gpadl, first, count, RECV_SECTION_SIZE)
        if self._uaf(gpadl, pfns):
            self.stats.use_after_free_writes += 1
        if self.guest is not None:
            self.guest.write(pfns, gpadl.buffer.id)
        self.stats.sections_written += count
        return pfns

    def read_send_sections(self, handle: int, first: int, count: int) -> int:
        """Read send sections the guest filled; returns the sections read."""
        gpadl = self.gpadls.get(handle)
        if gpadl is None or gpadl.revoked or gpadl.role != "send":
            self.stats.writes_refused += 1
            raise HostError(f"no live send buffer behind GPADL {handle:#x}", "bad_read")
        self.stats.sections_read += count
        return count

    def live_handles(self) -> list[int]:
        return sorted(self.gpadls)
