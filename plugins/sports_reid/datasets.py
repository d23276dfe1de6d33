"""Player re-identification data: the two folder layouts, one dataset class per layout and the pair
sampler of contrastive fine-tuning (the LightningDataModule is in ``datamodule.py``).

Layouts (found from the folders under ``--data``):

- MMSports 2022 (DeepSportradar): ``reid_training/*.jpeg``, ``reid_test/{query,gallery}/*.jpeg``,
  ``reid_challenge/{query,gallery}/*.jpeg``. Training and test names are
  ``<player_id>_<sequence>_<frame>.jpeg``; challenge names are anonymous integers.
- generic: ``train/<player_id>/*.jpg``, ``query/<player_id>/*.jpg``, ``gallery/<player_id>/*.jpg``;
  a ``c<k>`` token in a file name (Market-1501 style, e.g. ``0002_c1s1_000451_03.jpg`` or
  ``c2_f017.jpg``) is its camera id, which turns on the same-camera exclusion of the evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from domainfm.errors import DomainFMError

MMSPORTS_NAME = re.compile(r"^(?P<pid>\d+)_(?P<sequence>\d+)_(?P<frame>\d+)$")
CHALLENGE_NAME = re.compile(r"^\d+$")
CAMERA_TOKEN = re.compile(r"(?:^|[_\-])c(\d+)", re.IGNORECASE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT_FIX = ("give --data the folder holding reid_training/ and reid_test/ (MMSports 2022) "
              "or train/, query/ and gallery/ (generic)")
# the folders of each layout, per part
MMSPORTS_DIRS = {"train": "reid_training", "test_query": "reid_test/query", "test_gallery": "reid_test/gallery",
                 "challenge_query": "reid_challenge/query", "challenge_gallery": "reid_challenge/gallery"}
GENERIC_DIRS = {"train": "train", "test_query": "query", "test_gallery": "gallery"}


@dataclass(frozen=True)
class ReIDRecord:
    """One crop: its file, its player id ("" where unknown) and what its name tells."""

    path: Path
    pid: str
    item_id: str  # the name the submission CSV uses (file stem)
    camera: int | None = None
    sequence: int | None = None
    frame: int | None = None


# ------------------------------------------------------------------- layouts and file names

def detect_layout(root: str | Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DomainFMError("data folder not found", path=root, fix=LAYOUT_FIX)
    if (root / "reid_training").is_dir() or (root / "reid_test").is_dir() or (root / "reid_challenge").is_dir():
        return "mmsports"
    if any((root / d).is_dir() for d in ("train", "query", "gallery")):
        return "generic"
    raise DomainFMError("no re-identification layout found (neither reid_training/ nor train/)", path=root,
                        fix=LAYOUT_FIX)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parse_mmsports_name(path: Path) -> ReIDRecord:
    """``<player_id>_<sequence>_<frame>.jpeg`` -> a record; anything else is a clear error."""
    m = MMSPORTS_NAME.match(path.stem)
    if m is None:
        raise DomainFMError("file name does not match <player_id>_<sequence>_<frame>.jpeg", path=path,
                            fix="rename it (e.g. 12_3_0.jpeg) or move it out of the folder")
    return ReIDRecord(path=path, pid=str(int(m["pid"])), item_id=path.stem, sequence=int(m["sequence"]),
                      frame=int(m["frame"]))


def parse_challenge_name(path: Path) -> ReIDRecord:
    if CHALLENGE_NAME.match(path.stem) is None:
        raise DomainFMError("challenge crops must be named by an integer (e.g. 17.jpeg)", path=path,
                            fix="rename it or move it out of reid_challenge/")
    return ReIDRecord(path=path, pid="", item_id=str(int(path.stem)))


def camera_of(path: Path) -> int | None:
    m = CAMERA_TOKEN.search(path.stem)
    return int(m.group(1)) if m else None


def part_folder(root: str | Path, layout: str, part: str) -> Path:
    dirs = MMSPORTS_DIRS if layout == "mmsports" else GENERIC_DIRS
    if part not in dirs:
        raise DomainFMError(f"the {layout} layout has no {part.replace('_', ' ')} split",
                            fix="use --split test (the challenge split exists only in the MMSports layout)")
    return Path(root) / dirs[part]


def read_part(root: str | Path, part: str, layout: str | None = None) -> list[ReIDRecord]:
    """The records of one part: ``train``, ``test_query``, ``test_gallery``, ``challenge_query``,
    ``challenge_gallery``. An empty or missing folder is an error naming it."""
    layout = layout or detect_layout(root)
    folder = part_folder(root, layout, part)
    if not folder.is_dir():
        raise DomainFMError("folder not found", path=folder, fix=LAYOUT_FIX)
    if layout == "mmsports":
        files = _images(folder)
        parse = parse_challenge_name if part.startswith("challenge") else parse_mmsports_name
        records = [parse(p) for p in files]
    else:
        records = []
        stray = _images(folder)
        if stray:
            raise DomainFMError("images must sit in one sub-folder per player", path=stray[0],
                                fix=f"move it to {folder}/<player_id>/")
        for player_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            records += [ReIDRecord(path=p, pid=player_dir.name, item_id=f"{player_dir.name}/{p.stem}",
                                   camera=camera_of(p)) for p in _images(player_dir)]
        with_cam = [r.camera is not None for r in records]
        if any(with_cam) and not all(with_cam):
            bad = records[with_cam.index(False)].path
            raise DomainFMError("some file names carry a camera token (c<k>) and this one does not", path=bad,
                                fix="name every crop with its camera (e.g. c1_f000.jpg) or none of them")
    if not records:
        raise DomainFMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", path=folder,
                            fix="put the crops there, or point --data at the right folder")
    return records


def read_eval_split(root: str | Path, split: str = "test") -> tuple[list[ReIDRecord], list[ReIDRecord]]:
    """(query, gallery) records of ``split`` ("test" or "challenge"). In the test split every
    query's player must appear in the gallery: otherwise its AP is undefined."""
    layout = detect_layout(root)
    query = read_part(root, f"{split}_query", layout)
    gallery = read_part(root, f"{split}_gallery", layout)
    if split == "test":
        gallery_ids = {r.pid for r in gallery}
        for r in query:
            if r.pid not in gallery_ids:
                raise DomainFMError(f"query player {r.pid} has no crop in the gallery", path=r.path,
                                    fix="add that player's gallery crops or remove the query")
        if layout == "generic" and (query[0].camera is None) != (gallery[0].camera is None):
            raise DomainFMError("cameras are named in only one of query/ and gallery/", path=Path(root),
                                fix="name the cameras (c<k>) in both or in neither")
    return query, gallery


# ------------------------------------------------------------------- images

def letterbox(image: Image.Image, size: int) -> Image.Image:
    """Resize a PIL image to fit ``size`` x ``size`` keeping its aspect ratio; the rest is black
    (zero) padding, centred. Tall player crops are not stretched into squares."""
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def load_crop(path: Path, size: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            return letterbox(img, size)
    except (UnidentifiedImageError, OSError) as e:
        raise DomainFMError(f"cannot read the image ({e.__class__.__name__})", path=path,
                            fix="replace or remove the file") from None


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
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
        img = load_crop(self.records[index].path, self.img_size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
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
        import matplotlib

        matplotlib.use("Agg")
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
      InfoNCE loss, and a second pair of the same player would be a positive counted as negative;
    - the positive is a random *other* image of the anchor's player, never the same picture;
    - both images of a pair share one horizontal flip, so the flip is not what tells them apart;
    - an epoch has ``images // batch_size`` batches; players are drawn in proportion to the images
      they have not yet used as anchor this epoch, so each image serves about once as anchor.

    Players with a single image cannot make a pair and are left out. The plan is drawn from
    ``seed`` and the epoch (each ``iter`` moves to the next epoch; ``set_epoch`` sets it) and
    split across processes by ``rank``/``world_size``, each getting different batches.
    """

    def __init__(self, pids: Sequence[str], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        by_player: dict[str, list[int]] = {}
        for i, p in enumerate(pids):
            by_player.setdefault(p, []).append(i)
        self.players = [idx for idx in by_player.values() if len(idx) >= 2]
        if len(self.players) < 2:
            raise DomainFMError(f"fine-tuning needs at least 2 players with 2 or more images each, found "
                                f"{len(self.players)}", fix="add crops: each batch contrasts different players")
        self.batch_size = min(batch_size, len(self.players))
        n_images = sum(len(idx) for idx in self.players)
        self.batches_per_rank = max(1, (n_images // self.batch_size) // world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[list[tuple[int, int, bool]]]:
        """This process's batches of ``epoch`` (all processes draw the same plan, then take a slice)."""
        rng = np.random.default_rng([self.seed, epoch])
        unused = [list(rng.permutation(idx)) for idx in self.players]
        batches = []
        for _ in range(self.batches_per_rank * self.world_size):
            # a player whose images have all been anchors stays possible, just unlikely
            weights = np.array([len(u) for u in unused], dtype=float) + 1e-3
            chosen = rng.choice(len(self.players), size=self.batch_size, replace=False, p=weights / weights.sum())
            batch = []
            for c in chosen:
                anchor = int(unused[c].pop()) if unused[c] else int(rng.choice(self.players[c]))
                others = [i for i in self.players[c] if i != anchor]
                batch.append((anchor, int(others[rng.integers(len(others))]), bool(rng.random() < 0.5)))
            batches.append(batch)
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        batches = self.plan(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self.batches_per_rank


class PairDataset(ReIDDataset):
    """Serves an (anchor, positive, flip) triple of the sampler as ``{"anchor", "positive"}`` tensors."""

    def __getitem__(self, triple) -> dict[str, Any]:
        anchor, positive, flip = triple
        return {"anchor": self.image(anchor, flip=flip), "positive": self.image(positive, flip=flip)}
