"""The one place that talks to MLflow.

Without ``MLFLOW_TRACKING_URI`` runs go to ``sqlite:///mlruns/mlflow.db`` with artifacts under
``mlruns/artifacts`` in the current folder (MLflow 3 refuses the old ``./mlruns`` file store); with
``MLFLOW_TRACKING_URI=sqlite:///PATH/mlflow.db`` artifacts go to ``PATH/artifacts``.
Everything else in domainfm calls these helpers, so the store, the experiment naming and the
model format are decided here once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig

LOCAL_DIR = "mlruns"
_PARAM_MAX = 6000  # MLflow's limit on a param value


def _local_root() -> Path:
    return Path.cwd() / LOCAL_DIR


def _default_uri() -> str:
    return f"sqlite:///{_local_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def _is_default_store() -> bool:
    # compared by value: mlflow.set_tracking_uri exports the URI to the environment itself
    return tracking_uri() == _default_uri()


def configure() -> str:
    """Point mlflow at our store (tracking and registry) and return its URI."""
    import logging

    import mlflow

    from domainfm.output import quiet_third_parties

    quiet_third_parties()  # MLflow's download bars and type-hint advice
    uri = tracking_uri()
    if _is_default_store():
        _local_root().mkdir(parents=True, exist_ok=True)
    if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
        raise DomainFMError(f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 refuses",
                            fix="use sqlite:///path/mlflow.db or an http:// server")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # alembic's migration chatter on a fresh sqlite store is noise for the user
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return uri


def artifact_root(uri: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store, ``<folder of the .db>/artifacts``
    (the default store's is ``mlruns/artifacts``), whatever folder the command runs from, so that
    ``mlflow ui --backend-store-uri sqlite:///PATH/mlflow.db --default-artifact-root PATH/artifacts``
    finds every file the runs wrote.
    None for a server or another database: the server decides."""
    from urllib.parse import unquote

    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    # sqlite:///rel/path.db is relative to the working folder, sqlite:////abs/path.db absolute
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    db = Path(path)
    if not db.is_absolute():
        db = Path.cwd() / db
    return (db.parent.resolve() / "artifacts").as_uri()


def experiment_id(name: str) -> str:
    import mlflow

    configure()
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(name, artifact_location=artifact_root())
    except DomainFMError:
        raise
    except Exception as e:
        raise DomainFMError(f"cannot reach the MLflow store at {tracking_uri()} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                            fix="start the server or fix MLFLOW_TRACKING_URI") from None


@contextlib.contextmanager
def start_run(cfg: "RunConfig | None" = None, *, run_id: str | None = None, nested: bool = False,
              run_name: str | None = None, experiment: str | None = None) -> Iterator[Any]:
    """An MLflow run in the run's experiment; ``run_id`` reopens an existing run (``--resume``)."""
    import mlflow

    name = experiment or (cfg.experiment_name if cfg is not None else "domainfm")
    exp_id = experiment_id(name)
    kwargs: dict[str, Any] = {"nested": nested}
    if run_id:
        kwargs["run_id"] = run_id
    else:
        kwargs["experiment_id"] = exp_id
        kwargs["run_name"] = run_name or ((cfg.run_name or default_run_name(cfg)) if cfg is not None else None)
    with mlflow.start_run(**kwargs) as run:
        yield run


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:_PARAM_MAX]
    return out


def log_config(cfg: "RunConfig") -> None:
    """The resolved settings of the run's command (no other command's fields), as params
    (searchable) and as config.yaml (re-runnable with ``--config``)."""
    import mlflow
    import yaml

    settings = cfg.command_dict()
    params = _flatten(settings)
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    # a resumed run already holds its params; MLflow refuses to change a logged param
    new = {k: v for k, v in params.items() if k not in existing}
    for i in range(0, len(new), 100):
        chunk = dict(list(new.items())[i:i + 100])
        mlflow.log_params(chunk)
    mlflow.log_text(yaml.safe_dump(settings, sort_keys=True), "config.yaml")


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        mlflow.log_metrics(scalars, step=step)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_loss_curves(run_id: str, keys: tuple[str, ...], artifact_file: str) -> None:
    """A plot of the run's metric histories (people look at curves, not at tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:  # a run of 0 steps logs no curve
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    log_figure(fig, artifact_file)


def metric_panels_figure(run_id: str, keys: tuple[str, ...]):
    """One small panel per metric history of run ``run_id`` (metrics on different scales, e.g. the
    health monitor's k-NN mAP, RankMe and feature std), step on the x axis; None if none was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient()
    hists = {k: sorted(client.get_metric_history(run_id, k), key=lambda m: m.step) for k in keys}
    hists = {k: h for k, h in hists.items() if h}
    if not hists:
        return None
    fig, axes = plt.subplots(1, len(hists), figsize=(3.2 * len(hists), 2.8), squeeze=False)
    for ax, (key, hist) in zip(axes[0], hists.items()):
        ax.plot([m.step for m in hist], [m.value for m in hist], marker="o")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_metric_panels(run_id: str, keys: tuple[str, ...], artifact_file: str) -> None:
    """:func:`metric_panels_figure` logged to the active run as ``artifact_file``."""
    fig = metric_panels_figure(run_id, keys)
    if fig is not None:
        log_figure(fig, artifact_file)


def log_table_artifact(rows: list[dict[str, Any]], artifact_file: str) -> None:
    import mlflow

    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buf.getvalue(), artifact_file)


def pip_requirements() -> list[str]:
    """Pinned to what is installed, so the logged model reloads with the same numbers."""
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "timm", "safetensors"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except Exception:  # pragma: no cover - the package is a dependency
            reqs.append(pkg)
    return reqs


def log_artifacts(local_dir: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    """One file into the active run."""
    import mlflow

    mlflow.log_artifact(str(local_path), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    """``text`` as the artifact ``artifact_file`` of the active run (a markdown table, a report)."""
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_params(params: dict[str, Any]) -> None:
    """A command's parameters (flattened, stringified) on the active run."""
    import mlflow

    flat = _flatten(params)
    for i in range(0, len(flat), 100):
        mlflow.log_params(dict(list(flat.items())[i:i + 100]))


def log_backbone_model(python_model_file: str | Path, safetensors_path: str | Path, in_chans: int, embed_dim: int,
                       *, metadata: dict[str, Any] | None = None, artifact_path: str = "backbone",
                       register: str | None = None, alias: str | None = None,
                       version_tags: dict[str, str] | None = None) -> str:
    """Log ``python_model_file`` (``domainfm/backbone_model.py``, a models-from-code pyfunc: no
    pickle) over a safetensors backbone export: input float32 ``[N, in_chans, H, W]`` of any N, H, W
    (TensorSpec ``(-1, in_chans, -1, -1)``; the model resizes to its input size), output ``[N,
    embed_dim]``. ``metadata`` goes into the MLmodel file (``domainfm.plugin``, ``domainfm.input``).
    Registered as ``register`` (with ``alias``, the version tagged ``version_tags``) when given."""
    import warnings

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(in_chans), -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(embed_dim)))]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hint.*")
        info = mlflow.pyfunc.log_model(name=artifact_path, python_model=str(python_model_file),
                                       artifacts={"backbone": str(safetensors_path)}, signature=signature,
                                       metadata=dict(metadata or {}), pip_requirements=pip_requirements())
    if register:
        register_model(info.model_uri, register, alias, tags=version_tags)
    return info.model_uri


def log_raw_pixels_model(python_model_file: str | Path, safetensors_path: str | Path, bands: list[str], *,
                         embed_dim: int | None = None, metadata: dict[str, Any] | None = None,
                         artifact_path: str = "backbone", register: str | None = None,
                         alias: str | None = None, version_tags: dict[str, str] | None = None) -> str:
    """Log ``python_model_file`` (``domainfm/raw_pixels_model.py``) over a backbone export that
    records its input: the pyfunc takes raw pixels as a dict of named [N, H, W] bands of any N, H, W
    (``bands``, the input schema: one optional column per band, each an array of arrays of arrays)
    and aligns, normalises and resizes them itself (see that module); output ``[N, embed_dim]``.
    ``metadata`` goes into the MLmodel file (``domainfm.plugin``, ``domainfm.input``)."""
    import warnings

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    # one OPTIONAL column per band, each an [N, H, W] array (any batch and patch size: the model
    # resizes to its input size itself), so that a band the input lacks (B10 of L2A data) passes
    # MLflow's schema check and is filled with its mean by the model. TensorSpec cannot be
    # optional (mlflow 3.x: TensorSpec.required is always True), a ColSpec can (required=False).
    signature = ModelSignature(
        inputs=Schema([ColSpec(Array(Array(Array(DataType.double))), name=b, required=False) for b in bands]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(embed_dim) if embed_dim else -1))]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hint.*")
        info = mlflow.pyfunc.log_model(name=artifact_path, python_model=str(python_model_file),
                                       artifacts={"backbone": str(safetensors_path)}, signature=signature,
                                       metadata=dict(metadata or {}), pip_requirements=pip_requirements())
    if register:
        register_model(info.model_uri, register, alias, tags=version_tags)
    return info.model_uri


def log_pyfunc_model(python_model_file: str | Path, artifacts: dict[str, str], *, artifact_path: str,
                     input_example: Any, register: str | None = None, alias: str | None = None,
                     extra_pip: list[str] | None = None, metadata: dict[str, Any] | None = None,
                     version_tags: dict[str, str] | None = None) -> str:
    """Log a models-from-code pyfunc (no pickle): ``python_model_file`` calls set_model().
    ``metadata`` goes into the MLmodel file (give ``domainfm.plugin`` and what the model needs to
    be applied); ``version_tags`` tag the registered version (``jobs.version_tags(plugin)``)."""
    import mlflow

    kwargs = {"metadata": dict(metadata)} if metadata else {}
    info = mlflow.pyfunc.log_model(name=artifact_path, python_model=str(python_model_file), artifacts=artifacts,
                                   input_example=input_example,
                                   pip_requirements=pip_requirements() + list(extra_pip or []), **kwargs)
    if register:
        register_model(info.model_uri, register, alias, tags=version_tags)
    return info.model_uri


def register_model(model_uri: str, name: str, alias: str | None = None,
                   tags: dict[str, str] | None = None) -> int:
    """Register ``model_uri`` as a new version of ``name`` (tagged ``tags``: the plugin, the training
    run, the data it saw), point ``alias`` at it; returns the version number."""
    import mlflow

    configure()
    mv = mlflow.register_model(model_uri, name, tags={k: str(v)[:5000] for k, v in (tags or {}).items()} or None)
    if alias:
        set_alias(name, int(mv.version), alias)
    run = mlflow.active_run()
    if run is not None:
        mlflow.set_tag("registered_model", f"models:/{name}/{mv.version}" + (f" (@{alias})" if alias else ""))
    return int(mv.version)


def set_version_metrics(name: str, version: str | int, metrics: dict[str, Any], run_id: str, *,
                        prefix: str = "metric.") -> dict[str, str]:
    """Write the scalar ``metrics`` of run ``run_id`` (an evaluation) as tags ``<prefix><name>`` of
    model version ``name``/``version``, plus ``<prefix>run_id``; the version's earlier ``<prefix>*``
    tags are removed first, so its tags are always the latest evaluation's. Returns the tags set."""
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    mv = client.get_model_version(name, str(version))
    for key in list((mv.tags or {})):
        if key.startswith(prefix):
            client.delete_model_version_tag(name, str(version), key)
    tags = {f"{prefix}{k}": f"{float(v):.6g}" for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags[f"{prefix}run_id"] = run_id
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    return tags


def search_runs_by_tag(key: str, value: str) -> list[Any]:
    """Every run, in every experiment of the store, whose tag ``key`` is ``value`` (newest first):
    MLflow ``Run`` objects (``info``, ``data.tags``, ``data.metrics``, ``data.params``)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    configure()
    client = MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not exp_ids:
        return []
    escaped = value.replace("'", "\\'")
    return list(client.search_runs(exp_ids, filter_string=f"tags.`{key}` = '{escaped}'", run_view_type=ViewType.ALL,
                                   order_by=["attributes.start_time DESC"]))


def discard_run(run_id: str) -> None:
    """Delete run ``run_id`` (one an input mistake ended before it recorded anything worth keeping):
    it leaves the experiment's list of runs (MLflow's deleted stage)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().delete_run(run_id)


def get_run(run_id: str):
    """The MLflow ``Run`` ``run_id`` (``info``, ``data``), or None when the store does not know it."""
    from mlflow import MlflowClient

    configure()
    try:
        return MlflowClient().get_run(run_id)
    except Exception:
        return None


def set_alias(name: str, version: int, alias: str) -> None:
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except Exception:
        raise DomainFMError(f"registered model {name!r} has no version {version}",
                            fix="see `domainfm registry list`") from None
    client.set_registered_model_alias(name, alias, str(version))


def model_version(model_uri: str):
    """The registered version that ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``models:/NAME`` (its latest version) names: an MLflow ``ModelVersion`` (``name``, ``version``,
    ``run_id``, ``tags``, ``aliases``). DomainFMError when the registry does not know it."""
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else model_uri
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        latest = max(client.search_model_versions(f"name='{ref}'"), key=lambda v: int(v.version), default=None)
        if latest is None:
            raise LookupError(ref)
        return client.get_model_version(latest.name, latest.version)
    except Exception:
        raise DomainFMError(f"{model_uri} is not in the MLflow registry at {tracking_uri()}",
                            fix="check the name and alias with `domainfm registry list`") from None


def log_to_model_run(model_uri: str, local_path: str | Path, artifact_path: str | None = None) -> str:
    """Log a file to the run that produced the registered version ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``; returns that run's id."""
    from mlflow import MlflowClient

    mv = model_version(model_uri)
    if not mv.run_id:
        raise DomainFMError(f"{model_uri} has no source run to log to", fix="register models made by domainfm")
    MlflowClient().log_artifact(mv.run_id, str(local_path), artifact_path)
    return mv.run_id


def run_tags(run_id: str) -> dict[str, str]:
    """The tags of run ``run_id``; DomainFMError when the store does not know the run."""
    from mlflow import MlflowClient

    configure()
    try:
        return dict(MlflowClient().get_run(run_id).data.tags)
    except Exception:
        raise DomainFMError(f"run {run_id} is not in the MLflow store at {tracking_uri()}",
                            fix="check the run id in the MLflow UI") from None


def check_registered(model_uri: str) -> None:
    """DomainFMError unless ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names a version in
    the registry (a cheap lookup, before a command opens its run)."""
    model_version(model_uri)


def download_model(uri: str) -> Path:
    """Download the artifacts of ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, or any
    MLflow artifact URI) from our store into a local folder and return its path."""
    import mlflow

    configure()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise DomainFMError(f"cannot fetch {uri} from the MLflow registry at {tracking_uri()} ({e})",
                            fix="check the name and alias with `domainfm registry list`") from None


def list_registered(name: str | None = None) -> list[dict[str, Any]]:
    import datetime

    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    rows = []
    flt = f"name='{name}'" if name else None
    for found in client.search_model_versions(flt):
        # search results leave aliases out; the version itself carries them
        mv = client.get_model_version(found.name, found.version)
        aliases = list(getattr(mv, "aliases", []) or [])
        created = datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append({"name": mv.name, "version": int(mv.version), "aliases": aliases, "run_id": mv.run_id,
                     "created": created, "tags": dict(mv.tags or {})})
    if name and not rows:
        raise DomainFMError(f"no registered model named {name!r} at {tracking_uri()}",
                            fix="see `domainfm registry list` for the registered names")
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def set_tags(tags: dict[str, Any]) -> None:
    """Tags on the active run (what a run decided: statistics used, bands aligned...)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})


def active_run_id() -> str | None:
    """The id of the active MLflow run, or None."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def lightning_logger(experiment: str, run_id: str | None = None):
    """Lightning's MLFlowLogger bound to the run ``run_id`` (default: the active run; it needs the
    tracking URI spelled out), or False when there is no run (Lightning then logs nothing). Passed
    to ``training.build_trainer(logger=...)``."""
    from lightning.pytorch.loggers import MLFlowLogger

    run_id = run_id or active_run_id()
    if not run_id:
        return False
    return MLFlowLogger(experiment_name=experiment, tracking_uri=configure(), run_id=run_id, log_model=False)


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows as an MLflow table (``mlflow.log_table``: a JSON artifact the MLflow UI shows and
    ``mlflow.load_table`` reads back); ``artifact_file`` ends in ``.json``."""
    import mlflow

    if rows:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file)


def load_pyfunc_model(model_uri: str):
    """An MLflow pyfunc model (``models:/NAME@ALIAS``, ``runs:/ID/PATH`` or a model folder) from the
    store :func:`configure` points at; MLflow's own exception when it cannot be loaded."""
    import mlflow

    return mlflow.pyfunc.load_model(str(model_uri))


def model_run_tag(model_uri: str, key: str) -> str | None:
    """Tag ``key`` of the run that logged the registered version ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``; None when the URI names no version, the version has no run, the run
    lacks the tag, or the registry does not know the URI (the model loader reports that one)."""
    from mlflow import MlflowClient

    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    if not ref or ("@" not in ref and "/" not in ref):
        return None
    try:
        version = model_version(model_uri)
        return MlflowClient().get_run(version.run_id).data.tags.get(key) if version.run_id else None
    except Exception:
        return None


def metric_spans(run_id: str, keys: tuple[str, ...]) -> dict[str, tuple[float, float, int, int]]:
    """``{key: (first, last, first_step, last_step)}``: the values of each metric at its lowest and
    highest logged step in run ``run_id``, and those steps (keys never logged are left out)."""
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    out: dict[str, tuple[float, float, int, int]] = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if hist:
            out[key] = (float(hist[0].value), float(hist[-1].value), int(hist[0].step), int(hist[-1].step))
    return out


def default_run_name(cfg: "RunConfig") -> str:
    """A run's name when ``--run-name`` is not given: command, plugin, modality (a plugin option,
    when it has one) and the backbone, e.g. ``pretrain-eo-sar-s2-vit_small_patch14_dinov2``. For
    ``evaluate`` the model it scores (``NAME@ALIAS`` of a models:/ URI, else the file's stem)."""
    model = getattr(cfg, "model", None)
    if cfg.command == "evaluate" and model:
        what = model[len("models:/"):] if model.startswith("models:/") else Path(model).stem
    else:
        what = cfg.backbone
    parts = [cfg.command, cfg.plugin, cfg.options.get("modality"), what]
    return "-".join(str(p) for p in parts if p)[:250]
