"""eo-sar: Sentinel-2 multispectral and Sentinel-1 SAR GeoTIFF patches for domainfm.

Pretraining batches pair two augmented views of a patch with its Dynamic World land-cover
multi-labels (from ``landcover/`` rasters or ``labels.csv``); ``evaluate`` runs a frozen-feature
linear probe and kNN with multi-label mAP. Without ``--data`` an embedded synthetic sample is used.

This module imports nothing heavy (``domainfm plugins`` loads it just to read the description);
the datasets, datamodule and evaluator live in submodules imported when needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainfm.errors import DomainFMError
from domainfm.plugins import Plugin
from plugins.eo_sar.bands import BANDS, MODALITY_BANDS, MODALITY_NAMES


class EOSARPlugin(Plugin):
    name = "eo-sar"
    description = ("Sentinel-2 (13 bands) / Sentinel-1 (VV, VH) GeoTIFF patches with Dynamic World "
                   "land-cover multi-labels; linear-probe and kNN mAP evaluation")

    # -- flags ------------------------------------------------------------------------------------

    def options(self, command: str) -> list:
        import click

        if command == "predict":
            return predict_options()
        if command not in ("pretrain", "evaluate"):
            return []
        opts = [
            click.Option(["--modality"], type=click.Choice(tuple(MODALITY_BANDS)), default="s2", show_default=True,
                         help="s2: Sentinel-2 L1C, 13 bands B1..B12 (reflectance x 10000; ROOT/s2/*.tif, SSL4EO-S12 "
                              "s2c/, EuroSAT); s2-l2a: L2A, 12 bands without B10 (SSL4EO-S12 s2a/, BigEarthNet); "
                              "s1: VV and VH backscatter in dB."),
            click.Option(["--label-threshold"], type=click.FloatRange(0.0, 1.0, min_open=True), default=0.01,
                         show_default=True,
                         help="A land-cover class is a label of a patch when it covers at least this "
                              "fraction of the patch's valid land-cover pixels."),
        ]
        opts += [
            click.Option(["--s2-harmonize"], type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
                         help="Sentinel-2 processing baseline >= 04.00 stores reflectance x 10000 + 1000: auto "
                              "subtracts 1000 where a file declares the offset or the baseline; on: every file; off: never."),
            click.Option(["--s1-units"], type=click.Choice(("db", "linear")), default="db", show_default=True,
                         help="Units of the Sentinel-1 files: db, or linear power (converted with 10*log10)."),
            click.Option(["--stats"], type=click.Choice(("backbone", "data")), default="backbone", show_default=True,
                         help="Normalise with the backbone's recorded per-band mean/std (its training statistics), "
                              "or recompute them from the data. A backbone without statistics uses the data's."),
        ]
        opts += layout_options(command)
        if command == "evaluate":
            opts += [
                click.Option(["--test-fraction"], type=click.FloatRange(0.05, 0.95), default=0.3, show_default=True,
                             help="Share of the labelled patches held out for testing (seeded split)."),
                click.Option(["--knn-k"], type=click.IntRange(min=1), default=10, show_default=True,
                             help="Neighbours (cosine similarity) voting in the kNN multi-label score."),
                click.Option(["--tome-r"], type=int, default=0, show_default=True,
                             help="Token merging (ToMe): tokens merged in every ViT block of the frozen model."),
            ]
        return opts

    def input_plan(self, cfg, source: str | None = None):
        """How this run's data meets the backbone (statistics, band alignment): see
        :mod:`plugins.eo_sar.normalization`. ``source``: the weights (default --weights / --init)."""
        from domainfm.backbones import input_spec_of
        from plugins.eo_sar.normalization import plan_input

        source = source if source is not None else (getattr(cfg, "weights", None) or getattr(cfg, "init", None))
        return plan_input(getattr(cfg, "modality", "s2"), input_spec_of(source), getattr(cfg, "stats", "backbone"))

    def in_chans(self, cfg) -> int:
        modality = getattr(cfg, "modality", "s2")
        if getattr(cfg, "command", None) == "pretrain":
            plan = self.input_plan(cfg)
            if plan.model_bands != plan.data_bands:  # the weights name their bands: the model keeps them
                given = getattr(cfg, "in_chans", None)
                if given is not None and given != len(plan.model_bands):
                    raise DomainFMError(f"--in-chans {given} disagrees with the backbone's {len(plan.model_bands)} bands "
                                        f"({', '.join(plan.model_bands)})", fix="drop --in-chans")
                return len(plan.model_bands)
        bands = MODALITY_BANDS.get(modality, BANDS.get(modality, ()))
        expected = len(bands)
        given = getattr(cfg, "in_chans", None)
        if given is not None and given != expected:
            raise DomainFMError(f"--in-chans {given} disagrees with --modality {modality}, whose patches have "
                                f"{expected} bands ({', '.join(bands)})",
                                fix=f"drop --in-chans (eo-sar sets it) or pass --in-chans {expected}")
        return expected

    # -- data -------------------------------------------------------------------------------------

    def check(self, cfg) -> None:
        """Before any MLflow run: a dataset --layout without --data is a mistake, not the sample."""
        if not cfg.data:
            self._require_data_for_layout(cfg)
        if getattr(cfg, "tome_r", 0) and cfg.command == "evaluate" and cfg.model:
            # a --tome-r the model cannot take is refused before a run is opened, not inside it
            from domainfm.backbones import create_backbone
            from domainfm.inference import check_token_merging

            check_token_merging(create_backbone(cfg.model, cfg=cfg), int(cfg.tome_r), where="the model")
        if cfg.command == "evaluate":  # a GPU that is not there, or 16-bit on a CPU: refused before the run
            from domainfm.inference import autocast_dtype, resolve_device

            autocast_dtype(cfg.precision, resolve_device(cfg.accelerator))

    @staticmethod
    def _require_data_for_layout(cfg) -> None:
        layout = getattr(cfg, "layout", "auto") or "auto"
        if layout not in ("auto", "domainfm"):
            from domainfm.errors import DomainFMError

            raise DomainFMError(f"--layout {layout} names a downloaded dataset, but no --data was given",
                                fix=f"pass --data ROOT (the {layout} download), or drop --layout to use the embedded sample")

    def data_root(self, cfg) -> Path:
        """``--data``, or the embedded sample (generated on first use) with a line saying so."""
        if cfg.data:
            return Path(cfg.data)
        self._require_data_for_layout(cfg)
        import click

        from plugins.eo_sar.sample import SAMPLE_PATCHES, ensure_sample

        root = ensure_sample()
        click.echo(f"eo-sar: no --data given, using the embedded synthetic sample ({SAMPLE_PATCHES} "
                   f"{MODALITY_NAMES[getattr(cfg, 'modality', 's2')]} patches, two UTM zones) at {root}", err=True)
        return root

    def pretrain_datamodule(self, cfg):
        import click

        from plugins.eo_sar.datamodule import EOSARDataModule

        self.in_chans(cfg)  # refuses a disagreeing --in-chans before any file is read
        plan = self.input_plan(cfg)
        root = self.data_root(cfg)
        radiometry = {"s2_harmonize": getattr(cfg, "s2_harmonize", "auto"), "s1_units": getattr(cfg, "s1_units", "db")}
        dataset = None
        if cfg.data:  # a standard dataset (SSL4EO-S12, BigEarthNet, EuroSAT) by its root path
            from plugins.eo_sar.band_stats import BandStats
            from plugins.eo_sar.layouts import dataset_for, resolve_layout

            if resolve_layout(root, getattr(cfg, "layout", "auto"))[0] != "domainfm":
                stats = BandStats(plan.mean, plan.std) if plan.mean is not None else None
                dataset, _ = dataset_for(cfg, root, purpose="pretrain", echo=lambda m: click.echo(m, err=True),
                                         stats=stats)
        dm = EOSARDataModule(root, cfg.modality, label_threshold=cfg.label_threshold,
                             img_size=cfg.img_size, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             radiometry=radiometry, plan=plan, dataset=dataset)
        dm.setup("fit")  # every file check now, before a model is built
        plan.echo()  # after the checks: a bad file stays the only line
        return dm

    def monitor_dataset(self, cfg, datamodule):
        from plugins.eo_sar.monitor import monitor_dataset

        return monitor_dataset(cfg, datamodule)

    def export_metadata(self, cfg, datamodule) -> dict[str, str]:
        """The exported backbone's ``input_*`` metadata: its bands and the statistics it was
        pretrained with (see :class:`domainfm.backbones.InputSpec`)."""
        from plugins.eo_sar.normalization import export_metadata

        ds = datamodule.dataset
        return export_metadata(datamodule.plan, ds.stats.mean, ds.stats.std, cfg.modality)

    def finetune_datamodule(self, cfg, *, img_size: int, batch_size: int, num_workers: int = 0,
                            in_chans: int | None = None, seed: int = 0):
        """Multi-label land-cover patches for another plugin's fine-tuning: see
        :mod:`plugins.eo_sar.finetune_data`."""
        from plugins.eo_sar.finetune_data import finetune_datamodule

        return finetune_datamodule(cfg, img_size=img_size, batch_size=batch_size, num_workers=num_workers,
                                   in_chans=in_chans, seed=seed)

    def band_alignment(self, have, want):
        """Sentinel-1/2 band names aligned by name: :func:`plugins.eo_sar.bands.plan_band_alignment`."""
        from plugins.eo_sar.bands import plan_band_alignment

        return plan_band_alignment(have, want)

    # -- predict ----------------------------------------------------------------------------------

    def predict(self, model, inputs, out, options) -> dict[str, Any]:
        """``domainfm predict`` of an eo-sar backbone: embeddings of GeoTIFF patches (see
        :mod:`plugins.eo_sar.predict`)."""
        from plugins.eo_sar.predict import predict

        return predict(model, inputs, out, options)

    def patches_for_model(self, inputs, spec, size: int, *, gsd_tolerance: float | None = None,
                          s2_harmonize: str = "auto", s1_units: str = "db"):
        """GeoTIFF patches (files, folders, per-band folders) read for a model that records ``spec``
        (an InputSpec with Sentinel-1/2 band names): a dataset of ``{"image": float32 [C, size,
        size]}`` (normalised with ``spec``'s statistics, aligned by band name, resized) and the
        per-patch plans (``.source.path``, ``.height``, ``.width``, ``.plan.alignment``). Every
        patch is checked first (see :func:`plugins.eo_sar.predict.plan_patch`)."""
        from plugins.eo_sar.predict import GSD_TOLERANCE, PreparedPatches, check_spec, find_patches, plan_patch

        check_spec(spec, spec.source if spec is not None else "the model")
        tol = GSD_TOLERANCE if gsd_tolerance is None else float(gsd_tolerance)
        plans = [plan_patch(s, spec, gsd_tolerance=tol) for s in find_patches(inputs)]
        return PreparedPatches(plans, size, s2_harmonize=s2_harmonize, s1_units=s1_units), plans

    # -- evaluation and extra commands ------------------------------------------------------------

    def evaluate(self, cfg) -> dict[str, Any]:
        from plugins.eo_sar.jobs import run_evaluation

        return run_evaluation(cfg, self)

    def commands(self) -> list:
        from plugins.eo_sar.commands import check_command, embed_command, plot_command, sample_command

        return [check_command, plot_command, sample_command, embed_command]


def predict_options() -> list:
    """``domainfm predict`` flags of an eo-sar model (bands, statistics, size and GSD come from the model)."""
    import click

    from domainfm import config

    return [
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=16, show_default=True,
                     help="Patches per forward pass."),
        click.Option(["--accelerator"], type=click.Choice(config.ACCELERATOR_CHOICES), default="auto",
                     show_default=True, help=config.ACCELERATOR_HELP),
        click.Option(["--precision"], type=click.Choice(config.PRECISION_CHOICES), default="32-true",
                     show_default=True, help=config.PRECISION_HELP),
        click.Option(["--gsd-tolerance"], type=click.FloatRange(0.0, min_open=True), default=0.25, show_default=True,
                     help="A patch whose pixel size differs from the model's GSD by more than this fraction is refused."),
        click.Option(["--s2-harmonize"], type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
                     help="Sentinel-2 baseline >= 04.00 (+1000 DN): auto subtracts 1000 where a file declares it."),
        click.Option(["--s1-units"], type=click.Choice(("db", "linear")), default="db", show_default=True,
                     help="Units of Sentinel-1 files: db, or linear power (converted with 10*log10)."),
    ]


def layout_options(command: str) -> list:
    """``--layout`` and the flags of the standard datasets (plugins.eo_sar.layouts)."""
    import click

    from domainfm.cli import PathParam
    from plugins.eo_sar.layout_names import EXPECTS, LAYOUTS, VIEWS

    opts = [
        click.Option(["--layout"], type=click.Choice(LAYOUTS), default="auto", show_default=True,
                     help="Data folder layout; auto recognises it from the contents and says which: "
                          + "; ".join(f"{k}: {v}" for k, v in EXPECTS.items()) + "."),
        click.Option(["--labels"], type=PathParam(dir_okay=False, fix="give the labels CSV (patch_id + one 0/1 column per "
                                                                  "Dynamic World class)"), default=None,
                     help="ssl4eo-s12: multi-labels per location from a CSV (patch_id = location id, one 0/1 "
                          "column per Dynamic World class)."),
        click.Option(["--landcover"], type=PathParam(file_okay=False, fix="give the folder of Dynamic World rasters "
                                                                     "<location id>.tif"), default=None,
                     help="ssl4eo-s12: multi-labels from Dynamic World rasters DIR/<location id>.tif "
                          "(a class is a label when it covers --label-threshold of the map)."),
    ]
    if command in ("pretrain", "check", "plot"):
        opts.append(click.Option(["--views"], type=click.Choice(VIEWS), default=None,
                                 help="ssl4eo-s12: seasons (default) gives teacher and student two different seasons "
                                      "of one location; crops gives two crops of one image."))
    if command == "evaluate":
        opts.append(click.Option(["--train-fraction"], type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0,
                                 show_default=True,
                                 help="Standard datasets: share of the official training split that fits the probes "
                                      "(seeded; SoftCon's BigEarthNet-10 % protocol is 0.1)."))
    return opts


plugin = EOSARPlugin()

__all__ = ["EOSARPlugin", "plugin"]
