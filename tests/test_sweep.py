"""`hv-netvsc-sim sweep`: a grid of compare cells on real dask.distributed clusters.

The tiny grid (2 strategies x 2 guest sizes x 3 seeds, guests of 128 and 256 MiB, 1 cycle,
2,000 aging steps) runs on a LocalCluster of 2 worker processes on loopback reached through its
scheduler address, and again through the command's own default (a local cluster sized to
the CPUs): the tables are identical but for the wall-clock columns, and each cell's figures
are compare's for that strategy. A sweep killed with SIGKILL half-way resumes and runs only
the missing cells; a cell whose configuration is refused is recorded while the others
finish; a worker killed under a cell is replaced and the cell retried once, then recorded
as lost; grid errors are one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv_netvsc_sim.compare import CompareConfig, run_compare
from hv_netvsc_sim.sweep import main as sweep_main
from hv_netvsc_sim.sweep import run_sweep
from hv_netvsc_sim.sweep_grid import GridError, config_fields, load_grid, parse_grid
from hv_netvsc_sim.sweep_store import CELLS_FILE, WALL_COLUMNS, ResultStore, read_table
from hv_netvsc_sim.sweep_summary import summarize, t_interval

distributed = pytest.importorskip("distributed")

METRICS = (
    "allocations",
    "run.hypercalls",
    "run.direct_map_splits.level2",
    "end_state.hazard_pages.private_alias_to_shared",
    "failure_reasons.too_large",
)
TINY = f"""
metrics = [{", ".join(f'"{m}"' for m in METRICS)}]

[axes]
strategy = ["pool", "vmalloc-directmap"]
memory_bytes = ["128MiB", "256MiB"]
seed = {{ from = 1, to = 3 }}

[fixed]
age_steps = 2000
cycles = 1
"""


def _deterministic(doc: Any) -> Any:
    """A document without its wall-clock figures (keys naming latency or wall time)."""
    if isinstance(doc, dict):
        return {
            k: _deterministic(v) for k, v in doc.items() if "latency" not in k and "wall" not in k
        }
    if isinstance(doc, list):
        return [_deterministic(v) for v in doc]
    return doc


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _without_wall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in WALL_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A real LocalCluster: 2 worker processes on loopback, one retry of a lost cell (the
    setting the command gives its own local cluster)."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        c = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port: never clash with another cluster
        )
    yield c
    c.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("grid"), "tiny.toml", TINY)


@pytest.fixture(scope="module")
def reference(cluster: Any, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid swept on the fixture's cluster, through its scheduler address."""
    out = tmp_path_factory.mktemp("on-cluster")
    outcome = run_sweep(load_grid(tiny), out, scheduler=cluster.scheduler_address)
    assert (outcome.cells, outcome.ran, outcome.failed) == (12, 12, 0)
    return out


def test_cluster_and_local_default_give_the_same_table(
    reference: Path, tiny: Path, tmp_path: Path
) -> None:
    outcome = run_sweep(load_grid(tiny), tmp_path)  # the default: a local cluster
    assert (outcome.ran, outcome.failed) == (12, 0)
    on_cluster, local = read_table(reference), read_table(tmp_path)
    assert len(on_cluster) == 12
    assert _without_wall(on_cluster) == _without_wall(local)
    # each guest key was aged once, by its own task: no cell aged a guest (neither
    # strategy reserves memory at boot, so none ages a pristine copy of its own)
    assert all(r["aging_seconds"] == 0 for r in on_cluster + local)
    # the CSV holds the same table
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 13 and csv[0].split(",")[:4] == [
        '"cell_id"',
        '"strategy"',
        '"memory_bytes"',
        '"seed"',
    ]
    # the figures differ between strategies and seeds: the sweep is not a constant
    vm = [r for r in local if r["strategy"] == "vmalloc-directmap"]
    assert len({r["run.hypercalls"] for r in vm}) > 1
    assert all(r["run.hypercalls"] > 0 for r in vm)


def test_a_cell_is_compare_for_its_strategy(reference: Path) -> None:
    rows = read_table(reference)
    row = next(r for r in rows if r["strategy"] == "vmalloc-directmap" and r["seed"] == 2)
    config = CompareConfig.of(
        seed=2,
        guest_memory_bytes=row["memory_bytes"],
        age_steps=2000,
        cycles=1,
        strategies=(row["strategy"],),
    )
    doc = _deterministic(run_compare(config))["strategies"][row["strategy"]]
    stored = ResultStore(reference).load()[row["cell_id"]].doc
    assert stored is not None
    assert _deterministic(stored) == {k: v for k, v in doc.items() if k != "series"}
    assert row["run.direct_map_splits.level2"] == doc["run"]["direct_map_splits"]["level2"]


def test_resume_after_sigkill_runs_only_the_missing_cells(
    reference: Path, tiny: Path, tmp_path: Path, cluster: Any
) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hv_netvsc_sim.sweep", "--grid", str(tiny), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--scheduler", cluster.scheduler_address, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    cells = out / CELLS_FILE
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if cells.exists() and len(cells.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's client; its cells are forgotten
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    stored = ResultStore(out).load()
    assert 3 <= len(stored) < 12
    outcome = run_sweep(load_grid(tiny), out, scheduler=cluster.scheduler_address)
    assert outcome.ran == 12 - len(stored)
    assert outcome.reused == len(stored)
    assert _without_wall(read_table(out)) == _without_wall(read_table(reference))
    # and once complete, nothing runs again (no cluster needed: none is started)
    again = run_sweep(load_grid(tiny), out, scheduler="tcp://127.0.0.1:9")
    assert (again.ran, again.reused) == (0, 12)


def test_a_failing_cell_is_recorded_and_the_others_finish(
    cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _write(
        tmp_path,
        "bad.toml",
        """
metrics = ["run.hypercalls"]
[axes]
strategy = ["pool"]
platform = ["tdx", "no-such-platform", "snp"]
[fixed]
memory_bytes = "128MiB"
age_steps = 1000
cycles = 1
""",
    )
    out = tmp_path / "out"
    code = sweep_main(
        ["--grid", str(grid), "--out", str(out), "--scheduler", cluster.scheduler_address, "--json"]
    )
    assert code == 1  # some cell failed; all recorded
    rows = {r["platform"]: r for r in read_table(out)}
    assert rows["tdx"]["status"] == rows["snp"]["status"] == "ok"
    assert rows["no-such-platform"]["status"] == "error"
    assert "unknown platform 'no-such-platform'" in rows["no-such-platform"]["error"]
    assert rows["no-such-platform"]["run.hypercalls"] is None
    captured = capsys.readouterr()
    assert "failed cell" in captured.err and "unknown platform" in captured.err
    import json

    summary = json.loads(captured.out)
    assert summary["failed"] == 1 and len(summary["groups"]) == 3


@pytest.mark.slow  # ~15-25 s: two worker restarts (make test-all runs it)
def test_a_worker_killed_under_a_cell_is_retried_once(cluster: Any, tmp_path: Path) -> None:
    """SIGKILL the worker process running the cell: the nanny starts a new worker and the
    scheduler runs the cell again (allowed-failures 1); killed a second time, the cell is
    recorded as lost (KilledWorker) and the sweep still ends."""
    grid = parse_grid(
        {
            "metrics": ["run.hypercalls"],
            "axes": {"strategy": ["vmalloc-directmap"], "seed": [7]},
            "fixed": {"memory_bytes": "256MiB", "age_steps": 5000, "cycles": 10},
        }
    )
    client = distributed.Client(cluster.scheduler_address)

    def kill_the_worker_running_it() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            busy = [  # the cell's task (not its guest's, which runs first)
                w
                for w, tasks in client.processing().items()
                if any(str(t).startswith("sweep-cell-") for t in tasks)
            ]
            if busy:
                pid = client.run(os.getpid, workers=busy)[busy[0]]
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    for kills, status in ((1, "ok"), (2, "error")):
        out = tmp_path / f"kills-{kills}"

        def killer(kills: int = kills) -> None:
            for _ in range(kills):
                time.sleep(0.3)  # the cell under way (again, on the other worker)
                kill_the_worker_running_it()

        t = threading.Thread(target=killer)
        t.start()
        outcome = run_sweep(grid, out, scheduler=cluster.scheduler_address)
        t.join()
        (row,) = outcome.rows
        assert row["status"] == status, row["error"]
        if status == "error":
            assert "KilledWorker" in row["error"]
        else:
            assert row["run.hypercalls"] > 0
        client.wait_for_workers(2, timeout=30)
    client.close()


# ---- the grid file --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[axes]\ncyclez = [1, 2]\n", "axes.cyclez: unknown field 'cyclez'"),
        ("[axes]\ncycles = ['ten']\n", "axes.cycles: 'ten' is not an integer"),
        ("[axes]\nstrategy = ['poll']\n", "unknown strategies ['poll']"),
        ("[axes]\nseed = { from = 3, to = 1 }\n", "empty range 3..1"),
        ("[axes]\nmemory_bytes = ['4GB!']\n", "not a size: '4GB!'"),
        ("[fixed]\nseed = 1\nguest.seed = 2\n", "sets guest.seed, as fixed.seed does"),
        ("metrics = []\n", "metrics: a non-empty array"),
        ("[axis]\nseed = [1]\n", "unknown top-level key(s) ['axis']"),
        ("[axes\n", "not valid TOML"),
    ],
)
def test_grid_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    grid = _write(tmp_path, "g.toml", text)
    with pytest.raises(SystemExit) as exc:
        sweep_main(["--grid", str(grid), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_missing_grid_and_bad_plot_exit_2(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in (
        (["--grid", str(tmp_path / "none.toml")], "cannot read the grid"),
        (["--grid", str(tiny), "--plot", str(tmp_path / "p.nope")], "unknown format 'nope'"),
        (["--grid", str(tiny), "--plot", str(tmp_path / "no" / "p.png")], "no directory"),
        (["--grid", str(tiny), "--scheduler", "localhost"], "like tcp://HOST:8786"),
        (["--grid", str(tiny), "--scheduler", "tcp://h:1", "--workers", "2"], "its own"),
        (["--grid", str(tiny), "--workers", "0"], "must be at least 1"),
    ):
        with pytest.raises(SystemExit) as exc:
            sweep_main([*argv, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_a_metric_the_documents_lack_is_refused_before_anything_runs(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Metrics are read from the stored documents: a typo is caught against the cells
    already in DIR, and a corrected grid then needs no cell to run again."""
    bad = _write(tmp_path, "bad.toml", TINY.replace('"run.hypercalls"', '"run.hypercall"'))
    before = (reference / CELLS_FILE).read_bytes()
    with pytest.raises(SystemExit) as exc:
        sweep_main(["--grid", str(bad), "--out", str(reference), "--quiet"])
    assert exc.value.code == 2
    assert "metric 'run.hypercall': no 'hypercall' in run" in capsys.readouterr().err
    table = _write(tmp_path, "table.toml", TINY.replace('"run.hypercalls"', '"run"'))
    with pytest.raises(SystemExit):
        sweep_main(["--grid", str(table), "--out", str(reference), "--quiet"])
    assert "is a table, not a number: pick one of" in capsys.readouterr().err
    more = _write(
        tmp_path, "more.toml", TINY.replace("metrics = [", 'metrics = ["setup.hypercalls", ')
    )
    plot = tmp_path / "summary.png"
    code = sweep_main(["--grid", str(more), "--out", str(reference), "--plot", str(plot)])
    assert code == 0 and plot.stat().st_size > 10_000
    assert (reference / CELLS_FILE).read_bytes() == before  # nothing ran again
    rows = read_table(reference)
    assert all(r["setup.hypercalls"] is not None for r in rows)
    out = capsys.readouterr()
    assert "12 cells: 0 run now, 12 from" in out.err
    assert "setup.hypercalls" in out.out and "vmalloc-directmap" in out.out


# ---- properties -----------------------------------------------------------------------------

_AXES = st.dictionaries(
    st.sampled_from(["cycles", "nics", "mixed_events", "age_steps", "churn_steps"]),
    st.lists(st.integers(1, 50), min_size=1, max_size=3, unique=True),
    max_size=3,
)


@settings(max_examples=50, deadline=None)
@given(axes=_AXES, seeds=st.lists(st.integers(0, 99), min_size=1, max_size=4, unique=True))
def test_cells_are_the_product_and_ids_are_spelling_free(
    axes: dict[str, list[int]], seeds: list[int]
) -> None:
    doc: dict[str, Any] = {"axes": {"strategy": ["pool"], **axes, "seed": seeds}}
    grid = parse_grid(doc)
    cells = grid.cells()
    expected = len(seeds)
    for values in axes.values():
        expected *= len(values)
    assert len(cells) == len(grid) == expected
    assert len({c.id for c in cells}) == expected
    # the same cells spelled with dotted paths, in another order, and sizes as text: same ids
    dotted = {("scenario." + k if k != "age_steps" else k): v for k, v in reversed(axes.items())}
    respelled = parse_grid({"axes": {"seed": seeds, **dotted, "strategy": ["pool"]}})
    assert {c.id for c in respelled.cells()} == {c.id for c in cells}


def test_sizes_are_canonical_in_the_identity() -> None:
    a = parse_grid({"axes": {"strategy": ["pool"], "memory_bytes": ["1GiB"]}}).cells()
    b = parse_grid({"axes": {"strategy": ["pool"], "guest.memory_bytes": [1 << 30]}}).cells()
    assert [c.id for c in a] == [c.id for c in b]
    assert dict(a[0].keys)["memory_bytes"] == 1 << 30


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=30))
def test_the_t_interval_holds_the_mean_and_narrows_with_more_seeds(values: list[int]) -> None:
    xs = [float(v) for v in values]
    lo, hi = t_interval(xs)
    mean = sum(xs) / len(xs)
    assert lo <= mean + 1e-6 and mean - 1e-6 <= hi
    assert abs((lo + hi) / 2 - mean) <= 1e-6 * max(1.0, abs(mean))
    # the same spread seen four times: a narrower interval around the same mean
    lo4, hi4 = t_interval(xs * 4)
    assert hi4 - lo4 <= hi - lo + 1e-6


def test_summary_groups_over_seeds_only() -> None:
    grid = parse_grid(
        {
            "metrics": ["run.hypercalls"],
            "axes": {"strategy": ["pool", "swiotlb"], "nics": [1, 2], "seed": [1, 2, 3]},
        }
    )
    rows = []
    for cell in grid.cells():
        keys = cell.key_json()
        value = keys["nics"] * 10 + keys["seed"]
        rows.append({**keys, "status": "ok", "run.hypercalls": value})
    summary = summarize(grid, rows)
    assert len(summary["groups"]) == 4
    g = summary["groups"][0]
    assert g["keys"] == {"strategy": "pool", "nics": 1}
    s = g["metrics"]["run.hypercalls"]
    assert (s["n"], s["mean"], s["median"]) == (3, 12.0, 12.0)
    # t(0.975, 2) = 4.302652729911275; s = 1
    assert s["ci_low"] == pytest.approx(12 - 4.302652729911275 / 3**0.5)
    assert s["ci_high"] == pytest.approx(12 + 4.302652729911275 / 3**0.5)


def test_grid_error_is_a_value_error() -> None:
    with pytest.raises(GridError):
        parse_grid({"axes": {"strategy": []}})


def test_help_of_the_command_and_of_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    from hv_netvsc_sim.cli import main as cli_main

    for argv in (["--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "sweep" in out and "95% t interval" in out and "--scheduler ADDRESS" in out


@attrs.frozen
class _Preset:
    name: str = "default"
    hours: int = 1


def _preset(value: _Preset | str) -> _Preset:
    return value if isinstance(value, _Preset) else _Preset(value, 24)


@attrs.frozen
class _Inner:
    seed: int = 1
    level: int = 0


@attrs.frozen
class _Root:
    inner: _Inner = attrs.field(factory=_Inner)
    other: _Inner = attrs.field(factory=_Inner)
    preset: _Preset = attrs.field(default=_Preset(), converter=_preset)
    steps: int = 0


def test_fields_come_from_the_classes() -> None:
    """A field added to a configuration class is an axis: a nested class is a section, one
    with a converter (a preset name) is one field; plain names shared by sections set each."""
    from hv_netvsc_sim.sweep_grid import Namespace, _walk

    ns = Namespace(tuple(_walk(_Root, (), frozenset())))
    assert [f.dotted for f in ns.resolve("preset")[1]] == ["preset"]
    assert [f.dotted for f in ns.resolve("seed")[1]] == ["inner.seed", "other.seed"]
    assert ns.resolve("other.level")[0] == "other.level"
    assert ns.resolve("steps")[0] == "steps"
    with pytest.raises(GridError, match=r"unknown field 'stpes'.*did you mean steps"):
        ns.resolve("stpes")
    # and the real classes: compare's aging, the guest's, the scenario's, the pool's
    real = Namespace(config_fields())
    for name, path in (
        ("age_steps", "age_steps"),
        ("memory_bytes", "guest.memory_bytes"),
        ("cpus", "guest.cpus"),
        ("nics", "scenario.nics"),
        ("recv_sections", "scenario.settings.recv_sections"),
        ("grow_step_bytes", "pool.grow_step_bytes"),
    ):
        assert [f.dotted for f in real.resolve(name)[1]] == [path]
