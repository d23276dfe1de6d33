"""The health monitor's held-out splits where the plugin knows groups (issue 12, 1): eo-sar's standard
layouts (SSL4EO-S12 locations, BigEarthNet tiles, EuroSAT images) and histo (whole slides, or
patients). For each: the held-out samples are absent from the pretraining dataset, no group is on
both sides, and a real run's step-0 monitor values equal a direct evaluation of the starting
weights on that split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_make_data, run_cli


def _save_tiny(path, in_chans, img_size=32):
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("vit_tiny_patch16_224", in_chans=in_chans, img_size=img_size, init="random"),
                         path)


def _history(uri, run_id, key):
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


def _config(plugin_name, data, weights=None, **options):
    from domainfm.config import RunConfig
    from domainfm.plugins import load

    plugin = load(plugin_name)
    opts = {o.name: o.default for o in plugin.options("pretrain")}
    opts.update(options)
    return plugin, RunConfig(plugin=plugin_name, data=str(data), backbone="vit_tiny_patch16_224", img_size=32,
                             batch_size=4, val_fraction=0.3, seed=0, weights=weights, options=opts)


def _direct_figures(held, weights):
    """The monitor's figures of the starting weights on the held-out split, computed here."""
    from domainfm.backbones import create_backbone
    from domainfm.metrics import feature_std, knn_quality, rankme

    samples = [held.dataset[i] for i in range(len(held.dataset))]
    backbone = create_backbone(str(weights)).eval()
    with torch.no_grad():
        feats = backbone(torch.stack([s["image"].float() for s in samples])).numpy()
    labels = np.stack([np.asarray(s["labels"], dtype=np.float32) for s in samples])
    name, value = knn_quality(feats, labels, groups=list(held.groups))
    return {"rankme": rankme(feats), "feature_std": feature_std(feats), name: value}


def _check_run_step0(tmp_path, mlflow_store, args, weights, want):
    out = tmp_path / "o.json"
    r = run_cli(["pretrain", *args, "--weights", str(weights), "--backbone", "vit_tiny_patch16_224", "--img-size", "32",
                 "--batch-size", "4", "--proj-dim", "16", "--max-steps", "1", "--val-every", "1", "--val-fraction",
                 "0.3", "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads(out.read_text())["mlflow_run_id"]
    for key, value in want.items():
        logged = _history(mlflow_store, run_id, f"monitor/{key}")
        assert sorted(logged) == [0, 1], (key, logged)
        assert logged[0] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------- eo-sar standard layouts


@pytest.fixture(scope="module")
def eo_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor_layouts")
    load_make_data("ssl4eo_s12").write_dataset(base / "ssl4eo", size=24, landcover_dir=base / "dw")
    # 12 training patches cut from 3 Sentinel-2 tiles (patch k from tile k % 3)
    load_make_data("bigearthnet_v2").write_dataset(base / "ben2", splits={"train": 12, "validation": 1, "test": 1})
    return {"ssl4eo": base / "ssl4eo", "dw": base / "dw", "ben2": base / "ben2"}


def _split(plugin, cfg):
    dm = plugin.pretrain_datamodule(cfg)
    before = list(dm.dataset.patch_ids)
    held = plugin.monitor_dataset(cfg, dm)
    return dm, before, held


@pytest.mark.timeout(600)
def test_bigearthnet_v2_holds_out_whole_tiles_absent_from_pretraining(eo_roots):
    plugin, cfg = _config("eo-sar", eo_roots["ben2"], modality="s2-l2a", label_threshold=0.05)
    dm, before, held = _split(plugin, cfg)
    held_ids = [r.patch_id for r in held.dataset.records]
    kept = list(dm.dataset.patch_ids)
    assert len(before) == 12 and sorted(held_ids + kept) == sorted(before)
    assert not set(held_ids) & set(kept)  # pretraining never sees them
    tile = {pid: pid.rsplit("_", 2)[0] for pid in before}  # <product>_<tile> folder of BigEarthNet v2
    assert list(held.groups) == [tile[p] for p in held_ids]
    assert not {tile[p] for p in held_ids} & {tile[p] for p in kept}  # a tile is all in or all out
    # whole tiles (4 patches each) until 0.3 x 12 = 3.6 -> at least 4 patches AND at least 2 tiles (the
    # k-NN leaves a sample's own tile out): two of the three tiles
    assert len(held_ids) == 8 and len({tile[p] for p in held_ids}) == 2
    sample = held.dataset[0]
    assert sample["image"].shape == (12, 32, 32) and "image_other" not in sample
    assert sample["labels"].shape == (19,) and sample["labels"].sum() > 0
    # the held-out split reads the whole patch, the same at every evaluation (no random crop)
    assert torch.equal(held.dataset[0]["image"], sample["image"])


@pytest.mark.timeout(600)
def test_ssl4eo_holds_out_locations_with_their_first_season(eo_roots):
    plugin, cfg = _config("eo-sar", eo_roots["ssl4eo"], modality="s2", landcover=str(eo_roots["dw"]))
    dm, before, held = _split(plugin, cfg)
    held_ids = [r.patch_id for r in held.dataset.records]
    kept = list(dm.dataset.patch_ids)
    assert len(before) == 6 and len(held_ids) == 4 and sorted(held_ids + kept) == sorted(before)
    assert list(held.groups) == held_ids and not set(held_ids) & set(kept)
    assert held.dataset.random_season is False and dm.dataset.random_season is True
    a, b = held.dataset[1]["image"], held.dataset[1]["image"]
    assert torch.equal(a, b) and a.shape == (13, 32, 32)


@pytest.mark.timeout(900)
def test_bigearthnet_v2_step0_equals_the_starting_weights_on_the_held_out_tiles(eo_roots, tmp_path, mlflow_store):
    plugin, cfg = _config("eo-sar", eo_roots["ben2"], modality="s2-l2a", label_threshold=0.05)
    weights = _save_tiny(tmp_path / "start.safetensors", plugin.in_chans(cfg))
    _, _, held = _split(plugin, cfg)
    want = _direct_figures(held, weights)
    assert set(want) == {"rankme", "feature_std", "knn_map"}
    _check_run_step0(tmp_path, mlflow_store, ["--plugin", "eo-sar", "--data", str(eo_roots["ben2"]), "--modality",
                                              "s2-l2a", "--label-threshold", "0.05"], weights, want)


# ---------------------------------------------------------------- histo: whole slides / patients


PATIENTS = {"s0": "P1", "s1": "P1", "s2": "P2", "s3": "P3"}  # P1 has two slides


@pytest.fixture(scope="module")
def histo_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor_histo")
    md = load_make_data("histo")
    (base / "slides").mkdir()
    for i, sid in enumerate(PATIENTS):  # 1024 x 768 px at 0.5 µm/px
        md.write_generic_tiff(base / "slides" / f"{sid}.tif", mpp=0.5, seed=i)
    rows = ["slide_id,patient_id,x,y,tumor,stroma,necrosis"]
    for i, (sid, patient) in enumerate(PATIENTS.items()):
        for j, (x, y) in enumerate(((100, 100), (400, 300), (700, 500))):
            vec = [(i + j) % 2, 1 - (i + j) % 2, int(j == 2)]
            rows.append(f"{sid},{patient},{x},{y},{','.join(map(str, vec))}")
    (base / "labels.csv").write_text("\n".join(rows) + "\n")
    (base / "labels_no_patient.csv").write_text(
        "\n".join(",".join(c for k, c in enumerate(r.split(",")) if k != 1) for r in rows) + "\n")
    return base


def _histo_config(histo_data, labels="labels.csv", **kw):
    return _config("histo", histo_data / "slides", mpp=1.0, tile_size=48, tiles_per_epoch=8,
                   tile_labels=str(histo_data / labels), **kw)


@pytest.mark.timeout(600)
def test_histo_holds_out_whole_patients_and_their_slides_leave_pretraining(histo_data):
    from plugins.histo.slides import slide_id

    plugin, cfg = _histo_config(histo_data)
    dm = plugin.pretrain_datamodule(cfg)
    held = plugin.monitor_dataset(cfg, dm)
    kept_slides = {slide_id(e[0]) for e in dm.dataset.entries}
    held_slides = {slide_id(t[0]) for t in held.dataset.tiles}
    assert kept_slides | held_slides == set(PATIENTS) and not kept_slides & held_slides
    held_patients = {PATIENTS[s] for s in held_slides}
    assert list(held.groups) == [PATIENTS[slide_id(t[0])] for t in held.dataset.tiles]
    assert not held_patients & {PATIENTS[s] for s in kept_slides}  # no patient on both sides
    assert len(held_patients) == 2  # 0.3 x 12 tiles -> 4, and two groups at least
    assert {s for s in PATIENTS if PATIENTS[s] in held_patients} == held_slides  # P1's slides travel together
    assert len(held.dataset) == 3 * len(held_slides)  # every labelled tile of those slides
    # pretraining draws only from the kept slides now
    assert {slide_id(dm.dataset.entries[dm.dataset.draw(i)[0]][0]) for i in range(30)} <= kept_slides
    sample = held.dataset[0]
    assert sample["image"].shape == (3, 32, 32) and torch.equal(held.dataset[0]["image"], sample["image"])
    # the tile read independently: the first held-out tile's labels as the CSV gives them
    path, _, x, y, _ = held.dataset.tiles[0]
    row = [r for r in (histo_data / "labels.csv").read_text().splitlines()[1:]
           if r.startswith(f"{slide_id(path)},") and r.split(",")[2:4] == [str(x), str(y)]]
    assert sample["labels"].tolist() == [float(v) for v in row[0].split(",")[4:]]


@pytest.mark.timeout(600)
def test_histo_without_patients_groups_by_slide_and_without_labels_offers_no_split(histo_data):
    from plugins.histo.slides import slide_id

    plugin, cfg = _histo_config(histo_data, "labels_no_patient.csv")
    dm = plugin.pretrain_datamodule(cfg)
    held = plugin.monitor_dataset(cfg, dm)
    held_slides = [slide_id(t[0]) for t in held.dataset.tiles]
    assert list(held.groups) == held_slides and len(set(held_slides)) == 2  # 0.3 x 12 -> 4 tiles: two slides
    assert not set(held_slides) & {slide_id(e[0]) for e in dm.dataset.entries}
    plugin, cfg = _config("histo", histo_data / "slides", mpp=1.0, tile_size=48, tiles_per_epoch=8)
    dm = plugin.pretrain_datamodule(cfg)
    assert plugin.monitor_dataset(cfg, dm) is None and len(dm.dataset.entries) == 4


@pytest.mark.timeout(900)
def test_histo_step0_equals_the_starting_weights_on_the_held_out_patients(histo_data, tmp_path, mlflow_store):
    weights = _save_tiny(tmp_path / "start.safetensors", 3)
    plugin, cfg = _histo_config(histo_data, weights=str(weights))
    dm = plugin.pretrain_datamodule(cfg)
    held = plugin.monitor_dataset(cfg, dm)
    want = _direct_figures(held, weights)
    assert set(want) == {"rankme", "feature_std", "knn_map"}
    _check_run_step0(tmp_path, mlflow_store, ["--plugin", "histo", "--data", str(histo_data / "slides"), "--mpp", "1.0",
                                              "--tile-size", "48", "--tiles-per-epoch", "8", "--tile-labels",
                                              str(histo_data / "labels.csv")], weights, want)
