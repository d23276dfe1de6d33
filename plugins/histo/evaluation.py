"""Slide-level metrics and plots: AUC with a bootstrap CI, balanced accuracy, ROC curves."""

from __future__ import annotations

import numpy as np


def auc_ci(y: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC and its 95% percentile-bootstrap interval of class probabilities [N, C]: the core's
    ``roc_auc_ci`` (binary: the positive column; several classes: macro one-vs-rest; differences
    below floating-point noise are ties, so constant predictions score 0.5)."""
    from domainfm.metrics import roc_auc_ci

    return roc_auc_ci(y, probs, n_boot=n_boot, seed=seed)


def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    from domainfm.metrics import tie_scores

    # noise-level differences between slides are ties here too: constant predictions name one class
    return float(balanced_accuracy_score(y, tie_scores(probs).argmax(1)))


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, dict]], title: str):
    """One ROC panel; ``curves`` are (label, y, positive-class score, matplotlib kwargs)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from domainfm.metrics import roc_auc, tie_scores

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, y, score, style in curves:
        # the same tied scores as the reported AUC: noise draws no staircase
        fpr, tpr, _ = roc_curve(y, tie_scores(score))
        text = f"{label} (AUC {roc_auc(y, score):.3f})" if label else None
        ax.plot(fpr, tpr, label=text, **style)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig
