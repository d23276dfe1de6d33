"""A registered model's VERSION, not its alias, is what a command loads, fingerprints and records:
after ``models:/NAME@ALIAS`` moves to another version, a rerun recomputes (never "already done"
with the old version's map), and the outputs and the MLflow run name the version used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from tests.conftest import load_make_data

make_data = load_make_data("eo_sar")

W = 28  # window: 2 x 2 patches of 14 px


def _register(root: Path, seed: int, name: str = "emb", alias: str = "candidate") -> str:
    """A random-init 13-band ViT-S/14 (seeded) registered as the next version of ``name``, ``alias``
    pointed at it; returns ``NAME/VERSION``."""
    import torch

    from domainfm import jobs, tracking
    from domainfm.backbones import InputSpec, create_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    torch.manual_seed(seed)
    b = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=tuple(1000.0 for _ in range(13)),
                             std=tuple(500.0 for _ in range(13)), modality="s2", gsd_m=10.0,
                             units="reflectance x 10000")
    with tracking.start_run(experiment="versions", run_name=f"train-{seed}"):
        tracking.set_tags({"domainfm.plugin": "eo-sar", "domainfm.command": "pretrain"})
        jobs.export_and_register(b, root / f"v{seed}.safetensors", register=name, alias=alias, plugin="eo-sar")
    mv = tracking.model_version(f"models:/{name}@{alias}")
    return f"{mv.name}/{mv.version}"


def _embed(scene: Path, model: str, out: Path):
    from domainfm.cli import main

    return CliRunner().invoke(main, ["eo-sar", "embed", str(scene), "--model", model, "--out", str(out),
                                     "--window", str(W), "--batch-size", "8"])


def _read(tif: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(tif) as src:
        return src.read(), src.tags()


@pytest.mark.timeout(600)
def test_embed_records_the_version_and_recomputes_after_the_alias_moves(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from domainfm.cli import main

    scene = make_data.write_scene(tmp_path / "scene.tif")
    out = tmp_path / "maps"
    tif = out / "scene_embedding.tif"
    assert _register(tmp_path, seed=0) == "emb/1"

    r = _embed(scene, "models:/emb@candidate", out)
    assert r.exit_code == 0, r.output
    first, tags = _read(tif)
    assert tags["MODEL_SOURCE"] == "models:/emb@candidate" and tags["MODEL_VERSION"] == "emb/1"
    client = MlflowClient()
    run1 = client.get_run(r.stderr.split("MLflow run ")[1].split()[0])
    assert run1.data.tags["domainfm.model_version"] == "emb/1"
    assert run1.data.params["model_version"] == "emb/1"
    assert run1.data.params["stride"] == str(W)  # the resolved stride (the window), not None

    r = _embed(scene, "models:/emb@candidate", out)
    assert r.exit_code == 0 and "already done" in r.stderr, r.output
    # found from headers and fingerprints alone (the function never builds a model): 11 x 10 windows of 28 px
    from plugins.eo_sar.scene_embedding import SceneEmbedSettings, already_done

    s = SceneEmbedSettings(out_dir=str(out), model="models:/emb@candidate", window=W, batch_size=8)
    done = already_done([scene], s)
    assert s.model_version == "emb/1"
    assert [(d.path, d.shape, d.windows, d.already_done) for d in done] == [(str(tif), (384, 11, 10), 110, True)]

    assert _register(tmp_path, seed=1) == "emb/2"  # the alias moves to version 2
    r = _embed(scene, "models:/emb@candidate", out)
    assert r.exit_code == 0, r.output
    assert "already done" not in r.stderr
    assert "scene_embedding.tif was made with other inputs or settings (model version, scene or options): " \
           "computing it again" in r.stderr
    second, tags = _read(tif)
    assert tags["MODEL_VERSION"] == "emb/2"
    run2_id = r.stderr.split("MLflow run ")[1].split()[0]
    assert client.get_run(run2_id).data.tags["domainfm.model_version"] == "emb/2"
    assert not np.allclose(np.nan_to_num(first), np.nan_to_num(second))

    # the same map as version 2 named directly (an independent run into another folder)
    r = _embed(scene, "models:/emb/2", tmp_path / "direct")
    assert r.exit_code == 0, r.output
    direct, tags = _read(tmp_path / "direct" / "scene_embedding.tif")
    assert tags["MODEL_VERSION"] == "emb/2"
    np.testing.assert_array_equal(second, direct)

    # the ONNX export of the alias records the version it exported and the input's units, GSD, modality
    from domainfm.backbones.export import read_metadata

    onnx_path = tmp_path / "emb.onnx"
    r = CliRunner().invoke(main, ["export", "--model", "models:/emb@candidate", "--format", "onnx",
                                  "--out", str(onnx_path)])
    assert r.exit_code == 0, r.output
    meta = read_metadata(onnx_path)
    assert (meta["source"], meta["model_version"]) == ("models:/emb@candidate", "emb/2")
    assert (meta["units"], meta["gsd_m"], meta["modality"]) == ("reflectance x 10000", "10.0", "s2")

    # `registry show NAME/VERSION` lists the embed runs of that version
    shown = CliRunner().invoke(main, ["registry", "show", "emb/2"]).output
    assert run2_id in shown and run1.info.run_id not in shown
    assert run1.info.run_id in CliRunner().invoke(main, ["registry", "show", "emb/1"]).output


@pytest.mark.timeout(300)
def test_histo_embed_redoes_slides_of_another_version_after_the_alias_moves(mlflow_store, tmp_path):
    """A features folder never mixes two versions: slides embedded with version 1 are embedded
    again once the alias names version 2, and each file records the version it was made with."""
    import h5py
    import torch

    from domainfm import jobs, tracking
    from domainfm.backbones import create_backbone
    from plugins.histo.commands import embed_command

    slide = load_make_data("histo").make_slides(tmp_path / "slides")["tiff"]

    def register(seed):
        torch.manual_seed(seed)
        with tracking.start_run(experiment="histo-versions"):
            jobs.log_backbone(create_backbone("test_resnet", img_size=32, init="random"), register="enc",
                              alias="champion")

    def embed():
        return CliRunner().invoke(embed_command, [str(slide), "--out", str(tmp_path / "out"), "--model",
                                                  "models:/enc@champion", "--num-workers", "0", "--mpp", "2",
                                                  "--tile-size", "32", "--batch-size", "8"])

    def read():
        with h5py.File(tmp_path / "out" / "features" / "generic_20x.h5") as f:
            return f["features"][:], dict(f.attrs)

    register(0)
    r = embed()
    assert r.exit_code == 0, r.output
    f1, a1 = read()
    assert a1["model_version"] == "enc/1" and a1["encoder"] == "models:/enc@champion"
    assert "1 already done" in embed().output  # same version: skipped
    register(1)
    r = embed()
    assert r.exit_code == 0, r.output
    assert "histo: generic_20x.h5 was made with models:/enc/1, not models:/enc/2 (models:/enc@champion now): " \
           "embedding it again" in r.output
    f2, a2 = read()
    assert a2["model_version"] == "enc/2" and '"uri": "models:/enc/2"' in a2["encoder_record"]
    assert f1.shape == f2.shape and not np.allclose(f1, f2)


@pytest.mark.timeout(300)
def test_dims_beyond_the_valid_windows_counts_them_before_any_run_or_folder(mlflow_store, tmp_path):
    """Window 28 on the 300 x 260 scene: 11 x 10 = 110 windows (the last row and column reach past
    the edge: 8 of 28 rows, 20 of 28 columns outside, which count as nodata). Mostly nodata (> 50%):
    the last column (20/28 = 71%: 11 windows) and, from the nodata corner (rows 0-119, cols 0-99),
    window rows 0-3 x cols 0-3 (col 3: 16 of 28 columns, 57%: 16 windows); so 110 - 11 - 16 = 83 are
    valid. --dims 90 is refused naming 83, before an MLflow run or the --out folder exists."""
    from mlflow import MlflowClient

    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from domainfm.cli import main
    from plugins.eo_sar.bands import S2_L1C_BANDS

    scene = make_data.write_scene(tmp_path / "scene.tif")
    b = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=(1000.0,) * 13, std=(500.0,) * 13, modality="s2")
    model = save_backbone(b, tmp_path / "m.safetensors")
    out = tmp_path / "maps"
    r = CliRunner().invoke(main, ["eo-sar", "embed", str(scene), "--model", str(model), "--out", str(out),
                                  "--window", str(W), "--dims", "90"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (
        f"error: {scene}: --dims 90 needs at least 90 samples to fit its principal components, and this scene's "
        "sample of 110 window(s) has 83 valid window(s) (the others are mostly nodata). "
        "Fix: pass --dims 83 or less, or a smaller --stride for more windows.")
    assert not out.exists()
    # a dense window between two whole-patch sizes: both neighbours suggested (14-px patches: 56, 70)
    r = CliRunner().invoke(main, ["eo-sar", "embed", str(scene), "--model", str(model), "--out", str(out),
                                  "--dense", "--window", "60"])
    assert r.exit_code == 2 and r.stderr.strip().endswith(
        "Fix: pass --window 56 --stride 56 or pass --window 70 --stride 70."), r.output
    assert not out.exists()
    client = MlflowClient()
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("domainfm.command") == "eo-sar embed"]  # no FAILED embed run left
