"""One backbone factory: timm architectures, DINOv2 (or any timm) weights, any number of bands.

``create_backbone(name, in_chans=13, img_size=224, init="dinov2")`` builds the timm model at the
target band count and size, then loads a state dict that is adapted by small pure functions:
:func:`adapt_input_conv` turns the RGB patch embedding (or first conv) into ``in_chans`` bands,
and timm's own checkpoint filter resizes the position embedding and maps official DINOv2 keys.
Every weight other than those two loads unchanged (``load_state_dict(strict=True)``).

Where weights come from (``init``):
  - ``"dinov2"`` / ``"pretrained"``: timm's pretrained weights for the name, from the local Hugging
    Face cache, else the hub. Offline with nothing cached, this fails in seconds (no retry loop)
    with a message naming ``--weights``.
  - a local ``.safetensors`` / ``.pth`` / ``.pt`` file (timm keys, official DINOv2 keys, a
    Lightning checkpoint of domainfm, a domainfm export, or a training checkpoint that nests the
    backbone next to heads and optimizer state, e.g. DINOv2's ``teacher_checkpoint.pth``: see
    :func:`select_backbone_state`); ``.pth``/``.pt`` load with ``weights_only=True``.
  - ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a backbone logged by domainfm to MLflow.
  - ``torchgeo:ENUM.MEMBER``: a torchgeo weights enum, e.g.
    ``torchgeo:ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON`` (SoftCon's published Sentinel-2
    ViT-S/14) as the starting point; read from torch's hub cache, downloaded only when reachable.
  - ``"random"``: timm's initialisation (tests, ablations).
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from domainfm.config import RunConfig

DINOV2_NAMES = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
                "vit_giant_patch14_dinov2")
PATCH_EMBED_INITS = ("repeat", "mean", "random")
PRETRAINED_INITS = ("dinov2", "pretrained")
HUB_HOST = ("huggingface.co", 443)
# generic wrappers that put every key of a checkpoint under one prefix (DDP, Lightning, timm trainers)
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
# parts of a training checkpoint that are not the model (their tensors are optimizer moments etc.)
_NOT_MODEL_PARTS = ("optim", "sched", "scaler", "loops", "callbacks", "hyper_parameters", "rng", "args")
# heads trained next to a backbone (DINO/iBOT heads, projectors, classifiers): never backbone weights
_HEAD_NAMES = ("dino_head", "ibot_head", "head", "heads", "projector", "projection_head", "proj_head",
               "predictor", "prototypes", "classifier", "fc", "mask_token")
# DINOv2's ViT sizes by embedding width (what an architecture mismatch suggests)
_DINOV2_BY_DIM = {384: "vit_small_patch14_dinov2", 768: "vit_base_patch14_dinov2",
                  1024: "vit_large_patch14_dinov2", 1536: "vit_giant_patch14_dinov2"}


# ---------------------------------------------------------------- pure weight adaptation

def adapt_input_conv(weight: "torch.Tensor", in_chans: int, mode: str = "repeat",
                     generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Turn a first-layer kernel ``[out, c, kh, kw]`` into ``[out, in_chans, kh, kw]``.

    - ``repeat``: tile the pretrained channels and scale by ``c / in_chans``, so an input whose
      bands are all equal (a grey image) gives the same response as the original model (exactly:
      an uneven tiling's remainder is spread over the bands).
    - ``mean``: every new channel is the mean of the pretrained ones, scaled by ``c / in_chans``
      (the same grey-input invariance, no band gets a colour's identity).
    - ``random``: a fresh Kaiming-uniform kernel (SoftCon's reported choice for new sensors).
    """
    import torch

    out, c, kh, kw = weight.shape
    if mode not in PATCH_EMBED_INITS:
        raise DomainFMError(f"unknown patch_embed_init {mode!r}", fix=f"use one of {', '.join(PATCH_EMBED_INITS)}")
    if in_chans == c and mode != "random":
        return weight.clone()
    w = weight.float()
    if mode == "repeat":
        reps = math.ceil(in_chans / c)
        new = w.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)
        # when in_chans is not a multiple of c the repeat is uneven (13 bands: R five times, G and
        # B four); spreading the missed part of the channel sum evenly keeps grey inputs exact
        new += (w.sum(dim=1, keepdim=True) - new.sum(dim=1, keepdim=True)) / in_chans
    elif mode == "mean":
        new = w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (c / in_chans)
    else:
        new = torch.empty(out, in_chans, kh, kw)
        fan_in = in_chans * kh * kw
        bound = 1.0 / math.sqrt(fan_in)
        new.uniform_(-bound, bound, generator=generator)
    return new.to(weight.dtype)


def strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove the wrappers (``module.``, ``model.``, ``backbone.``, ``encoder.``) that prefix every key."""
    sd = state_dict
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def flatten_checkpoint(obj: Any, prefix: str = "") -> dict[str, "torch.Tensor"]:
    """Every tensor of a (nested) checkpoint under its dotted path, e.g. DINOv2's
    ``{"teacher": {"backbone.blocks.0...": t, "dino_head...": t}}`` -> ``teacher.backbone.blocks.0...``.
    Optimizer, scheduler and trainer state (``optimizer``, ``lr_schedulers``, ``loops``...) and
    non-tensor values (step counts, hyper-parameters) are left out."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            name = str(k)
            if not prefix and any(part in name.lower() for part in _NOT_MODEL_PARTS):
                continue
            out.update(flatten_checkpoint(v, f"{prefix}{name}."))
    return out


def _is_vit_model(model) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def select_backbone_state(state_dict: dict[str, "torch.Tensor"], model) -> tuple[dict[str, "torch.Tensor"], str]:
    """The backbone's own weights out of any checkpoint that nests them: ``(sub_dict, prefix)``.

    The prefix is the one under which most of ``model``'s parameter names are found, so a
    backbone stored next to heads (DINOv2's ``teacher.backbone.*`` beside ``dino_head.*`` and
    ``ibot_head.*``), inside wrappers (``model.``, ``state_dict.``, ``module.``) or twice (student and
    EMA teacher) is found without a list of layouts. Ties go to the EMA teacher, then to the
    shortest prefix. DINOv2's chunked blocks (``blocks.<chunk>.<i>.``) are renumbered
    ``blocks.<i>.`` for a ViT. Heads next to the backbone (DINO/iBOT heads, projectors,
    classifiers the backbone does not have) are dropped; every other key is kept, so a wrong
    architecture is still reported. With no parameter name found at all, only the common
    wrappers are stripped (foreign layouts such as OpenAI CLIP are left to timm's converter)."""
    sd = dict(state_dict)
    if _is_vit_model(model):
        sd = {re.sub(r"(^|\.)blocks\.\d+\.(\d+)\.", r"\1blocks.\2.", k): v for k, v in sd.items()}
    model_keys = set(model.state_dict())
    counts: dict[str, int] = {}
    for k in sd:
        # every split of the key at a dot: the right part may be a parameter of the model
        cut = 0
        while True:
            if k[cut:] in model_keys:
                counts[k[:cut]] = counts.get(k[:cut], 0) + 1
            nxt = k.find(".", cut)
            if nxt < 0:
                break
            cut = nxt + 1
    if not counts:
        return strip_prefix(sd), ""

    def rank(prefix: str):
        low = prefix.lower()
        return (counts[prefix], "teacher" in low or "ema" in low, "student" not in low, -len(prefix))

    prefix = max(counts, key=rank)
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sub = {k: v for k, v in sub.items() if k in model_keys or k.split(".")[0] not in _HEAD_NAMES
           or (k == "mask_token" and _is_vit_model(model))}
    return sub, prefix


def _vit_shape(sd: dict[str, Any]) -> dict[str, int] | None:
    """Depth, width and patch size of a ViT state dict (timm / DINOv2 key names), else None."""
    w = sd.get("patch_embed.proj.weight")
    blocks = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
    if w is None or w.ndim != 4 or not blocks:
        return None
    regs = sd.get("reg_token", sd.get("register_tokens"))
    return {"depth": max(blocks) + 1, "dim": int(w.shape[0]), "patch": int(w.shape[-1]),
            "registers": int(regs.shape[-2]) if regs is not None and regs.ndim >= 2 else 0}


def _describe_vit(shape: dict[str, int]) -> str:
    regs = f", {shape['registers']} registers" if shape["registers"] else ""
    return f"{shape['depth']} blocks of dim {shape['dim']} (patch {shape['patch']}{regs})"


def _architecture_mismatch(sd: dict[str, Any], model, source: str) -> None:
    """One line naming the real cause when a ViT checkpoint's size differs from the model's."""
    have, want = _vit_shape(sd), _vit_shape(model.state_dict())
    if have is None or want is None or have == want:
        return
    arch = (getattr(model, "pretrained_cfg", {}) or {}).get("architecture") or type(model).__name__
    guess = _DINOV2_BY_DIM.get(have["dim"]) if have["patch"] == 14 else None
    if guess and have["registers"]:
        guess = guess.replace("_dinov2", "_reg4_dinov2")
    hint = f" (these look like {guess})" if guess and guess != arch else ""
    raise DomainFMError(f"architecture mismatch: {source} hold {_describe_vit(have)}, --backbone {arch} has "
                        f"{_describe_vit(want)}",
                        fix=f"pass the --backbone these weights were trained with{hint}")


# ---------------------------------------------------------------- reading weights

def read_state_dict(path: str | Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Every tensor of a local weights file (nested checkpoints flattened to dotted keys, see
    :func:`flatten_checkpoint`) and its metadata, never unpickling arbitrary objects. Which of
    them are the backbone's is decided against the model (:func:`select_backbone_state`)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise DomainFMError("weights file not found", path=p, fix="give an existing .safetensors/.pth/.pt file to --weights")
    meta: dict[str, str] = {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise DomainFMError(f"not a readable safetensors file ({e})", path=p,
                                fix="re-export the weights with safetensors.torch.save_file") from None
    elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
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
        raise DomainFMError(f"unknown weights format {p.suffix!r}", path=p, fix="use .safetensors, .pth or .pt")
    return sd, meta


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


TORCHGEO_PREFIX = "torchgeo:"


def torchgeo_weights(spec: str):
    """The torchgeo weights enum member named by ``torchgeo:ENUM.MEMBER``."""
    import torchgeo.models

    ref = spec[len(TORCHGEO_PREFIX):]
    enum_name, _, member = ref.partition(".")
    enum = getattr(torchgeo.models, enum_name, None)
    if enum is None or member not in getattr(enum, "__members__", {}):
        known = [f"{n}.{m}" for n in dir(torchgeo.models) if n.endswith("_Weights")
                 for m in getattr(getattr(torchgeo.models, n), "__members__", {})]
        dinov2 = [k for k in known if "DINOv2" in k] or known[:5]
        raise DomainFMError(f"unknown torchgeo weights {ref!r}",
                            fix=f"use torchgeo:<Enum>.<Member>, e.g. {', '.join('torchgeo:' + k for k in dinov2)}")
    return enum[member]


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


def _offline() -> bool:
    """HF_HUB_OFFLINE=1 also keeps us from trying any other host."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download_registered(uri: str) -> Path:
    """Download a domainfm backbone logged to MLflow and return its safetensors file."""
    import mlflow

    from domainfm import tracking

    tracking.configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise DomainFMError(f"cannot fetch {uri} from the MLflow registry at {tracking.tracking_uri()} ({e})",
                            fix="check the name and alias with `domainfm registry list`") from None
    found = sorted(local.rglob("backbone.safetensors"))
    if not found:
        raise DomainFMError(f"{uri} holds no backbone.safetensors (not a domainfm backbone)",
                            fix="register a model made by `domainfm pretrain --register NAME`")
    return found[0]


# ---------------------------------------------------------------- the module

@functools.cache
def _backbone_class():
    import torch
    from torch import nn

    class Backbone(nn.Module):
        """A timm model that returns its pooled feature, with optional token drop for ViTs.

        ``forward(x, keep_idx=None)``: ``keep_idx`` [B, n_keep] lists the patch tokens each sample
        keeps (Siamese masking). With ``mask_mode="drop"`` the others are removed before the
        transformer, so compute falls with the ratio; with ``"token"`` they are replaced by a
        learned mask token. The CLS (and register) tokens are always kept. For a CNN the dropped
        patches of the image are zeroed.
        """

        def __init__(self, model: nn.Module, *, name: str, in_chans: int, img_size: int):
            super().__init__()
            self.model = model
            self.name = name
            self.in_chans = in_chans
            self.img_size = img_size
            self.embed_dim = int(getattr(model, "num_features", None) or getattr(model, "embed_dim"))
            self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
            if self.is_vit:
                ps = model.patch_embed.patch_size
                self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
                self.grid_size = tuple(model.patch_embed.grid_size)
            else:
                self.patch_size = None
                self.grid_size = None
            # only masked pretraining with mask_mode="token" needs one (add_mask_token); it is not
            # part of the timm model and stays out of exported weights
            self.mask_token = None
            from timm.data import resolve_data_config

            self.data_config = resolve_data_config({}, model=model)

        @property
        def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
            """(mean, std) per channel for inputs scaled to [0, 1]: see :func:`input_normalization`."""
            return input_normalization(self)

        def add_mask_token(self) -> None:
            if self.is_vit and self.mask_token is None:
                self.mask_token = nn.Parameter(torch.zeros(1, 1, self.model.embed_dim))

        @property
        def num_patches(self) -> int:
            if self.is_vit:
                return int(self.grid_size[0] * self.grid_size[1])
            # CNNs are masked on a 16-px grid of the image
            return (self.img_size // 16) ** 2

        @property
        def mask_patch_size(self) -> int:
            return self.patch_size or 16

        def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None,
                    mask_mode: str = "drop") -> torch.Tensor:
            if keep_idx is None:
                return self.model(x)
            if not self.is_vit:
                from domainfm.masking import mask_image_patches

                return self.model(mask_image_patches(x, keep_idx, self.mask_patch_size))
            m = self.model
            # [B, N, D], or [B, H, W, D] for models built with dynamic_img_size (their _pos_embed
            # wants the grid to resize the position embedding)
            tokens = m.patch_embed(x)
            D = tokens.shape[-1]
            if mask_mode == "token":
                if self.mask_token is None:
                    raise DomainFMError("mask_mode='token' needs the backbone's mask token",
                                        fix="call add_mask_token() before training")
                flat = tokens.reshape(tokens.shape[0], -1, D)
                keep = torch.zeros(flat.shape[:2], dtype=torch.bool, device=flat.device)
                keep.scatter_(1, keep_idx, True)
                flat = torch.where(keep.unsqueeze(-1), flat, self.mask_token.to(flat.dtype).expand_as(flat))
                tokens = m._pos_embed(flat.reshape(tokens.shape))
            else:
                tokens = m._pos_embed(tokens)  # adds pos-embed, flattens, prepends prefix tokens
                P = m.num_prefix_tokens
                idx = keep_idx.unsqueeze(-1).expand(-1, -1, D)
                tokens = torch.cat([tokens[:, :P], torch.gather(tokens[:, P:], 1, idx)], dim=1)
            tokens = m.norm_pre(m.patch_drop(tokens))
            tokens = m.blocks(tokens)
            tokens = m.norm(tokens)
            return m.forward_head(tokens, pre_logits=True)

        def embedding_parameters(self, *, with_pos_embed: bool = False) -> list[str]:
            """Names (in ``self.model``) of the embedding layer's parameters, found from structure:
            the top-level modules that come before the first feature stage (ViT ``patch_embed``,
            ResNet ``conv1``/``bn1``, ConvNeXt ``stem``). ``with_pos_embed`` adds the position
            embedding and the CLS/register tokens, which are parameters of the model itself."""
            return embedding_parameter_names(self.model, with_pos_embed=with_pos_embed)

        def timm_state_dict(self) -> dict[str, torch.Tensor]:
            return {k: v for k, v in self.model.state_dict().items()}

    return Backbone


def Backbone(*args, **kwargs):  # noqa: N802 - builds the class on first use: no torch at import time
    return _backbone_class()(*args, **kwargs)


IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


def backbone_name(cfg: "RunConfig") -> str:
    """The architecture a run builds: the one a ``--weights`` export or ``models:/`` names in its
    metadata, else ``--backbone`` (as :func:`backbone_from_config` decides)."""
    if cfg.weights:
        path = _download_registered(cfg.weights) if cfg.weights.startswith("models:/") else Path(cfg.weights)
        return _safetensors_meta(path).get("domainfm_name") or cfg.backbone
    return cfg.backbone


def normalization_for_config(cfg: "RunConfig") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`input_normalization` of the backbone ``cfg`` will build, without building it."""
    return input_normalization(backbone_name(cfg))


def embedding_parameter_names(model, *, with_pos_embed: bool = False) -> list[str]:
    """Parameters of the modules registered before the model's first feature stage that see
    pixels. A ViT's token-level modules before its blocks (CLIP's pre-norm) are not the embedding."""
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        names = [f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()]
        if with_pos_embed:
            names += [n for n, _ in model.named_parameters(recurse=False) if n in ("pos_embed", "cls_token", "reg_token")]
        return names
    feature_info = getattr(model, "feature_info", None) or []
    stage_roots = []
    for info in feature_info:
        module = info.get("module", "") if isinstance(info, dict) else ""
        if info.get("reduction", 0) >= 4 or "blocks" in module or "stages" in module:
            stage_roots.append(module.split(".")[0])
    first_stage = stage_roots[0] if stage_roots else None
    names: list[str] = []
    for child_name, child in model.named_children():
        if child_name == first_stage:
            break
        names += [f"{child_name}.{n}" for n, _ in child.named_parameters()]
    if first_stage is None or not names:
        # fall back to the first conv named by the pretrained config (data, not a per-model list)
        first_conv = (getattr(model, "pretrained_cfg", {}) or {}).get("first_conv")
        if isinstance(first_conv, (list, tuple)):
            first_conv = first_conv[0]
        if first_conv:
            names = [n for n, _ in model.named_parameters() if n.startswith(first_conv + ".")]
    if with_pos_embed:
        names += [n for n, _ in model.named_parameters(recurse=False)
                  if n in ("pos_embed", "cls_token", "reg_token")]
    return names


# ---------------------------------------------------------------- factory

def _first_conv_key(model) -> str:
    first_conv = (getattr(model, "pretrained_cfg", {}) or {}).get("first_conv") or "patch_embed.proj"
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0]
    return first_conv + ".weight"


def load_adapted(model, state_dict: dict[str, "torch.Tensor"], *, patch_embed_init: str = "repeat",
                 source: str = "weights") -> None:
    """Load the backbone's part of ``state_dict`` (:func:`select_backbone_state`: heads and
    wrappers dropped) into ``model``, adapting bands and position embedding; all else strict.
    A ViT checkpoint of another depth, width or patch size fails naming both architectures."""
    import torch

    sd, _ = select_backbone_state(state_dict, model)
    is_vit = _is_vit_model(model)
    if is_vit:
        from timm.models.vision_transformer import checkpoint_filter_fn

        _architecture_mismatch(sd, model, source)
        # timm maps official DINOv2 keys (register_tokens, mask_token, w12/w3) and resizes pos_embed
        conv_key = "patch_embed.proj.weight"
        w = sd.get(conv_key)
        if w is not None and w.shape[1] != model.patch_embed.proj.weight.shape[1] or patch_embed_init == "random":
            if w is not None:
                sd[conv_key] = adapt_input_conv(w, model.patch_embed.proj.weight.shape[1], patch_embed_init)
        try:
            sd = checkpoint_filter_fn(sd, model)
            sd.pop("mask_token", None)  # a DINO-style mask token that timm did not consume
        except Exception as e:
            raise DomainFMError(f"{source} do not fit {type(model).__name__} ({e})",
                                fix="pick the --backbone these weights were trained with") from None
    else:
        conv_key = _first_conv_key(model)
        target = model.state_dict().get(conv_key)
        w = sd.get(conv_key)
        if w is not None and target is not None and (w.shape[1] != target.shape[1] or patch_embed_init == "random"):
            sd[conv_key] = adapt_input_conv(w, target.shape[1], patch_embed_init)
    model_sd = model.state_dict()
    # a classifier head that the backbone (num_classes=0) does not have is not a mismatch
    head = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    sd = {k: v for k, v in sd.items() if k in model_sd or not any(k.startswith(h + ".") for h in heads)}
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    wrong = sorted(k for k in set(sd) & set(model_sd) if tuple(sd[k].shape) != tuple(model_sd[k].shape))
    if missing and len(missing) == len(model_sd):
        groups = sorted({k.split(".")[0] for k in state_dict})
        raise DomainFMError(f"{source} hold no parameter of {type(model).__name__} (their {len(state_dict)} tensors "
                            f"sit under {', '.join(groups[:8])}{' ...' if len(groups) > 8 else ''})",
                            fix="pass a backbone's weights and the --backbone they were trained with")
    if missing or unexpected or wrong:
        detail = "; ".join(x for x in (
            f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "",
            f"shape mismatch {len(wrong)} (e.g. {wrong[0]}: {tuple(sd[wrong[0]].shape)} vs "
            f"{tuple(model_sd[wrong[0]].shape)})" if wrong else "") if x)
        raise DomainFMError(f"{source} do not fit {type(model).__name__}: {detail}",
                            fix="pick the --backbone these weights were trained with")
    with torch.no_grad():
        model.load_state_dict({k: v.to(model_sd[k].dtype) for k, v in sd.items()}, strict=True)


def create_backbone(name: str, *, in_chans: int = 3, img_size: int = 224, init: str = "dinov2",
                    patch_embed_init: str = "repeat", **model_kwargs: Any):
    """Build ``name`` (any timm architecture) with ``in_chans`` bands at ``img_size`` and load
    ``init`` weights into it (see the module docstring). Extra ``model_kwargs`` go to timm
    (e.g. ``depth=2`` for a small test model of the same architecture)."""
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise DomainFMError(f"unknown backbone {name!r}{hint}", fix="use a timm model name, e.g. vit_small_patch14_dinov2")
    if patch_embed_init not in PATCH_EMBED_INITS:
        raise DomainFMError(f"unknown patch_embed_init {patch_embed_init!r}", fix=f"use one of {', '.join(PATCH_EMBED_INITS)}")
    kwargs = dict(num_classes=0, in_chans=in_chans, **model_kwargs)
    if _accepts_img_size(arch):
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    spec = None  # the bands / statistics the weights were trained with, when they say so
    if init == "random":
        pass
    elif init in PRETRAINED_INITS:
        path = pretrained_weights_file(name if "." in name else _default_tag(name, init))
        sd, _ = read_state_dict(path)
        load_adapted(model, sd, patch_embed_init=patch_embed_init, source=f"pretrained weights {path}")
    elif init.startswith(TORCHGEO_PREFIX):
        weights = torchgeo_weights(init)
        arch = weights.meta.get("model")
        if arch and arch != name.split(".")[0]:
            raise DomainFMError(f"{init} holds weights for {arch}, not {name}", fix=f"pass --backbone {arch}")
        spec = torchgeo_input_spec(weights, init)
        path = torchgeo_weights_file(weights)
        sd, _ = read_state_dict(path)
        load_adapted(model, sd, patch_embed_init=patch_embed_init, source=f"torchgeo weights {init}")
    else:
        path = _download_registered(init) if init.startswith("models:/") else Path(init)
        sd, meta = read_state_dict(path)
        spec = InputSpec.from_meta(meta, source=f"metadata of {init}")
        load_adapted(model, sd, patch_embed_init=patch_embed_init, source=f"weights {init}")
    backbone = Backbone(model, name=name, in_chans=in_chans, img_size=img_size)
    backbone.input_spec = spec
    return backbone


def _default_tag(name: str, init: str) -> str:
    # "dinov2" on a DINOv2 architecture means its LVD-142M weights; otherwise timm's default tag
    if init == "dinov2" and name in DINOV2_NAMES:
        return f"{name}.lvd142m"
    return name


def _accepts_img_size(arch: str) -> bool:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    # transformers take img_size; CNNs are size-agnostic and reject it
    return any(k in arch for k in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit", "pvt", "mvit")) or bool(
        cfg and getattr(cfg, "fixed_input_size", False))


def backbone_from_config(cfg: "RunConfig", in_chans: int | None = None, **model_kwargs: Any):
    """The backbone a run asks for. ``--weights`` beats ``--init``; a domainfm export or a
    ``models:/`` URI names its own architecture, so ``--backbone`` need not repeat it."""
    chans = in_chans if in_chans is not None else (cfg.in_chans or 3)
    name, init = cfg.backbone, cfg.init
    if cfg.weights:
        path = _download_registered(cfg.weights) if cfg.weights.startswith("models:/") else Path(cfg.weights)
        name = _safetensors_meta(path).get("domainfm_name") or name
        init = str(path)
    return create_backbone(name, in_chans=chans, img_size=cfg.img_size, init=init,
                           patch_embed_init=cfg.patch_embed_init, **model_kwargs)


def _safetensors_meta(path: str | Path) -> dict[str, str]:
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def load_backbone(path_or_uri: str | Path, *, cfg: "RunConfig | None" = None, in_chans: int | None = None,
                  img_size: int | None = None):
    """A backbone from a domainfm export or ``models:/`` URI, whose metadata names its architecture;
    a plain state dict falls back to ``cfg.backbone``."""
    spec = str(path_or_uri)
    path = _download_registered(spec) if spec.startswith("models:/") else Path(spec)
    meta = _safetensors_meta(path)
    name = meta.get("domainfm_name") or (cfg.backbone if cfg is not None else None)
    if not name:
        raise DomainFMError("weights carry no architecture name", path=path, fix="pass --backbone NAME")
    chans = int(meta.get("in_chans", in_chans or (cfg.in_chans if cfg else None) or 3))
    if in_chans is not None and chans != in_chans:
        raise DomainFMError(f"the model takes {chans} bands but the data has {in_chans}", path=spec,
                            fix="evaluate on data of the modality the model was trained on")
    size = img_size or int(meta.get("img_size", cfg.img_size if cfg else 224))
    return create_backbone(name, in_chans=chans, img_size=size, init=str(path),
                           patch_embed_init=cfg.patch_embed_init if cfg else "repeat")


def save_backbone(backbone, path: str | Path, *, extra_meta: dict[str, str] | None = None) -> Path:
    """Save the timm model's weights (timm keys) with the architecture in the metadata, atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    meta = {"format": "pt", "domainfm_name": backbone.name, "in_chans": str(backbone.in_chans),
            "img_size": str(backbone.img_size), "embed_dim": str(backbone.embed_dim)}
    spec = getattr(backbone, "input_spec", None)
    if spec is not None and len(spec.bands or ()) == backbone.in_chans:  # bands still those of the weights
        meta.update(spec.to_meta())
    meta.update(extra_meta or {})
    tmp = p.with_name(p.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------- what the input must look like

INPUT_META_KEYS = {"bands": "input_bands", "mean": "input_mean", "std": "input_std",
                   "modality": "input_modality", "gsd_m": "input_gsd_m", "units": "input_units"}


@dataclass(frozen=True)
class InputSpec:
    """The input a backbone's weights were trained on: band names in order, per-band mean/std
    (in ``units``, e.g. Sentinel-2 reflectance x 10000 or Sentinel-1 dB), modality, ground
    sampling distance in metres. Stored as ``input_*`` keys (JSON values) in the safetensors
    metadata of a domainfm export; any field may be None (a plain timm or DINOv2 file has none)."""

    bands: tuple | None = None
    mean: tuple | None = None
    std: tuple | None = None
    modality: str | None = None
    gsd_m: float | None = None
    units: str | None = None
    source: str = ""

    @property
    def has_stats(self) -> bool:
        return bool(self.mean) and bool(self.std)

    def to_meta(self) -> dict[str, str]:
        """``input_*`` metadata entries (str -> JSON str) for the fields that are set."""
        import json

        out = {}
        for field_name, key in INPUT_META_KEYS.items():
            value = getattr(self, field_name)
            if value is not None:
                out[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, str] | None, source: str = ""):
        """The spec recorded in ``meta``, or None when it records none."""
        import json

        meta = meta or {}
        if not any(k in meta for k in INPUT_META_KEYS.values()):
            return None
        values = {}
        for field_name, key in INPUT_META_KEYS.items():
            if key in meta:
                try:
                    v = json.loads(meta[key])
                except ValueError:
                    v = meta[key]
                values[field_name] = tuple(v) if isinstance(v, list) else v
        return cls(source=source, **values)



def torchgeo_input_spec(weights, init: str = ""):
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


def input_spec_of(source: str | Path | None):
    """The InputSpec recorded for ``source`` (a weights file, ``models:/`` URI or ``torchgeo:``
    enum) without building a model; None when it records none (timm/DINOv2 names, plain files)."""
    if not source:
        return None
    spec = str(source)
    if spec.startswith(TORCHGEO_PREFIX):
        return torchgeo_input_spec(torchgeo_weights(spec), spec)
    if spec in PRETRAINED_INITS or spec == "random":
        return None
    path = _download_registered(spec) if spec.startswith("models:/") else Path(spec)
    return InputSpec.from_meta(_safetensors_meta(path), source=f"metadata of {spec}")
