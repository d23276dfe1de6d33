"""The pretraining health monitor (issue 12, 1): its figures against hand computations, the held-out
split, step-0 values equal to a direct evaluation of the starting weights, and the collapse guard
on a run with a learning rate far too high."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_make_data, run_cli

# ---------------------------------------------------------------- the figures, by hand


def test_rankme_is_exp_entropy_of_normalised_singular_values():
    from domainfm.metrics import rankme

    # singular values 3 and 1: p = (3/4, 1/4); H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351446
    z = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert rankme(z, eps=0.0) == pytest.approx(math.exp(0.5623351446188083), rel=1e-9)
    assert rankme(z) == pytest.approx(1.7548, abs=1e-3)  # eps = 1e-7 moves it by ~1e-6
    # a rotation changes no singular value; 4 equal ones give rank 4; one direction gives rank 1
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    assert rankme(q @ np.diag([3.0, 1.0, 0, 0, 0]), eps=0.0) == pytest.approx(math.exp(0.5623351446188083))
    assert rankme(np.eye(4), eps=0.0) == pytest.approx(4.0)
    assert rankme(np.outer(np.arange(1, 7), [1.0, 2.0, -1.0]), eps=0.0) == pytest.approx(1.0)


def test_feature_std_of_normalised_features_by_hand():
    from domainfm.metrics import feature_std

    # rows normalise to (1, 0) and (0, 1): each dimension holds {1, 0}, population std 1/2
    assert feature_std(np.array([[5.0, 0.0], [0.0, 0.2]])) == pytest.approx(0.5)
    # every row the same direction: collapsed
    assert feature_std(np.array([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])) == pytest.approx(0.0, abs=1e-12)


def test_knn_leave_one_out_and_groups_by_hand():
    from domainfm.metrics import knn_quality, knn_scores

    # two tight pairs on orthogonal axes; labels follow the pairs
    z = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    s = knn_scores(z, y, k=1)
    np.testing.assert_allclose(s, y)  # each sample's nearest other is its pair
    assert knn_quality(z, y, k=1) == ("knn_acc", 1.0)
    # the pairs as groups: neighbours of one's own group are left out, so each finds the other axis
    s = knn_scores(z, y, k=1, groups=[0, 0, 1, 1])
    np.testing.assert_allclose(s, 1 - y)
    assert knn_quality(z, y, k=1, groups=["a", "a", "b", "b"]) == ("knn_acc", 0.0)
    # multi-label: macro mAP of the scores (ranking of the two classes is perfect here)
    y2 = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=float)
    name, value = knn_quality(z, y2, k=1)
    assert name == "knn_map" and 0.0 < value <= 1.0


def test_held_out_split_keeps_groups_together_and_leaves_pretraining_data():
    from domainfm.errors import DomainFMError
    from domainfm.monitor import held_out_indices

    labelled = list(range(0, 40, 2))  # 20 labelled samples
    groups = [i // 8 for i in labelled]  # 5 groups of 4
    held = held_out_indices(labelled, 0.3, groups=groups, seed=1)
    assert held == held_out_indices(labelled, 0.3, groups=groups, seed=1)  # drawn the same each time
    assert set(held) <= set(labelled) and len(held) == 8  # two whole groups reach 6 = 0.3 x 20
    picked = {i // 8 for i in held}
    assert all((i in held) == (i // 8 in picked) for i in labelled)  # a group is all in or all out
    assert held_out_indices(labelled, 0.3, seed=1) != held_out_indices(labelled, 0.3, seed=2)
    assert len(held_out_indices(list(range(10)), 0.1)) == 4  # at least 4
    assert held_out_indices([0, 1, 2], 0.5, groups=[7, 7, 7]) == []  # one group: nothing to hold out
    # min_groups: one group of 8 reaches the fraction, but two groups are asked for
    big = [0] * 8 + [1] * 4 + [2] * 4
    assert len({big[i] for i in held_out_indices(range(16), 0.25, groups=big, seed=0, min_groups=2)}) == 2
    assert held_out_indices(range(4), 0.25, groups=[0, 0, 1, 1], min_groups=2) == []  # would take every group
    with pytest.raises(DomainFMError, match="--val-fraction must be in"):
        held_out_indices(labelled, 1.0)


def test_collapse_rule_and_warning_line():
    from domainfm.monitor import collapse_reasons, resolve_every, warning_line

    start = {"rankme": 40.0, "knn_map": 0.60}
    assert collapse_reasons({"rankme": 21.0, "knn_map": 0.51}, start, rankme_fraction=0.5, knn_drop=0.1) == []
    assert collapse_reasons({"rankme": 19.9, "knn_map": 0.51}, start, rankme_fraction=0.5, knn_drop=0.1) == [
        "RankMe below 0.5 x its step-0 value"]
    why = collapse_reasons({"rankme": 30.0, "knn_map": 0.45}, start, rankme_fraction=0.5, knn_drop=0.1)
    assert why == ["k-NN fell by more than 0.1"]
    line = warning_line(8, {"rankme": 30.0, "knn_map": 0.45}, start, why)
    assert "\n" not in line and line.startswith("warning: representation collapse at step 8: RankMe 30.00 "
                                                "(step 0: 40.00), k-NN mAP 0.450 (step 0: 0.600)")
    assert resolve_every(None, 100) == 20 and resolve_every(None, 3) == 1 and resolve_every(0, 100) == 0


# ---------------------------------------------------------------- in a real run


def _save_tiny(path, in_chans):
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("vit_tiny_patch16_224", in_chans=in_chans, img_size=32, init="random"), path)


def _history(uri, run_id, key):
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


@pytest.mark.timeout(900)
def test_step0_values_equal_a_direct_evaluation_of_the_starting_weights(tmp_path, mlflow_store):
    from domainfm.backbones import create_backbone
    from domainfm.config import RunConfig
    from domainfm.metrics import feature_std, knn_quality, rankme
    from domainfm.plugins import load

    root = load_make_data("eo_sar").write_dataset(tmp_path / "root", n_patches=16, modalities=("s2",))
    plugin = load("eo-sar")
    options = {o.name: o.default for o in plugin.options("pretrain")}
    cfg = RunConfig(plugin="eo-sar", data=str(root), backbone="vit_tiny_patch16_224", img_size=32, batch_size=4,
                    val_fraction=0.25, seed=0, options=options)
    weights = _save_tiny(tmp_path / "start.safetensors", plugin.in_chans(cfg))
    out = tmp_path / "o.json"
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--data", str(root), "--weights", str(weights), "--backbone",
                 "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "4", "--proj-dim", "16",
                 "--max-steps", "2", "--val-every", "1", "--val-fraction", "0.25", "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads(out.read_text())["mlflow_run_id"]
    logged = {k: _history(mlflow_store, run_id, f"monitor/{k}") for k in ("rankme", "feature_std", "knn_map")}
    assert all(sorted(h) == [0, 1, 2] for h in logged.values()), logged  # step 0 first, then every step

    # the same held-out split, drawn directly, and the starting weights evaluated on it
    dm = plugin.pretrain_datamodule(cfg)
    n_all = len(dm.dataset)
    held = plugin.monitor_dataset(cfg, dm)
    held_ids = [f.patch_id for f in held.dataset.files]
    assert len(held_ids) == 4 and n_all == 16 and len(dm.dataset) == 12
    assert not set(held_ids) & set(dm.dataset.patch_ids)  # pretraining never sees them
    samples = [held.dataset[i] for i in range(len(held.dataset))]
    backbone = create_backbone(str(weights)).eval()
    with torch.no_grad():
        feats = backbone(torch.stack([s["image"] for s in samples])).numpy()
    labels = np.stack([s["labels"].numpy() for s in samples])
    assert logged["rankme"][0] == pytest.approx(rankme(feats), rel=1e-4)
    assert logged["feature_std"][0] == pytest.approx(feature_std(feats), rel=1e-4)
    assert logged["knn_map"][0] == pytest.approx(knn_quality(feats, labels, groups=held_ids)[1], rel=1e-4)
    # training moved the teacher, and the curve shows it
    assert logged["rankme"][2] != pytest.approx(logged["rankme"][0], rel=1e-6)


TOY = ["--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "8", "--num-samples", "16",
       "--proj-dim", "16", "--warmup-steps", "0", "--weight-decay", "0", "--max-steps", "6", "--val-every", "2"]


@pytest.mark.timeout(900)
def test_a_learning_rate_far_too_high_trips_the_collapse_guard_and_stops_there(tmp_path, toy_env):
    from safetensors.torch import load_file

    weights = _save_tiny(tmp_path / "start.safetensors", 4)
    out = tmp_path / "o.json"
    r = run_cli(["pretrain", "--plugin", "toy", *TOY, "--weights", str(weights), "--lr", "1.0", "--checkpoint-every",
                 "2", "--stop-on-collapse", "--json", str(out)], cwd=tmp_path, env=toy_env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    at = result["monitor_collapsed_at_step"]
    warnings = [line for line in r.stderr.splitlines() if "representation collapse" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: representation collapse at step {at}: RankMe "), \
        r.stderr
    assert at in (2, 4, 6) and result["global_step"] == at  # the run ended at the collapse
    rank = _history(toy_env["MLFLOW_TRACKING_URI"], result["mlflow_run_id"], "monitor/rankme")
    assert sorted(rank) == list(range(0, at + 1, 2))
    assert rank[at] < 0.5 * rank[0] and all(rank[s] >= 0.5 * rank[0] for s in rank if s < at)
    # the export is the teacher of the last healthy evaluation: the starting weights at step 0, else
    # the teacher in that step's checkpoint
    good = at - 2
    if good == 0:
        want = load_file(str(weights))
    else:
        ckpt = torch.load(Path(result["backbone_path"]).parent / "checkpoints" / f"step{good:06d}.ckpt",
                          weights_only=True)
        prefix = "teacher.backbone.model."
        want = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    exported = load_file(result["backbone_path"])
    assert sorted(want) == sorted(exported) and all(torch.equal(want[k], exported[k]) for k in want)


@pytest.mark.timeout(900)
def test_a_sane_learning_rate_does_not_trip_the_guard(tmp_path, toy_env):
    weights = _save_tiny(tmp_path / "start.safetensors", 4)
    out = tmp_path / "o.json"
    r = run_cli(["pretrain", "--plugin", "toy", *TOY, "--weights", str(weights), "--lr", "1e-4",
                 "--stop-on-collapse", "--json", str(out)], cwd=tmp_path, env=toy_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "representation collapse" not in r.stderr
    result = json.loads(out.read_text())
    assert result["monitor_collapsed_at_step"] is None and result["global_step"] == 6
    assert sorted(_history(toy_env["MLFLOW_TRACKING_URI"], result["mlflow_run_id"], "monitor/rankme")) == [0, 2, 4, 6]


def test_without_a_held_out_split_rankme_and_std_run_on_training_images_from_step_0():
    """A plugin with no monitor_dataset: the monitor embeds the teacher views of the training
    dataset; step 0 equals the starting teacher evaluated directly on them, and no k-NN is made up."""
    import copy

    from domainfm.metrics import feature_std, rankme
    from domainfm.monitor import HealthMonitor
    from test_pretrain_task import FixedBatches, fit, make_task

    task = make_task(lr=1e-4, mask_ratio=0.5)
    start = copy.deepcopy(task.teacher.backbone).eval()
    data = FixedBatches(n=16, labels=torch.zeros(16, 4))
    monitor = HealthMonitor(None, every=2)
    fit(task, data, 4, [monitor])
    assert [s for s, _ in monitor.history] == [0, 2, 4]
    step0 = monitor.history[0][1]
    assert set(step0) == {"rankme", "feature_std"}
    with torch.no_grad():
        feats = start(data.teacher).numpy()
    assert step0["rankme"] == pytest.approx(rankme(feats), rel=1e-5)
    assert step0["feature_std"] == pytest.approx(feature_std(feats), rel=1e-5)
    assert monitor.collapsed_at is None
