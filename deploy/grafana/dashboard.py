"""Generate the sharedpool Grafana dashboard with grafana-foundation-sdk.

    .venv/bin/python deploy/grafana/dashboard.py            # writes dashboards/sharedpool.json
    .venv/bin/python deploy/grafana/dashboard.py --stdout   # prints it instead

The JSON is committed; tests/deploy/test_dashboard.py regenerates it and fails
when the committed file differs, so edit this file, never the JSON. Every
PromQL expression here uses only metric names, labels and label values that the
real daemon exports, which tests/deploy/test_promql_names.py checks against a
live scrape of sharedpoold.

The SDK version is pinned in pyproject.toml (dev extra): its builders target
Grafana 11.6, the version deploy/compose.yaml runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import heatmap as heatmap_m
from grafana_foundation_sdk.models import prometheus as prom_m

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "sharedpool.json"

DASHBOARD_UID = "sharedpool"
# Must match deploy/grafana/provisioning/datasources/prometheus.yml.
DATASOURCE_UID = "sharedpool-prometheus"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)

# Every query selects the daemons chosen in the $instance variable.
SEL = 'job="sharedpoold", instance=~"$instance"'
# The page-allocator panels also select the zones chosen in $zone.
ZONE_SEL = SEL + ', zone=~"$zone"'
# Allocation results the pool is responsible for (SharedpoolAllocationsFailing):
# too_large and invalid_size are requests no pool could serve.
POOL_FAILURES = 'result=~"exhausted|no_memory|conversion_failed"'


def query(expr: str, legend: str, ref_id: str) -> prom_b.Dataquery:
    return (
        prom_b.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .range()
    )


def legend_table(*calcs: str) -> common_b.VizLegendOptions:
    return (
        common_b.VizLegendOptions()
        .display_mode(common_m.LegendDisplayMode.TABLE)
        .placement(common_m.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs) or ["lastNotNull", "max"])
    )


def tooltip() -> common_b.VizTooltipOptions:
    return (
        common_b.VizTooltipOptions()
        .mode(common_m.TooltipDisplayMode.MULTI)
        .sort(common_m.SortOrder.DESCENDING)
    )


def thresholds(*steps: tuple[float | None, str]) -> dash_b.ThresholdsConfig:
    return (
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps([dash_m.Threshold(value=v, color=c) for v, c in steps])
    )


class Builder:
    """Assigns stable panel ids in the order panels are added."""

    def __init__(self) -> None:
        self.next_id = 1
        self.dashboard = (
            dash_b.Dashboard("sharedpool")
            .uid(DASHBOARD_UID)
            .description(
                "sharedpoold: the pre-decrypted shared-buffer pool, the guest's direct map "
                "and page allocator, conversions and safety (hazards, leaks)."
            )
            .tags(["sharedpool", "confidential-computing", "generated"])
            .editable()
            .refresh("10s")
            .time("now-1h", "now")
            .timezone("browser")
            .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
            .with_variable(
                dash_b.QueryVariable("instance")
                .label("Instance")
                .datasource(DATASOURCE)
                .query('label_values(sharedpool_build_info{job="sharedpoold"}, instance)')
                .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
                .multi(True)
                .include_all(True)
                .all_value(".*")
            )
            .with_variable(
                dash_b.QueryVariable("zone")
                .label("Zone")
                .description(
                    "Page-allocator zones (as in /proc/buddyinfo) shown by the page "
                    "allocator panels. Normal (and DMA32) is where a driver's pages come from."
                )
                .datasource(DATASOURCE)
                .query(
                    "label_values(sharedpool_buddy_free_blocks"
                    '{job="sharedpoold", instance=~"$instance"}, zone)'
                )
                .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
                .multi(True)
                .include_all(True)
                .all_value(".*")
            )
        )

    def _id(self) -> int:
        panel_id = self.next_id
        self.next_id += 1
        return panel_id

    def row(self, title: str) -> None:
        self.dashboard.with_row(dash_b.Row(title).id(self._id()))

    def timeseries(
        self,
        title: str,
        description: str,
        unit: str,
        targets: list[tuple[str, str]],
        *,
        width: int = 12,
        height: int = 8,
        stack: bool = False,
        bars: bool = False,
        minimum: float | None = 0,
        maximum: float | None = None,
        right_axis: dict[str, str] | None = None,
        repeat: str | None = None,
    ) -> None:
        """right_axis: refId -> unit of a query drawn against a second, right-hand axis.
        repeat: a multi-value variable; Grafana draws one copy of the panel per selected
        value, side by side (at most 3 per row), each with $<repeat> set to its value."""
        panel = (
            ts_b.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(height)
            .legend(legend_table())
            .tooltip(tooltip())
            .fill_opacity(20 if stack else 10)
            .line_width(1)
            .show_points(common_m.VisibilityMode.NEVER)
        )
        if minimum is not None:
            panel = panel.min(minimum)
        if maximum is not None:
            panel = panel.max(maximum)
        if stack:
            panel = panel.stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL))
        if bars:
            panel = panel.draw_style(common_m.GraphDrawStyle.BARS)
        if repeat is not None:
            panel = panel.repeat(repeat).repeat_direction("h").max_per_row(3)
        for ref_id, right_unit in (right_axis or {}).items():
            panel = panel.override_by_query(
                ref_id,
                [
                    dash_m.DynamicConfigValue(id_val="unit", value=right_unit),
                    dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                ],
            )
        for i, (expr, legend) in enumerate(targets):
            panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
        self.dashboard.with_panel(panel)

    def stat(
        self,
        title: str,
        description: str,
        unit: str,
        targets: list[tuple[str, str]],
        steps: list[tuple[float | None, str]],
        *,
        width: int = 6,
        height: int = 4,
        text_mode: common_m.BigValueTextMode = common_m.BigValueTextMode.AUTO,
        mappings: dict[str, str] | None = None,
    ) -> None:
        """mappings: displayed value -> text (e.g. "0" -> "not ready")."""
        panel = (
            stat_b.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(height)
            .thresholds(thresholds(*steps))
            .color_mode(common_m.BigValueColorMode.BACKGROUND)
            .graph_mode(common_m.BigValueGraphMode.AREA)
            .text_mode(text_mode)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
        )
        if mappings:
            panel = panel.mappings(
                [
                    dash_m.ValueMap(
                        options={
                            value: dash_m.ValueMappingResult(text=text, index=i)
                            for i, (value, text) in enumerate(mappings.items())
                        }
                    )
                ]
            )
        for i, (expr, legend) in enumerate(targets):
            panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
        self.dashboard.with_panel(panel)

    def heatmap(self, title: str, description: str, expr: str, *, width: int = 12) -> None:
        panel = (
            heatmap_b.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .span(width)
            .height(8)
            .calculate(False)
            .y_axis(heatmap_b.YAxisConfig().unit("s"))
            .color(
                heatmap_b.HeatmapColorOptions()
                .mode(heatmap_m.HeatmapColorMode.SCHEME)
                .scheme("Spectral")
                .scale(heatmap_m.HeatmapColorScale.EXPONENTIAL)
                .exponent(0.5)
                .steps(64)
                .fill("dark-orange")
                .reverse(False)
            )
            .cell_values(heatmap_b.CellValues().unit("short"))
            .show_legend()
            .with_target(
                query(expr, "{{le}}", "A").format(prom_m.PromQueryFormat.HEATMAP).interval_factor(1)
            )
        )
        self.dashboard.with_panel(panel)


def build() -> dash_m.Dashboard:
    b = Builder()

    # Safety first: what must be 0 in a real guest, before anything about capacity.
    b.row("Safety")
    b.stat(
        "Fatal hazard pages",
        "Shared pages with a private mapping (a private direct-map or vmalloc alias). "
        "Must be 0: any access to one, even load_unaligned_zeropad() reading past the end "
        "of the previous page, is an unrecoverable fault on TDX (alert "
        "SharedpoolHazardPages). See the daemon's page (/ on the metrics listener) for "
        "where they are.",
        "short",
        [
            (
                f'sum(sharedpool_hazard_pages{{{SEL}, kind="private_alias_to_shared"}})',
                "private alias to shared",
            )
        ],
        [(None, "green"), (1, "red")],
        width=6,
    )
    b.stat(
        "Recoverable hazard pages",
        "Private pages with a shared mapping: an access raises a recoverable fault. Should be 0.",
        "short",
        [
            (
                f'sum(sharedpool_hazard_pages{{{SEL}, kind="shared_alias_to_private"}})',
                "shared alias to private",
            )
        ],
        [(None, "green"), (1, "orange")],
        width=6,
    )
    b.stat(
        "Pages of unknown state",
        "Pages whose conversion failed: their state is unknown, so they are leaked and "
        "never mapped again (CVE-2024-36911). Not a mapping hazard; their bytes are in "
        "Leaked bytes.",
        "short",
        [
            (
                f'sum(sharedpool_hazard_pages{{{SEL}, kind="unknown_state"}})',
                "unknown state",
            )
        ],
        [(None, "green"), (1, "orange")],
        width=6,
    )
    b.stat(
        "Leaked bytes",
        "Memory leaked on purpose because a conversion failed (lost until reboot; "
        "alert SharedpoolLeakedBytes).",
        "bytes",
        [(f"sum(sharedpool_leaked_bytes{{{SEL}}})", "leaked")],
        [(None, "green"), (1, "orange")],
        width=6,
    )

    b.row("Pool")
    b.timeseries(
        "Pool usage",
        "Size of the pre-decrypted pool, bytes handed out, bytes free, and the largest "
        "free extent (the biggest buffer that can be served without growing).",
        "bytes",
        [
            (f"sharedpool_pool_size_bytes{{{SEL}}}", "size {{instance}}"),
            (f"sharedpool_pool_used_bytes{{{SEL}}}", "used {{instance}}"),
            (f"sharedpool_pool_free_bytes{{{SEL}}}", "free {{instance}}"),
            (f"sharedpool_pool_largest_free_bytes{{{SEL}}}", "largest free {{instance}}"),
        ],
    )
    b.timeseries(
        "Pool chunks, grows and shrinks",
        "Chunks of the pool by state, and how often the pool grew or shrank.",
        "short",
        [
            (f"sum by (state) (sharedpool_pool_chunks{{{SEL}}})", "chunks {{state}}"),
            (f"sum(increase(sharedpool_pool_grows_total{{{SEL}}}[$__rate_interval]))", "grows"),
            (
                f"sum(increase(sharedpool_pool_shrinks_total{{{SEL}}}[$__rate_interval]))",
                "shrinks",
            ),
        ],
    )
    b.stat(
        "Ready",
        "1 when every selected daemon has its pool built or restored and serves the API "
        "(sharedpool_ready); 0 while starting, restoring, stopping or failed "
        "(alert SharedpoolNotReady).",
        "none",
        [(f"min(sharedpool_ready{{{SEL}}})", "ready")],
        [(None, "red"), (1, "green")],
        width=4,
        mappings={"0": "not ready", "1": "ready"},
    )
    b.stat(
        "Pool used",
        "Used bytes over pool size.",
        "percentunit",
        [
            (
                f"sum(sharedpool_pool_used_bytes{{{SEL}}})"
                f" / sum(sharedpool_pool_size_bytes{{{SEL}}})",
                "used",
            )
        ],
        [(None, "green"), (0.8, "orange"), (0.95, "red")],
        width=4,
    )
    b.stat(
        "Clients",
        "Clients connected to the daemon.",
        "short",
        [(f"sum(sharedpool_clients{{{SEL}}})", "clients")],
        [(None, "blue")],
        width=4,
    )
    b.stat(
        "Buffers",
        "Buffers currently allocated.",
        "short",
        [(f"sum(sharedpool_buffers{{{SEL}}})", "buffers")],
        [(None, "blue")],
        width=4,
    )
    b.stat(
        "Refused allocations",
        "Allocations refused over the dashboard's time range for want of memory "
        "(exhausted, no_memory) or because the conversion failed "
        "(alert SharedpoolAllocationsFailing).",
        "short",
        [
            (
                f"sum(increase(sharedpool_allocations_total{{{SEL}, {POOL_FAILURES}}}[$__range]))",
                "refused",
            )
        ],
        [(None, "green"), (1, "orange")],
        width=4,
    )
    b.stat(
        "Version",
        "sharedpoold build (build_info).",
        "short",
        [(f"count by (version) (sharedpool_build_info{{{SEL}}})", "{{version}}")],
        [(None, "text")],
        width=4,
        text_mode=common_m.BigValueTextMode.NAME,
    )

    b.row("Allocations")
    alloc_bucket = f"sharedpool_alloc_duration_seconds_bucket{{{SEL}}}"
    b.timeseries(
        "Allocation latency p50 / p99 by size class",
        "Quantiles of the time to serve one allocation, per size class.",
        "s",
        [
            (
                "histogram_quantile(0.5, sum by (size_class, le) "
                f"(rate({alloc_bucket}[$__rate_interval])))",
                "p50 {{size_class}}",
            ),
            (
                "histogram_quantile(0.99, sum by (size_class, le) "
                f"(rate({alloc_bucket}[$__rate_interval])))",
                "p99 {{size_class}}",
            ),
        ],
    )
    b.heatmap(
        "Allocation latency heatmap",
        "Allocations per latency bucket over time (all size classes).",
        f"sum by (le) (increase({alloc_bucket}[$__rate_interval]))",
    )
    b.timeseries(
        "Allocations and frees",
        "Allocation rate by result (ok; exhausted and no_memory: no memory for it; "
        "conversion_failed: its pages were leaked; too_large, invalid_size: a request no "
        "pool could serve), and free rate.",
        "ops",
        [
            (
                f"sum by (result) (rate(sharedpool_allocations_total{{{SEL}}}[$__rate_interval]))",
                "alloc {{result}}",
            ),
            (f"sum(rate(sharedpool_frees_total{{{SEL}}}[$__rate_interval]))", "free"),
        ],
    )
    b.timeseries(
        "Clients and reclaimed buffers",
        "Connected clients, and buffers reclaimed from clients that went away.",
        "short",
        [
            (f"sum(sharedpool_clients{{{SEL}}})", "clients"),
            (
                f"sum(increase(sharedpool_reclaimed_buffers_total{{{SEL}}}[$__rate_interval]))",
                "reclaimed buffers",
            ),
        ],
    )

    b.row("Conversions")
    b.timeseries(
        "Conversions and hypercalls",
        "Private/shared conversions by direction and the MapGPA-style hypercalls they cost.",
        "ops",
        [
            (
                "sum by (direction) "
                f"(rate(sharedpool_conversions_total{{{SEL}}}[$__rate_interval]))",
                "conversions {{direction}}",
            ),
            (f"sum(rate(sharedpool_hypercalls_total{{{SEL}}}[$__rate_interval]))", "hypercalls"),
        ],
    )
    b.timeseries(
        "Converted bytes and modeled conversion time",
        "Bytes converted per second by direction (left axis), and the mean modeled "
        "conversion time (cost profile) spent per allocation, synchronous growth "
        "included (right axis).",
        "Bps",
        [
            (
                "sum by (direction) "
                f"(rate(sharedpool_converted_bytes_total{{{SEL}}}[$__rate_interval]))",
                "bytes {{direction}}",
            ),
            (
                f"sum(rate(sharedpool_modeled_conversion_seconds_sum{{{SEL}}}[$__rate_interval]))"
                f" / sum(rate(sharedpool_modeled_conversion_seconds_count{{{SEL}}}"
                "[$__rate_interval]))",
                "mean modeled conversion seconds per allocation",
            ),
        ],
        right_axis={"B": "s"},
    )

    b.row("Direct map")
    b.timeseries(
        "Direct map by leaf size",
        "Bytes of the guest's direct map mapped with 4 KiB, 2 MiB and 1 GiB leaves "
        "(/proc/meminfo DirectMap*). Growth of 4k means large leaves were split.",
        "bytes",
        [
            (
                f"sum by (page_size) (sharedpool_direct_map_bytes{{{SEL}}})",
                "{{page_size}}",
            )
        ],
        stack=True,
    )
    b.timeseries(
        "Direct map splits",
        "Splits per interval: level 3 = 1 GiB into 2 MiB, level 2 = 2 MiB into 4 KiB. "
        "Never undone.",
        "short",
        [
            (
                "sum by (level) "
                f"(increase(sharedpool_direct_map_splits_total{{{SEL}}}[$__rate_interval]))",
                "level {{level}}",
            )
        ],
        bars=True,
    )

    b.row("Page allocator")
    b.timeseries(
        "Fragmentation index by order, zone $zone",
        "Kernel extfrag fragmentation index of one zone per requested order (divided by "
        "1000): -1 means a suitable block is free; towards 1 a failure would be due to "
        "fragmentation, towards 0 due to lack of memory. One panel per zone (11 orders "
        "each, not 33 series on one graph). The worst of the selected daemons.",
        "none",
        [
            (
                "max by (order) (sharedpool_fragmentation_index{" + SEL + ', zone=~"$zone"})',
                "order {{order}}",
            )
        ],
        width=24,  # Grafana divides the row between the zones' copies (maxPerRow 3)
        minimum=-1,
        maximum=1,
        repeat="zone",
    )
    b.timeseries(
        "Unusable free index by order, zone $zone",
        "Fraction of one zone's free memory unusable for an allocation of this order "
        "(kernel unusable_index / 1000), one panel per zone. The worst of the selected "
        "daemons.",
        "percentunit",
        [
            (
                "max by (order) (sharedpool_unusable_free_index{" + SEL + ', zone=~"$zone"})',
                "order {{order}}",
            )
        ],
        width=24,
        maximum=1,
        repeat="zone",
    )
    b.timeseries(
        "Buddy free blocks by order",
        "Free blocks on each buddy free list (/proc/buddyinfo), summed over the "
        "selected zones and daemons.",
        "short",
        [
            (
                f"sum by (order) (sharedpool_buddy_free_blocks{{{ZONE_SEL}}})",
                "order {{order}}",
            )
        ],
        width=24,
    )

    b.row("Limits and storage")
    b.timeseries(
        "Quota refusals",
        "Requests refused by a quota, by the limit (max_clients, client_buffers, "
        "client_bytes): nothing changed; a client keeps hitting its own quota.",
        "reqps",
        [
            (
                f"sum by (reason) (rate(sharedpool_quota_refusals_total{{{SEL}}}"
                "[$__rate_interval]))",
                "{{reason}}",
            )
        ],
        width=8,
    )
    b.timeseries(
        "Journal storage",
        "1 while the disk is full (changes refused with 503 storage-full, alert "
        "SharedpoolStorageFull), and how often it happened.",
        "short",
        [
            (f"max(sharedpool_storage_full{{{SEL}}})", "disk full"),
            (f"sum(increase(sharedpool_storage_full_events_total{{{SEL}}}[$__range]))", "events"),
        ],
        width=8,
    )
    b.timeseries(
        "Journal commits",
        "Transactions the journal's writer process committed per second (one fsync each "
        "with synchronous=full), and records per commit (right axis): the group commit's "
        "size, which grows with concurrent clients.",
        "ops",
        [
            (f"sum(rate(sharedpool_journal_commits_total{{{SEL}}}[$__rate_interval]))", "commits"),
            (
                f"sum(rate(sharedpool_journal_records_total{{{SEL}}}[$__rate_interval]))"
                f" / sum(rate(sharedpool_journal_commits_total{{{SEL}}}[$__rate_interval]))",
                "records per commit",
            ),
        ],
        width=8,
        right_axis={"B": "short"},
    )

    b.row("Daemon process")
    b.timeseries(
        "Memory and CPU",
        "The daemon's resident memory (prometheus_client's process collector) and CPU "
        "time per second: a leak shows as RSS that keeps growing under a steady load.",
        "bytes",
        [
            (f"process_resident_memory_bytes{{{SEL}}}", "RSS {{instance}}"),
            (f"process_virtual_memory_bytes{{{SEL}}}", "virtual {{instance}}"),
            (f"rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])", "CPU {{instance}}"),
        ],
        width=8,
        right_axis={"C": "percentunit"},
    )
    b.timeseries(
        "File descriptors",
        "Open descriptors against the limit: every connection holds one; at the limit "
        "new clients are refused.",
        "short",
        [
            (f"process_open_fds{{{SEL}}}", "open {{instance}}"),
            (f"process_max_fds{{{SEL}}}", "limit {{instance}}"),
        ],
        width=6,
    )
    b.timeseries(
        "Connections",
        "Open connections per listener against their limit, and the rate of connections "
        "refused at the limit (503) or closed by the idle/header timeout.",
        "short",
        [
            (f"sum by (listener) (sharedpool_connections{{{SEL}}})", "open {{listener}}"),
            (f"sum by (listener) (sharedpool_connections_limit{{{SEL}}})", "limit {{listener}}"),
            (
                f"sum by (listener) (rate(sharedpool_connections_refused_total{{{SEL}}}"
                "[$__rate_interval]))",
                "refused/s {{listener}}",
            ),
            (
                f"sum by (listener) (rate(sharedpool_connections_closed_idle_total{{{SEL}}}"
                "[$__rate_interval]))",
                "idle-closed/s {{listener}}",
            ),
        ],
        width=6,
    )
    b.stat(
        "Up since",
        "Process start time; the Python running the daemon.",
        "dateTimeFromNow",
        [
            (f"process_start_time_seconds{{{SEL}}} * 1000", "{{instance}}"),
            (f"count by (version) (python_info{{{SEL}}})", "Python {{version}}"),
        ],
        [(None, "blue")],
        width=4,
    )

    return b.dashboard.build()


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="file to write")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
