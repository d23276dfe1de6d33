"""MLflow "model from code": an sgd-ft classifier taking RAW pixels (no pickle anywhere).

Logged by :func:`plugins.sgd_ft.saved.log_classifier`; artifacts ``backbone`` and ``head`` (safetensors,
see :mod:`plugins.sgd_ft.saved` for what they record). Input: float array [N, C, H, W] of raw pixels,
bands in the recorded order (``input_bands``, or by position) and units (``input_units``), any H, W.
The model normalises with its recorded statistics (non-finite pixels become 0, the band mean), resizes
to its input size (bilinear, antialiased when shrinking) and returns a DataFrame of scores, one column
per class (sigmoid for multi-label, softmax for multi-class).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class SGDClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from plugins.sgd_ft.saved import load_classifier

        self.model, self.meta = load_classifier(Path(context.artifacts["backbone"]), Path(context.artifacts["head"]))

    def predict(self, context, model_input: np.ndarray, params=None):
        import json

        import torch

        from plugins.sgd_ft.predict import normalise_raw, scores_of

        x = normalise_raw(torch.as_tensor(np.asarray(model_input, dtype=np.float32)), self.meta)
        with torch.no_grad():
            scores = scores_of(self.model(x), self.meta["task"])
        return pd.DataFrame(scores.numpy(), columns=json.loads(self.meta["classes"]))


mlflow.models.set_model(SGDClassifierModel())
