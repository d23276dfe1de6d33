"""Synthetic ImageFolder data for the sgd-ft tests, with a signal a small model learns in a few
dozen steps: every class has its own per-band brightness pattern and a bright square in its own
quadrant, under pixel noise strong enough that single pixels do not give the class away.

    python tests/data/sgd_ft/make_data.py OUT [--format png|tif] [--bands N] [--size S]

PNG files are written with Pillow (3 bands); GeoTIFFs with rasterio (any band count, uint16,
a UTM CRS and a 10 m geotransform, as Sentinel-2 patches have).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("cropland", "forest", "water")


def class_image(rng: np.random.Generator, label: int, *, bands: int, size: int, n_classes: int) -> np.ndarray:
    """float32 [bands, size, size] in 0..1 for class ``label``."""
    base = np.full((bands, 1, 1), 0.35, np.float32)
    base[label % bands] += 0.25  # class-specific band is brighter
    img = base + 0.12 * rng.standard_normal((bands, size, size)).astype(np.float32)
    half = size // 2
    q = label % 4  # class-specific quadrant holds a bright square
    r0, c0 = (q // 2) * half, (q % 2) * half
    img[:, r0 + half // 4:r0 + 3 * half // 4, c0 + half // 4:c0 + 3 * half // 4] += 0.3
    return np.clip(img, 0.0, 1.0)


def write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    rgb = (img[:3].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


def write_geotiff(path: Path, img: np.ndarray) -> None:
    import rasterio
    from rasterio.transform import from_origin

    data = (img * 10000).round().astype(np.uint16)
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype="uint16",
                   crs="EPSG:32633", transform=from_origin(500000.0, 5000000.0, 10.0, 10.0))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def write_imagefolder(root: str | Path, *, fmt: str = "png", bands: int = 3, size: int = 32, train: int = 16,
                      val: int = 8, test: int = 0, classes=CLASSES, seed: int = 0) -> Path:
    """``root/{train,val[,test]}/<class>/<n>.<png|tif>`` with ``train``/``val``/``test`` images per class."""
    if fmt == "png" and bands != 3:
        raise ValueError("PNG data is RGB: use fmt='tif' for other band counts")
    root = Path(root)
    rng = np.random.default_rng(seed)
    writer, suffix = (write_png, ".png") if fmt == "png" else (write_geotiff, ".tif")
    for split, n in (("train", train), ("val", val), ("test", test)):
        for label, name in enumerate(classes):
            if n == 0:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                writer(folder / f"{i:03d}{suffix}",
                       class_image(rng, label, bands=bands, size=size, n_classes=len(classes)))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--format", choices=("png", "tif"), default="png")
    ap.add_argument("--bands", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--test", type=int, default=8)
    args = ap.parse_args()
    root = write_imagefolder(args.out, fmt=args.format, bands=args.bands, size=args.size, train=args.train,
                             val=args.val, test=args.test)
    print(root)


if __name__ == "__main__":
    main()
