"""The core's one CSV reader and one image reader (``domainfm.data``), on files as users' tools
save them (issue 9, items 5 and 8): Excel's "CSV UTF-8" (BOM, CRLF, spaces around names) through
every CSV the product reads, and 16-bit images that must not turn white."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import load_make_data
from domainfm.data import image_info, read_csv_rows, read_image
from domainfm.errors import DomainFMError

readers_data = load_make_data("readers")


# ---------------------------------------------------------------- CSV

def test_excel_csv_utf8_is_read_as_meant(tmp_path):
    path = readers_data.excel_csv(tmp_path / "labels.csv", ["slide_id", "patient_id", "label"],
                                  [["s1", " p1", "0 "], ["s2", "p2", 1]])
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf slide_id ,") and b"\r\n" in raw  # the situation, as saved
    rows = read_csv_rows(path, ("slide_id", "patient_id"))
    assert rows == [{"slide_id": "s1", "patient_id": "p1", "label": "0"},
                    {"slide_id": "s2", "patient_id": "p2", "label": "1"}]
    assert rows.columns == ["slide_id", "patient_id", "label"]
    assert rows.lines == [2, 3]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separated_exports(tmp_path, sep):
    path = tmp_path / "labels.csv"
    path.write_text(sep.join(["slide_id", "mpp"]) + "\r\n" + sep.join(["a", "0,5"]) + "\r\n", encoding="utf-8")
    assert read_csv_rows(path, ("slide_id", "mpp")) == [{"slide_id": "a", "mpp": "0,5"}]


def test_missing_columns_name_the_file_and_the_columns_found(tmp_path):
    path = readers_data.excel_csv(tmp_path / "labels.csv", ["slide", "label"], [["s1", 0]])
    with pytest.raises(DomainFMError) as e:
        read_csv_rows(path, ("slide_id", "patient_id"), what="labels CSV", fix="use the header slide_id,patient_id,label")
    assert str(e.value) == (f"{path}: labels CSV lacks the column(s) slide_id, patient_id (columns found: slide, "
                            "label). Fix: use the header slide_id,patient_id,label.")


def test_bad_csv_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("slide_id,mpp\r\nb\xb5,0.5\r\n".encode("latin-1"))
    with pytest.raises(DomainFMError) as e:
        read_csv_rows(latin)
    assert str(e.value) == (f"{latin}: CSV is not UTF-8 text (byte 0xb5 at offset 15). Fix: save it as "
                            "'CSV UTF-8' (Excel: Save As > CSV UTF-8).")
    extra = tmp_path / "extra.csv"
    extra.write_text("slide_id,label\ns1,0\ns2,1,7\n")
    with pytest.raises(DomainFMError, match=r"extra.csv: CSV line 3 has 3 cells, the header has 2\. Fix: quote"):
        read_csv_rows(extra)
    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id, slide_id,label\n")
    with pytest.raises(DomainFMError, match="has the column\\(s\\) slide_id more than once"):
        read_csv_rows(dup)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"\xef\xbb\xbf\r\n")
    with pytest.raises(DomainFMError, match="empty.csv: CSV is empty \\(no header line\\)"):
        read_csv_rows(empty, ("slide_id",))
    with pytest.raises(DomainFMError, match="CSV not found"):
        read_csv_rows(tmp_path / "nope.csv")


def test_every_csv_the_product_reads_takes_the_excel_export(tmp_path):
    """The readers of histo labels, --slide-mpp, tile labels and eo-sar labels all go through the
    core reader: the same Excel file gives the values written."""
    from plugins.eo_sar.bands import CLASS_NAMES
    from plugins.eo_sar.labels import read_labels_csv
    from plugins.histo.cohort import read_labels
    from plugins.histo.datamodule import read_tile_labels
    from plugins.histo.slides import read_mpp_csv

    labels = readers_data.excel_csv(tmp_path / "labels.csv", ["slide_id", "patient_id", "msi"],
                                    [["s1", "p1", 1], ["s2", "p1", 0]])
    rows, column = read_labels(labels, "msi")
    assert column == "msi" and [(r["slide_id"], r["patient_id"], r["msi"]) for r in rows] == [
        ("s1", "p1", "1"), ("s2", "p1", "0")]

    mpp = readers_data.excel_csv(tmp_path / "mpp.csv", ["slide_id", "mpp"], [["s1", 0.25], ["s2", 0.5]])
    assert read_mpp_csv(mpp) == {"s1": 0.25, "s2": 0.5}

    tiles = readers_data.excel_csv(tmp_path / "tiles.csv", ["slide_id", "x", "y", "tumor", "stroma"],
                                   [["s1", 0, 224, 1, 0], ["s1", 224, 0, 0, 1]])
    names, per_slide = read_tile_labels(tiles)
    assert names == ["tumor", "stroma"]
    assert [(x, y, v.tolist()) for x, y, v in per_slide["s1"]] == [(0, 224, [1.0, 0.0]), (224, 0, [0.0, 1.0])]

    onehot = [[1 if i == k else 0 for i in range(len(CLASS_NAMES))] for k in (2, 5)]
    eo = readers_data.excel_csv(tmp_path / "eo.csv", ["patch_id", *CLASS_NAMES], [["p0", *onehot[0]], ["p1", *onehot[1]]])
    got = read_labels_csv(eo, ["p0", "p1"], tmp_path / "s2")
    assert {k: int(v.argmax()) for k, v in got.items()} == {"p0": 2, "p1": 5}
    assert all(v.sum() == 1 for v in got.values())


def test_slide_biomarker_reads_an_excel_labels_file(tmp_path, mlflow_store):
    """End to end through the pipeline's labels loading: the Excel export of the cohort's labels
    gives the same cohort as the plain file, and the pipeline command reads it (its one-line error
    is about the slide without features, not about a missing slide_id column)."""
    from click.testing import CliRunner

    from pipelines.slide_biomarker import command
    from plugins.histo import cohort as C

    load_make_data("histo").make_feature_cohort(tmp_path / "cohort", n_slides=8, n_external=2, dim=4, tiles=(3, 5))
    feats, plain = tmp_path / "cohort" / "train", tmp_path / "cohort" / "train" / "labels.csv"
    with open(plain, newline="") as fh:
        table = list(csv.reader(fh))
    excel = readers_data.excel_csv(tmp_path / "excel.csv", table[0], table[1:])
    a, b = C.load_cohort(feats, plain), C.load_cohort(feats, excel)
    assert a.slide_ids == b.slide_ids and a.patient_ids == b.patient_ids and a.class_names == b.class_names
    assert np.array_equal(a.labels, b.labels) and len(b) == 8

    ghost = readers_data.excel_csv(tmp_path / "ghost.csv", table[0], table[1:] + [["ghost_1", "pz", "1"]])
    res = CliRunner().invoke(command, ["--features", str(feats), "--labels", str(ghost), "--target", table[0][-1]])
    assert res.exit_code == 2, res.output
    assert res.output == (f"error: {ghost}: 1 labelled slide(s) have no features in {feats}: ghost_1. Fix: embed "
                          "those slides, or remove their rows from the labels CSV.\n")


# ---------------------------------------------------------------- images

def test_16bit_png_round_trips_to_the_right_floats(tmp_path):
    from PIL import Image

    values = np.array([[0, 1, 255, 256], [4095, 32768, 65534, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert image_info(tmp_path / "g16.png").dtype == "uint16"
    x = read_image(tmp_path / "g16.png")
    assert x.dtype == np.float32 and x.shape == (1, 2, 4)
    expected = values.astype(np.float64) / 65535.0
    np.testing.assert_allclose(x[0], expected, rtol=0, atol=1e-7)
    assert x[0, 0, 2] < x[0, 0, 3] < 0.01  # 255 and 256 stay apart and far from white
    rgb = read_image(tmp_path / "g16.png", rgb=True)
    assert rgb.shape == (3, 2, 4) and np.array_equal(rgb[0], rgb[2]) and np.array_equal(rgb[1], x[0])


def test_16bit_colour_png_keeps_16_bits(tmp_path):
    import imagecodecs

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(5, 6, 3), dtype=np.uint16)
    (tmp_path / "c16.png").write_bytes(imagecodecs.png_encode(values))
    x = read_image(tmp_path / "c16.png")
    # Pillow would reduce this to 8 bits per sample; every 16-bit level comes back exactly
    assert np.array_equal(np.rint(x * 65535).astype(np.uint16), values.transpose(2, 0, 1))


def test_tiff_depths_and_8bit_png(tmp_path):
    import tifffile
    from PIL import Image

    u16 = np.array([[0, 1000], [60000, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", u16)
    np.testing.assert_allclose(read_image(tmp_path / "u16.tif")[0], u16 / 65535.0, atol=1e-7)
    assert np.array_equal(read_image(tmp_path / "u16.tif", scale=False)[0], u16.astype(np.float32))
    f32 = np.array([[[-0.5, 0.25], [1.5, 3.0]]], np.float32)  # float data is taken as stored
    tifffile.imwrite(tmp_path / "f32.tif", f32)
    assert np.array_equal(read_image(tmp_path / "f32.tif"), f32)
    u8 = np.array([[[0, 128], [254, 255]]] * 3, np.uint8).transpose(1, 2, 0)
    Image.fromarray(u8, "RGB").save(tmp_path / "u8.png")
    np.testing.assert_allclose(read_image(tmp_path / "u8.png"), u8.transpose(2, 0, 1) / 255.0, atol=1e-7)
    i16 = tmp_path / "i16.tif"
    tifffile.imwrite(i16, np.array([[-5, 300]], np.int16))
    with pytest.raises(DomainFMError) as e:
        read_image(i16)
    assert str(e.value) == (f"{i16}: has int16 pixels, whose range is not fixed (only uint8, uint16 and float "
                            "images are scaled). Fix: save the images as 8- or 16-bit unsigned or as float TIFF.")
    assert np.array_equal(read_image(i16, scale=False), np.array([[[-5, 300]]], np.float32))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DomainFMError, match="bad.png: cannot be read as an image"):
        read_image(bad)


def test_sgd_ft_grey16_classes_differ_as_the_raw_data_does(tmp_path):
    """The two intensity classes of a 16-bit folder stay apart through the sgd-ft dataset (an
    8-bit conversion made every image of both classes white: identical tensors)."""
    from plugins.sgd_ft.datamodule import ImageFolderDataModule

    root = readers_data.grey16_imagefolder(tmp_path / "grey16", size=16, train=3, val=2, test=0)
    dm = ImageFolderDataModule(root, img_size=16, batch_size=4)
    assert dm.in_chans == 3 and dm.classes == ["bright", "dim"]
    mean, std = np.asarray(dm.mean, np.float32)[:, None, None], np.asarray(dm.std, np.float32)[:, None, None]
    from PIL import Image

    for i in range(len(dm.train_set)):
        item, f = dm.train_set[i], dm.train_set.files[i]
        raw = np.asarray(Image.open(f.path)).astype(np.float32) / 65535  # Pillow reads 16-bit grey exactly
        expected = (np.repeat(raw[None], 3, 0) - mean) / std
        got = item["image"].numpy()
        if not np.allclose(got, expected, atol=1e-5):  # the train split flips at random
            np.testing.assert_allclose(got, expected[..., ::-1], atol=1e-5)
    by_class = {c: np.mean([dm.val_set[i]["image"].mean().item() for i in range(len(dm.val_set))
                            if dm.val_set.files[i].label == k]) for k, c in enumerate(dm.classes)}
    # the classes' mean levels, 16-bit, scaled by 65535 and normalised per band
    gap = (readers_data.GREY16_CLASSES["bright"] - readers_data.GREY16_CLASSES["dim"]) / 65535 * np.mean(1 / dm.std)
    assert by_class["bright"] - by_class["dim"] == pytest.approx(gap, rel=0.05)


def test_sgd_ft_learns_two_16bit_grey_classes_above_chance(tmp_path, mlflow_store):
    """The issue's situation through the CLI: a 16-bit greyscale ImageFolder whose classes differ
    only in intensity. Read as 8-bit RGB every image was white and the run scored chance (0.5)."""
    import json

    from click.testing import CliRunner

    from domainfm.cli import main

    root = readers_data.grey16_imagefolder(tmp_path / "grey16", size=32, train=8, val=4, test=6)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(main, ["finetune", "--plugin", "sgd-ft", "--data", str(root), "--backbone", "resnet18",
                                    "--init", "random", "--img-size", "32", "--batch-size", "8", "--accelerator", "cpu",
                                    "--max-steps", "12", "--val-every", "4", "--lr", "0.05", "--no-measure-memory",
                                    "--json", str(out)])
    assert res.exit_code == 0, (res.stderr[-3000:], res.exception)
    m = json.loads(out.read_text())
    assert m["accuracy"] >= 0.9, m  # 12 test images, two balanced classes: chance is 0.5


def test_sports_reid_16bit_crop_keeps_its_levels(tmp_path):
    """A 16-bit greyscale crop (levels 300 and 30000) read by the re-id dataset: two levels, not
    two whites, and the same tensor as the 8-bit crop of the same scene (up to 8-bit rounding)."""
    import torch
    from PIL import Image

    from plugins.sports_reid.datasets import ReIDDataset, ReIDRecord

    grey16 = np.full((40, 20), 300, np.uint16)
    grey16[20:] = 30000
    Image.fromarray(grey16).save(tmp_path / "crop16.png")
    grey8 = np.rint(grey16 / 65535 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(grey8[..., None], 3, 2), "RGB").save(tmp_path / "crop8.png")
    records = [ReIDRecord(path=tmp_path / n, pid="p1", camera=None, item_id=n) for n in ("crop16.png", "crop8.png")]
    ds = ReIDDataset(records, img_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    x16, x8 = ds[0]["image"], ds[1]["image"]
    assert x16.shape == (3, 32, 32)
    # 20x40 -> 16x32, centred: columns 8..23; rows 0..15 hold level 300, rows 16..31 level 30000
    assert torch.allclose(x16[:, 2:14, 10:22], torch.tensor(300 / 65535), atol=1e-5)
    assert torch.allclose(x16[:, 18:30, 10:22], torch.tensor(30000 / 65535), atol=1e-5)
    assert (x16[:, :, :8] == 0).all()
    assert torch.allclose(x16, x8, atol=1 / 255)


def test_histo_refuses_a_16bit_plain_image_instead_of_clipping_it(tmp_path):
    """OpenSlide's ImageSlide would turn a 16-bit image into white RGBA: one line instead."""
    from PIL import Image

    from plugins.histo.slides import open_slide

    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(tmp_path / "field16.png")
    with pytest.raises(DomainFMError) as e:
        open_slide(tmp_path / "field16.png")
    assert str(e.value) == (f"{tmp_path / 'field16.png'}: is a uint16 image with 1 band(s); slides are read as 8-bit "
                            "RGB (brightfield), and converting it would clip its values. Fix: scale it to an 8-bit "
                            "RGB image first (or give the brightfield scan).")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8), "RGB").save(tmp_path / "field8.png")
    assert open_slide(tmp_path / "field8.png").dimensions == (64, 64)
