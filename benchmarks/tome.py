"""Token merging (ToMe, Bolya et al. 2023) for frozen-feature inference, measured in one run:

1. tiles/s with ``--tome-r R`` against unmerged, for ViT-B/14 at 224 (and ViT-L/14 at 224 with
   ``--large``, the default on cuda), same tiles, same batches;
2. mean cosine similarity of the pooled features to the unmerged ones, plain and *centred* (the
   unmerged features' mean over the tiles subtracted first: random-init features of all tiles are
   nearly parallel, so the plain cosine is ~1 whatever merging does);
3. the slide-biomarker pipeline (ABMIL ensemble, external cohort) on a synthetic image cohort
   embedded merged and unmerged: the external AUC with its 95% bootstrap interval, and the AUC loss
   against unmerged with a paired bootstrap interval (same external slides). Tiles are random
   crops, rotations and flips of tests/data/histo/make_data.py's tissue field with per-slide stain
   variation; ``--signal-tiles`` tiles of each positive slide carry ``--signal-nuclei`` extra dark
   nuclei (the difficulty: the defaults keep the unmerged AUC below 1, so a loss can show).

    python benchmarks/tome.py [--quick] [--device cpu|cuda] [--rs 4,8,12,16] [--weights FILE]
                              [--skip-auc | --skip-speed] [--reps N] [--tiles N]

Offline there are no DINOv2 weights: the encoder is a random-init DINOv2 architecture whose
LayerScale factors (1e-5 at init, which makes every block nearly the identity and merging free)
are set to --layer-scale, an order of magnitude of trained models. Its attention is uniform
(random q and k), under which merging with proportional attention is nearly exact; --attn-scale
sharpens it. Speed does not depend on the weights; cosine and AUC do, so re-measure them with
--weights on real weights. On cuda the forward runs under bf16 autocast (on cpu with
``--precision bf16-mixed``).
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
SIGNAL_NUCLEI = 60  # default of --signal-nuclei
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def encoder(name: str, weights: str | None, layer_scale: float, device, attn_scale: float = 1.0):
    """The benchmark's encoder: ``weights`` (an export), or the random-init architecture ``name``
    with LayerScale ``layer_scale`` and attention logits multiplied by ``attn_scale`` (the query and
    key projections scaled by its square root). Random-init attention is uniform (normalised
    entropy 1.00 in every block of ViT-S/14), and under uniform attention a size-weighted merge with
    proportional attention leaves the attention output unchanged: ``--attn-scale 64`` gives peaked
    attention (entropy 0.2-0.45), closer to a trained model's, so merging has something to lose."""
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
                qkv, d = blk.attn.qkv, blk.attn.qkv.in_features
                qkv.weight[:2 * d] *= attn_scale ** 0.5
                if qkv.bias is not None:
                    qkv.bias[:2 * d] *= attn_scale ** 0.5
    return b.eval().requires_grad_(False).to(device)


def make_tiles(n: int, seed: int, *, signal_tiles: int = 0, nuclei: int = 0, radius: float = 4.0,
               stain: float = 0.06):
    """uint8 [n, 224, 224, 3] synthetic H&E-like tiles of one slide.

    One tissue field (tests/data/histo/make_data.py's ``tissue_image``, 3 x 2.25 tiles) per ``seed``,
    its stain scaled per channel by ``1 + N(0, stain)`` (slide-to-slide colour variation); each tile
    is a crop at a random offset, randomly rotated by a multiple of 90 degrees and flipped, so the
    tiles hold background, blob edges and textured tissue in varying parts. The first ``signal_tiles``
    tiles get ``nuclei`` extra dark nuclei (disks of ``radius`` px) inside the tissue: the cohort's
    signal, among the field's own dark speckles (3% of the tissue pixels)."""
    import numpy as np

    from conftest import load_make_data

    md = load_make_data("histo")
    rng = np.random.default_rng(seed)
    field = md.tissue_image(672, 504, seed=seed).astype(np.float32)
    tissue = field.mean(axis=2) < 225
    field = np.clip(255 - (255 - field) * (1 + rng.normal(0, stain, 3)), 0, 255)
    yy, xx = np.mgrid[0:224, 0:224]
    tiles = []
    for i in range(n):
        for _try in range(20):  # crops that are mostly glass say nothing; prefer some tissue
            y0, x0 = int(rng.integers(0, 504 - 224 + 1)), int(rng.integers(0, 672 - 224 + 1))
            if tissue[y0:y0 + 224, x0:x0 + 224].mean() > 0.25:
                break
        t = field[y0:y0 + 224, x0:x0 + 224].copy()
        inside = tissue[y0:y0 + 224, x0:x0 + 224]
        if i < signal_tiles and nuclei:
            cand = np.argwhere(inside)
            if len(cand) == 0:
                cand = np.argwhere(np.ones_like(inside))
            for cy, cx in cand[rng.integers(0, len(cand), nuclei)]:
                t[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (72, 28, 112)
        t = np.rot90(t, int(rng.integers(0, 4)))
        tiles.append(t[:, ::-1] if rng.random() < 0.5 else t)
    return np.stack(tiles).astype(np.uint8)


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


def cosines(f, ref) -> tuple[float, float]:
    """Mean cosine of merged features ``f`` to unmerged ``ref`` ([N, D] each), and the same after
    subtracting ``ref``'s mean over the N tiles from both (*centred*): the part of the features that
    differs between tiles, which is what a downstream model uses. With random-init encoders the
    pooled features of all tiles are nearly parallel, so the plain cosine is ~1 whatever merging
    does; the centred one is not."""
    import numpy as np

    def mean_cos(a, b):
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))

    mu = ref.mean(axis=0, keepdims=True)
    return mean_cos(f, ref), mean_cos(f - mu, ref - mu)


def speed_and_cosine(name, args, device, tiles) -> list[dict]:
    """tiles/s unmerged and at each r, measured side by side: each repetition embeds the same tiles
    unmerged then merged, so a machine shared with other jobs slows both alike; the speed-up is the
    ratio of the summed times."""

    from domainfm.inference import apply_token_merging

    b = encoder(name, args.weights, args.layer_scale, device, args.attn_scale)
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
        cos, ccos = cosines(f, ref)
        n = args.reps * len(tiles)
        rows.append({"model": name, "r": r, "tiles_per_s": n / t_merged, "unmerged_tiles_per_s": n / t_base,
                     "speedup": t_base / t_merged, "cosine": cos, "centred_cosine": ccos})
        print(f"{name} r={r}: {n / t_merged:.2f} tiles/s against {n / t_base:.2f} unmerged "
              f"({t_base / t_merged:.2f}x), cosine {cos:.4f}, centred {ccos:.4f}", flush=True)
    n = args.reps * len(tiles) * len(args.rs)
    rows.insert(0, {"model": name, "r": 0, "tiles_per_s": n / sum(base_times), "speedup": 1.0, "cosine": 1.0,
                    "centred_cosine": 1.0})
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


def external_scores(run_id: str):
    """Labels and ensemble scores of the external slides, from the run's predictions table."""
    import csv
    import io

    import mlflow
    import numpy as np

    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{run_id}/tables/external_predictions.csv"))))
    y = np.array([1 if r["label"] == "1" else 0 for r in rows])
    p = np.array([float(r["prob_ensemble_1"]) for r in rows])
    return [r["slide_id"] for r in rows], y, p


def paired_auc_loss(y, p0, p, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Unmerged AUC minus merged AUC on the same external slides, with a paired percentile bootstrap
    95% interval (each resample draws the same slides for both, so the slide-sampling noise the two
    AUCs share cancels). Returns ``(loss, lo, hi)``."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    stats = []
    while len(stats) < n_boot:
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        stats.append(roc_auc_score(y[idx], p0[idx]) - roc_auc_score(y[idx], p[idx]))
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(roc_auc_score(y, p0) - roc_auc_score(y, p)), float(lo), float(hi)


def cohort_auc(name, args, device, r_values) -> dict[int, dict]:
    """External ensemble AUC (95% bootstrap CI) of the slide-biomarker pipeline on features embedded
    at each r, the paired AUC loss against r=0, and the cosines of every cohort tile's features to
    its unmerged ones."""
    import numpy as np

    from domainfm.inference import apply_token_merging
    from pipelines.slide_biomarker import run

    plan = []  # (cohort, slide id, label, tiles)
    for cohort, n in (("train", args.train_slides), ("external", args.external_slides)):
        for i in range(n):
            label = i % 2
            seed = (0 if cohort == "train" else 10_000) + i
            plan.append((cohort, f"{cohort}_{i:03d}", label,
                         make_tiles(args.tiles_per_slide, seed, signal_tiles=args.signal_tiles * label,
                                    nuclei=args.signal_nuclei)))
    b = encoder(name, args.weights, args.layer_scale, device, args.attn_scale)
    results, ref, ref_scores = {}, None, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        for r in r_values:
            t0 = time.perf_counter()
            handle = apply_token_merging(b, r) if r else None
            slides = {"train": [], "external": []}
            for cohort, sid, label, tiles in plan:
                slides[cohort].append((sid, label, features(b, tiles, device, args.batch_size)))
            if handle:
                handle.remove()
            t_embed = time.perf_counter() - t0
            allf = np.concatenate([f for c in ("train", "external") for _, _, f in slides[c]])
            if ref is None:
                ref = allf
            cos, ccos = cosines(allf, ref)
            root = tmp / f"r{r}"
            tf, tl = write_cohort(root, "train", slides["train"])
            ef, el = write_cohort(root, "external", slides["external"])
            m = run(features_dir=tf, labels_csv=tl, target="signal", external_features=ef, external_labels=el,
                    folds=args.folds, seeds=args.seeds, epochs=args.epochs, patience=5, n_boot=1000, max_heatmaps=0,
                    experiment="tome-benchmark", run_name=f"r{r}", register_name=f"tome-bench-r{r}")
            _, y, p = external_scores(m["mlflow_run_id"])
            if ref_scores is None:
                ref_scores = p
            loss = paired_auc_loss(y, ref_scores, p) if r else (0.0, 0.0, 0.0)
            lo, hi = m["external_auc_ensemble_ci"]
            results[r] = {"auc": float(m["external_auc_ensemble"]), "ci": [float(lo), float(hi)],
                          "auc_loss": loss[0], "auc_loss_ci": [loss[1], loss[2]], "cosine": cos,
                          "centred_cosine": ccos, "cv_auc": m.get("cv_auc_ensemble", m.get("cv_auc")),
                          "embed_s": t_embed}
            print(f"{name} r={r}: external AUC {results[r]['auc']:.3f} [{lo:.3f}, {hi:.3f}], loss against r=0 "
                  f"{loss[0]:+.3f} [{loss[1]:+.3f}, {loss[2]:+.3f}]; cohort tiles: cosine {cos:.4f}, "
                  f"centred {ccos:.4f}; embedded in {t_embed:.0f} s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="Fewer tiles, slides and r values (a few minutes on 2 cores).")
    ap.add_argument("--rs", default=None, help="Comma-separated r values (default 4,8,12,16; quick 8,16).")
    ap.add_argument("--large", action="store_true", help="Also ViT-L/14 (default on cuda).")
    ap.add_argument("--models", default=None,
                    help="Comma-separated timm names instead (the first one embeds the AUC cohort), e.g. "
                         "vit_small_patch14_dinov2 on a small CPU.")
    ap.add_argument("--slides", default=None,
                    help="TRAIN,EXTERNAL slides of the AUC cohort (default 32,64; quick 12,16).")
    ap.add_argument("--tiles-per-slide", type=int, default=None, help="Tiles per cohort slide (default 4).")
    ap.add_argument("--signal-tiles", type=int, default=2,
                    help="Tiles of a positive slide that carry the signal (the difficulty knob, with --signal-nuclei).")
    ap.add_argument("--signal-nuclei", type=int, default=SIGNAL_NUCLEI,
                    help="Extra dark nuclei (4 px radius) in each signal tile; fewer is harder. The default puts "
                         "the unmerged external AUC of random-init ViT-S/14 at 0.68 [0.55, 0.80] (32/64 slides of 4 tiles).")
    ap.add_argument("--tiles", type=int, default=None,
                    help="Tiles of the speed measurement (default: 2 batches on cpu, 8 on cuda).")
    ap.add_argument("--reps", type=int, default=None, help="Side-by-side repetitions per r (default 3; quick cpu 1).")
    ap.add_argument("--weights", default=None, help="A domainfm export of real weights (ViT-B/14 architecture).")
    ap.add_argument("--layer-scale", type=float, default=0.5, help="LayerScale of the random encoder.")
    ap.add_argument("--attn-scale", type=float, default=1.0,
                    help="Multiply the random encoder's attention logits (1: uniform attention as initialised; "
                         "64: peaked, entropy 0.2-0.45 of the maximum).")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--auc-r", default=None,
                    help="Comma-separated r of the merged cohorts (default: every r; quick: 16).")
    ap.add_argument("--precision", default=None, choices=("32-true", "bf16-mixed"),
                    help="Forward precision (default: bf16-mixed on cuda, 32-true on cpu).")
    ap.add_argument("--skip-auc", action="store_true", help="Speed and cosine only (no MLflow or MIL training).")
    ap.add_argument("--skip-speed", action="store_true", help="AUC cohort only (its cosines included; no timing).")
    ap.add_argument("--json", default=None, help="Write the figures here.")
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    global BF16_ON_CPU
    BF16_ON_CPU = device.type == "cpu" and args.precision == "bf16-mixed"
    args.rs = [int(r) for r in (args.rs or ("8,16" if args.quick else "4,8,12,16")).split(",")]
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    args.reps = args.reps or (1 if args.quick and device.type == "cpu" else 3)
    n_tiles = args.tiles or args.batch_size * (2 if device.type == "cpu" else 8)
    args.train_slides, args.external_slides = ([int(v) for v in args.slides.split(",")] if args.slides
                                               else (12, 16) if args.quick else (32, 64))
    args.tiles_per_slide = args.tiles_per_slide or 4
    args.folds, args.seeds, args.epochs = (3, 1, 15) if args.quick else (4, 2, 25)
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = (args.models.split(",") if args.models else
              ["vit_base_patch14_dinov2"] + (["vit_large_patch14_dinov2"] if args.large or device.type == "cuda" else []))
    rows = []
    if not args.skip_speed:
        tiles = make_tiles(n_tiles, seed=7)
        for name in models:
            rows += speed_and_cosine(name, args, device, tiles)
    auc_rs = [int(r) for r in args.auc_r.split(",")] if args.auc_r is not None else ([16] if args.quick else args.rs)
    aucs = {} if args.skip_auc else cohort_auc(models[0], args, device, [0] + [r for r in auc_rs if r])
    if rows:
        print("\n| model | r | tiles/s | speed-up | cosine to unmerged | centred cosine |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['model']} | {row['r']} | {row['tiles_per_s']:.2f} | {row['speedup']:.2f}x | "
                  f"{row['cosine']:.4f} | {row['centred_cosine']:.4f} |")
    if aucs:
        print(f"\n{models[0]}, cohort {args.train_slides} training / {args.external_slides} external slides of "
              f"{args.tiles_per_slide} tiles, {args.signal_tiles} signal tiles of {args.signal_nuclei} nuclei:")
        print("| r | external AUC [95% CI] | AUC loss against r=0 [paired 95% CI] | cosine | centred cosine |")
        print("|---|---|---|---|---|")
        for r, a in aucs.items():
            print(f"| {r} | {a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {a['auc_loss']:+.3f} "
                  f"[{a['auc_loss_ci'][0]:+.3f}, {a['auc_loss_ci'][1]:+.3f}] | {a['cosine']:.4f} | "
                  f"{a['centred_cosine']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": args.device, "precision": args.precision, "models": models,
            "cohort": {"train": args.train_slides, "external": args.external_slides,
                       "tiles_per_slide": args.tiles_per_slide, "signal_tiles": args.signal_tiles,
                       "signal_nuclei": args.signal_nuclei},
            "rows": rows, "external_auc": aucs}, indent=2))


if __name__ == "__main__":
    main()
