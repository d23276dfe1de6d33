"""sgd-ft: fine-tune any domainfm (or timm) backbone with SGD and a frozen embedding layer.

Kumar, Shen, Bubeck and Gunasekar ("How to Fine-Tune Vision Models with SGD") show that freezing
only the embedding layer (a ViT's patch embedding, a CNN's stem) lets SGD with momentum match
AdamW while keeping 4 bytes of optimizer state per parameter instead of 8. This plugin runs that
recipe on an ImageFolder (images or multi-band GeoTIFFs) or on the eo-sar layout (multi-label),
sweeps learning rates, and compares the three arms (SGD + frozen embedding, SGD, AdamW).

This module imports nothing heavy: the data, model and training code live in submodules.
"""

from __future__ import annotations

from typing import Any

from domainfm.plugins import Plugin


class SGDFinetunePlugin(Plugin):
    name = "sgd-ft"
    description = ("Fine-tuning with SGD and a frozen embedding layer (Kumar et al.), against AdamW: "
                   "ImageFolder images/GeoTIFFs or eo-sar multi-labels, LR sweeps, memory comparison")

    def check(self, cfg) -> None:
        """--data before the core opens an MLflow run (the datamodule reads it inside the run)."""
        if cfg.command == "finetune" and cfg.data:
            from domainfm.errors import expect_folder

            expect_folder(cfg.data, "--data", missing="data folder not found",
                          fix="give --data the folder holding train/<class>/<image> (and val/, test/), or with "
                              "--task multilabel an eo-sar data root (s2/<patch_id>.tif)")

    def options(self, command: str) -> list:
        import click

        from domainfm import config

        if command == "predict":
            return [
                click.Option(["--batch-size"], type=click.IntRange(min=1), default=16, show_default=True,
                             help="Inputs per forward pass."),
                click.Option(["--accelerator"], type=click.Choice(config.ACCELERATOR_CHOICES), default="auto",
                             show_default=True, help=config.ACCELERATOR_HELP),
                click.Option(["--precision"], type=click.Choice(config.PRECISION_CHOICES),
                             default="32-true", show_default=True, help=config.PRECISION_HELP),
                click.Option(["--gsd-tolerance"], type=click.FloatRange(0.0, min_open=True), default=0.25,
                             show_default=True,
                             help="Sentinel-1/2 classifiers: a patch whose pixel size differs from the model's GSD "
                                  "by more than this fraction is refused."),
            ]
        if command != "finetune":
            return []
        return [
            click.Option(["--task"], type=click.Choice(("multiclass", "multilabel")), default="multiclass",
                         show_default=True,
                         help="multiclass: --data is an ImageFolder (train/<class>/*, val/<class>/*, optional "
                              "test/<class>/*; PNG/JPEG or multi-band GeoTIFF). multilabel: --data is an eo-sar "
                              "root (s2|s1/*.tif with landcover/ or labels.csv), scored by macro mAP; "
                              "without --data, the eo-sar sample."),
            click.Option(["--optimizer"], type=click.Choice(("sgd", "adamw")), default="sgd", show_default=True,
                         help="sgd: momentum (see --momentum), no Nesterov. adamw: betas 0.9/0.999. Both take "
                              "--weight-decay, which sgd-ft sets to 0 (the paper's SGD; the same for a fair "
                              "--compare); sgd-ft also defaults to --lr 1e-3 and --warmup-steps 0."),
            click.Option(["--momentum"], type=click.FloatRange(0.0, 1.0, max_open=True), default=0.9,
                         show_default=True, help="SGD momentum; 0 keeps no optimizer state at all."),
            click.Option(["--freeze-embed/--no-freeze-embed"], default=True, show_default=True,
                         help="Freeze the embedding layer: a ViT's patch_embed, a CNN's stem (ResNet conv1+bn1, "
                              "ConvNeXt stem), found from the model's structure."),
            click.Option(["--freeze-pos-embed"], is_flag=True, default=False,
                         help="Also freeze a ViT's position embedding and CLS/register tokens."),
            click.Option(["--lr-sweep"], default=None, metavar="LR,LR,...",
                         help="Train once per learning rate (one nested MLflow run each) and keep the best on "
                              "validation, e.g. 1e-4,3e-4,1e-3. Overrides --lr."),
            click.Option(["--compare"], is_flag=True, default=False,
                         help="Run SGD with frozen embedding, plain SGD and AdamW on the same budget and write "
                              "a table (score, trainable params, optimizer state, peak memory), printed and "
                              "logged to MLflow as tables/compare.csv and .md. The result (--json, the saved "
                              "weights) is the arm that won on validation, named in `arm`; every arm's numbers "
                              "are there as ARM/KEY."),
            click.Option(["--patience"], type=click.IntRange(min=0), default=5, show_default=True,
                         help="Early stopping: validations without improvement before stopping (0: off)."),
            click.Option(["--val-every"], type=click.IntRange(min=1), default=None,
                         help="Validate every N training steps.  [default: once per epoch]"),
            click.Option(["--measure-memory/--no-measure-memory"], default=True, show_default=True,
                         help="Report the peak memory of a training step (CUDA: max allocated; CPU: peak RSS "
                              "growth of a one-off process running two steps of the same model and batch)."),
            click.Option(["--modality"], type=click.Choice(("s2", "s2-l2a", "s1")), default="s2", show_default=True,
                         help="With --task multilabel: Sentinel-2 L1C (13 bands), L2A (12 bands) or Sentinel-1 (VV, VH)."),
            click.Option(["--layout"], type=click.Choice(("auto", "domainfm", "ssl4eo-s12", "bigearthnet",
                                                          "bigearthnet-v2", "eurosat")), default="auto",
                         show_default=True,
                         help="With --task multilabel: layout of --data (see `domainfm pretrain --plugin eo-sar "
                              "--help`); standard datasets use their official train/val/test splits."),
            click.Option(["--label-threshold"], type=click.FloatRange(0.0, 1.0, min_open=True), default=0.01,
                         show_default=True,
                         help="With --task multilabel: a land-cover class is a label when it covers at least "
                              "this fraction of the patch."),
        ]

    def defaults(self, command: str) -> dict[str, Any]:
        if command != "finetune":
            return {}
        # the paper's SGD: no weight decay, no warm-up needed; a fine-tuning learning rate
        return {"weight_decay": 0.0, "warmup_steps": 0, "lr": 1e-3}

    def in_chans(self, cfg) -> int:
        from plugins.sgd_ft.datamodule import build_datamodule

        return build_datamodule(cfg).in_chans

    def finetune(self, cfg) -> dict[str, Any]:
        from plugins.sgd_ft.jobs import finetune

        return finetune(cfg)

    def predict(self, model, inputs, out, options) -> dict[str, Any]:
        """``domainfm predict`` of a fine-tuned classifier: one score per class per input (see
        :mod:`plugins.sgd_ft.predict`)."""
        from plugins.sgd_ft.predict import predict

        return predict(model, inputs, out, options)


plugin = SGDFinetunePlugin()
