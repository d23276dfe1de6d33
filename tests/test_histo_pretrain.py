"""`domainfm pretrain --plugin histo`: tiles drawn on the fly from real slides, two views, tile labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from plugins.histo import slides as S
from plugins.histo.datamodule import HistoPretrainDataModule, read_tile_labels
from plugins.histo.tissue import tile_tissue_fractions
from conftest import load_make_data



@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("histo_pretrain")
    md = load_make_data("histo")
    (root / "slides").mkdir()
    md.write_aperio_svs(root / "slides" / "a40x.svs")
    md.write_generic_tiff(root / "slides" / "b20x.tif")
    (root / "labels.csv").write_text("slide_id,x,y,tumor,stroma\n"
                                     "a40x,512,512,1,0\na40x,1200,900,0,1\nb20x,300,300,1,1\n")
    return root


def test_batches_are_two_views_of_tissue_tiles(slide_dir):
    dm = HistoPretrainDataModule(slide_dir / "slides", mpp=1.0, tile_size=48, img_size=28, tiles_per_epoch=8,
                                 batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["view_teacher"].shape == batch["view_student"].shape == (4, 3, 28, 28)
    assert batch["labels"].shape == (4, 1) and batch["labels"].sum() == 0  # no tile labels: hard target only
    assert not torch.allclose(batch["view_teacher"], batch["view_student"])
    # drawn tiles are fresh at each call and mostly on tissue (positions are jittered off the grid)
    ds = dm.dataset
    draws = [ds.draw(0) for _ in range(40)]
    assert len({d[1:3] for d in draws}) > 30
    from plugins.histo.tiling import tile_slide

    masks = {k: tile_slide(e[0], mpp=1.0, tile_size=48) for k, e in enumerate(ds.entries)}
    fracs = [tile_tissue_fractions(masks[k].mask, [x], [y], ds.entries[k][1].tile_size_level0,
                                   masks[k].thumb_downsample)[0] for k, x, y, _ in draws]
    assert np.mean(fracs) > 0.6


def test_tile_labels_drive_the_soft_target(slide_dir):
    names, table = read_tile_labels(slide_dir / "labels.csv")
    assert names == ["tumor", "stroma"]
    dm = HistoPretrainDataModule(slide_dir / "slides", mpp=1.0, tile_size=48, img_size=28, tiles_per_epoch=8,
                                 batch_size=4, tile_labels=str(slide_dir / "labels.csv"))
    dm.setup()
    rows = {(sid, x, y): tuple(v) for sid, items in table.items() for x, y, v in items}
    for _ in range(20):
        k, x, y, vec = dm.dataset.draw(0)
        sid = S.slide_id(dm.dataset.entries[k][0])
        assert rows[(sid, x, y)] == tuple(vec)
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (4, 2) and batch["labels"].sum() > 0


@pytest.mark.slow
def test_pretrain_cli_end_to_end(slide_dir, tmp_path):
    out = tmp_path / "m.json"
    r = run_cli(["pretrain", "--plugin", "histo", "--data", str(slide_dir / "slides"), "--backbone",
                 "test_vit", "--init", "random", "--img-size", "32", "--batch-size", "4",
                 "--max-steps", "1", "--proj-dim", "16", "--mpp", "1", "--tile-size", "48", "--tiles-per-epoch", "8",
                 "--tile-labels", str(slide_dir / "labels.csv"), "--json", str(out)],
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(out.read_text())
    assert m["global_step"] == 1
    assert m["loss/soft"] > 0  # the tile labels reached the loss
    assert Path(m["backbone_path"]).is_file()
