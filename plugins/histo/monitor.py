"""The pretraining health monitor's held-out split for histo (``Plugin.monitor_dataset``).

Only a run with ``--tile-labels CSV`` (``slide_id,x,y,<0/1 label columns>``) has labels to score
k-NN against. Its labelled tiles are grouped by slide, or by patient when the CSV has a
``patient_id`` column (several slides of one patient then travel together); whole groups are drawn
with :func:`domainfm.monitor.held_out_indices` (at least two, since the k-NN leaves a tile's own
group out of its neighbours) and their slides are REMOVED from pretraining: no tile of a held-out
slide or patient is drawn for training, labelled or not. Without tile labels the plugin offers no
split (the monitor then reports RankMe and feature std on training tiles).

A held-out sample is the labelled tile read at ``--mpp`` (``--tile-size`` px), resized to
``--img-size`` and normalised as the training views are (the backbone's mean/std), with no
augmentation, so every evaluation sees the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset


def tile_groups(tile_labels: str | Path) -> dict[str, str]:
    """``{slide_id: patient_id}`` from the tile-labels CSV's optional ``patient_id`` column (empty:
    the slide is its own patient); ``{}`` when the CSV has no such column."""
    from domainfm.data import read_csv_rows

    rows = read_csv_rows(Path(tile_labels), ("slide_id", "x", "y"), what="tile labels CSV",
                         fix="write a header like slide_id,x,y,tumor,stroma,necrosis")
    if "patient_id" not in rows.columns:
        return {}
    out: dict[str, str] = {}
    for line, row in zip(rows.lines, rows):
        patient = (row["patient_id"] or "").strip() or row["slide_id"]
        if out.setdefault(row["slide_id"], patient) != patient:
            from domainfm.errors import DomainFMError

            raise DomainFMError(f"line {line}: slide {row['slide_id']} is given patients {out[row['slide_id']]} "
                                f"and {patient}", path=tile_labels, fix="give every row of a slide one patient_id")
    return out


class HeldOutTiles(Dataset):
    """Map-style: ``{"image": float[3, S, S] (normalised), "labels": float[K]}`` of fixed tiles.

    ``tiles``: (slide path, TileGeometry, x, y, labels) per tile (level-0 pixel coordinates)."""

    def __init__(self, tiles: list[tuple[Path, Any, int, int, Any]], *, img_size: int, mean, std) -> None:
        self.tiles = tiles
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)
        self._handles: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from torchvision.transforms import v2

        from plugins.histo import slides as slides_mod

        path, geom, x, y, labels = self.tiles[index]
        if path not in self._handles:
            self._handles[path] = slides_mod.open_slide(path)
        tile = slides_mod.read_tile(self._handles[path], x, y, geom, path)
        image = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))
        image = v2.functional.resize(image, [self.img_size, self.img_size], antialias=True)
        image = v2.functional.normalize(image.float() / 255.0, self.mean, self.std)
        return {"image": image, "labels": torch.as_tensor(labels, dtype=torch.float32)}


def monitor_dataset(cfg, datamodule):
    """MonitorData of labelled tiles of whole held-out slides/patients, whose slides are removed
    from ``datamodule.dataset``; None without tile labels or with too few slides to hold two
    groups out and keep one."""
    from domainfm.monitor import MonitorData, held_out_indices
    from plugins.histo import slides as slides_mod

    datamodule.setup("fit")
    ds = datamodule.dataset
    tile_labels = getattr(cfg, "tile_labels", None)
    if not tile_labels or not ds.entries or ds.entries[0][3] is None:
        return None
    patients = tile_groups(tile_labels)
    tiles, groups = [], []
    for k, (path, geom, coords, labels, _) in enumerate(ds.entries):
        sid = slides_mod.slide_id(path)
        for (x, y), vec in zip(coords, labels):
            if vec.any():
                tiles.append((k, int(x), int(y), vec))
                groups.append(patients.get(sid, sid))
    held = held_out_indices(range(len(tiles)), cfg.val_fraction, groups=groups, seed=cfg.seed, min_groups=2)
    if not held:
        return None
    held_groups = {groups[i] for i in held}
    out_slides = {k for k, (path, *_rest) in enumerate(ds.entries)
                  if patients.get(slides_mod.slide_id(path), slides_mod.slide_id(path)) in held_groups}
    items = [(ds.entries[tiles[i][0]][0], ds.entries[tiles[i][0]][1], *tiles[i][1:]) for i in held]
    n_slides = len(ds.entries)
    ds.entries = [e for k, e in enumerate(ds.entries) if k not in out_slides]  # pretraining never sees them
    ds._handles = {}  # handles are keyed by entry index, which just changed
    dataset = HeldOutTiles(items, img_size=cfg.img_size, mean=ds.views.mean, std=ds.views.std)
    return MonitorData(dataset, [groups[i] for i in held],
                       f"{len(held)} labelled tiles of {len(out_slides)} of {n_slides} slides held out "
                       f"({len(held_groups)} {'patients' if patients else 'slides'})")
