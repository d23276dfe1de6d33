"""Attention heatmaps: where a slide-level model looked, painted over the slide thumbnail."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from domainfm.errors import DomainFMError


def scale_attention(attention: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] within the slide (attention sums to 1, so raw values shrink with N)."""
    a = np.asarray(attention, np.float64)
    span = a.max() - a.min() if len(a) else 0.0
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def draw_heatmap(background: np.ndarray, downsample: float, coords: np.ndarray, tile_size_level0: int,
                 attention: np.ndarray, *, alpha: float = 0.55, cmap: str = "inferno"):
    """RGB PIL image: ``background`` [h, w, 3] with each tile coloured by its scaled attention."""
    import matplotlib

    from PIL import Image

    colours = (matplotlib.colormaps[cmap](scale_attention(attention))[:, :3] * 255).astype(np.float32)
    img = background.astype(np.float32).copy()
    h, w = img.shape[:2]
    side = tile_size_level0 / downsample
    for (x, y), c in zip(np.asarray(coords), colours):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1, y1 = min(w, int(round(x0 + side))), min(h, int(round(y0 + side)))
        if x1 > x0 and y1 > y0:
            img[y0:y1, x0:x1] = (1 - alpha) * img[y0:y1, x0:x1] + alpha * c
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def slide_background(slide_path: str | Path | None, coords: np.ndarray, tile_size_level0: int,
                     max_size: int = 1024) -> tuple[np.ndarray, float]:
    """The slide's thumbnail, or (slide not at hand) a white canvas covering the tiles."""
    if slide_path and Path(slide_path).is_file():
        from plugins.histo import slides as slides_mod

        slide = slides_mod.open_slide(slide_path)
        try:
            return slides_mod.thumbnail(slide, max_size)
        finally:
            slide.close()
    extent = (np.asarray(coords).max(axis=0) + tile_size_level0) if len(coords) else np.array([tile_size_level0] * 2)
    ds = max(1.0, float(extent.max()) / max_size)
    return np.full((int(np.ceil(extent[1] / ds)), int(np.ceil(extent[0] / ds)), 3), 255, np.uint8), ds


def save_png(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def render_slide_heatmap(coords: np.ndarray, attrs: dict, attention: np.ndarray, *, title: str,
                         slide_path: str | Path | None = None):
    # ours / TRIDENT's level-0 tile size, else CLAM's patch_size (at level 0 in its default setting)
    size0 = int(attrs.get("tile_size_level0") or attrs.get("patch_size_level0") or attrs.get("patch_size") or 256)
    bg, ds = slide_background(slide_path or attrs.get("slide_path"), coords, size0)
    img = draw_heatmap(bg, ds, coords, size0, attention)
    from PIL import ImageDraw

    ImageDraw.Draw(img).text((4, 4), title, fill=(0, 0, 0))
    return img


class LoadedEnsemble:
    """A slide-biomarker ensemble as loaded: ``predict(bag)`` -> dict (see
    :mod:`plugins.histo.pyfunc_model`), its ``config`` (with ``features``, the recipe of
    :mod:`plugins.histo.recipe`), its local ``artifacts`` paths and the ``uri`` it came from."""

    def __init__(self, python_model, uri: str):
        self._model = python_model
        self.config = python_model.config
        self.artifacts = dict(getattr(python_model, "artifacts", {}) or {})
        self.uri = uri

    def predict(self, bag):
        return self._model.predict(None, bag)

    @property
    def recipe(self) -> dict:
        """How the training features were made; only the feature dimension for an older model."""
        return {**(self.config.get("features") or {}), "feature_dim": int(self.config["in_dim"])}


def load_ensemble(model_uri: str) -> LoadedEnsemble:
    """The ensemble of a logged model (models:/, runs:/, an MLflow model folder) or of the
    ``model/`` folder the pipeline writes under ``--out``."""
    p = Path(model_uri)
    if p.is_dir() and all((p / f).is_file() for f in ("config.json", "weights.safetensors", "mil.py")):
        from types import SimpleNamespace

        from plugins.histo.pyfunc_model import SlideEnsembleModel

        model = SlideEnsembleModel()
        artifacts = {"config": str(p / "config.json"), "mil_code": str(p / "mil.py"),
                     "weights": str(p / "weights.safetensors")}
        if (p / "encoder.safetensors").is_file():
            artifacts["encoder"] = str(p / "encoder.safetensors")
        model.load_context(SimpleNamespace(artifacts=artifacts))
        return LoadedEnsemble(model, model_uri)
    if p.is_dir() and (p / "MLmodel").is_file() or "://" in model_uri or model_uri.startswith("models:/"):
        from domainfm import tracking

        tracking.configure()
        try:
            model = tracking.load_pyfunc_model(model_uri)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a bad URI
            raise DomainFMError(f"cannot load the model ({str(e).splitlines()[0]})", path=model_uri,
                                fix="give models:/NAME@ALIAS, runs:/RUN_ID/ensemble or a model folder") from None
        inner = model.unwrap_python_model()
        if not hasattr(inner, "config") or "in_dim" not in getattr(inner, "config", {}):
            raise DomainFMError("not a slide-biomarker ensemble", path=model_uri,
                                fix="give a model registered by `domainfm pipeline slide-biomarker`")
        return LoadedEnsemble(inner, model_uri)
    raise DomainFMError("not an MLflow model URI or model folder", path=model_uri,
                        fix="give models:/NAME@ALIAS as registered by `domainfm pipeline slide-biomarker`")


def load_predictor(model_uri: str):
    """A callable bag -> dict(probability, probabilities, attention) (see :func:`load_ensemble`)."""
    return load_ensemble(model_uri).predict


def heatmap_for_slide(slide: str | Path, features_file: str | Path, model_uri: str, out_file: str | Path,
                      *, class_index: int | None = None) -> float:
    """Draw ``model_uri``'s attention over ``slide`` from its ``features_file``; returns the
    probability shown. DomainFMError (one line) when the features were made otherwise than the
    model's training features: another µm/px, tile size, encoder, feature dimension or tissue setting."""
    from plugins.histo import recipe as recipe_mod
    from plugins.histo.embedding import read_features

    model = load_ensemble(model_uri)
    have = recipe_mod.read_recipe(features_file)
    recipe_mod.check_features(have, model.recipe, features_file, model="the model")
    feats, coords, attrs = read_features(features_file)
    if len(feats) == 0:
        raise DomainFMError("the slide has no tiles", path=features_file, fix="re-embed with a lower --min-tissue")
    out = model.predict(feats)
    probs = out["probabilities"]
    prob = float(probs[class_index if class_index is not None else len(probs) - 1])
    name = Path(slide).stem
    img = render_slide_heatmap(coords, attrs, np.asarray(out["attention"]), title=f"{name}  p={prob:.3f}",
                               slide_path=slide)
    save_png(img, out_file)
    return prob


def log_cohort_heatmaps(cohort, slides, out_dir: str | Path) -> list[Path]:
    """Attention heatmaps of some slides of a cohort (``plugins.histo.cohort.Cohort``), each over
    the thumbnail of the slide file named in its features' attrs (else a white canvas), written to
    ``OUT/heatmaps/<slide_id>.png`` and logged to the active MLflow run under ``heatmaps/``.

    ``slides``: ``(index in the cohort, probability shown, tile attention [N], note)`` per slide;
    the title gives the slide id, its label, the probability and the note (when not empty)."""
    from domainfm import tracking
    from plugins.histo.embedding import read_features

    hdir = Path(out_dir) / "heatmaps"
    written = []
    for i, prob, attention, note in slides:
        _, coords, attrs = read_features(cohort.feature_files[i])
        sid = cohort.slide_ids[i]
        title = f"{sid}  label={cohort.class_names[cohort.labels[i]]}  p={prob:.3f}" + (f"  ({note})" if note else "")
        written.append(save_png(render_slide_heatmap(coords, attrs, attention, title=title), hdir / f"{sid}.png"))
    if written:
        tracking.log_artifacts(hdir, "heatmaps")
    return written
