"""retrieval_metrics against hand-computed values and an independent per-query sklearn loop."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from domainfm.errors import DomainFMError
from domainfm.metrics import retrieval_metrics


def reference_metrics(dist, q_ids, g_ids, q_cams=None, g_cams=None, max_rank=10):
    """One query at a time: sklearn's AP, CMC and mINP from a stable argsort (no ties in use)."""
    aps, inps, firsts = [], [], []
    for i in range(len(q_ids)):
        keep = np.ones(len(g_ids), bool)
        if q_cams is not None:
            keep = ~((g_ids == q_ids[i]) & (g_cams == q_cams[i]))
        y = g_ids[keep] == q_ids[i]
        if not y.any():
            continue
        d = dist[i, keep]
        aps.append(average_precision_score(y, -d))
        ranked = y[np.argsort(d, kind="stable")]
        hits = np.flatnonzero(ranked)
        firsts.append(hits[0] + 1)
        inps.append(len(hits) / (hits[-1] + 1))
    firsts = np.array(firsts)
    cmc = [float((firsts <= k).mean()) for k in range(1, max_rank + 1)]
    return {"mAP": float(np.mean(aps)), "cmc": cmc, "mINP": float(np.mean(inps)), "num_queries": len(aps)}


def test_hand_computed_single_query():
    # matches at ranks 1, 3 and 5: AP = (1/1 + 2/3 + 3/5) / 3, hardest match at rank 5 -> INP 3/5
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    out = retrieval_metrics(dist, ["a"], ["a", "b", "a", "b", "a"], max_rank=3)
    assert out["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert out["mINP"] == pytest.approx(3 / 5)
    assert out["cmc"] == [1.0, 1.0, 1.0]
    assert out["num_queries"] == 1 and out["num_skipped"] == 0


def test_hand_computed_first_match_at_rank_three():
    dist = np.array([[0.5, 0.1, 0.2, 0.9], [0.3, 0.2, 0.1, 0.4]])
    # query 7: order 1,2,0,3 -> ids 8,9,7,7: matches at ranks 3 and 4
    # query 9: order 2,1,0,3 -> ids 9,8,7,7: match at rank 1
    out = retrieval_metrics(dist, [7, 9], [7, 8, 9, 7], max_rank=4)
    assert out["mAP"] == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1.0) / 2)
    assert out["cmc"] == [0.5, 0.5, 1.0, 1.0]
    assert out["mINP"] == pytest.approx((2 / 4 + 1 / 1) / 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("signal", [0.0, 0.3, 0.7])
def test_matches_sklearn_loop_random(dtype, signal):
    # signal 0: chance-level ranking (full-row sorts); 0.7: matches near the top (only the few
    # entries closer than the hardest match are sorted); 0.3: a mix of both within one block
    rng = np.random.default_rng(3)
    q_ids, g_ids = rng.integers(0, 25, 60), rng.integers(0, 25, 700)
    dist = rng.random((60, 700)).astype(dtype)
    dist -= dtype(signal) * (q_ids[:, None] == g_ids[None, :])
    ref = reference_metrics(dist, q_ids, g_ids)
    out = retrieval_metrics(dist, q_ids, g_ids)
    assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert out["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)
    assert out["cmc"] == pytest.approx(ref["cmc"], abs=1e-9)
    assert out["num_queries"] + out["num_skipped"] == 60
    assert out["num_queries"] == ref["num_queries"]


def test_market1501_camera_protocol_matches_reference():
    rng = np.random.default_rng(4)
    q_ids, g_ids = rng.integers(0, 10, 40), rng.integers(0, 10, 300)
    q_cams, g_cams = rng.integers(0, 3, 40), rng.integers(0, 3, 300)
    dist = rng.random((40, 300)) - 0.2 * (q_ids[:, None] == g_ids[None, :])
    ref = reference_metrics(dist, q_ids, g_ids, q_cams, g_cams)
    out = retrieval_metrics(dist, q_ids, g_ids, q_cams, g_cams)
    assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert out["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)
    assert out["cmc"] == pytest.approx(ref["cmc"])
    # the protocol changes the numbers: same-camera matches are no longer counted
    assert out["mAP"] != pytest.approx(retrieval_metrics(dist, q_ids, g_ids)["mAP"], abs=1e-6)


def test_same_camera_match_is_removed_and_query_skipped():
    dist = np.array([[0.1, 0.5, 0.7], [0.1, 0.2, 0.3]])
    # query 0 (id 1, cam 0): its only match is gallery 0, also cam 0 -> removed -> skipped
    out = retrieval_metrics(dist, [1, 2], [1, 2, 3], query_cams=[0, 0], gallery_cams=[0, 1, 1])
    assert out["num_skipped"] == 1 and out["num_queries"] == 1
    assert out["mAP"] == pytest.approx(0.5)  # query 1: match at rank 2
    with pytest.raises(DomainFMError) as e:
        retrieval_metrics(dist[:1], [1], [1, 2, 3], query_cams=[0], gallery_cams=[0, 1, 1])
    assert str(e.value) == ("the same-camera rule removed every match: each query's player is in the gallery only "
                            "under the query's own camera, and gallery crops of a query's player taken by the "
                            "query's camera do not count. Fix: turn the rule off by giving no query_cams and "
                            "gallery_cams, or add gallery crops from other cameras.")


def test_ties_follow_sklearn_thresholds():
    rng = np.random.default_rng(5)
    q_ids, g_ids = rng.integers(0, 4, 30), rng.integers(0, 4, 50)
    dist = rng.integers(0, 5, (30, 50)).astype(np.float64)  # many ties
    out = retrieval_metrics(dist, q_ids, g_ids)
    ref_ap = [average_precision_score(g_ids == q, -dist[i]) for i, q in enumerate(q_ids) if (g_ids == q).any()]
    assert out["mAP"] == pytest.approx(np.mean(ref_ap), abs=1e-9)
    # a match tied with a non-match ranks after it: rank 2, not 1
    tied = retrieval_metrics(np.array([[0.0, 0.0]]), [1], [2, 1], max_rank=2)
    assert tied["cmc"] == [0.0, 1.0] and tied["mAP"] == pytest.approx(0.5)


def test_accepts_torch_and_string_ids():
    dist = torch.tensor([[0.2, 0.1], [0.3, 0.1]])  # p1 found second, p2 first
    out = retrieval_metrics(dist, np.array(["p1", "p2"]), ["p1", "p2"], max_rank=2)
    assert out["mAP"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["cmc"] == [0.5, 1.0]


def test_bad_inputs_give_clear_errors():
    with pytest.raises(DomainFMError, match="distmat is 2 x 3 but there are 1 query ids"):
        retrieval_metrics(np.zeros((2, 3)), [1], [1, 2, 3])
    with pytest.raises(DomainFMError, match="only one of query and gallery"):
        retrieval_metrics(np.zeros((1, 2)), [1], [1, 2], query_cams=[0])
    with pytest.raises(DomainFMError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 1.0]]), [1], [1, 2])
    with pytest.raises(DomainFMError, match="none of the 2 queries"):
        retrieval_metrics(np.zeros((2, 2)), [5, 6], [1, 2])
