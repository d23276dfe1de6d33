"""Speed of the eo-sar data path, measured side by side in one run (ratios, not absolute targets).

    python benchmarks/eo_sar_data.py [--patches 200]

1. up-front file check (header + last block) vs opening the header only vs decoding every file in
   full: what the truncation check adds, and what the whole check costs relative to one pass;
2. dataset build with warm caches (checked headers, band statistics, land-cover counts) vs cold:
   what the caches beside the data save at every start;
3. two augmented views per sample vs the plain normalised read: the augmentation overhead.

Timed with one torch thread, as inside a DataLoader worker (several threads per tiny resize
only fight each other).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)

    import rasterio
    import torch

    from plugins.eo_sar.band_stats import read_image
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.files import read_header, tiff_files

    torch.set_num_threads(1)
    from plugins.eo_sar.synthetic import write_sample
    from plugins.eo_sar.transforms import TwoViews

    tmp = Path(tempfile.mkdtemp(prefix="eo_sar_bench_"))
    try:
        root = write_sample(tmp / "root", n_patches=args.patches)
        files = tiff_files(root / "s2")
        print(f"{len(files)} Sentinel-2 patches (64 and 48 px, 13 bands) in {root}")

        def header_only():
            for p in files:
                with rasterio.open(p) as src:
                    src.count

        opened = _best(header_only)
        check = _best(lambda: [read_header(p, modality="s2") for p in files])
        full = _best(lambda: [read_image(p) for p in files])
        ms = 1e3 / len(files)
        print(f"1. per file: header only {opened * ms:.2f} ms, check (header + last block) {check * ms:.2f} ms, "
              f"full decode {full * ms:.2f} ms: the truncation check adds {check / opened:.2f}x to opening, "
              f"the whole check costs {check / full:.2f}x of one pass over the data")

        def cold():
            for cache in root.glob(".domainfm_*.json"):
                cache.unlink()
            EOSARPatches(root, "s2")

        cold_t = _best(cold)
        EOSARPatches(root, "s2")
        warm_t = _best(lambda: EOSARPatches(root, "s2"))
        print(f"2. dataset build cold {cold_t:.2f} s vs warm {warm_t:.2f} s: caches make a start {cold_t / warm_t:.1f}x faster")

        plain = EOSARPatches(root, "s2")
        views = EOSARPatches(root, "s2", transforms=TwoViews(args.img_size))
        n = min(64, len(plain))
        plain_t = _best(lambda: [plain[i] for i in range(n)])
        views_t = _best(lambda: [views[i] for i in range(n)])
        print(f"3. samples/s: plain read {n / plain_t:.0f}, two views at {args.img_size} px {n / views_t:.0f}: "
              f"augmentation costs {views_t / plain_t:.2f}x the read")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
