"""What a weights file says about itself: the one safetensors metadata reader and :class:`InputSpec`.

A domainfm export (:func:`domainfm.backbones.save_backbone`) records its architecture
(``domainfm_name``, ``in_chans``, ``img_size``, ``embed_dim``) and, when known, the input its
weights were trained on (``input_*`` keys, JSON values) in the safetensors header. Nothing here
imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

INPUT_META_KEYS = {"bands": "input_bands", "mean": "input_mean", "std": "input_std",
                   "modality": "input_modality", "gsd_m": "input_gsd_m", "units": "input_units"}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (str -> str), read from its header only.

    Empty for a path that is not an existing ``.safetensors`` file or whose header cannot be read
    (whoever loads the tensors reports a broken file)."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return {}
    from safetensors import safe_open

    try:
        # numpy framework: the header is read without importing torch
        with safe_open(str(p), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable header records nothing
        return {}


@dataclass(frozen=True)
class InputSpec:
    """The input a backbone's weights were trained on: band names in order, per-band mean/std
    (in ``units``, e.g. Sentinel-2 reflectance x 10000 or Sentinel-1 dB), modality, ground
    sampling distance in metres. Stored as ``input_*`` keys (JSON values) in the safetensors
    metadata of a domainfm export; any field may be None (a plain timm or DINOv2 file has none)."""

    bands: tuple | None = None
    mean: tuple | None = None
    std: tuple | None = None
    modality: str | None = None
    gsd_m: float | None = None
    units: str | None = None
    source: str = ""

    @property
    def has_stats(self) -> bool:
        return bool(self.mean) and bool(self.std)

    def to_meta(self) -> dict[str, str]:
        """``input_*`` metadata entries (str -> JSON str) for the fields that are set."""
        out = {}
        for field_name, key in INPUT_META_KEYS.items():
            value = getattr(self, field_name)
            if value is not None:
                out[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, str] | None, source: str = ""):
        """The spec recorded in ``meta``, or None when it records none."""
        meta = meta or {}
        if not any(k in meta for k in INPUT_META_KEYS.values()):
            return None
        values = {}
        for field_name, key in INPUT_META_KEYS.items():
            if key in meta:
                try:
                    v = json.loads(meta[key])
                except ValueError:
                    v = meta[key]
                values[field_name] = tuple(v) if isinstance(v, list) else v
        return cls(source=source, **values)
