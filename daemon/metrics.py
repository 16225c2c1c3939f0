"""Prometheus metrics: a per-app CollectorRegistry.

Gauges and the counters that the pool and the guest already count are read at scrape time
by a custom collector (nothing to keep in sync, and they survive a restart because the
state they are read from does). The daemon's own observations (allocation latency, the
modeled conversion time of each allocation) are histograms updated as requests are served.
Names and labels: DESIGN.md section 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pool.guest.units import PAGE_SIZE

if TYPE_CHECKING:
    from daemon.engine import Service

P = "sharedpool_"
ALLOC_BUCKETS = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
)
MODELED_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
SIZE_CLASSES = (
    ("le_64KiB", 64 << 10),
    ("le_1MiB", 1 << 20),
    ("le_16MiB", 16 << 20),
    ("gt_16MiB", None),
)
ALLOC_RESULTS = ("ok", "exhausted", "no_memory", "conversion_failed", "too_large", "invalid_size")
CHUNK_STATES = ("free", "partial", "full", "leaked")


def size_class(size: int) -> str:
    for name, limit in SIZE_CLASSES:
        if limit is None or size <= limit:
            return name
    return SIZE_CLASSES[-1][0]


class PoolCollector(Collector):
    """Reads the strategy and the guest at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []  # collected lazily: no reading at registration time

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        ready = GaugeMetricFamily(P + "ready", "1 once the pool is built or restored")
        ready.add_metric([], 1.0 if svc.ready else 0.0)
        yield ready
        reclaimed = CounterMetricFamily(
            P + "reclaimed_buffers", "Buffers reclaimed from clients whose lease expired"
        )
        reclaimed.add_metric([], svc.reclaimed_buffers)
        yield reclaimed
        if not svc.ready or svc.strategy is None or svc.guest is None:
            return
        st = svc.strategy.stats()
        report = svc.guest.report()
        counts = report.counts

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc)
            g.add_metric([], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], value)
            return c

        yield gauge("pool_size_bytes", "Shared memory held by the pool", st.size_bytes)
        yield gauge("pool_free_bytes", "Free bytes in the pool", st.free_bytes)
        yield gauge("pool_used_bytes", "Bytes held by live buffers (whole pages)", st.used_bytes)
        yield gauge(
            "pool_largest_free_bytes",
            "Largest contiguous free run in the pool",
            st.largest_free_bytes,
        )
        chunks = GaugeMetricFamily(P + "pool_chunks", "Pool chunks by state", labels=["state"])
        for state in sorted(set(CHUNK_STATES) | set(st.chunks)):
            chunks.add_metric([state], st.chunks.get(state, 0))
        yield chunks
        dm = GaugeMetricFamily(
            P + "direct_map_bytes",
            "Direct-map bytes by leaf size (/proc/meminfo DirectMap*)",
            labels=["page_size"],
        )
        for size in ("4k", "2M", "1G"):
            dm.add_metric([size], report.direct_map_bytes.get(size, 0))
        yield dm
        blocks = GaugeMetricFamily(
            P + "buddy_free_blocks",
            "Free blocks per zone and order (/proc/buddyinfo)",
            labels=["zone", "order"],
        )
        frag = GaugeMetricFamily(
            P + "fragmentation_index",
            "Fragmentation index per zone and "
            "requested order (extfrag_index, a fraction; -1: a block is "
            "free)",
            labels=["zone", "order"],
        )
        unus = GaugeMetricFamily(
            P + "unusable_free_index",
            "Unusable free index per zone and requested order (a fraction)",
            labels=["zone", "order"],
        )
        for z in report.zones:
            for order, n in enumerate(z.nr_free):
                blocks.add_metric([z.name, str(order)], n)
                frag.add_metric([z.name, str(order)], z.fragmentation_index[order] / 1000)
                unus.add_metric([z.name, str(order)], z.unusable_free_index[order] / 1000)
        yield blocks
        yield frag
        yield unus
        hz = GaugeMetricFamily(
            P + "hazard_pages", "Pages with a hazardous mapping, by kind", labels=["kind"]
        )
        for kind, value in report.hazards.as_json().items():
            hz.add_metric([kind], value)
        yield hz
        yield gauge("leaked_bytes", "Bytes leaked after failed conversions", st.leaked_bytes)
        yield gauge("clients", "Registered clients", len(svc.clients))
        yield gauge("buffers", "Live buffers", st.buffers)

        allocs = CounterMetricFamily(
            P + "allocations", "Allocation requests by result", labels=["result"]
        )
        allocs.add_metric(["ok"], st.allocations)
        for reason in sorted(set(ALLOC_RESULTS[1:]) | set(st.failure_reasons)):
            allocs.add_metric([reason], st.failure_reasons.get(reason, 0))
        yield allocs
        yield counter("frees", "Buffers freed", st.frees)
        conv = CounterMetricFamily(
            P + "conversions",
            "Conversions (set_memory_*crypted calls) by direction",
            labels=["direction"],
        )
        conv.add_metric(["to_shared"], counts.conversions_to_shared)
        conv.add_metric(["to_private"], counts.conversions_to_private)
        yield conv
        cb = CounterMetricFamily(
            P + "converted_bytes", "Bytes converted by direction", labels=["direction"]
        )
        cb.add_metric(["to_shared"], counts.pages_to_shared * PAGE_SIZE)
        cb.add_metric(["to_private"], counts.pages_to_private * PAGE_SIZE)
        yield cb
        yield counter(
            "hypercalls", "MapGPA hypercalls / page-state-change requests", counts.hypercalls
        )
        splits = CounterMetricFamily(
            P + "direct_map_splits",
            "Direct-map splits after boot by level (2: 2M->4k, 3: 1G->2M)",
            labels=["level"],
        )
        splits.add_metric(["2"], counts.direct_map_level2_splits)
        splits.add_metric(["3"], counts.direct_map_level3_splits)
        yield splits
        yield counter("pool_grows", "Pool growths", st.grows)
        yield counter("pool_shrinks", "Pool shrinks", st.shrinks)


class Metrics:
    """The app's registry and the daemon's own instruments."""

    def __init__(self, service: Service, version: str) -> None:
        # The *_created series are outside the contract and only add noise to every scrape.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(service))
        # the standard process_* (RSS, fds, CPU, start time) and python_info series, as
        # the default registry has them: this registry is the app's own
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.alloc_duration = Histogram(
            P + "alloc_duration_seconds",
            "Time to answer an allocation request inside the daemon "
            "(strategy call; served or refused), by requested size class",
            ["size_class"],
            buckets=ALLOC_BUCKETS,
            registry=self.registry,
        )
        for name, _ in SIZE_CLASSES:
            self.alloc_duration.labels(name)
        self.modeled_conversion = Histogram(
            P + "modeled_conversion_seconds",
            "Modeled conversion time (cost profile) spent by "
            "each allocation, including synchronous growth",
            buckets=MODELED_BUCKETS,
            registry=self.registry,
        )
        self.build_info = Info(P + "build", "Build information", registry=self.registry)
        self.build_info.info({"version": version})
        service.alloc_observer = self.observe_allocation

    def observe_allocation(self, size: int, ok: bool, seconds: float, modeled: float) -> None:
        self.alloc_duration.labels(size_class(size)).observe(seconds)
        self.modeled_conversion.observe(modeled)
