"""Pure weight adaptation: a checkpoint's tensors made to fit a timm model (no file or network I/O).

- :func:`adapt_patch_embed_weight` turns an RGB patch embedding (or first conv) into any number of
  bands so that a grey input gives exactly the RGB model's response;
- :func:`flatten_checkpoint` / :func:`strip_prefix` / :func:`select_backbone_state` find the
  backbone's own tensors inside training checkpoints (DINOv2's ``teacher.backbone.*`` beside its
  heads, DDP/Lightning wrappers, chunked blocks);
- :func:`check_architecture` names both architectures when a ViT checkpoint's size differs;
- :func:`load_adapted` loads the result (timm's checkpoint filter maps official DINOv2 keys and
  resizes the position embedding; every other weight loads unchanged, ``strict=True``).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PATCH_EMBED_INITS = ("repeat", "mean", "random")
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


def adapt_patch_embed_weight(weight: "torch.Tensor", in_chans: int, mode: str = "repeat",
                             generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Turn a first-layer kernel ``[out, c, kh, kw]`` into ``[out, in_chans, kh, kw]`` (any ``c``,
    any ``in_chans``; unlike timm's ``adapt_input_conv`` a grey input's response is kept exactly).

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


def check_architecture(sd: dict[str, Any], model, source: str) -> None:
    """Raise one line naming the real cause when a ViT checkpoint's size differs from the model's:
    ``architecture mismatch: <source> hold 12 blocks of dim 384 (patch 14), --backbone X has ...``."""
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

        check_architecture(sd, model, source)
        # timm maps official DINOv2 keys (register_tokens, mask_token, w12/w3) and resizes pos_embed
        conv_key = "patch_embed.proj.weight"
        w = sd.get(conv_key)
        if w is not None and w.shape[1] != model.patch_embed.proj.weight.shape[1] or patch_embed_init == "random":
            if w is not None:
                sd[conv_key] = adapt_patch_embed_weight(w, model.patch_embed.proj.weight.shape[1], patch_embed_init)
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
            sd[conv_key] = adapt_patch_embed_weight(w, target.shape[1], patch_embed_init)
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
