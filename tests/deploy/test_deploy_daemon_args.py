"""Every command line the deployment gives sharedpoold is accepted by the real daemon.

The image's CMD, the compose service's command, the DaemonSet's args and the
systemd unit's ExecStart are run through `sharedpoold ... --check-config`,
which parses and validates them exactly as a start would (flags, listener
addresses, sizes) and prints the resulting settings, without binding anything.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from support.deploy_paths import COMPOSE_FILE, DOCKERFILE, K8S_DIR, SYSTEMD_DIR
from support.sharedpoold_proc import REPO_ROOT, sharedpoold_command


def _dockerfile_cmd() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    (entrypoint,) = re.findall(r"^ENTRYPOINT\s+(.*)$", text, re.MULTILINE)
    assert json.loads(entrypoint) == ["sharedpoold"]
    (cmd,) = re.findall(r"^CMD\s+(.*)$", text, re.MULTILINE)
    return list(json.loads(cmd))


def _compose_command() -> list[str]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return [str(a) for a in compose["services"]["sharedpoold"]["command"]]


def _daemonset_args() -> list[str]:
    ds = yaml.safe_load((K8S_DIR / "daemonset.yaml").read_text(encoding="utf-8"))
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["args"]]


def _systemd_exec_start() -> list[str]:
    """ExecStart's arguments with the specifiers systemd expands (%S = /var/lib for a
    system unit) and $SHAREDPOOLD_ARGS empty (/etc/default/sharedpoold is optional)."""
    text = (SYSTEMD_DIR / "sharedpoold.service").read_text(encoding="utf-8")
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE)
    words = line.split()
    assert words[0].endswith("/sharedpoold"), words
    return [w.replace("%S", "/var/lib") for w in words[1:] if w != "$SHAREDPOOLD_ARGS"]


COMMANDS = {
    "Dockerfile CMD": _dockerfile_cmd,
    "compose sharedpoold": _compose_command,
    "DaemonSet args": _daemonset_args,
    "systemd ExecStart": _systemd_exec_start,
}


def check_config(args: list[str]) -> dict[str, Any]:
    """`sharedpoold ARGS --check-config`: the resolved configuration, parsed as the TOML
    it must be."""
    result = subprocess.run(
        [*sharedpoold_command(), *args, "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tomllib.loads(result.stdout)


@pytest.mark.parametrize("where", COMMANDS)
def test_sharedpoold_accepts_the_deployed_arguments(where: str) -> None:
    """Every shipped command line exposes TCP through the metrics-only listener alone:
    the API (register, allocate) stays on the Unix socket."""
    args = COMMANDS[where]()
    daemon = check_config(args)["daemon"]
    listens = [args[i + 1] for i, a in enumerate(args) if a == "--listen"]
    metrics = [args[i + 1] for i, a in enumerate(args) if a == "--metrics-listen"]
    assert not any(a.startswith("tcp:") for a in listens), listens
    assert not any(a.startswith("tcp:") for a in daemon["listen"]), daemon["listen"]
    assert daemon["allow_anonymous_register"] is False
    if where == "systemd ExecStart":
        # Socket activation: the listeners come from the two socket units.
        assert not listens and not metrics
        assert daemon["state_dir"] == "/var/lib/sharedpoold"
    else:
        assert metrics == ["tcp:0.0.0.0:9464"]
        assert daemon["metrics_listen"] == metrics
        assert daemon["listen"] == listens
        assert all(a.startswith("unix:/") for a in listens)
        assert daemon["state_dir"] == "/var/lib/sharedpool"


def test_the_simulator_accepts_the_compose_arguments() -> None:
    """compose's hv-netvsc-sim command, parsed by the simulator's own parser."""
    from hv_netvsc_sim.cli import build_parser

    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    service = compose["services"]["hv-netvsc-sim"]
    assert service["entrypoint"] == ["hv-netvsc-sim"]
    args = build_parser().parse_args([str(a) for a in service["command"]])
    assert args.command == "run"
    # the API over the Unix socket in the volume both containers mount
    assert args.daemon == "unix:/run/sharedpool/sharedpoold.sock"
    assert "sharedpool-run:/run/sharedpool" in service["volumes"]
    assert args.cycles == 0  # until stopped
    assert args.pace > 0
