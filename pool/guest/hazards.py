"""The hazard checker: every mapping's attribute against its page's state.

A private mapping (encryption bit set) to a shared page is fatal on TDX: any
access, even load_unaligned_zeropad() reading past the end of the previous page,
raises an unrecoverable fault. A shared mapping to a private page only raises a
recoverable fault. Pages of unknown state (a failed conversion) are counted
apart: whatever maps them, they must never be reused.

These are the *permanent* hazards: what the mappings say once every conversion has
finished. They are fatal on every encrypting platform, Hyper-V's vTOM included: a private
direct-map alias of a shared page stays fatal there. The *transition* is another matter
(`transition_hazard`): while a conversion is in flight the page state and its mappings
disagree by construction, and a stray load_unaligned_zeropad() can land in the window; the
kernel has a fixup for it on each platform it supports, which is why the model counts no
hazard for the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.buddy import compiled_core
from pool.guest.directmap import PRIVATE, SHARED
from pool.guest.platform import PAGE_PRIVATE, PAGE_SHARED, PAGE_UNKNOWN, PlatformSpec
from pool.guest.uniq import unique

if TYPE_CHECKING:
    from pool.guest.machine import Guest

KINDS = ("private_alias_to_shared", "shared_alias_to_private")  # mapping hazards (hazard_pfns)
REPORT_KINDS = (*KINDS, "unknown_state")  # every kind a report counts, by its JSON / label name


@attrs.frozen
class HazardReport:
    private_alias_to_shared: int = 0
    shared_alias_to_private: int = 0
    unknown_state_pages: int = 0

    def as_json(self) -> dict[str, int]:
        """Pages by kind, every kind of REPORT_KINDS (the metric's `kind` label values)."""
        return {
            "private_alias_to_shared": self.private_alias_to_shared,
            "shared_alias_to_private": self.shared_alias_to_private,
            "unknown_state": self.unknown_state_pages,
        }


def transition_hazard(spec: PlatformSpec) -> str:
    """What a stray load_unaligned_zeropad() into a page in transition meets: "not present"
    where the platform marks the range not present for the transition (vTOM since Linux
    6.9, hv_vtom_clear_present(): an ordinary #PF, fixed up like any other, and never the
    #VC/#VE that a paravisor would swallow), "recoverable" where the platform's own
    exception handler fixes it up (TDX #VE, SNP #VC without a paravisor), "none" without
    encryption. Never "fatal" for a kernel the model follows: the fatal hazards are the
    permanent ones that `check` counts."""
    if not spec.encrypts:
        return "none"
    return "not present" if spec.clears_present else "recoverable"


def _masks(guest: Guest) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    n = guest.end_pfn
    dm = guest.direct_map
    state = guest.platform.state[:n]
    ram = dm.ram[:n]
    attr = dm.attr[:n]
    fatal = ram & (attr == PRIVATE) & (state == PAGE_SHARED)
    benign = ram & (attr == SHARED) & (state == PAGE_PRIVATE)
    for area in guest.vmalloc:
        st = state[area.pfns]
        if area.attr == PRIVATE:
            fatal[area.pfns[st == PAGE_SHARED]] = True
        else:
            benign[area.pfns[st == PAGE_PRIVATE]] = True
    return fatal, benign


def check(guest: Guest) -> HazardReport:
    """Count pages with at least one hazardous mapping, by kind."""
    if not guest.platform.encrypts:
        return HazardReport()
    fatal, benign = _masks(guest)
    unknown = int(np.count_nonzero(guest.platform.state == PAGE_UNKNOWN))
    return HazardReport(int(fatal.sum()), int(benign.sum()), unknown)


def hazard_pfns(guest: Guest, kind: str) -> npt.NDArray[np.int64]:
    """The PFNs behind one hazard kind (for reports and debugging)."""
    if kind not in KINDS:
        raise ValueError(f"unknown hazard kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not guest.platform.encrypts:
        return np.zeros(0, dtype=np.int64)
    fatal, benign = _masks(guest)
    return np.flatnonzero(fatal if kind == KINDS[0] else benign).astype(np.int64)


Selection = slice | npt.NDArray[np.int64]


def flags_of(
    state: npt.NDArray[np.uint8],
    ram: npt.NDArray[np.bool_],
    attr: npt.NDArray[np.uint8],
    vm_private: npt.NDArray[np.uint16],
    vm_shared: npt.NDArray[np.uint16],
    sel: Selection,
) -> tuple[int, int, int]:
    """(fatal, benign, unknown) pages among `sel`: a shared page with a private direct-map
    alias or a private vmalloc mapping is fatal, a private page with a shared one benign, a
    page of unknown state counted apart (the rule of _masks, on the pages of `sel` only)."""
    st = state[sel]
    ram_sel = ram[sel]
    attr_sel = attr[sel]
    shared = st == PAGE_SHARED
    private = st == PAGE_PRIVATE
    fatal = shared & ((ram_sel & (attr_sel == PRIVATE)) | (vm_private[sel] > 0))
    benign = private & ((ram_sel & (attr_sel == SHARED)) | (vm_shared[sel] > 0))
    unknown = st.size - int(np.count_nonzero(shared | private))
    return int(np.count_nonzero(fatal)), int(np.count_nonzero(benign)), unknown


class HazardCounts:
    """The same three counts as :func:`check`, kept up to date where page states change.

    Why: `check` scans every page of the guest (tens of milliseconds on a 64 GiB guest), and
    the daemon answers /metrics and GET /v1/pool from these counts on its event loop. A
    page's hazard depends only on its own state, its direct-map attribute and the vmalloc
    areas that map it, so a change to a set of pages changes the counts only by the
    difference between those pages' hazards before and after it. The Guest calls
    :meth:`before` / :meth:`after` around every conversion (the points that write page states
    and attributes: set_memory_*crypted on a range, the vmalloc variant on an area's pages)
    and :meth:`mapped` / :meth:`unmapped` when a vmalloc area comes or goes.

    The vmalloc part of a page's hazard needs how many private and how many shared vmalloc
    areas map it: two per-page counters (uint16; np.zeros is calloc'd, so only pages ever
    vmapped cost resident memory). An area counts once per page it maps, however often it
    lists the page. Guest.check_invariants compares the counts with a full `check`.

    Mappings are applied lazily: vmap/vunmap only note the area (a dict operation), and an
    area unmapped before it was applied cancels out; :meth:`flush` applies what is noted
    before anything reads the counters or changes page states (the counts are a function of
    the final states, so the order of the noted mappings does not matter). A pool's buffer
    that comes and goes between two scrapes then costs two dict operations, not four numpy
    calls on its pages.
    """

    __slots__ = ("_maps", "_unmaps", "benign", "fatal", "unknown", "vm_private", "vm_shared")

    def __init__(self, end_pfn: int) -> None:
        self.fatal = 0
        self.benign = 0
        self.unknown = 0
        self.vm_private = np.zeros(end_pfn, dtype=np.uint16)
        self.vm_shared = np.zeros(end_pfn, dtype=np.uint16)
        self._maps: dict[int, tuple[npt.NDArray[np.int64], int]] = {}  # area id -> (pfns, attr)
        self._unmaps: list[tuple[npt.NDArray[np.int64], int]] = []

    @classmethod
    def recount(cls, guest: Guest) -> HazardCounts:
        """Counts and per-page mapping counters computed from scratch (at build, after
        loading a state that did not carry them)."""
        hc = cls(guest.end_pfn)
        for area in guest.vmalloc:
            (hc.vm_shared if area.attr == SHARED else hc.vm_private)[area.pfns] += 1
        report = check(guest)
        hc.fatal = report.private_alias_to_shared
        hc.benign = report.shared_alias_to_private
        hc.unknown = report.unknown_state_pages
        return hc

    def report(self, guest: Guest) -> HazardReport:
        self.flush(guest)
        return HazardReport(self.fatal, self.benign, self.unknown)

    def note_map(self, area_id: int, pfns: npt.NDArray[np.int64], attr: int) -> None:
        """A vmalloc area now maps `pfns` with `attr` (applied at the next flush)."""
        self._maps[area_id] = (pfns, attr)

    def note_unmap(self, area_id: int, pfns: npt.NDArray[np.int64], attr: int) -> None:
        """A vmalloc area with `attr` no longer maps `pfns`."""
        if self._maps.pop(area_id, None) is None:
            self._unmaps.append((pfns, attr))

    def flush(self, guest: Guest) -> None:
        """Apply the noted mappings: before counters are read or page states change."""
        if self._unmaps:
            unmaps, self._unmaps = self._unmaps, []
            for pfns, attr in unmaps:
                self.unmapped(guest, pfns, attr)
        if self._maps:
            maps, self._maps = self._maps, {}
            for pfns, attr in maps.values():
                self.mapped(guest, pfns, attr)

    def _flags(self, guest: Guest, sel: Selection) -> tuple[int, int, int]:
        """(fatal, benign, unknown) pages among `sel` (a slice or unique pfns), as _masks.
        A page array on the compiled allocator goes to the core's hazard_flags (one pass
        where numpy makes five gathers and a dozen temporaries; flags_of is its reference)."""
        dm = guest.direct_map
        arrays = (guest.platform.state, dm.ram, dm.attr, self.vm_private, self.vm_shared)
        if not isinstance(sel, slice) and guest.allocator.backend == "c":
            core = compiled_core()
            if core is not None:
                flags: tuple[int, int, int] = core.hazard_flags(
                    *arrays, np.ascontiguousarray(sel, dtype=np.int64)
                )
                return flags
        return flags_of(*arrays, sel)

    def before(self, guest: Guest, sel: Selection) -> tuple[int, int, int]:
        """Take the pages' hazards before a change (pass the result to :meth:`after`)."""
        self.flush(guest)
        return self._flags(guest, sel)

    def after(self, guest: Guest, sel: Selection, before: tuple[int, int, int]) -> None:
        f, b, u = self._flags(guest, sel)
        self.fatal += f - before[0]
        self.benign += b - before[1]
        self.unknown += u - before[2]

    def remap(self, pfns: npt.NDArray[np.int64], old_attr: int, new_attr: int) -> None:
        """An area's PTEs changed attribute (call between before and after)."""
        if old_attr != new_attr:
            self._counter(old_attr)[pfns] -= 1
            self._counter(new_attr)[pfns] += 1

    def _counter(self, attr: int) -> npt.NDArray[np.uint16]:
        return self.vm_shared if attr == SHARED else self.vm_private

    def _first_mappings(self, guest: Guest, pfns: npt.NDArray[np.int64], attr: int) -> int:
        """Pages of `pfns` whose hazard a first (last) `attr` mapping adds (removes): the
        pages of the opposite state that no area of `attr` maps yet and whose direct-map
        alias is not already hazardous. The fast path (every page already in the state the
        mapping expects, the pool's case) touches only the pages' states."""
        opposite = PAGE_PRIVATE if attr == SHARED else PAGE_SHARED
        hit = guest.platform.state[pfns] == opposite
        if not hit.any():
            return 0
        q = unique(pfns[hit])
        dm = guest.direct_map
        alias_hazard = dm.ram[q] & (dm.attr[q] == attr)
        return int(np.count_nonzero((self._counter(attr)[q] == 0) & ~alias_hazard))

    def mapped(self, guest: Guest, pfns: npt.NDArray[np.int64], attr: int) -> None:
        """A vmalloc area with attribute `attr` now maps `pfns`."""
        if guest.platform.encrypts:
            n = self._first_mappings(guest, pfns, attr)
            if attr == SHARED:
                self.benign += n
            else:
                self.fatal += n
        self._counter(attr)[pfns] += 1

    def unmapped(self, guest: Guest, pfns: npt.NDArray[np.int64], attr: int) -> None:
        """A vmalloc area with attribute `attr` no longer maps `pfns`."""
        counter = self._counter(attr)
        counter[pfns] -= 1
        if guest.platform.encrypts:
            n = self._first_mappings(guest, pfns, attr)
            if attr == SHARED:
                self.benign -= n
            else:
                self.fatal -= n

    def clone(self, guest: Guest) -> HazardCounts:
        self.flush(guest)
        other = HazardCounts(len(self.vm_private))
        other.fatal, other.benign, other.unknown = self.fatal, self.benign, self.unknown
        for src, dst in ((self.vm_private, other.vm_private), (self.vm_shared, other.vm_shared)):
            nz = np.flatnonzero(src)  # sparse copy: the fresh arrays stay mostly untouched
            dst[nz] = src[nz]
        return other

    def __getstate__(self) -> dict[str, Any]:
        """Pickled sparse (daemon snapshots): the mapped pages only, not two arrays per pfn;
        noted mappings as they are (Guest.__getstate__ flushes them first)."""
        out: dict[str, Any] = {
            "n": len(self.vm_private),
            "counts": (self.fatal, self.benign, self.unknown),
            "maps": self._maps,
            "unmaps": self._unmaps,
        }
        for name in ("vm_private", "vm_shared"):
            arr = getattr(self, name)
            nz = np.flatnonzero(arr)
            out[name] = (nz, arr[nz])
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        HazardCounts.__init__(self, int(state["n"]))
        self.fatal, self.benign, self.unknown = state["counts"]
        self._maps, self._unmaps = dict(state.get("maps", {})), list(state.get("unmaps", []))
        for name in ("vm_private", "vm_shared"):
            nz, values = state[name]
            getattr(self, name)[nz] = values
