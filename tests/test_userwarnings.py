"""The console scripts print the package's warnings as one line naming the command."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pool import userwarnings


def test_a_package_warning_is_one_line_naming_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    userwarnings.install("hv-netvsc-sim")
    warnings.warn_explicit("the cache is odd", RuntimeWarning, "/x/pool/aged_cache.py", 3)
    assert capsys.readouterr().err == "hv-netvsc-sim: warning: the cache is odd\n"


def test_the_daemon_logs_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    userwarnings.install("sharedpoold", logging.getLogger("sharedpoold"))
    with caplog.at_level(logging.WARNING, logger="sharedpoold"):
        warnings.warn_explicit("disk odd", RuntimeWarning, "/x/daemon/engine.py", 9)
    assert [r.getMessage() for r in caplog.records] == ["disk odd"]


def test_the_cli_prints_a_bad_cache_bound_in_one_line(tmp_path: Path) -> None:
    env = {"SHAREDPOOL_AGED_CACHE_MAX_BYTES": "lots", "XDG_CACHE_HOME": str(tmp_path), "PATH": ""}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hv_netvsc_sim",
            "compare",
            "--cycles",
            "1",
            "--age-steps",
            "0",
            "--guest-memory",
            "4GiB",
            "--strategies",
            "pool",
            "--quiet",
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "warning" in ln]
    assert lines == [
        "hv-netvsc-sim: warning: SHAREDPOOL_AGED_CACHE_MAX_BYTES='lots' is not a byte count "
        ">= 0; using 2147483648"
    ], out.stderr
