"""Claim 2, continual pretraining helps and keeps: a backbone pretrained on one domain and then
continued on a second gets better on the second (k-NN rises) and keeps most of the first.

Data:   `domainfm eo-sar sample --patches 192 --seed 21` (pretraining) and `--patches 96 --seed 22`
        (held-out scenes). Domain A: the sample's farmland, forest and wetland biomes; domain B:
        arid, urban and alpine (other land-cover mixtures, bare soil, snow and built-up surfaces
        that A rarely or never shows). Same sensor, Sentinel-2 L1C, 13 bands.
Model:  tiny ViT (benchmarks/claims/tinyssl.py) with the core's SoftCon loss (hard + soft, cosine,
        ce), EMA teacher 0.99, AdamW 1e-3, batch 32.
Steps:  STEPS_A (default 80) on A with Siamese masking 0.5; then STEPS_B (default 60) on B, once
        with masking 0.5 and once without (0.0), from the same A model and the same batches.
Seeds:  SEEDS (default 0 1 2).
Metric: k-NN (k=5, cosine) macro mAP on held-out scenes of each domain; effects per seed: B after -
        B before (helps), A after - A before (keeps), and masked - unmasked on B; Student-t 95 %
        interval over seeds.

    python benchmarks/claims/continual.py [--steps-a 80] [--steps-b 60] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tinyssl  # noqa: E402

DOMAIN_A = (0, 1, 2)  # farmland, forest, wetland (order of plugins.eo_sar.synthetic.BIOMES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps-a", type=int, default=80)
    ap.add_argument("--steps-b", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    work = common.setup("continual")
    common.cli(["eo-sar", "sample", work / "train", "--patches", 192, "--seed", 21])
    common.cli(["eo-sar", "sample", work / "test", "--patches", 96, "--seed", 22])
    (b_tr, im_tr, y_tr), (b_te, im_te, y_te) = tinyssl.prepare(work / "train", work / "test")

    def pick(biomes, images, labels, domain_a: bool):
        idx = [i for i, b in enumerate(biomes) if (b in DOMAIN_A) == domain_a]
        return [images[i] for i in idx], labels[idx]

    tr = {d: pick(b_tr, im_tr, y_tr, d == "A") for d in "AB"}
    te = {d: pick(b_te, im_te, y_te, d == "A") for d in "AB"}

    def knn(model, d, seed):
        return tinyssl.probe_map(tinyssl.features(model, te[d][0]), te[d][1], seed=seed)["knn"]

    res = {k: [] for k in ("A_before", "B_before", "A_after_mask", "B_after_mask", "A_after_nomask", "B_after_nomask")}
    for seed in args.seeds:
        model_a = tinyssl.pretrain(*tr["A"], steps=args.steps_a, seed=seed, mask_ratio=0.5)
        res["A_before"].append(knn(model_a, "A", seed))
        res["B_before"].append(knn(model_a, "B", seed))
        for tag, ratio in (("mask", 0.5), ("nomask", 0.0)):
            model_b = tinyssl.pretrain(*tr["B"], steps=args.steps_b, seed=100 + seed, mask_ratio=ratio,
                                       model=copy.deepcopy(model_a))
            res[f"A_after_{tag}"].append(knn(model_b, "A", seed))
            res[f"B_after_{tag}"].append(knn(model_b, "B", seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in res.items()), flush=True)
    script = "continual.py"
    common.clear_rows(script)
    n = len(args.seeds)

    def diff(a, b):
        return common.t_interval([x - y for x, y in zip(res[a], res[b])])

    mean = {k: sum(v) / n for k, v in res.items()}
    for tag, label in (("mask", "masking 0.5"), ("nomask", "no masking")):
        common.record(f"2 Continual ({label}): helps on B", "knn mAP B, after - before", diff(f"B_after_{tag}", "B_before"),
                      n, script=script, note=f"B before {mean['B_before']:.3f}, after {mean[f'B_after_{tag}']:.3f}")
        common.record(f"2 Continual ({label}): keeps A", "knn mAP A, after - before", diff(f"A_after_{tag}", "A_before"),
                      n, expect="none", script=script,
                      note=f"A before {mean['A_before']:.3f}, after {mean[f'A_after_{tag}']:.3f}")
    common.record("2 Continual: masking vs none", "knn mAP B after, masked - unmasked", diff("B_after_mask", "B_after_nomask"),
                  n, expect="none", script=script)
    groups = {"domain B (new)": {"before": res["B_before"], "after, mask": res["B_after_mask"],
                                 "after, no mask": res["B_after_nomask"]},
              "domain A (first)": {"before": res["A_before"], "after, mask": res["A_after_mask"],
                                   "after, no mask": res["A_after_nomask"]}}
    common.plot_pairs(common.HERE / "continual.png", f"continual pretraining A -> B, {n} seeds", groups, "kNN macro mAP")


if __name__ == "__main__":
    main()
