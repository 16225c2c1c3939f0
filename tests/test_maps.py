"""`compare --map DIR` (hv_netvsc_sim.maps): one PNG per strategy and one side by side, drawn
from the memory map each strategy's compare result carries, in the page's colours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from hv_netvsc_sim.cli import main
from hv_netvsc_sim.maps import COLS, SIDE_BY_SIDE, map_image, overview_rgb
from pool.memmap import decode, palette

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--guest-memory", "1GiB", "--cycles", "1", "--age-steps", "5000", "--quiet"]


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("maps")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hv_netvsc_sim",
            "compare",
            *SMALL,
            "--strategies",
            "pool,vmalloc-alias,vmalloc-directmap",
            "--json",
            "--map",
            str(out / "maps"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out / "maps", json.loads(done.stdout)


def test_one_png_per_strategy_and_one_side_by_side(run: tuple[Path, dict]) -> None:
    maps, doc = run
    names = ["pool", "vmalloc-alias", "vmalloc-directmap"]
    assert sorted(p.name for p in maps.iterdir()) == sorted(
        [*(f"map-{n}.png" for n in names), SIDE_BY_SIDE]
    )
    side = image.imread(maps / SIDE_BY_SIDE)
    single = image.imread(maps / "map-pool.png")
    assert side.shape[1] > single.shape[1]  # three maps across
    hazard = _rgb(palette()["colours"]["hazard"]["present"])
    for name in names:
        png = image.imread(maps / f"map-{name}.png")[..., :3]
        has_hazard_pixels = bool(np.any(np.all(np.abs(png - hazard) < 0.02, axis=-1)))
        hazard_regions = doc["strategies"][name]["memory_map"]["totals"]["hazard"]["present"]
        # the legend shows a hazard swatch on every map; beyond it, only vmalloc-alias
        assert has_hazard_pixels
        assert (hazard_regions > 0) == (name == "vmalloc-alias")


def test_the_image_is_the_map_in_the_pages_colours(run: tuple[Path, dict]) -> None:
    _, doc = run
    pal = palette()
    for name, result in doc["strategies"].items():
        mm = result["memory_map"]
        codes = decode(mm)
        img = map_image(mm)
        assert img.shape == (-(-mm["regions"] // COLS), COLS, 3)
        flat = img.reshape(-1, 3)[: mm["regions"]]
        assert np.array_equal(flat, overview_rgb(mm))
        for r in range(mm["regions"]):  # the overview rule: hazard, else pool, else leaf
            code = int(codes[r])

            def value(field: str, code: int = code, fields: dict = mm["fields"]) -> str:
                spec = fields[field]
                out: str = spec["values"][(code >> spec["shift"]) & ((1 << spec["bits"]) - 1)]
                return out

            if value("hazard") != "none":
                want = pal["colours"]["hazard"][value("hazard")]
            elif value("pool") != "none":
                want = pal["colours"]["pool"][value("pool")]
            else:
                want = pal["colours"]["leaf"][value("leaf")]
            assert np.allclose(flat[r], _rgb(want)), (name, r)
    pool_map = doc["strategies"]["pool"]["memory_map"]
    assert pool_map["totals"]["pool"]["none"] < pool_map["regions"]  # its chunks are drawn
    split = doc["strategies"]["vmalloc-directmap"]["memory_map"]["totals"]["leaf"]["4k"]
    assert split > pool_map["totals"]["leaf"]["4k"]  # the shattered direct map shows


def test_map_option_refuses_a_file_before_running(tmp_path: Path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["compare", *SMALL, "--map", str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--map" in err and "is not a directory" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["compare", *SMALL, "--map", ""])
    assert exc.value.code == 2 and "--map needs a directory" in capsys.readouterr().err
