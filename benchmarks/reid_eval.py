"""Re-identification evaluation benchmarks, measured side by side in one run.

1. ``domainfm.metrics.retrieval_metrics`` against a per-query ``sklearn.metrics.average_precision_score``
   loop at 2,000 queries x 20,000 gallery items (target: >= 10x faster, same mAP to 1e-6).
2. Peak memory of the blocked k-reciprocal re-ranking at 5,000 x 50,000 (k1=20, k2=6, lambda=0.3),
   measured in a child process (its peak resident set), next to what the dense textbook version
   would hold: the (Q+G)^2 float32 distance matrix and the (Q+G)^2 float32 V matrix.

    python benchmarks/reid_eval.py                      # both, full size
    python benchmarks/reid_eval.py --queries 500 --gallery 5000 --rerank-queries 500 --rerank-gallery 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def synthetic_embeddings(n_query: int, n_gallery: int, n_ids: int, dim: int, seed: int = 0):
    """Players as noisy points around an identity centre: the distances of a half-trained model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim)).astype(np.float32)
    q_ids = rng.integers(0, n_ids, n_query)
    g_ids = rng.integers(0, n_ids, n_gallery)
    q = centres[q_ids] + 1.6 * rng.standard_normal((n_query, dim)).astype(np.float32)
    g = centres[g_ids] + 1.6 * rng.standard_normal((n_gallery, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return q, g, q_ids, g_ids


def bench_metrics(n_query: int, n_gallery: int) -> dict:
    import numpy as np
    from sklearn.metrics import average_precision_score

    from domainfm.metrics import retrieval_metrics

    q, g, q_ids, g_ids = synthetic_embeddings(n_query, n_gallery, n_ids=max(2, n_gallery // 40), dim=128)
    dist = 1.0 - q @ g.T  # cosine distance, float32

    t0 = time.perf_counter()
    out = retrieval_metrics(dist, q_ids, g_ids)
    t_vec = time.perf_counter() - t0

    t0 = time.perf_counter()
    aps = []
    for i in range(n_query):
        y = g_ids == q_ids[i]
        if y.any():
            aps.append(average_precision_score(y, -dist[i]))
    t_loop = time.perf_counter() - t0
    ref = float(np.mean(aps))
    return {"queries": n_query, "gallery": n_gallery, "vectorised_s": round(t_vec, 3),
            "sklearn_loop_s": round(t_loop, 3), "speedup": round(t_loop / t_vec, 1),
            "mAP": out["mAP"], "sklearn_mAP": ref, "abs_diff": abs(out["mAP"] - ref)}


def _rerank_child(n_query: int, n_gallery: int, dim: int) -> None:
    """Runs in a fresh process so that its peak RSS is the re-ranking's own."""
    import resource

    import numpy as np

    from plugins.sports_reid.rerank import re_ranking

    q, g, _, _ = synthetic_embeddings(n_query, n_gallery, n_ids=max(2, n_gallery // 40), dim=dim, seed=1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = re_ranking(q, g, k1=20, k2=6, lambda_value=0.3)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": base,
                      "output_bytes": int(out.nbytes), "finite": bool(np.isfinite(out).all())}))


def bench_rerank(n_query: int, n_gallery: int, dim: int = 128) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--rerank-child", str(n_query), str(n_gallery), str(dim)],
                          capture_output=True, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    n = n_query + n_gallery
    dense = 2 * n * n * 4  # original_dist and V, both (Q+G)^2 float32, in the textbook version
    gib = 1024 ** 3
    return {"queries": n_query, "gallery": n_gallery, "seconds": round(child["seconds"], 1),
            "peak_rss_GiB": round(child["peak_rss"] / gib, 2),
            "rss_before_GiB": round(child["rss_before"] / gib, 2),
            "output_GiB": round(child["output_bytes"] / gib, 2),
            "dense_textbook_GiB": round(dense / gib, 1),
            "dense_over_peak": round(dense / child["peak_rss"], 1), "finite": child["finite"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rerank-child":
        _rerank_child(*map(int, sys.argv[2:5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--gallery", type=int, default=20000)
    p.add_argument("--rerank-queries", type=int, default=5000)
    p.add_argument("--rerank-gallery", type=int, default=50000)
    p.add_argument("--skip-rerank", action="store_true")
    args = p.parse_args()
    m = bench_metrics(args.queries, args.gallery)
    print(f"retrieval_metrics {m['queries']}x{m['gallery']}: {m['vectorised_s']} s vs sklearn loop "
          f"{m['sklearn_loop_s']} s -> {m['speedup']}x faster (target >= 10x); "
          f"mAP {m['mAP']:.6f} vs {m['sklearn_mAP']:.6f} (|diff| {m['abs_diff']:.2e}, target <= 1e-6)")
    if not args.skip_rerank:
        r = bench_rerank(args.rerank_queries, args.rerank_gallery)
        print(f"re_ranking {r['queries']}x{r['gallery']}: {r['seconds']} s, peak RSS {r['peak_rss_GiB']} GiB "
              f"(of which the {r['output_GiB']} GiB float32 result; {r['rss_before_GiB']} GiB before), "
              f"dense textbook version {r['dense_textbook_GiB']} GiB -> {r['dense_over_peak']}x less")


if __name__ == "__main__":
    main()
