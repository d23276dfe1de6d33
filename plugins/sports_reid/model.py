"""A self-describing re-identification model: what a sports-reid export records and how it is read back.

Every backbone sports-reid saves (the ``backbone.safetensors`` of a fine-tuning run, and the copy
inside its MLflow model, which is what ``models:/NAME@ALIAS`` resolves to) carries, in its
safetensors metadata, everything needed to apply it to raw crops:

- ``plugin``: ``sports-reid`` (also the run tag ``domainfm.plugin`` and the MLflow model's
  ``metadata.domainfm.plugin``), ``domainfm_name`` (the timm backbone), ``embed_dim``;
- ``reid_input_size``: ``[H, W]`` in pixels (crops are letterboxed to it: ``reid_resize``);
- ``reid_channels``: ``RGB`` (the channel order), ``reid_pixel_scale``: ``0..1`` (8-bit / 255,
  16-bit / 65535, as :func:`domainfm.data.read_image` scales them);
- ``reid_mean`` / ``reid_std``: the per-channel normalisation ``(x - mean) / std`` (JSON lists);
- ``reid_distance``: the distance the model was trained for (``cosine``: InfoNCE on unit vectors).

:func:`load_reid_model` reads them back and refuses, in one line naming the setting, a model that
disagrees with re-id input (another plugin's model, a band count other than RGB, a recorded size or
embedding dimension the weights do not have). An export from before these keys falls back to what
the weights' architecture implies (timm's mean/std, the exported ``img_size``): the values
fine-tuning used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.config import RunConfig

PLUGIN = "sports-reid"
CHANNELS = "RGB"
PIXEL_SCALE = "0..1"
RESIZE = "letterbox"
LOAD_FIX = "apply a model made by `domainfm finetune --plugin sports-reid` (or pass its own plugin with --plugin)"


@dataclass(frozen=True)
class ReIDModelSpec:
    """What a re-id model takes and gives: ``input_size`` (H, W) px, per-channel ``mean``/``std``
    for RGB pixels in 0..1, ``embed_dim`` (D of the [N, D] features), ``backbone`` (timm name) and
    the ``distance`` it ranks with."""

    backbone: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    channels: str = CHANNELS
    pixel_scale: str = PIXEL_SCALE
    resize: str = RESIZE
    distance: str = "cosine"
    plugin: str = PLUGIN

    @property
    def img_size(self) -> int:
        return int(self.input_size[0])


def model_metadata(backbone, mean, std, *, distance: str = "cosine") -> dict[str, str]:
    """The safetensors metadata (str -> str) that makes ``backbone`` self-describing (see the
    module docstring); ``mean``/``std``: the 3 values its crops were normalised with."""
    size = int(backbone.img_size)
    return {"plugin": PLUGIN, "domainfm_name": backbone.name, "embed_dim": str(int(backbone.embed_dim)),
            "reid_input_size": json.dumps([size, size]), "reid_channels": CHANNELS,
            "reid_pixel_scale": PIXEL_SCALE, "reid_resize": RESIZE,
            "reid_mean": json.dumps([float(v) for v in mean]), "reid_std": json.dumps([float(v) for v in std]),
            "reid_distance": distance}


def model_file(source: str | Path) -> Path:
    """The local safetensors export of ``source``: a file, an MLflow model folder (its
    ``backbone.safetensors``) or ``models:/``/``runs:/`` (downloaded from the store)."""
    if str(source).startswith(("models:/", "runs:/")):
        from domainfm import tracking

        source = tracking.download_model(str(source))
    path = Path(source)
    if path.is_dir():
        found = sorted(path.rglob("backbone.safetensors"))
        if not found:
            raise DomainFMError("holds no backbone.safetensors (not a domainfm re-id model)", path=path, fix=LOAD_FIX)
        return found[0]
    if not path.is_file():
        raise DomainFMError("model file not found", path=path, fix="give a backbone.safetensors export or models:/NAME@ALIAS")
    return path


def _json(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError:
        raise DomainFMError(f"the model's {key} metadata is not valid JSON ({meta[key]!r})", path=path,
                            fix="re-export the model with domainfm") from None


def spec_from_metadata(meta: dict[str, str], path: Path, backbone=None) -> ReIDModelSpec:
    """The :class:`ReIDModelSpec` ``meta`` records; DomainFMError (one line naming the setting) when
    it describes input re-id crops cannot be: another plugin, other channels or pixel scale, a
    non-square or other-than-exported size. Keys it lacks come from ``backbone`` (its
    architecture's normalisation and exported size)."""
    plugin = meta.get("plugin")
    if plugin and plugin != PLUGIN:
        raise DomainFMError(f"the model was made by the {plugin} plugin (plugin = {plugin}), not by sports-reid",
                            path=path, fix=f"apply it with `domainfm predict` without --plugin, or `--plugin {plugin}`")
    in_chans = int(meta.get("in_chans", 3))
    if in_chans != 3:
        raise DomainFMError(f"the model takes {in_chans} input channels (in_chans = {in_chans}); re-id crops are "
                            f"RGB (3)", path=path, fix=LOAD_FIX)
    channels = meta.get("reid_channels", CHANNELS)
    if channels != CHANNELS:
        raise DomainFMError(f"the model's channel order is {channels} (reid_channels); crops are read as RGB",
                            path=path, fix=LOAD_FIX)
    scale = meta.get("reid_pixel_scale", PIXEL_SCALE)
    if scale != PIXEL_SCALE:
        raise DomainFMError(f"the model expects pixels scaled to {scale} (reid_pixel_scale); crops are read "
                            f"scaled to {PIXEL_SCALE}", path=path, fix=LOAD_FIX)
    exported = int(meta["img_size"]) if "img_size" in meta else (backbone.img_size if backbone is not None else None)
    if "reid_input_size" in meta:
        size = tuple(int(v) for v in _json(meta, "reid_input_size", path))
        if len(size) != 2 or size[0] != size[1]:
            raise DomainFMError(f"the model records input size {list(size)} (reid_input_size); crops are "
                                "letterboxed to a square", path=path, fix=LOAD_FIX)
        if exported is not None and size[0] != exported:
            raise DomainFMError(f"the model records input size {size[0]} x {size[1]} px (reid_input_size) but "
                                f"its weights were exported at {exported} px (img_size)", path=path, fix=LOAD_FIX)
    elif exported is not None:
        size = (exported, exported)
    else:
        raise DomainFMError("the model records no input size (reid_input_size or img_size)", path=path, fix=LOAD_FIX)
    if "reid_mean" in meta and "reid_std" in meta:
        mean, std = tuple(_json(meta, "reid_mean", path)), tuple(_json(meta, "reid_std", path))
    elif backbone is not None:
        mean, std = backbone.normalization
    else:
        raise DomainFMError("the model records no normalisation (reid_mean, reid_std)", path=path, fix=LOAD_FIX)
    for key, values in (("reid_mean", mean), ("reid_std", std)):
        if len(values) != 3:
            raise DomainFMError(f"the model's normalisation has {len(values)} values ({key}); RGB crops need 3",
                                path=path, fix=LOAD_FIX)
    if any(float(s) <= 0 for s in std):
        raise DomainFMError(f"the model's std {list(std)} (reid_std) is not positive", path=path, fix=LOAD_FIX)
    embed_dim = int(meta.get("embed_dim", backbone.embed_dim if backbone is not None else 0))
    if backbone is not None and embed_dim != backbone.embed_dim:
        raise DomainFMError(f"the model records embedding dimension {embed_dim} (embed_dim) but its weights give "
                            f"{backbone.embed_dim}", path=path, fix="re-export the model with domainfm")
    name = meta.get("domainfm_name") or (backbone.name if backbone is not None else "")
    return ReIDModelSpec(backbone=name, input_size=(int(size[0]), int(size[1])),
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                         embed_dim=embed_dim, channels=channels, pixel_scale=scale,
                         resize=meta.get("reid_resize", RESIZE), distance=meta.get("reid_distance", "cosine"))


def load_reid_model(source: str | Path, *, cfg: "RunConfig | None" = None):
    """``(backbone, spec)``: the re-id model ``source`` (an export, an MLflow model folder or
    ``models:/NAME@ALIAS``) built as trained, and the :class:`ReIDModelSpec` it records. A plain
    weights file without metadata (``.pth``) is built from ``cfg``'s ``--backbone``/``--img-size``
    with its architecture's normalisation. DomainFMError (one line naming the setting) for a model
    re-id crops cannot feed (see :func:`spec_from_metadata`)."""
    from domainfm.backbones import create_backbone, read_metadata

    path = model_file(source)
    meta = read_metadata(path)
    if meta:  # cheap checks before the weights load
        spec_from_metadata(meta, path, _ArchitectureOnly(meta))
    backbone = create_backbone(str(path), cfg=cfg, in_chans=3)
    return backbone, spec_from_metadata(meta, path, backbone)


class _ArchitectureOnly:
    """What :func:`spec_from_metadata` asks of a backbone, from the metadata alone (pre-load checks)."""

    def __init__(self, meta: dict[str, str]):
        from domainfm.backbones import input_normalization

        self.name = meta.get("domainfm_name", "")
        self.img_size = int(meta["img_size"]) if "img_size" in meta else None
        self.embed_dim = int(meta.get("embed_dim", 0))
        self.normalization = input_normalization(self.name) if self.name else ((0.0,) * 3, (1.0,) * 3)
