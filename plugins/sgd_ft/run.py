"""``domainfm finetune --plugin sgd-ft``: one run, a learning-rate sweep, or the three-arm comparison.

Called by the core inside an active MLflow run. A sweep opens one nested run per learning rate and
keeps the best on validation (the paper tunes the learning rate of every optimizer this way); the
comparison opens one nested run per arm (SGD with frozen embedding, plain SGD, AdamW), each with
its own sweep when ``--lr-sweep`` is given, and writes the table of the three.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainfm.errors import DomainFMError


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str
    freeze_embed: bool


COMPARE_ARMS = (Arm("sgd-frozen-embed", "sgd", True), Arm("sgd", "sgd", False), Arm("adamw", "adamw", False))
TABLE_COLUMNS = ("arm", "optimizer", "freeze_embed", "lr", "metric", "value", "trainable_params", "frozen_params",
                 "optimizer_state_bytes", "peak_memory_bytes")


def arm_of(cfg) -> Arm:
    name = cfg.optimizer + ("-frozen-embed" if cfg.freeze_embed else "")
    return Arm(name, cfg.optimizer, bool(cfg.freeze_embed))


def parse_lr_sweep(text: str | None) -> list[float]:
    """``"1e-4,3e-4,1e-3"`` -> [1e-4, 3e-4, 1e-3] (order kept, duplicates dropped)."""
    if not text:
        return []
    out: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lr = float(part)
        except ValueError:
            raise DomainFMError(f"--lr-sweep has {part!r}, which is not a number",
                                fix="give comma-separated learning rates, e.g. --lr-sweep 1e-4,3e-4,1e-3") from None
        if not lr > 0:
            raise DomainFMError(f"--lr-sweep has {part!r}; learning rates must be positive",
                                fix="give comma-separated positive learning rates")
        if lr not in out:
            out.append(lr)
    return out


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
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                name = (f.metadata() or {}).get("domainfm_name")
        except Exception:
            name = None
    if not name:
        raise DomainFMError("these weights do not say which architecture they belong to", path=path,
                            fix="pass the architecture to --backbone and the file to --weights")
    return cfg.replace(backbone=name, weights=spec)


# ---------------------------------------------------------------- data

def _rgb_stats(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone normalises RGB input with (the core's one answer)."""
    from domainfm.backbones import normalization_for_config

    return normalization_for_config(cfg)


def build_datamodule(cfg):
    from plugins.sgd_ft.datamodule import MULTILABEL, EOSARMultilabelDataModule, ImageFolderDataModule

    if cfg.task == MULTILABEL:
        root = cfg.data
        if root is None:
            from plugins.eo_sar.sample import ensure_sample

            root = ensure_sample()
        return EOSARMultilabelDataModule(root, modality=cfg.modality, label_threshold=cfg.label_threshold,
                                         img_size=cfg.img_size, batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, in_chans=cfg.in_chans, seed=cfg.seed,
                                         layout=getattr(cfg, "layout", "auto") if cfg.data else "domainfm")
    if cfg.data is None:
        raise DomainFMError("sgd-ft needs --data ROOT with train/<class>/ and val/<class>/ image folders",
                            fix="pass --data, or --task multilabel for the eo-sar sample")
    mean, std = _rgb_stats(cfg)
    return ImageFolderDataModule(cfg.data, img_size=cfg.img_size, batch_size=cfg.batch_size,
                                 num_workers=cfg.num_workers, in_chans=cfg.in_chans, rgb_mean=mean, rgb_std=std)


# ---------------------------------------------------------------- memory

class MemoryMeter:
    """Peak memory of a training step per (architecture, arm) on CPU, measured once and
    remembered, so a sweep does not repeat it for every learning rate. The first request measures
    every arm in ``planned`` at once (separate processes side by side)."""

    def __init__(self, cfg, dm, planned=()) -> None:
        self.cfg = cfg
        self.dm = dm
        self.planned = list(planned)
        self.cache: dict[str, dict[str, Any]] = {}

    def spec(self, backbone_name: str, arm: Arm) -> dict[str, Any]:
        from plugins.sgd_ft.memory import probe_spec

        return probe_spec(backbone=backbone_name, in_chans=self.dm.in_chans, img_size=self.cfg.img_size,
                          batch_size=self.cfg.batch_size, num_outputs=self.dm.num_outputs, task=self.dm.task,
                          optimizer=arm.optimizer, momentum=self.cfg.momentum, freeze_embed=arm.freeze_embed,
                          freeze_pos_embed=bool(self.cfg.freeze_pos_embed), precision=self.cfg.precision)

    def cpu_peak(self, backbone_name: str, arm: Arm) -> int | None:
        if not self.cfg.measure_memory:
            return None
        from plugins.sgd_ft.memory import measure_many

        key = json.dumps(self.spec(backbone_name, arm), sort_keys=True)
        if key not in self.cache:
            specs = [self.spec(backbone_name, a) for a in dict.fromkeys([arm] + self.planned)]
            for s, r in zip(specs, measure_many(specs)):
                self.cache[json.dumps(s, sort_keys=True)] = r
        return int(self.cache[key]["peak_memory_bytes"])


# ---------------------------------------------------------------- one training run

def train_one(cfg, dm, arm: Arm, lr: float, meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    """Fine-tune a fresh copy of the backbone with ``arm`` at ``lr`` in the active MLflow run;
    returns the metrics and the classifier holding the best validation weights."""
    import lightning as L
    import mlflow
    import torch

    from domainfm import tracking
    from domainfm.backbones import backbone_from_config
    from domainfm.training import build_trainer, early_stopping
    from plugins.sgd_ft.model import Classifier, apply_freezing
    from plugins.sgd_ft.optim import optimizer_state_bytes, per_parameter_state_bytes
    from plugins.sgd_ft.task import FineTuneTask, KeepBest

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = backbone_from_config(cfg, in_chans=dm.in_chans)
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
    run_id = mlflow.active_run().info.run_id
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
    mlflow.set_tags({"sgd_ft.arm": arm.name, "sgd_ft.evaluated_on": "test" if dm.has_test else "val",
                     "sgd_ft.frozen": ",".join(frozen.names)[:5000]})
    tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})
    return metrics, model


def sweep(cfg, dm, arm: Arm, lrs: list[float], meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    """One nested MLflow run per learning rate; the best on validation wins."""
    import mlflow

    from domainfm import tracking

    best: tuple[dict[str, Any], Any] | None = None
    metric_key = None
    for lr in lrs:
        with tracking.start_run(cfg, nested=True, run_name=f"{arm.name} lr={lr:g}") as run:
            mlflow.log_params({"lr": lr, "optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed})
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


# ---------------------------------------------------------------- comparison table

def _human_bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def compare_rows(results: list[tuple[Arm, dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    return [{"arm": arm.name, "optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed, "lr": m["lr"],
             "metric": metric, "value": m[metric], "trainable_params": m["trainable_params"],
             "frozen_params": m["frozen_params"], "optimizer_state_bytes": m["optimizer_state_bytes"],
             "peak_memory_bytes": m["peak_memory_bytes"]} for arm, m in results]


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| arm | lr | {} | trainable params | frozen params | optimizer state | peak memory |".format(
        rows[0]["metric"])
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['value']:.4f} | {r['trainable_params']:,} | "
                     f"{r['frozen_params']:,} | {_human_bytes(r['optimizer_state_bytes'])} | "
                     f"{_human_bytes(r['peak_memory_bytes'])} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], *, winner: str | None = None, selected_by: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = f"winner on {selected_by}: {winner} (its numbers and weights are the result)" if winner else None
    table = Table(title="sgd-ft: three arms on the same budget", caption=caption)
    for col in ("arm", "lr", rows[0]["metric"], "trainable params", "frozen params", "optimizer state", "peak memory"):
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=col == "arm")
    for r in rows:
        name = r["arm"] + (" (winner)" if r["arm"] == winner else "")
        table.add_row(name, f"{r['lr']:g}", f"{r['value']:.4f}", f"{r['trainable_params']:,}",
                      f"{r['frozen_params']:,}", _human_bytes(r["optimizer_state_bytes"]),
                      _human_bytes(r["peak_memory_bytes"]))
    Console(stderr=True).print(table)


def compare_figure(rows: list[dict[str, Any]]):
    """Score, optimizer state and peak step memory of each arm, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    names = [r["arm"] for r in rows]
    colours = ["tab:green", "tab:blue", "tab:orange"][:len(rows)]
    panels = ((rows[0]["metric"], [r["value"] for r in rows], 1.0),
              ("optimizer state (MiB)", [r["optimizer_state_bytes"] for r in rows], 2 ** 20),
              ("peak step memory (MiB)", [r["peak_memory_bytes"] for r in rows], 2 ** 20))
    for ax, (title, values, scale) in zip(axes, panels):
        if any(v is None for v in values):
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.bar(names, [v / scale for v in values], color=colours)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def compare(cfg, dm, lrs: list[float], meter: MemoryMeter) -> tuple[dict[str, Any], Any]:
    import mlflow

    from domainfm import tracking

    results = []
    models = {}
    for arm in COMPARE_ARMS:
        with tracking.start_run(cfg, nested=True, run_name=arm.name) as run:
            mlflow.log_params({"optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed})
            metrics, model = run_arm(cfg, dm, arm, lrs, meter)
            metrics["mlflow_arm_run_id"] = run.info.run_id
        results.append((arm, metrics))
        models[arm.name] = model
    metric = "mAP" if dm.task == "multilabel" else "accuracy"
    rows = compare_rows(results, metric)
    out, winner = summarise_compare(results, metric)
    print_table(rows, winner=winner.name, selected_by=out["winner_selected_by"])
    tracking.log_table_artifact(rows, "tables/compare.csv")
    mlflow.log_text(rows_to_markdown(rows), "tables/compare.md")
    tracking.log_figure(compare_figure(rows), "plots/compare.png")
    mlflow.set_tag("sgd_ft.winner", winner.name)
    return out, models[winner.name]


def summarise_compare(results: list[tuple[Arm, dict[str, Any]]], metric: str) -> tuple[dict[str, Any], Arm]:
    """The result of a comparison: the arm that won on validation (``val_<metric>``; the test
    split only reports, it never chooses; a tie goes to the arm listed first), its numbers as the
    top-level keys with ``arm`` naming it, and every arm's numbers as ``<arm>/<key>``. The weights
    saved are the winner's, so every top-level number describes the same model."""
    val_key = f"val_{metric}"
    winner, best = results[0]
    for arm, m in results[1:]:
        if m.get(val_key) is not None and (best.get(val_key) is None or m[val_key] > best[val_key]):
            winner, best = arm, m
    out = dict(best)
    out["arm"] = winner.name
    out["winner_selected_by"] = val_key
    for arm, m in results:
        for k in (metric, val_key, "lr", "trainable_params", "frozen_params", "optimizer_state_bytes",
                  "peak_memory_bytes"):
            if m.get(k) is not None:
                out[f"{arm.name}/{k}"] = m[k]
    return out, winner


# ---------------------------------------------------------------- outputs

def save_classifier(model, path: Path, *, classes: list[str], backbone_name: str, task: str) -> Path:
    """The fine-tuned weights (backbone + head) as safetensors, written under a temporary name
    and renamed so an interrupted save never leaves a half file."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "domainfm_name": backbone_name, "task": task, "classes": json.dumps(classes)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def finetune(cfg) -> dict[str, Any]:
    import mlflow

    from domainfm import tracking
    from domainfm.jobs import export_and_register

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
    from plugins.sgd_ft.inputs import match_backbone_bands

    tracking.set_tags(match_backbone_bands(cfg, dm))  # any change to the backbone's input bands: said and logged
    meter = MemoryMeter(cfg, dm, planned=COMPARE_ARMS if cfg.compare else ())
    if cfg.compare:
        metrics, model = compare(cfg, dm, lrs, meter)
    else:
        metrics, model = run_arm(cfg, dm, arm_of(cfg), lrs, meter)
        metrics["arm"] = arm_of(cfg).name
    run_id = mlflow.active_run().info.run_id
    out = Path(cfg.output_dir) / cfg.experiment_name / run_id / "finetuned.safetensors"
    exported = export_and_register(model.backbone, out, artifact_dir="model", log_model=False,
                                   save=lambda p: save_classifier(model, p, classes=dm.classes,
                                                                  backbone_name=model.backbone.name, task=dm.task),
                                   register=cfg.register, alias=cfg.alias)
    if cfg.register:
        metrics["registered_model_uri"] = exported.model_uri
    metrics["weights"] = str(out)
    # how many samples each split held (a standard layout's official splits, or the seeded 60/20/20)
    metrics.update({f"n_{s}": len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")
                    if getattr(dm, f"{s}_set", None) is not None})
    return metrics
