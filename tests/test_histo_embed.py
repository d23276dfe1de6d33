"""histo embed: features equal a direct forward pass on tiles read by OpenSlide; workers, --coords,
reruns, failures and bf16 behave; the CLAM/TRIDENT HDF5 layout is what h5py reads back."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from plugins.histo.commands import embed_command, tile_command
from conftest import load_make_data

COMMON = ["--mpp", "2", "--tile-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return load_make_data("histo").make_slides(tmp_path_factory.mktemp("histo_embed_slides"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread is many times faster than two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random ResNet (timm's test_resnet) saved as a domainfm export: every test sees the
    same encoder."""
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("test_resnet", img_size=32, init="random"),
                         tmp_path_factory.mktemp("histo_weights") / "encoder.safetensors")


def embed(args, **kw):
    return CliRunner().invoke(embed_command, [str(a) for a in args], **kw)


def read_h5(path):
    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def expected_features(slide_path, coords, level, read_size, tile_size, weights):
    """Independent of the plugin: OpenSlide read, Pillow resize, timm normalisation, forward."""
    import openslide
    from PIL import Image

    from domainfm.backbones import create_backbone

    model = create_backbone(weights, img_size=tile_size).eval()
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    slide = openslide.OpenSlide(str(slide_path))
    tiles = []
    for x, y in coords:
        rgba = slide.read_region((int(x), int(y)), level, (read_size, read_size))
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        # whole downsampling factors are box averages (an exact area mean), see slides.resize_tile
        if read_size % tile_size == 0 and read_size > tile_size:
            k = read_size // tile_size
            arr = np.asarray(rgb, np.float64).reshape(tile_size, k, tile_size, k, 3).mean(axis=(1, 3))
            tiles.append(np.floor(arr + 0.5))  # Pillow rounds halves up
        else:
            tiles.append(np.asarray(rgb.resize((tile_size, tile_size), Image.Resampling.BILINEAR)))
    x = torch.from_numpy(np.stack(tiles).astype(np.float32)).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        return model((x - mean) / std).numpy()


def test_features_equal_a_direct_forward_pass(slides, weights, tmp_path):
    res = embed([slides["svs"], slides["tiff"], "--out", tmp_path, "--model", weights, "--num-workers", "0", *COMMON])
    assert res.exit_code == 0, res.output
    # 2 µm/px: the SVS (0.25) reads level 1 (1 µm/px, 64 px), the TIFF (0.5) level 1 (2 µm/px, 32 px)
    for key, level, read_size, size0 in (("svs", 1, 64, 256), ("tiff", 1, 32, 128)):
        feats, coords, attrs = read_h5(tmp_path / "features" / f"{Path(slides[key]).stem}.h5")
        assert feats.dtype == np.float32 and feats.shape == (len(coords), 96) and len(coords) > 3
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert attrs["mpp"] == 2.0 and attrs["tile_size"] == 32 and attrs["tile_size_level0"] == size0
        assert attrs["encoder"] == str(weights) and attrs["domainfm_version"]
        ref = expected_features(slides[key], coords, level, read_size, 32, weights)
        np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)


def test_workers_and_reused_coords_give_the_same_features(slides, weights, tmp_path):
    base = tmp_path / "base"
    assert embed([slides["tiff"], "--out", base, "--model", weights, "--num-workers", "0", *COMMON]).exit_code == 0
    tiles = tmp_path / "tiles"
    assert CliRunner().invoke(tile_command, [str(slides["tiff"]), "--out", str(tiles), "--mpp", "2",
                                             "--tile-size", "32"]).exit_code == 0
    other = tmp_path / "other"
    res = embed([slides["tiff"], "--out", other, "--model", weights, "--num-workers", "2", "--coords", tiles, *COMMON])
    assert res.exit_code == 0, res.output
    f0, c0, _ = read_h5(base / "features" / "generic_20x.h5")
    f1, c1, _ = read_h5(other / "features" / "generic_20x.h5")
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_allclose(f0, f1, rtol=1e-5, atol=1e-5)
    # coords made at another µm/px are refused, naming the fix
    res = embed([slides["tiff"], "--out", tmp_path / "x", "--model", weights, "--coords", tiles,
                 "--mpp", "1", "--tile-size", "32"])
    assert res.exit_code == 1 and "--mpp 2.0 --tile-size 32" in res.output


def test_failures_are_listed_and_a_rerun_skips_finished_slides(slides, weights, tmp_path):
    args = [slides["svs"], slides["truncated"], slides["no_mpp"], "--out", tmp_path, "--model", weights,
            "--num-workers", "0", *COMMON]
    res = embed(args)
    assert res.exit_code == 1
    assert "2 of 3 slides failed" in res.output
    rows = {r["slide_id"]: r["error"] for r in csv.DictReader(open(tmp_path / "failures.csv"))}
    assert set(rows) == {"truncated", "no_mpp"} and "--slide-mpp" in rows["no_mpp"]
    done = tmp_path / "features" / "aperio_40x.h5"
    stamp = done.stat().st_mtime_ns
    assert not list(tmp_path.rglob("*.partial"))
    # second run: the finished slide is skipped, the no-mpp slide now has a value, the truncated one still fails
    res = embed([*args, "--slide-mpp", "0.5"])
    assert res.exit_code == 1 and "1 already done" in res.output
    assert done.stat().st_mtime_ns == stamp
    assert (tmp_path / "features" / "no_mpp.h5").is_file()
    rows = {r["slide_id"] for r in csv.DictReader(open(tmp_path / "failures.csv"))}
    assert rows == {"truncated"}


def test_bf16_features_are_close_to_fp32(slides, weights, tmp_path):
    res = embed([slides["tiff"], "--out", tmp_path / "a", "--model", weights, "--num-workers", "0", *COMMON])
    assert res.exit_code == 0, res.output
    res = embed([slides["tiff"], "--out", tmp_path / "b", "--model", weights, "--num-workers", "0",
                 "--precision", "bf16-mixed", *COMMON])
    assert res.exit_code == 0, res.output
    fa, _, _ = read_h5(tmp_path / "a" / "features" / "generic_20x.h5")
    fb, _, _ = read_h5(tmp_path / "b" / "features" / "generic_20x.h5")
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() > 0.98
    assert not np.array_equal(fa, fb)  # bf16 really ran


def test_missing_pretrained_weights_is_one_clear_error(slides, tmp_path):
    """Offline with no cached DINOv2 weights: exit 2 naming --weights, nothing written."""
    res = embed([slides["tiff"], "--out", tmp_path, "--init", "dinov2", *COMMON])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "--weights" in res.output
    assert not (tmp_path / "features").exists()


def test_a_slide_failing_mid_read_leaves_no_file(slides, weights, tmp_path):
    """Damaged JPEG tiles: the slide opens and is tiled, then reading fails part-way. It is listed in
    failures.csv, no half-written features file is left, and the other slide is done."""
    res = embed([slides["corrupt"], slides["tiff"], "--out", tmp_path, "--model", weights, "--num-workers", "0",
                 "--mpp", "0.5", "--tile-size", "32", "--batch-size", "8"])
    assert res.exit_code == 1
    rows = {r["slide_id"]: r["error"] for r in csv.DictReader(open(tmp_path / "failures.csv"))}
    assert set(rows) == {"corrupt_jpeg"} and "Corrupt JPEG" in rows["corrupt_jpeg"]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["generic_20x.h5"]


def test_tile_dataset_plot(slides):
    from plugins.histo.datasets import SlideTileDataset
    from plugins.histo.tiling import tile_slide

    ts = tile_slide(slides["tiff"], mpp=2.0, tile_size=32)
    ds = SlideTileDataset(slides["tiff"], ts.coords, ts.geometry)
    sample = ds[0]
    assert sample["image"].shape == (32, 32, 3) and sample["image"].dtype == torch.uint8
    fig = ds.plot(sample)
    x, y = (int(v) for v in ts.coords[0])
    assert f"({x}, {y})" in fig.axes[0].get_title()


def test_registered_encoder_gives_the_same_features(slides, weights, tmp_path, mlflow_store):
    """--weights models:/NAME@ALIAS: the encoder comes from the MLflow registry (the core's loader)."""
    from domainfm import jobs, tracking
    from domainfm.backbones import create_backbone

    tracking.configure()
    with tracking.start_run(experiment="histo-test"):
        jobs.log_backbone(create_backbone(weights), register="histo-encoder", alias="champion")
    args = [slides["tiff"], "--num-workers", "0", *COMMON]
    assert embed([*args, "--out", tmp_path / "file", "--model", weights]).exit_code == 0
    res = embed([*args, "--out", tmp_path / "registry", "--model", "models:/histo-encoder@champion"])
    assert res.exit_code == 0, res.output
    f1, _, _ = read_h5(tmp_path / "file" / "features" / "generic_20x.h5")
    f2, _, a2 = read_h5(tmp_path / "registry" / "features" / "generic_20x.h5")
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    assert a2["encoder"] == "models:/histo-encoder@champion"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sharded_run_equals_one_process_exactly_and_resumes_only_what_is_missing(slides, weights, tmp_path):
    """Two CPU ranks under Lightning's DDP launcher share the slides; the union of their files is
    bit-identical to one process's, and a slide that fails (a truncated file) fails the same way
    (exit 1, the same failures.csv). A rerun after a rank died mid-slide (its stale partial file
    left behind) redoes that slide only and never touches a finished one."""
    import shutil

    from conftest import run_cli

    # one thread everywhere: the same arithmetic in every process, so equality can be exact
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    files = [str(slides["svs"]), str(slides["tiff"]), str(slides["no_mpp"]), str(slides["truncated"])]
    base = ["--model", str(weights), "--num-workers", "0", "--accelerator", "cpu", "--slide-mpp", "0.5", *COMMON]
    r = run_cli(["histo", "embed", *files, "--out", str(tmp_path / "one"), *base], cwd=tmp_path, env=env, timeout=400)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 of 4 slides failed" in r.stderr
    r = run_cli(["histo", "embed", *files, "--out", str(tmp_path / "two"), *base, "--devices", "2"], cwd=tmp_path,
                env=env, timeout=400)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "3 slides embedded" in r.stderr and "0 already done" in r.stderr and "1 of 4 slides failed" in r.stderr
    assert (tmp_path / "one" / "failures.csv").read_text() == (tmp_path / "two" / "failures.csv").read_text()
    sids = ["aperio_40x", "generic_20x", "no_mpp"]
    for sid in sids:
        f1, c1, a1 = read_h5(tmp_path / "one" / "features" / f"{sid}.h5")
        f2, c2, a2 = read_h5(tmp_path / "two" / "features" / f"{sid}.h5")
        assert len(f1) > 0
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(f1, f2)
        assert a1 == a2
    # the shares were disjoint: each slide's progress bar appeared under exactly one rank
    assert sorted(p.name for p in (tmp_path / "two" / "features").iterdir()) == [f"{s}.h5" for s in sids]

    # resume: aperio finished, generic_20x died mid-write (stale partial), no_mpp not started
    resume = tmp_path / "resume" / "features"
    resume.mkdir(parents=True)
    shutil.copy2(tmp_path / "one" / "features" / "aperio_40x.h5", resume / "aperio_40x.h5")
    stale = resume / ".generic_20x.h5.4242.partial"
    stale.write_bytes(b"half an HDF5 file")
    stamp = (resume / "aperio_40x.h5").stat().st_mtime_ns
    r = run_cli(["histo", "embed", *files, "--out", str(tmp_path / "resume"), *base, "--devices", "2"],
                cwd=tmp_path, env=env, timeout=400)
    assert r.returncode == 1, r.stderr[-2000:]  # the truncated slide fails again
    assert "2 slides embedded" in r.stderr and "1 already done" in r.stderr and "1 of 4 slides failed" in r.stderr
    assert (resume / "aperio_40x.h5").stat().st_mtime_ns == stamp  # the finished slide was not redone
    assert not stale.exists() and not list(resume.glob("*.partial"))
    for sid in ("generic_20x", "no_mpp"):
        np.testing.assert_array_equal(read_h5(resume / f"{sid}.h5")[0], read_h5(tmp_path / "one" / "features" / f"{sid}.h5")[0])


def test_num_nodes_without_launcher_is_one_line(slides, weights, tmp_path, monkeypatch):
    for v in [v for v in __import__("os").environ if v.startswith("SLURM_")] + [
            "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "LSB_JOBID"]:
        monkeypatch.delenv(v, raising=False)
    res = embed([slides["tiff"], "--out", tmp_path / "x", "--model", weights, "--num-nodes", "2", *COMMON])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --num-nodes 2 needs a launcher's environment"), res.output
    assert "MASTER_ADDR, MASTER_PORT and NODE_RANK" in lines[0] and "srun" in lines[0]
    assert not (tmp_path / "x").exists()
