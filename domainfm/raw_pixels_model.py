"""MLflow "model from code": a backbone that takes RAW pixels by band name (no pickle anywhere).

Logged by :func:`domainfm.jobs.log_backbone` for a backbone whose export records its input
(:class:`domainfm.backbones.InputSpec`: band names, per-band mean/std in e.g. Sentinel-2
reflectance x 10000 or Sentinel-1 dB). Artifact: ``backbone`` (the domainfm safetensors export).

Input: a dict of named float arrays, one per band, each [N, H, W] in the units of the export
(the input schema lists the band names, each an optional column, so a band may be left out).
The model aligns the given bands to its own by name
(order does not matter; a band it expects but is not given is filled with its mean, i.e. 0 after
normalisation; extra bands are ignored), normalises with its recorded statistics (non-finite
pixels become 0, the mean), resizes to its input size (bilinear, antialiased when shrinking) and
returns the pooled embeddings [N, D] (float32).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class RawPixelsBackbone(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from domainfm.backbones import InputSpec, create_backbone, read_metadata

        path = context.artifacts["backbone"]
        self.spec = InputSpec.from_meta(read_metadata(path), source=path)
        self.backbone = create_backbone(path).eval()

    # the hint says what MLflow hands over after checking the column schema; a DataFrame hint
    # turns on no extra validation, and MLflow stops warning that predict has no type hints
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch
        import torch.nn.functional as F

        from domainfm.errors import DomainFMError

        spec = self.spec
        given = {}
        for name, value in _columns(model_input, spec.bands).items():
            key = str(name).strip().upper()  # B01 -> B1, b8a -> B8A, vv -> VV
            key = "B" + key[1:].lstrip("0") if key.startswith("B") and len(key) > 2 else key
            given[key] = np.asarray(value, dtype=np.float32)
        shared = [b for b in spec.bands if b in given]
        if not shared:  # (MLflow drops inputs the schema does not name before this point)
            raise DomainFMError(f"the input has none of the model bands ({', '.join(spec.bands)})"
                                + (f": it gives {', '.join(given)}" if given else ""),
                                fix="pass the bands the model was trained on")
        ref = given[shared[0]]
        if ref.ndim == 2:
            given = {k: v[None] for k, v in given.items()}
            ref = ref[None]
        x = np.zeros((ref.shape[0], len(spec.bands), *ref.shape[1:]), dtype=np.float32)
        for i, (band, mean, std) in enumerate(zip(spec.bands, spec.mean, spec.std)):
            if band in given:
                x[:, i] = (given[band] - np.float32(mean)) / np.float32(std)
        x = np.where(np.isfinite(x), x, np.float32(0.0))
        t = torch.from_numpy(x)
        size = self.backbone.img_size
        if t.shape[-2:] != (size, size):
            shrink = size < t.shape[-2] or size < t.shape[-1]
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        with torch.no_grad():
            return self.backbone(t).float().numpy()


def _columns(model_input, bands) -> dict:
    """{band name: array} from a dict of arrays (a direct call) or the one-row DataFrame MLflow
    makes of that dict after checking it against the optional per-band columns of the schema
    (a band left out is absent or None there)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if len(model_input.columns) == 0:  # every input was a band the schema does not name
            return {}
        if len(model_input) != 1:
            raise ValueError(f"give a dict of [N, H, W] arrays named by band ({', '.join(bands)}), "
                             f"not a DataFrame of {len(model_input)} rows")
        row = model_input.iloc[0]
        return {k: v for k, v in row.items() if v is not None and not (np.isscalar(v) and pd.isna(v))}
    if not isinstance(model_input, dict):
        raise ValueError(f"give a dict of [N, H, W] arrays named by band ({', '.join(bands)})")
    return {k: v for k, v in model_input.items() if v is not None}


mlflow.models.set_model(RawPixelsBackbone())
