"""``domainfm evaluate --plugin eo-sar``: how much land cover do frozen features know?

Features of every labelled patch (whole patch resized to the model size, no augmentation) are
split once into train/test (seeded). Two probes score the test patches per class:

- linear: standardised features, one-vs-rest logistic regression (sklearn);
- kNN: the ``k`` most cosine-similar training patches vote with weights ``exp(sim / T)``; a
  class's score is the weighted share of neighbours carrying it.

Both are summarised by multi-label average precision: macro (mean over classes that have a
positive test patch) and micro (all patch x class decisions pooled), plus AP per class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import CLASS_NAMES

KNN_TEMPERATURE = 0.07  # as in DINO's kNN evaluation: sharp enough that close neighbours dominate
MIN_LABELLED = 6


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random train/test split of ``range(n)`` (both parts non-empty, sorted)."""
    if n < 2:
        raise DomainFMError(f"need at least 2 labelled patches to split into train and test, got {n}")
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int,
               temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Multi-label kNN scores [n_test, K] in [0, 1] from cosine neighbours (see module doc)."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(test_x) @ unit(train_x).T  # [n_test, n_train]
    k = min(k, sim.shape[1])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sim, idx, axis=1)
    weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)  # shifted: no overflow
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkc->nc", weights, np.asarray(train_y, dtype=np.float64)[idx])


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, seed: int = 0,
                        c: float = 1.0) -> np.ndarray:
    """Probabilities [n_test, K] of one-vs-rest logistic regressions on standardised features.
    A class constant over the training set gets that constant as its score."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(),
                          OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "label not present in all training examples": handled
        model.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y, dtype=np.int64))
    return model.predict_proba(np.asarray(test_x, dtype=np.float64))


def per_class_ap_figure(names, results: dict[str, list[float]], *, chance: list[float] | None = None,
                        title: str = "average precision per class"):
    """Grouped bars, one group per class and one bar per probe; classes without test positives
    are marked n/a instead of a bar. ``chance`` (the AP of a constant score: the class's share of
    test patches) is drawn as a black tick over each group."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(names)), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(results))
    x = np.arange(len(names))
    for i, (probe, aps) in enumerate(results.items()):
        values = np.nan_to_num(np.asarray(aps, dtype=float), nan=0.0)
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=probe)
    chance_label = "chance (class share)"
    for j, ap in enumerate(next(iter(results.values()))):
        if math.isnan(ap):
            ax.text(j, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
        elif chance is not None:
            ax.hlines(chance[j], j - 0.45, j + 0.45, colors="black", linewidth=1.5, label=chance_label)
            chance_label = None  # one legend entry for all the ticks
    ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AP")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _stack_images(samples):
    """Collate only the images (a module-level function: picklable for spawned workers)."""
    import torch

    return torch.stack([s["image"] for s in samples])


def extract_features(backbone, dataset, *, batch_size: int, device: str, num_workers: int = 0) -> np.ndarray:
    """Pooled features [N, D] of ``dataset`` (samples with an ``image``) under ``torch.no_grad``."""
    import torch
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from domainfm.data import loader_kwargs

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_stack_images,
                        **loader_kwargs(num_workers))  # never fork a threaded process
    backbone = backbone.to(device).eval()
    out = []
    with torch.no_grad(), Progress(transient=True) as progress:
        task = progress.add_task("extracting features", total=len(loader))
        for images in loader:
            out.append(backbone(images.to(device)).float().cpu())
            progress.advance(task)
    feats = torch.cat(out).numpy()
    if not np.isfinite(feats).all():
        raise DomainFMError("the model produced NaN or infinite features", fix="check the weights (a diverged run?)")
    return feats


def _device(accelerator: str) -> str:
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def run_evaluation(cfg, plugin) -> dict[str, Any]:
    """The evaluate job, inside the MLflow run the core opened; returns the metrics."""
    from torch.utils.data import Subset

    from domainfm import tracking
    from domainfm.backbones import create_backbone
    from domainfm.metrics import multilabel_average_precision
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.transforms import ResizeWhole

    if not cfg.model:
        raise DomainFMError("evaluate needs the model to probe",
                            fix="pass --model PATH.safetensors or --model models:/NAME@ALIAS")
    from plugins.eo_sar.datasets import BandStats
    from plugins.eo_sar.normalization import AlignBands

    in_chans = plugin.in_chans(cfg)
    root = plugin.data_root(cfg)
    # the backbone's recorded bands and statistics decide how the data is normalised and aligned
    plan = plugin.input_plan(cfg, source=cfg.model)
    stats = BandStats(plan.mean, plan.std) if plan.mean is not None else None
    if cfg.data:  # a standard dataset by its root path: official splits (plugins.eo_sar.layout_eval)
        import click

        from plugins.eo_sar.layouts import dataset_for, resolve_layout

        if resolve_layout(root, getattr(cfg, "layout", "auto"))[0] != "domainfm":
            from plugins.eo_sar.layout_eval import run_layout_evaluation

            dataset, layout = dataset_for(cfg, root, purpose="evaluate", echo=lambda m: click.echo(m, err=True),
                                          stats=stats)
            return run_layout_evaluation(cfg, plugin, dataset, layout, plan=plan)
    dataset = EOSARPatches(root, cfg.modality, label_threshold=cfg.label_threshold, stats=stats,
                           s2_harmonize=getattr(cfg, "s2_harmonize", "auto"),
                           s1_units=getattr(cfg, "s1_units", "db"))  # file checks before the model
    labelled = [i for i in range(len(dataset)) if dataset.labels_of(i) is not None]
    if len(labelled) < MIN_LABELLED:
        raise DomainFMError(f"only {len(labelled)} patch(es) have labels, the probes need at least {MIN_LABELLED}",
                            path=root, fix="add landcover/<patch_id>.tif rasters or a labels.csv")
    targets = np.stack([dataset.labels_of(i) for i in labelled]).astype(np.int64)
    train, test = split_indices(len(labelled), cfg.test_fraction, cfg.seed)
    if not targets[test].any():
        raise DomainFMError(f"none of the {len(test)} test patches has a label: average precision is undefined",
                            path=root, fix="use more labelled patches or a larger --test-fraction")
    plan.echo()
    tracking.set_tags(plan.record())
    aligned = plan.model_bands != plan.data_bands
    backbone = create_backbone(cfg.model, cfg=cfg, in_chans=None if aligned else in_chans)
    if getattr(cfg, "tome_r", 0):
        from domainfm.inference import apply_token_merging

        apply_token_merging(backbone, cfg.tome_r)
    dataset.transforms = AlignBands(plan.alignment, ResizeWhole(backbone.img_size))
    feats = extract_features(backbone, Subset(dataset, labelled), batch_size=cfg.batch_size,
                             device=_device(cfg.accelerator), num_workers=cfg.num_workers)

    scores = {
        "linear": linear_probe_scores(feats[train], targets[train], feats[test], seed=cfg.seed),
        "knn": knn_scores(feats[train], targets[train], feats[test], k=cfg.knn_k),
    }
    metrics: dict[str, Any] = {"n_train": int(len(train)), "n_test": int(len(test)), "feature_dim": int(feats.shape[1]),
                               "bands_filled": len(plan.alignment.filled), "bands_dropped": len(plan.alignment.dropped)}
    per_class: dict[str, list[float]] = {}
    for probe, s in scores.items():
        ap = multilabel_average_precision(s, targets[test])
        metrics[f"{probe}_mAP_macro"] = ap["macro"]
        metrics[f"{probe}_mAP_micro"] = ap["micro"]
        per_class[probe] = ap["per_class"]
        for name, value in zip(CLASS_NAMES, ap["per_class"]):
            if not math.isnan(value):  # a class without test positives has no AP to report
                metrics[f"{probe}_AP_{name}"] = value

    prevalence = targets[test].mean(axis=0)
    has_positive = targets[test].any(axis=0)
    # the AP of a constant score is the class's share of test patches: the floor to beat
    metrics["chance_mAP_macro"] = float(prevalence[has_positive].mean())
    fig = per_class_ap_figure(CLASS_NAMES, per_class, chance=prevalence.tolist(),
                              title=f"eo-sar {cfg.modality}: AP per class ({len(test)} test patches)")
    tracking.log_figure(fig, "plots/per_class_ap.png")
    rows = [{"class": name, "train_positives": int(targets[train, c].sum()), "test_positives": int(targets[test, c].sum()),
             "linear_AP": per_class["linear"][c], "knn_AP": per_class["knn"][c]} for c, name in enumerate(CLASS_NAMES)]
    tracking.log_table_artifact(rows, "tables/per_class_ap.csv")
    return metrics
