"""The continual-pretraining task held to its job (issue 12, 0b): the EMA teacher, Siamese masking,
every loss flag reaching the loss, token mode and a CNN training, the soft term seeing the labels,
and resume continuing from the saved step (asserted in test_pretrain.py, through the CLI). Real Lightning
loops on tiny random-initialised models."""

from __future__ import annotations

import copy
import math

import pytest
import torch


IMG = 32  # vit_tiny_patch16 at 32 px: 4 patches; at 64 px: 16


class FixedBatches(torch.utils.data.Dataset):
    """``n`` fixed samples: with batch_size == n every step sees the same batch (so a test can
    recompute what the task saw)."""

    def __init__(self, n=8, chans=3, size=IMG, labels=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(n, chans, size, size, generator=g)
        self.student = self.teacher.flip(-1) + 0.1 * torch.randn(n, chans, size, size, generator=g)
        if labels is None:  # overlapping multi-hot labels of graded sizes
            labels = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1],
                                   [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.float32)[:n]
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"view_teacher": self.teacher[i], "view_student": self.student[i], "labels": self.labels[i]}

    def batch(self):
        return self.teacher, self.student, self.labels


def make_task(backbone="vit_tiny_patch16_224", img_size=IMG, **over):
    from domainfm.backbones import create_backbone
    from domainfm.config import RunConfig
    from domainfm.tasks.pretrain import ContinualPretrainingTask

    torch.manual_seed(0)
    cfg = RunConfig(plugin="toy", backbone=backbone, init="random", img_size=img_size, proj_dim=16, batch_size=8,
                    warmup_steps=0, lr=1e-3).replace(**over)
    return ContinualPretrainingTask(cfg.to_dict(), 3, backbone=create_backbone(cfg, in_chans=3))


class Recorder:
    """A Lightning callback recording, after each optimiser step and BEFORE the task's own
    on_train_batch_end (callbacks run first), the logged losses and the teacher/student weights."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Recorder(Callback):
            def __init__(self):
                self.steps = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.steps.append({
                    "global_step": trainer.global_step,
                    "total": trainer.estimated_stepping_batches,
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                    "teacher": {k: v.detach().clone() for k, v in pl_module.teacher.state_dict().items()},
                    "student": {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()},
                })

        return _Recorder()


def fit(task, data, steps, callbacks=(), **trainer_kw):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **trainer_kw)
    loader = torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
    return trainer


# ---------------------------------------------------------------- EMA teacher

def test_teacher_after_each_step_is_the_ema_of_previous_teacher_and_student():
    base = 0.9  # far from 1, so a missing or wrong update is large
    task = make_task(ema_momentum=base, mask_ratio=0.5)
    start_teacher = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    rec = Recorder()
    fit(task, FixedBatches(), 3, [rec])
    final_teacher = task.teacher.state_dict()
    prev = start_teacher
    moved = 0.0
    for i, s in enumerate(rec.steps):
        # DINO's cosine schedule from `base` to 1, written out here, not imported
        m = 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * s["global_step"] / s["total"]))
        after = rec.steps[i + 1]["teacher"] if i + 1 < len(rec.steps) else final_teacher
        assert s["teacher"].keys() == prev.keys()
        for k, t_prev in prev.items():
            if not t_prev.is_floating_point():
                continue
            expected = m * t_prev + (1.0 - m) * s["student"][k]
            torch.testing.assert_close(after[k], expected, rtol=1e-5, atol=1e-6, msg=f"step {i}: {k}")
            moved = max(moved, float((after[k] - t_prev).abs().max()))
        prev = after
    # the teacher did move (at the last step the schedule reaches momentum 1 and it stays)
    assert moved > 1e-5  # one AdamW step moves the student by ~lr (1e-3); the teacher by (1 - m) of that


# ---------------------------------------------------------------- Siamese masking

def _block_inputs(encoder):
    seen = []
    handle = encoder.backbone.model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    return seen, handle


def test_student_sees_exactly_the_kept_tokens_and_teacher_all(monkeypatch):
    import domainfm.tasks.pretrain as pretrain_mod

    task = make_task(img_size=64, mask_ratio=0.5, mask_mode="drop")
    start = copy.deepcopy(task.student)
    kept = []
    real = pretrain_mod.random_keep_indices

    def spy(*args, **kwargs):
        kept.append(real(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(pretrain_mod, "random_keep_indices", spy)
    s_seen, h1 = _block_inputs(task.student)
    t_seen, h2 = _block_inputs(task.teacher)
    data = FixedBatches(size=64)
    fit(task, data, 1)
    h1.remove(), h2.remove()
    assert len(kept) == 1 and kept[0].shape == (8, 8)  # 16 patches, half kept
    keep = kept[0]
    # what the first block must receive: CLS + the kept patch tokens (with their position embedding)
    m = start.backbone.model
    with torch.no_grad():
        full = m.norm_pre(m._pos_embed(m.patch_embed(data.student)))
    expected = torch.stack([torch.cat([full[b, :1], full[b, 1 + keep[b]]]) for b in range(8)])
    assert s_seen[0].shape == (8, 1 + 8, 192)
    torch.testing.assert_close(s_seen[0], expected)
    assert t_seen[0].shape == (8, 1 + 16, 192)  # the teacher's view is not masked


def test_token_mode_trains_with_mask_tokens_in_place_of_dropped_patches(monkeypatch):
    import domainfm.tasks.pretrain as pretrain_mod

    task = make_task(img_size=64, mask_ratio=0.5, mask_mode="token")
    start = copy.deepcopy(task.student)
    kept = []
    real = pretrain_mod.random_keep_indices
    monkeypatch.setattr(pretrain_mod, "random_keep_indices", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    s_seen, h = _block_inputs(task.student)
    data = FixedBatches(size=64)
    rec = Recorder()
    fit(task, data, 3, [rec])
    h.remove()
    assert s_seen[0].shape == (8, 1 + 16, 192)  # every position present
    m, bb = start.backbone.model, start.backbone
    with torch.no_grad():
        flat = m.patch_embed(data.student)
        dropped = torch.ones(8, 16, dtype=torch.bool)
        dropped.scatter_(1, kept[0], False)
        flat = torch.where(dropped[..., None], bb.mask_token.expand_as(flat), flat)
        expected = m.norm_pre(m._pos_embed(flat))
    torch.testing.assert_close(s_seen[0], expected)
    assert all(math.isfinite(s["metrics"]["loss/total"]) for s in rec.steps) and len(rec.steps) == 3
    # the mask token is learned: it received gradients and moved from its zero start
    assert float(task.student.backbone.mask_token.abs().max()) > 0


def test_cnn_backbone_trains_with_dropped_patches_zeroed(monkeypatch):
    import domainfm.tasks.pretrain as pretrain_mod

    task = make_task(backbone="resnet10t", img_size=IMG, mask_ratio=0.5)
    assert not task.student.backbone.is_vit
    start = copy.deepcopy(task.student.state_dict())
    kept = []
    real = pretrain_mod.random_keep_indices
    monkeypatch.setattr(pretrain_mod, "random_keep_indices", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    seen = []
    h = task.student.backbone.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    data = FixedBatches()
    rec = Recorder()
    fit(task, data, 3, [rec])
    h.remove()
    assert len(rec.steps) == 3 and all(math.isfinite(s["metrics"]["loss/total"]) for s in rec.steps)
    # 32 px on a 16-px grid: 4 cells, 2 kept; the dropped cells are zero, the kept ones untouched
    x, keep = seen[0], kept[0]
    for b in range(8):
        for cell in range(4):
            r, c = divmod(cell, 2)
            got = x[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16]
            want = data.student[b, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16]
            torch.testing.assert_close(got, want if cell in keep[b].tolist() else torch.zeros_like(want))
    changed = [k for k, v in task.student.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("backbone.model.conv1") for k in changed)


# ---------------------------------------------------------------- loss flags reach the loss

def _expected_loss(task, data, **flags):
    """The loss function called directly on what the task's models produce for the fixed batch."""
    from domainfm.losses import soft_contrastive_loss

    vt, vs, labels = data.batch()
    with torch.no_grad():
        z_t = task.teacher.eval()(vt)
        z_s = task.student.train()(vs)
    return soft_contrastive_loss(z_t, z_s, labels, **flags)


DEFAULTS = dict(temperature=0.1, label_similarity="cosine", soft_target="ce", hard_weight=1.0, soft_weight=1.0,
                symmetric=False, chunk_size=None)


@pytest.mark.parametrize("flags", [
    {"symmetric": True},
    {"chunk_size": 3},
    {"soft_target": "bce"},
    {"label_similarity": "jaccard"},
    {"temperature": 0.5},
    {"hard_weight": 0.3, "soft_weight": 2.0},
])
def test_each_loss_flag_changes_the_logged_loss_as_the_loss_function_says(flags, monkeypatch):
    import domainfm.losses.soft_contrastive as sc

    task = make_task(mask_ratio=0.0, **flags)  # no masking: the student's output is reproducible
    data = FixedBatches()
    start = copy.deepcopy(task)
    chunked_calls = []
    real = sc._chunked_forward
    monkeypatch.setattr(sc, "_chunked_forward", lambda *a: chunked_calls.append(a[-1]) or real(*a))
    rec = Recorder()
    fit(task, data, 1, [rec])
    logged = rec.steps[0]["metrics"]
    want = _expected_loss(start, data, **{**DEFAULTS, **flags})
    chunked_during_fit = list(chunked_calls)
    default = _expected_loss(start, data, **DEFAULTS)
    for term in ("hard", "soft", "total"):
        assert logged[f"loss/{term}"] == pytest.approx(float(getattr(want, term)), rel=1e-5, abs=1e-6), term
    if "chunk_size" in flags:
        assert chunked_during_fit and set(chunked_during_fit) == {3}  # the chunked path ran, blocks of 3
        assert float(want.total) == pytest.approx(float(default.total), rel=1e-5)  # the same numbers as dense
    else:
        assert chunked_during_fit == []
        # the flag matters on this batch: the logged loss is not the default's
        assert abs(logged["loss/total"] - float(default.total)) > 1e-3


def test_soft_term_responds_to_the_labels():
    data_l = FixedBatches()
    data_0 = FixedBatches(labels=torch.zeros(8, 4))
    logged = {}
    for name, data in (("labels", data_l), ("none", data_0)):
        task = make_task(mask_ratio=0.0)
        start = copy.deepcopy(task)
        rec = Recorder()
        fit(task, data, 1, [rec])
        logged[name] = rec.steps[0]["metrics"]
        want = _expected_loss(start, data, **DEFAULTS)
        assert logged[name]["loss/soft"] == pytest.approx(float(want.soft), rel=1e-5)
    # same weights, same images: only the labels differ, and so does the soft term; the hard not
    assert logged["labels"]["loss/hard"] == pytest.approx(logged["none"]["loss/hard"], rel=1e-6)
    assert abs(logged["labels"]["loss/soft"] - logged["none"]["loss/soft"]) > 1e-2
    # no labels: S is the identity, so the ce soft target is the hard target (module docstring)
    assert logged["none"]["loss/soft"] == pytest.approx(logged["none"]["loss/hard"], rel=1e-6)


# ---------------------------------------------------------------- resume
# that --resume continues from the saved step, not from zero (the checkpoint's global_step, each step
# logged once in the same MLflow run) is asserted by
# test_pretrain.py::test_pretrain_logs_checkpoints_registers_and_resumes, through the same CLI path
