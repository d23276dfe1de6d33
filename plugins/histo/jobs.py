"""What the slide-biomarker job runs, step by step (``pipelines/slide_biomarker.py`` chains them
inside one MLflow run): members trained per (fold, seed), the cross-validation evaluation and its
out-of-fold predictions, the one-shot baseline, the external evaluation, heatmaps, the warning
for predictions that learned nothing, and the ensemble registered as one pyfunc model.

Each step logs its own params, metrics, tables and plots to the active run through
``domainfm.tracking``; each takes the cohorts (``plugins.histo.cohort.Cohort``) and tile-feature
bags [N_tiles, D] as loaded by the pipeline.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from domainfm.errors import DomainFMError

from plugins.histo import ensemble as ens


def train_members(bags, y, folds_idx, n_classes, settings, seeds, seed, experiment, *, ext_bags, ext_y):
    """One member per (fold, seed), each logged as a child run with its learning curves."""
    from domainfm import tracking
    from domainfm.metrics import roc_auc
    from domainfm.output import progress_bar
    from plugins.histo.slide_metrics import balanced_accuracy

    members = []
    with progress_bar() as progress:
        task = progress.add_task(f"{len(folds_idx)} folds x {seeds} seeds", total=len(folds_idx) * seeds)
        for k, (tr, va) in enumerate(folds_idx):
            for member_seed in range(seed, seed + seeds):
                with tracking.start_run(experiment=experiment, nested=True, run_name=f"fold{k}-seed{member_seed}"):
                    tracking.log_params({"fold": k, "seed": member_seed, "model": settings.model,
                                         "n_train": len(tr), "n_val": len(va)})
                    state, best_epoch, val_probs, history = ens.train_one(
                        bags, y, tr, n_classes, settings, member_seed * 1000 + k, val_idx=va)
                    for rec in history:
                        tracking.log_metrics({key: v for key, v in rec.items() if key != "epoch"}, step=rec["epoch"])
                    m = ens.MemberResult(k, member_seed, state, best_epoch, va, val_probs, history)
                    m.val_auc = roc_auc(y[va], val_probs)
                    final = {"best_epoch": best_epoch, "val_auc": m.val_auc,
                             "val_balanced_accuracy": balanced_accuracy(y[va], val_probs)}
                    if ext_bags:
                        single = ens.ensemble_from_states(settings.model, bags[0].shape[1], n_classes, [state])
                        m.ext_probs, _ = ens.predict(single, ext_bags)
                        m.ext_auc = roc_auc(ext_y, m.ext_probs)
                        final.update({"external_auc": m.ext_auc,
                                      "external_balanced_accuracy": balanced_accuracy(ext_y, m.ext_probs)})
                    tracking.log_metrics(final)
                    members.append(m)
                progress.advance(task)
    return members


def out_of_fold(members, n_slides: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities [n_slides, C] (each slide's fold members averaged over their seeds)
    and the fold [n_slides] whose members left it out (-1 for a slide no member validated)."""
    total = np.zeros((n_slides, n_classes))
    count = np.zeros(n_slides)
    fold = np.full(n_slides, -1, dtype=np.int64)
    for m in members:
        total[m.val_idx] += m.val_probs
        count[m.val_idx] += 1
        fold[m.val_idx] = m.fold
    return total / np.maximum(count, 1)[:, None], fold


def prediction_rows(cohort, probs: np.ndarray, fold: np.ndarray) -> list[dict[str, Any]]:
    """One row per slide: slide_id, patient_id, fold, label (class name), prob_<class> per class."""
    return [{"slide_id": s, "patient_id": p, "fold": int(fold[i]), "label": cohort.class_names[int(t)],
             **{f"prob_{c}": float(probs[i, j]) for j, c in enumerate(cohort.class_names)}}
            for i, (s, p, t) in enumerate(zip(cohort.slide_ids, cohort.patient_ids, cohort.labels))]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def evaluate_cv(train, members, *, target: str, n_boot: int, seed: int,
                out: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Internal cross-validation: member AUCs, the out-of-fold ensemble's AUC with its bootstrap CI
    and balanced accuracy, the ROC plot (binary), and the out-of-fold predictions saved as
    ``OUT/tables/cv_predictions.csv`` and logged (the CSV under ``tables/`` and an MLflow table
    ``tables/cv_predictions.json``). Returns (metrics with ``constant_predictions`` for the caller
    to take out, out-of-fold probabilities [N, C], fold per slide [N])."""
    from domainfm import tracking
    from domainfm.metrics import is_constant, roc_auc_ci
    from plugins.histo.slide_metrics import balanced_accuracy

    y = train.labels
    tracking.log_table_artifact([m.summary() for m in members], "tables/members.csv")
    cv_aucs = np.array([m.val_auc for m in members])
    oof_mean, fold = out_of_fold(members, len(train), train.n_classes)
    rows = prediction_rows(train, oof_mean, fold)
    tracking.log_artifact(write_csv(rows, out / "tables" / "cv_predictions.csv"), "tables")
    tracking.log_table(rows, "tables/cv_predictions.json")
    auc, lo, hi = roc_auc_ci(y, oof_mean, n_boot=n_boot, seed=seed)
    if train.n_classes == 2:
        curves = [("members (own fold)" if i == 0 else None, y[m.val_idx], m.val_probs[:, 1],
                   {"c": "lightgrey", "lw": 0.8}) for i, m in enumerate(members)]
        curves.append(("ensemble, out of fold", y, oof_mean[:, 1], {"c": "C0", "lw": 2}))
        log_roc(curves, f"{target}: internal cross-validation", out, "plots/roc_cv.png")
    metrics = {"constant_predictions": ["out-of-fold ensemble"] if is_constant(oof_mean) else [],
               "cv_auc_mean": float(np.nanmean(cv_aucs)), "cv_auc_std": float(np.nanstd(cv_aucs)),
               "cv_auc_ensemble": auc, "cv_auc_ensemble_ci": [lo, hi],
               "cv_balanced_accuracy_ensemble": balanced_accuracy(y, oof_mean)}
    return metrics, oof_mean, fold


def train_oneshot(bags, y, members, n_classes, settings, seed, experiment) -> tuple[dict, int]:
    """The one-shot baseline in its own child run: all training slides, for the members' median
    best epoch count. Returns (state_dict, epochs)."""
    from domainfm import tracking

    n_oneshot = int(np.median([m.best_epoch + 1 for m in members]))
    with tracking.start_run(experiment=experiment, nested=True, run_name="oneshot"):
        tracking.log_params({"epochs": n_oneshot, "seed": seed, "model": settings.model, "n_train": len(y)})
        state, _, _, history = ens.train_one(bags, y, np.arange(len(y)), n_classes, settings, seed, epochs=n_oneshot)
        for rec in history:
            tracking.log_metrics({"train_loss": rec["train_loss"]}, step=rec["epoch"])
    return state, n_oneshot


def evaluate_external(external, ext_bags, members, states, oneshot_state, model_name, in_dim, n_classes,
                      class_names, target, n_boot, seed, max_heatmaps, out) -> dict[str, Any]:
    """The ensemble, the one-shot model and every member on the external cohort: AUCs with CIs,
    balanced accuracy, the predictions table, the ROC plot (binary) and the heatmaps of the most
    confidently positive slides. The returned metrics hold ``constant_predictions``."""
    from domainfm import tracking
    from domainfm.metrics import is_constant, roc_auc_ci
    from plugins.histo.heatmaps import log_cohort_heatmaps
    from plugins.histo.slide_metrics import balanced_accuracy

    ext_y = external.labels
    ens_probs, ens_attn = ens.predict(ens.ensemble_from_states(model_name, in_dim, n_classes, states), ext_bags)
    one_probs, _ = ens.predict(ens.ensemble_from_states(model_name, in_dim, n_classes, [oneshot_state]), ext_bags)
    auc_e, lo_e, hi_e = roc_auc_ci(ext_y, ens_probs, n_boot=n_boot, seed=seed)
    auc_o, lo_o, hi_o = roc_auc_ci(ext_y, one_probs, n_boot=n_boot, seed=seed)
    member_aucs = [m.ext_auc for m in members]
    rows = [{"slide_id": s, "patient_id": p, "label": class_names[int(t)],
             **{f"prob_ensemble_{c}": float(ens_probs[i, j]) for j, c in enumerate(class_names)},
             **{f"prob_oneshot_{c}": float(one_probs[i, j]) for j, c in enumerate(class_names)}}
            for i, (s, p, t) in enumerate(zip(external.slide_ids, external.patient_ids, ext_y))]
    tracking.log_table_artifact(rows, "tables/external_predictions.csv")
    if n_classes == 2:
        curves = [("members" if i == 0 else None, ext_y, m.ext_probs[:, 1], {"c": "lightgrey", "lw": 0.8})
                  for i, m in enumerate(members)]
        curves += [("ensemble", ext_y, ens_probs[:, 1], {"c": "C0", "lw": 2}),
                   ("one-shot", ext_y, one_probs[:, 1], {"c": "C3", "lw": 1.5, "ls": "--"})]
        log_roc(curves, f"{target}: external cohort", out, "plots/roc_external.png")
    # member-averaged attention of the most confidently positive external slides
    top = np.argsort(-ens_probs[:, -1])[:max(max_heatmaps, 0)]
    log_cohort_heatmaps(external, [(i, ens_probs[i, -1], ens_attn[i], "") for i in top], out)
    constant = [name for name, p in (("external ensemble", ens_probs), ("external one-shot", one_probs))
                if is_constant(p)]
    return {
        "constant_predictions": constant,
        "external_auc_ensemble": auc_e, "external_auc_ensemble_ci": [lo_e, hi_e],
        "external_balanced_accuracy_ensemble": balanced_accuracy(ext_y, ens_probs),
        "external_auc_oneshot": auc_o, "external_auc_oneshot_ci": [lo_o, hi_o],
        "external_balanced_accuracy_oneshot": balanced_accuracy(ext_y, one_probs),
        "external_auc_members_mean": float(np.mean(member_aucs)),
        "external_auc_members_min": float(np.min(member_aucs)),
        "external_auc_members_max": float(np.max(member_aucs)),
        # a model that ranks nothing has no gain to measure (0.5 - AUC is not one)
        "ensemble_gain_auc": None if constant else auc_e - auc_o,
    }


def confidence_extremes(probs: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``ceil(limit / 2)`` most and the ``floor(limit / 2)`` least confident rows of
    class probabilities [N, C] (confidence: the largest class probability; ties in row order),
    most confident first in both; disjoint, so a cohort of ``limit`` slides or fewer is drawn once."""
    limit = max(0, min(int(limit), len(probs)))
    order = np.argsort(-probs.max(axis=1), kind="stable")
    n_most = (limit + 1) // 2
    return order[:n_most], order[len(order) - (limit - n_most):]


def log_cv_heatmaps(train, bags, members, oof_probs, oof_fold, model_name, in_dim, n_classes, limit, out) -> None:
    """Without an external cohort: heatmaps of the most and least confident cross-validation slides,
    each drawn with the members of the fold that left it out (the probability shown is theirs)."""
    from plugins.histo.heatmaps import log_cohort_heatmaps

    most, least = confidence_extremes(oof_probs, limit)
    slides = []
    for picked, note in ((most, "most confident"), (least, "least confident")):
        for i in picked:
            fold_states = [m.state for m in members if m.fold == oof_fold[i]]
            probs, attn = ens.predict(ens.ensemble_from_states(model_name, in_dim, n_classes, fold_states), [bags[i]])
            slides.append((int(i), float(probs[0, -1]), attn[0], f"{note}, fold {int(oof_fold[i])}"))
    log_cohort_heatmaps(train, slides, out)


def report_constant(constant: list[str], metrics: dict[str, Any]) -> None:
    """Predictions that are one value for every slide (up to floating-point noise) mean the models
    learned nothing: one warning line, and the run says so in MLflow (tag
    ``histo.constant_predictions`` and metric ``constant_predictions``, the number of such sets)."""
    from domainfm import tracking

    metrics["constant_predictions"] = constant
    tracking.log_metrics({"constant_predictions": len(constant)})
    if not constant:
        return
    tracking.set_tags({"histo.constant_predictions": ", ".join(constant)})
    click.echo(f"warning: {' and '.join(constant)} gave every slide the same probability: the models learned "
               f"nothing from these features (AUC 0.5 by ties; no ensemble gain reported)", err=True)


def register_ensemble(bags, states, train, *, model_name, target, register_name, alias, out: Path,
                      recipe: dict[str, Any] | None = None) -> tuple[str, str]:
    """The ensemble as one pyfunc model (bag [N, D] in; probability, probabilities, attention out),
    logged under ``ensemble/`` and registered as ``register_name`` (default ``histo-<target>``) with
    ``alias``. ``recipe``: how the training features were made (:mod:`plugins.histo.recipe`),
    recorded in the model's config with the encoder's weights shipped along when they cannot be
    fetched again by name (:func:`encoder_to_ship`); the MLmodel names the plugin
    (``domainfm.plugin: histo``). Returns (model_uri, registered name)."""
    from domainfm import tracking
    from plugins.histo import pyfunc_model

    in_dim = bags[0].shape[1]
    encoder_file = encoder_to_ship(recipe, out / "model") if recipe else None
    artifacts = ens.save_ensemble(out / "model", model_name, in_dim, train.n_classes, states,
                                  class_names=train.class_names, target=target,
                                  features={**(recipe or {}), "target": target, "class_names": train.class_names},
                                  encoder_file=encoder_file)
    name = register_name or f"histo-{target}"
    # the signature MLflow infers from this is float32 [-1, D]: bags as `histo embed` writes them
    example = bags[0][: min(8, len(bags[0]))].astype(np.float32)
    with warnings.catch_warnings():
        # MLflow asks for type hints on predict(); its hints cannot express "a float32 [N, D] array"
        warnings.filterwarnings("ignore", message=".*type hints.*")
        from domainfm import jobs

        model_uri = tracking.log_pyfunc_model(Path(pyfunc_model.__file__), artifacts, artifact_path="ensemble",
                                              input_example=example, register=name, alias=alias,
                                              extra_pip=["numpy", "pandas"], metadata={"domainfm.plugin": "histo"},
                                              version_tags=jobs.version_tags("histo"))
    return model_uri, name


def encoder_to_ship(recipe: dict[str, Any], directory: Path) -> Path | None:
    """The tile encoder saved as ``directory/encoder.safetensors`` (a domainfm export) when the
    model must carry it: a random-initialised encoder (its seeded weights are not promised to be the
    same under another torch version or machine) or one from a local file (absent elsewhere). A
    registered encoder (pinned ``models:/NAME/VERSION``) and hub weights (dinov2/pretrained, fetched
    by name, checked by sha256 when applied) are not copied. None when nothing is shipped.

    The encoder is rebuilt from the record and its sha256 must be the one the features recorded:
    DomainFMError otherwise (the features were not made by what the record names)."""
    from domainfm.backbones import save_backbone
    from domainfm.backbones.sources import source_kind
    from plugins.histo import embedding
    from plugins.histo import recipe as recipe_mod

    enc = recipe.get("encoder")
    if not enc or enc.get("source") == "registry" or (enc.get("source") == "timm" and source_kind(enc["init"]) == "hub"):
        return None
    settings = recipe_mod.embed_settings(recipe, directory)
    backbone = embedding.build_encoder(settings)
    digest = embedding.state_sha256(backbone.model)
    if digest != enc["sha256"]:
        raise DomainFMError(f"the encoder {recipe_mod.encoder_label(recipe)} now has weights sha256 {digest[:12]}..., "
                            f"the training features were made with {enc['sha256'][:12]}...",
                            path=enc.get("path"), fix="embed the slides again with the encoder at hand")
    return save_backbone(backbone, Path(directory) / "encoder.safetensors")


def log_final_metrics(metrics: dict[str, Any]) -> None:
    """The scalar metrics on the active run, each interval as ``<key>_lo`` / ``<key>_hi``."""
    from domainfm import tracking

    tracking.log_metrics(metrics)
    for key in ("cv_auc_ensemble_ci", "external_auc_ensemble_ci", "external_auc_oneshot_ci"):
        if key in metrics:
            tracking.log_metrics({f"{key}_lo": metrics[key][0], f"{key}_hi": metrics[key][1]})


def log_roc(curves, title: str, out: Path, artifact: str) -> None:
    """One ROC panel (:func:`plugins.histo.slide_metrics.roc_figure`) saved under ``out`` and logged;
    curves whose labels hold one class are left out (no ROC there)."""
    from domainfm import tracking
    from plugins.histo.slide_metrics import roc_figure

    fig = roc_figure([c for c in curves if len(set(c[1].tolist())) > 1], title)
    (out / artifact).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / artifact, dpi=120)
    tracking.log_figure(fig, artifact)
