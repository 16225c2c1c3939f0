"""Start a real Prometheus for a test, scraping loopback targets only.

    with prometheus_server(["127.0.0.1:8080"]) as prom:
        prom.wait_for_target_up()
        prom.query('sharedpool_pool_size_bytes{job="sharedpoold"}')

The server runs the Debian binary (/usr/bin/prometheus, package "prometheus")
on 127.0.0.1 at a free port, with a temporary storage directory and a copy of
deploy/prometheus/prometheus.yml in which the targets of one job (by default
"sharedpoold") are replaced by the ones given and the rule files are made
absolute, so the rules of the repository are loaded as deployed. Every wait is
bounded; the process is terminated (then killed) on exit and its log is shown
in any error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEFAULT_BINARY = "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    pass


def find_binary(binary: str = DEFAULT_BINARY) -> str | None:
    """The Prometheus server binary, or None when it is not installed."""
    if Path(binary).is_file():
        return binary
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"test Prometheus may only scrape loopback targets, not {target!r}")


def rewrite_config(
    config: dict[str, Any],
    *,
    config_dir: Path,
    targets: Sequence[str],
    job: str,
    scrape_interval: str | None,
    evaluation_interval: str | None,
) -> dict[str, Any]:
    """A copy of `config` whose `job` scrapes `targets`, rule paths absolute."""
    config = json.loads(json.dumps(config))  # deep copy of plain YAML data
    for target in targets:
        _check_loopback(target)
    jobs = [sc for sc in config.get("scrape_configs", []) if sc.get("job_name") == job]
    if len(jobs) != 1:
        raise PrometheusError(f"expected one scrape config for job {job!r}, found {len(jobs)}")
    scrape = jobs[0]
    scrape["static_configs"] = [{"targets": list(targets)}]
    if scrape_interval is not None:
        scrape["scrape_interval"] = scrape_interval
        scrape["scrape_timeout"] = scrape_interval
    # Only the test's targets: drop every other job (they would scrape elsewhere).
    config["scrape_configs"] = [scrape]
    if evaluation_interval is not None:
        config.setdefault("global", {})["evaluation_interval"] = evaluation_interval
    config["rule_files"] = [
        str(p if Path(p).is_absolute() else config_dir / p) for p in config.get("rule_files", [])
    ]
    return config


class PrometheusServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 5) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns "data" or raises PrometheusError."""
        try:
            body = self._get(f"/api/v1/{path}", params)
        except urllib.error.HTTPError as exc:
            raise PrometheusError(f"{path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the vector as [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return list(data["result"])

    def wait_for(
        self, expr: str, *, timeout: float = 30, interval: float = 0.25
    ) -> list[dict[str, Any]]:
        """Poll an instant query until it returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"{expr!r} still empty after {timeout}s; targets: "
                    f"{self.api('targets').get('activeTargets')}\n{self.log_tail()}"
                )
            time.sleep(interval)

    def wait_for_target_up(self, job: str = "sharedpoold", timeout: float = 30) -> None:
        """Wait until every target of `job` has been scraped successfully."""
        self.wait_for(f'up{{job="{job}"}} == 1 unless on() up{{job="{job}"}} == 0', timeout=timeout)


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str],
    *,
    config_path: Path = DEFAULT_CONFIG,
    job: str = "sharedpoold",
    scrape_interval: str | None = "1s",
    evaluation_interval: str | None = "1s",
    binary: str = DEFAULT_BINARY,
    ready_timeout: float = 30,
) -> Iterator[PrometheusServer]:
    exe = find_binary(binary)
    if exe is None:
        raise FileNotFoundError(f"{binary} not found: install Debian's 'prometheus' package")
    config_path = Path(config_path)
    config = rewrite_config(
        yaml.safe_load(config_path.read_text(encoding="utf-8")),
        config_dir=config_path.resolve().parent,
        targets=targets,
        job=job,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
    )
    with tempfile.TemporaryDirectory(prefix="prom-test-") as tmp:
        workdir = Path(tmp)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        log_path = workdir / "prometheus.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        server = PrometheusServer(url, process, log_path)
        try:
            _wait_ready(server, ready_timeout)
            yield server
        finally:
            _stop(process)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {server.process.returncode}\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            raise PrometheusError(f"prometheus not ready after {timeout}s\n{server.log_tail()}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
