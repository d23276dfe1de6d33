"""sports-reid data: layouts, file names, letterboxing, the pair sampler, submission CSV, errors."""

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainfm.errors import DomainFMError
from plugins.sports_reid import datasets as D
from plugins.sports_reid.retrieval import RetrievalResult, distance_matrix, plot_retrieval_grid, write_submission

MAKE_DATA = Path(__file__).parent / "data" / "sports_reid" / "make_data.py"


def _make_data_module():
    spec = importlib.util.spec_from_file_location("sports_reid_make_data", MAKE_DATA)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


make_data = _make_data_module()


@pytest.fixture(scope="module")
def mmsports(tmp_path_factory):
    return make_data.make_mmsports(tmp_path_factory.mktemp("mmsports"), train_players=4, test_players=3,
                                   frames=3, challenge_players=2)


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    return make_data.make_generic(tmp_path_factory.mktemp("generic"), train_players=3, test_players=2, frames=4)


def test_mmsports_layout_is_read_with_ids_sequences_and_frames(mmsports):
    assert D.detect_layout(mmsports) == "mmsports"
    train = D.read_part(mmsports, "train")
    assert len(train) == 4 * 3
    r = next(r for r in train if r.path.name == "3_1_2.jpeg")
    assert (r.pid, r.sequence, r.frame, r.camera) == ("3", 1, 2, None)
    query, gallery = D.read_eval_split(mmsports, "test")
    assert len(query) == 3 and len(gallery) == 3 * 2
    assert {r.pid for r in query} == {r.pid for r in gallery} == {"1000", "1001", "1002"}
    cq, cg = D.read_eval_split(mmsports, "challenge")
    assert all(r.pid == "" and r.item_id.isdigit() for r in cq + cg)
    assert sorted(int(r.item_id) for r in cg) == list(range(2 * 2))


def test_generic_layout_reads_camera_tokens(generic):
    assert D.detect_layout(generic) == "generic"
    query, gallery = D.read_eval_split(generic, "test")
    assert [r.camera for r in query] == [1, 1]
    assert sorted({r.camera for r in gallery}) == [1, 2]
    assert query[0].pid.startswith("player")
    assert D.camera_of(Path("0002_c3s1_000451_03.jpg")) == 3  # Market-1501 naming
    assert D.camera_of(Path("frame_17.jpg")) is None


def test_letterbox_keeps_aspect_ratio_and_pads_with_zeros():
    tall = Image.new("RGB", (20, 40), (200, 100, 50))
    out = np.asarray(D.letterbox(tall, 32))
    assert out.shape == (32, 32, 3)
    # 20x40 -> 16x32, centred: 8 black columns each side
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    assert np.abs(out[:, 9:23].astype(int) - [200, 100, 50]).max() <= 2
    wide = np.asarray(D.letterbox(Image.new("RGB", (64, 16), (255, 255, 255)), 32))
    assert (wide[:12] == 0).all() and (wide[20:] == 0).all() and (wide[13:19] >= 250).all()


def test_dataset_normalises_and_plots(mmsports):
    ds = D.MMSports2022ReID(mmsports, "test_gallery", img_size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = ds[0]["image"]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert x[:, :, 0].eq(-1.0).all()  # a black padding column, normalised: (0 - 0.5) / 0.5
    fig = ds.plot([0, 1, 2], ncols=3, title="gallery")
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == ds.records[0].pid


@pytest.mark.parametrize("name", ["player7.jpeg", "7_1.jpeg", "a_1_2.jpeg"])
def test_bad_training_name_is_a_clear_error(tmp_path, name):
    (tmp_path / "reid_training").mkdir()
    Image.new("RGB", (8, 16)).save(tmp_path / "reid_training" / "1_0_0.jpeg")
    Image.new("RGB", (8, 16)).save(tmp_path / "reid_training" / name)
    with pytest.raises(DomainFMError, match=rf"{name}: file name does not match <player_id>_<sequence>_<frame>.jpeg"):
        D.read_part(tmp_path, "train")


def test_empty_query_folder_and_missing_player_are_clear_errors(tmp_path):
    make_data.make_mmsports(tmp_path, train_players=2, test_players=2, frames=2, challenge_players=1)
    query = tmp_path / "reid_test" / "query"
    moved = sorted(query.iterdir())
    for p in moved:
        p.rename(tmp_path / p.name)
    with pytest.raises(DomainFMError, match=r"reid_test/query: no images .* found"):
        D.read_eval_split(tmp_path, "test")
    # a query whose player has no gallery crop
    Image.new("RGB", (8, 16)).save(query / "4242_9_0.jpeg")
    with pytest.raises(DomainFMError, match=r"4242_9_0.jpeg: query player 4242 has no crop in the gallery"):
        D.read_eval_split(tmp_path, "test")


def test_layout_errors(tmp_path):
    with pytest.raises(DomainFMError, match="data folder not found"):
        D.detect_layout(tmp_path / "nope")
    with pytest.raises(DomainFMError, match="no re-identification layout found"):
        D.detect_layout(tmp_path)
    (tmp_path / "train" / "p1").mkdir(parents=True)
    Image.new("RGB", (8, 16)).save(tmp_path / "train" / "p1" / "c1_a.jpg")
    Image.new("RGB", (8, 16)).save(tmp_path / "train" / "p1" / "b.jpg")
    with pytest.raises(DomainFMError, match=r"b.jpg: some file names carry a camera token"):
        D.read_part(tmp_path, "train")
    with pytest.raises(DomainFMError, match="no challenge query split"):
        D.read_eval_split(tmp_path, "challenge")


def test_pair_sampler_never_repeats_a_player_and_shares_flip():
    pids = [str(i // 4) for i in range(40)] + ["lonely"]  # ten players with 4 images, one with 1
    sampler = D.DistinctPlayerPairSampler(pids, batch_size=6, seed=3)
    assert len(sampler) == 40 // 6
    anchors = []
    for epoch in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            players = [pids[a] for a, _, _ in batch]
            assert len(set(players)) == len(players) == 6  # no two pairs of one player
            for a, p, flip in batch:
                assert a != p and pids[a] == pids[p] and isinstance(flip, bool)
            anchors += [a for a, _, _ in batch]
        assert "lonely" not in players
    # epochs differ, and anchors spread over (nearly) all images
    assert list(sampler.plan(0)) != list(sampler.plan(1))
    assert len(set(anchors)) >= 36
    # DDP gathers the batches of all processes into one InfoNCE batch: at every step the two
    # processes' pairs come from distinct players (10 players -> 5 per process)
    r0 = D.DistinctPlayerPairSampler(pids, 6, seed=3, rank=0, world_size=2).plan(0)
    r1 = D.DistinctPlayerPairSampler(pids, 6, seed=3, rank=1, world_size=2).plan(0)
    assert len(r0) == len(r1) == 40 // 10
    for b0, b1 in zip(r0, r1):
        players = [pids[a] for a, _, _ in b0 + b1]
        assert len(b0) == len(b1) == 5 and len(set(players)) == 10
    with pytest.raises(DomainFMError, match="at least 2 players with 2 or more images"):
        D.DistinctPlayerPairSampler(["a", "b", "b"], 4)
    with pytest.raises(DomainFMError, match=r"at least 4 players .* \(2 processes\)"):
        D.DistinctPlayerPairSampler(["a", "a", "b", "b", "c", "c"], 4, world_size=2)


def test_pair_dataset_flips_both_images(mmsports):
    ds = D.PairDataset(D.read_part(mmsports, "train"), img_size=16)
    plain = ds[(0, 1, False)]
    flipped = ds[(0, 1, True)]
    assert torch.equal(flipped["anchor"], plain["anchor"].flip(-1))
    assert torch.equal(flipped["positive"], plain["positive"].flip(-1))


def test_distances():
    q, g = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    np.testing.assert_allclose(distance_matrix(q, g, "cosine"), [[1 - 0.6, 1.0], [1 - 0.8, 2.0]], atol=1e-6)
    np.testing.assert_allclose(distance_matrix(q, g, "euclidean"),
                               [[np.hypot(2, 4), np.hypot(1, 1)], [np.hypot(3, 2), 3.0]], atol=1e-5)
    with pytest.raises(DomainFMError, match="unknown distance 'manhattan'"):
        distance_matrix(q, g, "manhattan")


def test_submission_csv_layout_and_atomic_write(mmsports, tmp_path):
    cq, cg = D.read_eval_split(mmsports, "challenge")
    dist = np.arange(len(cq) * len(cg), dtype=np.float32).reshape(len(cq), len(cg)) / 7
    out = write_submission(tmp_path / "sub" / "submission.csv", dist, cq, cg)
    rows = list(csv.reader(out.open()))
    assert rows[0] == [""] + [r.item_id for r in cg]
    assert [r[0] for r in rows[1:]] == [r.item_id for r in cq]
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), dist, atol=1e-6)
    assert not list(out.parent.glob("*.tmp"))
    with pytest.raises(DomainFMError, match="names a folder"):
        write_submission(tmp_path, dist, cq, cg)


def test_retrieval_grid_colours_matches(mmsports):
    q = D.ReIDDataset(D.read_part(mmsports, "test_query"), img_size=16)
    g = D.ReIDDataset(D.read_part(mmsports, "test_gallery"), img_size=16)
    same = np.array([[qr.pid == gr.pid for gr in g.records] for qr in q.records])
    fig = plot_retrieval_grid(RetrievalResult(np.where(same, 0.1, 0.9), q, g, None), n_queries=3, top_k=4)
    axes = np.array(fig.axes).reshape(3, 5)
    # each query has 2 gallery crops: ranks 1-2 are its own (green), 3-4 others (red)
    for row in axes:
        colours = [ax.spines["top"].get_edgecolor() for ax in row[1:]]
        assert colours[:2] == [pytest.approx((0.196, 0.804, 0.196, 1.0), abs=1e-3)] * 2
        assert colours[2:] == [pytest.approx((1.0, 0.0, 0.0, 1.0))] * 2


def test_generic_layout_trains_and_scores_with_the_camera_protocol(generic):
    from domainfm.backbones import create_backbone
    from domainfm.metrics import retrieval_metrics
    from plugins.sports_reid.datamodule import ReIDPairDataModule
    from plugins.sports_reid.retrieval import EvalSettings, run_retrieval

    dm = ReIDPairDataModule(generic, img_size=16, batch_size=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["anchor"].shape == batch["positive"].shape == (2, 3, 16, 16)

    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", img_size=16, init="random")
    result = run_retrieval(backbone, generic, "test", EvalSettings(batch_size=4), img_size=16,
                           mean=(0.5,) * 3, std=(0.5,) * 3)
    q_ids, g_ids = result.query.pids, result.gallery.pids
    q_cams, g_cams = result.query.cameras, result.gallery.cameras
    assert q_cams == [1, 1] and g_cams is not None
    with_cams = retrieval_metrics(result.distmat, q_ids, g_ids, q_cams, g_cams)
    assert result.metrics == with_cams
    # the same-camera gallery crops of each query's player were left out (they would count otherwise)
    assert result.metrics["mAP"] != pytest.approx(retrieval_metrics(result.distmat, q_ids, g_ids)["mAP"])


# ---------------------------------------------------------------- issue 9, item 11

def test_one_camera_data_names_the_camera_rule_and_the_flag_that_turns_it_off(tmp_path, mlflow_store):
    import json

    from click.testing import CliRunner

    from domainfm.backbones import create_backbone, save_backbone
    from domainfm.cli import main
    from domainfm.errors import DomainFMError
    from domainfm.metrics import retrieval_metrics

    root = make_data.make_generic(tmp_path / "one_cam", train_players=2, test_players=2, frames=3, one_camera=True)
    torch.manual_seed(0)
    model = save_backbone(create_backbone("test_resnet", img_size=16, init="random"), tmp_path / "m.safetensors")
    args = ["evaluate", "--plugin", "sports-reid", "--data", str(root), "--model", str(model), "--zero-shot", "none",
            "--accelerator", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.stderr == ("error: the same-camera rule removed every match: every crop comes from one camera (1), "
                          "and gallery crops of a query's player taken by the query's camera do not count. Fix: "
                          "turn the rule off with --no-same-camera-rule, or add gallery crops from other "
                          "cameras.\n")
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, args + ["--no-same-camera-rule", "--json", str(out)])
    assert res.exit_code == 0, res.stderr[-2000:]
    m = json.loads(out.read_text())
    # 2 queries, each with 2 gallery crops of its player among 4: every query has its matches back
    # (the worst ranking, matches 3rd and 4th, has AP (1/3 + 2/4) / 2)
    assert m["skipped_queries"] == 0 and (1 / 3 + 2 / 4) / 2 <= m["mAP"] <= 1.0
    # the ids themselves not matching is still reported as such
    with pytest.raises(DomainFMError, match="none of the 2 queries has a matching gallery item.*same players"):
        retrieval_metrics(np.zeros((2, 2)), [1, 2], [3, 4], [1, 1], [1, 1])
