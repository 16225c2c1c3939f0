"""Console scripts whose stdout reader has gone (`| head`) stop quietly with status 141."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pool.closedpipe import EXIT_CLOSED_PIPE, quiet_on_closed_stdout

ROOT = Path(__file__).resolve().parent.parent


def _into_closed_pipe(*argv: str, unbuffered: bool = False) -> tuple[int, str]:
    """Run `python argv...` with stdout a pipe whose read end is closed before it writes.
    Buffered by default, as a user's Python is (PYTHONUNBUFFERED, set in some CI shells,
    lets argparse's own write swallow the error: --help then exits 0)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()  # not inheritable: the child holds only the write end
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    os.close(r)
    os.close(w)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


COMPARE = (
    "-m",
    "hv_netvsc_sim",
    "compare",
    "--guest-memory",
    "2GiB",
    "--age-steps",
    "0",
    "--cycles",
    "1",
    "--strategies",
    "pool",
    "--quiet",
    "--no-cache",
)


@pytest.mark.parametrize(
    "argv",
    [
        COMPARE,  # a normal return: the table, then main returns 0
        ("-m", "hv_netvsc_sim", "--version"),  # printed by argparse, then SystemExit
        ("-m", "hv_netvsc_sim.sweep", "--help"),
        ("-m", "pool.guest", "--help"),
        ("-m", "daemon.cli", "--print-default-config"),
    ],
    ids=["compare", "sim-version", "sweep-help", "guest-help", "daemon-config"],
)
def test_a_closed_stdout_is_status_141_and_no_traceback(argv):
    code, err = _into_closed_pipe(*argv)
    assert code == EXIT_CLOSED_PIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_unbuffered_the_table_itself_meets_the_closed_pipe():
    """Unbuffered, the first write fails inside rich's print: the same status, no traceback."""
    code, err = _into_closed_pipe(*COMPARE, unbuffered=True)
    assert code == EXIT_CLOSED_PIPE, err
    assert "Traceback" not in err, err


def test_a_broken_pipe_elsewhere_still_raises(capsys):
    """A BrokenPipeError that is not stdout's (a socket to the daemon) is a real failure."""

    @quiet_on_closed_stdout
    def main() -> int:
        raise BrokenPipeError(32, "Broken pipe (a socket)")

    with pytest.raises(BrokenPipeError):
        main()


def test_the_wrapped_main_returns_its_code():
    @quiet_on_closed_stdout
    def main(code: int) -> int:
        return code

    assert main(3) == 3
