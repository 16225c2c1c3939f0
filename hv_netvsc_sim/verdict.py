"""The verdict: one line per strategy that answers the thread's question in its own units.

Five answers, each read off the compare document (no figure is computed twice):

- **serves the vNIC**: no allocation the driver made was refused and every hv_netvsc buffer
  size (the ring, the default and largest send and receive buffers) can be had
  (`failures`, `buffer_checks`);
- **fatal hazard pages**: pages with a private mapping of a shared page at the end
  (`end_state.hazard_pages.private_alias_to_shared`): one stray load_unaligned_zeropad()
  into one of them kills the guest;
- **runtime conversions after warm-up**: conversions (set_memory_{en,de}crypted calls) in
  the second half of the run (`series.conversions`): what the strategy still costs once it
  has settled;
- **direct-map damage per hot add**: 2 MiB (and 1 GiB) leaf splits of the run divided by
  its hot adds, and the page-table memory they took (one 4 KiB page per split); splits are
  never undone, so this is what each hot add leaves behind for good (the reconfigurations
  between hot adds re-allocate the buffers too: their splits are in the numerator);
- **modeled p99 allocation latency** (`alloc_latency_seconds.p99`: the cost profile
  applied to each allocation's work).

The optional runtime estimate (`--runtime-cost-4k FRACTION`) is labelled as an estimate
and is linear in the share of the direct map in 4 KiB pages: share x FRACTION, FRACTION
being what the user takes a fully 4 KiB direct map to cost. The published anchors are
workload-dependent and no stronger claim is made from them: Intel's 2021 direct-map study
(259 tests on 4 machines: 1 GiB pages best in 45 % of the tests, 4 KiB pages the lowest
average on all 4 machines) and Meta's 2022 report (0.5-0.9 % throughput in a web service).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from pool.guest.units import PAGE_SIZE

SOURCES = (
    "Intel 2021 direct-map study: 259 tests, 1 GiB best in 45 %, 4 KiB lowest average on "
    "all 4 machines; Meta 2022: 0.5-0.9 % throughput in a web service; workload-dependent"
)


@attrs.frozen
class Verdict:
    strategy: str
    serves: bool
    refused: int
    refusal_reasons: tuple[str, ...]
    unservable: tuple[str, ...]  # buffer_checks that failed
    fatal_hazard_pages: int
    conversions_after_warm_up: int
    splits_per_hot_add: float
    page_table_bytes_per_hot_add: float
    p99_seconds: float
    timed: int  # allocations the p99 is over (0: every one refused)
    direct_map_4k_share: float
    runtime_estimate: float | None  # fraction of throughput, or None without a parameter

    def as_json(self) -> dict[str, Any]:
        return {
            "serves_vnic": self.serves,
            "refused": self.refused,
            "refusal_reasons": list(self.refusal_reasons),
            "unservable_buffers": list(self.unservable),
            "fatal_hazard_pages": self.fatal_hazard_pages,
            "conversions_after_warm_up": self.conversions_after_warm_up,
            "direct_map_splits_per_hot_add": round(self.splits_per_hot_add, 6),
            "page_table_bytes_per_hot_add": round(self.page_table_bytes_per_hot_add, 3),
            "alloc_latency_p99_seconds": self.p99_seconds,
            "direct_map_4k_share": self.direct_map_4k_share,
            "runtime_cost_estimate": self.runtime_estimate,
        }

    def line(self, width: int) -> str:
        """One line: `name:` then the five answers (and the estimate when asked for)."""
        if self.serves:
            serve = "serves the vNIC"
        else:
            why = ", ".join(self.refusal_reasons or self.unservable)
            serve = f"CANNOT serve the vNIC ({self.refused:,} refused: {why})"
        hazard = (
            "no fatal hazard"
            if self.fatal_hazard_pages == 0
            else f"{self.fatal_hazard_pages:,} FATAL hazard pages"
        )
        damage = (
            f"{self.splits_per_hot_add:,.2f} splits "
            f"({self.page_table_bytes_per_hot_add / 1024:,.1f} KiB page tables) per hot add"
        )
        parts = [
            serve,
            hazard,
            f"{self.conversions_after_warm_up:,} conversions after warm-up",
            damage,
            f"modeled p99 {_ms(self.p99_seconds)}" if self.timed else "no allocation served",
        ]
        if self.runtime_estimate is not None:
            parts.append(f"est. runtime cost {self.runtime_estimate * 100:.3f} %")
        return f"{self.strategy:<{width}}  " + "; ".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


def judge(name: str, r: Mapping[str, Any], runtime_cost_4k: float | None) -> Verdict:
    """The verdict on one strategy's compare result."""
    series = r["series"]
    conv = series.get("conversions", [])
    half = len(conv) // 2
    after = conv[-1] - conv[half - 1] if half >= 1 else (conv[-1] if conv else 0)
    hot_adds = r.get("events", {}).get("hot_add", 0)
    splits = r["run"]["direct_map_splits"]
    nsplits = splits["level2"] + splits["level3"]
    per = nsplits / hot_adds if hot_adds else 0.0
    checks = r.get("buffer_checks", {})
    unservable = tuple(k for k, c in checks.items() if not c.get("ok", True))
    share_series = series.get("direct_map_4k_share", [])
    share = float(share_series[-1]) if share_series else 0.0
    return Verdict(
        strategy=name,
        serves=r["failures"] == 0 and not unservable,
        refused=r["failures"],
        refusal_reasons=tuple(f"{k} {v:,}" for k, v in r["failure_reasons"].items()),
        unservable=unservable,
        fatal_hazard_pages=r["end_state"]["hazard_pages"]["private_alias_to_shared"],
        conversions_after_warm_up=int(after),
        splits_per_hot_add=per,
        page_table_bytes_per_hot_add=per * PAGE_SIZE,
        p99_seconds=r["alloc_latency_seconds"]["p99"],
        timed=r["alloc_latency_seconds"].get("samples", r["allocations"]),
        direct_map_4k_share=share,
        runtime_estimate=None if runtime_cost_4k is None else share * runtime_cost_4k,
    )


def verdicts(doc: Mapping[str, Any]) -> dict[str, Verdict]:
    cost = doc["config"].get("runtime_cost_4k")
    return {name: judge(name, r, cost) for name, r in doc["strategies"].items()}


def verdict_lines(doc: Mapping[str, Any]) -> list[str]:
    """The verdict block: a heading, one line per strategy, and the estimate's label."""
    v = verdicts(doc)
    width = max((len(n) for n in v), default=0)
    out = ["Verdict (per strategy):"]
    out += [x.line(width) for x in v.values()]
    cost = doc["config"].get("runtime_cost_4k")
    if cost is not None:
        out.append(
            f"est. runtime cost = share of the direct map in 4 KiB pages x {cost:g} "
            f"(--runtime-cost-4k, an assumption; {SOURCES})"
        )
    return out
