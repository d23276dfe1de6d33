"""Findings of a new user's trial of `histo embed` and `pretrain`: --max-tiles with --coords, the fix
for a slide with no µm/px, wording of the --slide-mpp fix, a damaged tile's Fix, whole paths in the
printed tables, no warm-up warning for a run with no steps, no TorchScript FutureWarning, and one
--precision/--accelerator choice everywhere."""

from __future__ import annotations

import csv
import warnings

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import load_make_data, run_cli
from plugins.histo.commands import embed_command, tile_command

COMMON = ["--mpp", "2", "--tile-size", "32", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return load_make_data("histo").make_slides(tmp_path_factory.mktemp("trial_slides"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random ResNet (timm's test_resnet) saved as a domainfm export."""
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("test_resnet", img_size=32, init="random"),
                         tmp_path_factory.mktemp("trial_weights") / "encoder.safetensors")


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def failures(out_dir):
    return {r["slide_id"]: r["error"] for r in csv.DictReader(open(out_dir / "failures.csv"))}


def test_max_tiles_applies_to_coords_as_histo_tile_draws_it(slides, weights, tmp_path):
    """--coords with --max-tiles 3 --seed 5: the 3 tiles `histo tile --max-tiles 3 --seed 5` keeps (a
    seeded draw without replacement, in original order), and the file records max_tiles 3, seed 5."""
    full, drawn = tmp_path / "all", tmp_path / "drawn"
    assert invoke(tile_command, [slides["tiff"], "--out", full, "--mpp", "2", "--tile-size", "32"]).exit_code == 0
    assert invoke(tile_command, [slides["tiff"], "--out", drawn, "--mpp", "2", "--tile-size", "32",
                                 "--max-tiles", "3", "--seed", "5"]).exit_code == 0
    with h5py.File(full / "coords" / "generic_20x.h5") as f:
        every = f["coords"][:]
        assert int(f.attrs["max_tiles"]) == 0
    with h5py.File(drawn / "coords" / "generic_20x.h5") as f:
        by_tile = f["coords"][:]
    assert len(every) > 3
    expected = every[np.sort(np.random.default_rng(5).choice(len(every), size=3, replace=False))]
    np.testing.assert_array_equal(by_tile, expected)

    res = invoke(embed_command, [slides["tiff"], "--coords", full, "--out", tmp_path / "emb", "--model", weights,
                                 "--max-tiles", "3", "--seed", "5", *COMMON])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "emb" / "features" / "generic_20x.h5") as f:
        assert f["features"].shape[0] == 3
        np.testing.assert_array_equal(f["coords"][:], expected)
        assert int(f.attrs["max_tiles"]) == 3 and int(f.attrs["seed"]) == 5
    # without --max-tiles every tile of the coords file is embedded, and its max_tiles 0 recorded
    res = invoke(embed_command, [slides["tiff"], "--coords", full, "--out", tmp_path / "emb_all", "--model",
                                 weights, *COMMON])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "emb_all" / "features" / "generic_20x.h5") as f:
        assert f["features"].shape[0] == len(every) and int(f.attrs["max_tiles"]) == 0


def test_a_slide_without_mpp_is_told_to_pass_slide_mpp_to_tile_and_embed(slides, weights, tmp_path):
    """`histo tile` fails on a slide with no µm/px; `histo embed --coords` then names --slide-mpp (for
    both commands) and quotes tile's failure, instead of "run histo tile first" (which fails again).
    With --slide-mpp given to both, it works. A slide with µm/px and no coords keeps the old fix."""
    coords = tmp_path / "coords"
    res = invoke(tile_command, [slides["no_mpp"], slides["tiff"], "--out", coords, "--mpp", "2", "--tile-size", "32"])
    assert res.exit_code == 1
    tile_error = failures(coords)["no_mpp"]
    assert "the slide has no µm/px" in tile_error
    assert "scanner's µm per pixel (0.25 at 40x, 0.5 at 20x" in tile_error and "--slide-mpp 0.25 " not in tile_error

    out = tmp_path / "emb"
    res = invoke(embed_command, [slides["no_mpp"], "--coords", coords, "--out", out, "--model", weights, *COMMON])
    assert res.exit_code == 1
    error = failures(out)["no_mpp"]
    assert error == (f"{slides['no_mpp']}: no coordinates for slide 'no_mpp' in --coords {coords} (`histo tile` "
                     f"failed on it: {tile_error.rstrip('.')}). Fix: the slide states no µm/px: run `domainfm histo "
                     "tile --slide-mpp MPP` on it and pass the same --slide-mpp MPP to `histo embed`, MPP being the "
                     "scanner's µm per pixel (0.25 at 40x, 0.5 at 20x).")

    # following the fix works
    res = invoke(tile_command, [slides["no_mpp"], "--out", coords, "--mpp", "2", "--tile-size", "32",
                                "--slide-mpp", "0.5"])
    assert res.exit_code == 0, res.output
    res = invoke(embed_command, [slides["no_mpp"], "--coords", coords, "--out", out, "--model", weights,
                                 "--slide-mpp", "0.5", *COMMON])
    assert res.exit_code == 0, res.output
    assert (out / "features" / "no_mpp.h5").is_file() and not (out / "failures.csv").exists()

    # a slide that has its µm/px but no coords: tile it first (its file is gone from a fresh folder)
    (tmp_path / "empty").mkdir()
    res = invoke(embed_command, [slides["tiff"], "--coords", tmp_path / "empty", "--out", tmp_path / "e2",
                                 "--model", weights, *COMMON])
    assert res.exit_code == 1
    assert failures(tmp_path / "e2")["generic_20x"].endswith(
        "Fix: run `domainfm histo tile` on this slide first, or drop --coords.")


def test_slide_mpp_fix_is_no_value_to_paste():
    from plugins.histo import slides as S

    assert "--slide-mpp 0.25" not in S.SLIDE_MPP_FIX
    assert S.SLIDE_MPP_FIX.startswith("pass --slide-mpp with the scanner's µm per pixel (0.25 at 40x, 0.5 at 20x")


def test_a_damaged_tile_fails_with_a_fix(slides, weights, tmp_path):
    """Damaged JPEG data: the slide's failures.csv line is OpenSlide's error with a Fix."""
    res = invoke(embed_command, [slides["corrupt"], "--out", tmp_path, "--model", weights, "--mpp", "0.5",
                                 "--tile-size", "32", "--batch-size", "8", "--num-workers", "0"])
    assert res.exit_code == 1
    error = failures(tmp_path)["corrupt_jpeg"]
    assert error.startswith(f"{slides['corrupt']}: OpenSlide cannot decode the tile at level-0 (")
    assert "Corrupt JPEG" in error
    assert error.endswith("Fix: re-export or re-download the slide (its image data is damaged), or leave it "
                          "out of this run.")


def test_a_domainfm_error_from_a_dataloader_worker_is_its_own_line():
    """torch re-raises a worker's error as "Caught X in DataLoader worker ... Original Traceback ...
    module.X: text": the recorded line is our error's text alone, another error keeps its type."""
    from torch._utils import ExceptionWrapper

    from domainfm.errors import DomainFMError
    from plugins.histo.embedding import one_line_error

    def reraised(exc):
        try:
            raise exc
        except Exception:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
        try:
            wrapper.reraise()
        except Exception as e:  # noqa: BLE001
            return e

    ours = DomainFMError("bad tile", path="s.svs", fix="re-export it")
    assert one_line_error(reraised(ours)) == "s.svs: bad tile. Fix: re-export it."
    assert one_line_error(reraised(ValueError("odd"))) == "ValueError: odd"


def test_printed_metrics_keep_whole_paths(capsys, monkeypatch):
    """A narrow terminal (COLUMNS=60): the backbone path the README passes to --model is printed whole,
    on one line, never cut with an ellipsis."""
    from domainfm.cli import print_metrics

    monkeypatch.setenv("COLUMNS", "60")
    path = "/home/someone/projects/histology/runs/pretrain-2026-11-30/exported/backbone.safetensors"
    run_id = "0123456789abcdef0123456789abcdef"
    print_metrics("pretrain --plugin histo", {"loss/total": 1.23456, "backbone_path": path, "mlflow_run_id": run_id})
    err = capsys.readouterr().err
    assert "…" not in err
    assert any(path in line for line in err.splitlines())
    assert any(run_id in line for line in err.splitlines())
    assert "1.2346" in err


def test_no_warmup_warning_without_steps():
    from domainfm.training import fitted_warmup

    assert fitted_warmup(10, 0) == (0, None)  # --max-steps 0: registering the starting weights
    steps, warning = fitted_warmup(10, 4)  # a short run is still told
    assert steps == 2 and warning.startswith("--warmup-steps 10 is more than half of this run's 4 optimiser steps")


@pytest.mark.timeout(300)
def test_torchscript_export_prints_no_future_warning(tmp_path):
    """`export --format torchscript` saves and reloads with torch.jit: torch's deprecation
    FutureWarning is silenced (that message only), the file is still TorchScript."""
    from domainfm.backbones import create_backbone, save_backbone
    from domainfm.output import quiet_third_parties

    torch.manual_seed(0)
    src = save_backbone(create_backbone("test_vit", img_size=32, init="random"), tmp_path / "vit.safetensors")
    out = tmp_path / "vit.pt"
    r = run_cli(["export", "--model", str(src), "--format", "torchscript", "--out", str(out)],
                env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FutureWarning" not in r.stderr and "torch.jit" not in r.stderr, r.stderr
    assert out.is_file()
    # the filter is that message only: another FutureWarning still shows
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_parties()
        torch.jit.load(str(out), map_location="cpu")
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in seen if w.category is FutureWarning] == ["something else"]


def _choice_options(params):
    return {p.name: p for p in params if p.name in ("precision", "accelerator")}


def test_precision_and_accelerator_are_one_choice_everywhere():
    """pretrain, finetune, evaluate, histo embed, histo/eo-sar/sgd-ft/sports-reid predict and eo-sar embed: the same
    click.Choice values, default and help."""
    import click

    from domainfm import config
    from plugins.eo_sar import predict_options as eo_predict
    from plugins.eo_sar.commands import embed_command as eo_embed
    from plugins.histo.predict import options as histo_predict
    from plugins.sgd_ft import plugin as sgd_ft_plugin
    from plugins.sports_reid.commands import predict_options as reid_predict

    sources = {name: _choice_options(config.click_options(name)) for name in ("pretrain", "finetune", "evaluate")}
    sources.update({"histo embed": _choice_options(embed_command.params), "eo-sar embed": _choice_options(eo_embed.params),
                    "histo predict": _choice_options(histo_predict()), "eo-sar predict": _choice_options(eo_predict()),
                    "sgd-ft predict": _choice_options(sgd_ft_plugin.options("predict")),
                    "sports-reid predict": _choice_options(reid_predict())})
    for where, opts in sources.items():
        assert set(opts) == {"precision", "accelerator"}, where
        for name, choices, default in (("precision", ("32-true", "bf16-mixed", "16-mixed"), "32-true"),
                                       ("accelerator", ("auto", "cpu", "gpu"), "auto")):
            opt = opts[name]
            assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == choices, where
            assert opt.default == default, where
        assert opts["precision"].help == config.PRECISION_HELP, where
        assert opts["accelerator"].help == config.ACCELERATOR_HELP, where


def test_a_free_text_precision_is_one_line(tmp_path):
    res = CliRunner().invoke(embed_command, ["x.svs", "--out", str(tmp_path), "--precision", "64"])
    assert res.exit_code == 2
    assert "'64' is not one of '32-true', 'bf16-mixed', '16-mixed'" in res.output
    assert not (tmp_path / "features").exists()
