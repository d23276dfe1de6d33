"""``domainfm eo-sar embed``: geometry against hand-computed values, one window against the backbone
run by hand, dense features, PCA projection, resume bit for bit, and each bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner

from tests.conftest import load_make_data

make_data = load_make_data("eo_sar")

MEAN = tuple(1000.0 + 50 * i for i in range(13))
STD = tuple(500.0 + 10 * i for i in range(13))
W = 28  # window: 2 x 2 patches of 14 px


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 13 x 300 x 260 scene (nodata corner rows 0-119, cols 0-99), a Sentinel-1 scene, and a
    random-init ViT-S/14 export that records its 13 bands and statistics."""
    import torch

    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    b = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=MEAN, std=STD, modality="s2", gsd_m=10.0,
                             units="reflectance x 10000")
    model = save_backbone(b, root / "model.safetensors")
    return {"scene": make_data.write_scene(root / "scene.tif"), "s1": make_data.write_s1_scene(root / "s1.tif"),
            "model": model, "root": root}


def _embed(args, files, out: Path):
    from domainfm.cli import main

    return CliRunner().invoke(main, ["eo-sar", "embed", str(files["scene"]), "--model", str(files["model"]),
                                     "--out", str(out), "--window", str(W), "--batch-size", "8", *args])


def _window_by_hand(files, row_off, col_off, *, dense=False, scene=None):
    """Read and normalise one window directly, invalid pixels at the mean (0), and run the backbone."""
    import torch
    from rasterio.windows import Window

    from domainfm.backbones import create_backbone
    from plugins.eo_sar.radiometry import read_patch

    img, names, info = read_patch(scene or files["scene"], modality="s2", window=Window(col_off, row_off, W, W))
    x = (img - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]
    x[:, ~info.valid] = 0.0
    b = create_backbone(files["model"], img_size=W).eval()
    with torch.no_grad():
        t = torch.from_numpy(x[None])
        if dense:
            return b.model.forward_features(t)[0, b.model.num_prefix_tokens:].reshape(2, 2, -1).numpy()
        return b(t)[0].numpy()


def test_pooled_map_geometry_nodata_and_one_window(files, tmp_path, mlflow_store):
    import mlflow

    out = tmp_path / "out"
    r = _embed([], files, out)
    assert r.exit_code == 0, r.output
    tif = out / "scene_embedding.tif"
    with rasterio.open(tif) as src:
        # ceil((300 - 28) / 28) + 1 = 11 rows, ceil((260 - 28) / 28) + 1 = 10 cols, 384 features
        assert (src.count, src.height, src.width) == (384, 11, 10)
        assert src.crs.to_epsg() == 32632
        assert src.transform == Affine(280.0, 0.0, 500_000.0, 0.0, -280.0, 5_000_000.0)
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
        assert src.profile["tiled"] and src.block_shapes[0] == (16, 16)
        assert src.compression.name == "deflate"
        data = src.read()
    nodata = np.isnan(data).all(axis=0)
    assert not (np.isnan(data).any(axis=0) & ~nodata).any()
    expected = np.zeros((11, 10), bool)
    expected[0:4, 0:4] = True   # corner rows 0-119 x cols 0-99: windows 0-3 wholly, col 3 16/28 of it (> 0.5)
    expected[:, 9] = True       # cols 252-279 of a 260 px scene: 20/28 past the edge
    np.testing.assert_array_equal(nodata, expected)
    # row 4 (px 112-139) has 8/28 nodata rows: kept, the nodata pixels at the band mean
    np.testing.assert_allclose(data[:, 5, 4], _window_by_hand(files, 140, 112), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(data[:, 4, 3], _window_by_hand(files, 112, 84), atol=2e-4, rtol=1e-4)

    preview = out / "scene_embedding.preview.png"
    assert preview.stat().st_size > 1000 and not list(out.glob("*.partial")) and not list(out.glob("*.progress.json"))
    run = mlflow.search_runs(experiment_names=["domainfm-eo-sar"], output_format="list")[0]
    assert run.data.params["window"] == str(W) and run.data.params["dense"] == "False"
    assert run.data.tags["domainfm.model_source"] == str(files["model"])
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "previews")]
    assert arts == ["previews/scene_embedding.preview.png"]


def test_dense_patch_features(files, tmp_path, mlflow_store):
    out = tmp_path / "dense"
    r = _embed(["--dense"], files, out)
    assert r.exit_code == 0, r.output
    with rasterio.open(out / "scene_dense.tif") as src:
        assert (src.count, src.height, src.width) == (384, 22, 20)  # 2 x 2 patches per window
        assert src.transform == Affine(140.0, 0.0, 500_000.0, 0.0, -140.0, 5_000_000.0)
        block = src.read(window=((10, 12), (8, 10)))  # window (5, 4): scene rows 140-167, cols 112-139
    np.testing.assert_allclose(np.moveaxis(block, 0, -1), _window_by_hand(files, 140, 112, dense=True),
                               atol=2e-4, rtol=1e-4)


def test_overlapping_windows_centre_their_pixels(files, tmp_path, mlflow_store):
    out = tmp_path / "overlap"
    r = _embed(["--stride", "14"], files, out)
    assert r.exit_code == 0, r.output
    with rasterio.open(out / "scene_embedding.tif") as src:
        # ceil(272 / 14) + 1 = 21 rows, ceil(232 / 14) + 1 = 18 cols; pixels 14 px, shifted by (28 - 14) / 2 = 7 px
        assert (src.height, src.width) == (21, 18)
        assert src.transform == Affine(140.0, 0.0, 500_070.0, 0.0, -140.0, 4_999_930.0)
        px = src.read(window=((10, 11), (8, 9)))[:, 0, 0]  # window at rows 140-167, cols 112-139
    np.testing.assert_allclose(px, _window_by_hand(files, 140, 112), atol=2e-4, rtol=1e-4)


def test_dims_projection_saved_reproducible_and_resume_bit_identical(files, tmp_path, mlflow_store):
    full = tmp_path / "full"
    r = _embed(["--dense", "--dims", "4", "--pca-windows", "40"], files, full)
    assert r.exit_code == 0, r.output
    with np.load(full / "scene_dense.pca.npz") as z:
        mean, comp = z["mean"], z["components"]
    assert comp.shape == (4, 384)
    meta = json.loads((full / "scene_dense.pca.json").read_text())
    assert meta["dims"] == 4 and meta["seed"] == 0 and len(meta["explained_variance_ratio"]) == 4

    # the projection is the saved PCA applied to the dense features (a run without --dims)
    plain = tmp_path / "plain"
    assert _embed(["--dense"], files, plain).exit_code == 0
    with rasterio.open(plain / "scene_dense.tif") as a, rasterio.open(full / "scene_dense.tif") as b:
        feats, proj = a.read(), b.read()
    want = np.einsum("dhw,kd->khw", feats.astype(np.float64) - mean[:, None, None], comp)
    np.testing.assert_allclose(proj, want, atol=1e-4, equal_nan=True)

    # killed after the first of its two tile rows (11 window rows, 8 per 16-row tile row), then resumed
    part = tmp_path / "part"
    r = _embed(["--dense", "--dims", "4", "--pca-windows", "40", "--stop-after-rows", "1"], files, part)
    assert r.exit_code == 0, r.output
    assert not (part / "scene_dense.tif").exists() and (part / "scene_dense.tif.partial").exists()
    assert json.loads((part / "scene_dense.progress.json").read_text())["tile_rows_done"] == 1
    r = _embed(["--dense", "--dims", "4", "--pca-windows", "40"], files, part)
    assert r.exit_code == 0, r.output
    assert "resuming scene_dense.tif after 1 of 2 tile rows" in r.stderr
    for name in ("scene_dense.tif", "scene_dense.pca.npz", "scene_dense.pca.json"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    assert not (part / "scene_dense.progress.json").exists()


@pytest.mark.timeout(600)
def test_reader_threads_and_column_groups_write_the_same_map(files, tmp_path, mlflow_store):
    """A tiled scene wider than one read (64-px tiles, 2300 px): read in column groups whose edges
    fall on tile edges, 1 reader thread and 3 write the same GeoTIFF bit for bit, and a window of
    the second group is the backbone run by hand on it."""
    from domainfm.backbones import create_backbone
    from plugins.eo_sar.scene_embedding import SceneEmbedSettings, plan_scene

    scene = make_data.write_scene(tmp_path / "wide.tif", height=64, width=2300, tiled=True, block=64,
                                  nodata_box=(30, 40), seed=7)
    # lcm(28, 64) = 448 px = 16 windows from tile edge to tile edge; 2048 // 448 = 4 of them per read:
    # 64 windows; ceil((2300 - 28) / 28) + 1 = 83 columns -> groups 0-63 and 64-82, each top to bottom
    spec = create_backbone(files["model"], img_size=W).input_spec
    sp = plan_scene(scene, SceneEmbedSettings(out_dir=str(tmp_path), model=str(files["model"]), window=W), spec, 14)
    assert sp.chunks(0, 3, 8) == [(0, 0, 64), (1, 0, 64), (2, 0, 64), (0, 64, 83), (1, 64, 83), (2, 64, 83)]
    sp.close()

    from domainfm.cli import main

    maps = []
    for threads in ("1", "3"):
        out = tmp_path / f"threads{threads}"
        r = CliRunner().invoke(main, ["eo-sar", "embed", str(scene), "--model", str(files["model"]), "--out", str(out),
                                      "--window", str(W), "--batch-size", "8", "--reader-threads", threads])
        assert r.exit_code == 0, r.output
        with rasterio.open(out / "wide_embedding.tif") as src:
            assert (src.count, src.height, src.width) == (384, 3, 83)
            maps.append(src.read())
    assert np.array_equal(maps[0], maps[1], equal_nan=True)
    # nodata: window (0, 0) in the 30 x 40 corner; row 2 (px 56-83 of 64) and column 82 mostly past the edge
    nodata = np.isnan(maps[0]).all(axis=0)
    assert nodata[0, 0] and nodata[2].all() and nodata[:, 82].all() and not np.isnan(maps[0][:, :2, 1:82]).any()
    np.testing.assert_allclose(maps[1][:, 1, 70], _window_by_hand(files, 28, 70 * W, scene=scene),
                               atol=2e-4, rtol=1e-4)


def _one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_are_one_line_and_leave_nothing(files, tmp_path, mlflow_store):
    from domainfm.cli import main

    out = tmp_path / "bad"
    r = CliRunner().invoke(main, ["eo-sar", "embed", str(files["s1"]), "--model", str(files["model"]),
                                  "--out", str(out), "--window", str(W)])
    _one_line_error(r, f"{files['s1']}: cannot align the scene's bands to the model", "(VV, VH)",
                    "have no band in common")
    r = _embed(["--window", "308"], files, out)
    _one_line_error(r, f"{files['scene']}: the scene is 300 x 260 px, smaller than --window 308",
                    "Fix: pass --window 260 or less")
    r = _embed(["--tome-r", "3"], files, out)  # 4 patch tokens: at most 2 merged
    _one_line_error(r, "--tome-r 3 is too large", "it has 4 patch tokens")
    r = _embed(["--dense", "--stride", "14"], files, out)
    _one_line_error(r, "--dense needs --window and --stride in whole 14-px patches")
    r = _embed(["--dims", "500"], files, out)  # ViT-S: 384 features
    _one_line_error(r, "--dims 500 is more than the model's 384 features", "Fix: pass --dims 384 or less")
    r = CliRunner().invoke(main, ["eo-sar", "embed", str(files["scene"]), "--model", str(files["model"]),
                                  "--out", str(out), "--window", "252", "--stride", "252", "--dims", "8"])  # windows to the edges: 2 x 2
    _one_line_error(r, f"{files['scene']}: --dims 8 needs at least 8 samples to fit its principal components, "
                       "and this scene's sample of 4 window(s) has 1 valid window(s) (the others are mostly nodata).",
                    "Fix: pass --dims 1 or less, or a smaller --stride for more windows.")  # 3 reach past the edges
    assert not out.exists()


def _read_all(path):
    with rasterio.open(path) as src:
        return src.read(), src.transform, src.crs, src.nodata, src.profile["blockysize"]


# stride 7: ceil((300 - 28) / 7) + 1 = 40 window rows -> 3 tile rows of 16 (16, 16, 8), 35 columns
SHARD_ARGS = ["--window", str(W), "--stride", "7", "--batch-size", "16", "--dims", "4", "--pca-windows", "40",
              "--accelerator", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # the same arithmetic in every process


def _embed_cli(files, out, *extra):
    from tests.conftest import run_cli

    return run_cli(["eo-sar", "embed", str(files["scene"]), "--model", str(files["model"]), *SHARD_ARGS,
                    "--out", str(out), *extra], env=ONE_THREAD, timeout=800)


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory):
    """The single-process output of the sharded tests' settings."""
    out = tmp_path_factory.mktemp("one_process")
    r = _embed_cli(files, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_write_what_one_process_writes_and_a_rerun_computes_only_the_rows_left(
        files, one_process, tmp_path, mlflow_store):
    """--devices 2: two CPU processes under Lightning's launcher (gloo) share the tile rows. A run
    stopped early leaves rows behind, one finished row is then cut short and a writer's temp file is
    left over: the rerun computes exactly the rows missing, and the GeoTIFF rank 0 assembles equals
    the single-process one (data, transform, CRS, nodata, tiling), the --dims projection fitted once
    by rank 0 (in the first run, reused by the rerun); one MLflow run per command, opened by rank 0.
    (One test: a separate uninterrupted two-process run would prove nothing this does not.)"""
    import mlflow

    res = tmp_path / "resume"
    # each rank stops after one of its rows (rank 0 has rows 0 and 2, rank 1 row 1)
    r = _embed_cli(files, res, "--devices", "2", "--stop-after-rows", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scene.tif: tile rows computed [0, 1] by 2 processes, 0 of 3 already done" in r.stderr
    parts = res / "scene_embedding.parts"
    assert sorted(p.name for p in parts.glob("row_*.npy")) == ["row_00000.npy", "row_00001.npy"]
    assert not (res / "scene_embedding.tif").exists()
    row1 = parts / "row_00001.npy"
    row1.write_bytes(row1.read_bytes()[:1000])  # died half-copied
    (parts / ".row_00002.4242.tmp.npy").write_bytes(b"half")  # a killed writer's temp file
    r = _embed_cli(files, res, "--devices", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scene.tif: tile rows computed [1, 2] by 2 processes, 1 of 3 already done" in r.stderr  # row 0 not redone
    one = _read_all(one_process / "scene_embedding.tif")
    two = _read_all(res / "scene_embedding.tif")
    assert one[0].shape == (4, 40, 35)
    np.testing.assert_array_equal(one[0], two[0])  # NaN nodata in the same places, every value equal
    assert one[1] == two[1] == Affine(70.0, 0.0, 500_105.0, 0.0, -70.0, 4_999_895.0)  # 7 px, centred: + (28 - 7) / 2 px
    assert one[2] == two[2] and two[2].to_epsg() == 32632
    assert np.isnan(one[3]) and np.isnan(two[3]) and one[4] == two[4] == 16
    assert not parts.exists()
    # the projection saved by the first run was reused: the same bytes as one process's
    for name in ("scene_embedding.pca.npz", "scene_embedding.pca.json"):
        assert (one_process / name).read_bytes() == (res / name).read_bytes(), name
    assert sorted(p.name for p in res.iterdir()) == [
        "scene_embedding.pca.json", "scene_embedding.pca.npz", "scene_embedding.preview.png", "scene_embedding.tif"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)  # this test's store (the CLI ran in it)
    runs = client.search_runs([client.get_experiment_by_name("domainfm-eo-sar").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # one per command: the worker opened none
    assert runs[1].data.metrics["tile_rows_computed"] == 2.0


def test_num_nodes_without_launcher_is_one_line(files, tmp_path, mlflow_store, monkeypatch):
    import os

    for v in [v for v in os.environ if v.startswith("SLURM_")] + [
            "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "LSB_JOBID"]:
        monkeypatch.delenv(v, raising=False)
    out = tmp_path / "nodes"
    r = _embed(["--num-nodes", "2"], files, out)
    _one_line_error(r, "error: --num-nodes 2 needs a launcher's environment", "MASTER_ADDR, MASTER_PORT and NODE_RANK",
                    "srun")
    assert not out.exists()


def _embedding_tif(path: Path, x: np.ndarray) -> Path:
    """x [C, H, W] float32 (NaN = nodata) as a tiled GeoTIFF like the ones embed writes."""
    profile = dict(driver="GTiff", width=x.shape[2], height=x.shape[1], count=x.shape[0], dtype="float32",
                   crs="EPSG:32632", transform=Affine(140, 0, 500000, 0, -140, 5000000), nodata=float("nan"),
                   tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(x)
    return path


def test_preview_components_equal_a_direct_pca_and_a_sample_fit_spans_the_same_components(tmp_path):
    """The preview's PCA reads the map piece by piece (memory bounded whatever its size): with every
    pixel in the fit it equals numpy's PCA of the whole map; fitted on a grid sample of a map with
    three strong directions it gives the same three components (up to sign)."""
    from plugins.eo_sar.scene_embedding import _stretch, preview_components

    rng = np.random.default_rng(0)
    C, H, W = 12, 37, 45
    basis = rng.normal(size=(3, C)) * np.array([[9.0], [4.0], [1.5]])
    coef = rng.normal(size=(H * W, 3))
    x = (coef @ basis + 0.01 * rng.normal(size=(H * W, C))).astype(np.float32).T.reshape(C, H, W)
    x[:, :4, :6] = np.nan                                   # a nodata corner
    tif = _embedding_tif(tmp_path / "emb.tif", x)

    # independent: numpy's SVD of every valid pixel, as float64
    v = np.moveaxis(x, 0, -1).astype(np.float64)
    valid = np.isfinite(v).all(axis=-1)
    centred = v[valid] - v[valid].mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    direct = np.zeros((H, W, 3))
    direct[valid] = centred @ vt[:3].T

    rgb, ok = preview_components(tif, fit_pixels=H * W)
    np.testing.assert_array_equal(ok, valid)
    np.testing.assert_allclose(rgb, _stretch(direct, valid), atol=1e-5)

    sampled, ok = preview_components(tif, fit_pixels=256)     # a grid of every 3rd pixel fits it
    np.testing.assert_array_equal(ok, valid)
    for i in range(3):  # each channel the same picture (a component's sign is arbitrary)
        r = np.corrcoef(sampled[..., i][valid], rgb[..., i][valid])[0, 1]
        assert abs(r) > (0.99 if i == 0 else 0.95), (i, r)  # later components rotate a little with the sample
