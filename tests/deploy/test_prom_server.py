"""The Prometheus harness of prom_server.py, proven against a fixed metrics page.

A tiny HTTP server on 127.0.0.1 serves a constant exposition; a real Prometheus
started from deploy/prometheus/prometheus.yml (target rewritten to it) scrapes
it, evaluates the repository's rules, and answers PromQL over its HTTP API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from support.prom_server import (
    DEFAULT_CONFIG,
    find_binary,
    prometheus_server,
    rewrite_config,
)

METRICS = b"""\
# HELP sharedpool_pool_size_bytes Bytes in the pool.
# TYPE sharedpool_pool_size_bytes gauge
sharedpool_pool_size_bytes 6.7108864e+07
# HELP sharedpool_pool_used_bytes Bytes handed out.
# TYPE sharedpool_pool_used_bytes gauge
sharedpool_pool_used_bytes 5.0331648e+07
# HELP sharedpool_leaked_bytes Bytes leaked after failed re-encryption.
# TYPE sharedpool_leaked_bytes gauge
sharedpool_leaked_bytes 4096
# HELP sharedpool_hypercalls_total Conversion hypercalls.
# TYPE sharedpool_hypercalls_total counter
sharedpool_hypercalls_total 147
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(METRICS)))
        self.end_headers()
        self.wfile.write(METRICS)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metrics_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_rewrite_keeps_the_deployed_config_but_the_targets() -> None:
    original = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config = rewrite_config(
        original,
        config_dir=DEFAULT_CONFIG.parent,
        targets=["127.0.0.1:1234"],
        job="sharedpoold",
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:1234"]}]
    assert job["metrics_path"] == original["scrape_configs"][0]["metrics_path"]
    assert all(Path(p).is_absolute() for p in config["rule_files"])
    assert original["scrape_configs"][0]["static_configs"] != job["static_configs"]


@pytest.mark.parametrize("target", ["10.0.0.1:9464", "example.org:80", "sharedpoold:9464"])
def test_rewrite_refuses_non_loopback_targets(target: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        rewrite_config(
            yaml.safe_load(DEFAULT_CONFIG.read_text()),
            config_dir=DEFAULT_CONFIG.parent,
            targets=[target],
            job="sharedpoold",
            scrape_interval=None,
            evaluation_interval=None,
        )


def test_real_prometheus_scrapes_and_answers_promql(metrics_target: str) -> None:
    if find_binary() is None:
        pytest.skip(
            "/usr/bin/prometheus not installed (Debian package 'prometheus'); "
            "deploy/ci-checks.sh installs it"
        )
    with prometheus_server([metrics_target]) as prom:
        prom.wait_for_target_up(timeout=30)

        (sample,) = prom.query('sharedpool_pool_size_bytes{job="sharedpoold"}')
        assert sample["metric"]["instance"] == metrics_target
        assert float(sample["value"][1]) == 64 * 1024 * 1024

        (sample,) = prom.query("sharedpool_hypercalls_total")
        assert float(sample["value"][1]) == 147

        # The repository's recording rules are loaded and evaluated...
        (ratio,) = prom.wait_for("sharedpool:pool_usage:ratio", timeout=30)
        assert float(ratio["value"][1]) == 0.75
        # ...and so are its alerts: leaked bytes > 0 fires at once.
        (alert,) = prom.wait_for(
            'ALERTS{alertname="SharedpoolLeakedBytes", alertstate="firing"}', timeout=30
        )
        assert alert["metric"]["severity"] == "warning"
        assert not prom.query('ALERTS{alertname="SharedpoolHazardPages"}')
