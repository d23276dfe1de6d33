"""domainfm export: ONNX read back by onnx/onnxruntime and TorchScript by torch.jit match an
independent PyTorch forward to 1e-4 on batches of 1 and 7, carry bands and statistics in their
metadata, keep a dynamic batch axis, and a models:/ export is logged to its run; bad input is one
line with exit 2 and no file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import run_cli
from domainfm.backbones import create_backbone, save_backbone

BANDS = ["B2", "B3", "B4", "B8"]
MEAN = [0.12, 0.10, 0.09, 0.25]
STD = [0.05, 0.04, 0.05, 0.09]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """timm's test_vit (6 blocks, 64-d) with 4 bands, random weights, saved by the product with the
    bands and per-band statistics in its metadata."""
    torch.manual_seed(0)
    b = create_backbone("test_vit", in_chans=4, img_size=64, init="random")
    meta = {"input_bands": json.dumps(BANDS), "input_mean": json.dumps(MEAN), "input_std": json.dumps(STD)}
    return save_backbone(b, tmp_path_factory.mktemp("export_src") / "vit.safetensors", extra_meta=meta)


def reference(path, x: np.ndarray, normalize: bool) -> np.ndarray:
    model = create_backbone(str(path)).eval()
    t = torch.from_numpy(x)
    if normalize:
        t = (t - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    with torch.no_grad():
        return model(t).numpy()


def raw_batch(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 4, 64, 64)) * 0.5).astype(np.float32)


@pytest.mark.timeout(300)
def test_onnx_with_normalization_matches_pytorch(vit_file, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "vit.onnx"
    r = run_cli(["export", "--model", str(vit_file), "--format", "onnx", "--out", str(out), "--with-normalization"])
    assert r.returncode == 0, r.stderr
    proto = onnx.load(str(out))
    meta = {e.key: e.value for e in proto.metadata_props}
    assert json.loads(meta["bands"]) == BANDS
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    assert meta["normalization_in_graph"] == "true" and meta["domainfm_name"] == "test_vit"
    assert meta["in_chans"] == "4" and meta["img_size"] == "64" and meta["embed_dim"] == "64"
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # a named, dynamic batch axis
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = raw_batch(n, n)
        got = session.run(None, {"image": x})[0]
        assert got.shape == (n, 64)
        np.testing.assert_allclose(got, reference(vit_file, x, normalize=True), atol=1e-4, rtol=0)
    assert list(tmp_path.iterdir()) == [out]  # no temporary left beside it


@pytest.mark.timeout(300)
def test_torchscript_without_normalization_matches_pytorch(vit_file, tmp_path):
    out = tmp_path / "vit.pt"
    r = run_cli(["export", "--model", str(vit_file), "--format", "torchscript", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    extra = {"domainfm.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["domainfm.json"])
    assert json.loads(meta["bands"]) == BANDS and json.loads(meta["mean"]) == MEAN
    assert meta["normalization_in_graph"] == "false"
    for n in (1, 7):
        x = raw_batch(n, 10 + n)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, reference(vit_file, x, normalize=False), atol=1e-4, rtol=0)


@pytest.mark.timeout(600)
def test_registered_model_export_is_logged_to_its_run(tmp_path, mlflow_store):
    import onnxruntime as ort
    from mlflow import MlflowClient

    from domainfm import jobs, tracking

    torch.manual_seed(1)
    b = create_backbone("test_vit", in_chans=3, img_size=32, init="random")
    with tracking.start_run(run_name="export-src") as run:
        jobs.log_backbone(b, register="tiny-vit", alias="champion")
    out = tmp_path / "exports" / "tiny.onnx"
    r = run_cli(["export", "--model", "models:/tiny-vit@champion", "--format", "onnx", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert run.info.run_id in r.stdout
    logged = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "export")]
    assert logged == ["export/tiny.onnx"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = b.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], ref, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_missing_export_extra_is_one_line(vit_file, tmp_path):
    """onnx made unimportable for the subprocess by a sitecustomize; the product itself is unchanged."""
    site = tmp_path / "site"
    site.mkdir()
    # None in sys.modules is Python's own "this module cannot be imported"
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['onnx'] = sys.modules['onnxruntime'] = None\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "vit.onnx"
    r = run_cli(["export", "--model", str(vit_file), "--format", "onnx", "--out", str(out)], env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --format onnx needs the optional export extra, which is not installed (import of onnx halted; None in sys.modules). "
        "Fix: pip install 'domainfm[export]' (onnx, onnxruntime, onnxscript), or use --format torchscript."]
    assert not out.exists()
    # torchscript needs no extra and still works in the same environment
    r = run_cli(["export", "--model", str(vit_file), "--format", "torchscript", "--out", str(tmp_path / "v.pt")],
                env=env)
    assert r.returncode == 0, r.stderr


def test_normalization_without_statistics_is_one_line(tmp_path):
    torch.manual_seed(0)
    path = save_backbone(create_backbone("test_vit", in_chans=5, img_size=32, init="random"), tmp_path / "m.safetensors")
    out = tmp_path / "m.pt"
    r = run_cli(["export", "--model", str(path), "--format", "torchscript", "--out", str(out), "--with-normalization"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {path}: --with-normalization needs per-band mean and std for the 5 bands, and the model records "
        "none. Fix: drop --with-normalization and normalise the input yourself."]
    assert not out.exists()


CUMMAX_NET = '''"""A small timm-registered network whose pooling uses torch.cummax, which torch's ONNX exporter
(dynamo=True) has no conversion for (checked with torch 2.14): aten.cummax."""
import torch
from torch import nn
from timm.models import register_model


class CummaxNet(nn.Module):
    def __init__(self, in_chans=3, num_classes=0, **kwargs):
        super().__init__()
        self.num_features = 8
        self.stem = nn.Conv2d(in_chans, 8, 4, stride=4)
        self.head = nn.Identity()

    def forward(self, x):
        x = self.stem(x).flatten(2)            # [B, 8, HW]
        return torch.cummax(x, dim=-1)[0].mean(-1)  # running maximum, averaged: [B, 8]


@register_model
def cummax_test_net(pretrained=False, **kwargs):
    return CummaxNet(**kwargs)
'''


@pytest.mark.timeout(300)
def test_unexportable_operator_is_named_in_one_line(tmp_path):
    """A real operator without an ONNX conversion (aten.cummax) gives one line naming it and the fix;
    the same model still exports to TorchScript. The architecture is a real timm-registered module,
    made known to the CLI subprocess by a sitecustomize that imports it."""
    import importlib
    import os
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "cummax_net.py").write_text(CUMMAX_NET)
    (site / "sitecustomize.py").write_text("import cummax_net  # registers cummax_test_net with timm\n")
    sys.path.insert(0, str(site))
    try:
        importlib.import_module("cummax_net")
        torch.manual_seed(0)
        path = save_backbone(create_backbone("cummax_test_net", in_chans=3, img_size=32, init="random"),
                             tmp_path / "cummax.safetensors")
    finally:
        sys.path.remove(str(site))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "cummax.onnx"
    r = run_cli(["export", "--model", str(path), "--format", "onnx", "--out", str(out)], env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: cummax_test_net cannot be exported to onnx: operator aten.cummax has no onnx conversion. "
        "Fix: use the other --format, or a backbone without that operator."], r.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    # the operator is fine for TorchScript: the error was about ONNX only
    pt = tmp_path / "cummax.pt"
    r = run_cli(["export", "--model", str(path), "--format", "torchscript", "--out", str(pt)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    x = torch.rand(3, 3, 32, 32)
    stem = create_backbone(str(path)).model.stem  # the saved weights, read back by the product's loader
    with torch.no_grad():
        want = torch.cummax(stem(x).flatten(2), dim=-1)[0].mean(-1)
        got = torch.jit.load(str(pt))(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
