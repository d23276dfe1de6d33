"""The pretraining health monitor: every ``--val-every`` steps the EMA teacher's backbone embeds a
held-out labelled split of the plugin's data and the run logs, as MLflow curves,

- ``monitor/knn_map`` (or ``monitor/knn_acc`` for single-label data): leave-one-out k-NN on the
  split, neighbours of the same group (location, patient) left out;
- ``monitor/rankme``: RankMe, the effective rank of the embedding matrix (Garrido et al., ICML 2023);
- ``monitor/feature_std``: the per-dimension std of the L2-normalised features.

The first point is step 0, the starting weights. A collapse guard compares every later point with
it: RankMe below ``--collapse-rankme`` x its step-0 value, or k-NN lower by more than
``--collapse-knn-drop``, prints one warning line with both figures; ``--stop-on-collapse`` ends the
run there with the teacher and student of the last healthy evaluation put back (so the export, and
any checkpoint written after, hold them; the optimizer's moments are those of the collapsed step).

A plugin offers the split through ``Plugin.monitor_dataset(cfg, datamodule)`` (see
:func:`held_out_indices` to draw it). A plugin without one still gets RankMe and feature std, on a
fixed set of its pretraining images (the teacher views of the first batches), but no k-NN.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from domainfm.errors import DomainFMError

FALLBACK_IMAGES = 256  # images taken from the training batches when the plugin has no held-out split
MIN_HELD_OUT = 4


@dataclass
class MonitorData:
    """A held-out split: ``dataset[i]`` a dict with ``image`` float[C, H, W] (model-ready) and
    ``labels`` float[K]; ``groups`` one hashable per sample (None: each sample its own group)."""

    dataset: Any
    groups: Sequence[Any] | None = None
    description: str = ""


def held_out_indices(labelled: Sequence[int], fraction: float, *, groups: Sequence[Any] | None = None,
                     seed: int = 0, minimum: int = MIN_HELD_OUT, min_groups: int = 1) -> list[int]:
    """The samples (from ``labelled``, indices into the data) held out from pretraining: whole
    groups drawn at random (``seed``) until ``fraction`` of the labelled samples (at least
    ``minimum``) and at least ``min_groups`` groups are in (2 where the k-NN leaves a sample's own
    group out: one group alone would have no neighbours); never every group (pretraining keeps at
    least one). Sorted.

    ``groups`` aligns with ``labelled`` (None: every sample a group of its own)."""
    import numpy as np

    if not 0.0 < fraction < 1.0:
        raise DomainFMError(f"--val-fraction must be in (0, 1), got {fraction}")
    labelled = list(labelled)
    keys = list(groups) if groups is not None else list(range(len(labelled)))
    if len(keys) != len(labelled):
        raise DomainFMError(f"{len(keys)} group ids for {len(labelled)} samples")
    by_group: dict[Any, list[int]] = {}
    for i, key in zip(labelled, keys):
        by_group.setdefault(key, []).append(i)
    order = list(by_group)
    if len(order) < 2:
        return []
    rng = np.random.default_rng(seed)
    want = max(minimum, int(round(fraction * len(labelled))))
    out: list[int] = []
    taken = 0
    for gi in rng.permutation(len(order)):
        if (len(out) >= want and taken >= min_groups) or len(out) + len(by_group[order[gi]]) >= len(labelled):
            break
        out.extend(by_group[order[gi]])
        taken += 1
    return sorted(out) if taken >= min_groups else []


def resolve_every(val_every: int | None, total_steps: int) -> int:
    """``--val-every``: None (auto) gives a fifth of the run (at least 1); 0 turns the monitor off."""
    if val_every is None:
        return max(1, int(total_steps) // 5) if total_steps and total_steps > 0 else 0
    if val_every < 0:
        raise DomainFMError(f"--val-every must be >= 0 (0: off), got {val_every}")
    return int(val_every)


def collapse_reasons(now: dict[str, float], start: dict[str, float], *, rankme_fraction: float,
                     knn_drop: float) -> list[str]:
    """Why ``now`` counts as collapsed against ``start`` (empty: healthy)."""
    reasons = []
    if "rankme" in now and "rankme" in start and now["rankme"] < rankme_fraction * start["rankme"]:
        reasons.append(f"RankMe below {rankme_fraction:g} x its step-0 value")
    for key in ("knn_map", "knn_acc"):
        if key in now and key in start and start[key] - now[key] > knn_drop:
            reasons.append(f"k-NN fell by more than {knn_drop:g}")
    return reasons


def warning_line(step: int, now: dict[str, float], start: dict[str, float], reasons: list[str]) -> str:
    parts = [f"RankMe {now['rankme']:.2f} (step 0: {start['rankme']:.2f})"]
    for key, name in (("knn_map", "k-NN mAP"), ("knn_acc", "k-NN accuracy")):
        if key in now:
            parts.append(f"{name} {now[key]:.3f} (step 0: {start[key]:.3f})")
    return (f"warning: representation collapse at step {step}: {', '.join(parts)}: {'; '.join(reasons)}. "
            "Fix: lower --lr, raise --ema-momentum, or pass --stop-on-collapse to end such a run there.")


def embed(backbone, images: Sequence[Any], *, batch_size: int = 64, device=None):
    """Features [N, D] (float32, CPU) of ``images`` (a list of float[C, H, W] tensors) through
    ``backbone`` in eval mode, without gradients; the backbone's train/eval mode is restored."""
    import torch

    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.stack(list(images[start:start + batch_size]))
                if device is not None:
                    x = x.to(device)
                out.append(backbone(x).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def evaluate_features(features, labels=None, groups=None, *, k: int = 10) -> dict[str, float]:
    """The monitor's figures for features [N, D]: rankme, feature_std and (with labels) knn_map or
    knn_acc. Pure: tested against hand computations in tests/test_monitor.py."""
    import numpy as np

    from domainfm.metrics import feature_std, knn_quality, rankme

    z = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    if not np.isfinite(z).all() or not np.abs(z).sum() > 0:  # a diverged model: nothing left to rank
        return {"rankme": 0.0, "feature_std": 0.0}
    out = {"rankme": rankme(features), "feature_std": feature_std(features)}
    if labels is not None:
        name, value = knn_quality(features, labels, k=k, groups=groups)
        out[name] = value
    return out


def _callback_class():
    from lightning.pytorch.callbacks import Callback

    class HealthMonitor(Callback):
        """Lightning callback of the monitor (see the module docstring). ``data``: a MonitorData or
        None (fallback: RankMe and feature std on the first training images)."""

        def __init__(self, data: MonitorData | None, *, every: int | None, rankme_fraction: float = 0.5,
                     knn_drop: float = 0.1, stop_on_collapse: bool = False, batch_size: int = 64, k: int = 10):
            self.data = data
            self.every_flag = every
            self.every = 0
            self.rankme_fraction = rankme_fraction
            self.knn_drop = knn_drop
            self.stop_on_collapse = stop_on_collapse
            self.batch_size = batch_size
            self.k = k
            self.images: list[Any] | None = None
            self.labels = None
            self.groups = None
            self.start: dict[str, float] | None = None  # the step-0 figures (saved in checkpoints)
            self.history: list[tuple[int, dict[str, float]]] = []
            self.collapsed_at: int | None = None
            self._good_state: dict[str, Any] | None = None
            self._last_step: int | None = None

        # -- what a checkpoint carries: the step-0 reference survives --resume
        def state_dict(self) -> dict[str, Any]:
            return {"start": self.start, "collapsed_at": self.collapsed_at}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.start = state_dict.get("start")
            self.collapsed_at = state_dict.get("collapsed_at")

        def _load_images(self, trainer) -> None:
            import torch

            if self.data is not None:
                samples = [self.data.dataset[i] for i in range(len(self.data.dataset))]
                self.images = [s["image"].float() for s in samples]
                self.labels = torch.stack([torch.as_tensor(s["labels"]).float() for s in samples])
                self.groups = list(self.data.groups) if self.data.groups is not None else None
                return
            # read from the dataset itself: iterating the loader would start (or, when persistent,
            # reset) the worker processes of the training iteration under way
            loader = trainer.train_dataloader
            dataset = getattr(loader, "dataset", None)
            if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                n = min(FALLBACK_IMAGES, len(dataset))
                self.images = [dataset[i]["view_teacher"].float() for i in range(n)]
                return
            images: list[Any] = []
            for batch in loader:
                images.extend(batch["view_teacher"].float())
                if len(images) >= FALLBACK_IMAGES:
                    break
            self.images = images[:FALLBACK_IMAGES]

        def evaluate(self, pl_module) -> dict[str, float]:
            feats = embed(pl_module.teacher.backbone, self.images, batch_size=self.batch_size, device=pl_module.device)
            return evaluate_features(feats, self.labels, self.groups, k=self.k)

        def _record(self, trainer, pl_module, step: int) -> None:
            if step == self._last_step:
                return
            self._last_step = step
            figures = self.evaluate(pl_module)
            self.history.append((step, figures))
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({f"monitor/{k}": v for k, v in figures.items()}, step=step)
            if self.start is None:
                self.start = figures
            if step == 0:
                self._keep_good(pl_module)
                return
            reasons = collapse_reasons(figures, self.start, rankme_fraction=self.rankme_fraction,
                                       knn_drop=self.knn_drop)
            if not reasons:
                self._keep_good(pl_module)
                return
            if self.collapsed_at is None:
                self.collapsed_at = step
                if trainer.is_global_zero:
                    print(warning_line(step, figures, self.start, reasons), file=sys.stderr, flush=True)
            if self.stop_on_collapse:
                # now, so a checkpoint written at this step (checkpoint callbacks run after this one)
                # holds the healthy weights; again at the end, since the task's EMA hook still runs
                self._restore_good(pl_module)
                trainer.should_stop = True

        def _restore_good(self, pl_module) -> None:
            if self._good_state is not None:
                pl_module.teacher.load_state_dict(self._good_state["teacher"])
                pl_module.student.load_state_dict(self._good_state["student"])

        def _keep_good(self, pl_module) -> None:
            if self.stop_on_collapse:  # a CPU copy only when it may be put back
                self._good_state = {name: {k: v.detach().to("cpu", copy=True) for k, v in
                                           getattr(pl_module, name).state_dict().items()}
                                    for name in ("teacher", "student")}

        def on_train_start(self, trainer, pl_module) -> None:
            self.every = resolve_every(self.every_flag, int(trainer.estimated_stepping_batches))
            if self.every == 0:
                return
            self._load_images(trainer)
            # step 0 is the starting weights; a resumed run's first point is where it resumes
            self._record(trainer, pl_module, trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.every and trainer.global_step % self.every == 0 and not trainer.should_stop:
                self._record(trainer, pl_module, trainer.global_step)

        def on_train_end(self, trainer, pl_module) -> None:
            stopped_here = self.stop_on_collapse and self.collapsed_at is not None
            if stopped_here:
                self._restore_good(pl_module)  # undo the EMA step that ran after the collapse
            if self.every and not stopped_here:  # the final weights' figures close the curves
                self._record(trainer, pl_module, trainer.global_step)

    return HealthMonitor


def HealthMonitor(*args, **kwargs):  # noqa: N802 - the class is built on first use (no lightning at import)
    return _callback_class()(*args, **kwargs)


def monitor_callback(cfg, plugin, datamodule):
    """The monitor for a pretraining run of ``cfg`` (None when ``--val-every 0``): the plugin's
    held-out split when it offers one (which it removes from ``datamodule``), else the fallback."""
    if cfg.val_every == 0:
        return None
    data = None
    hook = getattr(plugin, "monitor_dataset", None)
    if hook is not None:
        data = hook(cfg, datamodule)
    return HealthMonitor(data, every=cfg.val_every, rankme_fraction=cfg.collapse_rankme,
                         knn_drop=cfg.collapse_knn_drop, stop_on_collapse=cfg.stop_on_collapse,
                         batch_size=cfg.batch_size)
