"""Gathering a batch across processes so that contrastive losses see the global batch.

Contrastive losses use the other samples of the batch as negatives (and, for the soft loss, as
soft positives), so under data parallelism every rank must see every rank's embeddings. A plain
``all_gather`` cuts the graph; :func:`all_gather_with_grad` keeps it.

Why the backward sums over ranks: every rank computes the *same* global loss ``L`` from the
gathered batch, and each rank's local rows reach ``L`` on every rank. DDP then *averages* the
parameter gradients over the ``W`` ranks. Summing the incoming gradient over ranks before taking
the local slice gives rank ``r`` the gradient ``W * dL/dz_r``; DDP's average of
``sum_r W * (local part of dL/dθ) / W`` is exactly the single-process ``dL/dθ``. Taking only the
local slice (no sum) would leave the parameters with ``dL/dθ / W``.

Ranks may hold different numbers of rows (the last, smaller batch of an epoch): sizes are
exchanged first and the rows padded to the largest, then trimmed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI imports nothing heavy
    import torch


def is_distributed() -> bool:
    """True when a torch.distributed process group of more than one process is active."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device) -> list[int]:
    import torch
    import torch.distributed as dist

    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: "torch.Tensor", sizes: list[int]) -> "torch.Tensor":
    """Concatenate every rank's rows of ``x`` (rank order), padding to equal sizes for the collective."""
    import torch
    import torch.distributed as dist

    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        padded = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def _gather_function():
    # The autograd.Function is built on first use so that importing this module needs no torch.
    global _GatherWithGrad
    if _GatherWithGrad is not None:
        return _GatherWithGrad
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            sizes = _gather_sizes(x.shape[0], x.device)
            rank = dist.get_rank()
            ctx.start = sum(sizes[:rank])
            ctx.stop = ctx.start + sizes[rank]
            return _all_gather_rows(x, sizes)

        @staticmethod
        def backward(ctx, grad):
            # Sum over ranks (see the module docstring), then keep this rank's rows.
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad[ctx.start : ctx.stop]

    _GatherWithGrad = GatherWithGrad
    return GatherWithGrad


_GatherWithGrad = None


def all_gather_with_grad(x: "torch.Tensor") -> "torch.Tensor":
    """All ranks' rows of ``x`` concatenated in rank order, differentiable.

    The identity when no process group (of more than one process) is active. Tensors that do
    not require grad are gathered the same way (labels, say); backward is then never called.
    Every rank must call it, in the same order, and later run backward if any rank does.
    """
    if not is_distributed():
        return x
    return _gather_function().apply(x)
