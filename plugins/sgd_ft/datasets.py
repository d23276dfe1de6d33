"""Fine-tuning data in the ImageFolder layout: ordinary images or multi-band GeoTIFFs.

``ROOT/train/<class>/*``, ``ROOT/val/<class>/*`` and optionally ``ROOT/test/<class>/*``, walked by
torchvision's ``DatasetFolder`` (:class:`ClassFolders`). Files are read by the core's one image reader (:func:`domainfm.data.read_image`), which keeps bit depth:
PNG/JPEG (and the other formats Pillow reads) become 3-band RGB scaled by their data type (8-bit
/ 255, 16-bit / 65535, so a 16-bit PNG is not clipped to white); ``.tif``/``.tiff`` files keep every
band and their stored values (standardised later with the train split's band statistics). Every
file's header is read up front, so a bad file, an empty class folder or a band count that disagrees with ``--in-chans`` stops the run before any training, with
the file named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from torchvision.datasets import DatasetFolder

from domainfm.data import IMAGE_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, image_info  # noqa: F401 (re-exported)
from domainfm.data import band_statistics
from domainfm.data import read_image as _read_any_image
from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SPLITS = ("train", "val", "test")
PROGRESS_MIN_FILES = 2000  # splits this large get a progress bar while their headers are read
STATS_MAX_FILES = 256  # per-band statistics of GeoTIFF data come from at most this many train files


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: int
    channels: int


def is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def read_channels(path: Path) -> int:
    """Band count from the file's header: every band of a TIFF; 3 for the other formats, which
    are read as RGB (grey repeated, alpha dropped). A file that cannot be opened is named."""
    info = image_info(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return info.bands
    if info.bands > 4:
        raise DomainFMError(f"has {info.bands} bands; PNG/JPEG images are read as RGB", path=path,
                            fix="save multi-band data as GeoTIFF")
    return 3


def read_image(path: str | Path) -> np.ndarray:
    """float32 [C, H, W]: RGB scaled by the data type (0..1 for 8- and 16-bit) for Pillow formats,
    the stored band values for TIFFs (NaN where the file declares nodata)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_any_image(path, scale=False)
    return _read_any_image(path, rgb=True)


def class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


class ClassFolders(DatasetFolder):
    """One split's ``<class>/<image>`` files, walked by torchvision's ``DatasetFolder`` with the
    core's :func:`domainfm.data.read_image` as its loader (bit depth kept; ``dataset[i]`` is
    ``(float32 [C, H, W], class index)``). Class folders and images whose names start with "." are
    skipped, and only a class folder's own images count (not those of its sub-folders).
    ``train_classes`` (from train) fixes the class indices of val/test, whose classes must all
    exist in train. Every mistake is a DomainFMError naming the folder."""

    def __init__(self, split_dir: Path, train_classes: Sequence[str] | None = None) -> None:
        self.split_dir = Path(split_dir)
        self.train_classes = None if train_classes is None else list(train_classes)
        super().__init__(str(split_dir), loader=read_image, is_valid_file=self._is_own_image, allow_empty=True)
        self.classes = self.train_classes if self.train_classes is not None else self.classes
        found = {index for _, index in self.samples}
        for name in sorted(self.class_to_idx):  # the first empty class folder, by name
            if self.class_to_idx[name] not in found:
                raise DomainFMError(f"class folder holds no images ({', '.join(IMAGE_SUFFIXES)})",
                                    path=self.split_dir / name, fix="add images to it or remove the folder")

    def _is_own_image(self, path: str) -> bool:
        p = Path(path)
        return p.parent.parent == self.split_dir and is_image(p)

    def find_classes(self, directory) -> tuple[list[str], dict[str, int]]:
        folders = class_folders(Path(directory))
        if not folders:
            raise DomainFMError("holds no class folders", path=directory, fix="put the images in <class>/ sub-folders")
        names = [f.name for f in folders]
        classes = names if self.train_classes is None else self.train_classes
        unknown = [n for n in names if n not in classes]
        if unknown:
            split = Path(directory).name
            raise DomainFMError(f"classes {', '.join(unknown)} are not in train/", path=directory,
                                fix="add those classes to train/ or remove them from " + split + "/")
        return names, {n: classes.index(n) for n in names}


def scan_split(root: Path, split: str, classes: Sequence[str] | None = None) -> tuple[list[str], list[ImageFile]]:
    """Class names and files of one split (:class:`ClassFolders`), each file's header read. ``classes``
    (from train) fixes the label indices of val/test, whose classes must all exist in train."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DomainFMError(f"no {split}/ folder (the ImageFolder layout needs {split}/<class>/<image>)",
                            path=root, fix=f"create {split_dir}/<class>/ folders of images")
    folder = ClassFolders(split_dir, classes)
    labelled = [(Path(p), label) for p, label in folder.samples]
    return list(folder.classes), [ImageFile(p, label, read_channels(p)) for p, label in _progress(labelled, split)]


def _progress(items: list, split: str):
    """A progress bar over the header checks of a large split (they read every file once)."""
    if len(items) < PROGRESS_MIN_FILES:
        return items
    from rich.progress import track

    return track(items, description=f"checking {split}/ images", transient=True, console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def check_channels(files: Sequence[ImageFile], in_chans: int | None) -> int:
    """The one band count of all ``files``; ``in_chans`` (``--in-chans``) must agree with it."""
    first = files[0]
    for f in files:
        if f.channels != first.channels:
            raise DomainFMError(f"has {f.channels} bands but {first.path} has {first.channels}", path=f.path,
                                fix="give every image of the dataset the same bands")
    if in_chans is not None and in_chans != first.channels:
        raise DomainFMError(f"--in-chans {in_chans} does not match the data: the images have {first.channels} bands",
                            path=first.path, fix=f"pass --in-chans {first.channels} or drop --in-chans")
    return first.channels


def split_statistics(files: Sequence[ImageFile]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (float32 [C]) over every valid (not nodata) pixel of (at most
    STATS_MAX_FILES, evenly spaced) files, by the core's :func:`domainfm.data.band_statistics`."""
    step = max(1, len(files) // STATS_MAX_FILES)
    chosen = list(files)[::step][:STATS_MAX_FILES]
    stats = band_statistics(read_image(f.path) for f in chosen)
    return stats.mean.astype(np.float32), stats.std.astype(np.float32)


class ImageFolderClassification:
    """One split of an ImageFolder dataset. ``dataset[i]`` is ``{"image": float32 [C, S, S],
    "label": int}``: nodata pixels set to the band mean, resized to ``img_size`` (bilinear,
    antialiased), normalised by ``mean``/``std`` per band, flipped left-right at random when
    ``augment``."""

    def __init__(self, files: Sequence[ImageFile], classes: Sequence[str], *, img_size: int,
                 mean: Sequence[float], std: Sequence[float], augment: bool = False) -> None:
        import torch

        self.files = list(files)
        self.classes = list(classes)
        self.img_size = img_size
        self.augment = augment
        self._mean = torch.as_tensor(np.asarray(mean, np.float32))[:, None, None]
        self._std = torch.as_tensor(np.asarray(std, np.float32))[:, None, None]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        f = self.files[index]
        image = torch.from_numpy(read_image(f.path))
        if image.shape[0] != self._mean.shape[0]:
            raise DomainFMError(f"has {image.shape[0]} bands, expected {self._mean.shape[0]}", path=f.path,
                                fix="give every image of the dataset the same bands")
        # nodata pixels take the band mean (0 once normalised), before resizing can spread them
        image = torch.where(torch.isnan(image), self._mean, image)
        if tuple(image.shape[1:]) != (self.img_size, self.img_size):
            image = F.interpolate(image[None], size=(self.img_size, self.img_size), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        image = (image - self._mean) / self._std
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image.contiguous(), "label": f.label}

    def denormalise(self, image: "torch.Tensor") -> "torch.Tensor":
        return image * self._std + self._mean

    def plot(self, sample: dict[str, Any], *, show_titles: bool = True, suptitle: str | None = None,
             prediction: int | None = None):
        """A matplotlib Figure of ``sample``: its first three bands (one band as grey), each
        stretched to its 2-98 % range, titled with the class (and ``prediction`` if given)."""
        from matplotlib.figure import Figure

        image = self.denormalise(sample["image"].detach().float().cpu()).numpy()
        bands = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, 0)
        lo = np.percentile(bands, 2, axis=(1, 2), keepdims=True)
        hi = np.percentile(bands, 98, axis=(1, 2), keepdims=True)
        rgb = np.clip((bands - lo) / np.maximum(hi - lo, 1e-12), 0, 1).transpose(1, 2, 0)
        fig = Figure(figsize=(3, 3.3))
        ax = fig.subplots()
        ax.imshow(rgb)
        ax.set_axis_off()
        if show_titles:
            title = self.classes[int(sample["label"])]
            if prediction is not None:
                title += f"\npredicted: {self.classes[int(prediction)]}"
            ax.set_title(title, fontsize=9)
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig
