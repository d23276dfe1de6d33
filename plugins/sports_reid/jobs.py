"""The two jobs of the plugin, run inside the MLflow run the core opened (``jobs.run_plugin_job``):

- ``finetune``: zero-shot score of the starting backbone on ``reid_test``, contrastive
  fine-tuning, export + MLflow model (+ registration), then the fine-tuned score on ``reid_test``.
- ``evaluate``: the score of ``--model`` (and of its starting weights, the zero-shot baseline) on
  the test split, or the submission CSV of the challenge split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from domainfm import tracking
from domainfm.backbones import create_backbone, read_metadata
from domainfm.errors import DomainFMError
from domainfm.inference import resolve_device
from domainfm.jobs import export_and_register, read_resume_pointer, write_resume_pointer
from domainfm.distributed import is_global_zero
from domainfm.training import build_trainer
from plugins.sports_reid.datamodule import ReIDPairDataModule
from plugins.sports_reid.inputs import data_root, has_test_split
from plugins.sports_reid.model import load_reid_model, model_metadata
from plugins.sports_reid.retrieval import (EvalSettings, RetrievalResult, plot_retrieval_grid, run_retrieval, summary,
                                           write_submission)
from plugins.sports_reid.task import ReIDContrastiveTask, initial_logit_scale

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig

START_META = "reid_start_weights"  # what fine-tuning started from: the zero-shot baseline of evaluate
RUN_POINTER = "finetune_run.json"


def eval_settings(cfg: "RunConfig") -> EvalSettings:
    return EvalSettings(distance=cfg.distance, flip_tta=cfg.flip_tta, rerank=cfg.rerank,
                        batch_size=max(1, 2 * cfg.batch_size), num_workers=cfg.num_workers,
                        precision=cfg.precision, device=resolve_device(cfg.accelerator).type,
                        same_camera_rule=bool(cfg.options.get("same_camera_rule", True)))


def _log_result(result: RetrievalResult, tag: str, *, grid: bool) -> None:
    if grid:
        tracking.log_figure(plot_retrieval_grid(result), f"plots/retrieval_grid_{tag}.png")
    rows = [{"query": result.query.records[i].item_id, "player": result.query.records[i].pid,
             "top1": result.gallery.records[int(result.distmat[i].argmin())].item_id}
            for i in range(len(result.query))]
    tracking.log_table_artifact(rows, f"tables/top1_{tag}.csv")


def _score(backbone, root: Path, settings: EvalSettings, *, prefix: str, tag: str, img_size: int,
           grid: bool = True, normalization=None) -> dict[str, float]:
    """Test-split metrics of ``backbone`` (keys prefixed), its top-1 table and, with ``grid``, its
    retrieval grid logged to the active MLflow run. ``normalization``: (mean, std), default the
    backbone architecture's."""
    mean, std = normalization or backbone.normalization
    result = run_retrieval(backbone, root, "test", settings, img_size=img_size, mean=mean, std=std,
                           label=f"{tag} ")
    _log_result(result, tag, grid=grid)
    out = summary(result.metrics, prefix)
    out[f"{prefix}skipped_queries"] = result.metrics["num_skipped"]
    return out


# ---------------------------------------------------------------- finetune

def _resume_checkpoint(cfg: "RunConfig", run_dir: Path) -> Path | None:
    return read_resume_pointer(run_dir / RUN_POINTER, what="sports-reid fine-tuning here")[1] if cfg.resume else None


def run_finetune(cfg: "RunConfig") -> dict[str, Any] | None:
    """Inside the run the core opened; the plugin's check has vetted the folders and flags."""
    root = data_root(cfg)
    has_test = has_test_split(root)
    settings = eval_settings(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = create_backbone(cfg, in_chans=3)
    mean, std = backbone.normalization
    run_dir = Path(cfg.output_dir) / cfg.experiment_name
    ckpt_path = _resume_checkpoint(cfg, run_dir)
    zero = is_global_zero()

    metrics: dict[str, Any] = {}
    if has_test and zero and ckpt_path is None:
        # the baseline's numbers; its grid would only show chance-level rankings
        metrics.update(_score(backbone, root, settings, prefix="zero_shot_", tag="zero_shot",
                              img_size=cfg.img_size, grid=False))
        tracking.log_metrics({k: v for k, v in metrics.items()})

    task = ReIDContrastiveTask(backbone, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                               layer_decay=cfg.layer_decay, logit_scale=initial_logit_scale(cfg.weights),
                               label_smoothing=cfg.label_smoothing)
    datamodule = ReIDPairDataModule(root, img_size=cfg.img_size, batch_size=cfg.batch_size, mean=mean, std=std,
                                    num_workers=cfg.num_workers, seed=cfg.seed)
    run_id = tracking.active_run_id() or "local"
    ckpt_dir = run_dir / run_id / "checkpoints"
    if zero:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_resume_pointer(run_dir / RUN_POINTER, run_id, ckpt_dir)
    # the pair sampler shards batches across processes itself
    trainer = build_trainer(cfg, ckpt_dir=ckpt_dir, logger=tracking.lightning_logger(cfg.experiment_name) if zero else False,
                            use_distributed_sampler=False)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    elapsed = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return None

    start = cfg.weights or cfg.init
    tracking.set_tags({START_META: start})
    # self-describing: input size, normalisation, channels, embedding size, backbone and plugin,
    # in the export and in the MLflow model's copy (what models:/NAME@ALIAS loads)
    described = {**model_metadata(backbone, mean, std), START_META: start, **task.state_for_export()}
    extra = dict(described)
    if run_id != "local":
        extra["mlflow_run_id"] = run_id
    exported = export_and_register(backbone, run_dir / run_id / "backbone.safetensors", meta=extra,
                                   model_meta=described, register=cfg.register, alias=cfg.alias)
    train_log = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    metrics.update({"train_loss": train_log.get("train/loss"), "train_pair_acc": train_log.get("train/pair_acc"),
                    "logit_scale": float(task.logit_scale.detach()), "global_step": int(trainer.global_step),
                    "train_seconds": elapsed, "backbone_path": str(exported.path.resolve()),
                    "model_uri": exported.model_uri})
    if exported.registered_model:
        metrics["registered_model"] = exported.registered_model
    if has_test:
        metrics.update(_score(backbone, root, settings, prefix="", tag="finetuned", img_size=cfg.img_size))
    # the same keys whatever happened: no test split, or a resumed run (its starting weights are
    # not the ones this run started from) report null rather than leaving the key out
    for key in ("mAP", "rank1", "rank5", "mINP", "zero_shot_mAP"):
        metrics.setdefault(key, None)
    return metrics


# ---------------------------------------------------------------- evaluate

def _model_meta(spec: str) -> dict[str, str]:
    """The safetensors metadata of a local export (empty for models:/ URIs and other files)."""
    return read_metadata(spec)


def start_weights(spec: str) -> str | None:
    """What the model's fine-tuning started from: the export's metadata, or for a registered
    ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` the tag of the run that logged it."""
    meta = _model_meta(spec)
    if START_META in meta:
        return meta[START_META]
    if not spec.startswith("models:/"):
        return None
    return tracking.model_run_tag(spec, START_META)


def _zero_shot_backbone(cfg: "RunConfig", name: str, img_size: int):
    """The baseline of --zero-shot: the model's starting weights (auto), timm's pretrained
    weights for its architecture, a random init (seeded: the one fine-tuning with this --seed
    started from), a weights file, or nothing."""
    choice = cfg.zero_shot
    if choice == "none":
        return None
    if choice == "auto":
        choice = start_weights(cfg.model) or "pretrained"
    if choice == "random":
        torch.manual_seed(cfg.seed)
    try:
        return create_backbone(name, in_chans=3, img_size=img_size, init=choice)
    except DomainFMError as e:
        raise DomainFMError(f"cannot build the zero-shot baseline ({e})",
                            fix="pass --zero-shot random, --zero-shot none or --zero-shot PATH") from None


def run_evaluate(cfg: "RunConfig") -> dict[str, Any]:
    """Inside the run the core opened; the plugin's check has vetted the folders and flags."""
    root = data_root(cfg)
    split = cfg.split
    settings = eval_settings(cfg)
    torch.manual_seed(cfg.seed)
    backbone, spec = load_reid_model(cfg.model, cfg=cfg)  # with the input size and normalisation it records
    tome_r = int(getattr(cfg, "tome_r", 0) or 0)
    if tome_r:
        from domainfm.inference import apply_token_merging

        apply_token_merging(backbone, tome_r)
    img_size, mean, std = spec.img_size, spec.mean, spec.std
    tracking.set_tags({"domainfm.model": cfg.model, "domainfm.split": split})
    if split == "challenge":
        result = run_retrieval(backbone, root, "challenge", settings, img_size=img_size, mean=mean, std=std)
        path = write_submission(cfg.submission, result.distmat, result.query.records, result.gallery.records)
        tracking.log_artifact(path, "submission")
        tracking.log_figure(plot_retrieval_grid(result), "plots/retrieval_grid_challenge.png")
        return {"submission": str(path.resolve()), "num_queries": len(result.query),
                "num_gallery": len(result.gallery)}

    metrics = _score(backbone, root, settings, prefix="", tag="model", img_size=img_size, normalization=(mean, std))
    zero_shot = _zero_shot_backbone(cfg, backbone.name, img_size)
    if zero_shot is not None:
        if tome_r:
            apply_token_merging(zero_shot, tome_r)
        metrics.update(_score(zero_shot, root, settings, prefix="zero_shot_", tag="zero_shot", img_size=img_size,
                              grid=False))
    else:
        metrics["zero_shot_mAP"] = None
    return metrics
