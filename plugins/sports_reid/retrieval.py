"""Re-identification retrieval: features (optionally with flip test-time augmentation), cosine or
Euclidean distances, optional k-reciprocal re-ranking, mAP/CMC/mINP through the core's
``retrieval_metrics``, the challenge submission CSV and the retrieval grid. The device and the
autocast dtype come from :mod:`domainfm.inference` (``resolve_device``, ``autocast_dtype``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from domainfm.errors import DomainFMError
from domainfm.metrics import retrieval_metrics
from plugins.sports_reid.datasets import ReIDDataset, ReIDRecord, load_crop, read_eval_split

DISTANCES = ("cosine", "euclidean")


@dataclass(frozen=True)
class EvalSettings:
    distance: str = "cosine"
    flip_tta: bool = True
    rerank: bool = False
    batch_size: int = 64
    num_workers: int = 0
    precision: str = "32-true"
    device: str = "cpu"
    max_rank: int = 10
    same_camera_rule: bool = True


def embed(backbone: torch.nn.Module, dataset: ReIDDataset, settings: EvalSettings,
          *, description: str = "features") -> torch.Tensor:
    """[N, D] float32 features of ``dataset`` on the CPU, from the core's one frozen-feature loop
    (:func:`domainfm.inference.extract_features`); with flip TTA the mean of the features of each
    crop and of its mirror image (a player seen from the other side is the same player)."""
    from domainfm.inference import extract_features

    return torch.from_numpy(extract_features(
        backbone, dataset, device=settings.device, precision=settings.precision, flip_tta=settings.flip_tta,
        batch_size=settings.batch_size, num_workers=settings.num_workers, progress=description))


def distance_matrix(query: torch.Tensor, gallery: torch.Tensor, distance: str = "cosine") -> np.ndarray:
    """[Q, G] float32: 1 - cosine similarity, or the Euclidean distance of the raw features."""
    if distance == "cosine":
        return (1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T).numpy()
    if distance == "euclidean":
        return torch.cdist(query, gallery).numpy()
    raise DomainFMError(f"unknown distance {distance!r}", fix=f"use one of {', '.join(DISTANCES)}")


def reranked_distances(query: torch.Tensor, gallery: torch.Tensor, distance: str) -> np.ndarray:
    from domainfm.output import progress_bar
    from plugins.sports_reid.rerank import K1, K2, LAMBDA, re_ranking

    if distance == "cosine":  # squared Euclidean of unit vectors = 2 - 2 cos: cosine neighbours
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    with progress_bar() as progress:
        task = progress.add_task("k-reciprocal re-ranking", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return re_ranking(query, gallery, k1=K1, k2=K2, lambda_value=LAMBDA, progress=advance)


@dataclass
class RetrievalResult:
    distmat: np.ndarray
    query: ReIDDataset
    gallery: ReIDDataset
    metrics: dict[str, Any] | None  # None for the challenge split (no ids)


def run_retrieval(backbone: torch.nn.Module, root: str | Path, split: str, settings: EvalSettings,
                  *, img_size: int, mean, std, label: str = "") -> RetrievalResult:
    """Embed ``split``'s query and gallery crops with ``backbone`` and rank the gallery."""
    q_records, g_records = read_eval_split(root, split)
    if split == "challenge":  # anonymous integer names: numeric order reads best in the CSV
        q_records = sorted(q_records, key=lambda r: int(r.item_id))
        g_records = sorted(g_records, key=lambda r: int(r.item_id))
    query = ReIDDataset(q_records, img_size=img_size, mean=mean, std=std)
    gallery = ReIDDataset(g_records, img_size=img_size, mean=mean, std=std)
    q_feats = embed(backbone, query, settings, description=f"{label}query features")
    g_feats = embed(backbone, gallery, settings, description=f"{label}gallery features")
    if settings.rerank:
        dist = reranked_distances(q_feats, g_feats, settings.distance)
    else:
        dist = distance_matrix(q_feats, g_feats, settings.distance)
    metrics = None
    if split == "test":
        # cameras (generic layout, c<k> in the names) turn on the same-camera exclusion
        with_cams = settings.same_camera_rule and query.cameras is not None and gallery.cameras is not None
        metrics = retrieval_metrics(dist, query.pids, gallery.pids, query.cameras if with_cams else None,
                                    gallery.cameras if with_cams else None, max_rank=settings.max_rank,
                                    camera_rule_off="--no-same-camera-rule")
    return RetrievalResult(dist, query, gallery, metrics)


def summary(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The flat keys reported in --json: mAP, rank1, rank5, rank10, mINP (fractions in [0, 1])."""
    cmc = metrics["cmc"]
    out = {f"{prefix}mAP": metrics["mAP"], f"{prefix}mINP": metrics["mINP"]}
    for k in (1, 5, 10):
        out[f"{prefix}rank{k}"] = cmc[min(k, len(cmc)) - 1]
    return out


def write_submission(path: str | Path, distmat: np.ndarray, query: Sequence[ReIDRecord],
                     gallery: Sequence[ReIDRecord]) -> Path:
    """The challenge CSV: gallery ids across the first row, query ids down the first column, the
    distances between. Written to a temporary name and renamed, so a crash leaves no half file."""
    p = Path(path)
    if p.is_dir():
        raise DomainFMError("--submission names a folder", path=p, fix="give a file name, e.g. submission.csv")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("," + ",".join(r.item_id for r in gallery) + "\n")
        ids = np.array([r.item_id for r in query], dtype=object)[:, None]
        body = np.concatenate([ids, np.char.mod("%.6f", distmat).astype(object)], axis=1)
        np.savetxt(f, body, fmt="%s", delimiter=",")
    os.replace(tmp, p)
    return p


def plot_retrieval_grid(result: RetrievalResult, *, n_queries: int = 8, top_k: int = 10, seed: int = 0):
    """Each row: a query, then its top-k gallery crops; a green border marks the same player, red
    another one (grey when ids are unknown, as in the challenge split)."""
    import matplotlib.pyplot as plt

    n_q, n_g = result.distmat.shape
    rows = np.sort(np.random.default_rng(seed).choice(n_q, size=min(n_queries, n_q), replace=False))
    k = min(top_k, n_g)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.1 * (k + 1), 1.5 * len(rows)), squeeze=False)
    size = result.query.img_size
    for r, qi in enumerate(rows):
        q_rec = result.query.records[qi]
        axes[r, 0].imshow(load_crop(q_rec.path, size))
        axes[r, 0].set_title(f"query {q_rec.pid or q_rec.item_id}", fontsize=7)
        ranked = np.argsort(result.distmat[qi], kind="stable")[:k]
        for c, gi in enumerate(ranked, start=1):
            g_rec = result.gallery.records[gi]
            ax = axes[r, c]
            ax.imshow(load_crop(g_rec.path, size))
            colour = "grey" if not q_rec.pid else ("limegreen" if g_rec.pid == q_rec.pid else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{c}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("query", fontsize=7)
    fig.tight_layout()
    return fig
