"""Continual pretraining data for histology: tiles drawn on the fly from whole slides.

``domainfm pretrain --plugin histo --data SLIDES_DIR`` finds the tissue of every slide once (on
thumbnails), then each sample is a random tissue tile at ``--mpp`` (its position jittered by up
to half a tile, so the model does not see only one fixed grid), read from the pyramid and turned
into two views. Without tile labels the batch's labels are all zero and the loss is the hard
(instance) contrastive term; with ``--tile-labels CSV`` (slide_id,x,y,<0/1 columns>) tiles are
drawn from that list and their multi-hot labels drive the soft term.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from domainfm.data import DictBatchDataModule, read_csv_rows
from domainfm.errors import DomainFMError, expect_file
from plugins.histo import slides as slides_mod
from plugins.histo import tiling

class HistoViews:
    """Two independent augmentations of one tile: random resized crop, flips and 90° turns
    (a slide has no up), and colour jitter standing in for stain variation; then the backbone's
    own input normalisation (``normalization`` = (mean, std), from
    :func:`domainfm.backbones.input_normalization`: the one ``histo embed`` applies too)."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.4, 1.0), normalization=None):
        from torchvision.transforms import v2

        from domainfm.backbones import IMAGENET_NORMALIZATION

        self.mean, self.std = (tuple(map(float, v)) for v in (normalization or IMAGENET_NORMALIZATION))
        self.transform = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
            v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.2, 0.05)], p=0.8),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])

    def __call__(self, tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(tile), self.transform(tile)


def read_tile_labels(path: str | Path) -> tuple[list[str], dict[str, list[tuple[int, int, np.ndarray]]]]:
    """``slide_id,x,y,<label columns>`` -> label names and {slide_id: [(x, y, multi-hot)]}."""
    path = Path(path)
    expect_file(path, "--tile-labels", missing="tile labels CSV not found", fix="give a CSV slide_id,x,y,<label columns>")
    fix = "write a header like slide_id,x,y,tumor,stroma,necrosis"
    rows = read_csv_rows(path, ("slide_id", "x", "y"), what="tile labels CSV", fix=fix)
    names = [f for f in rows.columns if f not in ("slide_id", "x", "y", "patient_id")]  # patient: a group
    if not names:
        raise DomainFMError("tile labels need at least one label column besides slide_id,x,y", path=path, fix=fix)
    out: dict[str, list] = {}
    for line, row in zip(rows.lines, rows):
        try:
            vec = np.array([float(row[n] or 0) for n in names], np.float32)
            out.setdefault(row["slide_id"], []).append((int(float(row["x"])), int(float(row["y"])), vec))
        except ValueError:
            raise DomainFMError(f"line {line}: x, y and labels must be numbers", path=path) from None
    return names, out


class SlideTileSampler(Dataset):
    """``samples_per_epoch`` random tiles over a set of slides; each sample is a dict of two views
    and a label vector. torchgeo-like: ``plot(sample)`` shows the two views."""

    def __init__(self, slide_paths: list[Path], *, mpp: float, tile_size: int, img_size: int,
                 min_tissue: float = 0.6, slide_mpp=None, tile_labels: str | None = None,
                 samples_per_epoch: int = 1024, seed: int = 0, normalization=None):
        self.mpp, self.tile_size, self.seed = mpp, tile_size, seed
        self.samples_per_epoch = samples_per_epoch
        self.views = HistoViews(img_size, normalization=normalization)
        self.label_names: list[str] = []
        labelled = None
        if tile_labels:
            self.label_names, labelled = read_tile_labels(tile_labels)
        self.entries: list[tuple[Path, slides_mod.TileGeometry, np.ndarray, np.ndarray | None, tuple[int, int]]] = []
        skipped = []
        for p in slide_paths:
            sid = slides_mod.slide_id(p)
            if labelled is not None and sid not in labelled:
                continue
            try:
                slide = slides_mod.open_slide(p)
                try:
                    if labelled is None:
                        ts = tiling.tile_slide(p, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue,
                                               slide_mpp=slide_mpp, slide=slide)
                        coords, geom, labels = ts.coords, ts.geometry, None
                    else:
                        smpp = slides_mod.resolve_slide_mpp(slide, p, slide_mpp)
                        geom = slides_mod.tile_geometry(slide.level_downsamples, smpp, mpp, tile_size)
                        rows = labelled[sid]
                        coords = np.array([(x, y) for x, y, _ in rows], np.int64)
                        labels = np.stack([v for _, _, v in rows])
                    dims = slide.dimensions
                finally:
                    slide.close()
            except Exception as e:  # noqa: BLE001 - one unreadable slide does not stop pretraining
                skipped.append(f"{sid}: {e}")
                continue
            if len(coords):
                self.entries.append((p, geom, coords, labels, dims))
        if skipped:
            print(f"histo: skipped {len(skipped)} slide(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
        if not self.entries:
            raise DomainFMError("no slide gave any tissue tile" + (f" ({skipped[0]})" if skipped else ""),
                                fix="check --data, --slide-mpp and --min-tissue")
        self.n_labels = max(1, len(self.label_names))
        self._handles: dict[int, object] = {}
        self._calls = 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _slide(self, k: int):
        if k not in self._handles:
            self._handles[k] = slides_mod.open_slide(self.entries[k][0])
        return self._handles[k]

    def draw(self, index: int) -> tuple[int, int, int, np.ndarray]:
        """(slide index, x, y, labels) of one random tile; fresh at every call."""
        self._calls += 1
        rng = np.random.default_rng([self.seed, index, self._calls, torch.initial_seed() % (1 << 32)])
        k = int(rng.integers(len(self.entries)))
        _, geom, coords, labels, (w, h) = self.entries[k]
        j = int(rng.integers(len(coords)))
        x, y = (int(v) for v in coords[j])
        if labels is None:  # jitter: tiles off the fixed grid, still mostly on tissue
            half = geom.tile_size_level0 // 2
            x = int(np.clip(x + rng.integers(-half, half + 1), 0, max(0, w - geom.tile_size_level0)))
            y = int(np.clip(y + rng.integers(-half, half + 1), 0, max(0, h - geom.tile_size_level0)))
            vec = np.zeros(self.n_labels, np.float32)
        else:
            vec = labels[j]
        return k, x, y, vec

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k, x, y, vec = self.draw(index)
        tile = slides_mod.read_tile(self._slide(k), x, y, self.entries[k][1])
        teacher, student = self.views(torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))))
        return {"view_teacher": teacher, "view_student": student, "labels": torch.from_numpy(vec)}

    def plot(self, sample: dict[str, torch.Tensor]):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        mean, std = torch.tensor(self.views.mean).view(3, 1, 1), torch.tensor(self.views.std).view(3, 1, 1)
        fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
        for ax, key in zip(axes, ("view_teacher", "view_student")):
            ax.imshow((sample[key] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_title(key, fontsize=8)
            ax.axis("off")
        return fig


class HistoPretrainDataModule(DictBatchDataModule):
    """Batches ``{"view_teacher", "view_student": float[B, 3, S, S], "labels": float[B, K]}``.

    One split, ``train``: :class:`SlideTileSampler`'s random draws read in index order (the sampler
    is random itself, so the loader does not shuffle), full batches only (unless the epoch is
    smaller than one batch). The slides are found in ``__init__``, their tissue in :meth:`setup`.
    ``normalization``: the backbone's (mean, std); :meth:`from_config` asks the core for the one
    of the backbone the run builds (ImageNet's when None)."""

    splits = ("train",)

    def __init__(self, data: str | Path, *, mpp: float = 0.5, tile_size: int = 256, img_size: int = 224,
                 min_tissue: float = 0.6, slide_mpp=None, tile_labels: str | None = None,
                 tiles_per_epoch: int = 1024, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 normalization=None):
        # workers from a forkserver (the base's loader): Lightning and MLflow run threads in this process
        super().__init__(batch_size=batch_size, num_workers=num_workers, drop_last_train=True, shuffle_train=False)
        if data is None:
            raise DomainFMError("histo pretraining needs --data SLIDES_DIR", fix="give a folder of whole-slide images")
        self.paths = slides_mod.find_slides([str(data)])
        self.kwargs = dict(mpp=mpp, tile_size=tile_size, img_size=img_size, min_tissue=min_tissue,
                           slide_mpp=slides_mod.parse_slide_mpp(slide_mpp) if isinstance(slide_mpp, str) else slide_mpp,
                           tile_labels=tile_labels, samples_per_epoch=tiles_per_epoch, seed=seed,
                           normalization=normalization)

    @property
    def dataset(self) -> SlideTileSampler | None:
        """The training tiles once :meth:`setup` ran, else None."""
        return self.datasets.get("train")

    @classmethod
    def from_config(cls, cfg) -> "HistoPretrainDataModule":
        from domainfm.backbones import normalization_for_config

        opts = cfg.options
        return cls(cfg.data, mpp=opts.get("mpp", 0.5), tile_size=opts.get("tile_size", 256), img_size=cfg.img_size,
                   min_tissue=opts.get("min_tissue", 0.6), slide_mpp=opts.get("slide_mpp"),
                   tile_labels=opts.get("tile_labels"), tiles_per_epoch=opts.get("tiles_per_epoch", 1024),
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                   normalization=normalization_for_config(cfg))

    def build_dataset(self, split: str) -> SlideTileSampler:
        return SlideTileSampler(self.paths, **self.kwargs)
