"""Evidence (issue 12, 0b): micro AP is the AP of all (sample, class) pairs pooled, against a hand
computation and scikit-learn's average_precision_score(average="micro")."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from domainfm.metrics import multilabel_average_precision


def test_micro_ap_by_hand():
    # pooled pairs by score: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.2 (neg)
    # precision at each positive: 1/1, 2/3  ->  micro AP = (1 + 2/3) / 2
    scores = np.array([[0.9, 0.8], [0.2, 0.7]])
    targets = np.array([[1, 0], [0, 1]])
    out = multilabel_average_precision(scores, targets)
    assert out["micro"] == pytest.approx((1 + 2 / 3) / 2)
    # per class: class 0's positive ranks first (AP 1), class 1's second (AP 1/2); macro 3/4
    assert out["per_class"] == pytest.approx([1.0, 0.5]) and out["macro"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_ap_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((40, 6)) < 0.3).astype(int)
    targets[0] = 1  # every class has a positive
    scores = rng.random((40, 6)) + 0.5 * targets * rng.random((40, 6))
    out = multilabel_average_precision(scores, targets)
    assert out["micro"] == pytest.approx(average_precision_score(targets, scores, average="micro"), abs=1e-12)
    assert out["macro"] == pytest.approx(average_precision_score(targets, scores, average="macro"), abs=1e-12)
    assert abs(out["micro"] - out["macro"]) > 1e-4  # the two are not the same number here
