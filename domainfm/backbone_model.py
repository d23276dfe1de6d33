"""MLflow "model from code": a backbone that takes a float image batch of ANY spatial size (no pickle).

Logged by :func:`domainfm.jobs.log_backbone` for a backbone whose export does not record per-band
statistics (those get :mod:`domainfm.raw_pixels_model`, which takes raw pixels by band name).
Artifact: ``backbone`` (the domainfm safetensors export; architecture, bands and input size come
from its metadata).

Input: float32 ``[N, C, H, W]`` (the signature's TensorSpec is ``(-1, C, -1, -1)``: any batch and
any height/width), already normalised the way the backbone expects (C = the export's ``in_chans``).
Size handling: the image is RESIZED inside the model to the backbone's input size ``S`` (the
``img_size`` of the export, recorded as ``domainfm.input.size`` in the MLmodel metadata) with
bilinear interpolation (antialiased when shrinking), then the backbone runs on ``[N, C, S, S]``.
Resizing rather than timm's dynamic image size keeps the numbers those of the trained model at its
own resolution for ViTs and CNNs alike (a ViT's position embedding is never interpolated).
Output: the pooled embeddings ``[N, D]`` (float32). Raises ValueError for an input that is not
4-D or has another channel count.
"""

from __future__ import annotations

import mlflow
import numpy as np


def resize_to(t, size: int):
    """``t`` [N, C, H, W] resized to ``size`` x ``size`` (bilinear, antialiased when shrinking);
    returned unchanged when already that size. The one resize of the logged backbone models."""
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) == (size, size):
        return t
    shrink = size < t.shape[-2] or size < t.shape[-1]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class SizeAgnosticBackbone(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from domainfm.backbones import create_backbone

        self.backbone = create_backbone(context.artifacts["backbone"]).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = np.asarray(model_input, dtype=np.float32)
        c = self.backbone.in_chans
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"give a float32 [N, {c}, H, W] batch; got shape {list(x.shape)}")
        t = resize_to(torch.from_numpy(x), self.backbone.img_size)
        with torch.no_grad():
            return self.backbone(t).float().numpy()


mlflow.models.set_model(SizeAgnosticBackbone())
