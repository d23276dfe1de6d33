"""``domainfm predict`` for sports-reid: rank a gallery of player crops for every query crop.

    domainfm predict --model models:/reid@champion QUERY... --gallery GALLERY_DIR --out DIR

QUERY: crop files or folders of crops, GALLERY_DIR: a folder of crops, both read by
:func:`plugins.sports_reid.layout.read_crops` (``<player_id>/`` sub-folders, MMSports names
``<player_id>_<sequence>_<frame>.jpeg``, or any names: the player id is then unknown). The model
brings its input size, normalisation and distance (:mod:`plugins.sports_reid.model`); crops are
letterboxed and normalised as in fine-tuning, features come from the core's frozen-feature loop
(flip TTA by default) and the gallery is ranked by the model's distance (optionally k-reciprocal
re-ranking, Zhong et al. CVPR 2017).

Writes ``DIR/ranking.csv``: one row per query and rank (``query``: the crop's path as given,
``rank`` 1..K, ``gallery``: the crop's path inside GALLERY_DIR, ``distance``, ``query_id`` /
``gallery_id``: the player ids the names give, empty where unknown) and ``DIR/retrieval_grid.png``;
both are logged to the MLflow run the core opened (``predictions/``). When every query and gallery
crop has an id, the summary adds mAP, CMC rank-1/5/10 and mINP (fractions in [0, 1], the
evaluation's metrics: :func:`domainfm.metrics.retrieval_metrics`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError

RANKING_COLUMNS = ("query", "rank", "gallery", "distance", "query_id", "gallery_id")


def _display(records, root: Path | None) -> list[str]:
    if root is None or not root.is_dir():
        return [str(r.path) for r in records]
    return [r.path.relative_to(root).as_posix() for r in records]


def ranking_rows(distmat: np.ndarray, query_names, gallery_names, query_ids, gallery_ids,
                 top_k: int) -> list[dict[str, Any]]:
    """The rows of ``ranking.csv``: for each query its ``top_k`` nearest gallery crops (stable
    order on ties), rank 1 first."""
    k = min(int(top_k), distmat.shape[1])
    rows = []
    for qi in range(distmat.shape[0]):
        order = np.argsort(distmat[qi], kind="stable")[:k]
        for rank, gi in enumerate(order, start=1):
            rows.append({"query": query_names[qi], "rank": rank, "gallery": gallery_names[gi],
                         "distance": f"{float(distmat[qi, gi]):.6f}", "query_id": query_ids[qi],
                         "gallery_id": gallery_ids[gi]})
    return rows


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RANKING_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def run_predict(model, inputs: list[str], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``Plugin.predict`` of sports-reid (see the module docstring). ``model``: a
    :class:`domainfm.predict.ModelRef`; ``options``: ``gallery`` (required), ``top_k``, ``rerank``,
    ``flip_tta``, ``same_camera_rule``, ``batch_size``, ``accelerator``, ``precision``.

    Raises DomainFMError (one line) for a missing/empty gallery or query, a file that is not a crop
    image, ``--rerank`` on too few crops, a device/precision the machine lacks, or a model re-id
    crops cannot feed (naming the setting, :func:`plugins.sports_reid.model.spec_from_metadata`)."""
    from domainfm import tracking
    from domainfm.inference import autocast_dtype, resolve_device
    from domainfm.metrics import retrieval_metrics
    from plugins.sports_reid.datasets import ReIDDataset
    from plugins.sports_reid.layout import CROPS_LAYOUT, read_crops
    from plugins.sports_reid.model import load_reid_model
    from plugins.sports_reid.rerank import check_rerank
    from plugins.sports_reid.retrieval import (EvalSettings, RetrievalResult, distance_matrix, embed,
                                               plot_retrieval_grid, reranked_distances, summary)

    # 1. everything that can be wrong with the input, before the model is built
    gallery_dir = options.get("gallery")
    if not gallery_dir:
        raise DomainFMError("sports-reid predict needs --gallery DIR (the crops to rank)",
                            fix="add --gallery GALLERY_DIR")
    top_k = int(options.get("top_k") or 10)
    if top_k < 1:
        raise DomainFMError(f"--top-k must be at least 1, got {top_k}", fix="pass --top-k 1 or more")
    gallery_root = Path(gallery_dir)
    if gallery_root.exists() and not gallery_root.is_dir():
        raise DomainFMError("is a file, but --gallery takes a folder", path=gallery_root,
                            fix=f"give the folder of gallery crops ({CROPS_LAYOUT})")
    queries = read_crops(inputs, what="query")
    gallery = read_crops([gallery_root], what="gallery")
    rerank = bool(options.get("rerank"))
    if rerank:
        check_rerank(len(queries) + len(gallery), path=gallery_root)
    device = resolve_device(str(options.get("accelerator") or "auto"))
    precision = str(options.get("precision") or "32-true")
    autocast_dtype(precision, device)

    # 2. the model, with the input size, normalisation and distance it records
    backbone, spec = load_reid_model(model.local_path())
    settings = EvalSettings(distance=spec.distance, flip_tta=bool(options.get("flip_tta", True)), rerank=rerank,
                            batch_size=int(options.get("batch_size") or 64), precision=precision, device=device.type)
    q_set = ReIDDataset(queries, img_size=spec.img_size, mean=spec.mean, std=spec.std)
    g_set = ReIDDataset(gallery, img_size=spec.img_size, mean=spec.mean, std=spec.std)
    q_feats = embed(backbone, q_set, settings, description="query features")
    g_feats = embed(backbone, g_set, settings, description="gallery features")
    if rerank:
        dist = reranked_distances(q_feats, g_feats, spec.distance)
    else:
        dist = distance_matrix(q_feats, g_feats, spec.distance)

    # 3. the ranking, and the metrics where the names give every player id
    result: dict[str, Any] = {"num_queries": len(queries), "num_gallery": len(gallery), "top_k": min(top_k, len(gallery))}
    q_ids, g_ids = [r.pid for r in queries], [r.pid for r in gallery]
    metrics = None
    if all(q_ids) and all(g_ids) and set(q_ids) & set(g_ids):
        # cameras named on both sides (c<k>) turn on the Market-1501 same-camera exclusion
        cams = bool(options.get("same_camera_rule", True)) and q_set.cameras is not None and g_set.cameras is not None
        metrics = retrieval_metrics(dist, q_ids, g_ids, q_set.cameras if cams else None,
                                    g_set.cameras if cams else None, max_rank=10,
                                    camera_rule_off="--no-same-camera-rule")
        result.update(summary(metrics))
        result["skipped_queries"] = metrics["num_skipped"]
    rows = ranking_rows(dist, _display(queries, None), _display(gallery, gallery_root), q_ids, g_ids, top_k)
    out = Path(out)
    csv_path = _write_csv(rows, out / "ranking.csv")
    grid_path = out / "retrieval_grid.png"
    fig = plot_retrieval_grid(RetrievalResult(dist, q_set, g_set, metrics), top_k=min(top_k, 10))
    fig.savefig(grid_path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    for path in (csv_path, grid_path):
        tracking.log_artifact(path, "predictions")
    tracking.set_tags({"domainfm.reid.input_size": f"{spec.input_size[0]}x{spec.input_size[1]}",
                       "domainfm.reid.distance": spec.distance + (" + k-reciprocal re-ranking" if rerank else "")})
    result["files"] = [str(csv_path), str(grid_path)]
    return result
