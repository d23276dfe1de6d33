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


def retrieval_metrics(distmat, query_ids, gallery_ids, query_cams=None, gallery_cams=None,
                      max_rank: int = 10) -> dict[str, Any]:
    """Re-identification metrics of a query x gallery distance matrix (smaller = more similar).

    Returns ``{"mAP", "cmc", "mINP", "num_queries", "num_skipped"}``: mAP and mINP as fractions in
    [0, 1], ``cmc`` a list whose entry k-1 is the fraction of queries with a match in the top k.

    - Cameras (Market-1501 protocol): when given, gallery items with the query's id *and* camera
      are removed for that query (the same view is not a re-identification).
    - A query without any valid match is skipped and counted in ``num_skipped``; if every query is
      skipped a DomainFMError is raised.
    - Ties: AP treats a group of equal distances as one threshold, exactly like
      ``sklearn.metrics.average_precision_score``; a match tied with non-matches is ranked after
      them for CMC and mINP (the pessimistic order), so results never depend on sort stability.

    The work is a row-block sort plus a vectorised binary search for the positives only, so a
    2,000 x 20,000 matrix costs about one ``np.sort`` of it (see benchmarks/reid_eval.py).
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

    ap = np.zeros(n_query)
    inp = np.zeros(n_query)
    first_rank = np.zeros(n_query, dtype=np.int64)
    n_pos = np.zeros(n_query, dtype=np.int64)
    # rows per block: keeps the sorted copy near 4M entries whatever the gallery size
    block = max(1, (1 << 22) // n_gallery)
    for start in range(0, n_query, block):
        stop = min(start + block, n_query)
        d = dist[start:stop]
        match = q_ids[start:stop, None] == g_ids[None, :]
        if use_cams:
            junk = match & (q_cams[start:stop, None] == g_cams[None, :])
            if junk.any():
                # +inf sorts last and is never <= a finite positive distance: removed from the ranking
                d = np.where(junk, np.inf, d)
                match &= ~junk
        sorted_d = np.sort(d, axis=1)
        rows, cols = np.nonzero(match)
        if rows.size == 0:
            continue
        values = d[rows, cols]
        # positives ordered by row, then by distance
        order = np.lexsort((values, rows))
        rows, values = rows[order], values[order]
        # rank of each positive = items at distance <= its own (ties counted against it)
        n_le = _binary_search_le(sorted_d, rows, values)
        # positives at distance <= each positive: index of the end of its tie group within the row
        idx = np.arange(rows.size)
        is_end = np.ones(rows.size, dtype=bool)
        is_end[:-1] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
        group_end = np.minimum.accumulate(np.where(is_end, idx, rows.size)[::-1])[::-1]
        counts = np.bincount(rows, minlength=stop - start)
        row_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos_le = group_end - row_start[rows] + 1
        precision = pos_le / n_le
        has_pos = counts > 0
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
        why = " with a different camera" if use_cams else ""
        raise DomainFMError(f"none of the {n_query} queries has a matching gallery item{why}",
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
