"""The probes of ``evaluate``: how much land cover do frozen features know?

- linear: standardised features, one-vs-rest logistic regression (sklearn) for multi-label sets,
  multinomial for single-label ones;
- kNN: the ``k`` most cosine-similar training patches vote with weights ``exp(sim / T)``; a
  class's score is the weighted share of neighbours carrying it.

Plus the seeded splits they use. Pure functions of arrays; the jobs are in :mod:`plugins.eo_sar.jobs`.
"""

from __future__ import annotations

import numpy as np

from domainfm.errors import DomainFMError

KNN_TEMPERATURE = 0.07  # as in DINO's kNN evaluation: sharp enough that close neighbours dominate
MIN_LABELLED = 6


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random train/test split of ``range(n)`` (both parts non-empty, sorted)."""
    if n < 2:
        raise DomainFMError(f"need at least 2 labelled patches to split into train and test, got {n}")
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int,
               temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Multi-label kNN scores [n_test, K] in [0, 1] from cosine neighbours (see module doc)."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(test_x) @ unit(train_x).T  # [n_test, n_train]
    k = min(k, sim.shape[1])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sim, idx, axis=1)
    weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)  # shifted: no overflow
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkc->nc", weights, np.asarray(train_y, dtype=np.float64)[idx])


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, seed: int = 0,
                        c: float = 1.0) -> np.ndarray:
    """Probabilities [n_test, K] of one-vs-rest logistic regressions on standardised features.
    A class constant over the training set gets that constant as its score."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(),
                          OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "label not present in all training examples": handled
        model.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y, dtype=np.int64))
    return model.predict_proba(np.asarray(test_x, dtype=np.float64))


def subsample(indices, fraction: float, seed: int) -> list[int]:
    """A seeded share ``fraction`` of ``indices`` (at least one), in the original order."""
    indices = list(indices)
    if fraction >= 1.0 or not indices:
        return indices
    n = max(1, int(round(len(indices) * fraction)))
    keep = np.random.default_rng(seed).choice(len(indices), n, replace=False)
    return [indices[i] for i in sorted(keep)]


def multiclass_linear_probe(train_x, train_y, test_x, *, seed: int = 0, c: float = 1.0) -> np.ndarray:
    """Class predictions of a multinomial logistic regression on standardised features."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(np.asarray(train_y).tolist())) == 1:  # one class seen: that is the only answer
        return np.full(len(test_x), int(train_y[0]))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(np.asarray(train_x, np.float64), np.asarray(train_y))
    return model.predict(np.asarray(test_x, np.float64))


def confusion_matrix(true, pred, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts, rows = true class, columns = predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true, int), np.asarray(pred, int)), 1)
    return cm
