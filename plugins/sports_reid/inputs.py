"""The plugin's ``check(cfg)``: every flag and folder of a run, checked before the core opens an
MLflow run or builds a model, so a wrong path or name is one line in a second and leaves no run
behind. Folders and file names first (no heavy import); then what needs torch but no data: the
device and precision of feature extraction, and ``--tome-r`` against the model's architecture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError
from plugins.sports_reid.layout import detect_layout, part_folder, read_eval_split, read_part
from plugins.sports_reid.rerank import check_rerank

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig


def data_root(cfg: "RunConfig") -> Path:
    if not cfg.data:
        raise DomainFMError("sports-reid needs --data ROOT (it has no embedded sample)",
                            fix="give the MMSports 2022 folder (reid_training/, reid_test/) or a train/ query/ "
                                "gallery/ folder; tests/data/sports_reid/make_data.py OUT draws a synthetic one")
    root = Path(cfg.data)
    detect_layout(root)
    return root


def has_test_split(root: Path) -> bool:
    layout = detect_layout(root)
    return part_folder(root, layout, "test_query").is_dir() and part_folder(root, layout, "test_gallery").is_dir()


def _check_split(cfg: "RunConfig", root: Path, split: str) -> None:
    """The split's file names and players; with ``--rerank``, enough crops for its neighbourhoods."""
    query, gallery = read_eval_split(root, split)
    if cfg.options.get("rerank"):
        check_rerank(len(query) + len(gallery), path=root)


def _check_device(cfg: "RunConfig") -> None:
    """Frozen-feature extraction's device and autocast (the core's one choice of both)."""
    from domainfm.inference import autocast_dtype, resolve_device

    autocast_dtype(cfg.precision, resolve_device(cfg.accelerator))


def check_finetune(cfg: "RunConfig") -> None:
    root = data_root(cfg)
    read_part(root, "train")  # every training file name is parsed here
    if has_test_split(root):
        _check_split(cfg, root, "test")
    _check_device(cfg)


def check_evaluate(cfg: "RunConfig") -> None:
    if not cfg.model:
        raise DomainFMError("evaluate needs --model (a weights file or models:/NAME@ALIAS)",
                            fix="pass the backbone.safetensors written by `domainfm finetune --plugin sports-reid`")
    split, submission = cfg.options.get("split", "test"), cfg.options.get("submission")
    if split == "challenge" and not submission:
        raise DomainFMError("--split challenge writes a submission: --submission PATH is missing",
                            fix="add --submission submission.csv")
    if split == "test" and submission:
        raise DomainFMError("--submission is written for --split challenge only",
                            fix="add --split challenge, or drop --submission")
    if submission and Path(submission).is_dir():
        raise DomainFMError("--submission names a folder", path=submission, fix="give a file name, e.g. submission.csv")
    if not cfg.model.startswith("models:/") and not Path(cfg.model).is_file():
        raise DomainFMError("model file not found", path=cfg.model,
                            fix="give a backbone.safetensors export or models:/NAME@ALIAS")
    zero_shot = str(cfg.options.get("zero_shot") or "auto")
    if Path(zero_shot).suffix in (".safetensors", ".pth", ".pt") and not Path(zero_shot).is_file():
        raise DomainFMError("--zero-shot weights file not found", path=zero_shot,
                            fix="give an existing weights file, or --zero-shot auto, pretrained, random or none")
    _check_split(cfg, data_root(cfg), split)
    _check_device(cfg)
    tome_r = int(cfg.options.get("tome_r") or 0)
    if tome_r:  # the one check that builds the model: only when token merging is asked for
        from domainfm.backbones import create_backbone
        from domainfm.inference import check_token_merging

        check_token_merging(create_backbone(cfg.model, cfg=cfg, in_chans=3), tome_r, where="the model")
