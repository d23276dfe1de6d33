"""Cross-validated MIL ensembles (the Phikon-v2 downstream recipe) and the one-shot baseline.

One member per (fold, seed): trained on the other folds with early stopping on its own validation
fold. The ensemble averages member probabilities. The one-shot model is trained once on all
training slides for the members' median best epoch count, so the ensemble's gain is measured.
Bags are sampled to at most ``max_tiles`` tiles per step in training; prediction uses every tile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from domainfm.metrics import roc_auc
from plugins.histo.mil import MILEnsemble, build_mil


@dataclass
class TrainSettings:
    model: str = "abmil"
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    max_tiles: int = 5000
    patience: int = 5


@dataclass
class MemberResult:
    fold: int
    seed: int
    state: dict
    best_epoch: int              # 0-based epoch whose weights were kept
    val_idx: np.ndarray
    val_probs: np.ndarray        # [n_val, C] at the kept epoch
    history: list[dict] = field(default_factory=list)
    val_auc: float = float("nan")
    ext_probs: np.ndarray | None = None   # [n_external, C] when an external cohort is given
    ext_auc: float = float("nan")

    def summary(self) -> dict:
        return {"fold": self.fold, "seed": self.seed, "best_epoch": self.best_epoch, "val_auc": self.val_auc,
                "external_auc": self.ext_auc}


def _sample(bag: np.ndarray, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    if max_tiles and len(bag) > max_tiles:
        return bag[np.sort(rng.choice(len(bag), size=max_tiles, replace=False))]
    return bag


class small_work_threads:
    """Run small bags on one CPU thread: for a few thousand multiply-adds per step, OpenMP
    hand-offs cost more than they save (30x slower with 2 threads on a busy machine)."""

    def __init__(self, bags: list[np.ndarray], max_tiles: int, limit: int = 1 << 20):
        n = max((min(len(b), max_tiles or len(b)) * b.shape[1] for b in bags), default=0)
        self.small = n < limit

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.small:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1: a minority class counts as much as the majority."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(w, dtype=torch.float32)


@torch.no_grad()
def predict(model: torch.nn.Module, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities [n, C] and per-tile weights of each bag (all tiles, eval mode)."""
    with small_work_threads(bags, 0):
        return _predict(model, bags)


def _predict(model, bags):
    model.eval()
    probs, attns = [], []
    for bag in bags:
        out, a = model(torch.from_numpy(np.ascontiguousarray(bag, np.float32)))
        # an ensemble already averages probabilities; a single model gives logits
        probs.append((out if isinstance(model, MILEnsemble) else torch.softmax(out, -1)).numpy())
        attns.append(a.numpy())
    return np.stack(probs), attns


def train_one(bags: list[np.ndarray], labels: np.ndarray, train_idx: np.ndarray, n_classes: int,
              settings: TrainSettings, seed: int, *, val_idx: np.ndarray | None = None,
              epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None):
    """Train one model; with ``val_idx`` keep the epoch of lowest validation loss (early stopping).

    Returns (state_dict, best_epoch, val_probs or None, history).
    """

    with small_work_threads(bags, settings.max_tiles):
        return _train_one(bags, labels, train_idx, n_classes, settings, seed, val_idx=val_idx, epochs=epochs,
                          on_epoch=on_epoch)


def _train_one(bags, labels, train_idx, n_classes, settings, seed, *, val_idx, epochs, on_epoch):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim = bags[int(train_idx[0])].shape[1]
    model = build_mil(settings.model, in_dim, n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    weights = class_weights(labels[train_idx], n_classes)
    n_epochs = epochs if epochs is not None else settings.epochs
    best = (float("inf"), -1, None, None)
    bad, history = 0, []
    for epoch in range(n_epochs):
        model.train()
        total = 0.0
        for i in rng.permutation(train_idx):
            bag = torch.from_numpy(np.ascontiguousarray(_sample(bags[i], settings.max_tiles, rng), np.float32))
            logits, _ = model(bag)
            loss = F.cross_entropy(logits[None], torch.tensor([labels[i]]), weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        record = {"epoch": epoch, "train_loss": total / len(train_idx)}
        if val_idx is not None:
            val_probs, _ = predict(model, [bags[i] for i in val_idx])
            val_loss = float(F.nll_loss(torch.log(torch.from_numpy(val_probs).clamp_min(1e-8)),
                                        torch.from_numpy(labels[val_idx]), weight=weights))
            record["val_loss"] = val_loss
            record["val_auc"] = roc_auc(labels[val_idx], val_probs)
            if val_loss < best[0] - 1e-5:
                best = (val_loss, epoch, copy.deepcopy(model.state_dict()), val_probs)
                bad = 0
            else:
                bad += 1
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_idx is not None and bad >= settings.patience:
            break
    if val_idx is None:
        return model.state_dict(), n_epochs - 1, None, history
    return best[2], best[1], best[3], history


def ensemble_from_states(model: str, in_dim: int, n_classes: int, states: list[dict]) -> MILEnsemble:
    ens = MILEnsemble(model, in_dim, n_classes, len(states))
    for member, state in zip(ens.members, states):
        member.load_state_dict(state)
    return ens.eval()


def save_ensemble(directory, model: str, in_dim: int, n_classes: int, states: list[dict], *,
                  class_names: list[str], target: str | None = None, features: dict | None = None,
                  encoder_file=None) -> dict[str, str]:
    """Write the ensemble as the pyfunc model's artifacts: weights.safetensors, config.json, mil.py,
    and ``encoder.safetensors`` when ``encoder_file`` (the tile encoder shipped with the model) is
    given. ``features``: how the tile features were made (:mod:`plugins.histo.recipe`), recorded as
    ``config["features"]``."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from plugins.histo import mil

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ens = ensemble_from_states(model, in_dim, n_classes, states)
    save_file({k: v.detach().contiguous() for k, v in ens.state_dict().items()}, str(d / "weights.safetensors"))
    config = {"model": model, "in_dim": in_dim, "n_classes": n_classes, "n_members": len(states),
              "class_names": list(class_names), "target": target, "features": features}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(mil.__file__, d / "mil.py")
    artifacts = {"weights": str(d / "weights.safetensors"), "config": str(d / "config.json"),
                 "mil_code": str(d / "mil.py")}
    if encoder_file is not None:
        if Path(encoder_file).resolve() != (d / "encoder.safetensors").resolve():
            shutil.copyfile(encoder_file, d / "encoder.safetensors")
        artifacts["encoder"] = str(d / "encoder.safetensors")
    return artifacts
