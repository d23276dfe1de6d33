"""sports-reid's flags on the core ``finetune``, ``evaluate`` and ``predict`` commands (click only at import
time: ``domainfm --help`` reads them without torch). The plugin has no commands of its own."""

from __future__ import annotations

import click

from domainfm.cli import PathParam
from domainfm.config import ACCELERATOR_CHOICES, ACCELERATOR_HELP, PRECISION_CHOICES, PRECISION_HELP


def predict_options() -> list[click.Option]:
    """``domainfm predict --model <a sports-reid model> QUERY... --gallery DIR``: the input size,
    normalisation and distance come from the model; these say what to rank and how."""
    return [
        click.Option(["--gallery"], required=True,
                     type=PathParam(file_okay=False, fix="give the folder of gallery crops (<player_id>/ sub-folders "
                                                         "or <player_id>_<sequence>_<frame>.jpeg files)"),
                     help="Folder of gallery crops to rank for every query (<player_id>/ sub-folders, "
                          "MMSports <player_id>_<sequence>_<frame>.jpeg names, or any names)."),
        click.Option(["--top-k"], type=click.IntRange(min=1), default=10, show_default=True,
                     help="Gallery crops listed per query in ranking.csv."),
        click.Option(["--rerank/--no-rerank"], default=False, show_default=True,
                     help="k-reciprocal re-ranking of the distances (k1=20, k2=6, lambda=0.3)."),
        click.Option(["--flip-tta/--no-flip-tta"], default=True, show_default=True,
                     help="Add the features of each crop's mirror image (test-time augmentation)."),
        click.Option(["--same-camera-rule/--no-same-camera-rule"], default=True, show_default=True,
                     help="For mAP/CMC when names carry c<k> cameras: gallery crops of the query's player "
                          "taken by the query's camera do not count."),
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=64, show_default=True,
                     help="Crops per forward pass."),
        click.Option(["--accelerator"], type=click.Choice(ACCELERATOR_CHOICES), default="auto",
                     show_default=True, help=ACCELERATOR_HELP),
        click.Option(["--precision"], type=click.Choice(PRECISION_CHOICES),
                     default="32-true", show_default=True, help=PRECISION_HELP),
    ]


def options(command: str) -> list[click.Option]:
    """The extra flags of ``command`` ("finetune", "evaluate" or "predict"; none for the others)."""
    if command == "predict":
        return predict_options()
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
            click.Option(["--submission"], type=PathParam(dir_okay=False, fix="give a file name, e.g. submission.csv"),
                         default=None,
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
