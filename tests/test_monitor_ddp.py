"""The health monitor under DDP (issue 12, 1): two gloo CPU processes run a real eo-sar pretraining;
the monitor's figures reach MLflow once per evaluation (rank 0 only), its step-0 values equal the
single-process ones (a direct evaluation of the starting weights on the same held-out split, which
is what a one-process run logs: tests/test_monitor.py), and the run ends (no rank waits on
another). FSDP: the same where Lightning runs it on CPU; here it refuses, and the test says why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_make_data, run_cli


def _history(uri, run_id, key):
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def _step0_direct(root, weights):
    """The starting weights on the eo-sar held-out split, computed in this process."""
    from domainfm.backbones import create_backbone
    from domainfm.config import RunConfig
    from domainfm.metrics import feature_std, knn_quality, rankme
    from domainfm.plugins import load

    plugin = load("eo-sar")
    options = {o.name: o.default for o in plugin.options("pretrain")}
    cfg = RunConfig(plugin="eo-sar", data=str(root), backbone="vit_tiny_patch16_224", img_size=32, batch_size=4,
                    val_fraction=0.25, seed=0, options=options)
    dm = plugin.pretrain_datamodule(cfg)
    held = plugin.monitor_dataset(cfg, dm)
    samples = [held.dataset[i] for i in range(len(held.dataset))]
    backbone = create_backbone(str(weights)).eval()
    with torch.no_grad():
        feats = backbone(torch.stack([s["image"] for s in samples])).numpy()
    labels = np.stack([s["labels"].numpy() for s in samples])
    return {"rankme": rankme(feats), "feature_std": feature_std(feats),
            "knn_map": knn_quality(feats, labels, groups=list(held.groups))[1]}


def _run(tmp_path, root, weights, strategy, max_steps=2, *extra):
    out = tmp_path / f"{strategy}.json"
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--data", str(root), "--weights", str(weights), "--backbone",
                 "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "4", "--proj-dim", "16", "--max-steps",
                 str(max_steps), "--val-every", "1", "--val-fraction", "0.25", "--devices", "2", "--strategy", strategy,
                 "--accelerator", "cpu", "--checkpoint-every", "2", "--json", str(out), *extra], cwd=tmp_path,
                timeout=840)
    return r, out


def _check(tmp_path, mlflow_store, strategy):
    from domainfm.backbones import create_backbone, save_backbone

    root = load_make_data("eo_sar").write_dataset(tmp_path / "root", n_patches=16, modalities=("s2",))
    torch.manual_seed(0)
    weights = save_backbone(create_backbone("vit_tiny_patch16_224", in_chans=13, img_size=32, init="random"),
                            tmp_path / "start.safetensors")
    r, out = _run(tmp_path, root, weights, strategy)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["global_step"] == 2
    want = _step0_direct(root, weights)
    for key, value in want.items():
        logged = _history(mlflow_store, result["mlflow_run_id"], f"monitor/{key}")
        # one point per evaluation: rank 1 evaluated too, but only rank 0 logged
        assert sorted(step for step, _ in logged) == [0, 1, 2], (key, logged)
        assert dict(logged)[0] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    return root, weights, result


@pytest.mark.timeout(900)
def test_ddp_monitor_logs_once_from_rank0_with_the_single_process_step0_values(tmp_path, mlflow_store):
    """... and the job is one MLflow run, not one per process; --resume under DDP continues that run
    from the last checkpoint: the same run id, the loss curve at steps 0..3 once each (the resumed
    fit logs from step 2 on, rank 0 only). (The resume was tests/test_pretrain.py's own DDP test on
    the toy plugin; one DDP job here proves both.)"""
    from mlflow import MlflowClient

    root, weights, result = _check(tmp_path, mlflow_store, "ddp")
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_run(result["mlflow_run_id"]).info.experiment_id
    assert len(client.search_runs([experiment])) == 1
    r, out = _run(tmp_path, root, weights, "ddp", 4, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["mlflow_run_id"] == result["mlflow_run_id"] and resumed["global_step"] == 4
    assert len(client.search_runs([experiment])) == 1
    assert sorted(step for step, _ in _history(mlflow_store, result["mlflow_run_id"], "loss/total")) == [0, 1, 2, 3]


@pytest.mark.timeout(900)
def test_fsdp_monitor_where_lightning_runs_fsdp_on_cpu(tmp_path, mlflow_store):
    import lightning as L

    try:
        L.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False)
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"Lightning {L.__version__} refuses FSDP on CPU: {str(e).splitlines()[0]}")
    _check(tmp_path, mlflow_store, "fsdp")
