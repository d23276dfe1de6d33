"""Optimizers of the SGD-vs-AdamW study and the exact size of their state.

SGD with momentum keeps one buffer per parameter (4 bytes per fp32 scalar), SGD without momentum
keeps nothing, AdamW keeps two moments (8 bytes) plus one scalar step counter per parameter tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import torch

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(params: Iterable["torch.nn.Parameter"], name: str, *, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> "torch.optim.Optimizer":
    """SGD (momentum, no Nesterov) or AdamW over the parameters that still require grad.

    Frozen parameters are left out of the optimizer altogether, so no state is ever allocated for
    them (that is where the paper's memory saving comes from, besides AdamW's second moment).
    """
    import torch

    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise DomainFMError("every parameter is frozen: there is nothing to fine-tune",
                            fix="use --no-freeze-embed or a larger model")
    if name == "sgd":
        # foreach=False: the per-tensor loop allocates no grouped temporaries, so the step's peak
        # memory reflects the method, not the kernel batching (same for AdamW below)
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)
    raise DomainFMError(f"unknown optimizer {name!r}", fix=f"use one of {', '.join(OPTIMIZERS)}")


def optimizer_state_bytes(optimizer: "torch.optim.Optimizer") -> int:
    """Exact bytes of every tensor held in ``optimizer.state`` (moments, momentum buffers and step
    counters alike)."""
    import torch

    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def per_parameter_state_bytes(optimizer: "torch.optim.Optimizer") -> float:
    """Bytes of state per trainable scalar, counting only state tensors shaped like their parameter
    (so AdamW's scalar step counters are left out): 4.0 for SGD+momentum, 0.0 without, 8.0 for
    AdamW in fp32."""
    import torch

    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    shaped = 0
    for p, state in optimizer.state.items():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                shaped += v.numel() * v.element_size()
    return shaped / n_params if n_params else 0.0
