"""Evaluation metrics shared by the plugins: pure functions of arrays, tested against sklearn."""

from __future__ import annotations

from typing import Any

from domainfm.errors import DomainFMError


def _retrieval_array(x: Any, name: str):
    import numpy as np

    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 and name != "distmat":
        raise DomainFMError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _binary_search_le(sorted_rows, rows, values):
    """For each (row, value) pair, how many entries of ``sorted_rows[row]`` are <= value.

    A binary search run for all pairs at once: about log2(G) vectorised steps instead of a Python
    loop of ``np.searchsorted`` calls, exact for any float dtype.
    """
    import numpy as np

    lo = np.zeros(rows.shape, dtype=np.int64)
    hi = np.full(rows.shape, sorted_rows.shape[1], dtype=np.int64)
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        mid_c = np.minimum(mid, sorted_rows.shape[1] - 1)
        go_right = open_ & (sorted_rows[rows, mid_c] <= values)
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(open_ & ~go_right, mid, hi)


def _sorted_candidates(d, hardest, rows_per_sort: int = 16):
    """Each row of ``d`` sorted, keeping at least the entries <= the row's hardest positive distance.

    Nothing farther than a query's hardest match changes its AP, CMC or INP, and with any useful
    model that is a small part of the gallery: a partition (linear time) that brings those entries
    to the front, then a sort of the front only, is what makes the metric several times cheaper
    than a full sort. Rows go in small groups of similar candidate counts so one hard query does
    not make every row of the block pay for a full-width sort. Entries past a row's own count are
    either +inf padding or farther than its hardest match: no positive distance reaches them.
    """
    import numpy as np

    counts = (d <= hardest[:, None]).sum(axis=1)
    out = np.full((d.shape[0], max(int(counts.max()), 1)), np.inf, dtype=d.dtype)
    by_count = np.argsort(counts, kind="stable")
    for g in range(0, len(by_count), rows_per_sort):
        group = by_count[g:g + rows_per_sort]
        width = int(counts[group].max())
        if width == 0:
            continue
        if width * 2 > d.shape[1]:  # partitioning first would not pay
            out[group] = np.sort(d[group], axis=1)[:, :out.shape[1]]
            continue
        front = np.partition(d[group], width - 1, axis=1)[:, :width]
        front.sort(axis=1)
        out[group, :width] = front
    return out


def retrieval_metrics(distmat, query_ids, gallery_ids, query_cams=None, gallery_cams=None,
                      max_rank: int = 10, *, camera_rule_off: str | None = None) -> dict[str, Any]:
    """Re-identification metrics of a query x gallery distance matrix (smaller = more similar).

    Returns ``{"mAP", "cmc", "mINP", "num_queries", "num_skipped"}``: mAP and mINP as fractions in
    [0, 1], ``cmc`` a list whose entry k-1 is the fraction of queries with a match in the top k.

    - Cameras (Market-1501 protocol): when given, gallery items with the query's id *and* camera
      are removed for that query (the same view is not a re-identification).
    - A query without any valid match is skipped and counted in ``num_skipped``; if every query is
      skipped a DomainFMError is raised, which says when the camera rule is the cause and how to
      turn it off (``camera_rule_off``: the caller's flag, e.g. ``--no-same-camera-rule``).
    - Ties: AP treats a group of equal distances as one threshold, exactly like
      ``sklearn.metrics.average_precision_score``; a match tied with non-matches is ranked after
      them for CMC and mINP (the pessimistic order), so results never depend on sort stability.

    The work is, per block of rows, a sort of the entries no farther than the hardest match plus a
    vectorised binary search for the positives only (see benchmarks/reid_eval.py for the speed-up
    over a per-query sklearn loop).
    """
    import numpy as np

    dist = _retrieval_array(distmat, "distmat")
    if dist.ndim != 2:
        raise DomainFMError(f"distmat must be a 2-D query x gallery matrix, got shape {dist.shape}")
    n_query, n_gallery = dist.shape
    q_raw = _retrieval_array(query_ids, "query_ids")
    g_raw = _retrieval_array(gallery_ids, "gallery_ids")
    if len(q_raw) != n_query or len(g_raw) != n_gallery:
        raise DomainFMError(f"distmat is {n_query} x {n_gallery} but there are {len(q_raw)} query ids "
                            f"and {len(g_raw)} gallery ids", fix="give one id per row and one per column")
    if (query_cams is None) != (gallery_cams is None):
        raise DomainFMError("cameras were given for only one of query and gallery",
                            fix="give both query_cams and gallery_cams, or neither")
    if n_query == 0 or n_gallery == 0:
        raise DomainFMError("retrieval metrics need at least one query and one gallery item")
    if max_rank < 1:
        raise DomainFMError(f"max_rank must be at least 1, got {max_rank}")
    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float64)
    if not np.isfinite(dist).all():
        raise DomainFMError("distmat holds NaN or infinite distances",
                            fix="check the features (a NaN usually comes from a diverged model)")

    # ids (and cameras) of any type become shared integer codes: comparisons are then int compares
    _, codes = np.unique(np.concatenate([q_raw.astype(str) if q_raw.dtype.kind in "OUS" else q_raw,
                                         g_raw.astype(str) if g_raw.dtype.kind in "OUS" else g_raw]),
                         return_inverse=True)
    q_ids, g_ids = codes[:n_query], codes[n_query:]
    use_cams = query_cams is not None
    if use_cams:
        qc_raw = _retrieval_array(query_cams, "query_cams")
        gc_raw = _retrieval_array(gallery_cams, "gallery_cams")
        if len(qc_raw) != n_query or len(gc_raw) != n_gallery:
            raise DomainFMError("there must be one camera per query and one per gallery item")
        _, cam_codes = np.unique(np.concatenate([qc_raw.astype(str), gc_raw.astype(str)]), return_inverse=True)
        q_cams, g_cams = cam_codes[:n_query], cam_codes[n_query:]

    # gallery positions grouped by id: each query's matches are listed without scanning its row
    n_codes = int(codes.max()) + 1
    g_by_id = np.argsort(g_ids, kind="stable")
    id_count = np.bincount(g_ids, minlength=n_codes)
    id_start = np.cumsum(id_count) - id_count

    ap = np.zeros(n_query)
    inp = np.zeros(n_query)
    first_rank = np.zeros(n_query, dtype=np.int64)
    n_pos = np.zeros(n_query, dtype=np.int64)
    # rows per block: keeps the sorted copy near 4M entries whatever the gallery size
    block = max(1, (1 << 22) // n_gallery)
    for start in range(0, n_query, block):
        stop = min(start + block, n_query)
        d = dist[start:stop]
        per_row = id_count[q_ids[start:stop]]
        rows = np.repeat(np.arange(stop - start), per_row)
        offsets = np.arange(rows.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        cols = g_by_id[id_start[q_ids[start:stop]][rows] + offsets]
        if use_cams:
            junk = g_cams[cols] == q_cams[start + rows]
            if junk.any():
                # +inf sorts last and is never <= a finite positive distance: removed from the ranking
                d = d.copy()
                d[rows[junk], cols[junk]] = np.inf
                rows, cols = rows[~junk], cols[~junk]
        if rows.size == 0:
            continue
        values = d[rows, cols]
        # positives ordered by row, then by distance: the last of each row is its hardest match
        order = np.lexsort((values, rows))
        rows, values = rows[order], values[order]
        counts = np.bincount(rows, minlength=stop - start)
        row_start = np.cumsum(counts) - counts
        has_pos = counts > 0
        hardest = np.full(stop - start, -np.inf, dtype=d.dtype)
        hardest[has_pos] = values[row_start[has_pos] + counts[has_pos] - 1]
        sorted_d = _sorted_candidates(d, hardest)
        # rank of each positive = items at distance <= its own (ties counted against it)
        n_le = _binary_search_le(sorted_d, rows, values)
        # positives at distance <= each positive: index of the end of its tie group within the row
        idx = np.arange(rows.size)
        is_end = np.ones(rows.size, dtype=bool)
        is_end[:-1] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
        group_end = np.minimum.accumulate(np.where(is_end, idx, rows.size)[::-1])[::-1]
        pos_le = group_end - row_start[rows] + 1
        precision = pos_le / n_le
        block_ap = np.bincount(rows, weights=precision, minlength=stop - start)
        ap[start:stop][has_pos] = block_ap[has_pos] / counts[has_pos]
        firsts = row_start[has_pos]
        lasts = row_start[has_pos] + counts[has_pos] - 1
        # the first match ranks after every non-match at its distance or closer
        first_rank[start:stop][has_pos] = n_le[firsts] - pos_le[firsts] + 1
        inp[start:stop][has_pos] = counts[has_pos] / n_le[lasts]
        n_pos[start:stop] = counts

    valid = n_pos > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        if use_cams and (id_count[q_ids] > 0).any():
            # the ids match: it is the same-camera rule that left nothing to find
            cams = np.unique(np.concatenate([q_cams, g_cams]))
            seen = (f"every crop comes from one camera ({qc_raw[0]})" if len(cams) == 1 else
                    "each query's player is in the gallery only under the query's own camera")
            off = (f"turn the rule off with {camera_rule_off}" if camera_rule_off else
                   "turn the rule off by giving no query_cams and gallery_cams")
            raise DomainFMError(f"the same-camera rule removed every match: {seen}, and gallery crops of a "
                                f"query's player taken by the query's camera do not count",
                                fix=f"{off}, or add gallery crops from other cameras")
        raise DomainFMError(f"none of the {n_query} queries has a matching gallery item",
                            fix="check that query and gallery ids name the same players")
    ranks = np.arange(1, min(max_rank, n_gallery) + 1)
    cmc = (first_rank[valid, None] <= ranks[None, :]).mean(axis=0)
    return {
        "mAP": float(ap[valid].mean()),
        "cmc": [float(c) for c in cmc],
        "mINP": float(inp[valid].mean()),
        "num_queries": n_valid,
        "num_skipped": n_query - n_valid,
    }


def multilabel_average_precision(scores, targets) -> dict[str, Any]:
    """Average precision of multi-label scores [N, K] against 0/1 targets [N, K].

    ``macro``: the mean of per-class AP over classes that have at least one positive (a class with
    none has no defined AP: it is NaN in ``per_class`` and left out of the mean, as torchmetrics
    and sklearn users expect); ``micro``: AP of all (sample, class) pairs pooled.
    """
    import numpy as np
    from sklearn.metrics import average_precision_score

    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    t = np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 2:
        raise DomainFMError(f"scores {s.shape} and targets {t.shape} must both be [N, K]")
    per_class = [float(average_precision_score(t[:, k], s[:, k])) if t[:, k].any() else float("nan")
                 for k in range(t.shape[1])]
    valid = [ap for ap in per_class if ap == ap]
    if not valid:
        raise DomainFMError("no class has a positive sample: average precision is undefined",
                            fix="evaluate on data with labels")
    micro = float(average_precision_score(t.ravel(), s.ravel()))
    return {"macro": float(np.mean(valid)), "micro": micro, "per_class": per_class}


SCORE_TIE_TOL = 1e-6
"""Scores closer than this (relative to the larger of 1 and the largest magnitude) are ties: about
8 float32 ulps at 1.0, above the rounding noise of a float32 forward pass (a probability that
"differs" by 1e-7 between two slides carries no ranking)."""


def tie_scores(scores, tol: float = SCORE_TIE_TOL):
    """``scores`` [N] (or [N, C], column by column) with differences below floating-point noise
    made exact ties: sorted values join the group of the first value less than ``tol`` (scaled by
    ``max(1, max|score|)``) below them, and take that value. Returns float64 of the same shape."""
    import numpy as np

    s = np.array(scores, dtype=np.float64)
    if s.ndim == 2:
        return np.stack([tie_scores(s[:, k], tol) for k in range(s.shape[1])], axis=1)
    if s.size == 0:
        return s
    order = np.argsort(s, kind="stable")
    v = s[order]
    scale = tol * max(1.0, float(np.abs(v).max()))
    out = v.copy()
    lead = v[0]
    for i in range(1, len(v)):  # a group is at most ``scale`` wide: noise never chains far
        if v[i] - lead < scale:
            out[i] = lead
        else:
            lead = v[i]
    res = np.empty_like(s)
    res[order] = out
    return res


def is_constant(scores, tol: float = SCORE_TIE_TOL) -> bool:
    """True when every score (every row of a [N, C] array) is the same up to floating-point noise:
    a model that gives every case one probability has ranked nothing."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return True
    s = s.reshape(len(s), -1)
    spread = s.max(axis=0) - s.min(axis=0)
    return bool((spread < tol * max(1.0, float(np.abs(s).max()))).all())


def _auc_inputs(y_true, y_score):
    import numpy as np

    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_score, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:  # two-class probabilities: the positive column ranks
        p = p[:, 1]
    if p.ndim not in (1, 2) or len(p) != len(y):
        raise DomainFMError(f"AUC needs one score (or one row of class probabilities) per case: "
                            f"{len(y)} labels, scores of shape {p.shape}")
    return y, tie_scores(p)


def _auc(y, p) -> float:
    """AUC of already tie-collapsed scores: binary, or macro one-vs-rest over the columns."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    if p.ndim == 1:
        return float(roc_auc_score(y, p))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(p.shape[1])))


def roc_auc(y_true, y_score) -> float:
    """ROC AUC of scores [N] (binary, label 1 positive), or of class probabilities [N, C] (two
    columns: the second ranks; more: macro one-vs-rest, rows summing to 1). Scores that differ by
    less than floating-point noise are ties (see :func:`tie_scores`), so constant predictions score
    0.5, never 0 or 1 by rounding luck. NaN when the cases hold a single class."""
    import numpy as np

    y, p = _auc_inputs(y_true, y_score)
    if len(np.unique(y)) < 2:
        return float("nan")
    return _auc(y, p)


def roc_auc_ci(y_true, y_score, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """ROC AUC with a percentile bootstrap confidence interval (Efron & Tibshirani 1993, ch. 13):
    the one AUC-with-CI of domainfm, for every plugin and pipeline.

    ``y_true`` [N] integer labels; ``y_score`` [N] scores of label 1 (binary), or class
    probabilities [N, C] (two columns: the second ranks; more: macro one-vs-rest AUC, as
    ``sklearn.metrics.roc_auc_score(multi_class="ovr", average="macro")``). Scores that differ by
    less than floating-point noise are ties (:func:`tie_scores`). The interval: ``n_boot`` resamples
    of the cases with replacement (``numpy.random.default_rng(seed)``; a resample missing a class is
    redrawn, since AUC is undefined there), the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    of their AUCs (numpy's linear interpolation). Returns ``(auc, lo, hi)``, floats in [0, 1].

    Raises DomainFMError when the cases hold a single class."""
    import numpy as np

    y, p = _auc_inputs(y_true, y_score)
    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise DomainFMError("AUC needs both classes among the cases, found one",
                            fix="evaluate on a cohort with positive and negative cases")
    auc = _auc(y, p)
    rng = np.random.default_rng(seed)
    stats = []
    n = len(y)
    while len(stats) < n_boot:
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < n_classes:
            continue
        stats.append(_auc(y[idx], p[idx]))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return auc, float(lo), float(hi)


# ---------------------------------------------------------------- representation health (the pretraining monitor)

def _as_float64(x):
    import numpy as np

    return np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


def rankme(features, *, eps: float = 1e-7) -> float:
    """RankMe, the effective rank of an embedding matrix (Garrido et al., ICML 2023):
    ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values
    ``sigma`` of ``features`` [N, D]. Between about 1 (every embedding on one line: collapse) and
    ``min(N, D)``. Raises DomainFMError for a matrix that is not 2-d or holds no non-zero value."""
    import numpy as np

    z = _as_float64(features)
    if z.ndim != 2 or z.size == 0:
        raise DomainFMError(f"RankMe needs an [N, D] embedding matrix, got shape {z.shape}")
    sigma = np.linalg.svd(z, compute_uv=False)
    total = sigma.sum()
    if not np.isfinite(total) or total <= 0:
        raise DomainFMError("RankMe of an all-zero or non-finite embedding matrix is undefined",
                            fix="check the model's outputs (a diverged run?)")
    p = sigma / total + eps
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # 0 log 0 = 0
    return float(np.exp(-plogp.sum()))


def feature_std(features) -> float:
    """The per-dimension standard deviation of the L2-normalised features [N, D], averaged over the
    D dimensions (population std). About ``1/sqrt(D)`` for well-spread features, 0 when every
    sample maps to the same direction (SimSiam's collapse indicator, Chen & He 2021)."""
    import numpy as np

    z = _as_float64(features)
    if z.ndim != 2 or len(z) < 2:
        raise DomainFMError(f"feature std needs an [N, D] matrix with N >= 2, got shape {z.shape}")
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(z.std(axis=0).mean())


def knn_scores(features, labels, *, k: int = 10, groups=None):
    """Leave-one-out k-NN class scores [N, K]: each sample's score for a class is the cosine-
    similarity-weighted mean of that class's label among its ``k`` nearest other samples (by cosine
    similarity of ``features`` [N, D]); ``labels`` [N, K] multi-hot (or one-hot). ``groups`` [N]
    (e.g. locations, patients): neighbours of the same group are left out, so near-duplicates of one
    place do not count as retrieval."""
    import numpy as np

    z = _as_float64(features)
    y = _as_float64(labels)
    if z.ndim != 2 or y.ndim != 2 or len(z) != len(y):
        raise DomainFMError(f"k-NN needs features [N, D] and labels [N, K], got {z.shape} and {y.shape}")
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T
    excluded = np.eye(len(z), dtype=bool)
    if groups is not None:
        g = np.asarray(groups)
        excluded |= g[:, None] == g[None, :]
    sim = np.where(excluded, -np.inf, sim)
    k = max(1, min(k, int((~excluded).sum(1).min())))
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(sim, nn, axis=1)
    w = np.maximum(w, 0.0) + 1e-6  # cosine weights; a tiny floor keeps all-negative rows defined
    return (w[:, :, None] * y[nn]).sum(1) / w.sum(1, keepdims=True)


def knn_quality(features, labels, *, k: int = 10, groups=None) -> tuple[str, float]:
    """("knn_acc", accuracy) when every sample has exactly one label, else ("knn_map", macro mAP of
    :func:`knn_scores`, over the classes with a positive)."""
    import numpy as np

    y = _as_float64(labels)
    scores = knn_scores(features, y, k=k, groups=groups)
    if (y.sum(1) == 1).all():
        return "knn_acc", float((scores.argmax(1) == y.argmax(1)).mean())
    return "knn_map", multilabel_average_precision(scores, y)["macro"]
