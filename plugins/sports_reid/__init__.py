"""sports-reid: player re-identification across the frames of an action (CLIP-ReIdent).

``finetune`` trains any core backbone (a CLIP or DINOv2 ViT from timm, or ``models:/NAME@ALIAS``)
with the image-to-image InfoNCE loss on pairs of crops of the same player; ``evaluate`` ranks a
gallery for each query and reports mAP, CMC and mINP next to the zero-shot score of the starting
weights, or writes the MMSports 2022 challenge submission.

This module imports nothing heavy (``domainfm plugins`` loads it just to read the description);
the datasets, the Lightning task and the evaluator live in submodules imported when needed.
"""

from __future__ import annotations

from typing import Any

from domainfm.plugins import Plugin


class SportsReIDPlugin(Plugin):
    name = "sports-reid"
    description = ("Player re-identification (MMSports 2022 or train/query/gallery folders): CLIP-ReIdent "
                   "contrastive fine-tuning, mAP/CMC/mINP with flip TTA and k-reciprocal re-ranking")

    def options(self, command: str) -> list:
        import click

        if command not in ("finetune", "evaluate"):
            return []
        opts = [
            click.Option(["--distance"], type=click.Choice(("cosine", "euclidean")), default="cosine",
                         show_default=True, help="Distance between query and gallery features."),
            click.Option(["--flip-tta/--no-flip-tta"], default=True, show_default=True,
                         help="Add the features of each crop's mirror image (test-time augmentation)."),
            click.Option(["--rerank/--no-rerank"], default=False, show_default=True,
                         help="k-reciprocal re-ranking of the distances (k1=20, k2=6, lambda=0.3), "
                              "computed in blocks (memory ~ the query x gallery matrix)."),
            click.Option(["--same-camera-rule/--no-same-camera-rule"], default=True, show_default=True,
                         help="Market-1501 protocol, when file names carry c<k> cameras: gallery crops of the "
                              "query's player taken by the query's camera do not count. Turn it off for data "
                              "filmed by one camera."),
        ]
        if command == "finetune":
            opts.append(click.Option(["--label-smoothing"], type=click.FloatRange(0.0, 1.0, max_open=True),
                                     default=0.1, show_default=True,
                                     help="Label smoothing of the InfoNCE cross-entropy."))
        else:
            opts += [
                click.Option(["--split"], type=click.Choice(("test", "challenge")), default="test",
                             show_default=True,
                             help="test: score reid_test (or query/ + gallery/); challenge: rank "
                                  "reid_challenge and write --submission."),
                click.Option(["--submission"], type=click.Path(dir_okay=False), default=None,
                             help="Challenge CSV to write: gallery ids in the first row, query ids in the "
                                  "first column, distances between."),
                click.Option(["--zero-shot"], default="auto", show_default=True,
                             help="Baseline scored next to --model: auto (the weights fine-tuning started "
                                  "from, recorded in the export; else timm's pretrained weights), pretrained, "
                                  "random (seeded by --seed), a weights file, or none."),
                click.Option(["--tome-r"], type=int, default=0, show_default=True,
                             help="Token merging (ToMe): tokens merged in every ViT block of the model and "
                                  "the zero-shot baseline."),
            ]
        return opts

    def defaults(self, command: str) -> dict[str, Any]:
        if command != "finetune":
            return {}
        # CLIP-ReIdent: a CLIP ViT image tower, small learning rate, short warm-up
        return {"backbone": "vit_base_patch16_clip_224.openai", "init": "pretrained", "lr": 1e-5,
                "weight_decay": 0.1, "warmup_steps": 50, "batch_size": 32}

    def finetune(self, cfg) -> dict[str, Any]:
        from plugins.sports_reid.inputs import check_finetune

        check_finetune(cfg)  # bad folders and names are reported before torch is imported
        from plugins.sports_reid.jobs import run_finetune

        return run_finetune(cfg)

    def evaluate(self, cfg) -> dict[str, Any]:
        from plugins.sports_reid.inputs import check_evaluate

        check_evaluate(cfg)
        from plugins.sports_reid.jobs import run_evaluate

        return run_evaluate(cfg)


plugin = SportsReIDPlugin()
