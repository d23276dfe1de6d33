"""``domainfm evaluate --plugin eo-sar`` on a standard dataset (SSL4EO-S12, BigEarthNet v1/v2,
EuroSAT): frozen features, the official training split fits the probes, the test split scores.

- Multi-label sets (BigEarthNet's 19 classes; SSL4EO-S12 with Dynamic World labels): one-vs-rest
  logistic regression and cosine kNN (as :mod:`plugins.eo_sar.evaluation`), scored by
  ``linear_mAP_macro``/``_micro``, ``knn_mAP_macro``/``_micro``, AP per class and
  ``chance_mAP_macro`` (the AP of a constant score: the mean class share of the test patches).
- Single-label sets (EuroSAT's 10 classes): multinomial logistic regression and the kNN vote's
  top class, scored by ``linear_accuracy``, ``knn_accuracy`` and ``chance_accuracy`` (always
  answering the most frequent training class), plus ``plots/confusion_matrix.png``.

``--train-fraction F`` keeps a seeded share of the training split (SoftCon's BigEarthNet-10 %
protocol: 0.1). SSL4EO-S12 has no official split: its labelled locations are split by
``--test-fraction`` (seeded), as for the domainfm layout.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError


def subsample(indices, fraction: float, seed: int) -> list[int]:
    """A seeded share ``fraction`` of ``indices`` (at least one), in the original order."""
    indices = list(indices)
    if fraction >= 1.0 or not indices:
        return indices
    n = max(1, int(round(len(indices) * fraction)))
    keep = np.random.default_rng(seed).choice(len(indices), n, replace=False)
    return [indices[i] for i in sorted(keep)]


def multiclass_linear_probe(train_x, train_y, test_x, *, seed: int = 0, c: float = 1.0) -> np.ndarray:
    """Class predictions of a multinomial logistic regression on standardised features."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(np.asarray(train_y).tolist())) == 1:  # one class seen: that is the only answer
        return np.full(len(test_x), int(train_y[0]))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(np.asarray(train_x, np.float64), np.asarray(train_y))
    return model.predict(np.asarray(test_x, np.float64))


def confusion_matrix(true, pred, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts, rows = true class, columns = predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true, int), np.asarray(pred, int)), 1)
    return cm


def confusion_figure(cm: np.ndarray, names, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + 0.55 * len(names), 0.8 + 0.5 * len(names)))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def run_layout_evaluation(cfg, plugin, dataset, layout: str, *, plan=None) -> dict[str, Any]:
    """The evaluate job on a standard dataset (see the module doc); returns the metrics.
    ``plan`` (plugins.eo_sar.normalization.InputPlan): the backbone's statistics (already given to
    ``dataset``) and the alignment of the data's bands to the backbone's."""
    import click
    from torch.utils.data import Subset

    from domainfm import tracking
    from domainfm.backbones import create_backbone
    from domainfm.metrics import multilabel_average_precision
    from plugins.eo_sar.evaluation import (MIN_LABELLED, _device, extract_features, knn_scores, linear_probe_scores,
                                           per_class_ap_figure, split_indices)
    from plugins.eo_sar.transforms import ResizeWhole

    names = list(dataset.class_names)
    labelled = [i for i in range(len(dataset)) if dataset.labels_of(i) is not None]
    if layout == "ssl4eo-s12":
        if len(labelled) < MIN_LABELLED:
            raise DomainFMError(f"only {len(labelled)} location(s) have labels, the probes need at least {MIN_LABELLED}",
                                path=dataset.root, fix="pass --labels CSV or --landcover DIR (Dynamic World rasters)")
        tr, te = split_indices(len(labelled), cfg.test_fraction, cfg.seed)
        train, test = [labelled[i] for i in tr], [labelled[i] for i in te]
        protocol = f"seeded split of the labelled locations (--test-fraction {cfg.test_fraction})"
    else:
        train = [i for i in dataset.indices_of("train") if dataset.labels_of(i) is not None]
        test = [i for i in dataset.indices_of("test") if dataset.labels_of(i) is not None]
        protocol = "official splits: train fits the probes, test scores"
        for split, idx in (("train", train), ("test", test)):
            if not idx:
                raise DomainFMError(f"the {split} split has no patch on disk", path=dataset.root,
                                    fix=f"download the {split} patches of {layout}")
    fraction = getattr(cfg, "train_fraction", 1.0) or 1.0
    train = subsample(train, fraction, cfg.seed)
    click.echo(f"eo-sar: evaluating on {layout} ({protocol}); {len(train)} train"
               + (f" ({fraction:g} of the split)" if fraction < 1 else "") + f", {len(test)} test patches", err=True)

    aligned = plan is not None and plan.model_bands != plan.data_bands
    if plan is not None:
        plan.echo()
        tracking.set_tags(plan.record())
    backbone = create_backbone(cfg.model, cfg=cfg, in_chans=None if aligned else len(dataset.bands))
    dataset.transforms = ResizeWhole(backbone.img_size)
    if plan is not None:
        from plugins.eo_sar.normalization import AlignBands

        dataset.transforms = AlignBands(plan.alignment, dataset.transforms)
    order = train + test
    feats = extract_features(backbone, Subset(dataset, order), batch_size=cfg.batch_size,
                             device=_device(cfg.accelerator), num_workers=cfg.num_workers)
    f_train, f_test = feats[: len(train)], feats[len(train):]
    y_train = np.stack([dataset.labels_of(i) for i in train]).astype(np.int64)
    y_test = np.stack([dataset.labels_of(i) for i in test]).astype(np.int64)
    metrics: dict[str, Any] = {"n_train": len(train), "n_test": len(test), "feature_dim": int(feats.shape[1]),
                               "train_fraction": float(fraction)}

    if not dataset.multilabel:
        c_train, c_test = y_train.argmax(1), y_test.argmax(1)
        preds = {
            "linear": multiclass_linear_probe(f_train, c_train, f_test, seed=cfg.seed),
            "knn": knn_scores(f_train, y_train, f_test, k=cfg.knn_k).argmax(1),
        }
        for probe, p in preds.items():
            metrics[f"{probe}_accuracy"] = float((p == c_test).mean())
        majority = np.bincount(c_train, minlength=len(names)).argmax()
        metrics["chance_accuracy"] = float((c_test == majority).mean())
        cm = confusion_matrix(c_test, preds["linear"], len(names))
        fig = confusion_figure(cm, names, f"{layout} {cfg.modality}: linear probe, {len(test)} test patches "
                                          f"(accuracy {metrics['linear_accuracy']:.3f})")
        tracking.log_figure(fig, "plots/confusion_matrix.png")
        rows = [{"class": n, **{f"pred_{m}": int(cm[i, j]) for j, m in enumerate(names)}} for i, n in enumerate(names)]
        tracking.log_table_artifact(rows, "tables/confusion_matrix.csv")
        return metrics

    if not y_test.any():
        raise DomainFMError(f"none of the {len(test)} test patches has a label: average precision is undefined",
                            path=dataset.root, fix="use more labelled patches")
    scores = {"linear": linear_probe_scores(f_train, y_train, f_test, seed=cfg.seed),
              "knn": knn_scores(f_train, y_train, f_test, k=cfg.knn_k)}
    per_class: dict[str, list[float]] = {}
    for probe, s in scores.items():
        ap = multilabel_average_precision(s, y_test)
        metrics[f"{probe}_mAP_macro"] = ap["macro"]
        metrics[f"{probe}_mAP_micro"] = ap["micro"]
        per_class[probe] = ap["per_class"]
        for name, value in zip(names, ap["per_class"]):
            if not math.isnan(value):  # MLflow metric names: letters, digits, _ (no commas)
                metrics[f"{probe}_AP_{re.sub(r'[^0-9A-Za-z]+', '_', name).strip('_')}"] = value
    prevalence = y_test.mean(axis=0)
    metrics["chance_mAP_macro"] = float(prevalence[y_test.any(axis=0)].mean())
    short = [n if len(n) <= 24 else n[:22] + "…" for n in names]
    fig = per_class_ap_figure(short, per_class, chance=prevalence.tolist(),
                              title=f"{layout} {cfg.modality}: AP per class ({len(test)} test patches)")
    tracking.log_figure(fig, "plots/per_class_ap.png")
    rows = [{"class": n, "train_positives": int(y_train[:, c].sum()), "test_positives": int(y_test[:, c].sum()),
             "linear_AP": per_class["linear"][c], "knn_AP": per_class["knn"][c]} for c, n in enumerate(names)]
    tracking.log_table_artifact(rows, "tables/per_class_ap.csv")
    return metrics
