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


# ---------------------------------------------------------------- progress bar (issue 9, item 17)

class _Tiny:
    """A real LightningModule on a real DataLoader: 8 samples in batches of 4 = 2 steps an epoch."""

    @staticmethod
    def fit(**cfg_changes):
        import lightning as L
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from domainfm.config import RunConfig
        from domainfm.training import build_trainer

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(2, 1)

            def training_step(self, batch, batch_idx):
                return self.layer(batch[0]).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        cfg = RunConfig(accelerator="cpu", checkpoint_every=0, **cfg_changes)
        trainer = build_trainer(cfg, logger=False)
        loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
        trainer.fit(Module(), train_dataloaders=loader)
        bar = trainer.progress_bar_callback
        return trainer, bar.progress.tasks[bar.train_progress_bar_id].description.strip()


def test_progress_bar_counts_steps_when_only_max_steps_bounds_the_run():
    trainer, description = _Tiny.fit(max_steps=5)
    assert trainer.global_step == 5 and trainer.max_epochs == -1  # Lightning's "no epoch limit"
    assert description == "Step 5/5 (epoch 2)"
    # with an epoch limit, epochs are what bounds the run and what the bar counts
    trainer, description = _Tiny.fit(max_epochs=2)
    assert trainer.global_step == 4 and description == "Epoch 1/1"
