"""What eo-sar's commands run: ``domainfm evaluate --plugin eo-sar``.

How much land cover do frozen features know? Features of every labelled patch (whole patch
resized to the model size, no augmentation; :func:`domainfm.inference.extract_features`) feed two
probes (:mod:`plugins.eo_sar.probes`), fitted on training patches and scored on test patches:

- the domainfm layout (``ROOT/s2``, ``ROOT/s1``, ``landcover/`` or ``labels.csv``): the labelled
  patches are split once into train/test by ``--test-fraction`` (seeded);
- a standard dataset (SSL4EO-S12, BigEarthNet v1/v2, EuroSAT; :func:`run_layout_evaluation`): the
  official training split fits the probes, the test split scores. ``--train-fraction F`` keeps a
  seeded share of the training split (SoftCon's BigEarthNet-10 % protocol: 0.1). SSL4EO-S12 has no
  official split: its labelled locations are split by ``--test-fraction``, as for the domainfm layout.

Multi-label sets (Dynamic World's 9 classes, BigEarthNet's 19) are scored by multi-label average
precision: ``linear_mAP_macro``/``_micro``, ``knn_mAP_macro``/``_micro`` (macro: mean over classes
with a positive test patch; micro: all patch x class decisions pooled), AP per class, and
``chance_mAP_macro`` (the AP of a constant score: the mean class share of the test patches).
Single-label sets (EuroSAT's 10 classes) are scored by ``linear_accuracy``, ``knn_accuracy`` and
``chance_accuracy`` (always answering the most frequent training class), plus a confusion matrix.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import CLASS_NAMES
from plugins.eo_sar.probes import (MIN_LABELLED, knn_scores, linear_probe_scores, multiclass_linear_probe, split_indices,
                                   subsample)


def _features(cfg, backbone, dataset, indices) -> np.ndarray:
    """Frozen features [len(indices), D] of ``dataset``'s patches ``indices``, in that order."""
    from torch.utils.data import Subset

    from domainfm.inference import extract_features, resolve_device

    return extract_features(backbone, Subset(dataset, list(indices)), device=resolve_device(cfg.accelerator),
                            precision=cfg.precision, tome_r=int(getattr(cfg, "tome_r", 0) or 0),
                            batch_size=cfg.batch_size, num_workers=cfg.num_workers)


def _multilabel_metrics(names, scores: dict[str, np.ndarray], y_train: np.ndarray, y_test: np.ndarray,
                        metrics: dict[str, Any], title: str) -> dict[str, Any]:
    """Add AP per probe (macro, micro, per class) and the chance level to ``metrics``; log the
    per-class bar chart and table to the active run."""
    from domainfm import tracking
    from domainfm.metrics import multilabel_average_precision
    from plugins.eo_sar.plots import per_class_ap_figure

    per_class: dict[str, list[float]] = {}
    for probe, s in scores.items():
        ap = multilabel_average_precision(s, y_test)
        metrics[f"{probe}_mAP_macro"] = ap["macro"]
        metrics[f"{probe}_mAP_micro"] = ap["micro"]
        per_class[probe] = ap["per_class"]
        for name, value in zip(names, ap["per_class"]):
            if not math.isnan(value):  # a class without test positives has no AP to report
                # MLflow metric names: letters, digits, _ (no commas)
                metrics[f"{probe}_AP_{re.sub(r'[^0-9A-Za-z]+', '_', name).strip('_')}"] = value
    prevalence = y_test.mean(axis=0)
    # the AP of a constant score is the class's share of test patches: the floor to beat
    metrics["chance_mAP_macro"] = float(prevalence[y_test.any(axis=0)].mean())
    short = [n if len(n) <= 24 else n[:22] + "…" for n in names]
    fig = per_class_ap_figure(short, per_class, chance=prevalence.tolist(), title=title)
    tracking.log_figure(fig, "plots/per_class_ap.png")
    rows = [{"class": n, "train_positives": int(y_train[:, c].sum()), "test_positives": int(y_test[:, c].sum()),
             "linear_AP": per_class["linear"][c], "knn_AP": per_class["knn"][c]} for c, n in enumerate(names)]
    tracking.log_table_artifact(rows, "tables/per_class_ap.csv")
    return metrics


def run_evaluation(cfg, plugin) -> dict[str, Any]:
    """The evaluate job, inside the MLflow run the core opened; returns the metrics."""
    from domainfm import tracking
    from domainfm.backbones import create_backbone
    from plugins.eo_sar.band_stats import BandStats
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.normalization import AlignBands
    from plugins.eo_sar.transforms import ResizeWhole

    if not cfg.model:
        raise DomainFMError("evaluate needs the model to probe",
                            fix="pass --model PATH.safetensors or --model models:/NAME@ALIAS")
    in_chans = plugin.in_chans(cfg)
    root = plugin.data_root(cfg)
    # the backbone's recorded bands and statistics decide how the data is normalised and aligned
    plan = plugin.input_plan(cfg, source=cfg.model)
    stats = BandStats(plan.mean, plan.std) if plan.mean is not None else None
    if cfg.data:  # a standard dataset by its root path: official splits (run_layout_evaluation)
        import click

        from plugins.eo_sar.layouts import dataset_for, resolve_layout

        if resolve_layout(root, getattr(cfg, "layout", "auto"))[0] != "domainfm":
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
    dataset.transforms = AlignBands(plan.alignment, ResizeWhole(backbone.img_size))
    feats = _features(cfg, backbone, dataset, labelled)

    scores = {
        "linear": linear_probe_scores(feats[train], targets[train], feats[test], seed=cfg.seed),
        "knn": knn_scores(feats[train], targets[train], feats[test], k=cfg.knn_k),
    }
    metrics: dict[str, Any] = {"n_train": int(len(train)), "n_test": int(len(test)), "feature_dim": int(feats.shape[1]),
                               "bands_filled": len(plan.alignment.filled), "bands_dropped": len(plan.alignment.dropped)}
    return _multilabel_metrics(CLASS_NAMES, scores, targets[train], targets[test], metrics,
                               f"eo-sar {cfg.modality}: AP per class ({len(test)} test patches)")


def run_layout_evaluation(cfg, plugin, dataset, layout: str, *, plan=None) -> dict[str, Any]:
    """The evaluate job on a standard dataset (see the module doc); returns the metrics.
    ``plan`` (plugins.eo_sar.normalization.InputPlan): the backbone's statistics (already given to
    ``dataset``) and the alignment of the data's bands to the backbone's."""
    import click

    from domainfm import tracking
    from domainfm.backbones import create_backbone
    from plugins.eo_sar.plots import confusion_figure
    from plugins.eo_sar.probes import confusion_matrix
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
    feats = _features(cfg, backbone, dataset, train + test)
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
    return _multilabel_metrics(names, scores, y_train, y_test, metrics,
                               f"{layout} {cfg.modality}: AP per class ({len(test)} test patches)")
