"""The metric contract of DESIGN.md section 4, and a parsed /metrics page.

CONTRACT_METRICS is DESIGN.md section 4 written out by hand: the reference the
live scrape of the real daemon must cover (test_live_metrics.py). The names the
dashboard and the rules may use come from the live scrape itself (conftest.py's
`live_scrape` fixture, parsed by `parse_exposition`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Metric(NamedTuple):
    """One metric family as the daemon exposes it."""

    name: str  # as exposed: counters end in _total, the info metric in _info
    type: str  # gauge | counter | histogram | info
    labels: frozenset[str]  # labels besides the target's job and instance (and le)


def _m(name: str, type_: str, *labels: str) -> Metric:
    return Metric(f"sharedpool_{name}", type_, frozenset(labels))


# DESIGN.md section 4. The page-allocator gauges carry a zone label besides
# order (one series per zone, as in /proc/buddyinfo).
CONTRACT_METRICS: list[Metric] = [
    # gauges
    _m("pool_size_bytes", "gauge"),
    _m("pool_free_bytes", "gauge"),
    _m("pool_used_bytes", "gauge"),
    _m("pool_largest_free_bytes", "gauge"),
    _m("pool_chunks", "gauge", "state"),
    _m("direct_map_bytes", "gauge", "page_size"),
    _m("buddy_free_blocks", "gauge", "order", "zone"),
    _m("fragmentation_index", "gauge", "order", "zone"),
    _m("unusable_free_index", "gauge", "order", "zone"),
    _m("hazard_pages", "gauge", "kind"),
    _m("leaked_bytes", "gauge"),
    _m("clients", "gauge"),
    _m("buffers", "gauge"),
    # counters
    _m("allocations_total", "counter", "result"),
    _m("frees_total", "counter"),
    _m("conversions_total", "counter", "direction"),
    _m("converted_bytes_total", "counter", "direction"),
    _m("hypercalls_total", "counter"),
    _m("direct_map_splits_total", "counter", "level"),
    _m("pool_grows_total", "counter"),
    _m("pool_shrinks_total", "counter"),
    _m("reclaimed_buffers_total", "counter"),
    # histograms
    _m("alloc_duration_seconds", "histogram", "size_class"),
    _m("modeled_conversion_seconds", "histogram"),
    # info
    _m("build_info", "info", "version"),
]

# Label values the contract fixes (DESIGN.md section 4 and its compare --json).
CONTRACT_LABEL_VALUES: dict[str, frozenset[str]] = {
    "page_size": frozenset({"4k", "2M", "1G"}),
    "kind": frozenset({"private_alias_to_shared", "shared_alias_to_private"}),
}

# Labels Prometheus attaches to every scraped series, and series it makes itself.
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_SYNTHETIC_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)


class LiveScrape(NamedTuple):
    """One /metrics page of the real daemon, parsed."""

    text: str
    families: dict[str, Metric]  # exposed family name -> family
    series: dict[str, frozenset[str]]  # series name -> label names (le included)
    label_values: dict[str, dict[str, frozenset[str]]]  # series -> label -> values
    values: dict[tuple[str, frozenset[tuple[str, str]]], float]  # (series, labels) -> value


def parse_exposition(text: str) -> LiveScrape:
    """Families by their exposed name (counters with _total), and every series."""
    families: dict[str, Metric] = {}
    series: dict[str, set[str]] = {}
    label_values: dict[str, dict[str, set[str]]] = {}
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        exposed = family.name + "_total" if family.type == "counter" else family.name
        labels: set[str] = set()
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
            per_label = label_values.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                per_label.setdefault(label, set()).add(value)
            values[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
            labels.update(k for k in sample.labels if k != "le")
        families[exposed] = Metric(exposed, family.type, frozenset(labels))
    # In the text format prometheus_client writes the creation time of each
    # histogram (and Counter) child as a separate gauge family <name>_created.
    # It belongs to its histogram or counter (family_series lists it there).
    for name in [n for n in families if n.endswith("_created")]:
        base = name.removesuffix("_created")
        if base in families or base + "_total" in families:
            del families[name]
    return LiveScrape(
        text,
        families,
        {name: frozenset(labels) for name, labels in series.items()},
        {
            name: {label: frozenset(v) for label, v in per_label.items()}
            for name, per_label in label_values.items()
        },
        values,
    )


def contract_series_names(metric: Metric) -> dict[str, frozenset[str]]:
    """The series names one contract family produces in PromQL, with their label names."""
    if metric.type == "histogram":
        return {
            f"{metric.name}_bucket": metric.labels | {"le"},
            f"{metric.name}_sum": metric.labels,
            f"{metric.name}_count": metric.labels,
        }
    return {metric.name: metric.labels}


def family_series(family: Metric, series: Mapping[str, frozenset[str]]) -> frozenset[str]:
    if family.type == "histogram":
        suffixes = ("_bucket", "_sum", "_count", "_created")
        return frozenset(family.name + s for s in suffixes if family.name + s in series)
    if family.type == "counter":
        base = family.name.removesuffix("_total")
        return frozenset(n for n in (family.name, base + "_created") if n in series)
    return frozenset({family.name} & series.keys())
