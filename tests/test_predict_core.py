"""The predict core: which model `domainfm predict` applies and which plugin made it
(predict.resolve_model), the one MLflow run jobs.run_prediction opens, and the one-line errors.
A real sqlite MLflow store, a small random ViT, and a small Plugin subclass (a plugin cannot be
installed through entry points inside a test process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from domainfm.backbones import create_backbone, save_backbone
from domainfm.errors import DomainFMError
from domainfm.plugins import Plugin


class MiniPlugin(Plugin):
    """Predicts the number of bytes of each input; evaluate scores a fixed accuracy."""

    name = "mini"
    description = "test plugin"

    def predict(self, model, inputs, out, options):
        rows = [(p, Path(p).stat().st_size) for p in inputs]
        path = Path(out) / "sizes.csv"
        path.write_text("input,bytes\n" + "".join(f"{p},{n}\n" for p, n in rows))
        return {"num_inputs": len(rows), "total_bytes": sum(n for _, n in rows), "files": [str(path)]}

    def evaluate(self, cfg):
        return {"accuracy": 0.75, "num_samples": 8}


def _tiny():
    torch.manual_seed(0)
    return create_backbone("test_vit", in_chans=3, img_size=32, init="random")


@pytest.fixture
def registered(mlflow_store, tmp_path):
    """A backbone registered as mini-bb version 1 (@champion) from a run of plugin 'mini'."""
    from domainfm import jobs, tracking

    with tracking.start_run(run_name="train-mini", experiment="mini-train") as run:
        tracking.set_tags({"domainfm.plugin": "mini", "domainfm.command": "pretrain"})
        jobs.export_and_register(_tiny(), tmp_path / "bb.safetensors", register="mini-bb", alias="champion")
    return run.info.run_id


@pytest.mark.timeout(600)
def test_resolve_model_of_every_kind(registered, tmp_path):
    from domainfm import tracking
    from domainfm.predict import resolve_model

    alias = resolve_model("models:/mini-bb@champion")
    assert (alias.plugin, alias.name, alias.version, alias.run_id) == ("mini", "mini-bb", "1", registered)
    assert alias.version_label == "mini-bb/1" and alias.tags["domainfm.training_run"] == registered
    version = resolve_model("models:/mini-bb/1")
    assert (version.plugin, version.version) == ("mini", "1")
    run = resolve_model(f"runs:/{registered}/backbone")
    assert run.plugin == "mini" and run.run_id == registered and not run.is_registered
    assert (run.local_path() / "MLmodel").is_file()  # downloaded from the store
    # a domainfm export that names its plugin in its safetensors metadata
    st = save_backbone(_tiny(), tmp_path / "named.safetensors", extra_meta={"plugin": "histo"})
    f = resolve_model(str(st))
    assert f.plugin == "histo" and f.local_path() == st and f.version_label is None
    # an MLflow model folder: the plugin in its MLmodel metadata
    folder = tracking.download_model("models:/mini-bb@champion")
    assert resolve_model(str(folder)).plugin == "mini"
    # --plugin overrides what the model records
    assert resolve_model("models:/mini-bb@champion", "other").plugin == "other"


@pytest.mark.timeout(300)
def test_resolve_model_errors_are_one_line(mlflow_store, tmp_path):
    from domainfm.predict import resolve_model

    with pytest.raises(DomainFMError) as e:
        resolve_model(str(tmp_path / "nope.safetensors"))
    assert str(e.value) == (f"model {tmp_path / 'nope.safetensors'} does not exist. Fix: pass a domainfm export, "
                            "an MLflow model folder or models:/NAME@ALIAS.")
    with pytest.raises(DomainFMError) as e:
        resolve_model("models:/nosuch@champion")
    assert str(e.value) == (f"models:/nosuch@champion is not in the MLflow registry at {mlflow_store}. "
                            "Fix: check the name and alias with `domainfm registry list`.")
    st = save_backbone(_tiny(), tmp_path / "anon.safetensors")
    with pytest.raises(DomainFMError) as e:
        resolve_model(str(st))
    assert str(e.value) == (f"{st} does not record which plugin made it. "
                            "Fix: pass --plugin NAME (see `domainfm plugins`).")


@pytest.mark.timeout(600)
def test_run_prediction_tags_its_run_with_the_model_version(registered, tmp_path):
    from mlflow import MlflowClient

    from domainfm import jobs
    from domainfm.predict import MODEL_URI_TAG, MODEL_VERSION_TAG, resolve_model

    inputs = []
    for i, n in enumerate((5, 11)):
        p = tmp_path / f"in{i}.bin"
        p.write_bytes(b"x" * n)
        inputs.append(str(p))
    ref = resolve_model("models:/mini-bb@champion")
    summary = jobs.run_prediction(ref, inputs, tmp_path / "preds", MiniPlugin(), {"threshold": None})
    assert summary["num_inputs"] == 2 and summary["total_bytes"] == 16
    assert (tmp_path / "preds" / "sizes.csv").read_text().splitlines()[1:] == [f"{inputs[0]},5", f"{inputs[1]},11"]
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.tags[MODEL_URI_TAG] == "models:/mini-bb@champion"
    assert run.data.tags[MODEL_VERSION_TAG] == "mini-bb/1"
    assert run.data.tags["domainfm.command"] == "predict" and run.data.tags["domainfm.plugin"] == "mini"
    assert run.data.metrics == {"num_inputs": 2.0, "total_bytes": 16.0}
    assert run.data.params["model"] == "models:/mini-bb@champion" and "threshold" not in run.data.params


@pytest.mark.timeout(300)
def test_predict_with_a_model_that_names_no_plugin_exits_2_with_one_line(tmp_path):
    st = save_backbone(_tiny(), tmp_path / "anon.safetensors")
    r = run_cli(["predict", "--model", str(st), "x.tif", "--out", str(tmp_path / "o")],
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {st} does not record which plugin made it. Fix: pass --plugin NAME (see `domainfm plugins`)."]
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()
