"""The one backbone entry point: :func:`create_backbone` builds a :class:`Backbone` from any spec.

``source`` says what to build, ``init`` where its weights come from:

- a timm architecture name (``"vit_small_patch14_dinov2"``): built with ``in_chans`` bands at
  ``img_size`` and ``init`` weights (``"dinov2"``/``"pretrained"``, a file, ``models:/``,
  ``torchgeo:``, ``"random"``; see :mod:`domainfm.backbones.sources`) adapted to it — the patch
  embedding turned into ``in_chans`` bands (:func:`adapt_patch_embed_weight`), the position
  embedding resized; every other weight loads unchanged.
- weights that name their own architecture (a domainfm export, ``models:/NAME@ALIAS``,
  ``torchgeo:ENUM.MEMBER``, or a :class:`WeightSource`): the model as it was trained — its
  architecture, bands and image size come from the weights (a plain state dict falls back to
  ``cfg.backbone``); ``in_chans`` is then a check (the data's band count must be the model's) and
  ``init`` does not apply (the weights are the init, as ``--weights`` beats ``--init``).
- a :class:`~domainfm.config.RunConfig`: the backbone a run starts from — ``--weights`` beats
  ``--init``, adapted to ``in_chans`` (default ``cfg.in_chans``); a ``--weights`` export or
  ``models:/`` names its architecture, so ``--backbone`` need not repeat it.

``cfg`` (with a name or weights as ``source``) supplies the defaults for what is not passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainfm.backbones.adapt import PATCH_EMBED_INITS, load_adapted
from domainfm.backbones.meta import InputSpec
from domainfm.backbones.sources import (WeightSource, input_normalization, names_weights, read_state_dict,
                                        resolve_source)
from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    from domainfm.backbones.module import Backbone
    from domainfm.config import RunConfig


def create_backbone(source: "str | Path | WeightSource | RunConfig", *, cfg: "RunConfig | None" = None,
                    in_chans: int | None = None, img_size: int | None = None, init: str | None = None,
                    patch_embed_init: str | None = None, **model_kwargs: Any) -> "Backbone":
    """Build the backbone ``source`` names (see the module docstring); extra ``model_kwargs`` go to
    timm (e.g. ``depth=2`` for a small test model of the same architecture).

    Defaults: ``in_chans`` 3, ``img_size`` 224, ``init`` ``"dinov2"``, ``patch_embed_init``
    ``"repeat"`` — or ``cfg``'s values when a ``cfg`` is given.

    Errors (:class:`DomainFMError`): an unknown timm name or ``patch_embed_init``; weights that do
    not fit the architecture (``architecture mismatch: ...``, naming both); weights as ``source``
    whose band count is not ``in_chans`` (``the model takes 13 bands but the data has 3``) or that
    carry no architecture name with no ``cfg`` to fall back on; weights not in the local cache while
    offline (naming ``--weights``, within seconds).
    """
    from domainfm.config import RunConfig

    if isinstance(source, RunConfig):
        cfg = source
        start = resolve_source(cfg.weights or cfg.init, name=cfg.backbone)
        # a domainfm export / registered model names its architecture; torchgeo weights are checked against it
        name = (start.architecture if start.kind in ("file", "registry") else None) or cfg.backbone
        return _build(name, start, in_chans=in_chans if in_chans is not None else (cfg.in_chans or 3),
                      img_size=img_size or cfg.img_size, patch_embed_init=patch_embed_init or cfg.patch_embed_init,
                      model_kwargs=model_kwargs)
    if isinstance(source, WeightSource) or names_weights(str(source)):
        return _load_as_trained(source, cfg=cfg, in_chans=in_chans, img_size=img_size,
                                patch_embed_init=patch_embed_init, model_kwargs=model_kwargs)
    name = str(source)
    if init is None:
        init = (cfg.weights or cfg.init) if cfg is not None else "dinov2"
    chans = in_chans if in_chans is not None else ((cfg.in_chans if cfg is not None else None) or 3)
    size = img_size or (cfg.img_size if cfg is not None else 224)
    pei = patch_embed_init or (cfg.patch_embed_init if cfg is not None else "repeat")
    _check_name(name, pei)
    return _build(name, resolve_source(init, name=name), in_chans=chans, img_size=size, patch_embed_init=pei,
                  model_kwargs=model_kwargs)


def _load_as_trained(source, *, cfg, in_chans, img_size, patch_embed_init, model_kwargs) -> "Backbone":
    """Weights as the model itself: their architecture, bands and size unless they do not say."""
    spec = source.spec if isinstance(source, WeightSource) else str(source)
    src = resolve_source(source)
    name = src.architecture or (cfg.backbone if cfg is not None else None)
    if not name:
        local = Path(src.path) if src.path else None
        if local is not None and local.is_file():  # a file that is not weights at all says so first
            from domainfm.backbones.sources import check_weights_path

            check_weights_path(str(local))
            read_state_dict(local)  # a damaged or foreign file: its own one-line error
        raise DomainFMError("weights carry no architecture name", path=src.path or spec, fix="pass --backbone NAME")
    chans = src.in_chans or in_chans or (cfg.in_chans if cfg is not None else None) or 3
    if in_chans is not None and chans != in_chans:
        raise DomainFMError(f"the model takes {chans} bands but the data has {in_chans}", path=spec,
                            fix="evaluate on data of the modality the model was trained on")
    size = img_size or src.img_size or (cfg.img_size if cfg is not None else 224)
    pei = patch_embed_init or (cfg.patch_embed_init if cfg is not None else "repeat")
    return _build(name, src, in_chans=chans, img_size=size, patch_embed_init=pei, model_kwargs=model_kwargs)


def _check_name(name: str, patch_embed_init: str) -> None:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = similar_names(arch)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise DomainFMError(f"unknown backbone {name!r}{hint}", fix="use a timm model name, e.g. vit_small_patch14_dinov2")
    if patch_embed_init not in PATCH_EMBED_INITS:
        raise DomainFMError(f"unknown patch_embed_init {patch_embed_init!r}", fix=f"use one of {', '.join(PATCH_EMBED_INITS)}")


def similar_names(name: str, n: int = 5) -> list[str]:
    """Up to ``n`` timm model names close to the unknown ``name``: first those sharing its longest
    ``_``-separated prefix (its family: ``vit_tiny_nope`` -> ``vit_tiny_patch16_224``...), then
    difflib's closest matches over every timm name."""
    import difflib

    import timm

    names = timm.list_models()
    parts = name.split("_")
    out: list[str] = []
    for k in range(len(parts) - 1, 0, -1):  # vit_tiny_, then vit_
        prefix = "_".join(parts[:k]) + "_"
        family = [m for m in names if m.startswith(prefix)]
        if family:
            out = difflib.get_close_matches(name, family, n=n, cutoff=0.0)
            break
    for m in difflib.get_close_matches(name, names, n=n, cutoff=0.5):
        if len(out) < n and m not in out:
            out.append(m)
    return out[:n]


def check_run_backbone(cfg: "RunConfig") -> None:
    """Cheap checks of the backbone a training run will build, before any data is read or MLflow
    run opened: the name is a timm model (DomainFMError suggesting the closest names), and for a
    ViT ``cfg.img_size`` is a multiple of its patch size (the model is built on the meta device:
    no memory, no weights). A CNN takes any size."""
    import torch

    import timm

    name = backbone_name(cfg)
    if names_weights(name):  # --backbone FILE (sgd-ft): the architecture its metadata names
        if name.startswith("models:/"):
            return  # checked when downloaded
        name = resolve_source(name).architecture
        if not name:
            return
    _check_name(name, cfg.patch_embed_init)
    arch = name.split(".")[0]
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks")):
        return
    ps = model.patch_embed.patch_size
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    size = int(cfg.img_size)
    if size % patch:
        lo, hi = (size // patch) * patch, (size // patch + 1) * patch
        near = f"{lo} or {hi}" if lo > 0 else str(hi)
        raise DomainFMError(f"--img-size {size} is not a multiple of the patch size {patch} of {name}",
                            fix=f"use --img-size {near}")


def _build(name: str, src: WeightSource, *, in_chans: int, img_size: int, patch_embed_init: str,
           model_kwargs: dict[str, Any]) -> "Backbone":
    """timm's ``name`` at ``in_chans`` x ``img_size`` with ``src``'s weights adapted into it."""
    import timm

    from domainfm.backbones.module import Backbone

    _check_name(name, patch_embed_init)
    arch = name.split(".")[0]
    kwargs = dict(num_classes=0, in_chans=in_chans, **model_kwargs)
    if _accepts_img_size(arch):
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    if src.kind == "torchgeo" and src.architecture and src.architecture != arch:
        raise DomainFMError(f"{src.spec} holds weights for {src.architecture}, not {name}",
                            fix=f"pass --backbone {src.architecture}")
    path = src.local_file()
    spec = src.input if src.kind == "torchgeo" else None  # the bands / statistics the weights were trained with
    if path is not None:
        sd, meta = read_state_dict(path)
        label = f"pretrained weights {path}" if src.kind == "hub" else src.label
        if src.kind in ("file", "registry"):  # a safetensors header, or a domainfm Lightning checkpoint's
            spec = InputSpec.from_meta(meta, source=f"metadata of {src.spec}")
        load_adapted(model, sd, patch_embed_init=patch_embed_init, source=label)
    backbone = Backbone(model, name=name, in_chans=in_chans, img_size=img_size)
    backbone.input_spec = spec
    return backbone


def _accepts_img_size(arch: str) -> bool:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    # transformers take img_size; CNNs are size-agnostic and reject it
    return any(k in arch for k in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit", "pvt", "mvit")) or bool(
        cfg and getattr(cfg, "fixed_input_size", False))


def backbone_name(cfg: "RunConfig") -> str:
    """The architecture a run builds: the one a ``--weights`` export or ``models:/`` names in its
    metadata, else ``--backbone`` (as :func:`create_backbone` decides for a RunConfig)."""
    if cfg.weights:
        src = resolve_source(cfg.weights, name=cfg.backbone)
        if src.kind in ("file", "registry") and src.architecture:
            return src.architecture
    return cfg.backbone


def normalization_for_config(cfg: "RunConfig") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`input_normalization` of the backbone ``cfg`` will build, without building it."""
    return input_normalization(backbone_name(cfg))
