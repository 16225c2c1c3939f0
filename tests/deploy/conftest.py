"""Shared facts for the tests of deploy/ (a package-less test directory).

EXPORTED_METRICS is the metric contract of DESIGN.md section 4, written out by
hand. The daemon issue will replace it by a live scrape of the real daemon
(start sharedpoold, GET /metrics, parse it with
prometheus_client.parser.text_string_to_metric_families): the tests below only
use the `exported_series` and `exported_labels` fixtures, so that change stays
inside this file.

Test modules never `import conftest` (ambiguous when tests/ has a conftest.py
too): they take the contract from fixtures, and paths from deploy_paths.py.
"""

from __future__ import annotations

import shutil
from typing import NamedTuple

import pytest


class Metric(NamedTuple):
    """One metric family as the daemon exposes it."""

    name: str  # as exposed: counters end in _total, the info metric in _info
    type: str  # gauge | counter | histogram | info
    labels: frozenset[str]  # labels besides the target's job and instance


def _m(name: str, type_: str, *labels: str) -> Metric:
    return Metric(f"sharedpool_{name}", type_, frozenset(labels))


# DESIGN.md section 4. The page-allocator gauges carry a zone label besides
# order (one series per zone, as in /proc/buddyinfo).
EXPORTED_METRICS: list[Metric] = [
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

# Label values the contract fixes; a matcher on another value can never match.
CONTRACT_LABEL_VALUES: dict[str, frozenset[str]] = {
    "page_size": frozenset({"4k", "2M", "1G"}),
    "kind": frozenset({"private_alias_to_shared", "shared_alias_to_private"}),
}

# Labels Prometheus attaches to every scraped series, and series it makes itself.
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_SYNTHETIC_SERIES = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
)


def series_names(metric: Metric) -> dict[str, frozenset[str]]:
    """The series names one family produces in PromQL, with their label names."""
    if metric.type == "histogram":
        return {
            f"{metric.name}_bucket": metric.labels | {"le"},
            f"{metric.name}_sum": metric.labels,
            f"{metric.name}_count": metric.labels,
        }
    return {metric.name: metric.labels}


@pytest.fixture(scope="session")
def exported_labels() -> dict[str, frozenset[str]]:
    """Every series name the daemon exports, with its label names (job/instance added)."""
    out: dict[str, frozenset[str]] = {}
    for metric in EXPORTED_METRICS:
        for name, labels in series_names(metric).items():
            out[name] = labels | TARGET_LABELS
    return out


@pytest.fixture(scope="session")
def exported_families() -> dict[str, frozenset[str]]:
    """Family name -> the series names it produces (histograms: _bucket/_sum/_count)."""
    return {m.name: frozenset(series_names(m)) for m in EXPORTED_METRICS}


@pytest.fixture(scope="session")
def contract_label_values() -> dict[str, frozenset[str]]:
    return CONTRACT_LABEL_VALUES


@pytest.fixture(scope="session")
def prometheus_synthetic_series() -> frozenset[str]:
    return PROMETHEUS_SYNTHETIC_SERIES


@pytest.fixture(scope="session")
def exported_series(exported_labels: dict[str, frozenset[str]]) -> frozenset[str]:
    return frozenset(exported_labels)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not installed (Debian package 'prometheus'); "
            "deploy/ci-checks.sh installs it and runs these checks unconditionally"
        )
    return path
