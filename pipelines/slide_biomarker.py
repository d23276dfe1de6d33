"""``domainfm pipeline slide-biomarker``: slide-level biomarker prediction from whole slides or tile features.

The steps, each a function of the histo plugin (this file only chains them and tracks them):
  [--slides: tile + embed]  ->  cohort + labels checks  ->  patient-stratified folds
  ->  one MIL member per (fold, seed), early-stopped on its own fold (an MLflow child run each)
  ->  one-shot model on all training slides (the baseline the ensemble must beat)
  ->  internal CV and external metrics: AUC + bootstrap CI, balanced accuracy, ROC plots
  ->  attention heatmaps of external slides  ->  the ensemble logged and registered as one pyfunc model
  ->  --json
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import click

from domainfm.cli import fail
from domainfm.errors import DomainFMError


@click.command("slide-biomarker", context_settings={"max_content_width": 110})
@click.option("--features", "features_dir", required=True,
              help="Tile features of the training cohort: the --out folder of `histo embed` (or a folder of .h5).")
@click.option("--labels", "labels_csv", required=True,
              help="CSV with slide_id,patient_id,label (or a column named --target).")
@click.option("--target", required=True,
              help="Biomarker name (MSI, HER2...): the label column if the CSV has one, and the model's name.")
@click.option("--external-features", default=None, help="Tile features of an external test cohort.")
@click.option("--external-labels", default=None, help="Labels CSV of the external cohort.")
@click.option("--slides", "slides_dir", default=None,
              help="Whole slides of the training cohort: embedded into --features first (finished slides are skipped).")
@click.option("--external-slides", default=None,
              help="Whole slides of the external cohort, embedded into --external-features.")
@click.option("--backbone", default="vit_small_patch14_dinov2", show_default=True, help="Encoder for --slides (timm name).")
@click.option("--init", default="dinov2", show_default=True,
              help="Encoder weights for --slides: dinov2, pretrained, random.")
@click.option("--weights", default=None, help="Encoder for --slides from a domainfm export or models:/NAME@ALIAS.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="µm/px of the tiles embedded from --slides.")
@click.option("--tile-size", type=int, default=224, show_default=True, help="Tile side embedded from --slides.")
@click.option("--slide-mpp", default=None,
              help="µm/px of the slides (a number or a CSV slide_id,mpp); beats a file's own value, needed where "
                   "a file has none or a placeholder.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Tiles per forward pass when embedding.")
@click.option("--num-workers", type=int, default=None,
              help="Slide-reading processes when embedding [default: min(4, CPUs available)].")
@click.option("--model", "model_name", type=click.Choice(["abmil", "chowder", "meanpool"]), default="abmil",
              show_default=True, help="Slide model: gated attention MIL, Chowder, or mean pooling.")
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-validation folds, split by patient.")
@click.option("--seeds", type=int, default=5, show_default=True, help="Members per fold (different seeds).")
@click.option("--epochs", type=int, default=30, show_default=True, help="Maximum epochs per member.")
@click.option("--patience", type=int, default=5, show_default=True,
              help="Early stopping: epochs without a lower validation loss.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="AdamW learning rate.")
@click.option("--max-tiles-per-slide", type=int, default=5000, show_default=True,
              help="Tiles sampled per slide at each training step (prediction uses all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold split and the first member.")
@click.option("--n-boot", type=int, default=1000, show_default=True, help="Bootstrap resamples of the AUC intervals.")
@click.option("--max-heatmaps", type=int, default=16, show_default=True,
              help="External slides drawn as attention heatmaps (most confident first).")
@click.option("--register", "register_name", default=None, help="Registered model name (default: histo-<target>).")
@click.option("--alias", default="candidate", show_default=True, help="Registry alias of the new version.")
@click.option("--experiment", default="domainfm-histo", show_default=True, help="MLflow experiment.")
@click.option("--run-name", default=None, help="MLflow run name (default: <target>-<model>).")
@click.option("--out", "out_dir", default=None, help="Also keep plots, heatmaps and the model files here.")
@click.option("--json", "json_path", default=None, help="Write the final metrics (and mlflow_run_id) to this JSON file.")
def command(**opts: Any) -> None:
    """Train a cross-validated ensemble of slide-level MIL models for one biomarker, measure it on
    internal CV and an external cohort against a one-shot retrained model, and register it in MLflow.

    Members: --folds folds x --seeds seeds, each trained on the other folds and early-stopped on its
    own; the ensemble averages member probabilities. AUCs come with 95% bootstrap intervals. The
    registered pyfunc model takes one bag of tile features [N, D] and returns the probability and
    the per-tile attention. Runs go to $MLFLOW_TRACKING_URI (default sqlite:///mlruns/mlflow.db).
    """
    try:
        embed_first(opts)
        metrics = run(**{k: v for k, v in opts.items() if k in RUN_OPTIONS})
    except DomainFMError as e:
        fail(e)
    from domainfm.cli import _print_metrics, _write_json

    _write_json(opts["json_path"], metrics)
    _print_metrics(f"slide-biomarker {opts['target']} ({opts['model_name']})",
                   {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})


RUN_OPTIONS = {"features_dir", "labels_csv", "target", "external_features", "external_labels", "model_name", "folds",
               "seeds", "epochs", "patience", "lr", "max_tiles_per_slide", "seed", "n_boot", "max_heatmaps",
               "register_name", "alias", "experiment", "run_name", "out_dir"}


def embed_first(opts: dict[str, Any]) -> None:
    """Steps 1-2 (tile + embed) when whole slides are given; slides that fail are reported and the
    labels check then names any labelled slide left without features."""
    from domainfm.data import default_num_workers
    from plugins.histo import embedding
    from plugins.histo import slides as slides_mod

    for slides_dir, feats in ((opts["slides_dir"], opts["features_dir"]),
                              (opts["external_slides"], opts["external_features"])):
        if not slides_dir:
            continue
        if not feats:
            raise DomainFMError("--external-slides needs --external-features (where the features go)")
        settings = embedding.EmbedSettings(
            out_dir=feats, backbone=opts["backbone"], init=opts["init"], weights=opts["weights"], mpp=opts["mpp"],
            tile_size=opts["tile_size"], slide_mpp=slides_mod.parse_slide_mpp(opts["slide_mpp"]),
            batch_size=opts["batch_size"],
            num_workers=default_num_workers() if opts.get("num_workers") is None else opts["num_workers"])
        report = embedding.embed_slides(slides_mod.find_slides([slides_dir]), settings)
        for f in report.failed:
            click.echo(f"warning: {f['slide_id']} not embedded: {f['error']}", err=True)


def run(*, features_dir, labels_csv, target, external_features=None, external_labels=None, model_name="abmil",
        folds=5, seeds=5, epochs=30, patience=5, lr=2e-4, max_tiles_per_slide=5000, seed=0, n_boot=1000,
        max_heatmaps=16, register_name=None, alias="candidate", experiment="domainfm-histo", run_name=None,
        out_dir=None) -> dict[str, Any]:
    """Steps 3-8 on tile features; returns the final metrics (with ``mlflow_run_id``)."""
    from plugins.histo import cohort as cohort_mod
    from plugins.histo import ensemble as ens

    if (external_features is None) != (external_labels is None):
        raise DomainFMError("--external-features and --external-labels go together", fix="give both or neither")
    if seeds < 1 or epochs < 1:
        raise DomainFMError("--seeds and --epochs must be at least 1")
    train = cohort_mod.load_cohort(features_dir, labels_csv, target)
    external = (cohort_mod.load_cohort(external_features, external_labels, target, class_names=train.class_names)
                if external_features else None)
    # every split precondition is checked here, before any feature is read or any model trained
    if external is not None:
        cohort_mod.check_external(external, train.class_names, external_labels)
    folds_idx = cohort_mod.patient_folds(train.labels, train.patient_ids, folds, seed, labels_csv,
                                         class_names=train.class_names)
    bags = train.load_bags()
    in_dim = bags[0].shape[1]
    ext_bags = external.load_bags() if external else []
    if ext_bags and ext_bags[0].shape[1] != in_dim:
        raise DomainFMError(f"external features are {ext_bags[0].shape[1]}-d, the training cohort's {in_dim}-d",
                            path=external_features, fix="embed both cohorts with the same encoder")
    settings = ens.TrainSettings(model=model_name, epochs=epochs, lr=lr, max_tiles=max_tiles_per_slide,
                                 patience=patience)
    scratch = None if out_dir else tempfile.TemporaryDirectory(prefix="slide-biomarker-")
    out = Path(out_dir) if out_dir else Path(scratch.name)  # without --out, files live only in MLflow
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _tracked_run(train, external, folds_idx, bags, ext_bags, settings, out, target=target, seeds=seeds,
                            seed=seed, n_boot=n_boot, max_heatmaps=max_heatmaps, register_name=register_name,
                            alias=alias, experiment=experiment, run_name=run_name,
                            params={"folds": folds, "epochs": epochs, "patience": patience, "lr": lr,
                                    "max_tiles_per_slide": max_tiles_per_slide, "features": str(features_dir),
                                    "labels": str(labels_csv), "external_features": str(external_features)})
    finally:
        if scratch is not None:
            scratch.cleanup()


def _tracked_run(train, external, folds_idx, bags, ext_bags, settings, out: Path, *, target, seeds, seed, n_boot,
                 max_heatmaps, register_name, alias, experiment, run_name, params) -> dict[str, Any]:
    """Everything that goes to MLflow: one parent run, a child run per member and the one-shot model."""
    import mlflow
    import numpy as np

    from domainfm import tracking
    from plugins.histo import ensemble as ens
    from domainfm.metrics import is_constant
    from plugins.histo.evaluation import auc_ci, balanced_accuracy

    model_name = settings.model
    in_dim = bags[0].shape[1]
    n_classes, y = train.n_classes, train.labels
    tracking.configure()
    metrics: dict[str, Any] = {}
    with tracking.start_run(experiment=experiment, run_name=run_name or f"{target}-{model_name}") as parent:
        mlflow.log_params({"target": target, "model": model_name, "seeds": seeds, "seed": seed, **params,
                           "n_train_slides": len(train), "n_train_patients": len(set(train.patient_ids)),
                           "n_external_slides": len(external) if external else 0, "feature_dim": in_dim,
                           "classes": ",".join(train.class_names)})

        # members, each in its own child run
        members = train_members(bags, y, folds_idx, n_classes, settings, seeds, seed, experiment,
                                ext_bags=ext_bags, ext_y=external.labels if external else None)
        tracking.log_table_artifact([m.summary() for m in members], "tables/members.csv")
        cv_aucs = np.array([m.val_auc for m in members])
        oof = np.zeros((seeds, len(train), n_classes))  # out-of-fold probabilities, one row per seed
        for m in members:
            oof[m.seed - seed, m.val_idx] = m.val_probs
        oof_mean = oof.mean(0)
        auc, lo, hi = auc_ci(y, oof_mean, n_boot=n_boot, seed=seed)
        constant = ["out-of-fold ensemble"] if is_constant(oof_mean) else []
        metrics.update({"cv_auc_mean": float(np.nanmean(cv_aucs)), "cv_auc_std": float(np.nanstd(cv_aucs)),
                        "cv_auc_ensemble": auc, "cv_auc_ensemble_ci": [lo, hi],
                        "cv_balanced_accuracy_ensemble": balanced_accuracy(y, oof_mean)})
        if n_classes == 2:
            curves = [("members (own fold)" if i == 0 else None, y[m.val_idx], m.val_probs[:, 1],
                       {"c": "lightgrey", "lw": 0.8}) for i, m in enumerate(members)]
            curves.append(("ensemble, out of fold", y, oof_mean[:, 1], {"c": "C0", "lw": 2}))
            log_roc(curves, f"{target}: internal cross-validation", out, "plots/roc_cv.png")

        # the one-shot baseline: all training slides, the members' median best epoch count
        n_oneshot = int(np.median([m.best_epoch + 1 for m in members]))
        with tracking.start_run(experiment=experiment, nested=True, run_name="oneshot"):
            mlflow.log_params({"epochs": n_oneshot, "seed": seed, "model": model_name, "n_train": len(train)})
            oneshot_state, _, _, history = ens.train_one(bags, y, np.arange(len(train)), n_classes, settings, seed,
                                                         epochs=n_oneshot)
            for rec in history:
                tracking.log_metrics({"train_loss": rec["train_loss"]}, step=rec["epoch"])
        metrics["oneshot_epochs"] = n_oneshot

        states = [m.state for m in members]
        if external:
            metrics.update(evaluate_external(external, ext_bags, members, states, oneshot_state, model_name, in_dim,
                                             n_classes, train.class_names, target, n_boot, seed, max_heatmaps, out))
            constant += metrics.pop("constant_predictions")
        report_constant(constant, metrics)

        # the ensemble as one registered pyfunc model
        from plugins.histo import pyfunc_model

        artifacts = ens.save_ensemble(out / "model", model_name, in_dim, n_classes, states,
                                      class_names=train.class_names, target=target)
        name = register_name or f"histo-{target}"
        # the signature MLflow infers from this is float32 [-1, D]: bags as `histo embed` writes them
        example = bags[0][: min(8, len(bags[0]))].astype(np.float32)
        with warnings.catch_warnings():
            # MLflow asks for type hints on predict(); its hints cannot express "a float32 [N, D] array"
            warnings.filterwarnings("ignore", message=".*type hints.*")
            model_uri = tracking.log_pyfunc_model(Path(pyfunc_model.__file__), artifacts, artifact_path="ensemble",
                                                  input_example=example, register=name, alias=alias,
                                                  extra_pip=["numpy", "pandas"])
        tracking.log_metrics(metrics)
        for key in ("cv_auc_ensemble_ci", "external_auc_ensemble_ci", "external_auc_oneshot_ci"):
            if key in metrics:
                tracking.log_metrics({f"{key}_lo": metrics[key][0], f"{key}_hi": metrics[key][1]})
        metrics.update({"model_uri": model_uri, "registered_model": f"models:/{name}@{alias}",
                        "n_members": len(members), "mlflow_run_id": parent.info.run_id})
    return metrics


def train_members(bags, y, folds_idx, n_classes, settings, seeds, seed, experiment, *, ext_bags, ext_y):
    """One member per (fold, seed), each logged as a child run with its learning curves."""
    import mlflow
    from rich.progress import Progress

    from domainfm import tracking
    from plugins.histo import ensemble as ens
    from plugins.histo.evaluation import balanced_accuracy

    members = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{len(folds_idx)} folds x {seeds} seeds", total=len(folds_idx) * seeds)
        for k, (tr, va) in enumerate(folds_idx):
            for member_seed in range(seed, seed + seeds):
                with tracking.start_run(experiment=experiment, nested=True, run_name=f"fold{k}-seed{member_seed}"):
                    mlflow.log_params({"fold": k, "seed": member_seed, "model": settings.model,
                                       "n_train": len(tr), "n_val": len(va)})
                    state, best_epoch, val_probs, history = ens.train_one(
                        bags, y, tr, n_classes, settings, member_seed * 1000 + k, val_idx=va)
                    for rec in history:
                        tracking.log_metrics({key: v for key, v in rec.items() if key != "epoch"}, step=rec["epoch"])
                    m = ens.MemberResult(k, member_seed, state, best_epoch, va, val_probs, history)
                    m.val_auc = ens.slide_auc(y[va], val_probs)
                    final = {"best_epoch": best_epoch, "val_auc": m.val_auc,
                             "val_balanced_accuracy": balanced_accuracy(y[va], val_probs)}
                    if ext_bags:
                        single = ens.ensemble_from_states(settings.model, bags[0].shape[1], n_classes, [state])
                        m.ext_probs, _ = ens.predict(single, ext_bags)
                        m.ext_auc = ens.slide_auc(ext_y, m.ext_probs)
                        final.update({"external_auc": m.ext_auc,
                                      "external_balanced_accuracy": balanced_accuracy(ext_y, m.ext_probs)})
                    tracking.log_metrics(final)
                    members.append(m)
                progress.advance(task)
    return members


def evaluate_external(external, ext_bags, members, states, oneshot_state, model_name, in_dim, n_classes,
                      class_names, target, n_boot, seed, max_heatmaps, out) -> dict[str, Any]:
    import numpy as np

    from domainfm import tracking
    from domainfm.metrics import is_constant
    from plugins.histo import ensemble as ens
    from plugins.histo.evaluation import auc_ci, balanced_accuracy

    ext_y = external.labels
    ens_probs, ens_attn = ens.predict(ens.ensemble_from_states(model_name, in_dim, n_classes, states), ext_bags)
    one_probs, _ = ens.predict(ens.ensemble_from_states(model_name, in_dim, n_classes, [oneshot_state]), ext_bags)
    auc_e, lo_e, hi_e = auc_ci(ext_y, ens_probs, n_boot=n_boot, seed=seed)
    auc_o, lo_o, hi_o = auc_ci(ext_y, one_probs, n_boot=n_boot, seed=seed)
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
    log_heatmaps(external, ens_probs, ens_attn, max_heatmaps, out)
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


def report_constant(constant: list[str], metrics: dict[str, Any]) -> None:
    """Predictions that are one value for every slide (up to floating-point noise) mean the models
    learned nothing: one warning line, and the run says so in MLflow (tag
    ``histo.constant_predictions`` and metric ``constant_predictions``, the number of such sets)."""
    import mlflow

    from domainfm import tracking

    metrics["constant_predictions"] = constant
    tracking.log_metrics({"constant_predictions": len(constant)})
    if not constant:
        return
    mlflow.set_tag("histo.constant_predictions", ", ".join(constant))
    click.echo(f"warning: {' and '.join(constant)} gave every slide the same probability: the models learned "
               f"nothing from these features (AUC 0.5 by ties; no ensemble gain reported)", err=True)


def log_roc(curves, title: str, out: Path, artifact: str) -> None:
    from domainfm import tracking
    from plugins.histo.evaluation import roc_figure

    fig = roc_figure([c for c in curves if len(set(c[1].tolist())) > 1], title)
    (out / artifact).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / artifact, dpi=120)
    tracking.log_figure(fig, artifact)


def log_heatmaps(external, probs, attentions, limit: int, out: Path) -> None:
    """Member-averaged attention of the most confidently positive external slides over their
    thumbnails (the slide file named in the features' attrs, else a white canvas)."""
    import mlflow
    import numpy as np

    from plugins.histo.embedding import read_features
    from plugins.histo.heatmaps import render_slide_heatmap, save_png

    if limit <= 0:
        return
    hdir = out / "heatmaps"
    for i in np.argsort(-probs[:, -1])[:limit]:
        _, coords, attrs = read_features(external.feature_files[i])
        title = f"{external.slide_ids[i]}  label={external.class_names[external.labels[i]]}  p={probs[i, -1]:.3f}"
        save_png(render_slide_heatmap(coords, attrs, attentions[i], title=title), hdir / f"{external.slide_ids[i]}.png")
    mlflow.log_artifacts(str(hdir), "heatmaps")
