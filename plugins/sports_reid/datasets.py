"""Player re-identification datasets: one class per folder layout (see ``layout.py``), each with a
``plot()``, and the pair sampler of contrastive fine-tuning (the LightningDataModule is in
``datamodule.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from domainfm.data import read_image
from domainfm.errors import DomainFMError
# re-exported: the dataset classes and the readers of their folders come from one place
from plugins.sports_reid.layout import (GENERIC_DIRS, MMSPORTS_DIRS, ReIDRecord, camera_of,  # noqa: F401
                                        detect_layout, part_folder, read_eval_split, read_part)


# ------------------------------------------------------------------- images

def letterbox_array(image: np.ndarray, size: int) -> np.ndarray:
    """float32 ``[C, H, W]`` resized to fit ``size`` x ``size`` keeping its aspect ratio (bicubic,
    antialiased, in floating point: no 8-bit rounding or clipping); the rest is black (zero)
    padding, centred. Tall player crops are not stretched into squares."""
    c, h, w = image.shape
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((c, size, size), np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    for band in range(c):
        resized = Image.fromarray(np.ascontiguousarray(image[band], np.float32)).resize((new_w, new_h),
                                                                                       Image.Resampling.BICUBIC)
        out[band, top:top + new_h, left:left + new_w] = np.asarray(resized)
    return out


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """:func:`letterbox_array` for an 8-bit PIL image (RGB out)."""
    x = np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
    return Image.fromarray((np.clip(letterbox_array(x, size), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def read_crop(path: Path, size: int) -> np.ndarray:
    """A crop as float32 RGB ``[3, size, size]``, letterboxed. Read by the core's image reader, so a
    16-bit crop keeps its levels (scaled by 65535) instead of turning white; grey is repeated."""
    return letterbox_array(read_image(path, rgb=True), size)


def load_crop(path: Path, size: int) -> np.ndarray:
    """A letterboxed crop to show: float ``[size, size, 3]`` in 0..1."""
    return np.clip(read_crop(path, size), 0, 1).transpose(1, 2, 0)


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float ``[3, S, S]`` in 0..1 -> normalised tensor."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ------------------------------------------------------------------- datasets

class ReIDDataset(Dataset):
    """Crops of one part as ``{"image": float[3, S, S], "index": int}``, letterboxed to S and
    normalised with the backbone's mean and std."""

    def __init__(self, records: list[ReIDRecord], *, img_size: int, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)):
        self.records = list(records)
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int, *, flip: bool = False) -> torch.Tensor:
        img = read_crop(self.records[index].path, self.img_size)
        if flip:
            img = img[:, :, ::-1]
        return to_tensor(img, self.mean, self.std)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image(index), "index": index}

    @property
    def pids(self) -> list[str]:
        return [r.pid for r in self.records]

    @property
    def cameras(self) -> list[int] | None:
        cams = [r.camera for r in self.records]
        return None if any(c is None for c in cams) else cams

    def plot(self, indices: Sequence[int] | None = None, *, ncols: int = 8, title: str | None = None):
        """A grid of crops as the model sees them (letterboxed), titled with player ids."""
        import matplotlib.pyplot as plt

        indices = list(indices if indices is not None else range(min(len(self), 2 * ncols)))
        nrows = max(1, -(-len(indices) // ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.6 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, indices):
            ax.imshow(load_crop(self.records[i].path, self.img_size))
            ax.set_title(self.records[i].pid or self.records[i].item_id, fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig


class MMSports2022ReID(ReIDDataset):
    """The MMSports 2022 (DeepSportradar) player re-identification crops of ``part``
    (train, test_query, test_gallery, challenge_query, challenge_gallery)."""

    def __init__(self, root: str | Path, part: str = "train", **kwargs):
        if part not in MMSPORTS_DIRS:
            raise DomainFMError(f"unknown MMSports part {part!r}", fix=f"use one of {', '.join(MMSPORTS_DIRS)}")
        super().__init__(read_part(root, part, "mmsports"), **kwargs)


class GenericReID(ReIDDataset):
    """``train/<player_id>/``, ``query/<player_id>/`` or ``gallery/<player_id>/`` crops
    (parts train, test_query, test_gallery)."""

    def __init__(self, root: str | Path, part: str = "train", **kwargs):
        if part not in GENERIC_DIRS:
            raise DomainFMError(f"unknown generic part {part!r}", fix=f"use one of {', '.join(GENERIC_DIRS)}")
        super().__init__(read_part(root, part, "generic"), **kwargs)


def reid_dataset(root: str | Path, part: str, **kwargs) -> ReIDDataset:
    """The dataset of ``part`` in whichever layout ``root`` has."""
    layout = detect_layout(root)
    return (MMSports2022ReID if layout == "mmsports" else GenericReID)(root, part, **kwargs)


# ------------------------------------------------------------------- pairs for fine-tuning

class DistinctPlayerPairSampler:
    """Batches of (anchor, positive, flip) triples for contrastive fine-tuning.

    - a batch never holds two pairs of one player: the other pairs are the negatives of the
      InfoNCE loss, and a second pair of the same player would be a positive counted as negative.
      Under DDP the loss gathers the batches of all processes, so the rule holds for that global
      batch: each step draws ``batch_size * world_size`` distinct players and process ``rank``
      takes its slice of them;
    - the positive is a random *other* image of the anchor's player, never the same picture;
    - both images of a pair share one horizontal flip, so the flip is not what tells them apart;
    - an epoch has ``images // global batch`` steps; players are drawn in proportion to the images
      they have not yet used as anchor this epoch, so each image serves about once as anchor.

    Players with a single image cannot make a pair and are left out; with fewer players than the
    global batch, the per-process batch shrinks to fit. The plan is drawn from ``seed`` and the
    epoch (each ``iter`` moves to the next epoch; ``set_epoch`` sets it).
    """

    def __init__(self, pids: Sequence[str], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        by_player: dict[str, list[int]] = {}
        for i, p in enumerate(pids):
            by_player.setdefault(p, []).append(i)
        self.players = [idx for idx in by_player.values() if len(idx) >= 2]
        if len(self.players) < 2 * world_size:
            raise DomainFMError(f"fine-tuning needs at least {2 * world_size} players with 2 or more images each"
                                f"{f' ({world_size} processes)' if world_size > 1 else ''}, found "
                                f"{len(self.players)}", fix="add crops: each batch contrasts different players")
        self.batch_size = min(batch_size, len(self.players) // world_size)
        n_images = sum(len(idx) for idx in self.players)
        self.steps = max(1, n_images // (self.batch_size * world_size))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[list[tuple[int, int, bool]]]:
        """This process's batches of ``epoch``: every process draws the same global batches and
        keeps its own slice of each."""
        rng = np.random.default_rng([self.seed, epoch])
        unused = [list(rng.permutation(idx)) for idx in self.players]
        global_size = self.batch_size * self.world_size
        batches = []
        for _ in range(self.steps):
            # a player whose images have all been anchors stays possible, just unlikely
            weights = np.array([len(u) for u in unused], dtype=float) + 1e-3
            chosen = rng.choice(len(self.players), size=global_size, replace=False, p=weights / weights.sum())
            batch = []
            for c in chosen:
                anchor = int(unused[c].pop()) if unused[c] else int(rng.choice(self.players[c]))
                others = [i for i in self.players[c] if i != anchor]
                batch.append((anchor, int(others[rng.integers(len(others))]), bool(rng.random() < 0.5)))
            batches.append(batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        batches = self.plan(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self.steps


class PairDataset(ReIDDataset):
    """Serves an (anchor, positive, flip) triple of the sampler as ``{"anchor", "positive"}`` tensors."""

    def __getitem__(self, triple) -> dict[str, Any]:
        anchor, positive, flip = triple
        return {"anchor": self.image(anchor, flip=flip), "positive": self.image(positive, flip=flip)}
