"""``domainfm finetune --plugin sgd-ft`` end to end: real images and GeoTIFFs on disk, real
Lightning training, a real sqlite MLflow store, the CLI as a user runs it."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from domainfm.backbones import create_backbone, save_backbone
from domainfm.cli import main
from domainfm.training import warmup_cosine

from conftest import run_cli

_spec = importlib.util.spec_from_file_location("sgd_ft_make_data",
                                               Path(__file__).parent / "data" / "sgd_ft" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

TINY = ["--img-size", "32", "--batch-size", "8", "--init", "random", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def _store_uri(tmp_path_factory) -> str:
    # one sqlite store for this module's tests: creating a store runs MLflow's schema migrations,
    # which cost seconds; each test still has its own working folder and its own runs
    return f"sqlite:///{tmp_path_factory.mktemp('sgd_ft_mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(_store_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store_uri)
    monkeypatch.chdir(tmp_path)
    return _store_uri


def _error_lines(stderr: str) -> list[str]:
    """stderr without MLflow's own INFO log lines (store creation)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and " INFO mlflow" not in ln]


def _invoke(args: list[str]):
    """The real CLI, in this process (the imports are paid once per test session)."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, (res.stderr[-3000:], res.exception)
    return res


def _mlflow_client():
    from mlflow import MlflowClient

    from domainfm import tracking

    tracking.configure()
    return MlflowClient()


def _children(client, run_id: str) -> list:
    run = client.get_run(run_id)
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")


def test_sgd_frozen_embed_learns_and_leaves_the_stem_bit_for_bit_unchanged(tmp_path, mlflow_store):
    data = make_data.write_imagefolder(tmp_path / "data", train=8, val=4, test=6, size=32)
    torch.manual_seed(0)
    init = save_backbone(create_backbone("resnet18", in_chans=3, img_size=32, init="random"),
                         tmp_path / "init.safetensors")
    out = tmp_path / "metrics.json"
    # --backbone takes a weights file too: the architecture comes from its metadata
    res = _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", str(init), *TINY, "--max-steps", "24", "--val-every", "6", "--lr", "0.05",
                   "--checkpoint-every", "6", "--no-measure-memory", "--json", str(out)])
    m = json.loads(out.read_text())
    # three balanced classes: chance is 1/3 on the 18 test images
    assert m["accuracy"] >= 0.7, m

    before, after = load_file(str(init)), load_file(m["weights"])
    frozen = {"conv1.weight", "bn1.weight", "bn1.bias"}
    timm_params = dict(create_backbone("resnet18", in_chans=3, img_size=32, init="random").model.named_parameters())
    for name in timm_params:
        same = torch.equal(before[name], after[f"backbone.model.{name}"])
        assert same == (name in frozen), name
    # the frozen stem's BatchNorm statistics did not drift either
    for buf in ("bn1.running_mean", "bn1.running_var"):
        assert torch.equal(before[buf], after[f"backbone.model.{buf}"])
    assert not torch.equal(before["layer1.0.bn1.running_mean"], after["backbone.model.layer1.0.bn1.running_mean"])

    n_frozen = sum(timm_params[n].numel() for n in frozen)
    n_total = sum(p.numel() for p in timm_params.values()) + 512 * 3 + 3  # + linear head
    assert m["frozen_params"] == n_frozen
    assert m["trainable_params"] == n_total - n_frozen
    assert m["optimizer_state_bytes"] == 4 * m["trainable_params"]  # one fp32 momentum buffer each

    client = _mlflow_client()
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.metrics["accuracy"] == pytest.approx(m["accuracy"])
    assert run.data.params["optimizer"] == "sgd"
    assert [a.path for a in client.list_artifacts(m["mlflow_run_id"], "model")] == ["model/finetuned.safetensors"]
    ckpts = tmp_path / "outputs" / "domainfm-sgd-ft" / m["mlflow_run_id"] / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    # per-step cosine schedule from the full learning rate (no warm-up by default) towards 0
    lrs = [h.value for h in sorted(client.get_metric_history(m["mlflow_run_id"], "train/lr"), key=lambda h: h.step)]
    assert len(lrs) == 24
    assert lrs == pytest.approx([0.05 * warmup_cosine(i, 0, 24) for i in range(24)], rel=1e-6)


def test_compare_writes_the_three_arm_table_with_exact_state_and_measured_memory_and_reports_the_winner(tmp_path, mlflow_store):
    # 4-band GeoTIFFs: --in-chans comes from the data
    data = make_data.write_imagefolder(tmp_path / "geo", fmt="tif", bands=4, train=4, val=2, size=32)
    out = tmp_path / "metrics.json"
    res = _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", "vit_tiny_patch16_224",
                   *TINY, "--max-steps", "3", "--lr", "0.01", "--compare", "--json", str(out)])
    m = json.loads(out.read_text())
    assert "sgd-frozen-embed" in res.stderr and "adamw" in res.stderr  # the printed table

    client = _mlflow_client()
    text = Path(client.download_artifacts(m["mlflow_run_id"], "tables/compare.csv", str(tmp_path))).read_text()
    rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(text))}
    assert set(rows) == {"sgd-frozen-embed", "sgd", "adamw"}
    vit = create_backbone("vit_tiny_patch16_224", in_chans=4, img_size=32, init="random").model
    params = dict(vit.named_parameters())
    total = sum(p.numel() for p in params.values()) + vit.num_features * 3 + 3
    embed = sum(p.numel() for n, p in params.items() if n.startswith("patch_embed."))
    n_tensors = len(params) + 2
    state = {a: int(r["optimizer_state_bytes"]) for a, r in rows.items()}
    assert int(rows["sgd-frozen-embed"]["trainable_params"]) == total - embed
    assert int(rows["sgd-frozen-embed"]["frozen_params"]) == embed
    assert state["sgd-frozen-embed"] == 4 * (total - embed)
    assert state["sgd"] == 4 * total
    assert state["adamw"] == 8 * total + 4 * n_tensors  # two moments + one step counter per tensor
    peak = {a: int(r["peak_memory_bytes"]) for a, r in rows.items()}
    # AdamW's second moment alone is 4 bytes x 5.5 M parameters more than SGD's state
    assert peak["sgd-frozen-embed"] < peak["adamw"]
    assert peak["adamw"] - peak["sgd-frozen-embed"] > 2 * (total - embed)
    # the top-level result is the arm that won on validation (ties: the first listed), with its own
    # numbers and its own weights, whichever arm --optimizer/--freeze-embed name
    val = {a: m[f"{a}/val_accuracy"] for a in ("sgd-frozen-embed", "sgd", "adamw")}
    winner = next(a for a in ("sgd-frozen-embed", "sgd", "adamw") if val[a] == max(val.values()))
    assert m["arm"] == winner and m["winner_selected_by"] == "val_accuracy"
    assert m["accuracy"] == m[f"{winner}/accuracy"] == pytest.approx(float(rows[winner]["value"]))
    assert m["trainable_params"] == int(rows[winner]["trainable_params"])
    assert m["optimizer_state_bytes"] == state[winner]
    assert m["adamw/optimizer_state_bytes"] == state["adamw"]
    assert client.get_run(m["mlflow_run_id"]).data.tags["sgd_ft.winner"] == winner
    # the saved weights are the winner's: only the frozen-embedding arm keeps the seeded initial stem
    import lightning as L

    L.seed_everything(0, workers=True, verbose=False)
    init_stem = create_backbone("vit_tiny_patch16_224", in_chans=4, img_size=32, init="random").model.patch_embed
    saved = load_file(m["weights"])["backbone.model.patch_embed.proj.weight"]
    assert torch.equal(saved, init_stem.proj.weight.detach()) == (winner == "sgd-frozen-embed")
    assert {a.path for a in client.list_artifacts(m["mlflow_run_id"], "plots")} == {"plots/compare.png"}
    md = Path(client.download_artifacts(m["mlflow_run_id"], "tables/compare.md", str(tmp_path))).read_text()
    assert md.count("\n| ") == 3 and "| adamw | 0.01 |" in md
    arms = {r.data.tags["mlflow.runName"] for r in _children(client, m["mlflow_run_id"])}
    assert arms == {"sgd-frozen-embed", "sgd", "adamw"}


def test_lr_sweep_keeps_the_best_nested_run_on_validation(tmp_path, mlflow_store):
    data = make_data.write_imagefolder(tmp_path / "data", train=8, val=6, size=32)
    torch.manual_seed(0)
    init = save_backbone(create_backbone("vit_tiny_patch16_224", in_chans=3, img_size=32, init="random"),
                         tmp_path / "vit.safetensors")
    out = tmp_path / "m.json"
    _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", "vit_tiny_patch16_224",
             "--weights", str(init), *TINY, "--max-steps", "6", "--val-every", "3", "--optimizer", "adamw",
             "--freeze-pos-embed", "--lr-sweep", "1e-5,3e-3", "--no-measure-memory", "--register", "sgdft-sweep",
             "--json", str(out)])
    m = json.loads(out.read_text())
    client = _mlflow_client()
    children = _children(client, m["mlflow_run_id"])
    val = {float(r.data.params["lr"]): r.data.metrics["val_accuracy"] for r in children}
    assert set(val) == {1e-5, 3e-3}
    best_lr = max(val, key=lambda lr: (val[lr], -[1e-5, 3e-3].index(lr)))  # ties: the first swept wins
    assert m["best_lr"] == best_lr and m["val_accuracy"] == val[best_lr]
    assert m["optimizer_state_bytes_per_param"] == 8.0

    # patch embedding, position embedding and CLS token bit-for-bit as loaded; all else moved
    before, tuned = load_file(str(init)), load_file(m["weights"])
    frozen = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"}
    for name in before:
        assert torch.equal(before[name], tuned[f"backbone.model.{name}"]) == (name in frozen), name
    assert m["frozen_params"] == sum(before[n].numel() for n in frozen)

    # the winner's backbone is registered and loads back through the core as a models:/ URI
    back = create_backbone("models:/sgdft-sweep@candidate")
    for name, value in back.model.state_dict().items():
        assert torch.equal(value, tuned[f"backbone.model.{name}"]), name


def test_multilabel_on_the_eo_sar_layout_reports_map(tmp_path, mlflow_store):
    from plugins.eo_sar.synthetic import write_sample

    root = write_sample(tmp_path / "eo", n_patches=10)
    out = tmp_path / "m.json"
    # a learning rate too small to change any weight: validation cannot improve, so early stopping
    # (patience 1, validation every step) ends the run after the second validation
    _invoke(["finetune", "--plugin", "sgd-ft", "--task", "multilabel", "--modality", "s1", "--data", str(root),
             "--backbone", "vit_tiny_patch16_224", *TINY, "--max-steps", "40", "--val-every", "1", "--patience", "1",
             "--lr", "1e-20", "--precision", "bf16-mixed", "--no-measure-memory", "--json", str(out)])
    m = json.loads(out.read_text())
    assert m["steps"] == 2
    assert 0.0 < m["mAP"] <= 1.0
    assert _mlflow_client().get_run(m["mlflow_run_id"]).data.metrics["mAP"] == pytest.approx(m["mAP"])


@pytest.mark.timeout(600)
def test_multilabel_on_bigearthnet_uses_its_official_splits_and_the_backbones_bands(tmp_path, mlflow_store):
    """--layout bigearthnet: the archive's own train/val/test CSVs decide the splits, its 12 L2A
    band files are aligned by name to a 13-band Sentinel-2 export (B10 filled) and normalised with
    the export's statistics; the run reports macro mAP on val and test."""
    from conftest import load_make_data
    from plugins.eo_sar.bands import S2_L2A_BANDS

    root = tmp_path / "ben"
    rows = load_make_data("bigearthnet").write_dataset(root, splits={"train": 6, "val": 3, "test": 4})
    official = {s: (root / f"bigearthnet-{s}.csv").read_text().splitlines() for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in official.items()} == {s: len(rows[s]) for s in rows} == {"train": 6, "val": 3, "test": 4}
    init = _s2_backbone(tmp_path, named=True)
    out = tmp_path / "m.json"
    res = _invoke(["finetune", "--plugin", "sgd-ft", "--task", "multilabel", "--data", str(root), "--layout", "bigearthnet",
                   "--modality", "s2-l2a", "--backbone", str(init), *TINY, "--max-steps", "3", "--no-measure-memory",
                   "--json", str(out)])
    m = json.loads(out.read_text())
    assert (m["n_train"], m["n_val"], m["n_test"]) == tuple(len(official[s]) for s in ("train", "val", "test"))
    assert 0.0 < m["mAP"] <= 1.0 and 0.0 < m["val_mAP"] <= 1.0 and m["steps"] == 3
    # the data's band names and the backbone's statistics, said on stderr
    assert f"the data's {', '.join(S2_L2A_BANDS)} are aligned by name" in res.stderr
    assert "filled with the band mean: B10" in res.stderr
    assert f"normalising the eo-sar patches with the backbone's own statistics (metadata of {init})" in res.stderr
    run = _mlflow_client().get_run(m["mlflow_run_id"])
    assert run.data.tags["sgd_ft.data_bands"] == ",".join(S2_L2A_BANDS) and run.data.tags["sgd_ft.in_chans"] == "13"
    assert run.data.metrics["mAP"] == pytest.approx(m["mAP"])


def _broken_empty_class(root: Path) -> str:
    (root / "train" / "desert").mkdir()
    return "train/desert: class folder holds no images"


def _broken_val_class(root: Path) -> str:
    (root / "val" / "desert").mkdir()
    make_data.write_png(root / "val" / "desert" / "0.png", make_data.class_image(
        __import__("numpy").random.default_rng(0), 0, bands=3, size=8, n_classes=3))
    return "val: classes desert are not in train/"


def _broken_image(root: Path) -> str:
    (root / "train" / "water" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return "train/water/005.png: cannot be read as an image"


@pytest.mark.parametrize("breaker, extra", [(_broken_empty_class, []), (_broken_val_class, []),
                                            (_broken_image, []), (None, ["--in-chans", "4"])])
def test_bad_input_is_one_named_line_and_nothing_is_overwritten(tmp_path, mlflow_store, breaker, extra):
    root = make_data.write_imagefolder(tmp_path / "data", train=2, val=1, size=8)
    expected = breaker(root) if breaker else "--in-chans 4 does not match the data: the images have 3 bands"
    out = tmp_path / "m.json"
    out.write_text('{"accuracy": 0.9}')
    res = CliRunner().invoke(main, ["finetune", "--plugin", "sgd-ft", "--data", str(root), "--backbone", "resnet18",
                                    *TINY, *extra, "--max-steps", "2", "--json", str(out)])
    assert res.exit_code == 2
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in res.output
    assert out.read_text() == '{"accuracy": 0.9}'


def test_bad_input_through_the_installed_command(tmp_path, mlflow_store):
    root = make_data.write_imagefolder(tmp_path / "data", train=2, val=1, size=8)
    _broken_image(root)
    res = run_cli(["finetune", "--plugin", "sgd-ft", "--data", str(root), *TINY, "--img-size", "28"], cwd=tmp_path)
    assert res.returncode == 2
    lines = _error_lines(res.stderr)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {root / 'train' / 'water' / '005.png'}: cannot be read as an image (")
    assert lines[0].endswith("Fix: replace or delete the file.")
    assert "Traceback" not in res.stderr


def _s2_backbone(tmp_path, *, named: bool) -> Path:
    """A 13-band resnet18 export, with (``named``) or without the Sentinel-2 bands and statistics."""
    from domainfm.backbones import InputSpec
    from plugins.eo_sar.bands import S2_L1C_BANDS

    torch.manual_seed(0)
    b = create_backbone("resnet18", in_chans=13, img_size=32, init="random")
    meta = InputSpec(bands=S2_L1C_BANDS, mean=tuple(1000.0 + i for i in range(13)), std=(500.0,) * 13,
                     modality="s2", gsd_m=10.0, units="reflectance x 10000").to_meta() if named else {}
    return save_backbone(b, tmp_path / ("s2_named.safetensors" if named else "s2_plain.safetensors"), extra_meta=meta)


@pytest.mark.timeout(600)
def test_rgb_images_feed_a_sentinel2_backbone_by_band_name(tmp_path, mlflow_store):
    """Item 16: RGB PNGs on a 13-band Sentinel-2 backbone keep its patch embedding; red, green,
    blue go to B4, B3, B2 and the other bands are filled with their mean; it is said and logged."""
    data = make_data.write_imagefolder(tmp_path / "data", train=6, val=3, size=32)
    init = _s2_backbone(tmp_path, named=True)
    out = tmp_path / "m.json"
    res = _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", str(init), *TINY,
                   "--max-steps", "3", "--no-measure-memory", "--json", str(out)])
    assert "sgd-ft: the backbone takes 13 named bands; the data's B4, B3, B2 are aligned by name" in res.stderr
    assert "filled with the band mean: B1, B5, B6, B7, B8, B8A, B9, B10, B11, B12" in res.stderr
    m = json.loads(out.read_text())
    tags = _mlflow_client().get_run(m["mlflow_run_id"]).data.tags
    assert tags["sgd_ft.input_change"] == "aligned by name" and tags["sgd_ft.in_chans"] == "13"
    assert tags["sgd_ft.data_bands"] == "B4,B3,B2"
    # the fine-tuned stem still takes 13 bands (nothing re-adapted to 3)
    assert load_file(m["weights"])["backbone.model.conv1.weight"].shape[1] == 13

    # an unnamed 13-band backbone cannot be aligned: its stem is re-adapted, and that is said too
    plain = _s2_backbone(tmp_path, named=False)
    res = _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", str(plain), *TINY,
                   "--max-steps", "3", "--no-measure-memory", "--json", str(out)])
    assert f"sgd-ft: the patch embedding of {plain} (13 bands) is re-adapted to the data's 3 bands" in res.stderr
    m = json.loads(out.read_text())
    tags = _mlflow_client().get_run(m["mlflow_run_id"]).data.tags
    assert tags["sgd_ft.input_change"] == "patch embedding re-adapted 13 -> 3 bands"


# ---------------------------------------------------------------- issue 9, items 10 and 15

@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra, validated_at", [([], [2]), (["--val-every", "2", "--max-steps", "3"], [2, 3])])
def test_a_run_shorter_than_an_epoch_ends_with_a_validation_and_its_metrics(tmp_path, mlflow_store, extra,
                                                                           validated_at):
    # 16 training images in batches of 4 = 4 steps an epoch; --max-steps 2 stops before the first
    # validation, which early stopping (on by default, --patience 5) used to demand
    data = make_data.write_imagefolder(tmp_path / "data", train=8, val=2, classes=("a", "b"), size=32)
    out = tmp_path / "m.json"
    _invoke(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", "resnet18", "--img-size", "32",
             "--batch-size", "4", "--init", "random", "--accelerator", "cpu", "--no-measure-memory",
             "--max-steps", "2", *extra, "--json", str(out)])
    m = json.loads(out.read_text())
    steps = validated_at[-1]
    assert m["steps"] == steps
    assert m["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and m["val_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    client = _mlflow_client()
    history = sorted(client.get_metric_history(m["mlflow_run_id"], "val/accuracy"), key=lambda h: h.step)
    # one validation per --val-every, and the final weights validated at the last step
    assert len(history) == len(validated_at) and history[-1].step == steps
    assert m["val_accuracy"] == max(h.value for h in history) and m["best_step"] in validated_at
    # a fine-tuning run logs fine-tuning settings and its plugin's options, none of pretraining's
    params = client.get_run(m["mlflow_run_id"]).data.params
    assert params["init"] == "random" and params["patience"] == "5" and params["command"] == "finetune"
    assert not {"mask_ratio", "ema_momentum", "temperature", "model"} & set(params)


def test_compare_summary_names_the_arm_that_won_and_reports_its_numbers():
    from plugins.sgd_ft.arms import COMPARE_ARMS
    from plugins.sgd_ft.reports import summarise_compare

    def arm_metrics(val, test, trainable):
        return {"accuracy": test, "val_accuracy": val, "lr": 1e-3, "trainable_params": trainable,
                "frozen_params": 100 - trainable, "optimizer_state_bytes": 4 * trainable, "peak_memory_bytes": None}

    frozen, sgd, adamw = COMPARE_ARMS
    results = [(frozen, arm_metrics(0.50, 0.40, 90)), (sgd, arm_metrics(0.55, 0.60, 100)),
               (adamw, arm_metrics(0.80, 0.75, 100))]
    out, winner = summarise_compare(results, "accuracy")
    assert winner == adamw and out["arm"] == "adamw" and out["winner_selected_by"] == "val_accuracy"
    assert (out["accuracy"], out["val_accuracy"], out["optimizer_state_bytes"]) == (0.75, 0.80, 400)
    assert out["sgd-frozen-embed/accuracy"] == 0.40 and out["sgd/val_accuracy"] == 0.55
    assert "sgd-frozen-embed/peak_memory_bytes" not in out  # not measured: no number invented
    # chosen on validation, never on the test split; a tie goes to the arm listed first
    results[2] = (adamw, arm_metrics(0.50, 0.99, 100))
    results[1] = (sgd, arm_metrics(0.50, 0.10, 100))
    out, winner = summarise_compare(results, "accuracy")
    assert winner == frozen and out["accuracy"] == 0.40 and out["trainable_params"] == 90
