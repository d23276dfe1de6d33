"""Data shared by every plugin: the one CSV reader, the one image reader, DataLoader workers, and
:class:`DictBatchDataModule`, the base of the plugins' datamodules, and :class:`LabelledDataModule`,
its form for fine-tuning's labelled train/val/test data (both built on first access, so this
module imports no lightning until a datamodule is wanted).

Every CSV the product reads (labels, tile labels, lists) goes through :func:`read_csv_rows`, and
every plain image (PNG, JPEG, TIFF...) through :func:`read_image`, so that a file saved by a
spreadsheet or a microscope camera is read the same way everywhere:

- CSV: a UTF-8 byte-order mark (Excel's "CSV UTF-8"), CRLF line ends, spaces around header names
  and values, blank rows and empty trailing columns are all tolerated; ``;`` or tab separators
  (Excel in many locales) are recognised from the header line. A missing column is one line
  naming the file, the missing columns and the columns found.
- Images keep their bit depth and range: 8- and 16-bit PNG (16-bit read with imagecodecs, since
  Pillow reduces 16-bit colour to 8 bits), 8/16-bit and float TIFF (rasterio). Values are scaled by
  the data type — ``uint8 / 255``, ``uint16 / 65535``, floating point as stored — never by the
  content of one image, and never clipped; a type without a fixed range (signed or 32-bit
  integers) stops with one line unless the caller asks for raw values.

DataLoader worker processes (:func:`loader_kwargs`, :func:`worker_context`, :func:`default_num_workers`):
a process that runs threads (a prefetching thread, MLflow's async logger, Lightning's callbacks,
a pin-memory thread) must not ``fork`` workers: a child forked while another thread holds a lock
(an import lock, h5py's global lock, a logging lock) inherits that lock held, with no thread left to
release it, and waits forever. Workers are therefore started by the ``forkserver`` start method
(``spawn`` where there is none): a clean single-threaded server process forks them, and each worker
unpickles its dataset, so a dataset must be picklable (open files lazily, per worker). Every
``DataLoader`` of the product that may start workers takes its settings from :func:`loader_kwargs`.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from domainfm.errors import DomainFMError

# ---------------------------------------------------------------------------------------- CSV

_SEPARATORS = (",", ";", "\t")


class CSVRows(list):
    """``list[dict[str, str]]``, one dict per data row (header name -> stripped value), with the
    header in ``.columns`` and each row's line number in the file in ``.lines``."""

    columns: list[str]
    lines: list[int]


def _separator(header_line: str) -> str:
    """``,`` unless the header has none and uses ``;`` or tabs (Excel's export in comma-decimal locales)."""
    if "," in header_line:
        return ","
    for sep in _SEPARATORS[1:]:
        if sep in header_line:
            return sep
    return ","


def read_csv_rows(path: str | Path, required: Sequence[str] = (), *, what: str = "CSV",
                  fix: str | None = None) -> CSVRows:
    """Rows of a CSV file with a header line.

    Tolerates a UTF-8 byte-order mark, CRLF/CR line ends, spaces around header names and values,
    blank rows (Excel's ``,,,``), empty trailing columns and ``;``/tab separators. Header names
    and values are returned stripped; a short row's missing cells are ``""``.

    Errors (one-line :class:`DomainFMError`, naming the file): not found, not UTF-8 text, no header,
    duplicate column names, a row with more (non-empty) cells than the header, and ``required``
    columns missing — "lacks the column(s) a, b (columns found: x, y)". ``what`` names the file in
    messages ("labels CSV"); ``fix`` replaces the default advice for missing columns.
    """
    p = Path(path)
    if p.is_dir():
        raise DomainFMError(f"is a folder, but the {what} is a file", path=p, fix="give the CSV file itself")
    if not p.is_file():
        raise DomainFMError(f"{what} not found", path=p, fix="check the path")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DomainFMError(f"{what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                            path=p, fix="save it as 'CSV UTF-8' (Excel: Save As > CSV UTF-8)") from None
    text = text.lstrip("\ufeff")  # a second BOM left by a tool that added one to a file that had one
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_separator(first_line))
    header: list[str] | None = None
    rows = CSVRows()
    rows.lines = []
    for cells in reader:
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue  # blank lines and rows of empty cells
        if header is None:
            header = cells
            while header and header[-1] == "":
                header.pop()  # empty trailing columns of a spreadsheet export
            dups = sorted({h for h in header if h and header.count(h) > 1})
            if dups:
                raise DomainFMError(f"{what} has the column(s) {', '.join(dups)} more than once", path=p,
                                    fix="give every column its own name")
            continue
        extra = [c for c in cells[len(header):] if c]
        if extra:
            raise DomainFMError(f"{what} line {reader.line_num} has {len(header) + len(extra)} cells, "
                                f"the header has {len(header)}", path=p,
                                fix="quote values that contain the separator, or add a header name for every column")
        cells += [""] * (len(header) - len(cells))
        rows.append({h: c for h, c in zip(header, cells) if h})
        rows.lines.append(reader.line_num)
    if header is None:
        raise DomainFMError(f"{what} is empty (no header line)", path=p,
                            fix=f"write a header line{': ' + ','.join(required) if required else ''}")
    rows.columns = [h for h in header if h]
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise DomainFMError(f"{what} lacks the column(s) {', '.join(missing)} (columns found: "
                            f"{', '.join(rows.columns) or 'none'})", path=p,
                            fix=fix or f"add the column(s) {', '.join(missing)} to the header line")
    return rows


# ------------------------------------------------------------------------------------- images

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
# Pillow modes by what their pixels are: 8-bit modes are converted to these before reading
_PIL_8BIT = {"1": "L", "L": "L", "LA": "LA", "P": None, "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA",
             "RGBX": "RGB", "RGBa": "RGBA", "La": "LA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
_PIL_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: bands, size and the pixel data type as read."""

    bands: int
    height: int
    width: int
    dtype: str  # numpy name: uint8, uint16, float32...


def write_csv_atomic(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a CSV (columns from the first row), written under a temporary name in the same
    folder and renamed: a reader never sees half a table, and a killed job leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _unreadable(path: Path, e: BaseException) -> DomainFMError:
    return DomainFMError(f"cannot be read as an image ({_first_line(e)})", path=path, fix="replace or delete the file")


def _png_bit_depth(path: Path) -> int:
    """The bit depth in a PNG's IHDR chunk (byte 24 of a PNG file)."""
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" else 8


def _pil_target_mode(im) -> str:
    mode = im.mode
    if mode == "P":
        return "RGBA" if "transparency" in im.info else "RGB"
    return _PIL_8BIT.get(mode) or mode


def _pil_dtype(im) -> str:
    if im.mode in _PIL_8BIT:
        return "uint8"
    if im.mode in _PIL_16BIT:
        return "uint16"
    if im.mode == "I":
        # Pillow reads 16-bit greyscale PNG/PGM as 32-bit "I" in some versions: the format's own depth
        return "uint16" if im.format in ("PNG", "PPM") else "int32"
    if im.mode == "F":
        return "float32"
    return im.mode


def image_info(path: str | Path) -> ImageInfo:
    """Bands, size and data type from the file's header (nothing decoded); unreadable -> one line."""
    p = Path(path)
    try:
        if p.suffix.lower() in TIFF_SUFFIXES:
            import rasterio

            with _quiet_rasterio(), rasterio.open(p) as src:
                return ImageInfo(int(src.count), int(src.height), int(src.width), str(src.dtypes[0]))
        from PIL import Image

        with Image.open(p) as im:
            w, h = im.size
            if im.format == "PNG" and _png_bit_depth(p) == 16:
                bands = {"I;16": 1, "I;16B": 1, "I": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, len(im.getbands()))
                return ImageInfo(bands, h, w, "uint16")
            bands = len(Image.new(_pil_target_mode(im), (1, 1)).getbands()) if im.mode in _PIL_8BIT else len(im.getbands())
            return ImageInfo(bands, h, w, _pil_dtype(im))
    except DomainFMError:
        raise
    except Exception as e:
        raise _unreadable(p, e) from None


class _quiet_rasterio:
    """A plain (not georeferenced) TIFF is a normal image here: no NotGeoreferencedWarning."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        from rasterio.errors import NotGeoreferencedWarning

        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _decode(p: Path) -> tuple[np.ndarray, bool]:
    """Pixels ``[C, H, W]`` in the file's own data type, and whether nodata was masked (TIFF)."""
    if p.suffix.lower() in TIFF_SUFFIXES:
        import rasterio

        with _quiet_rasterio(), rasterio.open(p) as src:
            data = src.read(masked=True)  # the file's nodata value (if any) becomes a mask
        if np.ma.is_masked(data):
            return data, True
        return np.ma.getdata(data), False
    if p.suffix.lower() in PNG_SUFFIXES and _png_bit_depth(p) == 16:
        import imagecodecs

        arr = imagecodecs.png_decode(p.read_bytes())  # keeps 16 bits per sample (Pillow would not)
    else:
        from PIL import Image

        with Image.open(p) as im:
            if im.mode in _PIL_8BIT:
                arr = np.asarray(im.convert(_pil_target_mode(im)) if im.mode != _pil_target_mode(im) else im)
            else:
                arr = np.asarray(im)
                if _pil_dtype(im) == "uint16" and arr.dtype != np.uint16:
                    if arr.min() < 0 or arr.max() > 65535:
                        raise DomainFMError(f"{im.format} image of mode {im.mode} has values outside 0..65535",
                                            path=p, fix="save it as an 8- or 16-bit PNG or a float TIFF")
                    arr = arr.astype(np.uint16)
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return arr, False


def _scale(arr: np.ndarray, path: Path) -> np.ndarray:
    """float32 by the data type's range: bool 0/1, uint8 / 255, uint16 / 65535, float as stored."""
    dt = np.dtype(arr.dtype)
    if dt == np.bool_:
        return arr.astype(np.float32)
    if dt == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if dt == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    if dt.kind == "f":
        return arr.astype(np.float32)
    raise DomainFMError(f"has {dt.name} pixels, whose range is not fixed (only uint8, uint16 and float images "
                        "are scaled)", path=path, fix="save the images as 8- or 16-bit unsigned or as float TIFF")


def read_image(path: str | Path, *, rgb: bool = False, scale: bool = True) -> np.ndarray:
    """A plain image as ``float32 [C, H, W]``, keeping its bit depth and range.

    ``scale=True``: values by the data type (``uint8 / 255``, ``uint16 / 65535``, float as stored, so
    0..1 for integer images); other integer types stop with one line. ``scale=False``: the stored
    values as float32 (multispectral GeoTIFFs, normalised later with their own band statistics).
    TIFF pixels equal to the file's nodata value become NaN. ``rgb=True`` returns 3 bands: grey
    is repeated, an alpha band dropped; more bands than RGBA stop with one line.
    Formats: PNG (8/16-bit), JPEG, BMP, GIF, WebP, PPM/PGM through Pillow (16-bit PNG through
    imagecodecs), TIFF/GeoTIFF (any band count, integer or float) through rasterio.
    """
    p = Path(path)
    try:
        arr, masked = _decode(p)
    except DomainFMError:
        raise
    except Exception as e:
        raise _unreadable(p, e) from None
    data = np.ma.getdata(arr)
    out = _scale(data, p) if scale else data.astype(np.float32)
    if masked:
        out = np.where(np.ma.getmaskarray(arr), np.float32(np.nan), out)
    if rgb:
        out = to_rgb(out, p)
    return np.ascontiguousarray(out, dtype=np.float32)


def to_rgb(image: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """``[C, H, W]`` -> ``[3, H, W]``: grey (and grey + alpha) repeated, RGBA's alpha dropped."""
    c = image.shape[0]
    if c in (1, 2):
        return np.repeat(image[:1], 3, axis=0)
    if c in (3, 4):
        return image[:3]
    raise DomainFMError(f"has {c} bands; an RGB model reads 1 (grey), 3 (RGB) or 4 (RGBA)", path=path,
                        fix="give RGB or greyscale images, or a model with as many input bands")


# ---------------------------------------------------------------- DataLoader workers

# what the forkserver imports once, so that each worker it forks starts in milliseconds
_FORKSERVER_PRELOAD = ["torch", "numpy"]
# a batch that takes longer than this in a worker means the worker is stuck: the DataLoader then
# raises (one failed item of work) instead of waiting for ever
WORKER_TIMEOUT_S = 600.0


def data_fingerprint(path: str | Path) -> str:
    """A cheap fingerprint of the data under ``path`` (a folder or one file): ``sha256:<hex>`` over
    the sorted relative paths, sizes and modification times (ns) of its files (hidden files and
    folders skipped; no file content read). The same files give the same fingerprint; adding,
    removing, renaming or rewriting one changes it. DomainFMError when ``path`` does not exist."""
    import hashlib

    root = Path(path)
    if not root.exists():
        raise DomainFMError("data folder does not exist", path=root, fix="pass an existing --data folder")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "sha256:" + h.hexdigest()


def default_num_workers(cap: int = 4) -> int:
    """DataLoader workers to use when the user gives none: ``min(cap, CPUs this process may use)``
    (``os.sched_getaffinity``, which respects cgroup/cpuset limits; ``os.cpu_count`` elsewhere).
    torch warns when a DataLoader asks for more workers than that; on a 2-core machine this is 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(int(cap), cpus))


def worker_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``; never ``fork``."""
    import multiprocessing as mp

    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def worker_context(num_workers: int):
    """The multiprocessing context for ``DataLoader(multiprocessing_context=...)``: None without
    workers (nothing is started), else a context that does not fork the calling process."""
    if num_workers <= 0:
        return None
    import multiprocessing as mp

    method = worker_start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        # takes effect when the server starts (the first worker of this process); later calls are no-ops
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def loader_kwargs(num_workers: int, *, persistent: bool = False, prefetch_factor: int | None = None,
                  timeout: float | None = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader`` about its workers: ``num_workers``, a
    non-forking ``multiprocessing_context``, ``persistent_workers``, ``prefetch_factor`` and a
    ``timeout`` (seconds per batch) so that a stuck worker ends in an error, not a hang. With
    ``num_workers=0`` only ``num_workers`` is set (torch rejects the others then)."""
    n = max(0, int(num_workers))
    if n == 0:
        return {"num_workers": 0}
    kwargs: dict[str, Any] = {"num_workers": n, "multiprocessing_context": worker_context(n),
                              "persistent_workers": bool(persistent)}
    if prefetch_factor is not None:
        kwargs["prefetch_factor"] = int(prefetch_factor)
    if timeout:
        kwargs["timeout"] = float(timeout)
    return kwargs


# ------------------------------------------------------------------------- dict-batch datamodule

def dict_loader(dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0, collate_fn=None,
                drop_last: bool = False, persistent: bool = True, batch_sampler=None):
    """The one DataLoader factory of the datamodules: ``batch_size``, ``shuffle``, ``collate_fn``
    (None: torch's default collate of dict samples), workers from :func:`loader_kwargs` (never a
    fork of a threaded process; ``persistent`` kept between epochs). A ``batch_sampler`` (lists of
    indices) replaces ``batch_size``/``shuffle``/``drop_last``."""
    from torch.utils.data import DataLoader

    workers = loader_kwargs(num_workers, persistent=persistent)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate_fn,
                      **workers)


_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def _datamodule_base():
    """Build :class:`DictBatchDataModule` on first use: it subclasses Lightning's
    ``LightningDataModule``, and importing lightning here at module level would slow down every
    light import of this module (the CLI's ``--help``, the CSV and image readers)."""
    import lightning as L
    from torch.utils.data import DataLoader

    class DictBatchDataModule(L.LightningDataModule):
        """Base of the plugins' datamodules, in the manner of torchgeo's ``NonGeoDataModule``:
        datasets yield dict samples, :meth:`setup` builds the datasets a stage needs, and one
        dataloader factory makes every loader.

        A subclass sets ``splits`` (the splits it has, default ``("train",)``) and implements
        ``build_dataset(split) -> Dataset``. ``setup(stage)`` builds each split of the stage
        (``fit``: train and val; ``validate``: val; ``test``; ``predict``) that is in ``splits``,
        once: it is idempotent, so a caller may run it before handing the module to a Trainer to
        surface every data error before a model is built; ``self.datasets[split]`` then holds it.

        :meth:`train_dataloader` is defined here; a subclass with more splits exposes them with one
        line each (``def val_dataloader(self): return self.dataloader("val")``) — Lightning runs
        a validation loop whenever ``val_dataloader`` is defined, so the base does not define it.

        :meth:`dataloader` (the factory): ``batch_size``; shuffled for ``train`` only (unless
        ``shuffle_train=False``: a dataset that draws random samples itself, read in index order);
        ``drop_last_train`` drops the last partial training batch unless the whole training set
        is smaller than one batch (contrastive losses want full batches); ``collate_fn`` (None:
        torch's default collate of the dicts); workers from :func:`loader_kwargs` (never a fork
        of a threaded process; ``persistent_workers`` kept between epochs). A subclass whose
        batches are composed by a sampler overrides :meth:`batch_sampler` (per split; it then
        replaces batch size, shuffling and dropping).
        """

        splits: tuple[str, ...] = ("train",)

        def __init__(self, *, batch_size: int = 32, num_workers: int = 0, collate_fn=None,
                     drop_last_train: bool = False, shuffle_train: bool = True,
                     persistent_workers: bool = True) -> None:
            super().__init__()
            self.batch_size = int(batch_size)
            self.shuffle_train = bool(shuffle_train)
            self.num_workers = int(num_workers)
            self.collate_fn = collate_fn
            self.drop_last_train = bool(drop_last_train)
            self.persistent_workers = bool(persistent_workers)
            self.datasets: dict[str, Any] = {}

        def build_dataset(self, split: str):
            """The dataset of ``split`` (one of ``self.splits``); implemented by each subclass."""
            raise NotImplementedError(f"{type(self).__name__}.build_dataset")

        def setup(self, stage: str | None = None) -> None:
            for split in _STAGE_SPLITS.get(stage or "fit", ()):
                if split in self.splits and split not in self.datasets:
                    self.datasets[split] = self.build_dataset(split)

        def dataloader(self, split: str) -> DataLoader:
            """The one dataloader factory (see the class doc)."""
            if split not in self.splits:
                raise ValueError(f"{type(self).__name__} has no {split!r} split (it has {', '.join(self.splits)})")
            if split not in self.datasets:
                self.setup({"train": "fit", "val": "validate"}.get(split, split))
            dataset = self.datasets[split]
            train = split == "train"
            drop_last = train and self.drop_last_train and len(dataset) > self.batch_size
            return dict_loader(dataset, batch_size=self.batch_size, shuffle=train and self.shuffle_train,
                               drop_last=drop_last, collate_fn=self.collate_fn, num_workers=self.num_workers,
                               persistent=self.persistent_workers, batch_sampler=self.batch_sampler(split, dataset))

        def batch_sampler(self, split: str, dataset):
            """The batch sampler of ``split`` (an iterable of index lists), or None (default: batches
            of ``batch_size``, as the class doc says)."""
            return None

        def train_dataloader(self) -> DataLoader:
            return self.dataloader("train")

    DictBatchDataModule.__module__ = __name__
    DictBatchDataModule.__qualname__ = "DictBatchDataModule"  # pickles by reference, via __getattr__
    return DictBatchDataModule


def _labelled_base():
    """Build :class:`LabelledDataModule` (a :class:`DictBatchDataModule`) on first use."""
    base = globals().get("DictBatchDataModule") or __getattr__("DictBatchDataModule")

    def _split_property(split: str):
        def get(self):
            return self.datasets.get(split)

        def put(self, dataset) -> None:
            if dataset is None:
                self.datasets.pop(split, None)
            else:
                self.datasets[split] = dataset

        return property(get, put, doc=f"The {split} dataset (``datasets[{split!r}]``), or None.")

    class LabelledDataModule(base):
        """The labelled data of fine-tuning (the ``Plugin.finetune_datamodule`` contract): a subclass
        builds its datasets in ``__init__`` (so every data mistake surfaces before a model exists)
        and sets ``train_set``, ``val_set`` and ``test_set`` (None when the data has no test split),
        ``classes`` and ``in_chans``. The three are ``datasets["train" | "val" | "test"]``, so a
        split replaced later (wrapped to align bands, say) is the one the next loader reads.

        Loaders from the base's factory: ``train`` shuffled, ``val`` and ``test`` in order, nothing
        dropped; ``test`` reads ``val_set`` when there is no test split (``has_test`` says which).
        ``setup`` builds nothing (it is all built).
        """

        splits = ("train", "val", "test")
        task: str
        classes: list[str]
        in_chans: int
        train_set = _split_property("train")
        val_set = _split_property("val")
        test_set = _split_property("test")

        def setup(self, stage: str | None = None) -> None:
            pass  # built in __init__

        @property
        def num_outputs(self) -> int:
            return len(self.classes)

        @property
        def has_test(self) -> bool:
            return self.test_set is not None

        def dataloader(self, split: str):
            if split == "test" and self.test_set is None:
                split = "val"
            return super().dataloader(split)

        def val_dataloader(self):
            return self.dataloader("val")

        def test_dataloader(self):
            return self.dataloader("test")

    LabelledDataModule.__module__ = __name__
    LabelledDataModule.__qualname__ = "LabelledDataModule"
    return LabelledDataModule


def __getattr__(name: str):
    # the datamodule bases are built (lightning imported) only when someone asks for them
    builders = {"DictBatchDataModule": _datamodule_base, "LabelledDataModule": _labelled_base}
    if name in builders:
        cls = builders[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# ------------------------------------------------------------------------------ band statistics

@dataclass(frozen=True)
class BandStatistics:
    """Per-band statistics of a set of images: ``mean`` and ``std`` float64 [C] (std 1 for a band
    that is constant or has no valid pixel, so standardising never divides by zero; mean 0 for a
    band with no valid pixel) and ``count`` int64 [C], the valid pixels each band was computed on."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


def band_statistics(images) -> BandStatistics:
    """Mean and (population) standard deviation per band over every valid pixel of ``images``, an
    iterable of arrays [C, H, W] (any sizes, one band count); NaN marks an invalid (nodata) pixel
    of a band, so a caller with a nodata value or a validity mask sets those pixels to NaN first.
    Sums in float64 (exact enough for 1e9 pixels); streams, so one image is in memory at a time.
    DomainFMError when ``images`` is empty or the band counts differ."""
    total = sq = count = None
    for image in images:
        x = np.asarray(image, dtype=np.float64)
        x = x.reshape(x.shape[0], -1)
        if total is None:
            total, sq, count = np.zeros(x.shape[0]), np.zeros(x.shape[0]), np.zeros(x.shape[0], np.int64)
        elif x.shape[0] != total.shape[0]:
            raise DomainFMError(f"an image has {x.shape[0]} bands where the others have {total.shape[0]}",
                                fix="give every image the same bands")
        valid = ~np.isnan(x)
        x = np.where(valid, x, 0.0)
        total += x.sum(1)
        sq += (x ** 2).sum(1)
        count += valid.sum(1)
    if total is None:
        raise DomainFMError("no images to compute band statistics from", fix="give at least one image")
    n = np.maximum(count, 1)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0))
    return BandStatistics(mean, np.where(std > 0, std, 1.0), count)
