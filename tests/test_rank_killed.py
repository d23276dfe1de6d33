"""A process of a multi-process job is killed outright (SIGKILL: what the kernel's out-of-memory
killer sends), so it cannot say anything itself. The job still ends within seconds, with one line
that names the dead rank and how it died, and no process is left behind.

- A worker killed: before, Lightning's launcher SIGKILLed the launching process within 5 s (exit
  137, its "Child process ... terminated with code -9 ... 🧟" line, the MLflow run left RUNNING).
  Now rank 0 says which rank died of what, closes its MLflow run as FAILED and exits 1.
- The launching process (rank 0) killed: before, its orphaned worker computed its whole share
  (minutes) and then died of a gloo "Connection closed by peer" traceback in its next collective.
  Now it sees it was orphaned and ends at once with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DOMAINFM, load_make_data, run_statuses

make_data = load_make_data("eo_sar")

W = 28
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 13 x 600 x 260 Sentinel-2 scene and a random-init ViT-S/14 export recording its bands: at
    stride 4, ~8000 windows, far more than the seconds these tests let the job run."""
    import torch

    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    root = tmp_path_factory.mktemp("rank_killed")
    torch.manual_seed(0)
    b = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=W, init="random")
    b.input_spec = InputSpec(bands=tuple(S2_L1C_BANDS), mean=(1000.0,) * 13, std=(500.0,) * 13, modality="s2",
                             gsd_m=10.0, units="reflectance x 10000")
    return {"model": save_backbone(b, root / "model.safetensors"),
            "scene": make_data.write_scene(root / "scene.tif", height=600, width=260)}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start(job, tmp_path, mlflow_store):
    """``eo-sar embed --devices 2`` started, returned once both ranks are in their loop:
    (launching process, its worker's PID, the file receiving both processes' stderr)."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.Popen([str(DOMAINFM), "eo-sar", "embed", str(job["scene"]), "--model", str(job["model"]),
                                 "--window", str(W), "--stride", "4", "--batch-size", "16", "--accelerator", "cpu",
                                 "--devices", "2", "--out", str(tmp_path / "out")],
                                cwd=tmp_path, env={**os.environ, **ENV, "MLFLOW_TRACKING_URI": mlflow_store},
                                stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 240
    while "All distributed processes registered" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(3)  # both ranks past their set-up, embedding windows
    workers = _children(proc.pid)
    assert len(workers) == 1 and proc.poll() is None, err.read_text()[-3000:]
    return proc, workers[0], err


def _wait_gone(pids: list[int], seconds: float) -> None:
    end = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_worker_killed_outright_ends_the_job_with_a_line_naming_it(job, tmp_path, mlflow_store):
    proc, worker, err = _start(job, tmp_path, mlflow_store)
    os.kill(worker, signal.SIGKILL)
    rc = proc.wait(timeout=120)
    _wait_gone([worker], 30)
    text = err.read_text()
    assert rc == 1, text[-3000:]  # not 137: the launcher no longer SIGKILLs the launching process
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 of 2 (PID {worker}) was killed by SIGKILL (often the kernel's out-of-memory "
                      "killer: check `dmesg`, or lower --batch-size); what finished is kept: rerun the same command "
                      "to resume"], text[-3000:]
    assert "Traceback" not in text and "terminated with code" not in text, text[-3000:]
    assert not _alive(worker)
    assert run_statuses(mlflow_store, "domainfm-eo-sar") == ["FAILED"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_launching_process_killed_outright_ends_its_worker_at_once(job, tmp_path, mlflow_store):
    proc, worker, err = _start(job, tmp_path, mlflow_store)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_gone([worker], 120)
    text = err.read_text()
    assert not _alive(worker), f"the orphaned worker still runs: {text[-3000:]}"
    # it stopped at once, not after computing its whole share: tile rows 1, 3, 5, 7 of the 9
    done = sorted((tmp_path / "out" / "scene_embedding.parts").glob("row_*.npy"))
    assert len([p for p in done if int(p.name[4:9]) % 2 == 1]) < 4, [p.name for p in done]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 stopped: rank 0, which launched it, is gone without a word (killed, out "
                      "of memory, or its machine failed); what finished is kept: rerun the same command to resume"], \
        text[-3000:]
    assert "Traceback" not in text and "Connection closed by peer" not in text, text[-3000:]
