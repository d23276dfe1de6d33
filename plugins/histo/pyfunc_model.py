"""MLflow "model from code" for a slide-biomarker ensemble (no pickle anywhere).

Artifacts: ``weights`` (safetensors, keys ``members.<i>.<param>``), ``config`` (JSON: model,
in_dim, n_classes, n_members, class_names, target, and ``features``: how the tile features were
made, see :mod:`plugins.histo.recipe`), ``mil_code`` (the ``mil.py`` the members were trained with;
loaded from the artifact so the model runs without domainfm installed) and, when the encoder cannot
be fetched again by name (random init, a local file), ``encoder`` (its domainfm export).

Input: one bag of tile features, ``[N, D]`` (numpy array or DataFrame). Output: a dict with
``probability`` (of the positive class for a binary target; one per class otherwise), the
per-class ``probabilities`` (the mean of the members'), ``member_probabilities`` [members, C],
``attention`` [N] (member-averaged tile weights, summing to 1) and ``class_names``.
"""

from __future__ import annotations

import importlib.util
import json

import mlflow
import numpy as np


class SlideEnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        spec = importlib.util.spec_from_file_location("domainfm_histo_mil", context.artifacts["mil_code"])
        mil = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mil)
        self.artifacts = dict(context.artifacts)
        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        c = self.config
        self.ensemble = mil.MILEnsemble(c["model"], c["in_dim"], c["n_classes"], c["n_members"])
        self.ensemble.load_state_dict(load_file(context.artifacts["weights"]))
        self.ensemble.eval()

    def predict(self, context, model_input, params=None):
        import torch

        bag = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        bag = np.ascontiguousarray(bag, dtype=np.float32)
        if bag.ndim != 2 or bag.shape[1] != self.config["in_dim"]:
            raise ValueError(f"expected one bag of tile features [N, {self.config['in_dim']}], got shape {bag.shape}")
        x = torch.from_numpy(bag)
        probs, attention = self.ensemble(x)
        probs = probs.numpy().astype(float)
        with torch.no_grad():
            members = [torch.softmax(m(x)[0], dim=-1).numpy().astype(float) for m in self.ensemble.members]
        return {
            "probability": float(probs[-1]) if len(probs) == 2 else probs.tolist(),
            "probabilities": probs.tolist(),
            "member_probabilities": [m.tolist() for m in members],
            "attention": attention.numpy().astype(float).tolist(),
            "class_names": list(self.config["class_names"]),
        }


mlflow.models.set_model(SlideEnsembleModel())
