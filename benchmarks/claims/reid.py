"""Claim 4, CLIP-ReIdent (Habel et al. 2022): fine-tuning the image encoder with image-to-image
InfoNCE on player crops beats the encoder's zero-shot retrieval on players never seen in training.

Data:   `tests/data/sports_reid/make_data.py:make_mmsports` (MMSports 2022 layout): 16 training
        players, 8 held-out test players (query/gallery), 6 frames each; identity lives in jersey,
        shorts and number, backgrounds change per frame. One data seed per run seed.
Model:  `domainfm finetune --plugin sports-reid` with timm's `test_resnet` from random weights
        (no CLIP weights can be downloaded here, so "zero-shot" is the random starting encoder,
        not CLIP's: the measured gain is therefore an upper bound on what CLIP-ReIdent adds over a
        strong zero-shot start); 32 px, batch 8, 50 steps, lr 3e-3, warm-up 5.
Seeds:  SEEDS (default 0 1 2).
Metric: mAP and rank-1 on held-out players, fine-tuned - zero-shot per seed (both from the same
        run's JSON), Student-t 95 % interval over seeds.

    python benchmarks/claims/reid.py [--seeds 0 1 2] [--steps 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    work = common.setup("reid")
    md = common.load_make_data("sports_reid")
    res = {"mAP": [], "zero_shot_mAP": [], "rank1": [], "zero_shot_rank1": []}
    for seed in args.seeds:
        root = md.make_mmsports(work / f"data{seed}", train_players=16, test_players=8, frames=6, seed=seed)
        m = common.cli(["finetune", "--plugin", "sports-reid", "--data", root, "--backbone", "test_resnet", "--init", "random",
                        "--img-size", 32, "--batch-size", 8, "--max-steps", args.steps, "--lr", "3e-3",
                        "--warmup-steps", 5, "--checkpoint-every", 1000, "--seed", seed, "--accelerator", "cpu",
                        "--out", work / "outputs"], json_out=work / f"ft{seed}.json")
        for k in res:
            res[k].append(m[k])
        print(f"seed {seed}: mAP {m['mAP']:.3f} (zero-shot {m['zero_shot_mAP']:.3f}), rank-1 {m['rank1']:.3f} "
              f"(zero-shot {m['zero_shot_rank1']:.3f})", flush=True)
    script = "reid.py"
    common.clear_rows(script)
    n = len(args.seeds)
    for metric in ("mAP", "rank1"):
        d = [a - b for a, b in zip(res[metric], res[f"zero_shot_{metric}"])]
        common.record("4 CLIP-ReIdent: fine-tuned vs zero-shot", f"{metric}, held-out players", common.t_interval(d), n,
                      script=script, note=f"fine-tuned {sum(res[metric]) / n:.3f}, zero-shot (random start) "
                                          f"{sum(res[f'zero_shot_{metric}']) / n:.3f} (means)")
    common.plot_pairs(common.HERE / "reid.png", f"held-out players, {n} seeds",
                      {m: {"zero-shot": res[f"zero_shot_{m}"], "fine-tuned": res[m]} for m in ("mAP", "rank1")}, "score")


if __name__ == "__main__":
    main()
