"""Tile datasets over whole-slide images (torchgeo-like: one class per source, each with ``plot()``).

Slides are opened lazily inside each DataLoader worker: an OpenSlide handle must not cross a
``fork``, and a handle that failed once stays failed, so every worker owns its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from plugins.histo import slides as slides_mod


class SlideTileDataset(Dataset):
    """The tiles of one slide at fixed level-0 coordinates.

    A sample is ``{"image": uint8 [S, S, 3], "coords": int64 [2]}``, as read: uint8 keeps the transfer
    to the accelerator small, and the model side permutes to channels-first, converts and normalises
    the whole batch there (a per-tile transpose here would cost as much as 15% of the read).
    """

    def __init__(self, slide_path: str | Path, coords: np.ndarray, geometry: slides_mod.TileGeometry):
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, np.int64)
        self.geometry = geometry
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self):
        if self._slide is None:
            self._slide = slides_mod.open_slide(self.slide_path)
        return self._slide

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.coords[index]
        tile = slides_mod.read_tile(self._handle(), x, y, self.geometry, self.slide_path)
        return {"image": torch.from_numpy(tile),
                "coords": torch.as_tensor(self.coords[index])}

    def __getstate__(self):  # a worker re-opens the slide itself
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def plot(self, sample: dict[str, torch.Tensor], *, title: str | None = None):
        """A matplotlib figure of one sample, titled with its slide and level-0 position."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(sample["image"].numpy())
        x, y = (int(v) for v in sample["coords"])
        ax.set_title(title or f"{slides_mod.slide_id(self.slide_path)} ({x}, {y})", fontsize=8)
        ax.axis("off")
        return fig
