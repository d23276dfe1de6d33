"""DataLoader workers never fork a threaded process (issue 9, items 1 and 12).

- ``histo embed --coords`` on a mixed batch (pyramidal TIFF, small PNG crop, blank-glass scan) with
  workers hung in most runs: a worker was forked while the thread preparing the next slide was
  inside an import. The batch is run repeatedly here, under a timeout, and must give the features
  of a run without workers.
- The kind, made deterministic: a thread holds a lock the dataset needs while workers start; a
  forked worker would inherit it held and wait for ever (the DataLoader's timeout turns that into
  an error); the product's workers start clean.
- The default number of workers is what the machine has (no torch warning on a small machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset

from conftest import DOMAINFM, load_make_data
from domainfm.data import default_num_workers, loader_kwargs, worker_start_method
from plugins.histo.commands import embed_command, tile_command

TILING = ["--mpp", "2", "--tile-size", "32", "--slide-mpp", "0.5"]
COMMON = [*TILING, "--batch-size", "4"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_batch")
    load_make_data("histo").make_mixed_batch(root / "slides")
    res = CliRunner().invoke(tile_command, [str(root / "slides"), "--out", str(root / "tiles"), *TILING])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("test_resnet", img_size=32, init="random"),
                         tmp_path_factory.mktemp("workers_weights") / "encoder.safetensors")


def read_features(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = {}
    for f in sorted((out / "features").glob("*.h5")):
        with h5py.File(f) as h:
            found[f.stem] = (h["features"][:], h["coords"][:])
    return found


@pytest.mark.timeout(900)
def test_mixed_batch_with_workers_never_hangs_and_matches_no_workers(batch, weights, tmp_path):
    args = [str(batch / "slides"), "--coords", str(batch / "tiles"), "--model", str(weights), *COMMON]
    ref = CliRunner().invoke(embed_command, [*args, "--out", str(tmp_path / "ref"), "--num-workers", "0"])
    assert ref.exit_code == 0, ref.output
    expected = read_features(tmp_path / "ref")
    assert set(expected) == {"a_pyramid", "b_crop", "c_blank"}
    assert len(expected["a_pyramid"][1]) > 3 and len(expected["c_blank"][1]) == 0  # blank glass: no tile
    # three runs reusing the coords, then one that tiles as it goes (the next slide is prepared in a
    # thread while this one's workers start)
    tile_now = [a for a in args if a not in ("--coords", str(batch / "tiles"))]
    for run, run_args in enumerate([args, args, args, tile_now]):
        out = tmp_path / f"run{run}"
        res = CliRunner().invoke(embed_command, [*run_args, "--out", str(out), "--num-workers", "2"])
        assert res.exit_code == 0, res.output
        got = read_features(out)
        assert set(got) == set(expected)
        for sid, (feats, coords) in expected.items():
            np.testing.assert_array_equal(got[sid][1], coords)
            np.testing.assert_allclose(got[sid][0], feats, rtol=1e-5, atol=1e-5)


_LOCK = threading.Lock()


class _NeedsTheLock(Dataset):
    """Each item takes a module-level lock, as an import or a library's global lock would."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        with _LOCK:
            return torch.tensor(i)


@pytest.mark.timeout(300)
def test_workers_start_clean_while_a_thread_holds_a_lock():
    assert worker_start_method() in ("forkserver", "spawn")
    held, release = threading.Event(), threading.Event()

    def holder():
        with _LOCK:
            held.set()
            release.wait()

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    try:
        # a forked worker would inherit _LOCK held and time out here
        loader = DataLoader(_NeedsTheLock(), batch_size=2, **loader_kwargs(2, timeout=120))
        batches = [b.tolist() for b in loader]
    finally:
        release.set()
        t.join()
    assert batches == [[0, 1], [2, 3]]


def test_no_workers_starts_nothing():
    assert loader_kwargs(0) == {"num_workers": 0}


def _one_cpu():
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
@pytest.mark.timeout(600)
def test_default_workers_follow_the_cpus_the_process_may_use(batch, weights, tmp_path):
    code = "from domainfm.data import default_num_workers; print(default_num_workers())"
    one = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=_one_cpu)
    assert one.stdout.strip() == "1"
    assert default_num_workers() == min(4, len(os.sched_getaffinity(0)))
    # `histo embed` without --num-workers on a one-CPU process: no torch warning about too many workers
    r = subprocess.run([str(DOMAINFM), "histo", "embed", str(batch / "slides" / "a_pyramid.tif"),
                        "--coords", str(batch / "tiles"), "--model", str(weights), "--out", str(tmp_path), *COMMON],
                       capture_output=True, text=True, timeout=500, preexec_fn=_one_cpu,
                       env={**os.environ, "PYTHONWARNINGS": "always"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "suggested max number of worker" not in r.stderr and "Warning" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "features" / "a_pyramid.h5").is_file()
