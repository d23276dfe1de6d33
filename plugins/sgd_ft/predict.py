"""``domainfm predict --model URI INPUT... --out DIR`` for sgd-ft classifiers.

The classifier records its classes, task, threshold, input size and input (:mod:`plugins.sgd_ft.saved`);
nothing of that is asked again. Inputs are read the way the classifier's training data was:

- a classifier whose bands are Sentinel-1/2 names (fine-tuned on eo-sar patches, ``--task
  multilabel``): GeoTIFF patches of any size, folders of them or per-band folders, read, normalised
  with the recorded statistics, aligned by band name, checked against the recorded GSD and resized
  by the eo-sar plugin (``patches_for_model``; a plugin never imports another);
- an ImageFolder classifier (bands by position): images (PNG/JPEG as RGB scaled to 0..1, GeoTIFFs as
  stored) or folders of them, read by sgd-ft's own reader (:func:`plugins.sgd_ft.datasets.read_image`),
  nodata pixels set to the band mean, resized to the input size (bilinear, antialiased) and
  normalised with the recorded statistics, as in training.

Output: ``predictions.csv`` under ``--out``, one row per input: ``file``, one score per class (the
class names as columns, in the model's order: sigmoid probabilities for multi-label, softmax for
multi-class) and ``predicted`` (multi-label: the classes scoring at least the recorded threshold,
joined by ``;``; multi-class: the top class); logged to the MLflow run the core opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from domainfm.errors import DomainFMError

BAND_PLUGIN = "eo-sar"  # reads GeoTIFF patches with Sentinel-1/2 band names


def normalise_raw(x, meta: dict[str, str]):
    """Raw pixels ``x`` (torch float [N, C, H, W] in the recorded units and band order) normalised with
    the recorded statistics (non-finite pixels -> 0) and resized to the recorded size (bilinear,
    antialiased when shrinking). DomainFMError when the band count is not the model's."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(json.loads(meta["input_mean"]), dtype=torch.float32)[:, None, None]
    std = torch.tensor(json.loads(meta["input_std"]), dtype=torch.float32)[:, None, None]
    if x.ndim != 4 or x.shape[1] != mean.shape[0]:
        raise DomainFMError(f"the input has shape {tuple(x.shape)} but the model takes [N, {mean.shape[0]}, H, W]",
                            fix="give raw pixels with the model's bands")
    x = (x - mean) / std
    x = torch.where(torch.isfinite(x), x, torch.zeros(()))
    size = int(meta["img_size"])
    if tuple(x.shape[-2:]) != (size, size):
        shrink = size < x.shape[-2] or size < x.shape[-1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def scores_of(logits, task: str):
    """Class scores: sigmoid per class (multi-label) or softmax over classes (multi-class)."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------- ImageFolder inputs (bands by position)

def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files ``inputs`` name: files, or the images of folders (sorted, not recursive)."""
    from plugins.sgd_ft.datasets import is_image

    out: list[Path] = []
    for given in inputs:
        p = Path(given)
        if not p.exists():
            raise DomainFMError("no such file or folder", path=p, fix="give images or folders of images")
        if p.is_file():
            if not is_image(p):
                raise DomainFMError("is not an image (PNG, JPEG, GeoTIFF...)", path=p, fix="give image files")
            out.append(p)
            continue
        found = sorted(c for c in p.iterdir() if is_image(c))
        if not found:
            raise DomainFMError("holds no images", path=p, fix="give a folder of images")
        out.extend(found)
    return out


class FolderImages:
    """``{"image": float32 [C, S, S]}`` per file: read by sgd-ft's reader, nodata -> band mean,
    resized (bilinear, antialiased) and normalised, as :class:`plugins.sgd_ft.datasets.ImageFolderClassification`."""

    def __init__(self, files: Sequence[Path], meta: dict[str, str]) -> None:
        import torch

        self.files = list(files)
        self.size = int(meta["img_size"])
        self.mean = torch.tensor(json.loads(meta["input_mean"]), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(json.loads(meta["input_std"]), dtype=torch.float32)[:, None, None]
        self.shapes = [self.check(f) for f in self.files]

    def check(self, path: Path) -> tuple[int, int]:
        """(height, width) of ``path`` from its header; DomainFMError when its band count differs."""
        from domainfm.data import image_info
        from plugins.sgd_ft.datasets import read_channels

        bands = read_channels(path)
        if bands != self.mean.shape[0]:
            raise DomainFMError(f"has {bands} band(s) but the model takes {self.mean.shape[0]}", path=path,
                                fix=f"give images with the {self.mean.shape[0]} bands the model was trained on")
        info = image_info(path)
        return int(info.height), int(info.width)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from plugins.sgd_ft.datasets import read_image

        image = torch.from_numpy(read_image(self.files[i]))
        image = torch.where(torch.isnan(image), self.mean, image)
        if tuple(image.shape[1:]) != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        return {"image": ((image - self.mean) / self.std).contiguous()}


# ---------------------------------------------------------------- predict

def _named_bands(meta: dict[str, str]) -> bool:
    """True when the classifier records Sentinel-1/2 band names (read as eo-sar patches)."""
    from domainfm import plugins

    bands = json.loads(meta.get("input_bands", "null")) or []
    if not bands or json.loads(meta.get("input_units", "null")) in (None, "RGB scaled to 0..1"):
        return False
    try:
        plugins.load(BAND_PLUGIN).band_alignment(bands, bands)
    except DomainFMError:
        return False
    return True


def predict(model, inputs: Sequence[str], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """:meth:`domainfm.plugins.Plugin.predict` of sgd-ft (see the module doc); returns
    ``{"inputs", "classes", "positives", "files"}``."""
    import click

    from domainfm import plugins, tracking
    from domainfm.backbones import InputSpec
    from domainfm.inference import extract_features, resolve_device
    from plugins.sgd_ft.saved import classifier_files, load_classifier

    net, meta = load_classifier(*classifier_files(model.local_path(), model.uri), uri=model.uri)
    if "input_mean" not in meta or "input_std" not in meta:
        raise DomainFMError("the model records no normalisation statistics (input_mean/input_std)", path=model.uri,
                            fix="fine-tune it again with `domainfm finetune --plugin sgd-ft`, which records them")
    classes = json.loads(meta["classes"])
    task = meta.get("task", "multiclass")
    threshold = float(meta.get("threshold", 0.5))
    size = int(meta["img_size"])
    if _named_bands(meta):
        spec = InputSpec.from_meta(meta, source=model.uri)
        data, plans = plugins.load(BAND_PLUGIN).patches_for_model(inputs, spec, size,
                                                                 gsd_tolerance=options.get("gsd_tolerance"))
        rows = [{"file": str(p.source.path)} for p in plans]
    else:
        recorded = json.loads(meta["input_mean"])
        if int(meta.get("in_chans", len(recorded))) != len(recorded):
            bands = json.loads(meta.get("input_bands", "null")) or []
            raise DomainFMError(f"the model takes {meta['in_chans']} bands but was fine-tuned on {len(recorded)}-band "
                                f"images ({', '.join(bands) or 'by position'}) aligned to its backbone; predict does "
                                "not align images to it", path=model.uri,
                                fix="fine-tune on GeoTIFF patches with the backbone's named bands to predict with it")
        data = FolderImages(image_files(inputs), meta)
        rows = [{"file": str(f)} for f in data.files]
    click.echo(f"sgd-ft: {len(rows)} input(s) -> {task} classifier over {len(classes)} classes "
               f"({', '.join(classes[:6])}{'...' if len(classes) > 6 else ''}) at {size} px", err=True)
    logits = extract_features(net, data, device=resolve_device(options.get("accelerator") or "auto"),
                              precision=options.get("precision") or "32-true",
                              batch_size=int(options.get("batch_size") or 16), progress="classifying")
    import torch

    scores = scores_of(torch.from_numpy(logits), task).numpy().astype(np.float64)
    positives = 0
    for row, s in zip(rows, scores):
        row.update({c: float(v) for c, v in zip(classes, s)})
        if task == "multilabel":
            chosen = [c for c, v in zip(classes, s) if v >= threshold]
            positives += len(chosen)
            row["predicted"] = ";".join(chosen)
        else:
            row["predicted"] = classes[int(np.argmax(s))]
    from domainfm.data import write_csv_atomic

    table = write_csv_atomic(Path(out) / "predictions.csv", rows)
    tracking.log_artifact(table, "predictions")
    summary: dict[str, Any] = {"inputs": len(rows), "classes": len(classes), "files": [str(table)]}
    if task == "multilabel":
        summary["positives"] = positives
    return summary
