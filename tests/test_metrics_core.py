"""multilabel_average_precision and roc_auc_ci (binary and macro one-vs-rest) against values computed by hand and by sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from domainfm.errors import DomainFMError
from domainfm.metrics import multilabel_average_precision, roc_auc_ci


def test_multilabel_ap_by_hand():
    # class 0: ranking 0.9(+), 0.8(-), 0.1(+) -> AP = (1/1 + 2/3) / 2
    # class 1: one positive ranked first -> AP = 1; class 2: no positive -> NaN, left out of macro
    scores = np.array([[0.9, 0.7, 0.2], [0.8, 0.1, 0.3], [0.1, 0.2, 0.4]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    out = multilabel_average_precision(scores, targets)
    assert out["per_class"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["per_class"][1] == pytest.approx(1.0)
    assert math.isnan(out["per_class"][2])
    assert out["macro"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    # micro pools the 9 pairs: positives 0.9, 0.7, 0.1 among 0.9 .8 .7 .4 .3 .2 .2 .1 .1
    assert 0 < out["micro"] < 1


def test_auc_ci_contains_auc_and_is_seeded():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40), np.ones(40)]
    p = y + rng.normal(0, 0.8, 80)
    auc, lo, hi = roc_auc_ci(y, p, n_boot=300, seed=3)
    assert lo < auc < hi and 0.5 < auc < 1
    assert roc_auc_ci(y, p, n_boot=300, seed=3) == (auc, lo, hi)
    # AUC by hand: fraction of (pos, neg) pairs ranked right
    pos, neg = p[y == 1], p[y == 0]
    assert auc == pytest.approx((pos[:, None] > neg[None, :]).mean())


def test_auc_one_class_is_clear():
    with pytest.raises(DomainFMError, match="both classes"):
        roc_auc_ci([1, 1, 1], [0.2, 0.3, 0.4])


def _hand_bootstrap(y, p, n_boot, seed, level=0.95):
    """The percentile bootstrap written out: sklearn's AUC of each resample, numpy's percentile."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n, k = len(y), len(np.unique(y))
    stats = []
    while len(stats) < n_boot:
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < k:
            continue
        if p.ndim == 1:
            stats.append(roc_auc_score(y[idx], p[idx]))
        else:
            stats.append(roc_auc_score(y[idx], p[idx], multi_class="ovr", average="macro",
                                       labels=np.arange(p.shape[1])))
    return np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])


def test_binary_auc_ci_against_sklearn_and_a_hand_run_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    y = (rng.random(50) < 0.3).astype(int)  # unbalanced: resamples with one class get redrawn
    p = rng.normal(0, 1, 50) + y
    auc, lo, hi = roc_auc_ci(y, p, n_boot=200, seed=5)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    exp_lo, exp_hi = _hand_bootstrap(y, p, 200, 5)
    assert (lo, hi) == (pytest.approx(exp_lo, abs=1e-12), pytest.approx(exp_hi, abs=1e-12))
    # two-column probabilities rank by the second column: the same numbers
    probs = np.stack([1 - 1 / (1 + np.exp(-p)), 1 / (1 + np.exp(-p))], 1)
    assert roc_auc_ci(y, probs, n_boot=200, seed=5) == pytest.approx((auc, lo, hi), abs=1e-12)
    # another level: the 5% and 95% quantiles of the same resamples
    _, lo90, hi90 = roc_auc_ci(y, p, n_boot=200, seed=5, level=0.9)
    assert (lo90, hi90) == pytest.approx(tuple(_hand_bootstrap(y, p, 200, 5, level=0.9)), abs=1e-12)
    assert lo <= lo90 <= hi90 <= hi


def test_multiclass_auc_ci_is_macro_one_vs_rest():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet([1, 1, 1], 60)
    p[np.arange(60), y] += 0.5
    p /= p.sum(1, keepdims=True)
    auc, lo, hi = roc_auc_ci(y, p, n_boot=100, seed=0)
    assert auc == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    # macro one-vs-rest by hand: the mean of the three binary AUCs
    assert auc == pytest.approx(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)]), abs=1e-12)
    exp_lo, exp_hi = _hand_bootstrap(y, p, 100, 0)
    assert (lo, hi) == (pytest.approx(exp_lo, abs=1e-12), pytest.approx(exp_hi, abs=1e-12))
    assert lo < auc < hi
