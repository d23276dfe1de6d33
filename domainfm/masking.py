"""Siamese masking: which patches the student (masked) view keeps.

The teacher sees the whole image; the student sees a random subset of its patches. A ViT drops
the other tokens (``Backbone.forward(x, keep_idx)``: compute falls with the mask ratio); a CNN
cannot drop tokens, so :func:`mask_image_patches` zeroes the dropped patches' pixels instead.

Patches are numbered row-major over the grid (``index = row * grid_width + col``), the order in
which a ViT flattens its patch tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError

if TYPE_CHECKING:
    import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``num_patches - round(num_patches * mask_ratio)``, at least 1."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise DomainFMError(f"mask ratio must be in [0, 1], got {mask_ratio}", fix="give --mask-ratio between 0 and 1 (e.g. 0.5)")
    if num_patches < 1:
        raise DomainFMError(f"need at least one patch, got {num_patches}", fix="use an image at least one patch wide")
    return max(1, num_patches - int(round(num_patches * mask_ratio)))


def random_keep_indices(
    batch_size: int, num_patches: int, mask_ratio: float, *, generator=None, device=None
) -> "torch.Tensor":
    """Indices of the kept patches, LongTensor ``[batch_size, n_keep]``, ascending within a row.

    Each sample draws its own subset (argsort of uniform noise, so every subset of size n_keep is
    equally likely). With a ``generator`` the draw is reproducible; the noise is drawn on the
    generator's device and moved to ``device``.
    """
    import torch

    n_keep = num_kept(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    return keep.to(device) if device is not None else keep


def keep_mask(keep_idx: "torch.Tensor", num_patches: int) -> "torch.Tensor":
    """Bool ``[B, num_patches]``: True where the patch is kept."""
    import torch

    mask = torch.zeros(keep_idx.shape[0], num_patches, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter_(1, keep_idx, True)


def mask_image_patches(images: "torch.Tensor", keep_idx: "torch.Tensor", patch_size) -> "torch.Tensor":
    """``images`` ``[B, C, H, W]`` with the pixels of every dropped patch set to 0 (a new tensor).

    ``patch_size`` is an int or ``(height, width)``. The grid has ``H // ph`` x ``W // pw`` patches
    (what ``keep_idx`` indexes). When H or W is not a multiple of the patch size, the grid is
    stretched over the whole image (pixel row ``r`` belongs to grid row ``r * grid_h // H``), so
    no border strip escapes the mask. Gradients flow to the kept pixels.
    """
    import torch

    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    b, _, h, w = images.shape
    if h < ph or w < pw:
        raise DomainFMError(
            f"image size {h}x{w} is smaller than the mask patch size {ph}x{pw}",
            fix="use an --img-size of at least one patch",
        )
    if keep_idx.shape[0] != b:
        raise DomainFMError(f"keep indices are for {keep_idx.shape[0]} images, the batch has {b}",
                            fix="draw one row of keep indices per image")
    grid_h, grid_w = h // ph, w // pw
    mask = keep_mask(keep_idx.to(images.device), grid_h * grid_w).view(b, 1, grid_h, grid_w)
    rows = torch.arange(h, device=images.device) * grid_h // h
    cols = torch.arange(w, device=images.device) * grid_w // w
    pixel_mask = mask[:, :, rows][:, :, :, cols]
    return images * pixel_mask.to(images.dtype)
