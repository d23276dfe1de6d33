"""Generate a small EuroSAT (all bands) folder laid out as the real archive (and torchgeo's
``EuroSAT``).

Real layout (Helber et al. 2019, https://github.com/phelber/EuroSAT; splits of Neumann et al.
2019, arXiv:1911.06721, as torchgeo ``EuroSAT`` reads them)::

    ROOT/eurosat-train.txt, eurosat-val.txt, eurosat-test.txt    one "AnnualCrop_12.jpg" per line
    ROOT/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif

Each image: 64 x 64 px, 13 bands uint16 L1C, stored B01..B12 then B8A LAST (torchgeo's
``EuroSAT.all_band_names``), no band descriptions, no nodata tag, in the UTM zone of the place.

Usage: ``python tests/data/eurosat/make_data.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plugins.eo_sar.synthetic import landcover_map, s2_from_landcover, utm_transform, write_geotiff  # noqa: E402

BASE_DIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")
# class folder -> Dynamic World abundance (water, trees, grass, flooded, crops, shrub, built, bare, snow)
CLASSES = {
    "AnnualCrop": [0, 0, 0.1, 0, 0.9, 0, 0, 0, 0],
    "Forest": [0, 0.95, 0.05, 0, 0, 0, 0, 0, 0],
    "HerbaceousVegetation": [0, 0.1, 0.6, 0, 0, 0.3, 0, 0, 0],
    "Highway": [0, 0, 0.4, 0, 0.2, 0, 0.4, 0, 0],
    "Industrial": [0, 0, 0, 0, 0, 0, 0.8, 0.2, 0],
    "Pasture": [0, 0.05, 0.95, 0, 0, 0, 0, 0, 0],
    "PermanentCrop": [0, 0.3, 0.2, 0, 0.5, 0, 0, 0, 0],
    "Residential": [0, 0.15, 0.15, 0, 0, 0, 0.7, 0, 0],
    "River": [0.4, 0.3, 0.3, 0, 0, 0, 0, 0, 0],
    "SeaLake": [1.0, 0, 0, 0, 0, 0, 0, 0, 0],
}
ZONES = ("EPSG:32631", "EPSG:32632", "EPSG:32633", "EPSG:32634", "EPSG:32635")
SPLITS = {"train": 4, "val": 1, "test": 2}  # images per class
SIZE = 64
# torchgeo EuroSAT.all_band_names: B8A stored last
FILE_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
L1C_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def write_dataset(root: str | Path, *, seed: int = 0, splits: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Write the archive; returns {split: [file names as listed in the split file]}."""
    root = Path(root)
    lists: dict[str, list[str]] = {}
    perm = [L1C_ORDER.index(b) for b in FILE_ORDER]
    for c, (name, abundance) in enumerate(CLASSES.items()):
        n = 1
        for split, count in (splits or SPLITS).items():
            for _ in range(count):
                rng = np.random.default_rng([seed, c, n])
                lc = landcover_map(rng, SIZE, np.asarray(abundance, float), nodata_fraction=0.0)
                image = s2_from_landcover(rng, lc)[perm]
                origin = (float(rng.integers(300, 700)) * 1000, float(rng.integers(4800, 5900)) * 1000)
                write_geotiff(root / BASE_DIR / name / f"{name}_{n}.tif", image, crs=ZONES[(c + n) % len(ZONES)],
                              transform=utm_transform(*origin), nodata=None)
                lists.setdefault(split, []).append(f"{name}_{n}.jpg")
                n += 1
    for split, names in lists.items():
        (root / f"eurosat-{split}.txt").write_text("".join(f"{x}\n" for x in names))
    return lists


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/eurosat/make_data.py OUT_DIR")
    write_dataset(Path(sys.argv[1]) / "eurosat")
    print(Path(sys.argv[1]) / "eurosat")
