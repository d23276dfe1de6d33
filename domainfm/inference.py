"""Frozen-feature inference: device and precision, feature extraction (+ flip TTA), token merging.

:class:`FrozenEncoder` is the one frozen forward pass (raw pixels normalised on the device with the
backbone's mean/std, resize to a ViT's input size, ``inference_mode``, autocast); histo's tile
encoder and eo-sar's window encoder are it. :func:`extract_features` is the one loop that turns a dataset of images into a feature matrix for
every frozen-feature job (probes, retrieval, embeddings): device from :func:`resolve_device`,
autocast from :func:`autocast_dtype`, optional horizontal-flip test-time augmentation and optional
token merging (below).

Token Merging (ToMe; Bolya, Fu, Dai, Zhang, Feichtenhofer & Hoffman, "Token Merging: Your ViT But
Faster", ICLR 2023): between the attention and the MLP of every block, the ``r`` most similar
pairs of patch tokens are merged by *bipartite soft matching* (the tokens are split alternately
into sets A and B; each A token's most similar B token, by cosine similarity of the attention keys
averaged over heads, is its candidate; the ``r`` best candidate edges are merged by a size-weighted
average). Each token remembers how many patches it stands for (its *size* s), and attention adds
``log s`` to the logits of that key (*proportional attention*), so a merged token weighs as much as
the tokens it replaced. The CLS and register tokens (timm's ``num_prefix_tokens``) are never merged.

Implemented on timm's own modules: each ``timm.models.vision_transformer.Block`` gets a small
``forward`` that calls the block's own ``norm1``/``attn``/``ls1``/``norm2``/``mlp``/``ls2`` (the
size bias goes in through timm's ``attn_mask`` argument; the keys are read by a forward hook on
``attn.qkv``). :func:`apply_token_merging` patches a model and returns a handle that undoes it
(``.remove()``, or use it as a context manager).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from domainfm.errors import DomainFMError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn


# ---------------------------------------------------------------- pure pieces

def merged_token_counts(num_patches: int, r: int, depth: int) -> list[int]:
    """Patch tokens (prefix tokens not counted) entering each of ``depth`` blocks, and leaving the
    last: ``depth + 1`` numbers. Each block merges ``min(r, n // 2)`` of its ``n`` patch tokens
    (set B has ``n // 2`` tokens; ToMe's clamp)."""
    counts = [int(num_patches)]
    for _ in range(depth):
        n = counts[-1]
        counts.append(n - min(r, n // 2))
    return counts


def bipartite_soft_matching(metric: "torch.Tensor", r: int, num_protected: int) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """ToMe's matching of ``r`` token pairs; returns ``merge(x)`` that sums merged rows.

    ``metric``: [B, N, C] (the keys); the first ``num_protected`` tokens are kept as they are.
    The other tokens alternate between A (even positions) and B (odd positions). ``merge(x)``:
    [B, N, D] -> [B, N - r, D], ordered [protected, unmerged A tokens, B tokens]; each B row is
    the *sum* of itself and the A rows merged into it (divide by summed sizes for an average).
    """
    import torch

    P = num_protected
    n = metric.shape[1] - P
    r = min(r, n // 2)
    if r <= 0:
        return lambda x: x
    with torch.no_grad():
        m = metric[:, P:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)                       # [B, |A|, |B|]
        best, best_dst = scores.max(dim=-1)                    # each A token's closest B token
        order = best.argsort(dim=-1, descending=True)[..., None]
        src_idx = order[:, :r]                                 # A tokens merged away
        unm_idx = order[:, r:]                                 # A tokens kept
        dst_idx = best_dst[..., None].gather(1, src_idx)       # the B tokens they join

    def merge(x: "torch.Tensor") -> "torch.Tensor":
        prefix, rest = x[:, :P], x[:, P:]
        src, dst = rest[:, ::2], rest[:, 1::2]
        B, _, D = src.shape
        unm = src.gather(1, unm_idx.expand(B, unm_idx.shape[1], D))
        moved = src.gather(1, src_idx.expand(B, r, D))
        dst = dst.scatter_reduce(1, dst_idx.expand(B, r, D), moved, reduce="sum")
        return torch.cat([prefix, unm, dst], dim=1)

    return merge


def merge_weighted(merge: Callable, x: "torch.Tensor", size: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Size-weighted average of merged tokens: ``x`` [B, N, D], ``size`` [B, N, 1] -> merged both."""
    x = merge(x * size)
    size = merge(size)
    return x / size, size


# ---------------------------------------------------------------- patching timm blocks

@dataclass
class _ToMeState:
    r: int
    num_prefix: int
    prop_attn: bool = True
    size: Any = None          # [B, N, 1] float32 token sizes, None before the first merge
    metric: Any = None        # keys of the block running now, [B, N, head_dim]
    counts: list = field(default_factory=list)  # tokens (prefix included) leaving each block, last forward


@dataclass
class TokenMerging:
    """Handle of a model patched by :func:`apply_token_merging`; ``remove()`` restores it."""

    model: Any
    r: int
    state: _ToMeState
    _undo: list = field(default_factory=list)

    @property
    def token_counts(self) -> list[int]:
        """Tokens (CLS/registers included) leaving each block in the last forward pass."""
        return list(self.state.counts)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "TokenMerging":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _timm_vit(model) -> Any:
    """The timm VisionTransformer inside a domainfm Backbone (or the model itself)."""
    return getattr(model, "model", model) if not hasattr(model, "blocks") else model


def _check_blocks(vit, where: str) -> list:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks = list(getattr(vit, "blocks", []) or [])
    if not (hasattr(vit, "patch_embed") and blocks):
        raise DomainFMError(f"token merging needs a ViT, and {where} is not one ({type(vit).__name__})",
                            fix="drop --tome-r, or use a ViT backbone (DINOv2, CLIP)")
    for blk in blocks:
        if type(blk).forward is not Block.forward or not isinstance(blk.attn, Attention):
            raise DomainFMError(f"token merging supports timm's plain ViT blocks, and {where} has "
                                f"{type(blk).__name__} with {type(blk.attn).__name__}",
                                fix="drop --tome-r, or use a DINOv2/CLIP ViT")
    return blocks


def check_token_merging(model, r: int, *, where: str = "the model") -> int:
    """Validate ``r`` for ``model`` (a Backbone or timm ViT); returns its patch-token count.

    Errors (:class:`DomainFMError`): the model is not a ViT made of timm ``Block``s, ``r`` < 0, or
    ``r`` larger than half the patch tokens (the first block could not merge ``r`` pairs).
    """
    vit = _timm_vit(model)
    _check_blocks(vit, where)
    n = int(math.prod(vit.patch_embed.grid_size))
    if r < 0:
        raise DomainFMError(f"--tome-r must be 0 or more, got {r}", fix="pass --tome-r 0 (off) or a positive count")
    if r > n // 2:
        depth = len(vit.blocks)
        raise DomainFMError(f"--tome-r {r} is too large for {where}: it has {n} patch tokens, and a block can "
                            f"merge at most half of them ({n // 2})",
                            fix=f"pass --tome-r {n // 2} or less: the largest useful --tome-r for this model's {n} "
                                f"patch tokens and {depth} blocks is {n // 2}"
                                + (f" (up to {n // (depth + 1)} every block merges r tokens; above that the later "
                                   "blocks merge fewer)" if n // (depth + 1) else ""))
    return n


def apply_token_merging(model, r: int, *, prop_attn: bool = True) -> TokenMerging:
    """Merge ``r`` tokens in every block of a timm ViT (ToMe); returns a handle that undoes it.

    ``model``: a domainfm Backbone or a timm ``VisionTransformer`` whose blocks are timm ``Block``s
    with timm ``Attention`` (DINOv2 with or without registers, CLIP, AugReg ViTs). Its forward then
    takes the same [B, C, H, W] input and returns the same shapes; the tokens entering block ``i``
    number ``prefix + n_i`` with ``n`` from :func:`merged_token_counts`. ``r=0`` changes no number.
    ``prop_attn``: add ``log(size)`` to the attention logits (proportional attention).
    Errors as :func:`check_token_merging`. Source: Bolya et al., ICLR 2023.
    """
    import torch

    vit = _timm_vit(model)
    check_token_merging(vit, r)
    blocks = _check_blocks(vit, "the model")
    state = _ToMeState(r=int(r), num_prefix=int(getattr(vit, "num_prefix_tokens", 1)), prop_attn=prop_attn)
    handle = TokenMerging(model=model, r=int(r), state=state)

    for i, blk in enumerate(blocks):
        attn = blk.attn

        def keep_keys(module, inputs, output, attn=attn):
            B, N, _ = output.shape
            k = output.reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 1]
            state.metric = attn.k_norm(k).mean(dim=2)

        hook = attn.qkv.register_forward_hook(keep_keys)

        def forward(x, attn_mask=None, is_causal=False, blk=blk, first=(i == 0)):
            if attn_mask is not None or is_causal:
                raise DomainFMError("token merging cannot run with an attention mask",
                                    fix="call the model without attn_mask")
            if first:  # a new forward pass: every token stands for one patch again
                state.size = None
                state.counts = []
            bias = None
            if state.prop_attn and state.size is not None:
                bias = state.size.log()[:, None, None, :, 0]  # [B, 1, 1, N] added to the logits
                device_type = x.device.type
                if torch.is_autocast_enabled(device_type):
                    bias = bias.to(torch.get_autocast_dtype(device_type))
                else:
                    bias = bias.to(x.dtype)
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=bias)))
            if state.r > 0:
                merge = bipartite_soft_matching(state.metric, state.r, state.num_prefix)
                if state.size is None:
                    state.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
                merged, state.size = merge_weighted(merge, x.float(), state.size)
                x = merged.to(x.dtype)
            state.metric = None
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            state.counts.append(int(x.shape[1]))
            return x

        blk.forward = forward

        def undo(blk=blk, hook=hook):
            hook.remove()
            blk.__dict__.pop("forward", None)

        handle._undo.append(undo)

    # average pooling must weigh a merged token by the patches it stands for
    if getattr(vit, "global_pool", "token") == "avg" and getattr(vit, "attn_pool", None) is None:
        plain_pool = vit.pool

        def pool(x, pool_type=None):
            if (pool_type or vit.global_pool) != "avg" or state.size is None:
                return plain_pool(x, pool_type)
            P = vit.num_prefix_tokens
            s = state.size[:, P:].to(x.dtype)
            return (x[:, P:] * s).sum(dim=1) / s.sum(dim=1)

        vit.pool = pool
        handle._undo.append(lambda: vit.__dict__.pop("pool", None))
    return handle


# ---------------------------------------------------------------- device and precision

def resolve_device(accelerator: str):
    """``torch.device`` for ``--accelerator`` (auto|cpu|gpu|cuda): CUDA when asked for or, with
    ``auto``, when one is visible. Raises DomainFMError when a GPU is asked for and none is visible."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DomainFMError("--accelerator gpu but no CUDA device is visible", fix="use --accelerator cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(precision: str, device) -> Any:
    """The autocast dtype of a Lightning ``--precision`` string for frozen-feature inference:
    bfloat16 for ``bf16*``, float16 for ``16*`` (CUDA only), None (no autocast) for ``32*``/``64*``.
    Raises DomainFMError for 16-bit on CPU and for unknown strings."""
    import torch

    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        if device.type != "cuda":
            raise DomainFMError("--precision 16-mixed needs a GPU", fix="use bf16-mixed or 32-true on CPU")
        return torch.float16
    if p.startswith("32") or p.startswith("64"):
        return None
    raise DomainFMError(f"unknown --precision {precision!r}", fix="use 32-true, bf16-mixed or 16-mixed")


# ---------------------------------------------------------------- frozen-feature extraction

class FrozenEncoder:
    """A frozen backbone on a device: images in, ``float32`` features out. The one forward pass of
    the frozen-feature paths (:func:`extract_features`, ``histo embed``'s tiles, ``eo-sar embed``'s
    windows): the backbone in eval mode on ``device``; :meth:`prepare` moves a batch there and, as
    asked, normalises raw pixels and resizes; :meth:`forward` runs under ``torch.inference_mode``
    and autocast (:func:`autocast_dtype` of ``precision``; features cast back to float32).

    - ``backbone``: a module mapping ``float [B, C, H, W]`` to ``[B, D]`` (a domainfm ``Backbone``).
    - ``device``: a ``torch.device`` or name (:func:`resolve_device` for an ``--accelerator``).
    - ``pixel_scale``: None (inputs already normalised), or the value of white in the raw pixels
      (255 for uint8 tiles): inputs are then normalised on the device with the backbone's own
      mean/std (:func:`domainfm.backbones.input_normalization`, for pixels in [0, 1]) as
      ``(x - mean * scale) / (std * scale)``, and may be channels-last ``[B, H, W, C]``.
    - ``resize``: a ViT's input resized (bilinear, antialiased) to its ``img_size`` when the images
      are of another size (a CNN takes them as they are).
    - ``flip_tta``: the feature of an image is the mean of the features of the image and of its
      horizontal mirror (flip of the last axis, W).

    Raises DomainFMError of :func:`autocast_dtype` for a bad precision.
    """

    def __init__(self, backbone, device="cpu", precision: str = "32-true", *, pixel_scale: float | None = None,
                 resize: bool = False, flip_tta: bool = False) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision, self.device)
        self.backbone = backbone.to(self.device).eval()
        self.flip_tta = bool(flip_tta)
        self.mean = self.std = None
        if pixel_scale is not None:
            from domainfm.backbones import input_normalization

            mean, std = input_normalization(backbone)  # the one normalisation source of the backbone
            self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * float(pixel_scale)
            self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * float(pixel_scale)
        self.img_size = backbone.img_size if resize and getattr(backbone, "is_vit", False) else None

    def autocast(self):
        """The autocast context of this encoder's precision (a null context for 32-bit)."""
        import contextlib

        import torch

        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def prepare(self, images) -> "torch.Tensor":
        """A batch (torch tensor or numpy array, ``[B, C, H, W]``; channels-last ``[B, H, W, C]`` too
        with ``pixel_scale``) on the device, normalised and resized as the encoder was built to."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.as_tensor(images).to(self.device, non_blocking=True)
            if self.mean is not None:
                c = self.mean.shape[1]
                if x.shape[-1] == c and x.shape[1] != c:
                    x = x.permute(0, 3, 1, 2)
                x = (x.float() - self.mean) / self.std
            if self.img_size and x.shape[-1] != self.img_size:
                x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
            return x

    def forward(self, x: "torch.Tensor", fn: Callable[["torch.Tensor"], "torch.Tensor"] | None = None) -> "torch.Tensor":
        """Features of a prepared batch, float32 on the device: ``fn(x)`` (default the backbone's
        pooled ``[B, D]``; any function of the backbone, e.g. its patch tokens) under
        ``inference_mode`` and autocast, with flip TTA when the encoder has it."""
        import torch

        fn = fn or self.backbone
        with torch.inference_mode(), self.autocast():
            f = fn(x).float()
            if self.flip_tta:
                f = (f + fn(torch.flip(x, dims=[-1])).float()) / 2
            return f

    def __call__(self, images) -> "np.ndarray":
        """``forward(prepare(images))`` as a numpy array."""
        return self.forward(self.prepare(images)).cpu().numpy()



def _stack_key(samples, key: str = "image"):
    """Collate only ``sample[key]`` of dict samples (or the samples themselves when they are
    tensors): strings, tuples of band names and the like never reach ``default_collate``. A
    module-level function, so it pickles for spawned workers (with ``functools.partial``)."""
    import torch

    return torch.stack([s[key] if isinstance(s, dict) else s for s in samples])


def extract_features(backbone, data, *, device="cpu", precision: str = "32-true", image_key: str = "image",
                     flip_tta: bool = False, tome_r: int = 0, batch_size: int = 64, num_workers: int = 0,
                     progress: str | None = "extracting features") -> "np.ndarray":
    """Pooled features ``float32 [N, D]`` of every image of ``data``, in order, under
    ``torch.inference_mode`` with the backbone in eval mode (its train/eval state is restored after).

    - ``backbone``: a module mapping ``float [B, C, H, W]`` to ``[B, D]`` (a domainfm ``Backbone``).
    - ``data``: a ``DataLoader`` (used as is; its batches are dicts holding ``image_key`` or image
      tensors), or a ``Dataset`` of such samples, read in order by a DataLoader of ``batch_size``
      with ``num_workers`` workers (:func:`domainfm.data.loader_kwargs`) that collates only the images.
    - ``device``: a ``torch.device`` or a name ("cpu", "cuda"); use :func:`resolve_device` for an
      ``--accelerator`` value. ``precision``: a Lightning ``--precision`` string, through
      :func:`autocast_dtype` (features are returned in float32 whatever the autocast dtype).
    - ``flip_tta``: the feature of an image is the mean of the features of the image and of its
      horizontal mirror (flip of the last axis, W).
    - ``tome_r``: token merging (:func:`apply_token_merging`) with ``r`` tokens per block, applied
      for this call only and removed after it (0: none).
    - ``progress``: the description of a transient rich progress bar on stderr (shown only when
      stderr is a terminal); None: no bar.

    Raises DomainFMError when a feature is NaN or infinite (a diverged model), and those of
    :func:`autocast_dtype` / :func:`apply_token_merging` for a bad precision or ``tome_r``.
    """
    import contextlib
    import functools
    import sys

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from domainfm.data import loader_kwargs

    device = torch.device(device)
    autocast_dtype(precision, device)  # a bad precision stops before any data is read
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False,
                            collate_fn=functools.partial(_stack_key, key=image_key),
                            **loader_kwargs(num_workers))  # never fork a threaded process
    was_training = backbone.training
    encoder = FrozenEncoder(backbone, device, precision, flip_tta=flip_tta)
    show = progress is not None and sys.stderr.isatty()
    out = []
    try:
        from domainfm.output import progress_bar

        with contextlib.ExitStack() as stack:
            if tome_r:
                stack.enter_context(apply_token_merging(backbone, tome_r))  # removed on leaving
            stack.enter_context(torch.inference_mode())
            bar = stack.enter_context(progress_bar(enabled=show))
            task = bar.add_task(progress or "", total=len(loader))
            for batch in loader:
                x = batch[image_key] if isinstance(batch, dict) else batch
                out.append(encoder.forward(encoder.prepare(x)).cpu())
                bar.advance(task)
    finally:
        backbone.train(was_training)
    if not out:
        return np.zeros((0, int(getattr(backbone, "embed_dim", 0))), dtype=np.float32)
    feats = torch.cat(out).numpy()
    if not np.isfinite(feats).all():
        raise DomainFMError("the model produced NaN or infinite features", fix="check the weights (a diverged run?)")
    return feats
