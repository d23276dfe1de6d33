"""The story of a registered model: ``domainfm registry list`` and ``domainfm registry show``.

A version registered by :func:`domainfm.jobs.export_and_register` carries the tags
``domainfm.plugin``, ``domainfm.training_run``, ``domainfm.data_root`` and
``domainfm.data_fingerprint``; an evaluation of it (``domainfm evaluate --model models:/...``) adds
``metric.<name>`` tags and ``metric.run_id``; every evaluation and prediction run that applied it is
tagged ``domainfm.model_version = NAME/VERSION``. This module reads those back through
:mod:`domainfm.tracking` (it imports no mlflow itself).
"""

from __future__ import annotations

from typing import Any

from domainfm import tracking
from domainfm.errors import DomainFMError
from domainfm.predict import (DATA_FINGERPRINT_TAG, DATA_ROOT_TAG, METRIC_TAG_PREFIX, MODEL_VERSION_TAG, PLUGIN_TAG,
                              TRAINING_RUN_TAG)

#: Training-run params worth showing in the lineage (when the run logged them).
PARAMS_OF_NOTE = ("backbone", "init", "weights", "img_size", "max_steps", "max_epochs", "batch_size", "lr",
                  "mask_ratio", "data", "register", "alias")


def short_fingerprint(fp: str | None, n: int = 12) -> str:
    """``sha256:0123456789ab`` (the first ``n`` hex digits) of a fingerprint; other values as given."""
    if not fp:
        return ""
    algo, sep, digest = fp.partition(":")
    return f"{algo}:{digest[:n]}" if sep and algo == "sha256" else fp


def version_metrics(tags: dict[str, str]) -> dict[str, str]:
    """``{metric: value}`` of a version's ``metric.*`` tags (``run_id`` left out)."""
    return {k[len(METRIC_TAG_PREFIX):]: v for k, v in sorted(tags.items())
            if k.startswith(METRIC_TAG_PREFIX) and k != f"{METRIC_TAG_PREFIX}run_id"}


#: Name parts of the metrics `registry list` shows (the rest stay in `registry show`): the headline
#: scores, not per-class APs, counts or the chance level.
HEADLINE = ("mAP", "auc", "AUC", "rank1", "acc", "rankme", "mINP")
NOT_HEADLINE = ("_AP_", "chance", "micro", "bands_", "feature_dim", "_ci", "_lo", "_hi")


def headline_metrics(metrics: dict[str, str], n: int = 4) -> dict[str, str]:
    """At most ``n`` headline scores of ``metrics`` (names containing one of :data:`HEADLINE` and
    none of :data:`NOT_HEADLINE`), for the one-line-per-version `registry list`."""
    out = {k: v for k, v in metrics.items()
           if any(h in k for h in HEADLINE) and not any(x in k for x in NOT_HEADLINE)
           and not k.startswith(("n_", "num_"))}
    return dict(list(out.items())[:n])


def list_rows(name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, training run, data root with a short
    fingerprint, and the latest evaluation's metrics (from the version's tags)."""
    rows = []
    for r in tracking.list_registered(name):
        tags = r["tags"]
        data = tags.get(DATA_ROOT_TAG, "")
        if tags.get(DATA_FINGERPRINT_TAG):
            data = f"{data} ({short_fingerprint(tags[DATA_FINGERPRINT_TAG])})".strip()
        metrics = headline_metrics(version_metrics(tags))
        rows.append({"name": r["name"], "version": r["version"], "aliases": r["aliases"],
                     "plugin": tags.get(PLUGIN_TAG, ""), "training_run": tags.get(TRAINING_RUN_TAG) or r["run_id"] or "",
                     "data": data, "metrics": ", ".join(f"{k}={v}" for k, v in metrics.items()),
                     "created": r["created"]})
    return rows


def _ref_uri(ref: str) -> str:
    """``models:/`` URI of ``NAME``, ``NAME@ALIAS``, ``NAME/VERSION`` (or such a URI itself)."""
    return ref if ref.startswith("models:/") else f"models:/{ref}"


def lineage(ref: str) -> dict[str, Any]:
    """Everything the store knows of the version ``ref`` (``NAME``: its latest version,
    ``NAME@ALIAS``, ``NAME/VERSION``): ``version`` (name, version, aliases, created, tags),
    ``training`` (run id, name, plugin, backbone, start weights, params of note; None when the run
    is gone), ``data`` (root, fingerprint), ``metrics`` (latest evaluation, from the version's tags)
    and ``runs``: every evaluation and prediction run tagged with this version (newest first), each
    with its command, name, id, experiment id and metrics. DomainFMError for an unknown ref."""
    mv = tracking.model_version(_ref_uri(ref))
    tags = dict(mv.tags or {})
    label = f"{mv.name}/{mv.version}"
    train_id = tags.get(TRAINING_RUN_TAG) or mv.run_id
    training = None
    run = tracking.get_run(train_id) if train_id else None
    if run is not None:
        params = run.data.params
        rtags = run.data.tags
        start = params.get("weights") if params.get("weights") not in (None, "None") else params.get("init")
        training = {"run_id": train_id, "run_name": run.info.run_name, "command": rtags.get("domainfm.command", ""),
                    "plugin": rtags.get(PLUGIN_TAG, tags.get(PLUGIN_TAG, "")),
                    "backbone": rtags.get("domainfm.backbone") or params.get("backbone", ""),
                    "start_weights": start or "",
                    "params": {k: params[k] for k in PARAMS_OF_NOTE if k in params and params[k] != "None"}}
    runs = []
    for r in tracking.search_runs_by_tag(MODEL_VERSION_TAG, label):
        runs.append({"command": r.data.tags.get("domainfm.command", ""), "run_name": r.info.run_name,
                     "run_id": r.info.run_id, "experiment_id": r.info.experiment_id,
                     "metrics": dict(sorted(r.data.metrics.items()))})
    return {"version": {"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []),
                        "plugin": tags.get(PLUGIN_TAG, ""), "source_run": mv.run_id, "tags": tags},
            "training": training,
            "data": {"root": tags.get(DATA_ROOT_TAG, ""), "fingerprint": tags.get(DATA_FINGERPRINT_TAG, "")},
            "metrics": version_metrics(tags), "metrics_run": tags.get(f"{METRIC_TAG_PREFIX}run_id", ""),
            "runs": runs}


def lineage_lines(info: dict[str, Any]) -> list[str]:
    """:func:`lineage` as the lines ``domainfm registry show`` prints."""
    v = info["version"]
    out = [f"models:/{v['name']}/{v['version']}"
           + (f"  aliases: {', '.join('@' + a for a in v['aliases'])}" if v["aliases"] else "  (no alias)"),
           f"  plugin: {v['plugin'] or '(not recorded)'}"]
    t = info["training"]
    if t is None:
        out.append(f"  training run: {v['source_run'] or '(not recorded)'} (not in this store)")
    else:
        out.append(f"  training run: {t['run_name']} ({t['run_id']}) {t['command']}".rstrip())
        out.append(f"    backbone: {t['backbone']}  start weights: {t['start_weights'] or '(not recorded)'}")
        if t["params"]:
            out.append("    params: " + ", ".join(f"{k}={p}" for k, p in t["params"].items()))
    d = info["data"]
    out.append(f"  data: {d['root'] or '(not recorded)'}" + (f"  fingerprint: {d['fingerprint']}" if d["fingerprint"] else ""))
    if info["metrics"]:
        out.append("  latest metrics: " + ", ".join(f"{k}={m}" for k, m in info["metrics"].items())
                   + (f" (run {info['metrics_run']})" if info["metrics_run"] else ""))
    if not info["runs"]:
        out.append("  evaluations and predictions: none yet")
    else:
        out.append(f"  evaluations and predictions ({len(info['runs'])}):")
        for r in info["runs"]:
            ms = ", ".join(f"{k}={m:.4g}" for k, m in r["metrics"].items())
            out.append(f"    {r['command'] or 'run'} {r['run_name']} ({r['run_id']})" + (f": {ms}" if ms else ""))
    return out


def show(ref: str) -> list[str]:
    """The lines of ``domainfm registry show REF``; DomainFMError for an unknown ref."""
    if not ref or ref.startswith("@") or ref.startswith("/"):
        raise DomainFMError(f"{ref!r} names no registered model", fix="use NAME, NAME@ALIAS or NAME/VERSION")
    return lineage_lines(lineage(ref))
