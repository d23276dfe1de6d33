"""Where a backbone's weights come from, as data (in the spirit of timm's ``PretrainedCfg`` and
torchgeo's weights enums).

A spec string resolves (:func:`resolve_source`) to a frozen :class:`WeightSource` that says what
the weights carry — architecture, input bands and their count, per-band mean/std, GSD, image size,
where known — and resolves to a local weights file (:meth:`WeightSource.local_file`). Kinds:

  - ``"random"``: timm's initialisation (tests, ablations); no file.
  - ``"dinov2"`` / ``"pretrained"`` (kind ``hub``): timm's pretrained weights for the architecture,
    from the local Hugging Face cache, else the hub. Offline with nothing cached this fails in
    seconds (no retry loop) with a message naming ``--weights``.
  - a local ``.safetensors`` / ``.pth`` / ``.pt`` file (kind ``file``): timm keys, official DINOv2
    keys, a Lightning checkpoint of domainfm, a domainfm export (whose metadata names its
    architecture, bands and statistics), or a training checkpoint that nests the backbone next to
    heads and optimizer state (see :func:`domainfm.backbones.select_backbone_state`).
  - ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (kind ``registry``): a backbone logged by
    domainfm to MLflow, downloaded through :func:`domainfm.tracking.download_model`.
  - ``torchgeo:ENUM.MEMBER`` (kind ``torchgeo``): a torchgeo weights enum resolved by
    ``torchgeo.models.get_weight``, e.g. ``torchgeo:ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON``
    (SoftCon's Sentinel-2 ViT-S/14); read from torch's hub cache, downloaded only when reachable.

Each kind has one resolver in ``_RESOLVERS`` and one fetcher in ``_FETCHERS``. This module also
reads weights files (:func:`read_state_dict`, never unpickling arbitrary objects) and gives a
backbone's input normalisation (:func:`input_normalization`). It imports neither torch nor mlflow
at import time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from domainfm.backbones.meta import InputSpec, read_metadata
from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DINOV2_NAMES = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
                "vit_giant_patch14_dinov2")
PRETRAINED_INITS = ("dinov2", "pretrained")
TORCHGEO_PREFIX = "torchgeo:"
REGISTRY_PREFIX = "models:/"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
NOT_WEIGHTS_FIX = "give a domainfm export (.safetensors), a checkpoint (.pth, .pt, .bin, .ckpt) or models:/NAME@ALIAS"


def not_weights_message(path: str | Path) -> str:
    """What a file that cannot hold weights is (by its suffix), for the one-line error."""
    suffix = Path(path).suffix
    return f"is not a model: a {suffix or 'extension-less'} file, not weights ({', '.join(WEIGHT_SUFFIXES)})"


def check_weights_path(spec: str | None) -> None:
    """Refuse, before anything runs, a local ``--model``/``--weights`` that is an existing file
    whose suffix no weights format has (a .txt, a .tif...). Names, ``models:/`` and ``runs:/`` URIs
    and folders (an MLflow model) pass; their own loaders check them."""
    if not spec or "://" in spec or spec.startswith(("models:/", "runs:/")):
        return
    p = Path(spec)
    if p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
        raise DomainFMError(not_weights_message(p), path=p, fix=NOT_WEIGHTS_FIX)
HUB_HOST = ("huggingface.co", 443)
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class WeightSource:
    """Weights as data: what a spec names and what it carries (None where it does not say).

    ``kind``: ``random`` | ``hub`` | ``file`` | ``registry`` | ``torchgeo``. ``spec``: the string the
    user gave. ``architecture``: the timm name the weights belong to (a domainfm export's
    ``domainfm_name``, a torchgeo enum's ``meta["model"]``, the architecture a hub source was asked
    for). ``in_chans`` / ``img_size``: what they were trained with. ``input``: bands, per-band
    mean/std (in their units), modality and GSD in metres (:class:`InputSpec`). ``path``: the local
    file when it is already known (files, downloaded ``models:/``). ``meta``: the file's raw
    safetensors metadata. ``hub_name``: the ``arch.tag`` timm name of a hub source. ``weights``:
    the torchgeo enum member."""

    kind: str
    spec: str
    architecture: str | None = None
    in_chans: int | None = None
    img_size: int | None = None
    input: InputSpec | None = None
    path: Path | None = None
    hub_name: str | None = None
    weights: Any = field(default=None, compare=False)
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def bands(self) -> tuple | None:
        return self.input.bands if self.input is not None else None

    @property
    def gsd_m(self) -> float | None:
        return self.input.gsd_m if self.input is not None else None

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-band ``(mean, std)``: the recorded statistics (in their units), or for hub weights
        timm's for pixels scaled to [0, 1] (:func:`input_normalization`); None when unknown."""
        if self.input is not None and self.input.has_stats:
            return tuple(self.input.mean), tuple(self.input.std)
        if self.kind == "hub" and self.architecture:
            return input_normalization(self.hub_name or self.architecture)
        return None

    @property
    def carries_architecture(self) -> bool:
        """True for weights that name their own architecture (exports, ``models:/``, torchgeo)."""
        return self.kind in ("file", "registry", "torchgeo") and bool(self.architecture)

    @property
    def label(self) -> str:
        """How error messages name these weights."""
        if self.kind == "torchgeo":
            return f"torchgeo weights {self.spec}"
        return f"weights {self.spec}"

    def local_file(self) -> Path | None:
        """The local weights file (None for ``random``): hub and torchgeo weights come from their
        caches, fetched only when the host answers."""
        return _FETCHERS[self.kind](self)


def source_kind(spec: str) -> str:
    """Which kind of weights ``spec`` names (anything not named otherwise is a file path)."""
    if spec == "random":
        return "random"
    if spec in PRETRAINED_INITS:
        return "hub"
    if spec.startswith(REGISTRY_PREFIX):
        return "registry"
    if spec.startswith(TORCHGEO_PREFIX):
        return "torchgeo"
    return "file"


def names_weights(spec: str) -> bool:
    """True when ``spec`` names weights (a file, ``models:/``, ``torchgeo:``) rather than a timm
    architecture: what :func:`domainfm.backbones.create_backbone` reads its first argument as."""
    if spec.startswith((REGISTRY_PREFIX, TORCHGEO_PREFIX)):
        return True
    return Path(spec).suffix in WEIGHT_SUFFIXES or Path(spec).is_file()


def resolve_source(spec: "str | Path | WeightSource", name: str | None = None) -> WeightSource:
    """The :class:`WeightSource` that ``spec`` names. ``name`` is the architecture asked for
    (hub weights are looked up for it). A ``models:/`` URI is downloaded here; a missing local
    file is reported when its tensors are read."""
    if isinstance(spec, WeightSource):
        return spec
    spec = str(spec)
    kind = source_kind(spec)
    return _RESOLVERS[kind](spec, name)


def _random(spec: str, name: str | None) -> WeightSource:
    return WeightSource(kind="random", spec=spec, architecture=name)


def _hub(spec: str, name: str | None) -> WeightSource:
    hub_name = None
    if name:
        # "dinov2" on a DINOv2 architecture means its LVD-142M weights; otherwise timm's default tag
        hub_name = name if "." in name else (f"{name}.lvd142m" if spec == "dinov2" and name in DINOV2_NAMES else name)
    return WeightSource(kind="hub", spec=spec, architecture=name, in_chans=3, hub_name=hub_name)


def _from_file_meta(kind: str, spec: str, path: Path) -> WeightSource:
    meta = read_metadata(path)
    return WeightSource(kind=kind, spec=spec, architecture=meta.get("domainfm_name"),
                        in_chans=int(meta["in_chans"]) if "in_chans" in meta else None,
                        img_size=int(meta["img_size"]) if "img_size" in meta else None,
                        input=InputSpec.from_meta(meta, source=f"metadata of {spec}"), path=path, meta=meta)


def _file(spec: str, name: str | None) -> WeightSource:
    return _from_file_meta("file", spec, Path(spec))


def _registry(spec: str, name: str | None) -> WeightSource:
    return _from_file_meta("registry", spec, _download_registered(spec))


def _torchgeo(spec: str, name: str | None) -> WeightSource:
    weights = torchgeo_weights(spec)
    meta = dict(getattr(weights, "meta", {}) or {})
    return WeightSource(kind="torchgeo", spec=spec, architecture=meta.get("model"),
                        in_chans=int(meta["in_chans"]) if meta.get("in_chans") else None,
                        img_size=int(meta["img_size"]) if meta.get("img_size") else None,
                        input=torchgeo_input_spec(weights, spec), weights=weights)


_RESOLVERS: dict[str, Callable[[str, str | None], WeightSource]] = {
    "random": _random, "hub": _hub, "file": _file, "registry": _registry, "torchgeo": _torchgeo}

_FETCHERS: dict[str, Callable[[WeightSource], Path | None]] = {
    "random": lambda s: None,
    "hub": lambda s: pretrained_weights_file(s.hub_name or s.architecture or ""),
    "file": lambda s: s.path,
    "registry": lambda s: s.path,
    "torchgeo": lambda s: torchgeo_weights_file(s.weights),
}


def input_spec_of(source: "str | Path | None") -> InputSpec | None:
    """The InputSpec recorded for ``source`` (a weights file, ``models:/`` URI or ``torchgeo:``
    enum) without building a model; None when it records none (timm/DINOv2 names, plain files)."""
    if not source:
        return None
    return resolve_source(str(source)).input


# ---------------------------------------------------------------- reading a local file

def read_state_dict(path: str | Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Every tensor of a local weights file (nested checkpoints flattened to dotted keys, see
    :func:`domainfm.backbones.flatten_checkpoint`) and its metadata (a safetensors header, or a
    domainfm Lightning checkpoint's ``backbone_meta``), never unpickling arbitrary objects
    (``.pth``/``.pt``/``.bin``/``.ckpt`` load with ``weights_only=True``). Which of them are the
    backbone's is decided against the model (:func:`domainfm.backbones.select_backbone_state`)."""
    import torch

    from domainfm.backbones.adapt import flatten_checkpoint

    p = Path(path)
    if not p.is_file():
        raise DomainFMError("weights file not found", path=p, fix="give an existing .safetensors/.pth/.pt file to --weights")
    meta: dict[str, str] = {}
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except Exception as e:
            raise DomainFMError(f"not a readable safetensors file ({e})", path=p,
                                fix="re-export the weights with safetensors.torch.save_file") from None
        meta = read_metadata(p)
    elif p.suffix in WEIGHT_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DomainFMError(f"cannot be loaded as a weights-only checkpoint ({first[:200]})", path=p,
                                fix="save a plain state dict with torch.save(model.state_dict(), path)") from None
        if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), dict):  # a domainfm Lightning ckpt
            meta = {k: str(v) for k, v in obj["hyper_parameters"].get("backbone_meta", {}).items()}
        sd = flatten_checkpoint(obj)
        if not sd:
            raise DomainFMError("is not a state dict (expected a mapping of parameter names to tensors)", path=p,
                                fix="save it with torch.save(model.state_dict(), path)")
    else:
        raise DomainFMError(not_weights_message(p), path=p, fix=NOT_WEIGHTS_FIX)
    return sd, meta


# ---------------------------------------------------------------- caches and the network

def _offline() -> bool:
    """HF_HUB_OFFLINE=1 also keeps us from trying any other host."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_reachable(timeout: float = 2.0) -> bool:
    if _offline():
        return False
    return _reachable(HUB_HOST[0], timeout)


def pretrained_weights_file(name: str) -> Path:
    """The local path of timm's pretrained weights for ``name`` (cache first, hub if reachable)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        arch, _, _ = name.partition(".")
        cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise DomainFMError(f"timm has no downloadable pretrained weights for {name!r}",
                            fix="pass --weights PATH to a local weights file, or --init random")
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    from huggingface_hub import try_to_load_from_cache

    for fn in (filename, "open_clip_model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(hub_id, fn)
        if isinstance(cached, str):
            return Path(cached)
    if not _hub_reachable():
        raise DomainFMError(f"pretrained weights for {name!r} ({hub_id}) are not in the local Hugging Face cache "
                            "and the hub cannot be reached (offline)",
                            fix="pass --weights PATH to a local .safetensors/.pth file (or --init random)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(hub_id, filename))


def torchgeo_weights(spec: str):
    """The torchgeo weights enum member named by ``torchgeo:ENUM.MEMBER`` (``torchgeo.models.get_weight``)."""
    import torchgeo.models

    ref = spec[len(TORCHGEO_PREFIX):] if spec.startswith(TORCHGEO_PREFIX) else spec
    try:
        return torchgeo.models.get_weight(ref)
    except ValueError:
        known = [f"{n}.{m}" for n in dir(torchgeo.models) if n.endswith("_Weights")
                 for m in getattr(getattr(torchgeo.models, n), "__members__", {})]
        dinov2 = [k for k in known if "DINOv2" in k] or known[:5]
        raise DomainFMError(f"unknown torchgeo weights {ref!r}",
                            fix=f"use torchgeo:<Enum>.<Member>, e.g. {', '.join('torchgeo:' + k for k in dinov2)}") from None


def torchgeo_weights_file(weights) -> Path:
    """torchgeo's checkpoint in torch's hub cache (where torchgeo itself keeps it), fetched only
    when the host answers: offline with nothing cached fails at once, naming --weights."""
    import torch
    from urllib.parse import urlparse

    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return cached
    host = urlparse(url).hostname or ""
    if _offline() or not _reachable(host):
        raise DomainFMError(f"torchgeo weights {weights} are not in {cached.parent} and {host} cannot be reached "
                            "(offline)", fix=f"download {url} there, or pass --weights PATH to a local file")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(cached), progress=True)
    return cached


def torchgeo_input_spec(weights, init: str = "") -> InputSpec:
    """Bands from a torchgeo weights enum's ``meta["bands"]`` and mean/std from the ``Normalize``
    in its ``transforms`` (SoftCon's Sentinel-2 enum: SSL4EO-S12 per-band statistics in
    reflectance x 10000; Sentinel-1: dB)."""
    meta = dict(getattr(weights, "meta", {}) or {})
    bands = tuple(str(b).upper() for b in meta.get("bands") or ()) or None
    mean = std = None
    transforms = getattr(weights, "transforms", None)
    modules = transforms.modules() if hasattr(transforms, "modules") else [transforms]
    for t in modules:
        if hasattr(t, "mean") and hasattr(t, "std"):
            m, s = t.mean, t.std
            m = m.flatten().tolist() if hasattr(m, "flatten") else list(m) if isinstance(m, (list, tuple)) else None
            s = s.flatten().tolist() if hasattr(s, "flatten") else list(s) if isinstance(s, (list, tuple)) else None
            if m and s and (bands is None or len(m) == len(bands)):
                mean, std = tuple(float(x) for x in m), tuple(float(x) for x in s)
                break
    modality = units = None
    if bands and set(bands) <= {"VV", "VH"}:
        modality, units = "s1", "dB"
    elif bands and all(b.startswith("B") for b in bands):
        modality, units = ("s2" if "B10" in bands else "s2-l2a"), "reflectance x 10000"
    return InputSpec(bands=bands, mean=mean, std=std, modality=modality, gsd_m=meta.get("gsd"), units=units,
                     source=f"torchgeo weights {init or weights}")


def _download_registered(uri: str) -> Path:
    """The safetensors file of a domainfm backbone registered in MLflow (downloaded by tracking)."""
    from domainfm import tracking

    local = tracking.download_model(uri)
    found = sorted(Path(local).rglob("backbone.safetensors"))
    if not found:
        raise DomainFMError(f"{uri} holds no backbone.safetensors (not a domainfm backbone)",
                            fix="register a model made by `domainfm pretrain --register NAME`")
    return found[0]


# ---------------------------------------------------------------- input normalisation

def input_normalization(source) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The one answer to "how are this backbone's inputs normalised": per-channel ``(mean, std)``
    for pixel values scaled to [0, 1], as the weights were trained with (``(x - mean) / std``).

    ``source``: a :class:`Backbone`, a timm model, or a timm model name (``arch`` or ``arch.tag``),
    so that data pipelines built before the model (pretraining) agree with those built after
    (embedding, evaluation). Read from timm's pretrained config (``pretrained_cfg`` mean/std):
    OpenAI CLIP's statistics for CLIP architectures, ImageNet's for DINOv2 and most CNNs;
    ImageNet's when the config names none.
    """
    cfg = None
    if isinstance(source, str):
        import timm

        for name in (source, source.split(".")[0]):
            try:
                cfg = timm.models.get_pretrained_cfg(name)
            except Exception:  # noqa: BLE001 - an unknown name or tag: try the architecture
                cfg = None
            if cfg is not None:
                break
        cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else (cfg.__dict__ if cfg is not None else {})
    else:
        data_config = getattr(source, "data_config", None)
        if isinstance(data_config, dict):
            cfg = data_config
        else:
            model = getattr(source, "model", source)
            cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        return IMAGENET_NORMALIZATION
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
