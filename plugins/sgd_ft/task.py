"""The fine-tuning LightningModule: one loss (cross-entropy, or BCE for multi-label), SGD or AdamW
on the parameters left trainable, a per-step warm-up + cosine schedule, and validation/test
accuracy (single-label) or macro mAP (multi-label), kept by torchmetrics metrics that sync their
state across ranks when they compute (every rank gets the score of the whole split, so best-weight
tracking and early stopping agree)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from domainfm.errors import DomainFMError
from domainfm.training import warmup_cosine
from plugins.sgd_ft.model import MULTILABEL, Classifier, loss_fn
from plugins.sgd_ft.optim import build_optimizer

# torchmetrics' notes on a class without positives (its AP is left out below) and on keeping every
# score in memory (a validation split is small): expected here, not worth a line on every validation
_QUIET = (r".*No positive samples found in target.*", r".*will save all targets and predictions in .*buffer.*")


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        yield


def configure_metrics(task: str, num_outputs: int) -> nn.ModuleDict:
    """The metrics of one stage. Multi-label: per-class average precision (exact, no binning: ties
    as sklearn) and the per-class statistics whose support says which classes have a positive.
    Single-label: top-1 accuracy over every sample (micro)."""
    from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision, MultilabelStatScores

    with _quiet():
        if task == MULTILABEL:
            return nn.ModuleDict({"ap": MultilabelAveragePrecision(num_outputs, average="none"),
                                  "stats": MultilabelStatScores(num_outputs, average="none")})
        return nn.ModuleDict({"accuracy": MulticlassAccuracy(num_outputs, average="micro")})


def compute_score(task: str, metrics: nn.ModuleDict) -> float:
    """The stage's score from its metrics (synced across ranks): accuracy, or macro mAP over the
    classes that have at least one positive (the others have no defined AP)."""
    with _quiet():
        if task != MULTILABEL:
            return float(metrics["accuracy"].compute())
        per_class = metrics["ap"].compute()
        support = metrics["stats"].compute()[:, 4]  # tp, fp, tn, fn, support
    if not bool((support > 0).any()):
        raise DomainFMError("no class has a positive sample: average precision is undefined",
                            fix="evaluate on data with labels")
    return float(per_class[support > 0].double().mean())


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
        self.stage_metrics = nn.ModuleDict({stage: configure_metrics(task, model.head.out_features)
                                            for stage in ("val", "test")})
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
        target = self._target(batch)
        loss = self.criterion(logits, target)
        self.log(f"{stage}/loss", loss, batch_size=batch["image"].shape[0])
        if self.task == MULTILABEL:
            scores, target = torch.sigmoid(logits).detach(), target.long()
        else:
            scores = logits.detach()
        for metric in self.stage_metrics[stage].values():
            metric.update(scores, target)

    def _eval_end(self, stage: str) -> None:
        metrics = self.stage_metrics[stage]
        if not next(iter(metrics.values())).update_count:
            return
        value = compute_score(self.task, metrics)
        for metric in metrics.values():
            metric.reset()
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
