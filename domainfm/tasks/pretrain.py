"""Continual pretraining (SoftCon recipe): a student sees a masked view, an EMA teacher sees the
other view unmasked, and the soft multi-label contrastive loss pulls together scenes whose labels
agree. This module is the LightningModule; the ``domainfm pretrain`` job around it (data, MLflow
run, checkpoints and resume, export and registration) is :func:`domainfm.jobs.run_pretraining`.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn

from domainfm.backbones import create_backbone
from domainfm.losses import soft_contrastive_loss
from domainfm.masking import random_keep_indices
from domainfm.training import ema_momentum, fitted_warmup, param_groups, warmup_cosine

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig


class Projector(nn.Module):
    """DINO-style MLP head: the loss lives in its output space, the backbone stays general."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 2048):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None, mask_mode: str = "drop") -> torch.Tensor:
        return self.projector(self.backbone(x, keep_idx, mask_mode))


class ContinualPretrainingTask(L.LightningModule):
    """Student (backbone + projector) trained by AdamW; teacher = EMA of the student."""

    def __init__(self, cfg: dict[str, Any], in_chans: int, backbone: nn.Module | None = None):
        super().__init__()
        # the checkpoint stores the config so that a resumed run continues with the same settings
        # (not sent to the logger: tracking.log_config already logged the resolved config)
        self.save_hyperparameters({"cfg": cfg, "in_chans": in_chans}, logger=False)
        self.cfg = cfg
        self.in_chans = in_chans
        self._backbone = backbone
        self.configure_models()
        self._t_last: float | None = None
        # FSDP shows each shard of a parameter as a flat slice: the weight-decay rule needs the real ndim
        self._param_ndims = {n: p.ndim for n, p in self.student.named_parameters()}
        self.full_teacher_state: dict[str, torch.Tensor] | None = None

    # torchgeo's habit: models, losses and metrics are configured in named hooks
    def configure_models(self) -> None:
        from domainfm.config import CORE_FIELDS, RunConfig

        backbone = self._backbone
        if backbone is None:
            backbone = create_backbone(RunConfig(**{k: v for k, v in self.cfg.items() if k in CORE_FIELDS and k != 'options'}),
                                       in_chans=self.in_chans)
        hidden = min(2048, 4 * backbone.embed_dim)
        self.student = Encoder(backbone, Projector(backbone.embed_dim, self.cfg["proj_dim"], hidden))
        if self.cfg["mask_mode"] == "token":
            backbone.add_mask_token()
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        del self._backbone

    def loss(self, z_teacher: torch.Tensor, z_student: torch.Tensor, labels: torch.Tensor):
        c = self.cfg
        return soft_contrastive_loss(z_teacher.float(), z_student.float(), labels.float(),
                                     temperature=c["temperature"], label_similarity=c["label_similarity"],
                                     soft_target=c["soft_target"], hard_weight=c["hard_weight"],
                                     soft_weight=c["soft_weight"], symmetric=c["symmetric"],
                                     chunk_size=c["chunk_size"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        view_t, view_s, labels = batch["view_teacher"], batch["view_student"], batch["labels"]
        bb = self.student.backbone
        keep = None
        if self.cfg["mask_ratio"] > 0:
            keep = random_keep_indices(view_s.shape[0], bb.num_patches, self.cfg["mask_ratio"], device=view_s.device)
        z_s = self.student(view_s, keep, self.cfg["mask_mode"])
        with torch.no_grad():
            self.teacher.eval()
            z_t = self.teacher(view_t)
        out = self.loss(z_t, z_s, labels)
        now = time.perf_counter()
        world = self.trainer.world_size if self.trainer is not None else 1
        log = {"loss/hard": out.hard.detach(), "loss/soft": out.soft.detach(), "loss/total": out.total.detach(),
               "lr": self.optimizers().param_groups[0]["lr"] / self.optimizers().param_groups[0].get("lr_scale", 1.0)}
        if self._t_last is not None:
            log["images_per_s"] = view_s.shape[0] * world / max(now - self._t_last, 1e-9)
        self._t_last = now
        self.log_dict(log, prog_bar=True, on_step=True, on_epoch=False, batch_size=view_s.shape[0])
        return out.total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        m = ema_momentum(self.global_step, self.trainer.estimated_stepping_batches, self.cfg["ema_momentum"])
        with torch.no_grad():
            for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)

    def on_train_end(self) -> None:
        """Under FSDP every rank holds a shard of the teacher: gather its full weights here, while the
        process group is alive (a collective, so every rank calls it; rank 0 keeps the result)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            full = self.trainer.strategy.lightning_module_state_dict()  # full state, on rank 0 only
            if self.trainer.is_global_zero:
                prefix = "teacher.backbone.model."
                self.full_teacher_state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def configure_optimizers(self):
        c = self.cfg
        groups = param_groups(self.student, c["weight_decay"], lr=c["lr"], layer_decay=c["layer_decay"],
                              model=self.student.backbone.model, ndims=self._param_ndims)
        opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        warmup, warning = fitted_warmup(c["warmup_steps"], total)
        if warning and self.trainer.is_global_zero:  # once per run, on one line
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, final=0.01))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------- what the job needs of the task

#: The units ``--strategy fsdp`` shards on their own: student and teacher encoders are cut alike, so
#: the EMA update pairs each teacher shard with the student shard of the same elements (a timm
#: ViT's blocks become units of their own inside them, to bound the memory of one all-gather).
def _fsdp_units() -> set[type]:
    units: set[type] = {Encoder}
    try:
        from timm.models.vision_transformer import Block

        units.add(Block)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return units


FSDP_UNITS = _fsdp_units()


def exportable_teacher(task: ContinualPretrainingTask, cfg: "RunConfig"):
    """The teacher backbone with its full weights, ready for :func:`save_backbone`.

    Without FSDP that is ``task.teacher.backbone`` itself. Under FSDP the module on rank 0 holds only
    its shard, so a fresh backbone of the same architecture receives the full state gathered in
    :meth:`ContinualPretrainingTask.on_train_end` (every key must match: ``strict=True``)."""
    if task.full_teacher_state is None:
        return task.teacher.backbone
    fresh = create_backbone(cfg, in_chans=task.in_chans)  # the same architecture and metadata as trained
    fresh.model.load_state_dict(task.full_teacher_state, strict=True)
    return fresh
