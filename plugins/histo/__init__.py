"""histo: whole-slide pathology for domainfm.

- ``domainfm histo tile``     tissue tiles of whole-slide images at a fixed µm/px
- ``domainfm histo embed``    tile features with a frozen backbone, one HDF5 per slide (CLAM/TRIDENT layout)
- ``domainfm histo heatmap``  attention of a slide-biomarker model over a slide
- ``domainfm pretrain --plugin histo --data SLIDES_DIR``  continual pretraining on tiles sampled on the fly
- ``domainfm pipeline slide-biomarker``  cross-validated MIL ensembles on tile features (pipelines/)
- ``domainfm predict --model models:/histo-TARGET@ALIAS SLIDE... --out DIR``  a registered ensemble on
  new whole slides, with the encoder and tiling settings it records (plugins/histo/predict.py)

This module stays light (click only): torch, openslide and h5py are imported by the submodules.
"""

from __future__ import annotations

from typing import Any

from domainfm.plugins import Plugin


class HistoPlugin(Plugin):
    name = "histo"
    description = "Whole-slide pathology: tissue tiling, tile features, slide-level biomarker MIL ensembles."

    def in_chans(self, cfg) -> int:
        return 3

    def options(self, command: str) -> list[Any]:
        if command == "predict":
            from plugins.histo.predict import options

            return options()
        if command != "pretrain":
            return []
        import click

        return [
            click.Option(["--mpp"], type=float, default=0.5, show_default=True, help="µm per pixel of the sampled tiles."),
            click.Option(["--tile-size"], type=int, default=256, show_default=True,
                         help="Tile side read at --mpp before the crops of the two views (--img-size)."),
            click.Option(["--min-tissue"], type=float, default=0.6, show_default=True,
                         help="Tissue fraction a sampled tile must have."),
            click.Option(["--slide-mpp"], default=None,
                         help="µm/px of slides that carry none: a number, or a CSV slide_id,mpp.  [default: the "
                              "file's own]"),
            click.Option(["--tile-labels"], default=None,
                         help="CSV slide_id,x,y,<label columns 0/1>: multi-labelled tiles for the soft "
                              "contrastive loss (tiles are then sampled from this list only); an optional "
                              "patient_id column groups slides for the health monitor's held-out split."),
            click.Option(["--tiles-per-epoch"], type=int, default=1024, show_default=True,
                         help="Tiles drawn (at random, over all slides) per epoch."),
        ]

    def defaults(self, command: str) -> dict[str, Any]:
        return {}

    def pretrain_datamodule(self, cfg):
        from plugins.histo.datamodule import HistoPretrainDataModule

        return HistoPretrainDataModule.from_config(cfg)

    def predict(self, model, inputs, out, options):
        from plugins.histo.predict import predict

        return predict(model, inputs, out, options)

    def monitor_dataset(self, cfg, datamodule):
        """Labelled tiles of whole held-out slides (or patients) for the health monitor: see
        :mod:`plugins.histo.monitor`."""
        from plugins.histo.monitor import monitor_dataset

        return monitor_dataset(cfg, datamodule)

    def commands(self) -> list[Any]:
        from plugins.histo.commands import commands

        return commands()


plugin = HistoPlugin()
