"""Schedules and parameter groups: the numbers a user's learning rate actually follows."""

from __future__ import annotations

import pytest

from domainfm.backbones import create_backbone
from domainfm.training import ema_momentum, param_groups, warmup_cosine, warmup_poly


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 14) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 14) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 14) == pytest.approx(1.0)
    assert warmup_cosine(9, 4, 14) == pytest.approx(0.5)  # halfway through the cosine
    assert warmup_cosine(14, 4, 14, final=0.1) == pytest.approx(0.1)


def test_warmup_poly_and_ema():
    assert warmup_poly(5, 0, 10, power=2.0) == pytest.approx(0.25)
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_param_groups_layer_decay_and_no_decay():
    bb = create_backbone("vit_small_patch14_dinov2", init="random", img_size=28, depth=3)
    groups = param_groups(bb, 0.05, lr=1.0, layer_decay=0.5, vit=bb.model)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    m = bb.model
    # depth 3: embeddings get 0.5**4, block i gets 0.5**(3 - i), the final norm 1
    assert lr_of[id(m.patch_embed.proj.weight)] == (0.5 ** 4, 0.05)
    assert lr_of[id(m.pos_embed)] == (0.5 ** 4, 0.0)
    assert lr_of[id(m.blocks[0].attn.qkv.weight)] == (0.5 ** 3, 0.05)
    assert lr_of[id(m.blocks[2].mlp.fc1.weight)] == (0.5 ** 1, 0.05)
    assert lr_of[id(m.blocks[2].mlp.fc1.bias)] == (0.5 ** 1, 0.0)
    assert lr_of[id(m.norm.weight)] == (1.0, 0.0)
    n_params = sum(1 for p in bb.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params
