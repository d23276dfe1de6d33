"""Slide-level models on bags of tile features: gated attention MIL, Chowder and mean pooling.

Each model maps one bag ``[N, D]`` to class logits ``[C]`` and per-tile weights ``[N]`` that sum
to 1 (where the model looked). This file imports only torch: the logged MLflow model loads it as
its own code, so the registered model needs nothing of domainfm to run.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """ABMIL with gated attention (Ilse, Tomczak & Welling, 2018).

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ), z = sum_i a_i h_i, logits = W z.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)                                                        # [N, H]
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        attention = torch.softmax(scores, dim=0)                                   # [N]
        return self.classifier(attention @ h), attention


class Chowder(nn.Module):
    """Chowder (Courtiol et al., 2018): one score per tile and class, the R highest and R lowest
    scores of each class go through a small MLP. Weights: softmax of the tile scores of the last
    class (the positive one for a binary target)."""

    def __init__(self, in_dim: int, n_classes: int, n_extreme: int = 5, hidden: int = 64, dropout: float = 0.25):
        super().__init__()
        self.n_extreme = n_extreme
        self.tile_score = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
        self.mlp = nn.Sequential(nn.Linear(2 * n_extreme, hidden), nn.Sigmoid(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.tile_score(bag)                                              # [N, C]
        r = self.n_extreme
        if scores.shape[0] < r:  # small bags: repeat tiles so top-R / bottom-R exist
            reps = -(-r // scores.shape[0])
            padded = scores.repeat(reps, 1)
        else:
            padded = scores
        top = padded.topk(r, dim=0).values                                         # [R, C]
        bottom = padded.topk(r, dim=0, largest=False).values
        extremes = torch.cat([top, bottom], dim=0).T                               # [C, 2R]
        logits = self.mlp(extremes).squeeze(-1)                                    # [C]
        return logits, torch.softmax(scores[:, -1], dim=0)


class MeanPoolMIL(nn.Module):
    """Mean of embedded tiles then a linear classifier: the baseline every MIL paper reports."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)
        n = bag.shape[0]
        return self.classifier(h.mean(dim=0)), torch.full((n,), 1.0 / n, dtype=h.dtype, device=h.device)


MODELS = {"abmil": GatedAttentionMIL, "chowder": Chowder, "meanpool": MeanPoolMIL}


def build_mil(name: str, in_dim: int, n_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown MIL model {name!r}; use one of {', '.join(MODELS)}")
    return MODELS[name](in_dim, n_classes)


class MILEnsemble(nn.Module):
    """Members of one architecture; probabilities and attention are averaged over members."""

    def __init__(self, name: str, in_dim: int, n_classes: int, n_members: int):
        super().__init__()
        self.members = nn.ModuleList(build_mil(name, in_dim, n_classes) for _ in range(n_members))

    @torch.no_grad()
    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, attns = [], []
        for m in self.members:
            logits, a = m(bag)
            probs.append(torch.softmax(logits, dim=-1))
            attns.append(a)
        return torch.stack(probs).mean(0), torch.stack(attns).mean(0)
