"""The command line as a user meets it: fast help, plugin listing, one-line errors, config files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from domainfm.config import resolve
from domainfm.errors import DomainFMError

HEAVY = ("torch", "lightning", "mlflow", "timm")


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["pretrain", "--plugin", "eo-sar", "--help"]])
def test_help_and_plugins_import_no_heavy_library(argv):
    code = ("import sys\nfrom domainfm.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_plugins_lists_first_party_and_third_party(toy_env):
    r = run_cli(["plugins"], env=toy_env)
    assert r.returncode == 0, r.stderr
    for name in ("eo-sar", "histo", "sports-reid", "sgd-ft", "toy"):
        assert name in r.stdout
    assert "domainfm-toy" in r.stdout  # the providing package is shown


def test_unknown_plugin_lists_installed(toy_env):
    r = run_cli(["pretrain", "--plugin", "nope"], env=toy_env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown plugin 'nope'" in lines[0] and "toy" in lines[0] and "eo-sar" in lines[0]
    assert "Traceback" not in r.stderr


def test_plugin_options_show_in_help(toy_env):
    r = run_cli(["pretrain", "--plugin", "toy", "--help"], env=toy_env)
    assert r.returncode == 0 and "--bands" in r.stdout and "--mask-ratio" in r.stdout


def test_plugin_extra_command_runs(toy_env):
    r = run_cli(["toy", "hello", "--who", "tester"], env=toy_env)
    assert r.returncode == 0 and "hello tester from toy" in r.stdout


def test_config_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "batch_size": 4, "bands": 7}))
    values = {"config": str(path), "lr": 5e-4, "batch_size": 32, "plugin": "toy", "bands": 4}
    cfg = resolve("pretrain", values, {"batch_size"}, plugin_defaults={"max_steps": 3}, known=set(values))
    assert cfg.lr == 0.01  # from YAML
    assert cfg.batch_size == 32  # the flag typed on the command line wins
    assert cfg.bands == 7 and cfg.options == {"bands": 7}  # a plugin option from YAML
    assert cfg.max_steps == 3  # plugin default


def test_config_unknown_key_names_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.1\nlearning_rat: 3\n")
    with pytest.raises(DomainFMError, match="learning_rat") as e:
        resolve("pretrain", {"config": str(path), "lr": 1.0}, set(), known={"lr", "config"})
    assert str(path) in str(e.value)


def test_bad_config_file_is_one_line(tmp_path, toy_env):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [unclosed\n")
    r = run_cli(["pretrain", "--plugin", "toy", "--config", str(path)], env=toy_env)
    assert r.returncode == 2 and "not valid YAML" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plugin_defaults_show_in_help_and_do_not_leak():
    from click.testing import CliRunner

    from domainfm.cli import main

    runner = CliRunner()
    sgd = runner.invoke(main, ["finetune", "--plugin", "sgd-ft", "--help"])
    assert sgd.exit_code == 0 and "--optimizer" in sgd.output
    assert "[default: 0.001]" in sgd.output  # sgd-ft's own --lr default, not the core's 5e-4
    # the next command in the same process sees neither sgd-ft's flags nor its defaults
    reid = runner.invoke(main, ["finetune", "--plugin", "sports-reid", "--help"])
    assert reid.exit_code == 0 and "--optimizer" not in reid.output
    assert "[default: 0.001]" not in reid.output


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args, line", [
    (["pretrain", "--plugin", "eo-sar", "--init", "random", "--precision", "64"],
     "error: domainfm pretrain: invalid value for '--precision': '64' is not one of '32-true', 'bf16-mixed', "
     "'16-mixed'. Fix: see domainfm pretrain --help."),
    (["evaluate", "--plugin", "eo-sar", "--model", "models:/nosuch@candidate"],
     "is not in the MLflow registry at"),
])
def test_mistakes_found_by_a_new_user_are_refused_before_any_run(mlflow_store, args, line):
    """A precision our models cannot run (64 crashed in the first conv) and a registry name that is
    not there: one line, exit 2, and no MLflow run left behind (the store has no run at all)."""
    import sqlite3

    r = run_cli(args, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert line in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    db = mlflow_store[len("sqlite:///"):]
    if Path(db).exists():
        with sqlite3.connect(db) as con:
            tables = {t for (t,) in con.execute("select name from sqlite_master where type='table'")}
            assert "runs" not in tables or con.execute("select count(*) from runs").fetchone()[0] == 0


def _no_run_in(store_uri: str) -> bool:
    import sqlite3

    db = Path(store_uri[len("sqlite:///"):])
    if not db.exists():
        return True
    with sqlite3.connect(db) as con:
        tables = {t for (t,) in con.execute("select name from sqlite_master where type='table'")}
        return "runs" not in tables or con.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.mark.timeout(300)
def test_unknown_backbone_suggests_its_family_before_reading_any_data(mlflow_store, tmp_path):
    """vit_tiny_nope once suggested convit_*; the same-prefix names come first now, and the check
    comes before the data is looked at (the --data folder does not even exist)."""
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--init", "random", "--backbone", "vit_tiny_nope",
                 "--data", str(tmp_path / "absent")])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown backbone 'vit_tiny_nope' (similar: vit_tiny_"), lines
    similar = lines[0].split("(similar: ")[1].split(")")[0].split(", ")
    assert all(n.startswith("vit_tiny_") for n in similar) and "convit_tiny" not in similar
    assert _no_run_in(mlflow_store)


def test_similar_names_prefers_the_family_then_difflib():
    from domainfm.backbones import similar_names

    assert all(n.startswith("vit_small_") for n in similar_names("vit_small_patch14_dinov3"))
    assert similar_names("resnet5O")[0].startswith("resnet")  # no family "resnet5O_": difflib's closest


@pytest.mark.timeout(300)
def test_img_size_not_a_multiple_of_the_patch_size_is_refused(mlflow_store):
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--init", "random", "--backbone", "vit_small_patch14_dinov2",
                 "--img-size", "30"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --img-size 30 is not a multiple of the patch size 14 of vit_small_patch14_dinov2. "
        "Fix: use --img-size 28 or 42."]
    assert _no_run_in(mlflow_store)


def test_img_size_check_is_for_vits_only():
    from domainfm.backbones import check_run_backbone
    from domainfm.config import RunConfig

    check_run_backbone(RunConfig(backbone="resnet18", img_size=30))  # a CNN takes any size
    check_run_backbone(RunConfig(backbone="vit_tiny_patch16_224", img_size=48))
    with pytest.raises(DomainFMError, match=r"--img-size 8 is not a multiple of the patch size 16 .* use --img-size 16\."):
        check_run_backbone(RunConfig(backbone="vit_tiny_patch16_224", img_size=8))


def test_plugins_shows_core_and_own_commands_apart():
    from click.testing import CliRunner

    from domainfm.cli import main

    r = CliRunner().invoke(main, ["plugins"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "core commands supported" in r.output and "own commands" in r.output
    row = next(line for line in r.output.splitlines() if line.startswith("│ histo "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    core, own = cells[2], cells[3]
    assert "pretrain" in core and "tile" not in core
    assert set(own.split(", ")) >= {"tile", "embed", "heatmap"} and "pretrain" not in own
