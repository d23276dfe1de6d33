"""Slide-level metrics beside the core's AUC (``domainfm.metrics.roc_auc`` / ``roc_auc_ci``):
balanced accuracy with noise-level ties, the ROC figure, and the printed summary."""

from __future__ import annotations

import numpy as np


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


def summary(metrics: dict) -> dict:
    """The printed summary of slide-biomarker metrics: every scalar, an AUC followed by its interval
    (``"0.8125 (95% CI 0.700-0.910)"`` when ``<key>_ci`` holds ``[lo, hi]``); other lists and dicts
    (the constant-prediction names) left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (list, dict)):
            continue
        ci = metrics.get(f"{key}_ci")
        if isinstance(value, float) and isinstance(ci, list) and len(ci) == 2:
            value = f"{value:.4f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        out[key] = value
    return out
