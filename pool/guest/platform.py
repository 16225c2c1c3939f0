"""The confidential-computing platform: page state and the conversion hypercalls.

TDX (arch/x86/coco/tdx/tdx.c): one MapGPA per physically contiguous range, with
the retry protocol of tdx_map_gpa(): the host may answer "retry from X" (X inside
the range); an answer that makes no progress consumes one of three retries, an
answer that makes progress resets the count. Shared -> private then accepts every
page, greedily in 1 GiB, 2 MiB and 4 KiB pieces by alignment and remaining length
(try_accept_one). vmalloc ranges are converted one page at a time (the kernel's
tdx_enc_status_changed() steps page by page for vmalloc addresses).

SNP (arch/x86/kernel/sev.c, __set_pages_state()): page-state changes are batched,
up to VMGEXIT_PSC_MAX_ENTRY = 64 entries per VMGEXIT (arch/x86/include/asm/sev.h;
253, VMGEXIT_PSC_MAX_COUNT, is the GHCB protocol's limit that hypervisors accept, not
what the guest kernel sends), a 2 MiB entry where the range is 2 MiB aligned and whole,
else 4 KiB entries; every entry is PVALIDATEd (rescinded before private -> shared,
validated after shared -> private). The real kernel terminates the guest when a
page-state change fails; the model leaves the pages in an unknown state, as on TDX, so
fault injection stays comparable.

Hyper-V with a paravisor (vTOM; arch/x86/hyperv/ivm.c, hv_vtom_set_host_visibility()):
the guest hands the paravisor a list of PFNs, HvCallModifySparseGpaPageHostVisibility
with up to HV_MAX_MODIFY_GPA_REP_COUNT = 510 PFNs per call, one PFN per 4 KiB page
whether the range is contiguous or not (a vmalloc range is walked with
slow_virt_to_phys()). The paravisor does the platform's own work (page-state change,
PVALIDATE or accept) inside the call: the model counts it as one validation per page
(accept_calls_4k) at the profile's per-page cost. Since Linux 6.9
(hv_vtom_clear_present()) the pages are marked not present for the whole transition, so
a stray load_unaligned_zeropad() takes the ordinary #PF fixup (pool.guest.hazards).

`none`: no conversion at all (set_memory_decrypted is a no-op without
CC_ATTR_MEM_ENCRYPT), so no hypercalls and no direct-map splits.

Which platform does what is written once, in PLATFORM_SPECS (PlatformSpec): the
conversion sequence (pool.guest.encpgtable), the command lines' --platform choices
(pool.guest.options) and the cost profile's sections (pool.guest.costs) all follow it.

A failed conversion leaves the pages of the failing call in an UNKNOWN state:
callers must leak them, never give them back to the page allocator.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.costs import CostProfile
from pool.guest.stats import GuestStats
from pool.guest.units import PAGES_PER_1G, PAGES_PER_2M

PAGE_PRIVATE = 0
PAGE_SHARED = 1
PAGE_UNKNOWN = 2

MAX_RETRIES_WITHOUT_PROGRESS = 3  # tdx_map_gpa(): max_retries_per_page
SNP_PSC_ENTRIES = 64  # VMGEXIT_PSC_MAX_ENTRY (arch/x86/include/asm/sev.h)
SNP_PSC_PROTOCOL_MAX = 253  # VMGEXIT_PSC_MAX_COUNT: the GHCB protocol's limit (hypervisors)
HV_MAX_MODIFY_GPA_REP_COUNT = 510  # arch/x86/hyperv/ivm.c: PFNs per visibility hypercall


@attrs.frozen
class PlatformSpec:
    """What one platform's set_memory_{en,de}crypted() does, as x86_platform.guest's
    callbacks say (arch/x86/kernel/x86_init.c and each platform's init).

    encrypts: CC_ATTR_MEM_ENCRYPT (False: set_memory_decrypted is a no-op).
    cache_flush_required: enc_cache_flush_required() (TDX true; SNP is SME_COHERENT;
      hv_vtom_cache_flush_required() false).
    tlb_flush_before: enc_tlb_flush_required(): the flush before the change
      (hv_vtom_tlb_flush_required() false since 6.9: hv_vtom_clear_present() flushed).
    prepare_directions: the directions (to_shared values) whose hypercalls run in
      enc_status_change_prepare(), before the page tables change; the others run in
      enc_status_change_finish(), after. TDX: shared -> private first
      (tdx_enc_status_change_prepare); SNP: private -> shared first
      (amd_enc_status_change_prepare, snp_set_memory_shared); vTOM: both after.
    clears_present: prepare marks the range not present (set_memory_np, a TLB flush) and
      finish marks it present again (set_memory_p, another flush): Linux 6.9 x86/hyperv.
    stray_load_fixup: what a stray load_unaligned_zeropad() into a page in transition
      meets (pool.guest.hazards.transition_hazard).
    """

    name: str
    encrypts: bool
    cache_flush_required: bool
    tlb_flush_before: bool
    prepare_directions: frozenset[bool]
    clears_present: bool
    stray_load_fixup: str
    source: str


PLATFORM_SPECS: dict[str, PlatformSpec] = {
    spec.name: spec
    for spec in (
        PlatformSpec("none", False, False, False, frozenset(), False, "none needed", "no CoCo"),
        PlatformSpec(
            "tdx",
            True,
            True,
            True,
            frozenset({False}),
            False,
            "#VE fixup (ve_handle_mmio / the EPT-violation path)",
            "arch/x86/coco/tdx/tdx.c",
        ),
        PlatformSpec(
            "snp",
            True,
            False,
            True,
            frozenset({True}),
            False,
            "#VC fixup",
            "arch/x86/kernel/sev.c, arch/x86/mm/mem_encrypt_amd.c",
        ),
        PlatformSpec(
            "hyperv-vtom",
            True,
            False,
            False,
            frozenset(),
            True,
            "#PF fixup: pages not present during the transition (Linux 6.9)",
            "arch/x86/hyperv/ivm.c",
        ),
    )
}
PLATFORMS: tuple[str, ...] = tuple(PLATFORM_SPECS)  # the --platform choices, in this order


def platform_spec(name: str) -> PlatformSpec:
    """The spec of `name`; ValueError naming the choices (the one message for every caller)."""
    spec = PLATFORM_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    return spec


@attrs.frozen
class HostAnswer:
    """The host's answer to one MapGPA: ok, retry from `retry_pfn`, or error."""

    status: str  # "ok" | "retry" | "error"
    retry_pfn: int = 0


OK = HostAnswer("ok")
ERROR = HostAnswer("error")


class Host(Protocol):
    def map_gpa(self, start_pfn: int, npages: int, to_shared: bool) -> HostAnswer: ...


@attrs.frozen
class FaultPlan:
    """Conversion failures to inject, reproducible by seed.

    failure_rate: probability that a conversion call fails.
    fail_calls: 1-based indexes of conversion calls (MapGPA / PSC requests) that fail.
    retry_rate: probability that the host answers "retry from X" with partial progress.
    direction: "any", "to_shared" or "to_private": which conversions may fail
      ("to_private" models re-encryption failures only: CVE-2024-36911's case).
    """

    failure_rate: float = 0.0
    fail_calls: frozenset[int] = frozenset()
    retry_rate: float = 0.0
    direction: str = "any"
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0 or not 0.0 <= self.retry_rate <= 1.0:
            raise ValueError("failure_rate and retry_rate must be within [0, 1]")
        if self.direction not in ("any", "to_shared", "to_private"):
            raise ValueError(
                f"fault direction must be any, to_shared or to_private: {self.direction!r}"
            )


@attrs.define
class SimulatedHost:
    """A well-behaved host with injected faults. Counts its calls (1-based)."""

    faults: FaultPlan = FaultPlan()
    calls: int = 0
    rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.faults.seed)

    def quiet_for(self, ncalls: int) -> bool:
        """True when the next `ncalls` calls are sure to answer ok (no rate, no listed call):
        lets the platform account for a page-by-page conversion in one vector step."""
        plan = self.faults
        if plan.failure_rate or plan.retry_rate:
            return False
        return not any(self.calls < k <= self.calls + ncalls for k in plan.fail_calls)

    def skip(self, ncalls: int) -> None:
        """Count `ncalls` calls answered ok without asking one by one (after quiet_for)."""
        self.calls += ncalls

    def map_gpa(self, start_pfn: int, npages: int, to_shared: bool) -> HostAnswer:
        self.calls += 1
        plan = self.faults
        eligible = plan.direction == "any" or (plan.direction == "to_shared") == to_shared
        if eligible and (
            self.calls in plan.fail_calls
            or (plan.failure_rate and self.rng.random() < plan.failure_rate)
        ):
            return ERROR
        if npages > 1 and plan.retry_rate and self.rng.random() < plan.retry_rate:
            return HostAnswer("retry", start_pfn + self.rng.randrange(1, npages))
        return OK


@attrs.define
class ScriptedHost:
    """A host that plays back given answers (then ok): for golden tests of the retry protocol."""

    answers: deque[HostAnswer]
    calls: list[tuple[int, int, bool]] = attrs.Factory(list)

    def map_gpa(self, start_pfn: int, npages: int, to_shared: bool) -> HostAnswer:
        self.calls.append((start_pfn, npages, to_shared))
        return self.answers.popleft() if self.answers else OK


def accept_pieces(start: int, npages: int) -> tuple[int, int, int]:
    """(1G, 2M, 4K) accept calls for [start, start+npages): try_accept_one() greedily takes
    the largest piece that is aligned at the current address and fits the remaining length."""
    n1g = n2m = n4k = 0
    p, end = start, start + npages
    while p < end:
        if p % PAGES_PER_1G == 0 and end - p >= PAGES_PER_1G:
            n1g += 1
            p += PAGES_PER_1G
        elif p % PAGES_PER_2M == 0 and end - p >= PAGES_PER_2M:
            n2m += 1
            p += PAGES_PER_2M
        else:
            step = min(end - p, PAGES_PER_2M - p % PAGES_PER_2M)
            n4k += step
            p += step
    return n1g, n2m, n4k


@attrs.frozen
class ConversionResult:
    ok: bool
    pages: int
    hypercalls: int
    modeled_seconds: float
    unknown_pages: int = 0


class Platform:
    """Per-page private/shared/unknown state and the conversion calls of one platform."""

    def __init__(
        self, name: str, end_pfn: int, stats: GuestStats, costs: CostProfile, host: Host
    ) -> None:
        self.spec = platform_spec(name)
        self.name = name
        self.stats = stats
        self.costs = costs
        self.host = host
        self.state = np.zeros(end_pfn, dtype=np.uint8)

    @property
    def encrypts(self) -> bool:
        return self.spec.encrypts

    @property
    def cache_flush_required(self) -> bool:
        """enc_cache_flush_required(): TDX always; SNP guests have SME_COHERENT; vTOM not."""
        return self.spec.cache_flush_required

    def convert(self, runs: Sequence[tuple[int, int]], to_shared: bool) -> ConversionResult:
        """The hypercall part of one conversion of `runs` (TDX: one MapGPA each; SNP: batched
        entries; vTOM: batched PFNs). On failure the failing call's pages become UNKNOWN and
        later runs are left as they were."""
        if not self.encrypts:
            return ConversionResult(True, sum(n for _, n in runs), 0, 0.0)
        before_calls = self.stats.hypercalls
        before_seconds = self.stats.modeled_conversion_seconds
        if self.name == "tdx":
            ok, unknown = self._convert_tdx(runs, to_shared)
        elif self.name == "snp":
            ok, unknown = self._convert_snp(runs, to_shared)
        else:
            ok, unknown = self._convert_vtom(runs, to_shared)
        pages = sum(n for _, n in runs)
        if not ok:
            self.stats.conversion_failures += 1
        return ConversionResult(
            ok,
            pages,
            self.stats.hypercalls - before_calls,
            self.stats.modeled_conversion_seconds - before_seconds,
            unknown,
        )

    def convert_pages(self, pfns: npt.NDArray[np.int64], to_shared: bool) -> ConversionResult:
        """Convert scattered pages one page at a time (vmalloc addresses on TDX: one MapGPA per
        page; SNP and vTOM batch them as for a range). Vectorized on TDX when the host is sure
        to answer ok; otherwise call by call."""
        host = self.host
        n = len(pfns)
        if self.name == "hyperv-vtom" and isinstance(host, SimulatedHost):
            ncalls = -(-n // HV_MAX_MODIFY_GPA_REP_COUNT)
            if host.quiet_for(ncalls):  # _convert_vtom's counts, in one vector step
                host.skip(ncalls)
                return self._vtom_quiet(pfns, ncalls, to_shared)
        if self.name != "tdx" or not isinstance(host, SimulatedHost) or not host.quiet_for(n):
            runs = [(p, 1) for p in pfns.tolist()]
            if self.name in ("snp", "hyperv-vtom"):
                from pool.guest.vmalloc import runs_of  # batched requests: contiguous runs

                runs = list(runs_of(pfns))
            return self.convert(runs, to_shared)
        host.skip(n)
        s, c = self.stats, self.costs
        seconds = n * c.hypercall_seconds
        s.hypercalls += n
        self.state[pfns] = PAGE_SHARED if to_shared else PAGE_PRIVATE
        s.pages_converted += n
        if to_shared:
            s.pages_to_shared += n
        else:
            s.pages_to_private += n
            s.accept_calls_4k += n
            s.pages_accepted += n
            seconds += n * c.accept_4k_seconds
        s.modeled_conversion_seconds += seconds
        return ConversionResult(True, n, n, seconds)

    def _vtom_quiet(
        self, pfns: npt.NDArray[np.int64], ncalls: int, to_shared: bool
    ) -> ConversionResult:
        """What _convert_vtom counts for `pfns` when every call answers ok."""
        s, c = self.stats, self.costs
        n = len(pfns)
        self.state[pfns] = PAGE_SHARED if to_shared else PAGE_PRIVATE
        s.hypercalls += ncalls
        s.pages_converted += n
        s.accept_calls_4k += n
        seconds = ncalls * c.hypercall_seconds + n * c.accept_4k_seconds
        if to_shared:
            s.pages_to_shared += n
        else:
            s.pages_to_private += n
            s.pages_accepted += n
        s.modeled_conversion_seconds += seconds
        return ConversionResult(True, n, ncalls, seconds)

    def _set(self, start: int, npages: int, to_shared: bool) -> None:
        self.state[start : start + npages] = PAGE_SHARED if to_shared else PAGE_PRIVATE
        self.stats.pages_converted += npages
        if to_shared:
            self.stats.pages_to_shared += npages
        else:
            self.stats.pages_to_private += npages

    def _charge_hypercall(self) -> None:
        self.stats.hypercalls += 1
        self.stats.modeled_conversion_seconds += self.costs.hypercall_seconds

    def _accept(self, start: int, npages: int) -> None:
        n1g, n2m, n4k = accept_pieces(start, npages)
        s, c = self.stats, self.costs
        s.accept_calls_1g += n1g
        s.accept_calls_2m += n2m
        s.accept_calls_4k += n4k
        s.pages_accepted += npages
        s.modeled_conversion_seconds += (
            n1g * c.accept_1g_seconds + n2m * c.accept_2m_seconds + n4k * c.accept_4k_seconds
        )

    def _map_gpa(self, start: int, npages: int, to_shared: bool) -> bool:
        """tdx_map_gpa(): False when the host errs, answers out of range, or stalls 3 times."""
        end = start + npages
        retries = 0
        while retries < MAX_RETRIES_WITHOUT_PROGRESS:
            self._charge_hypercall()
            answer = self.host.map_gpa(start, end - start, to_shared)
            if answer.status == "ok":
                return True
            if answer.status != "retry" or not start <= answer.retry_pfn < end:
                return False
            if answer.retry_pfn == start:
                retries += 1
                continue
            start = answer.retry_pfn
            retries = 0
        return False

    def _convert_tdx(self, runs: Sequence[tuple[int, int]], to_shared: bool) -> tuple[bool, int]:
        for start, npages in runs:
            if not self._map_gpa(start, npages, to_shared):
                self.state[start : start + npages] = PAGE_UNKNOWN
                return False, npages
            self._set(start, npages, to_shared)
            if not to_shared:
                self._accept(start, npages)
        return True, 0

    def _convert_snp(self, runs: Sequence[tuple[int, int]], to_shared: bool) -> tuple[bool, int]:
        # Entries: a 2 MiB entry where aligned and whole, else 4 KiB entries.
        entries: list[tuple[int, int]] = []
        for start, npages in runs:
            p, end = start, start + npages
            while p < end:
                size = PAGES_PER_2M if p % PAGES_PER_2M == 0 and end - p >= PAGES_PER_2M else 1
                entries.append((p, size))
                p += size
        for i in range(0, len(entries), SNP_PSC_ENTRIES):
            batch = entries[i : i + SNP_PSC_ENTRIES]
            failed = self._batch_call(batch, to_shared)
            if failed:
                return False, failed
            for p, n in batch:
                self._set(p, n, to_shared)
                # PVALIDATE: rescind before private -> shared, validate after shared -> private
                self.stats.accept_calls_2m += n == PAGES_PER_2M
                self.stats.accept_calls_4k += n == 1
                self.stats.modeled_conversion_seconds += (
                    self.costs.accept_2m_seconds
                    if n == PAGES_PER_2M
                    else self.costs.accept_4k_seconds
                )
                if not to_shared:
                    self.stats.pages_accepted += n
        return True, 0

    def _batch_call(self, batch: Sequence[tuple[int, int]], to_shared: bool) -> int:
        """One batched conversion call (an SNP page-state change, a vTOM visibility call) for
        the ``(start, npages)`` pieces of ``batch``: 0 when the host answered ok, else the
        pages of the batch, which are left in the unknown state."""
        self._charge_hypercall()
        answer = self.host.map_gpa(batch[0][0], sum(n for _, n in batch), to_shared)
        if answer.status == "ok":
            return 0
        for p, n in batch:
            self.state[p : p + n] = PAGE_UNKNOWN
        return sum(n for _, n in batch)

    def _convert_vtom(self, runs: Sequence[tuple[int, int]], to_shared: bool) -> tuple[bool, int]:
        """hv_vtom_set_host_visibility(): a PFN list of up to 510 entries per
        HvCallModifySparseGpaPageHostVisibility, one entry per 4 KiB page; the paravisor
        validates each page inside the call (counted as a 4 KiB accept)."""
        pfns: list[tuple[int, int]] = []  # (start, npages) pieces, each within one call
        calls: list[list[tuple[int, int]]] = []
        room = HV_MAX_MODIFY_GPA_REP_COUNT
        for start, npages in runs:
            p, end = start, start + npages
            while p < end:
                take = min(end - p, room)
                pfns.append((p, take))
                p += take
                room -= take
                if room == 0:
                    calls.append(pfns)
                    pfns, room = [], HV_MAX_MODIFY_GPA_REP_COUNT
        if pfns:
            calls.append(pfns)
        s, c = self.stats, self.costs
        for batch in calls:
            failed = self._batch_call(batch, to_shared)
            if failed:
                return False, failed
            for p, n in batch:
                self._set(p, n, to_shared)
                s.accept_calls_4k += n
                s.modeled_conversion_seconds += n * c.accept_4k_seconds
                if not to_shared:
                    s.pages_accepted += n
        return True, 0

    def states_of(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        return self.state[pfns]

    def clone(self, stats: GuestStats, host: Host) -> Platform:
        other = Platform(self.name, 0, stats, self.costs, host)
        other.state = self.state.copy()
        return other
