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
    groups = param_groups(bb, 0.05, lr=1.0, layer_decay=0.5, model=bb.model)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    m = bb.model
    # depth 3, timm's layers: embeddings 0, block i is i + 1, the final norm belongs to the last
    # block (timm's MATCH_PREV_GROUP); layer l gets 0.5 ** (3 - l)
    assert lr_of[id(m.patch_embed.proj.weight)] == (0.5 ** 3, 0.05)
    assert lr_of[id(m.pos_embed)] == (0.5 ** 3, 0.0)
    assert lr_of[id(m.blocks[0].attn.qkv.weight)] == (0.5 ** 2, 0.05)
    assert lr_of[id(m.blocks[1].attn.qkv.weight)] == (0.5 ** 1, 0.05)
    assert lr_of[id(m.blocks[2].mlp.fc1.weight)] == (1.0, 0.05)
    assert lr_of[id(m.blocks[2].mlp.fc1.bias)] == (1.0, 0.0)
    assert lr_of[id(m.norm.weight)] == (1.0, 0.0)
    n_params = sum(1 for p in bb.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params
    # the former keyword spells the same groups
    old = param_groups(bb, 0.05, lr=1.0, layer_decay=0.5, vit=bb.model)
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in old] == \
        [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]


def test_param_groups_layer_decay_on_a_resnet_and_parameters_outside_the_model():
    """timm's layers of a ResNet: the stem is layer 0, each residual block a layer; a head outside
    the timm model keeps the full learning rate and loses decay only on its bias."""
    import torch

    bb = create_backbone("resnet18", init="random", img_size=32)
    head = torch.nn.Linear(bb.embed_dim, 4)
    module = torch.nn.ModuleDict({"backbone": bb, "head": head})
    groups = param_groups(module, 0.1, lr=2.0, layer_decay=0.5, model=bb.model)
    lr_of = {id(p): (g["lr"], g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    m = bb.model
    # resnet18: stem, then 2 blocks in each of layer1..4 = 9 layers, the last (layer4.1) at scale 1
    assert lr_of[id(m.conv1.weight)] == (2.0 * 0.5 ** 8, 0.1, 0.5 ** 8)
    assert lr_of[id(m.bn1.weight)] == (2.0 * 0.5 ** 8, 0.0, 0.5 ** 8)
    assert lr_of[id(m.layer1[0].conv1.weight)] == (2.0 * 0.5 ** 7, 0.1, 0.5 ** 7)
    assert lr_of[id(m.layer3[1].conv2.weight)] == (2.0 * 0.5 ** 2, 0.1, 0.5 ** 2)
    assert lr_of[id(m.layer4[1].bn2.bias)] == (2.0, 0.0, 1.0)
    assert lr_of[id(head.weight)] == (2.0, 0.1, 1.0) and lr_of[id(head.bias)] == (2.0, 0.0, 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in module.parameters())
    # without layer decay: one learning rate, the same no-decay rule
    flat = param_groups(module, 0.1, lr=2.0)
    assert {g["lr"] for g in flat} == {2.0}
    assert {id(p) for g in flat if g["weight_decay"] == 0.0 for p in g["params"]} == \
        {id(p) for p in module.parameters() if p.ndim <= 1}


# ---------------------------------------------------------------- progress bar (issue 9, item 17)

class _Tiny:
    """A real LightningModule on a real DataLoader: 8 samples in batches of 4 = 2 steps an epoch."""

    @staticmethod
    def fit(ckpt_dir=None, ckpt_path=None, **cfg_changes):
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

        cfg = RunConfig(accelerator="cpu", **{"checkpoint_every": 0, **cfg_changes})
        trainer = build_trainer(cfg, logger=False, ckpt_dir=ckpt_dir)
        loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
        trainer.fit(Module(), train_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
        bar = trainer.progress_bar_callback
        return trainer, bar.progress.tasks[bar.train_progress_bar_id].description.strip()


def test_step_checkpoints_keep_the_newest_k(tmp_path):
    """``--keep-checkpoints 2`` with a checkpoint every step: only the two newest step files stay,
    beside last.ckpt, and the count holds when the run resumes from last.ckpt."""
    trainer, _ = _Tiny.fit(max_steps=5, checkpoint_every=1, keep_checkpoints=2, ckpt_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000004.ckpt", "step000005.ckpt"]
    _Tiny.fit(max_steps=7, checkpoint_every=1, keep_checkpoints=2, ckpt_dir=tmp_path,
              ckpt_path=tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000006.ckpt", "step000007.ckpt"]
    # a resume that keeps fewer than the run it continues: the ranking shrinks to the newest
    _Tiny.fit(max_steps=9, checkpoint_every=1, keep_checkpoints=1, ckpt_dir=tmp_path,
              ckpt_path=tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000009.ckpt"]
    # and one that keeps more, started from a run that had not filled its count yet
    few = tmp_path / "few"
    _Tiny.fit(max_steps=2, checkpoint_every=1, keep_checkpoints=3, ckpt_dir=few)
    _Tiny.fit(max_steps=5, checkpoint_every=1, keep_checkpoints=2, ckpt_dir=few, ckpt_path=few / "last.ckpt")
    assert sorted(p.name for p in few.iterdir()) == ["last.ckpt", "step000004.ckpt", "step000005.ckpt"]
    # -1 keeps them all
    keep_all = tmp_path / "all"
    _Tiny.fit(max_steps=3, checkpoint_every=1, keep_checkpoints=-1, ckpt_dir=keep_all)
    assert sorted(p.name for p in keep_all.iterdir()) == ["last.ckpt", "step000001.ckpt", "step000002.ckpt",
                                                         "step000003.ckpt"]


def test_build_trainer_wants_its_logger_spelled_out():
    from domainfm.config import RunConfig
    from domainfm.training import build_trainer

    with pytest.raises(TypeError, match="lightning_logger"):
        build_trainer(RunConfig(accelerator="cpu"), logger=True)


def test_progress_bar_counts_steps_when_only_max_steps_bounds_the_run():
    trainer, description = _Tiny.fit(max_steps=5)
    assert trainer.global_step == 5 and trainer.max_epochs == -1  # Lightning's "no epoch limit"
    assert description == "Step 5/5 (epoch 2)"
    # with an epoch limit, epochs are what bounds the run and what the bar counts
    trainer, description = _Tiny.fit(max_epochs=2)
    assert trainer.global_step == 4 and description == "Epoch 1/1"
