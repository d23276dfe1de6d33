"""The fine-tuning LightningModule: one loss (cross-entropy, or BCE for multi-label), SGD or AdamW
on the parameters left trainable, a per-step warm-up + cosine schedule, and validation/test
accuracy (single-label) or macro mAP (multi-label)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from domainfm.training import warmup_cosine
from plugins.sgd_ft.model import MULTILABEL, Classifier, loss_fn
from plugins.sgd_ft.optim import build_optimizer


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets).mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP over the classes that have at least one positive (others have no defined AP)."""
    from domainfm.metrics import multilabel_average_precision

    return float(multilabel_average_precision(scores, targets)["macro"])


class FineTuneTask(L.LightningModule):
    def __init__(self, model: Classifier, *, task: str, optimizer: str, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.criterion = loss_fn(task)
        self.metric_name = "mAP" if task == MULTILABEL else "accuracy"
        self._outputs: list[tuple[np.ndarray, np.ndarray]] = []
        self.last_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # multi-label batches (another plugin's finetune_datamodule) carry "labels": float [B, K]
        return batch["labels"].float() if self.task == MULTILABEL else batch["label"].long()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.criterion(self(batch["image"]), self._target(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self(batch["image"]).float()
        loss = self.criterion(logits, self._target(batch))
        self.log(f"{stage}/loss", loss, batch_size=batch["image"].shape[0])
        scores = torch.sigmoid(logits) if self.task == MULTILABEL else logits
        self._outputs.append((scores.detach().cpu().numpy(), self._target(batch).cpu().numpy()))

    def _eval_end(self, stage: str) -> None:
        if not self._outputs:
            return
        scores = np.concatenate([o[0] for o in self._outputs])
        targets = np.concatenate([o[1] for o in self._outputs])
        self._outputs.clear()
        if self.trainer.world_size > 1:
            # every rank scores the whole split (DistributedSampler gives each the same count), so
            # best-weight tracking and early stopping agree across ranks
            scores, targets = (self.all_gather(torch.from_numpy(a)).flatten(0, 1).cpu().numpy()
                               for a in (scores, targets))
        value = mean_average_precision(scores, targets) if self.task == MULTILABEL else accuracy(scores, targets)
        self.last_metrics[f"{stage}/{self.metric_name}"] = value
        # the value is already the same on every rank; sync_dist only keeps Lightning's bookkeeping happy
        self.log(f"{stage}/{self.metric_name}", value, prog_bar=True, sync_dist=self.trainer.world_size > 1)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        opt = build_optimizer(self.model.parameters(), self.optimizer_name, lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class KeepBest(Callback):
    """Keeps (in memory) the weights of the best validation score, as timm's script reports its
    best epoch; ``restore`` puts them back before testing. No checkpoint has to be unpickled."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_step: int | None = None
        self.validated_step: int | None = None  # global step of the latest validation
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = pl_module.last_metrics.get(self.monitor)
        if value is not None:
            self.validated_step = trainer.global_step
        if value is not None and (self.best is None or value >= self.best):  # ties: the more trained
            self.best = value
            self.best_step = trainer.global_step
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)
