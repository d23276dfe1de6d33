"""Synthetic but physically plausible Sentinel-2 / Sentinel-1 / Dynamic World patches.

Used for the embedded sample (``domainfm pretrain --plugin eo-sar`` without ``--data``) and by the
test-data generator. The land-cover map comes first; the imagery is rendered from it (per-class
spectra and backscatter, sensor noise, speckle), so the classes are recoverable from the pixels and
a linear probe on decent features has something to learn.

All functions are pure given their ``numpy.random.Generator``; the writers are thin rasterio calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_NODATA, S1_BANDS, S2_BANDS

# Top-of-atmosphere reflectance x 10000 per class and band (B1..B12, B8A after B8). Rough L1C
# values: path radiance lifts the blue bands of dark targets, water is dark in the NIR, green
# vegetation has the red edge (B5->B7) and a bright B8, bare soil is brightest in SWIR, snow is
# bright in the visible and dark in SWIR, B10 (cirrus) is near zero everywhere but over snow.
S2_SPECTRA = np.array(
    [
        # B1    B2    B3    B4    B5    B6    B7    B8   B8A    B9  B10   B11   B12
        [1300, 1100, 900, 650, 550, 500, 480, 450, 420, 200, 15, 150, 100],  # water
        [1250, 1000, 900, 700, 1100, 2200, 2700, 2900, 3000, 900, 20, 1500, 800],  # trees
        [1300, 1100, 1100, 950, 1500, 2500, 2900, 3100, 3200, 1000, 25, 2200, 1300],  # grass
        [1250, 1000, 950, 800, 1100, 1600, 1800, 1900, 1950, 600, 15, 1100, 600],  # flooded_vegetation
        [1300, 1100, 1200, 1000, 1600, 2800, 3300, 3500, 3600, 1100, 25, 2300, 1300],  # crops
        [1400, 1250, 1300, 1400, 1700, 2100, 2300, 2450, 2550, 850, 30, 2700, 1900],  # shrub_and_scrub
        [1600, 1500, 1500, 1600, 1750, 1900, 2000, 2100, 2150, 700, 35, 2400, 2100],  # built
        [1700, 1600, 1800, 2200, 2500, 2700, 2850, 2950, 3050, 1000, 40, 3600, 3000],  # bare
        [7500, 7400, 7200, 7000, 6900, 6800, 6700, 6500, 6300, 3000, 200, 800, 500],  # snow_and_ice
    ],
    dtype=np.float64,
)
# Native ground sampling distance of each S2 band in metres (10, 20 or 60 m), used to blur the
# coarse bands the way resampling to a 10 m grid does.
S2_GSD = np.array([60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20])

# Mean Sentinel-1 backscatter (dB) per class: VV, VH. Calm water is a mirror (very dark), flooded
# vegetation and buildings show double bounce (bright VV), forest is a strong volume scatterer (VH).
S1_BACKSCATTER_DB = np.array(
    [
        [-22.0, -28.0],  # water
        [-7.5, -13.0],  # trees
        [-10.5, -17.5],  # grass
        [-6.0, -15.0],  # flooded_vegetation
        [-9.0, -16.0],  # crops
        [-9.5, -16.5],  # shrub_and_scrub
        [-2.5, -9.5],  # built
        [-14.0, -22.0],  # bare
        [-12.0, -20.0],  # snow_and_ice
    ],
    dtype=np.float64,
)

# Landscapes: relative abundance of each class (order of CLASS_NAMES). A patch draws one biome
# and then keeps a random subset of its classes, so the multi-labels vary from patch to patch.
BIOMES = {
    "farmland": [0.05, 0.15, 0.25, 0.0, 0.45, 0.0, 0.10, 0.0, 0.0],
    "forest": [0.05, 0.65, 0.15, 0.0, 0.0, 0.12, 0.0, 0.03, 0.0],
    "wetland": [0.35, 0.10, 0.15, 0.35, 0.0, 0.05, 0.0, 0.0, 0.0],
    "arid": [0.0, 0.0, 0.05, 0.0, 0.10, 0.40, 0.10, 0.35, 0.0],
    "urban": [0.05, 0.10, 0.15, 0.0, 0.0, 0.0, 0.65, 0.05, 0.0],
    "alpine": [0.05, 0.25, 0.15, 0.0, 0.0, 0.05, 0.0, 0.20, 0.30],
}

# Two UTM zones (northern Italy / western Balkans) so the sample has more than one CRS.
SAMPLE_GRIDS = (
    {"crs": "EPSG:32632", "size": 64, "easting": (400_000, 700_000), "northing": (4_900_000, 5_150_000)},
    {"crs": "EPSG:32633", "size": 48, "easting": (300_000, 600_000), "northing": (4_800_000, 5_050_000)},
)
S1_NODATA = -9999.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def landcover_map(rng: np.random.Generator, size: int, abundance, *, nodata_fraction: float = 0.01) -> np.ndarray:
    """A uint8 land-cover map (class ids, 255 = nodata) with blob-shaped regions.

    Each class gets a smooth random field plus the log of its abundance; a pixel takes the class
    with the largest value. Classes with zero abundance never appear. A few scattered pixels are
    nodata, as in Dynamic World's masked clouds.
    """
    abundance = np.asarray(abundance, dtype=np.float64)
    fields = np.stack([_smooth_noise(rng, (size, size), sigma=size / 10) for _ in abundance])
    with np.errstate(divide="ignore"):
        fields = fields + 1.5 * np.log(abundance)[:, None, None]
    lc = fields.argmax(axis=0).astype(np.uint8)
    lc[rng.random((size, size)) < nodata_fraction] = LANDCOVER_NODATA
    return lc


def s2_from_landcover(rng: np.random.Generator, landcover: np.ndarray) -> np.ndarray:
    """Sentinel-2 L1C-like uint16 reflectance x 10000, shape [13, H, W], rendered from land cover."""
    from scipy.ndimage import gaussian_filter

    classes = np.where(landcover == LANDCOVER_NODATA, 2, landcover)  # clouds masked in LC: show grass below
    base = S2_SPECTRA[classes].transpose(2, 0, 1)  # [13, H, W]
    # within-class variability: a smooth brightness texture shared by all bands, plus per-band noise
    texture = 1.0 + 0.08 * _smooth_noise(rng, landcover.shape, sigma=2.0)
    gain = rng.uniform(0.9, 1.1)  # illumination / season
    image = base * texture[None] * gain
    image = image * (1.0 + 0.01 * rng.standard_normal(image.shape))  # sensor noise, SNR ~100
    for b, gsd in enumerate(S2_GSD):
        if gsd > 10:
            image[b] = gaussian_filter(image[b], sigma=(gsd / 10) / 2)
    return np.clip(np.rint(image), 1, 10000).astype(np.uint16)  # 0 is kept for nodata


def s1_from_landcover(rng: np.random.Generator, landcover: np.ndarray, *, looks: float = 4.4) -> np.ndarray:
    """Sentinel-1 GRD-like float32 backscatter in dB, shape [2, H, W], with multiplicative speckle."""
    classes = np.where(landcover == LANDCOVER_NODATA, 2, landcover)
    mean_db = S1_BACKSCATTER_DB[classes].transpose(2, 0, 1)
    mean_db = mean_db + 1.0 * _smooth_noise(rng, landcover.shape, sigma=3.0)[None]
    # speckle: gamma-distributed intensity with mean 1 (ENL "looks") in linear power
    speckle = rng.gamma(shape=looks, scale=1.0 / looks, size=mean_db.shape)
    db = mean_db + 10.0 * np.log10(speckle)
    return np.clip(db, -35.0, 5.0).astype(np.float32)


def swath_edge_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """True outside the acquisition footprint: a diagonal cut through one corner of the patch."""
    yy, xx = np.mgrid[0:size, 0:size]
    corner = rng.integers(4)
    if corner & 1:
        xx = size - 1 - xx
    if corner & 2:
        yy = size - 1 - yy
    return (xx + yy) < rng.integers(size // 4, size // 2)


def utm_transform(west: float, north: float, pixel: float = 10.0):
    """North-up affine transform with square ``pixel`` metres (Sentinel-2's 10 m grid)."""
    from affine import Affine

    return Affine(pixel, 0.0, west, 0.0, -pixel, north)


def _profile(crs: str, transform, count: int, height: int, width: int, dtype: str, nodata) -> dict:
    return {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": "deflate",
    }


def write_geotiff(path: Path, array: np.ndarray, *, crs: str, transform, nodata, descriptions=None, tags=None) -> None:
    """Write [C, H, W] ``array`` as a GeoTIFF (tmp name, then rename: never a half-written file)."""
    import rasterio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count, height, width = array.shape
    profile = _profile(crs, transform, count, height, width, array.dtype.name, nodata)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
        if descriptions:
            dst.descriptions = tuple(descriptions)
        if tags:
            dst.update_tags(**tags)
    tmp.replace(path)


def write_patch(root: Path, patch_id: str, rng: np.random.Generator, *, crs: str, size: int, origin: tuple[float, float],
                abundance, s2_edge: bool = False, s1_nodata: float = S1_NODATA, s1_edge: bool = False,
                modalities=("s2", "s1")) -> np.ndarray:
    """Render and write one co-registered patch (s2/, s1/, landcover/); returns the land cover."""
    transform = utm_transform(*origin)
    lc = landcover_map(rng, size, abundance)
    s2 = s2_from_landcover(rng, lc)
    s1 = s1_from_landcover(rng, lc)
    if s2_edge:
        outside = swath_edge_mask(rng, size)
        s2[:, outside] = 0
        lc[outside] = LANDCOVER_NODATA  # Dynamic World is derived from S2: nothing there either
    if s1_edge:
        s1[:, : max(1, size // 8), :] = s1_nodata  # first rows outside the SAR swath
    root = Path(root)
    if "s2" in modalities:
        write_geotiff(root / "s2" / f"{patch_id}.tif", s2, crs=crs, transform=transform, nodata=0,
                      descriptions=S2_BANDS, tags={"SENSOR": "Sentinel-2 L1C (synthetic)", "SCALE": "10000"})
    if "s1" in modalities:
        write_geotiff(root / "s1" / f"{patch_id}.tif", s1, crs=crs, transform=transform, nodata=s1_nodata,
                      descriptions=S1_BANDS, tags={"SENSOR": "Sentinel-1 GRD IW (synthetic)", "UNITS": "dB"})
    write_geotiff(root / "landcover" / f"{patch_id}.tif", lc[None], crs=crs, transform=transform,
                  nodata=LANDCOVER_NODATA, descriptions=("label",),
                  tags={"CLASSES": ",".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES))})
    return lc


def write_sample(root: str | Path, *, n_patches: int = 48, seed: int = 0) -> Path:
    """Write the embedded sample: ``n_patches`` patches split over two UTM zones and sizes.

    Deterministic for a given ``(n_patches, seed)``. Half the patches have a swath-edge nodata
    corner in S2; S1 uses nodata nan in one zone and -9999 in the other (both occur in the wild).
    """
    root = Path(root)
    biomes = list(BIOMES.values())
    for i in range(n_patches):
        rng = np.random.default_rng([seed, i])
        grid = SAMPLE_GRIDS[i % len(SAMPLE_GRIDS)]
        abundance = np.array(biomes[(i // len(SAMPLE_GRIDS)) % len(biomes)], dtype=np.float64)
        # keep a random subset of the biome's classes (at least two) so labels differ within a biome
        present = np.flatnonzero(abundance)
        keep = rng.permutation(present)[: rng.integers(2, len(present) + 1)]
        abundance = np.where(np.isin(np.arange(len(abundance)), keep), abundance, 0.0)
        origin = (float(rng.integers(*grid["easting"]) // 10 * 10), float(rng.integers(*grid["northing"]) // 10 * 10))
        write_patch(root, f"patch_{i:03d}", rng, crs=grid["crs"], size=grid["size"], origin=origin,
                    abundance=abundance, s2_edge=bool(i % 2),
                    s1_nodata=float("nan") if i % len(SAMPLE_GRIDS) == 0 else S1_NODATA, s1_edge=bool(i % 3 == 0))
    return root


#: A whole scene's place: a 10 m UTM grid in zone 32N (northern Italy), like tile 32TPR's.
SCENE_GRID = {"crs": "EPSG:32632", "west": 600_000.0, "north": 5_100_000.0}
SCENE_TILE = 256  # GeoTIFF tile side of a written scene


def scene_nodata_strip(rng: np.random.Generator, size: int) -> np.ndarray:
    """True in the nodata strip of a scene: the pixels west of a slanted swath edge running top to
    bottom (between 1/16 and 1/6 of the width from the left), as a Sentinel-2 tile cut by the edge
    of the orbit's swath has. Shape [size, size] bool."""
    top, bottom = rng.uniform(size / 16, size / 6, size=2)
    edge = np.linspace(top, bottom, size)[:, None]  # the edge's column on each row
    return np.arange(size)[None, :] < edge


def write_scene(path: str | Path, *, size: int = 1024, seed: int = 0) -> Path:
    """Write a synthetic Sentinel-2 L1C scene GeoTIFF: ``size`` x ``size`` px on a 10 m UTM grid
    (EPSG:32632), 13 uint16 bands (reflectance x 10000) described B1..B12 with B8A after B8, nodata 0
    in a slanted strip along the west edge (:func:`scene_nodata_strip`), 256 px deflate tiles
    (half the side or less in a scene of 256 px or less).

    The land cover mixes every class but snow (:func:`landcover_map`) and the bands are rendered
    from it (:func:`s2_from_landcover`), so embeddings of the scene show its regions. Deterministic
    for a given ``(size, seed)``; about 350 x size² bytes of memory while rendering (0.4 GB at
    1024 px). Written beside
    ``path`` and renamed. Returns ``path``."""
    import rasterio

    path = Path(path)
    rng = np.random.default_rng([seed, size, 2])
    abundance = np.mean([b for b in BIOMES.values()], axis=0)
    abundance[CLASS_NAMES.index("snow_and_ice")] = 0.0
    lc = landcover_map(rng, size, abundance)
    s2 = s2_from_landcover(rng, lc)
    del lc
    s2[:, scene_nodata_strip(rng, size)] = 0
    profile = _profile(SCENE_GRID["crs"], utm_transform(SCENE_GRID["west"], SCENE_GRID["north"]), len(S2_BANDS),
                       size, size, "uint16", 0)
    tile = SCENE_TILE if size > SCENE_TILE else 16 * max(1, size // 32)  # smaller than the scene: tiled
    profile.update(tiled=True, blockxsize=tile, blockysize=tile, predictor=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(s2)
        dst.descriptions = tuple(S2_BANDS)
        dst.update_tags(SENSOR="Sentinel-2 L1C (synthetic)", SCALE="10000", PRODUCT_TYPE="S2MSI1C")
    tmp.replace(path)
    return path
