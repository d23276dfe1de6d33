"""Click's own usage errors (a missing argument, an unknown option, a bad choice, a bad number, a
flag without its value, an unknown command) print as the project's one line
``error: <command>: <what>. Fix: ... see <command> --help.``, exit 2, on every level of the CLI:
the root, core commands with a plugin's flags, plugin commands, the registry and the pipelines.
Click's "did you mean" suggestions stay in the line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, run_cli
from domainfm.cli import main


@pytest.mark.parametrize("args, line", [
    (["--foo"], "error: main: no such option '--foo'. Fix: see main --help."),
    (["pretrian"], "error: main: no such command 'pretrian'. Fix: did you mean pretrain? See main --help."),
    (["histo", "embed", "--outt", "x"],
     "error: main histo embed: no such option '--outt'. Fix: did you mean --out? See main histo embed --help."),
    (["histo", "emb"], "error: main histo: no such command 'emb'. Fix: did you mean embed? See main histo --help."),
    (["export", "--model", "m.safetensors", "--format", "tflite", "--out", "m.x"],
     "error: main export: invalid value for '--format': 'tflite' is not one of 'onnx', 'torchscript'. "
     "Fix: see main export --help."),
    (["export", "--model"], "error: main export: option '--model' requires an argument. Fix: see main export --help."),
    (["pretrain", "--plugin", "eo-sar", "--batch-size", "x"],
     "error: main pretrain: invalid value for '--batch-size': 'x' is not a valid integer. "
     "Fix: see main pretrain --help."),
    (["finetune", "--plugin", "sports-reid", "--distance", "manhattan"],
     "error: main finetune: invalid value for '--distance': 'manhattan' is not one of 'cosine', 'euclidean'. "
     "Fix: see main finetune --help."),
    (["predict", "--out", "o"],
     "error: main predict: missing argument 'INPUT...'. Fix: see main predict --help."),
    (["registry", "promote", "reid", "two", "--alias", "champion"],
     "error: main registry promote: invalid value for 'VERSION': 'two' is not a valid integer. "
     "Fix: see main registry promote --help."),
    (["registry", "promote", "reid", "2"],
     "error: main registry promote: missing option '--alias'. Fix: see main registry promote --help."),
    (["plugins", "extra"], "error: main plugins: got unexpected extra argument (extra). Fix: see main plugins --help."),
    (["pipeline", "slide-biomarker", "--max-tile", "8"],
     "error: main pipeline slide-biomarker: no such option '--max-tile'. Fix: did you mean --max-tiles, --mil or --min-tissue? "
     "See main pipeline slide-biomarker --help."),
    (["pipeline", "slide-biomarkr"],
     "error: main pipeline: no such command 'slide-biomarkr'. Fix: did you mean slide-biomarker? "
     "See main pipeline --help."),
    (["eo-sar", "plot", "--patch", "p1", "--out", "p.png"],
     "error: main eo-sar plot: no such option '--patch'. Fix: did you mean --patch-id or --data? See main eo-sar plot --help."),
    (["eo-sar", "plott"], "error: main eo-sar: no such command 'plott'. Fix: did you mean plot? See main eo-sar --help."),
])
def test_click_usage_errors_are_one_line(args, line):
    """CliRunner names the root command ``main`` (a user's shell: ``domainfm``, tested below)."""
    r = CliRunner().invoke(main, args)
    assert assert_one_line_error(r) == line
    assert r.stdout == ""


def test_several_suggestions_are_all_kept():
    r = CliRunner().invoke(main, ["histo", "tile", "--mpp-x", "0.5"])
    got = assert_one_line_error(r, "no such option '--mpp-x'", "Fix: did you mean ")
    assert got.endswith("? See main histo tile --help.")


def test_help_without_arguments_and_version_are_untouched():
    """A group called bare still prints its help (click's own behaviour), --help and --version exit 0."""
    r = CliRunner().invoke(main, ["histo"])
    assert "Commands:" in r.output and "error:" not in r.output
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0
    assert CliRunner().invoke(main, ["histo", "embed", "--help"]).exit_code == 0


def test_plugin_command_of_a_third_party_plugin(toy_env):
    """As a user's shell runs it: the root is called ``domainfm``; the toy plugin's own command."""
    r = run_cli(["toy", "hello", "--whom", "x"], env=toy_env)
    assert assert_one_line_error(r) == ("error: domainfm toy hello: no such option '--whom'. Fix: did you mean --who? "
                                 "See domainfm toy hello --help.")
    r = run_cli(["predict", "--model"], env=toy_env)
    assert assert_one_line_error(r) == "error: domainfm predict: option '--model' requires an argument. " \
                                       "Fix: see domainfm predict --help."
