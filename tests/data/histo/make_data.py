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

Situations from users' bug reports (issue 9), each its own generator:
- ``make_mixed_batch``  a pyramidal TIFF, a small PNG crop and a blank-glass scan in one folder
- ``tissue_field``      a field that is tissue over a given fraction of its width (1: edge to edge, 0: blank glass)
- ``write_generic_tiff(dpi=72)``  placeholder resolution tags (pixels per inch) a converter writes
- ``write_clam_coords`` / ``write_trident_coords``  coords files laid out as CLAM and TRIDENT write them

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


def write_generic_tiff(path: str | Path, *, mpp: float | None = 0.5, seed: int = 0, tile: int = 128,
                       dpi: float | None = None, image: np.ndarray | None = None) -> Path:
    """A generic pyramidal tiled TIFF: level 0, then reduced levels as pages with subfiletype=1.

    µm/px goes into the TIFF resolution tags (pixels per centimetre); ``mpp=None`` writes none.
    ``dpi``: write this placeholder instead, in pixels per inch on every level (what converters
    write when they know nothing: 72 or 300), for a scan whose real µm/px is ``mpp``.
    ``image``: level 0 (RGB uint8) instead of the synthetic tissue section.
    """
    import tifffile

    path = Path(path)
    width, height = round(FIELD_UM[0] / (mpp or 0.5)), round(FIELD_UM[1] / (mpp or 0.5))
    base = tissue_image(width, height, seed) if image is None else image
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate((1, 4)):
            level = base if factor == 1 else _downsample(base, factor)
            kwargs = {}
            if dpi is not None:
                kwargs = {"resolution": (dpi, dpi), "resolutionunit": "INCH"}
            elif mpp is not None:
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
# situations from users' bug reports (issue 9)

# H&E colours: pale pink stroma (HSV saturation about 60/255), purple nuclei (about 127/255), and
# glass with the faint blue cast of a scanner's white balance (about 13/255, noise reaching 20)
STROMA = (235, 180, 210)
NUCLEUS = (120, 80, 160)
GLASS = (228, 232, 240)


def tissue_field(width: int, height: int, tissue_fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the left ``tissue_fraction`` of the width is tissue (stroma with a
    quarter of nuclei, in small clusters), the rest glass. 1.0 is a microscopy field with no
    background at all; 0.0 a blank-glass scan."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = GLASS
    img += rng.normal(0, 2.5, size=(height, width, 3)).astype(np.float32)
    split = int(round(width * tissue_fraction))
    if split > 0:
        # nuclei: a coarse random field (4-px cells) thresholded so a quarter of the area is nuclear
        coarse = rng.random((height // 4 + 1, split // 4 + 1))
        nuclei = np.repeat(np.repeat(coarse < 0.25, 4, axis=0), 4, axis=1)[:height, :split]
        tissue = np.where(nuclei[..., None], np.float32(NUCLEUS), np.float32(STROMA))
        tissue += rng.normal(0, 6.0, size=tissue.shape).astype(np.float32)
        img[:, :split] = tissue
    return np.clip(img, 0, 255).astype(np.uint8)


def write_field_slide(path: str | Path, tissue_fraction: float, *, size: tuple[int, int] = (768, 512),
                      mpp: float = 0.5, seed: int = 0) -> Path:
    """A pyramidal TIFF of :func:`tissue_field` at ``mpp`` µm/px."""
    return write_generic_tiff(path, mpp=mpp, image=tissue_field(size[0], size[1], tissue_fraction, seed))


def make_mixed_batch(out: str | Path) -> dict[str, Path]:
    """The batch of issue 9, item 1: a pyramidal TIFF (0.5 µm/px), a small PNG crop (no µm/px:
    needs --slide-mpp) and a blank-glass scan (0.5 µm/px). Named so that the PNG is prepared while
    the TIFF's tiles are read."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "tiff": write_generic_tiff(out / "a_pyramid.tif", mpp=0.5),
        "png": write_plain_image(out / "b_crop.png", size=(256, 192), seed=3),
        "blank": write_field_slide(out / "c_blank.tif", 0.0, size=(512, 384)),
    }


def write_clam_coords(path: str | Path, coords: np.ndarray, *, patch_size: int, patch_level: int = 0,
                      level_dims: list[tuple[int, int]] | None = None,
                      level_downsamples: list[float] | None = None, name: str = "slide") -> Path:
    """A coords file as CLAM's ``create_patches_fp.py`` writes it: dataset ``coords`` [N, 2] int64
    (level 0) whose attrs are ``patch_size`` and ``patch_level`` (ints), ``downsample`` and
    ``downsampled_level_dim`` and ``level_dim`` (arrays of 2), ``name`` and ``save_path`` (strings);
    no attrs on the file itself."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    level_dims = level_dims or [(1024, 768)]
    ds = (level_downsamples or [1.0] * len(level_dims))[patch_level]
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, np.int64), maxshape=(None, 2), chunks=True)
        d.attrs["patch_size"] = np.int64(patch_size)
        d.attrs["patch_level"] = np.int64(patch_level)
        d.attrs["downsample"] = np.array([ds, ds], np.float64)
        d.attrs["downsampled_level_dim"] = np.array(level_dims[patch_level], np.int64)
        d.attrs["level_dim"] = np.array(level_dims[patch_level], np.int64)
        d.attrs["name"] = name
        d.attrs["save_path"] = str(path.parent)
    return path


def write_trident_coords(path: str | Path, coords: np.ndarray, *, patch_size_level0: int, patch_size: int = 224,
                         target_magnification: int = 20, level0_magnification: int = 40,
                         name: str = "slide") -> Path:
    """A coords file as TRIDENT writes it: dataset ``coords`` [N, 2] int64 (level 0) and, on the
    file, ``patch_size`` (at the target magnification), ``patch_size_level0``, ``level0_magnification``,
    ``target_magnification``, ``overlap`` and ``name`` (bytes, as older h5py versions stored it)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.attrs.update({"patch_size": np.int64(patch_size), "patch_size_level0": np.int64(patch_size_level0),
                        "level0_magnification": np.int64(level0_magnification),
                        "target_magnification": np.int64(target_magnification), "overlap": np.int64(0),
                        "name": np.bytes_(name.encode())})
    return path


# ---------------------------------------------------------------------------------------------
# synthetic feature cohort for the slide-level pipeline

def make_feature_cohort(out: str | Path, *, n_slides: int = 48, n_external: int = 24, dim: int = 32,
                        tiles: tuple[int, int] = (40, 80), n_signal: tuple[int, int] = (3, 6),
                        signal_strength: float = 3.0, seed: int = 0) -> dict[str, Path]:
    """Feature bags where each positive slide has a few tiles shifted along a fixed direction.

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
                if label:
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
