"""Tiling throughput: `histo tile` + reading every tile through the plugin, against a bare
OpenSlide ``read_region`` loop over the same coordinates and level (target: ratio >= 0.9).

The plugin's time includes finding the tissue on the thumbnail, writing the coords HDF5 and the
thumbnail PNG, and resizing each region to the tile size; the bare loop only reads regions.
Both run side by side in this process, alternating, best of ``--repeats``.

    python benchmarks/histo_tiling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_slide(directory: Path, reps: int = 6) -> Path:
    """An Aperio-like SVS of ``reps`` x ``reps`` copies of the test tissue (12288 x 9216 px at
    0.25 µm/px for reps=6): written tile by tile, so memory stays that of one copy."""
    import numpy as np
    import tifffile

    spec = importlib.util.spec_from_file_location("histo_make_data", REPO / "tests" / "data" / "histo" / "make_data.py")
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    base = md.tissue_image(2048, 1536, seed=0)
    tile = 256
    width, height = 2048 * reps, 1536 * reps
    path = directory / "bench_40x.svs"
    desc = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
            f"JPEG/RGB Q=90|AppMag = 40|MPP = 0.25")

    def tiles(img, nx, ny):
        th, tw = img.shape[0] // tile, img.shape[1] // tile
        for ty in range(ny):
            for tx in range(nx):
                yield img[(ty % th) * tile:(ty % th + 1) * tile, (tx % tw) * tile:(tx % tw + 1) * tile]

    with tifffile.TiffWriter(path) as tif:
        tif.write(tiles(base, width // tile, height // tile), shape=(height, width, 3), dtype=np.uint8,
                  tile=(tile, tile), compression="jpeg", photometric="rgb", description=desc, metadata=None)
        for factor in (4, 16):
            level = np.tile(md._downsample(base, factor), (reps, reps, 1))
            tif.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb", metadata=None,
                      description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {level.shape[1]}x{level.shape[0]}")
    return path


def plugin_pass(path: Path, out: Path, mpp: float, tile_size: int) -> int:
    from plugins.histo import tiling as T
    from plugins.histo.datasets import SlideTileDataset

    ts = T.tile_slide(path, mpp=mpp, tile_size=tile_size)
    T.write_coords(ts, out)
    T.write_thumbnail(ts, out)
    ds = SlideTileDataset(path, ts.coords, ts.geometry)
    for i in range(len(ds)):
        ds[i]
    return len(ds)


def bare_pass(path: Path, coords, level: int, read_size: int) -> int:
    import openslide

    slide = openslide.OpenSlide(str(path))
    for x, y in coords:
        slide.read_region((int(x), int(y)), level, (read_size, read_size))
    slide.close()
    return len(coords)


def run(path: Path, tmp: Path, mpp: float, tile_size: int, repeats: int) -> None:
    from plugins.histo import tiling as T

    ts = T.tile_slide(path, mpp=mpp, tile_size=tile_size)
    g = ts.geometry
    best_plugin = best_bare = best_fixed = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n = plugin_pass(path, tmp / "out", mpp, tile_size)
        best_plugin = min(best_plugin, time.perf_counter() - t)
        t = time.perf_counter()
        bare_pass(path, ts.coords, g.level, g.read_size)
        best_bare = min(best_bare, time.perf_counter() - t)
        t = time.perf_counter()
        T.write_thumbnail(T.tile_slide(path, mpp=mpp, tile_size=tile_size), tmp / "out")
        best_fixed = min(best_fixed, time.perf_counter() - t)
    per_tile = best_bare / max(best_plugin - best_fixed, 1e-9)
    print(f"{n} tissue tiles of {tile_size} px at {mpp} µm/px (read {g.read_size} px at level {g.level})")
    print(f"  histo tile + read : {n / best_plugin:8.1f} tiles/s")
    print(f"  bare read_region  : {n / best_bare:8.1f} tiles/s")
    print(f"  ratio             : {best_bare / best_plugin:8.3f}  (target >= 0.9)")
    print(f"  per-slide fixed cost (thumbnail, tissue mask, PNG): {best_fixed * 1000:.0f} ms; "
          f"per-tile ratio without it: {per_tile:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make_slide(tmp)
        print("slide 12288 x 9216 px at 0.25 µm/px (Aperio-like SVS, JPEG tiles, levels 1/4/16)")
        for mpp, size in ((0.5, 224), (0.25, 224)):
            run(path, tmp, mpp, size, args.repeats)


if __name__ == "__main__":
    main()
