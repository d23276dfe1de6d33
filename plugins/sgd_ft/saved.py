"""What a fine-tuned sgd-ft classifier records, and how it loads back (``domainfm predict``, the
registered MLflow model).

Saved files (safetensors, metadata str -> str):

- ``finetuned.safetensors`` (the run's ``weights``): the whole classifier (``backbone.model.*``,
  ``head.*``);
- the registered MLflow model (``--register NAME``): a models-from-code pyfunc
  (``plugins/sgd_ft/classifier_model.py``, MLmodel ``metadata: {domainfm.plugin: sgd-ft}``) over two
  artifacts, ``backbone.safetensors`` (a domainfm backbone export: ``domainfm.backbones.create_backbone``
  and ``--weights models:/...`` load it as is) and ``head.safetensors`` (the linear head).

Each carries: ``domainfm_name``, ``in_chans``, ``img_size``, ``embed_dim`` (the architecture and the
input size), ``task`` (multiclass | multilabel), ``classes`` (JSON list, the order of the scores),
``threshold`` (multi-label decisions, 0.5), ``plugin`` (``sgd-ft``), and the input as
:class:`domainfm.backbones.InputSpec` ``input_*`` keys: the band names (eo-sar patches: Sentinel-1/2
names, after alignment to the backbone's bands), the per-band mean/std the training data was
normalised with, their units, modality and GSD. ImageFolder data records no band names (the bands
are taken by position; units ``RGB scaled to 0..1`` for PNG/JPEG, ``GeoTIFF values as stored``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domainfm.errors import DomainFMError

PLUGIN = "sgd-ft"
MULTILABEL_THRESHOLD = 0.5
RGB_UNITS = "RGB scaled to 0..1"
TIFF_UNITS = "GeoTIFF values as stored"


def input_spec(cfg, dm):
    """The :class:`domainfm.backbones.InputSpec` of the data the classifier was trained on (see the
    module doc); ``dm`` is the run's datamodule after :func:`plugins.sgd_ft.inputs.match_backbone_bands`."""
    import numpy as np

    from domainfm.backbones import InputSpec, input_spec_of

    alignment = getattr(getattr(dm, "train_set", None), "alignment", None)
    mean = [float(m) for m in np.asarray(dm.mean, dtype=np.float64).ravel()]
    std = [float(s) for s in np.asarray(dm.std, dtype=np.float64).ravel()]
    data_bands = tuple(dm.bands) if getattr(dm, "bands", None) else None
    if data_bands is not None:  # eo-sar patches: named bands
        by_band = dict(zip(data_bands, zip(mean, std)))
        bands = tuple(alignment.want) if alignment is not None else data_bands
        start = input_spec_of(cfg.weights or cfg.init)
        from_start = (dict(zip(start.bands, zip(start.mean, start.std)))
                      if start is not None and start.has_stats and start.bands else {})
        pairs = [by_band.get(b) or from_start.get(b) or (0.0, 1.0) for b in bands]
        return InputSpec(bands=bands, mean=tuple(float(m) for m, _ in pairs), std=tuple(float(s) for _, s in pairs),
                         modality=getattr(dm, "modality", None), gsd_m=getattr(dm, "gsd_m", None),
                         units=getattr(dm, "units", None))
    if alignment is not None:  # RGB images fed to a named Sentinel-2 backbone: bands as B4, B3, B2
        return InputSpec(bands=tuple(alignment.have), mean=tuple(mean), std=tuple(std), units=RGB_UNITS)
    from plugins.sgd_ft.datasets import PIL_SUFFIXES

    files = getattr(dm.train_set, "files", None) or []
    rgb = bool(files) and all(f.path.suffix.lower() in PIL_SUFFIXES for f in files)
    return InputSpec(mean=tuple(mean), std=tuple(std), units=RGB_UNITS if rgb else TIFF_UNITS)


def classifier_metadata(model, cfg, dm) -> dict[str, str]:
    """The safetensors metadata of the classifier ``model`` trained on ``dm`` (see the module doc)."""
    b = model.backbone
    meta = {"domainfm_name": b.name, "in_chans": str(b.in_chans), "img_size": str(b.img_size),
            "embed_dim": str(b.embed_dim), "task": dm.task, "classes": json.dumps(list(dm.classes)),
            "plugin": PLUGIN}
    if dm.task == "multilabel":
        meta["threshold"] = str(MULTILABEL_THRESHOLD)
    meta.update(input_spec(cfg, dm).to_meta())
    return meta


def save_classifier(model, path: Path, meta: dict[str, str]) -> Path:
    """The fine-tuned weights (backbone + head) as safetensors with ``meta``, written under a
    temporary name and renamed so an interrupted save never leaves a half file."""
    from domainfm.backbones import save_weights

    return save_weights(model.state_dict(), path, meta)


def log_classifier(model, meta: dict[str, str], *, register: str | None = None, alias: str | None = None) -> str:
    """Log the classifier as an MLflow model (``backbone.safetensors`` + ``head.safetensors`` under
    the models-from-code pyfunc ``classifier_model.py``) in the active run, registered as
    ``register`` with ``alias`` when given; returns the model URI."""
    import tempfile

    from domainfm import jobs, tracking
    from domainfm.backbones import save_backbone, save_weights

    with tempfile.TemporaryDirectory() as tmp:
        backbone = save_backbone(model.backbone, Path(tmp) / "backbone.safetensors", extra_meta=meta)
        head = save_weights({f"head.{k}": v for k, v in model.head.state_dict().items()},
                            Path(tmp) / "head.safetensors", meta)
        return tracking.log_pyfunc_model(Path(__file__).with_name("classifier_model.py"),
                                         {"backbone": str(backbone), "head": str(head)}, artifact_path="model",
                                         input_example=None, register=register, alias=alias,
                                         metadata={"domainfm.plugin": PLUGIN},
                                         version_tags=jobs.version_tags(PLUGIN) if register else None)


def classifier_files(local: Path, uri: str) -> tuple[Path, Path]:
    """``(backbone weights, head weights)`` of a saved classifier: a ``finetuned.safetensors``
    (both in one file), or an MLflow model folder holding ``backbone.safetensors`` and
    ``head.safetensors``. DomainFMError for anything else."""
    local = Path(local)
    if local.is_file():
        return local, local
    backbone = sorted(local.rglob("backbone.safetensors"))
    head = sorted(local.rglob("head.safetensors"))
    if not backbone or not head:
        raise DomainFMError("is not an sgd-ft classifier (no backbone.safetensors and head.safetensors)", path=uri,
                            fix="register one with `domainfm finetune --plugin sgd-ft --register NAME`")
    return backbone[0], head[0]


def load_classifier(backbone_file: Path, head_file: Path, uri: str = "") -> tuple[Any, dict[str, str]]:
    """The :class:`plugins.sgd_ft.model.Classifier` (eval mode) and its metadata. DomainFMError
    when the files do not record the classes or hold no head."""
    from safetensors.torch import load_file

    from domainfm.backbones import create_backbone, read_metadata
    from plugins.sgd_ft.model import Classifier

    meta = read_metadata(head_file)
    if "classes" not in meta:
        raise DomainFMError("records no class names (classes)", path=uri or head_file,
                            fix="fine-tune it again with `domainfm finetune --plugin sgd-ft`, which records them")
    classes = json.loads(meta["classes"])
    sd = load_file(str(head_file))
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    if set(head) != {"weight", "bias"}:
        raise DomainFMError("holds no classifier head (head.weight, head.bias)", path=uri or head_file,
                            fix="give a model saved by `domainfm finetune --plugin sgd-ft`")
    model = Classifier(create_backbone(backbone_file), len(classes))
    model.head.load_state_dict(head)
    return model.eval(), meta
