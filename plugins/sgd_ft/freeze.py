"""Freeze a backbone's embedding layer (and optionally its position embedding and tokens).

Kumar et al. ("How to Fine-Tune Vision Models with SGD") freeze only the layer that turns pixels
into features: a ViT's patch embedding, a CNN's stem. Which parameters those are comes from the
core (``Backbone.embedding_parameters``), which finds them from the model's structure (the
top-level modules before the first feature stage), not from a table of names per architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def freeze(module: "nn.Module", names: list[str]) -> int:
    """Set ``requires_grad=False`` on the named parameters of ``module``; returns how many
    scalars were frozen. Unknown names are a bug of the caller, so they raise KeyError."""
    params = dict(module.named_parameters())
    total = 0
    for n in names:
        p = params[n]
        p.requires_grad_(False)
        total += p.numel()
    return total


def frozen_modules(module: "nn.Module") -> list["nn.Module"]:
    """Sub-modules whose parameters are all frozen (their norm layers must stay in eval mode, or
    BatchNorm running statistics would still drift and change what the frozen layer computes)."""
    out = []
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            out.append(m)
    return out


def count_parameters(module: "nn.Module") -> tuple[int, int]:
    """(trainable, frozen) parameter scalars of ``module``."""
    trainable = frozen = 0
    for p in module.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def embedding_names(backbone, *, with_pos_embed: bool = False, prefix: str = "") -> list[str]:
    """Parameter names of ``backbone``'s embedding layer, as they appear in the module that holds
    the backbone under ``prefix`` (e.g. ``"backbone."`` in the classifier)."""
    names = backbone.embedding_parameters(with_pos_embed=with_pos_embed)
    if not names:
        raise DomainFMError(f"found no embedding layer (patch embedding or stem) in {backbone.name}",
                            fix="fine-tune with --no-freeze-embed")
    return [f"{prefix}model.{n}" for n in names]
