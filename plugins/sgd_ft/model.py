"""The fine-tuned network (a domainfm backbone with a linear head) and its freezing, shared by the
Lightning task and the memory probe (which must not pay for importing Lightning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plugins.sgd_ft.freeze import count_parameters, embedding_names, freeze, frozen_modules

MULTICLASS, MULTILABEL = "multiclass", "multilabel"


class Classifier(nn.Module):
    """``backbone`` (pooled feature) followed by a linear head with ``num_outputs`` logits.

    Norm layers whose parameters are all frozen stay in eval mode even in ``train()``: otherwise
    a frozen ResNet stem's BatchNorm would keep updating its running statistics and the "frozen"
    layer would compute something different after fine-tuning.
    """

    def __init__(self, backbone: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small, as timm's heads: the first
        nn.init.zeros_(self.head.bias)                     # updates go to features, not noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode:
            for m in frozen_modules(self):
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self


@dataclass(frozen=True)
class FreezeReport:
    names: tuple[str, ...]
    frozen_params: int
    trainable_params: int


def apply_freezing(model: Classifier, *, freeze_embed: bool, freeze_pos_embed: bool) -> FreezeReport:
    """Freeze the backbone's embedding layer (and position embedding/tokens) in place."""
    names: list[str] = []
    if freeze_embed or freeze_pos_embed:
        names = embedding_names(model.backbone, with_pos_embed=freeze_pos_embed, prefix="backbone.")
        if not freeze_embed:  # tokens only
            embed_only = set(embedding_names(model.backbone, prefix="backbone."))
            names = [n for n in names if n not in embed_only]
    freeze(model, names)
    model.train(model.training)  # put frozen norm layers in eval mode now
    trainable, frozen = count_parameters(model)
    return FreezeReport(tuple(names), frozen, trainable)


def loss_fn(task: str):
    return nn.BCEWithLogitsLoss() if task == MULTILABEL else nn.CrossEntropyLoss()
