"""InfoNCE for image-to-image contrastive fine-tuning (CLIP-style, both sides are images).

Row ``i`` of ``a`` and row ``i`` of ``b`` are a positive pair; every other row of the (global)
batch is a negative. ``logits = logit_scale * cos(a_i, b_j)`` where ``logit_scale`` is already the
multiplier (``exp`` of a learnable log-scale, if you learn it). The loss is the cross-entropy of
each row against its own column, with optional label smoothing; ``symmetric`` averages the
a→b and b→a directions.

Under torch.distributed both sides are all-gathered with gradients, as for the SoftCon loss, so
every rank computes the loss of the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError

if TYPE_CHECKING:
    import torch


def info_nce_loss(
    a: "torch.Tensor",
    b: "torch.Tensor",
    *,
    logit_scale: "float | torch.Tensor",
    symmetric: bool = True,
    label_smoothing: float = 0.0,
) -> "torch.Tensor":
    """Scalar InfoNCE loss of matching rows of ``a`` and ``b`` (both ``[N, D]``)."""
    import torch
    import torch.nn.functional as F

    from domainfm.distributed import all_gather_with_grad, is_distributed

    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise DomainFMError(
            f"info_nce_loss needs two non-empty [N, D] embeddings of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}",
            fix="pass one embedding per image of each pair",
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise DomainFMError(f"label smoothing must be in [0, 1), got {label_smoothing}", fix="use e.g. 0.0 or 0.1")
    if is_distributed():
        a = all_gather_with_grad(a)
        b = all_gather_with_grad(b)
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(a.device.type, enabled=False):  # full precision even under mixed precision
        a = F.normalize(a.to(dtype), dim=1)
        b = F.normalize(b.to(dtype), dim=1)
        logits = logit_scale * (a @ b.T)
        targets = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing))
    return loss
