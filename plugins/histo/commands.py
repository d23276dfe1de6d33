"""``domainfm histo tile | embed | heatmap``: click commands; heavy imports inside the callbacks."""

from __future__ import annotations

import sys

import click

from domainfm.config import ACCELERATOR_CHOICES, ACCELERATOR_HELP, PRECISION_CHOICES, PRECISION_HELP
from domainfm.errors import DomainFMError

_SLIDE_MPP_HELP = ("µm/px of the slides: a number for all, or a CSV with columns slide_id,mpp. Beats the file's "
                   "own value (a note says so when they differ); needed where a file carries none or only a "
                   "placeholder outside 0.05-20 µm/px (72 or 300 dpi).  [default: the file's own]")


def _tiling_options(fn):
    for opt in reversed([
        click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
                     help="Target µm per pixel of the tiles (0.5 ≈ 20x, 0.25 ≈ 40x)."),
        click.option("--tile-size", type=click.IntRange(min=1), default=224, show_default=True, help="Tile side in pixels at --mpp."),
        click.option("--min-tissue", type=click.FloatRange(0.0, 1.0), default=0.6, show_default=True,
                     help="Keep a tile when at least this fraction of it is tissue."),
        click.option("--max-tiles", type=click.IntRange(min=1), default=None,
                     help="Keep at most this many tissue tiles per slide, drawn at random with --seed.  "
                          "[default: every tissue tile]"),
        click.option("--slide-mpp", default=None, help=_SLIDE_MPP_HELP),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --max-tiles draw."),
    ]):
        fn = opt(fn)
    return fn


def _finish(kind: str, n_total: int, failures: list[dict[str, str]], out_dir: str) -> None:
    """Summary on stderr; exit 1 when some slides failed (the others are done and kept)."""
    if not failures:
        return
    click.echo(f"error: {len(failures)} of {n_total} slides failed to {kind}; the others are done. "
               f"See {out_dir}/failures.csv:", err=True)
    for f in failures:
        click.echo(f"  {f['slide_id']}: {f['error']}", err=True)
    sys.exit(1)


from domainfm.cli import PathParam, fail, renamed_flags  # noqa: E402 - the one error -> exit 2

_FOLDER = PathParam(file_okay=False, fix="give a new or existing folder for the results")


@click.command("tile", context_settings={"max_content_width": 110})
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=_FOLDER, help="Output folder: coords/<slide_id>.h5 and thumbnails/<slide_id>.png.")
@_tiling_options
def tile_command(slides, out_dir, mpp, tile_size, min_tissue, max_tiles, slide_mpp, seed):
    """Find the tissue tiles of whole-slide images at a fixed µm/px.

    SLIDES are files or folders of any format OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF...) or plain
    images. Tissue is found on a thumbnail (Otsu on HSV saturation, morphology, hole filling); tiles
    are read from the pyramid level just finer than --mpp, so a 40x and a 20x scan give tiles of the
    same physical size. Coordinates are level-0 pixels.

    Slides that fail are listed in OUT/failures.csv; the others are still tiled and the command
    exits with status 1. Reruns overwrite.
    """
    try:
        from plugins.histo import embedding, tiling
        from plugins.histo import slides as slides_mod

        paths = slides_mod.find_slides(slides)
        override = slides_mod.parse_slide_mpp(slide_mpp)
        failures = []
        with embedding.progress_bar() as progress:
            task = progress.add_task("tiling", total=len(paths))
            for p in paths:
                try:
                    ts = tiling.tile_slide(p, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue,
                                           max_tiles=max_tiles, seed=seed, slide_mpp=override)
                    tiling.write_outputs(ts, out_dir)  # both files or neither
                    g = ts.geometry
                    progress.console.print(f"{ts.slide_id}: {len(ts.coords)} tiles ({g.tile_size_level0} px "
                                           f"at level 0, read from level {g.level})")
                except Exception as e:  # noqa: BLE001 - recorded, the batch goes on
                    tiling.remove_outputs(out_dir, slides_mod.slide_id(p))  # nothing of a failed slide stays
                    failures.append({"slide_id": slides_mod.slide_id(p), "path": str(p),
                                     "error": embedding.one_line_error(e)})
                progress.advance(task)
        embedding.write_failures(out_dir, failures)
    except DomainFMError as e:
        fail(e)
    _finish("tile", len(paths), failures, out_dir)


@click.command("embed", context_settings={"max_content_width": 110})
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=_FOLDER, help="Output folder: features/<slide_id>.h5 (+ failures.csv).")
@click.option("--coords", "coords_dir", default=None,
              type=PathParam(file_okay=False, fix="give the --out folder of `domainfm histo tile`"),
              help="Reuse the tiles of `histo tile --out DIR` instead of tiling again.")
@click.option("--backbone", default="vit_small_patch14_dinov2", show_default=True, help="timm architecture name.")
@click.option("--init", default="dinov2", show_default=True,
              help="Starting weights: dinov2/pretrained (local Hugging Face cache), a weights file, "
                   "models:/NAME@ALIAS, or random.")
@click.option("--model", "weights", default=None,
              help="The encoder to apply: a domainfm export (.safetensors) or models:/NAME@ALIAS; overrides "
                   "--init and --backbone.")
@_tiling_options
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per forward pass.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes reading tiles while the model runs [default: min(4, CPUs available)].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="32-true", show_default=True,
              help=PRECISION_HELP)
@click.option("--accelerator", type=click.Choice(ACCELERATOR_CHOICES), default="auto", show_default=True,
              help=ACCELERATOR_HELP)
@click.option("--devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes (one per GPU, or CPU processes) sharing the slides between them.")
@click.option("--num-nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines: start the command on each with srun (SLURM) or MASTER_ADDR/MASTER_PORT/NODE_RANK.")
@click.option("--tome-r", type=click.IntRange(min=0), default=0, show_default=True,
              help="Token merging (ToMe): merge this many tokens in every ViT block; faster, features approximate.")
def embed_command(slides, out_dir, coords_dir, backbone, init, weights, mpp, tile_size, min_tissue, max_tiles,
                  slide_mpp, seed, batch_size, num_workers, precision, accelerator, devices, num_nodes, tome_r):
    """Encode every tissue tile of whole-slide images with a frozen backbone.

    Writes OUT/features/<slide_id>.h5 with `features` [N, D] and `coords` [N, 2] (level 0) and attrs
    mpp, tile_size, tile_size_level0, encoder, domainfm_version: the layout CLAM and TRIDENT read;
    plus the recipe a slide-level model trained on them records (encoder source and weights sha256,
    tissue settings), so `domainfm predict` can embed new slides the same way.
    Files appear only when complete, so a rerun skips the slides already done. Slides that fail are
    listed in OUT/failures.csv, the others go on, and the command exits with status 1.
    """
    try:
        from plugins.histo import embedding
        from plugins.histo import slides as slides_mod

        from domainfm.data import default_num_workers

        if num_workers is None:
            num_workers = default_num_workers()
        if batch_size < 1 or num_workers < 0 or devices < 1:
            raise DomainFMError("--batch-size and --devices must be at least 1, --num-workers at least 0")
        from domainfm.distributed import check_launch

        check_launch(num_nodes=num_nodes)  # before any slide is read: a node alone would wait forever
        paths = slides_mod.find_slides(slides)
        settings = embedding.EmbedSettings(
            out_dir=out_dir, backbone=backbone, init=init, weights=weights, mpp=mpp, tile_size=tile_size,
            min_tissue=min_tissue, max_tiles=max_tiles, seed=seed, slide_mpp=slides_mod.parse_slide_mpp(slide_mpp),
            coords_dir=coords_dir, batch_size=batch_size, num_workers=num_workers, precision=precision,
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, tome_r=tome_r)
        if weights:  # an alias resolved once: every slide (and the features' encoder record) uses that version
            from domainfm.predict import pin_model

            settings.model_version = pin_model(weights)[1]
        if tome_r:  # a wrong --tome-r is one error before any slide is read
            embedding.build_encoder(settings)
        report = embedding.embed_slides(paths, settings)
    except DomainFMError as e:
        fail(e)
    if report is None:  # another rank of a multi-process run: global rank 0 reports for the job
        return
    click.echo(f"{len(report.done)} slides embedded ({report.tiles} tiles), {len(report.skipped)} already done, "
               f"{len(report.failed)} failed -> {out_dir}/features", err=True)
    _finish("embed", len(paths), report.failed, out_dir)


@click.command("heatmap", context_settings={"max_content_width": 110})
@click.argument("slide")
@click.option("--features", "features_file", required=True,
              type=PathParam(dir_okay=False, fix="give the slide's features/<slide_id>.h5 written by `domainfm histo embed`"),
              help="The slide's features/<slide_id>.h5 from `histo embed`.")
@click.option("--model", "model_uri", required=True,
              help="The slide-biomarker ensemble: models:/NAME@ALIAS, runs:/ID/ensemble, or the pipeline's "
                   "--out DIR/model folder.")
@click.option("--out", "out_file", required=True, type=PathParam(dir_okay=False, fix="give a file name, e.g. heatmap.png"),
              help="PNG to write.")
@click.option("--class-index", type=int, default=None,
              help="Class whose probability is shown (default: the positive class).")
def heatmap_command(slide, features_file, model_uri, out_file, class_index):
    """Draw a slide-biomarker model's attention over one slide's thumbnail.

    The attention of every ensemble member is averaged per tile, scaled to [0, 1] within the slide,
    and painted where each tile lies; the title gives the predicted probability. Features made
    otherwise than the model's training features (µm/px, tile size, encoder, tissue settings) are
    refused with one line naming the setting; `domainfm predict` embeds a slide the model's way.
    """
    try:
        from plugins.histo import heatmaps

        prob = heatmaps.heatmap_for_slide(slide, features_file, model_uri, out_file, class_index=class_index)
    except DomainFMError as e:
        fail(e)
    click.echo(f"probability {prob:.3f} -> {out_file}", err=True)


# old spellings keep working (hidden, with a one-line notice): --model is the encoder applied

renamed_flags(embed_command, {"--weights": "--model"})


def commands() -> list[click.Command]:
    return [tile_command, embed_command, heatmap_command]
