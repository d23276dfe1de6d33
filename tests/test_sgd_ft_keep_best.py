"""sgd-ft tests and exports its best-validation weights, on a real run (issue 12, 0b): a learning rate
that warms up into divergence makes validation peak early and then fall; the exported classifier
must equal the step checkpoint of the best validation (captured by Lightning's ModelCheckpoint,
independently of the KeepBest callback), differ from the last weights, and the reported test
accuracy must be that of the exported weights, computed here on the test images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

_spec = importlib.util.spec_from_file_location("sgd_ft_make_data_keep_best",
                                               Path(__file__).parent / "data" / "sgd_ft" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

# lr ramps linearly 0 -> 1.0 over the 24 steps: the first steps learn (lr <= 0.125 by step 3), the
# later ones diverge (checked: with seed 0 validation accuracy peaks early, then falls to chance)
RUN = ["--img-size", "32", "--batch-size", "8", "--init", "random", "--accelerator", "cpu", "--max-steps", "24",
       "--val-every", "3", "--checkpoint-every", "3", "--keep-checkpoints", "-1", "--lr", "1.0", "--warmup-steps", "24",
       "--seed", "0", "--no-measure-memory"]


@pytest.mark.timeout(900)
def test_sgd_ft_tests_and_exports_its_best_validation_weights(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from domainfm.backbones import create_backbone, input_normalization, save_backbone
    from domainfm.cli import main
    from plugins.sgd_ft.datamodule import ImageFolderDataModule
    from plugins.sgd_ft.model import Classifier

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    data = make_data.write_imagefolder(tmp_path / "data", train=8, val=4, test=6, size=32)
    torch.manual_seed(0)
    init = save_backbone(create_backbone("resnet18", in_chans=3, img_size=32, init="random"), tmp_path / "init.safetensors")
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, ["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", str(init), *RUN,
                                    "--json", str(out)])
    assert res.exit_code == 0, (res.output[-3000:], res.exception)
    m = json.loads(out.read_text())

    # the setting does what it is for: validation peaked, then got worse
    val = [h.value for h in sorted(MlflowClient(uri).get_metric_history(m["mlflow_run_id"], "val/accuracy"),
                                   key=lambda h: h.step)]
    assert len(val) >= 3 and max(val) > val[-1], val  # seed 0: 0.667, 0.833, then 0.333 (chance)
    assert m["val_accuracy"] == pytest.approx(max(val))
    best_step = m["best_step"]
    assert best_step % 3 == 0 and best_step < 24

    # the exported classifier is the checkpoint of that step, not the last weights
    ckpts = tmp_path / "outputs" / "domainfm-sgd-ft" / m["mlflow_run_id"] / "checkpoints"

    def weights_of(ckpt_path):
        state = torch.load(ckpt_path, weights_only=True)["state_dict"]
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}

    best = weights_of(ckpts / f"step{best_step:06d}.ckpt")
    last = weights_of(ckpts / "last.ckpt")
    exported = load_file(m["weights"])
    assert sorted(exported) == sorted(best)
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], last[k]) for k in last)

    # the reported test accuracy is that of the exported weights on the 18 test images
    model = Classifier(create_backbone("resnet18", in_chans=3, img_size=32, init="random"), 3)
    model.load_state_dict(best)
    model.eval()
    mean, std = input_normalization("resnet18")
    test_set = ImageFolderDataModule(data, img_size=32, batch_size=8, rgb_mean=mean, rgb_std=std).test_set
    samples = [test_set[i] for i in range(len(test_set))]
    with torch.no_grad():
        pred = model(torch.stack([s["image"] for s in samples])).argmax(1)
    truth = torch.tensor([s["label"] for s in samples])
    assert len(samples) == 18
    assert m["accuracy"] == pytest.approx(float((pred == truth).float().mean()), abs=1e-6)
