"""How a slide-level model's tile features were made: the recipe it records, and the checks.

A slide-biomarker ensemble is only meaningful on features made the way its training features were:
the same encoder, µm/px, tile size and tissue settings. ``histo embed`` writes these as attrs of
each ``features/<slide_id>.h5`` (:mod:`plugins.histo.embedding`); the pipeline reads them from the
training cohort (:func:`cohort_recipe`: every file must agree) and the registered model records
them as ``config["features"]`` (:mod:`plugins.histo.pyfunc_model`). ``histo heatmap`` and
``domainfm predict`` then check features against it (:func:`check_features`: one line naming the
setting that differs) and ``predict`` embeds new slides with it (:func:`embed_settings`).

The recipe (a JSON-able dict; a key is None when the features did not say):
``mpp`` (µm/px of the tiles), ``tile_size`` (px), ``feature_dim`` (D), ``min_tissue`` (fraction),
``max_tiles`` (0: every tissue tile), ``seed`` (of the ``max_tiles`` draw), ``slide_mpp`` (the
``--slide-mpp`` number used for slides without their own µm/px, or None), ``tome_r`` (token
merging), ``encoder_label`` (as ``histo embed`` names it) and ``encoder`` (the record of
:func:`plugins.histo.embedding.encoder_record`: ``source`` registry/file/timm, ``sha256``...).

Other tools' files (CLAM, TRIDENT) may keep attrs as arrays or bytes; they are read as numbers/text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError

#: The settings compared between features and a model, in the order a mismatch is reported.
CHECKED = ("feature_dim", "mpp", "tile_size", "encoder", "tome_r", "min_tissue", "max_tiles")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        arr = np.asarray(value, np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return float(arr[0]) if arr.size else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else None
        if value is None:
            return None
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def from_attrs(attrs: dict[str, Any], feature_dim: int | None = None) -> dict[str, Any]:
    """The recipe that one features file's attrs state (see the module docstring)."""
    def num(key, cast=float):
        v = _number(attrs.get(key))
        return None if v is None else cast(v)

    encoder = None
    raw = _text(attrs.get("encoder_record"))
    if raw:
        try:
            encoder = json.loads(raw)
        except json.JSONDecodeError:
            encoder = None
    slide_mpp = num("slide_mpp_setting")
    return {
        "mpp": num("mpp"), "tile_size": num("tile_size", int),
        "feature_dim": feature_dim if feature_dim is not None else num("feature_dim", int),
        "min_tissue": num("min_tissue"), "max_tiles": num("max_tiles", int), "seed": num("seed", int),
        "slide_mpp": slide_mpp if slide_mpp is not None and slide_mpp > 0 else None,
        "tome_r": num("tome_r", int), "encoder_label": _text(attrs.get("encoder")), "encoder": encoder,
    }


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe of one features HDF5 (attrs only; the features are not read)."""
    import h5py

    from plugins.histo.tiling import h5_attrs

    try:
        with h5py.File(path, "r") as f:
            attrs = {**(h5_attrs(f["coords"]) if "coords" in f else {}), **h5_attrs(f)}
            shape = f["features"].shape
    except (OSError, KeyError) as e:
        raise DomainFMError(f"not a features HDF5 file with a `features` dataset ({e})", path=path,
                            fix="make it with `domainfm histo embed`") from None
    return from_attrs(attrs, int(shape[1]) if len(shape) == 2 else None)


def _value(recipe: dict[str, Any], key: str) -> Any:
    """What is compared for ``key``: the encoder by its weights' sha256, else by its name."""
    if key == "encoder":
        enc = recipe.get("encoder") or {}
        return enc.get("sha256") or recipe.get("encoder_label")
    return recipe.get(key)


def describe(recipe: dict[str, Any], key: str) -> str:
    """``key`` of ``recipe`` in words (used in the mismatch line)."""
    v = recipe.get(key)
    if key == "mpp":
        return f"{v:g} mpp"
    if key == "tile_size":
        return f"{v} px tiles"
    if key == "feature_dim":
        return f"{v}-d features"
    if key == "encoder":
        enc = recipe.get("encoder") or {}
        label = encoder_label(recipe)
        return f"encoder {label}" + (f" (sha256 {enc['sha256'][:12]})" if enc.get("sha256") else "")
    if key == "tome_r":
        return f"token merging r={v}"
    if key == "min_tissue":
        return f"min tissue {v:g}"
    if key == "max_tiles":
        return f"max tiles {v or 'all'}"
    return f"{key} {v}"


def encoder_label(recipe: dict[str, Any]) -> str:
    enc = recipe.get("encoder") or {}
    if enc.get("source") == "registry":
        return enc["uri"]
    if enc.get("source") == "file":
        return Path(enc["path"]).name
    if enc.get("source") == "timm":
        return f"{enc['backbone']} (init={enc['init']})"
    return str(recipe.get("encoder_label"))


def differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The settings (of :data:`CHECKED`) both recipes state and that differ."""
    out = []
    for key in CHECKED:
        a, b = _value(have, key), _value(want, key)
        if a is None or b is None:
            continue
        if isinstance(a, float) or isinstance(b, float):
            if abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)), 1e-12):
                continue
        elif a == b:
            continue
        out.append(key)
    return out


def check_features(have: dict[str, Any], want: dict[str, Any], path: str | Path, model: str = "the model") -> None:
    """Refuse features whose recipe ``have`` differs from the model's ``want``: one line naming the
    first setting that differs (``made at 1 mpp, the model expects 0.5 mpp``) and how to remake them."""
    diff = differences(have, want)
    if not diff:
        return
    key = diff[0]
    others = f" (also: {', '.join(diff[1:])})" if len(diff) > 1 else ""
    raise DomainFMError(f"made with {describe(have, key)}, {model} expects {describe(want, key)}{others}",
                        path=path, fix=f"re-embed the slide with `domainfm histo embed {embed_flags(want)}`, or "
                                       "let `domainfm predict --model ...` embed it with the model's settings")


def embed_flags(recipe: dict[str, Any]) -> str:
    """The ``histo embed`` flags that make features of this recipe (as far as it states them)."""
    parts = []
    enc = recipe.get("encoder") or {}
    if enc.get("source") == "registry":
        parts.append(f"--model {enc['uri']}")
    elif enc.get("source") == "file":
        parts.append(f"--model {enc['path']}")
    elif enc.get("source") == "timm":
        parts.append(f"--backbone {enc['backbone']} --init {enc['init']}")
    for key, flag in (("mpp", "--mpp"), ("tile_size", "--tile-size"), ("min_tissue", "--min-tissue")):
        if recipe.get(key) is not None:
            parts.append(f"{flag} {recipe[key]:g}" if isinstance(recipe[key], float) else f"{flag} {recipe[key]}")
    if recipe.get("max_tiles"):
        parts.append(f"--max-tiles {recipe['max_tiles']} --seed {recipe.get('seed') or 0}")
    return " ".join(parts) or "SLIDES --out DIR"


def cohort_recipe(files: list[Path], *, what: str = "training") -> dict[str, Any]:
    """The one recipe of a cohort's features: every file must state the same settings (a file that
    states none of one is left out of that setting). DomainFMError naming the two files that differ."""
    if not files:
        return from_attrs({})
    first = read_recipe(files[0])
    merged = dict(first)
    for f in files[1:]:
        r = read_recipe(f)
        diff = differences(r, merged)
        if diff:
            key = diff[0]
            raise DomainFMError(f"made with {describe(r, key)} but {Path(files[0]).name} with "
                                f"{describe(merged, key)}: the {what} features must all be made one way",
                                path=f, fix="re-embed the cohort with one `domainfm histo embed` command")
        for k, v in r.items():
            if merged.get(k) is None and v is not None:
                merged[k] = v
    return merged


def embed_settings(recipe: dict[str, Any], out_dir: str | Path, *, encoder_file: str | Path | None = None,
                   model: str = "the model", **runtime: Any):
    """The :class:`plugins.histo.embedding.EmbedSettings` that make features of ``recipe`` from new
    slides (``runtime``: batch_size, num_workers, precision, accelerator, slide_mpp...).
    ``encoder_file``: the encoder weights shipped with the model (used instead of the recorded
    source). DomainFMError when the recipe does not say how its features were made."""
    from plugins.histo.embedding import EmbedSettings

    enc = recipe.get("encoder")
    missing = [k for k in ("mpp", "tile_size") if recipe.get(k) is None] + ([] if enc else ["encoder"])
    if missing:
        raise DomainFMError(f"{model} does not record how its features were made (no {', '.join(missing)})",
                            fix="train it again with `domainfm pipeline slide-biomarker` on features from "
                                "`domainfm histo embed` (they record it), then embed slides with `histo embed` "
                                "and use `histo heatmap`")
    kw: dict[str, Any] = {}
    if encoder_file is not None:
        kw.update(weights=str(encoder_file))
    elif enc["source"] == "registry":
        kw.update(weights=enc["uri"])
    elif enc["source"] == "file":
        kw.update(weights=enc["path"])
    else:
        kw.update(backbone=enc["backbone"], init=enc["init"])
    slide_mpp = runtime.pop("slide_mpp", None)  # the caller decides (predict: recorded one as a fallback only)
    return EmbedSettings(
        out_dir=str(out_dir), mpp=float(recipe["mpp"]), tile_size=int(recipe["tile_size"]),
        min_tissue=float(recipe["min_tissue"]) if recipe.get("min_tissue") is not None else 0.6,
        max_tiles=recipe.get("max_tiles") or None, seed=int(recipe.get("seed") or enc.get("seed") or 0),
        slide_mpp=slide_mpp,
        tome_r=int(recipe.get("tome_r") or 0), model_kwargs=dict(enc.get("model_kwargs") or {}),
        expect_sha256=enc.get("sha256"), expect_source=model, **kw, **runtime)
