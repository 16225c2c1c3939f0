"""Static checks of the compose file, the Dockerfile and the Kubernetes manifests.

Docker and kubectl cannot run here (no daemon, no cluster), so these parse the
files and check that what they reference exists and agrees: service names,
ports, mounted files, probes, scrape settings.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.deploy_paths import (
    COMPOSE_FILE,
    DEPLOY,
    DOCKERFILE,
    GRAFANA_DIR,
    K8S_DIR,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
)

DAEMON_PORT = 9464


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["source"], v["target"]))
        else:
            source, target = v.split(":")[:2]
            out.append((source, target))
    return out


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"sharedpoold", "hv-netvsc-sim", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for dep in service.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
        assert "image" in service, name


def test_compose_builds_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name in ("sharedpoold", "hv-netvsc-sim"):
        build = compose["services"][name]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == REPO_ROOT, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_mounts_exist_and_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _target in _volumes(service):
            if source.startswith((".", "/")):
                path = (COMPOSE_FILE.parent / source).resolve()
                assert path.exists(), f"{name}: {source} does not exist"
                assert path.is_relative_to(DEPLOY), f"{name}: {source} outside deploy/"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_compose_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = (int(host_port), int(container_port))
    assert published["sharedpoold"] == (DAEMON_PORT, DAEMON_PORT)
    assert published["prometheus"][1] == 9090
    assert published["grafana"][1] == 3000


def test_compose_daemon_exposes_tcp_as_metrics_only(compose: dict[str, Any]) -> None:
    command = compose["services"]["sharedpoold"]["command"]
    listens = [command[i + 1] for i, a in enumerate(command) if a == "--listen"]
    metrics = [command[i + 1] for i, a in enumerate(command) if a == "--metrics-listen"]
    assert metrics == [f"tcp:0.0.0.0:{DAEMON_PORT}"]
    assert listens and all(x.startswith("unix:/") for x in listens)


def test_compose_simulator_runs_forever_against_the_daemon(compose: dict[str, Any]) -> None:
    sim = compose["services"]["hv-netvsc-sim"]
    assert sim["entrypoint"] == ["hv-netvsc-sim"]
    args = sim["command"]
    assert args[0] == "run"
    opts = dict(zip(args[1::2], args[2::2], strict=True))
    assert opts["--daemon"] == "unix:/run/sharedpool/sharedpoold.sock"
    assert opts["--cycles"] == "0", "cycles 0 = forever"
    assert int(opts["--nics"]) >= 1
    assert float(opts["--pace"]) > 0
    assert sim["depends_on"]["sharedpoold"]["condition"] == "service_healthy"


def test_prometheus_scrapes_the_compose_daemon(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [sc for sc in config["scrape_configs"] if sc["job_name"] == "sharedpoold"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"sharedpoold:{DAEMON_PORT}"]
    mounts = dict(_volumes(compose["services"]["prometheus"]))
    assert (COMPOSE_FILE.parent / "./prometheus").resolve() == PROMETHEUS_CONFIG.parent
    assert mounts["./prometheus"] == "/etc/prometheus"
    assert (
        "--config.file=/etc/prometheus/prometheus.yml"
        in compose["services"]["prometheus"]["command"]
    )


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    mounts = dict(_volumes(compose["services"]["grafana"]))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_target = mounts["./grafana/dashboards"]
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "sharedpool.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == dashboards_target
    datasource = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home.startswith(dashboards_target + "/")
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).is_file()


# --- Dockerfile -----------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_user_healthcheck_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    args = dict(a[1].split("=", 1) for a in instructions if a[0] == "ARG" and "=" in a[1])
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    (health,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert f"127.0.0.1:{DAEMON_PORT}/healthz" in health
    (entrypoint,) = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["sharedpoold"]
    (cmd,) = [rest for word, rest in instructions if word == "CMD"]
    cmd_args = json.loads(cmd)
    # TCP only through the metrics-only listener; the API on the Unix socket
    assert cmd_args[cmd_args.index("--metrics-listen") + 1] == f"tcp:0.0.0.0:{DAEMON_PORT}"
    assert not any(a.startswith("tcp:") for a in cmd_args[cmd_args.index("--listen") :][:2])
    assert cmd_args[cmd_args.index("--listen") + 1].startswith("unix:/")
    assert f"{DAEMON_PORT}" in [rest for word, rest in instructions if word == "EXPOSE"]


def test_dockerfile_installs_the_tested_wheel() -> None:
    """The image installs dist/sharedpool-*.whl, the wheel `make wheel-test` built and ran
    from a fresh venv outside the repository, never the source tree (`pip install .` once
    gave an image without pool/guest/costs.toml that crashed at start)."""
    instructions = _dockerfile_instructions()
    copies = [rest for word, rest in instructions if word == "COPY" and "--from" not in rest]
    assert copies == ["dist/ /dist/"], copies
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install /dist/sharedpool-*.whl" in runs
    assert "pip install ." not in runs
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:3] == ["*", "!dist/", "!dist/sharedpool-*.whl"]
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "scripts/wheel_check.py" in makefile and "--out dist" in makefile


def test_console_scripts_used_by_the_deployment_are_the_contract() -> None:
    """compose, the image and the units call these two commands (DESIGN.md section 4)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = pyproject["project"].get("scripts", {})
    if not scripts:
        pytest.skip("pyproject.toml declares no console scripts yet (daemon issue)")
    assert {"sharedpoold", "hv-netvsc-sim"} <= set(scripts)


# --- Kubernetes -------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest(k8s: dict[str, dict[str, Any]]) -> None:
    resources = k8s["Kustomization"]["resources"]
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == files


def test_daemonset(k8s: dict[str, dict[str, Any]]) -> None:
    ds = k8s["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    pod = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == DAEMON_PORT
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", DAEMON_PORT)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    assert set(mounts) <= volumes
    args = container["args"]
    assert f"tcp:0.0.0.0:{DAEMON_PORT}" in args
    state_dir = args[args.index("--state-dir") + 1]
    assert state_dir in mounts.values(), "the state dir must be a volume (read-only rootfs)"
    unix = next(a for a in args if a.startswith("unix:"))
    assert str(Path(unix[5:]).parent) in mounts.values()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DAEMON_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_podmonitor_selects_the_daemonset_as_job_sharedpoold(
    k8s: dict[str, dict[str, Any]],
) -> None:
    pm = k8s["PodMonitor"]
    pod = k8s["DaemonSet"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert pm["metadata"]["namespace"] == k8s["DaemonSet"]["metadata"]["namespace"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The rules select job="sharedpoold"; jobLabel takes the job from this pod label.
    assert labels[pm["spec"]["jobLabel"]] == "sharedpoold"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["path"] == "/metrics"
