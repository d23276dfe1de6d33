"""Generate a small SSL4EO-S12 folder laid out as the real dataset (and torchgeo's ``SSL4EOS12``).

Real layout (Wang et al. 2022, https://github.com/zhu-xlab/SSL4EO-S12; torchgeo
``SSL4EOS12``): one folder per product, one folder per location (7-digit id), four seasonal
acquisitions per location, one GeoTIFF per band at the band's native resolution::

    ROOT/s2c/0000123/20200315T101021_20200315T101549_T32TQM/B1.tif ... B12.tif   L1C, 13 bands, uint16
    ROOT/s2a/0000123/<same acquisition>/B1.tif ... B12.tif (no B10)               L2A, 12 bands, uint16
    ROOT/s1/0000123/S1A_IW_GRDH_1SDV_20200314T053358_20200314T053423_031684_03A6E1_8F5A/VV.tif, VH.tif
                                                                                   float32 dB

10 m bands (B2, B3, B4, B8) are ``size`` px, 20 m bands half, 60 m bands a sixth (the real patches
are 264 px = 2.64 km; tests use smaller ones). S2 has no nodata tag (0 is ESA's fill value), S1 is
float32 dB without a tag. Location ids are not contiguous: a partial download. Land cover for the
soft loss comes as Dynamic World rasters ``LANDCOVER/<location id>.tif`` (class ids 0..8, nodata
255) or as a labels CSV (``patch_id`` = location id, one 0/1 column per class).

Usage: ``python tests/data/ssl4eo_s12/make_data.py OUT_DIR``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_NODATA, S2_L1C_BANDS, S2_L2A_BANDS  # noqa: E402
from plugins.eo_sar.synthetic import (BIOMES, landcover_map, s1_from_landcover, s2_from_landcover,  # noqa: E402
                                      utm_transform, write_geotiff)

# native GSD (m) of each S2 band
GSD = {"B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10, "B8A": 20, "B9": 60,
       "B10": 60, "B11": 20, "B12": 20}
# location ids on disk (a partial download), each with its UTM zone and tile
LOCATIONS = (("0000002", "EPSG:32632", "T32TQM"), ("0000005", "EPSG:32632", "T32TPR"),
             ("0000011", "EPSG:32633", "T33TUL"), ("0000017", "EPSG:32633", "T33TWG"),
             ("0000023", "EPSG:32631", "T31UDQ"), ("0000031", "EPSG:32631", "T31TCJ"))
SEASON_DATES = ("20200315T101021", "20200612T101031", "20200916T101029", "20201210T105431")
S1_DATES = ("20200314T053358", "20200611T053402", "20200917T053409", "20201209T053405")


def _resample_down(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean (what a coarser native band sees)."""
    if factor == 1:
        return image
    h, w = image.shape
    return image[: h // factor * factor, : w // factor * factor].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def write_location(root: Path, loc: str, crs: str, tile: str, k: int, *, size: int, seed: int,
                   landcover_dir: Path | None) -> np.ndarray:
    rng = np.random.default_rng([seed, int(loc)])
    biome = list(BIOMES.values())[k % len(BIOMES)]
    lc = landcover_map(rng, size, biome)
    origin = (300_000.0 + 20_000 * k, 5_000_000.0 + 10_000 * k)
    for s, (date, s1_date) in enumerate(zip(SEASON_DATES, S1_DATES)):
        gain = 1.0 + 0.08 * (s - 1.5)  # seasonal brightness change
        l1c = (s2_from_landcover(rng, lc).astype(np.float64) * gain).clip(1, 10000)
        if k == 0 and s == 0:
            l1c[:, : size // 6, : size // 6] = 0  # a corner outside the swath: ESA fill value 0
        acq = f"{date}_{date[:9]}{int(date[9:]) + 528:06d}_{tile}"
        for product, bands in (("s2c", S2_L1C_BANDS), ("s2a", S2_L2A_BANDS)):
            for b in bands:
                full = l1c[S2_L1C_BANDS.index(b)]
                if product == "s2a":  # surface reflectance: atmosphere removed, blue bands darker
                    full = np.where(full > 0, np.clip(full * 0.92 - (300 if b in ("B1", "B2") else 80), 1, 10000), 0)
                factor = GSD[b] // 10
                band = np.rint(_resample_down(full, factor)).astype(np.uint16)[None]
                write_geotiff(root / product / loc / acq / f"{b}.tif", band, crs=crs,
                              transform=utm_transform(*origin, pixel=float(GSD[b])), nodata=None)
        s1 = s1_from_landcover(rng, lc)
        name = f"S1A_IW_GRDH_1SDV_{s1_date}_{s1_date[:9]}{int(s1_date[9:]) + 25:06d}_0{31684 + s}_03A6E1_8F5A"
        for i, pol in enumerate(("VV", "VH")):
            write_geotiff(root / "s1" / loc / name / f"{pol}.tif", s1[i:i + 1], crs=crs,
                          transform=utm_transform(*origin), nodata=None)
    if landcover_dir is not None:
        write_geotiff(landcover_dir / f"{loc}.tif", lc[None], crs=crs, transform=utm_transform(*origin),
                      nodata=LANDCOVER_NODATA)
    return lc


def write_dataset(root: str | Path, *, size: int = 48, seed: int = 0, landcover_dir: str | Path | None = None,
                  n_locations: int = len(LOCATIONS)) -> dict[str, np.ndarray]:
    """Write ``n_locations`` locations under ``root``; returns {location id: Dynamic World map}."""
    root = Path(root)
    lc_dir = Path(landcover_dir) if landcover_dir is not None else None
    return {loc: write_location(root, loc, crs, tile, k, size=size, seed=seed, landcover_dir=lc_dir)
            for k, (loc, crs, tile) in enumerate(LOCATIONS[:n_locations])}


def write_labels_csv(path: str | Path, maps: dict[str, np.ndarray], threshold: float = 0.01,
                     extra_ids: tuple[str, ...] = ("0000999",)) -> Path:
    """Labels CSV keyed by location id; ``extra_ids`` are locations not downloaded (all zeros)."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patch_id", *CLASS_NAMES])
        for loc, lc in maps.items():
            valid = lc[lc != LANDCOVER_NODATA]
            frac = np.bincount(valid, minlength=len(CLASS_NAMES)) / max(1, valid.size)
            w.writerow([loc, *[int(f >= threshold) for f in frac]])
        for loc in extra_ids:
            w.writerow([loc, *[0] * len(CLASS_NAMES)])
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/ssl4eo_s12/make_data.py OUT_DIR")
    out = Path(sys.argv[1])
    maps = write_dataset(out / "ssl4eo", landcover_dir=out / "dynamic_world")
    write_labels_csv(out / "ssl4eo_labels.csv", maps)
    print(out / "ssl4eo")
