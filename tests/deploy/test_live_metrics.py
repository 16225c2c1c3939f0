"""The live /metrics of a real sharedpoold covers the contract of DESIGN.md section 4.

The dashboard and the rules are checked against the live scrape
(test_promql_names.py); this module checks that the live scrape is what the
contract promises: every family with its type and labels, the label values the
contract fixes, and value domains the panels rely on (indexes as fractions,
orders 0..10, latency buckets from 1 µs to 100 ms).
"""

from __future__ import annotations

import math

from support.metrics_contract import LiveScrape, Metric, contract_series_names

# The text format has no info type: prometheus_client exposes an Info as a gauge
# named <name>_info with the info in labels.
_TEXT_TYPE = {"info": "gauge"}


def _samples(scrape: LiveScrape, series: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(labels), value) for (name, labels), value in scrape.values.items() if name == series
    ]


def test_live_scrape_covers_the_contract(
    live_scrape: LiveScrape, contract_metrics: list[Metric]
) -> None:
    problems = []
    for metric in contract_metrics:
        live = live_scrape.families.get(metric.name)
        if live is None:
            problems.append(f"{metric.name}: not exported")
            continue
        if live.type != _TEXT_TYPE.get(metric.type, metric.type):
            problems.append(f"{metric.name}: type {live.type}, contract {metric.type}")
        if live.labels != metric.labels:
            problems.append(
                f"{metric.name}: labels {sorted(live.labels)}, contract {sorted(metric.labels)}"
            )
        for series in contract_series_names(metric):
            if series not in live_scrape.series:
                problems.append(f"{metric.name}: no series {series}")
    assert not problems, "\n".join(problems)


def test_contract_label_values_are_exported(
    live_scrape: LiveScrape, contract_label_values: dict[str, frozenset[str]]
) -> None:
    seen: dict[str, set[str]] = {}
    for per_label in live_scrape.label_values.values():
        for label, values in per_label.items():
            seen.setdefault(label, set()).update(values)
    for label, values in contract_label_values.items():
        assert values <= seen.get(label, set()), (label, sorted(seen.get(label, set())))


def test_page_allocator_gauges_by_zone_and_order(live_scrape: LiveScrape) -> None:
    orders = {str(o) for o in range(11)}
    for name in (
        "sharedpool_buddy_free_blocks",
        "sharedpool_fragmentation_index",
        "sharedpool_unusable_free_index",
    ):
        assert live_scrape.label_values[name]["order"] == orders, name
        assert {"DMA", "DMA32", "Normal"} <= live_scrape.label_values[name]["zone"], name
    for labels, value in _samples(live_scrape, "sharedpool_buddy_free_blocks"):
        assert value >= 0 and value == int(value), labels
    # Fractions (the kernel's thousandths / 1000): -1 when a suitable block is free.
    for labels, value in _samples(live_scrape, "sharedpool_fragmentation_index"):
        assert value == -1 or 0 <= value <= 1, (labels, value)
    for labels, value in _samples(live_scrape, "sharedpool_unusable_free_index"):
        assert 0 <= value <= 1, (labels, value)


def test_every_label_value_exists_before_anything_happens(live_scrape: LiveScrape) -> None:
    """Counters start at 0 for every label value, so increase() sees the first event.

    (A series born at 1 is invisible to rate(), increase() and the alerts built
    on them until it moves again.)"""
    values = live_scrape.label_values
    assert values["sharedpool_allocations_total"]["result"] >= {
        "ok",
        "exhausted",
        "no_memory",
        "conversion_failed",
    }
    assert values["sharedpool_conversions_total"]["direction"] == {"to_shared", "to_private"}
    assert values["sharedpool_converted_bytes_total"]["direction"] == {"to_shared", "to_private"}
    assert values["sharedpool_direct_map_splits_total"]["level"] == {"2", "3"}
    assert values["sharedpool_pool_chunks"]["state"] >= {"free", "partial", "full", "leaked"}
    assert values["sharedpool_alloc_duration_seconds_count"]["size_class"] == {
        "le_64KiB",
        "le_1MiB",
        "le_16MiB",
        "gt_16MiB",
    }
    for labels, value in _samples(live_scrape, "sharedpool_allocations_total"):
        assert value == 0, labels


def test_latency_buckets_from_1us_to_100ms(live_scrape: LiveScrape) -> None:
    bounds = sorted(
        float(le)
        for le in live_scrape.label_values["sharedpool_alloc_duration_seconds_bucket"]["le"]
    )
    assert bounds[0] == 1e-6
    assert bounds[-2] == 0.1 and math.isinf(bounds[-1])
