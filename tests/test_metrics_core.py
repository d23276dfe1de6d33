"""multilabel_average_precision and roc_auc_ci against values computed by hand and by sklearn."""

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
