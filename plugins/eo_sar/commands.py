"""``domainfm eo-sar check|plot|sample``: look at a data folder before spending GPU hours on it.

Only click at import time (``domainfm plugins`` imports this module to list the commands).
"""

from __future__ import annotations

from pathlib import Path

import click

from domainfm.cli import PathParam, run_cli_command
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import CLASS_NAMES, MODALITY_BANDS

_data = click.option("--data", type=PathParam(file_okay=False, fix="give the folder holding s2/<patch_id>.tif (and s1/, "
                                                                 "landcover/, labels.csv)"), default=None,
                     help="Data root (s2/, s1/, landcover/, labels.csv); the embedded sample when omitted.")
_modality = click.option("--modality", type=click.Choice(tuple(MODALITY_BANDS)), default="s2", show_default=True,
                         help="Which images to read: s2 (L1C, 13 bands), s2-l2a (L2A, 12 bands) or s1 (VV, VH in dB).")


def _layout_opts(fn):
    """``--layout``, ``--labels``, ``--landcover``, ``--views`` (plugins.eo_sar.layouts) as ``**layout_kw``."""
    from plugins.eo_sar import layout_options

    for opt in reversed(layout_options("check")):
        fn = click.option(*opt.opts, type=opt.type, default=opt.default, help=opt.help,
                          show_default=opt.show_default)(fn)
    return fn


def _layout_dataset(data: str | None, modality: str, label_threshold: float, layout_kw: dict):
    """The standard dataset at ``data`` (None for the domainfm layout or no --data)."""
    if not data:
        return None
    from domainfm.config import RunConfig
    from plugins.eo_sar.layouts import dataset_for, resolve_layout

    if resolve_layout(data, layout_kw.get("layout") or "auto")[0] == "domainfm":
        return None
    cfg = RunConfig(plugin="eo-sar", data=data, options={"modality": modality, "label_threshold": label_threshold,
                                                         **layout_kw})
    return dataset_for(cfg, Path(data), purpose="check", echo=lambda m: click.echo(m, err=True))[0]


def _print_summary_tables(console, class_names, known_labels, bands, stats) -> None:
    """``eo-sar check``'s two tables: labelled patches per class, and per-band mean/std."""
    from rich.table import Table

    table = Table(title="patches per class")
    table.add_column("class")
    table.add_column("patches", justify="right")
    for k, name in enumerate(class_names):
        table.add_row(name, str(sum(int(lab[k]) for lab in known_labels)))
    console.print(table)
    band_table = Table(title="band statistics")
    for col in ("band", "mean", "std"):
        band_table.add_column(col, justify="right")
    for name, m, s in zip(bands, stats.mean, stats.std):
        band_table.add_row(name, f"{m:.2f}", f"{s:.2f}")
    console.print(band_table)


def _check_layout(ds) -> None:
    """``eo-sar check`` on a standard dataset: patches per split, sizes, CRSs, labels per class,
    band statistics (opens every band file)."""
    from collections import Counter

    from rich.console import Console

    console = Console(width=max(110, Console().width))
    headers = ds.headers()
    sizes = Counter(f"{h['height']}x{h['width']}" for h in headers)
    crss = Counter(h["crs"] or "none" for h in headers)
    splits = Counter(ds.splits)
    labelled = [ds.labels_of(i) for i in range(len(ds))]
    known = [lab for lab in labelled if lab is not None]
    click.echo(f"{ds.root}: layout {ds.layout}, {len(ds)} {ds.modality} patches ({', '.join(f'{k} {v}' for k, v in splits.items())}), "
               f"{len(ds.bands)} bands {','.join(ds.bands)}, sizes {dict(sizes)}, CRS {dict(crss)}, {len(known)} with labels")
    _print_summary_tables(console, ds.class_names, known, ds.bands, ds.stats)
    infos = [ds.read_raw(r, 0)[2] for r in ds.records]
    option = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in ds.radiometry.items())
    click.echo(f"radiometry of {ds.root} ({len(infos)} patches, {option}):")
    for key, n in Counter(i.summary_key() for i in infos).most_common():
        click.echo(f"  {n:>6} patch(es): {key}")
    reordered = [i for i in infos if getattr(i, "layout_reordered", False)]
    if reordered:
        click.echo(f"  stored band order {','.join(reordered[0].file_band_names)} reordered to {','.join(ds.bands)} "
                   f"in {len(reordered)} patch(es)")

_s2_harmonize = click.option("--s2-harmonize", type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
                             help="Sentinel-2 baseline >= 04.00 (+1000 DN): auto subtracts 1000 where a file declares "
                                  "the offset or the baseline; on: every file; off: never.")
_s1_units = click.option("--s1-units", type=click.Choice(("db", "linear")), default="db", show_default=True,
                         help="Units of the Sentinel-1 files: db (as the model takes), or linear power "
                              "(converted with 10*log10).")
_threshold = click.option("--label-threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.01,
                          show_default=True, help="Minimum land-cover fraction for a class to be a label.")


def _dataset(data: str | None, modality: str, label_threshold: float, s2_harmonize: str = "auto", s1_units: str = "db"):
    from domainfm.config import RunConfig
    from plugins.eo_sar import plugin
    from plugins.eo_sar.datasets import EOSARPatches

    cfg = RunConfig(plugin="eo-sar", data=data, options={"modality": modality})
    return EOSARPatches(plugin.data_root(cfg), modality, label_threshold=label_threshold, s2_harmonize=s2_harmonize,
                        s1_units=s1_units)


@click.command("check", short_help="Validate a data folder as training will, and summarise it.")
@_data
@_modality
@_threshold
@_s2_harmonize
@_s1_units
@_layout_opts
def check_command(data: str | None, modality: str, label_threshold: float, s2_harmonize: str, s1_units: str,
                  **layout_kw) -> None:
    """Validate a data folder the way training will (every header, band counts, truncated files,
    labels.csv) and summarise it: patch sizes, CRSs, label counts per class, band statistics."""

    def run():
        from collections import Counter

        from rich.console import Console

        layout_ds = _layout_dataset(data, modality, label_threshold, {**layout_kw, "s2_harmonize": s2_harmonize,
                                                                       "s1_units": s1_units})
        if layout_ds is not None:
            return _check_layout(layout_ds)
        ds = _dataset(data, modality, label_threshold, s2_harmonize, s1_units)
        console = Console(width=max(110, Console().width))
        sizes = Counter(f"{f.height}x{f.width}" for f in ds.files)
        crss = Counter(f.crs or "none" for f in ds.files)
        labelled = [ds.labels_of(i) for i in range(len(ds))]
        known = [lab for lab in labelled if lab is not None]
        click.echo(f"{ds.root}: {len(ds)} {modality} patches, sizes {dict(sizes)}, CRS {dict(crss)}, "
                   f"{len(known)} with labels")
        _print_summary_tables(console, CLASS_NAMES, known, ds.bands, ds.stats)
        from plugins.eo_sar.radiometry import radiometry_summary

        for line in radiometry_summary([f.path for f in ds.files], modality=modality, s2_harmonize=s2_harmonize,
                                       s1_units=s1_units):
            click.echo(line)
        click.echo(f"band statistics cached in {ds.root / f'.domainfm_stats_{modality}.json'}")

    run_cli_command(run)


@click.command("plot", short_help="Draw one patch (S2 true colour, S1 false colour) to a PNG.")
@_data
@_modality
@_threshold
@_s2_harmonize
@_s1_units
@_layout_opts
@click.option("--patch-id", default=None, help="Patch to draw (file name without .tif); the first one when omitted.")
@click.option("--out", type=PathParam(dir_okay=False, fix="give a file name, e.g. patch.png"), required=True,
              help="PNG file to write.")
def plot_command(data: str | None, modality: str, label_threshold: float, s2_harmonize: str, s1_units: str,
                 patch_id: str | None, out: str, **layout_kw) -> None:
    """Draw one patch: true colour (B4, B3, B2) for S2, VV / VH / VV-VH false colour for S1, titled
    with its land-cover labels."""

    def run():
        ds = (_layout_dataset(data, modality, label_threshold, {**layout_kw, "s2_harmonize": s2_harmonize, "s1_units": s1_units})
              or _dataset(data, modality, label_threshold, s2_harmonize, s1_units))
        index = 0
        if patch_id is not None:
            if patch_id not in ds.patch_ids:
                raise DomainFMError(f"no patch {patch_id!r} in {ds.root if hasattr(ds, 'layout') else ds.root / modality}",
                                    fix=f"use one of {', '.join(ds.patch_ids[:5])}...")
            index = ds.patch_ids.index(patch_id)
        fig = ds.plot(ds[index], suptitle=ds.patch_ids[index])
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
        click.echo(str(path))

    run_cli_command(run)


@click.command("sample", short_help="Write a synthetic S2 / S1 / land-cover data folder, or a whole S2 scene.")
@click.argument("out", type=PathParam(file_okay=False, fix="give a new or empty folder to write the sample to"))
@click.option("--patches", type=click.IntRange(min=1), default=48, show_default=True,
              help="Number of patches (without --scene).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (same seed, same files).")
@click.option("--scene", is_flag=True, help="Write one whole Sentinel-2 L1C scene, OUT/s2_scene.tif (13 uint16 bands "
                                            "B1..B12/B8A, UTM 10 m grid, tiled, nodata 0 along a swath edge), to try "
                                            "`domainfm eo-sar embed` on, instead of the patches.")
@click.option("--size", type=click.IntRange(min=64, max=2048), default=1024, show_default=True,
              help="With --scene: its width and height in pixels (10 m each; about 0.4 GB of memory at 1024).")
def sample_command(out: str, patches: int, seed: int, scene: bool, size: int) -> None:
    """Write a synthetic Sentinel-2 / Sentinel-1 / Dynamic World data folder to OUT (the generator
    of the embedded sample): a template of the expected layout. With --scene: one whole Sentinel-2
    scene instead, the input `domainfm eo-sar embed` takes."""

    def run():
        from plugins.eo_sar.synthetic import write_sample, write_scene

        root = Path(out)
        if root.exists() and any(root.iterdir()):
            raise DomainFMError("folder is not empty", path=root, fix="give a new or empty folder")
        if scene:
            path = write_scene(root / "s2_scene.tif", size=size, seed=seed)
            click.echo(f"wrote a {size} x {size} px Sentinel-2 L1C scene to {path}")
            return
        write_sample(root, n_patches=patches, seed=seed)
        click.echo(f"wrote {patches} patches to {root}/s2, s1, landcover")

    run_cli_command(run)


@click.command("embed", short_help="Embedding maps of whole scenes: a georeferenced GeoTIFF per scene.",
               context_settings={"max_content_width": 110})
@click.argument("scenes", nargs=-1, required=True,
                type=PathParam(dir_okay=False, fix="give the scene GeoTIFF files (a shell glob: folder/*.tif)"))
@click.option("--model", required=True, help="The frozen backbone: a domainfm export (.safetensors) or models:/NAME@ALIAS; "
                                             "its recorded bands and statistics decide how the scene is normalised.")
@click.option("--out", "out_dir", required=True, type=PathParam(file_okay=False, fix="give a folder for the maps"),
              help="Output folder: <scene>_embedding.tif (or _dense.tif), .preview.png, .pca.npz/.json with --dims.")
@click.option("--window", type=click.IntRange(min=1), default=224, show_default=True, help="Window side in scene pixels (the model's input).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Step between windows in scene pixels: one output pixel per "
                                                       "window position  [default: the window]")
@click.option("--dense", is_flag=True, help="Write the ViT patch-token features (one output pixel per patch) instead "
                                            "of one pooled feature per window.")
@click.option("--dims", type=click.IntRange(min=1), default=None, help="Project to this many principal components, fitted on a seeded "
                                                     "sample of windows (saved beside the output).  [default: every "
                                                     "feature, no projection]")
@click.option("--pca-windows", type=click.IntRange(min=1), default=256, show_default=True,
              help="Windows sampled to fit --dims.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Windows per forward pass.")
@click.option("--tome-r", type=click.IntRange(min=0), default=0, show_default=True,
              help="Token merging (ToMe): tokens merged in every ViT block; faster, features approximate.")
@click.option("--modality", type=click.Choice(("s2", "s2-l2a", "s1")), default=None,
              help="How to read the scenes  [default: from their band names, else the model's]")
@_s2_harmonize
@_s1_units
@click.option("--precision", type=click.Choice(("32-true", "bf16-mixed", "16-mixed")), default="32-true",
              show_default=True, help="bf16-mixed autocasts on CPU or GPU; 16-mixed on GPU only.")
@click.option("--accelerator", type=click.Choice(("auto", "cpu", "gpu")), default="auto", show_default=True,
              help="Where the model runs: auto takes a GPU when there is one, else the CPU.")
@click.option("--nodata-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="A window (dense: a patch) with more nodata pixels than this is nodata in the output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --dims sample.")
@click.option("--devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes (one per GPU, or CPU processes) sharing each scene's rows of windows.")
@click.option("--num-nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines: start the command on each with srun (SLURM) or MASTER_ADDR/MASTER_PORT/NODE_RANK.")
@click.option("--reader-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads reading and normalising windows ahead of the model (0: 1 on CPU, where the model "
                   "needs the cores; 8 on a GPU). The output is the same, bit for bit, with any number.")
@click.option("--stop-after-rows", type=int, default=None, hidden=True)  # tests: stop as if killed
def embed_command(scenes, model, out_dir, window, stride, dense, dims, pca_windows, batch_size, tome_r, modality,
                  s2_harmonize, s1_units, precision, accelerator, nodata_fraction, seed, devices, num_nodes,
                  reader_threads, stop_after_rows) -> None:
    """Embed whole scenes (any size, any CRS) window by window with a frozen backbone.

    Each SCENE gives OUT/<scene>_embedding.tif: one pixel per window position, one float32 band per
    feature (or per principal component with --dims), the scene's CRS, pixels `--stride` scene pixels
    wide centred on their windows, NaN nodata where a window is mostly nodata; tiled and compressed,
    written a tile row at a time. A killed run resumes where it stopped (same result, bit for bit).
    A preview PNG (first three principal components over the scene's RGB) is logged to MLflow.
    With --devices/--num-nodes each process computes a disjoint share of every scene's rows of
    windows (Lightning's launcher) and rank 0 assembles the same GeoTIFF; a rerun redoes only the rows
    a dead process left missing.
    """

    def run():
        from domainfm.distributed import check_launch, is_global_zero

        check_launch(num_nodes=num_nodes)  # before any scene is read: a machine alone would wait forever
        from plugins.eo_sar.scene_embedding import (SceneEmbedSettings, already_done, prepare,
                                                    run_embedding)

        settings = SceneEmbedSettings(out_dir=out_dir, model=model, window=window, stride=stride, dense=dense,
                                      dims=dims, batch_size=batch_size, tome_r=tome_r, modality=modality,
                                      s2_harmonize=s2_harmonize, s1_units=s1_units, precision=precision,
                                      accelerator=accelerator, nodata_fraction=nodata_fraction, pca_windows=pca_windows,
                                      seed=seed, stop_after_rows=stop_after_rows, devices=devices,
                                      num_nodes=num_nodes, reader_threads=reader_threads)
        # every rank alike: nothing to compute, nothing to launch. Headers and fingerprints only, before
        # the model loads (the fingerprint names the model's version or file, not its weights)
        done = already_done(scenes, settings)
        if done is not None:
            if is_global_zero():
                which = "the scene is" if len(done) == 1 else f"all {len(done)} scenes are"
                click.echo(f"eo-sar: {which} already done with these settings: no MLflow run opened (delete an "
                           "output to compute it again)", err=True)
                _print_results(done)
            return
        job = prepare(scenes, settings)  # every check before a run opens or a file is written
        if not is_global_zero():  # a worker process of a multi-process run: rank 0 logs and reports
            run_embedding(job, log=lambda m: click.echo(f"eo-sar: {m}", err=True))
            return
        for line in job.messages:
            click.echo(f"eo-sar: {line.replace('; --stats data recomputes them from the data', '')}", err=True)

        from domainfm import tracking

        with tracking.start_run(experiment="domainfm-eo-sar", run_name="eo-sar embed") as run:
            tracking.log_params({"scenes": ",".join(scenes)[:5000],
                                 **{k: v for k, v in vars(settings).items() if k != "stop_after_rows"},
                                 "stride": settings.step})  # the resolved stride, not None for "the window"
            tracking.set_tags({"domainfm.command": "eo-sar embed", "domainfm.plugin": "eo-sar",
                               "domainfm.model_source": model, **job.record()})
            results = run_embedding(job, log=lambda m: click.echo(f"eo-sar: {m}", err=True))
            if devices * num_nodes > 1:
                tracking.log_metrics({"tile_rows_computed": sum(len(r.computed_rows or []) for r in results)})
            tracking.log_metrics({"scenes": len(results), "windows": sum(r.windows for r in results),
                                  "windows_embedded": sum(r.embedded for r in results),
                                  "windows_nodata": sum(r.skipped_nodata for r in results)})
            for r in results:
                if r.preview:
                    tracking.log_artifact(r.preview, "previews")
                if r.projection:
                    tracking.log_artifact(r.projection, "projections")
            click.echo(f"eo-sar: MLflow run {run.info.run_id}", err=True)
        _print_results(results)

    run_cli_command(run)


def _print_results(results) -> None:
    """``eo-sar embed``'s stdout: one line per scene, its output, shape and state."""
    for r in results:
        state = "already done" if r.already_done else "done" if r.complete else "stopped (rerun to resume)"
        click.echo(f"{r.path}\t{r.shape[0]} bands x {r.shape[1]} x {r.shape[2]} px\t{state}")
