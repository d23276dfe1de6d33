"""``domainfm eo-sar check|plot|sample``: look at a data folder before spending GPU hours on it.

Only click at import time (``domainfm plugins`` imports this module to list the commands).
"""

from __future__ import annotations

from pathlib import Path

import click

from domainfm.cli import run_cli_command
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import CLASS_NAMES, MODALITY_BANDS

_data = click.option("--data", type=click.Path(file_okay=False), default=None,
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


def _check_layout(ds) -> None:
    """``eo-sar check`` on a standard dataset: patches per split, sizes, CRSs, labels per class,
    band statistics (opens every band file)."""
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width))
    headers = ds.headers()
    sizes = Counter(f"{h['height']}x{h['width']}" for h in headers)
    crss = Counter(h["crs"] or "none" for h in headers)
    splits = Counter(ds.splits)
    labelled = [ds.labels_of(i) for i in range(len(ds))]
    known = [lab for lab in labelled if lab is not None]
    click.echo(f"{ds.root}: layout {ds.layout}, {len(ds)} {ds.modality} patches ({', '.join(f'{k} {v}' for k, v in splits.items())}), "
               f"{len(ds.bands)} bands {','.join(ds.bands)}, sizes {dict(sizes)}, CRS {dict(crss)}, {len(known)} with labels")
    table = Table(title="patches per class")
    table.add_column("class")
    table.add_column("patches", justify="right")
    for k, name in enumerate(ds.class_names):
        table.add_row(name, str(sum(int(lab[k]) for lab in known)))
    console.print(table)
    bands = Table(title="band statistics")
    for col in ("band", "mean", "std"):
        bands.add_column(col, justify="right")
    for name, m, s in zip(ds.bands, ds.stats.mean, ds.stats.std):
        bands.add_row(name, f"{m:.2f}", f"{s:.2f}")
    console.print(bands)
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
        from rich.table import Table

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
        table = Table(title="patches per class")
        table.add_column("class")
        table.add_column("patches", justify="right")
        for k, name in enumerate(CLASS_NAMES):
            table.add_row(name, str(sum(int(lab[k]) for lab in known)))
        console.print(table)
        bands = Table(title="band statistics")
        for col in ("band", "mean", "std"):
            bands.add_column(col, justify="right")
        for name, m, s in zip(ds.bands, ds.stats.mean, ds.stats.std):
            bands.add_row(name, f"{m:.2f}", f"{s:.2f}")
        console.print(bands)
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
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
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


@click.command("sample", short_help="Write a synthetic S2 / S1 / land-cover data folder.")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--patches", type=click.IntRange(min=1), default=48, show_default=True, help="Number of patches.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (same seed, same files).")
def sample_command(out: str, patches: int, seed: int) -> None:
    """Write a synthetic Sentinel-2 / Sentinel-1 / Dynamic World data folder to OUT (the generator
    of the embedded sample): a template of the expected layout."""

    def run():
        from plugins.eo_sar.synthetic import write_sample

        root = Path(out)
        if root.exists() and any(root.iterdir()):
            raise DomainFMError("folder is not empty", path=root, fix="give a new or empty folder")
        write_sample(root, n_patches=patches, seed=seed)
        click.echo(f"wrote {patches} patches to {root}/s2, s1, landcover")

    run_cli_command(run)
