"""``domainfm predict --model URI PATCH... --out DIR`` for eo-sar backbones.

The model says how it is applied (:class:`domainfm.backbones.InputSpec` in its safetensors
metadata: band names, per-band mean/std in reflectance x 10000 or dB, modality, GSD in metres;
``img_size``): nothing of that is asked again. Each input is a GeoTIFF patch of any size, a
folder of them, or a folder of single-band files named by band (``<patch>_B01.tif`` ...,
BigEarthNet's naming), read by eo-sar's own readers (:func:`plugins.eo_sar.radiometry.read_patch`,
:func:`plugins.eo_sar.layouts.read_bands`) into model units, normalised with the model's
statistics (nodata pixels become 0, the band mean), aligned to the model's bands by name
(:func:`plugins.eo_sar.bands.plan_band_alignment`: a band the patch lacks is filled with 0, one
the model lacks is dropped), resized to the model's input size (bilinear, antialiased when
shrinking, as the registered MLflow model does) and embedded.

Outputs under ``--out``: ``embeddings.npy`` (float32 [N, D], one row per patch in input order) and
``predictions.csv`` (one row per patch: ``file``, ``height``, ``width`` (pixels as stored),
``bands_filled``, ``norm`` (L2 norm of the embedding) and ``pc1``..``pc3``, the coordinates on the
first principal components of this call's embeddings (centred, numpy SVD, sign fixed so that the
largest loading is positive; fewer columns when there are fewer patches), both logged to the MLflow
run the core opened.

Bad input is one line naming the setting that differs: bands that share nothing with the model's,
a pixel size (from the GeoTIFF's transform, projected CRSs only) more than ``GSD_TOLERANCE`` away
from the model's GSD, a model without band names, statistics or units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from domainfm.data import write_csv_atomic
from domainfm.errors import DomainFMError

#: A patch whose pixel size differs from the model's GSD by more than this fraction is refused.
GSD_TOLERANCE = 0.25
PCA_COMPONENTS = 3
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class PatchSource:
    """One patch: a GeoTIFF (``files`` = (path,), ``names`` None: the file says), or a folder of
    single-band files (``names``: the band of each file, from its name)."""

    path: Path
    files: tuple[Path, ...]
    names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PatchPlan:
    """How one patch meets the model: its modality, band names and input plan."""

    source: PatchSource
    modality: str
    height: int
    width: int
    plan: Any  # plugins.eo_sar.normalization.InputPlan


# ---------------------------------------------------------------- inputs

def _band_of(path: Path) -> str | None:
    from plugins.eo_sar.bands import try_normalize_band_name

    return try_normalize_band_name(path.stem.split("_")[-1])


def _band_folder(folder: Path) -> PatchSource | None:
    """A folder whose GeoTIFFs are each one band named in the file name (``x_B02.tif``)."""
    tifs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
    names = [_band_of(p) for p in tifs]
    if len(tifs) < 2 or not all(names) or len(set(names)) != len(names):
        return None
    return PatchSource(folder, tuple(tifs), tuple(names))  # type: ignore[arg-type]


def find_patches(inputs: Sequence[str | Path]) -> list[PatchSource]:
    """The patches ``inputs`` name, in order: GeoTIFF files, folders of them (sorted by name;
    sub-folders of per-band files count as one patch each), or per-band folders.
    DomainFMError for a missing path, a file that is no GeoTIFF, a folder holding no patch."""
    out: list[PatchSource] = []
    for given in inputs:
        p = Path(given)
        if not p.exists():
            raise DomainFMError("no such file or folder", path=p, fix="give GeoTIFF patches or folders of them")
        if p.is_file():
            if p.suffix.lower() not in TIFF_SUFFIXES:
                raise DomainFMError("is not a GeoTIFF (.tif/.tiff)", path=p, fix="give GeoTIFF patches")
            out.append(PatchSource(p, (p,)))
            continue
        whole = _band_folder(p)
        if whole is not None:
            out.append(whole)
            continue
        found = []
        for child in sorted(p.iterdir()):
            if child.is_file() and child.suffix.lower() in TIFF_SUFFIXES:
                found.append(PatchSource(child, (child,)))
            elif child.is_dir() and (sub := _band_folder(child)) is not None:
                found.append(sub)
        if not found:
            raise DomainFMError("holds no GeoTIFF patch", path=p,
                                fix="give a folder of *.tif patches or of per-band folders (<patch>_B01.tif ...)")
        out.extend(found)
    return out


# ---------------------------------------------------------------- the model

def check_spec(spec, where: str | Path) -> None:
    """The model must record its band names, per-band statistics and their units."""
    if spec is None or not spec.bands:
        raise DomainFMError("the model records no band names (input_bands)", path=where,
                            fix="use a backbone exported by `domainfm pretrain --plugin eo-sar`, which records them")
    if not spec.has_stats or len(spec.mean) != len(spec.bands) or len(spec.std) != len(spec.bands):
        raise DomainFMError("the model records no normalisation statistics for its bands (input_mean/input_std)",
                            path=where, fix="use a backbone exported by `domainfm pretrain --plugin eo-sar`")
    if not spec.units:
        raise DomainFMError("the model records no units of its statistics (input_units)", path=where,
                            fix="use a backbone exported by `domainfm pretrain --plugin eo-sar`")


def weights_file(model) -> Path:
    """The safetensors file of ``model`` (a :class:`domainfm.predict.ModelRef`): the file itself,
    or ``backbone.safetensors`` inside an MLflow model (downloaded for a ``models:/`` URI)."""
    local = Path(model.local_path())
    if local.is_file():
        return local
    found = sorted(local.rglob("backbone.safetensors")) or sorted(local.rglob("*.safetensors"))
    if not found:
        raise DomainFMError("holds no domainfm weights (backbone.safetensors)", path=model.uri,
                            fix="register a model made by `domainfm pretrain --plugin eo-sar --register NAME`")
    return found[0]


def load_backbone(model):
    """The backbone ``model`` names, with its recorded input (``backbone.input_spec``) checked."""
    from domainfm.backbones import create_backbone

    path = weights_file(model)
    backbone = create_backbone(path)
    check_spec(backbone.input_spec, model.uri)
    return backbone


# ---------------------------------------------------------------- one patch

def _modality(names: Sequence[str] | None, count: int, spec, path: Path) -> str:
    """How to read a patch: Sentinel-1 when its named bands are VV/VH, else Sentinel-2 (the
    model's L1C/L2A); a patch without band names by its band count (the model's modality when it
    has the model's count, Sentinel-1 with 2 bands)."""
    from plugins.eo_sar.bands import MODALITY_BANDS, S1_BANDS

    model = spec.modality if spec.modality in MODALITY_BANDS else None
    if names:
        if set(names) <= set(S1_BANDS):
            return "s1"
        return model if model in ("s2", "s2-l2a") else "s2"
    for m in (model, "s2", "s2-l2a", "s1"):
        if m and len(MODALITY_BANDS[m]) == count:
            return m
    raise DomainFMError(f"has {count} unnamed band(s); the model takes {len(spec.bands)} ({', '.join(spec.bands)})",
                        path=path, fix="name the bands in the GeoTIFF band descriptions (B1..B12, B8A, VV, VH)")


def check_gsd(path: Path, crs, res: tuple[float, float], spec, tolerance: float = GSD_TOLERANCE) -> None:
    """Refuse a patch whose pixel size (metres, from a projected CRS) is more than ``tolerance``
    (a fraction) away from the model's GSD; geographic or missing CRSs are not checked."""
    if spec.gsd_m is None or crs is None or not getattr(crs, "is_projected", False):
        return
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - a CRS without linear units: nothing to compare
        return
    pixel = max(abs(res[0]), abs(res[1])) * factor
    gsd = float(spec.gsd_m)
    if abs(pixel - gsd) > tolerance * gsd:
        raise DomainFMError(f"its pixels are {pixel:g} m but the model's GSD is {gsd:g} m "
                            f"(tolerance {tolerance:.0%})", path=path,
                            fix=f"resample the patch to {gsd:g} m (e.g. gdalwarp -tr {gsd:g} {gsd:g} -r bilinear)")


def plan_patch(source: PatchSource, spec, *, gsd_tolerance: float = GSD_TOLERANCE) -> PatchPlan:
    """Check one patch against the model from its headers only (no pixels read): readable, bands
    alignable by name, pixel size within the GSD tolerance. One-line DomainFMError naming it."""
    import rasterio
    from rasterio.errors import RasterioError

    from plugins.eo_sar.bands import MODALITY_BANDS, canonical_order, try_normalize_band_name
    from plugins.eo_sar.files import unreadable
    from plugins.eo_sar.normalization import plan_input
    from plugins.eo_sar.radiometry import band_names_from_descriptions

    headers = []
    for f in source.files:
        try:
            with rasterio.open(f) as src:
                headers.append((src.height, src.width, src.count, src.crs, src.res, src.descriptions))
        except RasterioError as e:
            raise unreadable(f, e) from None
    height, width, count, crs, res, descriptions = max(headers, key=lambda h: h[0] * h[1])  # the finest grid
    if source.names is not None:
        modality = _modality(source.names, len(source.names), spec, source.path)
        names = canonical_order(source.names)  # read_bands returns them in the canonical order
    else:
        named = [n for n in (try_normalize_band_name(d) for d in descriptions if d) if n]
        modality = _modality(named, count, spec, source.path)
        names = band_names_from_descriptions(source.path, descriptions, modality) or MODALITY_BANDS[modality]
    check_gsd(source.path, crs, res, spec, gsd_tolerance)
    try:
        plan = plan_input(modality, spec, "backbone", data_bands=names)
    except DomainFMError as e:
        message = str(e).split(". Fix: ")[0].rstrip(".")
        raise DomainFMError(f"cannot align the patch's bands to the model's: {message}", path=source.path,
                            fix=e.fix) from None
    return PatchPlan(source, modality, height, width, plan)


def read_for_model(pp: PatchPlan, *, s2_harmonize: str = "auto", s1_units: str = "db") -> np.ndarray:
    """float32 [C_model, H, W]: the patch in model units, normalised with the model's statistics,
    nodata pixels 0, aligned to the model's bands (at the patch's own size)."""
    from plugins.eo_sar.layouts import read_bands
    from plugins.eo_sar.radiometry import read_patch

    src = pp.source
    if src.names is not None:
        image, names, info = read_bands(src.files, src.names, modality=pp.modality, s2_harmonize=s2_harmonize,
                                        s1_units=s1_units)
    else:
        image, names, info = read_patch(src.path, modality=pp.modality, s2_harmonize=s2_harmonize, s1_units=s1_units)
    plan = pp.plan
    if tuple(names) != tuple(plan.data_bands):
        raise DomainFMError(f"bands changed since the header was read ({', '.join(names)})", path=src.path)
    mean = np.asarray(plan.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(plan.std, dtype=np.float32)[:, None, None]
    x = (image - mean) / std
    x[:, ~info.valid] = 0.0  # nodata -> the band mean
    x = np.where(np.isfinite(x), x, np.float32(0.0))
    return np.ascontiguousarray(plan.alignment.apply(x), dtype=np.float32)


def resize(x, size: int):
    """``x`` (torch [C, H, W] or [B, C, H, W]) at ``size`` x ``size``: bilinear, antialiased when
    shrinking (what the registered raw-pixels MLflow model does)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (size, size):
        return x
    batched = x if x.ndim == 4 else x[None]
    shrink = size < x.shape[-2] or size < x.shape[-1]
    out = F.interpolate(batched, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out if x.ndim == 4 else out[0]


class PreparedPatches:
    """A map-style dataset of planned patches: ``{"image": float32 [C_model, S, S]}`` each."""

    def __init__(self, plans: Sequence[PatchPlan], size: int, **radiometry: str) -> None:
        self.plans = list(plans)
        self.size = size
        self.radiometry = radiometry

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        x = torch.from_numpy(read_for_model(self.plans[i], **self.radiometry))
        return {"image": resize(x, self.size).contiguous()}


# ---------------------------------------------------------------- outputs

def principal_components(x: np.ndarray, k: int = PCA_COMPONENTS) -> np.ndarray:
    """Coordinates [N, min(k, N-1, D)] of the rows of ``x`` on their first principal components
    (centred; numpy SVD; each component's sign fixed so its largest loading is positive)."""
    n, d = x.shape
    k = max(0, min(k, n - 1, d))
    if k == 0:
        return np.zeros((n, 0), dtype=np.float32)
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return (centred @ comps.T).astype(np.float32)


def write_atomic_npy(path: Path, array: np.ndarray) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return path


def predict(model, inputs: Sequence[str], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """:meth:`domainfm.plugins.Plugin.predict` of eo-sar (see the module doc); returns
    ``{"patches", "embedding_dim", "files"}``."""
    import click

    from domainfm import tracking
    from domainfm.inference import extract_features, resolve_device

    backbone = load_backbone(model)
    spec = backbone.input_spec
    tolerance = options.get("gsd_tolerance")
    tolerance = GSD_TOLERANCE if tolerance is None else float(tolerance)
    plans = [plan_patch(s, spec, gsd_tolerance=tolerance) for s in find_patches(inputs)]  # every check first
    click.echo(f"eo-sar: {len(plans)} patch(es) -> {backbone.name}, {len(spec.bands)} bands at {backbone.img_size} px, "
               f"normalised with the model's statistics ({spec.units})", err=True)
    for line in sorted({p.plan.alignment.summary() for p in plans if p.plan.alignment.changed}):
        click.echo(f"eo-sar: {line}", err=True)
    data = PreparedPatches(plans, backbone.img_size, s2_harmonize=options.get("s2_harmonize") or "auto",
                           s1_units=options.get("s1_units") or "db")
    feats = extract_features(backbone, data, device=resolve_device(options.get("accelerator") or "auto"),
                             precision=options.get("precision") or "32-true",
                             batch_size=int(options.get("batch_size") or 16), progress="embedding patches")
    pcs = principal_components(feats)
    rows = []
    for i, p in enumerate(plans):
        row = {"file": str(p.source.path), "height": p.height, "width": p.width,
               "bands_filled": ",".join(p.plan.alignment.filled), "norm": float(np.linalg.norm(feats[i]))}
        row.update({f"pc{j + 1}": float(pcs[i, j]) for j in range(pcs.shape[1])})
        rows.append(row)
    out = Path(out)
    emb = write_atomic_npy(out / "embeddings.npy", feats.astype(np.float32))
    table = write_csv_atomic(out / "predictions.csv", rows)
    for f in (emb, table):
        tracking.log_artifact(f, "predictions")
    tracking.set_tags({"eo_sar.model_bands": ",".join(spec.bands), "eo_sar.model_gsd_m": str(spec.gsd_m)})
    return {"patches": len(plans), "embedding_dim": int(feats.shape[1]), "files": [str(emb), str(table)]}
