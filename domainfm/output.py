"""What a command prints: third-party chatter silenced at its source, the pretrain summary
(each loss from its first to its last logged value, one warning line when the total did not move),
and the one progress bar of long jobs (:func:`progress_bar`).

Only the standard library at import time: the CLI calls :func:`quiet_third_parties` before any
command runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping

#: Relative change of ``loss/total`` (|last - first| / |first|) below which a run "did not move".
STALLED_REL_CHANGE = 1e-3
LOSS_PREFIX = "loss/"

def progress_bar(*columns: Any, enabled: bool = True, transient: bool = True):
    """The progress bar of every long job: a ``rich.progress.Progress`` on stderr (stdout stays
    clean for pipes), with ``columns`` (rich's default columns when none). Disabled, drawing and
    printing nothing, when ``enabled`` is False or stderr is not a terminal: a transient bar
    shows nothing in a log anyway, and rich's Progress ends with an empty line when it is not
    interactive (a stray blank line before the next message). A disabled bar accepts the same
    calls (``add_task``, ``advance``, ``update``), so callers need no second code path."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=transient, disable=not (enabled and console.is_interactive))


# (category, regex matched against the start of the message; MLflow colours its warnings, so the
# pattern allows the ANSI escape before the text)
_WARNINGS = (
    # lightning/pytorch/utilities/_pytree.py builds torch's deprecated LeafSpec (torch >= 2.10)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # MLflow's advice on models-from-code without type hints; our pyfuncs log an explicit signature
    (UserWarning, r".*Add type hints to the `predict` method"),
    (UserWarning, r".*An input example was not provided when logging the model"),
    # torch's TorchScript deprecation, raised on every save/load of an `export --format torchscript`
    # file (torch >= 2.9); the format stays supported by the torch versions we depend on
    (FutureWarning, r"`torch\.jit\.(save|load|trace)` (is deprecated|is not supported in Python 3\.14)"),
)
# Lightning's rank_zero_info logs to whichever of these loggers was bound last (fabric or pytorch)
# the standalone pytorch_lightning / lightning_fabric packages (installed beside lightning, and
# imported by MLflow's PyTorch flavour) log the same lines under their own names
_LIGHTNING_RANK_ZERO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                        "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... litlogger ..."), keeps its other messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("💡 Tip") or "litlogger" in msg)


def quiet_third_parties() -> None:
    """Silence, in this process, the third-party output that tells the user nothing about the run:
    Lightning's third-party logger tip, torch's ``_pytree`` deprecation warning raised from inside
    Lightning, torch's TorchScript (``torch.jit.save``/``load``) deprecation, MLflow's type-hint and
    input-example advice, and MLflow's "Downloading artifacts"
    progress bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``, unless the user set it). Idempotent;
    other warnings and Lightning's own messages are left alone."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LIGHTNING_RANK_ZERO:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def loss_rows(metrics: Mapping[str, Any], spans: Mapping[str, tuple[float, ...]]) -> dict[str, Any]:
    """``metrics`` with each value that has a span (a loss, a health-monitor figure) shown as
    ``"first → last"`` from ``spans`` (its first and last logged value, then optionally their steps);
    other keys keep their value."""
    return {k: (f"{_fmt(spans[k][0])} → {_fmt(spans[k][1])}" if k in spans else v)
            for k, v in metrics.items()}


def stalled_loss_warning(spans: Mapping[str, tuple[float, ...]], *, key: str = "loss/total",
                         rel_tol: float = STALLED_REL_CHANGE) -> str | None:
    """One line when ``key`` moved by less than ``rel_tol`` of its first value (None otherwise, when
    it was not logged, or when it was logged at one step only: ``spans[key]`` is ``(first, last)``
    or ``(first, last, first_step, last_step)``, and one value says nothing about movement): a run
    whose loss never moved looks like any other in a table."""
    if key not in spans:
        return None
    first, last, *steps = spans[key]
    if len(steps) == 2 and steps[0] == steps[1]:
        return None
    change = abs(last - first) / max(abs(first), 1e-12)
    if change >= rel_tol:
        return None
    return (f"{key} did not move ({_fmt(first)} → {_fmt(last)}, a relative change of {change:.1e} < {rel_tol:g}): "
            f"check --lr, --warmup-steps and --max-steps, and that the data's labels and views vary")


def pretrain_summary(metrics: dict[str, Any], spans: Mapping[str, tuple[float, ...]]) -> tuple[dict[str, Any], str | None]:
    """What ``domainfm pretrain`` prints: the metrics with each loss from start to end (``spans``,
    read back from the run's MLflow history by ``tracking.metric_spans``) and the stalled-loss
    warning line, if any."""
    return loss_rows(metrics, spans), stalled_loss_warning(spans)
