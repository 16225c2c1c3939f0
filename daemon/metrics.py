"""Prometheus metrics: a per-app CollectorRegistry.

Gauges and the counters that the pool and the guest already count are read at scrape time
by a custom collector (nothing to keep in sync, and they survive a restart because the
state they are read from does). The daemon's own observations (allocation latency, the
modeled conversion time of each allocation) are histograms updated as requests are served.
Names and labels: DESIGN.md section 4.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


# A light metric family: (name, type, documentation, samples); a sample is (sample name,
# labels as (name, value) pairs, value). The collectors below build these instead of
# prometheus_client's MetricFamily objects (whose constructors validate every name and label
# on every scrape); `to_metric` makes the real thing for prometheus_client's own encoders.
Labels = tuple[tuple[str, str], ...]
Family = tuple[str, str, str, list[tuple[str, Labels, float]]]


def to_metric(family: Family) -> Metric:
    name, typ, doc, samples = family
    metric = Metric(name, doc, typ)
    for sname, labels, value in samples:
        metric.add_sample(sname, dict(labels), value)
    return metric


class FamilyCollector(Collector):
    """A collector that yields light families; collect() converts them for prometheus_client."""

    def families(self) -> list[Family]:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return []  # collected lazily: no reading at registration time

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield to_metric(family)


def _one(name: str, typ: str, doc: str, value: float) -> Family:
    full = P + name
    return (full, typ, doc, [(full + ("_total" if typ == "counter" else ""), (), value)])


def _labelled(
    name: str, typ: str, doc: str, label: str, values: Sequence[tuple[str, float]]
) -> Family:
    full = P + name
    sname = full + ("_total" if typ == "counter" else "")
    return (full, typ, doc, [(sname, ((label, k),), v) for k, v in values])


class PoolCollector(FamilyCollector):
    """Reads the strategy and the guest at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def families(self) -> list[Family]:
        svc = self.service
        out: list[Family] = [
            _one("ready", "gauge", "1 once the pool is built or restored", svc.ready),
            _one(
                "reclaimed_buffers",
                "counter",
                "Buffers reclaimed from clients whose lease expired",
                svc.reclaimed_buffers,
            ),
        ]
        if not svc.ready or svc.strategy is None or svc.guest is None:
            return out
        st = svc.strategy.stats()
        report = svc.guest.report()
        counts = report.counts
        out += [
            _one("pool_size_bytes", "gauge", "Shared memory held by the pool", st.size_bytes),
            _one("pool_free_bytes", "gauge", "Free bytes in the pool", st.free_bytes),
            _one(
                "pool_used_bytes",
                "gauge",
                "Bytes held by live buffers (whole pages)",
                st.used_bytes,
            ),
            _one(
                "pool_largest_free_bytes",
                "gauge",
                "Largest contiguous free run in the pool",
                st.largest_free_bytes,
            ),
            _labelled(
                "pool_chunks",
                "gauge",
                "Pool chunks by state",
                "state",
                [(s, st.chunks.get(s, 0)) for s in sorted(set(CHUNK_STATES) | set(st.chunks))],
            ),
            _labelled(
                "direct_map_bytes",
                "gauge",
                "Direct-map bytes by leaf size (/proc/meminfo DirectMap*)",
                "page_size",
                [(size, report.direct_map_bytes.get(size, 0)) for size in ("4k", "2M", "1G")],
            ),
        ]
        blocks: list[tuple[str, Labels, float]] = []
        frag: list[tuple[str, Labels, float]] = []
        unus: list[tuple[str, Labels, float]] = []
        for z in report.zones:
            for order, n in enumerate(z.nr_free):
                labels = (("zone", z.name), ("order", str(order)))
                blocks.append((P + "buddy_free_blocks", labels, n))
                frag.append(
                    (P + "fragmentation_index", labels, z.fragmentation_index[order] / 1000)
                )
                unus.append(
                    (P + "unusable_free_index", labels, z.unusable_free_index[order] / 1000)
                )
        out += [
            (
                P + "buddy_free_blocks",
                "gauge",
                "Free blocks per zone and order (/proc/buddyinfo)",
                blocks,
            ),
            (
                P + "fragmentation_index",
                "gauge",
                "Fragmentation index per zone and requested order (extfrag_index, a fraction; "
                "-1: a block is free)",
                frag,
            ),
            (
                P + "unusable_free_index",
                "gauge",
                "Unusable free index per zone and requested order (a fraction)",
                unus,
            ),
            _labelled(
                "hazard_pages",
                "gauge",
                "Pages with a hazardous mapping, by kind",
                "kind",
                list(report.hazards.as_json().items()),
            ),
            _one("leaked_bytes", "gauge", "Bytes leaked after failed conversions", st.leaked_bytes),
            _one("clients", "gauge", "Registered clients", len(svc.clients)),
            _one("buffers", "gauge", "Live buffers", st.buffers),
            _labelled(
                "allocations",
                "counter",
                "Allocation requests by result",
                "result",
                [("ok", st.allocations)]
                + [
                    (reason, st.failure_reasons.get(reason, 0))
                    for reason in sorted(set(ALLOC_RESULTS[1:]) | set(st.failure_reasons))
                ],
            ),
            _one("frees", "counter", "Buffers freed", st.frees),
            _labelled(
                "conversions",
                "counter",
                "Conversions (set_memory_*crypted calls) by direction",
                "direction",
                [
                    ("to_shared", counts.conversions_to_shared),
                    ("to_private", counts.conversions_to_private),
                ],
            ),
            _labelled(
                "converted_bytes",
                "counter",
                "Bytes converted by direction",
                "direction",
                [
                    ("to_shared", counts.pages_to_shared * PAGE_SIZE),
                    ("to_private", counts.pages_to_private * PAGE_SIZE),
                ],
            ),
            _one(
                "hypercalls",
                "counter",
                "MapGPA hypercalls / page-state-change requests",
                counts.hypercalls,
            ),
            _labelled(
                "direct_map_splits",
                "counter",
                "Direct-map splits after boot by level (2: 2M->4k, 3: 1G->2M)",
                "level",
                [("2", counts.direct_map_level2_splits), ("3", counts.direct_map_level3_splits)],
            ),
            _one("pool_grows", "counter", "Pool growths", st.grows),
            _one("pool_shrinks", "counter", "Pool shrinks", st.shrinks),
        ]
        return out


class LightHistogram(FamilyCollector):
    """A histogram with optional labels, observed on the event loop (no lock: one thread
    observes and scrapes). Exposes the same series as prometheus_client.Histogram without
    *_created: name_bucket{le} cumulative, name_count, name_sum per label set, in the order
    the label sets were first seen. Why not prometheus_client.Histogram: its observe takes
    a lock and its collection builds every sample through validating constructors, ~1 ms
    per scrape for the 4 x 17 allocation-latency series."""

    def __init__(
        self, name: str, doc: str, buckets: tuple[float, ...], label: str | None = None
    ) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = [*buckets, float("inf")]
        self._le = [_go(b) for b in self.bounds]
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # label -> (counts, [sum])

    def labels(self, value: str = "") -> tuple[list[int], list[float]]:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = ([0] * len(self.bounds), [0.0])
        return series

    def observe(self, amount: float, label: str = "") -> None:
        counts, total = self._series.get(label) or self.labels(label)
        counts[bisect.bisect_left(self.bounds, amount)] += 1
        total[0] += amount

    def buckets(self) -> dict[str, list[int]]:
        """Per label value, the count in each bucket (not cumulative; the last is +Inf):
        the page's latency charts (daemon.ui)."""
        return {value: list(counts) for value, (counts, _) in self._series.items()}

    def families(self) -> list[Family]:
        samples: list[tuple[str, Labels, float]] = []
        b, c, s = self.name + "_bucket", self.name + "_count", self.name + "_sum"
        for value, (counts, total) in self._series.items():
            base: Labels = ((self.label, value),) if self.label else ()
            acc = 0  # an int: rendered as prometheus_client renders its float counts
            for le, n in zip(self._le, counts, strict=True):
                acc += n
                samples.append((b, (*base, ("le", le)), acc))
            samples.append((c, base, acc))
            samples.append((s, base, total[0]))
        return [(self.name, "histogram", self.doc, samples)]


class Metrics:
    """The app's registry and the daemon's own instruments."""

    def __init__(self, service: Service, version: str) -> None:
        # The *_created series are outside the contract and only add noise to every scrape.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.pool = PoolCollector(service)
        self.registry.register(self.pool)
        self.registry.register(ServiceCollector(service))
        # the standard process_* (RSS, fds, CPU, start time) and python_info series, as
        # the default registry has them: this registry is the app's own
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.alloc_duration = LightHistogram(
            P + "alloc_duration_seconds",
            "Time to answer an allocation request inside the daemon "
            "(strategy call; served or refused), by requested size class",
            ALLOC_BUCKETS,
            "size_class",
        )
        for name, _ in SIZE_CLASSES:
            self.alloc_duration.labels(name)
        self.registry.register(self.alloc_duration)
        self.modeled_conversion = LightHistogram(
            P + "modeled_conversion_seconds",
            "Modeled conversion time (cost profile) spent by "
            "each allocation, including synchronous growth",
            MODELED_BUCKETS,
        )
        self.modeled_conversion.labels()
        self.registry.register(self.modeled_conversion)
        self.build_info = Info(P + "build", "Build information", registry=self.registry)
        self.build_info.info({"version": version})
        self.exposition = Exposition(
            self.registry, [self.pool, self.alloc_duration, self.modeled_conversion]
        )
        service.alloc_observer = self.observe_allocation

    def observe_allocation(self, size: int, ok: bool, seconds: float, modeled: float) -> None:
        self.alloc_duration.observe(seconds, size_class(size))
        self.modeled_conversion.observe(modeled)


class ServiceCollector(Collector):
    """The service's own health: quota refusals (daemon.quotas) and the storage state."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield from self.service.quotas.collect()
        full = GaugeMetricFamily(
            P + "storage_full",
            "1 while the journal cannot be written (disk full): changes are refused",
        )
        full.add_metric([], 1.0 if self.service.storage_full else 0.0)
        yield full
        journal = self.service.journal
        events = CounterMetricFamily(
            P + "storage_full_events",
            "Times the journal found the disk full",
        )
        events.add_metric([], journal.full_events if journal is not None else 0)
        yield events
        commits = CounterMetricFamily(
            P + "journal_commits",
            "Journal transactions committed by the writer (one fsync each with "
            "synchronous=full); journal_records / journal_commits is the group commit's size",
        )
        commits.add_metric([], journal.writes if journal is not None else 0)
        yield commits
        records = CounterMetricFamily(P + "journal_records", "Journal records made durable")
        records.add_metric([], journal.records if journal is not None else 0)
        yield records


# ---- exposition ------------------------------------------------------------------------------
#
# prometheus_client's generate_latest validates and escapes every label name and value of
# every sample on every scrape (~25 us a sample line here; /metrics has ~220 of them: 6-8 ms
# on the event loop). The label sets and headers of this registry never change, so this
# writer renders each of them once and caches the text; per scrape it only formats values.
# Same bytes as generate_latest (text 0.0.4) and openmetrics.generate_latest (1.0.0,
# underscores): tests/test_daemon_metrics.py compares them. Every other negotiated format,
# and name[] filters, go to prometheus_client itself.


def _go(v: float) -> str:
    return str(floatToGoString(v))  # type: ignore[no-untyped-call]


_VALUES: dict[float, str] = {}


def _value(v: float) -> str:
    """floatToGoString, with the common case (a small non-negative integer) first, and the
    others cached (byte counts and index fractions repeat from one scrape to the next)."""
    if type(v) is int and 0 <= v < 1_000_000:
        return f"{v}.0"
    text = _VALUES.get(v) if v else None  # 0.0 and -0.0 are equal keys, not equal texts
    if text is None:
        if len(_VALUES) >= 4096:
            _VALUES.clear()
        text = _VALUES[v] = _go(v)
    return text


class _Filtered(Collector):
    """?name[]=... : only the samples of those names, as RestrictedRegistry selects them (it
    relies on collectors describing their names up front, which these collect lazily)."""

    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            samples = [s for s in metric.samples if s.name in self.names]
            if samples:
                out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                out.samples = samples
                yield out


class Exposition:
    """Renders a registry in the text or OpenMetrics format, caching what never changes."""

    def __init__(self, registry: CollectorRegistry, light: list[FamilyCollector]) -> None:
        self.registry = registry
        self.light = {id(c): c for c in light}
        self._heads: dict[tuple[bool, str, str, str, str], str] = {}
        self._prefixes: dict[tuple[bool, str, tuple[tuple[str, str], ...]], str] = {}

    def _head(self, openmetrics: bool, metric: Metric) -> str:
        key = (openmetrics, metric.name, metric.type, metric.documentation, metric.unit)
        head = self._heads.get(key)
        if head is None:
            head = self._render_head(openmetrics, metric)
            self._heads[key] = head
        return head

    @staticmethod
    def _render_head(openmetrics: bool, metric: Metric) -> str:
        if openmetrics:
            doc = om._escape(metric.documentation, om.ALLOWUTF8, om._is_legacy_labelname_rune)
            name = om.escape_metric_name(metric.name, om.UNDERSCORES)
            head = f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n"
            if metric.unit:
                head += f"# UNIT {name} {metric.unit}\n"
            return head
        mname, mtype = metric.name, metric.type
        if mtype == "counter":
            mname += "_total"
        elif mtype == "info":
            mname, mtype = mname + "_info", "gauge"
        elif mtype == "stateset":
            mtype = "gauge"
        elif mtype == "gaugehistogram":
            mtype = "histogram"
        elif mtype == "unknown":
            mtype = "untyped"
        name = om.escape_metric_name(mname, om.UNDERSCORES)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n"

    def _prefix(self, openmetrics: bool, s: Sample) -> str:
        key = (openmetrics, s.name, tuple(s.labels.items()))
        prefix = self._prefixes.get(key)
        if prefix is None:
            rune = om._is_legacy_labelname_rune
            value: Callable[[str], str]
            if openmetrics:
                name = om._escape(s.name, om.UNDERSCORES, rune)

                def value(v: str) -> str:
                    return om._escape(v, om.ALLOWUTF8, rune)
            else:
                name = om.escape_metric_name(s.name, om.UNDERSCORES)

                def value(v: str) -> str:  # the text encoder passes False for the rune test
                    return om._escape(v, om.ALLOWUTF8, False)  # type: ignore[arg-type]

            labels = ",".join(
                f'{om.escape_label_name(k, om.UNDERSCORES)}="{value(v)}"'
                for k, v in sorted(s.labels.items())
            )
            prefix = f"{name}{{{labels}}} " if labels else f"{name} "
            self._prefixes[key] = prefix
        return prefix

    def _light_prefix(self, openmetrics: bool, sname: str, labels: Labels) -> str:
        key = (openmetrics, sname, labels)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._prefix(openmetrics, Sample(sname, dict(labels), 0.0))
        return prefix

    def render(self, openmetrics: bool = False) -> bytes:
        """The registry in the text format (0.0.4) or OpenMetrics 1.0.0: the same bytes as
        prometheus_client's generate_latest / openmetrics.generate_latest."""
        out: list[str] = []
        with self.registry._lock:
            collectors = list(self.registry._collector_to_names)
        for collector in collectors:
            light = self.light.get(id(collector))
            if light is not None:
                for name, typ, doc, samples in light.families():
                    out.append(self._head_of(openmetrics, name, typ, doc))
                    prefix = self._light_prefix
                    out.extend(
                        f"{prefix(openmetrics, sname, labels)}{_value(v)}\n"
                        for sname, labels, v in samples
                    )
                continue
            for metric in collector.collect():
                self._render_metric(openmetrics, metric, out)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode("utf-8")

    def _head_of(self, openmetrics: bool, name: str, typ: str, doc: str) -> str:
        key = (openmetrics, name, typ, doc, "")
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._render_head(openmetrics, Metric(name, doc, typ))
        return head

    def _render_metric(self, openmetrics: bool, metric: Metric, out: list[str]) -> None:
        out.append(self._head(openmetrics, metric))
        trailing: dict[str, list[str]] = {}
        for s in metric.samples:
            if s.timestamp is not None or s.exemplar is not None or s.native_histogram:
                raise ValueError(f"{s.name}: timestamps/exemplars are not rendered here")
            line = self._prefix(openmetrics, s) + _value(s.value) + "\n"
            suffix = s.name[len(metric.name) :] if not openmetrics else ""
            if suffix in ("_created", "_gsum", "_gcount"):
                trailing.setdefault(suffix, []).append(line)
            else:
                out.append(line)
        for suffix, lines in sorted(trailing.items()):
            name = om.escape_metric_name(metric.name + suffix, om.UNDERSCORES)
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
            out.extend(lines)

    async def handler(self, request: web.Request) -> web.Response:
        """GET /metrics: content negotiation as prometheus_client's aiohttp handler, the two
        usual formats from the cached renderer, compression by aiohttp when asked."""
        accept = ",".join(request.headers.getall("Accept", []))
        encoder, content_type = choose_encoder(accept)
        if request.query:
            registry: Collector = self.registry
            if "name[]" in request.query:
                registry = _Filtered(self.registry, set(request.query.getall("name[]")))
            body = encoder(registry)
        elif encoder is generate_latest and content_type == CONTENT_TYPE_PLAIN_0_0_4:
            body = self.render(openmetrics=False)
        elif content_type in (OM_CONTENT_TYPE, f"{OM_CONTENT_TYPE}; escaping={om.UNDERSCORES}"):
            body = self.render(openmetrics=True)
        else:
            body = encoder(self.registry)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()
        return response
