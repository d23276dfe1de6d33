"""One rank of a multi-process job fails: the whole job ends at once, with one line naming the rank
and its cause, exit status 2, what finished kept for a rerun, and no process left behind.

The failure is a real one: a scene whose pixel data is broken only in the rows one rank's share
covers (a download cut short: the file ends early; or a stretch of the file overwritten), read by
rasterio/GDAL. With ``--window 28 --stride 7`` a 300-row scene has 40 window rows = 3 tile rows of
16 (scene rows 0-132, 112-244, 224-299); with 2 processes rank 0 computes tile rows 0 and 2 and
rank 1 tile row 1 (:func:`domainfm.distributed.shard`). So

- cutting the file at scene row 260 breaks only tile row 2: rank 0 fails, after finishing row 0;
- garbling scene rows 150-199 breaks only tile row 1: rank 1 fails.

Before the fix the first case printed the line without its rank and left rank 1 running alone after
the command returned, until its next collective raised a gloo traceback; in the second, rank 0
either died of a gloo "Connection closed by peer" traceback (exit 1) or was SIGKILLed by Lightning's
launcher (exit 137, the MLflow run left RUNNING), whichever came first.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import load_make_data, run_cli, run_statuses

make_data = load_make_data("eo_sar")

W = 28
ARGS = ["--window", str(W), "--stride", "7", "--batch-size", "16", "--accelerator", "cpu", "--devices", "2"]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
MESSAGE = "truncated or corrupt GeoTIFF (its pixel data ends early or cannot be decoded)"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A 13 x 300 x 60 Sentinel-2 scene, a random-init ViT-S/14 export recording its bands, and two
    broken copies: cut at the strip holding scene row 260, and rows 150-199 overwritten."""
    import rasterio
    import torch

    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    root = tmp_path_factory.mktemp("rank_failures")
    torch.manual_seed(0)
    b = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=tuple(1000.0 + 50 * i for i in range(13)),
                             std=tuple(500.0 + 10 * i for i in range(13)), modality="s2", gsd_m=10.0,
                             units="reflectance x 10000")
    model = save_backbone(b, root / "model.safetensors")
    good = make_data.write_scene(root / "scene.tif", width=60, nodata_box=(40, 30))
    with rasterio.open(good) as src:  # where GDAL stored the strips holding those rows
        rows_per_strip = src.block_shapes[0][0]

        def offset(row):
            return int(src.get_tag_item(f"BLOCK_OFFSET_0_{row // rows_per_strip}", "TIFF", bidx=1))

        cut, garble = offset(260), (offset(150), offset(200))
    truncated, garbled = root / "truncated.tif", root / "garbled.tif"
    shutil.copy(good, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(cut)
    shutil.copy(good, garbled)
    with open(garbled, "r+b") as fh:
        fh.seek(garble[0])
        fh.write(np.random.default_rng(0).integers(0, 256, garble[1] - garble[0], dtype=np.uint8).tobytes())
    return {"model": model, 0: truncated, 1: garbled}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_one_rank_failing_ends_every_rank_with_one_line(scenes, failing_rank, tmp_path, mlflow_store):
    scene, out = scenes[failing_rank], tmp_path / "out"
    # returns only once every process has closed its stderr: none is left running
    r = run_cli(["eo-sar", "embed", str(scene), "--model", str(scenes["model"]), *ARGS, "--out", str(out)],
                env=ENV, timeout=500)
    assert r.returncode == 2, r.stderr[-3000:]  # not 137 (SIGKILLed by the launcher), not 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank {failing_rank} of 2: {scene}: {MESSAGE}. "
                      "Fix: re-export or re-download the file, or remove it."], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Connection closed by peer" not in r.stderr, r.stderr[-3000:]
    # nothing assembled; what finished is kept, whole, for a rerun
    assert not (out / "scene_embedding.tif").exists() and not list(out.glob("*.tif"))
    parts = out / f"{scene.stem}_embedding.parts"
    rows = sorted(p.name for p in parts.glob("row_*.npy"))
    broken_row = 2 if failing_rank == 0 else 1
    assert f"row_{broken_row:05d}.npy" not in rows
    if failing_rank == 0:  # rank 0 finished its first row before it reached the cut
        assert "row_00000.npy" in rows
    for name in rows:
        t = int(name[4:9])
        assert np.load(parts / name).shape == (16 if t < 2 else 8, 6, 384)
    # rank 0 ended through the command, not by a signal: its MLflow run is marked failed
    assert run_statuses(mlflow_store, "domainfm-eo-sar") == ["FAILED"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_ddp_pretraining_rank_that_meets_a_broken_patch_ends_the_job(scenes, tmp_path, mlflow_store):
    """``pretrain --devices 2 --strategy ddp``: one training patch's pixel data is overwritten (its
    header intact). Normalising with the backbone's recorded statistics, nothing reads its pixels
    before training; the rank whose share holds it fails in its DataLoader, inside the DDP loop
    where the other rank waits in the gradient all-reduce. Both end with the one line."""
    import re

    import rasterio

    train = make_data.write_dataset(tmp_path / "train", n_patches=8, modalities=("s2",))
    broken = train / "s2" / "p03.tif"
    with rasterio.open(broken) as src:  # its first strip of pixels, overwritten; the header intact
        offset, size = (int(src.get_tag_item(f"BLOCK_{k}_0_0", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    with open(broken, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--data", str(train), "--weights", str(scenes["model"]),
                 "--stats", "backbone", "--img-size", "28", "--batch-size", "2", "--proj-dim", "16",
                 "--max-steps", "8", "--num-workers", "0", "--devices", "2", "--strategy", "ddp",
                 "--accelerator", "cpu"], cwd=tmp_path, env=ENV, timeout=800)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: rank [01] of 2: {re.escape(str(broken))}: {re.escape(MESSAGE)}\. Fix: .*", errors[0]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Connection closed by peer" not in r.stderr, r.stderr[-3000:]
    assert run_statuses(mlflow_store, "domainfm-eo-sar") == ["FAILED"]
