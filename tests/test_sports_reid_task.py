"""The CLIP-ReIdent task: the logit scale it starts from, its optimisation schedule, a ViT backbone
training through Lightning, and flip test-time augmentation of the features."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from domainfm.backbones import create_backbone
from domainfm.losses import info_nce_loss
from domainfm.training import warmup_poly
from plugins.sports_reid.datasets import ReIDDataset, ReIDRecord
from plugins.sports_reid.retrieval import EvalSettings, embed
from plugins.sports_reid.task import DEFAULT_LOGIT_SCALE, ReIDContrastiveTask, initial_logit_scale


def test_initial_logit_scale_from_checkpoints(tmp_path):
    assert initial_logit_scale(None) == pytest.approx(1 / 0.07)
    assert initial_logit_scale("models:/x@candidate") == pytest.approx(1 / 0.07)
    # a CLIP checkpoint stores the log of the multiplier
    clip = tmp_path / "clip.safetensors"
    save_file({"logit_scale": torch.tensor(math.log(42.0)), "w": torch.zeros(2)}, str(clip))
    assert initial_logit_scale(str(clip)) == pytest.approx(42.0, rel=1e-5)
    ours = tmp_path / "export.safetensors"
    save_file({"w": torch.zeros(2)}, str(ours), metadata={"reid_logit_scale": "33.5"})
    assert initial_logit_scale(str(ours)) == pytest.approx(33.5)
    pt = tmp_path / "clip.pt"
    torch.save({"state_dict": {"logit_scale": torch.tensor(math.log(20.0))}}, pt)
    assert initial_logit_scale(str(pt)) == pytest.approx(20.0, rel=1e-5)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert initial_logit_scale(str(plain)) == pytest.approx(DEFAULT_LOGIT_SCALE)


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, n, size):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"anchor": self.x[i], "positive": self.x[i] + 0.05 * torch.randn_like(self.x[i])}


class LRRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_vit_trains_with_warmup_then_polynomial_decay():
    torch.manual_seed(0)
    backbone = create_backbone("test_vit", img_size=32, init="random")
    assert backbone.is_vit
    task = ReIDContrastiveTask(backbone, lr=1e-3, weight_decay=0.05, warmup_steps=2, logit_scale=10.0)
    start_scale = float(task.logit_scale)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    batch = RandomPairs(4, 32)[0]
    with torch.no_grad():  # the task's loss is the core's symmetric InfoNCE with smoothing 0.1
        z = task(torch.stack([batch["anchor"], batch["anchor"]]))
        assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    lrs = LRRecorder()
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[lrs], accelerator="cpu")
    trainer.fit(task, torch.utils.data.DataLoader(RandomPairs(16, 32), batch_size=4))
    expected = [1e-3 * warmup_poly(s, 2, 6) for s in range(6)]
    assert lrs.lrs == pytest.approx(expected)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert float(task.logit_scale) != pytest.approx(start_scale)  # learned
    changed = [n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("model.blocks") for n in changed) and any("patch_embed" in n for n in changed)


def test_warmup_longer_than_half_the_run_is_shortened_with_one_warning(capsys):
    """The default 50 warm-up steps in a 6-step run: the learning rate still reaches --lr (at step
    3, half the run) and decays, and one warning line says so; a warm-up that fits warns nothing."""
    from domainfm.training import fitted_warmup

    assert fitted_warmup(50, 6) == (3, fitted_warmup(50, 6)[1]) and fitted_warmup(3, 6) == (3, None)
    torch.manual_seed(0)
    backbone = create_backbone("test_vit", img_size=32, init="random")
    task = ReIDContrastiveTask(backbone, lr=1e-3, weight_decay=0.05, warmup_steps=50, logit_scale=10.0)
    lrs = LRRecorder()
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[lrs], accelerator="cpu")
    trainer.fit(task, torch.utils.data.DataLoader(RandomPairs(16, 32), batch_size=4))
    # by hand: warm-up 1/3, 2/3, 3/3 of 1e-3, then linear decay (1 - (s - 3) / 3)
    assert lrs.lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --warmup-steps 50 is more than half of this run's 6 optimiser steps: warming up "
                        "over 3 steps instead, so the learning rate reaches --lr at step 3 (pass --warmup-steps 3 "
                        "or fewer to silence this)"]


def test_logged_loss_is_symmetric_smoothed_info_nce_by_hand():
    torch.manual_seed(0)
    backbone = create_backbone("test_vit", img_size=32, init="random")  # no BatchNorm, no dropout
    task = ReIDContrastiveTask(backbone, lr=1e-3, weight_decay=0.0, warmup_steps=0, logit_scale=14.0)
    data = RandomPairs(4, 32)
    a = torch.stack([data.x[i] for i in range(4)])
    p = a + 0.5
    with torch.no_grad():
        za, zp = task(torch.cat([a, p])).chunk(2)
        logits = 14.0 * za @ zp.T
        # label smoothing 0.1 over 4 classes: 0.9 + 0.025 on the diagonal, 0.025 elsewhere
        target = torch.full((4, 4), 0.1 / 4) + torch.eye(4) * 0.9
        by_hand = 0.5 * sum((-(target * torch.log_softmax(m, 1)).sum(1)).mean() for m in (logits, logits.T))
    batch = [{"anchor": a[i], "positive": p[i]} for i in range(4)]
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, torch.utils.data.DataLoader(batch, batch_size=4))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(info_nce_loss(za, zp, logit_scale=14.0, label_smoothing=0.1)) == pytest.approx(float(by_hand), rel=1e-5)


def test_flip_tta_averages_the_mirror_features(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}_0_0.jpeg"
        Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    ds = ReIDDataset([ReIDRecord(path=p, pid=str(i), item_id=p.stem) for i, p in enumerate(paths)], img_size=16)
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", img_size=16, init="random")
    plain = embed(backbone, ds, EvalSettings(flip_tta=False, batch_size=2))
    tta = embed(backbone, ds, EvalSettings(flip_tta=True, batch_size=2))
    x = torch.stack([ds[i]["image"] for i in range(3)])
    with torch.no_grad():
        backbone.eval()
        mirror = backbone(torch.flip(x, dims=[-1]))
    assert torch.allclose(plain, backbone(x).detach(), atol=1e-5)
    assert torch.allclose(tta, (plain + mirror) / 2, atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-3)  # the crops are not symmetric


def test_clip_image_tower_takes_a_step_from_the_clip_temperature():
    # timm's CLIP towers carry no logit scale: the task starts from 1/0.07 (random init: no
    # download; two blocks of the ViT-B/16 CLIP architecture keep the test fast)
    torch.manual_seed(0)
    backbone = create_backbone("vit_base_patch16_clip_224.openai", img_size=32, init="random", depth=2)
    task = ReIDContrastiveTask(backbone, lr=1e-4, weight_decay=0.1, warmup_steps=0,
                               logit_scale=initial_logit_scale(None), layer_decay=0.75)
    assert float(task.logit_scale) == pytest.approx(1 / 0.07)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, torch.utils.data.DataLoader(RandomPairs(2, 32), batch_size=2))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # layer decay (timm's layers): the last block, the final norm and the logit scale learn at the
    # full rate, block 0 at 0.75, the patch embedding at 0.75^2
    lrs = sorted({round(g["lr_scale"], 6) for g in trainer.optimizers[0].param_groups})
    assert lrs == pytest.approx([0.75 ** 2, 0.75, 1.0])
