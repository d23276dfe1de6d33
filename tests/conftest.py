"""Shared fixtures: an isolated MLflow store per test, the CLI run as a user runs it, and the toy
third-party plugin installed with pip the way an outside package would be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# never let a test reach for the Hugging Face hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# under pytest-xdist each worker (and every CLI it starts) gets one intra-op thread: N workers with
# N threads each on N cores oversubscribe OpenMP, whose spinning threads then slow every test
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
DOMAINFM = Path(sys.executable).with_name("domainfm")


def load_make_data(name: str):
    """The checked-in generator ``tests/data/<name>/make_data.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_make_data", REPO / "tests" / "data" / name / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_line_error(result, *phrases) -> str:
    """A finished CLI call (``run_cli``'s CompletedProcess or click's Result) ended as an expected
    mistake: exit 2, no traceback, exactly one ``error: ...`` line on stderr containing every
    phrase. Returns that line."""
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for p in phrases:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def empty_store_template(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store, its tables created by MLflow itself (alembic's ~50 migrations,
    about 4 s of CPU), once per test process; each test's store starts as a copy of it."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    cwd = os.getcwd()
    os.chdir(db.parent)  # MLflow's "Default" experiment records ./mlruns of the folder it was made in
    try:
        assert [e.name for e in MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()] == ["Default"]
    finally:
        os.chdir(cwd)
    return db


def _new_store(request, tmp_path: Path) -> str:
    """The URI of tmp_path/mlflow.db: a copy of the empty template, or no file at all for a test
    marked ``fresh_store`` (one that checks no store was created, or how the product creates one)."""
    db = tmp_path / "mlflow.db"
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copyfile(request.getfixturevalue("empty_store_template"), db)
    return f"sqlite:///{db}"


@pytest.fixture
def mlflow_store(request, tmp_path, monkeypatch):
    """An empty sqlite MLflow store under tmp_path, and tmp_path as the working folder."""
    uri = _new_store(request, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def run_cli(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``domainfm ARGS`` in a subprocess, exactly as a user's shell would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(DOMAINFM), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def invoke_cli(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None):
    """Run ``domainfm ARGS`` in this test process through click's CliRunner: the same command code,
    with torch/lightning/mlflow imported once per test process instead of once per call (~10 CPU-s
    each). For calls whose test does not depend on a fresh process (a launcher, per-process
    environment, import-time behaviour, what a new interpreter prints); those use :func:`run_cli`.
    ``env`` holds for the call only, ``cwd`` is the working folder during it, and the MLflow
    tracking/registry URIs the command sets are put back afterwards. Returns click's Result
    (``exit_code``, ``stdout``, ``stderr``)."""
    from click.testing import CliRunner
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from domainfm.cli import main

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args], env=env)
    finally:
        os.chdir(here)
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved


@pytest.fixture
def toy_in_process(toy_plugin_site, monkeypatch):
    """The toy plugin importable in this process (for :func:`invoke_cli`) for one test."""
    monkeypatch.syspath_prepend(str(toy_plugin_site))
    return toy_plugin_site


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, whichever xdist worker asks first (a file lock in
    the session's shared temp folder; the others wait and reuse what it made). Returns the folder.
    For artefacts several test files use the same way and none asserts on how it was made."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/ shared by this session's workers (each has pytest-N/popen-gwK/)
    folder, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


EO_TINY_MODEL = "eo-tiny"


def _pretrain_eo_tiny(root: Path) -> None:
    """A tiny random-init eo-sar pretraining (test_vit, 32 px, 2 steps) on 4 Sentinel-2 patches,
    in its own process, registered as EO_TINY_MODEL (version 1, @candidate) in root/mlflow.db."""
    import json

    train = load_make_data("eo_sar").write_dataset(root / "train", n_patches=4, modalities=("s2",))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--data", str(train), "--init", "random", "--backbone", "test_vit",
                 "--img-size", "32", "--max-steps", "2", "--batch-size", "4", "--proj-dim", "16", "--accelerator", "cpu",
                 "--out", str(root / "runs"), "--register", EO_TINY_MODEL, "--json", str(root / "pretrain.json")],
                cwd=root, env=env, timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    (root / "pretrain.stderr").write_text(r.stderr)
    json.loads((root / "pretrain.json").read_text())


@pytest.fixture(scope="session")
def eo_tiny_pretrained(tmp_path_factory) -> Path:
    """The folder of one tiny eo-sar pretraining run shared by the test files that only use its
    result (train/, pretrain.json, pretrain.stderr, mlflow.db, artifacts/): built once per session.
    A test takes its own copy of the store with :func:`copy_store` and leaves the folder as it is."""
    return shared_once(tmp_path_factory, "eo-tiny", _pretrain_eo_tiny)


def copy_store(shared: Path, dest: Path) -> str:
    """A private copy of ``shared``/mlflow.db at ``dest``/mlflow.db (its runs' artifacts stay in the
    shared folder; new runs write theirs there too, each under its own run id). Returns its URI."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "mlflow.db", dest / "mlflow.db")
    return f"sqlite:///{dest / 'mlflow.db'}"


@pytest.fixture(scope="session")
def toy_plugin_site(tmp_path_factory) -> Path:
    """The toy plugin package pip-installed into its own site folder (put it on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("toy_site")
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp_path_factory.mktemp("toy_src") / "toy_plugin"
    shutil.copytree(REPO / "tests" / "data" / "toy_plugin", src)
    build = src.parent
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)],
                   check=True, capture_output=True, text=True, cwd=build)
    return target


@pytest.fixture
def toy_env(request, toy_plugin_site, tmp_path):
    """Environment for a subprocess that sees the toy plugin and an isolated MLflow store."""
    path = os.pathsep.join([str(toy_plugin_site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "MLFLOW_TRACKING_URI": _new_store(request, tmp_path)}


def run_statuses(tracking_uri: str, experiment: str) -> list[str]:
    """The status (FINISHED, FAILED, RUNNING...) of every run of ``experiment`` in the store, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return [run.info.status for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])]
