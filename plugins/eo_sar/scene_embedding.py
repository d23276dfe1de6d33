"""Embedding maps of whole scenes (``domainfm eo-sar embed``), streamed from disk and resumable.

A scene of any size and CRS is read window by window with rasterio (:func:`plugins.eo_sar.radiometry.read_patch`
on the rectangle of one window row of a tile-aligned column group at most 2048 px wide, each group top
to bottom: GDAL's block cache, bounded to one group's tiles, decodes each tile once, and memory grows
neither with the scene's height nor its width; ``reader_threads`` threads share one dataset handle),
normalised with the backbone's recorded statistics and aligned to its bands by name
(:func:`plugins.eo_sar.normalization.plan_input`), batched through the frozen backbone and written as a
georeferenced GeoTIFF:

- pooled (default): one pixel per window position, ``D`` float32 bands (the pooled feature, or its
  first ``dims`` principal components), same CRS, pixel size = ``stride`` scene pixels, each pixel
  centred on its window (transform = scene transform x translation((window - stride) / 2) x
  scale(stride)). Positions: ``ceil((H - window) / stride) + 1`` rows (the last window may run past the
  scene edge; the missing pixels count as nodata).
- ``dense``: the ViT patch-token features, one pixel per patch (pixel size = the patch size); with
  ``stride < window`` each window contributes its central ``stride`` x ``stride`` pixels.

Nodata (NaN) where more than ``nodata_fraction`` of a window's (dense: a patch's) pixels are nodata;
such windows never reach the model. Invalid pixels inside a kept window are set to the band mean (0
after normalisation), as bands the data lacks are.

The GeoTIFF is tiled (16-row tiles), deflate-compressed and written one tile row at a time to
``<name>.tif.partial`` as results come; ``<name>.progress.json`` records the tile rows done and a
fingerprint of the inputs. A killed run resumes at the first unfinished tile row; batches never span
tile rows, so the result is bit-identical to an uninterrupted run. The partial file is renamed when
complete. ``dims`` fits a PCA (scikit-learn, full SVD) on a seeded sample of windows first and saves
it as ``<name>.pca.npz`` / ``.pca.json`` before streaming; a resumed run reuses the saved projection.

Across processes (``devices`` x ``num_nodes`` > 1, Lightning's launcher): each process computes a
disjoint share of a scene's tile rows, exactly as above, and writes each one atomically to
``<name>.parts/row_NNNNN.npy``; rank 0 assembles the GeoTIFF when every row exists (bit for bit the
single-process output). A rerun redoes the rows that are missing or unreadable and nothing else.

No mlflow here: the command opens the MLflow run; this module runs without it (benchmarks, GPU hosts).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError
from domainfm.inference import FrozenEncoder, resolve_device

TILE_ROWS = 16  # GeoTIFF tile height (and the unit of progress)
NODATA = float("nan")
PREVIEW_MAX_PX = 512
#: valid pixels at most (about) that fit the preview's principal components
PREVIEW_FIT_PIXELS = 4096


@dataclass
class SceneEmbedSettings:
    """What ``eo-sar embed`` needs besides the scenes; plain values."""

    out_dir: str
    model: str
    window: int = 224
    stride: int | None = None  # default: the window (no overlap)
    dense: bool = False
    dims: int | None = None
    batch_size: int = 16
    tome_r: int = 0
    modality: str | None = None  # default: the scene's band names, else the model's modality, else s2
    s2_harmonize: str = "auto"
    s1_units: str = "db"
    precision: str = "32-true"
    accelerator: str = "auto"
    nodata_fraction: float = 0.5
    pca_windows: int = 256
    seed: int = 0
    progress: bool = True
    preview: bool = True
    stop_after_rows: int | None = None  # tests only: stop (as if killed) after this many tile rows
    devices: int = 1  # processes per machine sharing the tile rows (Lightning's launcher)
    num_nodes: int = 1
    reader_threads: int = 0  # threads preparing windows (0: 1 on CPU, where the model needs the cores; else <= 8)
    model_version: str | None = None  # NAME/VERSION a models:/ --model resolved to (set by prepare, once)

    def reader_threads_for(self, device) -> int:
        """Reader threads to use on ``device`` (a torch.device): ``reader_threads``, or when 0, 1 on
        CPU and min(8, CPUs) on an accelerator (the GPU would otherwise wait for the reader)."""
        if self.reader_threads:
            return int(self.reader_threads)
        return 1 if getattr(device, "type", "cpu") == "cpu" else max(1, min(8, os.cpu_count() or 1))

    @property
    def step(self) -> int:
        return int(self.stride or self.window)


@dataclass
class SceneResult:
    scene: str
    path: str
    shape: tuple[int, int, int]  # bands, rows, cols of the output
    windows: int = 0  # window positions in the grid
    embedded: int = 0  # windows that went through the model in this call
    skipped_nodata: int = 0
    resumed_from_row: int = 0
    complete: bool = False
    preview: str | None = None
    projection: str | None = None
    already_done: bool = False
    computed_rows: list[int] | None = None  # sharded runs: the tile rows computed in this call


# ---------------------------------------------------------------- geometry (pure)

@dataclass(frozen=True)
class SceneGrid:
    """Window positions over a ``height`` x ``width`` scene, and the output raster they give.

    ``k``: output pixels per window side (1 pooled; ``stride / patch`` dense); ``crop``: the first
    token kept on each side of a window (dense, ``(window - stride) / 2 / patch``).
    """

    height: int
    width: int
    window: int
    stride: int
    patch: int | None = None  # dense: the ViT patch size

    @property
    def rows(self) -> int:
        return math.ceil((self.height - self.window) / self.stride) + 1

    @property
    def cols(self) -> int:
        return math.ceil((self.width - self.window) / self.stride) + 1

    @property
    def k(self) -> int:
        return 1 if self.patch is None else self.stride // self.patch

    @property
    def crop(self) -> int:
        return 0 if self.patch is None else (self.window - self.stride) // 2 // self.patch

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.rows * self.k, self.cols * self.k

    @property
    def pixel(self) -> int:
        """Output pixel size in scene pixels."""
        return self.stride if self.patch is None else self.patch

    def out_transform(self, transform):
        """The output's affine transform from the scene's (an ``affine.Affine``)."""
        from affine import Affine

        off = (self.window - self.stride) / 2
        return transform @ Affine.translation(off, off) @ Affine.scale(self.pixel)

    @property
    def window_rows_per_tile_row(self) -> int:
        """Window rows whose output rows fill whole 16-row tiles."""
        return TILE_ROWS // math.gcd(TILE_ROWS, self.k)

    @property
    def tile_rows(self) -> int:
        g = self.window_rows_per_tile_row
        return math.ceil(self.rows / g)


def _dense_fix(window: int, stride: int, patch: int) -> str:
    """The nearest dense geometries below and above: ``--window`` in whole patches (the patch
    multiples either side of ``window``), ``--stride`` the same (no overlap)."""
    lo = window // patch * patch
    sizes = [s for s in dict.fromkeys((lo, lo + patch) if window % patch else (window,)) if s >= patch]
    return " or ".join(f"pass --window {s} --stride {s}" for s in sizes)


def check_geometry(path: Path, height: int, width: int, window: int, stride: int, patch: int | None,
                   dense: bool) -> SceneGrid:
    """The :class:`SceneGrid`, or a one-line DomainFMError naming ``path`` for a window larger than
    the scene, a stride of 0 or larger than the window, or a dense grid the patches do not tile."""
    if window < 1 or stride < 1:
        raise DomainFMError(f"--window {window} and --stride {stride} must be at least 1", fix="pass positive sizes")
    if stride > window:
        raise DomainFMError(f"--stride {stride} is larger than --window {window}: pixels between windows would be skipped",
                            fix=f"pass --stride {window} or less")
    if window > height or window > width:
        raise DomainFMError(f"the scene is {height} x {width} px, smaller than --window {window}", path=path,
                            fix=f"pass --window {min(height, width)} or less")
    if dense:
        if patch is None:
            raise DomainFMError("--dense needs a ViT (patch tokens), and the model is not one",
                                fix="drop --dense or use a ViT backbone")
        if window % patch or stride % patch or (window - stride) % (2 * patch):
            raise DomainFMError(f"--dense needs --window and --stride in whole {patch}-px patches, and an overlap "
                                f"(window - stride = {window - stride}) of an even number of patches",
                                fix=_dense_fix(window, stride, patch))
    return SceneGrid(height, width, window, stride, patch if dense else None)


# ---------------------------------------------------------------- device, precision



class WindowEncoder(FrozenEncoder):
    """Normalised windows [B, C, w, w] (numpy float32) in, float32 features out: pooled [B, D], or
    dense [B, k, k, D] (the central ``k`` x ``k`` patch tokens from token ``crop``). The core's
    :class:`~domainfm.inference.FrozenEncoder` (device, inference mode, autocast from ``precision``)."""

    def __init__(self, backbone, device, precision: str = "32-true", *, dense: bool = False, crop: int = 0,
                 k: int = 1) -> None:
        super().__init__(backbone.requires_grad_(False), device, precision)
        self.dense, self.crop, self.k = dense, crop, k

    def _patch_tokens(self, x):
        m = self.backbone.model
        tokens = m.forward_features(x)[:, m.num_prefix_tokens:]
        g = int(math.isqrt(tokens.shape[1]))
        grid = tokens.reshape(tokens.shape[0], g, g, tokens.shape[-1])
        c, k = self.crop, self.k
        return grid[:, c:c + k, c:c + k]

    def forward(self, x):
        """``x``: a torch tensor already on the device; returns a torch tensor on the device."""
        return super().forward(x, self._patch_tokens if self.dense else None)


# ---------------------------------------------------------------- reading

@dataclass
class ScenePlan:
    """One scene checked against the model: its grid, modality and how its bands are prepared."""

    path: Path
    modality: str
    grid: SceneGrid
    plan: Any  # normalization.InputPlan
    crs: Any
    transform: Any
    mean: np.ndarray  # [C_data, 1, 1]
    std: np.ndarray
    # one open dataset for all windows of the scene (GDAL's block cache keeps the tiles that
    # neighbouring windows share; reopening decompressed them again), decoded by GDAL's threads
    _src: Any = field(default=None, repr=False, compare=False)

    def dataset(self):
        if self._src is None:
            import rasterio

            self._src = _SceneSource(rasterio.open(self.path, NUM_THREADS="ALL_CPUS"))
        return self._src

    def chunk_windows(self, batch_size: int) -> int:
        """Windows per read (one window row, these many columns). Tiled files are read in column
        groups at most 2048 px wide (or one window) whose left edges fall on tile edges where the
        stride allows (no tile decoded by two groups): GDAL's block cache then needs the tiles of
        one group's width, not of the scene's, and memory does not grow with the scene. Striped
        files (a block is a whole-width strip): ``batch_size`` windows, the rows read in order."""
        g = self.grid
        bh, bw = self.dataset().block_shapes[0]
        if bw >= g.width:
            return max(1, batch_size)
        aligned = math.lcm(g.stride, bw) // g.stride  # windows from one tile edge to the next shared one
        if aligned * g.stride <= 2048:
            n = aligned * max(1, 2048 // (aligned * g.stride))
        else:  # no tile-aligned group this narrow: one tile column decoded twice per group edge
            n = max(1, 2048 // g.stride)
        return min(n, g.cols)

    def chunks(self, r0: int, r1: int, batch_size: int) -> list[tuple[int, int, int]]:
        """The reads of window rows ``r0..r1-1``, in order: ``(row, first col, end col)``. Column
        group by column group, each top to bottom, so the tiles a window shares with the one below
        are still in the (bounded) cache; striped files row by row."""
        g = self.grid
        n = self.chunk_windows(batch_size)
        groups = [(c0, min(c0 + n, g.cols)) for c0 in range(0, g.cols, n)]
        if self.dataset().block_shapes[0][1] >= g.width:
            return [(r, c0, c1) for r in range(r0, r1) for c0, c1 in groups]
        return [(r, c0, c1) for c0, c1 in groups for r in range(r0, r1)]

    def cache_bytes(self, batch_size: int = 16) -> int:
        """GDAL block cache to hold while this scene is read: the decoded blocks one read touches and
        the next read of its column group shares (window + one block of rows, the read's width + one
        block; a striped file: the scene's width), plus 16 MiB. Enough that no tile is decoded twice
        within a column group; small enough that memory grows neither with the height of a tile row
        nor with the width of the scene (GDAL's default is 5 % of the machine's RAM)."""
        src = self.dataset()
        bh, bw = src.block_shapes[0]
        g = self.grid
        rows = (math.ceil(g.window / bh) + 1) * bh
        span = (self.chunk_windows(batch_size) - 1) * g.stride + g.window
        cols = min(math.ceil(src.width / bw), math.ceil(span / bw) + 1) * bw
        return int(rows * cols * src.count * np.dtype(src.dtypes[0]).itemsize * 1.25) + (16 << 20)

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def read_chunk(self, row: int, c0: int, c1: int, s: SceneEmbedSettings) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``(row, c0..c1-1)``: normalised, model-band pixels [n, C_model, w, w] float32 and
        their invalid masks [n, w, w] bool (read-only strided views of one array each). One rasterio
        read of the rectangle covering them; pixels beyond the scene edge are invalid."""
        from rasterio.windows import Window

        from plugins.eo_sar.radiometry import read_patch

        g = self.grid
        w, st = g.window, g.stride
        y0, x0 = row * st, c0 * st
        span = (c1 - 1 - c0) * st + w
        h_in, w_in = min(w, g.height - y0), min(span, g.width - x0)
        image, names, info = read_patch(self.path, modality=self.modality, s2_harmonize=s.s2_harmonize,
                                        s1_units=s.s1_units, window=Window(x0, y0, w_in, h_in),
                                        src=self.dataset())  # thread-safe: reads take turns on one handle
        if tuple(names) != self.plan.data_bands:
            raise DomainFMError(f"bands changed while reading ({', '.join(names)})", path=self.path)
        invalid = np.ones((w, span), dtype=bool)
        invalid[:h_in, :w_in] = ~info.valid
        data = np.zeros((image.shape[0], w, span), dtype=np.float32)
        inside = data[:, :h_in, :w_in]
        np.subtract(image, self.mean, out=inside)  # in place: one pass each, no temporaries
        np.divide(inside, self.std, out=inside)
        if not info.valid.all():  # nodata -> the band mean (beyond the scene edge: zeros already)
            np.copyto(inside, np.float32(0.0), where=~info.valid[None])
        al = self.plan.alignment
        if list(al.index) != list(range(data.shape[0])):  # the model's bands differ from the data's
            data = al.apply(data)
        # the windows as strided views of the rectangle (the batch is stacked, i.e. copied, once)
        out = np.lib.stride_tricks.sliding_window_view(data, w, axis=2)[:, :, ::st].transpose(2, 0, 1, 3)
        masks = np.lib.stride_tricks.sliding_window_view(invalid, w, axis=1)[:, ::st].transpose(1, 0, 2)
        return out, masks


class _SceneSource:
    """One open rasterio dataset shared by the reader threads: GDAL handles are not thread-safe,
    so reads take turns (a lock held only while GDAL decodes, with its own threads: the tiles of one
    read in parallel); the metadata ``read_patch`` asks for is read once, not per window. The
    conversion to model units and the normalisation then run in the reader threads in parallel
    (numpy releases the GIL). Quacks like the dataset for :func:`plugins.eo_sar.radiometry.read_patch`."""

    def __init__(self, src) -> None:
        self._src, self._lock = src, threading.Lock()
        self.count, self.height, self.width = src.count, src.height, src.width
        self.descriptions, self.scales, self.offsets, self.units = src.descriptions, src.scales, src.offsets, src.units
        self.nodata, self.crs, self.dtypes, self.block_shapes = src.nodata, src.crs, src.dtypes, src.block_shapes
        self._tags = [dict(src.tags(i)) for i in range(src.count + 1)]

    def tags(self, bidx: int = 0) -> dict:
        return self._tags[bidx]

    def read(self, window=None) -> np.ndarray:
        with self._lock:
            return self._src.read(window=window)

    def close(self) -> None:
        self._src.close()


def _scene_modality(path: Path, requested: str | None, spec) -> tuple[str, tuple]:
    """The modality to read ``path`` with: ``requested``, else what its band descriptions name
    (Sentinel-1 names -> s1), else the model's, else s2."""
    import rasterio
    from rasterio.errors import RasterioError

    from plugins.eo_sar.bands import S1_BANDS, try_normalize_band_name

    try:
        with rasterio.open(path) as src:
            header = (src.height, src.width, src.count, src.crs, src.transform, src.descriptions)
    except RasterioError as e:
        raise DomainFMError(f"cannot read the scene ({str(e).splitlines()[0][:200]})", path=path,
                            fix="give a GeoTIFF rasterio can open") from None
    if requested:
        return requested, header
    names = {try_normalize_band_name(d) for d in header[5] if d}
    if names and names <= set(S1_BANDS):
        return "s1", header
    model_modality = getattr(spec, "modality", None)
    if names and any(n and n not in S1_BANDS for n in names):
        return (model_modality if model_modality in ("s2", "s2-l2a") else "s2"), header
    return model_modality or "s2", header


def plan_scene(path: str | Path, s: SceneEmbedSettings, spec, patch: int | None) -> ScenePlan:
    """Check one scene against the model before anything is written: readable, bands alignable to
    the model's (by name), window not larger than the scene. One-line DomainFMError naming the scene."""
    from rasterio.windows import Window

    from plugins.eo_sar.normalization import plan_input
    from plugins.eo_sar.radiometry import read_patch

    path = Path(path)
    if not path.is_file():
        raise DomainFMError("no such scene", path=path, fix="give an existing GeoTIFF")
    modality, (height, width, _count, crs, transform, _desc) = _scene_modality(path, s.modality, spec)
    grid = check_geometry(path, height, width, s.window, s.step, patch, s.dense)
    _, names, _ = read_patch(path, modality=modality, s2_harmonize=s.s2_harmonize, s1_units=s.s1_units,
                             window=Window(0, 0, 1, 1))
    try:
        plan = plan_input(modality, spec, "backbone", data_bands=names)
    except DomainFMError as e:
        message = str(e).split(". Fix: ")[0].rstrip(".")
        raise DomainFMError(f"cannot align the scene's bands to the model: {message}", path=path, fix=e.fix) from None
    if plan.mean is None:
        raise DomainFMError("the model records no normalisation statistics (input_mean/input_std)",
                            path=s.model, fix="use a backbone exported by `domainfm pretrain --plugin eo-sar`, "
                                              "which records its bands and statistics")
    mean = np.asarray(plan.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(plan.std, dtype=np.float32)[:, None, None]
    return ScenePlan(path, modality, grid, plan, crs, transform, mean, std)


def _prefetched(jobs: Sequence[Callable[[], Any]], pool, ahead: int = 1) -> Iterator[Any]:
    """Results of ``jobs`` in order, the next ``ahead`` run by ``pool`` while the caller works (at
    most ``ahead`` + 1 results exist at once: memory does not grow with the number of jobs)."""
    from collections import deque

    todo = iter(jobs)
    # range first: zip stops there without taking one job more from ``todo``
    pending = deque(pool.submit(j) for _, j in zip(range(max(1, ahead)), todo))
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(nxt))
        yield result


# ---------------------------------------------------------------- the job

def output_paths(out_dir: str | Path, scene: str | Path, dense: bool) -> dict[str, Path]:
    stem = Path(scene).stem + ("_dense" if dense else "_embedding")
    out = Path(out_dir)
    return {"tif": out / f"{stem}.tif", "partial": out / f"{stem}.tif.partial",
            "progress": out / f"{stem}.progress.json", "pca": out / f"{stem}.pca.npz",
            "pca_json": out / f"{stem}.pca.json", "preview": out / f"{stem}.preview.png",
            "parts": out / f"{stem}.parts"}


#: How windows are grouped into batches (tile-aligned column groups):
#: batches of another grouping round differently at float precision, so a partial output written by an
#: older reader must be restarted, not continued — it is part of the resume fingerprint.
READ_ORDER = "column-groups-1"


def _fingerprint(sp: ScenePlan, s: SceneEmbedSettings) -> str:
    st = sp.path.stat()
    model = Path(s.model)
    # a registered model is identified by the version its alias pointed to, never the alias text
    model_id = (f"{model.resolve()}:{model.stat().st_size}:{model.stat().st_mtime_ns}" if model.is_file()
                else f"models:/{s.model_version}" if s.model_version else s.model)
    keys = {k: v for k, v in asdict(s).items() if k not in ("out_dir", "progress", "preview", "stop_after_rows",
                                                          "accelerator", "model", "devices", "num_nodes",
                                                          "reader_threads", "model_version")}
    record = {"scene": str(sp.path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, "model": model_id,
              "modality": sp.modality, "read_order": READ_ORDER, **keys}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished_as(tif: Path, fp: str, log: Callable[[str], None]) -> bool:
    """True when ``tif`` is a finished output of fingerprint ``fp``. A finished output of other
    inputs or settings (another model version the alias now names, another --window...) is computed
    again, said in one line; the old file stays until the new one replaces it."""
    if not tif.is_file():
        return False
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(tif) as src:
            recorded = src.tags().get("RESUME_FINGERPRINT")
    except RasterioError:
        recorded = None
    if recorded == fp:
        return True
    log(f"{tif.name} was made with other inputs or settings (model version, scene or options): computing it again")
    return False


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _valid_windows(masks: np.ndarray, s: SceneEmbedSettings, grid: SceneGrid) -> np.ndarray:
    """Which windows reach the model: those not mostly nodata (dense: with a valid patch in the
    kept centre). Returns a bool per window."""
    if grid.patch is None:
        return masks.mean(axis=(1, 2)) <= s.nodata_fraction
    return _patch_nodata(masks, grid, s).reshape(len(masks), -1).sum(axis=1) < grid.k * grid.k


def _patch_nodata(masks: np.ndarray, grid: SceneGrid, s: SceneEmbedSettings) -> np.ndarray:
    """[n, k, k] True where a kept patch is mostly nodata (dense)."""
    p, k, c = grid.patch, grid.k, grid.crop
    n = len(masks)
    frac = masks.reshape(n, grid.window // p, p, grid.window // p, p).mean(axis=(2, 4))
    return frac[:, c:c + k, c:c + k] > s.nodata_fraction


def _pca_picks(g: SceneGrid, s: SceneEmbedSettings) -> tuple[np.random.Generator, np.ndarray]:
    """The seeded sample of window indices (row-major) the --dims PCA is fitted on, and the generator
    drawn from (it goes on to subsample tokens)."""
    rng = np.random.default_rng(s.seed)
    total = g.rows * g.cols
    return rng, np.sort(rng.choice(total, size=min(s.pca_windows, total), replace=False))


def _sample_windows(sp: ScenePlan, s: SceneEmbedSettings, picks: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Windows [n, C, window, window] and nodata masks [n, window, window] of ``picks``, a batch at a time."""
    g = sp.grid
    for chunk in np.array_split(picks, max(1, math.ceil(len(picks) / s.batch_size))):
        wins, masks = [], []
        for idx in chunk:
            r, c = divmod(int(idx), g.cols)
            w, m = sp.read_chunk(r, c, c + 1, s)
            wins.append(w[0])
            masks.append(m[0])
        yield np.stack(wins), np.stack(masks)


def pca_sample_size(sp: ScenePlan, s: SceneEmbedSettings) -> tuple[int, int, int]:
    """``(windows drawn, valid windows among them, samples)`` of the --dims PCA sample: what
    :func:`fit_projection` will fit on, counted from the nodata masks alone (no model). Samples are
    the valid windows, or with --dense their valid patch tokens (at most 50 000)."""
    g = sp.grid
    _, picks = _pca_picks(g, s)
    valid = samples = 0
    for _, masks in _sample_windows(sp, s, picks):
        keep = _valid_windows(masks, s, g)
        valid += int(keep.sum())
        samples += int((~_patch_nodata(masks[keep], g, s)).sum()) if g.patch is not None else int(keep.sum())
    return len(picks), valid, min(samples, 50_000)


def fit_projection(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, dim_in: int) -> dict[str, np.ndarray]:
    """PCA (scikit-learn, full SVD: deterministic, signs fixed by ``svd_flip``) of the features of
    up to ``pca_windows`` windows drawn with ``seed`` (dense: of their valid patch tokens, at most
    50 000). Returns ``mean`` [D_in], ``components`` [dims, D_in], ``explained_variance_ratio``."""
    from sklearn.decomposition import PCA

    g = sp.grid
    if s.dims > dim_in:
        raise DomainFMError(f"--dims {s.dims} is more than the model's {dim_in} features",
                            fix=f"pass --dims {dim_in} or less")
    rng, picks = _pca_picks(g, s)
    feats = []
    for wins, masks in _sample_windows(sp, s, picks):
        keep = _valid_windows(masks, s, g)
        if not keep.any():
            continue
        f = encoder(wins[keep])
        if g.patch is not None:
            f = f[~_patch_nodata(masks[keep], g, s)]
        feats.append(f.reshape(-1, f.shape[-1]))
    x = np.concatenate(feats) if feats else np.zeros((0, dim_in), np.float32)
    if len(x) > 50_000:
        x = x[np.sort(rng.choice(len(x), 50_000, replace=False))]
    if len(x) < s.dims:
        raise DomainFMError(f"only {len(x)} valid sample(s) to fit {s.dims} principal components", path=sp.path,
                            fix=f"pass --dims {len(x)} or less, or a smaller --stride for more windows")
    pca = PCA(n_components=s.dims, svd_solver="full").fit(x.astype(np.float64))
    return {"mean": pca.mean_, "components": pca.components_,
            "explained_variance_ratio": pca.explained_variance_ratio_, "n_samples": np.int64(len(x))}


def band_descriptions(bands: int, dims: int | None) -> tuple[str, ...]:
    """The output's band names: ``PC1``.. ``PC<dims>`` with ``--dims``, else ``feature_000``.. (the
    pooled or patch-token feature index, zero-padded to at least three digits)."""
    if dims:
        return tuple(f"PC{i + 1}" for i in range(bands))
    width = max(3, len(str(bands - 1)))
    return tuple(f"feature_{i:0{width}d}" for i in range(bands))


def output_tags(sp: ScenePlan, s: SceneEmbedSettings, fp: str) -> dict[str, str]:
    """Dataset tags of an embedding GeoTIFF: what made it (model source, window and stride in scene
    pixels, pooled or dense features, the PCA), the scene and the bands read from it, and the resume
    fingerprint (:func:`already_done` compares it to tell a finished output of these settings)."""
    tags = {"DOMAINFM_COMMAND": "eo-sar embed", "MODEL_SOURCE": s.model, "SCENE": sp.path.name,
            "MODALITY": sp.modality, "WINDOW": str(s.window), "STRIDE": str(s.step),
            "FEATURES": "dense ViT patch tokens" if s.dense else "pooled, one per window",
            "BANDS_READ": ",".join(sp.plan.data_bands), "MODEL_BANDS": ",".join(sp.plan.model_bands),
            "RESUME_FINGERPRINT": fp}
    if s.model_version:
        tags["MODEL_VERSION"] = s.model_version
    if s.dims:
        tags["PROJECTION"] = f"first {s.dims} principal components ({Path(sp.path).stem}" \
                             f"{'_dense' if s.dense else '_embedding'}.pca.npz)"
    return tags


def _create_raster(path: Path, sp: ScenePlan, bands: int, s: SceneEmbedSettings, fp: str) -> None:
    """An empty output GeoTIFF at ``path`` (written beside it, then renamed): the scene's CRS, the
    grid's transform, NaN nodata, 16-row deflate tiles, band names (:func:`band_descriptions`) and
    the tags of :func:`output_tags`."""
    import rasterio

    out_h, out_w = sp.grid.out_shape
    profile = {"driver": "GTiff", "height": out_h, "width": out_w, "count": bands, "dtype": "float32",
               "crs": sp.crs, "transform": sp.grid.out_transform(sp.transform), "nodata": NODATA,
               "tiled": True, "blockysize": TILE_ROWS, "blockxsize": 256 if out_w > 256 else 16 * math.ceil(out_w / 16),
               "compress": "deflate", "predictor": 3, "interleave": "pixel", "BIGTIFF": "IF_SAFER"}
    tmp = path.with_name(path.name + ".new")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = band_descriptions(bands, s.dims)
        dst.update_tags(**output_tags(sp, s, fp))
    os.replace(tmp, path)


def _open_partial(paths: dict[str, Path], sp: ScenePlan, s: SceneEmbedSettings, bands: int, fp: str,
                  log: Callable[[str], None]) -> int:
    """The tile row to start at: a matching progress record and readable partial file resume;
    otherwise a new partial file is created. Returns the number of tile rows already written."""
    import rasterio

    if paths["progress"].is_file() and paths["partial"].is_file():
        try:
            rec = json.loads(paths["progress"].read_text())
            if rec.get("fingerprint") == fp:
                with rasterio.open(paths["partial"]) as src:
                    ok = (src.count, src.height, src.width) == (bands, *sp.grid.out_shape)
                if ok:
                    done = int(rec["tile_rows_done"])
                    log(f"resuming {paths['tif'].name} after {done} of {sp.grid.tile_rows} tile rows")
                    return done
            log(f"{paths['partial'].name} was made with other inputs or settings: starting over")
        except Exception:  # an unreadable leftover of a killed run: start over
            log(f"{paths['partial'].name} is unreadable: starting over")
    for key in ("partial", "progress"):
        paths[key].unlink(missing_ok=True)
    _create_raster(paths["partial"], sp, bands, s, fp)
    _write_json(paths["progress"], {"fingerprint": fp, "tile_rows_done": 0, "tile_rows": sp.grid.tile_rows})
    return 0


def _projection(paths: dict[str, Path], sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, dim_in: int,
                *, reuse: bool) -> dict[str, np.ndarray]:
    """The ``--dims`` PCA: the saved one when ``reuse`` (a resumed run) and it exists, else fitted
    (:func:`fit_projection`) and saved atomically as ``.pca.npz`` and ``.pca.json``."""
    if reuse and paths["pca"].is_file():
        with np.load(paths["pca"]) as z:
            return {k: z[k] for k in z.files}
    proj = fit_projection(sp, s, encoder, dim_in)
    tmp = paths["pca"].with_name(paths["pca"].name + ".tmp.npz")
    np.savez(tmp, **proj)
    os.replace(tmp, paths["pca"])
    _write_json(paths["pca_json"], {"dims": s.dims, "input_features": dim_in, "seed": s.seed,
                                    "pca_windows": s.pca_windows, "n_samples": int(proj["n_samples"]),
                                    "explained_variance_ratio": proj["explained_variance_ratio"].tolist(),
                                    "projection": "(feature - mean) @ components.T",
                                    "file": paths["pca"].name})
    return proj


def _projector(proj: dict[str, np.ndarray] | None) -> Callable[[np.ndarray], np.ndarray]:
    """Features [..., D_in] -> [..., dims] float32 by ``(f - mean) @ components.T`` in float64."""
    if proj is None:
        return lambda f: f
    p_mean = proj["mean"].astype(np.float64)
    p_comp = proj["components"].astype(np.float64).T
    return lambda f: ((f.astype(np.float64) - p_mean) @ p_comp).astype(np.float32)


def _tile_row(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, t: int, bands: int,
              project: Callable[[np.ndarray], np.ndarray], pool, res: SceneResult, progress=None,
              task=None) -> np.ndarray:
    """Output rows of tile row ``t``: [rows, out_w, bands] float32, NaN where nodata. Its windows are
    read a chunk of one window row at a time (:meth:`ScenePlan.chunks`; the next chunks read by
    ``pool``, or by ``s.reader_threads`` threads when more than 1, meanwhile) and batched within the
    tile row only, in the chunks' order whichever thread read them, so the result depends on ``t``
    alone, not on what ran before nor on the reader threads (which is what lets a resumed run, or
    another process, compute it bit for bit alike)."""
    g = sp.grid
    G = g.window_rows_per_tile_row
    out_w = g.out_shape[1]
    r0, r1 = t * G, min((t + 1) * G, g.rows)
    buf = np.full(((r1 - r0) * g.k, out_w, bands), NODATA, dtype=np.float32)
    chunks = sp.chunks(r0, r1, s.batch_size)
    reads = [lambda a=a: sp.read_chunk(*a, s) for a in chunks]
    n_threads = s.reader_threads_for(getattr(encoder, "device", None))
    if n_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="eo-sar-reader") as readers:
            return _tile_row_loop(sp, s, encoder, chunks, _prefetched(reads, readers, ahead=n_threads), buf, r0,
                                  bands, project, res, progress, task)
    return _tile_row_loop(sp, s, encoder, chunks, _prefetched(reads, pool), buf, r0, bands, project, res, progress,
                          task)


def _tile_row_loop(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, chunks, results: Iterator, buf,
                   r0: int, bands: int, project, res: SceneResult, progress, task) -> np.ndarray:
    g = sp.grid
    pend_w, pend_pos, pend_mask = [], [], []

    def flush():
        if not pend_w:
            return
        f = encoder(np.stack(pend_w))
        for (r, c), feat, mask in zip(pend_pos, f, pend_mask):
            y, x = (r - r0) * g.k, c * g.k
            if g.patch is None:
                buf[y, x] = project(feat)
            else:
                block = project(feat.reshape(-1, feat.shape[-1])).reshape(g.k, g.k, bands)
                block[mask] = NODATA
                buf[y:y + g.k, x:x + g.k] = block
        res.embedded += len(pend_w)
        pend_w.clear(), pend_pos.clear(), pend_mask.clear()

    for (r, c0, c1), (wins, masks) in zip(chunks, results):
        keep = _valid_windows(masks, s, g)
        pmask = _patch_nodata(masks, g, s) if g.patch is not None else None
        res.skipped_nodata += int((~keep).sum())
        for i in np.flatnonzero(keep):
            pend_w.append(wins[i])
            pend_pos.append((r, c0 + int(i)))
            pend_mask.append(pmask[i] if pmask is not None else None)
            if len(pend_w) == s.batch_size:
                flush()
        if progress is not None:
            progress.advance(task, c1 - c0)
    flush()  # batches never span tile rows: a resumed run batches exactly as an uninterrupted one
    sp.close()  # GDAL caches the blocks of an open dataset: closing once per tile row bounds that memory
    return buf


def embed_scene(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, *, dim_in: int, pool,
                progress=None, log: Callable[[str], None] = lambda m: None) -> SceneResult:
    """Embed one checked scene (see the module docstring). Writes the GeoTIFF, the projection
    (``dims``) and the preview PNG; returns a :class:`SceneResult`. GDAL's block cache is bounded
    meanwhile (:meth:`ScenePlan.cache_bytes`)."""
    with _bounded_cache(sp):
        return _embed_scene(sp, s, encoder, dim_in=dim_in, pool=pool, progress=progress, log=log)


def _embed_scene(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, *, dim_in: int, pool,
                 progress=None, log: Callable[[str], None] = lambda m: None) -> SceneResult:
    import rasterio
    from rasterio.windows import Window

    g = sp.grid
    paths = output_paths(s.out_dir, sp.path, s.dense)
    bands = s.dims or dim_in
    res = SceneResult(str(sp.path), str(paths["tif"]), (bands, *g.out_shape), windows=g.rows * g.cols)
    fp = _fingerprint(sp, s)
    if _finished_as(paths["tif"], fp, log):
        log(f"{paths['tif']} exists: skipped (delete it to compute it again)")
        res.complete = res.already_done = True
        res.preview = str(paths["preview"]) if paths["preview"].is_file() else None
        return res
    Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    start = _open_partial(paths, sp, s, bands, fp, log)
    res.resumed_from_row = start

    try:
        proj = _projection(paths, sp, s, encoder, dim_in, reuse=bool(start)) if s.dims else None
    except DomainFMError:
        if not start:  # nothing computed yet (e.g. too few valid windows to fit): leave nothing behind
            paths["partial"].unlink(missing_ok=True)
            paths["progress"].unlink(missing_ok=True)
        raise
    res.projection = str(paths["pca"]) if s.dims else None
    project = _projector(proj)

    G = g.window_rows_per_tile_row
    out_w = g.out_shape[1]
    task = progress.add_task(sp.path.name, total=g.rows * g.cols, completed=min(start * G, g.rows) * g.cols) \
        if progress is not None else None
    for t in range(start, g.tile_rows):
        buf = _tile_row(sp, s, encoder, t, bands, project, pool, res, progress, task)
        with rasterio.open(paths["partial"], "r+") as dst:
            dst.write(np.moveaxis(buf, -1, 0), window=Window(0, t * G * g.k, out_w, buf.shape[0]))
        _write_json(paths["progress"], {"fingerprint": fp, "tile_rows_done": t + 1, "tile_rows": g.tile_rows})
        if s.stop_after_rows is not None and t + 1 - start >= s.stop_after_rows and t + 1 < g.tile_rows:
            log(f"stopped after {t + 1 - start} tile row(s) (--stop-after-rows)")
            if progress is not None:
                progress.remove_task(task)
            return res
    if progress is not None:
        progress.remove_task(task)
    os.replace(paths["partial"], paths["tif"])
    paths["progress"].unlink(missing_ok=True)
    res.complete = True
    if s.preview:
        res.preview = str(write_preview(sp, paths["tif"], paths["preview"]))
    return res


# ---------------------------------------------------------------- across processes (Lightning's launcher)

def _part_path(parts: Path, t: int) -> Path:
    return parts / f"row_{t:05d}.npy"


def _part_ok(path: Path, shape: tuple[int, int, int]) -> bool:
    """A finished tile row: a readable .npy of the expected shape (a file cut short by a killed
    copy, or one from other settings, is not)."""
    try:
        a = np.load(path, mmap_mode="r")
        return a.shape == shape and a.dtype == np.float32
    except Exception:  # noqa: BLE001 - any unreadable leftover is simply not done
        return False


def _part_shape(g: SceneGrid, t: int, bands: int) -> tuple[int, int, int]:
    G = g.window_rows_per_tile_row
    return ((min((t + 1) * G, g.rows) - t * G) * g.k, g.out_shape[1], bands)


def _save_part(parts: Path, t: int, buf: np.ndarray) -> None:
    """One tile row, written beside its name and renamed: a reader sees it whole or not at all."""
    final = _part_path(parts, t)
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, buf)
    os.replace(tmp, final)


def _parts_todo(paths: dict[str, Path], sp: ScenePlan, s: SceneEmbedSettings, bands: int, fp: str,
                log: Callable[[str], None]) -> tuple[list[int], list[int]]:
    """Rank 0: ``(done, todo)`` tile rows of a sharded run. The parts folder of another run's inputs
    or settings (fingerprint) is emptied; leftovers of killed writers and unreadable rows removed."""
    import shutil

    parts, g = paths["parts"], sp.grid
    record = parts / "fingerprint.json"
    if parts.is_dir():
        try:
            same = json.loads(record.read_text()).get("fingerprint") == fp
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            log(f"{parts.name} was made with other inputs or settings: starting over")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        _write_json(record, {"fingerprint": fp, "tile_rows": g.tile_rows})
    for leftover in parts.glob(".*.tmp.npy"):
        leftover.unlink(missing_ok=True)
    done, todo = [], []
    for t in range(g.tile_rows):
        f = _part_path(parts, t)
        if f.is_file() and _part_ok(f, _part_shape(g, t, bands)):
            done.append(t)
        else:
            f.unlink(missing_ok=True)
            todo.append(t)
    return done, todo


def _assemble(paths: dict[str, Path], sp: ScenePlan, bands: int, s: SceneEmbedSettings) -> None:
    """Rank 0: the tile rows of the parts folder written in order into the output GeoTIFF (the same
    profile as a single-process run), renamed when complete; the parts folder is then removed."""
    import shutil

    import rasterio
    from rasterio.windows import Window

    g = sp.grid
    G, out_w = g.window_rows_per_tile_row, g.out_shape[1]
    paths["progress"].unlink(missing_ok=True)  # a single-process run's record of the same partial name
    _create_raster(paths["partial"], sp, bands, s, _fingerprint(sp, s))
    with rasterio.open(paths["partial"], "r+") as dst:
        for t in range(g.tile_rows):
            buf = np.load(_part_path(paths["parts"], t))
            dst.write(np.moveaxis(buf, -1, 0), window=Window(0, t * G * g.k, out_w, buf.shape[0]))
    os.replace(paths["partial"], paths["tif"])
    shutil.rmtree(paths["parts"], ignore_errors=True)


def embed_scene_sharded(sp: ScenePlan, s: SceneEmbedSettings, encoder: WindowEncoder, fabric, *, dim_in: int,
                        pool, progress=None, log: Callable[[str], None] = lambda m: None) -> SceneResult | None:
    """One scene shared by every process of a Lightning launch (``--devices``/``--num-nodes``).

    Rank 0 lists the tile rows not yet done (``<name>.parts/row_NNNNN.npy`` that exist whole, for
    the same inputs and settings) and fits or reuses the ``dims`` projection; every rank then takes
    a disjoint share of those rows (:func:`domainfm.distributed.shard`), computes each exactly as a
    single-process run does (:func:`_tile_row`) and writes it atomically. When all rows exist rank 0
    assembles the GeoTIFF. A rerun after a rank died redoes its missing rows only. Returns the result
    on rank 0 (counts summed over ranks; ``computed_rows`` lists the tile rows computed this time),
    None on the others. Every rank must call it for every scene, in the same order."""
    import torch.distributed as dist

    from domainfm.distributed import shard

    g = sp.grid
    rank, world = fabric.global_rank, fabric.world_size
    paths = output_paths(s.out_dir, sp.path, s.dense)
    bands = s.dims or dim_in
    res = SceneResult(str(sp.path), str(paths["tif"]), (bands, *g.out_shape), windows=g.rows * g.cols)
    plan = None
    if rank == 0:
        if _finished_as(paths["tif"], _fingerprint(sp, s), log):
            plan = {"skip": True}
        else:
            Path(s.out_dir).mkdir(parents=True, exist_ok=True)
            done, todo = _parts_todo(paths, sp, s, bands, _fingerprint(sp, s), log)
            if s.dims:  # fitted once, by rank 0, before any rank projects
                _projection(paths, sp, s, encoder, dim_in, reuse=bool(done))
            plan = {"skip": False, "done": done, "todo": todo}
    plan = fabric.broadcast(plan, src=0)
    if plan["skip"]:
        if rank == 0:
            log(f"{paths['tif']} exists: skipped (delete it to compute it again)")
            res.complete = res.already_done = True
            res.preview = str(paths["preview"]) if paths["preview"].is_file() else None
            return res
        return None
    proj = None
    if s.dims:
        with np.load(paths["pca"]) as z:
            proj = {k: z[k] for k in z.files}
        res.projection = str(paths["pca"])
    project = _projector(proj)
    mine = shard(plan["todo"], rank, world)
    G = g.window_rows_per_tile_row
    task = progress.add_task(f"{sp.path.name} (rank {rank})", total=sum(min(G, g.rows - t * G) for t in mine) * g.cols) \
        if progress is not None else None
    computed = []
    for t in mine:
        _save_part(paths["parts"], t, _tile_row(sp, s, encoder, t, bands, project, pool, res, progress, task))
        computed.append(t)
        if s.stop_after_rows is not None and len(computed) >= s.stop_after_rows and len(computed) < len(mine):
            log(f"rank {rank}: stopped after {len(computed)} tile row(s) (--stop-after-rows)")
            break
    if progress is not None:
        progress.remove_task(task)
    reports = [None] * world
    dist.all_gather_object(reports, {"rows": computed, "embedded": res.embedded, "skipped": res.skipped_nodata})
    if rank != 0:
        return None
    res.embedded = sum(r["embedded"] for r in reports)
    res.skipped_nodata = sum(r["skipped"] for r in reports)
    res.computed_rows = sorted(t for r in reports for t in r["rows"])
    res.resumed_from_row = len(plan["done"])
    log(f"{sp.path.name}: tile rows computed {res.computed_rows} by {world} processes, "
        f"{len(plan['done'])} of {g.tile_rows} already done")
    if len(plan["done"]) + len(res.computed_rows) < g.tile_rows:
        return res  # a rank stopped early: a rerun computes the rest
    _assemble(paths, sp, bands, s)
    res.complete = True
    if s.preview:
        res.preview = str(write_preview(sp, paths["tif"], paths["preview"]))
    return res


def _bounded_cache(sp: ScenePlan):
    """``rasterio.Env`` with GDAL_CACHEMAX (bytes, process-wide while it lasts) at :meth:`ScenePlan.cache_bytes`."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=sp.cache_bytes())


def _rank_worker(fabric, job: "EmbedJob", log: Callable[[str], None]) -> list[SceneResult] | None:
    """One process's part of every scene; an error in any rank (a scene whose rows of one rank's
    share cannot be read, say) ends every rank at once, finished rows kept for a rerun."""
    from domainfm.distributed import end_job_on_rank_failure

    with end_job_on_rank_failure():
        return _rank_work(fabric, job, log)


def _rank_work(fabric, job: "EmbedJob", log: Callable[[str], None]) -> list[SceneResult] | None:
    from concurrent.futures import ThreadPoolExecutor

    s = job.settings
    g0 = job.scenes[0].grid
    encoder = WindowEncoder(job.backbone, fabric.device, s.precision, dense=s.dense, crop=g0.crop, k=g0.k)
    results = []
    with _progress_bar(s.progress) as progress, ThreadPoolExecutor(max_workers=1) as pool:
        for sp in job.scenes:
            try:
                with _bounded_cache(sp):
                    results.append(embed_scene_sharded(sp, s, encoder, fabric, dim_in=job.dim_in, pool=pool,
                                                       progress=progress, log=log))
            finally:
                sp.close()
    return results if fabric.global_rank == 0 else None


# ---------------------------------------------------------------- preview

def _stretch(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, dtype=np.float32)
    for i in range(x.shape[-1]):
        v = x[..., i][valid]
        if v.size:
            lo, hi = np.percentile(v, [2, 98])
            out[..., i] = np.clip((x[..., i] - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return out


def _decimated_shape(H: int, W: int, max_px: int) -> tuple[int, int]:
    f = min(1.0, max_px / max(H, W))
    return max(1, round(H * f)), max(1, round(W * f))


def _decimated_pieces(path: Path, max_px: int, *, masked: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(y0, x0, block)`` pieces of :func:`decimated_read`'s result, block [C, h', w'], in row order.
    Each piece is about 512 x 2048 scene pixels, read with the file reopened, so GDAL's block cache
    never holds more than a piece."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        H, W, C = src.height, src.width, src.count
    h, w = _decimated_shape(H, W, max_px)
    step_y, step_x = max(1, round(512 * h / H)), max(1, round(2048 * w / W))  # output px per piece
    for y0 in range(0, h, step_y):
        y1 = min(h, y0 + step_y)
        top, bottom = round(y0 * H / h), round(y1 * H / h)
        for x0 in range(0, w, step_x):
            x1 = min(w, x0 + step_x)
            left, right = round(x0 * W / w), round(x1 * W / w)
            with rasterio.open(path) as src:
                yield y0, x0, src.read(window=Window(left, top, right - left, bottom - top),
                                       out_shape=(C, y1 - y0, x1 - x0), masked=masked)


def decimated_read(path: Path, max_px: int = PREVIEW_MAX_PX, *, masked: bool = False) -> np.ndarray:
    """All bands of ``path`` resampled (nearest) so that the longer side is at most ``max_px``:
    [C, h, w]. Read in pieces of about 512 x 2048 scene pixels (:func:`_decimated_pieces`), so GDAL's
    block cache never holds more than a piece. ``masked``: a masked array (the file's nodata masked)."""
    rows: dict[int, list] = {}
    for y0, _, block in _decimated_pieces(path, max_px, masked=masked):
        rows.setdefault(y0, []).append(block)
    cat = np.ma.concatenate if masked else np.concatenate
    return cat([cat(row, axis=2) for _, row in sorted(rows.items())], axis=1)


def scene_thumbnail(sp: ScenePlan, max_px: int = PREVIEW_MAX_PX) -> np.ndarray:
    """An RGB thumbnail [h, w, 3] in 0..1 (S2 B4/B3/B2, S1 VV/VH/VV-VH), read decimated by rasterio
    (overviews when the file has them); 2-98 % stretch."""
    import rasterio

    from plugins.eo_sar.bands import MODALITY_BANDS
    from plugins.eo_sar.radiometry import band_names_from_descriptions

    with rasterio.open(sp.path) as src:
        names = band_names_from_descriptions(sp.path, src.descriptions, sp.modality) or MODALITY_BANDS[sp.modality]
    data = decimated_read(sp.path, max_px, masked=True).astype(np.float32)
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    data = np.ma.getdata(data)
    if "B4" in names and "B3" in names and "B2" in names:
        rgb = np.stack([data[names.index(b)] for b in ("B4", "B3", "B2")], axis=-1)
    elif "VV" in names and "VH" in names:
        vv, vh = data[names.index("VV")], data[names.index("VH")]
        rgb = np.stack([vv, vh, vv - vh], axis=-1)
    else:
        rgb = np.repeat(data[0][..., None], 3, axis=-1)
    return _stretch(rgb, valid) * valid[..., None]


def preview_components(tif: Path, max_px: int = PREVIEW_MAX_PX,
                       fit_pixels: int = PREVIEW_FIT_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """The first three principal components of an embedding GeoTIFF, read decimated (longer side
    at most ``max_px``), as RGB [h, w, 3] in 0..1, and its valid mask [h, w].

    Memory does not grow with the embedding: the components are fitted on at most about
    ``fit_pixels`` valid pixels (a regular grid over the decimated raster; all of them when it is
    smaller), then every piece is projected as it is read. A dense D=768 map of a full Sentinel-2
    tile read whole would be 512² x 768 float64 = 1.6 GB."""
    import rasterio

    with rasterio.open(tif) as src:
        H, W = src.height, src.width
    h, w = _decimated_shape(H, W, max_px)
    s = max(1, math.ceil(math.sqrt(h * w / fit_pixels)))  # grid step of the fitting sample
    sample = []
    for y0, x0, block in _decimated_pieces(tif, max_px):
        ys = np.arange((-y0) % s, block.shape[1], s)
        xs = np.arange((-x0) % s, block.shape[2], s)
        v = block[:, ys][:, :, xs].reshape(block.shape[0], -1).T.astype(np.float64)
        sample.append(v[np.isfinite(v).all(axis=1)])
    v = np.concatenate(sample)
    mean, comps = None, None
    if len(v) >= 2:
        mean = v.mean(axis=0)
        _, _, vt = np.linalg.svd(v - mean, full_matrices=False)
        comps = vt[:3].T                                     # [C, n <= 3]
    del v, sample
    pcs = np.zeros((h, w, 3))
    valid = np.zeros((h, w), bool)
    for y0, x0, block in _decimated_pieces(tif, max_px):
        x = np.moveaxis(block, 0, -1)
        ok = np.isfinite(x).all(axis=-1)
        valid[y0:y0 + x.shape[0], x0:x0 + x.shape[1]] = ok
        if comps is not None:
            pcs[y0:y0 + x.shape[0], x0:x0 + x.shape[1], :comps.shape[1]][ok] = (x[ok] - mean) @ comps
    return _stretch(pcs, valid), valid


def write_preview(sp: ScenePlan, tif: Path, png: Path, alpha: float = 0.65) -> Path:
    """The preview PNG: the embedding's first three principal components as RGB (nodata clear)
    over the scene's own RGB thumbnail, in scene pixel coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = preview_figure(sp, tif, alpha)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def preview_figure(sp: ScenePlan, tif: Path, alpha: float = 0.65):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = sp.grid
    thumb = scene_thumbnail(sp)
    pcs, valid = preview_components(tif)
    rgba = np.concatenate([pcs, (valid * alpha)[..., None]], axis=-1)
    off = (g.window - g.stride) / 2
    out_h, out_w = g.out_shape
    fig, ax = plt.subplots(figsize=(6, 6 * g.height / g.width + 0.4))
    ax.imshow(thumb, extent=(0, g.width, g.height, 0), interpolation="bilinear")
    ax.imshow(rgba, extent=(off, off + out_w * g.pixel, off + out_h * g.pixel, off), interpolation="nearest")
    ax.set_xlim(0, g.width)
    ax.set_ylim(g.height, 0)
    ax.set_title(f"{sp.path.name}: first 3 principal components of the embedding", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- entry point

@dataclass
class EmbedJob:
    """The model and checked scenes of one ``eo-sar embed`` call (everything checked, nothing written)."""

    settings: SceneEmbedSettings
    backbone: Any
    scenes: list[ScenePlan]
    dim_in: int
    messages: list[str] = field(default_factory=list)

    def record(self) -> dict[str, str]:
        from domainfm.predict import MODEL_VERSION_TAG

        tags = {"eo_sar.embed.model_source": self.settings.model}
        if self.settings.model_version:  # `domainfm registry show NAME/VERSION` lists the run by it
            tags[MODEL_VERSION_TAG] = self.settings.model_version
        if self.scenes:
            tags.update(self.scenes[0].plan.record())
        return tags


def _check_dims(s: SceneEmbedSettings, plans: list[ScenePlan], dim_in: int, patch: int | None) -> None:
    """``--dims`` that the PCA could never fit, refused before any output is opened: more than the
    model's features, or more than the valid samples the scene's PCA sample holds
    (:func:`pca_sample_size`: nodata windows give none)."""
    if s.dims > dim_in:
        raise DomainFMError(f"--dims {s.dims} is more than the model's {dim_in} features",
                            fix=f"pass --dims {dim_in} or less")
    for sp in plans:
        windows = sp.grid.rows * sp.grid.cols
        drawn, valid, n = pca_sample_size(sp, s)  # nodata windows (patches) give no sample
        if n < s.dims:
            what = f"{n} valid patch token(s) of {valid} valid window(s)" if sp.grid.patch is not None \
                else f"{valid} valid window(s)"
            more = "a larger --pca-windows" if s.pca_windows < windows else "a smaller --stride for more windows"
            raise DomainFMError(f"--dims {s.dims} needs at least {s.dims} samples to fit its principal components, "
                                f"and this scene's sample of {drawn} window(s) has {what}"
                                + (" (the others are mostly nodata)" if valid < drawn else ""), path=sp.path, fix=f"pass --dims {n} or less, or {more}")


def prepare(scenes: Sequence[str | Path], s: SceneEmbedSettings, *, backbone=None) -> EmbedJob:
    """Load the model and check every scene and setting before anything is written (one-line
    DomainFMError for: bands not alignable, a window larger than a scene, a bad --tome-r,
    --dense on a non-ViT or with token merging, --dims out of range). ``backbone``: an already
    built Backbone carrying ``input_spec`` instead of loading ``s.model``."""
    from domainfm.backbones import create_backbone

    if not scenes:
        raise DomainFMError("no scene given", fix="pass one or more GeoTIFF scenes")
    if s.batch_size < 1:
        raise DomainFMError(f"--batch-size {s.batch_size} must be at least 1", fix="pass --batch-size 1 or more")
    if s.dims is not None and s.dims < 1:
        raise DomainFMError(f"--dims {s.dims} must be at least 1", fix="pass --dims 1 or more, or drop it")
    if not 0.0 <= s.nodata_fraction <= 1.0:
        raise DomainFMError("--nodata-fraction must be within 0..1")
    pin_settings_model(s)  # the alias resolved once: loaded, fingerprinted, recorded
    if backbone is None:  # benchmarks pass one already built (e.g. fewer blocks)
        backbone = create_backbone(f"models:/{s.model_version}" if s.model_version else s.model, img_size=s.window)
    spec = getattr(backbone, "input_spec", None)
    patch = backbone.patch_size if backbone.is_vit else None
    if s.tome_r:
        from domainfm.inference import apply_token_merging, check_token_merging

        check_token_merging(backbone, s.tome_r, where=f"{s.model} at --window {s.window}")
        if s.dense:
            raise DomainFMError("--dense cannot run with --tome-r: merged tokens no longer sit on the patch grid",
                                fix="drop --tome-r for dense features")
    plans = [plan_scene(p, s, spec, patch) for p in scenes]
    for sp in plans:
        if len(sp.plan.model_bands) != backbone.in_chans:
            raise DomainFMError(f"the model takes {backbone.in_chans} bands but records {len(sp.plan.model_bands)} "
                                "band names", path=s.model, fix="re-export the backbone")
    if s.dims:
        _check_dims(s, plans, int(backbone.embed_dim), patch)
    if s.tome_r:
        apply_token_merging(backbone, s.tome_r)
    messages = list(plans[0].plan.messages) if plans else []
    return EmbedJob(s, backbone, plans, int(backbone.embed_dim), messages)


def pin_settings_model(s: SceneEmbedSettings) -> None:
    """Resolve a ``models:/NAME@ALIAS`` ``--model`` ONCE to ``NAME/VERSION`` (``s.model_version``):
    the version then loaded, fingerprinted and recorded, whatever the alias names later."""
    if s.model_version is None and s.model.startswith("models:/"):
        from domainfm.predict import pin_model

        s.model_version = pin_model(s.model)[1]


def already_done(scenes: Sequence[str | Path], s: SceneEmbedSettings) -> list[SceneResult] | None:
    """The results of a call whose every scene already has a finished output of these inputs,
    settings and model (version or file identity), found WITHOUT loading the model: the scenes' and
    outputs' headers and the model's recorded modality only. None when any scene is left to
    compute, or anything is not as expected (the full checks of :func:`prepare` then run)."""
    import rasterio
    from rasterio.errors import RasterioError

    from domainfm.backbones import input_spec_of

    if not scenes or not Path(s.model).is_file() and not s.model.startswith("models:/"):
        return None
    try:
        pin_settings_model(s)
        outs = [output_paths(s.out_dir, p, s.dense)["tif"] for p in scenes]
        if not all(o.is_file() for o in outs):
            return None
        spec = input_spec_of(f"models:/{s.model_version}" if s.model_version else s.model)
        results = []
        for p, tif in zip(scenes, outs):
            path = Path(p)
            modality, header = _scene_modality(path, s.modality, spec)
            sp = ScenePlan.__new__(ScenePlan)  # what the fingerprint reads: the scene and its modality
            sp.path, sp.modality = path, modality
            g = SceneGrid(header[0], header[1], s.window, s.step)
            with rasterio.open(tif) as src:
                if (src.tags().get("RESUME_FINGERPRINT") != _fingerprint(sp, s) or (s.dims and src.count != s.dims)
                        or not s.dense and (src.height, src.width) != tuple(g.out_shape)):  # dense: needs the patch
                    return None
                shape = (src.count, src.height, src.width)
            paths = output_paths(s.out_dir, path, s.dense)
            res = SceneResult(str(path), str(tif), shape, windows=g.rows * g.cols, complete=True, already_done=True)
            res.preview = str(paths["preview"]) if paths["preview"].is_file() else None
            res.projection = str(paths["pca"]) if s.dims and paths["pca"].is_file() else None
            results.append(res)
        return results
    except (DomainFMError, RasterioError, OSError):
        return None


def run_embedding(job: EmbedJob, log: Callable[[str], None] = lambda m: None) -> list[SceneResult] | None:
    """Embed every scene of a prepared job, one after the other (see :func:`embed_scene`).

    ``devices * num_nodes > 1``: under Lightning's DDP launcher (gloo on CPU, NCCL on GPU; started
    once per machine it starts the machine's other processes itself, started by ``srun``/``torchrun``
    it uses theirs), every process shares each scene's tile rows (:func:`embed_scene_sharded`); the
    results come back on global rank 0 only (None elsewhere)."""
    from concurrent.futures import ThreadPoolExecutor

    s = job.settings
    device = resolve_device(s.accelerator)
    if s.devices * s.num_nodes > 1:
        import lightning as L

        fabric = L.Fabric(accelerator="gpu" if device.type == "cuda" else "cpu", devices=s.devices,
                          num_nodes=s.num_nodes, strategy="ddp")
        return fabric.launch(_rank_worker, job, log)
    g0 = job.scenes[0].grid
    encoder = WindowEncoder(job.backbone, device, s.precision, dense=s.dense, crop=g0.crop, k=g0.k)
    results = []
    with _progress_bar(s.progress) as progress, ThreadPoolExecutor(max_workers=1) as pool:
        for sp in job.scenes:
            try:
                results.append(embed_scene(sp, s, encoder, dim_in=job.dim_in, pool=pool, progress=progress,
                                           log=log))
            finally:
                sp.close()
    return results


def _progress_bar(enabled: bool):
    """Rich progress bars over windows, on stderr (:func:`domainfm.output.progress_bar`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from domainfm.output import progress_bar

    return progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                        TimeRemainingColumn(), enabled=enabled)
