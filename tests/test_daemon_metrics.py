"""/metrics parsed with prometheus_client's parser: every metric of DESIGN.md section 4 with
its type and labels, and values equal to what /v1/pool reports."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support.daemons import ADMIN_TOKEN, auth, register, running_app, small_config

# DESIGN.md section 4: exposed name -> (type, labels). (The info metric is exposed in the
# text format as a gauge named *_info.)
CONTRACT = {
    "sharedpool_pool_size_bytes": ("gauge", set()),
    "sharedpool_pool_free_bytes": ("gauge", set()),
    "sharedpool_pool_used_bytes": ("gauge", set()),
    "sharedpool_pool_largest_free_bytes": ("gauge", set()),
    "sharedpool_pool_chunks": ("gauge", {"state"}),
    "sharedpool_direct_map_bytes": ("gauge", {"page_size"}),
    "sharedpool_buddy_free_blocks": ("gauge", {"zone", "order"}),
    "sharedpool_fragmentation_index": ("gauge", {"zone", "order"}),
    "sharedpool_unusable_free_index": ("gauge", {"zone", "order"}),
    "sharedpool_hazard_pages": ("gauge", {"kind"}),
    "sharedpool_leaked_bytes": ("gauge", set()),
    "sharedpool_clients": ("gauge", set()),
    "sharedpool_buffers": ("gauge", set()),
    "sharedpool_allocations": ("counter", {"result"}),
    "sharedpool_frees": ("counter", set()),
    "sharedpool_conversions": ("counter", {"direction"}),
    "sharedpool_converted_bytes": ("counter", {"direction"}),
    "sharedpool_hypercalls": ("counter", set()),
    "sharedpool_direct_map_splits": ("counter", {"level"}),
    "sharedpool_pool_grows": ("counter", set()),
    "sharedpool_pool_shrinks": ("counter", set()),
    "sharedpool_reclaimed_buffers": ("counter", set()),
    "sharedpool_alloc_duration_seconds": ("histogram", {"size_class"}),
    "sharedpool_modeled_conversion_seconds": ("histogram", set()),
    "sharedpool_build_info": ("gauge", {"version"}),
}


async def test_metrics_contract_and_values(tmp_path: Path) -> None:
    async with running_app(small_config(tmp_path / "state")) as client:
        _, tok = await register(client)
        sizes = [4096, 100 << 10, 2 << 20, 20 << 20]
        ids = []
        for size in sizes:
            resp = await client.post("/v1/buffers", json={"size": size}, headers=auth(tok))
            assert resp.status == 201
            ids.append((await resp.json())["id"])
        resp = await client.delete(f"/v1/buffers/{ids[0]}", headers=auth(tok))
        assert resp.status == 200
        await client.post("/v1/pool/grow", json={"bytes": 4 << 20}, headers=auth(ADMIN_TOKEN))
        pool = await (await client.get("/v1/pool")).json()
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (mtype, labels) in CONTRACT.items():
        assert name in families, f"{name} missing"
        fam = families[name]
        assert fam.type == mtype, (name, fam.type, mtype)
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)

    def value(name: str, suffix: str = "", **labels: str) -> float:
        fam = families[name]
        for s in fam.samples:
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(f"no sample {name}{suffix} {labels}")

    st, guest, daemon = pool["strategy"], pool["guest"], pool["daemon"]
    assert value("sharedpool_pool_size_bytes") == st["size_bytes"]
    assert value("sharedpool_pool_free_bytes") == st["free_bytes"]
    assert value("sharedpool_pool_used_bytes") == st["used_bytes"]
    assert value("sharedpool_pool_largest_free_bytes") == st["largest_free_bytes"]
    for state, n in st["chunks"].items():
        assert value("sharedpool_pool_chunks", state=state) == n
    for size, n in guest["direct_map_bytes"].items():
        assert value("sharedpool_direct_map_bytes", page_size=size) == n
    for zone in guest["zones"]:
        for order in range(11):
            o = str(order)
            assert (
                value("sharedpool_buddy_free_blocks", zone=zone["name"], order=o)
                == zone["nr_free"][order]
            )
            assert (
                value("sharedpool_fragmentation_index", zone=zone["name"], order=o)
                == zone["fragmentation_index"][order] / 1000
            )
            assert (
                value("sharedpool_unusable_free_index", zone=zone["name"], order=o)
                == zone["unusable_free_index"][order] / 1000
            )
    for kind, n in guest["hazard_pages"].items():
        assert value("sharedpool_hazard_pages", kind=kind) == n
    assert value("sharedpool_leaked_bytes") == st["leaked_bytes"]
    assert value("sharedpool_clients") == daemon["clients"] == 1
    assert value("sharedpool_buffers") == st["buffers"] == 3
    assert value("sharedpool_allocations", "_total", result="ok") == st["allocations"] == 4
    assert value("sharedpool_frees", "_total") == st["frees"] == 1
    c = guest["counts"]
    assert (
        value("sharedpool_conversions", "_total", direction="to_shared")
        == c["conversions_to_shared"]
        > 0
    )
    assert (
        value("sharedpool_conversions", "_total", direction="to_private")
        == c["conversions_to_private"]
    )
    assert (
        value("sharedpool_converted_bytes", "_total", direction="to_shared")
        == c["pages_to_shared"] * 4096
    )
    assert value("sharedpool_hypercalls", "_total") == c["hypercalls"] > 0
    assert (
        value("sharedpool_direct_map_splits", "_total", level="2") == c["direct_map_level2_splits"]
    )
    assert (
        value("sharedpool_direct_map_splits", "_total", level="3") == c["direct_map_level3_splits"]
    )
    assert value("sharedpool_pool_grows", "_total") == st["grows"] >= 2
    assert value("sharedpool_pool_shrinks", "_total") == st["shrinks"]
    assert value("sharedpool_reclaimed_buffers", "_total") == daemon["reclaimed_buffers"]
    counts = {
        cls: value("sharedpool_alloc_duration_seconds", "_count", size_class=cls)
        for cls in ("le_64KiB", "le_1MiB", "le_16MiB", "gt_16MiB")
    }
    assert counts == {"le_64KiB": 1, "le_1MiB": 1, "le_16MiB": 1, "gt_16MiB": 1}
    buckets = sorted(
        float(s.labels["le"])
        for s in families["sharedpool_alloc_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["size_class"] == "le_64KiB"
    )
    assert buckets[0] == 1e-6 and buckets[-2] == 0.1 and buckets[-1] == float("inf")
    assert value("sharedpool_modeled_conversion_seconds", "_count") == 4
    assert value("sharedpool_build_info", version="0.1.0") == 1
    # every request above waited for its record: register, 4 allocations, a free, a grow
    records = value("sharedpool_journal_records", "_total")
    assert records >= 7 and 1 <= value("sharedpool_journal_commits", "_total") <= records


async def test_metrics_formats_equal_prometheus_client_encoders(tmp_path: Path) -> None:
    """The cached renderer (daemon.metrics.Exposition) serves the same bytes as
    prometheus_client's text and OpenMetrics encoders over the same registry; other
    negotiated formats and name[] filters are served by prometheus_client itself."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    from daemon import keys

    def steady(exposition: bytes) -> list[bytes]:
        """The lines, but the process_* samples (CPU time, RSS: they move between scrapes)."""
        lines = exposition.splitlines()
        assert any(line.startswith(b"process_") for line in lines)
        return [line for line in lines if not line.startswith(b"process_")]

    async with running_app(small_config(tmp_path / "state")) as client:
        _, tok = await register(client)
        for size in (4096, 3 << 20, 70 << 20, 0):  # served, served, too large, invalid
            await client.post("/v1/buffers", json={"size": size}, headers=auth(tok))
        registry = client.app[keys.METRICS].registry
        text = await (await client.get("/metrics")).read()
        assert steady(text) == steady(generate_latest(registry))
        resp = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        body = await resp.read()
        assert steady(body) == steady(om_latest(registry)) and body.endswith(b"# EOF\n")
        resp = await client.get("/metrics", params={"name[]": "sharedpool_buffers"})
        assert (await resp.text()).count("# TYPE") == 1
        resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert resp.headers.get("Content-Encoding") == "gzip"
        assert steady(await resp.read()) == steady(text)


def test_light_histogram_equals_prometheus_client_histogram() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from daemon.metrics import ALLOC_BUCKETS, Exposition, LightHistogram

    light_registry = CollectorRegistry()
    ref_registry = CollectorRegistry()
    ref = Histogram(
        "h_seconds", "doc", ["size_class"], buckets=ALLOC_BUCKETS, registry=ref_registry
    )
    light = LightHistogram("h_seconds", "doc", ALLOC_BUCKETS, "size_class")
    light_registry.register(light)
    for i, v in enumerate([0.0, 1e-6, 3e-6, 0.05, 0.1, 0.2, 7.0, 2.5e-5, 2.5e-5]):
        cls = ("a", "b")[i % 2]
        ref.labels(cls).observe(v)
        light.observe(v, cls)
    expected = generate_latest(ref_registry)
    assert generate_latest(light_registry) == expected
    assert Exposition(light_registry, [light]).render() == expected
