"""Shared training plumbing: the Lightning Trainer a run asks for, LR schedules, parameter groups.

Every task (continual pretraining, each plugin's fine-tuning) builds its Trainer here, so devices,
strategies, precision, checkpoints and the MLflow logger behave the same everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig

DEFAULT_MAX_EPOCHS = 10  # when neither --max-steps nor --max-epochs is given


# ---------------------------------------------------------------- schedules (pure)

def warmup_cosine(step: int, warmup: int, total: int, *, final: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup`` steps, then cosine to ``final``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly(step: int, warmup: int, total: int, *, power: float = 1.0, final: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then polynomial decay ``(1 - progress) ** power`` to ``final``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * (1.0 - progress) ** power


def fitted_warmup(requested: int, total: int) -> tuple[int, str | None]:
    """The warm-up a run of ``total`` optimiser steps uses for ``--warmup-steps requested``: at most
    half the run, so that a short run (``--max-steps 10`` with the default 50) still reaches its
    peak learning rate and decays from it. Returns ``(steps, warning)``: ``warning`` is one line
    saying what was shortened (None when ``requested`` fits, and for a run with no steps at all,
    ``--max-steps 0``: registering the starting weights has no schedule to warn about).

    timm's schedulers and Hugging Face's ``get_*_schedule_with_warmup`` do not shorten it: there
    the learning rate would still be climbing when the run ends. Shortening it, and saying so, keeps
    the schedule's shape (warm-up, peak, decay) whatever the run's length."""
    fitted = min(requested, max(0, total // 2))
    if total <= 0:
        return fitted, None
    if fitted >= requested:
        return requested, None
    return fitted, (f"--warmup-steps {requested} is more than half of this run's {total} optimiser steps: "
                    f"warming up over {fitted} step{'' if fitted == 1 else 's'} instead, so the learning rate reaches --lr at step {fitted} "
                    f"(pass --warmup-steps {fitted}{' or fewer' if fitted else ''} to silence this)")


def ema_momentum(step: int, total: int, base: float) -> float:
    """Teacher momentum: cosine from ``base`` to 1.0 over training (DINO's schedule)."""
    if total <= 0:
        return base
    progress = min(1.0, step / total)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- parameter groups

_FSDP_PREFIX = "_fsdp_wrapped_module."

def _no_decay(name: str, param, ndim: int | None = None) -> bool:
    ndim = param.ndim if ndim is None else ndim
    return ndim <= 1 or name.endswith(".bias") or any(
        t in name for t in ("pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale"))


def param_groups(module, weight_decay: float, *, lr: float, layer_decay: float | None = None,
                 model=None, vit=None, ndims: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """AdamW groups for ``module``: no weight decay on norms, biases and tokens (``pos_embed``,
    ``cls_token``, ``reg_token``, ``mask_token``, ``logit_scale``), and optionally layer-wise LR decay
    (BEiT, Bao et al. 2022) over the timm model ``model`` inside ``module``.

    The layers are timm's own (:func:`timm.optim.param_groups_layer_decay`, from each model's
    ``group_matcher``), so every timm architecture is covered: for a ViT of depth D the embeddings
    are layer 0 and block i is layer i + 1, the final norm going with the last block; a ResNet's
    stem is layer 0 and each residual block a layer of its own. A parameter of layer l gets
    ``lr * layer_decay ** (L - l)`` (L the last layer, at the full rate); parameters outside
    ``model`` (a projector, a head) keep ``lr``. Each group carries ``lr``, ``weight_decay`` and
    ``lr_scale``.

    ``vit``: the former name of ``model`` (plugins written against it keep working).
    ``ndims``: each parameter's number of dimensions recorded before FSDP wrapped the module
    (FSDP shows a sharded parameter as a 1-d slice, which would otherwise read as a bias)."""
    model = model if model is not None else vit
    scale_of: dict[int, float] = {}
    if layer_decay is not None and model is not None:
        from timm.optim import param_groups_layer_decay

        for g in param_groups_layer_decay(model, weight_decay, layer_decay=layer_decay):
            scale_of.update({id(p): float(g["lr_scale"]) for p in g["params"]})
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = scale_of.get(id(p), 1.0)
        clean = name.replace(_FSDP_PREFIX, "")
        wd = 0.0 if _no_decay(clean, p, (ndims or {}).get(clean)) else weight_decay
        g = groups.setdefault((wd, scale), {"params": [], "weight_decay": wd, "lr": lr * scale, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


# ---------------------------------------------------------------- trainer

def last_checkpoint(directory: str | Path) -> Path | None:
    d = Path(directory)
    if (d / "last.ckpt").is_file():
        return d / "last.ckpt"
    ckpts = sorted(d.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def step_checkpoints(ckpt_dir: str | Path, *, every: int, keep: int):
    """Lightning's ModelCheckpoint saving ``step000012.ckpt`` every ``every`` training steps into
    ``ckpt_dir``, of which only the newest ``keep`` stay on disk (``-1`` keeps all), plus
    ``last.ckpt``. "Newest" is ranked by Lightning's own ``step`` candidate (the global step it adds
    to the monitored values), highest first: a ViT-B checkpoint with its optimizer state is over a
    gigabyte, and without a metric to rank them Lightning would keep them all. Resuming restores the
    ranking from the checkpoint, so the count holds across ``--resume``, also when the resumed run
    asks for another ``--keep-checkpoints`` (see :func:`_step_checkpoints_class`)."""
    return _step_checkpoints_class()(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                                     every_n_train_steps=every, save_last=True, monitor="step", mode="max",
                                     save_top_k=keep)


def _step_checkpoints_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StepCheckpoints(ModelCheckpoint):
        """ModelCheckpoint whose restored ranking fits this run's ``save_top_k``. Lightning restores
        the ranking of the run that wrote the checkpoint as it was; with a smaller ``save_top_k`` (a
        resume with a lower ``--keep-checkpoints``) its bookkeeping would point at no checkpoint
        (KeyError) or never delete again. Here the newest ``save_top_k`` stay ranked and the older
        files go when training starts (rank 0 removes them, through the strategy)."""

        _surplus: list[str] = []

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            k = self.save_top_k
            if k < 1 or len(self.best_k_models) < k:
                return  # Lightning's own bookkeeping is complete for these
            newest = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=True)
            self._surplus = newest[k:]
            self.best_k_models = {p: self.best_k_models[p] for p in newest[:k]}
            self.kth_best_model_path = newest[k - 1]
            self.kth_value = self.best_k_models[self.kth_best_model_path]

        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            for path in self._surplus:
                if Path(path).exists():
                    trainer.strategy.remove_checkpoint(path)
            self._surplus = []

    return StepCheckpoints


def early_stopping(monitor: str, *, patience: int, mode: str = "max"):
    """Lightning's EarlyStopping on a validation metric, checked after each validation only: a run
    that ends before its first validation (``--max-steps`` inside one epoch) has nothing to check
    and must not stop with "metric not available"."""
    from lightning.pytorch.callbacks import EarlyStopping

    return EarlyStopping(monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False)


def _after_validation_only(callbacks: list[Any]) -> None:
    """Every callback that watches a metric (EarlyStopping, ModelCheckpoint(monitor=...)) acts when
    validation has produced it, never at the end of a training epoch that had no validation."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            cb._check_on_train_epoch_end = False
        elif isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
            cb._save_on_train_epoch_end = False


def bar_metrics(metrics: dict) -> dict:
    """The progress bar's metrics with the learning rate (``lr``, and any ``lr...``/``.../lr`` key)
    as text in scientific notation, ``1.0e-05``: the bar shows other numbers with three decimals."""
    def is_lr(k: str) -> bool:
        return k == "lr" or k.startswith("lr-") or k.startswith("lr/") or k.endswith("/lr")

    return {k: (f"{float(v):.1e}" if is_lr(k) and isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in metrics.items()}


def _step_progress_bar_class():
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Rich's bar, but a run bounded by ``--max-steps`` alone reads "Step 12/100 (epoch 3)":
        Lightning's "Epoch 3/-2" is its internal max_epochs=-1 shown to the user."""

        def _step_bounded(self) -> bool:
            t = self.trainer
            return bool(t.max_steps and t.max_steps > 0 and (t.max_epochs is None or t.max_epochs < 0))

        def _get_train_description(self, current_epoch: int) -> str:
            if not self._step_bounded():
                return super()._get_train_description(current_epoch)
            text = f"Step {self.trainer.global_step}/{self.trainer.max_steps} (epoch {current_epoch})"
            return f"{text:{len(self.validation_description)}}"

        def get_metrics(self, trainer, pl_module):
            # the bar prints numbers as .3f: a learning rate of 1e-05 would read "lr: 0.000"
            return bar_metrics(super().get_metrics(trainer, pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self._step_bounded() and self.progress is not None and self.train_progress_bar_id is not None:
                self.progress.update(self.train_progress_bar_id,
                                     description=self._get_train_description(trainer.current_epoch))

    return StepProgressBar


def build_trainer(cfg: "RunConfig", *, callbacks: Iterable[Any] = (), ckpt_dir: str | Path | None = None,
                  logger: Any, fsdp_wrap: Iterable[type] = (), **overrides: Any):
    """A Lightning Trainer for ``cfg``. ``logger``: a Lightning logger, for MLflow
    ``tracking.lightning_logger(cfg.experiment_name)`` (bound to the active run; training knows no
    MLflow), or False for none. ``fsdp_wrap``: module classes that ``--strategy fsdp`` shards as
    units of their own (a task whose EMA pairs two copies of a module must name that module, so both
    copies are cut into shards the same way); checkpoints hold the full, gathered state."""
    import lightning as L

    from domainfm.output import quiet_third_parties

    quiet_third_parties()  # Lightning's logger tip and the _pytree deprecation warning
    if logger is True or logger is None:
        raise TypeError("build_trainer needs its logger: tracking.lightning_logger(cfg.experiment_name) for the "
                        "active MLflow run, or False")
    cbs = list(callbacks)
    _after_validation_only(cbs)
    if ckpt_dir is not None and cfg.checkpoint_every > 0:
        cbs.append(step_checkpoints(ckpt_dir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints))
    max_steps = cfg.max_steps if cfg.max_steps is not None else -1
    max_epochs = cfg.max_epochs
    if max_epochs is None and max_steps <= 0:
        max_epochs = DEFAULT_MAX_EPOCHS
    strategy = cfg.strategy
    if cfg.devices > 1 and strategy == "auto":
        strategy = "ddp"
    accelerator = cfg.accelerator
    if cfg.devices > 1 and strategy.startswith("ddp") and accelerator in ("auto", "cpu"):
        import torch

        if accelerator == "cpu" or not torch.cuda.is_available():
            from lightning.pytorch.strategies import DDPStrategy

            accelerator = "cpu"
            # gloo is the CPU backend; Lightning picks it, but say it explicitly for clarity
            strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=False)
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        wrap = set(fsdp_wrap)
        if wrap:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy = FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy(wrap), state_dict_type="full")
        else:
            strategy = FSDPStrategy(state_dict_type="full")
    kwargs: dict[str, Any] = dict(
        accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=cfg.precision, max_steps=max_steps, max_epochs=max_epochs, callbacks=cbs, logger=logger,
        log_every_n_steps=1, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(ckpt_dir) if ckpt_dir else None,
        enable_checkpointing=ckpt_dir is not None and cfg.checkpoint_every > 0,
    )
    kwargs.update(overrides)
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    if _RICH_AVAILABLE and kwargs.get("enable_progress_bar", True) and not any(
            isinstance(cb, ProgressBar) for cb in kwargs["callbacks"]):
        kwargs["callbacks"] = [*kwargs["callbacks"], _step_progress_bar_class()()]
    if cfg.devices * cfg.num_nodes > 1:  # one rank's error ends every rank at once, with one line
        from domainfm.distributed import rank_failure_callback

        kwargs["callbacks"] = [*kwargs["callbacks"], rank_failure_callback()]
    try:
        return L.Trainer(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise DomainFMError(f"cannot set up training ({str(e).splitlines()[0]})",
                            fix="check --devices, --strategy, --precision and --accelerator") from None
