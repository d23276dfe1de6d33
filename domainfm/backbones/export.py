"""``domainfm export``: a backbone as an ONNX or TorchScript file for serving without domainfm.

The file takes ``image`` float32 [B, C, H, W] (B dynamic; H, W the backbone's ``img_size``) and
returns ``features`` float32 [B, embed_dim] (the pooled feature of :class:`Backbone`). With
``with_normalization`` the input is raw pixel values and ``(x - mean) / std`` per band runs inside
the graph; without it, the caller normalises. The architecture, band names and per-band statistics
travel in the file: ONNX ``metadata_props``, TorchScript ``_extra_files["domainfm.json"]`` (the same
JSON keys). Every export is checked against PyTorch on batches of 1 and 7 (ONNX with onnxruntime)
to an absolute error of 1e-4 before it is kept; the file is written atomically. A ``models:/`` model
gets the file logged to its model version's MLflow run under ``export/``.

ONNX needs the optional extra ``pip install 'domainfm[export]'`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainfm.errors import DomainFMError

FORMATS = ("onnx", "torchscript")
CHECK_BATCHES = (1, 7)
TOLERANCE = 1e-4
EXTRA_FILE = "domainfm.json"
# an environment switch that makes the extra look absent (to try the error message)
NO_EXTRA_ENV = "DOMAINFM_EXPORT_DISABLE_ONNX"


@dataclass
class ExportResult:
    path: Path
    format: str
    metadata: dict[str, str]
    max_abs_error: dict[int, float] = field(default_factory=dict)  # batch size -> max |export - torch|
    mlflow_run_id: str | None = None


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or the one-line error naming the extra when they are missing."""
    try:
        if os.environ.get(NO_EXTRA_ENV, "") not in ("", "0"):
            raise ImportError(f"disabled by {NO_EXTRA_ENV}")
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise DomainFMError(f"--format onnx needs the optional export extra, which is not installed ({e})",
                            fix="pip install 'domainfm[export]' (onnx, onnxruntime, onnxscript), or use "
                                "--format torchscript") from None
    return onnx, onnxruntime


def _as_list(value: Any) -> Any:
    """A metadata value as a sequence: JSON text, or comma/semicolon-separated text, as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return [v for v in value.replace(";", ",").split(",") if v.strip()]
    return value


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in _as_list(value)]
    except (TypeError, ValueError):
        return None


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    value = _as_list(value)
    if isinstance(value, str):
        value = [value]
    out = [str(v).strip() for v in value if str(v).strip()]
    return out or None


def input_description(backbone, meta: dict[str, str]) -> dict[str, Any]:
    """Bands and per-band mean/std of the backbone's input, from what it knows: an ``input_spec``
    on the backbone, else its file's metadata (``input_bands``/``bands``, ``input_mean``/``mean``,
    ``input_std``/``std``), else timm's data config when that has one value per band. Values are
    on the backbone's input scale (timm's: pixels / 255)."""
    spec = getattr(backbone, "input_spec", None)
    bands = _names(getattr(spec, "bands", None)) or _names(meta.get("input_bands", meta.get("bands")))
    mean = _floats(getattr(spec, "mean", None)) or _floats(meta.get("input_mean", meta.get("mean")))
    std = _floats(getattr(spec, "std", None)) or _floats(meta.get("input_std", meta.get("std")))
    C = backbone.in_chans
    if not (mean and std):
        cfg = backbone.data_config
        mean, std = list(map(float, cfg.get("mean", ()))), list(map(float, cfg.get("std", ())))
    if mean and len(mean) != C or std and len(std) != C:
        mean = std = None  # statistics of another band count say nothing about these bands
    if bands and len(bands) != C:
        bands = None
    return {"bands": bands, "mean": mean, "std": std}


def _wrapper(backbone, mean, std):
    import torch
    from torch import nn

    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = backbone.model
            self.normalize = mean is not None
            if self.normalize:
                self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
                self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            if self.normalize:
                image = (image - self.mean) / self.std
            return self.model(image)

    return Exported().eval()


_OP_PATTERNS = (
    r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)",
    r"operator\s+'?([A-Za-z0-9_.:]+)",
    r"(torch\.[A-Za-z0-9_.]+)",
)


def unsupported_operator(error: BaseException) -> str | None:
    """The operator an exporter's error names (``aten::fft_rfft2``...), if it names one."""
    text = f"{error}"
    cause = error.__cause__
    while cause is not None:
        text += f"\n{cause}"
        cause = cause.__cause__
    for pat in _OP_PATTERNS:
        m = re.search(pat, text)
        if m:
            return m.group(1)
    return None


def _export_failure(fmt: str, name: str, error: BaseException) -> DomainFMError:
    op = unsupported_operator(error)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    what = f"operator {op} has no {fmt} conversion" if op else f"the {fmt} exporter failed ({first})"
    return DomainFMError(f"{name} cannot be exported to {fmt}: {what}",
                         fix="use the other --format, or a backbone without that operator")


def _onnx_export(module, example, tmp: Path, name: str, metadata: dict[str, str]) -> None:
    import torch

    onnx, _ = require_onnx()
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        torch.onnx.export(module, (example,), str(tmp), input_names=["image"], output_names=["features"],
                          dynamic_shapes={"image": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes the one-line error
        raise _export_failure("onnx", name, e) from None
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(tmp))


def _torchscript_export(module, example, tmp: Path, name: str, metadata: dict[str, str]) -> None:
    import torch
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise _export_failure("torchscript", name, e) from None
    torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The domainfm metadata of an exported file (ONNX ``metadata_props`` or TorchScript extra file)."""
    p = Path(path)
    if p.suffix == ".onnx" or p.read_bytes()[:2] != b"PK":
        onnx, _ = require_onnx()
        return {e.key: e.value for e in onnx.load(str(p), load_external_data=False).metadata_props}
    import torch

    extra = {EXTRA_FILE: ""}
    torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


def run_exported(path: str | Path, fmt: str, images) -> "Any":
    """Features [B, D] (numpy float32) of ``images`` (numpy [B, C, H, W]) from an exported file."""
    import numpy as np

    if fmt == "onnx":
        _, ort = require_onnx()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["features"], {"image": np.ascontiguousarray(images, np.float32)})[0]
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images, np.float32))).numpy()


def export_backbone(model: str, fmt: str, out: str | Path, *, with_normalization: bool = False,
                    seed: int = 0) -> ExportResult:
    """Export ``model`` (a domainfm .safetensors export or ``models:/NAME@ALIAS``) as ``fmt``.

    Errors (:class:`DomainFMError`): unknown format; ``onnx`` without the ``[export]`` extra (checked
    before the model is read); an operator with no conversion (named); ``with_normalization`` for
    a backbone whose per-band statistics are unknown; outputs that differ from PyTorch by more than
    1e-4. On any error no file is left at ``out``.
    """
    import numpy as np
    import torch

    from domainfm import __version__
    from domainfm.backbones import create_backbone, resolve_source

    if fmt not in FORMATS:
        raise DomainFMError(f"unknown export format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    out = Path(out)
    if out.is_dir():
        raise DomainFMError("--out is a folder", path=out, fix="give a file name, e.g. backbone.onnx")
    spec = str(model)
    from domainfm.predict import pin_model

    pinned, version = pin_model(spec)  # an alias resolved once: the version exported is the one recorded
    source = resolve_source(pinned)  # a models:/ URI is downloaded here, once
    meta = source.meta
    backbone = create_backbone(source).eval()
    inputs = input_description(backbone, meta)
    if with_normalization and not (inputs["mean"] and inputs["std"]):
        raise DomainFMError(f"--with-normalization needs per-band mean and std for the {backbone.in_chans} bands, "
                            "and the model records none", path=spec,
                            fix="drop --with-normalization and normalise the input yourself")
    mean, std = (inputs["mean"], inputs["std"]) if with_normalization else (None, None)
    module = _wrapper(backbone, mean, std)
    metadata = {
        "domainfm_version": __version__, "domainfm_name": backbone.name, "source": spec,
        "in_chans": str(backbone.in_chans), "img_size": str(backbone.img_size), "embed_dim": str(backbone.embed_dim),
        "input": f"image float32 [batch, {backbone.in_chans}, {backbone.img_size}, {backbone.img_size}]",
        "output": f"features float32 [batch, {backbone.embed_dim}]",
        "normalization_in_graph": "true" if with_normalization else "false",
        "bands": json.dumps(inputs["bands"]), "mean": json.dumps(inputs["mean"]), "std": json.dumps(inputs["std"]),
    }
    if version:
        metadata["model_version"] = version  # NAME/VERSION the models:/ source named when exported
    ispec = getattr(backbone, "input_spec", None)
    for key, value in (("modality", getattr(ispec, "modality", None)), ("gsd_m", getattr(ispec, "gsd_m", None)),
                       ("units", getattr(ispec, "units", None))):
        if value is not None:  # what the mean/std are in, and the ground sampling distance in metres
            metadata[key] = str(value)
    g = torch.Generator().manual_seed(seed)
    size = (backbone.in_chans, backbone.img_size, backbone.img_size)
    example = torch.rand(2, *size, generator=g)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    result = ExportResult(path=out, format=fmt, metadata=metadata)
    try:
        with torch.no_grad():
            (_onnx_export if fmt == "onnx" else _torchscript_export)(module, example, tmp, backbone.name, metadata)
            for n in CHECK_BATCHES:
                x = torch.rand(n, *size, generator=g)
                if with_normalization:  # raw values on the scale the statistics describe
                    x = x * torch.tensor(std).view(1, -1, 1, 1) * 4 + torch.tensor(mean).view(1, -1, 1, 1)
                ref = module(x).numpy()
                got = run_exported(tmp, fmt, x.numpy())
                err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
                result.max_abs_error[n] = err
                if not err <= TOLERANCE:
                    raise DomainFMError(f"the {fmt} export of {backbone.name} differs from PyTorch on a batch of {n} "
                                        f"(max |difference| {err:.2e} > {TOLERANCE:g}; shape {got.shape} vs {ref.shape})",
                                        fix="use the other --format")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if spec.startswith("models:/"):
        from domainfm import tracking

        result.mlflow_run_id = tracking.log_to_model_run(pinned, out, artifact_path="export")
    return result
