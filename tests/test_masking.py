"""Siamese masking indices and CNN patch zeroing."""

from __future__ import annotations

import math

import pytest
import torch

from domainfm.errors import DomainFMError
from domainfm.masking import keep_mask, mask_image_patches, num_kept, random_keep_indices


@pytest.mark.parametrize(
    "num_patches,ratio,expected",
    [
        (16, 0.75, 4),  # 16 - 12
        (256, 0.5, 128),
        (10, 0.25, 8),  # round(2.5) = 2 (round half to even, as int(round(...)) in the issue)
        (10, 0.35, 6),  # round(3.5) = 4
        (49, 0.6, 20),  # round(29.4) = 29
        (16, 0.0, 16),
        (16, 1.0, 1),  # never fewer than one patch
        (3, 0.9, 1),
    ],
)
def test_token_counts(num_patches, ratio, expected):
    assert num_kept(num_patches, ratio) == expected
    keep = random_keep_indices(5, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (5, expected) and keep.dtype == torch.long
    assert (keep[:, 1:] > keep[:, :-1]).all()  # ascending, hence no repeats
    assert keep.min() >= 0 and keep.max() < num_patches


def test_samples_are_drawn_independently_and_uniformly():
    batch, patches = 4000, 8
    keep = random_keep_indices(batch, patches, 0.5, generator=torch.Generator().manual_seed(1))
    mask = keep_mask(keep, patches).float()
    # every patch kept half of the time
    assert torch.allclose(mask.mean(0), torch.full((patches,), 0.5), atol=0.04)
    # neighbouring samples share a subset about 1/C(8,4) = 1/70 of the time, not always
    same = (keep[1:] == keep[:-1]).all(dim=1).float().mean().item()
    assert same == pytest.approx(1 / math.comb(8, 4), abs=0.01)
    # and their masks are uncorrelated
    corr = torch.corrcoef(torch.stack([mask[:-1].flatten(), mask[1:].flatten()]))[0, 1].item()
    assert abs(corr) < 0.05


def test_a_generator_makes_the_draw_reproducible():
    draw = lambda seed: random_keep_indices(6, 49, 0.6, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    assert random_keep_indices(2, 9, 0.5, device="cpu").device.type == "cpu"


def test_keep_mask_marks_exactly_the_kept_patches():
    keep = torch.tensor([[0, 3], [1, 2]])
    assert keep_mask(keep, 4).tolist() == [[True, False, False, True], [False, True, True, False]]


def _zeroed_by_loops(images, keep, ph, pw):
    out = images.clone()
    grid_w = images.shape[3] // pw
    for b in range(images.shape[0]):
        kept = set(keep[b].tolist())
        for r in range(images.shape[2] // ph):
            for c in range(grid_w):
                if r * grid_w + c not in kept:
                    out[b, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 0
    return out


def test_cnn_masking_stretches_the_grid_when_the_size_is_not_a_multiple():
    # 10x7 pixels, patch 4 → a 2x1 grid; rows 0-4 are patch 0, rows 5-9 patch 1 (r * 2 // 10)
    images = torch.ones(2, 1, 10, 7)
    masked = mask_image_patches(images, torch.tensor([[0], [1]]), 4)
    assert masked[0, 0, :5].eq(1).all() and masked[0, 0, 5:].eq(0).all()
    assert masked[1, 0, :5].eq(0).all() and masked[1, 0, 5:].eq(1).all()


@pytest.mark.parametrize("size,patch", [((8, 8), 2), ((12, 8), (3, 4)), ((28, 28), 14)])
def test_cnn_masking_zeroes_exactly_the_dropped_patches(size, patch):
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 2, *size, generator=g) + 0.5  # no pixel is 0 to start with
    num_patches = (size[0] // ph) * (size[1] // pw)
    keep = random_keep_indices(3, num_patches, 0.5, generator=g)
    masked = mask_image_patches(images, keep, patch)
    assert torch.equal(masked, _zeroed_by_loops(images, keep, ph, pw))
    kept_pixels = (masked != 0).sum().item()
    assert kept_pixels == 3 * 2 * keep.shape[1] * ph * pw
    assert images.min() >= 0.5  # the input is left alone


def test_cnn_masking_passes_gradients_to_kept_pixels_only():
    images = torch.rand(1, 1, 4, 4, requires_grad=True)
    keep = torch.tensor([[1, 2]])  # top-right and bottom-left 2x2 patches
    mask_image_patches(images, keep, 2).sum().backward()
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(images.grad[0, 0], expected)


def test_bad_masking_input_is_an_error():
    with pytest.raises(DomainFMError, match="smaller than the mask patch size 16x16"):
        mask_image_patches(torch.zeros(1, 1, 8, 8), torch.tensor([[0]]), 16)
    with pytest.raises(DomainFMError, match="keep indices are for 2 images, the batch has 1"):
        mask_image_patches(torch.zeros(1, 1, 8, 8), torch.tensor([[0], [1]]), 4)
    with pytest.raises(DomainFMError, match="--mask-ratio"):
        random_keep_indices(1, 16, 1.5)
