"""What a new user trips over, checked as they see it: a scene to try `eo-sar embed` on
(`eo-sar sample --scene`), the embedding GeoTIFF's band names and tags, a rerun on finished scenes
that opens no MLflow run, no stray blank line on stderr, every option's help and default, the MLflow
UI hint, the stalled-loss warning after one logged step and the learning rate on the progress bar."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import click
import pytest
import rasterio
from click.testing import CliRunner

from conftest import run_cli

SIZE = 128  # scene side in px: 4 x 4 windows of 32 px
W = 32


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """timm's test_vit (64-d, 16 px patches) with 13 Sentinel-2 L1C bands and their statistics."""
    import torch

    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    torch.manual_seed(0)
    b = create_backbone("test_vit", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=tuple(1000.0 + 50 * i for i in range(13)),
                             std=tuple(500.0 + 10 * i for i in range(13)), modality="s2", gsd_m=10.0,
                             units="reflectance x 10000")
    return save_backbone(b, tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.mark.timeout(900)
def test_sample_scene_then_embed_names_bands_tags_and_a_finished_rerun_opens_no_run(tmp_path, mlflow_store, model):
    from mlflow import MlflowClient

    from plugins.eo_sar.bands import S2_L1C_BANDS

    # 1. a scene to try embed on, written by the sample command
    r = run_cli(["eo-sar", "sample", str(tmp_path / "scene"), "--scene", "--size", str(SIZE), "--seed", "1"])
    assert r.returncode == 0, r.stderr
    scene = tmp_path / "scene" / "s2_scene.tif"
    assert r.stdout.strip() == f"wrote a {SIZE} x {SIZE} px Sentinel-2 L1C scene to {scene}"
    with rasterio.open(scene) as src:
        assert (src.count, src.height, src.width) == (13, SIZE, SIZE)
        assert src.descriptions == tuple(S2_L1C_BANDS)
        assert set(src.dtypes) == {"uint16"} and src.nodata == 0
        assert src.crs.to_epsg() == 32632  # WGS 84 / UTM zone 32N
        assert (src.transform.a, src.transform.e, src.transform.b, src.transform.d) == (10.0, -10.0, 0.0, 0.0)
        assert src.profile["tiled"] and src.compression.name == "deflate"
        data = src.read()
    nodata = (data == 0).all(axis=0)
    assert not ((data == 0) & ~nodata[None]).any()  # nodata in every band at once, nowhere else
    # a strip along the west edge: on each row the first n columns, n between 1/16 and 1/6 of the width
    widths = nodata.sum(axis=1)
    for row, n in zip(nodata, widths):
        assert row[:n].all() and not row[n:].any()
    assert widths.min() >= SIZE // 16 and widths.max() <= SIZE // 6 + 1

    # 2. embed it: named bands, the settings in the tags, no blank line on stderr
    args = ["eo-sar", "embed", str(scene), "--model", str(model), "--out", str(tmp_path / "maps"), "--window", str(W),
            "--dims", "3", "--batch-size", "8"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "" not in r.stderr.splitlines(), r.stderr
    assert re.search(r"^eo-sar: MLflow run [0-9a-f]{32}$", r.stderr, re.M), r.stderr
    out = tmp_path / "maps" / "s2_scene_embedding.tif"
    assert r.stdout.splitlines() == [f"{out}\t3 bands x 4 x 4 px\tdone"]
    with rasterio.open(out) as src:
        assert src.descriptions == ("PC1", "PC2", "PC3")
        tags = src.tags()
    assert tags["MODEL_SOURCE"] == str(model) and tags["WINDOW"] == str(W) and tags["STRIDE"] == str(W)
    assert tags["BANDS_READ"] == ",".join(S2_L1C_BANDS) and tags["SCENE"] == "s2_scene.tif"
    assert tags["PROJECTION"].startswith("first 3 principal components")
    assert re.fullmatch(r"[0-9a-f]{16}", tags["RESUME_FINGERPRINT"])
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("domainfm-eo-sar")
    assert len(client.search_runs([exp.experiment_id])) == 1
    before, mtime = _sha(out), out.stat().st_mtime_ns

    # 3. the same command again: every scene finished with these settings, so no run and no write
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{out}\t3 bands x 4 x 4 px\talready done"]
    assert r.stderr.splitlines() == ["eo-sar: the scene is already done with these settings: no MLflow run opened "
                                     "(delete an output to compute it again)"]
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert _sha(out) == before and out.stat().st_mtime_ns == mtime

    # only these settings count as done: another --seed (in the resume fingerprint) is not
    from plugins.eo_sar.scene_embedding import SceneEmbedSettings, already_done

    def settings(**kw):
        return SceneEmbedSettings(out_dir=str(tmp_path / "maps"), model=str(model), window=W, dims=3, batch_size=8, **kw)

    assert [r.path for r in already_done([scene], settings())] == [str(out)]
    assert already_done([scene], settings(seed=5)) is None
    assert already_done([scene], settings(stride=16)) is None


def test_band_names_of_pooled_and_projected_maps():
    from plugins.eo_sar.scene_embedding import band_descriptions

    assert band_descriptions(64, None)[:2] == ("feature_000", "feature_001")
    assert band_descriptions(64, None)[-1] == "feature_063" and len(band_descriptions(64, None)) == 64
    assert band_descriptions(1024, None)[-1] == "feature_1023" and band_descriptions(1024, None)[0] == "feature_0000"
    assert band_descriptions(3, 3) == ("PC1", "PC2", "PC3")


def _commands(group: click.Group, ctx: click.Context, path: list[str]):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, click.Context(cmd, info_name=name, parent=ctx), [*path, name])
        else:
            yield [*path, name], cmd


def test_every_option_has_help_and_shows_its_default():
    from domainfm import plugins
    from domainfm.cli import main

    unset = getattr(click.core, "UNSET", None)
    checked, missing = 0, []
    for path, cmd in _commands(main, click.Context(main, info_name="domainfm"), ["domainfm"]):
        variants = [[]]
        if path[-1] in ("pretrain", "finetune", "evaluate", "predict"):  # each plugin's own flags too
            variants = [["--plugin", n] for n in plugins.names()
                        if path[-1] == "predict" or path[-1] in (getattr(plugins.load(n), "supported", None)
                                                                  or (path[-1],))]
        for extra in variants:
            ctx = click.Context(cmd, info_name=" ".join(path), resilient_parsing=True)
            if extra:
                cmd.parse_args(ctx, list(extra))
            for p in cmd.get_params(ctx):
                if not isinstance(p, click.Option) or p.hidden or p.name in ("help", "version"):
                    continue
                record = p.get_help_record(ctx)
                text = record[1] if record else ""
                where = f"{' '.join(path + extra)} {p.opts[0]}"
                checked += 1
                if not (p.help or "").strip():
                    missing.append(f"{where}: no help")
                value_default = p.default not in (None, unset, ()) and not (p.is_flag and not p.secondary_opts)
                if value_default and not p.required and "[default:" not in text:
                    missing.append(f"{where}: default {p.default!r} not shown")
    assert checked > 200 and not missing, missing

    runner = CliRunner()
    # the defaults that are computed say what they are
    text = " ".join(runner.invoke(main, ["pretrain", "--help"], terminal_width=400).output.split())
    assert "Stop after this many epochs. [default: no limit with --max-steps, else 10]" in text
    assert "[default: the whole batch at once]" in text
    embed = " ".join(runner.invoke(main, ["eo-sar", "embed", "--help"], terminal_width=400).output.split())
    assert "--accelerator [auto|cpu|gpu] Where the model runs" in embed


def test_mlflow_ui_hint_names_the_artifact_root_the_runs_use(tmp_path, monkeypatch):
    from domainfm import tracking
    from domainfm.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    hint = "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts"
    assert hint in [line.strip() for line in out.splitlines()], out  # one line to copy, even at 80 columns
    # the folder the hint names is where a new experiment of the default store puts its files
    assert tracking.artifact_root() == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    for doc in (tracking.artifact_root.__doc__, main.help):
        assert "--default-artifact-root" in doc


@pytest.mark.timeout(900)
def test_one_step_run_does_not_warn_of_a_stalled_loss_and_the_bar_shows_a_small_lr(tmp_path, toy_env):
    import mlflow

    r = run_cli(["pretrain", "--plugin", "toy", "--backbone", "test_vit", "--init", "random", "--img-size", "32",
                 "--batch-size", "8", "--num-samples", "16", "--proj-dim", "32", "--max-steps", "1", "--lr", "1e-5",
                 "--warmup-steps", "0", "--json", "out.json"], cwd=tmp_path, env={**toy_env, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    run_id = json.loads((tmp_path / "out.json").read_text())["mlflow_run_id"]
    hist = mlflow.MlflowClient(toy_env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "loss/total")
    assert [m.step for m in hist] == [0]  # one logged value: nothing to say about movement
    assert "did not move" not in r.stderr, r.stderr
    lrs = mlflow.MlflowClient(toy_env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "lr")
    shown = f"lr: {lrs[-1].value:.1e}"
    assert shown == "lr: 1.0e-05"  # no warm-up: the peak rate from the first step
    assert shown in r.stdout + r.stderr and "lr: 0.000" not in r.stdout + r.stderr
