"""Shared helpers of the claim scripts: run the `domainfm` CLI, intervals, the results table, plots.

Every claim script trains small models through the product's public entry points (the `domainfm`
click command, invoked in this process so that torch/Lightning/MLflow are imported once) into a
throw-away MLflow sqlite store, repeats over seeds, and reports one effect per row:

- ``t_interval(diffs)``: mean of per-seed paired differences with a 95 % Student-t interval;
- ``paired_bootstrap(a, b)``: mean of ``a - b`` over paired items with a 95 % percentile interval.

``record(...)`` appends a row to ``RESULTS_JSONL`` (one JSON object per line); ``write_results_md``
turns those rows into ``RESULTS.md``. A verdict is "reproduces" when the interval lies entirely on
the side the paper predicts, "reversed" when entirely on the other side, "inconclusive" otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS_JSONL = HERE / "results.jsonl"
RESULTS_MD = HERE / "RESULTS.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def setup(name: str) -> Path:
    """A fresh work folder for one claim script with its own MLflow sqlite store; returns the folder.

    Sets HF_HUB_OFFLINE (no weights are downloaded) and MLFLOW_TRACKING_URI for every run after it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(os.environ.get("CLAIMS_WORK") or tempfile.mkdtemp(prefix=f"claims-{name}-"))
    work = work / name if os.environ.get("CLAIMS_WORK") else work
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    import torch

    torch.set_num_threads(int(os.environ.get("CLAIMS_THREADS", "1")))
    return work


def cli(args: list[str], *, json_out: Path | None = None) -> dict:
    """Run ``domainfm ARGS`` (the console script's click command) and return its ``--json`` metrics.

    Raises RuntimeError with the command's output when it exits non-zero.
    """
    from click.testing import CliRunner

    from domainfm.cli import main

    args = [str(a) for a in args]
    if json_out is not None:
        args += ["--json", str(json_out)]
    t0 = time.time()
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    if res.exit_code != 0:
        tail = res.output[-3000:]
        raise RuntimeError(f"domainfm {' '.join(args)} exited {res.exit_code}:\n{tail}\n{res.exception!r}")
    print(f"  [{time.time() - t0:5.1f}s] domainfm {' '.join(args[:3])} ...", flush=True)
    return json.loads(Path(json_out).read_text()) if json_out is not None else {}


def load_make_data(name: str):
    """The checked-in test-data generator ``tests/data/<name>/make_data.py`` as a module."""
    import importlib.util

    mod_name = f"claims_make_data_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, REPO / "tests" / "data" / name / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def t_interval(diffs, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t interval over the n items (n >= 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return m, m - half, m + half


def paired_bootstrap(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items and its percentile bootstrap interval (items resampled)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def _verdict(lo: float, hi: float, expect: str = "positive") -> str:
    """reproduces / reversed / inconclusive for an interval and the sign the paper predicts.

    ``expect="none"``: a comparison where no direction is claimed (e.g. cosine vs jaccard):
    "differs" when the interval excludes 0, else "no difference shown".
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not measured"
    if expect == "none":
        return "differs" if (lo > 0 or hi < 0) else "no difference shown"
    sign = 1 if expect == "positive" else -1
    if sign * lo > 0 and sign * hi > 0:
        return "reproduces"
    if sign * lo < 0 and sign * hi < 0:
        return "reversed"
    return "inconclusive"


def record(claim: str, metric: str, effect: tuple[float, float, float], seeds: int, *, expect: str = "positive",
           note: str = "", script: str = "", verdict: str | None = None) -> dict:
    """Print one result row and append it to ``RESULTS_JSONL`` (``verdict`` overrides the computed one)."""
    m, lo, hi = effect
    verdict_ = verdict
    row = {"claim": claim, "metric": metric, "effect": m, "lo": lo, "hi": hi, "seeds": seeds,
           "verdict": verdict_ or _verdict(lo, hi, expect), "note": note, "script": script}
    print(f"{claim} | {metric} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | seeds {seeds} | {row['verdict']}", flush=True)
    with open(RESULTS_JSONL, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def clear_rows(script: str) -> None:
    """Drop earlier rows of ``script`` from ``RESULTS_JSONL`` (a re-run replaces its own rows)."""
    if not RESULTS_JSONL.is_file():
        return
    rows = [json.loads(line) for line in RESULTS_JSONL.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r.get("script") != script]
    RESULTS_JSONL.write_text("".join(json.dumps(r) + "\n" for r in keep))


def write_results_md(minutes: float | None = None, how: str = "") -> str:
    """``RESULTS.md`` from ``RESULTS_JSONL``: one markdown row per measured effect."""
    rows = [json.loads(line) for line in RESULTS_JSONL.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["claim"].split(" ")[0])  # claim number first; stable within a claim
    lines = ["| claim | metric | effect | 95% CI | seeds | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['metric']} | {r['effect']:+.3f} | [{r['lo']:+.3f}, {r['hi']:+.3f}] "
                     f"| {r['seeds']} | {r['verdict']} |")
    notes = [f"- {r['claim']}, {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    head = "# Claims, measured\n\nWritten by `make claims` (`benchmarks/claims/run_all.py`)"
    head += f" in {minutes:.1f} min" if minutes is not None else ""
    head += f". {how}" if how else ""
    text = head + ".\n\n" + "\n".join(lines) + "\n" + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")
    RESULTS_MD.write_text(text)
    return text


def plot_pairs(path: Path, title: str, groups: dict[str, dict[str, list[float]]], ylabel: str) -> None:
    """One panel per group; in each, one line per seed joining the compared conditions (paired view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), squeeze=False)
    for ax, (name, conds) in zip(axes[0], groups.items()):
        labels = list(conds)
        values = np.array([conds[c] for c in labels], dtype=float)  # [conditions, seeds]
        x = np.arange(len(labels))
        for s in range(values.shape[1]):
            ax.plot(x, values[:, s], "o-", color="0.6", lw=1)
        ax.plot(x, values.mean(axis=1), "s-", color="C3", lw=2, label="mean")
        ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
