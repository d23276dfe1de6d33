"""Embedding throughput: `histo embed` end to end (tiling, reading in DataLoader workers, the
model, writing HDF5) against the model's forward alone on tiles already in memory, same encoder,
same batches (target: ratio >= 0.85, i.e. slide reading hidden behind compute).

    python benchmarks/histo_embed.py [--backbone vit_small_patch14_dinov2 --tile-size 224
                                      --num-workers 2 --batch-size 32 --precision 32-true]

Weights are random (no download); throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_small_patch14_dinov2")
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--reps", type=int, default=6, help="Slide size: reps x reps copies of the test tissue.")
    ap.add_argument("--slide", default=None,
                    help="A slide made earlier by benchmarks/histo_tiling.py's make_slide (e.g. on a machine "
                         "without imagecodecs, which writing its JPEG tiles needs); default: make one now.")
    ap.add_argument("--make-slide", default=None, metavar="DIR",
                    help="Only write the benchmark slide into DIR and print its path.")
    args = ap.parse_args()

    import numpy as np
    import torch

    from plugins.histo import embedding as E
    from plugins.histo import slides as S
    from plugins.histo import tiling as T

    spec = importlib.util.spec_from_file_location("histo_tiling_bench", REPO / "benchmarks" / "histo_tiling.py")
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)
    if args.make_slide:
        Path(args.make_slide).mkdir(parents=True, exist_ok=True)
        print(tb.make_slide(Path(args.make_slide), reps=args.reps))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(args.slide) if args.slide else tb.make_slide(tmp, reps=args.reps)
        settings = E.EmbedSettings(out_dir=str(tmp / "out"), backbone=args.backbone, init="random", mpp=args.mpp,
                                   tile_size=args.tile_size, batch_size=args.batch_size, num_workers=args.num_workers,
                                   precision=args.precision, accelerator=args.accelerator, progress=False)
        device = E.resolve_device(args.accelerator)
        encoder = E.TileEncoder(E.build_encoder(settings), device, args.precision)
        # the tiles, read once into memory, for the forward-only baseline
        ts = T.tile_slide(path, mpp=args.mpp, tile_size=args.tile_size)
        slide = S.open_slide(path)
        tiles = torch.from_numpy(np.stack([S.read_tile(slide, x, y, ts.geometry) for x, y in ts.coords]))
        n = len(tiles)
        batches = list(tiles.split(args.batch_size))
        encoder(batches[0])  # warm-up (allocator, kernels)

        def forward_only():
            for b in batches:
                encoder(b)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def end_to_end():
            target = E.features_path(settings.out_dir, S.slide_id(path))
            target.unlink(missing_ok=True)
            E.embed_slide(path, settings, encoder)

        best_fwd = best_e2e = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            forward_only()
            best_fwd = min(best_fwd, time.perf_counter() - t)
            t = time.perf_counter()
            end_to_end()
            best_e2e = min(best_e2e, time.perf_counter() - t)
        print(f"{args.backbone} on {device.type} ({torch.get_num_threads()} threads), {n} tiles of {args.tile_size} px, "
              f"batch {args.batch_size}, {args.num_workers} workers, {args.precision}")
        print(f"forward only (tiles in memory) : {n / best_fwd:8.1f} tiles/s")
        print(f"histo embed end to end         : {n / best_e2e:8.1f} tiles/s")
        print(f"ratio                          : {best_fwd / best_e2e:8.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
