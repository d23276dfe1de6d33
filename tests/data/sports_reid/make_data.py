"""Draw synthetic player crops for the sports-reid tests, in the MMSports 2022 layout or the generic one.

A player is a jersey colour, a shorts colour and a shirt number (drawn with PIL). Every frame of a
player changes the pose (body position and size, arm and leg angles) and, much more, the
background: a random court colour, lines and noise. So the identity lives in a small part of the
crop, and a model has to learn to look at the jersey to re-identify players: a randomly initialised
backbone ranks mostly by background, a fine-tuned one by the player.

    python tests/data/sports_reid/make_data.py OUT_DIR                    # MMSports 2022 layout
    python tests/data/sports_reid/make_data.py OUT_DIR --layout generic   # train/ query/ gallery/
"""

from __future__ import annotations

import argparse
import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CROP_W, CROP_H = 40, 80


@dataclass(frozen=True)
class Player:
    pid: int
    jersey: tuple[int, int, int]
    shorts: tuple[int, int, int]
    number: int


def make_players(n: int, rng: np.random.Generator, first_pid: int = 0) -> list[Player]:
    """Jersey hues spread evenly around the colour wheel (shuffled), so players are tellable apart."""
    hues = (np.arange(n) / n + rng.uniform(0, 1 / n)) % 1.0
    rng.shuffle(hues)
    players = []
    for i, h in enumerate(hues):
        jersey = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)))
        shorts = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.uniform(0, 1), 0.5, rng.uniform(0.2, 0.9)))
        players.append(Player(first_pid + i, jersey, shorts, int(rng.integers(1, 100))))
    return players


def draw_crop(player: Player, rng: np.random.Generator) -> Image.Image:
    """One frame of ``player``: random background and pose, the same jersey, shorts and number."""
    court = rng.integers(0, 256, 3)
    pixels = court[None, None, :] + rng.normal(0, 45, (CROP_H, CROP_W, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # court lines and other players' edges
        x0, y0 = rng.integers(0, CROP_W), rng.integers(0, CROP_H)
        x1, y1 = rng.integers(0, CROP_W), rng.integers(0, CROP_H)
        draw.line((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    scale = rng.uniform(0.8, 1.0)
    cx = CROP_W / 2 + rng.uniform(-4, 4)
    top = rng.uniform(2, 8)
    skin = (224, 172, 105)

    def s(v: float) -> float:
        return v * scale

    head_r = s(6)
    draw.ellipse((cx - head_r, top, cx + head_r, top + 2 * head_r), fill=skin)
    torso_top, torso_h, torso_w = top + 2 * head_r + 1, s(26), s(20)
    lean = rng.uniform(-3, 3)
    draw.polygon([(cx - torso_w / 2 + lean, torso_top), (cx + torso_w / 2 + lean, torso_top),
                  (cx + torso_w / 2, torso_top + torso_h), (cx - torso_w / 2, torso_top + torso_h)], fill=player.jersey)
    for side in (-1, 1):  # arms at a random angle, in the jersey colour (sleeves)
        angle = rng.uniform(0.2, 1.2)
        sx, sy = cx + side * torso_w / 2 + lean, torso_top + 2
        draw.line((sx, sy, sx + side * s(14) * np.sin(angle), sy + s(14) * np.cos(angle)), fill=player.jersey, width=4)
    number_colour = (255, 255, 255) if sum(player.jersey) < 380 else (0, 0, 0)
    draw.text((cx - s(7) + lean / 2, torso_top + s(7)), str(player.number), fill=number_colour,
              font=ImageFont.load_default())
    shorts_top = torso_top + torso_h
    draw.rectangle((cx - torso_w / 2, shorts_top, cx + torso_w / 2, shorts_top + s(10)), fill=player.shorts)
    for side in (-1, 1):
        angle = rng.uniform(-0.35, 0.35)
        hx, hy = cx + side * torso_w / 4, shorts_top + s(10)
        draw.line((hx, hy, hx + s(20) * np.sin(angle), hy + s(20) * np.cos(angle)), fill=skin, width=4)
    return img


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)


def make_mmsports(root: str | Path, *, train_players: int = 16, test_players: int = 8, frames: int = 6,
                  challenge_players: int = 4, seed: int = 0) -> Path:
    """``reid_training/``, ``reid_test/{query,gallery}/`` and ``reid_challenge/{query,gallery}/``.

    Names are ``<player_id>_<sequence>_<frame>.jpeg``; each sequence (an action) holds two
    players. The query of a test player is its frame 0, the gallery its other frames. Challenge
    crops are named by anonymous integers, as in the competition.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train = make_players(train_players, rng, first_pid=0)
    test = make_players(test_players, rng, first_pid=1000)
    for p in train:
        for f in range(frames):
            _save(draw_crop(p, rng), root / "reid_training" / f"{p.pid}_{p.pid // 2}_{f}.jpeg")
    for p in test:
        seq = 500 + (p.pid - 1000) // 2
        _save(draw_crop(p, rng), root / "reid_test" / "query" / f"{p.pid}_{seq}_0.jpeg")
        for f in range(1, frames):
            _save(draw_crop(p, rng), root / "reid_test" / "gallery" / f"{p.pid}_{seq}_{f}.jpeg")
    challenge = make_players(challenge_players, rng, first_pid=2000)
    q_names = rng.permutation(len(challenge))
    g_names = rng.permutation(len(challenge) * (frames - 1))
    g = 0
    for i, p in enumerate(challenge):
        _save(draw_crop(p, rng), root / "reid_challenge" / "query" / f"{q_names[i]}.jpeg")
        for _ in range(1, frames):
            _save(draw_crop(p, rng), root / "reid_challenge" / "gallery" / f"{g_names[g]}.jpeg")
            g += 1
    return root


def make_generic(root: str | Path, *, train_players: int = 6, test_players: int = 4, frames: int = 5,
                 cameras: bool = True, one_camera: bool = False, seed: int = 1) -> Path:
    """``train/<pid>/*.jpg``, ``query/<pid>/*.jpg``, ``gallery/<pid>/*.jpg``; with ``cameras`` the
    names carry a Market-1501 style camera token (``c<k>``): each query is seen by camera 1 and its
    gallery crops by cameras 1 and 2, so the same-camera ones are excluded from the evaluation;
    ``one_camera``: every crop is named camera 1 (a single fixed camera filmed the game)."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    def name(f: int, cam: int) -> str:
        return f"c{cam}_f{f:03d}.jpg" if cameras else f"f{f:03d}.jpg"

    for p in make_players(train_players, rng, first_pid=0):
        for f in range(frames):
            _save(draw_crop(p, rng), root / "train" / f"player{p.pid:02d}" / name(f, 1 + f % 2))
    for p in make_players(test_players, rng, first_pid=50):
        _save(draw_crop(p, rng), root / "query" / f"player{p.pid:02d}" / name(0, 1))
        for f in range(1, frames):
            _save(draw_crop(p, rng), root / "gallery" / f"player{p.pid:02d}" / name(f, 1 if one_camera else 1 + f % 2))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=("mmsports", "generic"), default="mmsports")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.layout == "mmsports":
        make_mmsports(args.out, seed=args.seed)
    else:
        make_generic(args.out, seed=args.seed)
    print(f"wrote {sum(1 for _ in args.out.rglob('*.jp*g'))} crops under {args.out}")


if __name__ == "__main__":
    main()
