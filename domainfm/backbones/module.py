"""The backbone module: a timm model returning its pooled feature, and the one way to save weights.

Importing this module imports torch; ``domainfm.backbones`` imports it only when one of its names
is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from domainfm.errors import DomainFMError


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
        # the bands / statistics the weights were trained with, when they say so (create_backbone sets it)
        self.input_spec = None
        from timm.data import resolve_data_config

        self.data_config = resolve_data_config({}, model=model)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel for inputs scaled to [0, 1]: see :func:`input_normalization`."""
        from domainfm.backbones.sources import input_normalization

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


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """The one weights writer: ``state_dict`` (detached, on CPU, contiguous) as safetensors with
    ``metadata`` (str -> str; ``format: pt`` added), written under a temporary name and renamed so
    an interrupted save never leaves a half file. Returns ``path``."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = p.with_name(p.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, p)
    return p


def save_backbone(backbone, path: str | Path, *, extra_meta: dict[str, str] | None = None) -> Path:
    """Save the timm model's weights (timm keys, no ``model.`` prefix) with the architecture in the
    metadata (``domainfm_name``, ``in_chans``, ``img_size``, ``embed_dim``, and the ``input_*`` keys
    of its :class:`InputSpec` while its bands are still those of the weights), atomically."""
    meta = {"domainfm_name": backbone.name, "in_chans": str(backbone.in_chans),
            "img_size": str(backbone.img_size), "embed_dim": str(backbone.embed_dim)}
    spec = getattr(backbone, "input_spec", None)
    if spec is not None and len(spec.bands or ()) == backbone.in_chans:  # bands still those of the weights
        meta.update(spec.to_meta())
    meta.update(extra_meta or {})
    return save_weights(backbone.model.state_dict(), path, meta)
