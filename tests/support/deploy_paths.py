"""Paths of deploy/ for the tests in tests/deploy (imported by module name)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_SCRIPT = GRAFANA_DIR / "dashboard.py"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "sharedpool.json"
SYSTEMD_DIR = DEPLOY / "systemd"
COMPOSE_FILE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S_DIR = DEPLOY / "k8s"
