"""No console script accepts an abbreviated option: a typo that is a prefix of a real option
is an error, not that option (pool.strictargs)."""

from __future__ import annotations

import pytest

from daemon.cli import build_parser as daemon_parser
from hv_netvsc_sim.cli import build_parser as sim_parser
from pool.guest.cli import build_parser as guest_parser


@pytest.mark.parametrize(
    ("parser", "typed", "meant"),
    [
        (daemon_parser, ["--no-cach"], ["--no-cache"]),
        (sim_parser, ["compare", "--cycle", "3"], ["compare", "--cycles", "3"]),
        (sim_parser, ["run", "--no-cach"], ["run", "--no-cache"]),
        (guest_parser, ["demo", "--no-cach"], ["demo", "--no-cache"]),
    ],
)
def test_prefix_of_an_option_is_refused(
    parser: object, typed: list[str], meant: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    p = parser()  # type: ignore[operator]
    p.parse_args(meant)  # the full spelling parses
    with pytest.raises(SystemExit) as exc:
        p.parse_args(typed)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
