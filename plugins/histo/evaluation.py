"""Slide-level metrics and plots: AUC with a bootstrap CI, balanced accuracy, ROC curves."""

from __future__ import annotations

import numpy as np

from plugins.histo.ensemble import slide_auc


def auc_ci(y: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC and its 95% percentile-bootstrap interval (binary: the core's ``roc_auc_ci``;
    several classes: macro one-vs-rest AUC, resamples missing a class redrawn)."""
    if probs.shape[1] == 2:
        from domainfm.metrics import roc_auc_ci

        return roc_auc_ci(y, probs[:, 1], n_boot=n_boot, seed=seed)
    auc = slide_auc(y, probs)
    rng = np.random.default_rng(seed)
    stats, n, k = [], len(y), probs.shape[1]
    while len(stats) < n_boot:
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < k:
            continue
        stats.append(slide_auc(y[idx], probs[idx]))
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return auc, float(lo), float(hi)


def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, probs.argmax(1)))


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, dict]], title: str):
    """One ROC panel; ``curves`` are (label, y, positive-class score, matplotlib kwargs)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, y, score, style in curves:
        fpr, tpr, _ = roc_curve(y, score)
        text = f"{label} (AUC {roc_auc_score(y, score):.3f})" if label else None
        ax.plot(fpr, tpr, label=text, **style)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig
