"""Generate a small BigEarthNet v2.0 (reBEN) folder laid out as the real archive (and torchgeo's
``BigEarthNetV2``).

Real layout (Clasen et al. 2024, https://bigearth.net, arXiv:2407.03653; torchgeo
``BigEarthNetV2``)::

    ROOT/metadata.parquet         patch_id, labels (19-class names), split (train/validation/test),
                                  country, s1_name, contains_seasonal_snow, contains_cloud_or_shadow
    ROOT/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B01.tif ... _B12.tif   12 bands, uint16 L2A
        tile = patch_id without its last two parts, e.g. S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP
    ROOT/BigEarthNet-S1/<scene>/<s1_name>/<s1_name>_VV.tif, _VH.tif         float32 dB
        scene = s1_name without its last three parts
    ROOT/Reference_Maps/<tile>/<patch_id>/<patch_id>_reference_map.tif     uint16 CORINE 2018 codes

Usage: ``python tests/data/bigearthnet_v2/make_data.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plugins.eo_sar.synthetic import utm_transform, write_geotiff  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bigearthnet"))
from make_data import GSD, L1C_ORDER, LANDSCAPES, S2_FILE_BANDS, _down, render_patch  # noqa: E402

# 19-class names (torchgeo's BigEarthNetV2.class_set order) and one CORINE code each
CLASS_19 = ("Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
            "Complex cultivation patterns",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
            "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
            "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
            "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
            "Inland waters", "Marine waters")
CLC_CODE = (111, 121, 211, 221, 231, 242, 243, 244, 311, 312, 313, 321, 322, 324, 331, 411, 421, 512, 523)
TILES = (("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", "EPSG:32633", "S1A_IW_GRDH_1SDV_20170613T165043", "Austria"),
         ("S2B_MSIL2A_20180502T093039_N9999_R136_T34VFM", "EPSG:32634", "S1B_IW_GRDH_1SDV_20180502T160425", "Finland"),
         ("S2A_MSIL2A_20171221T112501_N9999_R037_T29SND", "EPSG:32629", "S1A_IW_GRDH_1SDV_20171221T183021", "Portugal"))
SPLITS = {"train": 10, "validation": 3, "test": 5}
SIZE = 120


def write_dataset(root: str | Path, *, seed: int = 0, splits: dict[str, int] | None = None,
                  drop_a_small_class: bool = True):
    """Write the archive; returns the metadata DataFrame.

    With ``drop_a_small_class`` a class covering under 5 % of a patch's reference map is left out
    of that patch's ``labels`` (as in reBEN, where tiny areas are not labels): so the reference
    map's fractions with ``--label-threshold 0.05`` reproduce the official labels."""
    import pandas as pd

    root = Path(root)
    rows = []
    k = 0
    for split, n in (splits or SPLITS).items():
        for _ in range(n):
            rng = np.random.default_rng([seed, 100 + k])
            tile, crs, scene, country = TILES[k % len(TILES)]
            row, col = 20 + k, 30 + 3 * k
            patch_id, s1_name = f"{tile}_{row}_{col}", f"{scene}_{tile[-5:]}_{row + 40}_{col + 7}"
            cls19, s2, s1 = render_patch(rng, LANDSCAPES[k % len(LANDSCAPES)], SIZE)
            west, north = 400_000.0 + 1200 * col, 5_500_000.0 - 1200 * row
            s2_dir = root / "BigEarthNet-S2" / tile / patch_id
            l2a = np.clip(s2.astype(np.float64) * 0.92 - 80, 1, 10000)
            for b in S2_FILE_BANDS:
                band = np.rint(_down(l2a[L1C_ORDER.index(b)], GSD[b] // 10)).astype(np.uint16)[None]
                write_geotiff(s2_dir / f"{patch_id}_{b}.tif", band, crs=crs,
                              transform=utm_transform(west, north, float(GSD[b])), nodata=None)
            s1_dir = root / "BigEarthNet-S1" / scene / s1_name
            for i, pol in enumerate(("VV", "VH")):
                write_geotiff(s1_dir / f"{s1_name}_{pol}.tif", s1[i:i + 1], crs=crs,
                              transform=utm_transform(west, north), nodata=None)
            ref = np.asarray(CLC_CODE, dtype=np.uint16)[cls19]
            write_geotiff(root / "Reference_Maps" / tile / patch_id / f"{patch_id}_reference_map.tif", ref[None],
                          crs=crs, transform=utm_transform(west, north), nodata=None)
            counts = np.bincount(cls19.ravel(), minlength=19) / cls19.size
            keep = counts >= (0.05 if drop_a_small_class else 1e-9)
            rows.append({"patch_id": patch_id, "labels": [CLASS_19[c] for c in np.flatnonzero(keep)],
                         "split": split, "country": country, "s1_name": s1_name,
                         "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
            k += 1
    df = pd.DataFrame(rows)
    df.to_parquet(root / "metadata.parquet", index=False)
    return df


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/bigearthnet_v2/make_data.py OUT_DIR")
    write_dataset(Path(sys.argv[1]) / "bigearthnet_v2")
    print(Path(sys.argv[1]) / "bigearthnet_v2")
