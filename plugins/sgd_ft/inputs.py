"""Fit the fine-tuning data to the backbone's input bands, and say so (never silently).

- A backbone that records its bands (an eo-sar export, a torchgeo SoftCon enum: see
  :class:`domainfm.backbones.InputSpec`) keeps them: 3-band RGB images feed a Sentinel-2 model's
  B4, B3, B2 by name, every other band is filled with its mean (0 after normalisation); the
  patch embedding is not touched. eo-sar patches are normalised with the backbone's statistics.
  Band names are the eo-sar plugin's vocabulary, asked for through
  ``domainfm.plugins.load("eo-sar").band_alignment`` (a plugin never imports another).
- A backbone whose weights have another band count and no band names gets its patch embedding
  re-adapted (``--patch-embed-init``), announced in one line.
Each decision is one line on stderr and a tag on the MLflow run.
"""

from __future__ import annotations

from typing import Any

RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Sentinel-2's true-colour bands: red, green, blue. An RGB image fed to a Sentinel-2 model carries these names.
S2_RGB_BANDS = ("B4", "B3", "B2")
BAND_PLUGIN = "eo-sar"  # the plugin whose band vocabulary (Sentinel-1/2 names) aligns bands by name


class AlignedSplit:
    """A split whose ``image`` is aligned to the model's bands (other attributes pass through)."""

    def __init__(self, dataset, alignment) -> None:
        self.dataset = dataset
        self.alignment = alignment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.dataset[i]
        return {**sample, "image": self.alignment.apply(sample["image"])}

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)


def weights_band_count(source: str | None, spec) -> int | None:
    """How many input bands the weights ``source`` were trained with (None: unknown / random)."""
    if spec is not None and spec.bands:
        return len(spec.bands)
    if not source or source == "random":
        return None
    if source in ("dinov2", "pretrained"):
        return 3
    from domainfm.backbones import read_metadata

    if source.startswith("torchgeo:"):
        from domainfm.backbones import torchgeo_weights

        return int(torchgeo_weights(source).meta.get("in_chans") or 0) or None
    meta = read_metadata(source) if not source.startswith("models:/") else {}
    return int(meta["in_chans"]) if "in_chans" in meta else None


def match_backbone_bands(cfg, dm) -> dict[str, str]:
    """Align ``dm`` (an sgd-ft datamodule, already set up) to the backbone ``cfg`` starts from;
    prints one line per change and returns the MLflow tags recording it. May set ``dm.in_chans``."""
    import click

    from domainfm.backbones import input_spec_of

    source = cfg.weights or cfg.init
    spec = input_spec_of(source)
    data_chans = int(dm.in_chans)
    tags = {"sgd_ft.weights_source": str(source), "sgd_ft.data_bands": str(data_chans)}
    lines: list[str] = []
    data_names = _data_band_names(dm, spec)
    if spec is not None and spec.bands and data_names is not None:
        from domainfm import plugins

        alignment = plugins.load(BAND_PLUGIN).band_alignment(data_names, spec.bands)
        tags["sgd_ft.data_bands"] = ",".join(alignment.have)
        if alignment.changed:
            for split in ("train_set", "val_set", "test_set"):
                if getattr(dm, split, None) is not None:
                    setattr(dm, split, AlignedSplit(getattr(dm, split), alignment))
            dm.in_chans = len(alignment.want)
            lines.append(f"the backbone takes {len(spec.bands)} named bands; the data's {', '.join(alignment.have)} "
                         f"are aligned by name ({alignment.summary()}); its patch embedding is kept")
            tags["sgd_ft.band_alignment"] = alignment.summary()
        tags["sgd_ft.input_change"] = "aligned by name" if alignment.changed else "none"
    else:
        trained = weights_band_count(str(source), spec)
        if trained is not None and trained != data_chans:
            lines.append(f"the patch embedding of {source} ({trained} bands) is re-adapted to the data's {data_chans} "
                         f"bands (--patch-embed-init {cfg.patch_embed_init}): its band-specific weights are "
                         "replaced, not reused")
            tags["sgd_ft.input_change"] = f"patch embedding re-adapted {trained} -> {data_chans} bands"
        else:
            tags["sgd_ft.input_change"] = "none"
    tags["sgd_ft.in_chans"] = str(dm.in_chans)
    for line in lines:
        click.echo(f"sgd-ft: {line}", err=True)
    return tags


def _data_band_names(dm, spec) -> tuple[str, ...] | None:
    """Names of the data's bands when known: a plugin's finetune datamodule (eo-sar patches)
    carries them as ``dm.bands``; 3-band RGB images are B4, B3, B2 for a Sentinel-2 backbone
    (red, green, blue)."""
    if getattr(dm, "bands", None):
        _use_backbone_stats(dm, spec)
        return tuple(dm.bands)
    train = getattr(dm, "train_set", None)
    files = getattr(train, "files", None) or []
    if (spec is not None and spec.bands and all(str(b).startswith("B") for b in spec.bands) and int(dm.in_chans) == 3
            and files and all(str(f.path).lower().endswith(RGB_SUFFIXES) for f in files)):
        return S2_RGB_BANDS
    return None


def _use_backbone_stats(dm, spec) -> None:
    """eo-sar patches are normalised with the backbone's recorded statistics, when it has them."""
    import click

    if spec is None or not spec.has_stats:
        click.echo("sgd-ft: the backbone records no normalisation statistics: the eo-sar patches are normalised "
                   "with the data's own", err=True)
        return
    by_band = dict(zip(spec.bands, zip(spec.mean, spec.std)))
    mean = tuple(float(by_band[b][0]) if b in by_band else m for b, m in zip(dm.bands, dm.mean))
    std = tuple(float(by_band[b][1]) if b in by_band else s for b, s in zip(dm.bands, dm.std))
    dm.use_statistics(mean, std)
    click.echo(f"sgd-ft: normalising the eo-sar patches with the backbone's own statistics ({spec.source})", err=True)
