"""``domainfm finetune --plugin sgd-ft``: one run, a learning-rate sweep, or the three-arm comparison.

Called by the core inside an active MLflow run. A sweep opens one nested run per learning rate and
keeps the best on validation (the paper tunes the learning rate of every optimizer this way); the
comparison opens one nested run per arm (SGD with frozen embedding, plain SGD, AdamW), each with
its own sweep when ``--lr-sweep`` is given, and writes the table of the three
(:mod:`plugins.sgd_ft.reports`). Read top-down: :func:`finetune` is what the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainfm.errors import DomainFMError
from plugins.sgd_ft.arms import COMPARE_ARMS, Arm, arm_of, parse_lr_sweep

if TYPE_CHECKING:  # pragma: no cover
    from plugins.sgd_ft.memory import MemoryMeter


def finetune(cfg) -> dict[str, Any]:
    """Build the data, fit it to the backbone's bands, train one arm (or sweep, or compare three),
    save and log the winning classifier; returns the run's metrics."""
    from domainfm import tracking
    from plugins.sgd_ft.datamodule import build_datamodule
    from plugins.sgd_ft.inputs import match_backbone_bands
    from plugins.sgd_ft.memory import MemoryMeter
    from plugins.sgd_ft.saved import classifier_metadata, log_classifier, save_classifier

    # core flags this plugin does not implement: refuse them rather than silently ignore them
    if cfg.resume:
        raise DomainFMError("sgd-ft does not resume a fine-tuning run (each run is short and starts from the "
                            "backbone)", fix="drop --resume and start the run again")
    if cfg.layer_decay is not None:
        raise DomainFMError("sgd-ft does not use layer-wise learning-rate decay (the paper's recipe has none)",
                            fix="drop --layer-decay")
    cfg = weights_from_backbone_flag(cfg)
    lrs = parse_lr_sweep(cfg.lr_sweep)
    dm = build_datamodule(cfg)
    tracking.set_tags(match_backbone_bands(cfg, dm))  # any change to the backbone's input bands: said and logged
    meter = MemoryMeter(cfg, dm, planned=COMPARE_ARMS if cfg.compare else ())
    if cfg.compare:
        metrics, model = compare(cfg, dm, lrs, meter)
    else:
        metrics, model = run_arm(cfg, dm, arm_of(cfg), lrs, meter)
        metrics["arm"] = arm_of(cfg).name
    # the classifier records what applying it takes: classes, input bands, statistics, size, plugin
    meta = classifier_metadata(model, cfg, dm)
    out = Path(cfg.output_dir) / cfg.experiment_name / tracking.active_run_id() / "finetuned.safetensors"
    tracking.log_artifact(save_classifier(model, out, meta), "model")
    if cfg.register:
        metrics["registered_model_uri"] = log_classifier(model, meta, register=cfg.register, alias=cfg.alias)
        metrics["registered_model"] = f"models:/{cfg.register}@{cfg.alias}"
    metrics["weights"] = str(out)
    # how many samples each split held (a standard layout's official splits, or the seeded 60/20/20)
    metrics.update({f"n_{s}": len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")
                    if getattr(dm, f"{s}_set", None) is not None})
    return metrics


# ---------------------------------------------------------------- backbone flag

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def weights_from_backbone_flag(cfg):
    """``--backbone`` may name weights instead of an architecture (a ``models:/NAME@ALIAS`` URI or a
    local weights file): then it is read as ``--weights``, and the architecture comes from the
    weights' own metadata (domainfm exports and registered models carry it)."""
    spec = str(cfg.backbone)
    if not (spec.startswith("models:/") or spec.endswith(WEIGHT_SUFFIXES)):
        return cfg
    if cfg.weights:
        raise DomainFMError(f"--backbone {spec} and --weights {cfg.weights} both name weights",
                            fix="give the weights once, and the architecture name to --backbone")
    if spec.startswith("models:/"):
        # the architecture is read from the registered backbone's metadata when it is downloaded
        return cfg.replace(weights=spec)
    path = Path(spec)
    if not path.is_file():
        raise DomainFMError("weights file not found", path=path,
                            fix="give --backbone an existing file, a models:/ URI or a timm name")
    name = None
    if path.suffix == ".safetensors":
        from domainfm.backbones import read_metadata

        name = read_metadata(path).get("domainfm_name")
    if not name:
        raise DomainFMError("these weights do not say which architecture they belong to", path=path,
                            fix="pass the architecture to --backbone and the file to --weights")
    return cfg.replace(backbone=name, weights=spec)


# ---------------------------------------------------------------- one training run, a sweep, the comparison

def train_one(cfg, dm, arm: Arm, lr: float, meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    """Fine-tune a fresh copy of the backbone with ``arm`` at ``lr`` in the active MLflow run;
    returns the metrics and the classifier holding the best validation weights."""
    import lightning as L
    import torch

    from domainfm import tracking
    from domainfm.backbones import create_backbone
    from domainfm.training import build_trainer, early_stopping
    from plugins.sgd_ft.model import Classifier, apply_freezing
    from plugins.sgd_ft.optim import optimizer_state_bytes, per_parameter_state_bytes
    from plugins.sgd_ft.task import FineTuneTask, KeepBest

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = create_backbone(cfg, in_chans=dm.in_chans)
    model = Classifier(backbone, dm.num_outputs)
    frozen = apply_freezing(model, freeze_embed=arm.freeze_embed, freeze_pos_embed=bool(cfg.freeze_pos_embed))
    task = FineTuneTask(model, task=dm.task, optimizer=arm.optimizer, lr=lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)
    monitor = f"val/{task.metric_name}"
    keep = KeepBest(monitor)
    callbacks: list[Any] = [keep]
    if cfg.patience and cfg.patience > 0:
        # checked after validations only: a run shorter than one epoch has none to check
        callbacks.append(early_stopping(monitor, mode="max", patience=cfg.patience))
    overrides: dict[str, Any] = {}
    if cfg.val_every:
        # counted in training steps across epoch boundaries (Lightning needs the epoch check off)
        overrides.update(val_check_interval=cfg.val_every, check_val_every_n_epoch=None)
    run_id = tracking.active_run_id()
    ckpt_dir = Path(cfg.output_dir) / cfg.experiment_name / run_id / "checkpoints"
    trainer = build_trainer(cfg, callbacks=callbacks, ckpt_dir=ckpt_dir,
                            logger=tracking.lightning_logger(cfg.experiment_name, run_id), **overrides)
    cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
    import warnings

    with warnings.catch_warnings():
        # the frozen stem's BatchNorm is in eval mode on purpose (see model.Classifier.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        trainer.fit(task, datamodule=dm)
    if keep.validated_step != trainer.global_step:
        # training ended between validations (--max-steps inside an epoch, or not a multiple of
        # --val-every): the final weights are validated too, so a run always ends with its metrics
        trainer.validate(task, datamodule=dm, verbose=False)
    peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) if cuda else meter.cpu_peak(backbone.name, arm)
    optimizer = trainer.optimizers[0]
    keep.restore(model)
    trainer.test(task, datamodule=dm, verbose=False)
    metric = task.metric_name
    metrics: dict[str, Any] = {
        metric: task.last_metrics[f"test/{metric}"],
        f"val_{metric}": keep.best,
        "best_step": keep.best_step,
        "lr": lr,
        "frozen_params": frozen.frozen_params,
        "trainable_params": frozen.trainable_params,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "optimizer_state_bytes_per_param": per_parameter_state_bytes(optimizer),
        "peak_memory_bytes": peak,
        "steps": trainer.global_step,
    }
    tracking.set_tags({"sgd_ft.arm": arm.name, "sgd_ft.evaluated_on": "test" if dm.has_test else "val",
                     "sgd_ft.frozen": ",".join(frozen.names)[:5000]})
    tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})
    return metrics, model


def sweep(cfg, dm, arm: Arm, lrs: list[float], meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    """One nested MLflow run per learning rate; the best on validation wins."""

    from domainfm import tracking

    best: tuple[dict[str, Any], Any] | None = None
    metric_key = None
    for lr in lrs:
        with tracking.start_run(cfg, nested=True, run_name=f"{arm.name} lr={lr:g}") as run:
            tracking.log_params({"lr": lr, "optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed})
            metrics, model = train_one(cfg, dm, arm, lr, meter)
            metrics["mlflow_child_run_id"] = run.info.run_id
        metric_key = next(k for k in metrics if k.startswith("val_"))
        if best is None or metrics[metric_key] > best[0][metric_key]:
            best = (metrics, model)  # the losers' models are dropped: only one is kept in memory
    metrics, model = best
    result = {**metrics, "best_lr": metrics["lr"],
              "sweep": ",".join(f"{lr:g}" for lr in lrs)}
    return result, model


def run_arm(cfg, dm, arm: Arm, lrs: list[float], meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    return sweep(cfg, dm, arm, lrs, meter) if lrs else train_one(cfg, dm, arm, cfg.lr, meter)


def compare(cfg, dm, lrs: list[float], meter: MemoryMeter) -> tuple[dict[str, Any], Any]:

    from domainfm import tracking
    from plugins.sgd_ft.reports import compare_figure, compare_rows, print_table, rows_to_markdown, summarise_compare

    results = []
    models = {}
    for arm in COMPARE_ARMS:
        with tracking.start_run(cfg, nested=True, run_name=arm.name) as run:
            tracking.log_params({"optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed})
            metrics, model = run_arm(cfg, dm, arm, lrs, meter)
            metrics["mlflow_arm_run_id"] = run.info.run_id
        results.append((arm, metrics))
        models[arm.name] = model
    metric = "mAP" if dm.task == "multilabel" else "accuracy"
    rows = compare_rows(results, metric)
    out, winner = summarise_compare(results, metric)
    print_table(rows, winner=winner.name, selected_by=out["winner_selected_by"])
    tracking.log_table_artifact(rows, "tables/compare.csv")
    tracking.log_text(rows_to_markdown(rows), "tables/compare.md")
    tracking.log_figure(compare_figure(rows), "plots/compare.png")
    tracking.set_tags({"sgd_ft.winner": winner.name})
    return out, models[winner.name]
