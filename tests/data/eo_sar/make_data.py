"""Generate the eo-sar plugin's test data (nothing binary is checked in).

Run ``python tests/data/eo_sar/make_data.py OUT_DIR`` to write a good data root under
``OUT_DIR/good`` and one broken root per bad-input case under ``OUT_DIR/bad_*``; the tests import
the functions below from pytest fixtures and write into tmp_path.

The good root (``write_dataset``) holds co-registered S2 / S1 / land-cover patches rendered by the
plugin's synthetic generator: 64 px patches in EPSG:32632 and 48 px patches in EPSG:32633, a
swath-edge nodata corner (0) in every other S2 patch, S1 nodata nan in one zone and -9999 in the
other with nodata rows, scattered land-cover nodata (255).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_NODATA  # noqa: E402
from plugins.eo_sar.synthetic import BIOMES, S1_NODATA, utm_transform, write_geotiff, write_patch  # noqa: E402

GRIDS = (("EPSG:32632", 64, (500_000.0, 5_000_000.0)), ("EPSG:32633", 48, (400_000.0, 4_900_000.0)))


def write_dataset(root: str | Path, *, n_patches: int = 6, seed: int = 0, modalities=("s2", "s1")) -> Path:
    """A good data root with ``n_patches`` patches alternating between the two grids."""
    root = Path(root)
    biomes = list(BIOMES.values())
    for i in range(n_patches):
        crs, size, (x0, y0) = GRIDS[i % 2]
        rng = np.random.default_rng([seed, i])
        write_patch(root, f"p{i:02d}", rng, crs=crs, size=size, origin=(x0 + 1000 * i, y0 - 1000 * i),
                    abundance=biomes[i % len(biomes)], s2_edge=bool(i % 2),
                    s1_nodata=float("nan") if i % 2 == 0 else S1_NODATA, s1_edge=True, modalities=modalities)
    return root


def write_raster(path: str | Path, array: np.ndarray, *, nodata=None, crs: str = "EPSG:32632",
                 origin: tuple[float, float] = (500_000.0, 5_000_000.0)) -> Path:
    """Any [C, H, W] array as a 10 m GeoTIFF (a land-cover map, a wrong-band-count image...)."""
    write_geotiff(Path(path), np.asarray(array), crs=crs, transform=utm_transform(*origin), nodata=nodata)
    return Path(path)


def hand_landcover() -> tuple[np.ndarray, dict[str, int]]:
    """A 10 x 10 land-cover map whose class counts are written out by hand.

    100 pixels: 2 nodata (255), 60 water, 30 trees, 5 crops, 2 built, 1 bare -> 98 valid pixels.
    Fractions: water 60/98, trees 30/98, crops 5/98, built 2/98 (0.0204), bare 1/98 (0.0102).
    """
    lc = np.full((10, 10), CLASS_NAMES.index("water"), dtype=np.uint8)  # rows 0-5: 60 water
    lc[6:9, :] = CLASS_NAMES.index("trees")  # rows 6-8: 30 trees
    lc[9, 0:5] = CLASS_NAMES.index("crops")  # 5 crops
    lc[9, 5:7] = CLASS_NAMES.index("built")  # 2 built
    lc[9, 7] = CLASS_NAMES.index("bare")  # 1 bare
    lc[9, 8:10] = LANDCOVER_NODATA  # 2 nodata
    return lc, {"water": 60, "trees": 30, "crops": 5, "built": 2, "bare": 1, "nodata": 2}


def write_labels_csv(root: str | Path, rows: dict[str, list[int]], *, columns=CLASS_NAMES) -> Path:
    path = Path(root) / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patch_id", *columns])
        for pid, values in rows.items():
            w.writerow([pid, *values])
    return path


def truncate(path: str | Path, fraction: float = 0.6) -> Path:
    """Cut a file to ``fraction`` of its bytes (an interrupted download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_bad_roots(out: str | Path) -> dict[str, tuple[Path, Path]]:
    """One broken data root per bad-input case: ``{case: (root, file the error must name)}``."""
    out = Path(out)
    cases: dict[str, tuple[Path, Path]] = {}

    root = out / "bad_missing"
    cases["missing_folder"] = (root, root)
    root = out / "bad_empty"
    root.mkdir(parents=True, exist_ok=True)
    cases["empty_folder"] = (root, root)
    root = write_dataset(out / "bad_only_s1", n_patches=1, modalities=("s1",))
    cases["no_modality_folder"] = (root, root)
    root = out / "bad_no_tifs"
    (root / "s2").mkdir(parents=True, exist_ok=True)
    (root / "s2" / "README.txt").write_text("patches go here\n")
    cases["no_geotiffs"] = (root, root / "s2")

    root = write_dataset(out / "bad_band_count", n_patches=2, modalities=("s2",))
    bad = write_raster(root / "s2" / "p99.tif", np.ones((4, 16, 16), np.uint16), nodata=0)  # RGBN, not 13 bands
    cases["wrong_band_count"] = (root, bad)

    # GDAL puts the directory first in a plain write: the header opens, the pixel blocks are gone
    root = write_dataset(out / "bad_truncated", n_patches=2, modalities=("s2",))
    image = np.random.default_rng(0).integers(1, 5000, (13, 40, 40)).astype(np.uint16)
    cases["truncated"] = (root, truncate(write_raster(root / "s2" / "p05.tif", image, nodata=0), 0.7))
    # after setting band descriptions GDAL rewrites the directory at the end: the header is gone
    root = write_dataset(out / "bad_truncated_header", n_patches=2, modalities=("s2",))
    cases["truncated_header"] = (root, truncate(root / "s2" / "p01.tif"))

    root = write_dataset(out / "bad_not_tiff", n_patches=2, modalities=("s2",))
    bad = root / "s2" / "p02.tif"
    bad.write_bytes(b"<html>403 Forbidden</html>\n")  # what a failed download often saves
    cases["unreadable"] = (root, bad)

    root = write_dataset(out / "bad_csv_id", n_patches=2, modalities=("s2",))
    cases["labels_unknown_patch"] = (root, write_labels_csv(root, {"p00": [1] + [0] * 8, "p77": [0, 1] + [0] * 7}))

    root = write_dataset(out / "bad_csv_column", n_patches=2, modalities=("s2",))
    columns = [c if c != "trees" else "forest" for c in CLASS_NAMES]
    cases["labels_unknown_column"] = (root, write_labels_csv(root, {"p00": [1] + [0] * 8}, columns=columns))

    root = write_dataset(out / "bad_csv_missing_column", n_patches=2, modalities=("s2",))
    cases["labels_missing_column"] = (root, write_labels_csv(root, {"p00": [1] * 8}, columns=CLASS_NAMES[:-1]))

    root = write_dataset(out / "bad_csv_value", n_patches=2, modalities=("s2",))
    cases["labels_bad_value"] = (root, write_labels_csv(root, {"p00": [1, 0, 0, 0.5, 0, 0, 0, 0, 0]}))

    root = write_dataset(out / "bad_landcover", n_patches=2, modalities=("s2",))
    bad = write_raster(root / "landcover" / "p01.tif", np.zeros((3, 48, 48), np.uint8), nodata=255)
    cases["landcover_band_count"] = (root, bad)
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/eo_sar/make_data.py OUT_DIR")
    target = Path(sys.argv[1])
    print(write_dataset(target / "good"))
    for case, (root, named) in write_bad_roots(target).items():
        print(f"{case}: {root} (error names {named})")
