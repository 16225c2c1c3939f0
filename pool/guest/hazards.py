"""The hazard checker: every mapping's attribute against its page's state.

A private mapping (encryption bit set) to a shared page is fatal on TDX: any
access, even load_unaligned_zeropad() reading past the end of the previous page,
raises an unrecoverable fault. A shared mapping to a private page only raises a
recoverable fault. Pages of unknown state (a failed conversion) are counted
apart: whatever maps them, they must never be reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.directmap import PRIVATE, SHARED
from pool.guest.platform import PAGE_PRIVATE, PAGE_SHARED, PAGE_UNKNOWN

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
