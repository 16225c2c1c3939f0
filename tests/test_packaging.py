"""The wheel users install holds every tracked data file of the packages (the first
round's wheel left out pool/guest/costs.toml and every command crashed from it). The full
install-and-run check outside the repository is `make wheel-test`, run by .ci/run."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wheel_check.py"


def test_wheel_holds_every_tracked_data_file() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--contents-only"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_on_a_wheel_without_costs_toml(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sharedpool-*.whl")
    broken = tmp_path / "broken" / wheel.name
    broken.parent.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if item.filename != "pool/guest/costs.toml":
                dst.writestr(item, src.read(item))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--contents-only", "--wheel", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "pool/guest/costs.toml" in done.stderr
