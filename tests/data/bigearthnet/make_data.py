"""Generate a small BigEarthNet (v1.0) folder laid out as the real archive (and torchgeo's
``BigEarthNet``).

Real layout (Sumbul et al. 2019, https://bigearth.net; BigEarthNet-MM splits of the TU Berlin
19-class models; torchgeo ``BigEarthNet``)::

    ROOT/bigearthnet-train.csv, bigearthnet-val.csv, bigearthnet-test.csv   "<S2 patch>,<S1 patch>" per line
    ROOT/BigEarthNet-v1.0/S2A_MSIL2A_20170613T101031_0_45/
        S2A_MSIL2A_20170613T101031_0_45_B01.tif ... _B12.tif (12 bands, B8A, no B10)   uint16 L2A
        S2A_MSIL2A_20170613T101031_0_45_labels_metadata.json                             43-class labels
    ROOT/BigEarthNet-S1-v1.0/S1A_IW_GRDH_1SDV_20170613T165043_33UUP_70_48/
        ..._VV.tif, ..._VH.tif (float32 dB), ..._labels_metadata.json

S2 bands at native resolution: 120 px (10 m: B02 B03 B04 B08), 60 px (20 m), 20 px (60 m: B01
B09); UTM CRS of the tile. Labels are CORINE 2018 level-3 names (43 classes), mapped to the
19-class nomenclature by torchgeo's ``BigEarthNet.label_converter``.

Usage: ``python tests/data/bigearthnet/make_data.py OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plugins.eo_sar.synthetic import landcover_map, s1_from_landcover, s2_from_landcover, utm_transform, write_geotiff  # noqa: E402

S2_FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
L1C_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
GSD = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
       "B09": 60, "B11": 20, "B12": 20}
# One CORINE level-3 name per 19-class index (torchgeo's class_sets[19] order), and the Dynamic
# World class (plugins.eo_sar.bands.CLASS_NAMES index) whose spectrum renders it.
CLASSES_19 = (
    ("Continuous urban fabric", 6), ("Industrial or commercial units", 6), ("Non-irrigated arable land", 4),
    ("Vineyards", 4), ("Pastures", 2), ("Complex cultivation patterns", 4),
    ("Land principally occupied by agriculture, with significant areas of natural vegetation", 2),
    ("Agro-forestry areas", 1), ("Broad-leaved forest", 1), ("Coniferous forest", 1), ("Mixed forest", 1),
    ("Natural grassland", 2), ("Moors and heathland", 5), ("Transitional woodland/shrub", 5),
    ("Beaches, dunes, sands", 7), ("Inland marshes", 3), ("Salt marshes", 3), ("Water bodies", 0),
    ("Sea and ocean", 0),
)
# landscapes as sets of 19-class indices
LANDSCAPES = ((2, 4, 8, 17), (9, 10, 13), (0, 1, 2), (14, 18, 16), (5, 6, 11, 12), (3, 7, 8, 15))
TILES = (("S2A_MSIL2A_20170613T101031", "33UUP", "EPSG:32633", "S1A_IW_GRDH_1SDV_20170613T165043"),
         ("S2B_MSIL2A_20180502T093039", "34VFM", "EPSG:32634", "S1B_IW_GRDH_1SDV_20180502T160425"),
         ("S2A_MSIL2A_20171221T112501", "29SND", "EPSG:32629", "S1A_IW_GRDH_1SDV_20171221T183021"))
SPLITS = {"train": 10, "val": 3, "test": 5}
SIZE = 120


def _down(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) if factor > 1 else image


def render_patch(rng: np.random.Generator, classes: tuple[int, ...], size: int = SIZE):
    """A map of 19-class ids and the S2 L1C-like [13, H, W] and S1 [2, H, W] images rendered from it."""
    abundance = np.zeros(19)
    abundance[list(classes)] = rng.uniform(0.5, 1.5, len(classes))
    cls19 = landcover_map(rng, size, abundance, nodata_fraction=0.0)
    dw = np.array([CLASSES_19[c][1] for c in range(19)], dtype=np.uint8)[cls19]
    return cls19, s2_from_landcover(rng, dw), s1_from_landcover(rng, dw)


def _projection_wkt(crs: str) -> str:
    from rasterio.crs import CRS

    return CRS.from_string(crs).to_wkt()


def write_dataset(root: str | Path, *, seed: int = 0, splits: dict[str, int] | None = None) -> dict[str, list[tuple[str, str, list[str]]]]:
    """Write the archive; returns {split: [(s2 name, s1 name, 43-class label names)]}."""
    root = Path(root)
    out: dict[str, list] = {}
    k = 0
    for split, n in (splits or SPLITS).items():
        rows = []
        for _ in range(n):
            rng = np.random.default_rng([seed, k])
            s2_product, tile, crs, s1_scene = TILES[k % len(TILES)]
            row, col = 10 + k, 40 + 2 * k
            s2_name, s1_name = f"{s2_product}_{row}_{col}", f"{s1_scene}_{tile}_{row + 50}_{col - 10}"
            cls19, s2, s1 = render_patch(rng, LANDSCAPES[k % len(LANDSCAPES)])
            present = sorted(set(np.unique(cls19).tolist()))
            labels = [CLASSES_19[c][0] for c in present]
            west, north = 300_000.0 + 1200 * col, 5_600_000.0 - 1200 * row
            coords = {"ulx": west, "uly": north, "lrx": west + 1200, "lry": north - 1200}
            folder = root / "BigEarthNet-v1.0" / s2_name
            l2a = np.clip(s2.astype(np.float64) * 0.92 - 80, 1, 10000)  # L2A: surface reflectance
            for b in S2_FILE_BANDS:
                band = np.rint(_down(l2a[L1C_ORDER.index(b)], GSD[b] // 10)).astype(np.uint16)[None]
                write_geotiff(folder / f"{s2_name}_{b}.tif", band, crs=crs, transform=utm_transform(west, north, float(GSD[b])),
                              nodata=None)
            meta = {"labels": labels, "coordinates": coords, "projection": _projection_wkt(crs),
                    "tile_source": f"{s2_product.replace('MSIL2A', 'MSIL1C')}_N0205_R022_T{tile}_{s2_product[-15:]}",
                    "acquisition_date": f"{s2_product[11:15]}-{s2_product[15:17]}-{s2_product[17:19]} "
                                        f"{s2_product[20:22]}:{s2_product[22:24]}:{s2_product[24:26]}"}
            (folder / f"{s2_name}_labels_metadata.json").write_text(json.dumps(meta))
            s1_folder = root / "BigEarthNet-S1-v1.0" / s1_name
            for i, pol in enumerate(("VV", "VH")):
                write_geotiff(s1_folder / f"{s1_name}_{pol}.tif", s1[i:i + 1], crs=crs,
                              transform=utm_transform(west, north), nodata=None)
            s1_meta = {"labels": labels, "coordinates": coords, "projection": _projection_wkt(crs),
                       "corresponding_s2_patch": s2_name, "scene_source": f"{s1_scene}_0{16000 + k}_01A2B3_4C5D",
                       "acquisition_time": meta["acquisition_date"]}
            (s1_folder / f"{s1_name}_labels_metadata.json").write_text(json.dumps(s1_meta))
            rows.append((s2_name, s1_name, labels))
            k += 1
        (root / f"bigearthnet-{split}.csv").write_text("".join(f"{a},{b}\n" for a, b, _ in rows))
        out[split] = rows
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/bigearthnet/make_data.py OUT_DIR")
    print(write_dataset(Path(sys.argv[1]) / "bigearthnet") and Path(sys.argv[1]) / "bigearthnet")
