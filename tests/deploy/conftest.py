"""Shared facts for the tests of deploy/ (a package-less test directory).

What the daemon exports is read from the real daemon: the session fixture
`live_scrape` starts sharedpoold (support/sharedpoold_proc.py: 127.0.0.1, a temporary
state directory, a pristine 8 GiB guest so that every zone exists), GETs
/metrics once and parses it with prometheus_client's parser. The fixtures
derived from it (`exported_labels`, `exported_series`, `exported_families`,
`exported_label_values`) are what test_promql_names.py checks the dashboard and
the rules against.

CONTRACT_METRICS (support/metrics_contract.py) is DESIGN.md section 4 written out by
hand: the reference the live scrape must cover (test_live_metrics.py), not the
source of the names.

Test modules never `import conftest` (ambiguous when tests/ has a conftest.py
too): they take these facts from fixtures, paths from support/deploy_paths.py, and the
contract's types from support/metrics_contract.py.
"""

from __future__ import annotations

import shutil

import pytest
from support.metrics_contract import (
    CONTRACT_LABEL_VALUES,
    CONTRACT_METRICS,
    PROMETHEUS_SYNTHETIC_SERIES,
    TARGET_LABELS,
    LiveScrape,
    Metric,
    family_series,
    parse_exposition,
)
from support.sharedpoold_proc import SCRAPE_CONFIG, running_sharedpoold


@pytest.fixture(scope="session")
def live_scrape(tmp_path_factory: pytest.TempPathFactory) -> LiveScrape:
    """/metrics of a real sharedpoold, started for this and stopped at once."""
    workdir = tmp_path_factory.mktemp("sharedpoold-scrape")
    with running_sharedpoold(workdir, SCRAPE_CONFIG) as daemon:
        text = daemon.get_text("/metrics")
    scrape = parse_exposition(text)
    assert scrape.families, f"empty /metrics:\n{text[:2000]}"
    return scrape


@pytest.fixture(scope="session")
def exported_labels(live_scrape: LiveScrape) -> dict[str, frozenset[str]]:
    """Every series name the daemon exports, with its label names (job/instance added)."""
    return {name: labels | TARGET_LABELS for name, labels in live_scrape.series.items()}


@pytest.fixture(scope="session")
def exported_families(live_scrape: LiveScrape) -> dict[str, frozenset[str]]:
    """Family name -> the series names it produces (histograms: _bucket/_sum/_count)."""
    return {
        name: family_series(family, live_scrape.series)
        for name, family in live_scrape.families.items()
    }


@pytest.fixture(scope="session")
def exported_series(exported_labels: dict[str, frozenset[str]]) -> frozenset[str]:
    return frozenset(exported_labels)


@pytest.fixture(scope="session")
def exported_label_values(live_scrape: LiveScrape) -> dict[str, dict[str, frozenset[str]]]:
    """Series name -> label -> every value the live scrape shows for it.

    The daemon creates every label value up front (all results, directions,
    levels, states, kinds, size classes and orders at 0), so this is the full
    set, except `zone`, which depends on the guest's memory (the scrape's guest
    has all three zones)."""
    return live_scrape.label_values


@pytest.fixture(scope="session")
def contract_metrics() -> list[Metric]:
    return CONTRACT_METRICS


@pytest.fixture(scope="session")
def contract_label_values() -> dict[str, frozenset[str]]:
    return CONTRACT_LABEL_VALUES


@pytest.fixture(scope="session")
def target_labels() -> frozenset[str]:
    return TARGET_LABELS


@pytest.fixture(scope="session")
def prometheus_synthetic_series() -> frozenset[str]:
    return PROMETHEUS_SYNTHETIC_SERIES


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not installed (Debian package 'prometheus'); "
            "deploy/ci-checks.sh installs it and runs these checks unconditionally"
        )
    return path
