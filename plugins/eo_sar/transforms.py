"""Augmentations for multispectral / SAR patches as small functions on [C, H, W] tensors.

torchvision's v2 transforms assume 1-4 channel images in places; these work on any band count
and take an explicit ``torch.Generator`` so tests can pin them. The sample-level callables at the
bottom turn a dataset sample into what the pretraining or evaluation loop consumes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [C, H, W] to [C, size, size], antialiased only when shrinking (where
    it matters; upsampling small patches with it costs ~1.7x for identical output)."""
    if image.shape[-2:] == (size, size):
        return image
    shrink = size < image.shape[-2] or size < image.shape[-1]
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0]


def crop_box(height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random (top, left, h, w) covering ``scale`` of the area with aspect ``ratio`` (log-uniform),
    as in Inception-style random resized crops; falls back to the centred largest valid box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    h, w = height, width  # aspect ratio out of range for this patch: take it whole
    return 0, 0, h, w


def random_resized_crop(image: torch.Tensor, size: int, *, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a random box (see :func:`crop_box`) of [C, H, W] and resize it to [C, size, size]."""
    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], scale=scale, ratio=ratio, generator=generator)
    return resize(image[..., top:top + h, left:left + w], size)


def random_flip_rotate(image: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One of the 8 symmetries of the square (flips and 90 degree turns), uniformly.

    Overhead imagery has no "up", so every dihedral transform is a valid view.
    """
    k, flip = torch.randint(0, 4, (1,), generator=generator).item(), torch.rand(1, generator=generator).item() < 0.5
    if flip:
        image = image.flip(-1)
    return torch.rot90(image, k, dims=(-2, -1)) if k else image


def augmented_view(image: torch.Tensor, size: int, *, scale: tuple[float, float] = (0.35, 1.0),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop, flip/rotation, then resize to [C, size, size]. Flipping the small crop before
    upsampling gives the same view as flipping after (bilinear resampling is symmetric) for a
    fraction of the memory traffic."""
    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], scale=scale, ratio=(3 / 4, 4 / 3), generator=generator)
    crop = random_flip_rotate(image[..., top:top + h, left:left + w], generator=generator)
    return resize(crop.contiguous(), size)


class TwoViews:
    """Sample -> ``{"view_teacher", "view_student", "labels"}``: two independent augmented views
    (the core masks the student view itself). A sample with ``image_other`` (another season of the
    same place, SSL4EO-S12 ``--views seasons``) gives the student its view of that image."""

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.35, 1.0)) -> None:
        self.size = size
        self.scale = scale

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        return {
            "view_teacher": augmented_view(image, self.size, scale=self.scale),
            "view_student": augmented_view(sample.get("image_other", image), self.size, scale=self.scale),
            "labels": sample["labels"].float(),
        }


class ResizeWhole:
    """Sample -> the whole patch resized to the model size (evaluation: no randomness)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "image": resize(sample["image"], self.size),
                "valid": resize(sample["valid"][None].float(), self.size)[0] > 0.5}
