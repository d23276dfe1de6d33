"""The jobs the ``domainfm`` commands run, read top-down.

``domainfm pretrain --plugin NAME`` goes ``cli._run`` → :func:`run_pretraining`: data from the
plugin, the backbone from ``backbones``, the LightningModule from ``tasks.pretrain``, the Trainer
from ``training``, one MLflow run from ``tracking``, checkpoints with a resume pointer, and at the
end :func:`export_and_register` (safetensors file → MLflow artifact → MLflow model → registry).
``domainfm finetune|evaluate --plugin NAME`` goes ``cli._run`` → :func:`run_plugin_job`, which opens
the MLflow run, logs the config and calls the plugin's ``finetune``/``evaluate`` inside it.

Pieces the plugins' own jobs use too: :func:`write_resume_pointer` / :func:`read_resume_pointer`
(the one resume pointer), :func:`export_and_register` and :func:`log_backbone`.
Heavy imports (torch, lightning) stay inside the functions: the CLI imports this module lazily.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from domainfm import tracking
from domainfm.distributed import handed_off, handoff_to_workers, is_global_zero
from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig

#: The resume pointer of ``domainfm pretrain`` under :func:`run_dir`.
RUN_POINTER = "run.json"


# ---------------------------------------------------------------- domainfm pretrain

def run_pretraining(cfg: "RunConfig", plugin) -> dict[str, Any] | None:
    """``domainfm pretrain``: continual pretraining of ``cfg.backbone`` on ``plugin``'s data
    (:class:`~domainfm.tasks.pretrain.ContinualPretrainingTask`), in one MLflow run that holds the
    config, the loss curves, the checkpoints' pointer and the exported EMA teacher.

    Returns the final metrics (losses, ``global_step``, ``train_seconds``, ``backbone_path``,
    ``model_uri``, ``mlflow_run_id``, with ``--register`` ``registered_model``) on global rank 0,
    None on the other ranks. Raises DomainFMError for bands that do not match the data, an image
    with nothing to mask, or ``--resume`` with nothing to resume."""
    import lightning as L

    from domainfm.backbones import create_backbone
    from domainfm.monitor import monitor_callback
    from domainfm.tasks.pretrain import FSDP_UNITS, ContinualPretrainingTask, exportable_teacher
    from domainfm.training import build_trainer

    # 1. the data and the model
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    in_chans = cfg.in_chans or plugin.in_chans(cfg)
    if cfg.in_chans and cfg.in_chans != plugin.in_chans(cfg):
        raise DomainFMError(f"--in-chans {cfg.in_chans} does not match the data ({plugin.in_chans(cfg)} bands)",
                            fix=f"drop --in-chans or set it to {plugin.in_chans(cfg)}")
    cfg = cfg.replace(in_chans=in_chans)  # the record shows the bands actually used
    from domainfm.backbones import check_run_backbone

    check_run_backbone(cfg)  # a mistyped --backbone or --img-size stops before data statistics are computed
    datamodule = plugin.pretrain_datamodule(cfg)
    backbone = create_backbone(cfg, in_chans=in_chans)
    if cfg.mask_ratio > 0 and backbone.is_vit and backbone.num_patches < 2:
        raise DomainFMError(f"--img-size {cfg.img_size} gives a single patch: nothing to mask",
                            fix="use a larger --img-size or --mask-ratio 0")
    task = ContinualPretrainingTask(cfg.to_dict(), in_chans, backbone=backbone)
    # the health monitor takes its held-out split out of the datamodule before training sees it
    monitor = monitor_callback(cfg, plugin, datamodule)
    callbacks = [monitor] if monitor is not None else []

    # 2. where it continues from: --resume, or the run rank 0 handed to this worker
    run_id, handed_ckpt_dir = handed_off()
    ckpt_path = None
    if cfg.resume:
        run_id, ckpt_path = read_resume_pointer(run_dir(cfg) / RUN_POINTER)
    fit_args = {"datamodule": datamodule, "ckpt_path": str(ckpt_path) if ckpt_path else None}

    # 3a. a worker process of a multi-process run trains and leaves the record to rank 0
    if not is_global_zero():
        ckpt_dir = handed_ckpt_dir or run_dir(cfg) / "checkpoints"
        trainer = build_trainer(cfg, callbacks=callbacks, ckpt_dir=ckpt_dir, logger=False, fsdp_wrap=FSDP_UNITS)
        trainer.fit(task, **fit_args)
        return None

    # 3b. rank 0: one MLflow run around training and export
    with tracking.start_run(cfg, run_id=run_id) as run:
        run_id = run.info.run_id
        tracking.set_tags({"domainfm.command": "pretrain", "domainfm.plugin": cfg.plugin,
                           "domainfm.backbone": backbone.name, **data_tags(cfg, plugin)})
        tracking.log_config(cfg)
        ckpt_dir = run_dir(cfg) / run_id / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_resume_pointer(run_dir(cfg) / RUN_POINTER, run_id, ckpt_dir)
        with handoff_to_workers(run_id, ckpt_dir):
            trainer = build_trainer(cfg, callbacks=callbacks, ckpt_dir=ckpt_dir, fsdp_wrap=FSDP_UNITS,
                                    logger=tracking.lightning_logger(cfg.experiment_name, run_id))
            t0 = time.perf_counter()
            trainer.fit(task, **fit_args)
            elapsed = time.perf_counter() - t0
        if not trainer.is_global_zero:  # pragma: no cover - guarded above
            return None

        # 4. the EMA teacher is the encoder we ship (DINO/SoftCon practice), with the bands and
        # statistics of the data it was trained on
        final = exportable_teacher(task, cfg)
        input_meta = plugin.export_metadata(cfg, datamodule)
        exported = export_and_register(final, run_dir(cfg) / run_id / "backbone.safetensors",
                                       meta={"mlflow_run_id": run_id, "plugin": str(cfg.plugin), **input_meta},
                                       model_meta={"plugin": str(cfg.plugin), **input_meta}, register=cfg.register, alias=cfg.alias)

        # 5. what the run reports
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss/")}
        metrics.update({"global_step": int(trainer.global_step), "train_seconds": elapsed,
                        "backbone_path": str(exported.path.resolve()), "model_uri": exported.model_uri,
                        "mlflow_run_id": run_id})
        if exported.registered_model:
            metrics["registered_model"] = exported.registered_model
        if monitor is not None and monitor.history:  # the representation's health at the end
            metrics.update({f"monitor/{k}": v for k, v in monitor.history[-1][1].items()})
            metrics["monitor_collapsed_at_step"] = monitor.collapsed_at
        tracking.log_metrics({"train_seconds": elapsed})
        tracking.log_loss_curves(run_id, ("loss/hard", "loss/soft", "loss/total"), "plots/loss_curves.png")
        if monitor is not None and monitor.history:  # the health monitor's curves, step 0 first
            tracking.log_metric_panels(run_id, tuple(f"monitor/{k}" for k in monitor.history[0][1]),
                                       "plots/monitor.png")
    return metrics


# ---------------------------------------------------------------- domainfm finetune | evaluate

def run_plugin_job(cfg: "RunConfig", plugin, fn: Callable[["RunConfig"], dict[str, Any]]) -> dict[str, Any] | None:
    """Run a plugin's ``finetune``/``evaluate`` (``fn``) inside one MLflow run that records its
    config (tags ``domainfm.command``, ``domainfm.plugin``, ``domainfm.data_root``,
    ``domainfm.data_fingerprint``) and the metrics ``fn`` returns. An ``evaluate`` of a registered
    model (``cfg.model`` a models:/ URI) is tagged ``domainfm.model_uri`` / ``domainfm.model_version``
    and writes its scalar metrics as ``metric.<name>`` tags of that version (plus ``metric.run_id``).
    Returns those metrics plus ``mlflow_run_id``; None on a worker process, which runs ``fn`` outside
    any MLflow run (rank 0 owns the run and the ``--json`` file)."""
    if not is_global_zero():
        # a worker that Lightning's DDP launcher started by re-running the command
        fn(cfg)
        return None
    from domainfm.predict import METRIC_TAG_PREFIX, MODEL_URI_TAG, MODEL_VERSION_TAG

    scored = None  # the registered version an evaluation scores
    if cfg.command == "evaluate" and str(getattr(cfg, "model", None) or "").startswith("models:/"):
        scored = tracking.model_version(cfg.model)
    with tracking.start_run(cfg) as run:
        tags = {"domainfm.command": cfg.command, "domainfm.plugin": cfg.plugin, **data_tags(cfg, plugin)}
        if scored is not None:
            tags.update({MODEL_URI_TAG: cfg.model, MODEL_VERSION_TAG: f"{scored.name}/{scored.version}"})
        tracking.set_tags(tags)
        tracking.log_config(cfg)
        if scored is not None:  # the plugin loads the version the alias named above, not the alias again
            import copy

            cfg = copy.copy(cfg)
            cfg.model = f"models:/{scored.name}/{scored.version}"
        metrics = dict(fn(cfg) or {})
        tracking.log_metrics(metrics)
        metrics["mlflow_run_id"] = run.info.run_id
        if scored is not None:  # the version's latest scores, read by `domainfm registry list`
            tracking.set_version_metrics(scored.name, scored.version, metrics, run.info.run_id,
                                         prefix=METRIC_TAG_PREFIX)
    return metrics


# ---------------------------------------------------------------- domainfm predict

def run_prediction(model, inputs: list[str], out: str | Path, plugin, options: dict[str, Any], *,
                   experiment: str = "domainfm-predict", run_name: str | None = None) -> dict[str, Any]:
    """``domainfm predict``: apply ``model`` (a :class:`domainfm.predict.ModelRef`) to ``inputs``
    with its own ``plugin``'s ``predict``, inside one MLflow run tagged with the model (tags
    ``domainfm.model_uri``, ``domainfm.model_version`` = ``NAME/VERSION`` for a registered one,
    ``domainfm.command`` = predict, ``domainfm.plugin``). Writes under ``out``; returns the
    plugin's summary plus ``mlflow_run_id``."""
    from domainfm.predict import MODEL_URI_TAG, MODEL_VERSION_TAG

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    what = model.uri[len("models:/"):] if model.uri.startswith("models:/") else Path(model.uri).stem
    run_id = None
    try:
        with tracking.start_run(experiment=experiment, run_name=run_name or f"predict-{model.plugin}-{what}"[:250]) as run:
            run_id = run.info.run_id
            tags = {"domainfm.command": "predict", "domainfm.plugin": model.plugin, MODEL_URI_TAG: model.uri}
            if model.version_label:
                tags[MODEL_VERSION_TAG] = model.version_label
            tracking.set_tags(tags)
            tracking.log_params({"model": model.uri, "inputs": len(inputs), "out": str(out),
                                 **{k: v for k, v in options.items() if v is not None}})
            summary = dict(plugin.predict(model, list(inputs), out, options) or {})
            tracking.log_metrics(summary)
            summary["mlflow_run_id"] = run.info.run_id
    except DomainFMError:
        # an input mistake (a missing gallery, a file that is not an image...) leaves nothing behind:
        # no FAILED run in the store, no empty --out folder
        if run_id is not None:
            tracking.discard_run(run_id)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return summary


# ---------------------------------------------------------------- the resume pointer

def run_dir(cfg: "RunConfig") -> Path:
    """``<--out>/<experiment>``: where a command's runs keep their checkpoints and exports."""
    return Path(cfg.output_dir) / cfg.experiment_name


def write_resume_pointer(pointer: str | Path, run_id: str, checkpoint_dir: str | Path) -> None:
    """Record, atomically, which MLflow run and checkpoint folder ``--resume`` continues: a JSON
    file ``{"mlflow_run_id": ..., "checkpoint_dir": <absolute path>}`` (a crash never leaves a
    half-written pointer)."""
    pointer = Path(pointer)
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(json.dumps({"mlflow_run_id": run_id, "checkpoint_dir": str(Path(checkpoint_dir).resolve())}))
    os.replace(tmp, pointer)


def read_resume_pointer(pointer: str | Path, *, what: str = "run of this experiment") -> tuple[str, Path]:
    """``(mlflow_run_id, last checkpoint)`` that ``--resume`` continues, from the pointer file
    :func:`write_resume_pointer` wrote. DomainFMError "nothing to resume: no earlier <what>" when
    there is no pointer, "the earlier run saved no checkpoint yet" when its folder holds none."""
    from domainfm.training import last_checkpoint

    pointer = Path(pointer)
    if not pointer.is_file():
        raise DomainFMError(f"nothing to resume: no earlier {what}", path=pointer,
                            fix="drop --resume, or use the same --out and --experiment as the run to continue")
    info = json.loads(pointer.read_text())
    ckpt = last_checkpoint(info["checkpoint_dir"])
    if ckpt is None:
        raise DomainFMError("the earlier run saved no checkpoint yet", path=info["checkpoint_dir"],
                            fix="drop --resume (or lower --checkpoint-every)")
    return info["mlflow_run_id"], ckpt


# ---------------------------------------------------------------- train → save → log → register

@dataclass(frozen=True)
class Exported:
    """What :func:`export_and_register` produced: the weights file, the MLflow model URI (None when
    no model was logged) and ``models:/NAME@ALIAS`` when it was registered."""

    path: Path
    model_uri: str | None
    registered_model: str | None


def export_and_register(backbone, path: str | Path, *, meta: dict[str, str] | None = None,
                        save: Callable[[Path], Path] | None = None, artifact_dir: str = "export",
                        model_meta: dict[str, str] | None = None, log_model: bool = True,
                        register: str | None = None, alias: str | None = None,
                        plugin: str | None = None) -> Exported:
    """The tail of every training job, in the active MLflow run:

    1. save the weights to ``path``: :func:`~domainfm.backbones.save_backbone` of ``backbone`` with
       the safetensors metadata ``meta``, or ``save(path) -> path`` for another format (a
       classifier with its head);
    2. log that file as an artifact under ``artifact_dir``;
    3. with ``log_model`` (or ``register``), log ``backbone`` as an MLflow model
       (:func:`log_backbone`, its export carrying ``model_meta``; any input size);
    4. with ``register``, register that model, point ``alias`` at the new version and tag the
       version with the story of the run (:func:`version_tags`: ``domainfm.plugin`` (``plugin``,
       else the active run's tag), ``domainfm.training_run``, ``domainfm.data_root``,
       ``domainfm.data_fingerprint``).
    """
    path = Path(path)
    path = save(path) if save is not None else _save_backbone(backbone, path, meta)
    tracking.log_artifact(path, artifact_dir)
    model_uri = None
    if log_model or register:
        model_uri = log_backbone(backbone, register=register, alias=alias if register else None,
                                 extra_meta=model_meta, plugin=plugin)
    return Exported(path=path, model_uri=model_uri,
                    registered_model=f"models:/{register}@{alias}" if register else None)


def version_tags(plugin: str | None = None) -> dict[str, str]:
    """The tags a model version registered from the active run gets: ``domainfm.plugin``,
    ``domainfm.training_run`` (the run id), ``domainfm.data_root`` and ``domainfm.data_fingerprint``
    (copied from the run's tags, which :func:`run_pretraining` / :func:`run_plugin_job` set)."""
    from domainfm.predict import DATA_FINGERPRINT_TAG, DATA_ROOT_TAG, PLUGIN_TAG, TRAINING_RUN_TAG

    run_id = tracking.active_run_id()
    run = tracking.run_tags(run_id) if run_id else {}
    tags = {PLUGIN_TAG: plugin or run.get(PLUGIN_TAG), TRAINING_RUN_TAG: run_id,
            DATA_ROOT_TAG: run.get(DATA_ROOT_TAG), DATA_FINGERPRINT_TAG: run.get(DATA_FINGERPRINT_TAG)}
    return {k: str(v) for k, v in tags.items() if v}


def data_tags(cfg: "RunConfig", plugin) -> dict[str, str]:
    """``domainfm.data_root`` and ``domainfm.data_fingerprint`` of a run's data: ``--data`` and
    :func:`domainfm.data.data_fingerprint` of it, else ``<plugin>:sample`` (the plugin's embedded
    sample) and the plugin's ``sample_id`` when it has one (else its name and version)."""
    from domainfm.data import data_fingerprint
    from domainfm.predict import DATA_FINGERPRINT_TAG, DATA_ROOT_TAG

    data = getattr(cfg, "data", None)
    if data and Path(data).exists():
        return {DATA_ROOT_TAG: str(Path(data).resolve()), DATA_FINGERPRINT_TAG: data_fingerprint(data)}
    if data:  # a remote or plugin-specific name: recorded as given
        return {DATA_ROOT_TAG: str(data)}
    from domainfm import __version__

    sample = getattr(plugin, "sample_id", None) or f"{getattr(plugin, 'name', cfg.plugin)}-sample@domainfm-{__version__}"
    return {DATA_ROOT_TAG: f"{cfg.plugin}:sample", DATA_FINGERPRINT_TAG: str(sample)}


def _save_backbone(backbone, path: Path, meta: dict[str, str] | None) -> Path:
    from domainfm.backbones import save_backbone

    return save_backbone(backbone, path, extra_meta=meta)


def log_backbone(backbone, *, artifact_path: str = "backbone", register: str | None = None,
                 alias: str | None = None, extra_meta: dict[str, str] | None = None,
                 plugin: str | None = None) -> str:
    """Log the backbone as an MLflow model that takes ANY spatial size and return its URI (registered
    as ``register`` with ``alias`` when given, the version tagged with :func:`version_tags`).

    Both kinds are models-from-code pyfuncs over the safetensors export (no pickle): an export that
    records its bands and statistics (``extra_meta`` from the plugin) takes raw pixels by band name
    (``domainfm/raw_pixels_model.py``); any other takes a normalised float32 ``[N, C, H, W]`` batch
    (``domainfm/backbone_model.py``). Both RESIZE the input to the backbone's input size
    (``backbone.img_size``; bilinear) and return ``[N, D]``. The MLmodel
    metadata records ``domainfm.plugin`` (``plugin``, else the active run's tag) and
    ``domainfm.input`` (architecture, bands, mean/std, GSD, in_chans, input size)."""
    from domainfm.backbones import InputSpec, read_metadata, save_backbone

    size = int(backbone.img_size)
    tags = version_tags(plugin) if register else {}
    plugin = plugin or tags.get("domainfm.plugin") or (
        tracking.run_tags(tracking.active_run_id()).get("domainfm.plugin") if tracking.active_run_id() else None)
    with tempfile.TemporaryDirectory() as tmp:
        st = save_backbone(backbone, Path(tmp) / "backbone.safetensors", extra_meta=extra_meta)
        spec = InputSpec.from_meta(read_metadata(st))
        raw = spec is not None and spec.has_stats and spec.bands and len(spec.bands) == backbone.in_chans
        described = {"architecture": backbone.name, "in_chans": int(backbone.in_chans), "size": size,
                     "embed_dim": int(backbone.embed_dim),
                     "takes": "raw pixels by band name" if raw else "normalised float32 [N, C, H, W]",
                     "resize": f"bilinear to {size} x {size} inside the model"}
        if spec is not None:
            described.update({k: list(v) if isinstance(v, tuple) else v for k, v in
                              (("bands", spec.bands), ("mean", spec.mean), ("std", spec.std), ("gsd_m", spec.gsd_m),
                               ("modality", spec.modality), ("units", spec.units)) if v is not None})
        metadata = {"domainfm.input": described, **({"domainfm.plugin": plugin} if plugin else {})}
        common = dict(metadata=metadata, artifact_path=artifact_path, register=register, alias=alias,
                      version_tags=tags)
        if raw:
            return tracking.log_raw_pixels_model(Path(__file__).with_name("raw_pixels_model.py"), st,
                                                 list(spec.bands), embed_dim=backbone.embed_dim, **common)
        return tracking.log_backbone_model(Path(__file__).with_name("backbone_model.py"), st, backbone.in_chans,
                                           backbone.embed_dim, **common)
