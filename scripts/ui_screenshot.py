"""Take the screenshot of the daemon's page in docs/ui.png (headless Chromium).

Starts sharedpoold on its defaults (16 GiB TDX guest, aged 200,000 steps, the pool with 64
MiB decrypted at start) in a temporary state directory with a metrics-only listener on
127.0.0.1, attaches three simulated vNICs' worth of buffers through the client library (a
16 MiB receive buffer, a 1 MiB send buffer and two 64 KiB rings each; one vNIC's
ring resize frees and re-allocates its buffers with 31 MiB and 15 MiB), lets the
maintenance task grow the pool, and saves the page. Needs Debian's chromium and
chromium-driver, and selenium (the dev extra).

    python scripts/ui_screenshot.py [--out docs/ui.png] [--strategy pool]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the browser test's Chromium flags

from support.chromium import CHROMIUM_FLAGS as FLAGS  # noqa: E402

from daemon.client import SyncSharedPoolClient  # noqa: E402

MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "ui.png"))
    ap.add_argument("--strategy", default="pool")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1420)
    args = ap.parse_args()
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print(
            "ui_screenshot: needs chromium and chromedriver (apt-get install chromium "
            "chromium-driver)",
            file=sys.stderr,
        )
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = Path(tempfile.mkdtemp(prefix="ui-shot-"))
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--state-dir",
            str(tmp / "state"),
            "--listen",
            f"unix:{tmp / 's.sock'}",
            "--metrics-listen",
            "tcp:127.0.0.1:0",
            "--strategy",
            args.strategy,
            "--maintain-interval",
            "0.5",
        ],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            m = re.search(r"metrics=tcp:(127\.0\.0\.1:\d+)", (tmp / "daemon.log").read_text())
            url = f"http://{m.group(1)}" if m else None
            time.sleep(0.2)
        assert url, (tmp / "daemon.log").read_text()
        while b"ready" not in (tmp / "daemon.log").read_bytes():
            time.sleep(0.2)
        with SyncSharedPoolClient(f"unix:{tmp / 's.sock'}", "screenshot") as client:
            for nic in range(3):
                rx = client.allocate(16 * MiB, purpose=f"eth{nic} rx")
                tx = client.allocate(1 * MiB, purpose=f"eth{nic} tx")
                for ring in range(2):
                    client.allocate(64 << 10, purpose=f"eth{nic} ring{ring}")
                if nic == 1:  # ethtool -G: free and re-allocate bigger
                    client.free(rx)
                    client.free(tx)
                    client.allocate(31 * MiB, purpose="eth1 rx")
                    client.allocate(15 * MiB, purpose="eth1 tx")
                time.sleep(2.5)
            options = webdriver.ChromeOptions()
            options.binary_location = chromium
            for flag in FLAGS:
                options.add_argument(flag)
            options.add_argument(f"--window-size={args.width},{args.height}")
            options.add_argument(f"--user-data-dir={tmp / 'profile'}")
            browser = webdriver.Chrome(options=options, service=Service(driver_path))
            try:
                browser.get(url + "/?refresh=1000")
                time.sleep(5)
                browser.save_screenshot(args.out)
            finally:
                browser.quit()
        print(f"wrote {args.out}")
        return 0
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
