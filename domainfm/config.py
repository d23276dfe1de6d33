"""One config path for every command: dataclass defaults, then the plugin's defaults, then a
YAML file (``--config``), then the flags given on the command line.

The resolved :class:`RunConfig` is what MLflow logs (as params and as ``config.yaml``), so a run
can always be repeated from its record. Plugin-specific flags (``--modality``, ``--optimizer``...)
live in ``RunConfig.options`` and read as attributes: ``cfg.modality``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainfm.errors import DomainFMError

PRETRAIN, FINETUNE, EVALUATE = "pretrain", "finetune", "evaluate"
_TRAIN = (PRETRAIN, FINETUNE)
_ALL = (PRETRAIN, FINETUNE, EVALUATE)


# --precision and --accelerator: one click.Choice, one help, for every command that takes them
# (pretrain, finetune, evaluate, histo embed, eo-sar embed, predict)
PRECISION_CHOICES = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_HELP = "bf16-mixed autocasts on CPU or GPU; 16-mixed on GPU only."
ACCELERATOR_CHOICES = ("auto", "cpu", "gpu")
ACCELERATOR_HELP = "Where the model runs: auto takes a GPU when there is one, else the CPU."


def _opt(default, help: str, commands=_ALL, **click_kwargs):
    """A config field that is also a CLI flag of ``commands``."""
    return field(default=default, metadata={"help": help, "commands": commands, "click": click_kwargs})


@dataclass
class RunConfig:
    # what to run
    plugin: str | None = _opt(None, "Plugin that brings the data (see `domainfm plugins`).  [default: the "
                              "plugin: key of --config]")
    data: str | None = _opt(None, "Data root folder; the plugin's embedded sample when omitted.")
    # backbone
    backbone: str = _opt("vit_small_patch14_dinov2", "timm architecture name (DINOv2, CLIP, ResNet...).", _TRAIN)
    init: str = _opt("dinov2", "Starting weights: dinov2 or pretrained (timm's weights for the name, "
                     "from the Hugging Face cache), torchgeo:ENUM.MEMBER (e.g. torchgeo:ViTSmall14_DINOv2_"
                     "Weights.SENTINEL2_ALL_SOFTCON), or random.", _TRAIN)
    weights: str | None = _opt(None, "Local weights (.safetensors/.pth/.pt) or models:/NAME@ALIAS; overrides --init.", _TRAIN)
    patch_embed_init: str = _opt("repeat", "How RGB patch-embedding weights become N bands: repeat, mean or random.", _TRAIN,
                                 type_choice=("repeat", "mean", "random"))
    in_chans: int | None = _opt(None, "Input bands; the plugin's default when omitted.", _TRAIN)
    img_size: int = _opt(224, "Model input size in pixels.", _TRAIN)
    # optimisation
    batch_size: int = _opt(32, "Images per device per step.")
    max_steps: int = _opt(-1, "Stop after this many optimiser steps (-1: no limit).", _TRAIN)
    max_epochs: int | None = _opt(None, "Stop after this many epochs.  [default: no limit with --max-steps, else "
                                 "10]", _TRAIN)
    lr: float = _opt(5e-4, "Peak learning rate (scaled by nothing: what you give is what is used).", _TRAIN)
    weight_decay: float = _opt(0.05, "Weight decay.", _TRAIN)
    warmup_steps: int = _opt(10, "Linear warm-up steps.", _TRAIN)
    layer_decay: float | None = _opt(None, "Layer-wise LR decay (e.g. 0.75); off when omitted.", _TRAIN)
    # continual pretraining
    mask_ratio: float = _opt(0.5, "Fraction of the student's patch tokens removed (Siamese masking).", (PRETRAIN,))
    mask_mode: str = _opt("drop", "drop (tokens removed: compute falls) or token (replaced by the mask token).",
                          (PRETRAIN,), type_choice=("drop", "token"))
    temperature: float = _opt(0.1, "Contrastive temperature.", (PRETRAIN,))
    label_similarity: str = _opt("cosine", "Label similarity for the soft target.", (PRETRAIN,),
                                 type_choice=("cosine", "jaccard"))
    soft_target: str = _opt("ce", "Soft loss: ce (normalised targets) or bce.", (PRETRAIN,), type_choice=("ce", "bce"))
    hard_weight: float = _opt(1.0, "Weight of the hard (identity) term.", (PRETRAIN,))
    soft_weight: float = _opt(1.0, "Weight of the soft (multi-label) term.", (PRETRAIN,))
    symmetric: bool = _opt(False, "Average the loss over both directions.", (PRETRAIN,), is_flag=True)
    chunk_size: int | None = _opt(None, "Compute the loss in blocks of this many rows (memory-bounded).  "
                                 "[default: the whole batch at once]", (PRETRAIN,))
    ema_momentum: float = _opt(0.996, "Start momentum of the EMA teacher (cosine schedule to 1.0).", (PRETRAIN,))
    proj_dim: int = _opt(256, "Projector output size.", (PRETRAIN,))
    # the health monitor (domainfm/monitor.py)
    val_every: int | None = _opt(None, "Evaluate the teacher on a held-out split every N steps (k-NN, RankMe, "
                                 "feature std); 0 turns it off.  [default: a fifth of the run]", (PRETRAIN,))
    val_fraction: float = _opt(0.1, "Fraction of the labelled samples held out from pretraining for the monitor.",
                               (PRETRAIN,))
    collapse_rankme: float = _opt(0.5, "Collapse guard: warn when RankMe falls below this fraction of its step-0 "
                                  "value.", (PRETRAIN,))
    collapse_knn_drop: float = _opt(0.1, "Collapse guard: warn when k-NN falls by more than this from step 0.",
                                    (PRETRAIN,))
    stop_on_collapse: bool = _opt(False, "End the run at a collapse, keeping the last healthy weights.", (PRETRAIN,),
                                  is_flag=True)
    # hardware
    precision: str = _opt("32-true", PRECISION_HELP, type_choice=PRECISION_CHOICES)
    accelerator: str = _opt("auto", ACCELERATOR_HELP, type_choice=ACCELERATOR_CHOICES)
    devices: int = _opt(1, "Devices (processes) per node.", _TRAIN)
    strategy: str = _opt("auto", "auto, ddp or fsdp.", _TRAIN)
    num_nodes: int = _opt(1, "Nodes.", _TRAIN)
    num_workers: int = _opt(0, "DataLoader worker processes.")
    seed: int = _opt(0, "Random seed.")
    # outputs
    # the flag is --out (the one output flag of every command); the field and YAML key stay output_dir
    output_dir: str = _opt("outputs", "Checkpoints and exported weights go under OUT/<experiment>/.", _TRAIN,
                           flag="--out", old_flags=("--output-dir",))
    checkpoint_every: int = _opt(50, "Save a checkpoint every N steps.", _TRAIN)
    keep_checkpoints: int = _opt(3, "Step checkpoints kept (newest first; last.ckpt always); -1 keeps all.", _TRAIN)
    resume: bool = _opt(False, "Continue from the last checkpoint, in the same MLflow run.", _TRAIN, is_flag=True)
    register: str | None = _opt(None, "Register the resulting model under this name in the MLflow registry.", _TRAIN)
    alias: str = _opt("candidate", "Registry alias given to the registered version.", _TRAIN)
    model: str | None = _opt(None, "Model to evaluate: a weights file or models:/NAME@ALIAS.", (EVALUATE,))
    experiment: str | None = _opt(None, "MLflow experiment (default: domainfm-<plugin>).")
    run_name: str | None = _opt(None, "MLflow run name.  [default: command-plugin-modality-backbone, "
                                 "e.g. pretrain-eo-sar-s2-vit_small_patch14_dinov2; evaluate: the model]")
    json: str | None = _opt(None, "Write the final metrics (and mlflow_run_id) to this JSON file.")
    # plugin-specific options, read as attributes (cfg.modality)
    options: dict[str, Any] = field(default_factory=dict)
    command: str = PRETRAIN

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: plugin options read like core fields
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"RunConfig has no field or plugin option {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d.update(self.options)
        return d

    def command_dict(self) -> dict[str, Any]:
        """The settings this run's command uses: ``command``, the core fields that are flags of that
        command (an ``evaluate`` run has no --init, --img-size or --mask-ratio to report) and the
        plugin's options. This is what a run logs as its params and config.yaml."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name == "command" or self.command in f.metadata.get("commands", ())}
        d.update(self.options)
        return d

    def replace(self, **changes: Any) -> "RunConfig":
        core = {k: v for k, v in changes.items() if k in CORE_FIELDS}
        opts = {**self.options, **{k: v for k, v in changes.items() if k not in CORE_FIELDS}}
        return dataclasses.replace(self, options=opts, **core)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"domainfm-{self.plugin or 'core'}"


CORE_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DomainFMError("config file not found", path=p, fix="give the path of an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise DomainFMError(f"not valid YAML{where}", path=p, fix="correct the syntax") from None
    if not isinstance(data, dict):
        raise DomainFMError("a config must be a mapping of option: value", path=p)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(command: str, values: dict[str, Any], explicit: set[str], *,
            plugin_defaults: dict[str, Any] | None = None, known: set[str] | None = None) -> RunConfig:
    """Merge defaults < plugin defaults < YAML < explicit flags into a RunConfig.

    ``values`` holds every flag's value (explicit or click default); ``explicit`` names those the
    user typed. ``known`` are all option names valid for this command (core + plugin).
    """
    merged = dict(values)
    for k, v in (plugin_defaults or {}).items():
        if k not in explicit:
            merged[k] = v
    cfg_path = values.get("config")
    if cfg_path:
        from_yaml = read_yaml(cfg_path)
        unknown = sorted(set(from_yaml) - (known or set(values)) - {"command"})
        if unknown:
            raise DomainFMError(f"unknown option(s) {', '.join(unknown)}", path=cfg_path,
                                fix=f"use names from `domainfm {command} --help`")
        for k, v in from_yaml.items():
            if k not in explicit:
                merged[k] = v
    merged.pop("config", None)
    core = {k: v for k, v in merged.items() if k in CORE_FIELDS}
    options = {k: v for k, v in merged.items() if k not in CORE_FIELDS}
    cfg = RunConfig(**core, options=options)
    cfg.command = command
    _validate(cfg)
    return cfg


# the Lightning precisions the backbones, losses and autocast paths are written and tested for
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


#: The lowest value each numeric flag takes: (lowest, lowest excluded, other values allowed). Checked
#: before any data is read or any MLflow run opens (Lightning and PyTorch would otherwise stop with a
#: traceback). ``--max-steps 0`` stays allowed: it exports and registers the starting weights untouched,
#: which `make demo` evaluates as the baseline of its pretraining.
#: ``--lr 0`` stays allowed: a run at learning rate 0 exports and logs its starting weights unchanged
#: (how a checkpoint is checked end to end), while a negative one would climb the loss.
_LOWEST: dict[str, tuple[float, bool, tuple]] = {
    "img_size": (1, False, ()), "in_chans": (1, False, ()), "max_steps": (0, False, (-1,)),
    "max_epochs": (1, False, ()), "lr": (0, False, ()), "weight_decay": (0, False, ()),
    "warmup_steps": (0, False, ()), "layer_decay": (0, True, ()), "temperature": (0, True, ()),
    "hard_weight": (0, False, ()), "soft_weight": (0, False, ()), "chunk_size": (1, False, ()),
    "ema_momentum": (0, False, ()), "proj_dim": (1, False, ()), "collapse_rankme": (0, False, ()),
    "collapse_knn_drop": (0, False, ()), "devices": (1, False, ()), "num_nodes": (1, False, ()),
    "num_workers": (0, False, ()), "checkpoint_every": (1, False, ()), "keep_checkpoints": (0, False, (-1,)),
}


def _check_lowest(cfg: RunConfig) -> None:
    for name, (low, excluded, allowed) in _LOWEST.items():
        value = getattr(cfg, name)
        if value is None or value in allowed or (value > low if excluded else value >= low):
            continue
        flag = "--" + name.replace("_", "-")
        bound = f"more than {low}" if excluded else f"at least {low}"
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        fix = f"pass a positive {flag}" if excluded else f"pass {flag} {low} or more"
        raise DomainFMError(f"{flag} must be {bound}{extra}, got {value}",
                            fix=fix + (f", or {flag} {allowed[0]}" if allowed else ""))


def _validate(cfg: RunConfig) -> None:
    _check_lowest(cfg)
    from domainfm.backbones.sources import check_weights_path  # a .txt as a model: before any run opens

    check_weights_path(getattr(cfg, "model", None))
    check_weights_path(getattr(cfg, "weights", None))
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise DomainFMError(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.command == PRETRAIN and not 0.0 < cfg.val_fraction < 1.0:
        raise DomainFMError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.command == PRETRAIN and cfg.val_every is not None and cfg.val_every < 0:
        raise DomainFMError(f"--val-every must be >= 0 (0: off), got {cfg.val_every}", fix="pass --val-every 0 (off) or a number of steps")
    if cfg.batch_size < 1:
        raise DomainFMError(f"--batch-size must be at least 1, got {cfg.batch_size}", fix="pass --batch-size 1 or more")
    if str(cfg.precision) not in PRECISIONS:  # Lightning takes more (64, transformer-engine...), our models do not
        raise DomainFMError(f"unknown --precision {cfg.precision!r}", fix=f"use one of {', '.join(PRECISIONS)}")
    if cfg.strategy not in ("auto", "ddp", "fsdp", "ddp_spawn", "ddp_find_unused_parameters_true"):
        raise DomainFMError(f"unknown --strategy {cfg.strategy!r}", fix="use auto, ddp or fsdp")
    if cfg.num_nodes != 1 or cfg.strategy == "fsdp":
        from domainfm.distributed import check_launch

        check_launch(num_nodes=cfg.num_nodes, strategy=cfg.strategy, accelerator=cfg.accelerator)


def save_yaml(cfg: RunConfig, path: str | Path) -> Path:
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    return p


def renamed_core_flags(command: str) -> dict[str, str]:
    """``{old flag: new flag}`` of the core flags of ``command`` that were renamed (``--output-dir``
    -> ``--out``): the CLI keeps the old spellings as hidden aliases (``cli.renamed_flags``)."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        if meta and command in meta["commands"]:
            for old in meta["click"].get("old_flags", ()):
                out[old] = meta["click"].get("flag") or "--" + f.name.replace("_", "-")
    return out


def click_options(command: str) -> list:
    """The core flags of ``command`` as click options, generated from RunConfig's fields."""
    import click

    opts = []
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        if not meta or command not in meta["commands"]:
            continue
        extra = dict(meta["click"])
        flag = extra.pop("flag", None) or "--" + f.name.replace("_", "-")
        extra.pop("old_flags", None)  # hidden aliases: see renamed_core_flags
        choice = extra.pop("type_choice", None)
        kwargs: dict[str, Any] = {"default": f.default, "help": meta["help"], "show_default": f.default is not None}
        if extra.pop("is_flag", False):
            opts.append(click.Option([flag], is_flag=True, default=f.default, help=meta["help"]))
            continue
        if f.name in ("output_dir", "json"):  # a file where a folder goes (or back): one line saying so
            from domainfm.path_params import PathParam

            kwargs["type"] = (PathParam(file_okay=False, fix="give a folder for the run's outputs")
                              if f.name == "output_dir" else PathParam(dir_okay=False, fix="give a file name, e.g. metrics.json"))
        elif choice:
            kwargs["type"] = click.Choice(choice)
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
        elif f.type in ("float", "float | None"):
            kwargs["type"] = float
        opts.append(click.Option([flag, f.name], **kwargs))
    from domainfm.path_params import PathParam

    opts.append(click.Option(["--config"], type=PathParam(dir_okay=False, fix="give the path of a YAML file"), default=None,
                             help="YAML file of options; flags given on the command line override it."))
    return opts
