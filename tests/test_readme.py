"""The README's "Use the daemon" examples, run as a reader would run them, against a real
sharedpoold process: so they cannot rot.

Every fenced `sh` and `python` block of that section is extracted and executed unchanged
(bash -euo pipefail; a fresh Python), with $RUNTIME_DIRECTORY (systemd's) set to the
spawned daemon's socket directory, which makes its socket the default one that the
examples use. Afterwards the daemon must hold no client and no buffer: the
examples clean up after themselves.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemons import ADMIN_TOKEN, ROOT, Daemon

from daemon.client import SyncSharedPoolClient

SECTION = "## Use the daemon"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the README's "Use the daemon" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def test_the_section_shows_what_the_issue_asks() -> None:
    blocks = readme_blocks()
    langs = [lang for lang, _ in blocks]
    assert langs == ["sh", "python", "python"], langs
    shell = blocks[0][1]
    assert "--unix-socket" in shell
    for route in ("/v1/clients", "/v1/buffers", "-X DELETE", "/v1/pool", "/metrics"):
        assert route in shell, route
    assert "SyncSharedPoolClient" in blocks[1][1] and "async with" in blocks[2][1]


def test_readme_examples_run_against_a_real_daemon(tmp_path: Path) -> None:
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/run installs it in CI)")
    d = Daemon(tmp_path, tcp=False)
    try:
        asyncio.run(d.wait_ready())
        # systemd's variable: the daemon's default socket (and the client's) is in it
        env = {**os.environ, "RUNTIME_DIRECTORY": str(d.sock.parent), "PYTHONPATH": str(ROOT)}
        outputs = []
        for lang, code in readme_blocks():
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable]
            out = subprocess.run(
                cmd,
                input=None if lang == "sh" else code,
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=60,
            )
            assert out.returncode == 0, f"{lang} block failed:\n{code}\n{out.stdout}\n{out.stderr}"
            assert "Traceback" not in out.stderr, out.stderr
            outputs.append(out.stdout)
        shell, sync, aio = outputs
        assert re.search(r'"va":"0x[0-9a-f]{16}"', shell), shell  # jq shows va as a string
        assert '"npages":4096' in shell and "false" in shell  # the free: not leaked
        assert "sharedpool_pool_size_bytes" in shell and '"freed": []' in shell
        assert re.search(r"buffer \d+: 4096 pages at 0x[0-9a-f]+\n  PFNs 0x", sync), sync
        assert re.search(r"bytes in use", sync), sync
        assert re.search(r"^\d+ 0x[0-9a-f]+ 10 GPADL messages$", aio, re.M), aio
        with SyncSharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
            stats = admin.stats()
            assert (stats.clients, stats.buffers) == (0, 0)  # the examples cleaned up
            assert admin.invariants()["ok"]
    finally:
        d.stop()
