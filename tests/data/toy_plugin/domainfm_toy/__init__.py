"""A toy domain: scenes of K classes drawn as coloured noise. Imports nothing heavy at import time."""

from __future__ import annotations

import click

from domainfm.plugins import Plugin


class ToyPlugin(Plugin):
    name = "toy"
    description = "Toy scenes (random images with multi-labels) for plugin tests"
    label_names = ("red", "green", "blue", "noise")

    def in_chans(self, cfg) -> int:
        return cfg.bands

    def options(self, command):
        return [click.Option(["--bands"], type=int, default=4, show_default=True, help="Bands per image."),
                click.Option(["--num-samples"], type=int, default=32, show_default=True, help="Scenes.")]

    def pretrain_datamodule(self, cfg):
        from domainfm_toy.data import ToyDataModule

        return ToyDataModule(cfg.num_samples, cfg.bands, cfg.img_size, cfg.batch_size, len(self.label_names), cfg.seed)

    def evaluate(self, cfg):
        from domainfm_toy.data import evaluate

        return evaluate(cfg)

    def commands(self):
        @click.command("hello")
        @click.option("--who", default="world")
        def hello(who):
            """Say hello (a plugin's extra command)."""
            click.echo(f"hello {who} from toy")

        return [hello]


plugin = ToyPlugin()
