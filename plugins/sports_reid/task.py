"""CLIP-ReIdent fine-tuning: image-to-image InfoNCE between two crops of the same player.

The batch is ``{"anchor": [B, 3, S, S], "positive": [B, 3, S, S]}`` with B different players
(see DistinctPlayerPairSampler); row i of one side is the positive of row i of the other and every
other row a negative. The logit scale is learned as a log-parameter, as in CLIP.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from domainfm.errors import DomainFMError
from domainfm.losses import info_nce_loss
from domainfm.training import fitted_warmup, param_groups, warmup_poly

DEFAULT_LOGIT_SCALE = 1.0 / 0.07  # CLIP's initial temperature
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: keeps the learned temperature from collapsing
LOGIT_SCALE_META = "reid_logit_scale"  # safetensors metadata key of our exports (the multiplier)


def initial_logit_scale(weights: str | None) -> float:
    """The logit-scale multiplier to start from: the one a checkpoint carries (a domainfm
    sports-reid export's metadata, or a ``logit_scale`` tensor as CLIP checkpoints store it: the
    log of the multiplier), else 1/0.07."""
    if not weights or weights.startswith("models:/"):
        return DEFAULT_LOGIT_SCALE
    path = Path(weights)
    if not path.is_file():
        return DEFAULT_LOGIT_SCALE  # the backbone factory reports the missing file
    tensor = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from domainfm.backbones import read_metadata

        meta = read_metadata(path)
        if LOGIT_SCALE_META in meta:
            return float(meta[LOGIT_SCALE_META])
        with safe_open(str(path), framework="pt") as f:
            if "logit_scale" in f.keys():
                tensor = f.get_tensor("logit_scale")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            sd = obj.get("state_dict", obj)
            tensor = sd.get("logit_scale") if isinstance(sd, dict) else None
    if tensor is not None:
        return float(torch.as_tensor(tensor).float().exp().clamp(max=MAX_LOGIT_SCALE))
    return DEFAULT_LOGIT_SCALE


class ReIDContrastiveTask(L.LightningModule):
    """A backbone fine-tuned with the symmetric InfoNCE loss of the core, label smoothing 0.1,
    AdamW with linear warm-up and polynomial decay."""

    def __init__(self, backbone: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                 layer_decay: float | None = None, logit_scale: float = DEFAULT_LOGIT_SCALE,
                 label_smoothing: float = 0.1, poly_power: float = 1.0):
        super().__init__()
        if logit_scale <= 0:
            raise DomainFMError(f"the logit scale must be positive, got {logit_scale}")
        self.backbone = backbone
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.layer_decay, self.label_smoothing, self.poly_power = layer_decay, label_smoothing, poly_power
        self._t_last: float | None = None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        anchor, positive = batch["anchor"], batch["positive"]
        # one forward pass for both sides: BatchNorm (CNN backbones) sees one batch of 2B crops
        z = self(torch.cat([anchor, positive]))
        z_a, z_p = z.float().chunk(2)
        loss = info_nce_loss(z_a, z_p, logit_scale=self.logit_scale, symmetric=True,
                             label_smoothing=self.label_smoothing)
        with torch.no_grad():
            # how often each anchor's own positive is its nearest candidate: should climb to 1
            pair_acc = ((z_a @ z_p.T).argmax(1) == torch.arange(len(z_a), device=z.device)).float().mean()
        opt = self.optimizers()
        group = opt.param_groups[0]
        log = {"train/loss": loss.detach(), "train/pair_acc": pair_acc, "train/logit_scale": self.logit_scale.detach(),
               "lr": group["lr"] / group.get("lr_scale", 1.0)}
        now = time.perf_counter()
        if self._t_last is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            log["images_per_s"] = 2 * len(anchor) * world / max(now - self._t_last, 1e-9)
        self._t_last = now
        self.log_dict(log, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(anchor))
        return loss

    def configure_optimizers(self):
        vit = self.backbone.model if getattr(self.backbone, "is_vit", False) else None
        groups = param_groups(self, self.weight_decay, lr=self.lr, layer_decay=self.layer_decay, vit=vit)
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.98))
        total = int(self.trainer.estimated_stepping_batches)
        warmup, warning = fitted_warmup(self.warmup_steps, total)
        if warning and self.trainer.is_global_zero:  # once per run, on one line
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_poly(s, warmup, total, power=self.poly_power))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def state_for_export(self) -> dict[str, Any]:
        return {LOGIT_SCALE_META: f"{float(self.logit_scale.detach()):.6f}"}
