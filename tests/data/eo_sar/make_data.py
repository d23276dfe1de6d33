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

from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_NODATA, S1_BANDS, S2_L1C_BANDS  # noqa: E402
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


def set_band_scaling(path: str | Path, *, scales=None, offsets=None, units=None) -> Path:
    """Declare per-band GDAL scale / offset / units on an existing GeoTIFF (as ESA-derived exports
    and GDAL's Sentinel-2 driver do since baseline 04.00)."""
    import rasterio

    with rasterio.open(path, "r+") as dst:
        if scales is not None:
            dst.scales = tuple(scales)
        if offsets is not None:
            dst.offsets = tuple(offsets)
        if units is not None:
            dst.units = tuple(units)
    return Path(path)


def write_s2_encodings(root: str | Path, *, seed: int = 3, size: int = 40) -> dict[str, Path]:
    """One Sentinel-2 L1C scene written in every encoding found in the wild, under ``ROOT/s2``:

    - ``old``: processing baseline 03.01, reflectance x 10000, uint16, nodata 0;
    - ``pb04_offset``: baseline 04.00, DN + 1000, band offsets -1000 declared (GDAL's S2 driver);
    - ``pb04_tag``: baseline 04.00, DN + 1000, only a ``BOA_ADD_OFFSET=-1000`` tag;
    - ``pb04_baseline``: baseline 04.00 in the tags, DN + 1000, nothing else declared;
    - ``pb04_reflectance``: DN + 1000 with scale 1e-4 and offset -0.1 (reflectance units, as
      ESA's own JP2 metadata reads);
    - ``reordered``: the old encoding with B8A stored last, the band descriptions saying so.

    The swath-edge corner is nodata (0) in every file. Returns ``{name: path}``; the reflectance
    x 10000 every file must read back as is ``s2_scene(seed, size)``.
    """
    root = Path(root)
    dn = s2_scene(seed, size)
    tf = utm_transform(600_000.0, 5_100_000.0)
    crs = "EPSG:32631"
    shifted = np.where(dn > 0, dn + 1000, 0).astype(np.uint16)
    paths = {}
    paths["old"] = write_raster_tagged(root / "s2" / "old.tif", dn, crs, tf, S2_L1C_BANDS,
                                       {"PROCESSING_BASELINE": "03.01", "PRODUCT_TYPE": "S2MSI1C"})
    paths["pb04_offset"] = set_band_scaling(
        write_raster_tagged(root / "s2" / "pb04_offset.tif", shifted, crs, tf, S2_L1C_BANDS,
                            {"PROCESSING_BASELINE": "04.00", "PRODUCT_TYPE": "S2MSI1C"}), offsets=[-1000.0] * 13)
    paths["pb04_tag"] = write_raster_tagged(root / "s2" / "pb04_tag.tif", shifted, crs, tf, S2_L1C_BANDS,
                                            {"BOA_ADD_OFFSET": "-1000"})
    paths["pb04_baseline"] = write_raster_tagged(root / "s2" / "pb04_baseline.tif", shifted, crs, tf, S2_L1C_BANDS,
                                                 {"PROCESSING_BASELINE": "N0509"})
    paths["pb04_reflectance"] = set_band_scaling(
        write_raster_tagged(root / "s2" / "pb04_reflectance.tif", shifted, crs, tf, S2_L1C_BANDS, {}),
        scales=[1e-4] * 13, offsets=[-0.1] * 13)
    order = [b for b in S2_L1C_BANDS if b != "B8A"] + ["B8A"]
    perm = [S2_L1C_BANDS.index(b) for b in order]
    paths["reordered"] = write_raster_tagged(root / "s2" / "reordered.tif", dn[perm], crs, tf, order,
                                             {"PROCESSING_BASELINE": "03.01"})
    return paths


def s2_scene(seed: int = 3, size: int = 40) -> np.ndarray:
    """uint16 [13, size, size] reflectance x 10000 with a nodata (0) corner; every valid DN >= 1."""
    rng = np.random.default_rng(seed)
    dn = rng.integers(1, 6000, (13, size, size)).astype(np.uint16)
    dn[:, : size // 5, : size // 5] = 0  # outside the swath
    return dn


def write_raster_tagged(path: Path, array: np.ndarray, crs: str, transform, descriptions, tags, *, nodata=0) -> Path:
    write_geotiff(Path(path), np.asarray(array), crs=crs, transform=transform, nodata=nodata,
                  descriptions=descriptions, tags=tags or None)
    return Path(path)


def write_s1_linear(path: str | Path, *, seed: int = 4, size: int = 32, declared: bool = False) -> tuple[Path, np.ndarray]:
    """A Sentinel-1 patch in linear power (sigma0 in 0..1), float32, nodata nan; ``declared`` adds
    ``UNITS=linear`` as the tag. Returns the path and the linear values."""
    rng = np.random.default_rng(seed)
    linear = rng.uniform(0.001, 0.5, (2, size, size)).astype(np.float32)
    linear[:, :2, :] = np.nan
    tags = {"UNITS": "linear"} if declared else {"SENSOR": "Sentinel-1 GRD IW"}
    write_geotiff(Path(path), linear, crs="EPSG:32631", transform=utm_transform(600_000.0, 5_100_000.0),
                  nodata=float("nan"), descriptions=S1_BANDS, tags=tags)
    return Path(path), linear


SCENE_ORIGIN = (500_000.0, 5_000_000.0)
SCENE_NODATA_BOX = (120, 100)  # rows, cols of the top-left nodata (0) corner of write_scene


def write_scene(path: str | Path, *, height: int = 300, width: int = 260, seed: int = 5, crs: str = "EPSG:32632",
                origin: tuple[float, float] = SCENE_ORIGIN, nodata_box: tuple[int, int] | None = SCENE_NODATA_BOX,
                tiled: bool = False, block: int = 256) -> Path:
    """A whole Sentinel-2 L1C "scene": 13 x ``height`` x ``width`` uint16 (reflectance x 10000) on a
    10 m UTM grid at ``origin`` (west, north), bands named B1..B12/B8A in the band descriptions, a
    smooth field plus noise per band, and a swath-edge nodata corner (0, the file's nodata) of
    ``nodata_box`` rows x cols at the top left. ``tiled`` writes it tile by tile (benchmark sizes)."""
    import rasterio
    from rasterio.windows import Window

    from plugins.eo_sar.synthetic import utm_transform

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gains = rng.uniform(0.5, 1.5, size=len(S2_L1C_BANDS)).astype(np.float32)
    fx, fy = rng.uniform(0.005, 0.03, size=2)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": len(S2_L1C_BANDS), "dtype": "uint16",
               "crs": crs, "transform": utm_transform(*origin), "nodata": 0, "compress": "deflate"}
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    tmp = path.with_name(path.name + ".tmp")
    step = block if tiled else height
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = tuple(S2_L1C_BANDS)
        for y0 in range(0, height, step):
            h = min(step, height - y0)
            yy, xx = np.mgrid[y0:y0 + h, 0:width].astype(np.float32)
            field = 1500 + 800 * np.sin(fx * xx) * np.cos(fy * yy)
            noise = rng.normal(0, 60, size=(len(S2_L1C_BANDS), h, width)).astype(np.float32)
            data = np.clip(field[None] * gains[:, None, None] + noise, 1, 10000).astype(np.uint16)
            if nodata_box is not None and y0 < nodata_box[0]:
                data[:, : nodata_box[0] - y0, : nodata_box[1]] = 0
            dst.write(data, window=Window(0, y0, width, h))
    tmp.replace(path)
    return path


def write_s1_scene(path: str | Path, *, height: int = 120, width: int = 100, seed: int = 6) -> Path:
    """A Sentinel-1 scene (VV, VH in dB, float32, named in the band descriptions)."""
    rng = np.random.default_rng(seed)
    data = np.stack([rng.normal(-12, 2, (height, width)), rng.normal(-19, 2, (height, width))]).astype(np.float32)
    write_geotiff(Path(path), data, crs="EPSG:32632", transform=utm_transform(*SCENE_ORIGIN), nodata=float("nan"),
                  descriptions=S1_BANDS)
    return Path(path)


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

    root = write_dataset(out / "bad_duplicate_band", n_patches=2, modalities=("s2",))
    names = list(S2_L1C_BANDS)
    names[9] = "B08"  # B9's slot says B8 again
    bad = write_raster_tagged(root / "s2" / "p01.tif", s2_scene(5, 48), "EPSG:32633", utm_transform(400_000.0, 4_900_000.0),
                              names, {})
    cases["duplicate_band_name"] = (root, bad)
    root = write_dataset(out / "bad_unknown_band", n_patches=2, modalities=("s2",))
    names = list(S2_L1C_BANDS)
    names[10] = "cirrus"
    bad = write_raster_tagged(root / "s2" / "p01.tif", s2_scene(5, 48), "EPSG:32633", utm_transform(400_000.0, 4_900_000.0),
                              names, {})
    cases["unknown_band_name"] = (root, bad)
    root = write_dataset(out / "bad_s1_linear", n_patches=2, modalities=("s1",))
    cases["s1_linear"] = (root, write_s1_linear(root / "s1" / "p01.tif")[0])
    root = write_dataset(out / "bad_harmonize_on", n_patches=2, modalities=("s2",))
    bad = write_raster_tagged(root / "s2" / "p01.tif", s2_scene(5, 48), "EPSG:32633", utm_transform(400_000.0, 4_900_000.0),
                              S2_L1C_BANDS, {"PROCESSING_BASELINE": "03.01"})
    cases["harmonize_on_contradicted"] = (root, bad)
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/eo_sar/make_data.py OUT_DIR")
    target = Path(sys.argv[1])
    print(write_dataset(target / "good"))
    for name, path in write_s2_encodings(target / "encodings").items():
        print(f"encoding {name}: {path}")
    for case, (root, named) in write_bad_roots(target).items():
        print(f"{case}: {root} (error names {named})")
