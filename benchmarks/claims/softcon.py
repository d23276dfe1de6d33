"""Claim 1, SoftCon (Wang et al. 2024): adding the soft multi-label term to the hard contrastive
term gives better representations than the hard term alone, same steps and data.

Data:   `domainfm eo-sar sample --patches 192 --seed 11` for pretraining; held-out scenes from
        `domainfm eo-sar sample --patches 96 --seed 12` (other scenes, other draws) for the probes.
Model:  tiny ViT (benchmarks/claims/tinyssl.py: 32 px, patch 8, width 64, depth 2) + projector,
        EMA teacher 0.99, Siamese masking 0.5, AdamW 1e-3, batch 32, temperature 0.1.
Steps:  STEPS (default 80) per run; arms: hard only (soft weight 0), hard + soft (cosine, ce),
        hard + soft (jaccard, ce), hard + soft (cosine, bce).
Seeds:  SEEDS (default 0 1 2): each seed starts every arm from the same initial weights and the
        same batches (paired).
Metric: linear-probe and k-NN (k=5, cosine) macro mAP on a half/half split of the held-out scenes;
        effect = per-seed paired difference, mean with a Student-t 95 % interval over seeds.

    python benchmarks/claims/softcon.py [--steps 80] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tinyssl  # noqa: E402

ARMS = {
    "hard": dict(soft_weight=0.0),
    "hard+soft": dict(soft_weight=1.0, label_similarity="cosine", soft_target="ce"),
    "jaccard": dict(soft_weight=1.0, label_similarity="jaccard", soft_target="ce"),
    "bce": dict(soft_weight=1.0, label_similarity="cosine", soft_target="bce"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    work = common.setup("softcon")
    common.cli(["eo-sar", "sample", work / "train", "--patches", 192, "--seed", 11])
    common.cli(["eo-sar", "sample", work / "test", "--patches", 96, "--seed", 12])
    (_, im_tr, y_tr), (_, im_te, y_te) = tinyssl.prepare(work / "train", work / "test")
    scores = {a: {"linear": [], "knn": []} for a in ("untrained", *ARMS)}
    for seed in args.seeds:
        m = tinyssl.probe_map(tinyssl.features(tinyssl.make_model(13, seed), im_te), y_te, seed=seed)
        for k in m:
            scores["untrained"][k].append(m[k])
        print(f"seed {seed} untrained  linear mAP {m['linear']:.3f}  kNN mAP {m['knn']:.3f}", flush=True)
        for arm, kw in ARMS.items():
            model = tinyssl.pretrain(im_tr, y_tr, steps=args.steps, seed=seed, **kw)
            m = tinyssl.probe_map(tinyssl.features(model, im_te), y_te, seed=seed)
            for k in m:
                scores[arm][k].append(m[k])
            print(f"seed {seed} {arm:10s} linear mAP {m['linear']:.3f}  kNN mAP {m['knn']:.3f}", flush=True)
    script = "softcon.py"
    common.clear_rows(script)
    n = len(args.seeds)
    for metric in ("linear", "knn"):
        d = [a - b for a, b in zip(scores["hard+soft"][metric], scores["hard"][metric])]
        common.record("1 SoftCon: hard+soft vs hard", f"{metric} mAP, held-out scenes", common.t_interval(d), n,
                      script=script, note=f"hard {sum(scores['hard'][metric]) / n:.3f}, hard+soft "
                                          f"{sum(scores['hard+soft'][metric]) / n:.3f}, untrained "
                                          f"{sum(scores['untrained'][metric]) / n:.3f} (means)")
    for arm, name, expect in (("jaccard", "jaccard vs cosine", "none"), ("bce", "bce vs ce", "none")):
        d = [a - b for a, b in zip(scores[arm]["knn"], scores["hard+soft"]["knn"])]
        common.record(f"1 SoftCon: {name}", "knn mAP, held-out scenes", common.t_interval(d), n, expect=expect,
                      script=script)
    groups = {f"{metric} mAP": {a: scores[a][metric] for a in scores} for metric in ("linear", "knn")}
    common.plot_pairs(common.HERE / "softcon.png", f"SoftCon arms, {args.steps} steps, {n} seeds", groups, "macro mAP")


if __name__ == "__main__":
    main()
