"""Which model ``domainfm predict`` applies, and which plugin made it.

``domainfm predict --model URI INPUT... --out DIR`` goes ``cli.predict`` → :func:`resolve_model`
(this module) → :func:`domainfm.jobs.run_prediction` (one MLflow run tagged with the model
version) → the model's own plugin's ``Plugin.predict``, which writes the files under ``DIR``.

A model names its plugin itself: a registered version or an MLflow run by the tag
``domainfm.plugin`` (of the version, else of the run that logged it), a domainfm safetensors export
by its ``plugin`` metadata key, an MLflow model folder by ``metadata.domainfm.plugin`` in its
``MLmodel`` file or by its run. ``--plugin`` overrides all of them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from domainfm.errors import DomainFMError

PLUGIN_TAG = "domainfm.plugin"
#: Tags of a prediction or evaluation run naming the registered version it applied.
MODEL_URI_TAG = "domainfm.model_uri"
MODEL_VERSION_TAG = "domainfm.model_version"
#: Tags of a registered model version: the run that trained it and the data that run saw.
TRAINING_RUN_TAG = "domainfm.training_run"
DATA_ROOT_TAG = "domainfm.data_root"
DATA_FINGERPRINT_TAG = "domainfm.data_fingerprint"
#: Prefix of the model-version tags holding an evaluation's headline metrics (``metric.run_id``:
#: the evaluation run they come from).
METRIC_TAG_PREFIX = "metric."


@dataclass
class ModelRef:
    """A trained model as ``domainfm predict`` received it.

    ``uri``: as given (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/PATH``, a
    file or an MLflow model folder). ``plugin``: the plugin that made it. ``name``/``version``: the
    registered model version (None for a file). ``run_id``: the run that logged it, when known.
    """

    uri: str
    plugin: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    _local: Path | None = None

    @property
    def is_registered(self) -> bool:
        return self.version is not None

    @property
    def version_label(self) -> str | None:
        """``NAME/VERSION`` of a registered model, else None."""
        return f"{self.name}/{self.version}" if self.is_registered else None

    def local_path(self) -> Path:
        """A local copy: the file or folder itself, or the downloaded artifacts of a registry or
        run URI (fetched once)."""
        if self._local is None:
            if self.uri.startswith(("models:/", "runs:/")):
                from domainfm import tracking

                # the version resolved once, not the alias again (it may have moved since)
                self._local = tracking.download_model(f"models:/{self.version_label}" if self.is_registered
                                                      else self.uri)
            else:
                self._local = Path(self.uri)
        return self._local


def pin_model(uri: str) -> tuple[str, str | None]:
    """The one place a registered model's alias is resolved: ``(models:/NAME/VERSION, "NAME/VERSION")``
    for ``models:/NAME@ALIAS`` (or ``models:/NAME``, its latest version, or ``models:/NAME/VERSION``
    itself), ``(uri, None)`` for anything else (a file, a ``runs:/`` URI). A command resolves its
    ``--model`` once with this and then loads, fingerprints and records the VERSION (tag
    :data:`MODEL_VERSION_TAG`), so that moving the alias later never mixes two versions' outputs.
    Raises DomainFMError when the registry does not know the URI."""
    if not str(uri).startswith("models:/"):
        return str(uri), None
    from domainfm import tracking

    mv = tracking.model_version(uri)
    label = f"{mv.name}/{mv.version}"
    return f"models:/{label}", label


def resolve_model(uri: str, plugin: str | None = None) -> ModelRef:
    """The :class:`ModelRef` of ``uri``; ``plugin`` (``--plugin``) overrides what the model records.

    Raises DomainFMError for a missing file, a URI the MLflow store does not know, or a model that
    does not say which plugin made it (fix: pass ``--plugin``)."""
    from domainfm import tracking

    if uri.startswith("models:/"):
        mv = tracking.model_version(uri)
        tags = dict(mv.tags or {})
        recorded = tags.get(PLUGIN_TAG) or (tracking.run_tags(mv.run_id).get(PLUGIN_TAG) if mv.run_id else None)
        ref = ModelRef(uri, plugin or recorded or "", name=mv.name, version=str(mv.version), run_id=mv.run_id,
                       tags=tags)
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        ref = ModelRef(uri, plugin or tracking.run_tags(run_id).get(PLUGIN_TAG, ""), run_id=run_id)
    else:
        path = Path(uri)
        if not path.exists():
            raise DomainFMError(f"model {uri} does not exist",
                                fix="pass a domainfm export, an MLflow model folder or models:/NAME@ALIAS")
        from domainfm.backbones.sources import WEIGHT_SUFFIXES

        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            raise DomainFMError(f"is not a model: a {path.suffix or 'extension-less'} file", path=path,
                                fix="pass a domainfm export (.safetensors), an MLflow model folder or models:/NAME@ALIAS")
        ref = ModelRef(uri, plugin or _recorded_plugin(path) or "", _local=path)
    if not ref.plugin:
        raise DomainFMError(f"{uri} does not record which plugin made it",
                            fix="pass --plugin NAME (see `domainfm plugins`)")
    return ref


def _recorded_plugin(path: Path) -> str | None:
    """The plugin a local file or MLflow model folder records (None when it records none)."""
    from domainfm.backbones import read_metadata

    if path.is_file():
        return read_metadata(path).get("plugin")
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        import yaml

        try:
            doc = yaml.safe_load(mlmodel.read_text()) or {}
        except yaml.YAMLError:
            return None
        recorded = (doc.get("metadata") or {}).get(PLUGIN_TAG)
        if recorded:
            return str(recorded)
        if doc.get("run_id"):
            from domainfm import tracking

            try:
                return tracking.run_tags(doc["run_id"]).get(PLUGIN_TAG)
            except DomainFMError:
                return None
    return None
