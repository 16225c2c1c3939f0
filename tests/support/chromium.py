"""The headless Chromium flags of the browser test and of scripts/ui_screenshot.py (one list:
the screenshot in docs/ is taken the way the test sees the page)."""

from __future__ import annotations

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # nothing reaches for the network: only the package registries are reachable
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
