"""Generate the histo plugin's test data: small whole-slide images and a synthetic feature cohort.

Run ``python tests/data/histo/make_data.py OUT_DIR`` to write everything, or import the functions
from a pytest fixture (what the tests do: nothing binary is checked in).

Slides (tissue = textured pink/purple blobs on a white background, the same layout in every slide so
that tiles at one µm/px cover the same tissue whatever the scan magnification):
- ``aperio_40x.svs``    Aperio-like SVS, 0.25 µm/px, JPEG tiles, levels 1, 4, 16 (openslide vendor "aperio")
- ``generic_20x.tif``   generic tiled TIFF, 0.5 µm/px from the TIFF resolution tags, levels 1, 4
- ``no_mpp.tif``        generic tiled TIFF without any resolution information
- ``truncated.svs``     the SVS cut in half: fails to open
- ``corrupt_jpeg.svs``  the SVS with damaged level-0 JPEG tiles: opens, then fails while tiles are read
- ``plain.png``         a plain RGB image (a one-level slide; µm/px must come from --slide-mpp)

Feature cohort (``make_feature_cohort``): bags of random tile features where positive slides carry a
planted signal in a few tiles, in the HDF5 layout ``histo embed`` writes.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

# physical size of the synthetic tissue section, in µm
FIELD_UM = (512.0, 384.0)  # width, height
# tissue blobs: centre (fraction of width, height), radii (fraction), colour (RGB)
BLOBS = [
    ((0.30, 0.40), (0.20, 0.26), (200, 120, 170)),
    ((0.68, 0.58), (0.22, 0.24), (170, 100, 180)),
    ((0.55, 0.18), (0.08, 0.08), (215, 140, 190)),
]


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3]: white background with textured blobs; the layout scales with the size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    img = np.full((height, width, 3), 242, np.float32)
    img += rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)  # faint noise, still white
    # texture shared by all blobs: low-frequency stain variation, dark nucleus-like speckles, grain
    texture = np.sin(u * 37.0) * np.cos(v * 29.0) * 12.0 - (rng.random((height, width)) < 0.03) * 70.0
    grain = rng.normal(0, 6.0, size=(height, width, 3)).astype(np.float32)
    for (cx, cy), (rx, ry), colour in BLOBS:
        inside = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
        img[inside] = np.asarray(colour, np.float32) + texture[inside, None] - grain[inside]
    return np.clip(img, 0, 255).astype(np.uint8)


def _downsample(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    return img[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3)).astype(np.uint8)


def write_aperio_svs(path: str | Path, *, mpp: float = 0.25, seed: int = 0, tile: int = 128) -> Path:
    """An SVS that OpenSlide's aperio driver opens: tiled JPEG levels, MPP in the ImageDescription."""
    import tifffile

    path = Path(path)
    width, height = round(FIELD_UM[0] / mpp), round(FIELD_UM[1] / mpp)
    base = tissue_image(width, height, seed)
    desc = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
            f"JPEG/RGB Q=90|AppMag = {round(10 / mpp)}|MPP = {mpp}|ScanScope ID = SYNTHETIC")
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(base, tile=(tile, tile), compression="jpeg", photometric="rgb", description=desc,
                  metadata=None)
        for factor in (4, 16):
            level = _downsample(base, factor)
            ldesc = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {level.shape[1]}x{level.shape[0]} "
                     f"- ({tile}x{tile}) JPEG/RGB Q=90")
            tif.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb", description=ldesc,
                      metadata=None)
    return path


def write_generic_tiff(path: str | Path, *, mpp: float | None = 0.5, seed: int = 0, tile: int = 128) -> Path:
    """A generic pyramidal tiled TIFF: level 0, then reduced levels as pages with subfiletype=1.

    µm/px goes into the TIFF resolution tags (pixels per centimetre); ``mpp=None`` writes none.
    """
    import tifffile

    path = Path(path)
    width, height = round(FIELD_UM[0] / (mpp or 0.5)), round(FIELD_UM[1] / (mpp or 0.5))
    base = tissue_image(width, height, seed)
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate((1, 4)):
            level = base if factor == 1 else _downsample(base, factor)
            kwargs = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * factor)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            else:
                kwargs = {"resolution": None, "resolutionunit": "NONE"}
            tif.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb", metadata=None,
                      subfiletype=1 if i else 0, **kwargs)
    return path


def write_truncated(src: str | Path, path: str | Path, fraction: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_corrupt_tiles(src: str | Path, path: str | Path) -> Path:
    """A copy of a slide whose level-0 JPEG tiles have garbage in the middle of their data: it opens
    and its thumbnail (a reduced level) reads, then reading tissue tiles fails part-way."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    rng = np.random.default_rng(0)
    for offset, count in spans:
        mid = offset + count // 2
        data[mid:mid + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def write_plain_image(path: str | Path, *, size: tuple[int, int] = (512, 384), seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    Image.fromarray(tissue_image(size[0], size[1], seed)).save(path)
    return path


def make_slides(out: str | Path) -> dict[str, Path]:
    """Write every test slide into ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    svs = write_aperio_svs(out / "aperio_40x.svs", mpp=0.25)
    return {
        "svs": svs,
        "tiff": write_generic_tiff(out / "generic_20x.tif", mpp=0.5),
        "no_mpp": write_generic_tiff(out / "no_mpp.tif", mpp=None),
        "truncated": write_truncated(svs, out / "truncated.svs"),
        "corrupt": write_corrupt_tiles(svs, out / "corrupt_jpeg.svs"),
        "plain": write_plain_image(out / "plain.png"),
    }


# ---------------------------------------------------------------------------------------------
# synthetic feature cohort for the slide-level pipeline

def make_feature_cohort(out: str | Path, *, n_slides: int = 48, n_external: int = 24, dim: int = 32,
                        tiles: tuple[int, int] = (40, 80), n_signal: tuple[int, int] = (3, 6),
                        signal_strength: float = 3.0, seed: int = 0,
                        constant_features: bool = False) -> dict[str, Path]:
    """Feature bags where each positive slide has a few tiles shifted along a fixed direction.

    ``constant_features``: every tile of every slide is one and the same vector up to 1e-6 of
    noise (bags differ only in size), a cohort from which nothing can be learned.

    Writes ``train/features/<id>.h5``, ``train/labels.csv``, ``external/features/<id>.h5`` and
    ``external/labels.csv``; every bag's ``planted`` dataset (bool [N]) marks the signal tiles so a
    test can check where attention goes. Patients own one or two slides (same label).
    """
    import h5py

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    out = Path(out)
    paths = {}
    for cohort, n in (("train", n_slides), ("external", n_external)):
        feat_dir = out / cohort / "features"
        feat_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        patient = 0
        i = 0
        while i < n:
            label = int(patient % 2)
            for _ in range(1 if rng.random() < 0.6 else 2):
                if i >= n:
                    break
                slide_id = f"{cohort}_{i:03d}"
                n_tiles = int(rng.integers(tiles[0], tiles[1] + 1))
                feats = rng.normal(size=(n_tiles, dim)).astype(np.float32)
                planted = np.zeros(n_tiles, bool)
                if constant_features:
                    feats[:] = direction + rng.normal(0, 1e-6, size=feats.shape).astype(np.float32)
                elif label:
                    k = int(rng.integers(n_signal[0], n_signal[1] + 1))
                    idx = rng.choice(n_tiles, size=k, replace=False)
                    feats[idx] += signal_strength * direction
                    planted[idx] = True
                side = int(np.ceil(np.sqrt(n_tiles)))
                coords = np.stack([np.arange(n_tiles) % side, np.arange(n_tiles) // side], 1).astype(np.int64) * 256
                with h5py.File(feat_dir / f"{slide_id}.h5", "w") as f:
                    f.create_dataset("features", data=feats)
                    f.create_dataset("coords", data=coords)
                    f.create_dataset("planted", data=planted)
                    f.attrs.update({"mpp": 0.5, "tile_size": 256, "tile_size_level0": 256,
                                    "encoder": "synthetic", "domainfm_version": "test"})
                rows.append({"slide_id": slide_id, "patient_id": f"{cohort}_p{patient:03d}", "label": label})
                i += 1
            patient += 1
        with open(out / cohort / "labels.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["slide_id", "patient_id", "label"])
            w.writeheader()
            w.writerows(rows)
        paths[cohort] = out / cohort
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "histo_test_data")
    print(make_slides(target / "slides"))
    print(make_feature_cohort(target / "cohort"))
