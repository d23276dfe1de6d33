"""``domainfm predict --model models:/histo-TARGET@ALIAS SLIDE... --out DIR`` for slide-biomarker models.

For each whole slide, with the settings the model records (:mod:`plugins.histo.recipe`): tissue
detection and tiling at its µm/px and tile size, tile features from its encoder (the registered
version, the encoder shipped with the model, or the timm weights it names, each checked against
the recorded sha256), then the ensemble. Writes, under ``DIR``:

- ``features/<slide_id>.h5``: the tile features (the ``histo embed`` layout; a rerun reuses them);
- ``predictions.csv``: one row per slide: ``slide_id``, ``slide`` (path), ``prob_<class>`` per class
  (the mean of the members'), ``spread`` (the population standard deviation over the ensemble's
  members of the probability of the predicted class: 0 when they agree), ``n_tiles``, ``predicted``;
- ``heatmaps/<slide_id>.png``: the ensemble's attention over the slide's thumbnail;
- ``failures.csv`` when some slides could not be read (the others are predicted).

Everything is logged to the MLflow run ``domainfm predict`` opened (tagged with the model version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError


def options() -> list[Any]:
    """The flags ``domainfm predict`` grows for a histo model: how to run, never what the model knows."""
    import click

    from domainfm.config import ACCELERATOR_CHOICES, ACCELERATOR_HELP, PRECISION_CHOICES, PRECISION_HELP

    return [
        click.Option(["--batch-size"], type=int, default=64, show_default=True, help="Tiles per forward pass."),
        click.Option(["--num-workers"], type=int, default=None,
                     help="DataLoader processes reading tiles [default: min(4, CPUs available)]."),
        click.Option(["--precision"], type=click.Choice(PRECISION_CHOICES), default="32-true", show_default=True,
                     help=PRECISION_HELP),
        click.Option(["--accelerator"], type=click.Choice(ACCELERATOR_CHOICES), default="auto", show_default=True,
                     help=ACCELERATOR_HELP),
        click.Option(["--slide-mpp"], default=None,
                     help="µm/px of slides whose file states none: a number, or a CSV slide_id,mpp "
                          "[default: the value the model was trained with, if any]."),
    ]


def fallback_slide_mpp(paths: list[Path], recorded: float | None) -> dict[str, float] | None:
    """The recorded ``--slide-mpp`` of the training slides, for the new slides whose file states no
    plausible µm/px only (a slide's own value always wins); a notice names each such slide."""
    from plugins.histo import slides as slides_mod

    if recorded is None:
        return None
    out: dict[str, float] = {}
    for p in paths:
        try:
            slide = slides_mod.open_slide(p)
        except Exception:  # noqa: BLE001 - an unreadable slide is reported with the others' failures
            continue
        try:
            value, _ = slides_mod.file_mpp(slide.properties)
        finally:
            slide.close()
        if not slides_mod.plausible_mpp(value):
            out[slides_mod.slide_id(p)] = float(recorded)
            slides_mod.notice(f"{p}: no µm/px of its own; using the model's --slide-mpp {recorded:g}")
    return out or None


def predict(model_ref, inputs: list[str], out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """See the module docstring. ``model_ref``: a :class:`domainfm.predict.ModelRef`. Returns the
    summary (``slides``, ``failed``, ``tiles``, ``files``)."""
    from domainfm import tracking
    from domainfm.data import default_num_workers
    from plugins.histo import embedding, heatmaps, jobs
    from plugins.histo import recipe as recipe_mod
    from plugins.histo import slides as slides_mod

    out = Path(out)
    model = heatmaps.load_ensemble(str(model_ref.local_path()))
    recipe = model.recipe
    label = model_ref.uri
    paths = slides_mod.find_slides(list(inputs))
    slide_mpp = slides_mod.parse_slide_mpp(opts.get("slide_mpp"))
    if slide_mpp is None:
        slide_mpp = fallback_slide_mpp(paths, recipe.get("slide_mpp"))
    num_workers = opts.get("num_workers")
    settings = recipe_mod.embed_settings(
        recipe, out, encoder_file=model.artifacts.get("encoder"), model=label,
        batch_size=int(opts.get("batch_size") or 64),
        num_workers=default_num_workers() if num_workers is None else int(num_workers),
        precision=opts.get("precision") or "32-true", accelerator=opts.get("accelerator") or "auto",
        slide_mpp=slide_mpp)
    if settings.batch_size < 1 or settings.num_workers < 0:
        raise DomainFMError("--batch-size must be at least 1, --num-workers at least 0")
    # features left in this --out by another model would be read as this one's
    for p in paths:
        f = embedding.features_path(out, slides_mod.slide_id(p))
        if f.is_file() and recipe_mod.differences(recipe_mod.read_recipe(f), recipe):
            key = recipe_mod.differences(recipe_mod.read_recipe(f), recipe)[0]
            raise DomainFMError(f"made with {recipe_mod.describe(recipe_mod.read_recipe(f), key)}, {label} expects "
                                f"{recipe_mod.describe(recipe, key)}: features of another model in this --out",
                                path=f, fix="give predict a new --out folder, or delete its features/")
    report = embedding.embed_slides(paths, settings)
    failures = list(report.failed)
    done = set(report.done) | set(report.skipped)
    class_names = [str(c) for c in model.config["class_names"]]
    rows, pngs, tiles = [], [], 0
    with embedding.progress_bar() as progress:
        task = progress.add_task("predicting", total=len(paths))
        for p in paths:
            sid = slides_mod.slide_id(p)
            if sid not in done:
                progress.advance(task)
                continue
            fpath = embedding.features_path(out, sid)
            feats, coords, attrs = embedding.read_features(fpath)
            if len(feats) == 0:
                failures.append({"slide_id": sid, "path": str(p),
                                 "error": f"no tissue tile at min tissue {recipe.get('min_tissue')}"})
                progress.advance(task)
                continue
            res = model.predict(feats)
            members = np.asarray(res["member_probabilities"], np.float64)  # [M, C]
            probs = np.asarray(res["probabilities"], np.float64)
            k = int(np.argmax(probs))
            rows.append({"slide_id": sid, "slide": str(Path(p).resolve()),
                         **{f"prob_{c}": float(probs[j]) for j, c in enumerate(class_names)},
                         "spread": float(members[:, k].std()), "n_tiles": int(len(feats)),
                         "predicted": class_names[k]})
            title = f"{sid}  {class_names[k]}  p={probs[k]:.3f}  spread={members[:, k].std():.3f}"
            img = heatmaps.render_slide_heatmap(coords, attrs, np.asarray(res["attention"]), title=title,
                                                slide_path=p)
            pngs.append(heatmaps.save_png(img, out / "heatmaps" / f"{sid}.png"))
            tiles += len(feats)
            progress.advance(task)
    embedding.write_failures(out, failures)
    import click

    for f in failures:
        click.echo(f"warning: {f['slide_id']} not predicted: {f['error']}", err=True)
    if not rows:
        first = failures[0]["error"] if failures else "no slide"
        raise DomainFMError(f"no slide could be predicted ({len(failures)} failed; first: {first})",
                            path=out / embedding.FAILURES_FILE if failures else None,
                            fix="see the failures listed above")
    csv_path = jobs.write_csv(rows, out / "predictions.csv")
    tracking.log_artifact(csv_path)
    tracking.log_artifacts(out / "heatmaps", "heatmaps")
    if failures:
        tracking.log_artifact(out / embedding.FAILURES_FILE)
    tracking.set_tags({"histo.encoder": recipe_mod.encoder_label(recipe), "histo.mpp": recipe.get("mpp"),
                       "histo.tile_size": recipe.get("tile_size")})
    return {"slides": len(rows), "failed": len(failures), "tiles": tiles,
            "files": [str(csv_path), *(str(p) for p in pngs)]}
