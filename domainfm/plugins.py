"""Plugin discovery through the ``domainfm.plugins`` entry-point group.

A plugin is an object (usually an instance of :class:`Plugin`) exported by any installed package:

    [project.entry-points."domainfm.plugins"]
    my-domain = "my_package.plugin:plugin"

The core never names a plugin. A plugin's module must import quickly (no torch at import time)
because ``domainfm plugins`` and ``domainfm --help`` load every plugin to read its description.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import click
    from domainfm.config import RunConfig
    from domainfm.predict import ModelRef

GROUP = "domainfm.plugins"
PIPELINE_GROUP = "domainfm.pipelines"


class Plugin:
    """Base class for a domain plugin. Override what the domain supports.

    - ``pretrain_datamodule(cfg)``: a LightningDataModule whose batches are dicts with
      ``view_teacher`` and ``view_student`` (float tensors [B, C, H, W]) and ``labels``
      (float multi-hot [B, K], all zeros where a sample has no label).
    - ``finetune(cfg)`` / ``evaluate(cfg)``: run inside an active MLflow run opened by the core,
      log what they like to it, and return a dict of final metrics.
    - ``options(command)``: extra click options for ``pretrain``/``finetune``/``evaluate``; their
      values reach the plugin as ``cfg.<name>``.
    - ``defaults(command)``: overrides of core defaults (e.g. a smaller learning rate).
    - ``commands()``: extra click commands, shown as ``domainfm <plugin-name> <command>``.
    - ``predict(model, inputs, out, options)``: apply a model this plugin made to raw inputs
      (``domainfm predict``); ``options("predict")`` adds its flags.
    - ``finetune_datamodule(cfg, ...)`` / ``band_alignment(have, want)``: this domain's labelled
      data and band names for another plugin's fine-tuning (``plugins.load(name).finetune_datamodule``),
      so that no plugin imports another.
    """

    name: str = ""
    description: str = ""

    def in_chans(self, cfg: "RunConfig") -> int:
        return 3

    def options(self, command: str) -> list["click.Option"]:
        return []

    def defaults(self, command: str) -> dict[str, Any]:
        return {}

    def check(self, cfg: "RunConfig") -> None:
        """Validate the run's input (raise DomainFMError) before any MLflow run or model exists.
        Keep it cheap: headers and file lists, not full reads."""

    def pretrain_datamodule(self, cfg: "RunConfig"):
        raise DomainFMError(f"plugin {self.name!r} does not support pretrain")

    def export_metadata(self, cfg: "RunConfig", datamodule) -> dict[str, str]:
        """Extra safetensors/MLflow metadata of a backbone pretrained on ``datamodule``, e.g. the
        ``input_*`` keys of :class:`domainfm.backbones.InputSpec` (bands, mean/std it normalised with)."""
        return {}

    def monitor_dataset(self, cfg: "RunConfig", datamodule):
        """The pretraining health monitor's held-out labelled split (a ``domainfm.monitor.MonitorData``:
        dict samples with a model-ready ``image`` and ``labels``, plus group ids where known), drawn
        once (``cfg.val_fraction``, ``cfg.seed``) and REMOVED from ``datamodule``'s pretraining data.
        None (the default): the monitor reports RankMe and feature std on training images only."""
        return None

    def finetune(self, cfg: "RunConfig") -> dict[str, Any]:
        raise DomainFMError(f"plugin {self.name!r} does not support finetune")

    def finetune_datamodule(self, cfg: "RunConfig", *, img_size: int, batch_size: int, num_workers: int = 0,
                            in_chans: int | None = None, seed: int = 0):
        """This domain's labelled data for another plugin's fine-tuning (sgd-ft asks
        ``plugins.load("eo-sar")``): a LightningDataModule, set up on return (every data mistake a
        DomainFMError now, before any model is built).

        ``cfg``: the run's config; the plugin reads its data options from it (``cfg.data``, None for
        the plugin's own sample, and the options it documents, e.g. eo-sar's ``modality``,
        ``layout``, ``label_threshold``). ``img_size``: every image is resized to [S, S];
        ``in_chans``: the band count the caller expects (DomainFMError when the data disagrees);
        ``seed``: fixes any split the plugin draws itself.

        Batches are dicts ``{"image": float [B, C, S, S] (normalised), "labels": float [B, K]
        (multi-hot)}``. Attributes: ``task`` ("multilabel"), ``classes`` (K class names),
        ``num_outputs`` (K), ``in_chans`` (C), ``bands`` (C band names, or None), ``mean``/``std``
        (the C per-band statistics the images are normalised with, in the data's units),
        ``train_set``/``val_set``/``test_set`` (map-style datasets of single samples, ``test_set``
        may be None), ``has_test``; ``use_statistics(mean, std)`` normalises with other statistics
        (e.g. a backbone's) from then on.
        """
        raise DomainFMError(f"plugin {self.name!r} offers no fine-tuning data")

    def band_alignment(self, have, want):
        """How data bands ``have`` map onto a model's bands ``want`` by name, in this domain's band
        vocabulary: an object with ``have``/``want`` (the names, normalised), ``changed``,
        ``summary()`` (one line) and ``apply(image)`` ([C, H, W] or [B, C, H, W] in ``have`` order ->
        ``want`` order, missing bands filled with 0, the mean after normalisation). DomainFMError
        when the two lists share no band, or when the plugin names no bands."""
        raise DomainFMError(f"plugin {self.name!r} names no bands to align")

    def evaluate(self, cfg: "RunConfig") -> dict[str, Any]:
        raise DomainFMError(f"plugin {self.name!r} does not support evaluate")

    def predict(self, model: "ModelRef", inputs: list[str], out: "Path", options: dict[str, Any]) -> dict[str, Any]:
        """``domainfm predict --model URI INPUT... --out DIR``: apply ``model`` (a
        :class:`domainfm.predict.ModelRef` this plugin made: ``uri``, ``local_path()``, ``version``)
        to the raw ``inputs`` with the settings the model records (nothing it knows is asked again)
        and write the results under ``out`` (created by the core). Runs inside an MLflow run the
        core opened and tagged with the model version; log files to it with ``domainfm.tracking``.
        ``options``: the values of this plugin's ``options("predict")`` flags plus the core's
        ``device``/``batch_size`` when given. Returns a summary (scalars are logged as metrics,
        ``files``: the paths written). Raises DomainFMError for an input the model cannot take,
        naming the setting that differs."""
        raise DomainFMError(f"plugin {self.name!r} has no predict",
                            fix="apply this model with the plugin's own commands")

    def commands(self) -> list["click.Command"]:
        return []

    @property
    def supported(self) -> list[str]:
        base = Plugin
        out = []
        for meth, cmd in (("pretrain_datamodule", "pretrain"), ("finetune", "finetune"), ("evaluate", "evaluate"),
                          ("predict", "predict")):
            if getattr(type(self), meth) is not getattr(base, meth):
                out.append(cmd)
        return out


@dataclass(frozen=True)
class PluginInfo:
    name: str
    description: str
    package: str
    commands: tuple[str, ...]
    error: str | None = None
    #: the core commands (pretrain/finetune/evaluate/predict) it supports, and its own subcommands
    core_commands: tuple[str, ...] = ()
    own_commands: tuple[str, ...] = ()


def _entry_points(group: str):
    return {ep.name: ep for ep in entry_points(group=group)}


def names() -> list[str]:
    return sorted(_entry_points(GROUP))


def load(name: str) -> Plugin:
    """The plugin registered as ``name``; a clear error lists the installed ones otherwise."""
    eps = _entry_points(GROUP)
    if name not in eps:
        installed = ", ".join(sorted(eps)) or "none"
        raise DomainFMError(f"unknown plugin {name!r}; installed plugins: {installed}",
                            fix="pick one of those, or pip install the package that provides it")
    try:
        obj = eps[name].load()
    except Exception as e:  # a broken third-party plugin must not hide the others
        raise DomainFMError(f"plugin {name!r} ({eps[name].value}) failed to import: {e}") from None
    if isinstance(obj, type):
        obj = obj()
    if not getattr(obj, "name", None):
        obj.name = name
    return obj


def available() -> list[PluginInfo]:
    """Every installed plugin, with the package that provides it."""
    infos = []
    for name, ep in sorted(_entry_points(GROUP).items()):
        package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0].split(".")[0]
        try:
            p = load(name)
            core, own = tuple(p.supported), tuple(c.name for c in p.commands())
            infos.append(PluginInfo(name, p.description, package, core + own, core_commands=core, own_commands=own))
        except Exception as e:  # one broken plugin must not hide the others
            infos.append(PluginInfo(name, "", package, (), error=str(e)))
    return infos


def pipelines() -> dict[str, Any]:
    """Entry points of the ``domainfm.pipelines`` group (click commands), not yet loaded."""
    return _entry_points(PIPELINE_GROUP)
