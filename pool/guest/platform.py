"""The confidential-computing platform: page state and the conversion hypercalls.

TDX (arch/x86/coco/tdx/tdx.c): one MapGPA per physically contiguous range, with
the retry protocol of tdx_map_gpa(): the host may answer "retry from X" (X inside
the range); an answer that makes no progress consumes one of three retries, an
answer that makes progress resets the count. Shared -> private then accepts every
page, greedily in 1 GiB, 2 MiB and 4 KiB pieces by alignment and remaining length
(try_accept_one). vmalloc ranges are converted one page at a time (the kernel's
tdx_enc_status_changed() steps page by page for vmalloc addresses).

SNP (arch/x86/kernel/sev.c): page-state changes are batched, up to 253 entries per
GHCB request, a 2 MiB entry where the range is 2 MiB aligned, even across the
scattered pages of a vmalloc range; every entry is PVALIDATEd (rescinded before
private -> shared, validated after shared -> private). The real kernel terminates
the guest when a page-state change fails; the model leaves the pages in an unknown
state, as on TDX, so fault injection stays comparable.

`none`: no conversion at all (set_memory_decrypted is a no-op without
CC_ATTR_MEM_ENCRYPT), so no hypercalls and no direct-map splits.

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
SNP_PSC_ENTRIES = 253  # VMGEXIT_PSC_MAX_ENTRY


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
        if name not in ("none", "tdx", "snp"):
            raise ValueError(f"unknown platform {name!r}: expected none, tdx or snp")
        self.name = name
        self.stats = stats
        self.costs = costs
        self.host = host
        self.state = np.zeros(end_pfn, dtype=np.uint8)

    @property
    def encrypts(self) -> bool:
        return self.name != "none"

    @property
    def cache_flush_required(self) -> bool:
        """enc_cache_flush_required(): TDX always; SNP guests have SME_COHERENT."""
        return self.name == "tdx"

    def convert(self, runs: Sequence[tuple[int, int]], to_shared: bool) -> ConversionResult:
        """The hypercall part of one conversion of `runs` (TDX: one MapGPA each; SNP: batched).
        On failure the failing call's pages become UNKNOWN and later runs are left as they were."""
        if not self.encrypts:
            return ConversionResult(True, sum(n for _, n in runs), 0, 0.0)
        before_calls = self.stats.hypercalls
        before_seconds = self.stats.modeled_conversion_seconds
        if self.name == "tdx":
            ok, unknown = self._convert_tdx(runs, to_shared)
        else:
            ok, unknown = self._convert_snp(runs, to_shared)
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
        page). Vectorized when the host is sure to answer ok; otherwise call by call."""
        host = self.host
        n = len(pfns)
        if self.name != "tdx" or not isinstance(host, SimulatedHost) or not host.quiet_for(n):
            runs = [(p, 1) for p in pfns.tolist()]
            if self.name == "snp":
                from pool.guest.vmalloc import runs_of  # PSC requests batch scattered pages

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
            self._charge_hypercall()
            answer = self.host.map_gpa(batch[0][0], sum(n for _, n in batch), to_shared)
            if answer.status != "ok":
                for p, n in batch:
                    self.state[p : p + n] = PAGE_UNKNOWN
                return False, sum(n for _, n in batch)
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

    def states_of(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        return self.state[pfns]

    def clone(self, stats: GuestStats, host: Host) -> Platform:
        other = Platform(self.name, 0, stats, self.costs, host)
        other.state = self.state.copy()
        return other
