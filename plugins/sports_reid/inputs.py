"""Checks of a run's flags and folders that need no heavy import: the plugin calls them before
loading torch, Lightning and the model, so a wrong path or name is reported in a second."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError
from plugins.sports_reid.layout import detect_layout, part_folder, read_eval_split, read_part

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


def check_finetune(cfg: "RunConfig") -> None:
    root = data_root(cfg)
    read_part(root, "train")  # every training file name is parsed here
    if has_test_split(root):
        read_eval_split(root, "test")


def check_evaluate(cfg: "RunConfig") -> None:
    if not cfg.model:
        raise DomainFMError("evaluate needs --model (a weights file or models:/NAME@ALIAS)",
                            fix="pass the backbone.safetensors written by `domainfm finetune --plugin sports-reid`")
    if cfg.split == "challenge" and not cfg.submission:
        raise DomainFMError("--split challenge writes a submission: --submission PATH is missing",
                            fix="add --submission submission.csv")
    if cfg.split == "test" and cfg.submission:
        raise DomainFMError("--submission is written for --split challenge only",
                            fix="add --split challenge, or drop --submission")
    if not cfg.model.startswith("models:/") and not Path(cfg.model).is_file():
        raise DomainFMError("model file not found", path=cfg.model,
                            fix="give a backbone.safetensors export or models:/NAME@ALIAS")
    read_eval_split(data_root(cfg), cfg.split)
