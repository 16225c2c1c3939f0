"""promtool on deploy/prometheus: config, rules and the rule unit tests.

deploy/ci-checks.sh runs the same commands with promtool mandatory; here they
are skipped, with the reason, when promtool is not installed.
"""

from __future__ import annotations

import subprocess

import yaml
from support.deploy_paths import PROMETHEUS_CONFIG, PROMETHEUS_DIR, REPO_ROOT

RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def run(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_check_config(promtool: str) -> None:
    out = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert f"{len(RULES)} rule files found" in out


def test_promtool_check_rules(promtool: str) -> None:
    run(promtool, "check", "rules", *map(str, RULES))


def test_promtool_test_rules(promtool: str) -> None:
    run(promtool, "test", "rules", *map(str, RULE_TESTS))


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {
        rule["alert"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts, "no alerts found"
    assert alerts <= firing, f"never tested firing: {sorted(alerts - firing)}"
    assert alerts <= silent, f"never tested silent: {sorted(alerts - silent)}"


def test_scrape_job_is_sharedpoold() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {sc["job_name"]: sc for sc in config["scrape_configs"]}
    assert "sharedpoold" in jobs
    assert jobs["sharedpoold"].get("metrics_path", "/metrics") == "/metrics"
