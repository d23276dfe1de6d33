"""Tile features for whole slides (``histo embed``): tile, read in DataLoader workers, encode, save.

One HDF5 file per slide, ``features/<slide_id>.h5``, the layout CLAM and TRIDENT read: datasets
``features`` [N, D] float32 and ``coords`` [N, 2] int64 (level 0), attrs ``mpp``, ``tile_size``,
``tile_size_level0``, ``encoder``, ``domainfm_version`` (plus ``slide_path``, ``slide_mpp``), and the
recipe a slide-level model records to embed new slides the same way (:mod:`plugins.histo.recipe`):
``encoder_record`` (JSON: where the encoder comes from), ``encoder_sha256`` (of its weights as
loaded), ``feature_dim``, the tissue settings ``min_tissue``, ``max_tiles`` (0: all), ``seed`` and
``slide_mpp_setting`` (the ``--slide-mpp`` number given, -1 for none or a per-slide CSV).
Each file is written under a temporary name and renamed, so a rerun skips exactly the slides that
finished. A slide that fails is listed in ``failures.csv`` and the others go on.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError
from domainfm.inference import FrozenEncoder, resolve_device
from plugins.histo import slides as slides_mod
from plugins.histo import tiling

FAILURES_FILE = "failures.csv"


@dataclass
class EmbedSettings:
    """What ``histo embed`` needs besides the slides; plain values so it crosses process spawns."""

    out_dir: str
    backbone: str = "vit_small_patch14_dinov2"
    init: str = "dinov2"
    weights: str | None = None
    mpp: float = tiling.DEFAULT_MPP
    tile_size: int = tiling.DEFAULT_TILE_SIZE
    min_tissue: float = tiling.DEFAULT_MIN_TISSUE
    max_tiles: int | None = None
    seed: int = 0
    slide_mpp: float | dict[str, float] | None = None
    coords_dir: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    progress: bool = True
    tome_r: int = 0  # token merging: tokens merged per ViT block (0: off)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (tests: depth=2)
    # the encoder a slide-level model recorded (domainfm predict): its sha256 must be the rebuilt one's
    expect_sha256: str | None = None
    expect_source: str = ""  # what the expected encoder is called in that error (the model URI)
    model_version: str | None = None  # NAME/VERSION a models:/ --model resolved to, once (the command sets it)


@dataclass
class EmbedReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    tiles: int = 0


def features_path(out_dir: str | Path, sid: str) -> Path:
    return Path(out_dir) / "features" / f"{sid}.h5"


def encoder_name(s: EmbedSettings) -> str:
    if s.weights:
        return str(s.weights)
    return f"{s.backbone} (init={s.init})"


def state_sha256(module) -> str:
    """sha256 of a module's weights as loaded: every state-dict tensor in key order (name, dtype,
    shape, bytes), so the same weights give the same hash whichever file or registry they came from."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.view(torch.uint8) if t.dtype.is_floating_point and t.dtype.itemsize == 2 else t
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def encoder_record(s: EmbedSettings, backbone) -> dict[str, Any]:
    """Where the encoder of a ``histo embed`` run comes from, enough to build it again: ``source``
    ``registry`` (``uri`` pinned to ``models:/NAME/VERSION``), ``file`` (``path``) or ``timm``
    (``backbone``, ``init``, ``seed`` for ``random``), plus ``model_kwargs``, ``img_size``, ``tome_r``,
    ``embed_dim`` and ``sha256`` (:func:`state_sha256` of the weights as loaded)."""
    rec: dict[str, Any] = {"name": backbone.name, "img_size": int(s.tile_size), "tome_r": int(s.tome_r),
                           "embed_dim": int(backbone.embed_dim), "model_kwargs": dict(s.model_kwargs),
                           "sha256": state_sha256(backbone.model)}
    if s.model_version:
        rec.update(source="registry", uri=f"models:/{s.model_version}")
    elif s.weights and str(s.weights).startswith("models:/"):
        uri = str(s.weights)
        try:
            from domainfm import tracking

            mv = tracking.model_version(uri)
            uri = f"models:/{mv.name}/{mv.version}"  # an alias moves; the version the features used does not
        except DomainFMError:
            pass
        rec.update(source="registry", uri=uri)
    elif s.weights:
        rec.update(source="file", path=str(Path(s.weights).resolve()))
    else:
        rec.update(source="timm", backbone=s.backbone, init=s.init, seed=int(s.seed))
    return rec


def build_encoder(s: EmbedSettings):
    """The frozen backbone, sized for the tiles, in eval mode."""
    import torch

    from domainfm.backbones import create_backbone

    # --init random must give the same encoder in every process of a --devices N run
    torch.manual_seed(s.seed)
    # --weights (an export / models:/ URI naming its architecture) beats --backbone and --init
    weights = f"models:/{s.model_version}" if s.model_version else s.weights  # the version, not the alias again
    backbone = create_backbone(weights or s.backbone, img_size=s.tile_size, init=s.init, **s.model_kwargs)
    if s.tome_r:
        from domainfm.inference import apply_token_merging

        apply_token_merging(backbone, s.tome_r)
    return backbone.eval().requires_grad_(False)


class TileEncoder(FrozenEncoder):
    """uint8 tiles in (``[B, S, S, 3]`` as read, or ``[B, 3, S, S]``), float32 features out: the
    core's :class:`~domainfm.inference.FrozenEncoder` normalising on the device with the backbone's
    own mean/std (the one pretraining used) and resizing to a ViT's input size, autocast from
    ``precision``."""

    def __init__(self, backbone, device, precision: str):
        super().__init__(backbone, device, precision, pixel_scale=255.0, resize=True)


def coords_file(s: EmbedSettings, path: Path, slide=None) -> Path:
    """``--coords DIR``'s file for this slide: ``DIR/coords/<id>.h5`` (``histo tile``) or ``DIR/<id>.h5``
    (CLAM's ``patches/`` folder, TRIDENT's ``patches/`` folder given directly).

    Raises DomainFMError when there is none; its fix names ``--slide-mpp`` when the slide states no
    µm/px of its own (and none is given): ``histo tile`` failed on it for that reason, and rerunning it
    unchanged would fail again. ``DIR/failures.csv``'s line for the slide, if any, is quoted."""
    sid = slides_mod.slide_id(path)
    for cpath in (Path(s.coords_dir) / "coords" / f"{sid}.h5", Path(s.coords_dir) / f"{sid}.h5"):
        if cpath.is_file():
            return cpath
    message = f"no coordinates for slide {sid!r} in --coords {s.coords_dir}"
    failed = tile_failure(s.coords_dir, sid)
    if failed:
        message += f" (`histo tile` failed on it: {failed.rstrip('.')})"
    fix = "run `domainfm histo tile` on this slide first, or drop --coords"
    if not slide_has_mpp(path, s.slide_mpp, slide):
        fix = ("the slide states no µm/px: run `domainfm histo tile --slide-mpp MPP` on it and pass the same "
               "--slide-mpp MPP to `histo embed`, MPP being the scanner's µm per pixel (0.25 at 40x, 0.5 at 20x)")
    raise DomainFMError(message, path=path, fix=fix)


def tile_failure(out_dir: str | Path, sid: str) -> str | None:
    """The error ``histo tile --out out_dir`` recorded for slide ``sid`` in its failures.csv, or None."""
    target = Path(out_dir) / FAILURES_FILE
    if not target.is_file():
        return None
    try:
        with open(target, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("slide_id") == sid:
                    return (row.get("error") or "").strip() or None
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return None


def slide_has_mpp(path: Path, override, slide=None) -> bool:
    """Whether the slide's µm/px is known: from ``--slide-mpp`` (``override``) or its file. A slide
    that cannot be opened counts as known (its own error says what is wrong)."""
    given = override.get(slides_mod.slide_id(path)) if isinstance(override, dict) else override
    if given is not None:
        return True
    own = slide is None
    try:
        slide = slides_mod.open_slide(path) if own else slide
    except DomainFMError:
        return True
    try:
        slides_mod.resolve_slide_mpp(slide, path, None)
        return True
    except DomainFMError:
        return False
    finally:
        if own:
            slide.close()


def coords_geometry(cpath: Path, attrs: dict[str, Any], s: EmbedSettings, slide, path: Path) -> slides_mod.TileGeometry:
    """The geometry of a coords file's tiles: the file's own wins.

    - ours (``mpp`` and ``tile_size`` attrs): they must equal ``--mpp``/``--tile-size``, else one line
      naming both (re-tiling is cheap, and a silent change of scale is not);
    - CLAM's (``patch_size`` at ``patch_level``) or TRIDENT's (``patch_size_level0``): each tile covers
      the file's level-0 size and is resized to ``--tile-size``; its µm/px follows from the slide's
      and is announced when it differs from ``--mpp``;
    - a file that states no tile size: ``--mpp``/``--tile-size``.
    """
    if "mpp" in attrs and "tile_size" in attrs:
        mpp, tile_size = float(attrs["mpp"]), int(attrs["tile_size"])
        if (mpp, tile_size) != (s.mpp, s.tile_size):
            raise DomainFMError(f"the coords were made at {mpp} µm/px, {tile_size} px but embed asks for "
                                f"{s.mpp} µm/px, {s.tile_size} px", path=cpath,
                                fix=f"pass --mpp {mpp} --tile-size {tile_size}, or re-tile")
        smpp = float(attrs["slide_mpp"]) if "slide_mpp" in attrs else slides_mod.resolve_slide_mpp(slide, path, s.slide_mpp)
        return slides_mod.tile_geometry(slide.level_downsamples, smpp, mpp, tile_size)
    smpp = slides_mod.resolve_slide_mpp(slide, path, s.slide_mpp)
    footprint = tiling.coords_footprint(attrs, slide.level_downsamples)
    if footprint is None:
        return slides_mod.tile_geometry(slide.level_downsamples, smpp, s.mpp, s.tile_size)
    size0, source = footprint
    geom = slides_mod.footprint_geometry(slide.level_downsamples, smpp, size0, s.tile_size)
    requested = slides_mod.tile_geometry(slide.level_downsamples, smpp, s.mpp, s.tile_size).tile_size_level0
    if size0 != requested:
        slides_mod.notice(f"{cpath}: its tiles are {size0} px at level 0 ({source}), not the {requested} of "
                          f"--mpp {s.mpp:g} --tile-size {s.tile_size}: each is read whole and resized to "
                          f"{s.tile_size} px ({geom.mpp:.4g} µm/px)")
    return geom


def slide_tiles(path: Path, s: EmbedSettings, slide) -> tuple[np.ndarray, slides_mod.TileGeometry]:
    """Coordinates and geometry of a slide: from ``--coords`` when given, else tiled now."""
    if s.coords_dir:
        cpath = coords_file(s, path, slide)
        coords, attrs = tiling.read_coords(cpath)
        # --max-tiles applies to the file's tiles too: the draw `histo tile` makes (same seed, same rule)
        coords = coords[tiling.sample_tiles(len(coords), s.max_tiles, s.seed)]
        return coords, coords_geometry(cpath, attrs, s, slide, path)
    ts = tiling.tile_slide(path, mpp=s.mpp, tile_size=s.tile_size, min_tissue=s.min_tissue,
                           max_tiles=s.max_tiles, seed=s.seed, slide_mpp=s.slide_mpp, slide=slide)
    return ts.coords, ts.geometry


def write_features(target: Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> Path:
    import h5py

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tiling.temporary_path(target)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32))
        f.create_dataset("coords", data=coords.astype(np.int64))
        f.attrs.update(attrs)
    os.replace(tmp, target)
    return target


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``features`` [N, D] float32, ``coords`` [N, 2] int64 and attrs of one slide's HDF5."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            feats = np.asarray(f["features"][:], np.float32)
            coords = np.asarray(f["coords"][:], np.int64) if "coords" in f else np.zeros((len(feats), 2), np.int64)
            # attrs as they are (arrays stay arrays); TRIDENT/CLAM keep theirs on `coords`
            attrs = {**(tiling.h5_attrs(f["coords"]) if "coords" in f else {}), **tiling.h5_attrs(f)}
    except (OSError, KeyError) as e:
        raise DomainFMError(f"not a features HDF5 file with a `features` dataset ({e})", path=path,
                            fix="make it with `domainfm histo embed`") from None
    if feats.ndim != 2:
        raise DomainFMError(f"`features` must be [N, D], got shape {feats.shape}", path=path)
    return feats, coords, attrs


def locate_tiles(path: Path, s: EmbedSettings) -> tuple[np.ndarray, slides_mod.TileGeometry]:
    """Open the slide and find its tiles (thumbnail + tissue mask, or ``--coords``)."""
    slide = slides_mod.open_slide(path)
    try:
        return slide_tiles(path, s, slide)
    finally:
        slide.close()


def embed_slide(path: Path, s: EmbedSettings, encoder: "TileEncoder", progress=None, tiles=None) -> int:
    """Encode every tile of one slide and write its features file; returns the tile count.

    ``tiles``: (coords, geometry) found beforehand (see :func:`embed_shard`), else found now.
    """
    from torch.utils.data import DataLoader

    from domainfm import __version__
    from domainfm.data import loader_kwargs
    from plugins.histo.datasets import SlideTileDataset

    sid = slides_mod.slide_id(path)
    coords, geom = tiles if tiles is not None else locate_tiles(path, s)
    dataset = SlideTileDataset(path, coords, geom)
    # workers come from a forkserver, never a fork of this process: the thread that prepares the
    # next slide may be inside an import or a library lock right now
    loader = DataLoader(dataset, batch_size=s.batch_size, shuffle=False, pin_memory=encoder.device.type == "cuda",
                        **loader_kwargs(min(s.num_workers, -(-len(dataset) // s.batch_size)), prefetch_factor=4))
    feats, seen = [], []
    task = progress.add_task(sid, total=len(dataset)) if progress is not None else None
    for batch in loader:
        feats.append(encoder(batch["image"]))
        seen.append(batch["coords"].numpy())
        if task is not None:
            progress.advance(task, len(batch["image"]))
    if task is not None:
        progress.remove_task(task)
    dim = int(encoder.backbone.embed_dim)
    features = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    out_coords = np.concatenate(seen) if seen else np.zeros((0, 2), np.int64)
    attrs = {"mpp": geom.mpp, "tile_size": geom.tile_size, "tile_size_level0": geom.tile_size_level0,
             "slide_mpp": geom.slide_mpp, "encoder": encoder_name(s), "domainfm_version": __version__,
             "slide_path": str(Path(path).resolve()), "patch_level": 0, "patch_size": geom.tile_size_level0,
             "tome_r": s.tome_r, "feature_dim": int(features.shape[1]), **tissue_attrs(path, s)}
    if s.model_version:
        attrs["model_version"] = s.model_version  # NAME/VERSION the models:/ --model named
    record = getattr(encoder, "record", None)
    if record is not None:
        import json

        attrs.update(encoder_record=json.dumps(record, sort_keys=True), encoder_sha256=record["sha256"])
    write_features(features_path(s.out_dir, sid), features, out_coords, attrs)
    return len(features)


def tissue_attrs(path: Path, s: EmbedSettings) -> dict[str, Any]:
    """The tissue settings a slide's tiles were found with: ``--coords``' own (when its file records
    them), else this run's. ``max_tiles`` 0 means every tissue tile; ``slide_mpp_setting`` -1: none."""
    if s.coords_dir:
        _, cattrs = tiling.read_coords(coords_file(s, path))
        out = {k: cattrs[k] for k in ("min_tissue", "max_tiles", "seed", "slide_mpp_setting") if k in cattrs}
        prior = int(out.get("max_tiles") or 0)
        if s.max_tiles and (not prior or s.max_tiles < prior):  # this run's --max-tiles draw is the last one
            out.update(max_tiles=int(s.max_tiles), seed=int(s.seed))
        return out
    return tiling.tissue_settings(s.min_tissue, s.max_tiles, s.seed, s.slide_mpp)


def progress_bar(enabled: bool = True):
    """The slides' progress bar (:func:`domainfm.output.progress_bar`); it stays on the terminal
    when done, as a record of the slides embedded."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from domainfm.output import progress_bar as bar

    return bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               enabled=enabled, transient=False)


def _is_done(slide: Path, s: EmbedSettings, *, quiet: bool = False) -> bool:
    """A slide whose features file exists and was made by the version ``s.weights`` names."""
    path = features_path(s.out_dir, slides_mod.slide_id(slide))
    return path.is_file() and not _other_version(path, s, quiet=quiet)


def _other_version(path: Path, s: EmbedSettings, *, quiet: bool = False) -> bool:
    """True when the features file ``path`` was made by another registered version than the one
    ``s.weights`` (pinned to ``models:/NAME/VERSION`` by the command) names: it is embedded again,
    so that one folder never mixes two versions' features (the alias may have moved)."""
    if not s.model_version:
        return False
    import json

    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("encoder_record")
        rec = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else {}
    except (OSError, ValueError):
        return False
    if rec.get("source") == "registry" and rec.get("uri") and rec["uri"] != f"models:/{s.model_version}":
        if quiet:
            return True
        import click

        click.echo(f"histo: {path.name} was made with {rec['uri']}, not models:/{s.model_version} ({s.weights} now): "
                   "embedding it again", err=True)
        return True
    return False


def embed_shard(paths: list[Path], s: EmbedSettings, *, device=None, label: str = "slides") -> EmbedReport:
    """Embed ``paths`` in this process (one shard of the slides)."""
    report = EmbedReport()
    todo = []
    for p in paths:
        sid = slides_mod.slide_id(p)
        if _is_done(p, s):
            report.skipped.append(sid)
        else:
            todo.append(p)
    if not todo:
        return report
    from concurrent.futures import ThreadPoolExecutor

    for p in todo:  # half-written files of a run that died on these slides: redone from scratch
        target = features_path(s.out_dir, slides_mod.slide_id(p))
        for stale in target.parent.glob(f".{target.name}.*.partial"):
            stale.unlink(missing_ok=True)
    device = device or resolve_device(s.accelerator)
    backbone = build_encoder(s)
    record = encoder_record(s, backbone)  # hashed on the CPU, before it moves
    if s.expect_sha256 and record["sha256"] != s.expect_sha256:
        raise DomainFMError(f"the encoder built from {encoder_name(s)} has weights sha256 {record['sha256'][:12]}..., "
                            f"{s.expect_source or 'the model'} was trained on features of {s.expect_sha256[:12]}...",
                            path=s.expect_source or None,
                            fix="make the recorded encoder weights available (the same file, cache or registry "
                                "version), or re-train the slide model on features of this encoder")
    encoder = TileEncoder(backbone, device, s.precision)
    encoder.record = record
    # When slides are tiled now, the next slide's tissue is found in a thread while this one is
    # encoded, so the accelerator does not wait for thumbnails (OpenSlide and numpy release the
    # GIL). With --coords there is nothing slow to overlap: files are read here, in this thread
    # (h5py's global lock must never be left to a helper thread).
    prefetch = not s.coords_dir and len(todo) > 1
    with progress_bar(s.progress) as progress, ThreadPoolExecutor(max_workers=1) as pool:
        overall = progress.add_task(label, total=len(todo))
        upcoming = pool.submit(locate_tiles_safely, todo[0], s) if prefetch else None
        for i, p in enumerate(todo):
            sid = slides_mod.slide_id(p)
            current = upcoming
            if prefetch and i + 1 < len(todo):
                upcoming = pool.submit(locate_tiles_safely, todo[i + 1], s)
            try:
                tiles = current.result() if current is not None else locate_tiles(p, s)
                if isinstance(tiles, BaseException):
                    raise tiles
                report.tiles += embed_slide(p, s, encoder, progress, tiles=tiles)
                report.done.append(sid)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad slide must not stop a batch of hundreds
                report.failed.append({"slide_id": sid, "path": str(p), "error": one_line_error(e)})
            progress.advance(overall)
    return report


def locate_tiles_safely(path: Path, s: EmbedSettings):
    """:func:`locate_tiles` for the prefetch thread: an exception is returned, not raised, with its
    traceback dropped, so no frame of the thread (and no library lock one of them holds) outlives it."""
    try:
        return locate_tiles(path, s)
    except Exception as e:  # noqa: BLE001 - re-raised by the caller as this slide's failure
        return e.with_traceback(None)


def one_line_error(e: BaseException) -> str:
    """The one line a failure is reported with: a DomainFMError's text; otherwise the exception's
    type and first line, and for an error raised in a DataLoader worker, the original error's
    last line ("ValueError: ...") rather than torch's "Caught ValueError in DataLoader worker"."""
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(text) > 1 and text[0].startswith("Caught ") and "Original Traceback" in str(e):
        last = text[-1].strip()  # "module.Type: message"; our own error is its message alone
        prefix = f"{DomainFMError.__module__}.{DomainFMError.__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    msg = text[0] if text else ""
    return msg if isinstance(e, DomainFMError) else f"{type(e).__name__}: {msg}"


def write_failures(out_dir: str | Path, failures: list[dict[str, str]]) -> Path | None:
    """``failures.csv`` of this run (slide_id, path, error); removed when every slide succeeded."""
    target = Path(out_dir) / FAILURES_FILE
    if not failures:
        target.unlink(missing_ok=True)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tiling.temporary_path(target)
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "error"])
        w.writeheader()
        w.writerows(sorted(failures, key=lambda r: r["slide_id"]))
    os.replace(tmp, target)
    return target


def _shard_worker(fabric, paths: list[Path], s: EmbedSettings) -> dict[str, Any] | None:
    """One rank's part: rank 0 lists the slides still to do and broadcasts the list, so every rank
    splits the same list (a slide another rank finishes meanwhile cannot move between shares).
    An error outside one slide's (which failures.csv records) ends every rank at once."""
    from domainfm.distributed import end_job_on_rank_failure

    with end_job_on_rank_failure():
        return _shard_work(fabric, paths, s)


def _shard_work(fabric, paths: list[Path], s: EmbedSettings) -> dict[str, Any] | None:
    from domainfm.distributed import shard

    todo = [str(p) for p in paths if not _is_done(p, s)]
    todo = fabric.broadcast(todo, src=0)
    mine = [Path(p) for p in shard(todo, fabric.global_rank, fabric.world_size)]
    report = embed_shard(mine, s, device=fabric.device, label=f"slides (rank {fabric.global_rank})")
    reports = [None] * fabric.world_size
    import torch.distributed as dist

    dist.all_gather_object(reports, report.__dict__)
    if fabric.global_rank != 0:
        return None
    merged = {k: sum((r[k] for r in reports), [] if k != "tiles" else 0) for k in report.__dict__}
    merged["skipped"] = sorted(slides_mod.slide_id(p) for p in paths if str(p) not in set(todo))
    return merged


def embed_slides(paths: list[Path], s: EmbedSettings) -> EmbedReport | None:
    """Embed every slide, then write ``failures.csv``; returns the report on global rank 0 only.

    ``s.devices * s.num_nodes > 1`` runs under Lightning's DDP launcher (gloo on CPU, NCCL on GPU):
    started once per node it starts the node's other processes itself, started by ``srun``/``torchrun``
    it uses theirs. Each rank embeds a disjoint share of the slides not yet done and writes each
    slide's file atomically, so a rerun redoes only what is missing."""
    if s.devices * s.num_nodes > 1:
        import lightning as L

        from domainfm.distributed import is_global_zero

        # a bad --weights/--init must be one clear error here, not a traceback from each process
        if is_global_zero() and any(not _is_done(p, s, quiet=True) for p in paths):
            build_encoder(s)

        # the one device choice of frozen-feature jobs, as the single-process path makes it
        accelerator = "gpu" if resolve_device(s.accelerator).type == "cuda" else "cpu"
        fabric = L.Fabric(accelerator=accelerator, devices=s.devices, num_nodes=s.num_nodes, strategy="ddp")
        merged = fabric.launch(_shard_worker, list(paths), s)
        if merged is None:  # not global rank 0: rank 0 reports for the job
            return None
        report = EmbedReport(**merged)
    else:
        report = embed_shard(list(paths), s)
    write_failures(s.out_dir, report.failed)
    return report
