"""Slide cohorts for slide-level prediction: tile-feature bags joined with a labels CSV.

``labels.csv`` has ``slide_id,patient_id,label`` (or a column named like ``--target``). Every
mistake that would silently bias a study is an error: duplicate slide ids, labelled slides with
no features, one class only, non-numeric labels for a binary target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainfm.data import read_csv_rows
from domainfm.errors import DomainFMError, expect_file, expect_folder

_LIST_MAX = 8


def _listing(items: list[str]) -> str:
    head = ", ".join(items[:_LIST_MAX])
    return head + (f" and {len(items) - _LIST_MAX} more" if len(items) > _LIST_MAX else "")


@dataclass
class Cohort:
    slide_ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray          # int64 class index per slide
    class_names: list[str]
    feature_files: list[Path]

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def load_bags(self) -> list[np.ndarray]:
        """Every slide's tile features [N, D] (an empty slide is an error: it cannot be predicted)."""
        from rich.progress import track

        from plugins.histo.embedding import read_features

        bags = []
        for sid, p in track(list(zip(self.slide_ids, self.feature_files)), description="reading features",
                            transient=True):
            feats = read_features(p)[0]
            if len(feats) == 0:
                raise DomainFMError(f"slide {sid!r} has no tiles", path=p,
                                    fix="re-embed it with a lower --min-tissue, or drop its label")
            bags.append(feats)
        dims = {b.shape[1] for b in bags}
        if len(dims) > 1:
            raise DomainFMError(f"feature sizes differ between slides ({sorted(dims)})", path=p.parent,
                                fix="embed every slide with the same encoder")
        return bags


def feature_files(features_dir: str | Path) -> dict[str, Path]:
    """{slide_id: path} of ``DIR/features/*.h5`` (``histo embed --out DIR``) or ``DIR/*.h5``."""
    d = Path(features_dir)
    expect_folder(d, "--features", missing="features folder not found", fix="give the --out folder of `domainfm histo embed`")
    sub = d / "features"
    files = sorted((sub if sub.is_dir() else d).glob("*.h5"))
    if not files:
        raise DomainFMError("no .h5 feature files here", path=d, fix="run `domainfm histo embed SLIDES --out DIR` first")
    return {f.stem: f for f in files}


def _label_column(fieldnames: list[str], target: str | None) -> str:
    if target and target in fieldnames:
        return target
    if "label" in fieldnames:
        return "label"
    wanted = f"`label` or `{target}`" if target else "`label`"
    raise DomainFMError(f"the labels CSV has no {wanted} column (columns: {', '.join(fieldnames)})",
                        fix="name the label column `label`, or pass its name as --target")


def read_labels(path: str | Path, target: str | None = None) -> tuple[list[dict[str, str]], str]:
    """Rows with slide_id, patient_id and the label (empty labels skipped), and the label column."""
    path = Path(path)
    expect_file(path, "--labels", missing="labels CSV not found", fix="give a CSV with columns slide_id,patient_id,label")
    # the core's one CSV reader: Excel's BOM, CRLF and spaces around names are read as meant
    rows = read_csv_rows(path, ("slide_id", "patient_id"), what="labels CSV",
                         fix="use the header slide_id,patient_id,label")
    try:
        column = _label_column(rows.columns, target)
    except DomainFMError as e:
        raise DomainFMError(str(e).rstrip("."), path=path) from None
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["slide_id"]] = seen.get(r["slide_id"], 0) + 1
    dups = sorted(s for s, n in seen.items() if n > 1)
    if dups:
        raise DomainFMError(f"duplicate slide ids: {_listing(dups)}", path=path,
                            fix="keep one row per slide (several slides of a patient share the patient_id instead)")
    rows = [r for r in rows if r.get(column, "") != ""]
    if not rows:
        raise DomainFMError(f"no labelled slide in column {column!r}", path=path)
    return rows, column


def encode_labels(values: list[str], path: str | Path, column: str,
                  class_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class indices and names. Two classes must be numbers (the larger is the positive class)."""
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted(set(values) - set(index), key=str)
        if unknown:
            # numbers written differently ("1.0" vs "1") are the same class
            def canon(v):
                try:
                    return str(float(v))
                except ValueError:
                    return v
            cindex = {canon(c): i for c, i in index.items()}
            still = sorted({v for v in values if canon(v) not in cindex})
            if still:
                raise DomainFMError(f"labels {_listing(still)} in column {column!r} are not among the training "
                                    f"classes {', '.join(class_names)}", path=path)
            return np.array([cindex[canon(v)] for v in values], np.int64), class_names
        return np.array([index[v] for v in values], np.int64), class_names
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise DomainFMError(f"column {column!r} has a single class ({distinct[0]!r})", path=path,
                            fix="a slide-level model needs slides of at least two classes")
    numeric = {}
    for v in distinct:
        try:
            numeric[v] = float(v)
        except ValueError:
            pass
    if len(distinct) == 2 and len(numeric) < 2:
        bad = [v for v in distinct if v not in numeric]
        raise DomainFMError(f"binary target {column!r} has non-numeric labels ({', '.join(map(repr, bad))})",
                            path=path, fix="write the negative class as 0 and the positive class as 1")
    if len(numeric) == len(distinct):
        distinct = sorted(distinct, key=lambda v: numeric[v])
        names = [format(numeric[v], "g") for v in distinct]
    else:
        names = distinct
    index = {v: i for i, v in enumerate(distinct)}
    return np.array([index[v] for v in values], np.int64), names


def load_cohort(features_dir: str | Path, labels_csv: str | Path, target: str | None = None,
                class_names: list[str] | None = None) -> Cohort:
    rows, column = read_labels(labels_csv, target)
    files = feature_files(features_dir)
    missing = [r["slide_id"] for r in rows if r["slide_id"] not in files]
    if missing:
        raise DomainFMError(f"{len(missing)} labelled slide(s) have no features in {features_dir}: {_listing(missing)}",
                            path=labels_csv, fix="embed those slides, or remove their rows from the labels CSV")
    labels, names = encode_labels([r[column] for r in rows], labels_csv, column, class_names)
    return Cohort([r["slide_id"] for r in rows], [r["patient_id"] or r["slide_id"] for r in rows], labels, names,
                  [files[r["slide_id"]] for r in rows])


def patient_folds(labels: np.ndarray, patients: list[str], n_folds: int, seed: int = 0,
                  labels_csv: str | Path | None = None,
                  class_names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds where all slides of a patient fall in the same fold.

    Every validation fold must hold every class, else its AUC and early stopping mean nothing:
    each class needs at least ``n_folds`` patients, checked here before any split or training
    (the error names the class and the largest ``--folds`` the cohort allows).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_patients = len(set(patients))
    if n_folds < 2:
        raise DomainFMError(f"--folds must be at least 2, got {n_folds}", fix="use --folds 2 or more")
    n_classes = int(labels.max()) + 1
    names = class_names or [str(c) for c in range(n_classes)]
    per_class = [len({p for p, lab in zip(patients, labels) if lab == c}) for c in range(n_classes)]
    fewest = int(np.argmin(per_class))
    allowed = per_class[fewest]
    if allowed < n_folds:
        n_slides = int((labels == fewest).sum())
        fix = (f"use --folds {allowed} (the most this cohort allows), or add patients of class {names[fewest]}"
               if allowed >= 2 else
               f"add patients of class {names[fewest]}: cross-validation needs at least 2 patients per class")
        raise DomainFMError(f"class {names[fewest]} has {allowed} patient(s) ({n_slides} slide(s)) but --folds "
                            f"{n_folds} needs at least {n_folds}, one in each validation fold", path=labels_csv,
                            fix=fix)
    if n_patients < n_folds:
        raise DomainFMError(f"{n_patients} patients cannot fill {n_folds} folds", path=labels_csv,
                            fix="lower --folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = list(splitter.split(np.zeros(len(labels)), labels, groups=np.asarray(patients)))
    for k, (train_idx, val_idx) in enumerate(folds):
        for part, idx in (("validation", val_idx), ("training", train_idx)):
            present = np.unique(labels[idx])
            if len(present) < n_classes:
                raise DomainFMError(f"fold {k + 1} of {n_folds} has a {part} part with only class(es) "
                                    f"{', '.join(names[int(c)] for c in present)} (patients with slides of "
                                    f"several classes cannot be spread evenly)", path=labels_csv,
                                    fix="lower --folds, or add slides of the rare class")
    return folds


def check_external(external: Cohort, class_names: list[str], labels_csv: str | Path | None = None) -> None:
    """An external cohort is scored by AUC against every training class: it must hold them all."""
    present = sorted(set(int(c) for c in external.labels))
    if len(present) < len(class_names):
        absent = [class_names[c] for c in range(len(class_names)) if c not in present]
        only = ", ".join(class_names[c] for c in present)
        raise DomainFMError(f"the external cohort has only class(es) {only} (none of {', '.join(absent)}): "
                            f"its AUC is undefined", path=labels_csv,
                            fix=f"add external slides of class {', '.join(absent)}, or drop --external-features "
                                f"and --external-labels")
