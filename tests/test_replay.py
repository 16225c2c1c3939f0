"""RANGES.json replay and the replay/export command lines (docs/real-guest.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pool.guest import cli, procfs
from pool.guest.buddyimport import buddyinfo_rows
from pool.guest.directmap import PRIVATE, SHARED, Leaf
from pool.guest.fragmentation import format_buddyinfo
from pool.guest.ptdump import parse_ptdump
from pool.guest.replay import changed_leaves, parse_changes, replay
from pool.guest.units import PAGES_PER_1G, PAGES_PER_2M

DATA = Path(__file__).parent / "data"
DUMP = str(DATA / "ptdump-5GiB.txt")
RANGES = str(DATA / "ranges-5GiB.json")
G = PAGES_PER_1G
M2 = PAGES_PER_2M


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the example RANGES.json on the hand-written dump (tests/data) -------------------------
# [0] one page at 1 GiB + 12345 pages, inside the 1G leaf [1G, 2G): level-3 1, level-2 1
# [1] 2 MiB at 4 GiB + 14 MiB, aligned, inside the 1G leaf [4G, 5G): level-3 1, level-2 0
# [2] 20 pages at 2 GiB + 2 MiB - 40 KiB, two 2M leaves of the run at 2 GiB: level-2 2
# [3] 4 pages one by one: 2M leaves 20 and 21 of the run at 2 GiB (level-2 2), the 2M leaf
#     at 4 GiB, a 2M leaf since [1] split its 1G leaf (level-2 1), the 4K region (nothing)
# [4] the page of [0] back to private: nothing splits, nothing merges
EXPECTED = [(1, 1), (0, 1), (2, 0), (3, 0), (0, 0)]


def test_example_ranges_replay_with_splits_worked_out_by_hand():
    dm = parse_ptdump(Path(DUMP).read_text()).direct_map()
    changes = parse_changes(Path(RANGES).read_text())
    assert [c.kind for c in changes] == ["range", "range", "range", "pages", "range"]
    report = replay(dm, changes)
    assert [(r.splits.level2, r.splits.level3) for r in report.results] == EXPECTED
    assert (report.total.level2, report.total.level3) == (6, 2)
    # 4k: 3968 kB + 6 regions x 2048 kB; 1G: both leaves split; 2M gets the rest
    assert report.before == {"4k": 3968 << 10, "2M": 2093056 << 10, "1G": 2 << 30}
    assert report.after == {"4k": 16256 << 10, "2M": 4177920 << 10, "1G": 0}
    assert dm.attr[G + 12345] == PRIVATE and dm.attr[G * 2 + M2 - 10] == SHARED
    # the changed stretches: around each split 1G leaf, the 2M run, the 4K region
    assert [(c.start_pfn, c.end_pfn) for c in report.changed] == [
        (M2, 2 * G),  # [2M, 2G): the 2M run before it merges with the split 1G leaf's leaves
        (2 * G, 3 * G - M2),
        (3 * G - M2, 3 * G - 32),
        (4 * G, 5 * G),
    ]
    dm.check_invariants()


def test_changed_leaves_pairs_before_and_after_runs():
    before = [Leaf(0, G, "1G", PRIVATE), Leaf(G, G, "1G", PRIVATE)]
    after = [
        Leaf(0, G, "1G", PRIVATE),
        Leaf(G, M2, "4k", SHARED),
        Leaf(G + M2, G - M2, "2M", PRIVATE),
    ]
    (change,) = changed_leaves(before, after)
    assert (change.start_pfn, change.end_pfn) == (G, 2 * G)
    assert change.before == (before[1],) and change.after == tuple(after[1:])
    assert changed_leaves(before, before) == []


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("{", "not valid JSON \\(line 1"),
        ('{"pfn": 1}', "expected a JSON array"),
        ("[1]", "entry \\[0\\]: expected an object"),
        ('[{"pfn": 1, "npages": 1}]', "entry \\[0\\]: 'attr' must be"),
        ('[{"pfn": 1, "npages": 1, "attr": "decrypted"}]', "'attr' must be"),
        ('[{"pfn": 1, "npages": 1, "attr": "shared", "size": 3}]', "unknown field 'size'"),
        ('[{"npages": 1, "attr": "shared"}]', "exactly one of 'pfn' and 'phys'"),
        ('[{"pfn": 1, "phys": "0x1000", "npages": 1, "attr": "shared"}]', "exactly one of"),
        ('[{"pfn": 1, "attr": "shared"}]', "exactly one of 'npages' and 'bytes'"),
        ('[{"pfn": -1, "npages": 1, "attr": "shared"}]', "'pfn' must be an integer >= 0"),
        ('[{"pfn": 1, "npages": 0, "attr": "shared"}]', "'npages' must be an integer >= 1"),
        ('[{"pfn": true, "npages": 1, "attr": "shared"}]', "'pfn' must be an integer"),
        ('[{"phys": "0x1001", "npages": 1, "attr": "shared"}]', "not a page-aligned"),
        ('[{"phys": "zz", "npages": 1, "attr": "shared"}]', "'phys' must be an address"),
        ('[{"pfn": 1, "bytes": 100, "attr": "shared"}]', "positive multiple of 4096"),
        ('[{"pages": [], "attr": "shared"}]', "'pages' must be a non-empty list"),
        ('[{"pages": [1, "x"], "attr": "shared"}]', "'pages'\\[1\\] must be a pfn"),
        ('[{"pages": [1], "pfn": 1, "attr": "shared"}]', "'pfn' is not allowed"),
        ('[{"pfn": 1, "npages": 1, "attr": "shared", "label": 5}]', "'label' must be a string"),
    ],
)
def test_bad_ranges_name_the_entry(document, problem):
    with pytest.raises(ValueError, match=problem):
        parse_changes(document)


def test_ranges_off_ram_are_refused_before_anything_changes():
    dm = parse_ptdump(Path(DUMP).read_text()).direct_map()
    leaves = list(dm.leaves())
    ok = {"pfn": G + 1, "npages": 1, "attr": "shared"}
    hole = {"label": "PCI hole", "phys": "0xc0000000", "bytes": "4KiB", "attr": "shared"}
    with pytest.raises(ValueError, match=r"entry \[1\] \(PCI hole\): pfn 0xc0000 .* hole"):
        replay(dm, parse_changes(json.dumps([ok, hole])))
    beyond = {"pages": [1, 5 * G], "attr": "shared"}
    with pytest.raises(ValueError, match="entry \\[1\\]: page 0x140000 is past the end"):
        replay(dm, parse_changes(json.dumps([ok, beyond])))
    assert list(dm.leaves()) == leaves


# ---- command line -------------------------------------------------------------------------


def test_replay_prints_the_splits(capsys):
    code, out, err = run(capsys, "replay", "--ptdump", DUMP, "--convert", RANGES)
    assert code == 0, err
    assert "flags dropped" in out and "ro 4KiB" in out
    assert "  total" in out and out.split("  total")[1].split()[:2] == ["6", "2"]
    assert "DirectMap1G:      2097152 kB ->            0 kB" in out
    assert "leaves that changed: 4 stretches" in out


def test_replay_notes_lines_split_by_an_unprinted_bit(capsys, tmp_path):
    lines = Path(DUMP).read_text().splitlines()
    # the 4K region below the hole as a CoCo kernel prints it with 16 pages shared in it:
    # three lines, identical printed flags
    lines[9:10] = [
        "0xffff8880bfe00000-0xffff8880bfe10000          64K     RW                 GLB NX pte",
        "0xffff8880bfe10000-0xffff8880bfe20000          64K     RW                 GLB NX pte",
        "0xffff8880bfe20000-0xffff8880bffe0000        1792K     RW                 GLB NX pte",
    ]
    dump = tmp_path / "dump.txt"
    dump.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "replay", "--ptdump", str(dump))
    assert code == 0, err
    assert "2 line(s) of the dump repeat the previous line's level and printed flags" in out
    assert "(lines 11, 12)" in out


def test_replay_json_and_buddyinfo(capsys, tmp_path):
    info = tmp_path / "buddyinfo"
    rows = [("DMA", (1,) * 11), ("DMA32", (2,) * 11), ("Normal", (3,) * 11)]
    info.write_text(format_buddyinfo(rows))
    code, out, err = run(
        capsys,
        *("replay", "--ptdump", DUMP, "--convert", RANGES, "--buddyinfo", str(info)),
        *("--json", "--max-leaves", "1"),
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["splits"] == {"level2": 6, "level3": 2}
    assert [(c["level2_splits"], c["level3_splits"]) for c in doc["changes"]] == EXPECTED
    assert doc["direct_map_kb_after"] == {
        "DirectMap4k": 16256,
        "DirectMap2M": 4177920,
        "DirectMap1G": 0,
    }
    assert doc["buddyinfo"] == {name: list(counts) for name, counts in rows}
    assert doc["layout"]["ram_ranges"] == [[0, 3 * G - 32], [4 * G, 5 * G]]
    assert len(doc["changed_leaves"]) == 1 and doc["changed_leaves_omitted"] == 3
    assert len(doc["changed_leaves"][0]["after"]) == 1
    assert doc["changed_leaves"][0]["after_runs"] == 3


@pytest.mark.parametrize(
    ("dump_line", "ranges", "message"),
    [
        (None, "[{]", "not valid JSON"),
        (None, '[{"pfn": 1, "npages": 1, "attr": "shared"}, {"pfn": 1}]', "entry \\[1\\]"),
        (None, '[{"phys": "0xc0000000", "npages": 1, "attr": "shared"}]', "entry \\[0\\]"),
        ("0xffff888000000000-0xffff888000098000  600K  RW GLB NX pte", "[]", "ptdump line 4"),
    ],
)
def test_replay_errors_exit_2_naming_the_line_or_entry(
    capsys, tmp_path, dump_line, ranges, message
):
    dump = tmp_path / "dump.txt"
    lines = Path(DUMP).read_text().splitlines()
    if dump_line:
        lines[3] = dump_line
    dump.write_text("\n".join(lines) + "\n")
    path = tmp_path / "ranges.json"
    path.write_text(ranges)
    code, out, err = run(capsys, "replay", "--ptdump", str(dump), "--convert", str(path))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_replay_missing_inputs_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "replay", "--convert", RANGES)
    assert code == 2 and "needs --ptdump" in err
    code, _, err = run(capsys, "replay", "--ptdump", str(tmp_path / "nope"))
    assert code == 2 and "cannot read page-table dump" in err


def test_replay_as_a_module_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "ranges.json"
    bad.write_text('[{"pfn": 1, "npages": 1, "attr": "shared", "oops": 1}]')
    argv = [sys.executable, "-m", "pool.guest", "replay", "--ptdump", DUMP, "--convert", str(bad)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "entry [0]: unknown field 'oops'" in out.stderr and "Traceback" not in out.stderr
    argv[-1] = RANGES
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "level-2" in out.stdout


ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        spanned  4095
        present  3998
        managed  3840
  start_pfn:           1
Node 0, zone    DMA32
        spanned  1044480
        present  782336
  start_pfn:           4096
Node 0, zone   Normal
        spanned  262144
        present  262144
  start_pfn:           1048576
Node 0, zone  Movable
        spanned  0
        present  0
"""


def fake_proc(monkeypatch, tmp_path, buddyinfo: str, dump: str | None) -> None:
    (tmp_path / "buddyinfo").write_text(buddyinfo)
    (tmp_path / "zoneinfo").write_text(ZONEINFO)
    if dump is not None:
        (tmp_path / "kernel").write_text(dump)
    monkeypatch.setattr(procfs, "PROC_BUDDYINFO", tmp_path / "buddyinfo")
    monkeypatch.setattr(procfs, "PROC_ZONEINFO", tmp_path / "zoneinfo")
    monkeypatch.setattr(procfs, "PTDUMP_PATH", tmp_path / "kernel")


def test_from_proc_with_a_readable_dump(capsys, monkeypatch, tmp_path):
    rows = [("DMA", (0,) * 10 + (3,)), ("DMA32", (5,) * 11), ("Normal", (7,) * 11)]
    fake_proc(monkeypatch, tmp_path, format_buddyinfo(rows), Path(DUMP).read_text())
    code, out, err = run(capsys, "replay", "--from-proc", "--convert", RANGES, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["splits"] == {"level2": 6, "level3": 2}
    assert doc["buddyinfo"]["Normal"] == [7] * 11
    assert any("this machine's page-table dump" in note for note in doc["notes"])


def test_from_proc_without_the_dump_says_what_it_uses(capsys, monkeypatch, tmp_path):
    rows = [("DMA", (0,) * 8 + (1, 1, 3)), ("DMA32", (2,) * 10 + (700,)), ("Normal", (4,) * 11)]
    fake_proc(monkeypatch, tmp_path, format_buddyinfo(rows), None)
    code, out, err = run(capsys, "replay", "--from-proc")
    assert code == 0, err
    assert "page-table dump NOT readable" in out and "No such file" in out
    assert "RAM laid out from /proc/zoneinfo" in out
    assert format_buddyinfo(rows) in out
    # RAM: DMA's 3998 present pages at the top of its span, DMA32 from 16 MiB, Normal at 4 GiB
    assert procfs.zoneinfo_layout() == [(98, 4096), (4096, 4096 + 782336), (G * 4, G * 5)]
    assert "RAM 4193912 kB" in out  # (3998 + 782336 + 262144) = 1048478 pages x 4 kB


def test_from_proc_on_this_machine(capsys):
    """The real /proc of whatever runs the tests: a report, or a clear error (exit 2) when its
    zones do not fit the model (NUMA nodes, Movable zone...)."""
    if not procfs.PROC_BUDDYINFO.is_file():
        pytest.skip("no /proc/buddyinfo here")
    code, out, err = run(capsys, "replay", "--from-proc", "--json")
    if code == 2:
        assert err.startswith("error: ") and "Traceback" not in err
        return
    assert code == 0, err
    doc = json.loads(out)
    assert doc["splits"] == {"level2": 0, "level3": 0}
    # the machine keeps running: its buddyinfo has moved on since, but not its zones
    rows = buddyinfo_rows(procfs.PROC_BUDDYINFO.read_text())
    assert sorted(doc["buddyinfo"]) == sorted(name for name, _ in rows)


def test_export_writes_both_formats_that_reimport(capsys, tmp_path):
    dump, info = tmp_path / "kernel", tmp_path / "buddyinfo"
    code, _, err = run(
        capsys,
        *("export", "--ptdump", str(dump), "--buddyinfo", str(info)),
        *("--guest-memory", "2GiB", "--age-steps", "2000", "--seed", "3"),
    )
    assert code == 0, err
    parsed = parse_ptdump(dump.read_text())
    assert parsed.page_offset == 0xFFFF888000000000
    assert parsed.direct_map().ram_pages == 2 * G
    rows = buddyinfo_rows(info.read_text())
    assert [name for name, _ in rows] == ["DMA", "DMA32"]
    # and replay starts from them
    code, out, err = run(
        capsys, "replay", "--ptdump", str(dump), "--buddyinfo", str(info), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["buddyinfo"] == {name: list(counts) for name, counts in rows}
    code, _, err = run(capsys, "export")
    assert code == 2 and "needs --ptdump OUT" in err


def test_export_to_stdout(capsys):
    code, out, _ = run(capsys, "export", "--buddyinfo", "-", "--guest-memory", "1GiB")
    assert code == 0 and out.startswith("Node 0, zone      DMA ")
    code, out, _ = run(
        capsys,
        *(
            "export",
            "--ptdump",
            "-",
            "--guest-memory",
            "1GiB",
            "--page-offset",
            "0xff11000000000000",
        ),
    )
    assert code == 0 and out.splitlines()[1].startswith("0xff11000000000000-")
    assert np.all([line.endswith(("pte", "pmd", "pud", "---")) for line in out.splitlines()])
