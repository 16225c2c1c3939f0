"""`compare --map DIR`: the memory map of each strategy's guest at the end of the run, as
PNGs: one per strategy (map-<strategy>.png) and all strategies side by side (maps.png).

Every strategy ran on a copy of the same aged guest, so the pictures differ only by what
the strategy did to it: where `vmalloc-directmap` shattered 2 MiB leaves into 4 KiB ones,
where `vmalloc-alias` left private aliases of shared pages (hazard regions), where the
pool's chunks sit. Drawn from each strategy's `memory_map` in the compare document
(pool.memmap's JSON form), with the colours, labels and overview rule of the daemon's page
(pool/memmap_palette.json, pool.memmap.palette): one cell per 2 MiB region, 128 cells
(256 MiB) per row, 4 rows per GiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pool.memmap import decode, palette

COLS = 128  # as on the page (daemon/static/ui.js)
SIDE_BY_SIDE = "maps.png"


def check_map_dir(path: str) -> Path:
    """The directory --map writes into (created if missing); ValueError, one line, when it
    cannot be one. Checked before the run, so a long compare never ends in this error."""
    if not path:
        raise ValueError("--map needs a directory")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--map {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--map {path}: {exc.strerror or exc}") from None
    return out


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def overview_rgb(doc: Mapping[str, Any]) -> npt.NDArray[np.float64]:
    """Each region's overview colour (RGB in [0, 1]): the colour of the first field of the
    palette's `overview` list whose value is not "none" (the last field always counts), the
    rule the page's CSS follows."""
    codes = decode(dict(doc)).astype(np.int64)
    pal = palette()
    order: list[str] = pal["overview"]
    out = np.zeros((len(codes), 3))
    decided = np.zeros(len(codes), dtype=np.bool_)
    for k, name in enumerate(order):
        spec = doc["fields"][name]
        values = (codes >> spec["shift"]) & ((1 << spec["bits"]) - 1)
        table = np.array([_rgb(pal["colours"][name][v]) for v in spec["values"]])
        last = k == len(order) - 1
        take = ~decided & ((values != 0) | last)
        out[take] = table[values[take]]
        decided |= take
    return out


def map_image(doc: Mapping[str, Any]) -> npt.NDArray[np.float64]:
    """The grid as an image: rows x COLS x RGB, the cells after the last region white."""
    rgb = overview_rgb(doc)
    rows = -(-len(rgb) // COLS)
    img = np.ones((rows * COLS, 3))
    img[: len(rgb)] = rgb
    return img.reshape(rows, COLS, 3)


def _caption(name: str, doc: Mapping[str, Any]) -> str:
    t = doc["totals"]
    chunks = doc["regions"] - t["pool"]["none"]
    return (
        f"{name}\n{t['leaf']['4k']} regions split to 4 KiB · {t['leaf']['1G'] // 512} GiB "
        f"in 1 GiB leaves\n{chunks} with pool chunks · {t['hazard']['present']} with hazards"
    )


def _legend_handles() -> list[Any]:
    from matplotlib.patches import Patch

    pal = palette()
    order: list[str] = pal["overview"]
    handles = []
    for k, name in enumerate(order):
        for value, colour in pal["colours"][name].items():
            if value == "none" and k != len(order) - 1:
                continue
            handles.append(
                Patch(facecolor=colour, edgecolor="#999", label=pal["labels"][name][value])
            )
    return handles


def _draw(ax: Any, name: str, doc: Mapping[str, Any], labels: bool) -> None:
    img = map_image(doc)
    ax.imshow(img, interpolation="nearest", aspect="equal")
    rows = img.shape[0]
    ax.set_xticks([])
    ticks = list(range(0, rows, 4 * max(1, rows // 64)))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{r // 4} GiB" for r in ticks] if labels else [], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(_caption(name, doc), fontsize=8, loc="left")


def write_maps(compare_doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Write map-<strategy>.png for each strategy of a compare document, then maps.png with
    all of them side by side. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    maps = {
        name: result["memory_map"]
        for name, result in compare_doc["strategies"].items()
        if "memory_map" in result
    }
    if not maps:
        raise ValueError("the compare document holds no memory map")
    cfg = compare_doc.get("config", {})
    where = (
        f"{cfg.get('guest_memory_bytes', 0) >> 30} GiB {cfg.get('platform', '')} guest, "
        f"seed {cfg.get('seed', '?')}, {cfg.get('cycles', '?')} cycles, "
        f"aged {cfg.get('age_steps', '?')} steps; one cell per 2 MiB"
    )
    written = []
    handles = _legend_handles()
    rows = max(-(-doc["regions"] // COLS) for doc in maps.values())
    grid_h = 6.0 * rows / COLS  # inches: a 6-inch-wide grid of square cells
    for name, doc in maps.items():
        height = grid_h + 2.1
        fig = plt.figure(figsize=(7.0, height), dpi=110)
        ax = fig.add_axes((0.09, 1.45 / height, 0.86, grid_h / height))
        _draw(ax, name, doc, labels=True)
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=6.5, frameon=False)
        fig.suptitle(where, fontsize=7.5, y=1 - 0.08 / height, va="top")
        path = out / f"map-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    n = len(maps)
    cell_w = 3.2  # inches per map
    height = cell_w * rows / COLS + 2.0
    fig = plt.figure(figsize=(cell_w * n + 0.8, height), dpi=110)
    for k, (name, doc) in enumerate(maps.items()):
        left = (0.6 + k * cell_w + 0.05) / (cell_w * n + 0.8)
        ax = fig.add_axes(
            (left, 1.2 / height, (cell_w - 0.1) / (cell_w * n + 0.8), (height - 2.0) / height)
        )
        _draw(ax, name, doc, labels=k == 0)
    fig.legend(
        handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False
    )
    fig.suptitle(where, fontsize=9, y=1 - 0.08 / height, va="top")
    path = out / SIDE_BY_SIDE
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written
