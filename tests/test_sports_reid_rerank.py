"""Blocked sparse k-reciprocal re-ranking against a dense, loop-by-loop reading of the paper."""

import numpy as np
import pytest

from domainfm.errors import DomainFMError
from domainfm.metrics import retrieval_metrics
from plugins.sports_reid.rerank import re_ranking


def dense_reference(q, g, k1, k2, lam):
    """Zhong et al. 2017, step by step on dense (Q+G)^2 matrices with Python loops."""
    x = np.concatenate([q, g]).astype(np.float64)
    n, nq = len(x), len(q)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = dist / dist.max(axis=1, keepdims=True)  # each row over its own largest distance
    order = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        return [j for j in order[i, : k + 1] if i in order[j, : k + 1]]

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-dist[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[order[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            shared = np.minimum(v[i], v[nq + j]).sum()
            jaccard[i, j] = 1 - shared / (2 - shared)
    return (1 - lam) * jaccard + lam * dist[:nq, nq:]


def clustered(n_ids, per_id_q, per_id_g, dim, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    q_ids = np.repeat(np.arange(n_ids), per_id_q)
    g_ids = np.repeat(np.arange(n_ids), per_id_g)
    q = centres[q_ids] + noise * rng.standard_normal((len(q_ids), dim))
    g = centres[g_ids] + noise * rng.standard_normal((len(g_ids), dim))
    return q.astype(np.float32), g.astype(np.float32), q_ids, g_ids


@pytest.mark.parametrize("k1,k2,lam", [(6, 3, 0.3), (5, 1, 0.0), (8, 4, 1.0)])
def test_matches_dense_reference(k1, k2, lam):
    q, g, _, _ = clustered(n_ids=6, per_id_q=2, per_id_g=7, dim=8, noise=0.9, seed=k1)
    # tiny blocks so that every blocked code path runs over several blocks
    ours = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lam, block_size=5)
    ref = dense_reference(q, g, k1, k2, lam)
    assert ours.shape == (12, 42) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_rerank_improves_map_on_clustered_features():
    q, g, q_ids, g_ids = clustered(n_ids=10, per_id_q=2, per_id_g=10, dim=16, noise=1.3, seed=0)
    plain = ((q[:, None] - g[None]) ** 2).sum(-1)
    before = retrieval_metrics(plain, q_ids, g_ids)["mAP"]
    calls = []
    reranked = re_ranking(q, g, k1=8, k2=3, block_size=64, progress=lambda done, total: calls.append((done, total)))
    after = retrieval_metrics(reranked, q_ids, g_ids)["mAP"]
    assert after > before + 0.02
    # progress: 2 neighbour blocks (120 rows / 64) + 1 Jaccard block, counted up to the total
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_bad_shapes_give_clear_errors():
    with pytest.raises(DomainFMError, match="same width"):
        re_ranking(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(DomainFMError, match="needs more than 20 images.*--no-rerank"):
        re_ranking(np.zeros((2, 3)), np.ones((4, 3)))
