"""`domainfm pretrain` end to end through the real CLI, Lightning, MLflow and safetensors, on the
toy third-party plugin (so the core is tested without any first-party domain)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import assert_one_line_error, invoke_cli, run_cli

# timm's test_vit (a real ViT: 6 blocks, 64-d, 0.4 M parameters) at 32 px, 4 tokens: what ViT-S/14 had at
# 28 px, with checkpoints of a few MB instead of 400 MB each (22 M parameters x 4 copies)
TINY = ["--backbone", "test_vit", "--init", "random", "--img-size", "32", "--batch-size", "8",
        "--num-samples", "16", "--proj-dim", "32"]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pretrain_logs_checkpoints_registers_and_resumes(tmp_path, toy_env):
    out = tmp_path / "out.json"
    r = run_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "4", "--checkpoint-every", "2",
                 "--register", "toy-bb", "--json", str(out)], cwd=tmp_path, env=toy_env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(out.read_text())
    assert first["global_step"] == 4
    run_id = first["mlflow_run_id"]
    client = _client(toy_env["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    for key in ("loss/hard", "loss/soft", "loss/total", "lr", "images_per_s"):
        assert key in run.data.metrics, key
    assert run.data.params["bands"] == "4" and run.data.params["mask_ratio"] == "0.5"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in arts and "export" in arts
    # the exported backbone reads back with its architecture, timm keys only
    with safe_open(first["backbone_path"], framework="pt") as f:
        assert f.metadata()["domainfm_name"] == "test_vit"
        assert "patch_embed.proj.weight" in f.keys() and not any(k.startswith("model.") for k in f.keys())
    mv = client.get_model_version_by_alias("toy-bb", "candidate")
    assert mv.run_id == run_id
    ckpts = Path(first["backbone_path"]).parent / "checkpoints"
    assert {"step000002.ckpt", "step000004.ckpt", "last.ckpt"} <= {p.name for p in ckpts.iterdir()}
    import torch

    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4

    # --resume continues the same MLflow run from the last checkpoint
    r = run_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "6", "--checkpoint-every", "2", "--resume",
                 "--keep-checkpoints", "2", "--json", str(out)], cwd=tmp_path, env=toy_env)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(out.read_text())
    assert second["mlflow_run_id"] == run_id and second["global_step"] == 6
    # only the newest two step checkpoints stay on disk, and last.ckpt
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000004.ckpt", "step000006.ckpt"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss/total"))
    # each step trained and logged once: a resumed run that restarted from 0 would log steps 0-3 twice
    assert steps == [0, 1, 2, 3, 4, 5]

    # the registered backbone is what `evaluate` loads, and `registry` manages its aliases
    r = run_cli(["evaluate", "--plugin", "toy", "--model", "models:/toy-bb@candidate", "--json", str(out)],
                cwd=tmp_path, env=toy_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["feature_norm"] > 0
    # (in this process: the registry commands need no fresh one, and each would import mlflow again)
    r = invoke_cli(["registry", "promote", "toy-bb", "1", "--alias", "champion"], cwd=tmp_path, env=toy_env)
    assert r.exit_code == 0, r.output
    r = invoke_cli(["registry", "list"], cwd=tmp_path, env=toy_env)
    assert "champion" in r.stdout and "candidate" in r.stdout
    r = invoke_cli(["registry", "promote", "toy-bb", "9", "--alias", "x"], cwd=tmp_path, env=toy_env)
    assert r.exit_code == 2 and "no version 9" in r.stderr


@pytest.mark.timeout(300)
def test_resume_without_earlier_run_is_one_line(tmp_path, toy_env, toy_in_process):
    r = invoke_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "2", "--resume"], cwd=tmp_path, env=toy_env)
    assert r.exit_code == 2 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr


def test_default_store_is_sqlite_under_mlruns(tmp_path, toy_env):
    env = {k: v for k, v in toy_env.items() if k != "MLFLOW_TRACKING_URI"}
    r = run_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "1", "--precision", "bf16-mixed",
                 "--mask-ratio", "0.75", "--json", "o.json"], cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    run_id = json.loads((tmp_path / "o.json").read_text())["mlflow_run_id"]
    client = _client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(run_id).data.params["precision"] == "bf16-mixed"
    assert any((tmp_path / "mlruns" / "artifacts").rglob("config.yaml"))


# DDP (two CPU processes, one MLflow run, --resume continuing it): tests/test_monitor_ddp.py, whose DDP
# pretraining job checks the monitor too (one DDP job instead of two)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrain_against_a_real_mlflow_server(tmp_path, toy_env):
    import shutil

    # the server's store starts as a copy of the empty one toy_env made (tables already created:
    # the server skips alembic's ~50 migrations, seconds of CPU that prove nothing here)
    shutil.copyfile(tmp_path / "mlflow.db", tmp_path / "server.db")
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server_artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        out = tmp_path / "remote.json"
        r = run_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "2", "--register", "remote-bb",
                     "--json", str(out)], cwd=tmp_path, env={**toy_env, "MLFLOW_TRACKING_URI": uri})
        assert r.returncode == 0, r.stderr[-3000:]
        run_id = json.loads(out.read_text())["mlflow_run_id"]
        client = _client(uri)
        assert "loss/total" in client.get_run(run_id).data.metrics
        assert client.get_model_version_by_alias("remote-bb", "candidate").run_id == run_id
        # the artifacts went through the server to its destination folder
        assert any((tmp_path / "server_artifacts").rglob("backbone.safetensors"))
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("args,expected", [
    (["--backbone", "vit_nonexistent_patch99"], "unknown backbone"),
    (["--backbone", "vit_small_patch14_dinov2", "--init", "dinov2"], "--weights"),
    (["--weights", "{bad}"], "not a state dict"),
    (["--weights", "{missing}"], "weights file not found"),
])
@pytest.mark.timeout(300)
def test_bad_backbone_input_is_one_line(tmp_path, toy_env, toy_in_process, args, expected):
    import torch

    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "bad.pt")
    args = [a.format(bad=tmp_path / "bad.pt", missing=tmp_path / "nope.pth") for a in args]
    # offline, an unknown or unfetchable backbone fails at once instead of retrying the hub; the
    # timeout is only the hang guard (timm's offline retries alone take ~47 s per attempt). In this
    # process: the check needs no fresh one (HF_HUB_OFFLINE=1 is set before anything imports the hub)
    r = invoke_cli(["pretrain", "--plugin", "toy", "--img-size", "28", "--max-steps", "1", *args], cwd=tmp_path,
                   env=toy_env)
    assert_one_line_error(r, expected)


# ---------------------------------------------------------------- issue 9, items 18 and 19

def _tiny_model(path: Path) -> Path:
    from domainfm.backbones import create_backbone, save_backbone

    return save_backbone(create_backbone("vit_tiny_patch16_224", in_chans=4, img_size=32, init="random"), path)


# the flags of `domainfm evaluate` (core and the toy plugin's), and nothing of pretraining
EVALUATE_SETTINGS = {"command", "plugin", "data", "batch_size", "precision", "accelerator", "num_workers", "seed",
                     "model", "experiment", "run_name", "json", "bands", "num_samples"}


def test_evaluate_logs_only_the_settings_it_uses(tmp_path, toy_env, toy_in_process):
    import yaml

    model = _tiny_model(tmp_path / "model.safetensors")
    r = invoke_cli(["evaluate", "--plugin", "toy", "--model", str(model), "--json", "e.json"], cwd=tmp_path, env=toy_env)
    assert r.exit_code == 0, r.output[-3000:]
    run_id = json.loads((tmp_path / "e.json").read_text())["mlflow_run_id"]
    client = _client(toy_env["MLFLOW_TRACKING_URI"])
    params = client.get_run(run_id).data.params
    assert set(params) == EVALUATE_SETTINGS
    assert params["command"] == "evaluate" and params["model"] == str(model) and params["bands"] == "4"
    for unused in ("init", "img_size", "mask_ratio", "ema_momentum", "backbone", "lr", "max_steps"):
        assert unused not in params
    # config.yaml holds the same settings, so `evaluate --config config.yaml` re-runs it
    saved = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert set(saved) == EVALUATE_SETTINGS


def test_artifacts_live_beside_a_sqlite_store_whatever_folder_the_command_runs_from(tmp_path, toy_env):
    a, b, c = (tmp_path / n for n in "ABC")
    for d in (a, b, c):
        d.mkdir()
    env = {**toy_env, "MLFLOW_TRACKING_URI": f"sqlite:///{b / 'mlflow.db'}"}
    model = _tiny_model(tmp_path / "model.safetensors")
    r = run_cli(["evaluate", "--plugin", "toy", "--model", str(model), "--json", "e.json"], cwd=a, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads((a / "e.json").read_text())["mlflow_run_id"]
    assert sorted(p.name for p in a.iterdir()) == ["e.json"]  # no ./mlruns in the folder it ran from
    client = _client(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).artifact_location == (b / "artifacts").as_uri()
    assert run.info.artifact_uri == (b / "artifacts" / run_id / "artifacts").as_uri()
    assert (b / "artifacts" / run_id / "artifacts" / "config.yaml").is_file()
    # a second job from another folder adds to the same place, and the store's reader finds both
    r = run_cli(["evaluate", "--plugin", "toy", "--model", str(model), "--json", "e.json"], cwd=c, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((c / "e.json").read_text())["mlflow_run_id"]
    assert (b / "artifacts" / second / "artifacts" / "config.yaml").is_file()
    assert not (c / "mlruns").exists()
    got = client.download_artifacts(second, "config.yaml", str(tmp_path))
    assert "command: evaluate" in Path(got).read_text()


EO_TINY = ["--plugin", "eo-sar", "--init", "random", "--backbone", "vit_small_patch14_dinov2", "--img-size", "28",
           "--batch-size", "8", "--proj-dim", "32"]


def _lightning_fsdp_on_cpu() -> str | None:
    """None if Lightning builds an FSDP Trainer on CPU here, else Lightning's own reason."""
    import lightning as L

    try:
        L.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False)
    except (ValueError, RuntimeError) as e:
        return str(e).splitlines()[0]
    return None


@pytest.mark.timeout(900)
def test_fsdp_two_cpu_processes_resume_and_export(tmp_path, monkeypatch):
    reason = _lightning_fsdp_on_cpu()
    if reason is not None:
        pytest.skip(f"Lightning {__import__('lightning').__version__} refuses FSDP on CPU: {reason} "
                    "(torch's FSDP also needs a non-CPU accelerator); the same path runs on a GPU machine: "
                    "PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --devices 1")
    import torch
    from safetensors.torch import load_file

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fsdp.json"
    args = ["pretrain", *EO_TINY, "--strategy", "fsdp", "--devices", "2", "--accelerator", "cpu",
            "--checkpoint-every", "2", "--json", str(out)]
    r = run_cli([*args, "--max-steps", "2"], cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(out.read_text())
    r = run_cli([*args, "--max-steps", "4", "--resume"], cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(out.read_text())
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["global_step"] == 4
    # the export holds the full teacher, equal to the teacher in the last (full-state) checkpoint
    saved = load_file(second["backbone_path"])
    ckpt = torch.load(Path(second["backbone_path"]).parent / "checkpoints" / "last.ckpt", weights_only=True)
    prefix = "teacher.backbone.model."
    teacher = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    assert sorted(saved) == sorted(teacher)
    assert all(torch.equal(saved[k], teacher[k]) for k in teacher)


@pytest.mark.timeout(300)
@pytest.mark.fresh_store  # checks that no MLflow store file is made
def test_fsdp_on_cpu_is_one_line_before_any_run(tmp_path, toy_env, toy_in_process):
    r = invoke_cli(["pretrain", "--plugin", "toy", *TINY, "--max-steps", "1", "--strategy", "fsdp", "--devices", "2",
                    "--accelerator", "cpu"], cwd=tmp_path, env=toy_env)
    assert r.exit_code == 2, r.output[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: --strategy fsdp needs GPUs (Lightning's FSDP runs only on a CUDA accelerator). "
                     "Fix: use --strategy ddp on CPU, or run on GPUs."], r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
