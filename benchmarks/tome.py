"""Token merging (ToMe, Bolya et al. 2023) for frozen-feature inference, measured in one run:

1. tiles/s with ``--tome-r R`` against unmerged, for ViT-B/14 at 224 (and ViT-L/14 at 224 with
   ``--large``, the default on cuda), same tiles, same batches;
2. mean cosine similarity of the pooled features to the unmerged ones;
3. the slide-biomarker pipeline (ABMIL ensemble, external cohort) on a synthetic image cohort
   (tiles drawn by tests/data/histo/make_data.py's tissue generator; positive slides carry a few
   tiles with dense dark nuclei) embedded merged and unmerged: external AUC of each.

    python benchmarks/tome.py [--quick] [--device cpu|cuda] [--rs 4,8,12,16] [--weights FILE]

Offline there are no DINOv2 weights: the encoder is a random-init DINOv2 architecture whose
LayerScale factors (1e-5 at init, which makes every block nearly the identity and merging free)
are set to --layer-scale, an order of magnitude of trained models. Speed does not depend on the
weights; cosine and AUC do, so re-measure them with --weights on real weights. On cuda the
forward runs under bf16 autocast (on cpu with ``--precision bf16-mixed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BF16_ON_CPU = False  # --precision bf16-mixed on cpu (set in main)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def encoder(name: str, weights: str | None, layer_scale: float, device):
    import torch

    from domainfm.backbones import create_backbone

    torch.manual_seed(0)
    b = create_backbone(weights or name, init="random", img_size=224)  # an export names its architecture
    if not weights:
        with torch.no_grad():
            for blk in b.model.blocks:
                for ls in (blk.ls1, blk.ls2):
                    if hasattr(ls, "gamma"):
                        ls.gamma.fill_(layer_scale)
    return b.eval().requires_grad_(False).to(device)


def make_tiles(n: int, seed: int, *, signal: bool = False):
    """uint8 [n, 224, 224, 3] synthetic H&E-like tiles; ``signal`` adds dense dark nuclei."""
    import numpy as np

    from conftest import load_make_data

    md = load_make_data("histo")
    rng = np.random.default_rng(seed)
    tiles = np.stack([md.tissue_image(224, 224, seed=seed * 1000 + i) for i in range(n)])
    if signal:
        yy, xx = np.mgrid[0:224, 0:224]
        for t in tiles:
            for _ in range(60):
                cy, cx = rng.integers(8, 216, size=2)
                t[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (72, 28, 112)
    return tiles


def features(backbone, tiles, device, batch_size: int):
    import numpy as np
    import torch

    mean = torch.tensor(backbone.data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.data_config["std"], device=device).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            x = torch.from_numpy(tiles[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
            x = (x - mean) / std
            if device.type == "cuda" or BF16_ON_CPU:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out.append(backbone(x).float().cpu())
            else:
                out.append(backbone(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def timed(backbone, tiles, device, batch_size: int) -> float:
    """Seconds to embed ``tiles`` once."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    features(backbone, tiles, device, batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speed_and_cosine(name, args, device, tiles) -> list[dict]:
    """tiles/s unmerged and at each r, measured side by side: each repetition embeds the same tiles
    unmerged then merged, so a machine shared with other jobs slows both alike; the speed-up is the
    ratio of the summed times."""
    import numpy as np

    from domainfm.inference import apply_token_merging

    b = encoder(name, args.weights, args.layer_scale, device)
    ref = features(b, tiles[:args.batch_size], device, args.batch_size)  # warm-up
    ref = features(b, tiles, device, args.batch_size)
    rows, base_times = [], []
    for r in args.rs:
        t_base = t_merged = 0.0
        for _ in range(args.reps):
            t_base += timed(b, tiles, device, args.batch_size)
            with apply_token_merging(b, r):
                t_merged += timed(b, tiles, device, args.batch_size)
        with apply_token_merging(b, r):
            f = features(b, tiles, device, args.batch_size)
        base_times.append(t_base)
        cos = float(np.mean(np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))))
        n = args.reps * len(tiles)
        rows.append({"model": name, "r": r, "tiles_per_s": n / t_merged, "unmerged_tiles_per_s": n / t_base,
                     "speedup": t_base / t_merged, "cosine": cos})
        print(f"{name} r={r}: {n / t_merged:.2f} tiles/s against {n / t_base:.2f} unmerged "
              f"({t_base / t_merged:.2f}x), cosine {cos:.4f}", flush=True)
    n = args.reps * len(tiles) * len(args.rs)
    rows.insert(0, {"model": name, "r": 0, "tiles_per_s": n / sum(base_times), "speedup": 1.0, "cosine": 1.0})
    return rows


def write_cohort(root: Path, name: str, slides: list[tuple[str, int, "object"]]) -> tuple[Path, Path]:
    import csv

    from plugins.histo.embedding import write_features

    feat_dir = root / name / "features"
    rows = []
    for i, (sid, label, feats) in enumerate(slides):
        coords = [[256 * (j % 4), 256 * (j // 4)] for j in range(len(feats))]
        import numpy as np

        write_features(feat_dir / f"{sid}.h5", feats, np.asarray(coords, np.int64),
                       {"mpp": 0.5, "tile_size": 224, "tile_size_level0": 448, "encoder": "benchmark"})
        rows.append({"slide_id": sid, "patient_id": f"p{sid}", "label": label})
    labels = root / name / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "patient_id", "label"])
        w.writeheader()
        w.writerows(rows)
    return feat_dir, labels


def cohort_auc(name, args, device, r_values) -> dict[int, float]:
    """External ensemble AUC of the slide-biomarker pipeline on features embedded at each r."""
    import numpy as np

    from domainfm.inference import apply_token_merging
    from pipelines.slide_biomarker import run

    rng = np.random.default_rng(0)
    plan = []  # (cohort, slide id, label, tiles)
    for cohort, n in (("train", args.train_slides), ("external", args.external_slides)):
        for i in range(n):
            label = i % 2
            seed = (0 if cohort == "train" else 10_000) + i
            tiles = make_tiles(args.tiles_per_slide, seed)
            if label:
                k = int(rng.integers(2, 4))
                tiles[:k] = make_tiles(k, seed + 50_000, signal=True)
            plan.append((cohort, f"{cohort}_{i:03d}", label, tiles))
    b = encoder(name, args.weights, args.layer_scale, device)
    aucs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        for r in r_values:
            handle = apply_token_merging(b, r) if r else None
            slides = {"train": [], "external": []}
            for cohort, sid, label, tiles in plan:
                slides[cohort].append((sid, label, features(b, tiles, device, args.batch_size)))
            if handle:
                handle.remove()
            root = tmp / f"r{r}"
            tf, tl = write_cohort(root, "train", slides["train"])
            ef, el = write_cohort(root, "external", slides["external"])
            m = run(features_dir=tf, labels_csv=tl, target="signal", external_features=ef, external_labels=el,
                    folds=args.folds, seeds=args.seeds, epochs=args.epochs, patience=5, n_boot=100, max_heatmaps=0,
                    experiment="tome-benchmark", run_name=f"r{r}", register_name=f"tome-bench-r{r}")
            aucs[r] = float(m["external_auc_ensemble"])
            print(f"{name} r={r}: external AUC {aucs[r]:.4f}", flush=True)
    return aucs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="Fewer tiles, slides and r values (a few minutes on 2 cores).")
    ap.add_argument("--rs", default=None, help="Comma-separated r values (default 4,8,12,16; quick 8,16).")
    ap.add_argument("--large", action="store_true", help="Also ViT-L/14 (default on cuda).")
    ap.add_argument("--models", default=None,
                    help="Comma-separated timm names instead (the first one embeds the AUC cohort), e.g. "
                         "vit_small_patch14_dinov2 on a small CPU.")
    ap.add_argument("--slides", default=None, help="TRAIN,EXTERNAL slides of the AUC cohort (default 32,20; quick 16,10).")
    ap.add_argument("--tiles-per-slide", type=int, default=None, help="Tiles per cohort slide (default 12; quick 6).")
    ap.add_argument("--reps", type=int, default=None, help="Side-by-side repetitions per r (default 3; quick cpu 1).")
    ap.add_argument("--weights", default=None, help="A domainfm export of real weights (ViT-B/14 architecture).")
    ap.add_argument("--layer-scale", type=float, default=0.5, help="LayerScale of the random encoder.")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--auc-r", default=None,
                    help="Comma-separated r of the merged cohorts (default: every r; quick: 16).")
    ap.add_argument("--precision", default=None, choices=("32-true", "bf16-mixed"),
                    help="Forward precision (default: bf16-mixed on cuda, 32-true on cpu).")
    ap.add_argument("--skip-auc", action="store_true", help="Speed and cosine only (no MLflow or MIL training).")
    ap.add_argument("--json", default=None, help="Write the figures here.")
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    global BF16_ON_CPU
    BF16_ON_CPU = device.type == "cpu" and args.precision == "bf16-mixed"
    args.rs = [int(r) for r in (args.rs or ("8,16" if args.quick else "4,8,12,16")).split(",")]
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    args.reps = args.reps or (1 if args.quick and device.type == "cpu" else 3)
    n_tiles = args.batch_size * (2 if device.type == "cpu" else 8)
    args.train_slides, args.external_slides = ([int(v) for v in args.slides.split(",")] if args.slides
                                               else (16, 10) if args.quick else (32, 20))
    args.tiles_per_slide = args.tiles_per_slide or (6 if args.quick else 12)
    args.folds, args.seeds, args.epochs = (3, 1, 15) if args.quick else (4, 2, 25)
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    tiles = make_tiles(n_tiles, seed=7)
    models = (args.models.split(",") if args.models else
              ["vit_base_patch14_dinov2"] + (["vit_large_patch14_dinov2"] if args.large or device.type == "cuda" else []))
    rows = []
    for name in models:
        rows += speed_and_cosine(name, args, device, tiles)
    auc_rs = [int(r) for r in args.auc_r.split(",")] if args.auc_r is not None else ([16] if args.quick else args.rs)
    aucs = {} if args.skip_auc else cohort_auc(models[0], args, device, [0] + auc_rs)
    print("\n| model | r | tiles/s | speed-up | cosine to unmerged | external AUC |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        auc = aucs.get(row["r"]) if row["model"] == models[0] else None
        print(f"| {row['model']} | {row['r']} | {row['tiles_per_s']:.2f} | {row['speedup']:.2f}x | {row['cosine']:.4f} | "
              f"{'' if auc is None else f'{auc:.3f}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "precision": args.precision, "cohort": [args.train_slides, args.external_slides,
                                                                   args.tiles_per_slide], "rows": rows, "external_auc": aucs}, indent=2))


if __name__ == "__main__":
    main()
