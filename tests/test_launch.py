"""Multi-node launches: the launcher environment Lightning will find, and the one-line refusal of
``--num-nodes M > 1`` where no launcher set one up (each node would wait for peers forever)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from domainfm.distributed import check_launch, launcher_environment
from domainfm.errors import DomainFMError

# everything a launcher (srun, torchrun, jsrun, a hand-set environment) could have left behind
LAUNCH_VARS = [v for v in os.environ if v.startswith(("SLURM_", "LSB_", "JSM_", "OMPI_", "PMI_", "TORCHELASTIC_"))] + [
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"]


@pytest.fixture
def bare_env(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_no_launcher_environment(bare_env):
    assert launcher_environment() is None
    check_launch(num_nodes=1)  # one node needs nothing
    with pytest.raises(DomainFMError) as e:
        check_launch(num_nodes=2)
    assert "MASTER_ADDR, MASTER_PORT, NODE_RANK" in str(e.value) and "srun" in e.value.fix


def test_srun_environment_is_slurm(bare_env):
    # what srun sets inside an sbatch allocation (Lightning's SLURMEnvironment reads these)
    for k, v in {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                 "SLURM_JOB_NAME": "pretrain", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "42"}.items():
        bare_env.setenv(k, v)
    assert launcher_environment() == "slurm"
    check_launch(num_nodes=2)


def test_interactive_slurm_shell_is_not_a_launcher(bare_env):
    # `salloc` then a plain command: SLURM variables of an interactive job, no srun tasks
    for k, v in {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "bash", "SLURM_JOB_ID": "42"}.items():
        bare_env.setenv(k, v)
    assert launcher_environment() is None


def test_torchrun_environment(bare_env):
    for k, v in {"TORCHELASTIC_RUN_ID": "abc", "RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1",
                 "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}.items():
        bare_env.setenv(k, v)
    assert launcher_environment() == "torchelastic"


def test_hand_set_environment_needs_all_three(bare_env):
    bare_env.setenv("MASTER_ADDR", "10.0.0.1")
    bare_env.setenv("NODE_RANK", "1")
    with pytest.raises(DomainFMError) as e:
        check_launch(num_nodes=2)
    assert "missing MASTER_PORT)" in str(e.value)
    bare_env.setenv("MASTER_PORT", "29500")
    assert launcher_environment() == "env"
    check_launch(num_nodes=2)


def _bare_subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, **extra, "HF_HUB_OFFLINE": "1"}


EXPECTED = ("error: --num-nodes 2 needs a launcher's environment, and none is set (no SLURM_NTASKS/SLURM_PROCID "
            "from srun, no torchrun variables, missing MASTER_ADDR, MASTER_PORT, NODE_RANK). Fix: start the "
            "command on every node with srun inside a SLURM allocation (one task per device), or set "
            "MASTER_ADDR, MASTER_PORT and NODE_RANK on each node (see README, Running on a cluster).")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv", [
    ["pretrain", "--plugin", "toy", "--init", "random", "--img-size", "28", "--max-steps", "1"],
    ["finetune", "--plugin", "sgd-ft", "--init", "random", "--max-steps", "1"],
], ids=["pretrain", "finetune"])
@pytest.mark.fresh_store  # checks that no MLflow store file is made
def test_num_nodes_without_launcher_is_one_line(tmp_path, toy_env, argv):
    env = _bare_subprocess_env(toy_env)
    r = run_cli([*argv, "--num-nodes", "2", "--devices", "2"], cwd=tmp_path, env=env, timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [EXPECTED], r.stderr
    # checked before anything ran: no MLflow store, no outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rank_zero_hands_its_run_to_workers_and_takes_it_back(monkeypatch, tmp_path):
    from domainfm.distributed import CKPT_DIR_VAR, RUN_ID_VAR, handed_off, handoff_to_workers, is_global_zero

    monkeypatch.delenv(RUN_ID_VAR, raising=False)
    monkeypatch.setenv(CKPT_DIR_VAR, "/earlier/value")
    with handoff_to_workers("abc123", tmp_path / "ckpt"):
        # what a worker started now inherits
        assert handed_off() == ("abc123", tmp_path / "ckpt")
        assert os.environ[RUN_ID_VAR] == "abc123"
    # restored: the unset one unset again, the earlier one back, also when fit fails
    assert RUN_ID_VAR not in os.environ and os.environ[CKPT_DIR_VAR] == "/earlier/value"
    with pytest.raises(RuntimeError):
        with handoff_to_workers("def456", tmp_path):
            raise RuntimeError("fit failed")
    assert handed_off() == (None, Path("/earlier/value"))
    # ranks as the launchers set them
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_global_zero()
    monkeypatch.setenv("RANK", "0")  # the global rank wins over the local one
    assert is_global_zero()
