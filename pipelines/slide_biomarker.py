"""``domainfm pipeline slide-biomarker``: slide-level biomarker prediction from whole slides or tile features.

The steps, each a function of the histo plugin (this file only chains them and tracks them):
  [SLIDES: tile + embed]  ->  cohort + labels checks  ->  patient-stratified folds
  ->  one MIL member per (fold, seed), early-stopped on its own fold (an MLflow child run each)
  ->  one-shot model on all training slides (the baseline the ensemble must beat)
  ->  internal CV and external metrics: AUC + bootstrap CI, balanced accuracy, ROC plots,
      out-of-fold and external predictions as tables
  ->  attention heatmaps of external slides (without an external cohort: the most and least confident
      cross-validation slides)  ->  the ensemble logged and registered as one pyfunc model that records
      how its features were made (encoder, µm/px, tile size, tissue settings: ``domainfm predict`` applies
      it to new slides with them)
  ->  --json, and a summary with the confidence intervals
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from domainfm.cli import PathParam, fail, renamed_flags
from domainfm.errors import DomainFMError


@click.command("slide-biomarker", context_settings={"max_content_width": 110})
@click.argument("slides", nargs=-1, required=False)
@click.option("--features", "features_dir", required=True,
              type=PathParam(file_okay=False, fix="give the --out folder of `domainfm histo embed`"),
              help="Tile features of the training cohort: the --out folder of `histo embed` (or a folder of .h5).")
@click.option("--labels", "labels_csv", required=True,
              type=PathParam(dir_okay=False, fix="give a CSV with columns slide_id,patient_id,label"),
              help="CSV with slide_id,patient_id,label (or a column named --target).")
@click.option("--target", required=True,
              help="Biomarker name (MSI, HER2...): the label column if the CSV has one, and the model's name.")
@click.option("--external-features", default=None,
              type=PathParam(file_okay=False, fix="give the --out folder of `domainfm histo embed` for that cohort"), help="Tile features of an external test cohort.")
@click.option("--external-labels", default=None,
              type=PathParam(dir_okay=False, fix="give a CSV with columns slide_id,patient_id,label"), help="Labels CSV of the external cohort.")
@click.option("--external-slides", default=None,
              help="Whole slides (a folder or file) of the external cohort, embedded into --external-features.")
@click.option("--backbone", default="vit_small_patch14_dinov2", show_default=True, help="Encoder for SLIDES (timm name).")
@click.option("--init", default="dinov2", show_default=True,
              help="Encoder weights for SLIDES: dinov2, pretrained, random.")
@click.option("--encoder", "encoder", default=None,
              help="Encoder for SLIDES from a domainfm export or models:/NAME@ALIAS (beats --backbone/--init).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True, help="µm/px of the tiles embedded from SLIDES.")
@click.option("--tile-size", type=click.IntRange(min=1), default=224, show_default=True, help="Tile side embedded from SLIDES.")
@click.option("--min-tissue", type=click.FloatRange(0.0, 1.0), default=0.6, show_default=True,
              help="Tissue fraction a tile embedded from SLIDES must have.")
@click.option("--slide-mpp", default=None,
              help="µm/px of the slides (a number or a CSV slide_id,mpp); beats a file's own value, needed where "
                   "a file has none or a placeholder.  [default: the file's own]")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per forward pass when embedding.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Slide-reading processes when embedding [default: min(4, CPUs available)].")
@click.option("--mil", "model_name", type=click.Choice(["abmil", "chowder", "meanpool"]), default="abmil",
              show_default=True, help="Slide model: gated attention MIL, Chowder, or mean pooling.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-validation folds, split by patient.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Members per fold (different seeds).")
@click.option("--max-epochs", "epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Maximum epochs per member.")
@click.option("--patience", type=click.IntRange(min=0), default=5, show_default=True,
              help="Early stopping: epochs without a lower validation loss.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True, help="AdamW learning rate.")
@click.option("--max-tiles", "max_tiles_per_slide", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Tiles sampled per slide at each training step (prediction uses all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold split and the first member.")
@click.option("--n-boot", type=click.IntRange(min=1), default=1000, show_default=True, help="Bootstrap resamples of the AUC intervals.")
@click.option("--max-heatmaps", type=click.IntRange(min=0), default=16, show_default=True,
              help="Slides drawn as attention heatmaps: the most confidently positive external slides, or "
                   "without an external cohort the most and least confident cross-validation slides.")
@click.option("--register", "register_name", default=None, help="Registered model name (default: histo-<target>).")
@click.option("--alias", default="candidate", show_default=True, help="Registry alias of the new version.")
@click.option("--experiment", default="domainfm-histo", show_default=True, help="MLflow experiment.")
@click.option("--run-name", default=None, help="MLflow run name (default: <target>-<model>).")
@click.option("--out", "out_dir", default=None, help="Also keep plots, heatmaps and the model files here.")
@click.option("--json", "json_path", default=None, help="Write the final metrics (and mlflow_run_id) to this JSON file.")
def command(**opts: Any) -> None:
    """Train a cross-validated ensemble of slide-level MIL models for one biomarker, measure it on
    internal CV and an external cohort against a one-shot retrained model, and register it in MLflow.

    SLIDES (optional): whole slides (files or folders) of the training cohort, tiled and embedded into
    --features first (finished slides are skipped); the external cohort's slides go to
    --external-slides. Without SLIDES, --features holds `histo embed` output already.

    Members: --folds folds x --seeds seeds, each trained on the other folds and early-stopped on its
    own; the ensemble averages member probabilities. AUCs come with 95% bootstrap intervals. The
    registered pyfunc model takes one bag of tile features [N, D] and returns the probability and
    the per-tile attention; it records the encoder, µm/px, tile size and tissue settings of its
    features, so `domainfm predict --model models:/histo-TARGET@ALIAS SLIDE... --out DIR` applies it
    to new whole slides. Runs go to $MLFLOW_TRACKING_URI (default sqlite:///mlruns/mlflow.db).

    \b
    Example:
      domainfm pipeline slide-biomarker slides/ --features work/ --labels labels.csv --target MSI \\
          --encoder models:/histo-encoder@champion --mpp 0.5 --tile-size 224 --mil abmil --max-epochs 30
    """
    try:
        embed_first(opts)
        metrics = run(**{k: v for k, v in opts.items() if k in RUN_OPTIONS})
    except DomainFMError as e:
        fail(e)
    from domainfm.cli import print_metrics, write_json
    from plugins.histo.slide_metrics import summary

    write_json(opts["json_path"], metrics)
    print_metrics(f"slide-biomarker {opts['target']} ({opts['model_name']})", summary(metrics))


RUN_OPTIONS = {"features_dir", "labels_csv", "target", "external_features", "external_labels", "model_name", "folds",
               "seeds", "epochs", "patience", "lr", "max_tiles_per_slide", "seed", "n_boot", "max_heatmaps",
               "register_name", "alias", "experiment", "run_name", "out_dir"}


def embed_first(opts: dict[str, Any]) -> None:
    """Steps 1-2 (tile + embed) when whole slides are given; slides that fail are reported and the
    labels check then names any labelled slide left without features."""
    from domainfm.data import default_num_workers
    from plugins.histo import embedding
    from plugins.histo import slides as slides_mod

    for slides, feats in ((list(opts["slides"] or []), opts["features_dir"]),
                          ([opts["external_slides"]] if opts["external_slides"] else [], opts["external_features"])):
        if not slides:
            continue
        if not feats:
            raise DomainFMError("--external-slides needs --external-features (where the features go)")
        settings = embedding.EmbedSettings(
            out_dir=feats, backbone=opts["backbone"], init=opts["init"], weights=opts["encoder"], mpp=opts["mpp"],
            tile_size=opts["tile_size"], min_tissue=opts["min_tissue"],
            slide_mpp=slides_mod.parse_slide_mpp(opts["slide_mpp"]),
            batch_size=opts["batch_size"],
            num_workers=default_num_workers() if opts.get("num_workers") is None else opts["num_workers"])
        report = embedding.embed_slides(slides_mod.find_slides(slides), settings)
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
        raise DomainFMError("--seeds and --max-epochs must be at least 1")
    train = cohort_mod.load_cohort(features_dir, labels_csv, target)
    external = (cohort_mod.load_cohort(external_features, external_labels, target, class_names=train.class_names)
                if external_features else None)
    # every split precondition is checked here, before any feature is read or any model trained
    if external is not None:
        cohort_mod.check_external(external, train.class_names, external_labels)
    folds_idx = cohort_mod.patient_folds(train.labels, train.patient_ids, folds, seed, labels_csv,
                                         class_names=train.class_names)
    from plugins.histo import recipe as recipe_mod

    # how the features were made (the registered model records it): one way for the whole cohort
    recipe = recipe_mod.cohort_recipe(train.feature_files)
    if external is not None:
        ext_recipe = recipe_mod.cohort_recipe(external.feature_files, what="external")
        recipe_mod.check_features(ext_recipe, recipe, external.feature_files[0], model="the training cohort")
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
                            alias=alias, experiment=experiment, run_name=run_name, recipe=recipe,
                            params={"folds": folds, "epochs": epochs, "patience": patience, "lr": lr,
                                    "max_tiles_per_slide": max_tiles_per_slide, "features": str(features_dir),
                                    "labels": str(labels_csv), "external_features": str(external_features)})
    finally:
        if scratch is not None:
            scratch.cleanup()


def _tracked_run(train, external, folds_idx, bags, ext_bags, settings, out: Path, *, target, seeds, seed, n_boot,
                 max_heatmaps, register_name, alias, experiment, run_name, params, recipe=None) -> dict[str, Any]:
    """One parent MLflow run: a child run per member and the one-shot model, each step a histo job."""
    from domainfm import tracking
    from plugins.histo import jobs

    model_name = settings.model
    in_dim = bags[0].shape[1]
    n_classes, y = train.n_classes, train.labels
    tracking.configure()
    with tracking.start_run(experiment=experiment, run_name=run_name or f"{target}-{model_name}") as parent:
        tracking.set_tags({"domainfm.plugin": "histo", "domainfm.command": "pipeline slide-biomarker"})
        if recipe:
            from plugins.histo.recipe import encoder_label

            tracking.log_params({"encoder": encoder_label(recipe), "mpp": recipe.get("mpp"),
                                 "tile_size": recipe.get("tile_size"), "min_tissue": recipe.get("min_tissue")})
        tracking.log_params({"target": target, "model": model_name, "seeds": seeds, "seed": seed, **params,
                             "n_train_slides": len(train), "n_train_patients": len(set(train.patient_ids)),
                             "n_external_slides": len(external) if external else 0, "feature_dim": in_dim,
                             "classes": ",".join(train.class_names)})
        members = jobs.train_members(bags, y, folds_idx, n_classes, settings, seeds, seed, experiment,
                                     ext_bags=ext_bags, ext_y=external.labels if external else None)
        metrics, oof_probs, oof_fold = jobs.evaluate_cv(train, members, target=target, n_boot=n_boot, seed=seed,
                                                        out=out)
        constant = metrics.pop("constant_predictions")
        oneshot_state, metrics["oneshot_epochs"] = jobs.train_oneshot(bags, y, members, n_classes, settings, seed,
                                                                      experiment)
        states = [m.state for m in members]
        if external:
            metrics.update(jobs.evaluate_external(external, ext_bags, members, states, oneshot_state, model_name,
                                                  in_dim, n_classes, train.class_names, target, n_boot, seed,
                                                  max_heatmaps, out))
            constant += metrics.pop("constant_predictions")
        else:
            jobs.log_cv_heatmaps(train, bags, members, oof_probs, oof_fold, model_name, in_dim, n_classes,
                                 max_heatmaps, out)
        jobs.report_constant(constant, metrics)
        model_uri, name = jobs.register_ensemble(bags, states, train, model_name=model_name, target=target,
                                                 register_name=register_name, alias=alias, out=out,
                                                 recipe=recipe)
        jobs.log_final_metrics(metrics)
        metrics.update({"model_uri": model_uri, "registered_model": f"models:/{name}@{alias}",
                        "n_members": len(members), "mlflow_run_id": parent.info.run_id})
    return metrics


# old spellings keep working (hidden, with a one-line notice): issue 13's one flag vocabulary
renamed_flags(command, {"--slides": None, "--epochs": "--max-epochs", "--max-tiles-per-slide": "--max-tiles",
                        "--model": "--mil", "--weights": "--encoder"})
