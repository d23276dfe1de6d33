"""Backbones: one entry point, weight sources as data, pure adaptation, one metadata reader.

``create_backbone(source, *, cfg=None, in_chans=None, img_size=None, init=None, patch_embed_init=None)``
builds every backbone (:mod:`.factory`): a timm name with ``init`` weights, a domainfm export or
``models:/`` URI or ``torchgeo:`` enum as the model itself, or a ``RunConfig``.

- :mod:`.sources`  where weights come from (:class:`WeightSource`: hub, file, ``models:/``,
  ``torchgeo:``, random) and what they carry (architecture, bands, mean/std, GSD); caches, network.
- :mod:`.adapt`    pure weight adaptation (:func:`adapt_patch_embed_weight`, checkpoint flattening,
  backbone selection inside training checkpoints, architecture checks, :func:`load_adapted`).
- :mod:`.meta`     the one safetensors metadata reader (:func:`read_metadata`) and :class:`InputSpec`.
- :mod:`.module`   :class:`Backbone` (the ``nn.Module``), :func:`save_backbone`, :func:`save_weights`.
- :mod:`.export`   ``domainfm export``: ONNX / TorchScript.

Importing this package imports neither torch nor mlflow; :class:`Backbone` and the savers load
torch when first used.
"""

from __future__ import annotations

from domainfm.backbones.adapt import (PATCH_EMBED_INITS, adapt_patch_embed_weight, check_architecture,
                                      flatten_checkpoint, load_adapted, select_backbone_state, strip_prefix)
from domainfm.backbones.factory import (backbone_name, check_run_backbone, create_backbone,
                                        normalization_for_config, similar_names)
from domainfm.backbones.meta import INPUT_META_KEYS, InputSpec, read_metadata
from domainfm.backbones.sources import (DINOV2_NAMES, IMAGENET_NORMALIZATION, PRETRAINED_INITS, TORCHGEO_PREFIX,
                                        WeightSource, input_normalization, input_spec_of, pretrained_weights_file,
                                        read_state_dict, resolve_source, source_kind, torchgeo_input_spec,
                                        torchgeo_weights, torchgeo_weights_file)

_TORCH_NAMES = ("Backbone", "embedding_parameter_names", "save_backbone", "save_weights")

__all__ = [
    "PATCH_EMBED_INITS", "adapt_patch_embed_weight", "check_architecture", "flatten_checkpoint", "load_adapted",
    "select_backbone_state", "strip_prefix", "backbone_name", "check_run_backbone", "create_backbone", "similar_names",
    "normalization_for_config", "INPUT_META_KEYS", "InputSpec", "read_metadata", "DINOV2_NAMES",
    "IMAGENET_NORMALIZATION", "PRETRAINED_INITS", "TORCHGEO_PREFIX", "WeightSource", "input_normalization",
    "input_spec_of", "pretrained_weights_file", "read_state_dict", "resolve_source", "source_kind",
    "torchgeo_input_spec", "torchgeo_weights", "torchgeo_weights_file", *_TORCH_NAMES,
]


def __getattr__(name: str):
    # the nn.Module and the savers import torch: loaded on first use, not with the package
    if name in _TORCH_NAMES:
        from domainfm.backbones import module

        return getattr(module, name)
    raise AttributeError(f"module 'domainfm.backbones' has no attribute {name!r}")
