"""A new user's obvious mistakes, command by command: a file where a folder goes (and back), a
file of the wrong kind, numbers a run cannot take, a command the plugin lacks. Each is one line
``error: ...`` naming the file (or flag) and the fix, exit 2, before any heavy work: no traceback,
no output folder, no MLflow run left behind."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error
from domainfm.cli import main
from domainfm.errors import DomainFMError, expect_file, expect_folder


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def live_runs(store_uri: str) -> int:
    """Runs of the store that are not deleted (0 when no store was even created)."""
    db = Path(store_uri[len("sqlite:///"):])
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {t for (t,) in con.execute("select name from sqlite_master where type='table'")}
        if "runs" not in tables:
            return 0
        return con.execute("select count(*) from runs where lifecycle_stage != 'deleted'").fetchone()[0]


@pytest.fixture
def junk(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    return txt, empty


def test_expect_folder_and_file_say_what_they_found(junk):
    txt, empty = junk
    assert expect_folder(empty, "--data", fix="x") == empty and expect_file(txt, "--labels", fix="y") == txt
    with pytest.raises(DomainFMError) as e:
        expect_folder(txt, "--data", fix="give the dataset's root")
    assert str(e.value) == f"{txt}: is a file, but --data takes a folder. Fix: give the dataset's root."
    with pytest.raises(DomainFMError) as e:
        expect_file(empty, "--labels", fix="give the CSV")
    assert str(e.value) == f"{empty}: is a folder, but --labels takes a file. Fix: give the CSV."
    with pytest.raises(DomainFMError, match="--data folder not found"):
        expect_folder(empty / "nope", "--data", fix="x")


def test_a_file_where_a_click_flag_takes_a_folder_and_back(junk, tmp_path):
    txt, empty = junk
    line = assert_one_line_error(invoke(["eo-sar", "check", "--data", txt]))
    assert line == (f"error: {txt}: is a file, but --data takes a folder. Fix: give the folder holding "
                    "s2/<patch_id>.tif (and s1/, landcover/, labels.csv); see main eo-sar check --help.")
    assert_one_line_error(invoke(["eo-sar", "sample", txt]), f"error: {txt}: is a file, but OUT takes a folder.")
    assert_one_line_error(invoke(["eo-sar", "embed", empty, "--model", "m.safetensors", "--out", tmp_path / "o"]),
                          f"error: {empty}: is a folder, but SCENES takes a file.", "(a shell glob: folder/*.tif)")
    assert_one_line_error(invoke(["export", "--model", "m.safetensors", "--format", "onnx", "--out", empty]),
                          f"error: {empty}: is a folder, but --out takes a file.")
    assert_one_line_error(invoke(["pretrain", "--plugin", "eo-sar", "--out", txt]),
                          f"error: {txt}: is a file, but --out takes a folder.")
    assert_one_line_error(invoke(["pretrain", "--plugin", "eo-sar", "--config", empty]),
                          f"error: {empty}: is a folder, but --config takes a file.")
    assert_one_line_error(invoke(["pipeline", "slide-biomarker", "--features", txt, "--labels", txt, "--target", "MSI"]),
                          f"error: {txt}: is a file, but --features takes a folder.", "`domainfm histo embed`")
    assert_one_line_error(invoke(["histo", "heatmap", txt, "--features", empty, "--model", "m", "--out", "h.png"]),
                          f"error: {empty}: is a folder, but --features takes a file.")
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plugin, command, fix", [
    ("eo-sar", "pretrain", "holding s2/<patch_id>.tif"),
    ("sports-reid", "finetune", "reid_training/ and reid_test/ (MMSports 2022)"),
    ("sgd-ft", "finetune", "train/<class>/<image>"),
])
def test_data_that_is_a_file_says_so(mlflow_store, junk, plugin, command, fix):
    """--data is checked by each plugin (histo's --data also takes slide files, so the core flag
    cannot refuse files): the line says it is a file and what the folder should hold."""
    txt, _ = junk
    r = invoke([command, "--plugin", plugin, "--init", "random", "--backbone", "resnet18", "--data", txt])
    assert_one_line_error(r, f"error: {txt}: is a file, but --data takes a folder. Fix: ", fix)
    assert live_runs(mlflow_store) == 0


def test_a_labels_folder_and_a_missing_features_folder(junk):
    txt, empty = junk
    r = invoke(["pipeline", "slide-biomarker", "--features", empty, "--labels", empty, "--target", "MSI"])
    assert_one_line_error(r, f"error: {empty}: is a folder, but --labels takes a file.")


@pytest.mark.parametrize("plugin, command, supported", [
    ("eo-sar", "finetune", "pretrain, evaluate, predict"),
    ("sgd-ft", "pretrain", "finetune, predict"),  # crashed with an AttributeError traceback
    ("histo", "evaluate", "pretrain, predict"),
])
def test_a_command_the_plugin_lacks_opens_no_run(mlflow_store, plugin, command, supported):
    """It used to open an MLflow run first and leave it FAILED."""
    args = [command, "--plugin", plugin] + (["--model", "m.safetensors"] if command == "evaluate" else [])
    line = assert_one_line_error(invoke(args))
    assert line == (f"error: plugin {plugin!r} does not support {command}. Fix: it supports {supported} "
                    "(see `domainfm plugins`).")
    assert live_runs(mlflow_store) == 0


@pytest.mark.parametrize("flag, value, line", [
    ("--lr", "-1", "error: --lr must be at least 0, got -1.0. Fix: pass --lr 0 or more."),
    ("--max-steps", "-5", "error: --max-steps must be at least 0 (or -1), got -5. Fix: pass --max-steps 0 or more, "
                          "or --max-steps -1."),
    ("--devices", "0", "error: --devices must be at least 1, got 0. Fix: pass --devices 1 or more."),
    ("--img-size", "0", "error: --img-size must be at least 1, got 0. Fix: pass --img-size 1 or more."),
    ("--num-workers", "-1", "error: --num-workers must be at least 0, got -1. Fix: pass --num-workers 0 or more."),
    ("--batch-size", "0", "error: --batch-size must be at least 1, got 0. Fix: pass --batch-size 1 or more."),
])
def test_numbers_a_run_cannot_take(mlflow_store, flag, value, line):
    """Lightning or PyTorch stopped these with a traceback after the data was read (--lr -1,
    --devices 0, --img-size 0, --max-steps -5); --max-steps 0 stays allowed (it registers the
    starting weights untouched: make demo's baseline)."""
    r = invoke(["pretrain", "--plugin", "eo-sar", "--init", "random", "--backbone", "resnet18", flag, value])
    assert assert_one_line_error(r) == line
    assert live_runs(mlflow_store) == 0


@pytest.mark.parametrize("args, phrase", [
    (["--tile-size", "0"], "invalid value for '--tile-size': 0 is not in the range x>=1"),
    (["--mpp", "-1"], "invalid value for '--mpp': -1.0 is not in the range x>0"),
    (["--max-tiles", "0"], "invalid value for '--max-tiles': 0 is not in the range x>=1"),  # was ignored
    (["--min-tissue", "2"], "invalid value for '--min-tissue': 2.0 is not in the range 0.0<=x<=1.0"),  # 0 tiles
])
def test_histo_tiling_numbers_fail_before_any_output(tmp_path, junk, args, phrase):
    """--tile-size 0 or --mpp -1 failed every slide one by one, wrote failures.csv and exited 1."""
    slide = tmp_path / "s.png"
    slide.write_bytes(b"")  # never opened: the flags are refused first
    r = invoke(["histo", "tile", slide, "--out", tmp_path / "o", *args])
    assert_one_line_error(r, "error: main histo tile: " + phrase)
    assert not (tmp_path / "o").exists()


def test_a_text_file_among_the_slides_is_refused_before_any_output(tmp_path, junk):
    txt, _ = junk
    r = invoke(["histo", "tile", txt, "--out", tmp_path / "o"])
    assert_one_line_error(r, f"error: {txt}: is not a slide (.txt: neither a whole-slide format OpenSlide "
                             "recognises nor an image). Fix: give slide files (.svs")
    assert not (tmp_path / "o").exists()


def test_a_text_file_as_a_model(tmp_path, junk, mlflow_store):
    txt, _ = junk
    r = invoke(["export", "--model", txt, "--format", "onnx", "--out", tmp_path / "m.onnx"])
    assert_one_line_error(r, f"error: {txt}: is not a model: a .txt file, not weights (.safetensors, .pth")
    r = invoke(["predict", "--model", txt, txt, "--out", tmp_path / "o"])
    assert_one_line_error(r, f"error: {txt}: is not a model: a .txt file. Fix: pass a domainfm export")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.timeout(300)
def test_reid_gallery_mistakes_name_the_folder_and_leave_nothing(tmp_path, junk, mlflow_store):
    """The gallery is read before the model (a .txt here: never loaded); the run predict opened
    is deleted and its --out folder removed."""
    from PIL import Image

    txt, empty = junk
    query = tmp_path / "query"
    query.mkdir()
    Image.new("RGB", (8, 16), (200, 10, 10)).save(query / "1_0_0.jpeg")
    layout = ("Fix: give --gallery a folder of <player_id>/ sub-folders of .jpg/.jpeg/.png crops, crops named "
              "<player_id>_<sequence>_<frame>.jpeg (MMSports), or any crops (ranked without scores).")
    base = ["predict", "--plugin", "sports-reid", "--model", tmp_path / "m.safetensors", query, "--out", tmp_path / "o"]
    (tmp_path / "m.safetensors").write_bytes(b"never read")
    line = assert_one_line_error(invoke(base + ["--gallery", empty]))
    assert line == f"error: {empty}: no gallery crops (.jpg, .jpeg, .png) found: it is empty. {layout}"
    (empty / "readme.md").write_text("x")
    assert_one_line_error(invoke(base + ["--gallery", empty]), "found: it holds 1 other file(s), e.g. readme.md.")
    assert_one_line_error(invoke(base + ["--gallery", tmp_path / "nope"]), "gallery path not found. " + layout)
    assert_one_line_error(invoke(base + ["--gallery", txt]), f"error: {txt}: is a file, but --gallery takes a folder.")
    assert not (tmp_path / "o").exists()
    assert live_runs(mlflow_store) == 0


@pytest.mark.parametrize("command", [["evaluate", "--plugin", "eo-sar", "--model"],
                                     ["pretrain", "--plugin", "eo-sar", "--weights"]])
def test_a_text_file_as_a_model_is_refused_before_any_run(tmp_path, mlflow_store, command):
    """Found by a new user's trial: `evaluate --model notes.txt` printed a normalisation note, then the
    error, and left a FAILED run; the check now runs with the other settings, before any run opens."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    r = invoke([*command, str(notes), "--data", str(tmp_path)])
    assert assert_one_line_error(r) == (
        f"error: {notes}: is not a model: a .txt file, not weights (.safetensors, .pth, .pt, .bin, .ckpt). "
        "Fix: give a domainfm export (.safetensors), a checkpoint (.pth, .pt, .bin, .ckpt) or models:/NAME@ALIAS.")
    assert live_runs(mlflow_store) == 0
