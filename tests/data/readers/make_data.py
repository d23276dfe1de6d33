"""Files as users' tools save them, for the core readers' tests (``domainfm.data``).

    python tests/data/readers/make_data.py OUT

- ``excel_csv(path, header, rows)``: what Excel's "Save As > CSV UTF-8" writes: a UTF-8 byte-order
  mark, CRLF line ends, and (as hand-edited sheets have) spaces around the header names, an empty
  trailing column and a blank row at the end.
- ``grey16_imagefolder(root)``: an sgd-ft ImageFolder of 16-bit greyscale PNGs (a 16-bit camera),
  two classes told apart only by their intensity, every pixel far above 255 so that a reader that
  converts to 8-bit RGB sees two classes of identical white images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

GREY16_CLASSES = {"dim": 12000, "bright": 40000}  # mean 16-bit level of each class


def excel_csv(path: str | Path, header: list[str], rows: list[list[object]]) -> Path:
    path = Path(path)
    lines = [",".join(f" {h} " for h in header) + ","]  # spaces around names, an empty last column
    lines += [",".join(str(v) for v in r) + "," for r in rows]
    lines += ["," * len(header)]  # the blank row a sheet leaves below its data
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    return path


def grey16_image(rng: np.random.Generator, level: int, size: int) -> np.ndarray:
    """uint16 [size, size]: ``level`` plus pixel noise (std 3000), every pixel above 255."""
    img = level + 3000 * rng.standard_normal((size, size))
    return np.clip(img.round(), 1000, 65535).astype(np.uint16)


def write_grey16_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path)  # Pillow writes a uint16 array as a 16-bit greyscale PNG


def grey16_imagefolder(root: str | Path, *, size: int = 32, train: int = 8, val: int = 4, test: int = 6,
                       seed: int = 0) -> Path:
    """``root/{train,val,test}/{dim,bright}/<n>.png``, 16-bit greyscale."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val), ("test", test)):
        if n == 0:
            continue
        for name, level in GREY16_CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_grey16_png(folder / f"{i:03d}.png", grey16_image(rng, level, size))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    grey16_imagefolder(out / "grey16")
    excel_csv(out / "labels.csv", ["slide_id", "patient_id", "label"], [["s1", "p1", 0], ["s2", "p2", 1]])
    print(out)


if __name__ == "__main__":
    main()
