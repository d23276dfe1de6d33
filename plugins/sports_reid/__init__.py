"""sports-reid: player re-identification across the frames of an action (CLIP-ReIdent).

``finetune`` trains any core backbone (a CLIP or DINOv2 ViT from timm, or ``models:/NAME@ALIAS``)
with the image-to-image InfoNCE loss on pairs of crops of the same player; ``evaluate`` ranks a
gallery for each query and reports mAP, CMC and mINP next to the zero-shot score of the starting
weights, or writes the MMSports 2022 challenge submission; ``domainfm predict`` ranks a gallery
for new query crops with a model that records its own input size and normalisation (``model.py``).

This module imports nothing heavy (``domainfm plugins`` loads it just to read the description).
Modules: ``commands.py`` the flags, ``inputs.py`` the checks run before any MLflow run, ``jobs.py``
what finetune/evaluate run, ``layout.py`` the folder layouts and file names, ``datasets.py``,
``datamodule.py``, ``task.py`` (the Lightning task), ``retrieval.py`` (features, distances,
metrics, submission, retrieval grid), ``rerank.py`` (k-reciprocal re-ranking), ``model.py`` (what a
model records and its loader), ``predict.py`` (the ranking CSV).
"""

from __future__ import annotations

from typing import Any

from domainfm.plugins import Plugin


class SportsReIDPlugin(Plugin):
    name = "sports-reid"
    description = ("Player re-identification (MMSports 2022 or train/query/gallery folders): CLIP-ReIdent "
                   "contrastive fine-tuning, mAP/CMC/mINP with flip TTA and k-reciprocal re-ranking")

    def options(self, command: str) -> list:
        from plugins.sports_reid.commands import options

        return options(command)

    def check(self, cfg) -> None:
        """Folders, file names and flags (``--split``/``--submission``, ``--rerank`` on the split's
        size, device and precision, ``--tome-r`` against the model): before any MLflow run opens."""
        from plugins.sports_reid.inputs import check_evaluate, check_finetune

        if cfg.command == "finetune":
            check_finetune(cfg)
        elif cfg.command == "evaluate":
            check_evaluate(cfg)

    def defaults(self, command: str) -> dict[str, Any]:
        if command != "finetune":
            return {}
        # CLIP-ReIdent: a CLIP ViT image tower, small learning rate, short warm-up
        return {"backbone": "vit_base_patch16_clip_224.openai", "init": "pretrained", "lr": 1e-5,
                "weight_decay": 0.1, "warmup_steps": 50, "batch_size": 32}

    def finetune(self, cfg) -> dict[str, Any]:
        from plugins.sports_reid.jobs import run_finetune

        return run_finetune(cfg)

    def evaluate(self, cfg) -> dict[str, Any]:
        from plugins.sports_reid.jobs import run_evaluate

        return run_evaluate(cfg)

    def predict(self, model, inputs, out, options) -> dict[str, Any]:
        """``domainfm predict --model M QUERY... --gallery DIR --out OUT``: ``OUT/ranking.csv`` (see
        :mod:`plugins.sports_reid.predict`)."""
        from plugins.sports_reid.predict import run_predict

        return run_predict(model, inputs, out, options)


plugin = SportsReIDPlugin()
