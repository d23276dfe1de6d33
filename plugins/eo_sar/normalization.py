"""Which statistics normalise the data and which bands the model sees: the backbone decides.

A backbone that records its input (:class:`domainfm.backbones.InputSpec`: bands, per-band
mean/std in reflectance x 10000 or dB) is fed data normalised with ITS statistics and aligned to
ITS bands by name (:func:`plugins.eo_sar.bands.align_bands`): the same scene gives the same
features whichever folder it sits in. ``--stats data`` recomputes the statistics from the data;
a backbone that records none (a timm or DINOv2 file) uses the data's. Every choice is printed as
one line on stderr and returned for MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import (MODALITY_BANDS, MODALITY_GSD_M, BandAlignment, plan_band_alignment, sensor_of)

STATS_MODES = ("backbone", "data")
UNITS = {"s2": "reflectance x 10000", "s1": "dB"}


@dataclass
class InputPlan:
    """How data with ``data_bands`` is prepared for a model taking ``model_bands``.

    ``mean``/``std``: per DATA band (what the dataset normalises with), None to compute them from
    the data; ``alignment``: data -> model bands after normalisation (missing bands filled with 0,
    the mean); ``stats_from``: ``"backbone"`` or ``"data"``; ``messages``: what to tell the user.
    """

    data_bands: tuple[str, ...]
    model_bands: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    stats_from: str
    alignment: BandAlignment
    spec: Any = None
    messages: list[str] = field(default_factory=list)

    def record(self) -> dict[str, str]:
        """Tags for the MLflow run."""
        return {"eo_sar.stats_from": self.stats_from, "eo_sar.band_alignment": self.alignment.summary(),
                "eo_sar.bands_filled": ",".join(self.alignment.filled),
                "eo_sar.bands_dropped": ",".join(self.alignment.dropped)}

    def echo(self) -> None:
        import click

        for line in self.messages:
            click.echo(f"eo-sar: {line}", err=True)


def plan_input(modality: str, spec: Any, stats_mode: str = "backbone", *, data_bands: Sequence[str] | None = None) -> InputPlan:
    """The :class:`InputPlan` for ``modality`` data fed to a backbone whose recorded input is
    ``spec`` (an InputSpec or None). Raises DomainFMError when the bands cannot be aligned."""
    if stats_mode not in STATS_MODES:
        raise DomainFMError(f"--stats {stats_mode!r} is not one of {', '.join(STATS_MODES)}")
    have = tuple(data_bands or MODALITY_BANDS[modality])
    spec_bands = tuple(spec.bands) if spec is not None and spec.bands else None
    want = spec_bands or have
    alignment = plan_band_alignment(have, want)  # no shared band: one line naming both lists
    messages = []
    has_stats = spec is not None and spec.has_stats and spec_bands is not None and len(spec.mean) == len(spec_bands)
    if has_stats and stats_mode == "backbone":
        by_band = dict(zip(spec_bands, zip(spec.mean, spec.std)))
        mean = tuple(float(by_band[b][0]) if b in by_band else 0.0 for b in have)
        std = tuple(float(by_band[b][1]) if b in by_band else 1.0 for b in have)  # dropped: never reaches the model
        stats_from = "backbone"
        messages.append(f"normalising with the backbone's own statistics ({len(spec_bands)} bands, {spec.source}); "
                        "--stats data recomputes them from the data")
    else:
        mean = std = None
        stats_from = "data"
        if has_stats:
            messages.append("--stats data: normalising with the data's own statistics, not the backbone's")
        else:
            what = spec.source if spec is not None else "a plain weights file or initialisation"
            messages.append(f"the backbone records no normalisation statistics ({what}): normalising with the "
                            "data's own statistics")
    if alignment.changed:
        messages.append(alignment.summary())
    return InputPlan(have, tuple(alignment.want), mean, std, stats_from, alignment, spec, messages)


class AlignBands:
    """Sample transform: ``image`` (normalised, [C, H, W]) aligned to the model's bands (missing
    bands 0 = the mean), ``bands`` renamed; then ``then`` (e.g. the two views) runs."""

    def __init__(self, alignment: BandAlignment, then: Callable[[dict], dict] | None = None) -> None:
        self.alignment = alignment
        self.then = then

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.alignment.changed:
            sample = {**sample, "image": self.alignment.apply(sample["image"]), "bands": self.alignment.want}
        return self.then(sample) if self.then is not None else sample


def export_metadata(plan: InputPlan, data_mean: Sequence[float], data_std: Sequence[float], modality: str) -> dict[str, str]:
    """``input_*`` metadata (see :class:`domainfm.backbones.InputSpec`) of a model trained on data
    prepared by ``plan``: model bands, the per-band mean/std it was normalised with (a filled band
    keeps the backbone's value), modality, GSD, units."""
    from domainfm.backbones import InputSpec

    by_band = dict(zip(plan.data_bands, zip(data_mean, data_std)))
    spec = plan.spec
    from_spec = dict(zip(spec.bands, zip(spec.mean, spec.std))) if spec is not None and spec.has_stats else {}
    mean, std = [], []
    for b in plan.model_bands:
        m, s = by_band.get(b) or from_spec.get(b) or (0.0, 1.0)
        mean.append(float(m))
        std.append(float(s))
    return InputSpec(bands=plan.model_bands, mean=tuple(mean), std=tuple(std), modality=modality,
                     gsd_m=MODALITY_GSD_M.get(modality), units=UNITS[sensor_of(modality)]).to_meta()


def spec_summary(meta: dict[str, str]) -> str:
    """One line naming what an export records, for logs."""
    bands = json.loads(meta.get("input_bands", "[]"))
    return f"{len(bands)} bands ({', '.join(bands)}), {meta.get('input_units', '?')}, modality {meta.get('input_modality')}"
